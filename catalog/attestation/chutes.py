"""Chutes' per-instance TDX evidence: fetched, parsed and verified one instance at a time.

Why per instance: Chutes serves a model from many TDs and, with end-to-end encryption, a
request is sealed to ONE instance's ML-KEM-768 key. What must be verified is therefore that
exact instance, and that the key we seal to is the one its quote binds. ``/e2e/instances``
hands out keys for any instance (TEE or not), so it is never trusted alone.

Wire facts (``chutesai/chutes-api``; cross-checked against the reference verifier in
``nearai/cloud-api``):

- ``GET /e2e/instances/{chute_id}`` -> ``{"instances": [{"instance_id", "e2e_pubkey" (base64,
  1184 bytes), "nonces": [...]}], "nonce_expires_in": 60}``.
- ``GET /chutes/{chute_id}/evidence?nonce=<64 hex>`` -> ``{"evidence": [{"quote" (base64 TDX
  v4 quote), "gpu_evidence" ([...] or null), "instance_id", "certificate" (base64 DER, self
  signed)}], "failed_instance_ids": [...]}``.
- ``report_data[0:32] = sha256((nonce_hex + e2e_pubkey_b64).encode())``, the STRING forms
  exactly as sent and received (decoding either does not match), and
  ``report_data[32:64] = sha256(DER SubjectPublicKeyInfo of the certificate)``.

Everything else (chain to Intel's root, TCB, debug bit, measurement allow-lists) is the same
ordered list of checks as for NEAR AI / Phala, in :mod:`verifier`, with this module's binding
plugged in.

GPU evidence (``gpu_evidence``: the bare list of per-GPU items NVIDIA's attestation SDK's
``get_evidence`` returns) is verified by :mod:`.gpu` like NEAR's ``nvidia_payload``, but
against another nonce: the instance binds its GPUs to the SAME 32 bytes as
``report_data[0:32]``, ``sha256((nonce_hex + e2e_pubkey_b64).encode())``. Sources:
``chutesai/chutes`` ``chutes/entrypoint/verify.py`` ``TeeEvidenceService._fetch_evidence``
computes that digest (hex) and sends it as ``nonce`` to the node's attestation service
``/server/attest``; ``chutesai/sek8s`` ``sek8s/services/attestation.py`` ``attest`` passes
that one value both to ``TdxQuoteProvider.get_quote`` (``report_data = nonce_hex +
cert_hash_hex``, ``sek8s/providers/tdx.py``) and to ``NvEvidenceProvider.get_evidence``
(``chutes-nvevidence --nonce``, ``nvevidence/chutes_nvevidence/attestation.py``:
``Attestation.set_nonce`` then ``get_evidence``), and ``chutesai/chutes-api``
(``TeeServerClient.get_chute_evidence``) relays ``json.loads(nvtrust_evidence)`` as
``gpu_evidence``; its own ``verify_gpu_evidence`` checks the GPUs against the same expected
nonce as the quote. The reference verifier in ``nearai/cloud-api``
(``attested/chutes/attestation.rs``) says the same: "the NVIDIA evidence is bound to a
Chutes-derived nonce, not the raw caller nonce". So a GPU report replayed from another
instance, or from another of our nonces, fails the signed-nonce check.

Why this module is long: the wire format, the binding and the fetch/verify steps of one
upstream's evidence belong together; a reviewer checks the parse against the binding here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teegate.catalog.attestation.collateral import CollateralCache, CollateralInput
from teegate.catalog.attestation.evidence import EvidenceError, NodeEvidence
from teegate.catalog.attestation.policy import Policy
from teegate.catalog.attestation.source import EvidenceFetchError
from teegate.catalog.attestation.verdict import InstanceVerdict, Verdict
from teegate.catalog.attestation.verifier import BindingCheck, verify_evidence

MLKEM768_PUBLIC_KEY_LEN = 1184
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
NONCE_TTL_CAP_S = 60
"""Nonce tokens live 60 s upstream; a longer ``nonce_expires_in`` is not believed."""


@dataclass(frozen=True)
class DiscoveredInstance:
    """One row of ``/e2e/instances``: an instance's claimed key and its single-use tokens."""

    instance_id: str
    e2e_pubkey: str
    nonces: tuple[str, ...]


@dataclass(frozen=True)
class Discovery:
    instances: tuple[DiscoveredInstance, ...]
    nonce_expires_in: int


@dataclass(frozen=True)
class InstanceEvidence:
    """One instance's entry in ``/chutes/{id}/evidence``, decoded."""

    instance_id: str
    quote: bytes
    certificate_der: bytes
    gpu_evidence: Any = None
    collateral: dict[str, Any] | None = None
    """Shipped only by the sandbox; used only under the explicit test root."""


@dataclass(frozen=True)
class ChutesEvidence:
    entries: dict[str, InstanceEvidence]
    failed_instance_ids: frozenset[str]


def _str(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise EvidenceError(f"{field} must be a non-empty string")
    return value


def _b64(value: Any, field: str) -> bytes:
    try:
        return base64.b64decode(_str(value, field), validate=True)
    except (binascii.Error, ValueError) as e:
        raise EvidenceError(f"{field} is not base64") from e


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise EvidenceError(f"{field} must be a list")
    return value


def parse_instances(doc: Any) -> Discovery:
    """``/e2e/instances`` as received -> :class:`Discovery` (raises EvidenceError)."""
    if not isinstance(doc, dict):
        raise EvidenceError("instances answer must be a JSON object")
    rows = []
    for row in _list(doc.get("instances"), "instances"):
        if not isinstance(row, dict):
            raise EvidenceError("each instance must be an object")
        nonces = tuple(_str(n, "nonces[]") for n in _list(row.get("nonces"), "nonces"))
        rows.append(
            DiscoveredInstance(
                instance_id=_str(row.get("instance_id"), "instance_id"),
                e2e_pubkey=_str(row.get("e2e_pubkey"), "e2e_pubkey"),
                nonces=nonces,
            )
        )
    expires = doc.get("nonce_expires_in", NONCE_TTL_CAP_S)
    if not isinstance(expires, int) or isinstance(expires, bool) or expires <= 0:
        raise EvidenceError("nonce_expires_in must be a positive integer")
    return Discovery(tuple(rows), min(expires, NONCE_TTL_CAP_S))


def parse_evidence(doc: Any) -> ChutesEvidence:
    """``/chutes/{id}/evidence`` as received -> :class:`ChutesEvidence` (raises EvidenceError)."""
    if not isinstance(doc, dict):
        raise EvidenceError("evidence answer must be a JSON object")
    entries: dict[str, InstanceEvidence] = {}
    for row in _list(doc.get("evidence"), "evidence"):
        if not isinstance(row, dict):
            raise EvidenceError("each evidence entry must be an object")
        iid = _str(row.get("instance_id"), "instance_id")
        if iid in entries:
            raise EvidenceError(f"instance {iid} has two evidence entries")
        collateral = row.get("collateral")
        if collateral is not None and not isinstance(collateral, dict):
            raise EvidenceError("collateral must be an object")
        entries[iid] = InstanceEvidence(
            instance_id=iid,
            quote=_b64(row.get("quote"), "quote"),
            certificate_der=_certificate_der(row.get("certificate")),
            gpu_evidence=row.get("gpu_evidence") or None,
            collateral=collateral,
        )
    failed = frozenset(
        _str(i, "failed_instance_ids[]")
        for i in _list(doc.get("failed_instance_ids"), "failed_instance_ids")
    )
    return ChutesEvidence(entries, failed)


def _certificate_der(value: Any) -> bytes:
    """Base64 DER as the API sends it (PEM accepted too, for hand-made evidence)."""
    text = _str(value, "certificate")
    if text.lstrip().startswith("-----BEGIN"):
        try:
            return x509.load_pem_x509_certificate(text.encode()).public_bytes(
                serialization.Encoding.DER
            )
        except ValueError as e:
            raise EvidenceError("certificate is not a PEM certificate") from e
    return _b64(text, "certificate")


def spki_sha256(certificate_der: bytes) -> bytes | None:
    """sha256 of the certificate's DER SubjectPublicKeyInfo (None: not a certificate)."""
    try:
        cert = x509.load_der_x509_certificate(certificate_der)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError):
        return None
    return hashlib.sha256(spki).digest()


def key_binding_digest(nonce_hex: str, e2e_pubkey: str) -> bytes:
    """What ``report_data[0:32]`` must be: over the strings, exactly as on the wire."""
    return hashlib.sha256((nonce_hex + e2e_pubkey).encode()).digest()


def chutes_binding(nonce_hex: str, e2e_pubkey: str, certificate_der: bytes) -> BindingCheck:
    """The Chutes ``report_data`` checks for one instance, for :func:`verify_evidence`."""

    def check(report_data: bytes) -> list[tuple[str, bool, str]]:
        try:
            raw = base64.b64decode(e2e_pubkey, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        spki = spki_sha256(certificate_der)
        return [
            (
                "e2e_key_well_formed",
                len(raw) == MLKEM768_PUBLIC_KEY_LEN,
                "e2e_pubkey is not a base64 ML-KEM-768 public key",
            ),
            (
                "report_data_nonce_and_key",
                len(report_data) == 64
                and report_data[:32] == key_binding_digest(nonce_hex, e2e_pubkey),
                "report_data does not bind our nonce and this instance's E2EE key",
            ),
            (
                "report_data_certificate",
                spki is not None and len(report_data) == 64 and report_data[32:] == spki,
                "report_data does not bind the instance certificate"
                if spki is not None
                else "instance certificate does not parse",
            ),
        ]

    return check


def _refused(iid: str, key: str, reason: str, now: int, retry_s: int) -> InstanceVerdict:
    return InstanceVerdict(
        instance_id=iid,
        ok=False,
        reason=f"attestation failed: {reason}",
        e2e_pubkey=key,
        key_sha256=hashlib.sha256(key.encode()).hexdigest(),
        verified_at=now,
        expires_at=now + retry_s,
    )


def verify_instances(
    model: str,
    keys: Mapping[str, str],
    evidence: ChutesEvidence,
    *,
    nonce_hex: str,
    policy: Policy,
    collateral: Callable[[bytes], CollateralInput | None],
    now: int,
    root_ca_der: bytes | None = None,
) -> list[InstanceVerdict]:
    """A verdict for each instance in ``keys`` (instance id -> base64 key as discovered).

    An instance is usable only with a quote that passes every check AND binds our nonce and
    exactly that key; one in ``failed_instance_ids`` or without evidence is refused."""
    nonce = bytes.fromhex(nonce_hex)
    if len(nonce) != 32 or nonce.hex() != nonce_hex:
        raise ValueError("nonce_hex must be 64 lowercase hex digits")
    out = []
    for iid, key in keys.items():
        entry = evidence.entries.get(iid)
        if iid in evidence.failed_instance_ids:
            out.append(
                _refused(
                    iid, key, "upstream lists the instance as failed", now, policy.retry_interval_s
                )
            )
            continue
        if entry is None:
            out.append(
                _refused(iid, key, "no TEE evidence for the instance", now, policy.retry_interval_s)
            )
            continue
        node = NodeEvidence(
            quote=entry.quote, gpu_payload=entry.gpu_evidence, collateral=entry.collateral
        )
        v: Verdict = verify_evidence(
            {"instance_id": iid},
            nonce=nonce,
            policy=policy,
            collateral=collateral,
            now=now,
            root_ca_der=root_ca_der,
            model=model,
            parse=lambda _doc, node=node: [node],
            binding=chutes_binding(nonce_hex, key, entry.certificate_der),
            gpu_nonce=key_binding_digest(nonce_hex, key),
        )
        spki = spki_sha256(entry.certificate_der)
        out.append(
            InstanceVerdict(
                instance_id=iid,
                ok=v.ok,
                reason=v.reason,
                e2e_pubkey=key,
                key_sha256=hashlib.sha256(key.encode()).hexdigest(),
                quote_sha256=v.quote_sha256,
                certificate_spki_sha256=spki.hex() if spki else None,
                tcb_status=v.tcb_status,
                mrtd=v.mrtd,
                verified_at=v.verified_at,
                expires_at=v.expires_at,
                gpu=v.gpu,
                checks=v.checks,
            )
        )
    return out


def model_verdict(
    model: str, instances: list[InstanceVerdict], *, now: int, root: str | None, retry_s: int
) -> Verdict:
    """The model-level verdict: servable while at least one instance is usable."""
    good = [i for i in instances if i.ok and now < i.expires_at]
    if good:
        first = good[0]
        reason = f"attested: TDX {first.tcb_status}, {len(good)} of {len(instances)} instances"
        ok, expires = True, max(i.expires_at for i in good)
    else:
        ok, expires = False, now + retry_s
        failed = next((i.reason for i in instances if not i.ok), None)
        reason = (
            f"no attested instance ({failed.removeprefix('attestation failed: ')})"
            if failed
            else "no attested instance (none discovered)"
        )
        reason = f"attestation failed: {reason}"
        first = None
    # The GPU part shown for the model: the instance whose quote it names (served), or the
    # one whose failure is the reason (refused).
    shown = first or next((i for i in instances if not i.ok), None)
    return Verdict(
        model=model,
        ok=ok,
        reason=reason,
        mode="dcap",
        verified_at=max((i.verified_at for i in instances), default=now),
        expires_at=expires,
        root=root,  # type: ignore[arg-type]
        quote_sha256=first.quote_sha256 if first else None,
        tee_type="TDX" if first else None,
        tcb_status=first.tcb_status if first else None,
        mrtd=first.mrtd if first else None,
        gpu=shown.gpu if shown else "absent",
        evidence_kind="chutes",
        instances=tuple(instances),
    )


class ChutesEvidenceClient:
    """Fetches discovery and evidence from the Chutes API, with the upstream's key."""

    name = "chutes"

    def __init__(self, base_url: str, api_key: str | None, client: httpx.AsyncClient) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"accept": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._client = client

    async def _get(self, path: str, what: str, params: dict[str, str] | None = None) -> Any:
        try:
            resp = await self._client.get(self._base + path, params=params, headers=self._headers)
        except httpx.HTTPError as e:
            raise EvidenceFetchError(f"{what} unreachable: {type(e).__name__}") from e
        if resp.status_code != 200:
            raise EvidenceFetchError(f"{what} answered HTTP {resp.status_code}")
        if len(resp.content) > MAX_RESPONSE_BYTES:
            raise EvidenceFetchError(f"{what} too large")
        try:
            return resp.json()
        except ValueError as e:
            raise EvidenceFetchError(f"{what} is not JSON") from e

    async def instances(self, chute_id: str) -> Discovery:
        doc = await self._get(f"/e2e/instances/{chute_id}", "instance discovery")
        try:
            return parse_instances(doc)
        except EvidenceError as e:
            raise EvidenceFetchError(f"instance discovery malformed: {e}") from e

    async def evidence(self, chute_id: str, nonce_hex: str) -> dict[str, Any]:
        doc = await self._get(f"/chutes/{chute_id}/evidence", "evidence", {"nonce": nonce_hex})
        if not isinstance(doc, dict):
            raise EvidenceFetchError("evidence is not a JSON object")
        return doc


class ChutesVerifier:
    """Turns one evidence answer into instance verdicts: collateral, then dcap-qvl off-loop."""

    def __init__(
        self,
        policy: Policy,
        *,
        collateral: CollateralCache | None = None,
        clock: Callable[[], float],
    ) -> None:
        self.policy = policy
        self._root = policy.load_test_root()
        self._collateral = collateral or CollateralCache(
            policy.pccs_url, timeout_s=policy.fetch_timeout_s
        )
        self._clock = clock

    @property
    def root(self) -> str:
        return "intel" if self._root is None else "test"

    async def __call__(
        self, model: str, keys: Mapping[str, str], doc: dict[str, Any], nonce_hex: str
    ) -> list[InstanceVerdict]:
        now = int(self._clock())
        retry = self.policy.retry_interval_s
        try:
            evidence = parse_evidence(doc)
        except EvidenceError as e:
            return [_refused(i, k, f"malformed evidence: {e}", now, retry) for i, k in keys.items()]
        found: dict[bytes, CollateralInput] = {}
        for iid in keys:
            entry = evidence.entries.get(iid)
            if entry is None or entry.quote in found:
                continue
            if self._root is not None and entry.collateral is not None:
                found[entry.quote] = entry.collateral
                continue
            try:
                found[entry.quote] = await self._collateral.get(entry.quote, now)
            except (ValueError, RuntimeError, TimeoutError):
                continue  # verify_evidence refuses the quote: "no collateral"
        return await asyncio.to_thread(
            verify_instances,
            model,
            dict(keys),
            evidence,
            nonce_hex=nonce_hex,
            policy=self.policy,
            collateral=found.get,
            now=now,
            root_ca_der=self._root,
        )
