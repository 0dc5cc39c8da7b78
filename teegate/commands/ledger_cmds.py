"""Operator commands for the ledger: ``accounts``, ``keys``, ``usage``, ``ledger``.

They talk to the database through :class:`teegate.ledger.Store` (the same schema,
migrations, SQL and key, account, top-up and revocation operations the proxy
uses) and are safe to run while the proxy
serves: top-ups, new keys and revocations reach it within its refresh
interval (see :mod:`teegate.ledger.ledger`). Only ``ledger recover`` needs the proxy
stopped, because it settles open reservations.

Exit codes: 0 success, 1 a failed check or an unavailable ledger, 2 bad input
(unknown account or key, malformed or non-positive amount, missing database);
on 2 nothing has been written. API keys are printed once, by ``keys create``,
and never appear anywhere else.

Every command works on an SQLite file and on a PostgreSQL URL alike (``--db``
or ``$TEEGATE_DB``); ``ledger migrate --to URL`` copies the first into the second.

This module registers them all and holds ``ledger verify|recover|migrate``; the
others are in :mod:`.ledger_accounts`, :mod:`.ledger_keys` and
:mod:`.ledger_usage`, their shared plumbing in :mod:`.ledger_common`.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import asdict
from pathlib import Path

from teegate.commands import ledger_accounts, ledger_keys, ledger_usage
from teegate.commands.ledger_common import (
    DEFAULT_DB,
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    command,
    open_store,
    print_json,
    when,
)
from teegate.ledger import Ledger, LedgerLocked, LedgerNotFound, format_usd, is_postgres
from teegate.ledger.migrate import migrate_sqlite_to_postgres
from teegate.ledger.pgschema import redact


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        metavar="PATH",
        default=None,
        help=f"ledger database (default: $TEEGATE_DB, else ./{DEFAULT_DB})",
    )
    ledger_accounts.register(sub, common)
    ledger_keys.register(sub, common)
    ledger_usage.register(sub, common)
    _register_ledger(sub, common)


def _register_ledger(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    led = sub.add_parser("ledger", help="ledger integrity")
    actions = led.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "verify", parents=[common], help="recompute balances from entries (exit 1 on mismatch)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=command(_ledger_verify))
    p = actions.add_parser(
        "recover",
        parents=[common],
        help="settle reservations left open by a crash (SQLite: the proxy must be stopped; "
        "PostgreSQL: only those of workers that are gone)",
    )
    p.set_defaults(func=command(_ledger_recover))
    p = actions.add_parser(
        "migrate",
        parents=[common],
        help="copy an SQLite ledger (--db) into an empty PostgreSQL ledger, then verify the copy "
        "(stop the gateway first)",
    )
    p.add_argument("--to", required=True, metavar="URL", help="postgresql://user@host/db")
    p.set_defaults(func=command(_ledger_migrate))


async def _ledger_verify(args: argparse.Namespace, db: str) -> int:
    async with await open_store(db) as store:
        report = await store.verify()
    if args.json:
        print_json(
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
                f"since {when(r.created_ms)}"
            )
        verdict = "OK" if report.ok else f"{len(report.mismatches)} MISMATCH(ES)"
        print(
            f"{verdict}: {report.accounts_checked} account(s) checked, "
            f"{len(report.open_reservations)} open reservation(s), "
            f"{format_usd(report.unrecovered_micro)} USD unrecovered"
        )
    return EXIT_OK if report.ok else EXIT_FAILED


async def _ledger_migrate(args: argparse.Namespace, db: str) -> int:
    if is_postgres(db):
        raise UsageError("--db must name the SQLite ledger to copy from")
    if not is_postgres(args.to):
        raise UsageError("--to must be a postgresql:// URL")
    try:
        report = await migrate_sqlite_to_postgres(db, args.to)
    except LedgerLocked as e:
        raise LedgerLocked(f"{e} before migrating it") from None
    copied = ", ".join(f"{n} {table}" for table, n in report.copied.items())
    print(f"copied {copied} to {redact(args.to)}")
    for problem in report.problems:
        print(f"MISMATCH {problem}")
    if report.open_reservations:
        print(
            f"{report.open_reservations} open reservation(s) copied: the first PostgreSQL worker "
            "charges them in full (the crash rule)"
        )
    print("OK: the copy verifies" if report.ok else "FAILED: the copy does not verify")
    return EXIT_OK if report.ok else EXIT_FAILED


async def _ledger_recover(args: argparse.Namespace, db: str) -> int:
    if not is_postgres(db) and not await asyncio.to_thread(Path(db).is_file):
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
