"""Attestation evidence in the NEAR AI / Phala format, minted under the test DCAP PKI.

``GET /v1/attestation/report?model=<id>&nonce=<64 hex>&signing_algo=ecdsa`` answers, for each
confidential model the sandbox lists (404 otherwise), what a dstack TD behind NEAR AI or Phala
would: ``signing_address``, ``signing_algo``, ``signing_public_key``, ``request_nonce``,
``intel_quote`` (a fresh TDX v4 quote whose ``report_data`` is ``address.ljust(32, 0) ||
nonce``), ``nvidia_payload`` (a placeholder: there is no GPU here), ``event_log`` (replays to
the quote's RTMR0-3, with a ``compose-hash`` event) and ``info`` (dstack's, with
``tcb_info.app_compose``).

One field real upstreams do not send: ``collateral`` (dcap_qvl ``QuoteCollateralV3`` JSON),
signed under the test root, so a gateway configured with that root can verify offline. A
gateway talking to a real upstream fetches collateral from PCCS instead.

Signing key: one secp256k1 key per process (``rotate_key`` gives a model a new one); the
``signing_address`` is its Ethereum address, ``0x`` + hex(keccak256(x || y)[-20:]).

Test switches, per model: ``POST /_sandbox/evidence`` with ``{model_id: mode}``:
``valid``; ``stale`` (collateral whose nextUpdate has passed); ``debug`` (td_attributes debug
bit); ``wrong_binding`` (report_data does not bind the nonce); ``bad_mrtd`` (an MRTD not on
the published allow-list); ``sgx`` (an SGX enclave quote); ``rotate_key`` (new signing key,
then valid); ``gpu_stale_nonce`` (the GPUs' signed SPDM requests carry an old nonce while the
payload echoes ours: canned or replayed GPU evidence); ``no_gpu`` (no ``nvidia_payload``).
``GET /_sandbox/evidence`` shows modes, addresses and the published measurements;
``GET /_sandbox/evidence/root_ca.der`` is the test root (MRTD and compose hash in headers),
``GET /_sandbox/evidence/gpu_root_ca.pem`` the test GPU root.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, get_args

from aiohttp import web
from Crypto.Hash import keccak
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teegate.sandbox.dcap_pki import (
    DEFAULT_TD_ATTRIBUTES,
    TD_ATTR_DEBUG,
    DcapTestPki,
    TdMeasurements,
)
from teegate.sandbox.gpu_evidence import GpuTestPki

Mode = Literal[
    "valid",
    "stale",
    "debug",
    "wrong_binding",
    "bad_mrtd",
    "sgx",
    "rotate_key",
    "gpu_stale_nonce",
    "no_gpu",
]
MODES: tuple[str, ...] = get_args(Mode)

DAY = 86_400
SANDBOX_MRTD = hashlib.sha384(b"teegate sandbox TD image").digest()
ROGUE_MRTD = hashlib.sha384(b"teegate sandbox rogue TD image").digest()
DSTACK_RUNTIME_EVENT = 0x08000001
APP_COMPOSE = json.dumps(
    {
        "manifest_version": 2,
        "name": "teegate-sandbox",
        "runner": "docker-compose",
        "docker_compose_file": "services:\n  vllm:\n    image: sandbox/vllm-proxy:test\n",
        "kms_enabled": False,
        "public_logs": True,
    },
    indent=4,
)
COMPOSE_HASH = hashlib.sha256(APP_COMPOSE.encode()).digest()
APP_ID = hashlib.sha256(b"teegate sandbox app").digest()[:20]
INSTANCE_ID = hashlib.sha256(b"teegate sandbox instance").digest()[:20]


def _runtime_event(name: str, payload: bytes) -> dict[str, Any]:
    """A dstack RTMR3 event: digest = sha384(le32(type) || ":" || name || ":" || payload)."""
    digest = hashlib.sha384(
        DSTACK_RUNTIME_EVENT.to_bytes(4, "little") + b":" + name.encode() + b":" + payload
    ).digest()
    return {
        "imr": 3,
        "event_type": DSTACK_RUNTIME_EVENT,
        "digest": digest.hex(),
        "event": name,
        "event_payload": payload.hex(),
    }


def _firmware_event(imr: int, event_type: int, payload: bytes) -> dict[str, Any]:
    return {
        "imr": imr,
        "event_type": event_type,
        "digest": hashlib.sha384(payload).hexdigest(),
        "event": "",
        "event_payload": payload.hex(),
    }


def build_event_log() -> list[dict[str, Any]]:
    """A small boot log: firmware (RTMR0), boot loader (RTMR1), kernel (RTMR2), dstack
    runtime events (RTMR3) including ``compose-hash``."""
    return [
        _firmware_event(0, 0x80000001, b"sandbox SecureBoot variable"),
        _firmware_event(0, 0x0000000A, b"ACPI DATA"),
        _firmware_event(1, 0x80000003, b"sandbox boot loader"),
        _firmware_event(2, 0x00000006, b"sandbox kernel cmdline"),
        _runtime_event("system-preparing", b""),
        _runtime_event("app-id", APP_ID),
        _runtime_event("compose-hash", COMPOSE_HASH),
        _runtime_event("instance-id", INSTANCE_ID),
        _runtime_event("boot-mr-done", b""),
        _runtime_event("system-ready", b""),
    ]


def replay_rtmrs(events: list[dict[str, Any]]) -> tuple[bytes, bytes, bytes, bytes]:
    """RTMR[i] = sha384(RTMR[i] || digest), from 48 zero bytes."""
    rtmrs = [bytes(48)] * 4
    for ev in events:
        rtmrs[ev["imr"]] = hashlib.sha384(rtmrs[ev["imr"]] + bytes.fromhex(ev["digest"])).digest()
    return rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]


@dataclass(frozen=True)
class SigningKey:
    """A secp256k1 key and its Ethereum-style address (what NEAR AI's ``ecdsa`` uses)."""

    private: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(ec.generate_private_key(ec.SECP256K1()))

    # Cached: the signature endpoint signs with the same key for every chat (deriving the
    # public key and address each time was ~10% of the sandbox's CPU under load).
    @cached_property
    def public_xy(self) -> bytes:
        point = self.private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return point[1:]

    @cached_property
    def address(self) -> bytes:
        return keccak.new(digest_bits=256, data=self.public_xy).digest()[-20:]

    @cached_property
    def address_hex(self) -> str:
        return "0x" + self.address.hex()

    @cached_property
    def secret(self) -> bytes:
        return self.private.private_numbers().private_value.to_bytes(32, "big")


class EvidenceMinter:
    """Everything the sandbox's TD 'is': PKI, measurements, signing keys, per-model switches."""

    def __init__(self, pki: DcapTestPki | None = None, clock: Callable[[], float] = time.time):
        self.pki = pki or DcapTestPki()
        self.gpu_pki = GpuTestPki()
        self.clock = clock
        self.event_log = build_event_log()
        self.rtmrs = replay_rtmrs(self.event_log)
        self.mr_config_id = b"\x01" + COMPOSE_HASH + bytes(15)
        self.process_key = SigningKey.generate()
        self.keys: dict[str, SigningKey] = {}
        self.modes: dict[str, str] = {}
        self._collateral_cache: dict[tuple[str, int, int], dict[str, str]] = {}

    def key_for(self, model: str) -> SigningKey:
        return self.keys.get(model, self.process_key)

    def set_mode(self, model: str, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown evidence mode {mode!r}; one of {', '.join(MODES)}")
        if mode == "rotate_key":
            self.keys[model] = SigningKey.generate()
            mode = "valid"
        if mode == "valid":
            self.modes.pop(model, None)
        else:
            self.modes[model] = mode

    def measurements(self, mode: str) -> TdMeasurements:
        return TdMeasurements(
            mrtd=ROGUE_MRTD if mode == "bad_mrtd" else SANDBOX_MRTD,
            rtmrs=self.rtmrs,
            mr_config_id=self.mr_config_id,
            td_attributes=DEFAULT_TD_ATTRIBUTES | (TD_ATTR_DEBUG if mode == "debug" else 0),
        )

    def collateral(self, tee: Literal["tdx", "sgx"], stale: bool) -> dict[str, str]:
        """Valid from yesterday for 30 days (or, stale, expired 30 days ago), per day."""
        today = int(self.clock()) // DAY * DAY
        issue = today - (60 * DAY if stale else DAY)
        next_update = issue + 30 * DAY
        key = (tee, issue, next_update)
        if key not in self._collateral_cache:
            if len(self._collateral_cache) > 8:
                self._collateral_cache.clear()
            self._collateral_cache[key] = self.pki.collateral(
                issue=issue, next_update=next_update, tee=tee
            )
        return self._collateral_cache[key]

    def report(self, model: str, nonce: bytes) -> dict[str, Any]:
        """The attestation report for ``model``, bound to ``nonce`` as the mode dictates."""
        mode = self.modes.get(model, "valid")
        key = self.key_for(model)
        bound_nonce = hashlib.sha256(b"not your nonce" + nonce).digest()
        report_data = key.address.ljust(32, b"\x00") + (
            bound_nonce if mode == "wrong_binding" else nonce
        )
        if mode == "sgx":
            quote = self.pki.sgx_quote(report_data)
            collateral = self.collateral("sgx", stale=False)
        else:
            quote = self.pki.td_quote(report_data, self.measurements(mode))
            collateral = self.collateral("tdx", stale=mode == "stale")
        measurements = self.measurements(mode)
        tcb_info = {
            "mrtd": measurements.mrtd.hex(),
            **{f"rtmr{i}": r.hex() for i, r in enumerate(self.rtmrs)},
            "compose_hash": COMPOSE_HASH.hex(),
            "app_compose": APP_COMPOSE,
            "event_log": json.dumps(self.event_log),
        }
        return {
            "signing_address": key.address_hex,
            "signing_algo": "ecdsa",
            "signing_public_key": key.public_xy.hex(),
            "request_nonce": nonce.hex(),
            "intel_quote": quote.hex(),
            "nvidia_payload": self.gpu_payload(mode, nonce),
            "event_log": self.event_log,
            "info": {
                "app_id": APP_ID.hex(),
                "instance_id": INSTANCE_ID.hex(),
                "app_name": "teegate-sandbox",
                "compose_hash": COMPOSE_HASH.hex(),
                "tcb_info": tcb_info,
            },
            "collateral": collateral,
        }

    def gpu_payload(self, mode: str, nonce: bytes) -> str | None:
        if mode == "no_gpu":
            return None
        stale = hashlib.sha256(b"an old GPU nonce").digest() if mode == "gpu_stale_nonce" else None
        return self.gpu_pki.payload(nonce, spdm_nonce=stale)

    def published(self) -> dict[str, Any]:
        """What an operator would pin for this TD: root, MRTD, RTMRs, compose hash."""
        return {
            "root_ca_der": self.pki.root_ca_der.hex(),
            "mrtd": SANDBOX_MRTD.hex(),
            "rtmr0": self.rtmrs[0].hex(),
            "rtmr1": self.rtmrs[1].hex(),
            "rtmr2": self.rtmrs[2].hex(),
            "compose_hash": COMPOSE_HASH.hex(),
            "process_signing_address": self.process_key.address_hex,
            "signing_addresses": {m: k.address_hex for m, k in self.keys.items()},
            "modes": dict(self.modes),
        }


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json"
    )


def _json(payload: Any) -> web.Response:
    return web.Response(body=json.dumps(payload).encode(), content_type="application/json")


async def attestation_report(request: web.Request) -> web.Response:
    minter: EvidenceMinter = request.app["evidence"]
    model = request.query.get("model", "")
    nonce_hex = request.query.get("nonce", "")
    algo = request.query.get("signing_algo", "ecdsa")
    if not model:
        return _error(400, "model is required")
    if algo != "ecdsa":
        return _error(400, "sandbox only signs with signing_algo=ecdsa")
    try:
        nonce = bytes.fromhex(nonce_hex)
    except ValueError:
        nonce = b""
    if len(nonce) != 32:
        return _error(400, "nonce must be 64 hex digits")
    row = request.app["state"].models.get(model)
    if row is None or row.get("confidential_compute") is not True:
        return _error(404, f"no attestation for model {model!r}: not a confidential model")
    return _json(minter.report(model, nonce))


async def set_evidence(request: web.Request) -> web.Response:
    minter: EvidenceMinter = request.app["evidence"]
    try:
        body = json.loads(await request.read())
    except ValueError:
        return _error(400, "body must be a JSON object {model_id: mode}")
    if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
        return _error(400, "body must be a JSON object {model_id: mode}")
    bad = sorted({v for v in body.values() if v not in MODES})
    if bad:
        return _error(400, f"unknown evidence mode(s) {bad}; one of {list(MODES)}")
    for model, mode in body.items():
        minter.set_mode(model, mode)
    return _json(minter.published())


async def get_evidence(request: web.Request) -> web.Response:
    return _json(request.app["evidence"].published())


async def root_ca_der(request: web.Request) -> web.Response:
    minter: EvidenceMinter = request.app["evidence"]
    return web.Response(
        body=minter.pki.root_ca_der,
        content_type="application/pkix-cert",
        headers={
            "X-Sandbox-Mrtd": SANDBOX_MRTD.hex(),
            "X-Sandbox-Compose-Hash": COMPOSE_HASH.hex(),
        },
    )


async def gpu_root_ca_pem(request: web.Request) -> web.Response:
    minter: EvidenceMinter = request.app["evidence"]
    return web.Response(body=minter.gpu_pki.root_pem, content_type="application/x-pem-file")


def add_routes(app: web.Application) -> None:
    """Plug the evidence endpoints into the sandbox app (before its /v1 catch-all)."""
    app["evidence"] = EvidenceMinter()
    app.router.add_get("/v1/attestation/report", attestation_report)
    app.router.add_post("/_sandbox/evidence", set_evidence)
    app.router.add_get("/_sandbox/evidence", get_evidence)
    app.router.add_get("/_sandbox/evidence/root_ca.der", root_ca_der)
    app.router.add_get("/_sandbox/evidence/gpu_root_ca.pem", gpu_root_ca_pem)
