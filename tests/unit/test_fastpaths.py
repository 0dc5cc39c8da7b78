"""teegate/fastpaths.py: the replaced mitmproxy functions give the same results, and are still
the ones mitmproxy has (these fail when it changes them: read the new code, then adapt)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from mitmproxy import http, options, optmanager
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import ResponseData, ResponseEndOfMessage

from teegate import fastpaths


def test_mitmproxy_still_frames_each_chunk_the_way_the_fast_path_does():
    source = inspect.getsource(fastpaths.ORIGINAL_SEND)
    assert "assert event.stream_id == self.stream_id\n" in source.split("if isinstance")[0]
    branch = source[source.index("elif isinstance(event, ResponseData):") :]
    branch = branch[: branch.index("elif isinstance(event, ResponseEndOfMessage):")]
    assert '"chunked" in self.response.headers.get("transfer-encoding", "").lower()' in branch
    assert 'raw = b"%x\\r\\n%s\\r\\n" % (len(event.data), event.data)' in branch
    assert "yield commands.SendData(self.conn, raw)" in branch
    assert branch.count("yield") == 1  # nothing else is sent for a chunk


def test_mitmproxy_still_deep_copies_every_option_value_it_returns():
    source = inspect.getsource(fastpaths.ORIGINAL_CURRENT)
    assert "return copy.deepcopy(v)" in source and "self.default" in source
    assert "copy.deepcopy(self._default)" in inspect.getsource(optmanager._Option)


def _sent(send, server, event) -> list[bytes]:
    out = list(send(server, event))
    assert all(isinstance(c, commands.SendData) and c.connection is server.conn for c in out)
    return [c.data for c in out]


def test_a_chunk_is_framed_as_mitmproxy_frames_it():
    send = fastpaths._framing_kept(fastpaths.ORIGINAL_SEND)
    for te in ("chunked", "gzip, Chunked", None):
        headers = http.Headers(**({"transfer-encoding": te} if te else {}))
        response = http.Response.make(200, b"", headers)
        for data in (b"data: {}\n\n", b"", b"x" * 70_000):
            event = ResponseData(1, data)
            a = SimpleNamespace(response=response, conn=object(), stream_id=1)
            b = SimpleNamespace(response=response, conn=a.conn, stream_id=1)
            assert _sent(send, a, event) == _sent(fastpaths.ORIGINAL_SEND, b, event)


def test_the_framing_is_read_again_for_another_response_on_the_connection():
    send = fastpaths._framing_kept(fastpaths.ORIGINAL_SEND)
    server = SimpleNamespace(conn=object(), stream_id=1)
    server.response = http.Response.make(200, b"", {"transfer-encoding": "chunked"})
    assert _sent(send, server, ResponseData(1, b"ab")) == [b"2\r\nab\r\n"]
    server.response = http.Response.make(200, b"", {"content-length": "2"})
    assert _sent(send, server, ResponseData(1, b"ab")) == [b"ab"]


def test_other_events_go_to_mitmproxys_own_send():
    calls = []

    def original(self, event):
        calls.append(event)
        yield "sentinel"

    send = fastpaths._framing_kept(original)
    event = ResponseEndOfMessage(1)
    assert list(send(SimpleNamespace(), event)) == ["sentinel"] and calls == [event]


def test_option_values_are_what_mitmproxy_returns_and_mutable_ones_still_copies():
    opts = options.Options()
    fastpaths.install()
    opts.update(http2=False, listen_port=8080)  # set ones, beside defaults
    for name, option in opts._options.items():
        assert getattr(opts, name) == fastpaths.ORIGINAL_CURRENT(option)
    opts.update(allow_hosts=["a"])
    opts.allow_hosts.append("b")  # a list: still a copy, the option itself unchanged
    assert opts.allow_hosts == ["a"]
    assert optmanager._Option.current is fastpaths._option_current
