"""Chutes as a confidential upstream: per-instance evidence and end-to-end encryption.

Chutes routes every request through its API front door, which can read whatever it relays.
What makes a Chutes instance usable for confidential inference is that its TDX quote binds
an ML-KEM-768 key, so a request sealed to that key (``e2ee``) can be read by that enclave
alone; the front door then only sees ciphertext, the chute id, the instance id and the
stream flag.
"""
