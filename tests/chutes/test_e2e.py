"""teegate against the Chutes-flavoured sandbox, with the unchanged openai SDK: chats are
sealed to a verified instance, the front door relays only ciphertext, answers are opened and
billed from the usage inside them, and nothing leaves when no instance verifies."""

from __future__ import annotations

import base64
import uuid

import openai
import pytest

from tests.support.billing import expected_charge, usage_row
from tests.support.chutes import CHUTES, TEE, door_mark, front_door, mark, until
from tests.support.gateway_proc import start_gateway

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def _marker() -> str:
    return f"MARKER-{uuid.uuid4().hex}"


def _invokes(upstream, since: int) -> list[dict]:
    entries = front_door(upstream, since)["front_door"]
    return [e for e in entries if e.get("direction") == "request"]


def _relayed(upstream, since: int) -> bytes:
    """Every byte the front door relayed since ``since``, both directions."""
    entries = front_door(upstream, since)["front_door"]
    assert entries and not any(e["truncated"] for e in entries)
    return b"".join(base64.b64decode(e["body_b64"]) for e in entries)


def _attested(http) -> dict:
    models = http.get("/v1/models").json()["data"]
    return next(m for m in models if m["id"] == TEE)["attestation"]


def test_the_model_list_names_the_evidence_and_the_verified_instances(http):
    att = until(lambda: _attested(http) if _attested(http)["verified"] else None, "a verdict")
    assert att["evidence"] == "chutes" and att["e2ee"] is True
    usable = [i for i in att["instances"] if i["usable"]]
    assert usable and all(i["quote_sha256"] and i["key_sha256"] for i in usable)
    assert all("e2e_pubkey" not in i for i in att["instances"])
    # Each instance's test GPUs, verified for the digest its quote binds (nonce and key).
    for i in usable:
        assert i["gpu"]["ok"] is True and i["gpu"]["root"] == "test", i["gpu"]
        assert i["gpu"]["gpu_count"] == 1 and i["gpu"]["checks"]["gpu_nonce"] is True
    assert att["gpu"]["ok"] is True and "gpus" not in att["gpu"]


def test_a_chat_is_sealed_to_a_verified_instance_and_the_front_door_reads_nothing(
    gateway, client, sandbox
):
    marker = _marker()
    mark(sandbox, marker)
    since = door_mark(sandbox)

    def quotes() -> dict[str, str]:
        listed = client.models.retrieve(TEE).model_extra["attestation"]["instances"]
        return {i["instance_id"]: i["quote_sha256"] for i in listed}

    # Instances re-attest every 2 s here: the chat ran under the quote listed just before or
    # just after it.
    before = quotes()
    raw = client.chat.completions.with_raw_response.create(
        model=TEE, messages=[{"role": "user", "content": f"Say hello {marker}"}]
    )
    after = quotes()
    chat = raw.parse()
    assert raw.headers["x-teegate-e2ee"] == "true"
    instance = raw.headers["x-teegate-instance-id"]
    assert [e["instance_id"] for e in _invokes(sandbox, since)] == [instance]
    assert raw.headers["x-teegate-quote-sha256"] in {before.get(instance), after[instance]}
    assert chat.model == TEE and chat.choices[0].message.content
    assert front_door(sandbox)["plaintext_seen"] is False
    assert len(_invokes(sandbox, since)) == 1
    assert marker.encode() not in _relayed(sandbox, since)
    assert marker not in gateway.output_text()
    row = usage_row(gateway.db, raw.headers["x-request-id"])
    assert row["source"] == "usage"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    assert row["charge_micro"] == expected_charge(row) > 0


def test_a_stream_is_opened_as_it_arrives_and_billed_from_the_enclave_usage(
    gateway, client, sandbox
):
    marker = _marker()
    mark(sandbox, marker)
    since = door_mark(sandbox)
    with client.chat.completions.with_streaming_response.create(
        model=TEE,
        messages=[{"role": "user", "content": f"Count {marker}"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as resp:
        assert resp.headers["x-teegate-e2ee"] == "true"
        rid = resp.headers["x-request-id"]
        chunks = list(resp.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text and usage is not None and all(c.model == TEE for c in chunks)
    assert front_door(sandbox)["plaintext_seen"] is False
    assert marker.encode() not in _relayed(sandbox, since)
    assert marker not in gateway.output_text()
    row = usage_row(gateway.db, rid)
    assert row["source"] == "usage"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )


@pytest.mark.parametrize("stream", [False, True])
def test_tools_round_trip_through_the_enclave(client, sandbox, stream):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    if not stream:
        chat = client.chat.completions.create(
            model=TEE, messages=messages, tools=TOOLS, tool_choice="required"
        )
        calls = chat.choices[0].message.tool_calls
        assert calls and calls[0].function.name == "get_weather"
    else:
        chunks = list(
            client.chat.completions.create(
                model=TEE, messages=messages, tools=TOOLS, tool_choice="required", stream=True
            )
        )
        names = [
            t.function.name
            for c in chunks
            if c.choices
            for t in c.choices[0].delta.tool_calls or ()
            if t.function and t.function.name
        ]
        assert names == ["get_weather"]
    assert front_door(sandbox)["plaintext_seen"] is False


def test_a_tampered_frame_ends_the_stream_with_an_error_and_is_billed_by_the_rules(
    gateway, client, sandbox, http
):
    sandbox.behaviour(chutes_corrupt_frame=2)
    with client.chat.completions.with_streaming_response.create(
        model=TEE, messages=[{"role": "user", "content": "Say hello"}], stream=True
    ) as resp:
        rid = resp.headers["x-request-id"]
        received = []
        with pytest.raises(openai.APIError) as exc:
            for chunk in resp.parse():
                received.append(chunk)
    assert "did not decrypt" in str(exc.value.message)
    assert len(received) == 2  # frames 0 and 1 opened and were relayed; nothing after
    row = usage_row(gateway.db, rid)
    assert row["source"] == "bytes"  # the usage frame never opened: delivered bytes
    assert row["charge_micro"] == expected_charge(row) > 0
    # Its receipt id went out with the headers: an incomplete receipt says why it stopped.
    r = http.get(f"/v1/receipts/{resp.headers['x-teegate-receipt']}").json()["receipt"]
    assert (r["outcome"], r["incomplete"]["reason"]) == ("incomplete", "e2ee_failed")
    assert r["response_sha256"] is None and r["upstream_signature"]["status"] == "not_applicable"


def test_a_tampered_plain_answer_is_not_relayed(client, sandbox):
    sandbox.behaviour(chutes_corrupt_frame=0)
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model=TEE, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 502
    assert exc.value.body["code"] == "e2ee_failed"


def test_no_verified_instance_refuses_with_nothing_sent(upstream):
    """A gateway whose measurement allow-list no instance matches: every chat is refused 503
    and the front door never sees an invoke."""
    since = door_mark(upstream)
    pinned = 'attestation.mrtd_allowlist = ["' + "00" * 48 + '"]\n'
    with start_gateway(upstream.base_url, extra_toml=CHUTES + pinned) as gw:
        with openai.OpenAI(base_url=gw.api_base, api_key=gw.api_key, max_retries=0) as c:
            with pytest.raises(openai.APIStatusError) as exc:
                c.chat.completions.create(model=TEE, messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "no_attested_instance"
    assert _invokes(upstream, since) == []


def test_an_error_the_model_sealed_reaches_the_client_as_an_error(client, sandbox):
    sandbox.behaviour(chutes_encrypted_error=True)
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model=TEE, messages=msg)
    assert (exc.value.status_code, exc.value.body["code"]) == (502, "upstream_error")
    with pytest.raises(openai.APIError) as exc2:
        list(client.chat.completions.create(model=TEE, messages=msg, stream=True))
    assert "inside the attested instance" in str(exc2.value.message)


@pytest.mark.parametrize(
    ("toml", "e2ee", "evidence"),
    [
        pytest.param("upstream.e2ee = false\n", False, "chutes", id="dcap-without-e2ee"),
        pytest.param('attestation.mode = "flag"\n', False, None, id="flag"),
    ],
)
def test_without_e2ee_chats_go_plain_and_say_so(upstream, toml, e2ee, evidence):
    since = door_mark(upstream)
    mode = "flag" if "flag" in toml else "sandbox"
    with start_gateway(upstream.base_url, extra_toml=CHUTES + toml, attestation=mode) as gw:
        with openai.OpenAI(base_url=gw.api_base, api_key=gw.api_key, max_retries=0) as c:
            raw = c.chat.completions.with_raw_response.create(
                model=TEE, messages=[{"role": "user", "content": "hi"}]
            )
            assert raw.headers["x-teegate-e2ee"] == "false" and raw.parse().choices
            listed = c.models.retrieve(TEE).model_extra["attestation"]
    assert (listed["e2ee"], listed["evidence"]) == (e2ee, evidence)
    assert _invokes(upstream, since) == []  # plain TLS to the API, not the E2EE path


@pytest.mark.parametrize("fresh", [False, True])
def test_the_report_lists_the_instances_and_says_chats_are_sealed(http, fresh):
    until(lambda: _attested(http)["verified"], "a verdict")
    nonce = "ab" * 32
    params = {"model": TEE, **({"nonce": nonce} if fresh else {})}
    report = http.get("/v1/attestation/report", params=params).json()
    assert report["verified"] is True and report["served"] is True
    att = report["attestation"]
    assert att["evidence"] == "chutes" and att["e2ee"] is True
    assert any(i["usable"] for i in att["instances"])
    assert report["verdict"]["evidence_kind"] == "chutes"
    assert (report["nonce"] == nonce) is fresh
    assert all("e2e_pubkey" not in i for i in report["verdict"]["instances"])


def test_a_refused_token_is_a_503_to_retry_and_nothing_is_charged(gateway, client, sandbox):
    sandbox.behaviour(chutes_refuse_tokens=True)
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.with_raw_response.create(
            model=TEE, messages=[{"role": "user", "content": "hi"}]
        )
    assert (exc.value.status_code, exc.value.body["code"]) == (503, "e2ee_instance_unavailable")
    row = usage_row(gateway.db, exc.value.response.headers["x-request-id"])
    assert row["state"] == "released"
    sandbox.behaviour(chutes_refuse_tokens=False)
    assert client.chat.completions.create(model=TEE, messages=[{"role": "user", "content": "hi"}])


REFUSED_BECAUSE = {
    "chutes_unbound_key": "does not bind our nonce and this instance's E2EE key",
    "chutes_no_tee_instance": "upstream lists the instance as failed",
    # The quote still verifies: only the GPUs' signature over an old nonce refuses it.
    "chutes_gpu_stale_nonce": "GPU evidence rejected: GPU 0: the signed SPDM",
}
# The instance each switch hits, by its place in the sandbox's fleet (fixed there, see
# sandbox/chutes/fleet.py): the first for a key or GPU nonce its quote does not bind, the last
# for "no TEE evidence". Instance ids are stable, so the test names the one that must be refused.
SWITCHED = {"chutes_unbound_key": 0, "chutes_no_tee_instance": -1, "chutes_gpu_stale_nonce": 0}


def _fleet(sandbox) -> list[str]:
    """The TEE chute's instance ids as the sandbox created them (in order)."""
    chutes = front_door(sandbox)["chutes"].values()
    return [i["instance_id"] for c in chutes if c["model"] == TEE for i in c["instances"]]


def _verdict_log(gateway) -> str:
    """The gateway's per-instance verdict changes (for a failure message; no client bytes)."""
    lines = gateway.output_text().splitlines()
    return "\n".join(line for line in lines if "chutes_instance_" in line)[-4000:]


@pytest.mark.parametrize("switch", list(REFUSED_BECAUSE))
def test_an_instance_that_does_not_verify_is_never_sent_a_prompt(
    gateway, client, http, sandbox, switch
):
    fleet = _fleet(sandbox)
    target = fleet[SWITCHED[switch]]
    sandbox.behaviour(**{switch: True})
    why = REFUSED_BECAUSE[switch]

    def refused() -> set[str]:
        return {
            i["instance_id"]
            for i in _attested(http)["instances"]
            if not i["usable"] and why in i["reason"]
        }

    # Waits for this switch's refusal of its own instance (a refusal left over from the
    # previous switch, whose instance is usable again at its next re-attestation, is not it).
    assert until(refused, f"{target} refused under {switch}") == {target}
    since = door_mark(sandbox)
    used = []
    for _ in range(6):
        raw = client.chat.completions.with_raw_response.create(
            model=TEE, messages=[{"role": "user", "content": "hi"}]
        )
        used.append(raw.headers["x-teegate-instance-id"])
    invoked = [e["instance_id"] for e in _invokes(sandbox, since)]
    # The refusal held all along (the switch is on), and no prompt reached the instance.
    still = refused()
    assert used and set(used) <= set(fleet) and invoked == used
    assert target not in used and still == {target}, (used, still, _verdict_log(gateway))
