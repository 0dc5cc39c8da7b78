"""The gateway tests use the shared sandbox and gateway processes (tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fresh_upstream(fresh_upstream: None) -> None:
    """Each test starts from a reset sandbox (its counters and behaviour)."""
