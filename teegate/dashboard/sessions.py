"""Dashboard sign-in sessions, kept server-side and looked up by the hash of their id.

Why a session at all, rather than the browser holding the admin token: the token would then
sit in JavaScript-readable storage (or be sent on every request from a page any script on it
can read). Instead the token is checked once, at sign-in, and the browser gets a random
session id in an ``HttpOnly`` cookie it cannot read. Only the id's SHA-256 is kept here, like
API keys and admin tokens in the ledger, so a memory dump of the session table cannot be
replayed as cookies.

Each session carries its own CSRF token (random, compared in constant time on every state
change: :mod:`.app`), the role it signed in as, and what that role is bound to: the admin
token's id (a revoked token ends its sessions at the next request) or the API key's id and
account (a key holder sees that account and no other; a revoked key ends the session too).

Sessions live in this process's memory: a restart signs everyone out, which for an operator
console is a feature rather than a loss. They expire after ``admin.session_idle_s`` without
use and after :data:`MAX_AGE_S` in any case; the table is bounded (:data:`MAX_SESSIONS`, the
least recently used dropped first) so sign-in attempts cannot grow it without end.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["admin", "keyholder"]
MAX_AGE_S = 12 * 3600
MAX_SESSIONS = 1000


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


@dataclass
class Session:
    role: Role
    subject_id: int
    """The admin token's id (admin) or the API key's id (keyholder)."""
    account_id: int | None
    """The key holder's account (None for an admin)."""
    label: str | None
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = 0.0
    last_used: float = 0.0

    def csrf_ok(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(
            self.csrf_token.encode(), (presented or "").encode("utf-8", "surrogatepass")
        )


class Sessions:
    def __init__(self, idle_s: float, max_age_s: float = MAX_AGE_S) -> None:
        self.idle_s = idle_s
        self._max_age_s = max_age_s
        self._by_digest: OrderedDict[bytes, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_digest)

    def create(
        self, role: Role, subject_id: int, account_id: int | None, label: str | None
    ) -> tuple[str, Session]:
        """A new session: ``(session id for the cookie, Session)``. The id is not stored."""
        session_id = secrets.token_urlsafe(32)
        now = time.monotonic()
        session = Session(role, subject_id, account_id, label, created=now, last_used=now)
        self._by_digest[_digest(session_id)] = session
        while len(self._by_digest) > MAX_SESSIONS:
            self._by_digest.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with that id (its idle clock restarted), or None."""
        if not session_id or len(session_id) > 100:
            return None
        digest = _digest(session_id)
        session = self._by_digest.get(digest)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.last_used > self.idle_s or now - session.created > self._max_age_s:
            del self._by_digest[digest]
            return None
        session.last_used = now
        self._by_digest.move_to_end(digest)
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._by_digest.pop(_digest(session_id), None)
