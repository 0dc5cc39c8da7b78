"""Keys, balances, rate limits and metered charges, end to end with the openai SDK."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

from tests.support.accounts import balance_micro, create_account, create_key, teegate
from tests.support.billing import MSG, expected_charge, rows, usage_row
from tests.support.clients import chat_count, sdk
from tests.support.gateway_proc import start_gateway
from tests.support.testdata import TEE
from tests.support.wait import until

SHARED_PRICE_OUT_MICRO = 420_000  # tee-models.json: DeepSeek-V3.2-TEE output, $0.42 / 1M


@pytest.mark.parametrize(
    "auth",
    [None, "Basic abc", "Bearer", "Bearer vgpu_sk_unknown000000000000000000000000000000000"],
)
def test_bad_or_missing_keys_are_401(gateway, upstream, auth):
    headers = {"authorization": auth} if auth else {}
    resp = httpx.post(
        f"{gateway.api_base}/chat/completions",
        json={"model": TEE, "messages": MSG},
        headers=headers,
        timeout=10,
    )
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert "vgpu_sk_unknown" not in resp.text
    assert resp.headers["x-ratelimit-limit"]
    assert chat_count(upstream) == 0


def test_unknown_and_revoked_keys_raise_authentication_error(gateway, upstream):
    key = create_key(gateway.db, "test")
    with sdk(gateway, key) as client:
        client.chat.completions.create(model=TEE, messages=MSG)
    key_id = json.loads(teegate("keys", "list", "--db", str(gateway.db), "--json")[1])[-1]["key_id"]
    assert teegate("keys", "revoke", str(key_id), "--db", str(gateway.db))[0] == 0
    served = chat_count(upstream)

    def refused() -> bool:
        try:
            with sdk(gateway, key) as c:
                c.models.list()
        except openai.AuthenticationError:
            return True
        return False

    until(
        refused, "the revocation", timeout=10.0
    )  # a revocation from another process lands within the ledger's refresh
    with pytest.raises(openai.AuthenticationError), sdk(gateway, key) as client:
        client.chat.completions.create(model=TEE, messages=MSG)
    assert chat_count(upstream) == served


def test_a_completion_is_charged_exactly_from_usage(gateway, client=None):
    with sdk(gateway) as client:
        before = balance_micro(gateway.db, "test")
        raw = client.chat.completions.with_raw_response.create(model=TEE, messages=MSG)
        done = raw.parse()
        row = usage_row(gateway.db, raw.headers["x-request-id"])
    assert row["state"] == "settled" and row["source"] == "usage"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        done.usage.prompt_tokens,
        done.usage.completion_tokens,
    )
    assert row["price_output"] == SHARED_PRICE_OUT_MICRO
    assert row["charge_micro"] == expected_charge(row) > 0
    assert row["reserved_micro"] >= row["charge_micro"]
    assert before - balance_micro(gateway.db, "test") == row["charge_micro"]
    for header in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
        assert raw.headers[header].isdigit()
    # OpenAI's spelling of the same numbers, the reset as a duration within the minute window.
    assert raw.headers["x-ratelimit-limit-requests"] == raw.headers["x-ratelimit-limit"]
    assert raw.headers["x-ratelimit-remaining-requests"] == raw.headers["x-ratelimit-remaining"]
    assert re.fullmatch(r"(1m0s|\d+(\.\d{1,3})?s)", raw.headers["x-ratelimit-reset-requests"])


def test_cached_prompt_tokens_are_charged_at_the_cache_price(gateway, upstream):
    upstream.behaviour(cached_tokens=3)
    with sdk(gateway) as client:
        raw = client.chat.completions.with_raw_response.create(model=TEE, messages=MSG)
    row = usage_row(gateway.db, raw.headers["x-request-id"])
    assert row["cached_tokens"] == 3 and row["price_cache_read"] < row["price_input"]
    assert row["charge_micro"] == expected_charge(row)


def test_stream_is_settled_from_its_final_usage_chunk(gateway):
    with sdk(gateway) as client:
        with client.chat.completions.with_streaming_response.create(
            model=TEE, messages=MSG, stream=True
        ) as resp:
            rid = resp.headers["x-request-id"]
            chunks = list(resp.parse())
    assert all(c.usage is None for c in chunks)  # stripped for the client...
    row = usage_row(gateway.db, rid)
    assert row["source"] == "usage" and row["completion_tokens"] > 0  # ...but billed


def test_usage_missing_upstream_is_billed_from_bytes(gateway, upstream):
    upstream.behaviour(omit_usage=True)
    with sdk(gateway) as client:
        raw = client.chat.completions.with_raw_response.create(model=TEE, messages=MSG)
        text = raw.parse().choices[0].message.content
        with client.chat.completions.with_streaming_response.create(
            model=TEE, messages=MSG, stream=True
        ) as resp:
            stream_rid = resp.headers["x-request-id"]
            list(resp.parse())
    for rid in (raw.headers["x-request-id"], stream_rid):
        row = usage_row(gateway.db, rid)
        assert row["source"] == "bytes"
        assert row["completion_tokens"] == -(-len(text.encode()) // 3)  # documented ratio
        assert row["charge_micro"] == expected_charge(row) > 0


def test_upstream_error_releases_the_reservation(gateway, upstream):
    upstream.behaviour(status=503)
    before = balance_micro(gateway.db, "test")
    with pytest.raises(openai.InternalServerError) as exc, sdk(gateway) as client:
        client.chat.completions.create(model=TEE, messages=MSG)
    row = usage_row(gateway.db, exc.value.response.headers["x-request-id"])
    assert row["state"] == "released" and not row["charge_micro"]
    assert balance_micro(gateway.db, "test") == before


def test_upstream_abort_mid_stream_is_billed_for_what_was_streamed(gateway, upstream):
    upstream.behaviour(stop_after_chunks=3)
    with sdk(gateway) as client:
        with client.chat.completions.with_streaming_response.create(
            model=TEE, messages=MSG, stream=True
        ) as resp:
            rid = resp.headers["x-request-id"]
            with pytest.raises((httpx.HTTPError, openai.APIError)):
                list(resp.parse())
    row = usage_row(gateway.db, rid)
    assert row["state"] == "settled" and row["source"] == "bytes"
    assert 0 < row["completion_tokens"] and row["charge_micro"] == expected_charge(row)


def test_client_disconnect_mid_stream_is_billed_for_what_the_upstream_produced(gateway, upstream):
    upstream.behaviour(hold_after_chunks=2)
    with sdk(gateway) as client:
        resp = client.chat.completions.with_streaming_response.create(
            model=TEE, messages=MSG, stream=True
        ).__enter__()
        rid = resp.headers["x-request-id"]
        stream = iter(resp.parse())
        got = [next(stream), next(stream), next(stream)]  # role + 2 content chunks
        resp.close()  # the client goes away while the upstream holds the rest
    upstream.release()
    row = usage_row(gateway.db, rid)
    assert row["state"] == "settled" and row["source"] == "bytes"
    streamed = "".join(c.choices[0].delta.content or "" for c in got)
    assert row["completion_tokens"] >= -(-len(streamed.encode()) // 3) > 0


def test_insufficient_balance_is_402_before_any_upstream_call(upstream):
    with start_gateway(upstream.base_url, balance_usd="0.000100") as gw:
        client = openai.OpenAI(base_url=gw.api_base, api_key=gw.api_key)  # default retries on
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model=TEE, messages=MSG)
        assert exc.value.status_code == 402
        assert exc.value.body["code"] == "insufficient_balance"
        assert chat_count(upstream) == 0  # refused locally, and the SDK did not retry
        assert rows(gw.db) == []


def test_concurrent_requests_never_overspend(upstream):
    """50 concurrent requests against a balance that covers 10: at most 10 reach upstream."""
    with start_gateway(upstream.base_url) as gw:
        db = gw.db
        with sdk(gw) as probe_client:  # the same request from another account: its hold
            with probe_client.chat.completions.with_streaming_response.create(
                model=TEE, messages=MSG, max_tokens=50, stream=True
            ) as probe:
                list(probe.parse())
        hold = usage_row(db, probe.headers["x-request-id"])["reserved_micro"]
        create_account(db, "small", topup_usd=f"{hold * 10 // 10**6}.{hold * 10 % 10**6:06d}")
        key = create_key(db, "small")
        assert balance_micro(db, "small") == 10 * hold
        upstream.reset()

        # The upstream holds every admitted stream, so no charge settles (and frees part of
        # its hold) before all 50 have been admitted or refused.
        upstream.behaviour(hold_after_chunks=0)

        async def fire() -> list[int]:
            async with openai.AsyncOpenAI(
                base_url=gw.api_base, api_key=key, max_retries=0, timeout=60
            ) as c:

                async def one():
                    try:
                        return await c.chat.completions.create(
                            model=TEE, messages=MSG, max_tokens=50, stream=True
                        )
                    except openai.APIStatusError as e:
                        return e.status_code

                results = await asyncio.gather(*(one() for _ in range(50)))
                admitted = [r for r in results if not isinstance(r, int)]
                assert upstream.stats()["held"] == len(admitted)
                upstream.release()
                for stream in admitted:
                    _ = [chunk async for chunk in stream]
                return [200 if not isinstance(r, int) else r for r in results]

        statuses = asyncio.run(fire())
        assert statuses.count(200) == 10 and statuses.count(402) == 40
        assert chat_count(upstream) == 10
        assert balance_micro(db, "small") >= 0
        code, out, _ = teegate("ledger", "verify", "--db", str(db))
        assert code == 0, out


def test_rate_limit_is_429_with_headers_before_billing(upstream):
    with start_gateway(upstream.base_url) as gw:
        key = create_key(gw.db, "test", rate_limit=2)
        with sdk(gw, key) as client:
            for _ in range(2):
                client.models.list()
            with pytest.raises(openai.RateLimitError) as exc:
                client.chat.completions.create(model=TEE, messages=MSG)
        headers = exc.value.response.headers
        assert headers["x-ratelimit-limit"] == "2" and headers["x-ratelimit-remaining"] == "0"
        assert int(headers["retry-after"]) >= 1 and int(headers["x-ratelimit-reset"]) > 0
        assert headers["x-should-retry"] == "true"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert exc.value.body["code"] == "rate_limit_exceeded"
        assert chat_count(upstream) == 0 and rows(gw.db) == []
