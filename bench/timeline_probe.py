"""``teegate run`` with a timeline probe: where one request's time goes before it leaves.

``python -m bench.timeline_probe run -c proxy.toml`` is ``teegate run`` with a marker addon
between every two addons of the chain (and one at its end). Each marker stamps the wall clock
as the ``request`` hook reaches it, so the gap between two markers is what the addon between
them took, awaits included (the key lookup in Auth, the reservation commit in Billing, and the
wait for the event loop to resume each). With mitmproxy's own timestamps (request read,
upstream connection, first response byte) and the first relayed chunk, one record per flow is
written as JSON lines to ``$TEEGATE_TIMELINE_OUT`` when the gateway stops. Used by
:mod:`bench.timeline`; measurement only, never part of the product.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import http

_marks: dict[str, list[tuple[str, float]]] = {}
_records: list[dict[str, Any]] = []


class Mark:
    """Stamps the time the ``request`` hook reached this point of the chain."""

    def __init__(self, before: str) -> None:
        self.before = before
        self.name = f"timeline_mark_{before}"

    def request(self, flow: http.HTTPFlow) -> None:
        _marks.setdefault(flow.id, []).append((self.before, time.time()))


class Finish:
    """Last in the chain: the first relayed chunk, then the flow's record."""

    name = "timeline_finish"

    def request(self, flow: http.HTTPFlow) -> None:
        _marks.setdefault(flow.id, []).append(("(end of chain)", time.time()))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        inner = flow.response.stream if flow.response else None
        if not callable(inner):
            return
        first: list[float] = []

        def stream(data: bytes) -> bytes | list[bytes]:
            out = inner(data)
            if not first and out:
                first.append(time.time())
                _marks.setdefault(flow.id, []).append(("first chunk relayed", first[0]))
            return out

        flow.response.stream = stream

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def _record(self, flow: http.HTTPFlow) -> None:
        marks = _marks.pop(flow.id, [])
        t0 = flow.request.timestamp_start
        rec: dict[str, Any] = {
            "path": flow.request.path,
            "status": flow.response.status_code if flow.response else None,
            "request_read": _ms(flow.request.timestamp_end, t0),
            "marks": [(name, _ms(t, t0)) for name, t in marks],
        }
        sc = flow.server_conn
        if sc is not None:
            rec["upstream_connect_start"] = _ms(sc.timestamp_start, t0)
            rec["upstream_connected"] = _ms(sc.timestamp_tcp_setup, t0)
        if flow.response is not None:
            rec["upstream_first_byte"] = _ms(flow.response.timestamp_start, t0)
        _records.append(rec)

    def done(self) -> None:
        out = os.environ.get("TEEGATE_TIMELINE_OUT")
        if out:
            with open(out, "a", encoding="utf-8") as f:
                for rec in _records:
                    f.write(json.dumps(rec) + "\n")
            _write_commits(out)


def _ms(t: float | None, t0: float | None) -> float | None:
    return None if t is None or t0 is None else round((t - t0) * 1000, 3)


def _probed(build: Any) -> Any:
    def build_addons(*args: Any, **kwargs: Any) -> list[Any]:
        chain = []
        for addon in build(*args, **kwargs):
            chain += [Mark(type(addon).__name__), addon]
        return [*chain, Finish()]

    return build_addons


_commits: list[dict[str, Any]] = []


def _probe_ledger() -> None:
    """Stamps each group commit: queued (first submit), drain started, on the database
    thread, COMMIT done, waiters resumed on the loop; one record per batch in the output."""
    from teegate.ledger import store as store_mod
    from teegate.ledger import writer as writer_mod

    pending: list[float] = []  # submit times of reservations not yet in a batch
    submit = writer_mod.GroupCommitter.submit

    if os.environ.get("TEEGATE_TIMELINE_BEFORE") == "1":
        defer_drain_start()  # the reservation path as before session 6 (bench.timeline --before)

    def probed_submit(self: Any, op: Any, hold: int, *, wait: bool) -> Any:
        if wait:
            pending.append(time.time())
        return submit(self, op, hold, wait=wait)

    commit = writer_mod.GroupCommitter._commit

    async def probed_commit(self: Any, batch: list[Any]) -> None:
        waiting = sum(1 for i in batch if i.future is not None)
        rec: dict[str, Any] = {"size": len(batch), "reservations": waiting}
        submitted = pending[:waiting]
        del pending[:waiting]
        rec["t_first_submit"] = min(submitted) if submitted else None
        rec["t_drain"] = time.time()
        _current.append(rec)
        try:
            await commit(self, batch)
        finally:
            _current.remove(rec)
            rec["t_resumed"] = time.time()
            _commits.append(rec)

    run_on = store_mod.run_on_connection

    async def probed_run_on(db: Any, fn: Any) -> Any:
        rec = _current[-1] if _current else {}
        rec["t_call"] = time.time()

        def timed(conn: Any) -> Any:
            rec["t_thread"] = time.time()
            try:
                return fn(conn)
            finally:
                rec["t_thread_end"] = time.time()

        return await run_on(db, timed)

    writer_mod.GroupCommitter.submit = probed_submit
    writer_mod.GroupCommitter._commit = probed_commit
    store_mod.run_on_connection = probed_run_on


_current: list[dict[str, Any]] = []


def defer_drain_start() -> Callable[[], None]:
    """A/B: a waited-for commit starts one loop iteration after its submit (``call_soon``), as
    before session 6, instead of at once (:meth:`teegate.ledger.commitqueue.CommitQueue._kick`).
    Returns the function that switches it back."""
    import asyncio

    from teegate.ledger.commitqueue import CommitQueue

    kick = CommitQueue._kick

    def deferred_kick(self: Any) -> None:
        if self._waiting and not self._stopping and self._drainer is None and self._queue:
            if getattr(self, "_deferred", None) is None:

                def start() -> None:
                    self._deferred = None
                    kick(self)

                self._deferred = asyncio.get_running_loop().call_soon(start)
            return
        kick(self)

    CommitQueue._kick = deferred_kick  # type: ignore[method-assign]

    def restore() -> None:
        CommitQueue._kick = kick  # type: ignore[method-assign]

    return restore


def _write_commits(out: str) -> None:
    with open(out + ".commits", "a", encoding="utf-8") as f:
        for rec in _commits:
            f.write(json.dumps(rec) + "\n")


def main() -> int:
    from teegate import cli, runner

    runner.build_addons = _probed(runner.build_addons)
    _probe_ledger()
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
