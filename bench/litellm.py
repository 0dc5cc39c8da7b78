"""LiteLLM's proxy as the peer: installed into its own virtual environment, run offline.

The venv (``bench/.litellm-venv``, git-ignored) keeps LiteLLM's many dependencies out of
teegate's. The proxy runs with a master key (``LITELLM_MASTER_KEY`` from the environment, or a
random one), no database, the bundled model cost map (``LITELLM_LOCAL_MODEL_COST_MAP=True``) and
telemetry off, one model pointed at the sandbox upstream. Where the install fails or takes more
than :data:`INSTALL_TIMEOUT_S`, the path is skipped with the reason, and the run goes on.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.paths import CHAT, Running
from bench.procs import free_port, stop, wait_http
from tests.support.sandbox_proc import SandboxProc

VENV = Path(__file__).resolve().parent / ".litellm-venv"
INSTALL_TIMEOUT_S = 300
START_TIMEOUT_S = 120
REQUIREMENT = "litellm[proxy]"


class LiteLLMUnavailable(RuntimeError):
    """Why the peer could not be run (shown in the table and the JSON)."""


def _exe(name: str) -> Path:
    return VENV / "bin" / name


def ensure_installed(log: Any = print) -> str:
    """Create the venv and install LiteLLM unless already there; returns its version."""
    if not _exe("litellm").exists():
        python = shutil.which("python3.12") or sys.executable
        log(f"installing {REQUIREMENT} into {VENV} (at most {INSTALL_TIMEOUT_S}s) ...")
        try:
            subprocess.run([python, "-m", "venv", str(VENV)], check=True, timeout=60)
            subprocess.run(
                [str(_exe("pip")), "install", "-q", REQUIREMENT],
                check=True,
                timeout=INSTALL_TIMEOUT_S,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except subprocess.TimeoutExpired:
            raise LiteLLMUnavailable(
                f"pip install {REQUIREMENT} took over {INSTALL_TIMEOUT_S}s"
            ) from None
        except (subprocess.CalledProcessError, OSError) as e:
            detail = getattr(e, "stderr", b"") or b""
            tail = detail.decode(errors="replace").strip().splitlines()[-1:] or [str(e)]
            raise LiteLLMUnavailable(f"pip install {REQUIREMENT} failed: {tail[0]}") from None
    done = subprocess.run(
        [str(_exe("python")), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise LiteLLMUnavailable(f"litellm does not import: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def _config(upstream: SandboxProc, models: list[str]) -> str:
    rows = "".join(
        f"  - model_name: {m}\n"
        "    litellm_params:\n"
        f"      model: openai/{m}\n"
        f"      api_base: {upstream.api_base}\n"
        f"      api_key: {upstream.api_key}\n"
        for m in models
    )
    return (
        "model_list:\n"
        f"{rows}"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  set_verbose: false\n"
        "  json_logs: false\n"
        "general_settings:\n"
        "  master_key: os.environ/LITELLM_MASTER_KEY\n"
    )


class LiteLLMPath:
    name, label = "litellm", "LiteLLM proxy (peer)"

    def __init__(self, models: list[str], version: str) -> None:
        self.models = models
        self.version = version
        self.master_key = os.environ.get("LITELLM_MASTER_KEY") or (
            "sk-bench-" + secrets.token_hex(8)
        )

    def describe(self) -> dict[str, Any]:
        return {
            "what": "litellm --config (one worker), no database, local cost map, telemetry off",
            "version": self.version,
        }

    def start(self, upstream: SandboxProc, workdir: Path, streaming: bool) -> Running:
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "litellm.yaml"
        cfg.write_text(_config(upstream, self.models), encoding="utf-8")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")} | {
            "LITELLM_MASTER_KEY": self.master_key,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOG": "ERROR",
            "DISABLE_SCHEMA_UPDATE": "True",
            "NO_DOCS": "True",
        }
        with open(workdir / "litellm.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    str(_exe("litellm")),
                    "--config",
                    str(cfg),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--num_workers",
                    "1",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(base + "/health/liveliness", proc, START_TIMEOUT_S)
        except BaseException as e:
            stop(proc)
            tail = (workdir / "litellm.log").read_text(errors="replace")[-1500:]
            raise LiteLLMUnavailable(f"LiteLLM did not start: {e}\n{tail}") from None
        return Running(base + CHAT, self.master_key, proc.pid, lambda: stop(proc))
