"""Command-line options of ``python -m teegate.sandbox``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from teegate.sandbox.catalog_rows import DEFAULT_MODELS_PATH

DEFAULT_API_KEY = "sandbox-upstream-key"


@dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 0
    api_key: str = DEFAULT_API_KEY
    models: Path = DEFAULT_MODELS_PATH
    chunks: int = 8
    chunk_delay_ms: int = 0
    delay_ms: int = 0
    tls_dir: Path | None = None
    tls_hostnames: tuple[str, ...] = field(default_factory=tuple)
    ready_file: Path | None = None
    verbose: bool = False
    # Which upstream the sandbox imitates: NEAR AI / Phala (today's) or Chutes (sandbox/chutes/).
    upstream: Literal["near", "chutes"] = "near"
    chutes_instances: int = 3
    chutes_discovery_per_minute: int = 0  # 0: no limit (the real API allows about 10)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m teegate.sandbox",
        description="Simulated confidential OpenAI-compatible upstream, for tests and benchmarks.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_non_negative, default=0, help="0 picks a free port")
    p.add_argument("--api-key", default=DEFAULT_API_KEY, help="bearer key every /v1/* call needs")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS_PATH, help="tee-models.json")
    p.add_argument("--chunks", type=_positive, default=8, help="content pieces per answer")
    p.add_argument("--chunk-delay-ms", type=_non_negative, default=0)
    p.add_argument("--delay-ms", type=_non_negative, default=0, help="wait before answering")
    p.add_argument(
        "--tls-dir", type=Path, default=None, help="serve HTTPS with a test CA kept here"
    )
    p.add_argument(
        "--tls-hostname", action="append", default=[], help="extra server-cert name (repeatable)"
    )
    p.add_argument("--ready-file", type=Path, default=None, help="write {base_url, port} here")
    p.add_argument("--verbose", action="store_true", help="log every request (access log)")
    p.add_argument(
        "--upstream",
        choices=("near", "chutes"),
        default="near",
        help="imitate NEAR AI/Phala (default) or Chutes (per-instance evidence, E2EE)",
    )
    p.add_argument("--chutes-instances", type=_positive, default=3, help="instances per chute")
    p.add_argument(
        "--chutes-discovery-per-minute",
        type=_non_negative,
        default=0,
        help="limit /e2e/instances calls per minute (0: none)",
    )
    return p


def parse_options(argv: list[str] | None = None) -> Options:
    a = build_parser().parse_args(argv)
    return Options(
        host=a.host,
        port=a.port,
        api_key=a.api_key,
        models=a.models,
        chunks=a.chunks,
        chunk_delay_ms=a.chunk_delay_ms,
        delay_ms=a.delay_ms,
        tls_dir=a.tls_dir,
        tls_hostnames=tuple(a.tls_hostname),
        ready_file=a.ready_file,
        verbose=a.verbose,
        upstream=a.upstream,
        chutes_instances=a.chutes_instances,
        chutes_discovery_per_minute=a.chutes_discovery_per_minute,
    )
