"""A minimal Chutes E2EE client for the sandbox tests, built on the published ``chutes-e2ee``
package's crypto (an implementation independent of both the sandbox and the gateway)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import httpx
from chutes_e2ee.crypto import (
    build_e2ee_request,
    decrypt_response,
    decrypt_stream_chunk,
    decrypt_stream_init,
)

from tests.support.sandbox_proc import SandboxProc

MODEL = "zai-org/GLM-5.1-TEE"
USER = [{"role": "user", "content": "hi"}]


@dataclass
class Ticket:
    chute_id: str
    instance_id: str
    pubkey: str
    token: str


class ChutesClient:
    """Discovery, evidence and invocation against one sandbox, with explicit tickets."""

    def __init__(self, sandbox: SandboxProc) -> None:
        self.sandbox = sandbox
        self.http = httpx.Client(
            base_url=sandbox.base_url,
            headers={"Authorization": f"Bearer {sandbox.api_key}"},
            timeout=10.0,
        )

    def close(self) -> None:
        self.http.close()

    def chute_id(self, model: str = MODEL) -> str:
        rows = self.http.get("/v1/models").json()["data"]
        return next(r["chute_id"] for r in rows if r["id"] == model)

    def instance_ids(self, model: str = MODEL) -> list[str]:
        """The chute's instance ids in fleet order (index 0 first)."""
        published = self.http.get("/_sandbox/chutes").json()["chutes"][self.chute_id(model)]
        return [i["instance_id"] for i in published["instances"]]

    def discover(self, model: str = MODEL) -> dict[str, Any]:
        response = self.http.get(f"/e2e/instances/{self.chute_id(model)}")
        response.raise_for_status()
        return response.json()

    def tickets(self, model: str = MODEL) -> dict[str, Ticket]:
        """One ticket per listed instance, keyed by instance id."""
        chute_id = self.chute_id(model)
        return {
            i["instance_id"]: Ticket(chute_id, i["instance_id"], i["e2e_pubkey"], i["nonces"][0])
            for i in self.discover(model)["instances"]
        }

    def evidence(self, nonce: str, model: str = MODEL) -> httpx.Response:
        return self.http.get(f"/chutes/{self.chute_id(model)}/evidence", params={"nonce": nonce})

    def invoke(
        self, ticket: Ticket, body: dict[str, Any], pubkey: str | None = None
    ) -> tuple[httpx.Response, bytes]:
        """Seal ``body`` to the ticket's key (or ``pubkey``); returns (response, response key)."""
        sealed = build_e2ee_request(pubkey or ticket.pubkey, body)
        stream = body.get("stream") is True
        headers = {
            "X-Chute-Id": ticket.chute_id,
            "X-Instance-Id": ticket.instance_id,
            "X-E2E-Nonce": ticket.token,
            "X-E2E-Stream": str(stream).lower(),
            "X-E2E-Path": "/v1/chat/completions",
            "Content-Type": "application/octet-stream",
        }
        response = self.http.post("/e2e/invoke", content=sealed.blob, headers=headers)
        return response, sealed.response_sk

    @staticmethod
    def open_plain(response: httpx.Response, key: bytes) -> dict[str, Any]:
        return decrypt_response(response.content, key)

    @staticmethod
    def events(response: httpx.Response) -> list[dict[str, Any] | str]:
        """The SSE data payloads as received (JSON objects, or ``[DONE]``)."""
        out: list[dict[str, Any] | str] = []
        for line in response.text.split("\n"):
            if line.startswith("data: "):
                raw = line[6:]
                out.append(raw if raw == "[DONE]" else json.loads(raw))
        return out

    @staticmethod
    def open_stream(events: list[dict[str, Any] | str], key: bytes) -> list[str]:
        """Decrypt the frames (each an upstream SSE event); raises on a bad frame."""
        stream_key = None
        out = []
        for event in events:
            assert isinstance(event, dict)
            if "e2e_init" in event:
                stream_key = decrypt_stream_init(key, event["e2e_init"])
            elif "e2e" in event:
                assert stream_key is not None
                out.append(decrypt_stream_chunk(event["e2e"], stream_key))
        return out


def b64len(text: str) -> int:
    return len(base64.b64decode(text))
