"""Fail closed: stale catalog, upstream down, an addon that raises, a flag flipped upstream."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from teegate.runner import REQUIRED_STAGES
from tests.support.clients import chat_count, sdk
from tests.support.faulty_gateway import FAULT_HEADER
from tests.support.gateway_proc import start_gateway
from tests.support.sandbox_proc import start_sandbox
from tests.support.testdata import TEE, TEST_MODELS
from tests.support.wait import until

MSG = [{"role": "user", "content": "hi"}]


def _client(gw) -> openai.OpenAI:
    return sdk(gw)


def _refused(client: openai.OpenAI, model: str) -> str | None:
    try:
        client.chat.completions.create(model=model, messages=MSG)
    except openai.APIStatusError as e:
        return e.body.get("code") if isinstance(e.body, dict) else None
    return None


def test_flag_flipped_upstream_is_refused_after_next_refresh():
    with (
        start_sandbox("--models", str(TEST_MODELS)) as up,
        start_gateway(up.base_url, extra_toml="catalog.refresh_interval_s = 1") as gw,
        _client(gw) as client,
    ):
        assert _refused(client, TEE) is None
        up.behaviour(flags={TEE: False})
        until(lambda: _refused(client, TEE) == "model_not_confidential", what="flag flip")
        served = chat_count(up)
        assert _refused(client, TEE) == "model_not_confidential"
        assert chat_count(up) == served
        up.behaviour(flags={TEE: True}, remove_models=["Qwen/Qwen3-32B-TEE"])
        until(lambda: _refused(client, "Qwen/Qwen3-32B-TEE") == "model_not_confidential")
        assert _refused(client, TEE) is None


def test_stale_catalog_refuses_everything_and_recovers():
    with (
        start_sandbox("--models", str(TEST_MODELS)) as up,
        start_gateway(
            up.base_url,
            extra_toml="catalog.refresh_interval_s = 1\ncatalog.max_staleness_s = 2",
        ) as gw,
        _client(gw) as client,
    ):
        assert _refused(client, TEE) is None
        up.behaviour(models_status=500)
        until(lambda: _refused(client, TEE) == "catalog_unavailable", what="staleness")
        served = chat_count(up)
        with pytest.raises(openai.InternalServerError) as exc:
            client.models.list()
        assert exc.value.status_code == 503
        assert chat_count(up) == served
        up.behaviour(models_status=None)
        until(lambda: _refused(client, TEE) is None, what="recovery")


def test_upstream_down_gives_json_502_and_local_answers_still_work():
    up = start_sandbox("--models", str(TEST_MODELS))
    with up, start_gateway(up.base_url, extra_toml="catalog.refresh_interval_s = 60") as gw:
        with _client(gw) as client:
            assert _refused(client, TEE) is None  # catalog loaded
            up.stop()
            assert len(client.models.list().data) > 0  # cached catalog, no upstream needed
            with pytest.raises(openai.APIStatusError) as exc:
                client.chat.completions.create(model=TEE, messages=MSG)
            assert exc.value.status_code == 502
            assert exc.value.body["code"] == "upstream_unreachable"
            assert _refused(client, "deepseek-ai/DeepSeek-V3") == "model_not_confidential"


def test_gateway_refuses_before_first_catalog_when_upstream_is_down():
    up = start_sandbox()
    url = up.base_url
    up.stop()
    with start_gateway(url) as gw:
        resp = httpx.post(
            f"{gw.api_base}/chat/completions",
            json={"model": TEE, "messages": MSG},
            headers={"authorization": f"Bearer {gw.api_key}"},
            timeout=30,
        )
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "catalog_unavailable"


@pytest.fixture(scope="module")
def shared_upstream():
    with start_sandbox("--models", str(TEST_MODELS)) as up:
        yield up


def _faulty(up, fault: str):
    up.reset()
    return start_gateway(
        up.base_url, module="tests.support.faulty_gateway", env={"TEEGATE_FAULT": fault}
    )


@pytest.fixture(scope="module")
def faulty_gateway(shared_upstream):
    """One gateway with every stage's fault armed, each tripped by a request header."""
    with _faulty(shared_upstream, "per-request") as gw:
        yield gw


@pytest.mark.parametrize("kind", ["stage", "hook"])
@pytest.mark.parametrize("stage", REQUIRED_STAGES)
def test_an_addon_that_raises_forwards_nothing(shared_upstream, faulty_gateway, stage, kind):
    """A real gateway with one request-path stage broken, inside its guard (``stage``) or as an
    unguarded hook (``hook``, caught by the Seal): 500, nothing reaches the upstream."""
    shared_upstream.reset()
    log_mark = len(faulty_gateway.log_text())
    fault = {FAULT_HEADER: f"{kind}:{stage}"}
    with _client(faulty_gateway) as client:
        with pytest.raises(openai.InternalServerError) as exc:
            client.chat.completions.create(model=TEE, messages=MSG, extra_headers=fault)
        assert exc.value.status_code == 500
        assert exc.value.body["code"] == "internal_error"
        assert chat_count(shared_upstream) == 0
        if kind == "stage":
            assert "addon_failed_closed" in faulty_gateway.log_text()[log_mark:]


def test_the_per_request_faulty_gateway_serves_a_request_without_the_header(
    shared_upstream, faulty_gateway
):
    """The control for the test above: its 500s come from the named fault, not the harness."""
    shared_upstream.reset()
    with _client(faulty_gateway) as client:
        assert client.chat.completions.create(model=TEE, messages=MSG).choices
    assert chat_count(shared_upstream) == 1


def test_a_failing_ledger_refuses_with_503_and_forwards_nothing(shared_upstream):
    with _faulty(shared_upstream, "ledger") as gw, _client(gw) as client:
        with pytest.raises(openai.InternalServerError) as exc:
            client.chat.completions.create(model=TEE, messages=MSG)
        assert exc.value.status_code == 503
        assert exc.value.body["code"] == "billing_unavailable"
        assert chat_count(shared_upstream) == 0


@contextmanager
def _unanswered_listener(host: str, port: int) -> Iterator[None]:
    """A listener on ``host:port`` whose accept queue is full (backlog 0, one connection never
    accepted): Linux drops every further SYN, so a connect hangs as on a blackholed route."""
    with socket.create_server((host, port), backlog=0) as srv:
        with socket.create_connection(srv.getsockname()[:2], timeout=5):  # fills the queue
            yield


def test_an_upstream_whose_connect_hangs_gives_json_504_at_the_deadline():
    """The deadline covers the TCP connect: mitmproxy only gives the flow its server connection
    once connected, so a SYN nobody answers would otherwise wait for the kernel's give-up
    (~2 minutes)."""
    with (
        start_sandbox("--models", str(TEST_MODELS)) as up,
        start_gateway(
            up.base_url, extra_toml="upstream.timeout_s = 1\ncatalog.refresh_interval_s = 3600"
        ) as gw,
    ):
        with _client(gw) as client:
            assert _refused(client, TEE) is None  # catalog and verdict cached from here on
        where = urlsplit(up.base_url)
        up.stop()
        assert where.hostname is not None and where.port is not None
        with _unanswered_listener(where.hostname, where.port), _client(gw) as client:
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as exc:
                client.chat.completions.create(model=TEE, messages=MSG, timeout=30)
            assert time.monotonic() - started < 15
        assert exc.value.status_code == 504
        assert exc.value.body["code"] == "upstream_timeout"
        line = gw.access_line(exc.value.response.headers["x-request-id"])
        assert line["error_code"] == "upstream_timeout"
        assert line["status"] == 504  # the page mitmproxy wrote after the hooks, as sent


def test_upstream_that_never_answers_gives_json_504():
    with (
        start_sandbox("--models", str(TEST_MODELS)) as up,
        start_gateway(up.base_url, extra_toml="upstream.timeout_s = 1") as gw,
        _client(gw) as client,
    ):
        assert _refused(client, TEE) is None
        up.behaviour(delay_ms=30_000)
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model=TEE, messages=MSG)
        assert exc.value.status_code == 504
        assert exc.value.body["code"] == "upstream_timeout"
        up.behaviour(delay_ms=0)
        assert _refused(client, TEE) is None  # the gateway is fine afterwards
