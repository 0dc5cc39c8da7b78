"""Generated attacks through a real gateway, against a recording upstream (hypothesis).

Bodies, headers, paths and byte-level framings are generated and thrown at the reverse
listener with a funded key. Each kind of attack has two tests, so one failure cannot hide the
other: (1) no 500 (5xx only for the documented upstream conditions) and OpenAI's error
envelope on every failure; (2) what the recording upstream received while that one example
ran is allow-listed (checks.py), and a chat completion answered 200 did reach it. The last two
tests re-check the upstream's whole record, and grep everything the gateway wrote for the
marker and the client's key. The runs are derandomized and keep no example database, so CI
sees the same examples every time; about 30 s against a gateway that passes them.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import string
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given, reject, settings
from hypothesis import strategies as st

from tests.hostile.checks import (
    ALLOW,
    DOCUMENTED_5XX,
    MARKER,
    ROUTING_FIELDS,
    assert_envelope,
    assert_output_clean,
    assert_upstream_clean,
)
from tests.support.gateway_proc import GatewayProc
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import TEE

CI = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # Shrinking a failure against real processes can take minutes; the failing example is
    # reported as generated (derandomized, so it is reproducible).
    phases=(Phase.explicit, Phase.generate),
    max_examples=150,
)
CI_HEADERS = settings(CI, max_examples=100)
CI_FRAMING = settings(CI, max_examples=80)

# -- JSON bodies ------------------------------------------------------------------------------


class Raw(str):
    """JSON text to splice in as it is (odd numbers, deep nesting)."""


def encode(value: Any) -> str:
    """JSON text for ``value``; objects are lists of pairs so keys may repeat."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ",".join(f"{encode(k)}:{encode(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value)  # ensure_ascii: a lone surrogate becomes a \ud800 escape


class Obj:
    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs


ODD_NUMBERS = [
    "1e999", "-1e999", "-0", "-0.0", "0e0", "1E+2", "1e-400", "0.1e-999999",
    "9" * 10_000, "-" + "9" * 5_000, "123456789012345678901234567890",
    "1.00000000000000000000000000001", "2e308", "4.9e-324", "-9223372036854775809",
]  # fmt: skip
SURROGATES = ["\ud800", "\udfff", "a\udc00b", "\ud83d", f"{MARKER}\ud800"]

texts = st.text(max_size=24) | st.sampled_from([MARKER, f"x{MARKER}x", *SURROGATES, ""])
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
    | st.sampled_from(ODD_NUMBERS).map(Raw)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.lists(st.tuples(texts, inner), max_size=4).map(Obj)
    ),
    max_leaves=12,
) | st.integers(min_value=50, max_value=50_000).map(lambda d: Raw("[" * d + "]" * d))

field_names = (
    st.sampled_from(sorted(ALLOW))
    | st.sampled_from(ROUTING_FIELDS)
    | st.text(min_size=1, max_size=16)
    | st.sampled_from([MARKER, f"{MARKER}_field", "model\u0000", "Model", "messages "])
)

messages = st.one_of(
    st.just([{"role": "user", "content": f"hello {MARKER}"}]),
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "tool", MARKER]),
                "content": texts | st.just([{"type": "text", "text": MARKER}]),
            },
            optional={"name": texts, "extra": values},
        ).map(lambda d: Obj(list(d.items()))),
        max_size=3,
    ),
    values,
)
models = st.sampled_from([TEE, TEE, TEE, "deepseek-ai/DeepSeek-V3", MARKER, "", f"{TEE}\ud800"])


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["chat", "chat", "chat", "object", "any", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64)) + MARKER.encode()
    if kind == "any":
        return encode(draw(values)).encode("utf-8", "surrogatepass")
    pairs: list[tuple[str, Any]] = []
    if kind == "chat":
        pairs += [("model", draw(models)), ("messages", draw(messages))]
    pairs += draw(st.lists(st.tuples(field_names, values), max_size=4))
    pairs = draw(st.permutations(pairs))
    return encode(Obj(pairs)).encode("utf-8", "surrogatepass")


simple_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), texts, st.lists(texts, max_size=2)
)


@st.composite
def smuggling_bodies(draw: st.DrawFn) -> bytes:
    """A valid chat completion plus fields that try to ride along: these do reach the upstream
    unless the gateway refuses them, so this is where the allow-list is proven."""
    pairs: list[tuple[str, Any]] = [
        ("model", TEE),
        ("messages", [{"role": "user", "content": f"hi {MARKER}"}]),
    ]
    extra = st.tuples(field_names, simple_values | values)
    pairs += draw(st.lists(extra, min_size=1, max_size=3))
    return encode(Obj(draw(st.permutations(pairs)))).encode("utf-8", "surrogatepass")


PLAIN_CHAT = json.dumps({"model": TEE, "messages": [{"role": "user", "content": MARKER}]}).encode()


def send_and_check_upstream(
    upstream: SandboxProc, client_key: str, send: Callable[[], int | None]
) -> None:
    """Run ``send``, which returns the status of a chat completion (None: not a chat request,
    or no answer); then check what reached the upstream meanwhile. A chat completion answered
    200 must have come from the upstream, so a passing example is never a vacuous one."""
    since = upstream.requests_seen()
    status = send()
    assert_upstream_clean(upstream, client_key, since, min_chats=1 if status == 200 else 0)


@pytest.fixture(scope="module")
def client_key(gateway: GatewayProc) -> str:
    assert gateway.api_key is not None
    return gateway.api_key


@CI
@given(body=bodies())
def test_generated_bodies_get_an_error_envelope_never_a_500(
    http: httpx.Client, body: bytes
) -> None:
    response = http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert_envelope(response)


@CI
@example(body=PLAIN_CHAT)
@given(body=smuggling_bodies() | bodies())
def test_generated_bodies_reach_the_upstream_only_allow_listed(
    http: httpx.Client, upstream: SandboxProc, client_key: str, body: bytes
) -> None:
    def send() -> int:
        return http.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        ).status_code

    send_and_check_upstream(upstream, client_key, send)


# -- headers, methods and paths ----------------------------------------------------------------

TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=40,
).map(str.strip) | st.sampled_from([MARKER, f"Bearer {MARKER}", "", "gzip", "127.0.0.1"])


@st.composite
def header_lists(draw: st.DrawFn, client_key: str) -> list[tuple[str, str]]:
    named = {
        "x-forwarded-host": st.sampled_from(["evil.example", MARKER, "127.0.0.1:1"]),
        "host": st.sampled_from(["evil.example", "api.openai.com", f"{MARKER}.example"]),
        "x-api-key": st.sampled_from([client_key, MARKER]),
        "openai-organization": st.just(f"org-{MARKER}"),
        "openai-project": st.just(f"proj-{MARKER}"),
        "authorization": st.sampled_from([f"Bearer {client_key}", f"Basic {MARKER}", ""]),
        "proxy-authorization": st.just(f"Basic {MARKER}"),
        "content-encoding": st.sampled_from(
            ["gzip", "br", "deflate", "identity", "gzip, gzip", "x-unknown", "zstd", " GZIP "]
        ),
        "content-type": st.sampled_from(
            ["application/json", "text/plain", "application/json; charset=utf-16", MARKER]
        ),
        "x-forwarded-for": st.just("10.0.0.1"),
        "forwarded": st.just(f"for=1.2.3.4;host={MARKER}"),
        "x-teegate-account": st.just(MARKER),
        "connection": st.sampled_from(["close", "keep-alive", f"{MARKER}, te"]),
        "te": st.just("trailers"),
        "expect": st.just("100-continue"),
        "x-request-id": st.just(MARKER),
        "user-agent": st.just(MARKER),
    }
    out: list[tuple[str, str]] = []
    for name in draw(st.lists(st.sampled_from(sorted(named)), max_size=5, unique=True)):
        out.append((draw(st.sampled_from([name, name.upper(), name.title()])), draw(named[name])))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.text(alphabet=TOKEN, min_size=1, max_size=20) | st.just(f"x-{MARKER}"))
        out.append((name, draw(header_values)))
    return out


path_parts = st.sampled_from(
    [
        "chat/completions", "chat/completions/", "chat//completions", "chat/completions/..",
        "chat/%63ompletions", "chat%2Fcompletions", "models", "models/x", f"models/{TEE}",
        "embeddings", "../v1/chat/completions", "%2e%2e/chat/completions", "completions",
        "attestation/report", "files", "chat/completions;x=1", "chat/completions%00",
    ]
)  # fmt: skip
queries = st.sampled_from(
    ["", "?", f"?model={MARKER}", "?api_key=x&model=other", "?a=%ZZ", "?&&", "?stream=true"]
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]).flatmap(
    lambda m: st.sampled_from([m, m.lower(), m.capitalize()])
)


@pytest.fixture(scope="module")
def bare_http(gateway: GatewayProc) -> Iterator[httpx.Client]:
    """No default credentials: every header of these requests is generated. Shared, because
    building an httpx client costs ~80 ms; a connection the gateway closes is replaced."""
    with httpx.Client(base_url=gateway.base_url, timeout=30) as c:
        yield c


def header_attack(
    bare_http: httpx.Client, client_key: str, data: st.DataObject
) -> httpx.Response | None:
    """One generated request (None: the gateway closed the connection, which is allowed)."""
    # Half of them a POST to the chat path: those are the ones that can reach the upstream.
    method = data.draw(st.just("POST") | methods, label="method")
    path = data.draw(st.just("chat/completions") | path_parts, label="path")
    target = "/v1/" + path + data.draw(queries, label="query")
    headers = [("authorization", f"Bearer {client_key}")]
    headers += data.draw(header_lists(client_key), label="headers")
    body = PLAIN_CHAT
    if any(n.lower() == "content-encoding" and v.strip().lower() == "gzip" for n, v in headers):
        body = data.draw(st.sampled_from([gzip.compress(body), body]), label="gzipped")
    encoded = [(n, v.encode("latin-1")) for n, v in headers]
    try:
        return bare_http.request(method, target, content=body, headers=encoded)
    except httpx.LocalProtocolError:
        reject()  # httpx itself will not send it (say, a generated second Host header)
    except httpx.RemoteProtocolError:
        return None


@CI_HEADERS
@given(data=st.data())
def test_generated_headers_paths_and_methods_never_get_a_500(
    bare_http: httpx.Client, client_key: str, data: st.DataObject
) -> None:
    response = header_attack(bare_http, client_key, data)
    if response is not None:
        assert_envelope(response, head=response.request.method.upper() == "HEAD")


@CI_HEADERS
@given(data=st.data())
def test_generated_headers_paths_and_methods_reach_the_upstream_only_allow_listed(
    bare_http: httpx.Client, client_key: str, upstream: SandboxProc, data: st.DataObject
) -> None:
    def send() -> int | None:
        response = header_attack(bare_http, client_key, data)
        if response is None:
            return None
        # Only a chat completion must have reached the upstream when it succeeds (the
        # gateway answers /v1/models itself); other 200s are passed on as "not chat".
        request = response.request
        is_chat = request.method == "POST" and request.url.raw_path.startswith(b"/v1/chat/")
        return response.status_code if is_chat else None

    send_and_check_upstream(upstream, client_key, send)


# -- framings over raw sockets -----------------------------------------------------------------

FRAMING_ANSWERS = frozenset({400, 411, 413, 431})
SOCKET_TIMEOUT_S = 5.0  # a hang costs this much, once per example
STATUS_LINE = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def framing(kind: str, body: bytes, key: str, n: int) -> bytes:
    """The bytes of one attack ``kind`` (``n`` varies its sizes)."""
    size = len(body)
    cl = f"Content-Length: {size}\r\n"
    te = "Transfer-Encoding: chunked\r\n"
    chunked = _chunk(body) + b"0\r\n\r\n"
    tail = b"\r\n0\r\n\r\n"
    many = "".join(f"X-H{i}: {MARKER}\r\n" for i in range(10_000 + n))
    cases: dict[str, tuple[str, bytes]] = {
        "ok": (cl, body),
        "cl_short": (f"Content-Length: {max(size - n, 0)}\r\n", body),
        "cl_long": (f"Content-Length: {size + n}\r\n", body),
        "cl_dup_same": (cl + cl, body),
        "cl_dup_diff": (cl + f"Content-Length: {size + n}\r\n", body),
        "cl_list": (f"Content-Length: {size}, {size}\r\n", body),
        "cl_odd": (f"Content-Length: {['+', '-', '0x', '1 '][n % 4]}{size}\r\n", body),
        "cl_huge": ("Content-Length: 99999999999999999999999\r\n", body),
        "te_and_cl": (te + cl, chunked),
        "chunk_size_bad": (te, b"zz\r\n" + body + tail),
        "chunk_size_neg": (te, b"-1\r\n" + body + tail),
        "chunk_size_huge": (te, b"f" * (8 + n % 16) + b"\r\n" + body + tail),
        "chunk_size_short": (te, f"{max(size - n, 1):x}\r\n".encode() + body + tail),
        "chunk_ext": (te, f'{size:x};{MARKER}="x"\r\n'.encode() + body + tail),
        "chunk_trailer": (te, _chunk(body) + f"0\r\nX-T: {MARKER}\r\n\r\n".encode()),
        "te_gzip_chunked": ("Transfer-Encoding: gzip, chunked\r\n", chunked),
        "te_identity": ("Transfer-Encoding: identity\r\n" + cl, body),
        "te_dup": (te + te, chunked),
        "te_case": ("Transfer-Encoding: Chunked\r\n", chunked),
        "te_unknown": ("Transfer-Encoding: xchunked\r\n", chunked),
        "http10": (cl, body),
        "http10_chunked": (te, chunked),
        "many_headers": (many + cl, body),
        "long_header": (f"X-Long: {MARKER * (8000 + n)}\r\n" + cl, body),
        "bare_lf": (cl, body),
        "obs_fold": (f"X-Fold: a\r\n {MARKER}\r\n" + cl, body),
        "space_colon": (f"Content-Length : {size}\r\n", body),
        "nul_header": (f"X-Nul: a\x00{MARKER}\r\n" + cl, body),
        "no_length": ("", body),
        "method_lower": (cl, body),
        "method_mixed": (cl, body),
        "absolute_form": (cl, body),
    }
    extra, payload = cases[kind]
    version = "HTTP/1.0" if kind.startswith("http10") else "HTTP/1.1"
    # httpx upper-cases every method and never sends an absolute-form target: only here.
    method = {"method_lower": "post", "method_mixed": "pOsT"}.get(kind, "POST")
    target = "/v1/chat/completions"
    if kind == "absolute_form":
        target = f"http://{MARKER.lower()}.example:8443{target}"
    head = f"{method} {target} {version}\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
    data = (head + "Content-Type: application/json\r\n" + extra + "\r\n").encode("latin-1")
    data += payload
    return data.replace(b"\r\n", b"\n") if kind == "bare_lf" else data


# Well-formed, or malformed in a way RFC 9112 lets a recipient read leniently (same-valued
# Content-Length repeated or listed, a bare LF line end): any answer but a 5xx will do.
# Methods are case-sensitive and an absolute-form target is legal HTTP/1.1: these are well
# framed, and the upstream checks decide whether the gateway let something odd through.
VALID = frozenset(
    {"ok", "te_case", "chunk_ext", "http10", "method_lower", "method_mixed", "absolute_form"}
)
LENIENT = frozenset({"cl_dup_same", "cl_list", "bare_lf"})
FRAMING_KINDS = sorted({
    *VALID, *LENIENT, "cl_short", "cl_long", "cl_dup_diff", "cl_odd", "cl_huge", "te_and_cl",
    "chunk_size_bad", "chunk_size_neg", "chunk_size_huge", "chunk_size_short", "chunk_trailer",
    "te_gzip_chunked", "te_identity", "te_dup", "te_unknown", "http10_chunked", "many_headers",
    "long_header", "obs_fold", "space_colon", "nul_header", "no_length",
})  # fmt: skip


# Kinds that announce more body than they send: the gateway rightly waits for the rest, so
# the client half-closes at once, and closing the connection is then the expected answer.
STALLS = frozenset({"cl_long", "cl_huge", "chunk_size_huge"})


def _first_response_end(buf: bytes) -> int | None:
    """Where the first complete response in ``buf`` ends (None: not complete yet)."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buf[:head_end].decode("latin-1").lower()
    start = head_end + 4
    if match := re.search(r"\r\ncontent-length:\s*(\d+)", head):
        end = start + int(match.group(1))
        return end if len(buf) >= end else None
    if re.search(r"\r\ntransfer-encoding:\s*chunked", head):
        end = buf.find(b"\r\n0\r\n\r\n", start - 2)
        return end + 7 if end >= 0 else None
    return None  # delimited by the close


def exchange(gw: GatewayProc, data: bytes, half_close: bool) -> tuple[bytes, str]:
    """Send ``data``; read the first response, then half-close and read on until the gateway
    closes. Returns (every byte received, outcome): "answered" (a status line came), "closed"
    (closed with none) or "timeout" (neither, within the bound)."""
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    out = b""
    closed = False
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused mid-send: what it answered (if anything) is still read below
        deadline = time.monotonic() + SOCKET_TIMEOUT_S
        shut = half_close
        while time.monotonic() < deadline:
            if not shut and _first_response_end(out) is not None:
                shut = True
                try:
                    s.shutdown(socket.SHUT_WR)  # leftovers the gateway still holds get EOF
                except OSError:
                    pass
            s.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                piece = s.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            except TimeoutError:
                break
            if not piece:
                closed = True
                break
            out += piece
    if STATUS_LINE.search(out):
        return out, "answered"
    return out, "closed" if closed else "timeout"


FRAMING_BODIES = [
    json.dumps({"model": TEE, "messages": [{"role": "user", "content": MARKER}]}).encode(),
    json.dumps(
        {"model": TEE, "messages": [{"role": "user", "content": "x"}], "route": MARKER}
    ).encode(),
    f'{{"model": "{TEE}", "messages": [{{"role": "user", "content": "{MARKER}"'.encode(),
]


framing_args = {
    "kind": st.sampled_from(FRAMING_KINDS),
    "n": st.integers(1, 40),
    "body": st.sampled_from(FRAMING_BODIES),
}


@CI_FRAMING
@given(**framing_args)
def test_generated_framings_are_refused_or_closed_never_a_500(
    gateway: GatewayProc, http: httpx.Client, client_key: str, kind: str, n: int, body: bytes
) -> None:
    answer, outcome = exchange(gateway, framing(kind, body, client_key, n), kind in STALLS)
    assert outcome != "timeout", f"{kind}: neither answered nor closed"
    statuses = [int(s) for s in STATUS_LINE.findall(answer)]
    for status in statuses:
        assert status < 500 or status in DOCUMENTED_5XX, (kind, answer[:300])
    if kind in VALID:
        assert outcome == "answered", f"{kind}: a well-framed request was not answered"
    elif kind not in LENIENT and statuses:  # else: closed without an answer, allowed
        assert statuses[0] in FRAMING_ANSWERS, (kind, answer[:300])
    assert http.get("/v1/models").status_code == 200  # still serving


@CI_FRAMING
@example(kind="ok", n=1, body=FRAMING_BODIES[0])
@given(**framing_args)
def test_generated_framings_reach_the_upstream_only_allow_listed(
    gateway: GatewayProc, upstream: SandboxProc, client_key: str, kind: str, n: int, body: bytes
) -> None:
    def send() -> int | None:
        answer, _ = exchange(gateway, framing(kind, body, client_key, n), kind in STALLS)
        statuses = STATUS_LINE.findall(answer)
        return int(statuses[0]) if statuses else None

    send_and_check_upstream(upstream, client_key, send)


# -- after everything --------------------------------------------------------------------------


def test_nothing_outside_the_allow_lists_ever_reached_the_upstream(
    gateway: GatewayProc, http: httpx.Client, client_key: str, upstream: SandboxProc
) -> None:
    """The whole record since the upstream started (warm-up, catalog and attestation fetches)."""
    msg = [{"role": "user", "content": MARKER}]
    response = http.post("/v1/chat/completions", json={"model": TEE, "messages": msg})
    assert response.status_code == 200  # non-vacuous even when run alone
    assert_upstream_clean(upstream, client_key, 0, min_chats=1)


def _post(key: str, extra_head: str, body: bytes, target: str = "/v1/chat/completions") -> bytes:
    head = f"POST {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
    return f"{head}Content-Type: application/json\r\n{extra_head}\r\n".encode() + body


def _leak_probes(key: str) -> list[bytes]:
    """Raw requests that put the marker where a careless log line would quote it."""
    body = PLAIN_CHAT
    cl = f"Content-Length: {len(body)}\r\n"
    te = "Transfer-Encoding: chunked\r\n"
    bad_model = json.dumps({"model": MARKER, "messages": [{"role": "user", "content": "x"}]})
    trailer = _chunk(body) + f"0\r\nX-T: {MARKER}\r\n\r\n".encode()
    return [
        # refused for its model, its key, its query, its JSON
        _post(key, f"Content-Length: {len(bad_model)}\r\n", bad_model.encode()),
        _post(f"vgpu_sk_{MARKER}", cl, body),
        _post(key, cl, body, target=f"/v1/chat/completions?k={MARKER}"),
        _post(key, "Content-Length: 30\r\n", f'{{"model": "{MARKER}'.encode()),
        # framing errors whose raw error text would quote the bytes around the marker
        _post(key, te, f"{MARKER}\r\n".encode() + body),
        _post(key, te, trailer),
        _post(key, "Content-Length: 5\r\n", body),
        _post(key, f"X-{MARKER}: {MARKER}\r\nX-Fold: a\r\n {MARKER}\r\n", b""),
        f"GET /v1/models HTTP/1.1\r\nHost: {MARKER}\r\nX-A: {MARKER}\x00\r\n\r\n".encode(),
        f"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-A\r\n{MARKER}\r\n\r\n".encode(),
    ]  # the method and path are logged by design (addons/accesslog.py): no marker there


def test_nothing_the_gateway_wrote_holds_the_marker_or_the_key(
    gateway: GatewayProc, client_key: str, upstream: SandboxProc
) -> None:
    """After every attack above (when run with them), and these probes in any case."""
    for probe in _leak_probes(client_key):
        exchange(gateway, probe, half_close=False)
    assert_output_clean(gateway, upstream.api_key)
