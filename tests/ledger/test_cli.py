"""The operator commands, run in-process through ``teegate.cli.main``."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from pathlib import Path

import pytest

from teegate.cli import main
from teegate.ledger import Ledger, Prices, is_postgres
from teegate.ledger.migrate import TABLES
from teegate.ledger.receipts import StoredReceipt
from tests.support import ledgerdb

PRICES = Prices(1_000_000, 2_000_000)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(db: str) -> tuple[object, ...]:
    """Everything a command could have written."""
    version = (
        ledgerdb.rows(db, "SELECT version FROM teegate_schema")
        if is_postgres(db)
        else ledgerdb.rows(db, "PRAGMA user_version")
    )
    return (
        version,
        ledgerdb.rows(db, "SELECT * FROM accounts ORDER BY id"),
        ledgerdb.rows(db, "SELECT * FROM api_keys ORDER BY id"),
        ledgerdb.rows(db, "SELECT * FROM entries ORDER BY id"),
        ledgerdb.rows(db, "SELECT * FROM usage ORDER BY reservation_id"),
    )


@pytest.fixture
def db(db_path: str, capsys: pytest.CaptureFixture[str]) -> str:
    path = db_path
    assert run(capsys, "accounts", "create", "alice", "--topup", "12.50", "--db", path)[0] == 0
    assert run(capsys, "accounts", "create", "bob", "--db", path)[0] == 0
    return path


async def arun(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """From inside an event loop: the command runs its own loop, so give it a thread."""
    return await asyncio.to_thread(run, capsys, *argv)


async def _acreate_key(capsys: pytest.CaptureFixture[str], db: str, *extra: str) -> tuple[int, str]:
    return await asyncio.to_thread(_create_key, capsys, db, *extra)


def _create_key(capsys: pytest.CaptureFixture[str], db: str, *extra: str) -> tuple[int, str]:
    code, out, err = run(capsys, "keys", "create", "alice", "--db", db, *extra)
    assert code == 0, err
    key_id = int(re.search(r"key id:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    plaintext = re.search(r"api key:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    return key_id, plaintext


def test_accounts(capsys: pytest.CaptureFixture[str], db: str) -> None:
    code, out, _ = run(capsys, "accounts", "list", "--db", db)
    assert code == 0
    assert re.search(r"1\s+alice\s+12\.50", out) and re.search(r"2\s+bob\s+0\.00", out)
    code, out, _ = run(capsys, "accounts", "topup", "bob", "0.000001", "--db", db)
    assert code == 0 and "balance 0.000001 USD" in out
    code, out, _ = run(capsys, "accounts", "topup", "1", "7.5", "--note", "invoice 42", "--db", db)
    assert code == 0 and "balance 20.00 USD" in out
    code, out, _ = run(capsys, "accounts", "show", "alice", "--json", "--db", db)
    shown = json.loads(out)
    assert (shown["id"], shown["balance_micro"], shown["keys"]) == (1, 20_000_000, [])
    last = ledgerdb.one(
        db, "SELECT account_id, kind, amount_micro, note FROM entries ORDER BY id DESC LIMIT 1"
    )
    assert last == (1, "topup", 7_500_000, "invoice 42")


def test_keys_create_list_revoke(capsys: pytest.CaptureFixture[str], db: str) -> None:
    key_id, plaintext = _create_key(capsys, db, "--label", "ci", "--rate-limit", "30")
    assert plaintext.startswith("vgpu_sk_")
    code, out, err = run(capsys, "keys", "list", "--db", db)
    assert code == 0 and plaintext not in out + err  # shown once, never again
    assert re.search(rf"{key_id}\s+1 \(alice\)\s+ci\s+30\s+\S+ \S+\s+active", out)
    code, out, _ = run(capsys, "keys", "list", "bob", "--json", "--db", db)
    assert json.loads(out) == []
    code, out, _ = run(capsys, "keys", "revoke", str(key_id), "--db", db)
    assert code == 0 and "revoked" in out
    code, out, _ = run(capsys, "keys", "revoke", str(key_id), "--db", db)
    assert code == 0 and "already revoked" in out
    code, out, _ = run(capsys, "keys", "list", "alice", "--json", "--db", db)
    assert json.loads(out)[0]["revoked"] is not None


async def test_keys_from_the_cli_authenticate_in_the_ledger(
    capsys: pytest.CaptureFixture[str], db: str
) -> None:
    _, plaintext = await _acreate_key(capsys, db, "--key-prefix", "tg_")
    led = await Ledger.open(db, key_prefix="tg_")
    try:
        key = await led.authenticate(plaintext)
        assert key is not None and key.account_id == 1
    finally:
        await led.close()


async def test_usage_report(capsys: pytest.CaptureFixture[str], db: str) -> None:
    _, plaintext = await _acreate_key(capsys, db)
    led = await Ledger.open(db)
    try:
        key = await led.authenticate(plaintext)
        assert key is not None
        for model, (p, c) in (("m1", (1000, 500)), ("m1", (10, 10)), ("m2", (0, 100))):
            res = await led.reserve("r", key, model, PRICES, 100_000)
            await led.settle(res, p, c, 0, "usage")
        await led.release(await led.reserve("r", key, "m2", PRICES, 5), "upstream refused")
    finally:
        await led.close()

    code, out, _ = await arun(capsys, "usage", "--json", "--db", db)
    assert code == 0
    groups = {g["model"]: g for g in json.loads(out)}
    assert groups["m1"]["requests"] == 2
    assert groups["m1"]["prompt_tokens"] == 1010
    assert groups["m1"]["charge_micro"] == 2000 + 30
    assert groups["m2"]["requests"] == 2 and groups["m2"]["charge_micro"] == 200
    assert groups["m1"]["account_name"] == "alice"

    code, out, _ = await arun(capsys, "usage", "--csv", "--model", "m2", "--db", db)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["model"], r["requests"], r["charge_usd"]) for r in rows] == [("m2", "2", "0.0002")]

    code, out, _ = await arun(
        capsys, "usage", "--account", "alice", "--since", "2000-01-01", "--db", db
    )
    assert code == 0 and "total: 4 request(s), 0.00223 USD" in out
    code, out, _ = await arun(capsys, "usage", "--since", "2999-01-01", "--json", "--db", db)
    assert json.loads(out) == []


async def test_ledger_verify_and_recover(capsys: pytest.CaptureFixture[str], db: str) -> None:
    _, plaintext = await _acreate_key(capsys, db)
    led = await Ledger.open(db)
    key = await led.authenticate(plaintext)
    assert key is not None
    await led.reserve("left-open", key, "m", PRICES, 4000)
    # While the proxy serves: verify works; recover refuses (SQLite) or leaves it alone
    # (PostgreSQL: it only charges reservations of workers that are gone).
    code, out, _ = await arun(capsys, "ledger", "verify", "--db", db)
    assert code == 0 and "1 open reservation" in out
    code, out, err = await arun(capsys, "ledger", "recover", "--db", db)
    if is_postgres(db):
        assert code == 0 and "recovered 0 reservation" in out
    else:
        assert code == 1 and "recovers on its own start" in err
    await led.close()  # leaves the reservation open, as a crash would

    code, out, _ = await arun(capsys, "ledger", "recover", "--db", db)
    assert code == 0 and "recovered 1 reservation" in out and "0.004 USD" in out
    code, out, _ = await arun(capsys, "ledger", "verify", "--json", "--db", db)
    assert code == 0 and json.loads(out)["open_reservations"] == []

    ledgerdb.execute(db, "UPDATE accounts SET balance_micro = 0 WHERE name = 'alice'")
    code, out, _ = await arun(capsys, "ledger", "verify", "--db", db)
    assert code == 1 and "MISMATCH balance" in out


@pytest.mark.parametrize(
    "argv",
    [
        ("accounts", "topup", "alice", "-5"),
        ("accounts", "topup", "alice", "0"),
        ("accounts", "topup", "alice", "1.0000001"),
        ("accounts", "topup", "alice", "NaN"),
        ("accounts", "topup", "alice", "1e3"),
        ("accounts", "topup", "carol", "5"),
        ("accounts", "topup", "99", "5"),
        ("accounts", "create", "alice"),
        ("accounts", "create", "carol", "--topup", "abc"),
        ("accounts", "create", "carol", "--topup", "-1"),
        ("accounts", "create", "4242"),
        ("accounts", "show", "carol"),
        ("keys", "create", "carol"),
        ("keys", "create", "alice", "--rate-limit", "0"),
        ("keys", "create", "alice", "--rate-limit", "many"),
        ("keys", "create", "alice", "--key-prefix", "bad prefix"),
        ("keys", "list", "carol"),
        ("keys", "revoke", "99"),
        ("keys", "revoke", "one"),
        ("usage", "--account", "carol"),
        ("usage", "--key", "99"),
        ("usage", "--since", "yesterday"),
        ("usage", "--since", "2025-02-30"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], db: str, argv: tuple[str, ...]
) -> None:
    before = snapshot(db)
    code, out, err = run(capsys, *argv, "--db", db)
    assert code == 2
    assert err.strip() and "Traceback" not in err
    assert "vgpu_sk_" not in out + err
    assert snapshot(db) == before


@pytest.mark.sqlite_only
def test_a_missing_database_is_not_created_by_reading_commands(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "typo.sqlite3"
    for argv in (
        ("accounts", "list"),
        ("accounts", "topup", "alice", "5"),
        ("keys", "create", "alice"),
        ("usage",),
        ("ledger", "verify"),
        ("ledger", "recover"),
    ):
        code, _, err = run(capsys, *argv, "--db", str(missing))
        assert code == 2 and "no ledger database" in err
    assert not missing.exists()


def test_db_defaults_to_env_then_current_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TEEGATE_DB", raising=False)
    assert run(capsys, "accounts", "create", "here")[0] == 0
    assert (tmp_path / "teegate.sqlite3").is_file()
    env_db = tmp_path / "env.sqlite3"
    monkeypatch.setenv("TEEGATE_DB", str(env_db))
    assert run(capsys, "accounts", "create", "there")[0] == 0
    code, out, _ = run(capsys, "accounts", "list", "--json")
    assert [a["name"] for a in json.loads(out)] == ["there"]


@pytest.mark.sqlite_only
async def test_migrate_copies_an_sqlite_ledger_into_postgres_and_verifies(
    capsys: pytest.CaptureFixture[str], db: str, pg_cluster
) -> None:
    """Every row, id and balance arrives; open reservations are swept by the first worker."""
    _, plaintext = await _acreate_key(capsys, db, "--rate-limit", "30")
    led = await Ledger.open(db)
    key = await led.authenticate(plaintext)
    assert key is not None
    done = await led.reserve("done", key, "m", PRICES, 4000)
    await led.settle(done, 100, 100, 0, "usage")
    await led.reserve("left-open", key, "m", PRICES, 3000)
    # What main's schema versions 4 and 5 added: idempotency keys, admin tokens, receipts.
    await led.topup(key.account_id, 1000, idempotency_key="wire-7")
    _, admin_plain = await led.admin_tokens.create("ops")
    receipt = StoredReceipt("rcpt_1", key.key_id, "done", 2, 1, '{"v":2}')
    await led.write_receipts([receipt], [(done.id, "verified")])
    await led.close()
    url = pg_cluster.new_database("migrate")
    code, out, err = await arun(capsys, "ledger", "migrate", "--to", url, "--db", db)
    assert code == 0, out + err
    assert "OK: the copy verifies" in out and "1 open reservation(s) copied" in out
    for table, cols in TABLES.items():  # PostgreSQL's usage has a worker_id besides
        sql = f"SELECT {', '.join(cols)} FROM {table} ORDER BY 1"
        assert ledgerdb.rows(db, sql) == ledgerdb.rows(url, sql), table
    assert {"admin_tokens", "receipts"} <= set(TABLES)
    code, out, _ = await arun(capsys, "accounts", "list", "--json", "--db", url)
    assert [a["balance_micro"] for a in json.loads(out)] == [12_500_000 - 300 - 3000 + 1000, 0]
    # The key works against the copy, and new rows continue after the copied ids.
    served = await Ledger.open(url)
    try:
        assert [r.request_id for r in served.recovered] == ["left-open"]
        key = await served.authenticate(plaintext)
        assert key is not None and key.rate_limit == 30
        res = await served.reserve("after", key, "m", PRICES, 10)
        assert res.id == 7  # after the top-ups, 3 copied entries and the sweep's settlement
        again = await served.topup(key.account_id, 1000, idempotency_key="wire-7")
        assert again.replayed  # the key was copied: a retry after the move credits nothing
        assert await served.admin_tokens.authenticate(admin_plain) is not None
        assert (await served.admin_tokens.create("new"))[0].token_id == 2
        assert await served.receipt("rcpt_1", key.key_id) == '{"v":2}'
        account = await served.create_account("carol")
        assert account.id == 3
    finally:
        await served.close()
    # Migrating again into a ledger that has rows is refused; so is a served SQLite file.
    code, out, err = await arun(capsys, "ledger", "migrate", "--to", url, "--db", db)
    assert code == 2 and "empty" in err
    led = await Ledger.open(db)
    try:
        other = pg_cluster.new_database("migrate")
        code, _, err = await arun(capsys, "ledger", "migrate", "--to", other, "--db", db)
        assert code == 1 and "stop it first" in err
    finally:
        await led.close()
