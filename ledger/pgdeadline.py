"""The PostgreSQL ledger's request-path deadline: a silent server fails a request fast.

A database server that goes silent (its host vanished, a network partition: no RST, no
answer) would hold every request-path statement (key lookup, group commit, rate count)
until the kernel gives up on the connection (``tcp_user_timeout``, 30 s). :func:`bounded`
gives each such statement a deadline (``[ledger] statement_timeout_ms``) after which the
request fails closed (:class:`~teegate.ledger.errors.LedgerUnavailable`: 503
``billing_unavailable``) and the connection is severed, so the existing reconnect path
replaces it; :func:`request_path_settings` are the server-side twins.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable
from typing import Any

import structlog

from teegate.ledger.errors import LedgerUnavailable

log = structlog.get_logger("teegate.ledger")


def request_path_settings(deadline_s: float | None, *, statements: bool) -> dict[str, str]:
    """Server-side twins of the request path's client-side deadline (see :func:`bounded`).

    ``idle_in_transaction_session_timeout``: a client that went silent inside BEGIN ... COMMIT
    (an operator write on a serving worker) holds its row locks -- an account's row blocks
    every worker's reservations for that account -- until the keepalives give up (~30 s);
    with this the server ends that session once the client is as late as its own deadline.
    ``statement_timeout`` (``statements=True``, the writing connection, whose statements are
    all short request-path ones): a statement the client has given up on (a group commit
    stuck behind a lock) is cancelled and rolled back by the server instead of running on
    for nobody, and may then not commit after its caller was refused. Not on the reading
    connection: its sweeps and reports may rightly take longer.
    """
    if deadline_s is None:
        return {}
    ms = str(max(1, round(deadline_s * 1000)))
    out = {"idle_in_transaction_session_timeout": ms}
    if statements:
        out["statement_timeout"] = ms
    return out


def sever(conn: Any) -> None:
    """Shut the connection's socket down (both ways) under psycopg's feet.

    A statement that had no answer in time may still be running on the server: the
    connection must never carry another one. Shutting the socket (not closing the file
    descriptor, which the event loop still watches) makes psycopg's pending read end at once
    with an ``OperationalError`` and the connection ``broken``, so the existing reconnect
    path replaces it; a query cancel would instead open a new connection to the silent host.
    """
    with contextlib.suppress(Exception):
        dup = os.dup(conn.pgconn.socket)
        sock = socket.socket(fileno=dup)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


async def bounded[T](conn: Any, aw: Awaitable[T], deadline_s: float | None, what: str) -> T:
    """``aw`` (statements on ``conn``), or :class:`LedgerUnavailable` after ``deadline_s``.

    A silent server (host gone, network partition: no RST, no answer) would otherwise hold
    the request until the kernel gives up (``tcp_user_timeout``, 30 s). On the deadline the
    connection is severed (:func:`sever`), so it is broken and replaced, never reused with a
    statement perhaps still in flight; whether that statement committed is unknown (callers
    treat a reservation so failed as in doubt, like any lost connection). An answer that
    arrived all the same is returned.

    Why a timer and not :func:`asyncio.wait_for`: cancelling a psycopg statement makes it
    send a cancel request over a new connection to the silent host; and the request path
    awaits this on every statement, where an extra task and waiter cost a turn of the event
    loop each (~75 us of CPU, more under load). Should psycopg not notice the severed socket,
    the wait is cancelled one second later.
    """
    if deadline_s is None:
        return await aw
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    state: dict[str, asyncio.TimerHandle | bool] = {}

    def expire() -> None:
        state["expired"] = True
        sever(conn)
        if task is not None:
            state["fallback"] = loop.call_later(1.0, _cancel, task, state)

    timer = loop.call_later(deadline_s, expire)
    try:
        return await aw
    except (Exception, asyncio.CancelledError) as e:
        if not state.get("expired"):
            raise
        if isinstance(e, asyncio.CancelledError):
            if not state.get("cancelled") or task is None:
                raise  # somebody else's cancel
            task.uncancel()
        log.error("ledger.deadline_passed", what=what, deadline_ms=round(deadline_s * 1000))
        raise LedgerUnavailable(f"{what}: no answer within {round(deadline_s * 1000)} ms") from None
    finally:
        timer.cancel()
        fallback = state.get("fallback")
        if isinstance(fallback, asyncio.TimerHandle):
            fallback.cancel()


def _cancel(task: asyncio.Task[Any], state: dict[str, Any]) -> None:
    state["cancelled"] = True
    task.cancel()
