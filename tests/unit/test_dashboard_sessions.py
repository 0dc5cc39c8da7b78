"""Dashboard sessions (teegate/dashboard/sessions.py) and the evidence hashes it shows.

The session table keeps only SHA-256 digests of session ids, ends idle and old sessions,
stays bounded, and compares CSRF tokens in constant time (here: by value, any type).
"""

from __future__ import annotations

import hashlib
import json

from teegate.dashboard import sessions as sessions_module
from teegate.dashboard.sessions import Sessions
from teegate.dashboard.views import evidence_hashes


def test_only_the_hash_of_a_session_id_is_kept():
    table = Sessions(idle_s=60)
    session_id, session = table.create("admin", 7, None, "ops")
    assert table.get(session_id) is session
    kept = list(table._by_digest)
    assert kept == [hashlib.sha256(session_id.encode()).digest()]
    assert session_id not in repr(table._by_digest)


def test_unknown_ended_and_absurd_ids_are_no_session():
    table = Sessions(idle_s=60)
    session_id, _ = table.create("keyholder", 3, 1, None)
    assert table.get(None) is None and table.get("") is None
    assert table.get("x" * 1000) is None and table.get(session_id + "x") is None
    table.end(session_id)
    assert table.get(session_id) is None


def test_idle_and_old_sessions_expire(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(sessions_module.time, "monotonic", lambda: now[0])
    table = Sessions(idle_s=60, max_age_s=150)
    session_id, _ = table.create("admin", 1, None, None)
    now[0] += 59
    assert table.get(session_id) is not None  # used: the idle clock restarts
    now[0] += 59
    assert table.get(session_id) is not None
    now[0] += 59  # 177 s old: past the absolute limit although never idle for 60 s
    assert table.get(session_id) is None
    other, _ = table.create("admin", 1, None, None)
    now[0] += 61
    assert table.get(other) is None


def test_the_table_is_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(sessions_module, "MAX_SESSIONS", 3)
    table = Sessions(idle_s=60)
    ids = [table.create("admin", i, None, None)[0] for i in range(3)]
    assert table.get(ids[0]) is not None  # now the most recently used
    table.create("admin", 9, None, None)
    assert len(table) == 3
    assert table.get(ids[1]) is None and table.get(ids[0]) is not None


def test_csrf_tokens_are_per_session_and_checked_exactly():
    table = Sessions(idle_s=60)
    _, a = table.create("admin", 1, None, None)
    _, b = table.create("admin", 1, None, None)
    assert a.csrf_token != b.csrf_token and len(a.csrf_token) >= 40
    assert a.csrf_ok(a.csrf_token)
    for wrong in (None, "", b.csrf_token, a.csrf_token[:-1], a.csrf_token + "x", "\udcff"):
        assert not a.csrf_ok(wrong)


def test_evidence_hashes_text_as_utf8_and_structures_as_canonical_json():
    evidence = {"intel_quote": "abcd", "event_log": [{"b": 1, "a": 2}]}
    hashes = evidence_hashes(evidence)
    assert hashes["intel_quote"] == hashlib.sha256(b"abcd").hexdigest()
    canonical = json.dumps([{"a": 2, "b": 1}], separators=(",", ":")).encode()
    assert hashes["event_log"] == hashlib.sha256(canonical).hexdigest()
    assert list(hashes) == ["event_log", "intel_quote"]
