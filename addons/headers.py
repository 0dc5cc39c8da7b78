"""The gateway's own response headers, written in one place, once per response.

Several addons have something to say in every response: the request id, the
caller's rate limit, what attestation backed the answer. Each records its
headers in the flow as soon as it knows them (:func:`add_headers`), and
:class:`ResponseHeaders`, after every addon that adds one, writes them all in one pass over
the response's headers: in ``responseheaders``, before a streamed response's
head leaves, or in ``response`` for answers made locally (refusals,
``/v1/models``), which have no ``responseheaders`` hook. One writer, rather than each addon
in its own hooks, is one pass over the headers per response (docs/bench.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.flowstate import Route
from teegate.addons.response_guard import guarded_response


def add_headers(flow: http.HTTPFlow, headers: Mapping[str, str]) -> None:
    """Have ``headers`` set on the flow's response, replacing any of the same names."""
    flowstate.response_headers(flow).update(headers)


class ResponseHeaders:
    """Writes what :func:`add_headers` collected.

    ``own`` names only the gateway may speak for: on every flow except egress
    passthrough, an upstream's headers of those names are dropped, and
    ``defaults()`` supplies any the flow did not set.
    """

    def __init__(
        self,
        own: Iterable[str] = (),
        defaults: Callable[[], Mapping[str, str]] = dict,
    ) -> None:
        self._own = frozenset(name.lower() for name in own)
        self._defaults = defaults

    @guarded_response
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def _write(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or flowstate.headers_written(flow) is resp:
            return  # nothing yet, or done (a refusal after responseheaders is a new response)
        flowstate.set_headers_written(flow, resp)
        added: Mapping[str, str] = flowstate.response_headers(flow)
        drop: set[str] = set()
        if flowstate.route(flow) != Route.PASSTHROUGH:
            added = {**self._defaults(), **added}
            drop |= self._own
        drop |= {name.lower() for name in added}  # whatever is written replaces the upstream's
        if not drop:
            return
        kept = tuple(
            (k, v) for k, v in resp.headers.fields if k.decode("latin-1").lower() not in drop
        )
        resp.headers.fields = kept + tuple(
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in added.items()
        )
