"""The egress policy and its settings, without processes: host matching, precedence,
configuration errors, and the addon's per-request decisions on real mitmproxy flows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from addons.catalogsync import CatalogSync
from addons.egress import EGRESS, Egress
from addons.egress_hosts import (
    DEFAULT_LLM_HOSTS,
    EgressPolicy,
    HostPattern,
    Upstream,
    Verdict,
)
from addons.seal import Seal
from teegate import config
from teegate.runner import option_values

ISSUE_HOSTS = (
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "api.mistral.ai",
    "api.deepseek.com",
    "openrouter.ai",
    "api.together.xyz",
    "api.groq.com",
)


# -- host patterns ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "port", "hit"),
    [
        ("api.openai.com", "api.openai.com", 443, True),
        ("api.openai.com", "api.openai.com", 8443, True),  # no port: every port
        ("api.openai.com", "xapi.openai.com", 443, False),
        ("api.openai.com", "api.openai.com.evil.example", 443, False),
        ("api.openai.com:443", "api.openai.com", 80, False),
        ("*.openai.azure.com", "acme.openai.azure.com", 443, True),
        ("*.openai.azure.com", "openai.azure.com", 443, False),
        ("bedrock-runtime.*.amazonaws.com", "bedrock-runtime.eu-west-1.amazonaws.com", 443, True),
        ("bedrock-runtime.*.amazonaws.com", "s3.eu-west-1.amazonaws.com", 443, False),
        ("127.0.0.3", "127.0.0.3", 1234, True),
        ("127.0.0.1:7000", "127.0.0.1", 7001, False),
        ("[::1]:443", "::1", 443, True),
    ],
)
def test_pattern_matching(pattern, host, port, hit):
    assert HostPattern.parse(pattern).matches(host, port) is hit


@pytest.mark.parametrize(
    "bad", ["*", "*.*", "a b", "x.com:0", "x.com:65536", "[zz]:1", "a:b:c", ""]
)
def test_bad_patterns_are_rejected(bad):
    with pytest.raises(ValueError):
        HostPattern.parse(bad)


def test_default_list_covers_the_issue_and_parses():
    assert set(ISSUE_HOSTS) <= set(DEFAULT_LLM_HOSTS)
    for p in DEFAULT_LLM_HOSTS:
        HostPattern.parse(p)


# -- decisions ----------------------------------------------------------------------------


def _policy(upstream=("127.0.0.1", 9443), audit=()):
    return EgressPolicy(Upstream(*upstream), [*DEFAULT_LLM_HOSTS, "127.0.0.3"], audit)


def test_an_ip_upstream_is_identified_by_host_and_port():
    p = _policy()
    assert p.classify([("127.0.0.1", 9443)]).verdict is Verdict.CONFIDENTIAL
    assert p.classify([("127.0.0.1", 9444)]).verdict is Verdict.OTHER


def test_a_named_upstream_is_identified_on_any_port():
    p = _policy(("confidential.example", 443))
    assert p.classify([("Confidential.Example.", 80)]).verdict is Verdict.CONFIDENTIAL
    assert p.classify([("localhost", 443)]).verdict is Verdict.OTHER


def test_names_are_normalised_before_matching():
    p = _policy()
    d = p.classify([("API.OpenAI.COM.", 443)])
    assert d.verdict is Verdict.REFUSE and d.host == "api.openai.com:443"


def test_the_upstream_wins_over_a_listed_name():
    # e.g. CONNECT api.openai.com with Host: the upstream: the gated path re-pins it anyway.
    d = _policy().classify([("api.openai.com", 443), ("127.0.0.1", 9443)])
    assert d.verdict is Verdict.CONFIDENTIAL


def test_any_listed_name_refuses_even_if_the_address_is_unlisted():
    # CONNECT to an unlisted address with a listed SNI or Host header.
    d = _policy().classify([("203.0.113.7", 443), ("api.anthropic.com", 443)])
    assert d.verdict is Verdict.REFUSE and d.host == "api.anthropic.com:443"


def test_audit_only_when_every_listed_name_is_audited():
    p = _policy(audit=["api.groq.com"])
    assert p.classify([("api.groq.com", 443)]).verdict is Verdict.AUDIT
    assert p.classify([("api.groq.com", 443), ("api.openai.com", 443)]).verdict is Verdict.REFUSE


def test_audit_hosts_must_be_listed():
    with pytest.raises(ValueError, match="not on the LLM host list"):
        _policy(audit=["api.example.com"])


# -- settings -----------------------------------------------------------------------------


def _settings(toml: str) -> config.Settings:
    import tomllib

    return config.Settings.model_validate(tomllib.loads(toml))


def test_defaults():
    s = config.Settings()
    assert s.listen.egress == "127.0.0.1:8081" and s.listen.reverse == "127.0.0.1:8080"
    assert s.egress.confdir == Path("~/.teegate")
    assert s.egress.all_llm_hosts == list(DEFAULT_LLM_HOSTS) and s.egress.audit_hosts == []


def test_extra_hosts_add_to_the_shipped_list():
    s = _settings('egress.extra_llm_hosts = ["llm.internal.example", "api.openai.com"]')
    assert s.egress.all_llm_hosts == [*DEFAULT_LLM_HOSTS, "llm.internal.example"]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('listen.reverse = ""\nlisten.egress = ""', "listen"),
        ('listen.egress = "8081"', "listen.egress"),
        ('egress.llm_hosts = ["not a host"]', "egress.llm_hosts"),
        ('egress.audit_hosts = ["api.unlisted.example"]', "egress"),
        ('egress.intercept = ["api.openai.com"]', "egress.intercept"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, toml, key):
    path = tmp_path / "proxy.toml"
    path.write_text(toml)
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert f"  {key}:" in str(e.value)


def test_option_values_map_listeners_confdir_and_hosts(monkeypatch):
    monkeypatch.setenv("HOME", "/home/op")
    s = _settings(
        'upstream.api_key = "k"\negress.extra_llm_hosts = ["127.0.0.3"]\n'
        'egress.audit_hosts = ["api.groq.com"]'
    )
    v = option_values(s)
    assert v["mode"] == ["reverse:http://127.0.0.1:8000@127.0.0.1:8080", "regular@127.0.0.1:8081"]
    assert v["confdir"] == "/home/op/.teegate"
    assert v["teegate_egress_llm_hosts"][-1] == "127.0.0.3"
    assert v["teegate_egress_audit_hosts"] == ["api.groq.com"]
    assert option_values(_settings('upstream.api_key = "k"\nlisten.reverse = ""'))["mode"] == [
        "regular@127.0.0.1:8081"
    ]


# -- the addon on real flows --------------------------------------------------------------


@pytest.fixture
def egress():
    addon = Egress()
    with taddons.context(CatalogSync(), addon) as tctx:
        tctx.configure(
            addon,
            teegate_upstream="https://confidential.example",
            teegate_egress_llm_hosts=list(DEFAULT_LLM_HOSTS),
            teegate_egress_audit_hosts=["api.groq.com"],
        )
        yield addon


def _flow(host: str, port: int, scheme: bytes = b"https", mode: str = "regular", **headers):
    req = tutils.treq(
        scheme=scheme,
        host=host,
        port=port,
        method=b"POST",
        path=b"/v1/chat/completions",
        content=b'{"model":"x"}',
    )
    for k, v in headers.items():
        req.headers[k.replace("_", "-")] = v
    f = tflow.tflow(req=req)
    f.client_conn.proxy_mode = ProxyMode.parse(mode)
    f.client_conn.sni = None
    return f


def test_ignore_hosts_is_refused_at_start():
    with taddons.context(CatalogSync(), Egress()) as tctx:
        with pytest.raises(exceptions.OptionsError, match="tunnel the reverse listener"):
            tctx.options.update(ignore_hosts=["api\\.openai\\.com"])


async def test_reverse_mode_flows_are_not_touched(egress):
    f = _flow("api.openai.com", 443, mode="reverse:https://confidential.example")
    await egress.requestheaders(f)
    assert f.response is None and EGRESS not in f.metadata and "teegate.route" not in f.metadata


async def test_listed_host_is_refused_before_the_body(egress):
    f = _flow("api.openai.com", 443)
    await egress.requestheaders(f)
    body = json.loads(f.response.content)
    assert f.response.status_code == 403
    assert body["error"]["code"] == "provider_not_confidential"
    assert "api.openai.com " in body["error"]["message"]
    assert "https://confidential.example/v1" in body["error"]["message"]
    assert f.metadata["teegate.route"] == "local"


async def test_listed_sni_refuses_whatever_the_address(egress):
    f = _flow("203.0.113.7", 443)
    f.client_conn.sni = "api.anthropic.com"
    await egress.requestheaders(f)
    assert f.response.status_code == 403


async def test_upstream_flows_are_pinned_to_the_configured_origin(egress):
    f = _flow("confidential.example", 80, scheme=b"http", proxy_authorization="Basic x")
    await egress.requestheaders(f)
    r = f.request
    assert f.response is None and f.metadata[EGRESS] == "confidential"
    assert (r.scheme, r.host, r.port, r.host_header) == (
        "https",
        "confidential.example",
        443,
        "confidential.example",
    )
    assert "teegate.route" not in f.metadata  # the Router decides, as for reverse flows


async def test_unlisted_hosts_pass_through_streamed_without_proxy_credentials(egress):
    f = _flow("example.org", 80, scheme=b"http", proxy_authorization="Basic x")
    await egress.requestheaders(f)
    assert f.response is None and f.metadata["teegate.route"] == "passthrough"
    assert f.request.stream is True and "proxy-authorization" not in f.request.headers


async def test_audit_hosts_pass_through_unstreamed(egress):
    f = _flow("api.groq.com", 443)
    await egress.requestheaders(f)
    assert f.response is None and f.metadata[EGRESS] == "audit"
    assert f.metadata["teegate.route"] == "passthrough" and not f.request.stream


def test_seal_honours_passthrough_only_from_the_egress_listener():
    seal = Seal(("validate", "gate", "upstream"))
    f = _flow("example.org", 80, mode="reverse:https://confidential.example")
    f.metadata["teegate.route"] = "passthrough"
    seal.request(f)
    assert f.response is not None and f.response.status_code == 500
    g = _flow("example.org", 80)
    g.metadata["teegate.route"] = "passthrough"
    seal.request(g)
    assert g.response is None


async def test_a_failing_decision_refuses(egress):
    egress._policy = None  # as if configure had never run
    f = _flow("example.org", 80)
    await egress.requestheaders(f)
    assert f.response is not None and f.response.status_code == 500
