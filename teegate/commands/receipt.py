"""``teegate receipt verify``: check a gateway receipt offline.

``RECEIPT.json`` is what ``GET /v1/receipts/{id}`` answered. The key is the gateway's Ed25519
public key, given as hex (``--key``), or fetched from a gateway (``--gateway URL``, which asks
``GET /v1/attestation/gateway``; a key fetched that way is only as good as the channel, so pin it
or check the gateway's own quote). Prints the receipt's body as JSON when its signature holds;
exit 0 valid, 1 altered or signed by another key, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

from teegate.catalog.attestation.receipts import ReceiptError, verify_receipt

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    receipt = subparsers.add_parser("receipt", help="verify a gateway receipt offline")
    sub = receipt.add_subparsers(dest="receipt_command", required=True, metavar="ACTION")
    verify = sub.add_parser("verify", help="check a receipt's signature")
    verify.add_argument("receipt", type=Path, help="the receipt JSON (GET /v1/receipts/{id})")
    source = verify.add_mutually_exclusive_group(required=True)
    source.add_argument("--key", help="the gateway's Ed25519 public key, hex")
    source.add_argument("--gateway", help="a gateway base URL to fetch the public key from")
    verify.add_argument(
        "--api-key", help="API key for --gateway (default: $TEEGATE_API_KEY or $OPENAI_API_KEY)"
    )
    verify.set_defaults(func=run_verify)


def _fetch_key(base: str, api_key: str | None) -> str:
    api_key = api_key or os.environ.get("TEEGATE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    url = base.rstrip("/").removesuffix("/v1") + "/v1/attestation/gateway"
    resp = httpx.get(url, headers=headers, timeout=30)
    resp.raise_for_status()
    key = resp.json().get("public_key")
    if not isinstance(key, str):
        raise ValueError("the gateway named no public key")
    return key


def run_verify(args: argparse.Namespace) -> int:
    try:
        doc = json.loads(args.receipt.read_text(encoding="utf-8"))
        key = args.key or _fetch_key(args.gateway, args.api_key)
    except (OSError, ValueError, httpx.HTTPError) as e:
        print(f"teegate receipt verify: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        body = verify_receipt(doc, key)
    except ReceiptError as e:
        print(json.dumps({"ok": False, "reason": str(e)}, indent=2))
        return EXIT_FAILED
    print(json.dumps({"ok": True, "receipt": body}, indent=2, sort_keys=True))
    return EXIT_OK
