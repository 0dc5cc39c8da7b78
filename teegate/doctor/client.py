"""A client's side: proxy variables that reach the egress listener, and that ``NO_PROXY``
does not undo for the hosts that matter (the confidential upstream and the LLM APIs)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from teegate.config import Settings
from teegate.doctor.gateway import address
from teegate.doctor.noproxy import bypassing_entry, no_proxy_entries
from teegate.doctor.report import Check, Status
from teegate.doctor.trust import RunOut, Which
from teegate.egress.hosts import HostPattern, canonical_host, ip_literal, is_local

HTTPS_VARS = ("HTTPS_PROXY", "https_proxy")
# Only when the upstream is plain http (the sandbox without --tls); curl reads only lower case.
HTTP_VARS = ("HTTP_PROXY", "http_proxy")


def _points_at(value: str, listen: str) -> bool:
    """Whether a proxy URL reaches the egress listener at ``listen``."""
    parts = urlsplit(value if "://" in value else f"http://{value}")
    if parts.scheme not in ("http", ""):
        return False
    try:
        port = parts.port or 80
    except ValueError:
        return False
    host, want_port = address(listen)
    if port != want_port:
        return False
    mine = canonical_host(parts.hostname or "")
    theirs = canonical_host(host)
    if mine == theirs:
        return True
    # A listener on a wildcard address answers on every local address.
    bound = listen.rpartition(":")[0].strip("[]")
    ip = ip_literal(mine)
    return bound in ("", "0.0.0.0", "::") and ip is not None and is_local(ip)


def proxy_variables(settings: Settings, env: Mapping[str, str]) -> Check:
    """``HTTPS_PROXY`` (and, for a plain-http upstream, ``HTTP_PROXY``) set, in either case,
    and every one that is set reaching the egress listener."""
    name = "proxy variables reach the egress listener"
    listen = settings.listen.egress
    if not listen:
        return Check(name, Status.SKIP, "listen.egress is off")
    host, port = address(listen)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if settings.egress.proxy_auth == "api_key":
        target = f"app:<gateway key>@{target}"
    pairs = [HTTPS_VARS]
    if settings.upstream.origin_parts.scheme == "http":
        pairs.append(HTTP_VARS)
    fix = "export " + " ".join(f"{v}=http://{target}" for pair in pairs for v in pair)
    missing = [
        f"{upper} (or {lower})" for upper, lower in pairs if not (env.get(upper) or env.get(lower))
    ]
    set_vars = {v: env[v] for pair in pairs for v in pair if env.get(v)}
    wrong = {v: value for v, value in set_vars.items() if not _points_at(value, listen)}
    if wrong:
        text = ", ".join(f"{v}={_redact(value)}" for v, value in wrong.items())
        return Check(name, Status.FAIL, f"{text}: not the egress listener ({listen})", fix)
    if missing:
        return Check(name, Status.FAIL, f"not set: {', '.join(missing)}", fix)
    return Check(name, Status.OK, ", ".join(f"{v}={_redact(x)}" for v, x in set_vars.items()))


def _redact(value: str) -> str:
    """A proxy URL without its password (a gateway key, with proxy_auth = api_key)."""
    parts = urlsplit(value if "://" in value else f"http://{value}")
    if parts.password:
        return value.replace(parts.password, "***")
    return value


def hosts_that_matter(settings: Settings) -> list[tuple[str, int, str]]:
    """(host, port, why) for the confidential upstream and each LLM API on the list (a glob
    is tried with one name it covers)."""
    o = settings.upstream.origin_parts
    out = [(o.host, o.port, "the confidential upstream")]
    for text in settings.egress.all_llm_hosts:
        p = HostPattern.parse(text)
        host = p.host.replace("*", "x")
        out.append((host, p.port or 443, "an LLM API"))
    return out


def no_proxy(settings: Settings, env: Mapping[str, str]) -> Check:
    name = "NO_PROXY does not bypass the gateway"
    if not settings.listen.egress:
        return Check(name, Status.SKIP, "listen.egress is off")
    entries = no_proxy_entries(env)
    if not entries:
        return Check(name, Status.OK, "NO_PROXY/no_proxy not set")
    hits = []
    for host, port, why in hosts_that_matter(settings):
        entry = bypassing_entry(host, port, entries)
        if entry is not None:
            hits.append((host, port, why, entry))
    if not hits:
        return Check(
            name, Status.OK, f"no entry covers the upstream or an LLM API ({len(entries)} entries)"
        )
    shown = "; ".join(f"{h}:{p} ({why}) by {e!r}" for h, p, why, e in hits[:5])
    more = f" and {len(hits) - 5} more" if len(hits) > 5 else ""
    keep = [e for e in entries if e not in {hit[3] for hit in hits}]
    why = []
    if any(hit[2] == "the confidential upstream" for hit in hits):
        why.append("the upstream answers its own 401 to a gateway key sent straight to it")
    if any(hit[2] == "an LLM API" for hit in hits):
        why.append("an LLM API is reached around the gate")
    return Check(
        name,
        Status.FAIL,
        f"bypassed: {shown}{more} ({'; '.join(why)})",
        f"export NO_PROXY={','.join(keep)} no_proxy={','.join(keep)}",
    )


def node_proxy(env: Mapping[str, str], which: Which, run: RunOut) -> Check:
    """Node reads HTTPS_PROXY only from 22.21/24.5 on, and only with NODE_USE_ENV_PROXY=1."""
    name = "node honours HTTPS_PROXY"
    if which("node") is None:
        return Check(name, Status.SKIP, "node is not installed")
    version = run(["node", "--version"]) or ""
    try:
        major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    except ValueError:
        return Check(name, Status.WARN, f"node --version said {version!r}")
    agent = (
        "use an agent: undici's EnvHttpProxyAgent (setGlobalDispatcher(new "
        "EnvHttpProxyAgent())) or the SDK's httpAgent"
    )
    if (major, minor) < (22, 21) or (major == 23) or (major == 24 and minor < 5):
        return Check(name, Status.WARN, f"node {version} ignores HTTPS_PROXY by itself", agent)
    if env.get("NODE_USE_ENV_PROXY") != "1":
        return Check(
            name,
            Status.WARN,
            f"node {version}: NODE_USE_ENV_PROXY is not 1",
            "export NODE_USE_ENV_PROXY=1",
        )
    return Check(name, Status.OK, f"node {version} with NODE_USE_ENV_PROXY=1")
