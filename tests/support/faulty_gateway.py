"""``python -m tests.support.faulty_gateway run -c proxy.toml``: the real gateway with one fault
injected (chosen by ``TEEGATE_FAULT``), to prove each one fails closed.

* ``stage:NAME``: the addon of stage NAME raises at the moment it would approve the flow (inside
  its guarded hook): its guard must refuse with 500 and nothing may go upstream.
* ``hook:NAME``: the request hook of stage NAME's addon is replaced by one that raises *outside*
  the guard, as an unguarded addon would: mitmproxy then forwards the request, unless the
  ``Seal`` at the end of the chain refuses it for the missing approval.
* ``ledger``: every reservation fails as a broken database would: 503 ``billing_unavailable``.
* ``response:PATH``: every guarded response-side hook (``responseheaders``, ``response``,
  ``error``) of the addons ``teegate.runner.build_addons`` mounts, and the stream relay's
  callable, raise *inside* their guard whenever the file PATH names them
  (``AnswerModelCheck.response``, ``_Relay.__call__``, one per line; read at each call, so one
  gateway serves every case): the guard must withhold the answer, or end the stream with an
  error event.
* ``per-request``: every ``stage:`` and ``hook:`` fault is armed, and a request trips the one
  its ``x-teegate-test-fault`` header names (``stage:auth``, ``hook:gate``...); a request
  without it passes untouched. One process then serves every such test, instead of one
  gateway start (~2 s of CPU) per fault.
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


FAULT_HEADER = "x-teegate-test-fault"


class InjectedFault(RuntimeError):
    pass


def _always(flow, fault: str) -> bool:
    return True


_named: dict[str, str | None] = {}  # flow id -> the fault its header named


def _named_by_header(flow, fault: str) -> bool:
    # Read once, at the first armed hook (Auth's, before anything rewrites the headers):
    # UpstreamRewrite replaces them before its own stage would trip.
    if flow.id not in _named:
        _named[flow.id] = flow.request.headers.get(FAULT_HEADER)
    return _named[flow.id] == fault


def _fail_stage(name: str, trips=_always) -> None:
    broken = Stage(name)
    real = flowstate.passed

    def passed(flow, stage: Stage) -> None:
        if stage == broken and trips(flow, f"stage:{broken}"):
            raise InjectedFault(stage)
        real(flow, stage)

    flowstate.passed = passed


def _fail_hook(name: str, trips=_always) -> None:
    import importlib

    module, cls = STAGE_ADDONS[Stage(name)]
    addon = getattr(importlib.import_module(module), cls)
    assert hasattr(addon, "request"), f"{cls}.request is gone: update the fault injection"
    real = addon.request

    def request(self, flow):
        # Raises synchronously, outside any guard, as an unguarded addon would; otherwise
        # returns what the real hook returns (a coroutine for an async one: mitmproxy awaits it).
        if trips(flow, f"hook:{Stage(name)}"):
            raise InjectedFault(name)
        return real(self, flow)

    addon.request = request


def _fail_ledger() -> None:
    from teegate.ledger import Ledger, LedgerError

    async def reserve(self, *args, **kwargs):
        raise LedgerError("injected fault")

    Ledger.reserve = reserve


def _switched_on(switch: str, name: str) -> bool:
    try:
        with open(switch, encoding="utf-8") as f:
            return name in f.read().split()
    except FileNotFoundError:
        return False


def _raising(fn, switch: str, name: str):
    def faulty(*args, **kwargs):
        if _switched_on(switch, name):
            raise InjectedFault(name)
        return fn(*args, **kwargs)

    return faulty


def _fail_responses(switch: str) -> None:
    from teegate.addons.response_guard import RESPONSE_HOOKS, is_guarded
    from teegate.addons.streaming import _Relay
    from teegate.config import Settings
    from teegate.runner import build_addons

    classes = {type(addon) for addon in build_addons(Settings())}  # what the gateway mounts
    patched = 0
    for cls in classes:
        for hook in RESPONSE_HOOKS:
            fn = cls.__dict__.get(hook)
            if fn is not None and is_guarded(fn):
                fn.__wrapped__ = _raising(fn.__wrapped__, switch, f"{cls.__name__}.{hook}")
                patched += 1
    assert patched >= 20, f"only {patched} guarded response hooks found: update the injection"
    _Relay.__call__ = _raising(_Relay.__call__, switch, "_Relay.__call__")


def inject(fault: str) -> None:
    kind, _, name = fault.partition(":")
    if kind == "stage":
        _fail_stage(name)
    elif kind == "hook":
        _fail_hook(name)
    elif kind == "ledger":
        _fail_ledger()
    elif kind == "response":
        _fail_responses(name)
    elif kind == "per-request":
        for stage in STAGE_ADDONS:
            _fail_stage(stage, _named_by_header)
            _fail_hook(stage, _named_by_header)
    else:
        raise SystemExit(f"unknown TEEGATE_FAULT {fault!r}")


if __name__ == "__main__":
    inject(os.environ["TEEGATE_FAULT"])
    from teegate.cli import main

    sys.exit(main())
