"""The dashboard in a real browser: Debian's chromium driven by Playwright, against one real
gateway (the root fixtures: a sandbox upstream and a gateway, one each for the module).

What a newcomer and an attacker would try: signing in (a wrong token is refused), every
operator page rendered with live data (a screenshot of each in ``tests/output/screenshots/``;
with ``TEEGATE_UPDATE_SCREENSHOTS=1`` also copied to ``docs/screenshots/`` for the README), a
top-up and a revocation through the dialogs checked in the ledger and on the API listener, a
state change without the CSRF token refused, and a key holder seeing only their own account.

The browser is the system's (``executable_path``); Playwright never downloads one. Without
chromium the module is skipped with the command to install it, except under CI, where
``scripts/setup-test-deps.sh`` installs it and its absence is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.accounts import balance_micro, create_account, create_key, teegate
from tests.support.clients import sdk
from tests.support.gateway_proc import GatewayProc
from tests.support.testdata import NON_TEE, REPO_ROOT, TEE
from tests.support.wait import until

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = REPO_ROOT / "tests" / "output" / "screenshots"
DOCS_SHOTS = REPO_ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1280, "height": 860}
TIMEOUT_MS = 15_000

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup-test-deps.sh installs it", pytrace=False)
    pytest.skip(
        f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/setup-test-deps.sh does)",
        allow_module_level=True,
    )

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def admin_token(gateway: GatewayProc) -> str:
    code, out, err = teegate("admin", "token", "create", "--label", "ui", "--db", str(gateway.db))
    assert code == 0, err
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("admin token:"))


@pytest.fixture(scope="module")
def acme(gateway: GatewayProc) -> dict:
    """A second account with its own key and a little traffic, besides the fixture's "test"."""
    account_id = create_account(gateway.db, "acme", "40")
    key = create_key(gateway.db, "acme")
    with sdk(gateway, api_key=key) as c:
        c.chat.completions.create(model=TEE, messages=[{"role": "user", "content": "hi"}])
    return {"id": account_id, "key": key}


@pytest.fixture(scope="module")
def traffic(gateway: GatewayProc, acme: dict) -> None:
    """Something for the charts and the refusals page to show."""
    with sdk(gateway) as c:
        for model in (TEE, "Qwen/Qwen3-32B-TEE", TEE):
            c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do
            c.chat.completions.create(model=NON_TEE, messages=[{"role": "user", "content": "x"}])
    wrong = {"authorization": "Bearer not-a-key"}
    assert httpx.get(f"{gateway.api_base}/models", headers=wrong).status_code == 401
    until(lambda: balance_micro(gateway.db, "test") < 100_000_000, "the charges committed")


def ledger_balance(db: Path, account: str) -> int:
    """The account's balance as committed in the ledger database (read-only, no event loop:
    Playwright's sync API owns this thread's loop while the browser runs)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        [(balance,)] = conn.execute("SELECT balance_micro FROM accounts WHERE name = ?", (account,))
    return int(balance)


@pytest.fixture(scope="module")
def browser(admin_token: str, traffic: None) -> Iterator:
    """Started after every operator command the module needs (they run their own loop)."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def dash(gateway: GatewayProc) -> str:
    return gateway.urls["admin"] + "/dashboard/"


def sign_in(browser, dash: str, token: str):
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(dash)
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_selector("#nav a")
    page.js_errors = errors  # type: ignore[attr-defined]
    return page


@pytest.fixture(scope="module")
def ops(browser, dash, admin_token, traffic):
    page = sign_in(browser, dash, admin_token)
    yield page
    page.context.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get("TEEGATE_UPDATE_SCREENSHOTS"):
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_SHOTS / path.name)


def goto(page, name: str) -> None:
    page.click(f"#nav-{name}")
    # expect() rather than wait_for_function: the page's CSP forbids the eval the latter uses.
    sync_api.expect(page.locator(f"#nav-{name}")).to_have_class(re.compile(r"\bactive\b"))


def test_a_wrong_token_is_refused(browser, dash):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(dash)
    shot(page, "sign-in")
    with page.expect_response(lambda r: r.url.endswith("/dashboard/login")) as resp:
        page.fill("#token", "tgadm_not-a-real-token")
        page.click("button[type=submit]")
    assert resp.value.status == 401
    assert "not accepted" in page.inner_text(".error")
    assert context.cookies() == []
    context.close()


def test_operator_pages(ops, gateway):
    goto(ops, "overview")
    # The charts are drawn from the ledger's timeline: traffic shows as a nonzero count.
    cards = ops.locator(".card .value")
    sync_api.expect(cards).to_have_count(6)
    sync_api.expect(cards.first).not_to_have_text("0")
    assert ops.locator("canvas").count() == 3
    shot(ops, "overview")
    # Live: a request served now shows up at the next poll, without a reload.
    shown = cards.first.inner_text()
    with sdk(gateway) as c:
        c.chat.completions.create(model=TEE, messages=[{"role": "user", "content": "live"}])
    sync_api.expect(cards.first).not_to_have_text(shown, timeout=TIMEOUT_MS)

    goto(ops, "accounts")
    ops.wait_for_selector("tr[data-account=acme]")
    shot(ops, "accounts")

    goto(ops, "attestation")
    ops.click(f"a.mono:text-is('{TEE}')")  # the summary table's link opens its details
    ops.wait_for_selector(f"details.model[data-model='{TEE}'][open] >> text=Quote SHA-256")
    text = ops.inner_text("#page")
    for fact in ("Quote SHA-256", "TCB status", "MRTD", "GPU", "Last verified", "SHA-256"):
        assert fact in text
    assert NON_TEE in text  # listed as always refused
    shot(ops, "attestation")

    goto(ops, "refusals")
    ops.wait_for_selector("text=model_not_confidential")
    shot(ops, "refusals")
    assert ops.js_errors == []
    for secret in (gateway.api_key,):
        assert secret not in ops.content()


def test_top_up_and_revoke_through_the_ui(ops, gateway, acme):
    goto(ops, "accounts")
    before = ledger_balance(gateway.db, "acme")
    ops.click("tr[data-account=acme] button.topup")
    ops.fill("#field-amount", "25.00")
    assert ops.inner_text("#dialog-confirm") == "Add $25.00 to acme"
    ops.click("#dialog-confirm")
    ops.wait_for_selector("text=Added $25.00 to acme")
    assert ledger_balance(gateway.db, "acme") == before + 25_000_000

    ops.click("tr[data-account=acme]")
    ops.wait_for_selector("#account-detail h2:text-is('acme')")
    key_id = ops.get_attribute("tr[data-key] >> nth=0", "data-key")
    ops.click(f"tr[data-key='{key_id}'] button.revoke")
    assert "cannot be undone" in ops.inner_text("#dialog")
    ops.click("#dialog-confirm")
    ops.wait_for_selector(f"tr[data-key='{key_id}'] >> text=revoked")
    resp = httpx.get(
        f"{gateway.api_base}/models", headers={"authorization": f"Bearer {acme['key']}"}
    )
    assert resp.status_code == 401


def test_a_new_key_is_shown_once(ops, gateway):
    goto(ops, "accounts")
    ops.click("tr[data-account=acme]")
    ops.wait_for_selector("#account-detail h2:text-is('acme')")
    ops.click("#new-key")
    ops.fill("#field-label", "ui-made")
    ops.click("#dialog-confirm")
    key = ops.inner_text("#new-key-secret").strip()
    ops.click("#dialog-confirm")
    assert httpx.get(
        f"{gateway.api_base}/models", headers={"authorization": f"Bearer {key}"}
    ).status_code == 200
    ops.reload()
    ops.wait_for_selector("tr[data-account=acme]")
    assert key not in ops.content()


def test_the_session_cookie_is_http_only_strict_and_scoped(ops):
    [cookie] = ops.context.cookies()
    assert cookie["name"] == "teegate_dashboard" and cookie["path"] == "/dashboard"
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert not cookie["secure"]  # plain http on loopback; admin.secure_cookie for TLS proxies


def test_a_state_change_without_the_csrf_token_is_refused(ops, gateway, acme):
    before = ledger_balance(gateway.db, "acme")
    url = f"{gateway.urls['admin']}/dashboard/api/accounts/acme/topups"
    body = {"amount_usd": "1.00"}
    for headers in ({}, {"x-csrf-token": "wrong"}):
        resp = ops.request.post(url, data=body, headers=headers)  # the session cookie is sent
        assert resp.status == 403 and resp.json()["error"]["code"] == "csrf_token_invalid"
    csrf = ops.request.get(f"{gateway.urls['admin']}/dashboard/api/session").json()["csrf_token"]
    foreign = {"x-csrf-token": csrf, "origin": "http://evil.example"}
    resp = ops.request.post(url, data=body, headers=foreign)
    assert resp.status == 403 and resp.json()["error"]["code"] == "cross_site_request"
    assert ledger_balance(gateway.db, "acme") == before
    # Without the cookie, nothing at all.
    assert httpx.get(f"{gateway.urls['admin']}/dashboard/api/accounts").status_code == 401


def test_a_key_holder_sees_only_their_own_account(browser, dash, gateway, traffic):
    page = sign_in(browser, dash, gateway.api_key)
    page.wait_for_selector("text=Account test")
    assert [a.inner_text() for a in page.query_selector_all("#nav a")] == ["My account"]
    text = page.inner_text("#page")
    assert "acme" not in text and TEE in text
    shot(page, "key-holder")
    api = gateway.urls["admin"] + "/dashboard/api"
    assert page.request.get(f"{api}/me").json()["account"]["name"] == "test"
    for path in ("/accounts", "/accounts/acme", "/keys", "/usage"):
        resp = page.request.get(api + path)
        assert resp.status == 403 and resp.json()["error"]["code"] == "admin_only"
    csrf = page.request.get(f"{api}/session").json()["csrf_token"]
    resp = page.request.post(
        f"{api}/accounts/test/topups", data={"amount_usd": "5"}, headers={"x-csrf-token": csrf}
    )
    assert resp.status == 403
    page.click("#signout")
    page.wait_for_selector("#token")
    assert page.request.get(f"{api}/me").status == 401
    page.context.close()


def test_revoking_a_key_ends_its_dashboard_sessions(browser, dash, ops, gateway):
    api = gateway.urls["admin"] + "/dashboard/api"
    csrf = {"x-csrf-token": ops.request.get(f"{api}/session").json()["csrf_token"]}
    made = ops.request.post(f"{api}/accounts/acme/keys", data={"label": "short"}, headers=csrf)
    assert made.status == 201
    holder = sign_in(browser, dash, made.json()["api_key"])
    assert holder.request.get(f"{api}/session").json()["role"] == "keyholder"
    revoked = ops.request.post(f"{api}/keys/{made.json()['key_id']}/revoke", headers=csrf)
    assert revoked.status == 200
    resp = holder.request.get(f"{api}/me")
    assert resp.status == 401 and resp.json()["error"]["code"] == "not_signed_in"
    holder.context.close()
