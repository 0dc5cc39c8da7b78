"""NVIDIA GPU evidence (Hopper, confidential computing mode), verified offline.

The evidence is what NEAR AI / Phala reports carry as ``nvidia_payload`` (JSON text:
``{"nonce", "evidence_list": [{"certificate", "evidence", "arch"}], "arch"}``) and what
NVIDIA's PPCIE tools (and Chutes' ``gpu_evidence``) give as a bare list of such items. Each
item is one GPU: its device certificate chain (base64 PEM, leaf first, five certificates)
and its SPDM GET_MEASUREMENTS exchange (base64), signed by the leaf's key.

Checks, in order, each recorded by name (a check not made is listed in ``skipped``, never as
passed): payload shape and ``HOPPER`` arch; per GPU the certificate count, the root pinned by
DER SHA-256, the chain valid at ``at``, strict SPDM parse, the P-384 signature, the nonce
*inside the signed request* equal to ours, the firmware id in the report equal to the leaf
certificate's; then no duplicate GPU and the expected count. With RIM files
(:mod:`.gpu_rim`) the measurements are compared to NVIDIA's signed reference values; with
OCSP responses (:mod:`.gpu_ocsp`) revocation is checked. Without them the verdict says
``measurements: "unverified"`` and ``revocation: "unchecked"``: those parts need the network
(NVIDIA's RIM service and OCSP responder), and are never reported as passed by omission.

The payload's own ``nonce`` field is not signed; only the SPDM request's nonce counts.
NVIDIA's canned sample evidence (what nvtrust's no-GPU mode returns whatever nonce was asked)
carries a fixed nonce, so only that check catches it.

Why this module is long: it is the whole ordered list of GPU checks a verdict rests on, in
one place, like :mod:`.verifier` for the CPU side.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pydantic import BaseModel, ConfigDict, Field

from teegate.catalog.attestation import gpu_ocsp, gpu_rim
from teegate.catalog.attestation.gpu_chain import ChainError, root_pinned, verify_chain
from teegate.catalog.attestation.nvidia_roots import device_root
from teegate.catalog.attestation.spdm import (
    OPAQUE_FWID,
    SIGNATURE_LEN,
    Measurements,
    SpdmError,
    parse_measurements,
)

CHAIN_LENGTH = 5
FWID_OID = x509.ObjectIdentifier("2.23.133.5.4.1")  # TCG DICE TcbInfo
FWID_LEN = 48
MAX_GPUS = 64

Measured = Literal["verified", "failed", "unverified"]
Revocation = Literal["good", "revoked", "unchecked"]


class GpuPayloadError(ValueError):
    """The GPU payload is not the JSON shape described above."""


@dataclass(frozen=True)
class GpuItem:
    """One GPU's evidence as sent, decoded from base64 but not yet checked."""

    chain_pem: bytes
    evidence: bytes
    arch: str | None = None


@dataclass(frozen=True)
class GpuPayload:
    items: tuple[GpuItem, ...]
    arch: str | None = None
    nonce: str | None = None
    """The payload's own (unsigned) nonce field, lower-case hex without 0x."""


@dataclass(frozen=True)
class GpuRequirements:
    """What the policy asks of GPU evidence (see ``[attestation]`` in ``proxy.toml``)."""

    expected_count: int | None = None
    """Exactly this many GPUs; None accepts any number from one up."""
    rim_dir: Path | None = None
    ocsp_dir: Path | None = None
    require_measurements: bool = False
    require_revocation: bool = False
    test_root: x509.Certificate | None = None
    """DANGER, tests and the sandbox only: replaces NVIDIA's Device Identity CA."""


class GpuFacts(BaseModel):
    """What one GPU's evidence says, and which of its checks passed."""

    model_config = ConfigDict(frozen=True)

    index: int
    leaf_serial: str | None = None
    fwid: str | None = None
    spdm_nonce: str | None = None
    driver_version: str | None = None
    vbios_version: str | None = None
    rim_ids: dict[str, str] = Field(default_factory=dict)
    checks: dict[str, bool] = Field(default_factory=dict)
    measurements: Measured = "unverified"
    revocation: Revocation = "unchecked"


class GpuVerdict(BaseModel):
    """The GPU part of a model's verdict: which parts passed, and what was not checked."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    reason: str
    root: Literal["nvidia", "test"] = "nvidia"
    gpu_count: int = 0
    checks: dict[str, bool] = Field(default_factory=dict)
    """Each check made, in order, and whether it passed for every GPU."""
    measurements: Measured = "unverified"
    """"verified": every active measurement matched NVIDIA's signed RIMs; "unverified": no
    RIMs supplied (or not for this firmware), so the firmware was not compared to anything."""
    revocation: Revocation = "unchecked"
    """"good": a fresh, signed OCSP answer for every certificate that has one; "unchecked":
    not all of them were supplied (OCSP is online-only)."""
    skipped: tuple[str, ...] = ()
    gpus: tuple[GpuFacts, ...] = ()


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise GpuPayloadError(f"{what} must be a non-empty base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise GpuPayloadError(f"{what} is not base64") from e


def _item(raw: Any, i: int) -> GpuItem:
    if not isinstance(raw, dict):
        raise GpuPayloadError(f"evidence_list[{i}] must be an object")
    arch = raw.get("arch")
    return GpuItem(
        chain_pem=_b64(raw.get("certificate"), f"evidence_list[{i}].certificate"),
        evidence=_b64(raw.get("evidence"), f"evidence_list[{i}].evidence"),
        arch=arch if isinstance(arch, str) else None,
    )


def parse_gpu_payload(raw: Any) -> GpuPayload:
    """NEAR/Phala's ``nvidia_payload`` (object or JSON text), or a bare list of GPU items
    (NVIDIA's PPCIE / Chutes ``gpu_evidence`` shape)."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise GpuPayloadError("GPU payload is not JSON") from e
    if isinstance(raw, list):
        items, arch, nonce = raw, None, None
        arches = {i.get("arch") for i in raw if isinstance(i, dict)}
        nonces = {i.get("nonce") for i in raw if isinstance(i, dict)}
        arch = arches.pop() if len(arches) == 1 else None
        nonce = nonces.pop() if len(nonces) == 1 else None
    elif isinstance(raw, dict):
        items, arch, nonce = raw.get("evidence_list"), raw.get("arch"), raw.get("nonce")
    else:
        raise GpuPayloadError("GPU payload must be an object or a list")
    if not isinstance(items, list):
        raise GpuPayloadError("evidence_list must be a list")
    if len(items) > MAX_GPUS:
        raise GpuPayloadError(f"more than {MAX_GPUS} GPUs")
    return GpuPayload(
        items=tuple(_item(x, i) for i, x in enumerate(items)),
        arch=arch if isinstance(arch, str) else None,
        nonce=nonce.lower().removeprefix("0x") if isinstance(nonce, str) else None,
    )


@dataclass
class _Checks:
    """Named checks in order; the first failure becomes the reason."""

    checks: dict[str, bool] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def check(self, name: str, passed: bool, failure: str) -> bool:
        self.checks[name] = self.checks.get(name, True) and passed
        if not passed:
            self.failures.append(failure)
        return passed


def leaf_fwid(leaf: x509.Certificate) -> bytes | None:
    """The last 48 bytes of the leaf's TCG DICE TcbInfo extension (Hopper's FWID)."""
    try:
        ext = leaf.extensions.get_extension_for_oid(FWID_OID).value
    except x509.ExtensionNotFound:
        return None
    value = getattr(ext, "value", b"")
    return value[-FWID_LEN:] if len(value) >= FWID_LEN else None


def _signature_ok(leaf: x509.Certificate, m: Measurements) -> bool:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        return False
    half = SIGNATURE_LEN // 2
    r = int.from_bytes(m.signature[:half], "big")
    s = int.from_bytes(m.signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), m.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


class _GpuVerifier:
    """The checks on one GPU's item; a class only to share arguments between steps."""

    def __init__(
        self, index: int, item: GpuItem, nonce: bytes | None, at: int, req: GpuRequirements
    ) -> None:
        self.index, self.item, self.nonce, self.at, self.req = index, item, nonce, at, req
        self.c = _Checks()
        self.facts: dict[str, Any] = {"index": index}
        self.chain: list[x509.Certificate] = []
        self.spdm: Measurements | None = None
        self.rim_chains: dict[str, tuple[x509.Certificate, ...]] = {}

    def run(self) -> _Checks:
        c, gpu = self.c, f"GPU {self.index}"
        try:
            self.chain = x509.load_pem_x509_certificates(self.item.chain_pem)
        except ValueError:
            self.chain = []
        if not c.check(
            "gpu_cert_count",
            len(self.chain) == CHAIN_LENGTH,
            f"{gpu}: certificate chain has {len(self.chain)} certificates, not {CHAIN_LENGTH}",
        ):
            return c
        leaf = self.chain[0]
        self.facts["leaf_serial"] = format(leaf.serial_number, "x")
        root = self.req.test_root or device_root()
        if not c.check(
            "gpu_root_pinned",
            root_pinned(self.chain, root),
            f"{gpu}: certificate chain does not end in the pinned "
            f"{'test GPU root' if self.req.test_root else 'NVIDIA Device Identity CA'}",
        ):
            return c
        try:
            verify_chain(self.chain, self.at)
            c.check("gpu_chain", True, "")
        except ChainError as e:
            c.check("gpu_chain", False, f"{gpu}: certificate chain: {e}")
            return c
        try:
            m = parse_measurements(self.item.evidence)
            c.check("gpu_spdm_parses", True, "")
        except SpdmError as e:
            c.check("gpu_spdm_parses", False, f"{gpu}: SPDM evidence malformed: {e}")
            return c
        self.facts["spdm_nonce"] = m.request_nonce.hex()
        if not c.check(
            "gpu_spdm_signature",
            _signature_ok(leaf, m),
            f"{gpu}: SPDM signature does not verify with the leaf certificate's key",
        ):
            return c
        self.spdm = m  # only signed measurements are compared with reference values
        if self.nonce is None:
            c.check("gpu_nonce", False, f"{gpu}: no nonce to check freshness against")
        else:
            c.check(
                "gpu_nonce",
                m.request_nonce == self.nonce,
                f"{gpu}: the signed SPDM request carries nonce {m.request_nonce.hex()[:16]}…, "
                "not ours (stale or canned evidence)",
            )
        reported, certified = m.opaque.get(OPAQUE_FWID), leaf_fwid(leaf)
        self.facts["fwid"] = reported.hex() if reported else None
        c.check(
            "gpu_fwid_matches",
            reported is not None and certified is not None and reported == certified,
            f"{gpu}: firmware id in the report does not match the leaf certificate's"
            if reported and certified
            else f"{gpu}: firmware id missing from the report or the certificate",
        )
        self._versions(m)
        return c

    def _versions(self, m: Measurements) -> None:
        try:
            self.facts.update(gpu_rim.reported_versions(m))
        except (SpdmError, UnicodeDecodeError) as e:
            self.c.skipped.append(f"GPU {self.index}: versions unreadable: {e}")


def verify_gpu_payload(
    payload: Any,
    *,
    nonce: bytes | None,
    at: int,
    requirements: GpuRequirements | None = None,
) -> GpuVerdict:
    """Verify ``payload`` (see :func:`parse_gpu_payload`) at unix time ``at`` for ``nonce``
    (the 32 bytes we chose, also bound in the TDX quote's report_data)."""
    req = requirements or GpuRequirements()
    root_kind: Literal["nvidia", "test"] = "test" if req.test_root is not None else "nvidia"
    c = _Checks()
    try:
        parsed = parse_gpu_payload(payload)
        c.check("gpu_payload_well_formed", True, "")
    except GpuPayloadError as e:
        c.check("gpu_payload_well_formed", False, f"GPU payload malformed: {e}")
        return _verdict(c, root_kind, [], "unverified", "unchecked")
    arches = {parsed.arch, *(i.arch for i in parsed.items)} - {None}
    c.check(
        "gpu_arch_hopper",
        arches == {"HOPPER"},
        f"GPU architecture {', '.join(sorted(arches)) or 'unstated'} is not HOPPER "
        "(only Hopper evidence is verified)",
    )
    if parsed.nonce is not None and nonce is not None:
        c.check(
            "gpu_payload_nonce", parsed.nonce == nonce.hex(), "GPU payload names another nonce"
        )
    elif parsed.nonce is None:
        c.skipped.append("gpu_payload_nonce: the payload names no nonce (unsigned anyway)")
    verifiers = [_GpuVerifier(i, item, nonce, at, req) for i, item in enumerate(parsed.items)]
    for v in verifiers:
        result = v.run()
        for name, passed in result.checks.items():
            c.check(name, passed, "")
        c.failures.extend(result.failures)
        c.skipped.extend(result.skipped)
    serials = [v.facts.get("leaf_serial") for v in verifiers if v.facts.get("leaf_serial")]
    c.check(
        "gpu_distinct", len(set(serials)) == len(serials), "the same GPU is reported twice"
    )
    count = len(parsed.items)
    if req.expected_count is None:
        c.check("gpu_count", count >= 1, "no GPU evidence in the payload")
    else:
        c.check(
            "gpu_count",
            count == req.expected_count,
            f"{count} GPUs reported, policy expects {req.expected_count}",
        )
    measurements = _measurements(c, verifiers, req, at)
    revocation = _revocation(c, verifiers, req, at)
    return _verdict(c, root_kind, verifiers, measurements, revocation)


def _worst[O: str](outcomes: Iterable[O], bad: O, good: O, otherwise: O) -> O:
    """Several GPUs' (or TDs') outcomes as one: ``bad`` if any is, ``good`` only if every one
    is (of at least one), else ``otherwise``."""
    seen = set(outcomes)
    return bad if bad in seen else good if seen == {good} else otherwise


def _measurements(
    c: _Checks, verifiers: list[_GpuVerifier], req: GpuRequirements, at: int
) -> Measured:
    if req.rim_dir is None:
        c.skipped.append("gpu_measurements: no RIM files supplied (NVIDIA's RIM service is online)")
        outcome: Measured = "unverified"
    elif not verifiers or any(v.spdm is None for v in verifiers):
        outcome = "unverified"
        c.skipped.append("gpu_measurements: evidence not verified, nothing to compare")
    else:
        outcomes = []
        for v in verifiers:
            assert v.spdm is not None
            result = gpu_rim.check_measurements(v.spdm, req.rim_dir, at)
            v.facts["rim_ids"] = result.rim_ids
            v.facts["measurements"] = result.outcome
            v.rim_chains = result.chains
            for name, passed in result.checks.items():
                c.check(name, passed, "")
            c.failures.extend(f"GPU {v.index}: {f}" for f in result.failures)
            c.skipped.extend(f"GPU {v.index}: {s}" for s in result.skipped)
            outcomes.append(result.outcome)
        outcome = _worst(outcomes, "failed", "verified", "unverified")
    if req.require_measurements:
        c.check(
            "gpu_measurements_required",
            outcome == "verified",
            f"GPU measurements {outcome}, and policy requires them verified",
        )
    return outcome


def _revocation(
    c: _Checks, verifiers: list[_GpuVerifier], req: GpuRequirements, at: int
) -> Revocation:
    if req.ocsp_dir is None:
        c.skipped.append("gpu_revocation: no OCSP responses supplied (OCSP is online-only)")
        outcome: Revocation = "unchecked"
    elif not verifiers or any(len(v.chain) != CHAIN_LENGTH for v in verifiers):
        c.skipped.append("gpu_revocation: certificate chains unusable")
        outcome = "unchecked"
    else:
        responses = gpu_ocsp.load_responses(req.ocsp_dir)
        outcomes = []
        for v in verifiers:
            # Device certificates 1-3 (not the leaf, not the root); every RIM signing
            # certificate but the root.
            chains = {"device": (v.chain, range(1, CHAIN_LENGTH - 1))}
            for kind, rim_chain in v.rim_chains.items():
                chains[f"{kind} RIM"] = (list(rim_chain), range(len(rim_chain) - 1))
            statuses = []
            for what, (chain, positions) in chains.items():
                status = gpu_ocsp.chain_status(chain, positions, responses, at)
                statuses.append(status.outcome)
                c.skipped.extend(f"GPU {v.index} {what}: {s}" for s in status.unchecked)
                if status.outcome == "revoked":
                    c.check("gpu_not_revoked", False, f"GPU {v.index} {what}: {status.revoked}")
            mine: Revocation = _worst(statuses, "revoked", "good", "unchecked")
            v.facts["revocation"] = mine
            outcomes.append(mine)
        if "revoked" not in outcomes:
            c.check("gpu_not_revoked", True, "")
        outcome = _worst(outcomes, "revoked", "good", "unchecked")
    if req.require_revocation:
        c.check(
            "gpu_revocation_required",
            outcome == "good",
            f"GPU revocation {outcome}, and policy requires it checked",
        )
    return outcome


def combine_gpu_verdicts(verdicts: list[GpuVerdict]) -> GpuVerdict:
    """One GPU part for a model served by several TDs (``all_attestations``): passed only
    if every TD's GPUs passed; the first failure is the reason."""
    if len(verdicts) == 1:
        return verdicts[0]
    checks: dict[str, bool] = {}
    for v in verdicts:
        for name, passed in v.checks.items():
            checks[name] = checks.get(name, True) and passed
    failures = [f"TD {i}: {v.reason}" for i, v in enumerate(verdicts) if not v.ok]
    # A GPU is passed through to one TD: the same one in two TDs is a replay.
    serials = [g.leaf_serial for v in verdicts for g in v.gpus if g.leaf_serial]
    if len(set(serials)) != len(serials):
        checks["gpu_distinct"] = False
        failures.append("GPU evidence rejected: the same GPU is reported by two TDs")
    measured = {v.measurements for v in verdicts}
    revoked = {v.revocation for v in verdicts}
    gpus = sum(v.gpu_count for v in verdicts)
    return GpuVerdict(
        ok=not failures,
        reason=failures[0] if failures
        else f"GPU evidence verified: {gpus} GPU(s) in {len(verdicts)} TDs",
        root=verdicts[0].root,
        gpu_count=gpus,
        checks=checks,
        measurements=_worst(measured, "failed", "verified", "unverified"),
        revocation=_worst(revoked, "revoked", "good", "unchecked"),
        skipped=tuple(dict.fromkeys(f"TD {i}: {s}" for i, v in enumerate(verdicts)
                                    for s in v.skipped)),
        gpus=tuple(g for v in verdicts for g in v.gpus),
    )


def _verdict(
    c: _Checks,
    root: Literal["nvidia", "test"],
    verifiers: list[_GpuVerifier],
    measurements: Measured,
    revocation: Revocation,
) -> GpuVerdict:
    ok = not c.failures and bool(c.checks) and all(c.checks.values())
    gpus = tuple(
        GpuFacts(**v.facts, checks=dict(v.c.checks)) for v in verifiers
    )
    if ok:
        reason = f"GPU evidence verified: {len(verifiers)} GPU(s), measurements {measurements}"
    else:
        failure = next((f for f in c.failures if f), "a GPU check failed")
        reason = f"GPU evidence rejected: {failure}"
    return GpuVerdict(
        ok=ok,
        reason=reason,
        root=root,
        gpu_count=len(verifiers),
        checks=dict(c.checks),
        measurements=measurements,
        revocation=revocation,
        skipped=tuple(dict.fromkeys(c.skipped)),
        gpus=gpus,
    )
