"""``teegate keys create|list|revoke``: API keys.

A key is made by :meth:`teegate.ledger.Store.create_key`, the operation the
gateway's :meth:`teegate.ledger.Ledger.create_key` uses too: only its hash is
stored, and the plaintext is printed here once and never again.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from teegate.commands.ledger_common import (
    EXIT_OK,
    UsageError,
    command,
    open_store,
    print_json,
    table,
    when,
)
from teegate.ledger import inputs
from teegate.ledger.keys import DEFAULT_PREFIX, check_prefix
from teegate.ledger_json import key_json


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    keys = sub.add_parser("keys", help="API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = actions.add_parser("create", parents=[common], help="create a key (printed once)")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--label")
    p.add_argument("--rate-limit", type=int, metavar="N", help="requests per minute")
    p.add_argument(
        "--key-prefix",
        default=None,
        help=f"key prefix (default: $TEEGATE_KEY_PREFIX, else {DEFAULT_PREFIX})",
    )
    p.set_defaults(func=command(_keys_create))
    p = actions.add_parser("list", parents=[common], help="list keys (never their secrets)")
    p.add_argument("account", metavar="ACCOUNT", nargs="?", help="only this account")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=command(_keys_list))
    p = actions.add_parser("revoke", parents=[common], help="revoke a key")
    p.add_argument("key_id", metavar="KEY_ID", type=int)
    p.set_defaults(func=command(_keys_revoke))
    p = actions.add_parser(
        "limit", parents=[common], help="set a key's requests per minute (or 'default')"
    )
    p.add_argument("key_id", metavar="KEY_ID", type=int)
    p.add_argument("rate_limit", metavar="N|default")
    p.set_defaults(func=command(_keys_limit))


async def _keys_create(args: argparse.Namespace, db: str) -> int:
    prefix = args.key_prefix or os.environ.get("TEEGATE_KEY_PREFIX") or DEFAULT_PREFIX
    try:
        check_prefix(prefix)
    except ValueError as e:
        raise UsageError(str(e)) from None
    label = inputs.label(args.label)
    rate_limit = inputs.rate_limit(args.rate_limit)
    async with await open_store(db) as store:
        account = await store.require_account(args.account)
        key, plaintext = await store.create_key(
            account.id, prefix=prefix, label=label, rate_limit=rate_limit
        )
    print(f"key id:     {key.key_id}")
    print(f"account:    {account.id} ({account.name})")
    if key.label:
        print(f"label:      {key.label}")
    if key.rate_limit:
        print(f"rate limit: {key.rate_limit} requests/minute")
    print(f"api key:    {plaintext}")
    print("This is the only time the key is shown; only its hash is stored.", file=sys.stderr)
    return EXIT_OK


def keys_table(keys: Sequence[Any]) -> str:
    rows = [
        (
            k.key_id,
            f"{k.account_id} ({k.account_name})",
            k.label or "-",
            k.rate_limit or "-",
            when(k.created_ms),
            when(k.revoked_ms) if k.revoked_ms else "active",
        )
        for k in keys
    ]
    headers = ("KEY_ID", "ACCOUNT", "LABEL", "RATE/MIN", "CREATED", "REVOKED")
    return table(headers, rows, right={0, 3})


async def _keys_list(args: argparse.Namespace, db: str) -> int:
    async with await open_store(db) as store:
        account_id = None
        if args.account is not None:
            account_id = (await store.require_account(args.account)).id
        keys = await store.list_keys(account_id)
    if args.json:
        print_json([key_json(k) for k in keys])
    else:
        print(keys_table(keys))
    return EXIT_OK


async def _keys_revoke(args: argparse.Namespace, db: str) -> int:
    async with await open_store(db) as store:
        changed = await store.revoke_key(args.key_id)
    if changed:
        print(f"revoked key {args.key_id} (a running proxy stops accepting it within ~1 s)")
    else:
        print(f"key {args.key_id} was already revoked")
    return EXIT_OK


async def _keys_limit(args: argparse.Namespace, db: str) -> int:
    text = args.rate_limit
    if text != "default" and not text.isdigit():
        raise UsageError(
            f"rate limit must be a number of requests per minute or 'default', got {text!r}"
        )
    limit = None if text == "default" else inputs.rate_limit(int(text))
    async with await open_store(db) as store:
        info = await store.set_rate_limit(args.key_id, limit)
    shown = f"{info.rate_limit} requests/minute" if info.rate_limit else "the gateway's default"
    print(f"key {info.key_id}: {shown} (a running proxy applies it within ~1 s)")
    return EXIT_OK
