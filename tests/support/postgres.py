"""A throwaway PostgreSQL cluster for the tests: real server, Unix socket only.

The tests run as root and PostgreSQL refuses to, so ``initdb`` and ``pg_ctl``
run as the unprivileged ``postgres`` user (created by the ``postgresql`` Debian
package, which ``scripts/setup-test-deps.sh`` installs) through ``runuser``. The cluster
lives in a temporary directory, listens on no TCP port, trusts local
connections and runs with ``fsync=off`` (it is thrown away; the tests check
what the ledger commits, not the disk). One cluster per test session
(:func:`start_cluster`, ~1-2 s); each test module or test takes its own
database from it (:meth:`Cluster.new_database`), emptied again between tests
(:meth:`Cluster.reset`: each new database costs ~8 MB and up to a second here).

It never skips: when the binaries or the user are missing the fixture fails
with a message saying how to install them, in CI and locally alike.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def _pg_bin() -> Path:
    """$TEEGATE_PG_BIN, else the newest /usr/lib/postgresql/<version>/bin (Debian's layout)."""
    if os.environ.get("TEEGATE_PG_BIN"):
        return Path(os.environ["TEEGATE_PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
PG_USER = "postgres"
INSTALL_HINT = (
    "the PostgreSQL tests need PostgreSQL (15 or later) server binaries in {bin} and a 'postgres' "
    "system user: run scripts/setup-test-deps.sh (it installs the 'postgresql' package with apt), "
    "or set TEEGATE_PG_BIN"
)


class PostgresUnavailable(RuntimeError):
    """The test cluster could not be started (the message says why and what to install)."""


@dataclass
class Cluster:
    root: Path
    socket_dir: Path
    options: str = ""
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: every session ends at once, as in a restart or failover).

        Only for a cluster a test module owns: the session's cluster serves other modules."""
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-m", mode,
                     "-w", "stop")  # fmt: skip

    def start(self) -> None:
        _as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-o", self.options,
            "-l", str(self.root / "server.log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@/{database}?host={self.socket_dir}"

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')
        return self.url(name)

    def reset(self, url: str) -> str:
        """Empty a database again (cheaper than a new one): end its other sessions (and with
        them any advisory locks), then drop and recreate its public schema."""
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")
        return url


def _as_postgres(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", PG_USER, "--", *args],
        check=check,
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextmanager
def start_cluster(*, fsync: bool = False) -> Iterator[Cluster]:
    """initdb + pg_ctl start in a temporary directory; stopped and removed afterwards.

    ``fsync=True`` keeps PostgreSQL's durable defaults (for measuring, not testing)."""
    if not (PG_BIN / "initdb").is_file() or shutil.which("runuser") is None:
        raise PostgresUnavailable(INSTALL_HINT.format(bin=PG_BIN))
    try:
        import pwd

        pwd.getpwnam(PG_USER)
    except KeyError:
        raise PostgresUnavailable(INSTALL_HINT.format(bin=PG_BIN)) from None
    root = Path(tempfile.mkdtemp(prefix="teegate-pg-"))
    os.chmod(root, 0o755)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    shutil.chown(root, PG_USER)
    shutil.chown(sock, PG_USER)
    started = False
    try:
        try:
            _as_postgres(
                str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER,
                "--no-sync", "-E", "UTF8", "--locale=C",
            )  # fmt: skip
            options = (
                f"-k {sock} -c listen_addresses='' -c max_connections=200 -c shared_buffers=32MB"
                + ("" if fsync else " -c fsync=off -c full_page_writes=off")
            )
            _as_postgres(
                str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options,
                "-l", str(root / "server.log"), "-w", "-t", "60", "start",
            )  # fmt: skip
        except subprocess.CalledProcessError as e:
            log = root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PostgresUnavailable(
                f"could not start the test PostgreSQL cluster: {e.stderr.strip()}\n{tail}"
            ) from None
        started = True
        yield Cluster(root, sock, options)
    finally:
        if started:
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop",
                         check=False)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def cluster_or_fail() -> Iterator[Cluster]:
    """:func:`start_cluster` for a fixture: the test fails (never skips) when it cannot start."""
    import pytest

    try:
        with start_cluster() as cluster:
            yield cluster
    except PostgresUnavailable as e:
        pytest.fail(str(e), pytrace=False)
