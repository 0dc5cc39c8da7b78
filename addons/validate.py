"""Parse and validate the chat completion body; apply the API's defaults."""

from __future__ import annotations

from mitmproxy import ctx, exceptions, http

from addons.errors import GatewayError, guarded, refuse
from addons.schema import parse_chat_request
from addons.stages import is_chat, passed


class ChatValidator:
    def __init__(self, extra_fields: frozenset[str] = frozenset()) -> None:
        self._extra_fields = extra_fields  # [request] extra_fields, checked by the config

    def load(self, loader) -> None:
        loader.add_option(
            "teegate_default_max_tokens",
            int,
            1024,
            "max_tokens applied when a request sets neither max_tokens nor max_completion_tokens.",
        )
        loader.add_option(
            "teegate_default_temperature",
            str,
            "0.7",
            "temperature applied when a request leaves it out.",
        )
        loader.add_option(
            "teegate_default_top_p", str, "1", "top_p applied when a request leaves it out."
        )

    def configure(self, updated: set[str]) -> None:
        try:
            t = float(ctx.options.teegate_default_temperature)
            p = float(ctx.options.teegate_default_top_p)
        except ValueError:
            raise exceptions.OptionsError("default temperature/top_p must be numbers") from None
        if not (0 <= t <= 2 and 0 <= p <= 1 and ctx.options.teegate_default_max_tokens >= 1):
            raise exceptions.OptionsError("request defaults out of range")
        self._defaults = {
            "max_tokens": ctx.options.teegate_default_max_tokens,
            "temperature": t,
            "top_p": p,
        }

    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        if not is_chat(flow):
            return
        try:
            raw = flow.request.get_content(strict=True)
            assert raw is not None
            flow.metadata["teegate.chat"] = parse_chat_request(
                raw, **self._defaults, extra_fields=self._extra_fields
            )
        except GatewayError as e:
            refuse(flow, e)
            return
        except ValueError:  # undecodable content-encoding
            refuse(
                flow, GatewayError(400, "The request body could not be decoded.", "invalid_body")
            )
            return
        passed(flow, "validate")
