"""``teegate run --workers N``: N gateway processes on the same ports, kept alive.

One mitmproxy process uses one core (docs/bench.md); this runs N of them. The supervisor is a
small parent that serves nothing itself:

* it starts worker 1 (``teegate run --worker-id 1``), reads the addresses it bound (a
  configured port of 0 becomes a real one), then workers 2..N on exactly those addresses; each
  binds with ``SO_REUSEPORT`` (:mod:`teegate.listeners`) and the kernel spreads new connections
  over them. ``TEEGATE READY`` is printed only once every worker is up, so whatever waits for
  it (a test, a deploy script) can count on all N;
* a worker that exits while the supervisor is not stopping is replaced under the same worker
  id (the ledger's per-worker lock and crash recovery are keyed by it), after a back-off that
  grows while replacements keep dying young (a crash loop does not spin the CPU);
* SIGTERM or Ctrl-C is passed to every worker once: each closes its listeners and lets its
  requests in flight finish for ``workers.drain_s`` (addons/drain.py); a second signal is
  passed on too and stops them at once. Workers still alive ``drain_s`` + 10 s later are
  killed.

Workers run in their own session, so a terminal's Ctrl-C reaches them only through the
supervisor (once, not twice), and each asks the kernel to send it SIGTERM should the
supervisor die (:func:`die_with_parent`), so no worker outlives it.

Several workers need a ledger they all share: SQLite serves one process
(``ledger/lockfile.py``), so with it more than one worker is refused (:func:`refusal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from teegate.config import Settings

log = structlog.get_logger("teegate.supervisor")

READY_PREFIX = "TEEGATE READY "
RUNNING_LINE = "TEEGATE RUNNING"
START_TIMEOUT_S = 120.0
KILL_GRACE_S = 10.0
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
STABLE_AFTER_S = 30.0  # a worker that lived this long resets the back-off
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def shared_ledger(settings: Settings) -> bool:
    """Whether every worker can use the configured ledger at once (a PostgreSQL URL)."""
    url = getattr(settings.ledger, "url", None) or os.environ.get("TEEGATE_DB", "")
    return str(url).startswith(POSTGRES_SCHEMES)


def refusal(settings: Settings, count: int) -> str | None:
    """Why ``count`` workers cannot run with these settings, or None."""
    if count > 1 and not shared_ledger(settings):
        return (
            f"--workers {count} needs a ledger every worker shares: the SQLite ledger "
            f"({settings.ledger.path}) serves one process. Configure PostgreSQL "
            '(ledger.url = "postgresql://..." in proxy.toml, or $TEEGATE_DB), or run one worker.'
        )
    return None


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent (the supervisor) dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the supervisor's own stop path still signals its workers
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Worker:
    id: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    failures: int = 0
    ready: list[str] = field(default_factory=list)


class WorkerStartError(RuntimeError):
    pass


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        config_path: Path | None,
        count: int,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.workers = [Worker(i) for i in range(1, count + 1)]
        self._announce = announce or (lambda line: print(line, flush=True))
        self._listen: dict[str, str] = {}  # "reverse"/"egress" -> host:port, from worker 1
        self._stopping = False
        self._signals = 0
        self._stopped = asyncio.Event()

    # -- the life cycle ---------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            first, rest = self.workers[0], self.workers[1:]
            await self._start(first)
            self._listen = _addresses(first.ready)
            await asyncio.gather(*(self._start(w) for w in rest))
        except (WorkerStartError, OSError) as e:
            log.error("workers_start_failed", error=str(e))
            await self._stop_all()
            return 1
        if self._stopping:  # a signal arrived while starting
            await self._stop_all()
            return 0
        for line in first.ready:
            self._announce(line)
        self._announce(RUNNING_LINE)
        watchers = [asyncio.create_task(self._watch(w)) for w in self.workers]
        await self._stopped.wait()
        await self._stop_all()
        for t in watchers:
            t.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        return 0

    def _on_signal(self) -> None:
        self._signals += 1
        self._stopping = True
        self._stopped.set()
        if self._signals > 1:  # the second: the workers stop at once
            self._signal_all(signal.SIGTERM)

    async def _stop_all(self) -> None:
        self._stopping = True
        self._signal_all(signal.SIGTERM)
        live = [w.process for w in self.workers if w.process and w.process.returncode is None]
        if not live:
            return
        deadline = self.settings.workers.drain_s + KILL_GRACE_S
        await asyncio.wait([asyncio.create_task(p.wait()) for p in live], timeout=deadline)
        for p in live:
            if p.returncode is None:
                log.warning("worker_killed", pid=p.pid, after_s=deadline)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        log.info("workers_stopped", count=len(live))

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.process and w.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.process.send_signal(sig)

    # -- one worker -------------------------------------------------------------------

    def _command(self, worker: Worker) -> list[str]:
        cmd = [sys.executable, "-m", "teegate", "run", "--worker-id", str(worker.id)]
        if self.config_path is not None:
            cmd += ["-c", str(self.config_path)]
        for kind, address in self._listen.items():
            cmd += [f"--listen-{kind}", address]
        return cmd

    async def _start(self, worker: Worker) -> None:
        """Start ``worker`` and wait until it serves (its ``TEEGATE RUNNING`` line)."""
        worker.ready = []
        worker.started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *self._command(worker),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches workers through us only, once
            env={**os.environ, "TEEGATE_SUPERVISOR_PID": str(os.getpid())},
        )
        worker.process = proc
        assert proc.stdout is not None
        # A worker listens once warm (workers.warmup_s, addons/warmup.py): its start may take that
        # long on top of the process's own start.
        limit = START_TIMEOUT_S + self.settings.workers.warmup_s
        try:
            async with asyncio.timeout(limit):
                while True:
                    raw = await proc.stdout.readline()
                    if not raw:
                        code = await proc.wait()
                        raise WorkerStartError(f"worker {worker.id} exited with {code} at start")
                    line = raw.decode("utf-8", "replace").rstrip("\n")
                    if line.startswith(READY_PREFIX):
                        worker.ready.append(line)
                    elif line == RUNNING_LINE:
                        break
                    else:
                        self._announce(line)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise WorkerStartError(
                f"worker {worker.id} not ready within {limit:.0f}s"
            ) from None
        log.info("worker_started", worker=worker.id, pid=proc.pid)

    async def _watch(self, worker: Worker) -> None:
        """Relay the worker's output; replace it whenever it exits on its own."""
        while not self._stopping:
            proc = worker.process
            assert proc is not None and proc.stdout is not None
            async for raw in proc.stdout:
                self._announce(raw.decode("utf-8", "replace").rstrip("\n"))
            code = await proc.wait()
            if self._stopping:
                return
            lived = time.monotonic() - worker.started
            worker.failures = 0 if lived >= STABLE_AFTER_S else worker.failures + 1
            delay = BACKOFF_S[min(worker.failures, len(BACKOFF_S) - 1)]
            log.warning(
                "worker_exited",
                worker=worker.id,
                pid=proc.pid,
                code=code,
                lived_s=round(lived, 1),
                restart_in_s=delay,
            )
            while not self._stopping:
                await asyncio.sleep(delay)  # back-off before a replacement, not a race
                if self._stopping:
                    return
                try:
                    await self._start(worker)
                    break
                except (WorkerStartError, OSError) as e:
                    worker.failures += 1
                    delay = BACKOFF_S[min(worker.failures, len(BACKOFF_S) - 1)]
                    log.error("worker_restart_failed", worker=worker.id, error=str(e))


SHARED_LISTENERS = ("reverse", "egress")  # mitmproxy's listeners, bound with SO_REUSEPORT


def _addresses(ready_lines: list[str]) -> dict[str, str]:
    """``{"reverse": "127.0.0.1:8080", ...}`` from a worker's ``TEEGATE READY`` lines (only
    the listeners every worker shares)."""
    found = {}
    for line in ready_lines:
        kind, url = line[len(READY_PREFIX) :].split()
        if kind in SHARED_LISTENERS:
            found[kind] = url.removeprefix("http://")
    return found


def supervise(settings: Settings, config_path: Path | None, count: int) -> int:
    reason = refusal(settings, count)
    if reason is not None:
        print(f"teegate: {reason}", file=sys.stderr)
        return 2
    # Counters and histograms of every worker in files here, so worker 1's /metrics adds them up
    # (prometheus_client's multiprocess mode); gone with the supervisor.
    with tempfile.TemporaryDirectory(prefix="teegate-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        return asyncio.run(Supervisor(settings, config_path, count).run())
