"""What an attestation must show before the gate serves a model: the ``[attestation]`` table.

Strict by default: TDX only, TCB status ``UpToDate`` only, no debug TD, ``report_data`` binding
our fresh nonce and the upstream's signing key, quotes chained to Intel's root. Anything looser
has to be written down in ``proxy.toml``. Unknown keys are errors, because a typo in a security
setting must never be silently ignored.

Allow-lists: absent (``None``) means "not pinned"; an empty list pins nothing and so refuses
everything, which is the honest reading of "allowed: none".
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from cryptography import x509
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from teegate.catalog.attestation.gpu import GpuRequirements

PATH_KEYS = ("test_root_ca", "gpu_test_root_ca", "gpu_rim_dir", "gpu_ocsp_dir")
"""Keys naming files or folders: relative ones are read beside the file that names them."""

# Intel's Provisioning Certification Service; dcap_qvl appends /{sgx,tdx}/certification/v4.
INTEL_PCS_URL = "https://api.trustedservices.intel.com"


def _hex_of(n_bytes: int):  # noqa: ANN202 - returns a validator
    def check(value: str) -> str:
        v = value.strip().lower().removeprefix("0x")
        if len(v) != 2 * n_bytes:
            raise ValueError(f"must be {n_bytes} bytes of hex ({2 * n_bytes} digits)")
        bytes.fromhex(v)  # raises ValueError on a non-hex digit
        return v

    return check


Hex48 = Annotated[str, AfterValidator(_hex_of(48))]
Hex32 = Annotated[str, AfterValidator(_hex_of(32))]


class Policy(BaseModel):
    """Settings and acceptance rules for hardware attestation of upstream models."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    mode: Literal["dcap", "flag"] = "dcap"
    """``dcap``: verify TDX quotes. ``flag``: trust the catalog's confidential flag only (no
    hardware verification is claimed; verdicts say mode "flag")."""

    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    refused_advisory_ids: tuple[str, ...] = ()

    mrtd_allowlist: tuple[Hex48, ...] | None = None
    rtmr0_allowlist: tuple[Hex48, ...] | None = None
    rtmr1_allowlist: tuple[Hex48, ...] | None = None
    rtmr2_allowlist: tuple[Hex48, ...] | None = None
    rtmr3_allowlist: tuple[Hex48, ...] | None = None
    """RTMR3 is extended at runtime (dstack: app id, compose hash, ...), so NEAR AI / Phala
    evidence checks it by replaying the event log; Chutes publishes fixed values to pin."""
    compose_hash_allowlist: tuple[Hex32, ...] | None = None
    """sha256 of dstack's app_compose, as measured in ``mr_config_id = 0x01 || hash``."""

    require_event_log: bool = False
    """Refuse evidence without an event log (one that is given is always replayed)."""

    reattest_interval_s: int = Field(600, ge=1)
    retry_interval_s: int = Field(60, ge=1)
    """How soon a failed attestation is tried again."""
    verdict_grace_s: int = Field(120, ge=0)
    """A verdict stays usable this long past its scheduled re-attestation, so a slow
    re-attestation does not flap the model (still never past the collateral's nextUpdate)."""
    max_concurrency: int = Field(4, ge=1, le=64)
    fetch_timeout_s: float = Field(30.0, gt=0, le=600)

    pccs_url: str = INTEL_PCS_URL
    """Where collateral (TCB info, QE identity, CRLs) is fetched; it is verified against the
    pinned root whatever serves it."""

    gpu_evidence: Literal["verify", "require", "record"] = "verify"
    """NVIDIA GPU evidence (``nvidia_payload``). "verify": whatever GPU evidence an upstream
    sends is verified offline and must pass, or the model is refused; a model whose upstream
    sends none is served on its CPU attestation, its verdict saying gpu "absent". "require":
    the same, and a model without GPU evidence is refused. "record": GPU evidence is kept but
    not verified (the verdict says gpu "unverified")."""
    gpu_count: int | None = Field(None, ge=1, le=64)
    """Exactly this many GPUs per TD; absent: any number from one up."""
    gpu_rim_dir: Path | None = None
    """Folder of NVIDIA RIM files (``<RIM id>.xml``, from NVIDIA's RIM service): with it,
    every active measurement is compared to NVIDIA's signed reference values."""
    gpu_ocsp_dir: Path | None = None
    """Folder of DER OCSP responses for the GPU and RIM certificates (fetched ahead of time):
    with fresh ones for every certificate, revocation is reported "good"."""
    gpu_require_measurements: bool = False
    """Refuse unless measurements were verified against RIMs (needs ``gpu_rim_dir``)."""
    gpu_require_revocation: bool = False
    """Refuse unless every GPU certificate has a fresh "good" OCSP answer."""
    gpu_test_root_ca: Path | None = None
    """DANGER, tests and the sandbox only: a certificate file (DER or PEM) replacing NVIDIA's
    Device Identity CA, so the sandbox's test GPU hierarchy verifies."""

    test_root_ca: Path | None = None
    """DANGER, tests and the sandbox only: a DER file replacing Intel's root CA. While set,
    quotes are verified against this root instead of Intel's, and collateral that the upstream
    ships in its evidence (the sandbox does; real upstreams do not) is used instead of PCCS."""

    @field_validator("accepted_tcb_statuses")
    @classmethod
    def _some_status(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("accept at least one TCB status (e.g. UpToDate)")
        return v

    @field_validator("pccs_url")
    @classmethod
    def _https_url(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return v.rstrip("/")

    def load_test_root(self) -> bytes | None:
        """The test root's DER, or None for Intel's root (the default)."""
        if self.test_root_ca is None:
            return None
        return self.test_root_ca.read_bytes()

    def gpu_requirements(self) -> GpuRequirements:
        """What :func:`~.gpu.verify_gpu_payload` is asked to check (reads the test root)."""
        root = None
        if self.gpu_test_root_ca is not None:
            data = self.gpu_test_root_ca.read_bytes()
            if data.lstrip().startswith(b"-----BEGIN"):
                root = x509.load_pem_x509_certificate(data)
            else:
                root = x509.load_der_x509_certificate(data)
        return GpuRequirements(
            expected_count=self.gpu_count,
            rim_dir=self.gpu_rim_dir,
            ocsp_dir=self.gpu_ocsp_dir,
            require_measurements=self.gpu_require_measurements,
            require_revocation=self.gpu_require_revocation,
            test_root=root,
        )


def load_policy(path: str | Path) -> Policy:
    """The ``[attestation]`` table of a TOML file (absent table: the strict defaults)."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    table = doc.get("attestation", {})
    if not isinstance(table, dict):
        raise ValueError("[attestation] must be a table")
    for key in PATH_KEYS:
        value = table.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            # Relative to the file that names it, not to wherever the process was started.
            table = {**table, key: str(Path(path).resolve().parent / value)}
    return Policy.model_validate(table)
