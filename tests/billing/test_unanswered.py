"""The ledger loses nothing and never goes below zero, through real processes.

A request whose body went upstream and got no response headers (the client
left, or the upstream timed out) is settled at its hold (``billing.unanswered
= "hold"``, the default); one that never reached the upstream is released.
Usage above the hold is charged only up to what the account has; the rest is
recorded as unrecovered and shown by ``teegate usage`` and ``ledger verify``.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from tests.support.accounts import balance_micro, create_account, create_key, teegate
from tests.support.billing import MSG, expected_charge, usage_row
from tests.support.clients import chat_count, sdk
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc, start_sandbox
from tests.support.testdata import TEE, TEST_MODELS
from tests.support.wait import until


@pytest.fixture(scope="module", params=["hold", "release"])
def impatient(request: pytest.FixtureRequest, upstream: SandboxProc) -> Iterator[GatewayProc]:
    """A gateway that waits one second for the upstream's response headers."""
    toml = f'upstream.timeout_s = 1\nbilling.unanswered = "{request.param}"'
    with start_gateway(upstream.base_url, extra_toml=toml) as gw:
        gw.unanswered = request.param  # type: ignore[attr-defined]
        yield gw


def _last_id(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT COALESCE(MAX(reservation_id), 0) FROM usage").fetchone()[0]


def _finalised_after(db: Path, after: int) -> dict[str, Any] | None:
    """The one usage row newer than ``after``, once settled or released."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        found = conn.execute(
            "SELECT * FROM usage WHERE reservation_id > ? ORDER BY reservation_id", (after,)
        ).fetchall()
    assert len(found) <= 1, [dict(r) for r in found]
    return dict(found[0]) if found and found[0]["state"] != "open" else None


def _raw_chat(gw: GatewayProc, body: dict[str, Any]) -> socket.socket:
    """Send one chat completion on a raw socket and return it, unread."""
    url = urlsplit(gw.base_url)
    data = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: {url.netloc}\r\n"
        f"Authorization: Bearer {gw.api_key}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    sock.sendall(head + data)
    return sock


def _assert_charged_at_hold(row: dict[str, Any], why: str) -> None:
    assert row["state"] == "settled", row
    assert row["charge_micro"] == row["reserved_micro"] > 0
    assert row["unrecovered_micro"] == 0
    assert row["status"] == f"unanswered ({why}): charged the reservation"


def test_client_gone_before_the_response_headers_is_charged_at_the_hold(gateway, upstream):
    upstream.behaviour(delay_ms=30_000)  # the upstream has the request and says nothing yet
    before, after = balance_micro(gateway.db, "test"), _last_id(gateway.db)
    sock = _raw_chat(gateway, {"model": TEE, "messages": MSG})
    until(lambda: chat_count(upstream) == 1, "the request to reach the upstream")
    sock.close()
    row = until(lambda: _finalised_after(gateway.db, after), "the settlement")
    _assert_charged_at_hold(row, "client disconnected")
    assert before - balance_micro(gateway.db, "test") == row["reserved_micro"]
    assert teegate("ledger", "verify", "--db", str(gateway.db))[0] == 0


def test_upstream_timeout_is_504_and_follows_billing_unanswered(impatient, upstream):
    upstream.behaviour(delay_ms=5_000)
    before, after = balance_micro(impatient.db, "test"), _last_id(impatient.db)
    with pytest.raises(openai.APIStatusError) as exc, sdk(impatient) as client:
        client.chat.completions.create(model=TEE, messages=MSG)
    assert exc.value.status_code == 504 and exc.value.body["code"] == "upstream_timeout"
    assert chat_count(upstream) == 1
    row = until(lambda: _finalised_after(impatient.db, after), "the settlement")
    if impatient.unanswered == "hold":  # the default
        _assert_charged_at_hold(row, "upstream timeout")
        assert before - balance_micro(impatient.db, "test") == row["reserved_micro"]
    else:
        assert row["state"] == "released" and row["charge_micro"] == 0
        assert row["status"] == "unanswered (upstream timeout); billing.unanswered = release"
        assert balance_micro(impatient.db, "test") == before


def test_unreachable_upstream_is_released():
    with start_sandbox("--models", str(TEST_MODELS)) as up, start_gateway(up.base_url) as gw:
        with sdk(gw) as client:  # the catalog and the attestation verdict are now cached
            client.chat.completions.create(model=TEE, messages=MSG)
        up.stop()
        before, after = balance_micro(gw.db, "test"), _last_id(gw.db)
        with pytest.raises(openai.APIStatusError) as exc, sdk(gw) as client:
            client.chat.completions.create(model=TEE, messages=MSG)
        assert exc.value.status_code == 502
        assert exc.value.body["code"] == "upstream_unreachable"
        row = until(lambda: _finalised_after(gw.db, after), "the release")
        assert row["state"] == "released" and row["charge_micro"] == 0
        assert row["status"] == "never reached the upstream"
        assert balance_micro(gw.db, "test") == before


def test_usage_far_above_the_hold_stops_the_balance_at_zero(gateway, upstream):
    upstream.behaviour(usage_completion_tokens=1_000_000)  # the budget below was ignored
    body = {"model": TEE, "messages": MSG, "max_tokens": 5}
    with sdk(gateway) as client:  # the same request's hold, from the funded account
        probe = client.chat.completions.with_raw_response.create(**body)
    hold = usage_row(gateway.db, probe.headers["x-request-id"])["reserved_micro"]
    spare = 3  # micro-USD beyond the hold: collected, and then nothing more
    funds = hold + spare
    create_account(gateway.db, "tiny", f"{funds // 10**6}.{funds % 10**6:06d}")
    key = create_key(gateway.db, "tiny")

    with sdk(gateway, key) as client:
        raw = client.chat.completions.with_raw_response.create(**body)
    rid = raw.headers["x-request-id"]
    assert raw.parse().usage.completion_tokens == 1_000_000
    row = usage_row(gateway.db, rid)
    price = expected_charge(row)  # 1M tokens at the output price: far above the hold
    assert row["reserved_micro"] == hold and price > 100 * hold
    assert row["charge_micro"] == hold + spare
    assert row["unrecovered_micro"] == price - hold - spare > 0
    assert balance_micro(gateway.db, "tiny") == 0

    code, out, err = teegate("usage", "--db", str(gateway.db), "--account", "tiny", "--json")
    assert code == 0, err
    [group] = json.loads(out)
    assert group["charge_micro"] == hold + spare
    assert group["unrecovered_micro"] == row["unrecovered_micro"]
    code, out, err = teegate("usage", "--db", str(gateway.db), "--account", "tiny", "--csv")
    assert code == 0 and f",{row['unrecovered_micro']}," in out.splitlines()[1]
    code, out, err = teegate("usage", "--db", str(gateway.db), "--account", "tiny")
    assert code == 0 and "UNRECOVERED_USD" in out and "USD unrecovered" in out
    code, out, err = teegate("ledger", "verify", "--db", str(gateway.db), "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"], out
    assert report["unrecovered_micro"] == row["unrecovered_micro"]  # the only one here

    line = until(
        lambda: next(
            (
                json.loads(x)
                for x in gateway.log_text().splitlines()
                if "charge_above_reservation" in x and rid in x
            ),
            None,
        ),
        "the warning",
    )
    assert line["level"] == "warning" and line["model"] == TEE
    assert line["unrecovered_micro"] == row["unrecovered_micro"]
    # Billing's own line says what was taken, and the price it was capped from.
    charged = gateway.access_line(rid, event="charged")
    assert (charged["charge_micro"], charged["price_micro"]) == (hold + spare, price)
    assert charged["reserved_micro"] == hold
    assert key not in gateway.log_text() and "Say hello" not in gateway.log_text()


def test_billing_unanswered_is_hold_by_default_and_checked(tmp_path: Path):
    from teegate import config

    assert config.Settings().billing.unanswered == "hold"
    bad = tmp_path / "proxy.toml"
    bad.write_text('[billing]\nunanswered = "charge"\n', encoding="utf-8")
    with pytest.raises(config.ConfigError, match=r"billing\.unanswered"):
        config.load(bad)
