"""``teegate sandbox``: a simulated confidential upstream plus the gateway in front of it.

The developer's local playground: no upstream account and no TDX hardware
needed. The sandbox upstream runs as its own process (as a real upstream
would); the gateway runs in this one. Ctrl-C stops both.

``--upstream chutes`` runs the sandbox in its Chutes flavour (per-instance evidence, end-to-end
encrypted ``/e2e/invoke``) and sets ``upstream.kind = "chutes"`` for the gateway, so every chat
is encrypted to one verified instance (``--no-e2ee``: plain TLS to the front door instead).

``--tls`` serves the simulated upstream over HTTPS under a throw-away test CA of its own
(``sandbox/tls.py``, a fresh temporary directory) and has the gateway trust that CA
(``upstream.ca_file``): an unchanged app calling the upstream's ``https://127.0.0.1:PORT`` URL
through the egress listener is then intercepted, gated and billed exactly as a real deployment
would be. The app never trusts the sandbox's CA, only the gateway's egress CA; 127.0.0.1 is the
upstream's own address, so the egress policy treats it as the confidential upstream without
any ``egress.extra_llm_hosts``.
"""

from __future__ import annotations

import argparse
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from teegate import config, logs
from teegate.config import EgressSettings
from teegate.egress.ca import ca_cert_path
from teegate.sandbox_attestation import banner, fetch_sandbox_trust, sandbox_policy

SANDBOX_KEY = "sandbox-upstream-key"
READY = "SANDBOX READY "
DEMO_BALANCE_MICRO = 10_000_000  # $10.00


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sandbox", help="run the gateway against a local simulated confidential upstream"
    )
    p.add_argument(
        "-c", "--config", type=Path, default=None, help="proxy.toml for the gateway side"
    )
    p.add_argument(
        "--listen", default=None, help="gateway address (default: listen.reverse, 127.0.0.1:8080)"
    )
    p.add_argument("--chunk-delay-ms", type=int, default=40, help="pace of simulated streams")
    p.add_argument(
        "--upstream",
        choices=("near", "chutes"),
        default="near",
        help="which confidential upstream to simulate: NEAR AI/Phala (default) or Chutes",
    )
    p.add_argument(
        "--no-e2ee",
        action="store_true",
        help="with --upstream chutes: send chats over plain TLS, not end-to-end encrypted",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve the simulated upstream over HTTPS with its own test CA (the gateway trusts "
        "it), to try egress mode end to end against an https URL",
    )
    p.add_argument(
        "--db",
        type=Path,
        default=None,
        help="ledger database to use (default: a fresh temporary one with a funded demo account)",
    )
    p.set_defaults(func=_sandbox)


def start_upstream(extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "teegate.sandbox", "--port", "0", "--api-key", SANDBOX_KEY, *extra],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    for line in proc.stdout:
        if line.startswith(READY):
            return proc, line[len(READY) :].strip()
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the sandbox upstream did not start")


def _sandbox(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args.config)
    except config.ConfigError as e:
        print(f"teegate: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log.level)
    db, demo_key, admin_token = _demo_ledger(args.db, settings.ledger.key_prefix)
    tls_ca = None
    extra = ["--chunk-delay-ms", str(args.chunk_delay_ms), "--upstream", args.upstream]
    if args.tls:
        tls_dir = Path(tempfile.mkdtemp(prefix="teegate-sandbox-tls-"))
        tls_ca = tls_dir / "ca.pem"  # written by the sandbox (sandbox/tls.py) before it is ready
        extra += ["--tls-dir", str(tls_dir)]
    upstream, base_url = start_upstream(extra)
    try:
        # The sandbox's quotes chain to its own test root: trust that root (and pin its TD's
        # measurements), loudly, in this process only.
        verify = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else True
        trust = fetch_sandbox_trust(
            base_url, Path(tempfile.mkdtemp(prefix="teegate-sandbox-")), verify=verify
        )
        up_update = _upstream_update(args, base_url, tls_ca)
        settings = settings.model_copy(
            update={
                "attestation": sandbox_policy(settings.attestation, trust),
                "ledger": settings.ledger.model_copy(update={"path": db}),
                "upstream": settings.upstream.model_copy(update=up_update),
                "listen": settings.listen.model_copy(
                    update={"reverse": args.listen or settings.listen.reverse}
                ),
                "egress": _sandbox_egress(settings.egress),
                "receipts": _sandbox_receipts(settings, db, fresh=args.db is None),
            }
        )
        from teegate.runner import Ready, run

        urls: dict[str, str] = {}

        def announce(line: str) -> None:
            print(line, flush=True)
            if line.startswith("TEEGATE READY "):
                kind, url = line.split()[-2:]
                urls[kind] = url
            elif line == "TEEGATE RUNNING" and "reverse" in urls:
                # After every listener is bound: the banner names both, with their real ports.
                ca = ca_cert_path(settings.egress.confdir) if "egress" in urls else None
                text = _banner(
                    urls["reverse"],
                    base_url,
                    demo_key,
                    db,
                    urls.get("egress"),
                    ca,
                    tls_ca,
                    urls.get("admin"),
                    admin_token,
                )
                print(text, flush=True)
                print(banner(settings.attestation), flush=True)

        return run(settings, ready=Ready(announce))
    finally:
        upstream.terminate()
        try:
            upstream.wait(5)
        except subprocess.TimeoutExpired:
            upstream.kill()


def _upstream_update(
    args: argparse.Namespace, base_url: str, ca_file: Path | None = None
) -> dict[str, object]:
    """The gateway's ``[upstream]`` for the sandbox: its address and key, the test CA its
    HTTPS is signed by (``--tls``), and for the Chutes flavour its kind (``e2ee`` stays as
    configured unless ``--no-e2ee``)."""
    update: dict[str, object] = {"base_url": base_url, "api_key": SANDBOX_KEY}
    if ca_file is not None:
        update["ca_file"] = ca_file
    if args.upstream == "chutes":
        update["kind"] = "chutes"
        if args.no_e2ee:
            update["e2ee"] = False
    return update


def _sandbox_egress(egress: EgressSettings) -> EgressSettings:
    """The sandbox's own CA directory (unless the config names one): its CA is
    name-constrained to the sandbox's hosts, and must not be the one a real deployment
    from the default directory would then find and refuse for not covering its upstream."""
    if "confdir" in egress.model_fields_set:
        return egress
    return egress.model_copy(update={"confdir": egress.confdir / "sandbox"})


def _sandbox_receipts(
    settings: config.Settings, db: Path, *, fresh: bool
) -> config.ReceiptSettings:
    """A throwaway ledger gets a throwaway receipt key beside it (not one in the cwd)."""
    if not fresh:
        return settings.receipts
    return settings.receipts.model_copy(update={"key_path": db.parent / "teegate-receipt-key.pem"})


def attestation_toml(base_url: str) -> str:
    """The ``attestation.*`` keys this command uses against the sandbox at ``base_url``, as
    TOML dotted keys (the benchmark configures its gateway the same way)."""
    trust = fetch_sandbox_trust(base_url, Path(tempfile.mkdtemp(prefix="teegate-sandbox-")))
    return trust.toml()


def _demo_ledger(db: Path | None, prefix: str) -> tuple[Path, str | None, str | None]:
    """A ledger with a funded demo account, a key and an admin token (a fresh temporary one
    by default): ``(path, API key, admin token)``.

    The admin token is an ordinary one (``teegate admin token create`` makes the same), made
    only in the sandbox's own throw-away ledger, so that the banner can hand a newcomer a
    working dashboard sign-in. With ``--db`` (the operator's ledger) nothing is made: the
    banner says how to make one.
    """
    import asyncio

    from teegate.ledger import Store
    from teegate.ledger.admintokens import AdminTokens

    if db is not None:
        return db, None, None  # the operator's own ledger: use its keys and tokens

    async def provision(path: Path) -> tuple[str, str]:
        async with await Store.open(path) as store:
            account = await store.create_account("demo", DEMO_BALANCE_MICRO)
            _, plaintext = await store.create_key(account.id, prefix=prefix, label="sandbox demo")
            _, token = await AdminTokens(store).create("sandbox")
        return plaintext, token

    path = Path(tempfile.mkdtemp(prefix="teegate-sandbox-")) / "teegate.sqlite3"
    key, token = asyncio.run(provision(path))
    return path, key, token


def _banner(
    gateway: str,
    upstream: str,
    key: str | None,
    db: Path,
    egress: str | None = None,
    ca: Path | None = None,
    upstream_ca: Path | None = None,
    admin: str | None = None,
    admin_token: str | None = None,
) -> str:
    model = "deepseek-ai/DeepSeek-V3.2-TEE"
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
    shown = key or "<a key from: teegate keys create ACCOUNT --db " + str(db) + ">"
    funded = f"demo account with $10.00, key {key}" if key else f"your ledger {db}"
    tls = f"   (its own test CA {upstream_ca}: the gateway trusts it)" if upstream_ca else ""
    return f"""
teegate sandbox is up.
  gateway (OpenAI base_url): {gateway}/v1
  simulated confidential upstream: {upstream}{tls}
  billing: {funded}
  ledger: {db}   (try: teegate usage --db {db})
{_admin_banner(admin, db, gateway, admin_token) if admin else ""}
  curl {gateway}/v1/models -H 'authorization: Bearer {shown}'
  curl {gateway}/v1/chat/completions -H 'authorization: Bearer {shown}' \\
       -H 'content-type: application/json' -d '{body}'

  from openai import OpenAI
  client = OpenAI(base_url="{gateway}/v1", api_key="{shown}")
  reply = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Hello"}}])
{_egress_banner(egress, ca, upstream, shown) if egress else ""}
Ctrl-C stops both.
"""


def _admin_banner(admin: str, db: Path, gateway: str, token: str | None = None) -> str:
    """Where the operator's side is: the dashboard, metrics, health checks, the admin API and
    its token (the sandbox's own, when it made the ledger)."""
    how = (
        f"admin token {token}   (made for this sandbox's ledger only)"
        if token
        else f"admin token from: teegate admin token create --db {db}"
    )
    return f"""  dashboard: {admin}/dashboard/   sign in with the {how}
    (or with an API key: that key's own balance and usage, read-only)
  admin listener: {admin}/metrics (Prometheus), {admin}/readyz, {admin}/healthz
    admin API ({admin}/admin/v1/...): Authorization: Bearer <the admin token>
    key holders: GET {gateway}/v1/account with their key (balance, holds, usage)
"""


def _egress_banner(egress: str, ca: Path | None, upstream: str, key: str) -> str:
    """How to try egress mode: an unchanged app, its calls sent through the proxy.

    Egress is the half of teegate a new user cannot guess from the base_url example: which
    variables to set, which CA to trust and how each runtime is told (docs/egress.md has
    the long form). Python's ``SSL_CERT_FILE`` *replaces* its trust store and curl's
    ``--cacert`` replaces curl's, so both get a bundle; Node's ``NODE_EXTRA_CA_CERTS`` adds.
    Over ``--tls`` the simulated upstream is https, so the lines for it are the ones a real
    deployment uses (the gateway's CA, never the sandbox's own, is what the app trusts).
    """
    ca_text = str(ca) if ca else "$(teegate ca path -c proxy.toml)"
    tls = upstream.startswith("https:")
    model = "deepseek-ai/DeepSeek-V3.2-TEE"
    if tls:
        to_upstream = f"""\
          (refused 403: not confidential; the simulated upstream over https, intercepted:)
          curl --cacert teegate-bundle.pem -x {egress} {upstream}/v1/models \\
               -H 'authorization: Bearer {key}'"""
    else:
        to_upstream = f"""\
          (refused 403: not confidential; the simulated upstream is plain http, no CA needed:)
          curl -x {egress} {upstream}/v1/models -H 'authorization: Bearer {key}'
          (teegate sandbox --tls serves it over https, to try the interception end to end)"""
    app = ""
    if tls:
        app = f"""
  With those exported, an unchanged app (gated and billed; a model without TEE gets 400):
  python -c 'from openai import OpenAI; print(OpenAI(base_url="{upstream}/v1", api_key="{key}")\\
    .chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hi"}}])\\
    .choices[0].message.content)'"""
    return f"""
Egress mode (an unchanged app, its LLM calls sent through the gateway): {egress}
  export HTTPS_PROXY={egress} HTTP_PROXY={egress}
  unset NO_PROXY no_proxy   # or keep the upstream's host out of it: it would skip the gateway
  CA to trust: {ca_text}
    (this sandbox's own CA directory; for a configured gateway: teegate ca path -c proxy.toml)
  Python: cat "$(python -m certifi)" {ca_text} > teegate-bundle.pem
          export SSL_CERT_FILE=$PWD/teegate-bundle.pem REQUESTS_CA_BUNDLE=$PWD/teegate-bundle.pem
  curl:   curl --cacert teegate-bundle.pem -x {egress} https://api.openai.com/v1/models
          (or once: export CURL_CA_BUNDLE=$PWD/teegate-bundle.pem)
{to_upstream}
  Node:   export NODE_EXTRA_CA_CERTS={ca_text} NODE_USE_ENV_PROXY=1   # Node >= 22.21 / 24.5
          Node before 22 ignores HTTPS_PROXY without an agent: undici's EnvHttpProxyAgent
          (setGlobalDispatcher(new EnvHttpProxyAgent())) or the SDK's httpAgent.
  Then keep the upstream's own URL in the app: base_url={upstream}/v1 with the gateway key.{app}
"""
