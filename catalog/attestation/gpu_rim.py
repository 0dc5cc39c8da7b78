"""NVIDIA reference values (RIMs): which firmware a GPU should report, signed by NVIDIA.

A Hopper GPU's measurements are compared against two RIMs, the driver's and the VBIOS's,
each an SWID-tag XML file with an enveloped XMLDSig (ecdsa-sha384) whose KeyInfo carries the
signer's chain up to NVIDIA's CoRIM signing root. Operators download them from NVIDIA's RIM
service (online) into a folder named in ``[attestation].gpu_rim_dir``, as ``<RIM id>.xml``;
nothing here fetches anything.

Rules (NVIDIA's, as nvtrust applies them, but stricter where nvtrust only warns): the
signature verifies with the KeyInfo leaf, whose chain reaches the pinned root at the
verification time; only the signed content is read; ``colloquialVersion`` equals the version
the GPU reports; RIM index i is SPDM block i+1; every active index has a runtime value of the
stated size equal to one of its ``Hash0..Hash{alternatives-1}``; no index is active in both
RIMs; index 35 is skipped when NVDEC0_STATUS (opaque 11) is 0x55 (NVDEC0 not in CC use).
"""

from __future__ import annotations

import base64
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from lxml import etree
from signxml import DigestAlgorithm, SignatureMethod, XMLVerifier
from signxml.exceptions import InvalidInput, InvalidSignature
from signxml.verifier import SignatureConfiguration

from teegate.catalog.attestation.gpu_chain import ChainError, root_pinned, verify_chain
from teegate.catalog.attestation.nvidia_roots import rim_root
from teegate.catalog.attestation.spdm import (
    OPAQUE_CHIP_SKU,
    OPAQUE_DRIVER_VERSION,
    OPAQUE_NVDEC0_STATUS,
    OPAQUE_PROJECT,
    OPAQUE_PROJECT_SKU,
    OPAQUE_VBIOS_VERSION,
    Measurements,
    SpdmError,
    vbios_version,
)

DSIG = "{http://www.w3.org/2000/09/xmldsig#}"
SWID = "{http://standards.iso.org/iso/19770/-2/2015/schema.xsd}"
NVDEC0_INDEX = 35
NVDEC0_OFF = b"\x55"
MAX_RIM_BYTES = 1024 * 1024


class RimError(ValueError):
    """A RIM file is unreadable, unsigned, or not signed by NVIDIA's RIM hierarchy."""


def reported_versions(m: Measurements) -> dict[str, Any]:
    """Driver and VBIOS versions the GPU reports, and the RIM ids they select."""
    driver = m.opaque_text(OPAQUE_DRIVER_VERSION)
    raw_vbios = m.opaque.get(OPAQUE_VBIOS_VERSION)
    vbios = vbios_version(raw_vbios) if raw_vbios is not None else None
    project = m.opaque_text(OPAQUE_PROJECT)
    project_sku = m.opaque_text(OPAQUE_PROJECT_SKU)
    chip_sku = m.opaque_text(OPAQUE_CHIP_SKU)
    ids: dict[str, str] = {}
    if driver:
        ids["driver"] = f"NV_GPU_DRIVER_GH100_{driver}"
    if vbios and project and project_sku and chip_sku:
        digits = vbios.replace(".", "").upper()
        ids["vbios"] = f"NV_GPU_VBIOS_{project}_{project_sku}_{chip_sku}_{digits}".upper()
    return {"driver_version": driver, "vbios_version": vbios, "rim_ids": ids}


@dataclass(frozen=True)
class Reference:
    """One active RIM measurement: the allowed values at one index."""

    size: int
    values: frozenset[bytes]


@dataclass(frozen=True)
class Rim:
    version: str
    references: dict[int, Reference]
    chain: tuple[x509.Certificate, ...] = ()
    """The KeyInfo chain, signer first (its revocation is checked like the GPU's)."""


_CONFIG_ALGOS = {
    "signature_methods": frozenset({SignatureMethod.ECDSA_SHA384}),
    "digest_algorithms": frozenset(
        {DigestAlgorithm.SHA256, DigestAlgorithm.SHA384, DigestAlgorithm.SHA512}
    ),
}


def _keyinfo_chain(doc: Any) -> list[x509.Certificate]:
    certs = doc.findall(f".//{DSIG}KeyInfo//{DSIG}X509Certificate")
    try:
        return [x509.load_der_x509_certificate(base64.b64decode(c.text or "")) for c in certs]
    except ValueError as e:
        raise RimError(f"KeyInfo certificate unreadable: {e}") from None


def load_rim(data: bytes, at: int) -> Rim:
    """Verify a RIM's signature and chain at ``at``; read its signed content only.

    The signature (the costly part, and independent of time) is verified once per distinct
    file content; the chain's pin and validity at ``at`` are checked on every call."""
    rim = _signed_rim(data)
    try:
        verify_chain(list(rim.chain), at)
    except ChainError as e:
        raise RimError(f"RIM signing chain: {e}") from None
    return rim


_SIGNED: OrderedDict[bytes, Rim] = OrderedDict()
_SIGNED_MAX = 32


def _signed_rim(data: bytes) -> Rim:
    key = hashlib.sha256(data).digest()
    if key in _SIGNED:
        _SIGNED.move_to_end(key)
        return _SIGNED[key]
    rim = _verify_signature(data)
    _SIGNED[key] = rim
    while len(_SIGNED) > _SIGNED_MAX:
        _SIGNED.popitem(last=False)
    return rim


def _verify_signature(data: bytes) -> Rim:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    try:
        doc = etree.fromstring(data, parser=parser)
    except etree.XMLSyntaxError as e:
        raise RimError(f"not XML: {e}") from None
    chain = _keyinfo_chain(doc)
    if len(chain) < 2 or not root_pinned(chain, rim_root()):
        raise RimError("KeyInfo chain does not end in the pinned NVIDIA CoRIM signing root")
    # signxml checks the signer's validity at verification_time; ours is checked against
    # the caller's time in load_rim, so here any moment inside the signer's validity.
    config = SignatureConfiguration(
        **_CONFIG_ALGOS,
        ignore_ambiguous_key_info=True,
        verification_time=chain[0].not_valid_before_utc,
    )
    try:
        result = XMLVerifier().verify(data, x509_cert=chain[0], expect_config=config)
    except (InvalidSignature, InvalidInput) as e:
        raise RimError(f"XML signature: {e}") from None
    signed = result.signed_xml  # type: ignore[union-attr]
    if signed is None or signed.tag != f"{SWID}SoftwareIdentity":
        raise RimError("the signature does not cover the whole RIM")
    return _read(signed, tuple(chain))


def _read(signed: Any, chain: tuple[x509.Certificate, ...]) -> Rim:
    meta = signed.find(f"{SWID}Meta")
    version = meta.get("colloquialVersion") if meta is not None else None
    if not version:
        raise RimError("no colloquialVersion in the signed RIM")
    refs: dict[int, Reference] = {}
    for res in signed.iterfind(f"{SWID}Payload/{SWID}Resource"):
        if res.get("type") != "Measurement" or res.get("active") != "True":
            continue
        try:
            index, size = int(res.get("index")), int(res.get("size"))
            count = int(res.get("alternatives"))
            hashes = {k.split("}")[-1]: v for k, v in res.attrib.items()}
            values = frozenset(bytes.fromhex(hashes[f"Hash{i}"]) for i in range(count))
        except (TypeError, ValueError, KeyError) as e:
            raise RimError(f"measurement {res.get('index')} malformed: {e}") from None
        if index in refs:
            raise RimError(f"measurement index {index} listed twice")
        refs[index] = Reference(size=size, values=values)
    return Rim(version=version, references=refs, chain=chain)


@dataclass
class RimResult:
    outcome: str = "unverified"
    rim_ids: dict[str, str] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    mismatched: list[int] = field(default_factory=list)
    chains: dict[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)

    def check(self, name: str, passed: bool, failure: str) -> bool:
        self.checks[name] = self.checks.get(name, True) and passed
        if not passed:
            self.failures.append(failure)
        return passed


def check_measurements(m: Measurements, rim_dir: Path, at: int) -> RimResult:
    """Compare one GPU's measurements with its two RIMs from ``rim_dir``."""
    r = RimResult()
    try:
        facts = reported_versions(m)
    except (SpdmError, UnicodeDecodeError) as e:
        r.check("gpu_rim_selected", False, f"versions unreadable: {e}")
        r.outcome = "failed"
        return r
    r.rim_ids = ids = facts["rim_ids"]
    if set(ids) != {"driver", "vbios"}:
        r.check("gpu_rim_selected", False, "the report lacks the fields that name its RIMs")
        r.outcome = "failed"
        return r
    rims: dict[str, Rim] = {}
    for kind, rim_id in ids.items():
        path = rim_dir / f"{rim_id}.xml"
        if not path.is_file():
            r.skipped.append(f"gpu_measurements: no RIM {rim_id}.xml in the RIM folder")
            continue
        try:
            if path.stat().st_size > MAX_RIM_BYTES:
                raise RimError("file too large")
            rims[kind] = load_rim(path.read_bytes(), at)
            r.chains[kind] = rims[kind].chain
            r.check("gpu_rim_signature", True, "")
        except (RimError, OSError) as e:
            r.check("gpu_rim_signature", False, f"RIM {rim_id}: {e}")
            continue
        reported = facts[f"{kind}_version"] or ""
        r.check(
            "gpu_rim_version",
            rims[kind].version.upper() == reported.upper(),
            f"RIM {rim_id} is for version {rims[kind].version}, the GPU reports {reported}",
        )
    if r.failures:
        r.outcome = "failed"
        return r
    if len(rims) != 2:
        return r  # unverified: a RIM is missing, said in skipped
    _compare(r, m, rims["driver"], rims["vbios"])
    r.outcome = "verified" if not r.failures else "failed"
    return r


def _compare(r: RimResult, m: Measurements, driver: Rim, vbios: Rim) -> None:
    both = sorted(set(driver.references) & set(vbios.references))
    r.check("gpu_rim_disjoint", not both, f"measurement indexes {both} active in both RIMs")
    golden = {**driver.references, **vbios.references}
    nvdec0_off = m.opaque.get(OPAQUE_NVDEC0_STATUS) == NVDEC0_OFF
    for index, ref in sorted(golden.items()):
        if index == NVDEC0_INDEX and nvdec0_off:
            r.skipped.append(f"gpu_measurements: index {index} skipped (NVDEC0 not in use)")
            continue
        value = m.blocks.get(index + 1)
        if value is None or len(value) != ref.size or value not in ref.values:
            r.mismatched.append(index)
    r.check(
        "gpu_measurements_match",
        not r.mismatched,
        f"measurements {r.mismatched} do not match NVIDIA's reference values",
    )
