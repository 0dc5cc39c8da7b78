"""The operator operations the admin API and the command line share: idempotent top-ups,
per-key rate limits, admin tokens, and the gateway's :class:`Ledger` applying them at once."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest

from teegate.cli import main
from teegate.ledger import IdempotencyConflict, InvalidInput, Ledger, Prices, Store
from teegate.ledger.admintokens import AdminTokens
from teegate.ledger.keys import hash_key
from tests.support.ledgerdb import one, rows

PRICES = Prices(1_000_000, 2_000_000)


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


async def test_a_topup_with_an_idempotency_key_credits_once(db_path: str):
    async with await Store.open(db_path) as store:
        acct = await store.create_account("acme")
        first = await store.topup(acct.id, 5_000, "wire", idempotency_key="k-1")
        again = await store.topup(acct.id, 5_000, "wire", idempotency_key="k-1")
        assert (first.replayed, again.replayed) == (False, True)
        assert again.entry_id == first.entry_id and again.balance_micro == 5_000
        with pytest.raises(IdempotencyConflict):
            await store.topup(acct.id, 6_000, idempotency_key="k-1")
        with pytest.raises(InvalidInput):
            await store.topup(acct.id, 1, idempotency_key="")
        assert (await store.topup(acct.id, 5_000)).balance_micro == 10_000  # no key: credits
        assert (await store.verify()).ok


async def test_the_gateway_ledger_spends_a_topup_at_once(ledger: Ledger):
    acct = await ledger.create_account("acme")
    key, _ = await ledger.create_key(acct.id)
    credit = await ledger.topup("acme", 3_000_000, idempotency_key="t")
    assert credit.balance_micro == 3_000_000
    assert ledger.available_micro(acct.id) == 3_000_000  # no refresh interval to wait for
    res = await ledger.reserve("req_1", key, "m", PRICES, 2_000_000)
    assert ledger.open_count == 1
    assert [r.reservation_id for r in await ledger.open_reservations(acct.id)] == [res.id]
    await ledger.topup("acme", 3_000_000, idempotency_key="t")  # replayed: nothing more
    assert ledger.available_micro(acct.id) == 1_000_000
    await ledger.release(res, "test")
    await ledger.flush()
    assert ledger.open_count == 0
    assert await ledger.writable()


async def test_the_usage_timeline_buckets_requests_by_model(ledger: Ledger):
    acct = await ledger.create_account("acme", topup_micro=10_000_000)
    key, _ = await ledger.create_key(acct.id)
    for i, model in enumerate(("m1", "m1", "m2")):
        res = await ledger.reserve(f"req_{i}", key, model, PRICES, 1_000_000)
        if model == "m1":
            await ledger.settle(res, 100, 10, 0, "usage")
    await ledger.flush()
    buckets = await ledger.usage_timeline(since_ms=0, bucket_ms=3_600_000)
    by_model = {b.model: b for b in buckets}
    assert (by_model["m1"].requests, by_model["m1"].prompt_tokens) == (2, 200)
    assert by_model["m1"].completion_tokens == 20 and by_model["m1"].charge_micro == 2 * 120
    assert (by_model["m2"].requests, by_model["m2"].charge_micro) == (1, 0)  # still open
    assert all(b.start_ms % 3_600_000 == 0 and type(b.charge_micro) is int for b in buckets)
    assert await ledger.usage_timeline(since_ms=2**50, bucket_ms=60_000) == []


async def test_a_new_rate_limit_applies_to_the_next_authentication(ledger: Ledger):
    acct = await ledger.create_account("acme")
    key, plaintext = await ledger.create_key(acct.id, rate_limit=10)
    assert (await ledger.authenticate(plaintext)).rate_limit == 10  # now cached
    info = await ledger.set_rate_limit(key.key_id, 2)
    assert info.rate_limit == 2
    assert (await ledger.authenticate(plaintext)).rate_limit == 2
    assert (await ledger.set_rate_limit(key.key_id, None)).rate_limit is None


async def test_admin_tokens_are_stored_hashed_and_revocable(db_path: str):
    async with await Store.open(db_path) as store:
        tokens = AdminTokens(store)
        assert not await tokens.any_active()
        token, plaintext = await tokens.create("ops")
        assert plaintext.startswith("tgadm_") and await tokens.any_active()
        assert (await tokens.authenticate(plaintext)).token_id == token.token_id
        for wrong in ("", "tgadm_x", plaintext + "x", "vgpu_sk_" + plaintext[6:]):
            assert await tokens.authenticate(wrong) is None
        assert await tokens.revoke(token.token_id) is True
        assert await tokens.authenticate(plaintext) is None
    for table in ("admin_tokens", "accounts", "api_keys", "entries"):  # every row, as text
        assert plaintext not in repr(rows(db_path, f"SELECT * FROM {table}"))
    (stored,) = one(db_path, "SELECT token_hash FROM admin_tokens")
    assert bytes(stored) == hash_key(plaintext)


def test_the_cli_makes_tokens_and_idempotent_topups(db_path: str):
    assert cli("accounts", "create", "acme", "--db", db_path)[0] == 0
    code, out, err = cli("admin", "token", "create", "--label", "ops", "--db", db_path)
    assert code == 0 and "only time" in err
    plaintext = out.split("admin token:")[1].split()[0]
    code, out, _ = cli("admin", "token", "list", "--db", db_path)
    assert code == 0 and "ops" in out and plaintext not in out
    args = ("accounts", "topup", "acme", "2.50", "--idempotency-key", "x1", "--db", db_path)
    assert "balance 2.50 USD" in cli(*args)[1]
    code, out, _ = cli(*args)
    assert code == 0 and "nothing credited" in out and "balance 2.50 USD" in out
    code, _, err = cli("accounts", "topup", "acme", "3", "--idempotency-key", "x1", "--db", db_path)
    assert code == 2 and "already used" in err
    assert cli("admin", "token", "revoke", "1", "--db", db_path)[0] == 0
    assert cli("keys", "create", "acme", "--db", db_path)[0] == 0
    code, out, _ = cli("keys", "limit", "1", "30", "--db", db_path)
    assert code == 0 and "30 requests/minute" in out
    assert "default" in cli("keys", "limit", "1", "default", "--db", db_path)[1]
    assert cli("keys", "limit", "1", "fast", "--db", db_path)[0] == 2
