"""Billing through the real gateway, sandbox upstream and ledger file: the shared processes
(tests/conftest.py), the sandbox reset before each test."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fresh_upstream(fresh_upstream: None) -> None:
    """Each test starts from a reset sandbox (its counters and behaviour)."""
