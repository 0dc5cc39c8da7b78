"""The SSE splitter and the stream relay, below mitmproxy: property and edge cases."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from teegate.addons.sse import SSESplitter
from teegate.addons.streaming import StreamTally, _Relay

payloads = st.lists(
    st.dictionaries(st.sampled_from(["a", "b", "choices"]), st.text(max_size=20), max_size=3),
    min_size=1,
    max_size=8,
)


def _encode(docs: list[dict], eol: bytes, comments: bool) -> tuple[bytes, list[str]]:
    out, datas = b"", []
    for doc in docs:
        data = json.dumps(doc)
        datas.append(data)
        if comments:
            out += b": keep-alive" + eol
        out += b"data: " + data.encode() + eol + eol
    return out, datas


@given(
    docs=payloads,
    eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    comments=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_any_split_yields_the_same_events_and_bytes(docs, eol, comments, cuts):
    stream, datas = _encode(docs, eol, comments)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    splitter = SSESplitter()
    events = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        events.extend(splitter.feed(stream[lo:hi]))
    events.extend(splitter.flush())
    assert b"".join(e.raw for e in events) == stream
    assert [e.data for e in events if e.data is not None] == datas


def test_multiline_data_and_unterminated_tail():
    splitter = SSESplitter()
    events = list(splitter.feed(b"data: a\ndata: b\n\ndata: tail"))
    assert [e.data for e in events] == ["a\nb"]
    assert [e.data for e in splitter.flush()] == ["tail"]


def _chunk(content: str | None = None, usage: dict | None = None, choices: bool = True) -> bytes:
    doc: dict = {"object": "chat.completion.chunk"}
    doc["choices"] = [{"index": 0, "delta": {"content": content}}] if choices else []
    if usage is not None:
        doc["usage"] = usage
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_relay_strips_the_usage_chunk_it_asked_for_and_never_sends_empty_pieces():
    tally = StreamTally()
    relay = _Relay(tally, strip_usage=True, decoder=None)
    out = relay(_chunk("hé") + _chunk(None, USAGE, choices=False))
    out += relay(b"data: [DONE]\n\n")
    out += relay(_chunk(None, USAGE, choices=False))  # a piece that is all stripped
    assert b"" not in out  # an empty piece would end a chunked body early
    assert b"usage" not in b"".join(out)
    assert tally.usage == USAGE and tally.saw_done
    assert tally.generated_bytes == len("hé".encode())
    assert relay(b"") == [] and tally.complete


def test_relay_removes_usage_from_a_chunk_that_still_carries_choices():
    tally = StreamTally()
    relay = _Relay(tally, strip_usage=True, decoder=None)
    out = b"".join(relay(_chunk("x", USAGE)))
    doc = json.loads(out[len(b"data: ") :])
    assert "usage" not in doc and doc["choices"][0]["delta"]["content"] == "x"
    assert tally.usage == USAGE


def test_relay_keeps_usage_when_the_client_asked_and_passes_bytes_through():
    tally = StreamTally()
    relay = _Relay(tally, strip_usage=False, decoder=None)
    data = _chunk("a") + b": comment\n\n" + _chunk(None, USAGE, choices=False)
    assert relay(data) == [data]  # one read, one piece: mitmproxy writes each piece apart
    assert tally.usage == USAGE


def test_relay_counts_reasoning_and_tool_arguments():
    tally = StreamTally()
    relay = _Relay(tally, strip_usage=True, decoder=None)
    delta = {
        "reasoning_content": "abc",
        "tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"x":1}'}}],
    }
    relay(b"data: " + json.dumps({"choices": [{"delta": delta}]}).encode() + b"\n\n")
    assert tally.generated_bytes == 3 + 1 + len('{"x":1}')


def test_relay_decodes_gzip_incrementally():
    import gzip

    from teegate.addons.streaming import _Decoder

    plain = _chunk("zipped") + b"data: [DONE]\n\n"
    packed = gzip.compress(plain)
    tally = StreamTally()
    relay = _Relay(tally, strip_usage=True, decoder=_Decoder("gzip"))
    out = b"".join(relay(packed[:7]) + relay(packed[7:]) + relay(b""))
    assert out == plain and tally.saw_done


def _chat_stream(texts: list[str], model: str = "m") -> list[bytes]:
    """One event per element, as vLLM writes them: content chunks, usage, [DONE]."""
    head = {"id": "c1", "object": "chat.completion.chunk", "model": model}
    events = [
        {**head, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}
        for t in texts
    ]
    events.append({**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    out = [b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n" for e in events]
    return [*out, b"data: [DONE]\n\n"]


def _relayed(pieces: list[bytes], strip_usage: bool) -> tuple:
    tally = StreamTally()
    relay = _Relay(tally, strip_usage=strip_usage, decoder=None, model="m")
    sent = b"".join(b"".join(relay(p)) for p in [*pieces, b""])
    return (
        sent,
        tally.usage,
        tally.generated_bytes,
        tally.events,
        tally.saw_done,
        tally.completion_id,
        tally.received.hexdigest(),
        tally.relayed.hexdigest(),
        tally.model_mismatch,
    )


@given(
    texts=st.lists(st.text(max_size=12), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    strip_usage=st.booleans(),
)
def test_relay_reads_one_event_per_read_as_it_reads_any_split(texts, cuts, strip_usage):
    """A read of exactly one event takes the fast path (no splitter): the same answer, tally
    and hashes as the same bytes cut anywhere."""
    events = _chat_stream(texts)
    stream = b"".join(events)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    cut = [stream[lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False)]
    fast = _relayed(events, strip_usage)
    assert fast == _relayed(cut, strip_usage)
    assert fast[1] == {"prompt_tokens": 3, "completion_tokens": 4} and fast[4] is True
    assert fast[2] == sum(len(t.encode()) for t in texts)


def test_the_fast_path_still_checks_the_first_events_model():
    tally = StreamTally()
    relay = _Relay(tally, strip_usage=True, decoder=None, model="m")
    [sent] = relay(_chat_stream(["hi"], model="other")[0])
    assert b"upstream_model_mismatch" in sent and tally.model_mismatch
    assert relay(_chat_stream(["more"])[0]) == []  # nothing after the error event


def test_lone_data_takes_only_one_whole_lf_data_line_with_nothing_buffered():
    splitter = SSESplitter()
    assert splitter.lone_data(b'data: {"a":1}\n\n') == b'{"a":1}'
    for other in (
        b'data: {"a":1}\r\n\r\n',  # CRLF
        b"data: a\n\ndata: b\n\n",  # two events
        b"data: a\ndata: b\n\n",  # two data lines
        b": keep-alive\n\n",  # a comment
        b"data:a\n\n",  # no space: the splitter's job
        b"data: a\n",  # unterminated
    ):
        assert splitter.lone_data(other) is None, other
    splitter.feed(b"data: par")  # something buffered: the next piece continues it
    assert splitter.lone_data(b'data: {"a":1}\n\n') is None
