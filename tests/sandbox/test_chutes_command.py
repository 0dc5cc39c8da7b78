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


def test_tls_makes_the_gateway_trust_the_sandboxs_ca(tmp_path) -> None:
    args = _args("--tls")
    assert args.tls is True and _args().tls is False
    update = _upstream_update(args, "https://127.0.0.1:1", tmp_path / "ca.pem")
    assert update["ca_file"] == tmp_path / "ca.pem"
    assert "ca_file" not in _upstream_update(_args(), "http://x:1")
