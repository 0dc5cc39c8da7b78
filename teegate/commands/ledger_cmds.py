"""Operator commands for the ledger: ``accounts``, ``keys``, ``usage``, ``ledger``.

They talk to the database through :class:`teegate.ledger.Store` (the same schema,
migrations and SQL the proxy uses) and are safe to run while the proxy
serves: top-ups, new keys and revocations reach it within its refresh
interval (see :mod:`teegate.ledger.ledger`). Only ``ledger recover`` needs the proxy
stopped, because it settles open reservations.

Exit codes: 0 success, 1 a failed check or an unavailable ledger, 2 bad input
(unknown account or key, malformed or non-positive amount, missing database);
on 2 nothing has been written. API keys are printed once, by ``keys create``,
and never appear anywhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from teegate.ledger import (
    Ledger,
    LedgerError,
    LedgerLocked,
    LedgerNotFound,
    SchemaTooNew,
    Store,
    UnknownAccount,
    UnknownKey,
    format_usd,
    inputs,
    parse_usd,
)
from teegate.ledger.errors import InvalidInput
from teegate.ledger.keys import DEFAULT_PREFIX, check_prefix, new_key
from teegate.money import InvalidAmount

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_DB = "teegate.sqlite3"


class UsageError(Exception):
    """Bad command-line input detected before touching the database."""


def default_db() -> str:
    return os.environ.get("TEEGATE_DB") or DEFAULT_DB


# -- registration ---------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        metavar="PATH",
        default=None,
        help=f"ledger database (default: $TEEGATE_DB, else ./{DEFAULT_DB})",
    )
    _register_accounts(sub, common)
    _register_keys(sub, common)
    _register_usage(sub, common)
    _register_ledger(sub, common)


def _register_accounts(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    accounts = sub.add_parser("accounts", help="prepaid accounts")
    actions = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    p = actions.add_parser("create", parents=[common], help="create an account")
    p.add_argument("name")
    p.add_argument("--topup", metavar="USD", help="initial balance, e.g. 12.50")
    p.set_defaults(func=_command(_accounts_create))
    p = actions.add_parser("list", parents=[common], help="list accounts and balances")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_command(_accounts_list))
    p = actions.add_parser("show", parents=[common], help="one account, its keys and totals")
    p.add_argument("account", metavar="ID", help="account id or name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_command(_accounts_show))
    p = actions.add_parser("topup", parents=[common], help="add prepaid credit")
    p.add_argument("account", metavar="ID", help="account id or name")
    p.add_argument("amount", metavar="USD", help="amount in USD, e.g. 12.50")
    p.add_argument("--note", help="free text stored with the entry")
    p.set_defaults(func=_command(_accounts_topup))


def _register_keys(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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
    p.set_defaults(func=_command(_keys_create))
    p = actions.add_parser("list", parents=[common], help="list keys (never their secrets)")
    p.add_argument("account", metavar="ACCOUNT", nargs="?", help="only this account")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_command(_keys_list))
    p = actions.add_parser("revoke", parents=[common], help="revoke a key")
    p.add_argument("key_id", metavar="KEY_ID", type=int)
    p.set_defaults(func=_command(_keys_revoke))


def _register_usage(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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
    p.set_defaults(func=_command(_usage))


def _register_ledger(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    led = sub.add_parser("ledger", help="ledger integrity")
    actions = led.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "verify", parents=[common], help="recompute balances from entries (exit 1 on mismatch)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_command(_ledger_verify))
    p = actions.add_parser(
        "recover",
        parents=[common],
        help="settle reservations left open by a crash (the proxy must be stopped)",
    )
    p.set_defaults(func=_command(_ledger_recover))


# -- plumbing -------------------------------------------------------------------

Handler = Callable[[argparse.Namespace, str], Awaitable[int]]


def _command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Run an async handler; map ledger errors to a message and an exit code."""

    def run(args: argparse.Namespace) -> int:
        db = args.db or default_db()
        try:
            return asyncio.run(handler(args, db))
        except (UsageError, InvalidAmount, InvalidInput, UnknownAccount, UnknownKey) as e:
            return _fail(str(e), EXIT_USAGE)
        except LedgerNotFound as e:
            return _fail(f"{e} (pass --db PATH or set TEEGATE_DB)", EXIT_USAGE)
        except (SchemaTooNew, LedgerLocked, LedgerError) as e:
            return _fail(str(e), EXIT_FAILED)

    return run


def _fail(message: str, code: int) -> int:
    print(f"teegate: error: {message}", file=sys.stderr)
    return code


async def _open(db: str, *, create: bool = False) -> Store:
    return await Store.open(db, create=create)


def _amount(text: str) -> int:
    micro = parse_usd(text)
    if micro <= 0:
        raise UsageError(f"amount must be positive, got {text!r}")
    return micro


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: set[int]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# -- accounts -------------------------------------------------------------------


async def _accounts_create(args: argparse.Namespace, db: str) -> int:
    name = inputs.account_name(args.name)  # validate everything before creating a file
    initial = _amount(args.topup) if args.topup is not None else 0
    store = await _open(db, create=True)
    try:
        account = await store.create_account(name, initial)
    finally:
        await store.close()
    print(
        f"created account {account.id} ({account.name}), "
        f"balance {format_usd(account.balance_micro)} USD"
    )
    return EXIT_OK


async def _accounts_list(args: argparse.Namespace, db: str) -> int:
    store = await _open(db)
    try:
        accounts = await store.list_accounts()
        keys = await store.list_keys()
    finally:
        await store.close()
    active: dict[int, int] = {}
    for k in keys:
        if k.revoked_ms is None:
            active[k.account_id] = active.get(k.account_id, 0) + 1
    if args.json:
        _print_json(
            [
                {
                    "id": a.id,
                    "name": a.name,
                    "balance_micro": a.balance_micro,
                    "balance_usd": format_usd(a.balance_micro),
                    "active_keys": active.get(a.id, 0),
                    "created": _when(a.created_ms),
                }
                for a in accounts
            ]
        )
        return EXIT_OK
    rows = [
        (a.id, a.name, format_usd(a.balance_micro), active.get(a.id, 0), _when(a.created_ms))
        for a in accounts
    ]
    print(_table(("ID", "NAME", "BALANCE_USD", "KEYS", "CREATED"), rows, right={0, 2, 3}))
    return EXIT_OK


async def _accounts_show(args: argparse.Namespace, db: str) -> int:
    store = await _open(db)
    try:
        account = await store.require_account(args.account)
        keys = await store.list_keys(account.id)
        usage = await store.usage_report(account_id=account.id)
        open_res = [r for r in await store.open_reservations() if r.account_id == account.id]
    finally:
        await store.close()
    charged = sum(g.charge_micro for g in usage)
    requests = sum(g.requests for g in usage)
    held = sum(r.amount_micro for r in open_res)
    if args.json:
        _print_json(
            {
                "id": account.id,
                "name": account.name,
                "balance_micro": account.balance_micro,
                "created": _when(account.created_ms),
                "requests": requests,
                "charged_micro": charged,
                "open_reservations": len(open_res),
                "held_micro": held,
                "keys": [_key_json(k) for k in keys],
            }
        )
        return EXIT_OK
    print(f"account {account.id}: {account.name}")
    print(f"  balance:   {format_usd(account.balance_micro)} USD (open holds already deducted)")
    print(f"  held:      {format_usd(held)} USD in {len(open_res)} open reservation(s)")
    print(f"  charged:   {format_usd(charged)} USD over {requests} request(s)")
    print(f"  created:   {_when(account.created_ms)}")
    print(f"  keys:      {len(keys)}")
    if keys:
        print(_indent(_keys_table(keys)))
    return EXIT_OK


async def _accounts_topup(args: argparse.Namespace, db: str) -> int:
    micro = _amount(args.amount)
    if args.note is not None:
        inputs.label(args.note)
    store = await _open(db)
    try:
        account = await store.require_account(args.account)
        balance = await store.credit(account.id, micro, "topup", args.note)
    finally:
        await store.close()
    print(
        f"topped up account {account.id} ({account.name}) by {format_usd(micro)} USD; "
        f"balance {format_usd(balance)} USD"
    )
    return EXIT_OK


# -- keys -----------------------------------------------------------------------


async def _keys_create(args: argparse.Namespace, db: str) -> int:
    prefix = args.key_prefix or os.environ.get("TEEGATE_KEY_PREFIX") or DEFAULT_PREFIX
    try:
        check_prefix(prefix)
    except ValueError as e:
        raise UsageError(str(e)) from None
    label = inputs.label(args.label)
    rate_limit = inputs.rate_limit(args.rate_limit)
    store = await _open(db)
    try:
        account = await store.require_account(args.account)
        plaintext, digest = new_key(prefix)
        key = await store.insert_key(account.id, digest, label, rate_limit)
    finally:
        await store.close()
    print(f"key id:     {key.key_id}")
    print(f"account:    {account.id} ({account.name})")
    if key.label:
        print(f"label:      {key.label}")
    if key.rate_limit:
        print(f"rate limit: {key.rate_limit} requests/minute")
    print(f"api key:    {plaintext}")
    print("This is the only time the key is shown; only its hash is stored.", file=sys.stderr)
    return EXIT_OK


def _key_json(k: Any) -> dict[str, Any]:
    d = asdict(k)
    d["created"] = _when(k.created_ms)
    d["revoked"] = _when(k.revoked_ms) if k.revoked_ms else None
    return d


def _keys_table(keys: Sequence[Any]) -> str:
    rows = [
        (
            k.key_id,
            f"{k.account_id} ({k.account_name})",
            k.label or "-",
            k.rate_limit or "-",
            _when(k.created_ms),
            _when(k.revoked_ms) if k.revoked_ms else "active",
        )
        for k in keys
    ]
    headers = ("KEY_ID", "ACCOUNT", "LABEL", "RATE/MIN", "CREATED", "REVOKED")
    return _table(headers, rows, right={0, 3})


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


async def _keys_list(args: argparse.Namespace, db: str) -> int:
    store = await _open(db)
    try:
        account_id = None
        if args.account is not None:
            account_id = (await store.require_account(args.account)).id
        keys = await store.list_keys(account_id)
    finally:
        await store.close()
    if args.json:
        _print_json([_key_json(k) for k in keys])
    else:
        print(_keys_table(keys))
    return EXIT_OK


async def _keys_revoke(args: argparse.Namespace, db: str) -> int:
    store = await _open(db)
    try:
        changed = await store.revoke_key(args.key_id)
    finally:
        await store.close()
    if changed:
        print(f"revoked key {args.key_id} (a running proxy stops accepting it within ~1 s)")
    else:
        print(f"key {args.key_id} was already revoked")
    return EXIT_OK


# -- usage ----------------------------------------------------------------------

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
    if text is None:
        return None
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since must be a date like 2025-01-31, got {text!r}") from None
    if len(text) != 10:
        raise UsageError(f"--since must be a date like 2025-01-31, got {text!r}")
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return int(start.timestamp()) * 1000


async def _usage(args: argparse.Namespace, db: str) -> int:
    since = _since_ms(args.since)
    store = await _open(db)
    try:
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
    finally:
        await store.close()
    records = [asdict(g) for g in groups]
    for r in records:
        r["charge_usd"] = format_usd(r["charge_micro"])
        r["unrecovered_usd"] = format_usd(r["unrecovered_micro"])
    if args.json:
        _print_json(records)
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
        print(_table(headers, rows, right={2, 4, 5, 6, 7, 8, 9}))
        total = sum(g.charge_micro for g in groups)
        lost = sum(g.unrecovered_micro for g in groups)
        print(
            f"total: {sum(g.requests for g in groups)} request(s), {format_usd(total)} USD "
            f"charged, {format_usd(lost)} USD unrecovered"
        )
    return EXIT_OK


# -- ledger ---------------------------------------------------------------------


async def _ledger_verify(args: argparse.Namespace, db: str) -> int:
    store = await _open(db)
    try:
        report = await store.verify()
    finally:
        await store.close()
    if args.json:
        _print_json(
            {
                "ok": report.ok,
                "accounts_checked": report.accounts_checked,
                "unrecovered_micro": report.unrecovered_micro,
                "unrecovered_usd": format_usd(report.unrecovered_micro),
                "mismatches": [asdict(m) for m in report.mismatches],
                "open_reservations": [asdict(r) for r in report.open_reservations],
            }
        )
    else:
        for m in report.mismatches:
            print(f"MISMATCH {m.kind}: {m.detail}")
        for r in report.open_reservations:
            print(
                f"open reservation {r.reservation_id} (request {r.request_id}, "
                f"account {r.account_id}): {format_usd(r.amount_micro)} USD held "
                f"since {_when(r.created_ms)}"
            )
        verdict = "OK" if report.ok else f"{len(report.mismatches)} MISMATCH(ES)"
        print(
            f"{verdict}: {report.accounts_checked} account(s) checked, "
            f"{len(report.open_reservations)} open reservation(s), "
            f"{format_usd(report.unrecovered_micro)} USD unrecovered"
        )
    return EXIT_OK if report.ok else EXIT_FAILED


async def _ledger_recover(args: argparse.Namespace, db: str) -> int:
    if not await asyncio.to_thread(Path(db).is_file):
        raise LedgerNotFound(f"no ledger database at {db}")
    try:
        # recover=False + recover(): the same rule, printed here instead of logged.
        ledger = await Ledger.open(db, recover=False)
    except LedgerLocked as e:
        raise LedgerLocked(f"{e}; a serving proxy recovers on its own start") from None
    try:
        recovered = await ledger.recover()
    finally:
        await ledger.close()
    for r in recovered:
        print(
            f"settled reservation {r.reservation_id} (request {r.request_id}, account "
            f"{r.account_id}, key {r.key_id}, model {r.model}) at its full "
            f"{format_usd(r.charged_micro)} USD"
        )
    print(f"recovered {len(recovered)} reservation(s)")
    return EXIT_OK
