"""Which endpoint a request is for, and the ones answered locally.

Chat completions continue down the request path only as exactly ``POST
/v1/chat/completions``. mitmproxy reads the method upper-cased, so a
lower-case ``post`` is accepted and the rewrite sends ``POST``. A query string
is refused with 400 naming its first parameter rather than stripped, so a
client learns that ``?model=`` or ``?api-key=`` did nothing (and none can reach
an upstream that reads query parameters). Path variants (trailing slash,
``;params``, ``//``, percent-encoding, ``#``) are not the chat path: 404.
``POST /v1/responses`` arrives here already translated into a chat completion
(:mod:`teegate.addons.responses`); the Responses paths that name a stored response
(``GET``/``DELETE /v1/responses/{id}``, ``/input_items``, ``/cancel``) answer 404 saying
teegate stores none. The model list is served
from the catalog; endpoints with no hardware-attested variant upstream answer
503; anything else 404 naming the endpoints that exist (or 405 for a known path with
the wrong method).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote

from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.attestation import AttestationSync
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.errors import (
    GatewayError,
    guarded,
    json_response,
    method_not_allowed,
    refuse,
)
from teegate.addons.flowstate import Route
from teegate.catalog.models import CatalogModel
from teegate.money import format_usd

CHAT_PATH = "/v1/chat/completions"
RESPONSES_PATH = "/v1/responses"
_STORED_RESPONSE = re.compile(
    r"^/v1/responses/(?!input_tokens$|compact$)[^/]+(/input_items|/cancel)?$"
)

_NOT_AVAILABLE = re.compile(
    r"^/v1/(embeddings|moderations|images(/.*)?|audio(/.*)?|video[^?]*|"
    r"fine_tuning(/.*)?|fine-tunes(/.*)?)$"
)


def model_object(m: CatalogModel) -> dict:
    """One model in OpenAI's shape, plus what makes it confidential and its price."""
    p = m.pricing
    pricing = {"input": format_usd(p.input), "output": format_usd(p.output)}
    if p.cache_read is not None:
        pricing["input_cache_read"] = format_usd(p.cache_read)
    pricing["unit"] = "USD per 1M tokens"
    return {
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": m.owned_by,
        "confidential_compute": True,
        "context_length": m.context_length,
        "max_output_length": m.max_output_length,
        "capabilities": {
            "tools": m.supports_tools,
            "json_mode": m.supports_json,
            "reasoning": "reasoning" in m.features,
        },
        "supported_features": sorted(m.features),
        "input_modalities": list(m.input_modalities),
        "output_modalities": list(m.output_modalities),
        "pricing": pricing,
    }


class Router:
    def __init__(self, catalog: CatalogSync, attestation: AttestationSync | None = None) -> None:
        self._sync = catalog
        self._attestation = attestation

    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flowstate.route(flow) == Route.PASSTHROUGH:
            return  # passthrough: an egress flow to a host that is not an LLM API
        path, has_query, query = flow.request.path.partition("?")
        method = flow.request.method.upper()
        if path == CHAT_PATH:
            if method != "POST":
                refuse(flow, method_not_allowed(method[:16], path, "POST"))
            elif has_query:
                refuse(flow, _query_refused(query, CHAT_PATH))
            else:
                flowstate.set_route(flow, Route.CHAT)
            return
        flowstate.set_route(flow, Route.LOCAL)
        if path == RESPONSES_PATH:
            if method != "POST":
                refuse(flow, method_not_allowed(method[:16], path, "POST"))
            elif has_query:
                refuse(flow, _query_refused(query, path))
            else:  # the translating addon did not run: refuse rather than guess
                raise RuntimeError("a Responses request reached the router untranslated")
            return
        if _STORED_RESPONSE.match(path):
            refuse(flow, _nothing_stored(path))
            return
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if method != "GET":
                refuse(flow, method_not_allowed(method, path, "GET"))
            else:
                self._models(flow, path)
        elif _NOT_AVAILABLE.match(path):
            refuse(
                flow,
                GatewayError(
                    503,
                    f"{path} is not available: no hardware-attested (TEE) variant of this "
                    "endpoint exists upstream, and this gateway never falls back to a "
                    "non-confidential one.",
                    "not_available",
                    type="api_error",
                ),
            )
        else:
            refuse(flow, _unknown_endpoint(method[:16], path))

    def _models(self, flow: http.HTTPFlow, path: str) -> None:
        try:
            snap = self._sync.current()
        except GatewayError as e:
            refuse(flow, e)
            return
        models = snap.models
        att = self._attestation
        if att is not None:  # list only what the gate would serve: attested now
            models = {i: models[i] for i in att.served(snap)}
        if path == "/v1/models":
            body = {"object": "list", "data": [self._object(m) for m in models.values()]}
            flow.response = json_response(200, body)
            return
        model_id = unquote(path.removeprefix("/v1/models/"))
        model = models.get(model_id)
        if model is not None:
            flow.response = json_response(200, self._object(model))
        elif model_id in snap.non_confidential or model_id in snap.models:
            why = f" ({att.refusal(model_id)})" if att and model_id in snap.models else ""
            refuse(
                flow,
                GatewayError(
                    404,
                    f"Model '{model_id}' is not Confidential Compute.{why}",
                    "model_not_confidential",
                    param="model",
                ),
            )
        else:
            refuse(
                flow,
                GatewayError(
                    404, f"The model '{model_id}' does not exist.", "model_not_found", param="model"
                ),
            )

    def _object(self, m: CatalogModel) -> dict:
        obj = model_object(m)
        if self._attestation is not None:
            obj["attestation"] = self._attestation.describe(m.id)
        return obj


# What this gateway serves, named in every 404 so a client that tried ``/v1/completions`` (or
# any path of an API it assumed) learns what to call instead of guessing.
ENDPOINTS = (
    f"POST {CHAT_PATH}",
    f"POST {RESPONSES_PATH}",
    "GET /v1/models",
    "GET /v1/models/{id}",
    "GET /v1/attestation/report",
    "GET /v1/attestation/gateway",
    "GET /v1/receipts/{id}",
    "GET /v1/account",
)


def _unknown_endpoint(method: str, path: str) -> GatewayError:
    return GatewayError(
        404,
        f"Unknown endpoint: {method} {path[:256]}. This gateway serves "
        + ", ".join(ENDPOINTS)
        + ".",
        "not_found",
    )


def _nothing_stored(path: str) -> GatewayError:
    return GatewayError(
        404,
        f"{path[:256]}: teegate stores no responses (confidentiality), so there is none to "
        "retrieve, list, cancel or delete. Keep what you need from the answer itself.",
        "response_not_stored",
    )


def _query_refused(query: str, path: str) -> GatewayError:
    pairs = parse_qsl(query, keep_blank_values=True)
    name = next((k for k, _ in pairs if k), "")[:64]
    what = f"'{name}'" if name else "a query string"
    return GatewayError(
        400,
        f"Query parameters are not accepted on {path} (got {what}); "
        "put every parameter in the JSON body.",
        "unsupported_parameter",
        param=name or None,
    )

