"""Authenticated keys by hash, so the request path rarely touches the database.

Only *active* keys are cached (a miss falls through to one indexed lookup, so
a key created a moment ago by the operator works at once). Entries leave the
cache when this process revokes a key, and the whole cache is dropped when
another process (the operator's command line) commits anything; see
:class:`teegate.ledger.ledger.Ledger` for the bound that gives.
"""

from __future__ import annotations

from cachetools import LRUCache

from teegate.ledger.models import ApiKey

MAX_CACHED_KEYS = 100_000


class KeyCache:
    def __init__(self, maxsize: int = MAX_CACHED_KEYS) -> None:
        self._by_hash: LRUCache[bytes, ApiKey] = LRUCache(maxsize=maxsize)

    def get(self, key_hash: bytes) -> ApiKey | None:
        return self._by_hash.get(key_hash)

    def put(self, key_hash: bytes, key: ApiKey) -> None:
        self._by_hash[key_hash] = key

    def drop_key(self, key_id: int) -> None:
        for digest in [h for h, k in self._by_hash.items() if k.key_id == key_id]:
            del self._by_hash[digest]

    def clear(self) -> None:
        self._by_hash.clear()

    def __len__(self) -> int:
        return len(self._by_hash)
