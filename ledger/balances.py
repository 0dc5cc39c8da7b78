"""In-memory available balances: the committed balance plus uncommitted holds.

The proxy process checks and debits balances here, synchronously (no await
between the check and the debit), so concurrent reservations cannot overdraw
an account however the event loop interleaves them.

Two numbers per account:

* ``committed`` -- the cached balance as last read from the database, read
  under the write lock at each group commit (touched accounts) or refresh
  (all accounts), so it includes other processes' top-ups;
* ``held`` -- debits this process has made in memory whose entries are not
  committed yet (a queued reservation; the part of a settlement above its
  reservation). Credits (a release, the unused part of a reservation) are
  *not* applied early: they become available only once committed, so a crash
  can never have let a request spend money that recovery then takes back.
"""

from __future__ import annotations

from collections import defaultdict


class Balances:
    def __init__(self) -> None:
        self._committed: dict[int, int] = {}
        self._held: defaultdict[int, int] = defaultdict(int)

    def known(self, account_id: int) -> bool:
        return account_id in self._committed

    def available(self, account_id: int) -> int:
        return self._committed[account_id] - self._held.get(account_id, 0)

    def hold(self, account_id: int, amount: int) -> None:
        self._held[account_id] += amount

    def unhold(self, account_id: int, amount: int) -> None:
        self._held[account_id] -= amount

    def committed(self, released_holds: dict[int, int], balances: dict[int, int]) -> None:
        """A group commit landed: its holds are now part of the committed balances."""
        for account_id, amount in released_holds.items():
            self._held[account_id] -= amount
        self._committed.update(balances)

    def set_committed(self, account_id: int, balance: int) -> None:
        self._committed[account_id] = balance

    def reload(self, balances: dict[int, int]) -> None:
        """Replace every committed balance (nothing of ours is mid-commit)."""
        self._committed = dict(balances)
