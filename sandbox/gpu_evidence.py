"""NVIDIA-style GPU evidence signed by a TEST GPU hierarchy (there is no GPU here).

The sandbox's ``nvidia_payload`` has the exact shape NEAR AI / Phala send: per GPU, a
five-certificate P-384 chain (leaf, three intermediates, root; the leaf carries a TCG DICE
TcbInfo extension ending in its firmware id) and an SPDM 1.1 GET_MEASUREMENTS request with
the caller's nonce followed by a MEASUREMENTS response (measurement blocks, a GPU nonce,
opaque data with driver/VBIOS versions and the firmware id), signed by the leaf over
everything before the 96-byte r‖s signature. It is built here from the format, without
importing the gateway's parser, so the gateway's real verifier is what checks it.

A gateway verifies it only when told to trust this hierarchy's root
(``attestation.gpu_test_root_ca``, served at ``GET /_sandbox/evidence/gpu_root_ca.pem``).
Keys derive from a fixed seed and certificates are signed deterministically, so the root
is byte-identical across restarts and processes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

GPU_SEED = b"teegate test GPU PKI, not for production, v1"
P384_ORDER = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
    "581a0db248b0a77aecec196accc52973",
    16,
)
NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2065, 1, 1, tzinfo=UTC)
FWID_OID = x509.ObjectIdentifier("2.23.133.5.4.1")
FWID = hashlib.sha384(b"teegate sandbox GPU firmware").digest()
DRIVER_VERSION = "550.90.07"
VBIOS_RAW = bytes.fromhex("009f009601000000")  # 96.00.9F.00.01
BLOCKS = 8


def _key(label: str) -> ec.EllipticCurvePrivateKey:
    digest = hashlib.sha512(GPU_SEED + b"/" + label.encode()).digest()
    scalar = int.from_bytes(digest, "big") % (P384_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP384R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teegate sandbox (TEST GPU PKI)"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _tlv(kind: int, value: bytes) -> bytes:
    return kind.to_bytes(2, "little") + len(value).to_bytes(2, "little") + value


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


class GpuTestPki:
    """Root, three intermediates and one leaf per GPU; mints signed SPDM evidence."""

    NAMES = ("TEST GPU Root", "TEST GPU Identity", "TEST GPU Provisioner ICA", "TEST GPU BROM")

    def __init__(self, gpus: int = 2) -> None:
        self.gpus = gpus

    def _issue(
        self, cn: str, serial: int, key: ec.EllipticCurvePrivateKey, issuer: _Issued | None,
        *, ca: bool, fwid: bytes | None = None,
    ) -> _Issued:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(issuer.cert.subject if issuer else _name(cn))
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(NOT_BEFORE)
            .not_valid_after(NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if fwid is not None:
            # Hopper's leaf: a TcbInfo extension whose last 48 bytes are the firmware id.
            builder = builder.add_extension(
                x509.UnrecognizedExtension(FWID_OID, b"\x30\x34\xa6\x32\x04\x30" + fwid),
                critical=False,
            )
        signer = issuer.key if issuer else key
        return _Issued(builder.sign(signer, hashes.SHA384(), ecdsa_deterministic=True), key)

    @cached_property
    def _cas(self) -> list[_Issued]:
        issued: list[_Issued] = []
        for depth, cn in enumerate(self.NAMES):
            parent = issued[-1] if issued else None
            issued.append(self._issue(cn, 1000 + depth, _key(cn), parent, ca=True))
        return issued  # root first

    @cached_property
    def _leaves(self) -> list[_Issued]:
        return [
            self._issue(
                f"TEST GPU {i} FMC LF", 0x6770_0000 + i, _key(f"leaf {i}"), self._cas[-1],
                ca=False, fwid=FWID,
            )
            for i in range(self.gpus)
        ]

    def issued(self, gpu: int) -> list[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]]:
        """GPU ``gpu``'s chain with each certificate's key, leaf first (to sign test OCSP
        answers and the like)."""
        chain = [self._leaves[gpu], *reversed(self._cas)]
        return [(i.cert, i.key) for i in chain]

    @property
    def root_pem(self) -> bytes:
        return self._cas[0].cert.public_bytes(serialization.Encoding.PEM)

    def chain_pem(self, gpu: int) -> bytes:
        """Leaf first, root last, as NVIDIA's GPUs give it."""
        certs = [self._leaves[gpu].cert, *(c.cert for c in reversed(self._cas))]
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def spdm(self, gpu: int, nonce: bytes) -> bytes:
        """GET_MEASUREMENTS(nonce) ‖ MEASUREMENTS, signed by GPU ``gpu``'s leaf."""
        request = bytes([0x11, 0xE0, 0x01, 0xFF]) + nonce + b"\x00"
        record = b""
        for index in range(1, BLOCKS + 1):
            value = hashlib.sha384(b"sandbox measurement %d" % index).digest()
            dmtf = b"\x01" + len(value).to_bytes(2, "little") + value
            record += bytes([index, 0x01]) + len(dmtf).to_bytes(2, "little") + dmtf
        opaque = b"".join(
            [
                _tlv(3, DRIVER_VERSION.encode() + b"\x00"),
                _tlv(6, VBIOS_RAW),
                _tlv(11, b"\x55"),
                _tlv(15, b"882\x00"),
                _tlv(17, b"1010\x00"),
                _tlv(18, b"0200\x00"),
                _tlv(20, FWID),
            ]
        )
        gpu_nonce = hashlib.sha256(b"gpu nonce" + nonce + bytes([gpu])).digest()
        response = (
            bytes([0x11, 0x60, 0x00, 0x00, BLOCKS])
            + len(record).to_bytes(3, "little")
            + record
            + gpu_nonce
            + len(opaque).to_bytes(2, "little")
            + opaque
        )
        signed = request + response
        der = self._leaves[gpu].key.sign(signed, ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        return signed + r.to_bytes(48, "big") + s.to_bytes(48, "big")

    def items(self, nonce: bytes) -> list[dict[str, str]]:
        """One ``{"certificate", "evidence", "arch"}`` item per GPU, the SPDM requests signed
        over ``nonce``: the bare list NVIDIA's SDK returns (Chutes' ``gpu_evidence``)."""
        return [
            {
                "certificate": base64.b64encode(self.chain_pem(i)).decode(),
                "evidence": base64.b64encode(self.spdm(i, nonce)).decode(),
                "arch": "HOPPER",
            }
            for i in range(self.gpus)
        ]

    def payload(self, nonce: bytes, *, spdm_nonce: bytes | None = None) -> str:
        """``nvidia_payload`` JSON text echoing ``nonce``; the signed SPDM requests carry
        ``spdm_nonce`` (default: the same nonce; another value makes it stale)."""
        items = self.items(nonce if spdm_nonce is None else spdm_nonce)
        return json.dumps({"nonce": nonce.hex(), "evidence_list": items, "arch": "HOPPER"})
