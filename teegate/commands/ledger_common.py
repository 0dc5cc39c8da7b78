"""What the ledger's operator commands share: exit codes, errors, the database, tables.

The commands are split by subject (:mod:`.ledger_accounts`, :mod:`.ledger_keys`,
:mod:`.ledger_usage`, :mod:`.ledger_cmds`); this module is their common ground,
so none of them imports another's handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from teegate.ledger import (
    IdempotencyConflict,
    LedgerError,
    LedgerLocked,
    LedgerNotFound,
    SchemaTooNew,
    Store,
    UnknownAccount,
    UnknownKey,
    parse_usd,
)
from teegate.ledger.errors import InvalidInput
from teegate.ledger_json import when  # noqa: F401 - the commands' timestamps
from teegate.money import InvalidAmount

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_DB = "teegate.sqlite3"


class UsageError(Exception):
    """Bad command-line input detected before touching the database."""


def default_db() -> str:
    return os.environ.get("TEEGATE_DB") or DEFAULT_DB


Handler = Callable[[argparse.Namespace, str], Awaitable[int]]


def command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Run an async handler; map ledger errors to a message and an exit code."""

    def run(args: argparse.Namespace) -> int:
        db = args.db or default_db()
        try:
            return asyncio.run(handler(args, db))
        except (
            UsageError,
            InvalidAmount,
            InvalidInput,
            UnknownAccount,
            UnknownKey,
            IdempotencyConflict,
        ) as e:
            return fail(str(e), EXIT_USAGE)
        except LedgerNotFound as e:
            return fail(f"{e} (pass --db PATH or set TEEGATE_DB)", EXIT_USAGE)
        except (SchemaTooNew, LedgerLocked, LedgerError) as e:
            return fail(str(e), EXIT_FAILED)

    return run


def fail(message: str, code: int) -> int:
    print(f"teegate: error: {message}", file=sys.stderr)
    return code


async def open_store(db: str, *, create: bool = False) -> Store:
    """The operator's connection: the same :class:`Store` the gateway's ledger writes through."""
    return await Store.open(db, create=create)


def positive_usd(text: str) -> int:
    micro = parse_usd(text)
    if micro <= 0:
        raise UsageError(f"amount must be positive, got {text!r}")
    return micro


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: set[int]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
