"""The Chutes E2EE path inside the gateway, below the processes: the sealed request, the
opened answer (plain and streamed), and what happens when something does not open."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from mitmproxy.test import taddons, tflow, tutils

from teegate.addons import flowstate
from teegate.addons.chutes import E2EEFlow, E2EEOpen
from teegate.addons.flowstate import Route, Stage
from teegate.addons.schema import parse_chat_request
from teegate.addons.streaming import StreamTally, _Relay
from teegate.addons.upstream import UpstreamRewrite
from teegate.catalog.chutes.e2ee import seal_request
from teegate.catalog.models import CatalogModel, Pricing
from teegate.config import UpstreamSettings
from tests.chutes.enclave import Enclave

TEE = "deepseek-ai/DeepSeek-V3.2-TEE"
CHUTE = "5f0e3a3e-1b5c-4c39-9d5c-0123456789ab"
MARKER = "MARKER-7f3c2a"
DEFAULTS = {"max_tokens": 64, "temperature": 0.7, "top_p": 1.0, "max_depth": 400}
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


@dataclass(frozen=True)
class Ticket:
    chute_id: str
    instance_id: str
    e2e_pubkey: str
    nonce: str
    expires_at: float = 1e12


@dataclass
class FakePool:
    enclave: Enclave | None
    failures: list[tuple[str, bool]] = field(default_factory=list)
    chute_id: str = CHUTE

    async def acquire(self) -> Ticket:
        from teegate.catalog.chutes.pool import NoAttestedInstance

        if self.enclave is None:
            raise NoAttestedInstance("none verified")
        return Ticket(CHUTE, "inst-1", self.enclave.pubkey_b64, "tok-1")

    def failed(self, ticket: Ticket, *, sent: bool, kind: str = "instance") -> bool:
        self.failures.append((ticket.instance_id, sent, kind))
        return not sent


class FakeAttestation:
    sealed = True

    def __init__(self, pool: FakePool) -> None:
        self._pool = pool

    def pool(self, model: str) -> FakePool:
        return self._pool


def _model() -> CatalogModel:
    return CatalogModel(
        id=TEE,
        created=0,
        owned_by="x",
        context_length=1000,
        max_output_length=None,
        features=frozenset({"tools"}),
        input_modalities=("text",),
        output_modalities=("text",),
        pricing=Pricing(input=1, output=1),
        chute_id=CHUTE,
    )


def _approved(stream: bool = False):
    body = {"model": TEE, "messages": [{"role": "user", "content": MARKER}], "stream": stream}
    f = tflow.tflow(
        req=tutils.treq(
            method=b"POST", path=b"/v1/chat/completions", content=json.dumps(body).encode()
        )
    )
    f.request.headers["authorization"] = "Bearer client-secret"
    flowstate.set_route(f, Route.CHAT)
    flowstate.set_chat_request(f, parse_chat_request(json.dumps(body).encode(), **DEFAULTS))
    flowstate.set_catalog_model(f, _model())
    flowstate.passed(f, Stage.GATE)
    return f


UP = UpstreamSettings.model_validate(
    {"base_url": "https://api.example", "api_key": "up-key", "kind": "chutes"}
)


async def _rewrite(pool: FakePool, stream: bool = False):
    f = _approved(stream)
    rewrite = UpstreamRewrite(UP, FakeAttestation(pool))  # type: ignore[arg-type]
    with taddons.context(rewrite):
        await rewrite.request(f)
    return f


@pytest.mark.parametrize("stream", [False, True])
async def test_the_request_leaves_sealed_to_the_ticket_instance(stream):
    enclave = Enclave()
    f = await _rewrite(FakePool(enclave), stream)
    r = f.request
    assert f.response is None and flowstate.has_passed(f, Stage.UPSTREAM)
    assert (r.method, r.host, r.path) == ("POST", "api.example", "/e2e/invoke")
    h = r.headers
    assert h["authorization"] == "Bearer up-key"
    assert h["content-type"] == "application/octet-stream"
    assert (h["x-chute-id"], h["x-instance-id"], h["x-e2e-nonce"]) == (CHUTE, "inst-1", "tok-1")
    assert h["x-e2e-stream"] == ("true" if stream else "false")
    assert h["x-e2e-path"] == "/v1/chat/completions"
    assert MARKER.encode() not in r.content and b"messages" not in r.content
    inner = enclave.open_request(r.content)
    assert inner["messages"][0]["content"] == MARKER
    assert inner["max_tokens"] == 64 and "e2e_response_pk" in inner
    assert flowstate.response_headers(f)["x-teegate-e2ee"] == "true"


async def test_no_verified_instance_refuses_with_nothing_sent():
    f = await _rewrite(FakePool(None))
    assert f.response.status_code == 503
    assert json.loads(f.response.content)["error"]["code"] == "no_attested_instance"
    assert not flowstate.has_passed(f, Stage.UPSTREAM)
    assert MARKER.encode() in f.request.content  # never rebuilt for the upstream either


def _sealed_flow(enclave: Enclave, pool: FakePool):
    """A flow after the rewrite, with the state the opener needs, and the enclave's view."""
    f = _approved()
    sealed = seal_request({"model": TEE}, enclave.pubkey_b64)
    ticket = Ticket(CHUTE, "inst-1", enclave.pubkey_b64, "tok-1")
    flowstate.set_e2ee(
        f, E2EEFlow(pool=pool, ticket=ticket, response_key=sealed.response_key, stream=False)
    )
    flowstate.set_upstream_model(f, TEE)
    flowstate.passed(f, Stage.UPSTREAM)
    response_pk = enclave.open_request(sealed.payload)["e2e_response_pk"]
    return f, response_pk


def _answer(f, status: int, content: bytes, ctype: str) -> None:
    f.response = tutils.tresp(status_code=status, content=content)
    f.response.headers["content-type"] = ctype


ANSWER = {"model": TEE, "choices": [{"message": {"content": "hi"}}], "usage": USAGE}


def test_a_plain_answer_is_opened_before_anything_reads_it():
    enclave, pool = Enclave(), FakePool(None)
    f, pk = _sealed_flow(enclave, pool)
    _answer(f, 200, Enclave.seal_response(ANSWER, pk), "application/octet-stream")
    E2EEOpen().response(f)
    assert f.response.headers["content-type"] == "application/json"
    assert json.loads(f.response.content) == ANSWER
    assert pool.failures == []


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda b: b[:-1] + bytes([b[-1] ^ 1]), id="flipped-tag"),
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: json.dumps(ANSWER).encode(), id="plaintext"),
    ],
)
def test_an_answer_that_does_not_open_is_never_relayed(tamper):
    enclave, pool = Enclave(), FakePool(None)
    f, pk = _sealed_flow(enclave, pool)
    _answer(f, 200, tamper(Enclave.seal_response(ANSWER, pk)), "application/octet-stream")
    E2EEOpen().response(f)
    assert f.response.status_code == 502
    assert json.loads(f.response.content)["error"]["code"] == "e2ee_failed"
    assert flowstate.error_code(f) == "e2ee_failed"


@pytest.mark.parametrize(("status", "kind"), [(403, "token"), (404, "instance"), (400, "instance")])
def test_a_refusal_before_reading_reports_the_ticket_unsent_and_asks_for_a_retry(status, kind):
    enclave, pool = Enclave(), FakePool(None)
    f, _ = _sealed_flow(enclave, pool)
    _answer(f, status, b'{"detail":"Invalid, expired, or already-used nonce"}', "application/json")
    E2EEOpen().response(f)
    assert f.response.status_code == 503
    assert json.loads(f.response.content)["error"]["code"] == "e2ee_instance_unavailable"
    assert pool.failures == [("inst-1", False, kind)]


@pytest.mark.parametrize("status", [429, 500, 502])
def test_other_plaintext_errors_are_relayed_as_today(status):
    enclave, pool = Enclave(), FakePool(None)
    f, _ = _sealed_flow(enclave, pool)
    _answer(f, status, b'{"detail":"Instance returned status 500"}', "application/json")
    E2EEOpen().response(f)
    assert f.response.status_code == status and pool.failures == []


def test_an_error_the_model_sealed_is_a_502_without_its_detail():
    enclave, pool = Enclave(), FakePool(None)
    f, pk = _sealed_flow(enclave, pool)
    sealed = Enclave.seal_response({"error": {"message": "secret " + MARKER}}, pk)
    _answer(f, 200, sealed, "application/octet-stream")
    E2EEOpen().response(f)
    assert f.response.status_code == 502
    assert json.loads(f.response.content)["error"]["code"] == "upstream_error"
    assert MARKER.encode() not in f.response.content


def _relay(enclave: Enclave, strip_usage: bool = True):
    f, pk = _sealed_flow(enclave, FakePool(None))
    tally = StreamTally()
    opener = flowstate.e2ee(f).opener()
    failures: list[str] = []
    relay = _Relay(
        tally,
        strip_usage,
        None,
        model=TEE,
        opener=opener,
        on_e2ee_failure=failures.append,
    )
    return relay, tally, pk, failures


CHUNKS = [
    {"model": TEE, "choices": [{"delta": {"content": "hel"}}]},
    {"model": TEE, "choices": [{"delta": {"content": "lo"}}]},
    {"model": TEE, "choices": [], "usage": USAGE},
]


def _sse(payloads: list[str]) -> bytes:
    return b"".join(f"data: {p}\n\n".encode() for p in payloads)


def _events(out: list[bytes]) -> list[str]:
    text = b"".join(out).decode()
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e]


@pytest.mark.parametrize("strip_usage", [True, False])
def test_a_stream_is_opened_event_by_event_and_billed_from_inside(strip_usage):
    enclave = Enclave()
    relay, tally, pk, failures = _relay(enclave, strip_usage)
    wire = Enclave.stream(CHUNKS, pk, usage={"prompt_tokens": 999, "completion_tokens": 999})
    out = relay(_sse(wire)) + relay(b"")
    events = _events(out)
    assert [json.loads(e) for e in events[:2]] == CHUNKS[:2]
    assert events[-1] == "[DONE]"
    assert ("e2e" in "".join(events)) is False
    assert tally.usage == USAGE  # the enclave's usage, not the relay's plaintext copy
    assert tally.generated_bytes == len("hello") and tally.saw_done and not failures
    assert (len(events) == 4) is (not strip_usage)


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda w: [w[0], w[1], w[1], *w[2:]], id="replayed"),
        pytest.param(lambda w: [w[0], w[1], '{"e2e":"AAAA' + w[2][10:], *w[3:]], id="corrupt"),
        pytest.param(lambda w: [w[1], *w[2:]], id="no-init"),
        pytest.param(lambda w: [w[0], w[1], "[DONE]"], id="cut-with-plain-done"),
        pytest.param(lambda w: [w[0], w[1]], id="cut"),
        pytest.param(lambda w: [w[0], w[1], '{"e2e_error":"boom"}'], id="unsealed-error"),
    ],
)
def test_a_frame_that_does_not_open_ends_the_stream_with_an_error(where):
    enclave = Enclave()
    relay, tally, pk, failures = _relay(enclave)
    wire = where(Enclave.stream(CHUNKS, pk))
    out = relay(_sse(wire)) + relay(b"")
    events = _events(out)
    last = json.loads(events[-1])
    assert last["error"]["code"] == "e2ee_failed"
    assert tally.e2ee_failed and len(failures) == 1
    assert tally.usage is None  # billed from what was delivered before the failure
    assert all("e2e" not in e for e in events[:-1])


@pytest.mark.parametrize(
    ("msg", "answered", "reported"),
    [
        ("Client disconnected.", False, False),
        ("Connection reset by peer", True, False),
        ("Connection reset by peer", False, True),
    ],
)
def test_only_an_unanswered_request_withdraws_its_instance(msg, answered, reported):
    from mitmproxy.flow import Error

    enclave, pool = Enclave(), FakePool(None)
    f, _ = _sealed_flow(enclave, pool)
    if answered:
        _answer(f, 200, b"", "text/event-stream")
    f.error = Error(msg)
    E2EEOpen().error(f)
    assert bool(pool.failures) is reported
