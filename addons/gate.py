"""The TEE gate: only models the catalog lists as confidential go upstream.

The id must match a confidential catalog entry exactly (no case folding, no
trimming); the request must fit the model's capabilities and context window.
Every refusal happens here, locally, before anything is sent upstream.
"""

from __future__ import annotations

from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.errors import GatewayError, guarded, refuse
from teegate.addons.flowstate import Stage
from teegate.addons.schema import ChatRequest
from teegate.catalog.models import CatalogModel
from teegate.catalog.store import suggest

# Bytes of text per token used for the *lower* bound of a prompt's size: real
# tokenizers average ~4 bytes per token on English and fewer elsewhere, so a
# prompt with more than 8 bytes per token of headroom short is clearly too long.
CONTEXT_BYTES_PER_TOKEN_MAX = 8


class Gate:
    def __init__(self, catalog: CatalogSync) -> None:
        self._sync = catalog

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        if not flowstate.is_chat(flow):
            return
        req = flowstate.chat_request(flow)
        try:
            model = await self._lookup(flow, req.model)
            check_capabilities(req, model)
        except GatewayError as e:
            refuse(flow, e)
            return
        flowstate.set_catalog_model(flow, model)
        flowstate.passed(flow, Stage.GATE)

    async def _lookup(self, flow: http.HTTPFlow, model_id: str) -> CatalogModel:
        snap = await self._sync.loaded()
        if model_id in snap.models or model_id in snap.non_confidential:
            flowstate.set_listed_model(flow, model_id)  # a catalog id, not client text: loggable
        model = snap.models.get(model_id)
        if model is None:
            raise not_confidential(model_id, suggest(model_id, snap.models))
        return model


def not_confidential(model_id: str, suggestion: str | None, why: str = "") -> GatewayError:
    shown = model_id if len(model_id) <= 200 else model_id[:200] + "..."
    message = f"Model '{shown}' is not Confidential Compute."
    if why:
        message += f" ({why})"
    if suggestion:
        message += f" Use '{suggestion}' instead."
    else:
        message += " See GET /v1/models for the hardware-attested models you can use."
    return GatewayError(400, message, "model_not_confidential", param="model")


def check_capabilities(req: ChatRequest, model: CatalogModel) -> None:
    if req.wants_tools and not model.supports_tools:
        param = "tools" if req.tools else "tool_choice"
        raise GatewayError(
            400,
            f"Model '{model.id}' does not support tool calls.",
            "unsupported_parameter",
            param=param,
        )
    if req.wants_json and not model.supports_json:
        raise GatewayError(
            400,
            f"Model '{model.id}' does not support JSON mode or structured outputs.",
            "unsupported_parameter",
            param="response_format",
        )
    prompt_floor = -(-text_bytes(req) // CONTEXT_BYTES_PER_TOKEN_MAX)
    if prompt_floor + req.output_budget > model.context_length:
        raise GatewayError(
            400,
            f"This model's maximum context length is {model.context_length} tokens. However, "
            f"you requested at least {prompt_floor + req.output_budget} tokens "
            f"({prompt_floor} in the messages, {req.output_budget} in the completion). "
            "Please reduce the length of the messages or completion.",
            "context_length_exceeded",
            param="messages",
        )


def text_bytes(req: ChatRequest) -> int:
    """UTF-8 bytes of the text in the messages (string and text-part content)."""
    total = 0
    for msg in req.messages:
        content = msg.content
        if isinstance(content, str):
            total += len(content.encode())
        elif isinstance(content, list):
            for part in content:
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text.encode())
    return total
