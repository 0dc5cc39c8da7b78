"""``python -m tests.support.faulty_gateway run -c proxy.toml``: the real gateway with one fault
injected (chosen by ``TEEGATE_FAULT``), to prove each one fails closed.

* ``stage:NAME``: the addon of stage NAME raises at the moment it would approve the flow (inside
  its guarded hook): its guard must refuse with 500 and nothing may go upstream.
* ``hook:NAME``: the request hook of stage NAME's addon is replaced by one that raises *outside*
  the guard, as an unguarded addon would: mitmproxy then forwards the request, unless the
  ``Seal`` at the end of the chain refuses it for the missing approval.
* ``ledger``: every reservation fails as a broken database would: 503 ``billing_unavailable``.
"""

from __future__ import annotations

import os
import sys

from teegate.addons import flowstate  # the addons call ``flowstate.passed`` through the module
from teegate.addons.flowstate import Stage

# Which addon class approves each stage (the ``hook:`` faults replace its ``request``).
STAGE_ADDONS = {
    Stage.AUTH: ("teegate.addons.auth", "Auth"),
    Stage.RATELIMIT: ("teegate.addons.ratelimit", "RateLimit"),
    Stage.VALIDATE: ("teegate.addons.validate", "ChatValidator"),
    Stage.GATE: ("teegate.addons.gate", "Gate"),
    Stage.ATTESTATION: ("teegate.addons.attestation_gate", "AttestationGate"),
    Stage.BILLING: ("teegate.addons.billing", "Billing"),
    Stage.UPSTREAM: ("teegate.addons.upstream", "UpstreamRewrite"),
}


class InjectedFault(RuntimeError):
    pass


def _fail_stage(name: str) -> None:
    broken = Stage(name)
    real = flowstate.passed

    def passed(flow, stage: Stage) -> None:
        if stage == broken:
            raise InjectedFault(stage)
        real(flow, stage)

    flowstate.passed = passed


def _fail_hook(name: str) -> None:
    import importlib

    module, cls = STAGE_ADDONS[Stage(name)]
    addon = getattr(importlib.import_module(module), cls)
    assert hasattr(addon, "request"), f"{cls}.request is gone: update the fault injection"

    def request(self, flow) -> None:
        raise InjectedFault(name)

    addon.request = request


def _fail_ledger() -> None:
    from teegate.ledger import Ledger, LedgerError

    async def reserve(self, *args, **kwargs):
        raise LedgerError("injected fault")

    Ledger.reserve = reserve


def inject(fault: str) -> None:
    kind, _, name = fault.partition(":")
    if kind == "stage":
        _fail_stage(name)
    elif kind == "hook":
        _fail_hook(name)
    elif kind == "ledger":
        _fail_ledger()
    else:
        raise SystemExit(f"unknown TEEGATE_FAULT {fault!r}")


if __name__ == "__main__":
    inject(os.environ["TEEGATE_FAULT"])
    from teegate.cli import main

    sys.exit(main())
