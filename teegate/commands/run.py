"""``teegate run``: the gateway."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from teegate import config, logs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the gateway")
    p.add_argument(
        "-c", "--config", type=Path, default=None, help="proxy.toml (default: built-in defaults)"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args.config)
        settings.upstream.resolved_api_key()
    except (config.ConfigError, ValueError) as e:
        print(f"teegate: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log.level)
    from teegate.runner import run

    return run(settings)
