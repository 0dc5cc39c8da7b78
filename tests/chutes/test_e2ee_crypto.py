"""teegate's Chutes E2EE agrees with the protocol and with Chutes' own client, and fails closed.

Two independent witnesses: a small instance written here from the protocol (decapsulate,
HKDF, ChaCha20-Poly1305, gzip), and the published ``chutes-e2ee`` client, whose ML-KEM is
``pqcrypto`` (PQClean), not ``cryptography``'s. A request teegate seals is opened with
pqcrypto's decapsulation and chutes-e2ee's key derivation; answers the test instance seals
open both in chutes-e2ee and in teegate, so the test instance is held to the real client too.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
from dataclasses import dataclass

import pytest
from chutes_e2ee import crypto as ref
from chutes_e2ee import transport as ref_transport
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pqcrypto.kem import ml_kem_768 as pq

from teegate.catalog.chutes import e2ee
from teegate.catalog.chutes.e2ee import E2EEError, StreamOpener, open_response, seal_request

MARKER = "marker-7f3c-never-in-ciphertext"
BODY = {
    "model": "deepseek-ai/DeepSeek-V3-TEE",
    "messages": [{"role": "user", "content": f"say {MARKER}"}],
    "stream": False,
    "max_tokens": 16,
}
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": BODY["model"],
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
}


# --- the test instance, written from the protocol, not from teegate's module ---------------


def _kdf(secret: bytes, kem_ct: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, kem_ct[:16], info).derive(secret)


def _seal(public: bytes, plain: bytes, info: bytes) -> bytes:
    secret, kem_ct = MLKEM768PublicKey.from_public_bytes(public).encapsulate()
    nonce = os.urandom(12)
    return kem_ct + nonce + ChaCha20Poly1305(_kdf(secret, kem_ct, info)).encrypt(nonce, plain, None)


@dataclass
class Instance:
    key: MLKEM768PrivateKey

    @classmethod
    def new(cls) -> Instance:
        return cls(MLKEM768PrivateKey.generate())

    @property
    def pubkey_b64(self) -> str:
        return base64.b64encode(self.key.public_key().public_bytes_raw()).decode()

    def open_request(self, blob: bytes) -> dict:
        kem_ct, nonce, sealed = blob[:1088], blob[1088:1100], blob[1100:]
        key = _kdf(self.key.decapsulate(kem_ct), kem_ct, b"e2e-req-v1")
        return json.loads(gzip.decompress(ChaCha20Poly1305(key).decrypt(nonce, sealed, None)))

    @staticmethod
    def seal_response(response_pk_b64: str, answer: dict) -> bytes:
        plain = gzip.compress(json.dumps(answer).encode())
        return _seal(base64.b64decode(response_pk_b64), plain, b"e2e-resp-v1")


class Stream:
    """The instance side of one stream: an ``e2e_init`` event, then sealed raw SSE lines."""

    def __init__(self, response_pk_b64: str) -> None:
        secret, self.kem_ct = MLKEM768PublicKey.from_public_bytes(
            base64.b64decode(response_pk_b64)
        ).encapsulate()
        self.aead = ChaCha20Poly1305(_kdf(secret, self.kem_ct, b"e2e-stream-v1"))

    def init(self) -> str:
        return json.dumps({"e2e_init": base64.b64encode(self.kem_ct).decode()})

    def raw_frame(self, line: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self.aead.encrypt(nonce, line.encode(), None)

    def frame(self, line: str) -> str:
        return json.dumps({"e2e": base64.b64encode(self.raw_frame(line)).decode()})


def _chunk(text: str, usage: dict | None = None) -> str:
    chunk: dict = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": text}}]}
    if usage:
        chunk["usage"] = usage
    return json.dumps(chunk)


def _pq_pubkey_b64() -> tuple[str, bytes]:
    public, secret = pq.generate_keypair()
    return base64.b64encode(public).decode(), secret


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# --- requests ------------------------------------------------------------------------------


def test_sealed_request_opens_in_the_test_instance_with_a_fresh_response_key() -> None:
    inst = Instance.new()
    sealed = seal_request(BODY, inst.pubkey_b64)
    assert MARKER.encode() not in sealed.payload
    opened = inst.open_request(sealed.payload)
    response_pk = opened.pop("e2e_response_pk")
    assert opened == BODY
    raw_pk = base64.b64decode(response_pk, validate=True)
    assert raw_pk == sealed.response_key.public_key().public_bytes_raw()
    assert len(raw_pk) == 1184
    assert MARKER not in repr(sealed)


def test_every_seal_is_fresh() -> None:
    inst = Instance.new()
    a, b = seal_request(BODY, inst.pubkey_b64), seal_request(BODY, inst.pubkey_b64)
    assert a.payload[:1088] != b.payload[:1088]  # fresh encapsulation
    assert a.payload[1088:1100] != b.payload[1088:1100]  # fresh nonce
    assert (
        inst.open_request(a.payload)["e2e_response_pk"]
        != inst.open_request(b.payload)["e2e_response_pk"]
    )


def test_sealed_request_opens_with_pqcrypto_and_the_reference_key_derivation() -> None:
    """Byte-level agreement: pqcrypto decapsulates teegate's kem_ct to a secret from which
    chutes-e2ee's derive_key and chacha_decrypt recover the request."""
    public_b64, secret_key = _pq_pubkey_b64()
    sealed = seal_request(BODY, public_b64).payload
    kem_ct, nonce, rest = sealed[:1088], sealed[1088:1100], sealed[1100:]
    shared = pq.decrypt(secret_key, kem_ct)
    key = ref.derive_key(shared, kem_ct, ref.INFO_REQ)
    assert key == e2ee.derive_key(shared, kem_ct, e2ee.INFO_REQUEST)
    plain = ref.chacha_decrypt(key, nonce, rest[: -ref.TAG_SIZE], rest[-ref.TAG_SIZE :])
    opened = json.loads(gzip.decompress(plain))
    assert opened.pop("e2e_response_pk")
    assert opened == BODY


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (e2ee.INFO_REQUEST, ref.INFO_REQ),
        (e2ee.INFO_RESPONSE, ref.INFO_RESP),
        (e2ee.INFO_STREAM, ref.INFO_STREAM),
    ],
)
def test_key_derivation_matches_the_reference_client(ours: bytes, theirs: bytes) -> None:
    assert ours == theirs
    for _ in range(4):
        secret, kem_ct = os.urandom(32), os.urandom(1088)
        assert e2ee.derive_key(secret, kem_ct, ours) == ref.derive_key(secret, kem_ct, theirs)


def test_framing_constants_match_the_reference_client() -> None:
    assert (e2ee.KEM_CT_LEN, e2ee.TAG_LEN) == (ref.MLKEM_CT_SIZE, ref.TAG_SIZE)
    assert (e2ee.PUBKEY_LEN, e2ee.KEM_CT_LEN) == (pq.PUBLIC_KEY_SIZE, pq.CIPHERTEXT_SIZE)


def test_reference_client_request_opens_in_the_test_instance() -> None:
    """The test instance is the protocol: the published client's request opens in it too,
    with the same framing as teegate's (kem_ct 1088 || nonce 12 || ciphertext || tag 16)."""
    inst = Instance.new()
    theirs = ref.build_e2ee_request(inst.pubkey_b64, BODY).blob
    ours = seal_request(BODY, inst.pubkey_b64).payload
    a, b = inst.open_request(theirs), inst.open_request(ours)
    assert len(base64.b64decode(a.pop("e2e_response_pk"))) == 1184
    assert len(base64.b64decode(b.pop("e2e_response_pk"))) == 1184
    assert a == b == BODY


def test_kem_interoperates_both_ways_with_pqcrypto() -> None:
    mine = MLKEM768PrivateKey.generate()
    kem_ct, secret = pq.encrypt(mine.public_key().public_bytes_raw())
    assert mine.decapsulate(kem_ct) == secret
    public, secret_key = pq.generate_keypair()
    secret, kem_ct = MLKEM768PublicKey.from_public_bytes(public).encapsulate()
    assert pq.decrypt(secret_key, kem_ct) == secret


@pytest.mark.parametrize(
    ("body", "pubkey", "reason"),
    [
        (BODY, "not base64!", "bad_instance_key"),
        (BODY, "", "bad_instance_key"),
        (BODY, base64.b64encode(b"\x00" * 1183).decode(), "bad_instance_key"),
        (BODY, base64.b64encode(b"\x00" * 1185).decode(), "bad_instance_key"),
        ({**BODY, "e2e_response_pk": "AAAA"}, None, "reserved_field"),
        ({**BODY, "temperature": float("nan")}, None, "unserializable_body"),
        ({**BODY, "x": object()}, None, "unserializable_body"),
    ],
    ids=["not-b64", "empty", "short", "long", "reserved", "nan", "object"],
)
def test_seal_refuses(body: dict, pubkey: str | None, reason: str) -> None:
    with pytest.raises(E2EEError) as err:
        seal_request(body, pubkey if pubkey is not None else Instance.new().pubkey_b64)
    assert err.value.reason == reason


# --- non-streamed answers ------------------------------------------------------------------


def _answer_for(sealed: e2ee.Sealed, inst: Instance, answer: dict = ANSWER) -> bytes:
    return Instance.seal_response(inst.open_request(sealed.payload)["e2e_response_pk"], answer)


def test_answer_opens() -> None:
    inst = Instance.new()
    sealed = seal_request(BODY, inst.pubkey_b64)
    assert json.loads(open_response(_answer_for(sealed, inst), sealed.response_key)) == ANSWER


def test_answer_in_the_instance_envelope_opens_and_its_plain_usage_is_ignored() -> None:
    inst = Instance.new()
    sealed = seal_request(BODY, inst.pubkey_b64)
    blob = _answer_for(sealed, inst)
    envelope = json.dumps(
        {"e2e": base64.b64encode(blob).decode(), "usage": {"prompt_tokens": 1}}
    ).encode()
    opened = json.loads(open_response(envelope, sealed.response_key))
    assert opened["usage"] == ANSWER["usage"]


def test_the_test_instance_answer_opens_in_the_reference_client() -> None:
    public_b64, secret_key = _pq_pubkey_b64()
    blob = Instance.seal_response(public_b64, ANSWER)
    assert ref.decrypt_response(blob, secret_key) == ANSWER


def _tampered(blob: bytes, case: str) -> bytes:
    return {
        "flip-kem_ct": lambda: _flip(blob, 5),
        "flip-nonce": lambda: _flip(blob, 1090),
        "flip-ciphertext": lambda: _flip(blob, 1105),
        "flip-tag": lambda: _flip(blob, len(blob) - 1),
        "truncated-tail": lambda: blob[:-1],
        "truncated-to-header": lambda: blob[: 1088 + 12 + 15],
        "empty": lambda: b"",
        "extended": lambda: blob + b"\x00",
        "plaintext-json": lambda: json.dumps(ANSWER).encode(),
        "envelope-bad-b64": lambda: b'{"e2e": "***"}',
        "envelope-not-str": lambda: b'{"e2e": 5}',
    }[case]()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("flip-kem_ct", "bad_tag"),
        ("flip-nonce", "bad_tag"),
        ("flip-ciphertext", "bad_tag"),
        ("flip-tag", "bad_tag"),
        ("truncated-tail", "bad_tag"),
        ("truncated-to-header", "truncated"),
        ("empty", "truncated"),
        ("extended", "bad_tag"),
        ("plaintext-json", "plaintext_response"),
        ("envelope-bad-b64", "bad_envelope"),
        ("envelope-not-str", "plaintext_response"),
    ],
)
def test_tampered_answer_is_refused(case: str, reason: str) -> None:
    inst = Instance.new()
    sealed = seal_request(BODY, inst.pubkey_b64)
    with pytest.raises(E2EEError) as err:
        open_response(_tampered(_answer_for(sealed, inst), case), sealed.response_key)
    assert err.value.reason == reason


def test_answer_for_another_request_is_refused() -> None:
    inst = Instance.new()
    first, second = seal_request(BODY, inst.pubkey_b64), seal_request(BODY, inst.pubkey_b64)
    with pytest.raises(E2EEError) as err:
        open_response(_answer_for(first, inst), second.response_key)
    assert err.value.reason == "bad_tag"


@pytest.mark.parametrize(
    ("plain", "reason"),
    [
        (b'{"not": "gzipped"}', "bad_gzip"),
        (gzip.compress(b"{}")[:-4], "bad_gzip"),
        (gzip.compress(b"{}") + b"junk", "bad_gzip"),
        (gzip.compress(b"x" * 5000), "too_large"),
    ],
    ids=["not-gzip", "cut-gzip", "trailing-junk", "bomb"],
)
def test_bad_compression_is_refused(
    plain: bytes, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(e2ee, "MAX_PLAINTEXT", 4096)
    key = MLKEM768PrivateKey.generate()
    blob = _seal(key.public_key().public_bytes_raw(), plain, b"e2e-resp-v1")
    with pytest.raises(E2EEError) as err:
        open_response(blob, key)
    assert err.value.reason == reason


# --- streams -------------------------------------------------------------------------------


def _stream_pair() -> tuple[StreamOpener, Stream]:
    inst = Instance.new()
    sealed = seal_request({**BODY, "stream": True}, inst.pubkey_b64)
    opener = StreamOpener(sealed.response_key)
    return opener, Stream(inst.open_request(sealed.payload)["e2e_response_pk"])


def test_stream_opens_event_by_event() -> None:
    opener, up = _stream_pair()
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    events = [
        (up.init(), None),
        (up.frame(f"data: {_chunk('he')}\n"), _chunk("he")),
        (up.frame("\n"), None),
        (up.frame(": keep-alive\n"), None),
        (up.frame(_chunk("llo")), _chunk("llo")),  # a bare payload, as some servers send
        (json.dumps({"usage": {"prompt_tokens": 999}}), None),  # the relay's copy: ignored
        (up.frame(f"data: {_chunk('', usage)}\n\n"), _chunk("", usage)),
        (up.frame("data: [DONE]\n"), "[DONE]"),
        ("[DONE]", None),  # the relay's own terminator after the enclave's
    ]
    assert not opener.keyed
    for data, expected in events:
        assert opener.open_event(data) == expected
    assert opener.keyed and opener.finished


def test_the_test_instance_stream_opens_in_the_reference_client() -> None:
    public_b64, secret_key = _pq_pubkey_b64()
    up = Stream(public_b64)
    sse = "".join(
        f"data: {d}\n\n"
        for d in (up.init(), up.frame(f"data: {_chunk('hi')}\n"), up.frame("data: [DONE]\n"))
    )
    holder: list[bytes | None] = [None]
    out = b"".join(
        b"".join(ref_transport._process_sse_line(line, secret_key, holder))
        for line in sse.split("\n")
    )
    assert f"data: {_chunk('hi')}".encode() in out
    assert b"data: [DONE]" in out


def _stream_case(case: str, up: Stream) -> tuple[list[str], str]:
    """Events ahead of the failing one, and the failing one."""
    stranger = MLKEM768PrivateKey.generate()
    other = Stream(base64.b64encode(stranger.public_key().public_bytes_raw()).decode())
    good = up.frame(f"data: {_chunk('x')}\n")
    raw = up.raw_frame(f"data: {_chunk('y')}\n")
    b64 = base64.b64encode
    return {
        "frame-before-init": ([], good),
        "second-init": ([up.init()], up.init()),
        "replayed-frame": ([up.init(), good], good),
        "flipped-frame": ([up.init()], json.dumps({"e2e": b64(_flip(raw, 20)).decode()})),
        "flipped-nonce": ([up.init()], json.dumps({"e2e": b64(_flip(raw, 0)).decode()})),
        "truncated-frame": ([up.init()], json.dumps({"e2e": b64(raw[:-1]).decode()})),
        "short-frame": ([up.init()], json.dumps({"e2e": b64(raw[:27]).decode()})),
        "frame-not-b64": ([up.init()], json.dumps({"e2e": "%%%"})),
        "frame-not-str": ([up.init()], json.dumps({"e2e": 7})),
        "init-wrong-length": ([], json.dumps({"e2e_init": b64(b"\x00" * 1087).decode()})),
        "init-for-another-key": ([other.init()], good),
        "plain-done-first": ([up.init(), good], "[DONE]"),
        "frame-after-end": ([up.init(), up.frame("data: [DONE]\n")], good),
        "unknown-event": ([up.init()], json.dumps({"choices": []})),
        "two-keys": ([up.init()], json.dumps({"e2e": "AAAA", "usage": {}})),
        "not-json": ([up.init()], "hello"),
        "two-events-in-a-frame": ([up.init()], up.frame("data: {}\n\ndata: {}\n\n")),
        "not-utf8": ([up.init()], json.dumps({"e2e": b64(_raw_bytes_frame(up)).decode()})),
    }[case]


def _raw_bytes_frame(up: Stream) -> bytes:
    nonce = os.urandom(12)
    return nonce + up.aead.encrypt(nonce, b"\xff\xfe", None)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("frame-before-init", "frame_before_init"),
        ("second-init", "second_init"),
        ("replayed-frame", "replayed_frame"),
        ("flipped-frame", "bad_frame"),
        ("flipped-nonce", "bad_frame"),
        ("truncated-frame", "bad_frame"),
        ("short-frame", "bad_frame"),
        ("frame-not-b64", "bad_frame"),
        ("frame-not-str", "bad_frame"),
        ("init-wrong-length", "bad_init"),
        ("init-for-another-key", "bad_frame"),
        ("plain-done-first", "unauthenticated_end"),
        ("frame-after-end", "frame_after_end"),
        ("unknown-event", "unknown_event"),
        ("two-keys", "unknown_event"),
        ("not-json", "bad_event"),
        ("two-events-in-a-frame", "multi_event_frame"),
        ("not-utf8", "bad_frame"),
    ],
)
def test_stream_refuses(case: str, reason: str) -> None:
    opener, up = _stream_pair()
    before, failing = _stream_case(case, up)
    for data in before:
        opener.open_event(data)
    with pytest.raises(E2EEError) as err:
        opener.open_event(failing)
    assert err.value.reason == reason
    assert str(err.value) == reason  # nothing but the reason reaches a log


def test_encrypted_error_is_opened_and_marked_authenticated() -> None:
    opener, up = _stream_pair()
    opener.open_event(up.init())
    message = '{"error": {"message": "context too long"}}'
    sealed = base64.b64encode(up.raw_frame(message)).decode()
    with pytest.raises(E2EEError) as err:
        opener.open_event(json.dumps({"e2e_error": sealed}))
    assert (err.value.reason, err.value.detail, err.value.authenticated) == (
        "upstream_error",
        message,
        True,
    )
    assert "context" not in str(err.value)


@pytest.mark.parametrize(
    ("value", "keyed", "detail"),
    [
        ("backend exploded", True, "backend exploded"),
        ({"message": "failed"}, True, '{"message":"failed"}'),
        ("backend exploded", False, "backend exploded"),
    ],
)
def test_plaintext_error_is_raised_unauthenticated(value: object, keyed: bool, detail: str) -> None:
    opener, up = _stream_pair()
    if keyed:
        opener.open_event(up.init())
    with pytest.raises(E2EEError) as err:
        opener.open_event(json.dumps({"e2e_error": value}))
    assert (err.value.reason, err.value.detail, err.value.authenticated) == (
        "upstream_error",
        detail,
        False,
    )


def test_sealed_length_depends_on_the_prompt_length_only() -> None:
    """Nothing is compressed before encryption: how well a prompt compresses (against text an
    attacker planted beside it) cannot show in the length the front door sees."""
    inst = Instance.new()
    repetitive = {**BODY, "messages": [{"role": "user", "content": "a" * 4000}]}
    random_text = {**BODY, "messages": [{"role": "user", "content": os.urandom(2000).hex()}]}
    lengths = {len(seal_request(b, inst.pubkey_b64).payload) for b in (repetitive, random_text)}
    assert len(lengths) == 1
