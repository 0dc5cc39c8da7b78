"""What Chutes end-to-end encryption costs the gateway per request and per stream, measured.

Usage::

    .venv/bin/python -m bench.e2ee_cost [--rounds N]

The gateway's share only (``teegate.catalog.chutes.e2ee``): sealing a request (a fresh
ML-KEM-768 key pair, one encapsulation, gzip, ChaCha20-Poly1305) and opening a non-streamed
answer (one decapsulation, gunzip); for a stream, keying it from ``e2e_init`` (one
decapsulation) and opening one frame. The instance's side is prepared outside the timed
region. Prints median and p99 in microseconds, single-threaded, on this machine.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import statistics
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teegate.catalog.chutes.e2ee import StreamOpener, open_response, seal_request


def _body(prompt_bytes: int) -> dict:
    return {
        "model": "deepseek-ai/DeepSeek-V3-TEE",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": ("lorem ipsum dolor sit amet " * 10_000)[:prompt_bytes]},
        ],
        "max_tokens": 256,
        "stream": False,
    }


ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "deepseek-ai/DeepSeek-V3-TEE",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 200}}],
    "usage": {"prompt_tokens": 120, "completion_tokens": 200, "total_tokens": 320},
}
CHUNK = 'data: {"object":"chat.completion.chunk","choices":[{"delta":{"content":"word "}}]}\n'


def _kdf(secret: bytes, kem_ct: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, kem_ct[:16], info).derive(secret)


def _instance_seal(public: bytes, plain: bytes, info: bytes) -> bytes:
    secret, kem_ct = MLKEM768PublicKey.from_public_bytes(public).encapsulate()
    nonce = os.urandom(12)
    return kem_ct + nonce + ChaCha20Poly1305(_kdf(secret, kem_ct, info)).encrypt(nonce, plain, None)


def _timed(rounds: int, prepare: Callable[[], object], run: Callable[[object], object]) -> list:
    out = []
    for i in range(rounds + rounds // 10):
        arg = prepare()
        t0 = time.perf_counter_ns()
        run(arg)
        if i >= rounds // 10:  # the first tenth warms caches up
            out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def _line(name: str, us: list[float]) -> str:
    us = sorted(us)
    p99 = us[min(len(us) - 1, int(len(us) * 0.99))]
    return f"{name:<44} median {statistics.median(us):8.1f} us   p99 {p99:8.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    rounds = parser.parse_args().rounds
    instance = MLKEM768PrivateKey.generate()
    pubkey = base64.b64encode(instance.public_key().public_bytes_raw()).decode()
    answer = gzip.compress(json.dumps(ANSWER).encode())

    for size in (200, 8_000):
        body = _body(size)
        print(
            _line(
                f"seal_request ({size} B prompt)",
                _timed(rounds, lambda: None, lambda _, b=body: seal_request(b, pubkey)),
            )
        )

    def sealed_and_answer():
        sealed = seal_request(_body(200), pubkey)
        public = sealed.response_key.public_key().public_bytes_raw()
        return sealed, _instance_seal(public, answer, b"e2e-resp-v1")

    print(
        _line(
            "open_response (~1 KB answer)",
            _timed(rounds, sealed_and_answer, lambda a: open_response(a[1], a[0].response_key)),
        )
    )

    # seal + open as one request pays it (the instance's sealing subtracted out).
    per_request = []
    small = _body(200)
    for i in range(rounds + rounds // 10):
        t0 = time.perf_counter_ns()
        sealed = seal_request(small, pubkey)
        t1 = time.perf_counter_ns()
        public = sealed.response_key.public_key().public_bytes_raw()
        blob = _instance_seal(public, answer, b"e2e-resp-v1")
        t2 = time.perf_counter_ns()
        open_response(blob, sealed.response_key)
        t3 = time.perf_counter_ns()
        if i >= rounds // 10:
            per_request.append(((t1 - t0) + (t3 - t2)) / 1000)
    print(_line("per request: seal_request + open_response", per_request))

    def stream_start():
        key = MLKEM768PrivateKey.generate()
        secret, kem_ct = key.public_key().encapsulate()
        init = json.dumps({"e2e_init": base64.b64encode(kem_ct).decode()})
        return key, init

    print(
        _line(
            "per stream: StreamOpener + e2e_init",
            _timed(rounds, stream_start, lambda a: StreamOpener(a[0]).open_event(a[1])),
        )
    )

    key, init = stream_start()
    opener = StreamOpener(key)
    opener.open_event(init)
    secret = key.decapsulate(base64.b64decode(json.loads(init)["e2e_init"]))
    aead = ChaCha20Poly1305(
        _kdf(secret, base64.b64decode(json.loads(init)["e2e_init"]), b"e2e-stream-v1")
    )

    def frame():
        nonce = os.urandom(12)
        raw = nonce + aead.encrypt(nonce, CHUNK.encode(), None)
        return json.dumps({"e2e": base64.b64encode(raw).decode()})

    print(_line("per frame: open_event (one chunk)", _timed(rounds * 5, frame, opener.open_event)))


if __name__ == "__main__":
    main()
