"""``teegate attest signature``: check an upstream's response signature offline.

Given the exact request body that was sent, the exact response bytes that came back (a JSON
body, or a whole event stream through ``data: [DONE]``), the upstream's signature document
(``GET /v1/signature/{id}``) and the address the model's verified quote binds, say whether the
signature proves that key answered exactly those bytes. Exit 0 when it does, 1 when not, 2 on
bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from teegate.catalog.attestation.signature import (
    SignatureError,
    UpstreamSignature,
    expected_texts,
    sha256_hex,
    verify_signature,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("signature", help="verify a response signature offline")
    p.add_argument("request", type=Path, help="the request body bytes sent upstream")
    p.add_argument("response", type=Path, help="the response bytes received (body or stream)")
    p.add_argument("signature", type=Path, help="the upstream's signature JSON document")
    p.add_argument(
        "--address",
        action="append",
        required=True,
        help="signing address (ECDSA) or public key (Ed25519) a verified quote binds; repeatable",
    )
    p.add_argument("--model", help="model id, for the <model>:<req>:<resp> text form")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        request, response = args.request.read_bytes(), args.response.read_bytes()
        sig = UpstreamSignature.parse(json.loads(args.signature.read_text(encoding="utf-8")))
    except (OSError, ValueError, SignatureError) as e:
        print(f"teegate attest signature: {e}", file=sys.stderr)
        return EXIT_USAGE
    req, resp = sha256_hex(request), sha256_hex(response)
    check = verify_signature(
        sig, request_sha256=req, response_sha256=resp, model=args.model, attested=args.address
    )
    out = {
        "ok": check.ok,
        "reason": check.reason,
        "signer": check.signer,
        "request_sha256": req,
        "response_sha256": resp,
        "accepted_texts": sorted(expected_texts(req, resp, args.model)),
        "signed_text": sig.text,
    }
    print(json.dumps(out, indent=2))
    return EXIT_OK if check.ok else EXIT_FAILED
