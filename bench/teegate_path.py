"""teegate's full path, built from whatever the gateway holds when the harness runs.

Billing and attestation are wired into the addon chain over time, so the harness does not
assume them: it reads the configuration model and the addon chain, and

* when the configuration has a ledger section, creates a temporary database with a funded
  account and a key (with a rate limit far above any rate reached here, so the limiter's code
  runs but never refuses) through ``teegate accounts create`` / ``teegate keys create``, and
  sends that key;
* when it has an ``attestation`` section, points it at the sandbox's test evidence the way
  ``teegate sandbox`` does, if that command knows how (see :func:`_attestation_toml`).

What the path included is recorded in the results (:meth:`TeegatePath.describe`), so two runs
months apart say what they measured.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.paths import CHAT, Running
from tests.support.gateway_proc import REPO_ROOT, start_gateway
from tests.support.sandbox_proc import SandboxProc

ANY_CLIENT_KEY = "sk-bench-client"  # sent when the gateway checks no key
RATE_LIMIT_PER_MIN = 1_000_000
TOPUP_USD = "1000000"
_DB_FIELDS = ("db", "path", "database", "db_path", "file")


def _sections() -> dict[str, Any]:
    from teegate.config import Settings

    return dict(Settings.model_fields)


def _section_fields(section: str) -> set[str]:
    ann = _sections()[section].annotation
    return set(getattr(ann, "model_fields", {}) or {})


def _addon_names() -> list[str]:
    try:
        from teegate.config import Settings
        from teegate.runner import build_addons

        return [type(a).__name__ for a in build_addons(Settings())]
    except Exception as e:  # the chain is being rewired; say so rather than guess
        return [f"<unknown: {type(e).__name__}: {e}>"]


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "teegate", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"teegate {args[0]} {args[1]} failed: {done.stderr.strip()}")
    return done.stdout


class TeegatePath:
    name, label = "teegate", "teegate (full)"

    def __init__(
        self,
        extra_toml: str = "",
        *,
        module: str = "teegate",
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.extra_toml = extra_toml  # added to the gateway's proxy.toml (e.g. the upstream kind)
        self.module = module  # what ``python -m`` runs: teegate, or bench.timeline_probe
        self.env = env or {}
        self.args = args  # added to ``teegate run`` (e.g. --workers 2)
        sections = _sections()
        self.ledger_section = next((s for s in ("ledger", "billing") if s in sections), None)
        self.attestation = "attestation" in sections
        self.addons = _addon_names()

    def describe(self) -> dict[str, Any]:
        return {
            "what": "teegate run: the full addon chain",
            "addons": self.addons,
            "config_sections": sorted(_sections()),
            "key_check_and_billing": self.ledger_section is not None,
            "attestation_configured": self.attestation,
        }

    def _ledger(self, workdir: Path) -> tuple[str, str]:
        """(extra TOML, client key) for a funded account in a fresh database."""
        assert self.ledger_section is not None
        fields = _section_fields(self.ledger_section)
        db_field = next((f for f in _DB_FIELDS if f in fields), None)
        if db_field is None:
            raise RuntimeError(
                f"[{self.ledger_section}] has no database field among {_DB_FIELDS}: "
                f"{sorted(fields)}; update bench/teegate_path.py"
            )
        db = workdir / "ledger.sqlite3"
        _cli("accounts", "create", "bench", "--db", str(db), "--topup", TOPUP_USD)
        out = _cli(
            "keys", "create", "bench", "--db", str(db), "--rate-limit", str(RATE_LIMIT_PER_MIN)
        )
        m = re.search(r"^api key:\s*(\S+)", out, re.M)
        if m is None:
            raise RuntimeError("teegate keys create printed no key")
        return f'{self.ledger_section}.{db_field} = "{db}"\n', m.group(1)

    def start(self, upstream: SandboxProc, workdir: Path, streaming: bool) -> Running:
        workdir.mkdir(parents=True, exist_ok=True)
        extra, key = "", ANY_CLIENT_KEY
        if self.ledger_section is not None:
            extra, key = self._ledger(workdir)
        if self.attestation:
            extra += _attestation_toml(upstream)
        extra += self.extra_toml
        gw = start_gateway(
            upstream.base_url,
            upstream.api_key,
            extra_toml=extra,
            workdir=workdir,
            module=self.module,
            env=self.env,
            args=self.args,
        )
        _warm(gw.base_url, key, fresh_connections=16 if "--workers" in self.args else 1)
        return Running(gw.base_url + CHAT, key, gw.process.pid, gw.stop)


def _warm(base_url: str, key: str, fresh_connections: int) -> None:
    """Wait until the gateway has its first verdicts: ``GET /v1/models`` waits (bounded) for
    them in the process that answers. A worker joins the shared port as soon as it listens, so
    with several workers each must be reached: the kernel spreads new connections over them by
    their addresses, and 16 fresh ones miss one of two workers once in 2^15 runs."""
    import httpx

    for _ in range(fresh_connections):
        httpx.get(
            base_url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=60
        ).raise_for_status()


def _attestation_toml(upstream: SandboxProc) -> str:
    """The sandbox's test evidence for the attestation section, as ``teegate sandbox`` sets it.

    ``teegate sandbox`` exposes the settings it uses as ``attestation_settings(base_url)``
    returning TOML dotted keys, when it configures attestation at all; without that the
    gateway's defaults apply (recorded in the results either way).
    """
    from teegate.commands import sandbox

    make = getattr(sandbox, "attestation_toml", None)
    return make(upstream.base_url) if callable(make) else ""


class PostgresTeegatePath(TeegatePath):
    """teegate on a PostgreSQL ledger (``$TEEGATE_DB``), with one or several workers.

    Every start gets its own funded account and key in the one database given (``--pg``):
    accounts outlive a gateway there, unlike a temporary SQLite file.
    """

    def __init__(self, url: str, workers: int) -> None:
        args = ("--workers", str(workers)) if workers > 1 else ()
        super().__init__(env={"TEEGATE_DB": url}, args=args)
        self.url = url
        self.workers = workers
        self.name = f"teegate-w{workers}" if workers > 1 else "teegate-pg"
        self.label = f"teegate --workers {workers} (PostgreSQL)" if workers > 1 else (
            "teegate (PostgreSQL)"
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "what": f"teegate run --workers {self.workers}, PostgreSQL ledger",
            "workers": self.workers,
        }

    def _ledger(self, workdir: Path) -> tuple[str, str]:
        account = f"bench-{workdir.name}-{secrets.token_hex(4)}"
        _cli("accounts", "create", account, "--db", self.url, "--topup", TOPUP_USD)
        out = _cli(
            "keys", "create", account, "--db", self.url, "--rate-limit", str(RATE_LIMIT_PER_MIN)
        )
        m = re.search(r"^api key:\s*(\S+)", out, re.M)
        if m is None:
            raise RuntimeError("teegate keys create printed no key")
        return "", m.group(1)  # the gateway finds the database in $TEEGATE_DB
