"""Strict parsing of an SPDM 1.1 GET_MEASUREMENTS exchange, as NVIDIA GPUs report it.

The evidence a Hopper GPU hands out is the 37-byte request the driver sent, followed by the
GPU's MEASUREMENTS response; the response's last 96 bytes are an ECDSA P-384 signature (r‖s)
over everything before them, request included. So the nonce in the request is signed, which
is what makes the evidence fresh.

Strict means every length field must add up exactly: a parser that tolerates trailing bytes
or a short block lets a forger append or hide data the signature does not cover in the way a
reader assumes. Any deviation raises :class:`SpdmError`; nothing is guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPDM_VERSION = 0x11
GET_MEASUREMENTS = 0xE0
MEASUREMENTS = 0x60
REQUEST_LEN = 37
NONCE_LEN = 32
SIGNATURE_LEN = 96  # P-384 r‖s
DMTF_SPEC = 0x01

# Opaque-data TLV types NVIDIA documents (the ones the verifier reads).
OPAQUE_DRIVER_VERSION = 3
OPAQUE_VBIOS_VERSION = 6
OPAQUE_NVDEC0_STATUS = 11
OPAQUE_CHIP_SKU = 15
OPAQUE_PROJECT = 17
OPAQUE_PROJECT_SKU = 18
OPAQUE_FWID = 20


class SpdmError(ValueError):
    """The SPDM bytes are not a well-formed, complete GET_MEASUREMENTS exchange."""


@dataclass(frozen=True)
class Measurements:
    """One parsed, not yet verified, GET_MEASUREMENTS request and response."""

    request_nonce: bytes
    slot: int
    blocks: dict[int, bytes]
    """SPDM measurement index (1-based) to the measurement value."""
    response_nonce: bytes
    opaque: dict[int, bytes] = field(default_factory=dict)
    signed: bytes = b""
    """Every byte the signature covers: the request and the response up to the signature."""
    signature: bytes = b""

    def opaque_text(self, kind: int) -> str | None:
        value = self.opaque.get(kind)
        if value is None:
            return None
        return value.rstrip(b"\x00").decode("ascii", errors="strict")


def _u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "little")


def _need(data: bytes, end: int, what: str) -> None:
    if end > len(data):
        raise SpdmError(f"truncated: {what} ends at byte {end}, evidence has {len(data)}")


def _blocks(record: bytes, count: int) -> dict[int, bytes]:
    blocks: dict[int, bytes] = {}
    at = 0
    for _ in range(count):
        _need(record, at + 4, "measurement block header")
        index, spec, size = record[at], record[at + 1], _u16(record, at + 2)
        if spec != DMTF_SPEC:
            raise SpdmError(f"measurement block {index}: specification {spec} is not DMTF")
        body = record[at + 4 : at + 4 + size]
        if len(body) != size or size < 3:
            raise SpdmError(f"measurement block {index}: size {size} does not fit the record")
        value_size = _u16(body, 1)
        if value_size != size - 3:
            raise SpdmError(f"measurement block {index}: value size {value_size} != {size - 3}")
        if index in blocks or index == 0:
            raise SpdmError(f"measurement block index {index} repeated or zero")
        blocks[index] = body[3:]
        at += 4 + size
    if at != len(record):
        raise SpdmError(f"measurement record has {len(record) - at} bytes past its blocks")
    return blocks


def _opaque(data: bytes) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    at = 0
    while at < len(data):
        _need(data, at + 4, "opaque field header")
        kind, size = _u16(data, at), _u16(data, at + 2)
        _need(data, at + 4 + size, f"opaque field {kind}")
        if kind in fields:
            raise SpdmError(f"opaque field {kind} repeated")
        fields[kind] = data[at + 4 : at + 4 + size]
        at += 4 + size
    return fields


def parse_measurements(evidence: bytes) -> Measurements:
    """Parse request ‖ response; raise :class:`SpdmError` on any deviation."""
    _need(evidence, REQUEST_LEN, "GET_MEASUREMENTS request")
    version, code, param1, param2 = evidence[0], evidence[1], evidence[2], evidence[3]
    if version != SPDM_VERSION or code != GET_MEASUREMENTS:
        raise SpdmError(f"request is not SPDM 1.1 GET_MEASUREMENTS ({version:#x}, {code:#x})")
    if not param1 & 1:
        raise SpdmError("request does not ask for a signature")
    if param2 != 0xFF:
        raise SpdmError(f"request asks for measurement {param2}, not all of them")
    request_nonce = evidence[4:36]
    slot = evidence[36]
    r = REQUEST_LEN
    _need(evidence, r + 8, "MEASUREMENTS response header")
    if evidence[r] != SPDM_VERSION or evidence[r + 1] != MEASUREMENTS:
        raise SpdmError("response is not SPDM 1.1 MEASUREMENTS")
    count = evidence[r + 4]
    record_len = int.from_bytes(evidence[r + 5 : r + 8], "little")
    record_end = r + 8 + record_len
    _need(evidence, record_end, "measurement record")
    blocks = _blocks(evidence[r + 8 : record_end], count)
    nonce_end = record_end + NONCE_LEN
    _need(evidence, nonce_end + 2, "response nonce and opaque length")
    opaque_len = _u16(evidence, nonce_end)
    opaque_end = nonce_end + 2 + opaque_len
    _need(evidence, opaque_end, "opaque data")
    if len(evidence) != opaque_end + SIGNATURE_LEN:
        raise SpdmError(
            f"expected exactly {SIGNATURE_LEN} signature bytes after the opaque data, "
            f"found {len(evidence) - opaque_end}"
        )
    return Measurements(
        request_nonce=request_nonce,
        slot=slot,
        blocks=blocks,
        response_nonce=evidence[record_end:nonce_end],
        opaque=_opaque(evidence[nonce_end + 2 : opaque_end]),
        signed=evidence[:opaque_end],
        signature=evidence[opaque_end:],
    )


def vbios_version(raw: bytes) -> str:
    """Opaque VBIOS_VERSION as NVIDIA prints it: ``009f009601000000`` -> ``96.00.9F.00.01``."""
    if len(raw) < 5:
        raise SpdmError("VBIOS version too short")
    b = raw[:8].ljust(8, b"\x00")
    return f"{b[3]:02X}.{b[2]:02X}.{b[1]:02X}.{b[0]:02X}.{b[4]:02X}"
