"""API key material: generation and hashing. Plaintext never leaves this module
except as the return value of :func:`new_key`, shown once to the operator.

Why plain SHA-256 and not bcrypt/argon2 or an HMAC pepper: a key carries 256
bits from :func:`secrets.token_urlsafe`, so recovering it from its hash is a
2^256 preimage search however fast the hash is. Slow, salted hashes exist to
protect *low-entropy* passwords from dictionary attacks, which do not apply
here; and an unsalted fast hash lets us look a presented key up by its hash
in an index instead of testing every stored key. A stolen database therefore
yields no usable key.

Timing: the lookup (a dict or B-tree search) runs on the *hash*, so its timing
reveals nothing an attacker can steer towards a valid key; the final equality
check still uses :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

DEFAULT_PREFIX = "vgpu_sk_"
KEY_RANDOM_BYTES = 32  # 256 bits; token_urlsafe -> 43 URL-safe characters
MAX_PRESENTED_LENGTH = 256  # longer presented strings are rejected before hashing

_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")


def check_prefix(prefix: str) -> str:
    """A prefix is 1-32 URL-safe characters (it ends up in HTTP headers)."""
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError("key prefix must be 1-32 characters from [A-Za-z0-9_-]")
    return prefix


def new_key(prefix: str = DEFAULT_PREFIX) -> tuple[str, bytes]:
    """A fresh key and its hash: ``(plaintext, sha256(plaintext))``."""
    plaintext = check_prefix(prefix) + secrets.token_urlsafe(KEY_RANDOM_BYTES)
    return plaintext, hash_key(plaintext)


def hash_key(plaintext: str) -> bytes:
    """The 32-byte digest stored and looked up in place of the key."""
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).digest()


def plausible(presented: object, prefix: str) -> bool:
    """Cheap shape check before any hashing or lookup (not a security boundary)."""
    return (
        isinstance(presented, str)
        and presented.startswith(prefix)
        and len(presented) <= MAX_PRESENTED_LENGTH
    )


def same_hash(stored: bytes, computed: bytes) -> bool:
    return hmac.compare_digest(stored, computed)
