"""DCAP collateral: reading it, knowing how long it is good for, and caching PCCS fetches.

Collateral (TCB info, QE identity, CRLs and their issuer chains) is signed under the root the
quote is verified against, so where it comes from does not matter for authenticity; what
matters is freshness. Each piece has a ``nextUpdate``; the earliest one bounds both the cache
entry and any verdict made with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dcap_qvl
from cryptography import x509

Collateral = dcap_qvl.QuoteCollateralV3
CollateralInput = Collateral | Mapping[str, Any] | str
Fetcher = Callable[[str, bytes], Awaitable[Collateral]]


def load_collateral(value: CollateralInput) -> Collateral:
    """Collateral from dcap_qvl's object, its JSON text, or that JSON as a dict."""
    if isinstance(value, Collateral):
        return value
    if isinstance(value, Mapping):
        value = json.dumps(dict(value))
    if isinstance(value, str):
        return Collateral.from_json(value)
    raise TypeError(f"cannot read collateral from {type(value).__name__}")


def _rfc3339(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


@dataclass(frozen=True)
class Window:
    """When a collateral set is valid: latest issue date to earliest next update."""

    issued: int
    next_update: int


def collateral_window(collateral: Collateral) -> Window:
    """The validity window shared by every piece of the collateral."""
    issued: list[int] = []
    nexts: list[int] = []
    for doc in (collateral.tcb_info, collateral.qe_identity):
        body = json.loads(doc)
        issued.append(_rfc3339(body["issueDate"]))
        nexts.append(_rfc3339(body["nextUpdate"]))
    for der in (collateral.root_ca_crl, collateral.pck_crl):
        crl = x509.load_der_x509_crl(der)
        issued.append(int(crl.last_update_utc.timestamp()))
        if crl.next_update_utc is not None:
            nexts.append(int(crl.next_update_utc.timestamp()))
    return Window(issued=max(issued), next_update=min(nexts))


def cache_key(quote: bytes) -> str:
    """Collateral fetched for a quote may carry that platform's PCK chain, so it is shared
    only between quotes with the same embedded chain (and otherwise not at all)."""
    try:
        chain = dcap_qvl.parse_quote(quote).cert_chain_pem_bytes()
    except ValueError:
        chain = None
    return hashlib.sha256(b"chain:" + chain if chain else b"quote:" + quote).hexdigest()


class CollateralCache:
    """Collateral from a PCCS/PCS URL, kept until its earliest ``nextUpdate``."""

    def __init__(
        self,
        pccs_url: str,
        *,
        fetch: Fetcher = dcap_qvl.get_collateral,
        timeout_s: float = 30.0,
        max_entries: int = 256,
    ) -> None:
        self._url = pccs_url
        self._fetch = fetch
        self._timeout = timeout_s
        self._max = max_entries
        self._entries: dict[str, tuple[Collateral, int]] = {}
        self._inflight: dict[str, asyncio.Future[Collateral]] = {}
        self.fetches = 0

    async def get(self, quote: bytes, now: int) -> Collateral:
        """Collateral for ``quote`` that is still fresh at ``now`` (fetching when needed)."""
        key = cache_key(quote)
        hit = self._entries.get(key)
        if hit is not None and now < hit[1]:
            return hit[0]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Collateral] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            self.fetches += 1
            collateral = await asyncio.wait_for(self._fetch(self._url, quote), self._timeout)
            expires = collateral_window(collateral).next_update
            if len(self._entries) >= self._max:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (collateral, expires)
            fut.set_result(collateral)
            return collateral
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            del self._inflight[key]
