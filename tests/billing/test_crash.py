"""A gateway killed with SIGKILL mid-stream loses no charge."""

from __future__ import annotations

from tests.support.accounts import balance_micro, teegate
from tests.support.billing import MSG, rows, usage_row
from tests.support.clients import sdk
from tests.support.gateway_proc import start_gateway
from tests.support.sandbox_proc import start_sandbox
from tests.support.testdata import TEE, TEST_MODELS


def test_sigkill_mid_stream_then_restart_settles_the_reservation():
    with start_sandbox("--models", str(TEST_MODELS)) as up:
        gw = start_gateway(up.base_url)
        key, db = gw.api_key, gw.db
        before = balance_micro(db, "test")
        up.behaviour(hold_after_chunks=1)
        with sdk(gw) as client:
            resp = client.chat.completions.with_streaming_response.create(
                model=TEE, messages=MSG, stream=True
            ).__enter__()
            rid = resp.headers["x-request-id"]
            stream = iter(resp.parse())
            next(stream), next(stream)  # the upstream is now mid-answer
            gw.kill()  # SIGKILL: nothing flushed, no hook runs
            resp.close()
        up.release()
        crashed = usage_row(db, rid, settled=False)
        assert crashed["state"] == "open"  # the reservation was durable before going upstream

        with start_gateway(up.base_url, workdir=gw.workdir) as again:
            row = usage_row(db, rid)
            assert row["state"] == "settled" and row["source"] == "recovered"
            assert row["charge_micro"] == row["reserved_micro"]  # the documented crash rule
            assert before - balance_micro(db, "test") == row["charge_micro"]
            code, out, err = teegate("ledger", "verify", "--db", str(db))
            assert code == 0, out + err
            assert "recovered" in again.log_text()
            up.behaviour(hold_after_chunks=None)
            with sdk(again, key) as client:  # the same key still works after the restart
                client.chat.completions.create(model=TEE, messages=MSG)
        assert all(r["state"] != "open" for r in rows(db))


def test_a_clean_stop_commits_the_settlement_still_waiting_for_its_commit():
    """Settlements wait up to 50 ms to share the next reservation's commit; a SIGTERM right
    after the response must still commit them (charged from usage, not recovered in full)."""
    with start_sandbox("--models", str(TEST_MODELS)) as up:
        gw = start_gateway(up.base_url)
        db = gw.db
        with sdk(gw) as client:
            raw = client.chat.completions.with_raw_response.create(model=TEE, messages=MSG)
        rid = raw.headers["x-request-id"]
        assert gw.stop() == 0  # SIGTERM at once: no later reservation carries the settlement
        row = usage_row(db, rid, timeout=0)
        assert row["state"] == "settled" and row["source"] == "usage"
        assert row["charge_micro"] < row["reserved_micro"]
        code, out, err = teegate("ledger", "verify", "--db", str(db))
        assert code == 0, out + err
