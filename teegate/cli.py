"""The ``teegate`` command line.

Each sub-command lives in its own module under ``teegate.commands`` and
exposes ``register(subparsers)``; this keeps the operator commands of the
ledger, the attestation tools and the proxy itself independent of each other.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules under teegate.commands, in the order their commands appear in --help.
COMMAND_MODULES = ("run", "sandbox", "doctor", "ledger_cmds", "admin", "attest", "receipt", "ca")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teegate",
        description="OpenAI-compatible gateway that only serves hardware-attested models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"teegate.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"teegate.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
