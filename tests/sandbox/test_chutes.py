"""The sandbox's Chutes flavour: discovery, evidence, ``/e2e/invoke`` and its switches."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Iterator

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization

from teegate.sandbox.behaviour import Behaviour
from teegate.sandbox.chutes.fleet import Fleet, RateLimited, chute_id_for
from teegate.sandbox.chutes.frontdoor import FrontDoor
from tests.sandbox.chutes_client import MODEL, USER, ChutesClient, b64len
from tests.support.sandbox_proc import SandboxProc, start_sandbox


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProc]:
    with start_sandbox("--upstream", "chutes", "--chunks", "4") as proc:
        yield proc


@pytest.fixture
def client(sandbox: SandboxProc) -> Iterator[ChutesClient]:
    c = ChutesClient(sandbox)
    yield c
    c.close()


def _root(client: ChutesClient) -> bytes:
    return client.http.get("/_sandbox/evidence/root_ca.der").content


def _spki_digest(cert_der: bytes) -> bytes:
    spki = (
        x509.load_der_x509_certificate(cert_der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return hashlib.sha256(spki).digest()


def _report_data(item: dict) -> bytes:
    collateral = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(item["collateral"]))
    return bytes(
        dcap_qvl.parse_quote(base64.b64decode(item["quote"])).report.report_data
    ), collateral


def test_catalog_rows_carry_stable_chute_ids(client: ChutesClient) -> None:
    rows = client.http.get("/v1/models").json()["data"]
    assert all(r["chute_id"] == chute_id_for(r["id"]) for r in rows)
    assert uuid.UUID(client.chute_id()).version == 5


def test_discovery_lists_instances_keys_and_single_use_tokens(client: ChutesClient) -> None:
    assert (
        client.http.get(
            f"/e2e/instances/{client.chute_id()}", headers={"Authorization": "Bearer nope"}
        ).status_code
        == 401
    )
    assert client.http.get(f"/e2e/instances/{uuid.uuid4()}").status_code == 404
    found = client.discover()
    assert found["nonce_expires_in"] == 60
    assert sorted(i["instance_id"] for i in found["instances"]) == sorted(client.instance_ids())
    for inst in found["instances"]:
        assert b64len(inst["e2e_pubkey"]) == 1184
        assert len(set(inst["nonces"])) == 10


def test_evidence_binds_nonce_key_and_certificate(client: ChutesClient) -> None:
    nonce = secrets.token_hex(32)
    keys = {i: t.pubkey for i, t in client.tickets().items()}
    body = client.evidence(nonce).json()
    assert body["failed_instance_ids"] == []
    assert sorted(e["instance_id"] for e in body["evidence"]) == sorted(keys)
    root = _root(client)
    for item in body["evidence"]:
        cert = base64.b64decode(item["certificate"])
        quote = base64.b64decode(item["quote"])
        report_data, collateral = _report_data(item)
        dcap_qvl.verify_with_root_ca(quote, collateral, root, int(time.time()))
        key = keys[item["instance_id"]]
        assert report_data[:32] == hashlib.sha256((nonce + key).encode()).digest()
        assert report_data[32:] == _spki_digest(cert)
        assert isinstance(item["gpu_evidence"], list)


def test_evidence_refuses_bad_nonce_unknown_chute_and_non_tee(client: ChutesClient) -> None:
    assert client.evidence("abc").status_code == 400
    assert (
        client.http.get(f"/chutes/{uuid.uuid4()}/evidence", params={"nonce": "0" * 64}).status_code
        == 404
    )
    rows = client.http.get("/v1/models").json()["data"]
    plain = next(r["id"] for r in rows if not r["confidential_compute"])
    assert client.evidence("0" * 64, model=plain).status_code == 400


def test_plain_chat_is_encrypted_end_to_end(client: ChutesClient, sandbox: SandboxProc) -> None:
    marker = "MARKER-" + secrets.token_hex(8)
    client.http.post("/_sandbox/chutes/marker", json={"marker": marker}).raise_for_status()
    ticket = next(iter(client.tickets().values()))
    messages = [{"role": "user", "content": f"{marker} hello"}]
    response, key = client.invoke(ticket, {"model": MODEL, "messages": messages})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    answer = client.open_plain(response, key)
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["completion_tokens"] == 4
    stats = sandbox.stats()
    assert stats["plaintext_seen"] is False
    assert [e["direction"] for e in stats["front_door"]] == ["request", "response"]
    seen = stats["chat"][-1]
    assert seen["e2ee"] is True and seen["instance_id"] == ticket.instance_id
    assert seen["body"] == {"model": MODEL, "messages": messages}
    # The token was single use.
    again, _ = client.invoke(ticket, {"model": MODEL, "messages": USER})
    assert again.status_code == 403


def test_stream_frames_carry_the_upstream_events(client: ChutesClient) -> None:
    ticket = next(iter(client.tickets().values()))
    response, key = client.invoke(ticket, {"model": MODEL, "messages": USER, "stream": True})
    assert response.status_code == 200
    events = client.events(response)
    assert "e2e_init" in events[0]
    assert "[DONE]" not in events  # the end is inside the encryption
    plain_usage = [e for e in events if isinstance(e, dict) and "usage" in e]
    opened = client.open_stream(events, key)
    assert opened[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(p[6:]) for p in opened[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    # include_usage was forced inside the enclave; the relay's copy precedes it.
    assert chunks[-1]["usage"] == plain_usage[0]["usage"]
    assert events.index(plain_usage[0]) == len(events) - 3  # then usage frame, [DONE] frame


def test_token_rules(client: ChutesClient, sandbox: SandboxProc) -> None:
    tickets = list(client.tickets().values())
    first, second = tickets[0], tickets[1]
    crossed = type(first)(first.chute_id, second.instance_id, second.pubkey, first.token)
    response, _ = client.invoke(crossed, {"model": MODEL, "messages": USER})
    assert response.status_code == 403
    assert response.json() == {"detail": "Invalid, expired, or already-used nonce"}
    sandbox.behaviour(chutes_refuse_tokens=True)
    response, _ = client.invoke(tickets[2], {"model": MODEL, "messages": USER})
    assert response.status_code == 403
    sandbox.behaviour(chutes_refuse_tokens=False, chutes_exhaust_tokens=True)
    assert client.http.get(f"/e2e/instances/{client.chute_id()}").status_code == 429


def test_wrong_key_path_and_stream_flag_are_refused(client: ChutesClient) -> None:
    tickets = list(client.tickets().values())
    other_key = tickets[1].pubkey
    response, _ = client.invoke(tickets[0], {"model": MODEL, "messages": USER}, pubkey=other_key)
    assert response.status_code == 400
    response, _ = client.invoke(tickets[1], {"model": "other/model-TEE", "messages": USER})
    assert response.status_code == 404


def test_unbound_key_and_missing_tee_evidence(client: ChutesClient, sandbox: SandboxProc) -> None:
    sandbox.behaviour(chutes_unbound_key=True, chutes_no_tee_instance=True)
    ids = client.instance_ids()
    keys = {i: t.pubkey for i, t in client.tickets().items()}
    assert sorted(keys) == sorted(ids)  # discovery still lists every instance
    nonce = secrets.token_hex(32)
    body = client.evidence(nonce).json()
    assert body["failed_instance_ids"] == [ids[-1]]
    by_id = {e["instance_id"]: e for e in body["evidence"]}
    assert sorted(by_id) == sorted(ids[:-1])
    for iid, item in by_id.items():
        bound = _report_data(item)[0][:32] == hashlib.sha256((nonce + keys[iid]).encode()).digest()
        assert bound is (iid != ids[0])


def test_rotated_key(client: ChutesClient, sandbox: SandboxProc) -> None:
    first = client.instance_ids()[0]
    old = client.tickets()[first]
    sandbox.behaviour(chutes_rotate_key=True)
    response, _ = client.invoke(old, {"model": MODEL, "messages": USER})
    assert response.status_code == 400  # sealed to the key the instance no longer has
    new = client.tickets()[first]
    assert new.pubkey != old.pubkey
    nonce = secrets.token_hex(32)
    item = next(e for e in client.evidence(nonce).json()["evidence"] if e["instance_id"] == first)
    assert _report_data(item)[0][:32] == hashlib.sha256((nonce + new.pubkey).encode()).digest()
    response, key = client.invoke(new, {"model": MODEL, "messages": USER})
    assert client.open_plain(response, key)["object"] == "chat.completion"


@pytest.mark.parametrize("switch", ["chutes_drop_frame", "chutes_replay_frame"])
def test_dropped_or_replayed_frame(client: ChutesClient, sandbox: SandboxProc, switch: str) -> None:
    sandbox.behaviour(**{switch: 1})
    ticket = next(iter(client.tickets().values()))
    response, key = client.invoke(ticket, {"model": MODEL, "messages": USER, "stream": True})
    opened = client.open_stream(client.events(response), key)
    # 1 role chunk + 4 pieces + usage chunk + [DONE] = 7 frames; one less or one more.
    assert len(opened) == (6 if switch == "chutes_drop_frame" else 8)
    if switch == "chutes_replay_frame":
        assert opened[1] == opened[2]


def test_corrupted_frame_does_not_open(client: ChutesClient, sandbox: SandboxProc) -> None:
    sandbox.behaviour(chutes_corrupt_frame=2)
    tickets = list(client.tickets().values())
    response, key = client.invoke(tickets[0], {"model": MODEL, "messages": USER, "stream": True})
    with pytest.raises(InvalidTag):
        client.open_stream(client.events(response), key)
    response, key = client.invoke(tickets[1], {"model": MODEL, "messages": USER})
    with pytest.raises(InvalidTag):
        client.open_plain(response, key)


def test_encrypted_error(client: ChutesClient, sandbox: SandboxProc) -> None:
    sandbox.behaviour(chutes_encrypted_error=True)
    tickets = list(client.tickets().values())
    response, key = client.invoke(tickets[0], {"model": MODEL, "messages": USER})
    assert client.open_plain(response, key)["error"]["code"] == "sandbox_model_error"
    response, key = client.invoke(tickets[1], {"model": MODEL, "messages": USER, "stream": True})
    events = client.events(response)
    assert [next(iter(e)) for e in events if isinstance(e, dict)] == ["e2e_init", "e2e_error"]
    from chutes_e2ee.crypto import decrypt_stream_chunk, decrypt_stream_init

    stream_key = decrypt_stream_init(key, events[0]["e2e_init"])  # type: ignore[index]
    error = json.loads(decrypt_stream_chunk(events[1]["e2e_error"], stream_key))  # type: ignore[index]
    assert error["code"] == "sandbox_model_error"
    assert sandbox.stats()["plaintext_seen"] is False


def test_switches_are_strict() -> None:
    with pytest.raises(ValueError):
        Behaviour().merged({"chutes_drop_frames": 1})


def test_front_door_verdict() -> None:
    door = FrontDoor()
    door.relay(door.open("response"), b'data: {"usage": {"prompt_tokens": 1}}\n\n')
    assert door.plaintext_seen is False
    door.relay(door.open("response"), b'data: {"choices": []}\n\n')
    assert door.plaintext_seen is True
    door.reset()
    door.add_marker("SECRET")
    door.relay(door.open("request"), b"\x00\x01SECRET\x02")
    assert door.plaintext_seen is True


def test_discovery_rate_limit() -> None:
    now = [0.0]
    fleet = Fleet([MODEL], 2, discovery_per_minute=2, clock=lambda: now[0])
    chute = chute_id_for(MODEL)
    fleet.discover(chute, Behaviour())
    fleet.discover(chute, Behaviour())
    with pytest.raises(RateLimited):
        fleet.discover(chute, Behaviour())
    now[0] = 61.0
    token = fleet.discover(chute, Behaviour())["instances"][0]
    assert fleet.discovery_calls == 4
    # Tokens expire (kept 75 s, as the real API's Redis hash).
    now[0] = 61.0 + 76
    assert not fleet.consume(token["nonces"][0], chute, token["instance_id"])
