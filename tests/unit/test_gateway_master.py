"""GatewayMaster's hook index calls hooks exactly as mitmproxy's own addon manager would."""

from __future__ import annotations

from typing import Any

from mitmproxy import exceptions, hooks, options
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import tflow

from teegate.master import GatewayMaster


class Recorder:
    def __init__(self, name: str, calls: list[str], fail: bool = False, halt: bool = False):
        self.name, self.calls, self.fail, self.halt = name, calls, fail, halt

    async def request(self, flow: Any) -> None:
        self.calls.append(self.name)
        if self.fail:
            raise RuntimeError("boom")
        if self.halt:
            raise exceptions.AddonHalt


class Parent:
    """An addon with a child addon: the child's hook runs right after the parent's."""

    def __init__(self, calls: list[str]) -> None:
        self.name = "parent"
        self.calls = calls
        self.addons = [Recorder("child", calls)]

    def request(self, flow: Any) -> None:
        self.calls.append("parent")


async def test_hooks_run_in_chain_order_on_implementers_only() -> None:
    calls: list[str] = []
    m = GatewayMaster(options.Options())
    m.addons.add(Recorder("a", calls), Parent(calls), Recorder("b", calls))
    await m.addons.trigger_event(hooks.UpdateHook([]))  # nobody implements it: nothing happens
    await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
    assert calls == ["a", "parent", "child", "b"]


async def test_an_addon_added_later_is_called() -> None:
    calls: list[str] = []
    m = GatewayMaster(options.Options())
    m.addons.add(Recorder("a", calls))
    await m.addons.trigger_event(HttpRequestHook(tflow.tflow()))
    m.addons.add(Recorder("late", calls))
    await m.addons.trigger_event(HttpRequestHook(tflow.tflow()))
    assert calls == ["a", "a", "late"]


async def test_removed_addon_is_not_called() -> None:
    calls: list[str] = []
    m = GatewayMaster(options.Options())
    gone = Recorder("gone", calls)
    m.addons.add(Recorder("a", calls), gone)
    await m.addons.trigger_event(HttpRequestHook(tflow.tflow()))
    m.addons.remove(gone)
    await m.addons.trigger_event(HttpRequestHook(tflow.tflow()))
    assert calls == ["a", "gone", "a"]


async def test_a_raising_addon_does_not_stop_the_next_and_halt_stops_all(caplog) -> None:
    calls: list[str] = []
    m = GatewayMaster(options.Options())
    m.addons.add(
        Recorder("raises", calls, fail=True),
        Recorder("after", calls),
        Recorder("halts", calls, halt=True),
        Recorder("never", calls),
    )
    await m.addons.trigger_event(HttpRequestHook(tflow.tflow()))
    assert calls == ["raises", "after", "halts"]
    assert "Addon error" in caplog.text


async def test_only_the_gateway_builtins_are_mounted() -> None:
    m = GatewayMaster(options.Options())
    names = {type(a).__name__ for a in m.addons.chain}
    assert {"Proxyserver", "NextLayer", "TlsConfig", "Block", "ErrorCheck"} <= names
    assert not names & {"Onboarding", "ServerPlayback", "MapLocal", "ModifyHeaders", "Dumper"}


def test_objects_alive_at_start_are_frozen_out_of_the_collectors_sight() -> None:
    import gc

    from teegate.master import FreezeStartupObjects

    gc.unfreeze()
    startup_object = {"lives": "for the whole process"}
    try:
        FreezeStartupObjects().running()
        assert gc.get_freeze_count() > 0
        assert not any(o is startup_object for o in gc.get_objects())  # not in any generation
    finally:
        gc.unfreeze()
