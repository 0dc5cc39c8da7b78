"""The pieces behind the limits and the log hygiene, without processes."""

from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.test import tutils

from teegate.addons.errors import GatewayError, error_category
from teegate.addons.jsonbody import json_depth_exceeds
from teegate.addons.validate import decoded_body
from teegate.logs import _safe_strings, escaped


@pytest.mark.parametrize(
    ("message", "category"),
    [
        ("HTTP/1 protocol error: illegal chunk header: bytearray(b'SECRET')", "invalid_http"),
        ("Received invalid content-length header: b'SECRET' from client", "invalid_http"),
        ("Request body exceeds mitmproxy's body_size_limit.", "body_too_large"),
        ("Client disconnected.", "client_disconnected"),
        ("Connection killed.", "killed"),
        ("[Errno 111] Connect call failed ('127.0.0.1', 9)", "upstream_unreachable"),
        ("TLS handshake failed: SECRET.example", "tls_failed"),
        ("something new about SECRET", "other"),
    ],
)
def test_error_texts_become_categories(message, category):
    assert error_category(message) == category


def test_logged_strings_are_cut_and_escaped():
    event = {
        "path": "/v1/" + "a" * 200,
        "model": 'm\n{"forged": 1}\x1b[31m',
        "method": "SECRETVERB",
        "event": "request",
        "detail": "x" * 5000,
    }
    out = _safe_strings(None, "info", dict(event))
    assert len(out["path"]) == 128
    assert "\n" not in out["model"] and "\x1b" not in out["model"]
    assert out["model"].startswith("m\\n")
    assert out["method"] == "other"
    assert len(out["detail"]) == 1024


@given(st.text(), st.integers(min_value=0, max_value=300))
def test_a_logged_string_is_what_unicode_escape_makes_of_it(value, limit):
    """The shortcut for printable ASCII (most values) gives exactly the full escaping."""
    assert escaped(value, limit) == value[:limit].encode("unicode_escape").decode("ascii")


@pytest.mark.parametrize(
    ("raw", "deeper"),
    [
        (b'{"a": ' + b"[" * 10 + b"]" * 10 + b"}", False),
        (b'{"a": ' + b"[" * 11 + b"]" * 11 + b"}", True),
        (b'{"a": "' + b"[" * 50 + b'"}', False),  # brackets in a string do not nest
        (b'{"a": "\\"' + b"[" * 50 + b'"}', False),  # nor after an escaped quote
        (b'{"a": "\\\\", "b": ' + b"[" * 11 + b"]" * 11 + b"}", True),  # escaped backslash
    ],
)
def test_json_depth(raw, deeper):
    assert json_depth_exceeds(raw, 11) is deeper


def _req(content: bytes, encoding: str):
    r = tutils.treq(method=b"POST", content=content)
    r.headers["content-encoding"] = encoding
    return r


def test_decoding_is_bounded():
    body = b"x" * 5000
    assert decoded_body(_req(gzip.compress(body), "gzip"), 5000) == body
    assert decoded_body(_req(zlib.compress(body), "deflate"), 5000) == body
    raw_deflate = zlib.compressobj(wbits=-15)
    assert (
        decoded_body(_req(raw_deflate.compress(body) + raw_deflate.flush(), "deflate"), 5000)
        == body
    )
    with pytest.raises(GatewayError) as e:
        decoded_body(_req(gzip.compress(body), "gzip"), 4999)
    assert e.value.status == 413 and e.value.code == "request_too_large"
    with pytest.raises(GatewayError) as e:
        decoded_body(_req(body, "zstd"), 5000)
    assert e.value.status == 415
