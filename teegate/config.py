"""``proxy.toml``, validated.

Every setting has a default, so an empty file is a valid configuration. An
unknown key, a wrong type or a bad URL stops the start with a message that
names the key: a typo in a security setting must never be silently ignored.

Why this module is long: every section's defaults live here exactly once (a project rule), and
the sections are small typed models with their validators; splitting them across modules would
scatter the one place an operator's setting is checked.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from teegate import attestation_settings
from teegate.addons.schema import ALLOWED_FIELDS, NEVER_ALLOWED
from teegate.catalog.attestation import Policy
from teegate.egress.hosts import DEFAULT_LLM_HOSTS, HostPattern
from teegate.ledger.keys import DEFAULT_PREFIX
from teegate.ledger.pgschema import is_postgres


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}$")


def listen_address(value: str) -> str:
    """``host:port`` (``[v6]:port``), or "" for a listener that is switched off."""
    if value and not _HOST_PORT.match(value):
        raise ValueError('must be "host:port" (or "" to switch the listener off)')
    return value


ListenAddress = Annotated[str, AfterValidator(listen_address)]


class ListenSettings(_Section):
    reverse: ListenAddress = "127.0.0.1:8080"
    """Where OpenAI SDKs point their base_url ("" switches the listener off)."""
    egress: ListenAddress = "127.0.0.1:8081"
    """The forward proxy apps reach through HTTPS_PROXY ("" switches it off); see docs/egress.md."""

    @model_validator(mode="after")
    def _something_listens(self) -> ListenSettings:
        if not (self.reverse or self.egress):
            raise ValueError("listen.reverse and listen.egress are both off: nothing to serve")
        return self


class UpstreamSettings(_Section):
    base_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8000")
    api_key: str | None = None
    api_key_env: str = "TEEGATE_UPSTREAM_KEY"
    ca_file: Path | None = None
    timeout_s: int = Field(300, ge=1, le=3600)
    """Seconds to wait for the upstream's response headers before answering 504."""
    kind: Literal["near", "chutes"] = "near"
    """The upstream's evidence format: "near" (NEAR/Phala reports, one verdict per model) or
    "chutes" (per-instance evidence, chats sent to one verified instance)."""
    e2ee: bool = True
    """kind = "chutes" only: encrypt each chat to the key the chosen instance's quote binds
    (Chutes' E2EE protocol). False: plain TLS to the front door."""

    @field_validator("base_url")
    @classmethod
    def _origin_only(cls, v: AnyHttpUrl) -> AnyHttpUrl:
        if (v.path or "/") != "/" or v.query or v.fragment:
            raise ValueError("must be an origin like https://host[:port], without a path")
        return v

    def resolved_api_key(self) -> str:
        key = self.api_key or os.environ.get(self.api_key_env, "")
        if not key:
            raise ValueError(
                f"no upstream key: set upstream.api_key or the {self.api_key_env} variable"
            )
        return key

    @property
    def origin_parts(self) -> Origin:
        """``base_url`` taken apart, the one place it is parsed."""
        parts = urlsplit(str(self.base_url))
        scheme, host = parts.scheme, parts.hostname or ""
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default_port else f"{shown}:{port}"
        return Origin(scheme, host, port, host_header)

    @property
    def origin(self) -> str:
        """``scheme://host[:port]``, as mitmproxy's reverse mode and the HTTP clients take it."""
        o = self.origin_parts
        return f"{o.scheme}://{o.host_header}"

    @property
    def verify(self) -> str | bool:
        """httpx's ``verify`` for the upstream's TLS: ``ca_file``, else the system's store."""
        return str(self.ca_file) if self.ca_file else True


class Origin(NamedTuple):
    scheme: str
    host: str
    """Lower-case, IPv6 without brackets."""
    port: int
    """As given, else the scheme's default."""
    host_header: str
    """The ``Host`` header: the port only when not the scheme's default."""


class CatalogSettings(_Section):
    refresh_interval_s: int = Field(60, ge=1)
    max_staleness_s: int = Field(300, ge=1)
    markup: Decimal = Field(Decimal("1.85"), gt=0, le=100)

    @field_validator("markup", mode="before")
    @classmethod
    def _no_float(cls, v: object) -> object:
        if isinstance(v, float):
            raise ValueError('write the markup as a string, e.g. "1.85" (money is never a float)')
        return v


class RequestDefaults(_Section):
    max_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)


_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class RequestSettings(_Section):
    """What a chat completion body may hold beyond the built-in allow-list."""

    extra_fields: list[str] = []
    """Top-level body fields passed upstream as sent, added to the built-in allow-list.
    Fields that pick, route or fall back between models or endpoints, multiply generation
    or run client-chosen code upstream are never allowed, even here."""

    @field_validator("extra_fields")
    @classmethod
    def _allowable(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"{name!r} is not a field name")
            if name in NEVER_ALLOWED:
                raise ValueError(
                    f"{name!r} is never allowed: it routes, falls back, multiplies generation "
                    "or runs code upstream"
                )
        return v

    @property
    def allowed_extra(self) -> frozenset[str]:
        return frozenset(self.extra_fields) - ALLOWED_FIELDS


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class EgressSettings(_Section):
    """The egress listener: which hosts are LLM APIs, and where its CA lives."""

    confdir: Path = Path("~/.teegate")
    """Holds the gateway's CA (created on first start); ``teegate ca path`` prints it."""
    llm_hosts: list[str] = Field(default_factory=lambda: list(DEFAULT_LLM_HOSTS))
    """Hosts whose TLS is intercepted and whose requests are refused (replaces the shipped
    list, ``egress/llm_hosts.txt``). Globs must keep a whole-label suffix after their last
    ``*`` (``*.example.com``, ``api-*.example.com``) so the CA's name constraints cover them."""
    extra_llm_hosts: list[str] = []
    """Added to ``llm_hosts`` (keeps the shipped list)."""
    audit_hosts: list[str] = []
    """Listed hosts forwarded as is with a metadata-only log line, for a migration period."""
    proxy_auth: Literal["none", "api_key"] = "none"
    """"api_key": clients must present a gateway API key as their proxy password. Required
    (or an explicit "none") when the egress listener is not on a loopback address."""

    @field_validator("llm_hosts", "extra_llm_hosts", "audit_hosts")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for text in v:
            HostPattern.parse(text)
        return v

    @model_validator(mode="after")
    def _audit_is_listed(self) -> EgressSettings:
        listed = {_pattern_key(t) for t in self.all_llm_hosts}
        for text in self.audit_hosts:
            if _pattern_key(text) not in listed:
                raise ValueError(f"audit_hosts: {text!r} is not in llm_hosts or extra_llm_hosts")
        return self

    @property
    def all_llm_hosts(self) -> list[str]:
        return list(dict.fromkeys([*self.llm_hosts, *self.extra_llm_hosts]))


def _pattern_key(text: str) -> tuple[str, int | None]:
    p = HostPattern.parse(text)
    return p.host, p.port


class LedgerSettings(_Section):
    path: Path = Path("teegate.sqlite3")
    """SQLite file of accounts, keys and usage; a relative path is beside the config file."""
    url: str | None = None
    """A PostgreSQL ledger instead (``postgresql://user:password@host/db``), shared by every
    worker and machine. Unset: ``$TEEGATE_DB`` when that is a postgresql:// URL, else ``path``."""
    key_poll_ms: int = Field(200, ge=10, le=1000)
    """PostgreSQL only: how often each worker checks for revoked keys (the longest a revoked
    key keeps working on another worker is about this plus one query)."""
    sweep_interval_s: float = Field(10.0, gt=0, le=3600)
    """PostgreSQL only: how often each worker charges in full the open reservations of
    workers that are gone (their advisory lock is free). Also done at every start."""
    statement_timeout_ms: int = Field(5000, ge=100, le=60_000)
    """PostgreSQL only: a request-path statement (key lookup, reservation commit, rate count)
    with no answer by then fails the request closed (503 billing_unavailable) and its
    connection is replaced, instead of waiting ~30 s for the kernel to give up on a silent
    server; it also bounds a reservation's wait in the group commit's queue. Also the
    server's statement_timeout / idle_in_transaction_session_timeout there."""
    key_prefix: str = Field(DEFAULT_PREFIX, pattern=r"^[A-Za-z0-9_]{1,32}$")
    """Prefix of the gateway's API keys; the default is the ledger's own (teegate.ledger.keys)."""
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    """FULL: each reservation is fsynced before its request leaves (survives power loss).
    NORMAL: written to the WAL but not fsynced (survives a crash of teegate, not of the
    machine; ~0.2 ms less per request alone). See docs/bench.md."""

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, v: str | None) -> str | None:
        if v is not None and not is_postgres(v):
            raise ValueError("must be a postgresql:// URL (an SQLite ledger is set with path)")
        return v

    @property
    def location(self) -> str:
        """What the ledger is opened with: the PostgreSQL URL, or the SQLite file's path."""
        if self.url:
            return self.url
        env = os.environ.get("TEEGATE_DB", "")
        return env if is_postgres(env) else str(self.path)


class BillingSettings(_Section):
    unanswered: Literal["hold", "release"] = "hold"
    """A chat request sent upstream that got no response headers (the client left, or the
    upstream timed out): "hold" charges its full reservation, the rule crash recovery applies;
    "release" hands it back. A request that never reached the upstream is always released."""


class RateLimitSettings(_Section):
    requests_per_minute: int = Field(1000, ge=1)
    """Per API key, unless the key was created with its own --rate-limit."""


class LimitSettings(_Section):
    """Bounds on what one request may make the gateway hold (see proxy.toml)."""

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    """Largest request body, as sent and after Content-Encoding is undone (413 beyond)."""
    max_json_depth: int = Field(400, ge=8, le=800)
    """Deepest nesting of arrays/objects in a JSON body (400 beyond). Kept under CPython's
    recursion limit (1000), which json, pydantic and re-serialization all spend."""


class SignatureSettings(_Section):
    """Response signatures of NEAR AI / Phala upstreams, fetched and checked after each chat."""

    check: bool = True
    """Fetch ``/v1/signature/{id}`` after each served chat and verify it against the attested
    key; a missing or failing signature refuses the model until it re-attests. False: usage
    rows and receipts say "unchecked". (dcap mode with a "near" upstream only.)"""
    queue: int = Field(1000, ge=1, le=1_000_000)
    """Checks waiting at most; beyond, a chat's signature is recorded "unchecked" (logged)."""
    workers: int = Field(16, ge=1, le=64)
    timeout_s: float = Field(10.0, gt=0, le=300)
    """One signature fetch (each of up to three tries)."""
    max_lag_s: float = Field(2.0, gt=0, le=600)
    """A check that waited longer in the queue is recorded "unchecked", not fetched: an upstream
    keeps a signature only for its last ~1000 answers (NEAR AI's proxy), so a late fetch finding
    none says the gateway fell behind, not that the upstream failed to sign."""


class ReceiptSettings(_Section):
    """The gateway's own signed receipts (``x-teegate-receipt``, ``GET /v1/receipts/{id}``)."""

    key_path: Path = Path("teegate-receipt-key.pem")
    """The gateway's Ed25519 key, generated on first start (mode 0600); a relative path is
    beside the config file. Its public key: ``GET /v1/attestation/gateway``."""
    quote_provider: Path | None = None
    """When teegate itself runs in an Intel TD: the configfs-tsm report directory
    (``/sys/kernel/config/tsm/report``) that makes its TDX quote binding that public key."""


class AdminSettings(_Section):
    """The admin listener: metrics, health checks and the admin API (teegate/admin/)."""

    enabled: bool = True
    """false: no admin listener at all."""
    listen: ListenAddress = "127.0.0.1:8082"
    """Where ``/metrics``, ``/healthz``, ``/readyz`` and the admin API are served. Off
    loopback the gateway refuses to start until ``teegate admin token create`` made a token."""
    recent_refusals: int = Field(200, ge=1, le=100_000)
    """How many recent refusals (metadata only) the admin API keeps in memory."""
    dashboard: bool = True
    """Serve the web dashboard at /dashboard/ on the admin listener (teegate/dashboard/)."""
    session_idle_s: int = Field(1800, ge=60, le=86_400)
    """A dashboard sign-in ends after this many seconds without a request (12 h at most)."""
    secure_cookie: bool = False
    """Mark the dashboard's session cookie ``Secure`` even though this listener speaks plain
    HTTP: for a dashboard reached through a TLS-terminating proxy (browsers then send the
    cookie over HTTPS only). A request that arrives over TLS gets ``Secure`` regardless."""

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.listen)

    @property
    def loopback(self) -> bool:
        return _loopback(self.listen)


class WorkerSettings(_Section):
    """Gateway processes sharing the listeners (``teegate run --workers N``); docs in proxy.toml."""

    count: int = Field(1, ge=1, le=256)
    """Gateway processes (``--workers`` overrides). Above 1 needs a ledger every process
    shares (PostgreSQL): the SQLite ledger serves one process."""
    drain_s: int = Field(30, ge=0, le=3600)
    """On SIGTERM/Ctrl-C, seconds to let requests in flight (streams) finish after the
    listeners close, before the process stops anyway. A second signal stops at once."""
    warmup_s: int = Field(30, ge=0, le=600)
    """A worker (``--workers``) accepts connections once it has the catalog and every model's
    first verdict, waiting at most this long; the other workers serve meanwhile."""


class Settings(_Section):
    listen: ListenSettings = ListenSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    catalog: CatalogSettings = CatalogSettings()
    defaults: RequestDefaults = RequestDefaults()
    request: RequestSettings = RequestSettings()
    log: LogSettings = LogSettings()
    egress: EgressSettings = EgressSettings()
    ledger: LedgerSettings = LedgerSettings()
    billing: BillingSettings = BillingSettings()
    ratelimit: RateLimitSettings = RateLimitSettings()
    limits: LimitSettings = LimitSettings()
    admin: AdminSettings = AdminSettings()


    workers: WorkerSettings = WorkerSettings()
    attestation: Policy = Policy()
    """Hardware attestation: mode "dcap" (verify TDX quotes) or "flag"; see proxy.toml."""
    signatures: SignatureSettings = SignatureSettings()
    receipts: ReceiptSettings = ReceiptSettings()

    @model_validator(mode="after")
    def _no_open_proxy(self) -> Settings:
        exposed = self.listen.egress and not _loopback(self.listen.egress)
        if exposed and "proxy_auth" not in self.egress.model_fields_set:
            raise ValueError(
                f"egress.proxy_auth: the egress listener on {self.listen.egress} is reachable "
                'from the network; set proxy_auth = "api_key" (or "none" if a firewall '
                "already limits who reaches it)"
            )
        return self


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


def load(path: Path | None) -> Settings:
    """Read and validate a TOML file (None: all defaults)."""
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no such file") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(path, e)) from None
    return _beside(settings, Path(path).parent if path is not None else Path.cwd())


def _beside(settings: Settings, folder: Path) -> Settings:
    """Relative file paths in the configuration are relative to the file's folder."""
    db = settings.ledger.path.expanduser()
    if not db.is_absolute():
        ledger = settings.ledger.model_copy(update={"path": (folder / db).resolve()})
        settings = settings.model_copy(update={"ledger": ledger})
    key = settings.receipts.key_path.expanduser()
    if not key.is_absolute():
        receipts = settings.receipts.model_copy(update={"key_path": (folder / key).resolve()})
        settings = settings.model_copy(update={"receipts": receipts})
    try:
        attestation = attestation_settings.resolve(settings.attestation, folder)
    except ValueError as e:
        raise ConfigError(f"attestation.{e}") from None
    return settings.model_copy(update={"attestation": attestation})


def _describe(path: Path | None, e: ValidationError) -> str:
    lines = [f"{path or 'configuration'}: invalid settings"]
    for err in e.errors(include_url=False, include_input=False):
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)
