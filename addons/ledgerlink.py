"""The one :class:`teegate.ledger.Ledger` the request path shares.

The ledger is opened before the proxy starts listening (so a locked or too-new
database stops the start) and closed after it stops (so every queued
settlement is committed); addons only hold this link to it.
"""

from __future__ import annotations

from teegate.ledger import Ledger


class LedgerLink:
    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger

    def get(self) -> Ledger:
        if self.ledger is None:
            raise RuntimeError("the ledger is not open")
        return self.ledger
