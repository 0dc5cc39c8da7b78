"""structlog as JSON lines on stderr, and mitmproxy's own log kept quiet.

mitmproxy's flow dumper prints URLs and bodies, so it is never mounted; its
termlog stays at warning level so only real problems reach the output, and
prints fixed categories instead of mitmproxy's texts (teegate/master.py).

Every string value is escaped (control and non-ASCII characters as ``\\xNN``-style
escapes) on its way out, and the ones a client chooses (path, model, host) are cut
to 128 characters first: a log line can neither be forged nor flooded. A method
outside the standard ones is logged as "other".
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

CLIENT_KEYS = frozenset({"path", "model", "host"})
# A method is any token a client likes ("PROMPT-TEXT / HTTP/1.1" parses): only known ones are kept.
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
MAX_CLIENT_CHARS = 128
MAX_CHARS = 1024  # any other string: ours, or an upstream's, never unbounded


def escaped(value: str, limit: int = MAX_CLIENT_CHARS) -> str:
    """``value`` cut to ``limit`` characters, then with anything unprintable escaped."""
    value = value[:limit]
    if value.isascii() and value.isprintable() and "\\" not in value:
        return value  # what unicode_escape leaves as it is: most values, on every log line
    return value.encode("unicode_escape").decode("ascii")


def _safe_strings(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if key == "method" and isinstance(value, str) and value not in METHODS:
            event[key] = "other"
        elif isinstance(value, str):
            event[key] = escaped(value, MAX_CLIENT_CHARS if key in CLIENT_KEYS else MAX_CHARS)
    return event


def configure(level: str = "info", worker: int | None = None) -> None:
    """``worker``: the id a supervised worker was given, on each of its lines (``"worker"``),
    so the lines of N processes sharing one stderr can be told apart."""
    stamp = [_worker_stamp(worker)] if worker is not None else []
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            *stamp,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            _safe_strings,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _worker_stamp(worker: int) -> Any:
    def stamp(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("worker", worker)
        return event

    return stamp
