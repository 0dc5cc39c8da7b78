"""``teegate usage``: usage per account, key, model and UTC day, as a table, JSON or CSV."""

from __future__ import annotations

import argparse
import csv
import sys

from teegate.commands.ledger_common import (
    EXIT_OK,
    UsageError,
    command,
    open_store,
    print_json,
    table,
)
from teegate.ledger import UnknownKey, format_usd
from teegate.ledger_json import day_start_ms, usage_json


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "usage", parents=[common], help="usage per account, key, model and day (UTC)"
    )
    p.add_argument("--account", metavar="A", help="account id or name")
    p.add_argument("--key", metavar="K", type=int, help="key id")
    p.add_argument("--model", metavar="M")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="from this UTC day on")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p.set_defaults(func=command(_usage))


_USAGE_FIELDS = (
    "day",
    "account_id",
    "account_name",
    "key_id",
    "model",
    "requests",
    "open_requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "charge_micro",
    "unrecovered_micro",
)


def _since_ms(text: str | None) -> int | None:
    try:
        return day_start_ms(text)
    except ValueError:
        raise UsageError(f"--since must be a date like 2025-01-31, got {text!r}") from None


async def _usage(args: argparse.Namespace, db: str) -> int:
    since = _since_ms(args.since)
    async with await open_store(db) as store:
        account_id = None
        if args.account is not None:
            account_id = (await store.require_account(args.account)).id
        if args.key is not None and not any(
            k.key_id == args.key for k in await store.list_keys(account_id)
        ):
            raise UnknownKey(
                f"no API key with id {args.key}"
                + (f" on account {args.account}" if account_id is not None else "")
            )
        groups = await store.usage_report(
            account_id=account_id, key_id=args.key, model=args.model, since_ms=since
        )
    records = [usage_json(g) for g in groups]
    if args.json:
        print_json(records)
    elif args.csv:
        fields = [*_USAGE_FIELDS, "charge_usd", "unrecovered_usd"]
        writer = csv.DictWriter(sys.stdout, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    else:
        rows = [
            (
                g.day,
                f"{g.account_id} ({g.account_name})",
                g.key_id,
                g.model,
                g.requests,
                g.prompt_tokens,
                g.completion_tokens,
                g.cached_tokens,
                format_usd(g.charge_micro),
                format_usd(g.unrecovered_micro),
            )
            for g in groups
        ]
        headers = (
            "DAY",
            "ACCOUNT",
            "KEY",
            "MODEL",
            "REQUESTS",
            "PROMPT",
            "COMPLETION",
            "CACHED",
            "CHARGE_USD",
            "UNRECOVERED_USD",
        )
        print(table(headers, rows, right={2, 4, 5, 6, 7, 8, 9}))
        total = sum(g.charge_micro for g in groups)
        lost = sum(g.unrecovered_micro for g in groups)
        print(
            f"total: {sum(g.requests for g in groups)} request(s), {format_usd(total)} USD "
            f"charged, {format_usd(lost)} USD unrecovered"
        )
    return EXIT_OK
