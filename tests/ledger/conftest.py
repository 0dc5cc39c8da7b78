"""Fixtures for the ledger tests: a fresh database per test, opened for serving.

Every test that takes ``db_path`` (or ``ledger``) runs twice: on an SQLite file
and on an emptied PostgreSQL database of the session's test cluster (one per
module, its schema dropped before each test), so both
stores keep the same promises. Tests of SQLite-only mechanics (its lock file,
PRAGMAs, in-memory holds) are marked ``sqlite_only``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from teegate.ledger import Ledger
from tests.support.postgres import Cluster

STORES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store" in metafunc.fixturenames:
        stores = ["sqlite"] if metafunc.definition.get_closest_marker("sqlite_only") else STORES
        metafunc.parametrize("store", stores)


@pytest.fixture(scope="module")
def pg_module_db(pg_cluster: Cluster) -> str:
    """This module's own PostgreSQL database (emptied before each test that uses it)."""
    return pg_cluster.new_database("ledger")


@pytest.fixture
def db_path(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if store == "postgresql":
        return request.getfixturevalue("pg_cluster").reset(request.getfixturevalue("pg_module_db"))
    return str(tmp_path / "ledger.sqlite3")


@pytest.fixture
async def ledger(db_path: str) -> AsyncIterator[Ledger]:
    led = await Ledger.open(db_path)
    try:
        yield led
    finally:
        await led.close()
