"""Attacks on revision 0007's promises (postings written in sorted runs, the watermark W, the
tail above W, reads in one statement, the audit's postings rule), with real processes and
real databases on both backends.

- Forgeries `bank audit` must find (exit 1), including ones aimed at the fingerprint's
  arithmetic (a posting moved by a multiple of the fingerprint's prime p).
- A forged posting must not make a page skip real rows (the page-size attack).
- Cursors and seqs at and around W and the head, limit 1, an account with no rows, @cash.
- A child bank SIGKILLed at random instants (and at the Nth fsync, by the LD_PRELOAD shim)
  while it flushes every few rows: after each kill every acknowledged key is there once,
  W and the postings agree, `bank audit` is clean and every read equals a replay.
- Readers in other processes (plain sqlite3, and PostgreSQL at READ COMMITTED) and a
  `LedgerReader` beside a writing bank that moves W all the time: every page and every
  point balance is exactly the replay's (rows are append-only, so a page read at any
  snapshot is a contiguous piece of the final ledger's history).
- Failing fsync and a full disk during the flush's commit.

The run size is lowered in-process by monkeypatching `bank.ledger.postings.POSTINGS_RUN_ROWS`
and in child processes by a `sitecustomize` module on their PYTHONPATH (`_run_rows_env`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

import bank
from bank.cli import main
from bank.ledger import postings, store
from bank.ledger.audit import audit_ledger
from bank.ledger.audit_postings import FINGERPRINT_P
from bank.ledger.reader import LedgerReader
from bank.limits import HISTORY_LIMIT_MAX
from bank.records import Receipt
from tests import faults, postgres
from tests.conftest import LEDGER_PARAMS, LedgerDb, new_ledger

#: The run size of every bank in this file (flushes every few rows).
RUN = 5
ROW_SQL = (
    "SELECT seq, kind, key, amount, debit_account_id, credit_account_id, ts_us, hash, "
    "hold_seq, expires_us, link_first, link_count FROM transfers ORDER BY seq"
)
MOVING = {"deposit", "withdrawal", "transfer", "post"}


@pytest.fixture(autouse=True)
def small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postings, "POSTINGS_RUN_ROWS", RUN)


# -- a replay of the rows ----------------------------------------------------------------------


class Replay:
    """What the rows say, from all of them in Python (no index, no postings)."""

    def __init__(self, rows: list[Receipt]) -> None:
        self.rows = rows
        self.head = rows[-1].seq if rows else 0
        self.by_account: dict[int, list[Receipt]] = {}
        self.at: list[dict[int, int]] = [{}]
        balances: dict[int, int] = {}
        for r in rows:
            assert r.seq == len(self.at), "seqs are dense from 1"
            for a in {r.debit_account, r.credit_account}:
                self.by_account.setdefault(a, []).append(r)
            if r.kind in MOVING:
                balances[r.debit_account] = balances.get(r.debit_account, 0) - r.amount
                balances[r.credit_account] = balances.get(r.credit_account, 0) + r.amount
            self.at.append(dict(balances))

    @classmethod
    def of(cls, ledger: LedgerDb) -> Replay:
        return cls([Receipt(*row) for row in ledger.query(ROW_SQL)])

    def mine(self, account: int) -> list[Receipt]:
        return self.by_account.get(account, [])

    def page(self, account: int, after: int, limit: int, *, descending: bool) -> list[Receipt]:
        if descending:
            bound = after if after else self.head + 1
            return [r for r in reversed(self.mine(account)) if r.seq < bound][:limit]
        return [r for r in self.mine(account) if r.seq > after][:limit]

    def balance(self, account: int, seq: int) -> int:
        return self.at[seq].get(account, 0)


def watermark(ledger: LedgerDb) -> int:
    ((w,),) = ledger.query("SELECT seq FROM postings_upto")
    return int(w)


def assert_postings_agree(ledger: LedgerDb) -> tuple[int, int]:
    """W is one row in 0..head and the postings are exactly both sides of every row <= W."""
    rows = ledger.query("SELECT seq FROM postings_upto")
    assert len(rows) == 1, rows
    w = int(rows[0][0])
    sides = ledger.query("SELECT seq, debit_account_id, credit_account_id FROM transfers")
    head = max((int(s) for s, _, _ in sides), default=0)
    assert 0 <= w <= head, (w, head)
    want = {(int(a), int(s)) for s, d, c in sides if s <= w for a in (d, c)}
    have = {(int(a), int(s)) for a, s in ledger.query("SELECT account_id, seq FROM postings")}
    assert have == want, (w, head, sorted(have ^ want)[:10])
    return w, head


def _read_page(
    reader: LedgerReader, account: int, after: int, limit: int, *, descending: bool
) -> list[Receipt]:
    return reader.read(
        lambda conn: store.history_page(
            conn, account, after, limit, descending=descending, postings=reader.postings
        )
    )


def _audit_cli(ledger: LedgerDb, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[Any]]:
    capsys.readouterr()
    code = main(["audit", "--db", str(ledger.db), "--json"])
    return code, json.loads(capsys.readouterr().out)["problems"]


def _fill(b: bank.Bank, rng: random.Random, rows: int) -> list[int]:
    """Six accounts (one never used), deposits and transfers in commits of 1 to 17 rows,
    until about `rows` transfers; a tail above W is left by the caller's check."""
    ids = [b.open_account(f"c{i}", overdraft_limit=10_000).id for i in range(6)]
    used = ids[:5]
    while b.snapshot().seq < rows:
        commands: list[Any] = []
        for _ in range(rng.choice((1, 1, 2, 4, 9, 17))):
            if rng.random() < 0.3:
                commands.append(bank.Deposit(account=rng.choice(used), amount=rng.randint(1, 99)))
            else:
                s, t = rng.sample(used, 2)
                commands.append(bank.Transfer(source=s, target=t, amount=rng.randint(1, 50)))
        for f in b.submit_many(commands):
            f.result()
    return ids


_copies = itertools.count()


@pytest.fixture(scope="module", params=LEDGER_PARAMS)
def filled_template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LedgerDb, list[int]]]:
    """A ledger of about 120 rows written by the engine (a run every 5 rows), with a tail
    above W; built once per backend, copied for each test."""
    ledger = new_ledger(request, tmp_path_factory.mktemp("filled"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(postings, "POSTINGS_RUN_ROWS", RUN)
        with bank.Bank.open(ledger.db) as b:
            ids = _fill(b, random.Random(7), 120)
            while True:
                w, head = assert_postings_agree(ledger)
                if head > w:
                    break
                b.deposit(ids[0], 1)
    yield ledger, ids
    if ledger.server is not None:
        ledger.drop()


@pytest.fixture
def filled(
    filled_template: tuple[LedgerDb, list[int]], tmp_path: Path
) -> Iterator[tuple[LedgerDb, list[int]]]:
    """A copy of the template ledger (its file, or a database made from it)."""
    template, ids = filled_template
    if template.server is None:
        target = tmp_path / f"copy-{next(_copies)}" / "ledger.db"
        target.parent.mkdir()
        shutil.copyfile(template.path, target)
        yield LedgerDb.sqlite(target), ids
        return
    import psycopg

    source = make_url(template.url).database
    name = f"{source}_a{os.getpid()}_{next(_copies)}"
    with psycopg.connect(postgres.libpq_conninfo(template.server.url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
    url = make_url(template.url).set(database=name).render_as_string(hide_password=False)
    copy = LedgerDb("postgres", url, url, template.server)
    yield copy, ids
    copy.drop()


# -- 5. forgeries the audit must find -----------------------------------------------------------


def _a_posting(ledger: LedgerDb) -> tuple[int, int]:
    """(account, seq) of a posting in the middle of the indexed range."""
    w = watermark(ledger)
    ((seq, debit),) = ledger.query(
        f"SELECT seq, debit_account_id FROM transfers WHERE seq = {w // 2}"
    )
    return int(debit), int(seq)


@pytest.mark.parametrize(
    "move",
    [f"account_id = account_id + {FINGERPRINT_P}", f"seq = seq - {FINGERPRINT_P}"],
    ids=["account+p", "seq-p"],
)
def test_a_posting_moved_by_the_fingerprints_prime_is_found(
    filled: tuple[LedgerDb, list[int]], move: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The harm first (the account's history misses the row, its balance steps back),
    then the audit, which must say so (exit 1)."""
    ledger, _ = filled
    account, seq = _a_posting(ledger)
    replay = Replay.of(ledger)
    ledger.execute(f"UPDATE postings SET {move} WHERE account_id = {account} AND seq = {seq}")
    with LedgerReader(ledger.db) as reader:
        got = [r.seq for r in _read_page(reader, account, 0, 1000, descending=False)]
        assert seq not in got  # the damage is real: the row is gone from the history
        assert got == [r.seq for r in replay.mine(account) if r.seq != seq]
    code, problems = _audit_cli(ledger, capsys)
    assert code == 1, f"the audit passed a ledger whose account {account} lost row {seq}"
    assert any(p["kind"] == "postings" for p in problems), problems


#: Forgeries (SQL on both backends, `{account}`, `{seq}`, `{w}`, `{head}` filled in) and the
#: problem kind `bank audit` must report.
FORGERIES: dict[str, tuple[list[str], str]] = {
    "a posting at a seq beyond the head": (
        ["INSERT INTO postings (account_id, seq) VALUES ({account}, {head} + 100)"],
        "postings_watermark",
    ),
    "a posting at seq 0": (
        ["INSERT INTO postings (account_id, seq) VALUES ({account}, 0)"],
        "postings",
    ),
    "a posting at a negative seq": (
        ["INSERT INTO postings (account_id, seq) VALUES ({account}, -{seq})"],
        "postings",
    ),
    "a posting of an account that does not exist": (
        ["INSERT INTO postings (account_id, seq) VALUES (999999, {seq})"],
        "postings",
    ),
    "a posting of the smallest 64-bit account": (
        ["INSERT INTO postings (account_id, seq) VALUES (-9223372036854775807 - 1, {seq})"],
        "postings",
    ),
    "a posting of the largest 64-bit account at the smallest seq": (
        [
            "INSERT INTO postings (account_id, seq) "
            "VALUES (9223372036854775807, -9223372036854775807 - 1)"
        ],
        "postings",
    ),
    "a posting at the largest 64-bit seq": (
        ["INSERT INTO postings (account_id, seq) VALUES ({account}, 9223372036854775807)"],
        "postings_watermark",
    ),
    "a posting moved to account -account": (
        [
            "UPDATE postings SET account_id = -account_id WHERE account_id = {account} AND seq = {seq}"
        ],
        "postings",
    ),
    "two postings swapped between accounts": (
        [
            "UPDATE postings SET account_id = -1 WHERE account_id = {account} AND seq = {seq}",
            "UPDATE postings SET account_id = {account} WHERE account_id = {other} "
            "AND seq = {other_seq}",
            "UPDATE postings SET account_id = {other} WHERE account_id = -1",
        ],
        "postings",
    ),
    "one posting up a seq, another down": (
        [
            "DELETE FROM postings WHERE account_id = {account} AND seq = {seq}",
            "DELETE FROM postings WHERE account_id = {account} AND seq = {seq2}",
            "INSERT INTO postings (account_id, seq) VALUES ({account}, {seq} + 1000000)",
            "INSERT INTO postings (account_id, seq) VALUES ({account}, {seq2} - 1000000)",
        ],
        "postings",
    ),
    "W one below the real one": (["UPDATE postings_upto SET seq = {w} - 1"], "postings_watermark"),
    "W one above the real one": (["UPDATE postings_upto SET seq = {w} + 1"], "postings"),
    "W at the head, the tail not posted": (
        ["UPDATE postings_upto SET seq = {head}"],
        "postings",
    ),
}


def _forgery_facts(ledger: LedgerDb) -> dict[str, int]:
    w = watermark(ledger)
    rows = ledger.query(
        f"SELECT seq, debit_account_id, credit_account_id FROM transfers WHERE seq <= {w} "
        "ORDER BY seq"
    )
    named = {int(s): {int(d), int(c)} for s, d, c in rows}
    account, seq = _a_posting(ledger)
    other_seq, other = next(
        (s, a)
        for s, sides in named.items()
        if account not in sides
        for a in sides
        if a and a not in named[seq]
    )
    seq2 = max(s for s, sides in named.items() if account in sides and s != seq)
    ((head,),) = ledger.query("SELECT max(seq) FROM transfers")
    return {
        "w": w,
        "head": int(head),
        "account": account,
        "seq": seq,
        "seq2": seq2,
        "other": other,
        "other_seq": other_seq,
    }


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_each_forgery_is_found_by_bank_audit(
    filled: tuple[LedgerDb, list[int]], forgery: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger, _ = filled
    assert _audit_cli(ledger, capsys) == (0, [])
    facts = _forgery_facts(ledger)
    statements, kind = FORGERIES[forgery]
    ledger.execute(*(s.format(**facts) for s in statements))
    code, problems = _audit_cli(ledger, capsys)
    assert code == 1, forgery
    assert kind in {p["kind"] for p in problems}, problems


def test_w_zero_without_postings_is_a_consistent_index_that_reads_right(
    filled: tuple[LedgerDb, list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The one 'forgery' that is no damage: every row above W=0 is read from the tail."""
    ledger, ids = filled
    ledger.execute("DELETE FROM postings", "UPDATE postings_upto SET seq = 0")
    assert _audit_cli(ledger, capsys) == (0, [])
    replay = Replay.of(ledger)
    with LedgerReader(ledger.db) as reader:
        for a in ids:
            for descending in (False, True):
                got = _read_page(reader, a, 0, 1000, descending=descending)
                assert got == replay.page(a, 0, 1000, descending=descending)
            assert reader.balance(a, at_seq=replay.head // 2) == replay.balance(a, replay.head // 2)


def _pg_drop_checks(ledger: LedgerDb) -> list[str]:
    rows = ledger.query(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'postings_upto'::regclass "
        "AND contype IN ('c', 'p')"
    )
    return [f"ALTER TABLE postings_upto DROP CONSTRAINT {name}" for (name,) in rows]


def test_a_second_watermark_row_is_found_and_refused_at_open(
    filled: tuple[LedgerDb, list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A duplicated W (past the CHECK: SQLite's ignore_check_constraints, PostgreSQL with
    the constraints dropped): the audit reports it, a bank refuses to open on it."""
    ledger, _ = filled
    w = watermark(ledger)
    if ledger.backend == "sqlite":
        conn = sqlite3.connect(ledger.path, isolation_level=None)
        try:
            conn.execute("PRAGMA ignore_check_constraints = 1")
            conn.execute(f"INSERT INTO postings_upto (id, seq) VALUES (2, {w})")
        finally:
            conn.close()
    else:
        ledger.execute(
            *_pg_drop_checks(ledger), f"INSERT INTO postings_upto (id, seq) VALUES (1, {w})"
        )
    assert len(ledger.query("SELECT seq FROM postings_upto")) == 2
    code, problems = _audit_cli(ledger, capsys)
    assert code == 1
    assert any("postings_upto holds 2 rows" in p["message"] for p in problems), problems
    with pytest.raises(bank.LedgerCorrupt, match="postings_upto"):
        bank.Bank.open(ledger.db).close()


def test_a_deleted_watermark_row_is_found_and_refused_at_open(
    filled: tuple[LedgerDb, list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    ledger, _ = filled
    ledger.execute("DELETE FROM postings_upto")
    code, problems = _audit_cli(ledger, capsys)
    assert code == 1
    assert any("postings_upto holds 0 rows" in p["message"] for p in problems), problems
    with pytest.raises(bank.LedgerCorrupt, match="postings_upto"):
        bank.Bank.open(ledger.db).close()


def test_a_forged_posting_never_makes_a_page_skip_a_real_row(
    filled: tuple[LedgerDb, list[int]], request: pytest.FixtureRequest
) -> None:
    """An extra posting (a row that does not name the account) early in an account's range:
    it is never returned, and no page around it loses or repeats a real row (a page cut at
    `limit` before the join's filter would be one short and filled from the tail, skipping
    the rows between)."""
    ledger, ids = filled
    if ledger.backend == "postgres":
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="finding 2, left open: PostgreSQL's page form cuts the postings arm at "
                ":limit before the join's filter (the plans that filter first hash-join or "
                "sort the account's range), so a forged posting's page is filled from the "
                "tail; the audit reports the posting (bank/ledger/postings.py HISTORY_ASC_SQL)",
            )
        )
    replay = Replay.of(ledger)
    account = ids[0]
    w = watermark(ledger)
    foreign = [r.seq for r in replay.rows if r.seq <= w and account not in r[4:6]]
    ledger.execute(
        *(f"INSERT INTO postings (account_id, seq) VALUES ({account}, {s})" for s in foreign[:3])
    )
    mine = replay.mine(account)
    with LedgerReader(ledger.db) as reader:
        for limit in (1, 2, 3, 5):
            for after in [0, *(r.seq for r in mine)]:
                for descending in (False, True):
                    got = _read_page(reader, account, after, limit, descending=descending)
                    want = replay.page(account, after, limit, descending=descending)
                    assert [r.seq for r in got] == [r.seq for r in want], (
                        ledger.backend,
                        after,
                        limit,
                        descending,
                    )
            streamed = [r.seq for r in reader.iter_history(account, page=limit)]
            assert streamed == [r.seq for r in mine], limit


# -- 6. cursors and seqs at and around W and the head ------------------------------------------


def test_cursors_and_seqs_around_w_and_the_head(filled: tuple[LedgerDb, list[int]]) -> None:
    ledger, ids = filled
    replay = Replay.of(ledger)
    w, head = assert_postings_agree(ledger)
    assert 0 < w < head
    edges = sorted({0, 1, w - 1, w, w + 1, head - 1, head, head + 1, head + 1000, 2**63 - 1})
    unused = ids[5]
    with bank.Bank.open(ledger.db) as b, LedgerReader(ledger.db) as reader:
        for account in (0, *ids):
            for after in edges:
                for limit in (1, RUN + 1, 1000):
                    want = replay.page(account, after, limit, descending=False)
                    assert b.history(account, after_seq=after, limit=limit) == want
                    assert reader.history(account, after_seq=after, limit=limit) == want
                    for descending in (False, True):
                        got = _read_page(reader, account, after, limit, descending=descending)
                        assert got == replay.page(account, after, limit, descending=descending)
            for seq in (s for s in edges if s <= head):
                assert b.balance(account, at_seq=seq) == replay.balance(account, seq)
                assert reader.balance(account, at_seq=seq) == replay.balance(account, seq)
            for seq in (head + 1, head + 1000):
                with pytest.raises(bank.SeqBeyondHead):
                    b.balance(account, at_seq=seq)
                with pytest.raises(bank.SeqBeyondHead):
                    reader.balance(account, at_seq=seq)
        assert b.history(unused) == [] and reader.history(unused, after_seq=w) == []
        assert b.balance(unused, at_seq=w) == 0 and reader.balance(unused, at_seq=head) == 0
        for bad in (-1, True, 2**63, "1", None, 1.0):
            with pytest.raises(bank.InvalidCommand):
                b.history(ids[0], after_seq=bad)  # type: ignore[arg-type]
            if bad is not None:  # at_seq=None: the current balance
                with pytest.raises(bank.InvalidCommand):
                    reader.balance(ids[0], at_seq=bad)  # type: ignore[arg-type]
        for bad in (0, -1, HISTORY_LIMIT_MAX + 1, True, None, 2.0):
            with pytest.raises(bank.InvalidCommand):
                reader.history(ids[0], limit=bad)  # type: ignore[arg-type]
        with pytest.raises(bank.AccountNotFound):
            reader.history(999_999, after_seq=w)
        with pytest.raises(bank.AccountNotFound):
            b.balance(999_999, at_seq=w)
        for seq in (0, w - 1, w, w + 1, head):
            wanted = {a: replay.balance(a, seq) for a in (0, *ids)}
            at = reader.balances_at(seq)
            assert {a: at.get(a, 0) for a in wanted} == wanted, seq


# -- 1. SIGKILL a child bank while it flushes ---------------------------------------------------

#: The child: `tests.faults child` (keyed deposits and transfers, one log line per answer)
#: with the postings run size lowered first, forked from a fork server.
CHILD_SCRIPT = """
import os, sys
from bank.ledger import postings
postings.POSTINGS_RUN_ROWS = int(os.environ["ATTACK_RUN_ROWS"])
from tests.faults import child_main
sys.exit(child_main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def shim() -> Path:
    try:
        return faults.build_shim()
    except faults.FaultUnavailable as exc:
        pytest.skip(str(exc))


def _child_script(directory: Path) -> Path:
    script = directory / "attack_child.py"
    script.write_text(CHILD_SCRIPT)
    return script


def _child_args(db: Path | str, prefix: str, seed: int, *, batch: int = 8) -> list[str]:
    return [
        *("--db", str(db), "--tellers", "2", "--batch", str(batch)),
        *("--prefix", prefix, "--seed", str(seed)),
    ]


def _wait_lines(log: Path, predicate: Callable[[list[str]], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate(faults.read_lines(log)):
        assert time.monotonic() < deadline, f"watchdog: {faults.read_lines(log)[-5:]}"
        time.sleep(0.002)


def _acks(lines: list[str]) -> int:
    return sum(1 for x in lines if x.startswith("A "))


def _keys(ledger: LedgerDb) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for key, seq in ledger.query("SELECT key, seq FROM transfers WHERE key IS NOT NULL"):
        found.setdefault(str(key), []).append(int(seq))
    return found


def check_after_crash(ledger: LedgerDb, answers: faults.Answers, where: str) -> None:
    """Every promise after a crash: acknowledged keys there once at their seq, refused keys
    absent, W and the postings agree with a tail shorter than a run, the audit is clean,
    and every read (pages from cursors around W, point balances, a stream) is the replay's."""
    ledger.settle()  # a killed bank's last COMMIT may still be on its way to the server
    problems = faults.key_problems(answers, _keys(ledger))
    assert not problems, (where, problems[:5])
    assert not answers.raw_errors, (where, answers.raw_errors[:3])
    w, head = assert_postings_agree(ledger)
    assert head - w < RUN, (where, w, head)  # every commit that reached W + RUN flushed
    report = audit_ledger(ledger.db)
    assert report.ok, (where, [p.message for p in report.problems[:5]])
    replay = Replay.of(ledger)
    assert replay.head == head
    cursors = sorted({0, 1, w - 1, w, w + 1, head - 1, head, head + 1} - {-1})
    with LedgerReader(ledger.db) as reader:
        for account in sorted(replay.by_account):
            for after in cursors:
                for limit in (1, 3):
                    for descending in (False, True):
                        got = _read_page(reader, account, after, limit, descending=descending)
                        want = replay.page(account, after, limit, descending=descending)
                        assert got == want, (where, account, after, limit, descending)
            for seq in (s for s in cursors if s <= head):
                assert reader.balance(account, at_seq=seq) == replay.balance(account, seq)
            streamed = list(reader.iter_history(account, page=4))
            assert streamed == replay.mine(account), (where, account)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rounds", [3, pytest.param(25, marks=pytest.mark.slow)])
def test_sigkill_at_random_instants_while_flushing_keeps_every_promise(
    ledger_db: LedgerDb, tmp_path: Path, rounds: int
) -> None:
    """Rounds of a child bank (two tellers, batches of up to 8, a run every 5 rows) killed
    with SIGKILL after a random number of acknowledgements and a random delay; the next
    round's child recovers the ledger and goes on. Seeded; the seed is in every message."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    script = _child_script(tmp_path)
    all_answers = faults.Answers()
    flushed: set[int] = set()
    with faults.ForkServer() as server:
        for i in range(rounds):
            log, err = tmp_path / f"r{i}.log", tmp_path / f"r{i}.err"
            pid = server.spawn(
                script,
                _child_args(ledger_db.db, f"r{i}-", seed + i),
                log,
                err,
                env={"ATTACK_RUN_ROWS": str(RUN)},
            )
            try:
                acks = rng.randint(2, 40)

                def enough(lines: list[str], n: int = acks) -> bool:
                    return _acks(lines) >= n

                _wait_lines(log, enough, 60.0)
                time.sleep(rng.random() * 0.02)
            finally:
                os.kill(pid, signal.SIGKILL)
                server.wait(pid)
            answers = faults.parse_answers(faults.read_lines(log))
            assert answers.opened, err.read_text()[-2000:]
            all_answers.acked.update(answers.acked)
            all_answers.refused.update(answers.refused)
            all_answers.raw_errors += answers.raw_errors
            check_after_crash(ledger_db, all_answers, f"seed {seed} round {i}")
            flushed.add(watermark(ledger_db))
    assert len(flushed) >= 2, flushed  # W moved between kills


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rounds", [6, pytest.param(40, marks=pytest.mark.slow)])
def test_sigkill_at_the_nth_write_or_fsync_of_the_ledger_keeps_every_promise(
    tmp_path: Path, shim: Path, rounds: int
) -> None:
    """The LD_PRELOAD shim SIGKILLs the child exactly at its Nth write or fsync of the ledger's
    files (N random): kills land inside commits, among them the flushes' (a run is written
    every 5 rows, so about every other commit carries one), torn WAL frames included."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    ledger = LedgerDb.sqlite(tmp_path / "db" / "ledger.db")
    ledger.path.parent.mkdir()
    script = _child_script(tmp_path)
    all_answers = faults.Answers()
    working = 0  # rounds killed after some acknowledgements (not inside Bank.open)
    with faults.ForkServer({"LD_PRELOAD": str(shim)}) as server:
        for i in range(rounds):
            log, err = tmp_path / f"r{i}.log", tmp_path / f"r{i}.err"
            env = {
                "ATTACK_RUN_ROWS": str(RUN),
                "BANK_FAULT_OPS": "fsync,write",
                "BANK_FAULT_AFTER": str(rng.randint(10, 300)),
                "BANK_FAULT_ACTION": "kill",
                "BANK_FAULT_PATH": str(ledger.path.parent),
            }
            pid = server.spawn(script, _child_args(ledger.path, f"n{i}-", seed + i), log, err, env)
            code = server.wait(pid, timeout_s=30.0)
            assert code == -signal.SIGKILL, (seed, i, code, err.read_text()[-2000:])
            answers = faults.parse_answers(faults.read_lines(log))
            working += bool(answers.acked)
            all_answers.acked.update(answers.acked)
            all_answers.refused.update(answers.refused)
            all_answers.raw_errors += answers.raw_errors
            if ledger.path.exists() and ledger.query(
                "SELECT count(*) FROM sqlite_master WHERE name = 'postings_upto'"
            ) == [(1,)]:
                check_after_crash(ledger, all_answers, f"seed {seed} round {i}")
    assert working >= rounds // 2, f"seed {seed}: {working} of {rounds} rounds killed under load"


# -- 2, 3. readers in other processes (and a LedgerReader) beside a bank that moves W ---------

#: A reader process: plain sqlite3 (autocommit: each statement its own read transaction) or
#: psycopg (autocommit: each statement its own READ COMMITTED snapshot). It runs the store's
#: statements as they are (postings.history_sql, BALANCE_AT_SQL) with random cursors and
#: limits until the stop file appears, and logs each read with the head it knew before it.
READER_SCRIPT = r"""
import json, os, random, re, sys
from bank.ledger import postings
dialect, where, stop, out, accounts = sys.argv[1:6]
accounts = [int(a) for a in accounts.split(",")]
rng = random.Random(int(sys.argv[6]))
if dialect == "sqlite":
    import sqlite3
    conn = sqlite3.connect(f"file:{where}?mode=ro", uri=True, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    def run(sql, params):
        return conn.execute(sql, params).fetchall()
else:
    import psycopg
    conn = psycopg.connect(where, autocommit=True)
    def run(sql, params):
        return conn.execute(re.sub(r":(\w+)", r"%(\1)s", sql), params).fetchall()
# The page statement each backend's reads module gives it (SQLite: the merged compound).
asc = postings.history_sql(merged=dialect == "sqlite", descending=False)
desc = postings.history_sql(merged=dialect == "sqlite", descending=True)
with open(out, "w") as log:
    n = 0
    while not os.path.exists(stop) or n < 50:
        n += 1
        ((head,),) = run("SELECT coalesce(max(seq), 0) FROM transfers", {})
        ((w,),) = run("SELECT seq FROM postings_upto", {})
        account = rng.choice(accounts)
        what = rng.random()
        if what < 0.15:
            seq = rng.randint(0, head)
            got = run(postings.BALANCE_AT_SQL, {"account": account, "seq": seq})
            record = {"op": "balance", "seq": seq, "value": got[0][0] if got else 0}
        else:
            after = rng.choice([0, max(0, head - rng.randint(0, 12)), rng.randint(0, head + 1), w, w + 1])
            limit = rng.choice([1, 2, 3, 5, 8])
            descending = what > 0.6
            if descending:
                upper = after - 1 if after else 2**63 - 1
                rows = run(desc, {"account": account, "upper": upper, "limit": limit})
            else:
                rows = run(asc, {"account": account, "after": after, "limit": limit})
            record = {"op": "page", "after": after, "limit": limit, "desc": descending,
                      "seqs": [r[0] for r in rows],
                      "sides": [[r[4], r[5]] for r in rows]}
        record.update(account=account, head=head, w=w)
        log.write(json.dumps(record) + "\n")
"""


def _watermarks_seen(outs: Iterable[Path]) -> set[int]:
    """The W values the reader processes' complete lines so far recorded."""
    seen: set[int] = set()
    for out in outs:
        for line in faults.read_lines(out):
            with contextlib.suppress(ValueError):
                seen.add(int(json.loads(line)["w"]))
    return seen


def check_read(replay: Replay, record: dict[str, Any]) -> None:
    """A read made at some snapshot at or after the head it knew (`head`): rows are
    append-only, so it is a piece of the final ledger's history, exactly determined up to
    that head. Raises AssertionError naming the read."""
    account, head = record["account"], record["head"]
    if record["op"] == "balance":
        assert record["value"] == replay.balance(account, record["seq"]), record
        return
    seqs, after, limit = record["seqs"], record["after"], record["limit"]
    mine = [r.seq for r in replay.mine(account)]
    for debit, credit in record.get("sides", []):
        assert account in (debit, credit), record  # never a row of other accounts
    if record["desc"]:
        bound = after if after else (seqs[0] + 1 if seqs else 0)
        if after == 0:  # from the newest: at least everything up to the head it knew
            assert not seqs or seqs[0] >= max([s for s in mine if s <= head], default=0), record
            if not seqs:
                assert not [s for s in mine if s <= head], record
        want = [s for s in reversed(mine) if s < bound][:limit]
        assert seqs == want, (record, want)
        return
    want = [s for s in mine if s > after]
    assert seqs == want[: len(seqs)], (record, want[:limit])  # no skip, no repeat, in order
    known = [s for s in want if s <= head]
    assert len(seqs) >= min(limit, len(known)), (record, known[:limit])  # nothing cut short


def _writer(
    b: bank.Bank, ids: list[int], stop: threading.Event, seed: int, pace_s: float = 0.0
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        time.sleep(pace_s)
        commands: list[Any] = []
        for _ in range(rng.choice((1, 1, 2, 3, 6, 11))):
            if rng.random() < 0.25:
                commands.append(bank.Deposit(account=rng.choice(ids), amount=rng.randint(1, 99)))
            else:
                s, t = rng.sample(ids, 2)
                commands.append(bank.Transfer(source=s, target=t, amount=rng.randint(1, 40)))
        for f in b.submit_many(commands):
            f.result()


def _reader_thread(
    reader: LedgerReader, ids: list[int], stop: threading.Event, records: list[Any], seed: int
) -> None:
    """The same reads through `LedgerReader` (its own snapshot per read)."""
    rng = random.Random(seed)
    while not stop.is_set() or len(records) < 50:
        head = reader.read(store.last_seq)
        account = rng.choice(ids)
        if rng.random() < 0.2:
            seq = rng.randint(0, head)
            value = reader.balance(account, at_seq=seq)
            records.append(
                {"op": "balance", "seq": seq, "value": value, "account": account, "head": head}
            )
            continue
        after = rng.choice([0, max(0, head - rng.randint(0, 12)), rng.randint(0, head + 1)])
        limit = rng.choice([1, 2, 3, 5, 8])
        descending = rng.random() < 0.4
        if descending:
            rows = _read_page(reader, account, after, limit, descending=True)
        else:
            rows = reader.history(account, after_seq=after, limit=limit)
        records.append(
            {
                "op": "page",
                "after": after,
                "limit": limit,
                "desc": descending,
                "seqs": [r.seq for r in rows],
                "sides": [[r.debit_account, r.credit_account] for r in rows],
                "account": account,
                "head": head,
            }
        )


def _bank_reader_thread(
    b: bank.Bank, ids: list[int], stop: threading.Event, records: list[Any], seed: int
) -> None:
    """The writing bank's own reads (`Bank.history`, `Bank.balance(at_seq=)`), the head it
    knew being its durable snapshot's."""
    rng = random.Random(seed)
    while not stop.is_set() or len(records) < 50:
        head = b.snapshot().seq
        account = rng.choice(ids)
        if rng.random() < 0.25:
            seq = rng.randint(0, head)
            value = b.balance(account, at_seq=seq)
            records.append(
                {"op": "balance", "seq": seq, "value": value, "account": account, "head": head}
            )
            continue
        after = rng.choice([0, max(0, head - rng.randint(0, 12)), rng.randint(0, head + 1)])
        limit = rng.choice([1, 2, 3, 5, 8])
        rows = b.history(account, after_seq=after, limit=limit)
        records.append(
            {
                "op": "page",
                "after": after,
                "limit": limit,
                "desc": False,
                "seqs": [r.seq for r in rows],
                "sides": [[r.debit_account, r.credit_account] for r in rows],
                "account": account,
                "head": head,
            }
        )


@pytest.mark.timeout(240)
def test_readers_in_other_processes_see_exact_pages_while_flushes_move_w(
    ledger_db: LedgerDb, tmp_path: Path
) -> None:
    """A bank writes (a run every 5 rows: W moves every few commits) for a few seconds while
    two reader processes (plain sqlite3 / psycopg at READ COMMITTED, the store's own
    statements) and a LedgerReader thread read pages and balances as of a seq; afterwards
    every read is checked against the replay of the final ledger."""
    seed = random.randrange(2**31)
    stop_file = tmp_path / "stop"
    with bank.Bank.open(ledger_db.db) as b:
        ids = [b.open_account(f"r{i}", overdraft_limit=1_000_000).id for i in range(4)]
        for f in b.submit_many([bank.Deposit(account=a, amount=1_000) for a in ids]):
            f.result()
        where = (
            str(ledger_db.path)
            if ledger_db.backend == "sqlite"
            else (postgres.libpq_conninfo(ledger_db.url))
        )
        accounts = ",".join(map(str, [0, *ids]))
        procs = []
        for k in range(2):
            out = tmp_path / f"reader{k}.jsonl"
            procs.append(
                (
                    out,
                    subprocess.Popen(
                        [
                            *(sys.executable, "-c", READER_SCRIPT, ledger_db.backend, where),
                            *(str(stop_file), str(out), accounts, str(seed + k)),
                        ],
                        env=faults.child_env(),
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
        stop = threading.Event()
        records: list[Any] = []
        bank_records: list[Any] = []
        errors: list[BaseException] = []

        def guarded(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    fn()
                except BaseException as exc:
                    errors.append(exc)
                    stop.set()

            return run

        with LedgerReader(ledger_db.db) as reader:
            threads = [
                threading.Thread(target=guarded(lambda: _writer(b, ids, stop, seed)), daemon=True),
                threading.Thread(
                    target=guarded(lambda: _reader_thread(reader, [0, *ids], stop, records, seed)),
                    daemon=True,
                ),
                threading.Thread(
                    target=guarded(
                        lambda: _bank_reader_thread(b, [0, *ids], stop, bank_records, seed + 9)
                    ),
                    daemon=True,
                ),
            ]
            for t in threads:
                t.start()
            # Until each reader process has made 150 reads (they start slowly on a busy
            # machine), the readers have seen W take 10 values (a slow machine writes
            # slowly: a fixed time saw only 1-4), and for 1.5 s at least.
            started, deadline = time.monotonic(), time.monotonic() + 180.0
            while (
                time.monotonic() < started + 1.5
                or any(len(faults.read_lines(out)) < 150 for out, _ in procs)
                or len(_watermarks_seen(out for out, _ in procs)) < 10
            ):
                assert time.monotonic() < deadline and not errors, ("watchdog", errors)
                for _, proc in procs:
                    if proc.poll() is not None:
                        raise AssertionError(f"a reader died: {proc.communicate()[1][-3000:]}")
                time.sleep(0.05)
            stop.set()
            stop_file.touch()
            for t in threads:
                t.join(60)
                assert not t.is_alive(), "watchdog: a thread hung"
        for _, proc in procs:
            try:
                _, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            assert proc.returncode == 0, stderr[-3000:]
    assert not errors, errors
    w, head = assert_postings_agree(ledger_db)
    replay = Replay.of(ledger_db)
    seen_w: set[int] = set()
    reads = records + bank_records
    assert len(bank_records) >= 50 and len(records) >= 50
    for out, _ in procs:
        for line in out.read_text().splitlines():
            record = json.loads(line)
            seen_w.add(record["w"])
            reads.append(record)
    for record in reads:
        check_read(replay, record)
    # The check has teeth: a page with a row taken out, or one row too many, is refused.
    sample = next(r for r in reads if r["op"] == "page" and len(r["seqs"]) >= 3)
    for seqs in (sample["seqs"][:1] + sample["seqs"][2:], [*sample["seqs"], sample["seqs"][-1]]):
        with pytest.raises(AssertionError):
            check_read(replay, {**sample, "seqs": seqs, "sides": []})
    print(f"{len(reads)} reads, W took {len(seen_w)} values, final W {w} head {head}")
    assert len(seen_w) >= 10, f"W moved only {len(seen_w)} times under the readers"
    assert len(reads) >= 300, len(reads)


# -- 4. faults during the flushes' commits -----------------------------------------------------


def _settle(server: faults.ForkServer, pid: int, log: Path, err: Path) -> faults.Answers:
    """The child ends by itself after its failure (no hang); what it was told."""
    code = server.wait(pid, timeout_s=60.0)
    assert code in (0, 2), (code, err.read_text()[-2000:])
    return faults.parse_answers(faults.read_lines(log))


def _promises_kept(ledger: LedgerDb, answers: faults.Answers, where: str) -> None:
    problems = faults.specific_error_problems(answers)
    problems += faults.stopped_after_first_unknown(answers)
    assert not problems, (where, problems[:5])
    with bank.Bank.open(ledger.db) as b:  # recovery, then the chain goes on (a flush or not)
        for key, seq in answers.acked.items():
            found = b.find(key)
            assert found is not None and found.seq == seq, (where, key, seq, found)
        head = b.snapshot().seq
        for k in range(RUN):
            assert b.deposit(1, 1).seq == head + 1 + k, where
    check_after_crash(ledger, answers, where)


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("ops", "error"),
    [
        ("fsync", errno.EIO),
        pytest.param("write", errno.EIO, marks=pytest.mark.slow),
        ("write", errno.ENOSPC),
    ],
    ids=["fsync-EIO", "write-EIO", "write-ENOSPC"],
)
def test_a_failing_fsync_or_write_at_a_random_call_loses_nothing_and_keeps_w(
    tmp_path: Path, shim: Path, ops: str, error: int
) -> None:
    """Rounds on one ledger: the shim fails the child's Nth fsync or write of the ledger's
    files (N random, so about every other failure hits a commit that carries a flush); the
    bank answers LedgerUnavailable and stops; reopened, nothing acknowledged is lost,
    nothing refused is there, W and the postings agree and every read is the replay's."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    ledger = LedgerDb.sqlite(tmp_path / "db" / "ledger.db")
    ledger.path.parent.mkdir()
    script = _child_script(tmp_path)
    unknown = 0
    with faults.ForkServer({"LD_PRELOAD": str(shim)}) as server:
        for i in range(2):
            log, err = tmp_path / f"f{i}.log", tmp_path / f"f{i}.err"
            env = {
                "ATTACK_RUN_ROWS": str(RUN),
                "BANK_FAULT_OPS": ops,
                "BANK_FAULT_ERRNO": str(error),
                "BANK_FAULT_AFTER": str(rng.randint(40, 400)),
                "BANK_FAULT_PATH": str(ledger.path.parent),
            }
            pid = server.spawn(script, _child_args(ledger.path, f"f{i}-", seed + i), log, err, env)
            answers = _settle(server, pid, log, err)
            unknown += bool(answers.unknown)
            if answers.opened:
                _promises_kept(ledger, answers, f"seed {seed} round {i}")
    assert unknown >= 1, f"seed {seed}: the fault never hit a running bank"


@pytest.mark.timeout(150)
def test_a_disk_that_fills_while_runs_are_flushed_loses_nothing_and_keeps_w(tmp_path: Path) -> None:
    """A 320 KiB tmpfs fills under a child that flushes every 5 rows (a flush's commit is the
    largest, so the disk tends to fill on one); freed, the ledger reopens with its promises
    kept; filled again and freed again, twice."""
    try:
        fs = faults.mount_tmpfs(tmp_path / "fs", "320k")
    except faults.FaultUnavailable as exc:
        pytest.skip(str(exc))
    try:
        ledger = LedgerDb.sqlite(fs.path / "ledger.db")
        script = _child_script(tmp_path)
        with faults.ForkServer() as server:
            for i in range(2):
                log, err = tmp_path / f"d{i}.log", tmp_path / f"d{i}.err"
                env = {"ATTACK_RUN_ROWS": str(RUN)}
                pid = server.spawn(script, _child_args(ledger.path, f"d{i}-", i), log, err, env)
                answers = _settle(server, pid, log, err)
                assert answers.opened and answers.unknown, (i, faults.read_lines(log)[-5:])
                fs.resize("64m")
                _promises_kept(ledger, answers, f"round {i}")
                used = os.statvfs(fs.path)
                fs.resize(f"{(used.f_blocks - used.f_bfree) * used.f_frsize // 1024 + 160}k")
    finally:
        fs.unmount()


# -- the audit beside a bank that moves W ------------------------------------------------------


@pytest.mark.timeout(120)
def test_audits_beside_a_bank_that_flushes_every_few_rows_are_clean(
    ledger_db: LedgerDb, tmp_path: Path
) -> None:
    """W, the postings and the transfers up to W must come from one snapshot: audits (in
    this process, and `bank audit` in another) run over and over while the bank moves W
    every few commits, and every one of them is clean."""
    seed = random.randrange(2**31)
    with bank.Bank.open(ledger_db.db) as b:
        ids = [b.open_account(f"a{i}", overdraft_limit=1_000_000).id for i in range(4)]
        stop = threading.Event()
        errors: list[BaseException] = []

        def write() -> None:
            try:
                _writer(b, ids, stop, seed, pace_s=0.003)
            except BaseException as exc:
                errors.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            reports: list[Any] = []
            cli_runs: list[tuple[int, str, str]] = []
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline or len(cli_runs) < 1:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bank", "audit", "--db", str(ledger_db.db), "--json"],
                    env=faults.child_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                while proc.poll() is None or not reports:
                    reports.append(audit_ledger(ledger_db.db))
                    assert not errors, errors
                out, err = proc.communicate(timeout=60)
                cli_runs.append((proc.returncode, out, err))
        finally:
            stop.set()
            writer.join(60)
            assert not writer.is_alive(), "watchdog: the writer hung"
    assert not errors, errors
    for report in reports:
        assert report.ok, [p.message for p in report.problems[:5]]
    for code, out, err in cli_runs:
        assert code == 0, (out[-2000:], err[-2000:])
    assert_postings_agree(ledger_db)
    assert watermark(ledger_db) > 20 * RUN, "the bank hardly wrote beside the audits"


def test_a_forged_posting_never_zeroes_balances_as_of_a_seq(
    filled: tuple[LedgerDb, list[int]],
) -> None:
    """An extra posting (a row that does not name the account) above the account's newest
    real row below W: the point balance steps past it (BALANCE_AT_SQL filters before its
    LIMIT 1); `balances_at` (BALANCES_AT_SQL, the query the README gives auditors) must too."""
    ledger, ids = filled
    replay = Replay.of(ledger)
    w = watermark(ledger)
    newest, account = min((max(r.seq for r in replay.mine(a) if r.seq <= w), a) for a in ids[:5])
    foreign = next(r.seq for r in replay.rows if newest < r.seq <= w and account not in r[4:6])
    ledger.execute(f"INSERT INTO postings (account_id, seq) VALUES ({account}, {foreign})")
    with LedgerReader(ledger.db) as reader:
        for seq in range(foreign, replay.head + 1):
            want = replay.balance(account, seq)
            assert reader.balance(account, at_seq=seq) == want, seq
            assert reader.balances_at(seq).get(account) == want, (ledger.backend, seq, want)


# -- SIGKILL inside the upgrade's backfill ----------------------------------------------------

UPGRADE_SCRIPT = """
import sys
import bank
print("OPENING", flush=True)
bank.Bank.open(sys.argv[1]).close()
print("UPGRADED", flush=True)
"""
OLD_INDEXES = {"ix_transfers_debit_account_id_seq", "ix_transfers_credit_account_id_seq"}


def _migrate(ledger: LedgerDb, verb: str, revision: str) -> None:
    from alembic import command
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from bank.ledger.migrate import ALEMBIC_LOCK, alembic_config

    engine = create_engine(ledger.url, poolclass=NullPool)
    try:
        with ALEMBIC_LOCK, engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            getattr(command, verb)(cfg, revision)
    finally:
        engine.dispose()


def _schema_state(ledger: LedgerDb) -> tuple[str, set[str], set[str]]:
    ((revision,),) = ledger.query("SELECT version_num FROM alembic_version")
    names = {str(n) for (n,) in ledger.query("SELECT name FROM sqlite_master")}
    return str(revision), names & OLD_INDEXES, names & {"postings", "postings_upto"}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_inside_the_upgrade_leaves_0006_or_a_whole_0007(tmp_path: Path, shim: Path) -> None:
    """A 0006 ledger (1,500 rows, the two account indexes) upgraded by a child's Bank.open,
    killed by the shim at its Nth write or fsync of the ledger (N random over the whole
    upgrade): the file is at 0006 as it was or at 0007 with every posting and W = head,
    never between; the next Bank.open upgrades (or goes on) and every read is the replay's."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    template = LedgerDb.sqlite(tmp_path / "template" / "ledger.db")
    template.path.parent.mkdir()
    with bank.Bank.open(template.db) as b:
        _fill(b, random.Random(seed), 1_500)
    _migrate(template, "downgrade", "0006")
    assert _schema_state(template) == ("0006", OLD_INDEXES, set())
    replay = Replay.of(template)
    script = tmp_path / "upgrade.py"
    script.write_text(UPGRADE_SCRIPT)
    outcomes: set[str] = set()
    with faults.ForkServer({"LD_PRELOAD": str(shim)}) as server:
        for i in range(4):
            ledger = LedgerDb.sqlite(tmp_path / f"u{i}" / "ledger.db")
            ledger.path.parent.mkdir()
            shutil.copyfile(template.path, ledger.path)
            out, err = tmp_path / f"u{i}.out", tmp_path / f"u{i}.err"
            env = {
                "BANK_FAULT_OPS": "fsync,write",
                "BANK_FAULT_AFTER": str(i * 32 + rng.randint(0, 31) if i else 10**6),
                "BANK_FAULT_ACTION": "kill",
                "BANK_FAULT_PATH": str(ledger.path.parent),
            }
            pid = server.spawn(script, [str(ledger.path)], out, err, env)
            code = server.wait(pid, timeout_s=60.0)
            assert code in (0, -signal.SIGKILL), (seed, i, code, err.read_text()[-2000:])
            state = _schema_state(ledger)
            if state[0] == "0006":
                assert state[1:] == (OLD_INDEXES, set()), (seed, i, state)
                outcomes.add("0006")
            else:
                assert state == ("0007", set(), {"postings", "postings_upto"}), (seed, i, state)
                assert assert_postings_agree(ledger) == (replay.head, replay.head), (seed, i)
                outcomes.add("0007")
            with bank.Bank.open(ledger.db):
                pass
            assert assert_postings_agree(ledger) == (replay.head, replay.head), (seed, i)
            assert Replay.of(ledger).rows == replay.rows
            report = audit_ledger(ledger.db)
            assert report.ok, (seed, i, [p.message for p in report.problems[:3]])
            with LedgerReader(ledger.db) as reader:
                for account in sorted(replay.by_account)[:3]:
                    got = list(reader.iter_history(account, page=50))
                    assert got == replay.mine(account), (seed, i, account)
    assert "0007" in outcomes, outcomes  # the unharmed round upgraded


# -- bank copy of a ledger that a bank is writing -------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.postgres
def test_a_copy_taken_while_the_source_flushes_has_its_own_right_w(
    ledger_db: LedgerDb, postgres_server: postgres.Server, tmp_path: Path
) -> None:
    """`bank copy` from a ledger a bank is writing (W moving every few commits) to the other
    backend: the copy audits clean against the source snapshot's head, its postings are
    both sides of every row it has, W its head; a bank on the copy goes on flushing."""
    from bank.ledger.copy import copy_ledger

    other = (
        LedgerDb("postgres", url := postgres_server.create_database(), url, postgres_server)
        if ledger_db.backend == "sqlite"
        else LedgerDb.sqlite(tmp_path / "copy" / "ledger.db")
    )
    if other.server is None:
        other.path.parent.mkdir()
    seed = random.randrange(2**31)
    try:
        with bank.Bank.open(ledger_db.db) as b:
            ids = [b.open_account(f"k{i}", overdraft_limit=1_000_000).id for i in range(4)]
            stop = threading.Event()
            errors: list[BaseException] = []

            def write() -> None:
                try:
                    _writer(b, ids, stop, seed, pace_s=0.002)
                except BaseException as exc:
                    errors.append(exc)

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            try:
                time.sleep(0.5)
                report = copy_ledger(ledger_db.db, other.db)
            finally:
                stop.set()
                writer.join(60)
                assert not writer.is_alive(), "watchdog: the writer hung"
        assert not errors, errors
        assert report.ok, [p.message for p in report.audit.problems[:5]]
        w, head = assert_postings_agree(other)
        assert w == head and head > 20 * RUN, (w, head)
        assert Replay.of(other).rows == Replay.of(ledger_db).rows[:head]
        with bank.Bank.open(other.db) as b:
            for _ in range(RUN):
                b.deposit(ids[0], 1)
        w2, head2 = assert_postings_agree(other)
        assert head2 == head + RUN and w2 == head2, (w2, head2)
        assert audit_ledger(other.db).ok
    finally:
        if other.server is not None:
            other.drop()


def test_a_watermark_row_with_another_id_is_refused_at_open(
    filled: tuple[LedgerDb, list[int]],
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    """W's one row moved to id 2 (past the CHECK): the audit says so; a bank must refuse to
    open, not open and then stop at its first flush saying the table was edited under it."""
    ledger, ids = filled
    if ledger.backend == "sqlite":
        conn = sqlite3.connect(ledger.path, isolation_level=None)
        try:
            conn.execute("PRAGMA ignore_check_constraints = 1")
            conn.execute("UPDATE postings_upto SET id = 2")
        finally:
            conn.close()
    else:
        ledger.execute(*_pg_drop_checks(ledger), "UPDATE postings_upto SET id = 2")
    code, problems = _audit_cli(ledger, capsys)
    assert code == 1 and any("has id 2, not 1" in p["message"] for p in problems), problems
    with pytest.raises(bank.LedgerCorrupt, match="postings_upto"), bank.Bank.open(ledger.db) as b:
        for _ in range(RUN):
            b.deposit(ids[0], 1)


# -- every kind of row goes through the runs ------------------------------------------------


@pytest.mark.timeout(120)
def test_holds_expiries_groups_and_events_keep_the_tail_below_a_run(ledger_db: LedgerDb) -> None:
    """Holds (posted, voided, and expired by the engine's own timer), linked groups, limit
    changes and an account closed: after every step the tail above W is shorter than a run
    (whoever wrote the rows: a teller's batch or the expiry timer), the postings agree, and
    every page and balance as of a seq is the replay's."""
    rng = random.Random(5)
    with bank.Bank.open(ledger_db.db) as b:
        ids = [b.open_account(f"h{i}", overdraft_limit=500).id for i in range(4)]
        for a in ids:
            b.deposit(a, 1_000)
        for step in range(6):
            held = [b.hold(ids[i % 4], ids[(i + 1) % 4], 7 + i) for i in range(3)]
            b.post(held[0].seq, 3)
            b.void(held[1].seq)
            for i in range(rng.randint(1, 7)):
                b.hold(ids[i % 4], ids[(i + 2) % 4], 1 + i, expires_s=0.02)
            b.submit_linked(
                [
                    bank.Transfer(source=ids[0], target=ids[1], amount=2),
                    bank.Deposit(account=ids[2], amount=3),
                    bank.Withdrawal(account=ids[3], amount=1),
                ]
            ).result()
            b.set_overdraft_limit(ids[step % 4], 400 + step)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ((pending,),) = ledger_db.query(
                    "SELECT count(*) FROM transfers AS h WHERE h.kind = 'hold' AND NOT EXISTS "
                    "(SELECT 1 FROM transfers AS s WHERE s.hold_seq = h.seq)"
                )
                if pending == 1:  # only held[2]: the timer expired the others on its own
                    break
                time.sleep(0.02)
            else:
                raise AssertionError("watchdog: the holds did not expire")
            b.void(held[2].seq)
            w, head = assert_postings_agree(ledger_db)
            assert head - w < RUN, (step, w, head)
        closing = b.open_account("closing").id
        b.deposit(closing, 5)
        b.withdraw(closing, 5)
        b.close_account(closing)
        w, head = assert_postings_agree(ledger_db)
        assert head - w < RUN and w > 10 * RUN, (w, head)
    replay = Replay.of(ledger_db)
    kinds = {r.kind for r in replay.rows}
    assert {"hold", "post", "void", "expire", "transfer", "deposit", "withdrawal"} <= kinds, kinds
    check_after_crash(ledger_db, faults.Answers(), "holds")


# -- the PostgreSQL server crashes while runs are flushed ------------------------------------


@pytest.fixture
def crash_cluster() -> Iterator[Any]:
    """A private PostgreSQL cluster (fsync on) that a test may SIGKILL and restart."""
    from tests.test_postgres_attacks import _Cluster

    root = postgres.scratch_dir("bank-postings-attack-")
    c = _Cluster(root)
    try:
        c.init()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(300)
@pytest.mark.parametrize("crashes", [1, 5])
def test_the_server_crashing_while_runs_are_flushed_keeps_every_promise(
    crash_cluster: Any, tmp_path: Path, crashes: int
) -> None:
    """`crashes` times: a child bank (a run every 5 rows) under keyed load, every server process
    SIGKILLed at a random moment (WAL replay at restart), the child told LedgerUnavailable;
    restarted, the acknowledged keys are there once, W and the postings agree, the audit is
    clean and every read is the replay's; the next child goes on from there."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    url = crash_cluster.url()
    ledger = LedgerDb("postgres", url, url, None)
    script = _child_script(tmp_path)
    all_answers = faults.Answers()
    with faults.ForkServer() as server:
        for i in range(crashes):
            log, err = tmp_path / f"c{i}.log", tmp_path / f"c{i}.err"
            env = {"ATTACK_RUN_ROWS": str(RUN)}
            pid = server.spawn(script, _child_args(url, f"c{i}-", seed + i), log, err, env)
            acks = rng.randint(20, 150)

            def enough(lines: list[str], n: int = acks) -> bool:
                return _acks(lines) >= n

            code: int | None = None
            try:
                _wait_lines(log, enough, 60.0)
                time.sleep(rng.random() * 0.05)
                crash_cluster.crash()
                code = server.wait(pid, timeout_s=60.0)
            finally:
                if code is None:  # not reaped yet: never leave the child behind
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    server.wait(pid)
            assert code in (0, 2), (seed, i, code, err.read_text()[-2000:])
            answers = faults.parse_answers(faults.read_lines(log))
            assert answers.unknown, (seed, i, "nobody was told the server went away")
            all_answers.acked.update(answers.acked)
            all_answers.refused.update(answers.refused)
            all_answers.raw_errors += answers.raw_errors
            crash_cluster.start()
            check_after_crash(ledger, all_answers, f"seed {seed} crash {i}")


def test_a_reader_opened_before_the_upgrade_reads_right_after_it(ledger_db: LedgerDb) -> None:
    """A LedgerReader opened on a 0006 ledger (it reads with 0005's queries); a bank then
    upgrades the ledger (indexes dropped, postings backfilled) and writes more runs: the
    old reader's pages and balances are still exactly the replay's."""
    with bank.Bank.open(ledger_db.db) as b:
        ids = _fill(b, random.Random(3), 60)
    _migrate(ledger_db, "downgrade", "0006")
    with LedgerReader(ledger_db.db) as reader:
        assert not reader.postings
        with bank.Bank.open(ledger_db.db) as b:  # the upgrade, then more rows and flushes
            for i in range(3 * RUN + 2):
                b.transfer(ids[i % 5], ids[(i + 1) % 5], 1)
        w, head = assert_postings_agree(ledger_db)
        assert 60 < w <= head
        replay = Replay.of(ledger_db)
        for account in (0, *ids):
            assert list(reader.iter_history(account, page=3)) == replay.mine(account)
            for seq in (0, w - 1, w, head):
                assert reader.balance(account, at_seq=seq) == replay.balance(account, seq)
            got = _read_page(reader, account, 0, 4, descending=True)
            assert got == replay.page(account, 0, 4, descending=True)
