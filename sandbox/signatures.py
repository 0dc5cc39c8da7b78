"""Response signatures the way NEAR AI's vllm-proxy serves them, by the sandbox's attested key.

Every completed chat (plain, or a stream that reached ``data: [DONE]``) is remembered by its
completion id with ``sha256(request body bytes received)`` and ``sha256(response bytes sent)``.
``GET /v1/signature/{chat_id}?model=<id>&signing_algo=ecdsa`` answers ``{text, signature,
signing_address, signing_algo}``: ``text`` = ``<req hash>:<resp hash>``, signed EIP-191
(``personal_sign``) with the key the model's attestation report binds (the same
:class:`~teegate.sandbox.evidence.SigningKey`).

Test switches, per model: ``POST /_sandbox/signatures`` with ``{model_id: mode}``: ``valid``;
``wrong_key`` (signed by a key no quote binds, which the document names honestly);
``missing`` (404, as for an id the node never served); ``bad_hash`` (signs another response
hash); ``model_form`` (inference-proxy's ``<model>:<req>:<resp>`` text). ``GET`` shows them.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from typing import Any, Literal, get_args

import coincurve
from aiohttp import web
from Crypto.Hash import keccak

from teegate.sandbox.evidence import EvidenceMinter, SigningKey

Mode = Literal["valid", "wrong_key", "missing", "bad_hash", "model_form"]
MODES: tuple[str, ...] = get_args(Mode)
# As NEAR AI's vllm-proxy, which keeps signatures in a TTLCache(maxsize=1000, ttl=1200).
REMEMBERED = 1000


@functools.lru_cache(maxsize=64)
def _signer(secret: bytes) -> coincurve.PrivateKey:
    return coincurve.PrivateKey(secret)


def eip191_sign(key: SigningKey, text: str) -> str:
    """``0x`` r||s||v (v = 27/28) over EIP-191's prefixed keccak256 of ``text``."""
    data = text.encode()
    digest = keccak.new(
        digest_bits=256, data=b"\x19Ethereum Signed Message:\n" + str(len(data)).encode() + data
    ).digest()
    sig = _signer(key.secret).sign_recoverable(digest, hasher=None)
    return "0x" + sig[:64].hex() + bytes([sig[64] + 27]).hex()


class SignatureBook:
    def __init__(self, minter: EvidenceMinter) -> None:
        self._minter = minter
        self._seen: OrderedDict[str, tuple[str, str, str]] = OrderedDict()
        self.modes: dict[str, str] = {}
        self._rogue = SigningKey.generate()

    def record(self, chat_id: str, model: str, request_sha256: str, response_sha256: str) -> None:
        self._seen[chat_id] = (model, request_sha256, response_sha256)
        self._seen.move_to_end(chat_id)
        while len(self._seen) > REMEMBERED:
            self._seen.popitem(last=False)

    def set_mode(self, model: str, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(mode)
        if mode == "valid":
            self.modes.pop(model, None)
        else:
            self.modes[model] = mode

    def document(self, chat_id: str, model: str) -> dict[str, Any] | None:
        entry = self._seen.get(chat_id)
        if entry is None or entry[0] != model:
            return None
        _, req, resp = entry
        mode = self.modes.get(model, "valid")
        if mode == "missing":
            return None
        if mode == "bad_hash":
            resp = "0" * 64
        text = f"{model}:{req}:{resp}" if mode == "model_form" else f"{req}:{resp}"
        key = self._rogue if mode == "wrong_key" else self._minter.key_for(model)
        return {
            "text": text,
            "signature": eip191_sign(key, text),
            "signing_address": key.address_hex,
            "signing_algo": "ecdsa",
        }


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(payload).encode(), content_type="application/json"
    )


async def get_signature(request: web.Request) -> web.Response:
    book: SignatureBook = request.app["signatures"]
    if request.query.get("signing_algo", "ecdsa") != "ecdsa":
        return _json({"error": {"message": "sandbox only signs with ecdsa"}}, 400)
    doc = book.document(request.match_info["chat_id"], request.query.get("model", ""))
    if doc is None:
        return _json({"error": {"message": "no signature for this chat id"}}, 404)
    return _json(doc)


async def set_modes(request: web.Request) -> web.Response:
    book: SignatureBook = request.app["signatures"]
    try:
        body = json.loads(await request.read())
    except ValueError:
        body = None
    if not isinstance(body, dict) or not all(v in MODES for v in body.values()):
        message = f"body must be {{model_id: mode}}, mode in {MODES}"
        return _json({"error": {"message": message}}, 400)
    for model, mode in body.items():
        book.set_mode(model, mode)
    return _json({"modes": book.modes})


async def get_modes(request: web.Request) -> web.Response:
    return _json({"modes": request.app["signatures"].modes})


def add_routes(app: web.Application) -> None:
    """After :func:`teegate.sandbox.evidence.add_routes` (signs with its keys)."""
    # Not cleared by /_sandbox/reset: a gateway may still be fetching the signature of an
    # answer served just before a test reset the sandbox (ids restart then; the newest wins).
    book = SignatureBook(app["evidence"])
    app["signatures"] = book
    app.router.add_get("/v1/signature/{chat_id}", get_signature)
    app.router.add_post("/_sandbox/signatures", set_modes)
    app.router.add_get("/_sandbox/signatures", get_modes)
