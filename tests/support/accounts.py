"""Accounts and keys for tests, made with the real operator command line (in-process)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from teegate.cli import main


def teegate(*argv: str) -> tuple[int, str, str]:
    """Run a ``teegate`` command in this process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse errors
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def create_account(db: Path, name: str, topup_usd: str | None = "100") -> int:
    args = ["accounts", "create", name, "--db", str(db)]
    if topup_usd is not None:
        args += ["--topup", topup_usd]
    code, out, err = teegate(*args)
    assert code == 0, err
    code, out, err = teegate("accounts", "show", name, "--db", str(db), "--json")
    assert code == 0, err
    return int(json.loads(out)["id"])


def create_key(db: Path, account: str | int, rate_limit: int | None = None) -> str:
    args = ["keys", "create", str(account), "--db", str(db)]
    if rate_limit is not None:
        args += ["--rate-limit", str(rate_limit)]
    code, out, err = teegate(*args)
    assert code == 0, err
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("api key:"))


def balance_micro(db: Path, account: str | int) -> int:
    code, out, err = teegate("accounts", "show", str(account), "--db", str(db), "--json")
    assert code == 0, err
    return int(json.loads(out)["balance_micro"])
