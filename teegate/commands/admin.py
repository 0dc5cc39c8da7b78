"""``teegate admin token create|list|revoke``: bearer tokens of the admin API.

A token is printed once by ``create`` and only its SHA-256 is stored in the ledger database
(:mod:`teegate.ledger.admintokens`), like an API key. A running gateway checks every admin
request against the database, so a new or revoked token counts at once. A gateway whose admin
listener is not on a loopback address refuses to start while no token exists.
"""

from __future__ import annotations

import argparse
import sys

from teegate.commands.ledger_common import (
    DEFAULT_DB,
    EXIT_OK,
    command,
    open_store,
    print_json,
    table,
    when,
)
from teegate.ledger import inputs
from teegate.ledger.admintokens import AdminTokens


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db", metavar="PATH", default=None, help=f"ledger database (default: ./{DEFAULT_DB})"
    )
    admin = sub.add_parser("admin", help="the admin API's tokens")
    things = admin.add_subparsers(dest="admin_command", required=True, metavar="THING")
    token = things.add_parser("token", help="admin API bearer tokens")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = actions.add_parser("create", parents=[common], help="create a token (printed once)")
    p.add_argument("--label")
    p.set_defaults(func=command(_create))
    p = actions.add_parser("list", parents=[common], help="list tokens (never their secrets)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=command(_list))
    p = actions.add_parser("revoke", parents=[common], help="revoke a token")
    p.add_argument("token_id", metavar="TOKEN_ID", type=int)
    p.set_defaults(func=command(_revoke))


async def _create(args: argparse.Namespace, db: str) -> int:
    label = inputs.label(args.label)
    async with await open_store(db, create=True) as store:
        token, plaintext = await AdminTokens(store).create(label)
    print(f"token id:    {token.token_id}")
    print(f"admin token: {plaintext}")
    print("This is the only time the token is shown; only its hash is stored.", file=sys.stderr)
    return EXIT_OK


async def _list(args: argparse.Namespace, db: str) -> int:
    async with await open_store(db) as store:
        tokens = await AdminTokens(store).list()
    if args.json:
        print_json(
            [
                {
                    "id": t.token_id,
                    "label": t.label,
                    "created": when(t.created_ms),
                    "revoked": when(t.revoked_ms) if t.revoked_ms else None,
                }
                for t in tokens
            ]
        )
        return EXIT_OK
    rows = [
        (
            t.token_id,
            t.label or "-",
            when(t.created_ms),
            when(t.revoked_ms) if t.revoked_ms else "active",
        )
        for t in tokens
    ]
    print(table(("TOKEN_ID", "LABEL", "CREATED", "REVOKED"), rows, right={0}))
    return EXIT_OK


async def _revoke(args: argparse.Namespace, db: str) -> int:
    async with await open_store(db) as store:
        changed = await AdminTokens(store).revoke(args.token_id)
    print(
        f"revoked admin token {args.token_id}"
        if changed
        else f"token {args.token_id} was already revoked"
    )
    return EXIT_OK
