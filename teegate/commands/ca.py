"""``teegate ca path``: where the egress listener's CA certificate is, for trust stores.

Apps that reach LLM APIs through the egress listener see certificates this CA signed, so
they must trust it (``SSL_CERT_FILE``, ``NODE_EXTRA_CA_CERTS``, ``curl --cacert``; see
docs/egress.md). The CA lives in ``egress.confdir``; the command creates it there if the
gateway has not started yet, so the file can be distributed before the first start.
Only the certificate's path is printed: the private key stays in the directory, owner-only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from teegate import config
from teegate.egress.ca import CAError, ensure_ca
from teegate.runner import intercepted_hosts


def register(sub: argparse._SubParsersAction) -> None:
    ca = sub.add_parser("ca", help="the egress listener's certificate authority")
    actions = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    path = actions.add_parser(
        "path", help="print the CA certificate's path (creating the CA if absent)"
    )
    path.add_argument(
        "-c", "--config", type=Path, default=None, help="proxy.toml (default: built-in defaults)"
    )
    path.set_defaults(func=_path)


def _path(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args.config)
        cert = ensure_ca(settings.egress.confdir, intercepted_hosts(settings))
    except config.ConfigError as e:
        print(f"teegate: {e}", file=sys.stderr)
        return 2
    except CAError as e:
        print(f"teegate: egress CA: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"teegate: cannot create the CA in {settings.egress.confdir}: {e}", file=sys.stderr)
        return 1
    print(cert.resolve())
    return 0
