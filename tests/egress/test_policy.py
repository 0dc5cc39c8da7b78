"""The egress policy and its settings, without processes: host matching, precedence,
configuration errors, and the addon's per-request decisions on real mitmproxy flows."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from teegate import config
from teegate.addons import flowstate
from teegate.addons.egress import Egress, Resolver
from teegate.addons.flowstate import Route
from teegate.addons.seal import Seal
from teegate.egress.hosts import (
    DEFAULT_LLM_HOSTS,
    EgressPolicy,
    HostPattern,
    Upstream,
    Verdict,
    canonical_host,
)
from teegate.runner import build_addons, option_values

# Hosts the hardening issue names, each of which the shipped list must match.
ISSUE_HOSTS = (
    "api.openai.com",
    "eu.api.openai.com",
    "us.api.openai.com",
    "acme.openai.azure.com",
    "acme.cognitiveservices.azure.com",
    "acme.services.ai.azure.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "europe-west4-aiplatform.googleapis.com",
    "api.mistral.ai",
    "codestral.mistral.ai",
    "api.cohere.com",
    "api.groq.com",
    "api.together.xyz",
    "api.fireworks.ai",
    "api.deepseek.com",
    "openrouter.ai",
    "api.perplexity.ai",
    "api.x.ai",
    "api.cerebras.ai",
    "api.deepinfra.com",
    "llm.chutes.ai",
    "someone.chutes.ai",
    "integrate.api.nvidia.com",
    "ai.api.nvidia.com",
    "dashscope.aliyuncs.com",
    "dashscope-intl.aliyuncs.com",
    "open.bigmodel.cn",
    "api.z.ai",
    "api.moonshot.ai",
    "api.moonshot.cn",
    "bedrock-runtime.us-east-1.amazonaws.com",
    "bedrock-runtime-fips.us-gov-west-1.amazonaws.com",
    "router.huggingface.co",
    "api.replicate.com",
    "api.sambanova.ai",
    "api.hyperbolic.xyz",
    "api.novita.ai",
    "model-abc123.api.baseten.co",
)
NOT_LLM = ("openai.com", "azure.com", "s3.us-east-1.amazonaws.com", "www.googleapis.com")


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


@pytest.mark.parametrize("host", ISSUE_HOSTS)
def test_the_shipped_list_matches_the_issues_hosts(host):
    patterns = [HostPattern.parse(p) for p in DEFAULT_LLM_HOSTS]
    assert any(p.matches(host, 443) for p in patterns)
    assert _policy().classify([(host.upper() + ".", 443)]).verdict is Verdict.REFUSE


@pytest.mark.parametrize("host", NOT_LLM)
def test_the_shipped_list_leaves_their_neighbours_alone(host):
    assert not any(HostPattern.parse(p).matches(host, 443) for p in DEFAULT_LLM_HOSTS)
    assert _policy().classify([(host, 443)]).verdict is Verdict.OTHER


def test_the_shipped_list_is_the_data_file_without_comments():
    text = (Path(__file__).parents[2] / "egress" / "llm_hosts.txt").read_text()
    entries = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert list(DEFAULT_LLM_HOSTS) == entries and len(set(entries)) == len(entries)


# -- canonical destinations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),  # one decimal number
        ("0x7f000001", "127.0.0.1"),  # one hex number
        ("0X7F000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),  # octal part
        ("0x7f.1", "127.0.0.1"),  # hex part, shortened
        ("127.1", "127.0.0.1"),  # shortened: last part fills 24 bits
        ("127.0.1", "127.0.0.1"),  # last part fills 16 bits
        ("127.0.0.1.", "127.0.0.1"),  # trailing dot
        ("0", "0.0.0.0"),
        ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped IPv6
        ("::ffff:7f00:1", "127.0.0.1"),
        ("[::FFFF:7F00:1]", "127.0.0.1"),  # bracketed, upper case
        ("[::1]", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("fe80::1%eth0", "fe80::1"),  # zone id
        ("[fe80::1%25eth0]", "fe80::1"),  # URL-encoded zone id
        ("localhost", "127.0.0.1"),
        ("LocalHost.", "127.0.0.1"),
        ("api.localhost", "127.0.0.1"),  # RFC 6761
        ("API.OpenAI.com", "api.openai.com"),
        ("api.openai.com..", "api.openai.com"),
        ("0x", "0x"),  # not a number: a (strange) name
        ("08.0.0.1", "08.0.0.1"),  # 8 is no octal digit: inet_aton refuses, so a name
        ("4294967296", "4294967296"),  # too big for IPv4: a name (it resolves as none)
        ("1.2.3.4.5", "1.2.3.4.5"),
        ("cafe", "cafe"),  # hex letters without 0x: a name
        ("0xcafe", "0.0.202.254"),
    ],
)
def test_canonical_host(spelling, canonical):
    assert canonical_host(spelling) == canonical


@pytest.mark.parametrize(
    "spelling", ["2130706433", "0x7f000001", "0177.0.0.1", "0x7f.1", "127.1", "127.0.1", "0"]
)
def test_canonical_ipv4_agrees_with_the_socket_layer(spelling):
    """What getaddrinfo connects to, for every IPv4 spelling above (no DNS: numeric only)."""
    info = socket.getaddrinfo(spelling, 80, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    assert {i[4][0] for i in info} == {canonical_host(spelling)}


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
    elsewhere = {"confidential.example": frozenset({"203.0.113.9"})}
    assert p.classify([("localhost", 443)], elsewhere).verdict is Verdict.OTHER


@pytest.mark.parametrize(
    "spelling",
    [
        "127.1",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "LOCALHOST.",
        "[::ffff:127.0.0.1]",
        "::ffff:7f00:1",
        "127.0.0.1.",
        "127.0.0.2",
        "::1",
        "0.0.0.0",
        "api.localhost",
    ],
)
def test_every_spelling_of_a_loopback_upstream_is_the_upstream(spelling):
    p = _policy()
    assert p.lookups([(spelling, 9443)]) == set()  # decided by spelling alone
    assert p.classify([(spelling, 9443)]).verdict is Verdict.CONFIDENTIAL
    assert p.classify([(spelling, 9444)]).verdict is Verdict.OTHER


def test_a_name_resolving_to_the_upstream_on_its_port_is_the_upstream():
    p = _policy(("10.0.0.7", 443))
    names = [("sneaky.example", 443)]
    assert p.lookups(names) == {"sneaky.example"}
    hit = {"sneaky.example": frozenset({"192.0.2.1", "10.0.0.7"})}
    assert p.classify(names, hit).verdict is Verdict.CONFIDENTIAL
    miss = {"sneaky.example": frozenset({"192.0.2.1"})}
    assert p.classify(names, miss).verdict is Verdict.OTHER
    # No address: not the upstream now, but a tunnel would look it up again to connect.
    assert p.classify(names, {"sneaky.example": frozenset()}).verdict is Verdict.UNVERIFIED
    assert p.lookups([("sneaky.example", 444)]) == set()  # another port: not the upstream
    assert p.classify([("sneaky.example", 444)]).verdict is Verdict.OTHER


def test_a_lookup_without_an_answer_is_doubt_not_a_tunnel():
    p = _policy(("10.0.0.7", 443))
    d = p.classify([("slow.example", 443)], {"slow.example": None})
    assert d.verdict is Verdict.UNVERIFIED and d.host == "slow.example:443"
    assert p.classify([("slow.example", 443)], {}).verdict is Verdict.UNVERIFIED  # not asked


def test_a_named_upstreams_addresses_are_compared_too():
    p = _policy(("confidential.example", 443))
    names = [("198.51.100.4", 443), ("alias.example", 443)]
    assert p.lookups(names) == {"alias.example", "confidential.example"}
    up = frozenset({"198.51.100.4"})
    d = p.classify(names, {"confidential.example": up, "alias.example": frozenset()})
    assert d.verdict is Verdict.CONFIDENTIAL and d.host == "198.51.100.4:443"
    d = p.classify(names, {"confidential.example": None, "alias.example": frozenset()})
    assert d.verdict is Verdict.UNVERIFIED


def test_a_loopback_upstream_is_reached_through_any_local_address_a_name_has():
    p = _policy()
    assert p.classify([("dev.example", 9443)], {"dev.example": frozenset({"::1"})}).verdict is (
        Verdict.CONFIDENTIAL
    )


def test_audit_hosts_are_resolved_too_listed_ones_need_not_be():
    p = _policy(audit=["api.groq.com"])
    assert p.lookups([("api.groq.com", 9443)]) == {"api.groq.com"}
    d = p.classify([("api.groq.com", 9443)], {"api.groq.com": frozenset({"127.0.0.1"})})
    assert d.verdict is Verdict.CONFIDENTIAL  # gated, not forwarded as is with the client's key
    assert p.lookups([("api.openai.com", 9443)]) == set()  # refused whatever it resolves to


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


def test_option_values_map_listeners_and_confdir(monkeypatch):
    monkeypatch.setenv("HOME", "/home/op")
    v = option_values(_settings('upstream.api_key = "k"'))
    assert v["mode"] == ["reverse:http://127.0.0.1:8000@127.0.0.1:8080", "regular@127.0.0.1:8081"]
    assert v["confdir"] == "/home/op/.teegate"
    assert not [k for k in v if k.startswith("teegate")]  # teegate's own go to the addons
    assert option_values(_settings('upstream.api_key = "k"\nlisten.reverse = ""'))["mode"] == [
        "regular@127.0.0.1:8081"
    ]


def test_the_addon_decides_by_the_egress_settings():
    s = _settings('egress.extra_llm_hosts = ["127.0.0.3"]\negress.audit_hosts = ["api.groq.com"]')
    (addon,) = (a for a in build_addons(s) if isinstance(a, Egress))
    decide = addon._policy.classify
    assert decide([("127.0.0.3", 443)], {}).verdict is Verdict.REFUSE
    assert decide([("api.groq.com", 443)], {}).verdict is Verdict.AUDIT
    assert decide([("api.openai.com", 443)], {}).verdict is Verdict.REFUSE
    assert decide([("example.org", 443)], {}).verdict is Verdict.OTHER


# -- the addon on real flows --------------------------------------------------------------


class FakeDNS:
    """getaddrinfo below the resolver: a table, a slow name, a count of calls."""

    def __init__(self) -> None:
        self.table = {"confidential.example": "203.0.113.10", "api.groq.com": "192.0.2.5"}
        self.calls: list[str] = []
        self.gate = asyncio.Event()

    async def __call__(self, name: str) -> list[tuple]:
        self.calls.append(name)
        if name.startswith("slow."):
            await self.gate.wait()
        if self.table.get(name) == "EAI_AGAIN":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if name not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.table[name], 0))]


@pytest.fixture
def dns() -> FakeDNS:
    return FakeDNS()


@pytest.fixture
def egress(dns):
    s = _settings(
        'upstream.base_url = "https://confidential.example"\negress.audit_hosts = ["api.groq.com"]'
    )
    addon = Egress(s.egress, s.upstream, Resolver(timeout=0.2, getaddrinfo=dns))
    with taddons.context(addon):
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
    s = config.Settings()
    with taddons.context(Egress(s.egress, s.upstream)) as tctx:
        with pytest.raises(exceptions.OptionsError, match="tunnel the reverse listener"):
            tctx.options.update(ignore_hosts=["api\\.openai\\.com"])


async def test_reverse_mode_flows_are_not_touched(egress):
    f = _flow("api.openai.com", 443, mode="reverse:https://confidential.example")
    await egress.requestheaders(f)
    assert f.response is None and flowstate.egress_verdict(f) is None and flowstate.route(f) is None


async def test_listed_host_is_refused_before_the_body(egress):
    f = _flow("api.openai.com", 443)
    await egress.requestheaders(f)
    body = json.loads(f.response.content)
    assert f.response.status_code == 403
    assert body["error"]["code"] == "provider_not_confidential"
    assert "api.openai.com " in body["error"]["message"]
    assert "https://confidential.example/v1" in body["error"]["message"]
    assert flowstate.route(f) == Route.LOCAL


@pytest.mark.parametrize(
    ("reverse", "hint"),
    [
        ("127.0.0.1:8080", "base_url=http://127.0.0.1:8080/v1 "),
        ("[::1]:8080", "base_url=http://[::1]:8080/v1 "),
        # A wildcard listener: the address this client reached the egress listener on.
        ("0.0.0.0:8080", "base_url=http://10.1.2.3:8080/v1 "),
        # No reverse listener: the upstream is reachable only through this proxy.
        ("", "base_url=https://confidential.example/v1 (through this proxy)"),
    ],
)
async def test_the_refusal_hint_names_the_gateways_reverse_url(dns, reverse, hint):
    s = _settings('upstream.base_url = "https://confidential.example"')
    addon = Egress(
        s.egress, s.upstream, Resolver(timeout=0.2, getaddrinfo=dns), reverse_listen=reverse
    )
    with taddons.context(addon):
        f = _flow("api.openai.com", 443)
        f.client_conn.sockname = ("10.1.2.3", 8081)
        await addon.requestheaders(f)
    message = json.loads(f.response.content)["error"]["message"]
    assert hint in message


async def test_listed_sni_refuses_whatever_the_address(egress):
    f = _flow("203.0.113.7", 443)
    f.client_conn.sni = "api.anthropic.com"
    await egress.requestheaders(f)
    assert f.response.status_code == 403


async def test_upstream_flows_are_pinned_to_the_configured_origin(egress):
    f = _flow("confidential.example", 80, scheme=b"http", proxy_authorization="Basic x")
    await egress.requestheaders(f)
    r = f.request
    assert f.response is None and flowstate.egress_verdict(f) == "confidential"
    assert (r.scheme, r.host, r.port, r.host_header) == (
        "https",
        "confidential.example",
        443,
        "confidential.example",
    )
    assert flowstate.route(f) is None  # the Router decides, as for reverse flows


async def test_unlisted_hosts_pass_through_streamed_without_proxy_credentials(egress):
    f = _flow("example.org", 80, scheme=b"http", proxy_authorization="Basic x")
    await egress.requestheaders(f)
    assert f.response is None and flowstate.route(f) == Route.PASSTHROUGH
    assert f.request.stream is True and "proxy-authorization" not in f.request.headers


async def test_audit_hosts_pass_through_unstreamed(egress):
    f = _flow("api.groq.com", 443)
    await egress.requestheaders(f)
    assert f.response is None and flowstate.egress_verdict(f) == "audit"
    assert flowstate.route(f) == Route.PASSTHROUGH and not f.request.stream


def test_seal_honours_passthrough_only_from_the_egress_listener():
    seal = Seal(("validate", "gate", "upstream"))
    f = _flow("example.org", 80, mode="reverse:https://confidential.example")
    flowstate.set_route(f, Route.PASSTHROUGH)
    seal.request(f)
    assert f.response is not None and f.response.status_code == 500
    g = _flow("example.org", 80)
    flowstate.set_route(g, Route.PASSTHROUGH)
    seal.request(g)
    assert g.response is None


async def test_a_failing_decision_refuses(egress):
    egress._policy = None  # as if configure had never run
    f = _flow("example.org", 80)
    await egress.requestheaders(f)
    assert f.response is not None and f.response.status_code == 500


async def test_a_name_that_resolves_to_the_upstream_is_gated(egress, dns):
    dns.table["alias.example"] = "203.0.113.10"
    f = _flow("alias.example", 443)
    await egress.requestheaders(f)
    assert f.response is None and flowstate.egress_verdict(f) == "confidential"
    assert f.request.host == "confidential.example"  # pinned to the configured origin


async def test_a_slow_lookup_refuses_with_504(egress, dns):
    f = _flow("slow.example", 443)
    await egress.requestheaders(f)
    assert f.response is not None and f.response.status_code == 504
    assert json.loads(f.response.content)["error"]["code"] == "destination_unverified"


async def test_the_resolver_caches_and_shares_lookups(dns):
    r = Resolver(timeout=1.0, getaddrinfo=dns)
    a, b = await asyncio.gather(r.lookup("api.groq.com"), r.lookup("api.groq.com"))
    assert a == b == frozenset({"192.0.2.5"}) and dns.calls == ["api.groq.com"]
    assert await r.lookup("nx.example") == frozenset()  # does not exist: no address
    assert await r.lookup("nx.example") == frozenset() and dns.calls.count("nx.example") == 1
    dns.table["flaky.example"] = "EAI_AGAIN"
    assert await r.lookup("flaky.example") == frozenset()  # temporary failure: not kept
    assert await r.lookup("flaky.example") == frozenset()
    assert dns.calls.count("flaky.example") == 2


async def test_the_resolver_answers_none_in_time_and_fills_the_cache_later(dns):
    r = Resolver(timeout=0.05, getaddrinfo=dns)
    dns.table["slow.example"] = "192.0.2.7"
    assert await r.lookup("slow.example") is None
    dns.gate.set()
    assert await asyncio.wait_for(r.lookup("slow.example"), 1.0) == frozenset({"192.0.2.7"})
    assert dns.calls.count("slow.example") == 1  # the first lookup finished and was kept


def _clienthello(host: str, port: int, sni: str | None = None):
    """What tls_clienthello reads: the context (client, server address) and the SNI."""
    from types import SimpleNamespace

    from mitmproxy import options
    from mitmproxy.proxy.context import Context

    client = tflow.tclient_conn()
    client.proxy_mode = ProxyMode.parse("regular")
    context = Context(client, options.Options())
    context.server.address = (host, port)
    return SimpleNamespace(
        context=context, client_hello=SimpleNamespace(sni=sni), ignore_connection=False
    )


async def test_a_checked_tunnel_is_pinned_to_the_address_that_was_checked(egress, dns):
    """DNS rebinding: the name is looked up again when the tunnel connects; by then it may
    point at the upstream. The tunnel connects to what was checked instead."""
    dns.table["rebind.example"] = "192.0.2.44"
    data = _clienthello("rebind.example", 443)
    await egress.tls_clienthello(data)
    assert data.ignore_connection is True
    assert data.context.server.address == ("192.0.2.44", 443)
    other = _clienthello("unchecked.example", 8443)  # not the upstream's port: not looked up
    await egress.tls_clienthello(other)
    assert other.ignore_connection is True
    assert other.context.server.address == ("unchecked.example", 8443)


async def test_tls_to_a_name_resolving_to_the_upstream_is_decrypted(egress, dns):
    dns.table["alias.example"] = "203.0.113.10"
    data = _clienthello("alias.example", 443)
    await egress.tls_clienthello(data)
    assert data.ignore_connection is False


async def test_tls_whose_lookup_is_slow_is_decrypted_not_tunnelled(egress, dns):
    data = _clienthello("slow.example", 443)
    await egress.tls_clienthello(data)
    assert data.ignore_connection is False


async def test_a_name_without_an_address_is_not_tunnelled(egress, dns):
    data = _clienthello("nx.example", 443)
    await egress.tls_clienthello(data)
    assert data.ignore_connection is False
