"""proxy.toml validation: every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from teegate import config

REPO = Path(__file__).resolve().parents[2]


def _load(tmp_path: Path, text: str) -> config.Settings:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return config.load(path)


def test_shipped_proxy_toml_is_the_defaults():
    shipped = config.load(REPO / "proxy.toml")
    assert shipped.ledger.path == REPO / "teegate.sqlite3"  # relative paths: beside the file
    default = config.Settings()
    assert shipped.receipts.key_path == REPO / "teegate-receipt-key.pem"
    skip = {"ledger": True, "receipts": {"key_path"}}
    assert shipped.model_dump(exclude=skip) == default.model_dump(exclude=skip)
    assert shipped.ledger.key_prefix == default.ledger.key_prefix
    assert shipped.ledger.synchronous == default.ledger.synchronous == "FULL"


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[upstream]\nbase_ulr = 'http://x'\n", "upstream.base_ulr", "unknown key"),
        ("[nope]\n", "nope", "unknown key"),
        ("[upstream]\nbase_url = 'ftp://x'\n", "upstream.base_url", "scheme"),
        ("[upstream]\nbase_url = 'https://x/v1'\n", "upstream.base_url", "without a path"),
        ("[catalog]\nrefresh_interval_s = 'soon'\n", "catalog.refresh_interval_s", "integer"),
        ("[catalog]\nmarkup = 1.85\n", "catalog.markup", "never a float"),
        ("[defaults]\ntemperature = 3\n", "defaults.temperature", "less than or equal"),
        ("[listen]\nreverse = 'nohost'\n", "listen.reverse", "host:port"),
        ("[ledger]\nsynchronous = 'OFF'\n", "ledger.synchronous", "'FULL' or 'NORMAL'"),
        ("[ledger]\nurl = 'mysql://db/x'\n", "ledger.url", "postgresql://"),
        ("[ledger]\nkey_poll_ms = 5000\n", "ledger.key_poll_ms", "less than or equal"),
        ("[listen]\negress = '0.0.0.0:8081'\n", "egress.proxy_auth", "reachable from the network"),
        ("[egress]\nproxy_auth = 'basic'\n", "egress.proxy_auth", "'none' or 'api_key'"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, text, key, words):
    with pytest.raises(config.ConfigError) as exc:
        _load(tmp_path, text)
    assert f"{key}: " in str(exc.value) and words in str(exc.value)


def test_the_ledger_location_is_the_url_then_a_postgres_teegate_db_then_the_path(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("TEEGATE_DB", raising=False)
    assert _load(tmp_path, "").ledger.location == str(tmp_path / "teegate.sqlite3")
    monkeypatch.setenv("TEEGATE_DB", "elsewhere.sqlite3")  # a path: for the commands only
    assert _load(tmp_path, "").ledger.location == str(tmp_path / "teegate.sqlite3")
    monkeypatch.setenv("TEEGATE_DB", "postgresql://env@db/teegate")
    assert _load(tmp_path, "").ledger.location == "postgresql://env@db/teegate"
    url = "postgresql://toml@db/teegate"
    assert _load(tmp_path, f"[ledger]\nurl = '{url}'\n").ledger.location == url


def test_not_toml(tmp_path):
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        _load(tmp_path, "[upstream\n")


def test_run_refuses_to_start_on_bad_config(tmp_path, capsys):
    from teegate.cli import main

    path = tmp_path / "proxy.toml"
    path.write_text("[upstream]\ntypo = 1\n")
    assert main(["run", "-c", str(path)]) == 2
    assert "upstream.typo: unknown key" in capsys.readouterr().err


def test_an_exposed_egress_listener_needs_proxy_auth_or_an_explicit_none(tmp_path):
    for value in ("api_key", "none"):
        text = f"[listen]\negress = '0.0.0.0:8081'\n[egress]\nproxy_auth = '{value}'\n"
        assert _load(tmp_path, text).egress.proxy_auth == value
    assert _load(tmp_path, "[listen]\negress = '[::1]:8081'\n").egress.proxy_auth == "none"


def test_the_sandbox_keeps_its_name_constrained_ca_apart_from_the_default_one(tmp_path):
    from teegate.commands.sandbox import _sandbox_egress

    default = config.Settings().egress
    assert _sandbox_egress(default).confdir == default.confdir / "sandbox"
    chosen = _load(tmp_path, f"[egress]\nconfdir = '{tmp_path}'\n").egress
    assert _sandbox_egress(chosen).confdir == tmp_path


@pytest.mark.parametrize(
    ("base_url", "parts"),
    [
        ("http://127.0.0.1:8000", ("http", "127.0.0.1", 8000, "127.0.0.1:8000")),
        ("https://Up.Example", ("https", "up.example", 443, "up.example")),
        ("https://up.example:443/", ("https", "up.example", 443, "up.example")),
        ("http://up.example:443", ("http", "up.example", 443, "up.example:443")),
        ("https://[::1]:8443", ("https", "::1", 8443, "[::1]:8443")),
        ("http://[::1]", ("http", "::1", 80, "[::1]")),
    ],
)
def test_the_upstream_origin_is_parsed_once(base_url, parts):
    up = config.UpstreamSettings(base_url=base_url)
    assert tuple(up.origin_parts) == parts
    assert up.origin == f"{parts[0]}://{parts[3]}"
