"""No byte a client sent reaches the gateway's output, through any error path.

A random marker goes into bodies, headers, chunk headers and extensions, trailers, broken
gzip, request lines, TLS names, egress targets, past the 128 characters kept of a logged
path, model or host; malformed framing makes mitmproxy's own error texts (which quote raw
bytes) fire. Everything the gateway wrote, structlog on stderr and mitmproxy's termlog on
stdout, is then searched for it. The gateway is started here (not through
tests/support/gateway_proc.py) so that its stdout lands in a file too.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.gateway.rawhttp import DEADLINE_S, chunked, exchange, request_head
from tests.support.accounts import create_account, create_key
from tests.support.gateway_proc import REPO_ROOT, write_config
from tests.support.sandbox_proc import start_sandbox
from tests.support.testdata import TEE, TEST_MODELS
from tests.support.wait import until

MARKER = "MARK" + secrets.token_hex(8)
M = MARKER.encode()
LONG = "a" * 130  # past what is kept of a logged client string
CLOSE = b"Connection: close\r\n\r\n"


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    workdir: Path
    port: int
    egress: tuple[str, int]
    api_key: str

    def output(self) -> str:
        return "".join(
            (self.workdir / name).read_text(encoding="utf-8", errors="replace")
            for name in ("stdout", "stderr")
        )


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    with start_sandbox("--models", str(TEST_MODELS)) as up:
        workdir = Path(tempfile.mkdtemp(prefix="teegate-logs-"))
        config = write_config(
            workdir, up.base_url, up.api_key, 'log.level = "debug"\nlimits.max_body_bytes = 65536'
        )
        create_account(workdir / "teegate.sqlite3", "test", "100")
        key = create_key(workdir / "teegate.sqlite3", "test")
        with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "teegate", "run", "-c", str(config)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"},
            )
        try:
            text = until(
                lambda: "TEEGATE RUNNING" in (t := (workdir / "stdout").read_text()) and t,
                what="gateway start",
                timeout=DEADLINE_S,
            )
            found = re.findall(r"TEEGATE READY (\w+) http://([\d.]+):(\d+)", text)
            addr = {kind: (host, int(port)) for kind, host, port in found}
            yield Gateway(proc, workdir, addr["reverse"][1], addr["egress"], key)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _auth(gw: Gateway) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.api_key}", "Content-Type": "application/json"}


def _chat(content: str = MARKER, model: str = TEE, **extra) -> bytes:
    doc = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return json.dumps(doc).encode()


def _nested(depth: int) -> bytes:
    inner = b"[" * depth + b'"' + M + b'"' + b"]" * depth
    return _chat()[:-1] + b', "metadata": ' + inner + b"}"


def _raw(port: int, data: bytes, host: str = "127.0.0.1") -> int | None:
    """Send bytes as they are; the status of the answer, or None for a closed connection."""
    return exchange(port, data, host=host).status


def _post_head(gw: Gateway, **headers: str) -> bytes:
    return request_head("POST", "/v1/chat/completions", {**_auth(gw), **headers})


def _framing_cases(gw: Gateway) -> list[tuple[str, bytes]]:
    body = _chat()
    te = _post_head(gw, **{"Transfer-Encoding": "chunked"})
    return [
        ("bad chunk size", te + M + b"\r\n" + body),
        ("chunk extension", te + b"%x;%s\r\n%s\r\n0\r\n\r\n" % (len(body), M, body)),
        ("trailers", te + b"".join(chunked([body], b"X-" + M + b": " + M + b"\r\n"))),
        ("trailers, bad", te + b"".join(chunked([body], M + b"\r\n"))),
        ("chunk too short", te + b"ff\r\n" + body + b"\r\n0\r\n\r\n"),
        ("bad content-length", _post_head(gw, **{"Content-Length": MARKER}) + body),
        (
            "two content-lengths",
            _post_head(gw, **{"Content-Length": f"{len(body)}, 1{len(body)}"}) + body,
        ),
        ("cl and te", _post_head(gw, **{"Content-Length": "5", "Transfer-Encoding": "chunked"})),
        ("bad request line", M + b"\r\n\r\n"),
        ("method", M + b" /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ("version", b"GET /v1/models HTTP/" + M + b"\r\nHost: x\r\n" + CLOSE),
        ("header without colon", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + M + b"\r\n" + CLOSE),
        ("header name", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + M + b" : v\r\n" + CLOSE),
        (
            "invalid utf-8",
            b"GET /v1/\xff" + LONG.encode() + M + b" HTTP/1.1\r\nHost: \xfe" + M + b"\r\n" + CLOSE,
        ),
        (
            "control bytes",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: \x00\x1b" + M + b"\r\n" + CLOSE,
        ),
        ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + M * 10),
        ("not http", M * 50 + b"\r\n\r\n"),
        ("cut body", _post_head(gw, **{"Content-Length": "100000"}) + M),
        (
            "gzip garbage",
            _post_head(gw, **{"Content-Encoding": "gzip", "Content-Length": "20"})
            + M
            + b"\x00" * 4,
        ),
        (
            "gzip cut",
            _post_head(gw, **{"Content-Encoding": "gzip", "Content-Length": "60"})
            + gzip.compress(body)[:60],
        ),
        ("too large", _post_head(gw, **{"Content-Length": "70000"}) + M * 4000),
        (
            "too large chunked",
            te + b"".join(chunked([M * 2000] * 4)),
        ),
    ]


def test_no_client_byte_reaches_the_output(gateway: Gateway) -> None:
    gw = gateway
    statuses: dict[str, int | None] = {}
    for name, data in _framing_cases(gw):
        statuses[name] = _raw(gw.port, data)

    api = f"http://127.0.0.1:{gw.port}/v1"
    with httpx.Client(timeout=20) as c:
        hdrs = {**_auth(gw), "X-Custom": MARKER, "User-Agent": MARKER, "Cookie": f"s={MARKER}"}
        for name, url, body, extra in [
            ("served", "/chat/completions", _chat(), {}),
            ("long path", f"/{LONG}{MARKER}?q={MARKER}", b"", {}),
            ("long model", "/chat/completions", _chat(model=LONG + MARKER), {}),
            ("bad key", "/chat/completions", _chat(), {"Authorization": f"Bearer {MARKER}"}),
            ("invalid json", "/chat/completions", b'{"' + M + b'": ', {}),
            ("duplicate key", "/chat/completions", b'{"' + M + b'": 1, "' + M + b'": 2}', {}),
            ("bad value", "/chat/completions", _chat(temperature=MARKER), {}),
            ("bad role", "/chat/completions", _chat().replace(b'"user"', b'"' + M + b'"'), {}),
            ("surrogate", "/chat/completions", _chat(MARKER + "\ud800"), {}),
            ("deep", "/chat/completions", _nested(500), {}),
            (
                "number",
                "/chat/completions",
                _chat()[:-1] + b', "seed": 1e999, "x": "' + M + b'"}',
                {},
            ),
            ("zstd", "/chat/completions", M, {"Content-Encoding": "zstd"}),
            ("gzip garbage", "/chat/completions", M, {"Content-Encoding": "gzip"}),
            ("streamed", "/chat/completions", _chat(stream=True), {}),
        ]:
            method = "GET" if name == "long path" else "POST"
            r = c.request(method, api + url, content=body, headers={**hdrs, **extra})
            statuses[name] = r.status_code

    # The egress listener: a CONNECT target and an absolute-form request, past 128 characters.
    host, port = gw.egress
    statuses["egress connect"] = _raw(
        port, f"CONNECT {LONG}{MARKER}.test:443 HTTP/1.1\r\n\r\n".encode(), host
    )
    statuses["egress absolute"] = _raw(
        port,
        f"GET http://{LONG}{MARKER}.test/{MARKER} HTTP/1.1\r\nHost: {MARKER}\r\n"
        f"Connection: close\r\n\r\n".encode(),
        host,
    )
    # TLS on the reverse port, naming the marker (SNI), then a client that hangs up mid-body.
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        try:
            with ctx.wrap_socket(s, server_hostname=f"{MARKER}.test") as t:
                t.sendall(_post_head(gw, **{"Content-Length": "5000"}) + M)
        except (ssl.SSLError, OSError):
            pass
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(_post_head(gw, **{"Content-Length": "5000"}) + M * 10)

    assert statuses["served"] == statuses["streamed"] == 200
    assert not [n for n, s in statuses.items() if s is not None and s >= 500], statuses
    # Still serving after all of it.
    ok = httpx.post(f"{api}/chat/completions", content=_chat("fine"), headers=_auth(gw))
    assert ok.status_code == 200
    until(lambda: gw.output().count('"event": "request"') >= 30, what="access log lines")

    gw.process.send_signal(signal.SIGTERM)
    gw.process.wait(10)
    out = gw.output()
    assert '"event": "request"' in out  # the log is there...
    assert MARKER.lower() not in out.lower()  # ...and holds no marker (methods are upper-cased)
    assert "crashed" not in out and "Traceback" not in out
    assert '"error": "invalid_http"' in out  # mitmproxy's error texts became categories
