"""The outcome of attesting one model: what the gate reads, and what clients may be shown.

A verdict is immutable and carries its own validity window, so the gate's question ("may I
send this prompt there now?") is a field read and two integer comparisons.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from teegate.catalog.attestation.gpu import GpuVerdict

Mode = Literal["dcap", "flag"]
EvidenceKind = Literal["near", "chutes"]


class InstanceVerdict(BaseModel):
    """One Chutes instance's attestation: whether it may be sent prompts, under which key.

    Instances are verified individually; only an ``ok`` one, with exactly the ``e2e_pubkey``
    its quote binds, is ever used."""

    model_config = ConfigDict(frozen=True)

    instance_id: str
    ok: bool
    reason: str
    e2e_pubkey: str = Field(default="", repr=False)
    """The base64 ML-KEM-768 key exactly as ``/e2e/instances`` gave it (bound by the quote)."""
    key_sha256: str | None = None
    quote_sha256: str | None = None
    certificate_spki_sha256: str | None = None
    tcb_status: str | None = None
    mrtd: str | None = None
    verified_at: int
    expires_at: int
    gpu: GpuVerdict | Literal["unverified", "absent"] = "unverified"
    """The instance's GPUs, verified for the digest its quote binds (see ``.chutes``)."""
    checks: dict[str, bool] = Field(default_factory=dict)

    def usable(self, now: float, e2e_pubkey: str) -> bool:
        """May a request be sealed to ``e2e_pubkey`` on this instance at ``now``?"""
        return self.ok and now < self.expires_at and e2e_pubkey == self.e2e_pubkey

    def summary(self) -> dict[str, Any]:
        """What clients and logs are shown (the key itself only by its hash, the GPU part
        without per-GPU detail)."""
        shown = self.model_dump(mode="json", exclude={"e2e_pubkey"})
        if isinstance(self.gpu, GpuVerdict):
            shown["gpu"] = self.gpu.model_dump(mode="json", exclude={"gpus", "skipped"})
        return shown


class Verdict(BaseModel):
    """One attestation of one model at one time."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    model: str
    ok: bool
    reason: str
    mode: Mode
    verified_at: int
    """Unix seconds the evidence was verified at."""
    expires_at: int
    """Unix seconds after which the verdict must not be used (re-attestation due plus grace,
    never past the collateral's nextUpdate)."""
    root: Literal["intel", "test"] | None = None
    """Which root CA the quote chained to; "test" only with the explicit test setting."""
    quote_sha256: str | None = None
    signing_address: str | None = None
    signing_addresses: tuple[str, ...] = ()
    """Every signing key bound by a verified quote (several with ``all_attestations``)."""
    tee_type: str | None = None
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    mrtd: str | None = None
    rtmrs: tuple[str, ...] = ()
    mr_config_id: str | None = None
    compose_hash: str | None = None
    report_data: str | None = None
    nonce: str | None = None
    gpu: GpuVerdict | Literal["unverified", "absent"] = "unverified"
    """The GPU part: its own verdict (which GPU checks passed, ``measurements``,
    ``revocation``) when GPU evidence was verified; "absent" when the upstream sent none;
    "unverified" when it was only recorded (``gpu_evidence = "record"``, flag mode)."""
    checks: dict[str, bool] = Field(default_factory=dict)
    """Each check made, in order, and whether it passed. A check not made is not listed."""
    skipped: tuple[str, ...] = ()
    """Checks not made, and why (e.g. no allow-list configured)."""
    evidence: dict[str, Any] = Field(default_factory=dict)
    """The evidence as received, for handing to clients who want to verify it themselves."""
    evidence_kind: EvidenceKind = "near"
    """Which evidence format verified it: NEAR AI / Phala reports, or Chutes' per-instance."""
    instances: tuple[InstanceVerdict, ...] = ()
    """Chutes: every instance checked, verified or not (``ok``), newest verdict each."""

    def refusal(self, now: float) -> str | None:
        """Why the gate must refuse this model at ``now``, or None when it may serve it."""
        if not self.ok:
            return self.reason
        if now >= self.expires_at:
            return f"attestation expired at {self.expires_at} (re-attestation overdue)"
        return None

    def gpu_summary(self) -> str | dict[str, Any]:
        """The GPU part in brief (no per-GPU detail), as ``/v1/models`` shows it."""
        if isinstance(self.gpu, GpuVerdict):
            return self.gpu.model_dump(mode="json", exclude={"gpus", "skipped"})
        return self.gpu

    def summary(self) -> dict[str, Any]:
        """The verdict without the raw evidence: what a CLI or a log line shows."""
        return self.model_dump(
            mode="json", exclude={"evidence": True, "instances": {"__all__": {"e2e_pubkey"}}}
        )
