"""Raw-socket HTTP/1.1 for tests that must send what no client library would."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass

DEADLINE_S = 20.0


@dataclass
class Exchange:
    response: bytes  # everything the gateway sent before it closed (or the deadline)
    sent: int  # body bytes the gateway accepted before it stopped reading

    @property
    def status(self) -> int | None:
        head = self.response.split(b"\r\n", 1)[0].split()
        return int(head[1]) if len(head) > 1 and head[1].isdigit() else None

    @property
    def body(self) -> bytes:
        return self.response.partition(b"\r\n\r\n")[2]


def exchange(
    port: int, head: bytes, body: Iterable[bytes] = (), host: str = "127.0.0.1"
) -> Exchange:
    """Send ``head`` then ``body`` pieces while reading the answer in parallel; stop sending as
    soon as the gateway answers or stops reading. The request should say ``Connection: close``
    (a refusal does) so the answer ends with the connection."""
    sock = socket.create_connection((host, port), timeout=DEADLINE_S)
    got: list[bytes] = []
    answered = threading.Event()

    def read() -> None:
        try:
            while data := sock.recv(65536):
                got.append(data)
                answered.set()
                if _complete(b"".join(got)):
                    break  # a whole response: no need to wait for the connection to close
        except OSError:
            pass
        answered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent = 0
    try:
        sock.sendall(head)
        for piece in body:
            if answered.is_set():
                break
            sock.sendall(piece)
            sent += len(piece)
    except OSError:
        pass  # the gateway closed while we were still sending: what it said is read below
    reader.join(DEADLINE_S)
    sock.close()
    return Exchange(b"".join(got), sent)


def _complete(response: bytes) -> bool:
    """Whether ``response`` holds one whole HTTP/1.1 response (by Content-Length, or a chunked
    body's last chunk); one that ends only with the connection is never "complete" here."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip().lower()
    if b"content-length" in fields and fields[b"content-length"].isdigit():
        return len(body) >= int(fields[b"content-length"])
    if fields.get(b"transfer-encoding") == b"chunked":
        return body.endswith(b"0\r\n\r\n")
    return False


def request_head(
    method: str, path: str, headers: dict[str, str] | None = None, *, close: bool = True
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(pieces: Iterable[bytes], trailers: bytes | None = b"") -> Iterable[bytes]:
    for piece in pieces:
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    if trailers is not None:
        yield b"0\r\n" + trailers + b"\r\n"
