"""``teegate doctor``: check a setup the way a support engineer would, and print the fixes.

The gateway's side always (configuration, upstream and catalog, listeners, per-model
verdicts from the running gateway, the egress CA and that the listener presents it); the
client's side too (proxy variables, ``NO_PROXY``, the egress CA in Python's, curl's and Node's
trust), as warnings unless ``--client`` says this machine runs the apps, when they are
required. Exit status 0 only when nothing needed failed. The checks live in
``teegate.doctor``; this module only runs them in order and prints the report.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from teegate.doctor import client, gateway, trust
from teegate.doctor.report import Check, exit_status, render_json, render_text

KEY_ENV = "TEEGATE_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this setup and print how to fix what fails")
    p.add_argument("-c", "--config", type=Path, default=None, help="proxy.toml to check")
    p.add_argument(
        "--key",
        default=None,
        help=f"a gateway API key, to read per-model verdicts (default: ${KEY_ENV})",
    )
    p.add_argument(
        "--client",
        action="store_true",
        help="this machine runs the apps: its proxy variables and trust stores are required",
    )
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    checks = run_checks(args.config, env, key=args.key or env.get(KEY_ENV), client_side=args.client)
    print(render_json(checks) if args.json else render_text(checks))
    return exit_status(checks)


def run_checks(
    config_path: Path | None,
    env: Mapping[str, str],
    *,
    key: str | None = None,
    client_side: bool = False,
) -> list[Check]:
    env = dict(env)
    loaded, settings = gateway.load_config(config_path)
    checks = [loaded]
    if settings is None:
        return checks
    catalog, confidential = gateway.upstream_catalog(settings, env)
    checks.append(catalog)
    bound_checks, bound = gateway.listeners(settings)
    checks += bound_checks
    checks.append(gateway.verdicts(bound.get("reverse"), key, confidential))
    ca_check, ca = gateway.egress_ca(settings)
    checks.append(ca_check)
    checks.append(gateway.egress_ca_in_use(bound.get("egress"), ca, settings, key))
    if not settings.listen.egress:
        return checks
    which = shutil.which
    import certifi

    side = [client.proxy_variables(settings, env), client.no_proxy(settings, env)]
    if ca is not None:
        side += [
            trust.python_trust(ca, env, certifi.where()),
            trust.system_trust(ca),
            trust.curl_trust(ca, env, which, trust.run_output),
            trust.node_trust(ca, env, which),
        ]
    side.append(client.node_proxy(env, which, trust.run_output))
    return checks + [c.softened(client_side) for c in side]
