"""Bounded resources: body size before buffering, bounded inflation, JSON depth, odd input.

One gateway (request bodies limited to 2 MiB, to keep the big sends short) in front of the
sandbox, per module. Every refusal is an OpenAI envelope with a 4xx status, never a 500, and
the gateway serves the next request.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.rawhttp import chunked, exchange, request_head
from tests.support.clients import chat_count
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.metrics import counted
from tests.support.sandbox_proc import SandboxProc, start_sandbox
from tests.support.testdata import TEE, TEST_MODELS
from tests.support.wait import until

LIMIT = 2 << 20  # deflate inflates at most ~1032x: a body under it can still make 2 GiB
MIB = 1 << 20


@pytest.fixture(scope="module")
def upstream() -> Iterator[SandboxProc]:
    # Enough answer pieces for a response larger than a request may be (max_tokens cuts it).
    with start_sandbox("--models", str(TEST_MODELS), "--chunks", "30000") as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc) -> Iterator[GatewayProc]:
    extra = f"limits.max_body_bytes = {LIMIT}\nlimits.max_json_depth = 64"
    with start_gateway(upstream.base_url, extra_toml=extra) as gw:
        yield gw


def _port(gw: GatewayProc) -> int:
    return int(gw.base_url.rsplit(":", 1)[1])


def _chat_body(content: str = "hi", **extra) -> bytes:
    doc = {"model": TEE, "messages": [{"role": "user", "content": content}], **extra}
    return json.dumps(doc).encode()


def _post(gw: GatewayProc, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    hdrs = {"authorization": f"Bearer {gw.api_key}", "content-type": "application/json"}
    return httpx.post(
        f"{gw.api_base}/chat/completions", content=body, headers={**hdrs, **(headers or {})}
    )


def _error(resp: httpx.Response | bytes) -> dict:
    body = resp.content if isinstance(resp, httpx.Response) else resp
    return json.loads(body)["error"]


def _still_serves(gw: GatewayProc) -> None:
    assert _post(gw, _chat_body()).status_code == 200


def _head(gw: GatewayProc, headers: dict[str, str]) -> bytes:
    auth = {"Authorization": f"Bearer {gw.api_key}", "Content-Type": "application/json"}
    return request_head("POST", "/v1/chat/completions", {**auth, **headers})


def _zeros(total: int, piece: int = 4 * MIB) -> Iterator[bytes]:
    block = bytes(piece)
    for _ in range(total // piece):
        yield block


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """A valid gzip body under the limit as sent, 2 GiB inflated.

    One deflate block of zeros, compressed from an empty history and byte-aligned by a full
    flush, decodes the same wherever it stands: repeated, it makes a bomb in a second.
    """
    piece = bytes(16 * MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = c.compress(piece) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush()
    n = 2048 * MIB // len(piece)
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(piece, crc)
    size = (n * len(piece)) & 0xFFFFFFFF
    out = (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
        + block * n
        + end
        + struct.pack("<II", crc, size)
    )
    assert len(out) < LIMIT
    return out


# -- size -------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_refused_at_the_headers(gateway, upstream):
    served = chat_count(upstream)
    ex = exchange(_port(gateway), _head(gateway, {"Content-Length": str(LIMIT + 1)}))
    assert ex.status == 413 and ex.sent == 0  # answered before a body byte was sent
    assert _error(ex.body)["code"] == "request_too_large"
    assert chat_count(upstream) == served
    _still_serves(gateway)


def test_chunked_body_is_cut_off_once_past_the_limit(gateway, upstream):
    served = chat_count(upstream)
    head = _head(gateway, {"Transfer-Encoding": "chunked"})
    ex = exchange(_port(gateway), head, chunked(_zeros(64 * MIB, 64 * 1024)))
    assert ex.status == 413
    assert _error(ex.body)["code"] == "request_too_large"
    # It stopped reading soon after the limit (allowing for socket buffers), not at the end.
    assert ex.sent < 16 * LIMIT
    assert chat_count(upstream) == served
    _still_serves(gateway)


def test_a_body_at_the_limit_is_served(gateway):
    body = _chat_body(user="")  # padded in a field that is not counted as prompt tokens
    body = _chat_body(user="x" * (LIMIT - len(body) - 8))
    assert LIMIT - 16 < len(body) <= LIMIT
    resp = _post(gateway, body)
    assert resp.status_code == 200, resp.text


def test_a_large_buffered_response_is_not_limited(upstream):
    """Only requests are limited: a non-streamed answer many times the limit passes whole."""
    small = 64 * 1024
    with start_gateway(upstream.base_url, extra_toml=f"limits.max_body_bytes = {small}") as gw:
        resp = _post(gw, _chat_body(max_tokens=30_000))  # the sandbox: one piece per token
        assert resp.status_code == 200, resp.text
        assert len(resp.content) > 2 * small
        assert resp.json()["choices"][0]["message"]["content"].endswith("#29999.")


# -- content encoding -------------------------------------------------------------------


def test_compressed_bodies_are_inflated(gateway):
    body = _chat_body()
    assert _post(gateway, gzip.compress(body), {"content-encoding": "gzip"}).status_code == 200
    assert _post(gateway, zlib.compress(body), {"content-encoding": "deflate"}).status_code == 200


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip"])
def test_inflation_stops_at_the_limit(gateway, upstream, encoding, gzip_bomb):
    served = chat_count(upstream)
    resp = _post(gateway, gzip_bomb, {"content-encoding": encoding})
    assert resp.status_code == 413
    assert _error(resp)["code"] == "request_too_large"
    assert chat_count(upstream) == served


@pytest.mark.parametrize(
    ("encoding", "data", "status", "code"),
    [
        ("gzip", gzip.compress(_chat_body(), mtime=0)[:-12], 400, "invalid_body"),  # cut short
        ("gzip", b"not gzip at all", 400, "invalid_body"),
        ("gzip", gzip.compress(_chat_body(), mtime=0) * 2, 400, "invalid_body"),  # a second member
        ("deflate", b"\x78\x9c garbage", 400, "invalid_body"),
        ("br", b"\x0b\x02\x80{}\x03", 415, "unsupported_content_encoding"),
        ("zstd", b"(\xb5/\xfd", 415, "unsupported_content_encoding"),
        ("gzip, gzip", b"{}", 415, "unsupported_content_encoding"),
    ],
)
def test_bad_or_unknown_encodings_are_refused(gateway, upstream, encoding, data, status, code):
    served = chat_count(upstream)
    resp = _post(gateway, data, {"content-encoding": encoding})
    assert resp.status_code == status
    err = _error(resp)
    assert err["code"] == code and err["param"] == "content-encoding"
    assert chat_count(upstream) == served


# -- JSON -------------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    """A chat body nesting ``depth`` levels below its top object (in an allow-listed field)."""
    body = _chat_body()
    inner = b"[" * (depth - 1) + b"]" * (depth - 1)
    return body[:-1] + b', "chat_template_kwargs": {"x": ' + inner + b"}}"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_nested(64), None),  # 65 levels with the top object
        (_nested(100_000), None),  # json.loads alone would raise RecursionError here
        (_chat_body("\ud800"), "messages[0].content"),  # lone surrogate, escaped by json.dumps
        (b'{"model": "m", "\\udc00": 1}', None),
        (_chat_body(temperature=1e999), None),  # json.dumps writes Infinity
        (_chat_body()[:-1] + b', "seed": 1e999}', None),
        (_chat_body()[:-1] + b', "seed": ' + b"9" * 5000 + b"}", None),
        (_chat_body()[:-1] + b', "seed": 9223372036854775808}', None),
        (_chat_body()[:-1] + b', "max_tokens": -' + b"1" * 30 + b"}", None),
        (_chat_body()[:-1] + b', "temperature": NaN}', None),
        # a repeated key is refused naming it, and this one is a lone surrogate (not UTF-8)
        (_chat_body()[:-1] + b', "\\ud83d": 1, "\\ud83d": 2}', "\ud83d"),
    ],
    ids=[
        "depth-65",
        "depth-100000",
        "lone-surrogate",
        "surrogate-key",
        "infinity",
        "1e999",
        "5000-digits",
        "int64-overflow",
        "huge-negative",
        "nan",
        "repeated-surrogate-key",
    ],
)
def test_odd_json_is_a_400(gateway, upstream, body, param):
    served = chat_count(upstream)
    resp = _post(gateway, body)
    assert resp.status_code == 400, resp.text
    err = _error(resp)
    assert err["param"] == param
    assert chat_count(upstream) == served
    _still_serves(gateway)


def test_nesting_within_the_limit_is_served(gateway):
    resp = _post(gateway, _nested(60))
    assert resp.status_code == 200, resp.text


def test_surrogate_pairs_are_valid_unicode(gateway):
    assert _post(gateway, _chat_body("\U0001f600")).status_code == 200


# -- framing ----------------------------------------------------------------------------


def test_trailers_are_a_400_not_a_crash(gateway, upstream):
    served = chat_count(upstream)
    head = _head(gateway, {"Transfer-Encoding": "chunked", "Trailer": "X-Checksum"})
    ex = exchange(_port(gateway), head, chunked([_chat_body()], b"X-Checksum: abc\r\n"))
    assert ex.status == 400
    err = _error(ex.body)
    assert err["code"] == "unsupported_trailers" and err["param"] == "trailers"
    assert chat_count(upstream) == served
    # Without trailers, the same chunked request is served.
    ok = exchange(
        _port(gateway), _head(gateway, {"Transfer-Encoding": "chunked"}), chunked([_chat_body()])
    )
    assert ok.status == 200
    assert "crashed" not in gateway.log_text()


PAGE_REFUSALS = {  # mitmproxy's route for each: HttpStream.check_body_size, Http1Server
    # .read_headers (before a flow exists), HttpStream.check_invalid (smuggling check)
    "body-size": ({"Content-Length": str(LIMIT + 1)}, 413, "request_too_large"),
    "framing": ({"Content-Length": "5", "Transfer-Encoding": "chunked"}, 400, "invalid_request"),
    "field-name": ({"Bad@Name": "1", "Content-Length": "0"}, 400, "invalid_request"),
}


@pytest.mark.parametrize("name", PAGE_REFUSALS)
def test_mitmproxys_own_refusal_pages_are_logged_and_counted_as_sent(gateway, name):
    """mitmproxy answers these itself (its page, made JSON) on routes no addon refuses on: the
    access log and ``teegate_requests_total`` still say what the client got."""
    headers, status, code = PAGE_REFUSALS[name]
    path = f"/v1/refused-{name}"  # the line's only handle: no addon ran to give it an id
    labels = dict(route="other", status=str(status), code=code, decision="refused")
    before = counted(gateway, "teegate_requests_total", **labels)
    ex = exchange(_port(gateway), request_head("POST", path, headers))
    assert ex.status == status and _error(ex.body)["code"] == code

    def line() -> list[dict]:
        lines = (json.loads(x) for x in gateway.log_text().splitlines() if path in x)
        return [e for e in lines if e.get("event") == "request"]

    [logged] = until(line, f"the access line of {path}")
    assert (logged["status"], logged["error_code"], logged["decision"]) == (status, code, "refused")
    until(lambda: counted(gateway, "teegate_requests_total", **labels) == before + 1, "counted")


# -- memory -----------------------------------------------------------------------------


def test_peak_memory_stays_bounded(gateway, gzip_bomb):
    """The gateway's peak RSS grows by a small multiple of the limit, whatever is sent."""
    pid = gateway.process.pid
    _still_serves(gateway)
    before = _vm_hwm_kib(pid)
    port = _port(gateway)
    big = 200 * MIB
    ex = exchange(port, _head(gateway, {"Content-Length": str(big)}), _zeros(big))
    assert ex.status == 413
    ex = exchange(
        port, _head(gateway, {"Transfer-Encoding": "chunked"}), chunked(_zeros(big, 256 * 1024))
    )
    assert ex.status == 413
    for _ in range(2):
        assert _post(gateway, gzip_bomb, {"content-encoding": "gzip"}).status_code == 413
    _still_serves(gateway)
    growth = (_vm_hwm_kib(pid) - before) * 1024
    # mitmproxy itself holds a buffered body twice (its buffer, then the body's bytes): ~4x
    # the limit was measured; before the limits it was 200 MiB and more.
    assert growth < 6 * LIMIT, f"peak RSS grew by {growth / MIB:.1f} MiB"


# -- listeners --------------------------------------------------------------------------


def _udp_ports(pid: int) -> set[int]:
    ports = set()
    for table in ("udp", "udp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            ports.add(int(row.split()[1].rsplit(":", 1)[1], 16))
    return ports


def test_an_https_upstream_opens_no_udp_listener(tmp_path):
    """mitmproxy's reverse mode to https:// would also serve HTTP/3 on UDP: not here."""
    tls = ("--tls-dir", str(tmp_path / "tls"))
    with start_sandbox("--models", str(TEST_MODELS), *tls) as up:
        assert up.base_url.startswith("https://")
        extra = f'upstream.ca_file = "{up.ca_file}"'
        with start_gateway(up.base_url, extra_toml=extra) as gw:
            assert _post(gw, _chat_body()).status_code == 200  # served over the TLS upstream
            port = _port(gw)
            assert port not in _udp_ports(gw.process.pid)
            # The check itself sees a UDP socket on that port when there is one.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind(("127.0.0.1", port))  # free for UDP: nothing of the gateway holds it
                assert port in _udp_ports(gw.process.pid)


# -- header fields --------------------------------------------------------------------


def test_a_header_section_past_64_kib_is_a_431_before_it_ends(gateway, upstream):
    """The head never ends (no blank line): refused once past the bound, not buffered on."""
    served = chat_count(upstream)
    start = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {gateway.api_key}\r\n"
    )
    filler = [b"X-Filler: " + b"a" * 1000 + b"\r\n"] * 200  # ~200 KB, no terminating blank line
    code = "request_header_fields_too_large"
    labels = dict(route="other", status="431", code=code, decision="refused")
    before = counted(gateway, "teegate_requests_total", **labels)
    logged_before = len(_head_refusals(gateway))
    ex = exchange(_port(gateway), start.encode(), filler)
    assert ex.status == 431
    assert _error(ex.body)["code"] == code
    assert chat_count(upstream) == served
    _still_serves(gateway)
    # No flow was ever made of it, and still the access log and the metrics record it.
    until(lambda: counted(gateway, "teegate_requests_total", **labels) == before + 1, "counted")
    newest = until(lambda: _head_refusals(gateway)[logged_before:], "its access line")[-1]
    assert newest["mode"] == "reverse" and newest["request_id"] is None
    assert "a" * 100 not in gateway.log_text()  # none of the head's bytes


def _head_refusals(gateway: GatewayProc) -> list[dict]:
    lines = (json.loads(x) for x in gateway.log_text().splitlines() if "431" in x)
    return [e for e in lines if e.get("event") == "request" and e.get("status") == 431]


def test_a_head_just_under_the_bound_is_served(gateway):
    # 60 fields of 1000 bytes: ~60 KB of header section, under 64 KiB and 100 fields.
    resp = _post(gateway, _chat_body(), {f"x-filler-{i}": "a" * 1000 for i in range(60)})
    assert resp.status_code == 200


def test_more_than_100_header_fields_is_a_431(gateway, upstream):
    served = chat_count(upstream)
    resp = _post(gateway, _chat_body(), {f"x-h-{i}": "1" for i in range(101)})
    assert resp.status_code == 431
    assert _error(resp)["code"] == "request_header_fields_too_large"
    assert chat_count(upstream) == served


@pytest.mark.parametrize(
    ("raw_field", "param"),
    [
        (b"X-Odd: a\x00b", "X-Odd"),  # NUL in a value
        (b"X-Odd: a\x01b", "X-Odd"),  # another control byte
        (b"X-Odd: first\r\n  folded", "X-Odd"),  # obsolete line folding
    ],
)
def test_control_bytes_and_folded_fields_are_a_400(gateway, upstream, raw_field, param):
    served = chat_count(upstream)
    body = _chat_body()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {gateway.api_key}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n".encode()
        + raw_field
        + b"\r\n\r\n"
    )
    ex = exchange(_port(gateway), head, [body])
    assert ex.status == 400
    err = _error(ex.body)
    assert err["code"] == "invalid_header" and err["param"] == param
    assert chat_count(upstream) == served


@pytest.mark.parametrize(
    ("coding", "code"),
    [
        ("gzip, chunked", "unsupported_transfer_encoding"),
        # mitmproxy's own parser refuses these two before any hook runs:
        ("identity, chunked", "invalid_request"),
        ("chunked, chunked", "invalid_request"),
    ],
)
def test_transfer_codings_other_than_chunked_are_a_400(gateway, upstream, coding, code):
    served = chat_count(upstream)
    body = _chat_body()
    payload = gzip.compress(body) if coding.startswith("gzip") else body
    ex = exchange(_port(gateway), _head(gateway, {"Transfer-Encoding": coding}), chunked([payload]))
    assert ex.status == 400
    assert _error(ex.body)["code"] == code
    assert chat_count(upstream) == served
