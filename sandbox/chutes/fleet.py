"""The simulated Chutes fleet: chutes, their instances (keys, certificates) and nonce tokens.

Why it is its own object: discovery (``/e2e/instances``), evidence (``/chutes/{id}/evidence``)
and invocation (``/e2e/invoke``) must agree on which instances exist, which key each serves
right now and which tokens are still good, exactly as Chutes' API does through its database
and Redis. Numbers follow the real API (``api/e2e/router.py``): at most 5 instances and 10
single-use tokens each per discovery call, ``nonce_expires_in`` 60 s (tokens are kept 75 s),
a token is bound to the chute and instance it was issued for.

Instances are created when a chute is first asked for, so a catalog of many models starts
fast. Which instance a misbehaviour switch hits is fixed: the first (index 0) for a rotated or
unbound key, the last for "no TEE evidence".
"""

from __future__ import annotations

import random
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teegate.sandbox.behaviour import Behaviour
from teegate.sandbox.chutes.crypto import InstanceKey

NONCES_PER_INSTANCE = 10
MAX_INSTANCES_RETURNED = 5
NONCE_CLIENT_TTL_S = 60
NONCE_SERVER_TTL_S = 75
RATE_WINDOW_S = 60.0
# A stable namespace, so a chute's id is the same on every run (tests and docs can name it).
CHUTE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://sandbox.teegate.invalid/chutes")


def chute_id_for(model_id: str) -> str:
    """The sandbox's ``chute_id`` for a model: uuid5 of the model id (stable across runs)."""
    return str(uuid.uuid5(CHUTE_NAMESPACE, model_id))


def _self_signed(instance_id: str) -> bytes:
    """A self-signed ECDSA P-256 certificate (DER), the instance's TLS/attestation identity."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"chutes-instance-{instance_id}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(2025, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2045, 1, 1, tzinfo=UTC))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class Instance:
    """One simulated TEE instance of a chute."""

    instance_id: str
    chute_id: str
    index: int
    last: bool
    key: InstanceKey = field(default_factory=InstanceKey)
    rotated: InstanceKey | None = None
    decoy: InstanceKey | None = None  # what an unbound quote binds instead of ``key``
    cert_der: bytes = b""

    def current_key(self, behaviour: Behaviour) -> InstanceKey:
        """The key this instance serves now (a restarted first instance has a new one)."""
        if self.index == 0 and behaviour.chutes_rotate_key:
            if self.rotated is None:
                self.rotated = InstanceKey()
            return self.rotated
        return self.key

    def bound_key_b64(self, behaviour: Behaviour) -> str:
        """The key string its quote binds (another one under ``chutes_unbound_key``)."""
        if self.index == 0 and behaviour.chutes_unbound_key:
            if self.decoy is None:
                self.decoy = InstanceKey()
            return self.decoy.public_b64
        return self.current_key(behaviour).public_b64

    def has_tee_evidence(self, behaviour: Behaviour) -> bool:
        return not (self.last and behaviour.chutes_no_tee_instance)


@dataclass(frozen=True)
class Token:
    chute_id: str
    instance_id: str
    expires: float


class RateLimited(Exception):
    """Discovery asked too often (answered 429, like the real API)."""


class Fleet:
    """Every chute of the catalog and its instances, plus the issued nonce tokens."""

    def __init__(
        self,
        models: list[str],
        instances_per_chute: int,
        discovery_per_minute: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_of = {chute_id_for(m): m for m in models}
        self.instances_per_chute = instances_per_chute
        self.discovery_per_minute = discovery_per_minute  # 0: no limit
        self.clock = clock
        self._instances: dict[str, list[Instance]] = {}
        self._by_id: dict[str, Instance] = {}
        self._tokens: dict[str, Token] = {}
        self._recent: deque[float] = deque()
        self.discovery_calls = 0
        self.tokens_issued = 0
        self.tokens_used = 0

    def reset(self) -> None:
        """Forget tokens and counters (instances and their keys stay: they are the fleet)."""
        self._tokens.clear()
        self._recent.clear()
        self.discovery_calls = self.tokens_issued = self.tokens_used = 0

    def instances(self, chute_id: str) -> list[Instance]:
        """The chute's instances (created on first use); empty for an unknown chute."""
        if chute_id not in self.model_of:
            return []
        found = self._instances.get(chute_id)
        if found is None:
            n = self.instances_per_chute
            found = []
            for i in range(n):
                iid = str(uuid.uuid5(uuid.UUID(chute_id), f"instance-{i}"))
                inst = Instance(iid, chute_id, i, last=i == n - 1, cert_der=_self_signed(iid))
                found.append(inst)
                self._by_id[iid] = inst
            self._instances[chute_id] = found
        return found

    def instance(self, instance_id: str) -> Instance | None:
        return self._by_id.get(instance_id)

    def _check_rate(self) -> None:
        self.discovery_calls += 1
        if not self.discovery_per_minute:
            return
        now = self.clock()
        while self._recent and now - self._recent[0] >= RATE_WINDOW_S:
            self._recent.popleft()
        if len(self._recent) >= self.discovery_per_minute:
            raise RateLimited
        self._recent.append(now)

    def discover(self, chute_id: str, behaviour: Behaviour) -> dict[str, Any]:
        """The ``/e2e/instances/{chute_id}`` answer; issues fresh tokens (raises RateLimited)."""
        self._check_rate()
        if behaviour.chutes_exhaust_tokens:
            raise RateLimited
        now = self.clock()
        self._tokens = {t: v for t, v in self._tokens.items() if v.expires > now}
        chosen = random.sample(
            self.instances(chute_id), min(len(self.instances(chute_id)), MAX_INSTANCES_RETURNED)
        )
        listed = []
        for inst in chosen:
            tokens = [secrets.token_urlsafe(24) for _ in range(NONCES_PER_INSTANCE)]
            for t in tokens:
                self._tokens[t] = Token(chute_id, inst.instance_id, now + NONCE_SERVER_TTL_S)
            self.tokens_issued += len(tokens)
            listed.append(
                {
                    "instance_id": inst.instance_id,
                    "e2e_pubkey": inst.current_key(behaviour).public_b64,
                    "nonces": tokens,
                }
            )
        return {
            "instances": listed,
            "nonce_expires_in": NONCE_CLIENT_TTL_S,
            "nonce_expires_at": int(time.time()) + NONCE_CLIENT_TTL_S,
        }

    def consume(self, token: str, chute_id: str, instance_id: str) -> bool:
        """Use a token once: it must exist, be unexpired, and belong to this chute+instance."""
        found = self._tokens.get(token)
        if found is None or found.chute_id != chute_id or found.instance_id != instance_id:
            return False
        del self._tokens[token]
        if found.expires <= self.clock():
            return False
        self.tokens_used += 1
        return True

    def published(self, behaviour: Behaviour) -> dict[str, Any]:
        """For tests and operators: every chute's model and instances (ids, current keys)."""
        return {
            "chutes": {
                cid: {
                    "model": model,
                    "instances": [
                        {
                            "instance_id": i.instance_id,
                            "e2e_pubkey": i.current_key(behaviour).public_b64,
                        }
                        for i in self._instances.get(cid, [])
                    ],
                }
                for cid, model in self.model_of.items()
            },
            "discovery_calls": self.discovery_calls,
            "tokens_issued": self.tokens_issued,
            "tokens_used": self.tokens_used,
        }
