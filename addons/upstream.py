"""What goes upstream: the re-serialized request, with the upstream's key.

The request is rebuilt rather than edited: a fresh header set (so no client
``Authorization``, hop-by-hop or proxy header can leak through), the body
re-serialized from the validated object, and the destination pinned to the
configured upstream origin whatever mode the flow arrived in.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http

from addons.errors import guarded
from addons.schema import ChatRequest
from addons.stages import has_passed, is_chat, passed


class UpstreamRewrite:
    def configure(self, updated: set[str]) -> None:
        if getattr(ctx.options, "stream_large_bodies", None):
            # Streamed request bodies go upstream before the request hook runs: no gate.
            raise exceptions.OptionsError(
                "stream_large_bodies would bypass the gate; leave it unset"
            )
        if "teegate_upstream" in updated or not hasattr(self, "_origin"):
            parts = urlsplit(ctx.options.teegate_upstream)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise exceptions.OptionsError("teegate_upstream must be an http(s) origin")
            default_port = 443 if parts.scheme == "https" else 80
            port = parts.port or default_port
            self._origin = (parts.scheme, parts.hostname, port)
            self._host_header = parts.netloc if port != default_port else parts.hostname

    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        if not is_chat(flow) or not has_passed(flow, "gate"):
            return
        req: ChatRequest = flow.metadata["teegate.chat"]
        opts = req.stream_options
        flow.metadata["teegate.client_wants_usage"] = bool(
            req.stream and opts and opts.include_usage
        )
        body = req.upstream_body(include_usage=True)

        self._pin(flow)
        flow.request.headers = http.Headers(
            host=self._host_header,
            content_type="application/json",
            accept="text/event-stream" if req.stream else "application/json",
            accept_encoding="identity",
            authorization=f"Bearer {ctx.options.teegate_upstream_key}",
            user_agent="teegate",
            x_request_id=flow.metadata.get("teegate.request_id", ""),
        )
        flow.request.content = body
        passed(flow, "upstream")

    def _pin(self, flow: http.HTTPFlow) -> None:
        """Send to the configured upstream, whatever address the flow arrived for."""
        r = flow.request
        r.scheme, r.host, r.port = self._origin
