"""The sandbox's Chutes flavour (``python -m teegate.sandbox --upstream chutes``).

It simulates Chutes as a confidential upstream: catalog rows carry a ``chute_id``; each chute
has a few instances, each with its own ML-KEM-768 key and certificate; ``/e2e/instances``
hands out keys and single-use nonce tokens; ``/chutes/{id}/evidence`` returns TDX quotes
(test DCAP PKI) bound to the caller's nonce, the instance's key and its certificate; and
``/e2e/invoke`` is the front door relaying end-to-end encrypted chats to the "enclave".

Written independently of the gateway (nothing from ``teegate.catalog``) so that the interop
test with Chutes' published client, and the gateway's tests against this server, each check a
separate implementation of the protocol.
"""
