"""One chute's verified instances and their single-use nonce tokens, handed out per request.

Why a pool: every E2EE request needs an instance whose quote binds its key AND one unused
nonce token for it. Tokens come only from ``/e2e/instances`` (about 10 calls a minute, 5
instances x 10 tokens each, 60 s lifetime), so they are fetched ahead of demand (below a
low-water mark), spread round-robin over verified instances, and dropped before they expire.

Invariants (fail closed):

- A ticket names an instance whose latest :class:`InstanceVerdict` is ``ok``, unexpired, and
  for exactly the key the latest discovery showed. A key change seen at discovery makes the
  instance unusable (its old tokens dropped) until a fresh evidence fetch verifies the new key.
- ``failed(ticket, sent=...)`` withdraws the instance (tokens and verdict) until verified
  again by evidence requested after the withdrawal (an evidence fetch already in flight does
  not count); the caller may retry elsewhere only when nothing was sent.
- No verified instance: :class:`NoAttestedInstance`, and nothing is sent anywhere.

Clock, sleep, fetcher and verifier are injected, so tests drive the pool without sleeping.

Why this module is long: the invariants above are kept jointly by ``acquire``, ``failed``,
``refill`` and the upkeep loop over one shared state (keys, tokens, verdicts); split apart,
each part would have to be read with the others to see that no stale key is ever used.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import httpx
import structlog

from teegate.catalog.attestation.chutes import (
    ChutesEvidenceClient,
    ChutesVerifier,
    Discovery,
    model_verdict,
)
from teegate.catalog.attestation.collateral import CollateralCache
from teegate.catalog.attestation.policy import Policy
from teegate.catalog.attestation.source import EvidenceFetchError
from teegate.catalog.attestation.verdict import InstanceVerdict, Verdict

log = structlog.get_logger("teegate.chutes.pool")

FailureKind = Literal["token", "instance"]


class ChutesFetcher(Protocol):
    """Discovery and evidence from the Chutes API (:class:`ChutesEvidenceClient`)."""

    async def instances(self, chute_id: str) -> Discovery: ...

    async def evidence(self, chute_id: str, nonce_hex: str) -> dict[str, Any]: ...


InstanceVerifier = Callable[
    [str, Mapping[str, str], dict[str, Any], str], Awaitable[list[InstanceVerdict]]
]
"""(model, {instance id: base64 key}, evidence as received, nonce hex) -> a verdict each
(:class:`ChutesVerifier`)."""


class NoAttestedInstance(Exception):
    """No verified instance can take the request now: refuse it, send nothing."""

    code = "no_attested_instance"


class TokensExhausted(NoAttestedInstance):
    """Verified instances exist but none has an unused nonce token within the wait."""

    code = "attested_instance_busy"


@dataclass(frozen=True)
class Ticket:
    """What one request may use: an instance, the key its quote binds, one nonce token."""

    chute_id: str
    instance_id: str
    e2e_pubkey: str
    nonce: str
    expires_at: float


@dataclass(frozen=True)
class PoolSettings:
    discovery_interval_s: float = 6.0
    """At most one ``/e2e/instances`` call per this many seconds (upstream: ~10 a minute)."""
    evidence_interval_s: float = 6.0
    """At most one evidence fetch per this many seconds."""
    low_water: int = 10
    """Fetch more tokens in the background when fewer usable ones remain."""
    token_margin_s: float = 5.0
    """Drop a token this long before it expires, so it is not refused in flight."""
    max_wait_s: float = 6.0
    """How long ``acquire`` waits for tokens when verified instances have none left."""
    reverify_interval_s: float = 600.0
    """Re-verify a verified instance after this long (its verdict expires later, with grace)."""
    forget_after_s: float = 900.0
    """Forget an instance not seen at discovery for this long (and holding no tokens)."""


class InstancePool:
    """Verified instances of one chute, and their tokens."""

    def __init__(
        self,
        model: str,
        chute_id: str,
        *,
        fetcher: ChutesFetcher,
        verifier: InstanceVerifier,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        settings: PoolSettings | None = None,
        root: Literal["intel", "test"] = "intel",
        retry_interval_s: int = 60,
        on_verdict: Callable[[Verdict], None] | None = None,
    ) -> None:
        self.model = model
        self.chute_id = chute_id
        self._fetcher = fetcher
        self._verify = verifier
        self._clock = clock
        self._sleep = sleep
        self.settings = settings or PoolSettings()
        self._root = root
        self._retry_s = retry_interval_s
        self._keys: dict[str, str] = {}
        self._seen_at: dict[str, float] = {}
        self._tokens: dict[str, deque[tuple[str, float]]] = {}
        self._verdicts: dict[str, InstanceVerdict] = {}
        # Withdrawals are numbered: an evidence fetch started before an instance's withdrawal
        # must not verify it again (see ``_verify_known``).
        self._withdrawals = 0
        self._withdrawn: dict[str, int] = {}
        self._rr = 0
        self._last_discovery = -math.inf
        self._last_evidence = -math.inf
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._on_verdict = on_verdict
        self._attempted = False
        self._emitted: tuple[Any, ...] | None = None
        self._last_demand = -math.inf
        self.discoveries = 0
        self.evidence_fetches = 0
        self.last_error: str | None = None

    # -- the request path ----------------------------------------------------------------

    async def acquire(self) -> Ticket:
        """A ticket for one request; raises :class:`NoAttestedInstance` (nothing to use)."""
        deadline = self._clock() + self.settings.max_wait_s
        self._last_demand = self._clock()
        while True:
            ticket = self._take()
            if ticket is not None:
                if self.available() < self.settings.low_water:
                    self._kick()
                return ticket
            now = self._clock()
            if self._discovery_allowed(now) or self._lock.locked():
                await self.refill()
                if self._take_possible():
                    continue
                if not self._usable_ids():
                    raise NoAttestedInstance(self._why_none())
            elif not self._usable_ids():
                raise NoAttestedInstance(self._why_none())
            wake = self._last_discovery + self.settings.discovery_interval_s
            if wake > deadline:
                raise TokensExhausted(f"no unused nonce token for {self.model}")
            await self._sleep(max(0.0, wake - self._clock()))

    def failed(self, ticket: Ticket, *, sent: bool, kind: FailureKind = "instance") -> bool:
        """Report that ``ticket``'s request failed upstream; True when the caller may retry on
        another instance (only when nothing was sent). ``kind="token"``: only that token was
        refused. ``"instance"`` (stale key, instance gone): the instance is withdrawn until
        verified again."""
        if kind == "instance":
            self._withdrawals += 1
            self._withdrawn[ticket.instance_id] = self._withdrawals
            self._tokens.pop(ticket.instance_id, None)
            if self._verdicts.pop(ticket.instance_id, None) is not None:
                log.info(
                    "chutes_instance_withdrawn",
                    model=self.model,
                    instance_id=ticket.instance_id,
                    sent=sent,
                )
        with contextlib.suppress(RuntimeError):  # no running loop: the next acquire refills
            self._kick()
        return not sent

    def available(self) -> int:
        """Unused, unexpired tokens on usable instances."""
        self._drop_expired(self._clock())
        return sum(len(self._tokens.get(i, ())) for i in self._usable_ids())

    # -- what clients and the gate are shown ---------------------------------------------

    def instance_verdicts(self) -> list[InstanceVerdict]:
        """The newest verdict per known instance; one whose key changed since shows refused."""
        out = []
        for iid, v in self._verdicts.items():
            if iid in self._keys and v.e2e_pubkey != self._keys[iid] and v.ok:
                v = v.model_copy(
                    update={
                        "ok": False,
                        "reason": "attestation failed: instance key changed, re-verifying",
                    }
                )
            out.append(v)
        return out

    @property
    def verdict(self) -> Verdict | None:
        """The model's verdict (ok while an instance is usable); None before the first
        discovery and verification have been tried (pending)."""
        if not self._attempted:
            return None
        now = int(self._clock())
        verdict = model_verdict(
            self.model,
            self.instance_verdicts(),
            now=now,
            root=self._root,
            retry_s=self._retry_s,
        )
        if not self._verdicts and self.last_error:
            reason = f"attestation failed: no attested instance ({self.last_error})"
            verdict = verdict.model_copy(update={"reason": reason})
        return verdict

    async def attest_now(self, nonce: bytes) -> Verdict:
        """Evidence bound to a client's ``nonce`` (32 bytes), verified for the instances we
        know, with the evidence as received; it answers that client only and is not stored
        (freshness we rely on comes from nonces we chose)."""
        if len(nonce) != 32:
            raise ValueError("nonce must be 32 bytes")
        now = int(self._clock())
        keys = dict(self._keys)
        try:
            doc = await self._fetcher.evidence(self.chute_id, nonce.hex())
        except EvidenceFetchError as e:
            verdict = model_verdict(self.model, [], now=now, root=self._root, retry_s=self._retry_s)
            return verdict.model_copy(
                update={"reason": f"attestation failed: evidence unavailable: {e}"}
            )
        verdicts = await self._verify(self.model, keys, doc, nonce.hex())
        verdict = model_verdict(
            self.model, verdicts, now=now, root=self._root, retry_s=self._retry_s
        )
        return verdict.model_copy(update={"evidence": doc, "nonce": nonce.hex()})

    # -- filling ---------------------------------------------------------------------------

    async def refill(self) -> None:
        """One discovery call (rate-bounded), then an evidence fetch if any key needs it."""
        try:
            await self._refill()
        finally:
            self._attempted = True
            self._emit()

    def _emit(self) -> None:
        v = self.verdict
        if v is None or self._on_verdict is None:
            return
        shown = (v.ok, v.reason, tuple((i.instance_id, i.ok, i.verified_at) for i in v.instances))
        if shown != self._emitted:
            self._emitted = shown
            self._on_verdict(v)

    async def _refill(self) -> None:
        async with self._lock:
            now = self._clock()
            if not self._discovery_allowed(now):
                if self._verification_due(now):
                    await self._verify_known(now)
                return
            self._last_discovery = now
            self.discoveries += 1
            try:
                found = await self._fetcher.instances(self.chute_id)
            except EvidenceFetchError as e:
                self.last_error = str(e)
                log.warning("chutes_discovery_failed", model=self.model, error=str(e))
                return
            self._absorb(found, now)
            self._forget_stale(now)
            if self._verification_due(now):
                await self._verify_known(now)

    def _absorb(self, found: Discovery, now: float) -> None:
        expires = now + found.nonce_expires_in
        for row in found.instances:
            old = self._keys.get(row.instance_id)
            if old is not None and old != row.e2e_pubkey:
                # A restarted instance: its old tokens and verdict belong to the old key.
                self._tokens.pop(row.instance_id, None)
                log.info(
                    "chutes_instance_key_changed", model=self.model, instance_id=row.instance_id
                )
            self._keys[row.instance_id] = row.e2e_pubkey
            self._seen_at[row.instance_id] = now
            queue = self._tokens.setdefault(row.instance_id, deque())
            queue.extend((n, expires) for n in row.nonces)

    def _forget_stale(self, now: float) -> None:
        for iid, seen in list(self._seen_at.items()):
            if now - seen > self.settings.forget_after_s and not self._tokens.get(iid):
                for table in (
                    self._keys,
                    self._seen_at,
                    self._tokens,
                    self._verdicts,
                    self._withdrawn,
                ):
                    table.pop(iid, None)

    def _verification_due(self, now: float) -> bool:
        if now - self._last_evidence < self.settings.evidence_interval_s:
            return False
        for iid, key in self._keys.items():
            v = self._verdicts.get(iid)
            if v is None or v.e2e_pubkey != key:
                return True
            if v.ok and now >= v.verified_at + self.settings.reverify_interval_s:
                return True
            if now >= v.expires_at:
                return True
        return False

    async def _verify_known(self, now: float) -> None:
        self._last_evidence = now
        self.evidence_fetches += 1
        nonce_hex = secrets.token_hex(32)
        keys = dict(self._keys)
        started = self._withdrawals
        try:
            doc = await self._fetcher.evidence(self.chute_id, nonce_hex)
        except EvidenceFetchError as e:
            self.last_error = str(e)
            log.warning("chutes_evidence_failed", model=self.model, error=str(e))
            return
        try:
            verdicts = await self._verify(self.model, keys, doc, nonce_hex)
        except Exception as e:  # a verifier surprise refuses (nothing verified), never crashes
            self.last_error = f"internal error: {type(e).__name__}"
            log.exception("chutes_verify_error", model=self.model, error=type(e).__name__)
            return
        self.last_error = None
        for v in verdicts:
            if v.instance_id not in keys or v.e2e_pubkey != keys[v.instance_id]:
                continue  # never let a verdict vouch for a key we did not ask about
            if self._withdrawn.get(v.instance_id, 0) > started:
                # Withdrawn while this evidence was in flight: it speaks for the instance as it
                # was before it failed, so it stays withdrawn until evidence asked for after.
                continue
            previous = self._verdicts.get(v.instance_id)
            self._verdicts[v.instance_id] = v
            if previous is None or (previous.ok, previous.reason) != (v.ok, v.reason):
                log.info(
                    "chutes_instance_verdict",
                    model=self.model,
                    instance_id=v.instance_id,
                    ok=v.ok,
                    reason=v.reason,
                )

    def _discovery_allowed(self, now: float) -> bool:
        return now - self._last_discovery >= self.settings.discovery_interval_s

    def _kick(self) -> None:
        """Refill in the background, if allowed and not already under way."""
        if self._task is not None and not self._task.done():
            return
        now = self._clock()
        if self._discovery_allowed(now) or self._verification_due(now):
            self._task = asyncio.get_running_loop().create_task(
                self.refill(), name=f"chutes-refill:{self.chute_id}"
            )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Verify at once, then keep verdicts fresh and, while requests come, tokens ahead."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(
                self._maintain(), name=f"chutes-pool:{self.chute_id}"
            )

    async def stop(self) -> None:
        for task in (self._loop_task, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._task = None

    aclose = stop

    async def maintain_once(self) -> None:
        """One maintenance step: refill when verification is due, or when recent demand
        (within a token lifetime) has left fewer tokens than the low-water mark. An idle
        pool does not spend the upstream's discovery budget on tokens nobody uses."""
        now = self._clock()
        busy = now - self._last_demand < 60 and self.available() < self.settings.low_water
        if not self._attempted or busy or self._verification_due(now):
            await self.refill()

    async def _maintain(self) -> None:
        while True:
            try:
                await self.maintain_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let a surprise end the pool's upkeep
                self.last_error = f"internal error: {type(e).__name__}"
                log.exception("chutes_pool_error", model=self.model, error=type(e).__name__)
            await self._sleep(self.settings.discovery_interval_s)

    # -- choosing ------------------------------------------------------------------------

    def _usable_ids(self) -> list[str]:
        now = self._clock()
        return [
            iid
            for iid, key in self._keys.items()
            if (v := self._verdicts.get(iid)) is not None and v.usable(now, key)
        ]

    def _drop_expired(self, now: float) -> None:
        margin = self.settings.token_margin_s
        for queue in self._tokens.values():
            while queue and queue[0][1] - margin <= now:
                queue.popleft()

    def _take_possible(self) -> bool:
        return self.available() > 0

    def _take(self) -> Ticket | None:
        now = self._clock()
        self._drop_expired(now)
        ids = [i for i in self._usable_ids() if self._tokens.get(i)]
        if not ids:
            return None
        iid = ids[self._rr % len(ids)]
        self._rr += 1
        nonce, expires = self._tokens[iid].popleft()
        return Ticket(self.chute_id, iid, self._keys[iid], nonce, expires)

    def _why_none(self) -> str:
        refused = [v for v in self.instance_verdicts() if not v.ok]
        if refused:
            return f"no attested instance for {self.model}: {refused[0].reason}"
        if self.last_error:
            return f"no attested instance for {self.model}: {self.last_error}"
        return f"no attested instance for {self.model}"


def build_pool(
    model: str,
    chute_id: str,
    *,
    policy: Policy,
    client: httpx.AsyncClient,
    api_url: str,
    api_key: str | None,
    on_verdict: Callable[[Verdict], None] | None = None,
    collateral: CollateralCache | None = None,
    settings: PoolSettings | None = None,
    clock: Callable[[], float] = time.time,
) -> InstancePool:
    """A pool against the real (or sandbox) Chutes API at ``api_url``, verified under
    ``policy``. Share one ``collateral`` cache between pools: quotes from one platform share
    collateral."""
    verifier = ChutesVerifier(policy, collateral=collateral, clock=clock)
    base = settings or PoolSettings()
    return InstancePool(
        model,
        chute_id,
        fetcher=ChutesEvidenceClient(api_url, api_key, client),
        verifier=verifier,
        clock=clock,
        settings=replace(base, reverify_interval_s=float(policy.reattest_interval_s))
        if settings is None
        else base,
        root=verifier.root,  # type: ignore[arg-type]
        retry_interval_s=policy.retry_interval_s,
        on_verdict=on_verdict,
    )
