"""Real clients against real processes: one TLS sandbox upstream and one gateway for the whole
folder, its reverse listener for reverse mode and its egress listener for egress mode.

The clients run in batches, one process per runtime and mode (Python, Node; reverse, egress),
all four at once, each with the environment its mode gives a real app: nothing proxy-related in
reverse mode; ``HTTPS_PROXY`` and the gateway's CA (``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``,
``CURL_CA_BUNDLE``, ``NODE_EXTRA_CA_CERTS``) in egress mode, where the apps keep the upstream's
own https URL. The tests then judge each cell by its outcome and by what the sandbox and the
ledger recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.compat.matrix import NODE_DIR, cell_id, cells
from tests.support.egress import gateway_ca_path, start_tls_sandbox
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import REPO_ROOT, TEE

BATCH_TIMEOUT_S = 240
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")


@pytest.fixture(scope="package")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compat-tls")


@pytest.fixture(scope="package")
def upstream(tls_dir: Path) -> Iterator[SandboxProc]:
    with start_tls_sandbox(tls_dir) as proc:
        yield proc


@pytest.fixture(scope="package")
def gateway(upstream: SandboxProc, tls_dir: Path) -> Iterator[GatewayProc]:
    extra = f'upstream.ca_file = "{tls_dir / "ca.pem"}"\n'
    with start_gateway(upstream.base_url, extra_toml=extra) as gw:
        yield gw


def _env(mode: str, gateway: GatewayProc, api_base: str, ca: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    env["PYTHONPATH"] = str(REPO_ROOT)
    # pydantic-ai's default Agent("openai:…") finds its endpoint and key here, as users set it.
    env["OPENAI_BASE_URL"] = api_base
    env["OPENAI_API_KEY"] = gateway.api_key or ""
    if mode == "egress":
        proxy = gateway.urls["egress"]
        env.update(HTTPS_PROXY=proxy, https_proxy=proxy, NO_PROXY="", no_proxy="")
        for name in CA_VARS:
            env[name] = str(ca)
    return env


def _node_missing() -> str | None:
    """Why the Node runner cannot start, or None. Its cells then fail with this (never skip):
    scripts/setup-test-deps.sh installs Node and the packages."""
    if shutil.which("node") is None:
        return "node is not installed (scripts/setup-test-deps.sh installs it)"
    if not (NODE_DIR / "node_modules" / "ai").is_dir():
        return (
            f"the Node packages are not installed: run `npm ci` in {NODE_DIR}"
            " (scripts/setup-test-deps.sh does)"
        )
    return None


def _selected(session: pytest.Session) -> set[str]:
    """The cells whose tests this session runs (``-k`` runs only those batches' cells)."""
    return {
        cell_id(p["client"], p["feature"], p["mode"])
        for item in session.items
        if (p := getattr(getattr(item, "callspec", None), "params", None)) and "client" in p
    }


@pytest.fixture(scope="package")
def outcomes(
    request: pytest.FixtureRequest,
    gateway: GatewayProc,
    upstream: SandboxProc,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict[str, Any]]:
    """The selected cells' outcomes, from (at most) four batch processes started together."""
    selected = _selected(request.session)
    ca = gateway_ca_path(gateway)
    work = tmp_path_factory.mktemp("compat-batches")
    bases = {"reverse": gateway.api_base, "egress": upstream.api_base}
    running = []
    results: dict[str, dict[str, Any]] = {}
    for runner in ("py", "node"):
        for mode in ("reverse", "egress"):
            ids = [i for i in (cell_id(*c) for c in cells(runner, mode)) if i in selected]
            if not ids:
                continue
            missing = _node_missing() if runner == "node" else None
            if missing is not None:
                results.update({i: {"ok": False, "error": missing} for i in ids})
                continue
            config = {
                "mode": mode,
                "api_base": bases[mode],
                "api_key": gateway.api_key,
                "model": TEE,
                "cells": ids,
            }
            cfg, out = work / f"{runner}-{mode}.json", work / f"{runner}-{mode}.out.json"
            cfg.write_text(json.dumps(config))
            command = (
                [sys.executable, "-m", "tests.compat.py_runner"]
                if runner == "py"
                else ["node", str(NODE_DIR / "cells.mjs")]
            )
            log = open(work / f"{runner}-{mode}.log", "w")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(
                [*command, str(cfg), str(out)],
                cwd=REPO_ROOT,
                env=_env(mode, gateway, bases[mode], ca),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            running.append((runner, mode, ids, proc, out, log))
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    for runner, mode, ids, proc, out, log in running:
        try:
            proc.wait(max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode != 0 or not out.exists():
            tail = Path(log.name).read_text(errors="replace")[-3000:]
            error = f"the {runner} {mode} batch exited {proc.returncode}:\n{tail}"
            results.update({i: {"ok": False, "error": error} for i in ids})
        else:
            results.update(json.loads(out.read_text()))
    return results


@pytest.fixture(scope="package")
def upstream_requests(
    outcomes: dict[str, dict[str, Any]], upstream: SandboxProc
) -> list[dict[str, Any]]:
    """What the sandbox received while the batches ran (once they all finished)."""
    return upstream.requests()
