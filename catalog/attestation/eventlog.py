"""Replaying a dstack event log into RTMR values.

A TD extends its runtime measurement registers as it boots: ``RTMR[i] = sha384(RTMR[i] ||
digest)``, each starting from 48 zero bytes. Replaying the log must reproduce the quote's
RTMR0-3; only then do the log's events (the app's ``compose-hash`` among them) say anything.

Firmware events (RTMR0-2) carry digests of things we do not have, so only their digests are
replayed. dstack's runtime events (RTMR3, type 0x08000001) are checked further: their digest
must be ``sha384(le32(event_type) || ":" || event || ":" || payload)``, otherwise a log could
pair a correct digest with a made-up payload.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from teegate.catalog.attestation.evidence import EvidenceError, hex_bytes

RTMR_COUNT = 4
DSTACK_RUNTIME_EVENT = 0x08000001
COMPOSE_HASH_EVENT = "compose-hash"


@dataclass(frozen=True)
class Replay:
    """The registers a log produces and what its runtime events claim."""

    rtmrs: tuple[bytes, ...]
    compose_hash: bytes | None
    forged_events: tuple[str, ...]
    """Runtime events whose digest does not match their own content."""


def runtime_event_digest(event_type: int, event: str, payload: bytes) -> bytes:
    return hashlib.sha384(
        event_type.to_bytes(4, "little") + b":" + event.encode() + b":" + payload
    ).digest()


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvidenceError(f"event {field} must be an integer")
    return value


def replay(events: list[dict[str, Any]]) -> Replay:
    """Extend four zeroed registers with every event's digest, in log order."""
    rtmrs = [bytes(48)] * RTMR_COUNT
    compose_hash: bytes | None = None
    forged: list[str] = []
    for i, ev in enumerate(events):
        imr = _int(ev.get("imr"), "imr")
        if not 0 <= imr < RTMR_COUNT:
            raise EvidenceError(f"event {i} extends register {imr}, not RTMR0-3")
        digest = hex_bytes(ev.get("digest"), f"event {i} digest")
        if len(digest) != 48:
            raise EvidenceError(f"event {i} digest is not 48 bytes (sha384)")
        rtmrs[imr] = hashlib.sha384(rtmrs[imr] + digest).digest()
        event_type = _int(ev.get("event_type"), "event_type")
        if imr != 3 or event_type != DSTACK_RUNTIME_EVENT:
            continue
        name = ev.get("event", "")
        payload_hex = ev.get("event_payload", "")
        if not isinstance(name, str) or not isinstance(payload_hex, str):
            raise EvidenceError(f"event {i} name and payload must be strings")
        payload = hex_bytes(payload_hex, f"event {i} payload") if payload_hex else b""
        if runtime_event_digest(event_type, name, payload) != digest:
            forged.append(name or f"#{i}")
            continue
        if name == COMPOSE_HASH_EVENT:
            if compose_hash is not None:
                raise EvidenceError("event log has more than one compose-hash event")
            compose_hash = payload
    return Replay(rtmrs=tuple(rtmrs), compose_hash=compose_hash, forged_events=tuple(forged))
