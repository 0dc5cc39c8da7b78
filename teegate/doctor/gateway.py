"""The gateway's side: configuration, upstream and catalog, listeners, verdicts, the egress CA.

Every network call is bounded (``TIMEOUT_S``) and made with ``trust_env=False``: the doctor
asks the upstream and the gateway directly, whatever proxy variables this shell holds (those
are checked on their own, as the client's side).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx

from teegate import config
from teegate.catalog.models import parse_rows
from teegate.config import Settings
from teegate.doctor.report import Check, Status
from teegate.egress.ca import ca_cert_path
from teegate.egress.hosts import HostPattern

TIMEOUT_S = 5.0
MODE_HEADER = "x-teegate-attestation-mode"  # every response the gateway gives carries it
START = "teegate run -c proxy.toml"

Clock = Callable[[], float]
Connect = Callable[[str, int], bool]


def load_config(path: Path | None) -> tuple[Check, Settings | None]:
    name = "configuration loads"
    if path is None:
        try:
            settings = config.load(None)
        except config.ConfigError as e:  # the defaults are valid; a broken install is not
            return Check(name, Status.FAIL, str(e)), None
        return Check(
            name, Status.WARN, "no -c given: the built-in defaults", "pass -c proxy.toml"
        ), settings
    try:
        settings = config.load(path)
    except config.ConfigError as e:
        return (
            Check(
                name,
                Status.FAIL,
                str(e).replace("\n", "; "),
                f"correct the named key in {path} "
                "(every key is documented in the shipped proxy.toml)",
            ),
            None,
        )
    return Check(name, Status.OK, str(path)), settings


def upstream_key(settings: Settings, env: dict[str, str]) -> str | None:
    up = settings.upstream
    return up.api_key or env.get(up.api_key_env) or None


def upstream_catalog(
    settings: Settings,
    env: dict[str, str],
    *,
    transport: httpx.BaseTransport | None = None,
    clock: Clock = time.monotonic,
) -> tuple[Check, list[str]]:
    """Fetch the upstream's model list now, as the gateway would: reachable, accepted, fresh
    (answered within the timeout) and listing confidential models. Returns their ids too."""
    name = "upstream reachable, catalog fresh"
    up = settings.upstream
    key = upstream_key(settings, env)
    if key is None:
        return Check(
            name,
            Status.FAIL,
            f"no upstream key: upstream.api_key is unset and so is ${up.api_key_env}",
            f"export {up.api_key_env}=<the upstream's API key>",
        ), []
    started = clock()
    try:
        with httpx.Client(
            verify=up.verify, timeout=TIMEOUT_S, trust_env=False, transport=transport
        ) as c:
            resp = c.get(f"{up.origin}/v1/models", headers={"authorization": f"Bearer {key}"})
    except httpx.HTTPError as e:
        return _unreachable(name, up.origin, e, settings), []
    took_ms = round((clock() - started) * 1000)
    if resp.status_code in (401, 403):
        return Check(
            name,
            Status.FAIL,
            f"{up.origin} refused the upstream key (HTTP {resp.status_code})",
            f"set a valid key in ${up.api_key_env} (or upstream.api_key)",
        ), []
    if resp.status_code != 200:
        return Check(
            name,
            Status.FAIL,
            f"{up.origin}/v1/models answered HTTP {resp.status_code}",
            "the upstream is unwell: retry later, or check upstream.base_url",
        ), []
    try:
        models, others, skipped = parse_rows(resp.json().get("data"), settings.catalog.markup)
    except (ValueError, AttributeError):
        return Check(
            name,
            Status.FAIL,
            f"{up.origin}/v1/models is not an OpenAI model list",
            "check that upstream.base_url is the confidential upstream's origin",
        ), []
    if not models:
        return Check(
            name,
            Status.FAIL,
            f"{up.origin} lists {len(others)} model(s), none with confidential_compute: true",
            "point upstream.base_url at a confidential upstream (every model would be refused)",
        ), []
    detail = (
        f"{up.origin}: {len(models)} confidential, {len(others)} other model(s), in {took_ms} ms"
    )
    if skipped:
        detail += f"; {len(skipped)} row(s) unusable ({skipped[0]})"
    return Check(name, Status.OK, detail), sorted(models)


def _unreachable(name: str, origin: str, e: httpx.HTTPError, settings: Settings) -> Check:
    text = str(e)
    if "CERTIFICATE_VERIFY_FAILED" in text or isinstance(e.__cause__, ssl.SSLError):
        return Check(
            name,
            Status.FAIL,
            f"{origin}: its TLS certificate does not verify",
            "set upstream.ca_file to the PEM bundle that signs it"
            + (f" (now {settings.upstream.ca_file})" if settings.upstream.ca_file else ""),
        )
    return Check(
        name,
        Status.FAIL,
        f"{origin} is unreachable ({type(e).__name__})",
        "start the upstream, or correct upstream.base_url; the gateway refuses every chat "
        f"with 503 once its catalog is older than catalog.max_staleness_s = "
        f"{settings.catalog.max_staleness_s}",
    )


def address(listen: str) -> tuple[str, int]:
    """``host:port`` of a listener, as a client on this machine dials it."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


def url_of(listen: str) -> str:
    host, port = address(listen)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def tcp_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return True
    except OSError:
        return False


def listeners(
    settings: Settings,
    *,
    connect: Connect = tcp_connect,
    transport: httpx.BaseTransport | None = None,
) -> tuple[list[Check], dict[str, str]]:
    """Is something listening where the configuration says, and is the reverse one teegate?
    Returns the checks and the URLs of the listeners found bound."""
    checks: list[Check] = []
    bound: dict[str, str] = {}
    for kind in ("reverse", "egress"):
        name = f"{kind} listener bound"
        listen = getattr(settings.listen, kind)
        if not listen:
            checks.append(Check(name, Status.SKIP, f"listen.{kind} is off"))
            continue
        host, port = address(listen)
        if port == 0:
            checks.append(
                Check(name, Status.SKIP, f"listen.{kind} = {listen}: a port picked at start")
            )
            continue
        if not connect(host, port):
            checks.append(
                Check(
                    name, Status.FAIL, f"nothing listens on {listen}", f"start the gateway: {START}"
                )
            )
            continue
        bound[kind] = url_of(listen)
        if kind == "reverse" and not _is_teegate(bound[kind], transport):
            checks.append(
                Check(
                    name,
                    Status.FAIL,
                    f"{listen} answers, but not as teegate (no {MODE_HEADER} header)",
                    f"stop what holds {listen}, or move listen.reverse; then {START}",
                )
            )
            continue
        checks.append(Check(name, Status.OK, bound[kind]))
    return checks, bound


def _is_teegate(url: str, transport: httpx.BaseTransport | None) -> bool:
    try:
        with httpx.Client(timeout=TIMEOUT_S, trust_env=False, transport=transport) as c:
            return MODE_HEADER in c.get(f"{url}/v1/models").headers
    except httpx.HTTPError:
        return False


def verdicts(
    reverse: str | None,
    key: str | None,
    confidential: list[str],
    *,
    transport: httpx.BaseTransport | None = None,
) -> Check:
    """Which of the upstream's confidential models the running gateway serves, and why not."""
    name = "per-model verdicts"
    if reverse is None:
        return Check(name, Status.SKIP, "gateway not running")
    if key is None:
        return Check(
            name,
            Status.WARN,
            "no gateway API key to ask the gateway with",
            "pass --key <a gateway key> (or export TEEGATE_API_KEY)",
        )
    headers = {"authorization": f"Bearer {key}"}
    try:
        with httpx.Client(
            base_url=reverse,
            headers=headers,
            timeout=TIMEOUT_S * 2,
            trust_env=False,
            transport=transport,
        ) as c:
            listing = c.get("/v1/models")
            if listing.status_code == 401:
                return Check(
                    name, Status.WARN, "the gateway refused the key (401)", "pass a valid --key"
                )
            if listing.status_code != 200:
                return Check(
                    name,
                    Status.FAIL,
                    f"GET /v1/models answered {listing.status_code}: {_message(listing)}",
                    "read the gateway's log (stderr) for the catalog or attestation failure",
                )
            served = {m["id"] for m in listing.json().get("data", [])}
            refused = {
                m: _message(c.get(f"/v1/models/{quote(m, safe='/')}"))
                for m in confidential
                if m not in served
            }
    except (httpx.HTTPError, ValueError) as e:
        return Check(name, Status.FAIL, f"the gateway did not answer ({type(e).__name__})", START)
    total = len(served | set(confidential))
    detail = f"{len(served)} of {total} confidential model(s) served"
    if refused:
        shown = "; ".join(f"{m}: {why}" for m, why in list(refused.items())[:5])
        status = Status.FAIL if not served else Status.WARN
        return Check(
            name,
            status,
            f"{detail}; refused: {shown}",
            "see why with GET /v1/attestation/report?model=<id>, and the attestation.* keys",
        )
    return Check(name, Status.OK if served else Status.FAIL, detail)


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code}"


def egress_ca(settings: Settings) -> tuple[Check, Path | None]:
    name = "egress CA exists"
    if not settings.listen.egress:
        return Check(name, Status.SKIP, "listen.egress is off"), None
    path = ca_cert_path(settings.egress.confdir)
    if not path.is_file():
        return Check(
            name,
            Status.FAIL,
            f"no CA certificate at {path}",
            "teegate ca path -c proxy.toml   (creates it; so does the gateway's first start)",
        ), None
    return Check(name, Status.OK, str(path)), path


def probe_host(settings: Settings) -> str | None:
    """A listed LLM API name to ask the egress listener for (it refuses it without connecting)."""
    for text in settings.egress.all_llm_hosts:
        p = HostPattern.parse(text)
        if "*" not in p.host and p.port is None and not p.host[0].isdigit():
            return p.host
    return None


def egress_ca_in_use(
    egress: str | None,
    ca: Path | None,
    settings: Settings,
    key: str | None,
    *,
    transport: httpx.BaseTransport | None = None,
) -> Check:
    """Does the listener present certificates that this CA file verifies (the confdir the
    running gateway uses is the one checked)? Asked for a listed host, which is refused
    before anything is connected."""
    name = "egress listener uses this CA"
    host = probe_host(settings)
    if egress is None or ca is None or host is None:
        return Check(
            name,
            Status.SKIP,
            "egress listener not running" if egress is None else "nothing to probe",
        )
    proxy = egress
    if settings.egress.proxy_auth == "api_key":
        if key is None:
            return Check(name, Status.SKIP, "proxy_auth = api_key and no --key given")
        proxy = egress.replace("http://", f"http://doctor:{key}@", 1)
    trust = ssl.create_default_context(cafile=str(ca))
    try:
        with httpx.Client(
            proxy=proxy, verify=trust, timeout=TIMEOUT_S, trust_env=False, transport=transport
        ) as c:
            resp = c.get(f"https://{host}/v1/models")
    except httpx.ProxyError as e:
        return Check(name, Status.FAIL, f"the listener refused the connection ({e})", START)
    except httpx.ConnectError as e:
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            return Check(
                name,
                Status.FAIL,
                f"its certificate for {host} is not signed by {ca}",
                "the running gateway uses another egress.confdir: restart it with this "
                "proxy.toml, or check with the -c the gateway was started with",
            )
        return Check(name, Status.FAIL, f"{type(e).__name__} through {egress}", START)
    except httpx.HTTPError as e:
        return Check(name, Status.FAIL, f"{type(e).__name__} through {egress}", START)
    return Check(name, Status.OK, f"{host} intercepted with it (HTTP {resp.status_code})")
