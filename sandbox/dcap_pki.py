"""A self-made Intel DCAP hierarchy that mints TDX (and SGX) quotes for tests and the sandbox.

Why: the gateway verifies quotes with dcap-qvl against Intel's root. Real hardware is not
available to tests, so this module builds the whole chain Intel would (root CA -> PCK platform
CA -> PCK leaf, root -> TCB signing cert, the CRLs, TCB info and QE identity) under a test root,
and signs quotes whose ``report_data`` binds whatever the caller asks (a nonce and a signing key).
``dcap_qvl.verify_with_root_ca(quote, collateral, DcapTestPki().root_ca_der, now)`` accepts
them; plain ``dcap_qvl.verify`` (Intel's root) rejects them, which is the point.

Every key derives from a fixed seed, certificates have fixed serials and a fixed 2020-2065
validity window and are signed with deterministic ECDSA (RFC 6979), so the test root's DER is
the same on every run and can be pinned in configuration.

The layouts follow Intel's "ECDSA Quote Library API" (quote v3 for SGX, v4 for TDX) and the
facts recorded in /work/shared/dcap-test-pki-notes.md. Sandbox code: never imported by the
gateway (``catalog/`` and ``sandbox/`` share no code).

Why this module is long: it is one chain of trust, built and used as a unit. The certificates,
CRLs, signed TCB info and QE identity, and the quote layouts that the PCK leaf signs all refer to
each other's keys and fields; split across files, each part would be unreadable without the
others.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ

DEFAULT_SEED = b"teegate test DCAP PKI, not for production, v1"

# Certificate validity: wide and fixed, so verification at historic times keeps working and
# the DER stays stable across runs.
CERT_NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
CERT_NOT_AFTER = datetime(2065, 1, 1, tzinfo=UTC)

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"

# Platform identity written into the PCK leaf and matched by the TCB info.
TEST_FMSPC = bytes.fromhex("7E57FE000000")
TEST_PCEID = bytes.fromhex("0000")
TEST_PPID = hashlib.sha256(b"teegate test platform").digest()[:16]
TEST_SGX_TCB_COMPONENTS = (3, 3, 2, 2, 4, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0)
TEST_CPUSVN = bytes(TEST_SGX_TCB_COMPONENTS)
TEST_PCESVN = 11

# TDX module: tee_tcb_svn[0] = module SVN, [1] = module version ("TDX_01"), [2] = microcode.
TEST_TEE_TCB_SVN = bytes([6, 1, 3]) + bytes(13)
TEST_TDX_TCB_COMPONENTS = (5, 0, 2) + (0,) * 13
TDX_MODULE_MRSIGNER = bytes(48)
TEST_MR_SEAM = hashlib.sha384(b"teegate test TDX module").digest()

# Quoting enclaves (TD_QE for TDX, QE for SGX) as the QE identity describes them.
QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
QE_ATTRIBUTES_MASK = "FBFFFFFFFFFFFFFF0000000000000000"
TD_QE_MRSIGNER = hashlib.sha256(b"teegate test TD quoting enclave").digest()
TD_QE_ISVPRODID = 2
SGX_QE_MRSIGNER = hashlib.sha256(b"teegate test SGX quoting enclave").digest()
SGX_QE_ISVPRODID = 1
QE_ISVSVN = 8
QE_AUTH_DATA = bytes(range(32))

# TD attributes: bit 0 = DEBUG, bit 28 = SEPT_VE_DISABLE (little-endian 64-bit field).
TD_ATTR_DEBUG = 1 << 0
TD_ATTR_SEPT_VE_DISABLE = 1 << 28
DEFAULT_TD_ATTRIBUTES = TD_ATTR_SEPT_VE_DISABLE
DEFAULT_XFAM = bytes.fromhex("e702060000000000")

HEADER_LEN = 48
TD_REPORT_LEN = 584
SGX_REPORT_LEN = 384


@dataclass(frozen=True)
class TdMeasurements:
    """What a TD measured into its report: the values a gateway policy pins."""

    mrtd: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    mr_config_id: bytes = bytes(48)
    td_attributes: int = DEFAULT_TD_ATTRIBUTES
    xfam: bytes = DEFAULT_XFAM
    mr_owner: bytes = bytes(48)
    mr_owner_config: bytes = bytes(48)

    def __post_init__(self) -> None:
        for name in ("mrtd", "mr_config_id", "mr_owner", "mr_owner_config"):
            if len(getattr(self, name)) != 48:
                raise ValueError(f"{name} must be 48 bytes")
        if len(self.rtmrs) != 4 or any(len(r) != 48 for r in self.rtmrs):
            raise ValueError("rtmrs must be four 48-byte registers")


@dataclass(frozen=True)
class _Key:
    """A P-256 key pair derived from the seed, so its public half is stable."""

    private: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def derive(cls, seed: bytes, label: str) -> _Key:
        order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
        digest = hashlib.sha512(seed + b"/" + label.encode()).digest()
        scalar = int.from_bytes(digest, "big") % (order - 1) + 1
        return cls(ec.derive_private_key(scalar, ec.SECP256R1()))

    @property
    def public(self) -> ec.EllipticCurvePublicKey:
        return self.private.public_key()

    @property
    def raw_public(self) -> bytes:
        """The 64-byte x||y form quotes carry (no 0x04 prefix)."""
        point = self.public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return point[1:]

    def sign_raw(self, message: bytes) -> bytes:
        """ECDSA-SHA256 over ``message`` as 64 bytes r||s, the encoding DCAP uses."""
        der = self.private.sign(message, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teegate test DCAP PKI (NOT Intel)"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def _rfc3339(unix_seconds: int) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _oid_value(oid: str, value: univ.Asn1Item) -> univ.Sequence:
    pair = univ.Sequence()
    pair.setComponentByPosition(0, univ.ObjectIdentifier(oid))
    pair.setComponentByPosition(1, value)
    return pair


def _sequence_of(items: list[univ.Sequence]) -> univ.SequenceOf:
    seq = univ.SequenceOf(componentType=univ.Sequence())
    for i, item in enumerate(items):
        seq.setComponentByPosition(i, item)
    return seq


def sgx_extension_der() -> bytes:
    """The PCK certificate's Intel SGX extension (PPID, TCB, PCEID, FMSPC, SGX type)."""
    base = SGX_EXTENSION_OID
    tcb = [
        _oid_value(f"{base}.2.{i + 1}", univ.Integer(svn))
        for i, svn in enumerate(TEST_SGX_TCB_COMPONENTS)
    ]
    tcb.append(_oid_value(f"{base}.2.17", univ.Integer(TEST_PCESVN)))
    tcb.append(_oid_value(f"{base}.2.18", univ.OctetString(TEST_CPUSVN)))
    ext = [
        _oid_value(f"{base}.1", univ.OctetString(TEST_PPID)),
        _oid_value(f"{base}.2", _sequence_of(tcb)),
        _oid_value(f"{base}.3", univ.OctetString(TEST_PCEID)),
        _oid_value(f"{base}.4", univ.OctetString(TEST_FMSPC)),
        _oid_value(f"{base}.5", univ.Enumerated(0)),  # 0 = Standard (single package)
    ]
    return der_encoder.encode(_sequence_of(ext))


class DcapTestPki:
    """The whole test hierarchy, built once from a seed; mints collateral and quotes.

    Not named ``Test...`` on purpose: pytest would try to collect it.
    """

    def __init__(self, seed: bytes = DEFAULT_SEED) -> None:
        self.seed = seed
        self._root_key = _Key.derive(seed, "root-ca")
        self._platform_key = _Key.derive(seed, "pck-platform-ca")
        self._pck_key = _Key.derive(seed, "pck-leaf")
        self._tcb_key = _Key.derive(seed, "tcb-signing")
        self.attestation_key = _Key.derive(seed, "attestation-key")

    # -- certificates -------------------------------------------------------------------

    def _cert(
        self,
        *,
        subject: str,
        serial: int,
        key: _Key,
        issuer: x509.Certificate | None,
        issuer_key: _Key,
        ca: bool,
        extra: x509.UnrecognizedExtension | None = None,
    ) -> x509.Certificate:
        issuer_name = issuer.subject if issuer is not None else _name(subject)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(issuer_name)
            .public_key(key.public)
            .serial_number(serial)
            .not_valid_before(CERT_NOT_BEFORE)
            .not_valid_after(CERT_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=not ca,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public), critical=False)
        )
        if extra is not None:
            builder = builder.add_extension(extra, critical=False)
        return builder.sign(issuer_key.private, hashes.SHA256(), ecdsa_deterministic=True)

    @cached_property
    def root_cert(self) -> x509.Certificate:
        return self._cert(
            subject="teegate TEST SGX Root CA",
            serial=0x7E57_0001,
            key=self._root_key,
            issuer=None,
            issuer_key=self._root_key,
            ca=True,
        )

    @cached_property
    def platform_ca_cert(self) -> x509.Certificate:
        return self._cert(
            subject="teegate TEST SGX PCK Platform CA",
            serial=0x7E57_0002,
            key=self._platform_key,
            issuer=self.root_cert,
            issuer_key=self._root_key,
            ca=True,
        )

    @cached_property
    def pck_cert(self) -> x509.Certificate:
        ext = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SGX_EXTENSION_OID), sgx_extension_der()
        )
        return self._cert(
            subject="teegate TEST SGX PCK Certificate",
            serial=0x7E57_0003,
            key=self._pck_key,
            issuer=self.platform_ca_cert,
            issuer_key=self._platform_key,
            ca=False,
            extra=ext,
        )

    @cached_property
    def tcb_signing_cert(self) -> x509.Certificate:
        return self._cert(
            subject="teegate TEST SGX TCB Signing",
            serial=0x7E57_0004,
            key=self._tcb_key,
            issuer=self.root_cert,
            issuer_key=self._root_key,
            ca=False,
        )

    @property
    def root_ca_der(self) -> bytes:
        """The DER to pin as the test root (``verify_with_root_ca``)."""
        return self.root_cert.public_bytes(serialization.Encoding.DER)

    @staticmethod
    def _pem(*certs: x509.Certificate) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)

    @cached_property
    def pck_chain_pem(self) -> bytes:
        """Leaf, platform CA, root: the chain embedded in every quote."""
        return self._pem(self.pck_cert, self.platform_ca_cert, self.root_cert).encode()

    # -- collateral ---------------------------------------------------------------------

    def _crl(self, issuer: x509.Certificate, key: _Key, issue: int, next_update: int) -> bytes:
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(datetime.fromtimestamp(issue, UTC))
            .next_update(datetime.fromtimestamp(next_update, UTC))
            # Without any extension cryptography writes an empty extension block the
            # verifier rejects; a CRL number is harmless.
            .add_extension(x509.CRLNumber(1), critical=False)
            .sign(key.private, hashes.SHA256(), ecdsa_deterministic=True)
        )
        return crl.public_bytes(serialization.Encoding.DER)

    @staticmethod
    def _tcb_level(tee: str) -> dict[str, object]:
        tcb: dict[str, object] = {
            "sgxtcbcomponents": [{"svn": svn} for svn in TEST_SGX_TCB_COMPONENTS],
            "pcesvn": TEST_PCESVN,
        }
        if tee == "tdx":
            tcb["tdxtcbcomponents"] = [{"svn": svn} for svn in TEST_TDX_TCB_COMPONENTS]
        return {"tcb": tcb, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"}

    def tcb_info_json(self, tee: Literal["tdx", "sgx"], issue: int, next_update: int) -> str:
        info: dict[str, object] = {
            "id": "TDX" if tee == "tdx" else "SGX",
            "version": 3,
            "issueDate": _rfc3339(issue),
            "nextUpdate": _rfc3339(next_update),
            "fmspc": TEST_FMSPC.hex().upper(),
            "pceId": TEST_PCEID.hex().upper(),
            "tcbType": 0,
            "tcbEvaluationDataNumber": 17,
        }
        if tee == "tdx":
            module = {
                "mrsigner": TDX_MODULE_MRSIGNER.hex().upper(),
                "attributes": "0000000000000000",
                "attributesMask": "FFFFFFFFFFFFFFFF",
            }
            info["tdxModule"] = module
            info["tdxModuleIdentities"] = [
                {
                    "id": f"TDX_{TEST_TEE_TCB_SVN[1]:02X}",
                    **module,
                    "tcbLevels": [
                        {
                            "tcb": {"isvsvn": TEST_TEE_TCB_SVN[0]},
                            "tcbDate": "2024-03-13T00:00:00Z",
                            "tcbStatus": "UpToDate",
                        }
                    ],
                }
            ]
        info["tcbLevels"] = [self._tcb_level(tee)]
        return json.dumps(info, separators=(",", ":"))

    @staticmethod
    def qe_identity_json(tee: Literal["tdx", "sgx"], issue: int, next_update: int) -> str:
        identity = {
            "id": "TD_QE" if tee == "tdx" else "QE",
            "version": 2,
            "issueDate": _rfc3339(issue),
            "nextUpdate": _rfc3339(next_update),
            "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": QE_ATTRIBUTES.hex().upper(),
            "attributesMask": QE_ATTRIBUTES_MASK,
            "mrsigner": (TD_QE_MRSIGNER if tee == "tdx" else SGX_QE_MRSIGNER).hex().upper(),
            "isvprodid": TD_QE_ISVPRODID if tee == "tdx" else SGX_QE_ISVPRODID,
            "tcbLevels": [
                {
                    "tcb": {"isvsvn": QE_ISVSVN},
                    "tcbDate": "2024-03-13T00:00:00Z",
                    "tcbStatus": "UpToDate",
                }
            ],
        }
        return json.dumps(identity, separators=(",", ":"))

    def collateral(
        self, *, issue: int, next_update: int, tee: Literal["tdx", "sgx"] = "tdx"
    ) -> dict[str, str]:
        """Collateral valid from ``issue`` to ``next_update`` (unix seconds), in the JSON form
        ``dcap_qvl.QuoteCollateralV3.from_json`` reads. No ``pck_certificate_chain``: if present
        it would replace the chain inside the quote."""
        tcb_info = self.tcb_info_json(tee, issue, next_update)
        qe_identity = self.qe_identity_json(tee, issue, next_update)
        tcb_chain = self._pem(self.tcb_signing_cert, self.root_cert)
        return {
            "pck_crl_issuer_chain": self._pem(self.platform_ca_cert, self.root_cert),
            "root_ca_crl": self._crl(self.root_cert, self._root_key, issue, next_update).hex(),
            "pck_crl": self._crl(
                self.platform_ca_cert, self._platform_key, issue, next_update
            ).hex(),
            "tcb_info_issuer_chain": tcb_chain,
            "tcb_info": tcb_info,
            "tcb_info_signature": self._tcb_key.sign_raw(tcb_info.encode()).hex(),
            "qe_identity_issuer_chain": tcb_chain,
            "qe_identity": qe_identity,
            "qe_identity_signature": self._tcb_key.sign_raw(qe_identity.encode()).hex(),
        }

    # -- quotes -------------------------------------------------------------------------

    @staticmethod
    def _header(version: int, tee_type: int) -> bytes:
        header = struct.pack("<HHIHH", version, 2, tee_type, 0, 0)  # 2 = ECDSA-256 with P-256
        header += INTEL_QE_VENDOR_ID + bytes(20)
        assert len(header) == HEADER_LEN
        return header

    @staticmethod
    def _enclave_report(
        *,
        cpu_svn: bytes,
        attributes: bytes,
        mr_enclave: bytes,
        mr_signer: bytes,
        isv_prod_id: int,
        isv_svn: int,
        report_data: bytes,
    ) -> bytes:
        """An SGX REPORTBODY (384 bytes): the QE report, or an SGX quote's body."""
        body = (
            cpu_svn
            + struct.pack("<I", 0)  # MISCSELECT
            + bytes(28)
            + attributes
            + mr_enclave
            + bytes(32)
            + mr_signer
            + bytes(96)
            + struct.pack("<HH", isv_prod_id, isv_svn)
            + bytes(60)
            + report_data
        )
        assert len(body) == SGX_REPORT_LEN
        return body

    def _qe_report(self, qe_mrsigner: bytes, qe_prod_id: int) -> bytes:
        binding = hashlib.sha256(self.attestation_key.raw_public + QE_AUTH_DATA).digest()
        return self._enclave_report(
            cpu_svn=TEST_CPUSVN,
            attributes=QE_ATTRIBUTES,
            mr_enclave=hashlib.sha256(b"teegate test QE enclave").digest(),
            mr_signer=qe_mrsigner,
            isv_prod_id=qe_prod_id,
            isv_svn=QE_ISVSVN,
            report_data=binding + bytes(32),
        )

    def _qe_certification(self, qe_mrsigner: bytes, qe_prod_id: int) -> bytes:
        """QE report, its PCK signature, QE auth data and the PCK chain (PEM, type 5)."""
        qe_report = self._qe_report(qe_mrsigner, qe_prod_id)
        chain = self.pck_chain_pem
        return (
            qe_report
            + self._pck_key.sign_raw(qe_report)
            + struct.pack("<H", len(QE_AUTH_DATA))
            + QE_AUTH_DATA
            + struct.pack("<HI", 5, len(chain))
            + chain
        )

    def td_quote(self, report_data: bytes, measurements: TdMeasurements) -> bytes:
        """A TDX v4 quote of a TD with ``measurements`` whose report_data is ``report_data``."""
        if len(report_data) != 64:
            raise ValueError("report_data must be 64 bytes")
        m = measurements
        body = (
            TEST_TEE_TCB_SVN
            + TEST_MR_SEAM
            + TDX_MODULE_MRSIGNER
            + bytes(8)  # SEAM attributes
            + struct.pack("<Q", m.td_attributes)
            + m.xfam
            + m.mrtd
            + m.mr_config_id
            + m.mr_owner
            + m.mr_owner_config
            + b"".join(m.rtmrs)
            + report_data
        )
        assert len(body) == TD_REPORT_LEN
        signed = self._header(4, 0x81) + body
        certification = self._qe_certification(TD_QE_MRSIGNER, TD_QE_ISVPRODID)
        auth = (
            self.attestation_key.sign_raw(signed)
            + self.attestation_key.raw_public
            + struct.pack("<HI", 6, len(certification))  # 6 = QE report certification data
            + certification
        )
        return signed + struct.pack("<I", len(auth)) + auth

    def sgx_quote(self, report_data: bytes) -> bytes:
        """An SGX v3 enclave quote: a well-formed, correctly signed quote of the wrong TEE."""
        if len(report_data) != 64:
            raise ValueError("report_data must be 64 bytes")
        body = self._enclave_report(
            cpu_svn=TEST_CPUSVN,
            attributes=bytes.fromhex("05000000000000000700000000000000"),
            mr_enclave=hashlib.sha256(b"teegate test SGX enclave").digest(),
            mr_signer=hashlib.sha256(b"teegate test SGX enclave signer").digest(),
            isv_prod_id=0,
            isv_svn=0,
            report_data=report_data,
        )
        signed = self._header(3, 0x00) + body
        qe_report = self._qe_report(SGX_QE_MRSIGNER, SGX_QE_ISVPRODID)
        chain = self.pck_chain_pem
        auth = (
            self.attestation_key.sign_raw(signed)
            + self.attestation_key.raw_public
            + qe_report
            + self._pck_key.sign_raw(qe_report)
            + struct.pack("<H", len(QE_AUTH_DATA))
            + QE_AUTH_DATA
            + struct.pack("<HI", 5, len(chain))
            + chain
        )
        return signed + struct.pack("<I", len(auth)) + auth
