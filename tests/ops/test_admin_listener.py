"""The admin listener of a real gateway: metrics after real traffic, health checks, the admin
API (auth, idempotent top-ups, keys), and ``GET /v1/account`` on the API listener.

One sandbox and one gateway for the module (the root fixtures; the test config puts the admin
listener on a free loopback port); the admin token is made with the operator command line
against the running gateway's ledger, as an operator would.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.accounts import balance_micro, create_account, create_key, teegate
from tests.support.billing import usage_row
from tests.support.clients import sdk
from tests.support.gateway_proc import GatewayProc, GatewayStartError, start_gateway
from tests.support.testdata import TEE
from tests.support.wait import until

SECRET_MODEL = "my-secret-prompt-as-model-name"
SECRET_PROMPT = "the launch code is 7731-ALPHA"


@pytest.fixture(scope="module")
def admin_token(gateway: GatewayProc) -> str:
    db = str(gateway.db)
    code, out, err = teegate("admin", "token", "create", "--label", "tests", "--db", db)
    assert code == 0, err
    assert "only time" in err
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("admin token:"))


@pytest.fixture(scope="module")
def admin(gateway: GatewayProc, admin_token: str) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=gateway.urls["admin"], headers=headers, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def anon(gateway: GatewayProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.urls["admin"], timeout=30) as c:
        yield c


def scrape(anon: httpx.Client) -> tuple[dict[tuple[str, frozenset], float], str]:
    """Every sample as ``{(name, labels): value}``, and the raw text."""
    resp = anon.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, resp.text


def total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_metrics_move_with_real_traffic_and_carry_no_client_text(gateway, client, anon):
    before, _ = scrape(anon)
    stream = client.chat.completions.create(
        model=TEE, messages=[{"role": "user", "content": SECRET_PROMPT}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=SECRET_MODEL, messages=[{"role": "user", "content": SECRET_PROMPT}]
        )
    forwarded = dict(route="/v1/chat/completions", model=TEE, decision="forwarded", status="200")
    # The charge is settled just after the response: wait for it rather than race it.
    after, text = until(
        lambda: (s := scrape(anon))
        and total(s[0], "teegate_charged_micro_usd_total", model=TEE)
        > total(before, "teegate_charged_micro_usd_total", model=TEE)
        and s,
        "the charge in the metrics",
    )
    assert total(after, "teegate_requests_total", **forwarded) == (
        total(before, "teegate_requests_total", **forwarded) + 1
    )
    refused = dict(model="other", decision="refused", code="model_not_confidential")
    assert total(after, "teegate_requests_total", **refused) == (
        total(before, "teegate_requests_total", **refused) + 1
    )
    for name in (
        "teegate_upstream_latency_seconds_count",
        "teegate_time_to_first_token_seconds_count",
    ):
        assert total(after, name, model=TEE) == total(before, name, model=TEE) + 1
    assert total(after, "teegate_tokens_total", model=TEE, direction="out") > total(
        before, "teegate_tokens_total", model=TEE, direction="out"
    )
    assert total(after, "teegate_ledger_commit_seconds_count") >= 1
    assert after[("teegate_attestation_verified", frozenset({("model", TEE)}))] == 1
    assert 0 <= after[("teegate_attestation_age_seconds", frozenset({("model", TEE)}))] < 3600
    assert after[("teegate_catalog_fresh", frozenset())] == 1
    assert 0 <= after[("teegate_catalog_age_seconds", frozenset())] < 60
    assert after[("teegate_reservations_open", frozenset())] == 0
    for secret in (SECRET_MODEL, SECRET_PROMPT, gateway.api_key, "Bearer"):
        assert secret not in text


def test_egress_decisions_are_counted_by_host_class(gateway, upstream, anon):
    labels = dict(host_class="confidential", unit="request")
    before, _ = scrape(anon)
    headers = {"authorization": f"Bearer {gateway.api_key}"}
    with httpx.Client(proxy=gateway.urls["egress"], trust_env=False, timeout=30) as via:
        assert via.get(f"{upstream.base_url}/v1/models", headers=headers).status_code == 200
    after, text = scrape(anon)
    assert total(after, "teegate_egress_decisions_total", **labels) == (
        total(before, "teegate_egress_decisions_total", **labels) + 1
    )
    assert "127.0.0.1" not in text  # no host a client named


def test_health_checks(anon):
    assert anon.get("/healthz").json() == {"status": "ok"}
    resp = until(lambda: (r := anon.get("/readyz")).status_code == 200 and r, "ready")
    body = resp.json()
    assert body["status"] == "ready"
    assert {k: v["ok"] for k, v in body["checks"].items()} == {
        "catalog": True,
        "attestation": True,
        "ledger": True,
    }
    assert body["checks"]["attestation"]["verified_models"] >= 1


@pytest.mark.parametrize("auth", [None, "Bearer tgadm_wrong", "Bearer {api_key}", "Basic x"])
def test_the_admin_api_needs_an_admin_token(gateway, anon, auth):
    headers = {"authorization": auth.format(api_key=gateway.api_key)} if auth else {}
    resp = anon.get("/admin/v1/accounts", headers=headers)
    assert resp.status_code == 401
    err = resp.json()["error"]
    assert err["code"] == "invalid_admin_token" and err["type"] == "invalid_request_error"
    assert gateway.api_key not in resp.text


def test_unknown_admin_paths_answer_in_the_envelope(admin):
    resp = admin.get("/admin/v1/nothing")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = admin.delete("/admin/v1/accounts")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def test_a_retried_topup_credits_once(gateway, admin):
    name = f"idem-{uuid.uuid4().hex[:8]}"
    created = admin.post("/admin/v1/accounts", json={"name": name, "topup_usd": "1.00"})
    assert created.status_code == 201, created.text
    assert created.json()["balance_micro"] == 1_000_000
    path = f"/admin/v1/accounts/{name}/topups"
    headers = {"idempotency-key": f"topup-{uuid.uuid4()}"}
    first = admin.post(path, json={"amount_usd": "2.50"}, headers=headers)
    again = admin.post(path, json={"amount_usd": "2.50"}, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["replayed"] is False and again.json()["replayed"] is True
    assert again.json()["entry_id"] == first.json()["entry_id"]
    assert balance_micro(gateway.db, name) == 3_500_000  # the ledger, read by the CLI
    other = admin.post(path, json={"amount_usd": "9.00"}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    floaty = admin.post(path, json={"amount_usd": 2.5})
    assert floaty.status_code == 400 and floaty.json()["error"]["param"] == "amount_usd"
    assert balance_micro(gateway.db, name) == 3_500_000
    shown = admin.get(f"/admin/v1/accounts/{name}").json()
    assert shown["balance_micro"] == 3_500_000 and shown["keys"] == []


def test_created_key_works_and_a_revoked_one_is_refused_at_once(gateway, admin):
    name = f"keys-{uuid.uuid4().hex[:8]}"
    assert admin.post("/admin/v1/accounts", json={"name": name, "topup_usd": "5"}).is_success
    made = admin.post(f"/admin/v1/accounts/{name}/keys", json={"label": "ci"})
    assert made.status_code == 201
    key, key_id = made.json()["api_key"], made.json()["key_id"]
    listed = admin.get("/admin/v1/keys", params={"account": name}).json()["data"]
    assert [k["key_id"] for k in listed] == [key_id]
    assert key not in admin.get("/admin/v1/keys").text  # shown once, never listed
    with sdk(gateway, api_key=key) as c:
        assert c.models.list().data
        revoked = admin.post(f"/admin/v1/keys/{key_id}/revoke")
        assert revoked.status_code == 200 and revoked.json()["was_active"] is True
        assert revoked.json()["revoked"] is not None
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_a_rate_limit_set_through_the_api_applies_and_is_listed_as_a_refusal(
    gateway, admin, anon
):
    name = f"rl-{uuid.uuid4().hex[:8]}"
    assert admin.post("/admin/v1/accounts", json={"name": name}).is_success
    made = admin.post(f"/admin/v1/accounts/{name}/keys", json={}).json()
    before, _ = scrape(anon)
    patched = admin.patch(f"/admin/v1/keys/{made['key_id']}", json={"rate_limit": 1})
    assert patched.status_code == 200 and patched.json()["rate_limit"] == 1
    with sdk(gateway, api_key=made["api_key"]) as c:
        c.models.list()
        with pytest.raises(openai.RateLimitError):
            c.models.list()
    after, _ = scrape(anon)
    assert total(after, "teegate_ratelimit_refusals_total") == (
        total(before, "teegate_ratelimit_refusals_total") + 1
    )
    [newest, *_] = admin.get("/admin/v1/refusals", params={"limit": 5}).json()["data"]
    assert newest["code"] == "rate_limit_exceeded" and newest["status"] == 429
    assert set(newest) == {"at", "time", "code", "status", "route", "model"}
    assert made["api_key"] not in admin.get("/admin/v1/refusals").text


def test_usage_and_attestation_views(gateway, client, admin):
    client.chat.completions.create(model=TEE, messages=[{"role": "user", "content": "hi"}])
    usage = until(
        lambda: admin.get("/admin/v1/usage", params={"account": "test"}).json()["data"], "usage"
    )
    assert {g["account_name"] for g in usage} == {"test"}
    assert {"day", "key_id", "model", "requests", "charge_micro", "charge_usd"} <= set(usage[0])
    timeline = admin.get("/admin/v1/usage/timeline", params={"minutes": 5, "bucket_s": 10})
    points = [p for p in timeline.json()["data"] if p["model"] == TEE]
    assert points and all(p["start_ms"] % 10_000 == 0 for p in points)
    assert sum(p["requests"] for p in points) >= 1 and sum(p["charge_micro"] for p in points) > 0
    assert admin.get("/admin/v1/usage/timeline", params={"bucket_s": 1}).status_code == 400
    verdicts = admin.get("/admin/v1/attestation").json()
    tee = next(v for v in verdicts["data"] if v["model"] == TEE)
    assert tee["served"] is True and tee["attestation"]["verified"] is True
    report = admin.get("/admin/v1/attestation/report", params={"model": TEE}).json()
    assert report["model"] == TEE and report["verified"] is True and report["evidence"]


def test_v1_account_shows_only_the_callers_account(gateway, client):
    db = gateway.db
    other = f"other-{uuid.uuid4().hex[:8]}"
    create_account(db, other, "7")
    other_key = create_key(db, other)
    raw = client.chat.completions.with_raw_response.create(
        model=TEE, messages=[{"role": "user", "content": "hi"}]
    )
    # Settlement is written after the answer is relayed: wait for it, then compare.
    assert usage_row(db, raw.headers["x-request-id"])["state"] == "settled"
    with httpx.Client(base_url=gateway.api_base, timeout=30) as h:
        mine = h.get("/account", headers={"authorization": f"Bearer {gateway.api_key}"})
        theirs = h.get("/account", headers={"authorization": f"Bearer {other_key}"})
        anonymous = h.get("/account")
    assert mine.status_code == theirs.status_code == 200
    assert anonymous.status_code == 401
    m, t = mine.json(), theirs.json()
    assert m["account"]["name"] == "test" and t["account"]["name"] == other
    assert t["balance_micro"] == 7_000_000 and t["usage"] == []
    assert m["balance_micro"] == balance_micro(db, "test")
    assert any(u["model"] == TEE and u["requests"] >= 1 for u in m["usage"])
    assert {"count", "held_micro", "held_usd"} == set(m["open_holds"])
    assert other not in mine.text and "test" not in {t["account"]["name"]}


def test_a_network_reachable_admin_listener_needs_a_token_to_start(upstream, gateway):
    # The module gateway's CA directory: loaded, not generated again (seconds of RSA).
    extra = f'admin.listen = "0.0.0.0:0"\negress.confdir = "{gateway.workdir / "ca"}"'
    with pytest.raises(GatewayStartError) as e:
        start_gateway(upstream.base_url, extra_toml=extra)
    assert "reachable from the network, and no admin token exists" in str(e.value)
