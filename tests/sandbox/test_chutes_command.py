"""``teegate sandbox --upstream chutes``: the flavour reaches both processes' settings."""

from __future__ import annotations

import argparse

from teegate.commands.sandbox import SANDBOX_KEY, _upstream_update, register


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["sandbox", *argv])


def test_default_stays_near() -> None:
    args = _args()
    assert args.upstream == "near"
    assert _upstream_update(args, "http://x:1") == {
        "base_url": "http://x:1",
        "api_key": SANDBOX_KEY,
    }


def test_chutes_sets_kind_and_keeps_e2ee_unless_told() -> None:
    assert _upstream_update(_args("--upstream", "chutes"), "http://x:1")["kind"] == "chutes"
    assert "e2ee" not in _upstream_update(_args("--upstream", "chutes"), "http://x:1")
    off = _upstream_update(_args("--upstream", "chutes", "--no-e2ee"), "http://x:1")
    assert off["e2ee"] is False
