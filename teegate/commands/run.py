"""``teegate run``: the gateway (one process, or a supervisor of several: ``--workers N``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from teegate import config, logs
from teegate.config import listen_address


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the gateway")
    p.add_argument(
        "-c", "--config", type=Path, default=None, help="proxy.toml (default: built-in defaults)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="N gateway processes on the same ports, supervised (default: workers.count). "
        "Above 1 needs the PostgreSQL ledger.",
    )
    # Set by the supervisor for each worker it starts; not for operators.
    p.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--listen-reverse", type=_address, default=None, help=argparse.SUPPRESS)
    p.add_argument("--listen-egress", type=_address, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)


def _address(text: str) -> str:
    try:
        return listen_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args.config)
        settings.upstream.resolved_api_key()
    except (config.ConfigError, ValueError) as e:
        print(f"teegate: {e}", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print("teegate: --workers must be at least 1", file=sys.stderr)
        return 2
    logs.configure(settings.log.level, worker=args.worker_id)
    if args.worker_id is None and (args.workers is not None or settings.workers.count > 1):
        from teegate.supervisor import supervise

        return supervise(settings, args.config, args.workers or settings.workers.count)
    listen = {
        k: v
        for k, v in (("reverse", args.listen_reverse), ("egress", args.listen_egress))
        if v is not None
    }
    if listen:
        settings = settings.model_copy(
            update={"listen": settings.listen.model_copy(update=listen)}
        )
    from teegate.runner import run

    return run(settings, worker_id=args.worker_id)
