"""``POST /e2e/invoke``: the front door checks the token and relays, the instance decrypts,
answers with the sandbox's chat logic, and encrypts the answer.

Why one module for both roles: in the sandbox they run in one process, but they are kept
apart in the code: ``invoke`` (the front door) sees only headers and ciphertext, records every
byte it relays (``FrontDoor``) and answers its own errors in plaintext ``{"detail": ...}`` as
Chutes' FastAPI does; ``_instance_answer`` is the enclave, the only place a key is used.

Front-door checks, in the real order (``api/e2e/router.py``): API key; the token (single use,
unexpired, issued for this chute and instance: 403 otherwise); the instance (404 unknown, 400
not of this chute); a non-empty body (400). The instance then answers 400 if the blob does not
open with the key it serves now (a rotated key), 404 for another path or model, and relays an
instance error as the front door would (``Instance returned status N``).

Streams: the instance forces ``stream_options.include_usage``, writes ``{"e2e_init": ...}``,
then one ``{"e2e": ...}`` frame per upstream SSE event (``data: {...}\\n\\n``, ``data: [DONE]``
included: it is the enclave's word that the answer is complete), and before the frame that
carries usage a plaintext ``{"usage": ...}`` event for billing, as Chutes instances do. The
front door adds nothing and can tamper (``chutes_drop_frame`` / ``_replay_frame`` /
``_corrupt_frame``), since frames carry no sequence numbers.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from typing import Any

from aiohttp import web

from teegate.sandbox.answers import BadRequest
from teegate.sandbox.behaviour import Behaviour
from teegate.sandbox.chat import Reply, plan_reply
from teegate.sandbox.chutes.crypto import OpenError, StreamSealer, seal_response
from teegate.sandbox.chutes.fleet import Fleet, Instance
from teegate.sandbox.chutes.frontdoor import Entry, FrontDoor
from teegate.sandbox.state import SandboxState
from teegate.sandbox.streaming import SSE_HEADERS, ChunkStream

CHAT_PATH = "/v1/chat/completions"
MODEL_ERROR = {
    "message": "sandbox: the model failed (encrypted error)",
    "type": "server_error",
    "code": "sandbox_model_error",
}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _flip(frame_b64: str) -> str:
    raw = bytearray(base64.b64decode(frame_b64))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


class SealedStream(ChunkStream):
    """The chat stream as the enclave encrypts it and the front door relays it."""

    def __init__(
        self, request: web.Request, reply: Reply, sealer: StreamSealer, door: FrontDoor, tap: Entry
    ) -> None:
        behaviour: Behaviour = request.app["state"].behaviour
        super().__init__(request, reply, behaviour)
        self.sealer = sealer
        self.door = door
        self.tap = tap
        self.frames = 0

    async def relay(self, data: bytes) -> None:
        assert self.response is not None
        self.door.relay(self.tap, data)
        await self.response.write(data)

    async def begin(self) -> None:
        await self.relay(_sse({"e2e_init": self.sealer.init_b64}))

    async def emit(self, data: bytes) -> None:
        if b'"usage"' in data and data.startswith(b"data: {"):
            usage = json.loads(data[6:]).get("usage")
            if usage is not None:
                await self.relay(_sse({"usage": usage}))
        frame = self.sealer.frame(data)
        n, self.frames = self.frames, self.frames + 1
        b = self.behaviour
        if b.chutes_drop_frame == n:
            return
        if b.chutes_corrupt_frame == n:
            frame = _flip(frame)
        await self.relay(_sse({"e2e": frame}))
        if b.chutes_replay_frame == n:
            await self.relay(_sse({"e2e": frame}))


def _detail(status: int, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps({"detail": message}).encode(),
        content_type="application/json",
    )


async def invoke(request: web.Request) -> web.StreamResponse:
    """The front door; every answer it gives is recorded as relayed."""
    door: FrontDoor = request.app["chutes_front_door"]
    blob = await request.read()
    h = request.headers
    meta = {"chute_id": h.get("X-Chute-Id"), "instance_id": h.get("X-Instance-Id")}
    door.relay(door.open("request", **meta), blob)
    tap = door.open("response", **meta)
    response = await _front_door(request, blob, tap)
    if isinstance(response, web.Response) and response.body is not None:
        door.relay(tap, bytes(response.body))  # type: ignore[arg-type]
        tap.meta["status"] = response.status
    return response


async def _front_door(request: web.Request, blob: bytes, tap: Entry) -> web.StreamResponse:
    state: SandboxState = request.app["state"]
    fleet: Fleet = request.app["chutes_fleet"]
    expected = f"Bearer {request.app['options'].api_key}".encode()
    if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
        return _detail(401, "Invalid or missing API key")
    h = request.headers
    chute_id, instance_id, token = h.get("X-Chute-Id"), h.get("X-Instance-Id"), h.get("X-E2E-Nonce")
    if not chute_id or not instance_id or not token:
        return _detail(422, "X-Chute-Id, X-Instance-Id and X-E2E-Nonce are required")
    if state.behaviour.chutes_refuse_tokens or not fleet.consume(token, chute_id, instance_id):
        return _detail(403, "Invalid, expired, or already-used nonce")
    instance = fleet.instance(instance_id)
    if instance is None:
        return _detail(404, "Instance not found")
    if instance.chute_id != chute_id:
        return _detail(400, "Instance does not belong to the specified chute")
    if not blob:
        return _detail(400, "Empty request body")
    stream_header = h.get("X-E2E-Stream", "false").lower() == "true"
    return await _instance_answer(
        request, instance, blob, h.get("X-E2E-Path", "/"), stream_header, tap
    )


async def _instance_answer(
    request: web.Request,
    instance: Instance,
    blob: bytes,
    path: str,
    stream_header: bool,
    tap: Entry,
) -> web.StreamResponse:
    """Inside the enclave: open, answer, seal."""
    state: SandboxState = request.app["state"]
    fleet: Fleet = request.app["chutes_fleet"]
    behaviour = state.behaviour
    try:
        opened = instance.current_key(behaviour).open_request(blob)
    except OpenError as e:
        return _detail(400, str(e))
    body = opened.body
    if path != CHAT_PATH or body.get("model") != fleet.model_of[instance.chute_id]:
        return _detail(404, "Instance returned status 404")
    if (body.get("stream") is True) != stream_header:
        return _detail(400, "X-E2E-Stream does not match the request's stream flag")
    state.chat_log.append(
        {
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": json.loads(json.dumps(body)),
            "e2ee": True,
            "instance_id": instance.instance_id,
        }
    )
    if stream_header:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {})}
        body["stream_options"]["include_usage"] = True
    if behaviour.delay_ms:
        await asyncio.sleep(behaviour.delay_ms / 1000)
    if behaviour.status is not None:
        if behaviour.status == 429:
            return _detail(429, "Instance is at maximum capacity, try again later")
        return _detail(behaviour.status, f"Instance returned status {behaviour.status}")
    try:
        reply = plan_reply(state, body, request.app["options"].chunks)
    except BadRequest as e:
        error = {"message": e.message, "type": "invalid_request_error", "param": e.param}
        return _detail(400, json.dumps({"error": {**error, "code": "invalid_request"}}))
    if isinstance(reply, web.Response):
        return _detail(reply.status, f"Instance returned status {reply.status}")
    if not reply.stream:
        payload = {"error": MODEL_ERROR} if behaviour.chutes_encrypted_error else reply.payload()
        sealed = seal_response(opened.response_key, json.dumps(payload).encode())
        if behaviour.chutes_corrupt_frame is not None:
            sealed = sealed[:-1] + bytes([sealed[-1] ^ 0x01])
        return web.Response(body=sealed, content_type="application/octet-stream")
    sealer = StreamSealer(opened.response_key)
    door: FrontDoor = request.app["chutes_front_door"]
    tap.meta["status"] = 200
    if behaviour.chutes_encrypted_error:
        return await _stream_error(request, sealer, door, tap)
    return await SealedStream(request, reply, sealer, door, tap).send()


async def _stream_error(
    request: web.Request, sealer: StreamSealer, door: FrontDoor, tap: Entry
) -> web.StreamResponse:
    """The model fails after the stream is keyed: an encrypted ``e2e_error``, then the end."""
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    for event in (
        _sse({"e2e_init": sealer.init_b64}),
        _sse({"e2e_error": sealer.frame(json.dumps(MODEL_ERROR).encode())}),
    ):
        door.relay(tap, event)
        await response.write(event)
    await response.write_eof()
    return response
