"""What the request-path addons tell each other about a flow, under one owner.

mitmproxy gives each flow a ``metadata`` dict and no schema. The addons pass their
decisions through it (the route, each stage's approval, the validated request, the
reservation, ...); a key mistyped in one addon would read as "absent" and refuse every
chat, or worse, skip a check, and only an end-to-end test would notice. So every key is
written here once, behind a typed getter and setter, and the route and the stage names
are enums: a typo is an ``AttributeError`` on import or a ``ValueError`` at once, never
a silent miss.

Approvals (:func:`passed`) are what :class:`~teegate.addons.seal.Seal` checks: a chat
completion leaves only if every :class:`Stage` recorded one. An addon that raised, or was
skipped, leaves its stage missing, and the flow is refused. Addons call ``passed``
through this module (``flowstate.passed``), so the fault injector of the failure-mode
tests (``tests/support/faulty_gateway.py``) can replace it.

Getters of what an earlier stage must have recorded (:func:`chat_request`,
:func:`catalog_model`) raise :class:`MissingState` rather than return ``None``: they are
called only after that stage approved, and the guard turns the exception into a 500.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from mitmproxy import http

if TYPE_CHECKING:
    import asyncio

    from teegate.addons.chutes import E2EEFlow
    from teegate.addons.responses_api import ResponsesCall
    from teegate.addons.schema import ChatRequest
    from teegate.addons.streaming import StreamTally
    from teegate.catalog.attestation import Verdict
    from teegate.catalog.models import CatalogModel
    from teegate.ledger import ApiKey, Reservation


class Route(StrEnum):
    """Where a flow is going; set by the Router (or, on the egress listener, by Egress)."""

    CHAT = "chat"  # a chat completion on its way through the gate to the upstream
    LOCAL = "local"  # answered by the gateway itself (model list, report, refusal)
    PASSTHROUGH = "passthrough"  # egress: a host the gateway does not gate, relayed as is


class Stage(StrEnum):
    """The approvals a chat completion needs before Seal lets it leave, one per addon."""

    AUTH = "auth"
    RATELIMIT = "ratelimit"
    VALIDATE = "validate"
    GATE = "gate"
    ATTESTATION = "attestation"
    BILLING = "billing"
    UPSTREAM = "upstream"


class MissingState(RuntimeError):
    """A value an earlier stage must have recorded is absent: an internal error."""


def need[T](value: T | None, what: str) -> T:
    """``value``, or :class:`MissingState` naming ``what`` when it was never recorded."""
    if value is None:
        raise MissingState(f"no {what} recorded for this flow")
    return value


_ROUTE = "teegate.route"
_STAGES = "teegate.stages"
_REQUEST_ID = "teegate.request_id"
_ERROR_CODE = "teegate.error_code"
_API_KEY = "teegate.key"
_CHAT = "teegate.chat"
_MODEL = "teegate.model"
_LISTED_MODEL = "teegate.listed_model"
_UPSTREAM_MODEL = "teegate.upstream_model"
_CLIENT_WANTS_USAGE = "teegate.client_wants_usage"
_RESERVATION = "teegate.reservation"
_SHARED_LIMIT = "teegate.shared_limit"
_RATE_COUNTED = "teegate.rate_counted"
_STARTED_MS = "teegate.started_ms"
_FIRST_BYTE_MS = "teegate.first_byte_ms"
_TALLY = "teegate.stream"
_DEADLINE = "teegate.deadline"
_TIMED_OUT = "teegate.timed_out"
_EGRESS = "teegate.egress"
_RESPONSE_HEADERS = "teegate.response_headers"
_HEADERS_WRITTEN = "teegate.response_headers_written"
_E2EE = "teegate.e2ee"
_VERDICT = "teegate.verdict"
_RECEIPT_ID = "teegate.receipt_id"
_UPSTREAM_ANSWER = "teegate.upstream_answer"
_ERROR_PAGE_STATUS = "teegate.error_page_status"
_RESPONSES = "teegate.responses"
_COUNTED = "teegate.counted"
_FAILED_CLOSED = "teegate.failed_closed"


# -- route and approvals -------------------------------------------------------------------


def route(flow: http.HTTPFlow) -> Route | None:
    return flow.metadata.get(_ROUTE)


def set_route(flow: http.HTTPFlow, value: Route) -> None:
    flow.metadata[_ROUTE] = Route(value)


def is_chat(flow: http.HTTPFlow) -> bool:
    """A chat completion still on its way (not yet answered locally)."""
    return flow.response is None and route(flow) == Route.CHAT


def passed(flow: http.HTTPFlow, stage: Stage) -> None:
    """Record ``stage``'s approval (a name that is no :class:`Stage` raises ``ValueError``)."""
    flow.metadata.setdefault(_STAGES, set()).add(Stage(stage))


def has_passed(flow: http.HTTPFlow, stage: Stage) -> bool:
    return Stage(stage) in flow.metadata.get(_STAGES, ())


def approvals(flow: http.HTTPFlow) -> frozenset[Stage]:
    return frozenset(flow.metadata.get(_STAGES, ()))


# -- request identity and outcome ----------------------------------------------------------


def request_id(flow: http.HTTPFlow) -> str | None:
    """The id RequestIds gave the request (None before its request hook ran)."""
    return flow.metadata.get(_REQUEST_ID)


def set_request_id(flow: http.HTTPFlow, value: str) -> None:
    flow.metadata[_REQUEST_ID] = value


def error_code(flow: http.HTTPFlow) -> str | None:
    """The code of the error the gateway answered (or will answer) with."""
    return flow.metadata.get(_ERROR_CODE)


def set_error_code(flow: http.HTTPFlow, code: str) -> None:
    flow.metadata[_ERROR_CODE] = code


def set_error_page_status(flow: http.HTTPFlow, status: int) -> None:
    """The error page's status (``errors.next_error_page``: written after the hooks)."""
    flow.metadata[_ERROR_PAGE_STATUS] = status


def sent_status(flow: http.HTTPFlow) -> int | None:
    """The status the client was sent: the response's, else the chosen error page's."""
    r = flow.response
    return r.status_code if r is not None else flow.metadata.get(_ERROR_PAGE_STATUS)


def api_key(flow: http.HTTPFlow) -> ApiKey | None:
    """The key Auth accepted (never the presented secret: ids and limits only)."""
    return flow.metadata.get(_API_KEY)


def set_api_key(flow: http.HTTPFlow, key: ApiKey) -> None:
    flow.metadata[_API_KEY] = key


# -- the chat completion -------------------------------------------------------------------


def has_chat_request(flow: http.HTTPFlow) -> bool:
    return flow.metadata.get(_CHAT) is not None


def chat_request(flow: http.HTTPFlow) -> ChatRequest:
    """The validated request; only for flows the validator approved."""
    return need(flow.metadata.get(_CHAT), "validated chat request")


def set_chat_request(flow: http.HTTPFlow, req: ChatRequest) -> None:
    flow.metadata[_CHAT] = req


def catalog_model(flow: http.HTTPFlow) -> CatalogModel:
    """The confidential catalog entry the gate approved; only for flows it approved."""
    return need(flow.metadata.get(_MODEL), "catalog model")


def set_catalog_model(flow: http.HTTPFlow, model: CatalogModel) -> None:
    flow.metadata[_MODEL] = model


def listed_model(flow: http.HTTPFlow) -> str | None:
    """The requested model id when the catalog lists it: a catalog id, so loggable."""
    return flow.metadata.get(_LISTED_MODEL)


def set_listed_model(flow: http.HTTPFlow, model_id: str) -> None:
    flow.metadata[_LISTED_MODEL] = model_id


def upstream_model(flow: http.HTTPFlow) -> str | None:
    """The model id sent upstream, which its answer must name."""
    return flow.metadata.get(_UPSTREAM_MODEL)


def set_upstream_model(flow: http.HTTPFlow, model_id: str) -> None:
    flow.metadata[_UPSTREAM_MODEL] = model_id


def client_wants_usage(flow: http.HTTPFlow) -> bool:
    """Whether the client asked for the stream's usage chunk (the gateway always does)."""
    return flow.metadata.get(_CLIENT_WANTS_USAGE, False)


def set_client_wants_usage(flow: http.HTTPFlow, value: bool) -> None:
    flow.metadata[_CLIENT_WANTS_USAGE] = value


def verdict(flow: http.HTTPFlow) -> Verdict | None:
    """The attestation verdict the gate served this chat under (what its receipt cites)."""
    return flow.metadata.get(_VERDICT)


def set_verdict(flow: http.HTTPFlow, value: Verdict) -> None:
    flow.metadata[_VERDICT] = value


def receipt_id(flow: http.HTTPFlow) -> str | None:
    """The id of the receipt promised in this chat's response headers."""
    return flow.metadata.get(_RECEIPT_ID)


def set_receipt_id(flow: http.HTTPFlow, value: str) -> None:
    flow.metadata[_RECEIPT_ID] = value


def upstream_answer(flow: http.HTTPFlow) -> tuple[str, str | None] | None:
    """A plain (not streamed) answer as the upstream sent it, read before anything translated
    it (the Responses API): its body's SHA-256 (what the upstream's signature covers) and its
    completion id (where that signature is asked for)."""
    return flow.metadata.get(_UPSTREAM_ANSWER)


def set_upstream_answer(flow: http.HTTPFlow, sha256: str, completion_id: str | None) -> None:
    flow.metadata[_UPSTREAM_ANSWER] = (sha256, completion_id)


def responses_call(flow: http.HTTPFlow) -> ResponsesCall | None:
    """Set when the client spoke the Responses API: its answer is translated back."""
    return flow.metadata.get(_RESPONSES)


def set_responses_call(flow: http.HTTPFlow, call: ResponsesCall) -> None:
    flow.metadata[_RESPONSES] = call


# -- billing -------------------------------------------------------------------------------


def reservation(flow: http.HTTPFlow) -> Reservation | None:
    return flow.metadata.get(_RESERVATION)


def set_reservation(flow: http.HTTPFlow, res: Reservation) -> None:
    flow.metadata[_RESERVATION] = res


def shared_limit(flow: http.HTTPFlow) -> int | None:
    """The per-minute limit Billing counts with the reservation (shared limits only)."""
    return flow.metadata.get(_SHARED_LIMIT)


def set_shared_limit(flow: http.HTTPFlow, limit: int) -> None:
    flow.metadata[_SHARED_LIMIT] = limit


def rate_counted(flow: http.HTTPFlow) -> bool:
    """Whether the flow's request was counted in its key's shared window."""
    return bool(flow.metadata.get(_RATE_COUNTED))


def set_rate_counted(flow: http.HTTPFlow) -> None:
    flow.metadata[_RATE_COUNTED] = True


def started_ms(flow: http.HTTPFlow) -> int | None:
    return flow.metadata.get(_STARTED_MS)


def set_started_ms(flow: http.HTTPFlow, ms: int) -> None:
    flow.metadata[_STARTED_MS] = ms


def first_byte_ms(flow: http.HTTPFlow) -> int | None:
    return flow.metadata.get(_FIRST_BYTE_MS)


def set_first_byte_ms(flow: http.HTTPFlow, ms: int) -> None:
    flow.metadata[_FIRST_BYTE_MS] = ms


def stream_tally(flow: http.HTTPFlow) -> StreamTally | None:
    """What a relayed stream delivered; None for an answer that was not streamed."""
    return flow.metadata.get(_TALLY)


def set_stream_tally(flow: http.HTTPFlow, tally: StreamTally) -> None:
    flow.metadata[_TALLY] = tally


def e2ee(flow: http.HTTPFlow) -> E2EEFlow | None:
    """The sealed request's instance ticket and response key (Chutes E2EE flows only)."""
    return flow.metadata.get(_E2EE)


def set_e2ee(flow: http.HTTPFlow, state: E2EEFlow) -> None:
    flow.metadata[_E2EE] = state


# -- the upstream deadline -----------------------------------------------------------------


def set_deadline(flow: http.HTTPFlow, timer: asyncio.TimerHandle) -> None:
    flow.metadata[_DEADLINE] = timer


def pop_deadline(flow: http.HTTPFlow) -> asyncio.TimerHandle | None:
    return flow.metadata.pop(_DEADLINE, None)


def timed_out(flow: http.HTTPFlow) -> bool:
    return bool(flow.metadata.get(_TIMED_OUT))


def set_timed_out(flow: http.HTTPFlow) -> None:
    flow.metadata[_TIMED_OUT] = True


# -- egress and response headers -----------------------------------------------------------


def egress_verdict(flow: http.HTTPFlow) -> str | None:
    """The egress policy's verdict (``teegate.egress.hosts.Verdict`` value), egress flows only."""
    return flow.metadata.get(_EGRESS)


def set_egress_verdict(flow: http.HTTPFlow, verdict: str) -> None:
    flow.metadata[_EGRESS] = verdict


def response_headers(flow: http.HTTPFlow) -> dict[str, str]:
    """The headers the addons want on the response (a bag :mod:`.headers` writes)."""
    return flow.metadata.setdefault(_RESPONSE_HEADERS, {})


def headers_written(flow: http.HTTPFlow) -> http.Response | None:
    """The response the bag was last written to."""
    return flow.metadata.get(_HEADERS_WRITTEN)


def set_headers_written(flow: http.HTTPFlow, resp: http.Response) -> None:
    flow.metadata[_HEADERS_WRITTEN] = resp


# -- response-side faults (addons/response_guard.py) --------------------------------------


class FailedClosed(StrEnum):
    """How much of the answer reached the client before a response-side addon raised."""

    WITHHELD = "withheld"  # none of it: the client got the gateway's 502 envelope instead
    CUT = "cut"  # a streamed answer, ended early with an error event


def failed_closed(flow: http.HTTPFlow) -> tuple[FailedClosed, int | None] | None:
    """How the flow failed closed, and the status the withheld answer had; None if it did not."""
    return flow.metadata.get(_FAILED_CLOSED)


def set_failed_closed(flow: http.HTTPFlow, how: FailedClosed, status: int | None) -> None:
    """Record the first response-side fault only: the later ones act on the gateway's own error."""
    flow.metadata.setdefault(_FAILED_CLOSED, (FailedClosed(how), status))


# -- metrics -------------------------------------------------------------------------------


def counted(flow: http.HTTPFlow) -> bool:
    """Whether the metrics already counted this flow (a response and an error hook may both run)."""
    return bool(flow.metadata.get(_COUNTED))


def set_counted(flow: http.HTTPFlow) -> None:
    flow.metadata[_COUNTED] = True
