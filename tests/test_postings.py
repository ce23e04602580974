"""Postings (revision 0007): history pages and balances as of a seq read an account's rows up
to the watermark W from `postings` and the rows above it from `transfers`, and give exactly
what a plain replay of every row gives, on both backends.

`POSTINGS_RUN_ROWS` is lowered to 7 here, so every ledger has rows below and above W and
pages, cursors and point balances cross W in every way. Flushes are atomic with their batch
(a failing flush, a failing COMMIT, a SIGKILL: W moves only with its postings); an upgrade
from 0006 backfills them and a downgrade gives the indexes back; the plans range over the
postings key and never scan `transfers` for a busy account.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.pool import NullPool

import bank
from bank.cli import main
from bank.ledger import postings, store
from bank.ledger.audit import audit_ledger
from bank.ledger.migrate import ALEMBIC_LOCK, alembic_config, upgrade_to_head
from bank.ledger.reader import LedgerReader
from bank.limits import HISTORY_LIMIT_MAX
from bank.records import Receipt
from tests.conftest import LedgerDb

RUN = 7
#: The kinds whose amount moves from debit to credit (holds, voids and expiries move none).
MOVING = {"deposit", "withdrawal", "transfer", "post"}
ROW_SQL = (
    "SELECT seq, kind, key, amount, debit_account_id, credit_account_id, ts_us, hash, "
    "hold_seq, expires_us, link_first, link_count FROM transfers ORDER BY seq"
)


@pytest.fixture(autouse=True)
def small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postings, "POSTINGS_RUN_ROWS", RUN)


# -- the model: every row, replayed in Python ----------------------------------------------------


class Model:
    """What the ledger's rows say, computed from all of them without the database."""

    def __init__(self, ledger: LedgerDb) -> None:
        self.rows = [Receipt(*row) for row in ledger.query(ROW_SQL)]
        self.head = self.rows[-1].seq if self.rows else 0
        self.opened = {
            int(a): int(s)
            for a, s in ledger.query(
                "SELECT account_id, MIN(transfer_seq) FROM account_events "
                "WHERE kind = 'open' GROUP BY account_id"
            )
        }
        self.accounts = sorted(self.opened)
        balances: dict[int, int] = {}
        self.at: dict[int, dict[int, int]] = {0: {}}
        for r in self.rows:
            if r.kind in MOVING:
                balances[r.debit_account] = balances.get(r.debit_account, 0) - r.amount
                balances[r.credit_account] = balances.get(r.credit_account, 0) + r.amount
            self.at[r.seq] = dict(balances)

    def mine(self, account: int) -> list[Receipt]:
        return [r for r in self.rows if account in (r.debit_account, r.credit_account)]

    def page(self, account: int, after: int, limit: int, *, descending: bool) -> list[Receipt]:
        if descending:
            bound = after if after else self.head + 1
            return [r for r in reversed(self.mine(account)) if r.seq < bound][:limit]
        return [r for r in self.mine(account) if r.seq > after][:limit]

    def balance(self, account: int, seq: int) -> int:
        return self.at[seq].get(account, 0)

    def balances_at(self, seq: int) -> dict[int, int]:
        return {a: self.balance(a, seq) for a in self.accounts if self.opened[a] <= seq}


def postings_state(ledger: LedgerDb) -> tuple[int, int, set[tuple[int, int]], set[tuple[int, int]]]:
    """(W, head, the postings, the postings W says there are) read straight from the tables."""
    (upto,) = [int(s) for (s,) in ledger.query("SELECT seq FROM postings_upto")]
    rows = ledger.query("SELECT seq, debit_account_id, credit_account_id FROM transfers")
    head = max((int(s) for s, _, _ in rows), default=0)
    want = {(int(a), int(s)) for s, d, c in rows if s <= upto for a in (d, c)}
    have = {(int(a), int(s)) for a, s in ledger.query("SELECT account_id, seq FROM postings")}
    return upto, head, have, want


def assert_consistent(ledger: LedgerDb) -> tuple[int, int]:
    """W and its postings agree with the rows (W <= head); returns (W, head)."""
    upto, head, have, want = postings_state(ledger)
    assert 0 <= upto <= head
    assert have == want, (upto, head, sorted(have ^ want)[:10])
    return upto, head


def _fill(b: bank.Bank) -> list[int]:
    """Four customers, single commits and big batches, holds posted and voided, a linked
    group, and a tail of rows above W at the end. Returns the customers' ids."""
    ids = [b.open_account(n, overdraft_limit=300).id for n in ("ann", "ben", "cat", "dan")]
    for i in range(9):  # one row per commit: a flush at every 7th
        b.deposit(ids[i % 4], 1_000 + i)
    commands: list[Any] = []
    for i in range(40):
        commands.append(bank.Transfer(source=ids[i % 4], target=ids[(i + 1) % 4], amount=1 + i))
        if i % 9 == 0:
            commands.append(bank.Withdrawal(account=ids[i % 4], amount=5, key=f"w{i}"))
    for f in b.submit_many(commands):
        f.result()
    held = b.hold(ids[0], ids[1], 50)
    b.post(held.seq, 20)
    b.void(b.hold(ids[2], ids[3], 9).seq)
    b.submit_linked(
        [
            bank.Transfer(source=ids[3], target=ids[0], amount=3),
            bank.Deposit(account=ids[1], amount=4),
        ]
    ).result()
    b.transfer(ids[1], ids[2], 11)
    b.deposit(ids[3], 2)
    return ids


def _read_page(
    reader: LedgerReader, account: int, after: int, limit: int, *, descending: bool
) -> list[Receipt]:
    return reader.read(
        lambda conn: store.history_page(
            conn, account, after, limit, descending=descending, postings=reader.postings
        )
    )


def _cursors(ledger: LedgerDb, head: int, every: int = 80) -> list[int]:
    """Every seq up to `head` + 1 on a short ledger; on a long one, every seq near W and near
    the head, and `every`-th one of the rest (each read is a query: the tests stay fast)."""
    if head <= every:
        return list(range(head + 2))
    (upto,) = [int(s) for (s,) in ledger.query("SELECT seq FROM postings_upto")]
    near = {*range(upto - RUN - 3, upto + RUN + 4), *range(head - 3, head + 2)}
    stride = range(0, head + 2, max(1, head // every))
    return sorted(c for c in near | set(stride) if 0 <= c <= head + 1)


def check_reads(ledger: LedgerDb, b: bank.Bank | None = None) -> Model:
    """Every page (both directions, every cursor, several sizes), every point balance and
    every `balances_at` agree with the model, through the bank (if given) and the reader."""
    model = Model(ledger)
    cursors = _cursors(ledger, model.head)
    with LedgerReader(ledger.db) as reader:
        assert reader.postings
        for account in model.accounts:
            for limit in (1, 3, HISTORY_LIMIT_MAX):
                for after in cursors:
                    for descending in (False, True):
                        want = model.page(account, after, limit, descending=descending)
                        got = _read_page(reader, account, after, limit, descending=descending)
                        assert got == want, (account, after, limit, descending)
                    if b is not None:
                        want = model.page(account, after, limit, descending=False)
                        assert b.history(account, after_seq=after, limit=limit) == want
            assert list(reader.iter_history(account, page=2)) == model.mine(account)
            for seq in (c for c in cursors if c <= model.head):
                assert reader.balance(account, at_seq=seq) == model.balance(account, seq)
                if b is not None:
                    assert b.balance(account, at_seq=seq) == model.balance(account, seq)
        for seq in (c for c in cursors if c <= model.head):
            assert reader.balances_at(seq) == model.balances_at(seq), seq
    return model


# -- reads against the model ---------------------------------------------------------------------


def test_reads_agree_with_a_replay_of_every_row(ledger_db: LedgerDb) -> None:
    with bank.Bank.open(ledger_db.db) as b:
        _fill(b)
        upto, head = assert_consistent(ledger_db)
        assert 0 < upto < head and head - upto < RUN, (upto, head)  # rows on both sides of W
        assert upto > 3 * RUN  # several flushes
        check_reads(ledger_db, b)
    check_reads(ledger_db)


def test_the_command_line_agrees_with_a_replay(
    ledger_db: LedgerDb, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bank history` (pages of 3, forward and --reverse, from several cursors) and
    `bank balance --at-seq` on either side of W (each call is a process's worth of work:
    the library's reads are checked at every seq above)."""
    import bank.cli.ledger as cli_ledger

    monkeypatch.setattr(cli_ledger, "HISTORY_PAGE", 3)
    with bank.Bank.open(ledger_db.db) as b:
        ids = _fill(b)
    model = Model(ledger_db)
    db = str(ledger_db.db)
    for account in (0, *ids):
        for after in (0, 1, model.head // 2, model.head - 2, model.head):
            for reverse in (False, True):
                args = ["history", str(account), "--db", db, "--format", "nl"]
                args += ["--after-seq", str(after)] + (["--reverse"] if reverse else [])
                assert main(args) == 0
                lines = capsys.readouterr().out.splitlines()
                got = [Receipt(**json.loads(line)) for line in lines]
                bound = after if after or not reverse else 0
                want = model.page(account, bound, HISTORY_LIMIT_MAX, descending=reverse)
                assert got == want, (account, after, reverse)
        (upto,) = ledger_db.query("SELECT seq FROM postings_upto")[0]
        for seq in sorted({0, 1, model.head // 2, upto - 1, upto, upto + 1, model.head}):
            args = ["balance", str(account), "--db", db, "--at-seq", str(seq), "--json"]
            assert main(args) == 0
            assert json.loads(capsys.readouterr().out)["balance"] == model.balance(account, seq)


def test_a_posting_that_names_another_account_is_never_followed(ledger_db: LedgerDb) -> None:
    """An extra posting (tampering) pointing at a row of other accounts: the pages and the
    balances of its account ignore it (the join says debit or credit = the account)."""
    with bank.Bank.open(ledger_db.db) as b:
        ids = _fill(b)
    model = Model(ledger_db)
    upto, _ = assert_consistent(ledger_db)
    foreign = next(r for r in model.rows if r.seq <= upto and ids[0] not in r[4:6])
    ledger_db.execute(f"INSERT INTO postings (account_id, seq) VALUES ({ids[0]}, {foreign.seq})")
    with LedgerReader(ledger_db.db) as reader:
        for descending in (False, True):
            got = _read_page(reader, ids[0], 0, HISTORY_LIMIT_MAX, descending=descending)
            assert got == model.page(ids[0], 0, HISTORY_LIMIT_MAX, descending=descending)
        for seq in range(model.head + 1):
            assert reader.balance(ids[0], at_seq=seq) == model.balance(ids[0], seq)


# -- the flush is atomic with its batch --------------------------------------------------------


def _refuse_postings(ledger: LedgerDb, *, at_commit: bool) -> None:
    """From now on the flush fails: its INSERT into postings (SQLite, PostgreSQL), or with
    `at_commit` the COMMIT after it (PostgreSQL: a deferred constraint trigger on W)."""
    if ledger.backend == "sqlite":
        assert not at_commit
        ledger.execute(
            "CREATE TRIGGER no_postings BEFORE INSERT ON postings "
            "BEGIN SELECT RAISE(ABORT, 'no postings today'); END"
        )
        return
    ledger.execute(
        "CREATE FUNCTION no_postings() RETURNS trigger LANGUAGE plpgsql "
        "AS $$ BEGIN RAISE EXCEPTION 'no postings today'; END $$",
        "CREATE CONSTRAINT TRIGGER no_postings AFTER UPDATE ON postings_upto "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION no_postings()"
        if at_commit
        else "CREATE TRIGGER no_postings BEFORE INSERT ON postings "
        "FOR EACH ROW EXECUTE FUNCTION no_postings()",
    )


def _allow_postings(ledger: LedgerDb) -> None:
    if ledger.backend == "sqlite":
        ledger.execute("DROP TRIGGER no_postings")
    else:
        table = ledger.query(
            "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE t.tgname = 'no_postings'"
        )[0][0]
        ledger.execute(f"DROP TRIGGER no_postings ON {table}", "DROP FUNCTION no_postings()")


@pytest.mark.parametrize("at_commit", [False, True], ids=["flush", "commit"])
def test_a_failed_flush_loses_its_batch_and_moves_nothing(
    ledger_db: LedgerDb, at_commit: bool
) -> None:
    if at_commit and ledger_db.backend == "sqlite":
        pytest.skip("SQLite has no deferred trigger; its COMMIT is attacked by SIGKILL below")
    b = bank.Bank.open(ledger_db.db)
    try:
        a = b.open_account("a").id
        for _ in range(RUN + 2):
            b.deposit(a, 1)
        upto, head = assert_consistent(ledger_db)
        assert upto == RUN and head == RUN + 2
        _refuse_postings(ledger_db, at_commit=at_commit)
        for _ in range(RUN - 3):  # up to W + RUN - 1: no flush yet
            b.deposit(a, 1)
        assert assert_consistent(ledger_db) == (RUN, 2 * RUN - 1)
        with pytest.raises(bank.LedgerUnavailable, match="no postings today"):
            b.deposit(a, 1)  # head - W = RUN: this batch flushes, and fails
        assert assert_consistent(ledger_db) == (RUN, 2 * RUN - 1)  # neither its row nor W
    finally:
        b.close()
    _allow_postings(ledger_db)
    with bank.Bank.open(ledger_db.db) as b:
        b.deposit(a, 1)  # the flush again
        assert assert_consistent(ledger_db) == (2 * RUN, 2 * RUN)
        assert b.balance(a) == 2 * RUN
    check_reads(ledger_db)


def test_a_watermark_edited_under_a_running_bank_stops_it_and_commits_nothing(
    ledger_db: LedgerDb,
) -> None:
    """The writer keeps W in memory; its flush moves W only from the value it read."""
    b = bank.Bank.open(ledger_db.db)
    try:
        a = b.open_account("a").id
        for _ in range(RUN + 3):
            b.deposit(a, 1)
        ledger_db.execute("UPDATE postings_upto SET seq = 2")
        for _ in range(3):
            b.deposit(a, 1)
        with pytest.raises(bank.LedgerUnavailable, match="postings_upto is not the watermark 7"):
            b.deposit(a, 1)
    finally:
        b.close()
    assert ledger_db.query("SELECT seq FROM postings_upto") == [(2,)]
    assert ledger_db.query("SELECT MAX(seq) FROM transfers") == [(RUN + 6,)]


CHILD = r"""
import random, sys
import bank
from bank.ledger import postings
postings.POSTINGS_RUN_ROWS = 7
rng = random.Random(int(sys.argv[2]))
with bank.Bank.open(sys.argv[1]) as b:
    ids = [a.id for a in b.accounts() if a.id]
    if not ids:
        ids = [b.open_account(n).id for n in ("x", "y", "z")]
    print("OPEN", flush=True)
    while True:
        n = rng.choice((1, 2, 5, 13, 40))
        commands = [bank.Deposit(account=rng.choice(ids), amount=1 + rng.randrange(9))
                    for _ in range(n)]
        for f in b.submit_many(commands):
            f.result()
        print("ACK", n, flush=True)
"""


def _child(db: str, seed: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, db, str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


@pytest.mark.timeout(120)
def test_sigkill_mid_flush_leaves_postings_and_watermark_consistent(ledger_db: LedgerDb) -> None:
    """A bank killed at random instants while it flushes every few batches: after each kill
    W and the postings agree (W moved with its postings or not at all), the reopened bank
    carries on, and every read agrees with the rows."""
    seed = random.randrange(2**31)
    heads: list[int] = []
    for round_ in range(4):
        child = _child(str(ledger_db.db), seed + round_)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "OPEN", child.stderr
            for _ in range(3 + round_):
                assert child.stdout.readline().startswith("ACK")
            time.sleep(random.random() * 0.05)
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            if child.stdout is not None:
                child.stdout.close()
            if child.stderr is not None:
                child.stderr.close()
        ledger_db.settle()  # the dead bank's last COMMIT may still be on its way
        upto, head = assert_consistent(ledger_db)
        assert head - upto < RUN + 40, (upto, head, seed)
        heads.append(head)
    assert heads == sorted(heads) and heads[-1] > heads[0]
    check_reads(ledger_db)


# -- revisions ------------------------------------------------------------------------------------


def _migrate(ledger: LedgerDb, verb: str, revision: str) -> None:
    engine = create_engine(ledger.url, poolclass=NullPool)
    try:
        with ALEMBIC_LOCK, engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            getattr(command, verb)(cfg, revision)
    finally:
        engine.dispose()


def _indexes(ledger: LedgerDb) -> set[str]:
    sql = (
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'transfers'"
        if ledger.backend == "sqlite"
        else "SELECT indexname FROM pg_indexes WHERE tablename = 'transfers'"
    )
    return {str(name) for (name,) in ledger.query(sql)}


def _tables(ledger: LedgerDb) -> set[str]:
    sql = (
        "SELECT name FROM sqlite_master WHERE type = 'table'"
        if ledger.backend == "sqlite"
        else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    )
    return {str(name) for (name,) in ledger.query(sql)}


OLD_INDEXES = {"ix_transfers_debit_account_id_seq", "ix_transfers_credit_account_id_seq"}


def test_downgrade_to_0006_and_upgrade_back_backfills_the_same_history(
    ledger_db: LedgerDb,
) -> None:
    """A ledger with rows at 0006 (the indexes, no postings) reads as before; upgraded, its
    postings are backfilled from every row, W is the head, and every read is the same."""
    with bank.Bank.open(ledger_db.db) as b:
        ids = _fill(b)
    before = Model(ledger_db)
    _migrate(ledger_db, "downgrade", "0006")
    assert _indexes(ledger_db) >= OLD_INDEXES
    assert not {"postings", "postings_upto"} & _tables(ledger_db)
    with LedgerReader(ledger_db.db) as reader:  # read as revision 0006, not upgraded
        assert reader.revision == "0006" and not reader.postings
        for account in (0, *ids):
            assert list(reader.iter_history(account, page=3)) == before.mine(account)
            for seq in range(before.head + 1):
                assert reader.balance(account, at_seq=seq) == before.balance(account, seq)
            for after in (0, 5, before.head):
                got = _read_page(reader, account, after, 4, descending=True)
                assert got == before.page(account, after, 4, descending=True)
        assert reader.balances_at(before.head // 2) == before.balances_at(before.head // 2)
    with bank.Bank.open(ledger_db.db) as b:  # upgrades: the backfill
        assert not OLD_INDEXES & _indexes(ledger_db)
        assert assert_consistent(ledger_db) == (before.head, before.head)
        after_upgrade = check_reads(ledger_db, b)
        assert after_upgrade.rows == before.rows
        b.deposit(ids[0], 1)
    report = audit_ledger(ledger_db.db)
    assert report.ok, report.problems[:3]


def test_a_new_ledger_starts_with_an_empty_run(ledger_db: LedgerDb) -> None:
    engine = create_engine(ledger_db.url, poolclass=NullPool)
    try:
        upgrade_to_head(engine)
    finally:
        engine.dispose()
    assert ledger_db.query("SELECT id, seq FROM postings_upto") == [(1, 0)]
    assert ledger_db.query("SELECT COUNT(*) FROM postings") == [(0,)]
    assert not OLD_INDEXES & _indexes(ledger_db)


def test_copy_rebuilds_the_postings_and_the_watermark(ledger_db: LedgerDb, tmp_path: Path) -> None:
    """`bank copy` from a ledger with a tail above W: the copy has every row's postings and
    W at its head, and reads the same."""
    from bank.ledger.copy import copy_ledger

    with bank.Bank.open(ledger_db.db) as b:
        _fill(b)
    upto, head = assert_consistent(ledger_db)
    assert upto < head
    copy = LedgerDb.sqlite(tmp_path / "copy.db")
    report = copy_ledger(ledger_db.db, copy.db)
    assert report.ok, report.audit.problems[:3]
    assert assert_consistent(copy) == (head, head)
    assert Model(copy).rows == Model(ledger_db).rows
    check_reads(copy)


# -- plans ------------------------------------------------------------------------------------------

HOT = 1


def _synthetic(conn: Connection, rows: int, accounts: int, tail: int) -> None:
    """`rows` transfers (every 10th with account HOT on one side), their postings up to
    `rows - tail`, straight in SQL: a ledger for the planners (not for the audit)."""
    dialect = conn.dialect.name
    numbers = (
        f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows}) "
        if dialect == "sqlite"
        else ""
    )
    source = "n" if dialect == "sqlite" else f"generate_series(1, {rows}) AS n(i)"
    count = (
        f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {accounts}) "
        if dialect == "sqlite"
        else ""
    )
    asource = "n" if dialect == "sqlite" else f"generate_series(1, {accounts}) AS n(i)"
    conn.execute(
        text(
            f"{count}INSERT INTO accounts (id, name, overdraft_limit, balance) "
            f"SELECT i, 'a' || i, 0, 0 FROM {asource}"
        )
    )
    conn.execute(
        text(
            f"{numbers}INSERT INTO transfers (seq, kind, debit_account_id, credit_account_id, "
            "amount, ts_us, hash, debit_balance, credit_balance) "
            "SELECT i, 'transfer', CASE WHEN i % 10 = 0 THEN 1 ELSE 2 + i % "
            f"{accounts - 2} END, CASE WHEN i % 10 = 0 THEN 2 + i % {accounts - 2} ELSE 0 END, "
            f"1, i, 'h', 0, 0 FROM {source}"
        )
    )
    postings.rebuild_postings(conn, rows - tail)
    conn.execute(text("ANALYZE"))


def _plans(conn: Connection, calls: list[Any]) -> list[str]:
    """The plan of every statement `calls` run on `conn`."""
    statements: list[tuple[str, Any]] = []

    def record(_c: Any, _cur: Any, statement: str, parameters: Any, *_args: Any) -> None:
        statements.append((statement, parameters))

    engine = conn.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        for call in calls:
            call(conn)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    prefix = "EXPLAIN QUERY PLAN" if conn.dialect.name == "sqlite" else "EXPLAIN"
    return [
        " | ".join(str(row[-1]) for row in conn.exec_driver_sql(f"{prefix} {s}", p))
        for s, p in statements
    ]


def test_history_and_balances_range_over_the_postings_key(ledger_db: LedgerDb) -> None:
    """200,000 rows, a busy account with 20,000, a tail of 5,000: every read's plan is a range
    of the postings key (pk_postings) and a range of transfers by seq, never a scan of it."""
    engine = create_engine(ledger_db.url, poolclass=NullPool)
    try:
        upgrade_to_head(engine)
        with engine.begin() as conn:
            _synthetic(conn, 200_000, 1_000, 5_000)
        with engine.connect() as conn:
            plans = _plans(
                conn,
                [
                    lambda c: store.history_page(c, HOT, 0, 1000),
                    lambda c: store.history_page(c, HOT, 100_000, 1000),
                    lambda c: store.history_page(c, HOT, 0, 1000, descending=True),
                    lambda c: store.history_page(c, HOT, 100_000, 1000, descending=True),
                    lambda c: store.balance_at(c, HOT, 150_000),
                    lambda c: store.balance_at(c, HOT, 199_000),
                    lambda c: store.balances_at(c, 199_000),
                ],
            )
    finally:
        engine.dispose()
    assert len(plans) == 7
    for i, plan in enumerate(plans):
        if ledger_db.backend == "sqlite" and i < 4:  # pages: merged as read, no sort
            assert "MERGE (UNION ALL)" in plan and "TEMP B-TREE" not in plan, plan
        if ledger_db.backend == "sqlite":
            assert "SEARCH p USING PRIMARY KEY (account_id=?" in plan, plan
            assert not re.search(r"\bSCAN (t|p|transfers|postings)\b", plan), plan
        else:
            assert "pk_postings" in plan, plan
            assert not re.search(r"Seq Scan on (transfers|postings)\b", plan), plan
