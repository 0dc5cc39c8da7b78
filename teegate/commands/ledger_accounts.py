"""``teegate accounts create|list|show|topup``: prepaid accounts.

Accounts are created and credited through :class:`teegate.ledger.Store`, the
same writes the gateway's ledger makes, so a running proxy sees them within
its refresh interval.
"""

from __future__ import annotations

import argparse

from teegate.commands.ledger_common import (
    EXIT_OK,
    command,
    indent,
    open_store,
    positive_usd,
    print_json,
    table,
    when,
)
from teegate.commands.ledger_keys import keys_table
from teegate.ledger import format_usd, inputs
from teegate.ledger_json import account_json, active_keys, key_json


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    accounts = sub.add_parser("accounts", help="prepaid accounts")
    actions = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    p = actions.add_parser("create", parents=[common], help="create an account")
    p.add_argument("name")
    p.add_argument("--topup", metavar="USD", help="initial balance, e.g. 12.50")
    p.set_defaults(func=command(_accounts_create))
    p = actions.add_parser("list", parents=[common], help="list accounts and balances")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=command(_accounts_list))
    p = actions.add_parser("show", parents=[common], help="one account, its keys and totals")
    p.add_argument("account", metavar="ID", help="account id or name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=command(_accounts_show))
    p = actions.add_parser("topup", parents=[common], help="add prepaid credit")
    p.add_argument("account", metavar="ID", help="account id or name")
    p.add_argument("amount", metavar="USD", help="amount in USD, e.g. 12.50")
    p.add_argument("--note", help="free text stored with the entry")
    p.add_argument(
        "--idempotency-key",
        metavar="K",
        help="a retry with the same key credits nothing more (safe to re-run)",
    )
    p.set_defaults(func=command(_accounts_topup))


async def _accounts_create(args: argparse.Namespace, db: str) -> int:
    name = inputs.account_name(args.name)  # validate everything before creating a file
    initial = positive_usd(args.topup) if args.topup is not None else 0
    async with await open_store(db, create=True) as store:
        account = await store.create_account(name, initial)
    print(
        f"created account {account.id} ({account.name}), "
        f"balance {format_usd(account.balance_micro)} USD"
    )
    return EXIT_OK


async def _accounts_list(args: argparse.Namespace, db: str) -> int:
    async with await open_store(db) as store:
        accounts = await store.list_accounts()
        keys = await store.list_keys()
    active = active_keys(keys)
    if args.json:
        print_json([account_json(a, active_keys=active.get(a.id, 0)) for a in accounts])
        return EXIT_OK
    rows = [
        (a.id, a.name, format_usd(a.balance_micro), active.get(a.id, 0), when(a.created_ms))
        for a in accounts
    ]
    print(table(("ID", "NAME", "BALANCE_USD", "KEYS", "CREATED"), rows, right={0, 2, 3}))
    return EXIT_OK


async def _accounts_show(args: argparse.Namespace, db: str) -> int:
    async with await open_store(db) as store:
        account = await store.require_account(args.account)
        keys = await store.list_keys(account.id)
        usage = await store.usage_report(account_id=account.id)
        open_res = [r for r in await store.open_reservations() if r.account_id == account.id]
    charged = sum(g.charge_micro for g in usage)
    requests = sum(g.requests for g in usage)
    held = sum(r.amount_micro for r in open_res)
    if args.json:
        print_json(
            {
                "id": account.id,
                "name": account.name,
                "balance_micro": account.balance_micro,
                "created": when(account.created_ms),
                "requests": requests,
                "charged_micro": charged,
                "open_reservations": len(open_res),
                "held_micro": held,
                "keys": [key_json(k) for k in keys],
            }
        )
        return EXIT_OK
    print(f"account {account.id}: {account.name}")
    print(f"  balance:   {format_usd(account.balance_micro)} USD (open holds already deducted)")
    print(f"  held:      {format_usd(held)} USD in {len(open_res)} open reservation(s)")
    print(f"  charged:   {format_usd(charged)} USD over {requests} request(s)")
    print(f"  created:   {when(account.created_ms)}")
    print(f"  keys:      {len(keys)}")
    if keys:
        print(indent(keys_table(keys)))
    return EXIT_OK


async def _accounts_topup(args: argparse.Namespace, db: str) -> int:
    micro = positive_usd(args.amount)
    if args.note is not None:
        inputs.label(args.note)
    async with await open_store(db) as store:
        account = await store.require_account(args.account)
        credit = await store.topup(
            account.id, micro, args.note, idempotency_key=args.idempotency_key
        )
    if credit.replayed:
        print(
            f"already topped up with this idempotency key (entry {credit.entry_id}); "
            f"nothing credited; balance {format_usd(credit.balance_micro)} USD"
        )
        return EXIT_OK
    print(
        f"topped up account {account.id} ({account.name}) by {format_usd(micro)} USD; "
        f"balance {format_usd(credit.balance_micro)} USD"
    )
    return EXIT_OK
