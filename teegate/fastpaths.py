"""Two narrow changes to mitmproxy that take work off every relayed chunk, results unchanged.

A streamed answer is relayed chunk by chunk on the gateway's one core, and mitmproxy does two
things per chunk whose answer cannot change within a response (profiled under 100 concurrent
streams, docs/bench.md "Session 7"):

* ``Http1Server.send`` looks up ``transfer-encoding`` in the response's headers for every
  chunk, to decide whether to frame it: a scan of every header field, lower-casing each
  name. The headers were sent before the first chunk, so the answer is kept per response.
* Every option read (``store_streamed_bodies``, once per chunk; dozens per flow) returns a
  ``copy.deepcopy`` of the value, twice for an option left at its default. A bool, a number,
  a string or ``None`` is its own deep copy, so those are returned as they are.

Each replaced function is checked against the source it replaces by
``tests/unit/test_fastpaths.py``, which fails when mitmproxy changes it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Generator
from typing import Any

from mitmproxy import optmanager
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import ResponseData, _http1

_ATOMIC = frozenset({bool, int, float, str, bytes, type(None)})
ORIGINAL_SEND = _http1.Http1Server.send
ORIGINAL_CURRENT = optmanager._Option.current
"""What :func:`install` replaces (read by the test that fails when mitmproxy changes them)."""


def install() -> None:
    """Apply both, once (idempotent)."""
    if getattr(_http1.Http1Server.send, "_teegate", False):
        return
    _http1.Http1Server.send = _framing_kept(_http1.Http1Server.send)  # type: ignore[method-assign]
    optmanager._Option.current = _option_current  # type: ignore[method-assign]


def _framing_kept(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Http1Server.send`` with the chunked-or-not answer computed once per response."""

    def send(self: Any, event: Any) -> Generator[Any, Any, None]:
        if type(event) is not ResponseData:
            yield from original(self, event)
            return
        assert event.stream_id == self.stream_id
        response = self.response
        assert response
        framing = self.__dict__.get("_teegate_framing")
        if framing is None or framing[0] is not response:
            te = response.headers.get("transfer-encoding", "").lower()
            framing = self.__dict__["_teegate_framing"] = (response, "chunked" in te)
        raw = b"%x\r\n%s\r\n" % (len(event.data), event.data) if framing[1] else event.data
        if raw:
            yield commands.SendData(self.conn, raw)

    send._teegate = True  # type: ignore[attr-defined]
    return send


def _option_current(self: Any) -> Any:
    """``_Option.current`` without deep-copying a value that is its own copy."""
    v = self._default if self.value is optmanager.unset else self.value
    return v if type(v) in _ATOMIC else copy.deepcopy(v)
