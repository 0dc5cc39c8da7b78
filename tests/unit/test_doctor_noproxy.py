"""NO_PROXY read the way curl, requests, httpx and Node read it: any of them bypassing counts."""

from __future__ import annotations

import pytest

from teegate.doctor.noproxy import bypassing_entry, no_proxy_entries


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "entry"),
    [
        ("api.openai.com", 443, "*", "*"),
        ("api.openai.com", 443, "openai.com", "openai.com"),  # a subdomain
        ("openai.com", 443, ".openai.com", ".openai.com"),  # leading dot: the name itself too
        ("api.openai.com", 443, "*.openai.com", "*.openai.com"),
        ("api.openai.com", 443, "ai.com", "ai.com"),  # requests: a bare suffix
        ("API.OpenAI.com.", 443, "OPENAI.COM", "openai.com"),  # case, trailing dot
        ("api.openai.com", 443, "api.openai.com:443", "api.openai.com:443"),
        ("127.0.0.1", 8000, "127.0.0.1", "127.0.0.1"),
        ("127.0.0.1", 8000, "127.0.0.0/8", "127.0.0.0/8"),
        ("::1", 8000, "[::1]:8000", "[::1]:8000"),
        ("api.openai.com", 443, "example.com, openai.com", "openai.com"),
        ("api.openai.com", 443, "example.com openai.com", "openai.com"),  # curl: spaces
    ],
)
def test_bypassed(host, port, no_proxy, entry):
    assert bypassing_entry(host, port, no_proxy_entries({"NO_PROXY": no_proxy})) == entry


@pytest.mark.parametrize(
    ("host", "port", "no_proxy"),
    [
        ("api.openai.com", 443, "api.openai.com:8443"),  # another port
        ("api.openai.com", 443, "example.com"),
        ("api.openai.com", 443, "openai.com.evil"),
        ("127.0.0.1", 8000, "localhost"),  # no client resolves an entry to compare
        ("127.0.0.1", 8000, "10.0.0.0/8"),
        ("10.1.2.3", 443, "0.1.2.3"),  # an address is never a name suffix
        ("api.openai.com", 443, ""),
    ],
)
def test_not_bypassed(host, port, no_proxy):
    assert bypassing_entry(host, port, no_proxy_entries({"no_proxy": no_proxy})) is None


def test_both_spellings_are_read():
    assert no_proxy_entries({"no_proxy": "a.com", "NO_PROXY": "b.com,a.com"}) == ["a.com", "b.com"]
