"""Chutes end-to-end encryption, the gateway (client) side: seal a request, open the answer.

Why: the Chutes front door relays every request to one instance; sealing the request to the
ML-KEM-768 key that instance's TDX quote binds means only that enclave can read the prompt,
and only it can produce answers that open here. The wire format is Chutes' own, checked
against its instance code (``chutes/entrypoint/run.py``) and two independent clients
(the ``chutes-e2ee`` package and nearai/cloud-api): a sealed message is
``kem_ct (1088) || nonce (12) || ciphertext || tag (16)``, its key
``HKDF-SHA256(shared secret, salt = kem_ct[:16], info)``, ChaCha20-Poly1305 without AAD.
Requests and non-streamed answers are gzipped JSON (info ``e2e-req-v1`` / ``e2e-resp-v1``);
a stream is keyed once by an ``e2e_init`` event (info ``e2e-stream-v1``) and each ``e2e``
event then carries ``nonce || ciphertext || tag`` of one raw SSE line, not gzipped.

What the protocol does not give, this module adds where it can, failing closed: frames carry
no sequence number, so a relay could drop, reorder or replay them; a replayed frame (a nonce
seen before in the stream) is refused here, and only the ``[DONE]`` inside an encrypted frame
ends a stream cleanly (a plaintext ``[DONE]`` is the relay's word and could hide dropped
frames). Dropping or reordering frames other than the last stays undetectable.

Pure: no I/O, no logging. Errors say what failed (``E2EEError.reason``), never what was in it:
a decrypted error payload is kept in ``E2EEError.detail`` and must not be logged.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mlkem import (
    MLKEM768PrivateKey,
    MLKEM768PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEM_CT_LEN = 1088
PUBKEY_LEN = 1184
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 32
SALT_LEN = 16

INFO_REQUEST = b"e2e-req-v1"
INFO_RESPONSE = b"e2e-resp-v1"
INFO_STREAM = b"e2e-stream-v1"

# The instance pops this field from the decrypted body and encrypts its answer to it.
RESPONSE_PK_FIELD = "e2e_response_pk"

# Inference answers are far smaller; this caps a gzip bomb from an attested-but-hostile instance.
MAX_PLAINTEXT = 64 * 1024 * 1024

# Requests go out as gzip "stored" blocks (level 0): valid gzip, which the instance requires,
# but not compressed. Compressing before encrypting would let whoever sees ciphertext lengths
# (the front door) learn about a prompt from how well attacker-chosen text in it compresses
# against the rest (CRIME); it is also ~20x the CPU of the whole seal on small bodies.
_GZIP_LEVEL = 0


class E2EEError(Exception):
    """A sealed message that cannot be trusted. ``str()`` is the reason only, safe to log.

    ``detail`` is the upstream's error payload from an ``e2e_error`` event (decrypted when it
    was encrypted; ``authenticated`` says so). It may quote the prompt: never log it.
    """

    def __init__(self, reason: str, *, detail: str | None = None, authenticated: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.authenticated = authenticated


@dataclass(frozen=True, slots=True, repr=False)
class Sealed:
    """A sealed request: the bytes for ``POST /e2e/invoke`` and the key that opens its answer."""

    payload: bytes
    response_key: MLKEM768PrivateKey

    def __repr__(self) -> str:  # neither the ciphertext nor the key belongs in a log
        return f"Sealed(<{len(self.payload)} bytes>)"


def derive_key(shared_secret: bytes, kem_ct: bytes, info: bytes) -> bytes:
    """The ChaCha20-Poly1305 key for one direction, as every Chutes implementation derives it."""
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_LEN, salt=kem_ct[:SALT_LEN], info=info
    ).derive(shared_secret)


@lru_cache(maxsize=256)
def load_public_key(pubkey_b64: str) -> MLKEM768PublicKey:
    """An instance's ``e2e_pubkey`` exactly as ``/e2e/instances`` gives it (standard base64).

    Cached: the pool hands out the same few verified keys for many requests; refusals are
    not cached (an exception leaves nothing behind).
    """
    try:
        raw = base64.b64decode(pubkey_b64, validate=True)
        if len(raw) != PUBKEY_LEN:
            raise ValueError("length")
        return MLKEM768PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError, TypeError) as e:
        raise E2EEError("bad_instance_key") from e


def seal_request(body: dict[str, Any], instance_pubkey_b64: str) -> Sealed:
    """Seal a (validated, re-serialized) request body to one instance's bound key.

    A fresh ML-KEM-768 key pair is made per request; its public half travels inside the
    ciphertext as ``e2e_response_pk`` so the instance can seal its answer to us alone.
    """
    if RESPONSE_PK_FIELD in body:
        raise E2EEError("reserved_field")  # the client may not choose where answers go
    instance_key = load_public_key(instance_pubkey_b64)
    response_key = MLKEM768PrivateKey.generate()
    response_pk = base64.b64encode(response_key.public_key().public_bytes_raw()).decode()
    try:
        plain = json.dumps(
            {**body, RESPONSE_PK_FIELD: response_pk}, separators=(",", ":"), allow_nan=False
        ).encode()
    except (TypeError, ValueError) as e:
        raise E2EEError("unserializable_body") from e
    shared_secret, kem_ct = instance_key.encapsulate()
    key = derive_key(shared_secret, kem_ct, INFO_REQUEST)
    nonce = _random_nonce()
    sealed = ChaCha20Poly1305(key).encrypt(nonce, gzip.compress(plain, _GZIP_LEVEL, mtime=0), None)
    return Sealed(payload=kem_ct + nonce + sealed, response_key=response_key)


def open_response(payload: bytes, response_key: MLKEM768PrivateKey) -> bytes:
    """The plaintext JSON of a non-streamed answer sealed to ``response_key``.

    Accepts the sealed blob itself (what the front door relays today) and the instance's
    JSON envelope ``{"e2e": base64(blob), "usage": ...}``; the envelope's plaintext usage is
    the relay's copy and is ignored (bill from the usage inside the answer).
    """
    blob = _unwrap_envelope(payload)
    if len(blob) < KEM_CT_LEN + NONCE_LEN + TAG_LEN:
        raise E2EEError("truncated")
    kem_ct = blob[:KEM_CT_LEN]
    key = derive_key(_decapsulate(response_key, kem_ct), kem_ct, INFO_RESPONSE)
    nonce, sealed = blob[KEM_CT_LEN : KEM_CT_LEN + NONCE_LEN], blob[KEM_CT_LEN + NONCE_LEN :]
    try:
        compressed = ChaCha20Poly1305(key).decrypt(nonce, sealed, None)
    except InvalidTag as e:
        raise E2EEError("bad_tag") from e
    return _gunzip(compressed)


class StreamOpener:
    """Opens one encrypted SSE stream, one ``data:`` payload at a time, in arrival order.

    ``open_event`` returns the plaintext data payload to relay, or ``None`` for events that
    carry nothing for the client (``e2e_init``, the relay's plaintext ``usage`` events, blank
    or comment lines inside frames, a plaintext ``[DONE]`` after the authenticated one).
    Anything that does not authenticate raises :class:`E2EEError`; after an error the stream
    must be ended, not resumed.
    """

    __slots__ = ("_response_key", "_aead", "_seen", "_finished")

    def __init__(self, response_key: MLKEM768PrivateKey) -> None:
        self._response_key = response_key
        self._aead: ChaCha20Poly1305 | None = None
        self._seen: set[bytes] = set()
        self._finished = False

    @property
    def keyed(self) -> bool:
        """The ``e2e_init`` event has arrived and keyed the stream."""
        return self._aead is not None

    @property
    def finished(self) -> bool:
        """The authenticated ``[DONE]`` (inside an encrypted frame) has been opened."""
        return self._finished

    def open_event(self, data: str) -> str | None:
        text = data.strip()
        if text == "[DONE]":
            if self._finished:
                return None  # the relay's own terminator after the enclave's: already relayed
            raise E2EEError("unauthenticated_end")
        try:
            event = json.loads(text)
        except ValueError as e:
            raise E2EEError("bad_event") from e
        if not isinstance(event, dict) or len(event) != 1:
            raise E2EEError("unknown_event")
        ((kind, value),) = event.items()
        if kind == "usage":
            return None  # the relay's plaintext copy; usage is read inside the frames only
        if kind == "e2e_init":
            self._init(value)
            return None
        if kind == "e2e":
            return self._frame(value)
        if kind == "e2e_error":
            raise self._error(value)
        raise E2EEError("unknown_event")

    def _init(self, value: object) -> None:
        if self._aead is not None:
            raise E2EEError("second_init")  # re-keying would let a relay swap the stream
        kem_ct = _b64(value, "bad_init")
        if len(kem_ct) != KEM_CT_LEN:
            raise E2EEError("bad_init")
        key = derive_key(_decapsulate(self._response_key, kem_ct), kem_ct, INFO_STREAM)
        self._aead = ChaCha20Poly1305(key)

    def _frame(self, value: object) -> str | None:
        if self._aead is None:
            raise E2EEError("frame_before_init")
        if self._finished:
            raise E2EEError("frame_after_end")
        raw = _b64(value, "bad_frame")
        if len(raw) < NONCE_LEN + TAG_LEN:
            raise E2EEError("bad_frame")
        nonce = raw[:NONCE_LEN]
        if nonce in self._seen:
            raise E2EEError("replayed_frame")
        try:
            plain = self._aead.decrypt(nonce, raw[NONCE_LEN:], None).decode()
        except (InvalidTag, UnicodeDecodeError) as e:
            raise E2EEError("bad_frame") from e
        self._seen.add(nonce)
        payload = _sse_payload(plain)
        if payload is not None and payload.strip() == "[DONE]":
            self._finished = True
            return "[DONE]"
        return payload

    def _error(self, value: object) -> E2EEError:
        """An ``e2e_error`` event: decrypted when it is a frame under the stream key."""
        if isinstance(value, str) and self._aead is not None:
            try:
                raw = base64.b64decode(value, validate=True)
                if len(raw) >= NONCE_LEN + TAG_LEN and raw[:NONCE_LEN] not in self._seen:
                    plain = self._aead.decrypt(raw[:NONCE_LEN], raw[NONCE_LEN:], None)
                    detail = plain.decode("utf-8", "replace")
                    return E2EEError("upstream_error", detail=detail, authenticated=True)
            except (binascii.Error, ValueError, InvalidTag):
                pass
        detail = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        return E2EEError("upstream_error", detail=detail, authenticated=False)


def _sse_payload(plain: str) -> str | None:
    """The data payload of the one SSE line (or bare payload) a decrypted frame holds.

    Chutes' instances relay their engine's output line by line, so a frame is ``data: {...}``
    plus a newline, or just a newline; other implementations send the bare JSON. A frame
    holding two events would need a different relay contract: it is refused rather than
    half-relayed.
    """
    events: list[str] = []
    current: list[str] = []
    for line in plain.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if current:
                events.append("\n".join(current))
                current = []
            continue
        if line.startswith(":"):
            continue  # an SSE comment (keep-alive)
        if line.startswith("data:"):
            value = line[5:]
            current.append(value[1:] if value.startswith(" ") else value)
        elif line.split(":", 1)[0] in ("event", "id", "retry"):
            continue
        else:
            current.append(line)  # a bare payload
    if current:
        events.append("\n".join(current))
    if len(events) > 1:
        raise E2EEError("multi_event_frame")
    return events[0] if events else None


def _unwrap_envelope(payload: bytes) -> bytes:
    if not payload.startswith(b"{"):
        return payload
    try:
        envelope = json.loads(payload)
    except ValueError:
        return payload  # a sealed blob may start with "{" by chance (1 in 256)
    if isinstance(envelope, dict) and isinstance(envelope.get("e2e"), str):
        return _b64(envelope["e2e"], "bad_envelope")
    raise E2EEError("plaintext_response")  # JSON that is not sealed: never pass it on


def _decapsulate(key: MLKEM768PrivateKey, kem_ct: bytes) -> bytes:
    try:
        return key.decapsulate(kem_ct)
    except ValueError as e:
        raise E2EEError("bad_kem_ciphertext") from e


def _b64(value: object, reason: str) -> bytes:
    if not isinstance(value, str):
        raise E2EEError(reason)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise E2EEError(reason) from e


def _gunzip(data: bytes) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only
    try:
        out = inflater.decompress(data, MAX_PLAINTEXT + 1)
    except zlib.error as e:
        raise E2EEError("bad_gzip") from e
    if len(out) > MAX_PLAINTEXT or inflater.unconsumed_tail:
        raise E2EEError("too_large")
    if not inflater.eof or inflater.unused_data:
        raise E2EEError("bad_gzip")
    return out


def _random_nonce() -> bytes:
    return os.urandom(NONCE_LEN)
