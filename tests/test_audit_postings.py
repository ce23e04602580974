"""The audit's rule for revision 0007: postings agree with transfers, and W is right.

The pure check (`bank.ledger.audit_postings`) on figures made by hand; the fingerprint
as both databases compute it against its Python twin (64-bit extremes included);
and, on a ledger the real engine wrote with a small run size (so that it holds
postings below the watermark and a tail above it), every forgery of the postings or
the watermark is found by `bank audit` (exit 1) with a message that names it, on
SQLite and on PostgreSQL alike.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

import bank
from bank.cli import main
from bank.ledger import postings as postings_module
from bank.ledger.audit_postings import (
    LOCATED_MAX,
    FingerprintKeys,
    PostingsDifferences,
    PostingsSums,
    Sums,
    check_postings,
    check_watermark,
    fingerprint,
    fingerprint_sql,
)
from bank.ledger.audit_problems import Problems
from tests import postgres
from tests.conftest import LEDGER_PARAMS, LedgerDb, new_ledger

# -- the pure check ------------------------------------------------------------------------


def _kinds(problems: Problems) -> list[str]:
    return [p.kind for p in problems.kept]


def _never() -> PostingsDifferences:
    raise AssertionError("the postings were looked for although the figures agree")


def test_a_sound_watermark_and_agreeing_figures_are_no_problem() -> None:
    problems = Problems()
    assert check_watermark([(1, 40)], 50, problems) == 40
    sums = PostingsSums(Sums(80, 12345), Sums(80, 12345), transfers=40, above=0)
    check_postings(40, sums, _never, problems)
    assert problems.total == 0
    assert check_watermark([(1, 0)], 0, problems) == 0  # an empty ledger: W = 0 = head
    assert problems.total == 0


@pytest.mark.parametrize(
    ("rows", "head", "kind", "says", "usable"),
    [
        ([], 10, "schema", "holds 0 rows, not exactly one", False),
        ([(1, 3), (2, 3)], 10, "schema", "holds 2 rows", False),
        ([(2, 3)], 10, "schema", "has id 2, not 1", True),
        ([(1, "3")], 10, "postings_watermark", "holds '3', not an integer", False),
        ([(1, -1)], 10, "postings_watermark", "is -1, below 0", False),
        ([(1, 11)], 10, "postings_watermark", "is 11, beyond the last transfer 10", True),
    ],
)
def test_each_wrong_watermark_is_named(
    rows: list[tuple[object, object]], head: int, kind: str, says: str, usable: bool
) -> None:
    problems = Problems()
    found = check_watermark(rows, head, problems)
    assert (found is not None) == usable
    assert _kinds(problems) == [kind]
    assert says in problems.kept[0].message


def test_differing_figures_name_each_posting_that_differs() -> None:
    problems = Problems()
    located = PostingsDifferences(
        lost=[(5, 3), (7, 2), (9, 4), (12, 1), (12, 6)],
        extra=[(5, 8), (11, 4), (20, 20)],
    )
    sums = PostingsSums(Sums(99, 1), Sums(100, 2), transfers=50, above=0)
    check_postings(50, sums, lambda: located, problems)
    messages = [p.message for p in problems.kept]
    assert "W=50: 99 posting(s) at seq <= W, the 50 transfer(s) up to W need 100" in messages[0]
    assert "5 lost, 3 extra" in messages[0]
    assert "transfer 5 for account 3 was moved to account 8 instead of 3" in messages[1]
    assert "transfer 9 for account 4 was moved to seq 11 instead of 9" in messages[2]
    assert "posting (2, 7) is lost" in messages[3]
    # Both sides of one transfer lost: one problem per side when it is a single seq.
    assert "posting (1, 12) is lost" in messages[4] and "posting (6, 12) is lost" in messages[5]
    assert "posting (20, 20) is extra: no transfer at seq 20 names account 20" in messages[6]
    assert [(p.seq, p.account) for p in problems.kept[1:]] == [
        (5, 3),
        (9, 4),
        (7, 2),
        (12, 1),
        (12, 6),
        (20, 20),
    ]


def test_a_run_of_lost_transfers_is_one_problem() -> None:
    problems = Problems()
    lost = [(seq, account) for seq in range(61, 86) for account in (1, 2)]
    sums = PostingsSums(Sums(120, 1), Sums(200, 2), transfers=100, above=0)
    check_postings(100, sums, lambda: PostingsDifferences(lost, []), problems)
    assert len(problems.kept) == 2
    assert f"at least {LOCATED_MAX} lost, 0 extra" in problems.kept[0].message
    assert "both postings of each transfer 61..85 are lost (50 postings)" in (
        problems.kept[1].message
    )


def test_postings_above_the_watermark_are_named_with_the_first() -> None:
    problems = Problems()
    sums = PostingsSums(Sums(80, 1), Sums(80, 1), transfers=40, above=6, first_above=(41, 3))
    check_postings(40, sums, _never, problems)
    assert _kinds(problems) == ["postings_watermark"]
    (problem,) = problems.kept
    assert "6 posting(s) above the watermark W=40 (the first at seq 41, account 3)" in (
        problem.message
    )
    assert (problem.seq, problem.account) == (41, 3)


def test_same_counts_other_postings_without_a_located_one() -> None:
    """Only the fingerprint differs and no posting is found (a concurrent reader of a
    broken store): the figures still make a problem."""
    problems = Problems()
    sums = PostingsSums(Sums(80, 1), Sums(80, 2), transfers=40, above=0)
    check_postings(40, sums, lambda: PostingsDifferences([], []), problems)
    assert _kinds(problems) == ["postings"]
    assert "the same number, but other postings" in problems.kept[0].message


# -- the fingerprint on both databases -------------------------------------------------------

_EXTREMES = [
    0,
    1,
    -1,
    7,
    2**30 - 1,
    2**30,
    -(2**30),
    2**31 - 1,
    2**31,
    -(2**31),
    2**62,
    2**63 - 1,
    -(2**63),
]


@pytest.fixture(params=LEDGER_PARAMS)
def any_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerDb]:
    ledger = new_ledger(request, tmp_path)
    if ledger.backend == "sqlite":
        sqlite3.connect(ledger.path).close()
    yield ledger
    if ledger.server is not None:
        ledger.drop()


def test_the_fingerprint_is_the_same_in_sql_on_both_and_in_python(
    any_database: LedgerDb,
) -> None:
    rng = random.Random(3)
    values = _EXTREMES + [rng.randrange(-(2**63), 2**63) for _ in range(20)]
    pairs = list(itertools.product(values, repeat=2))
    for keys in (FingerprintKeys.draw(), FingerprintKeys(1, 1, 1, 1, 1)):
        rows = ", ".join(f"(CAST({a} AS BIGINT), CAST({s} AS BIGINT))" for a, s in pairs)
        sql = (
            f"SELECT a, s, {fingerprint_sql('a', 's', keys)} FROM (VALUES {rows}) AS v(a, s)"
            if any_database.backend == "postgres"
            else f"SELECT column1, column2, {fingerprint_sql('column1', 'column2', keys)} "
            f"FROM (VALUES {rows})"
        )
        got = {(int(a), int(s)): int(f) for a, s, f in any_database.query(sql)}
        assert got == {(a, s): fingerprint(a, s, keys) for a, s in pairs}


def test_the_fingerprint_sees_a_posting_moved_by_one_either_way() -> None:
    """Moving one posting up a seq and another down keeps every count and seq sum: the
    square of a keyed line does not."""
    keys = FingerprintKeys.draw()
    before = fingerprint(5, 100, keys) + fingerprint(5, 200, keys)
    after = fingerprint(5, 101, keys) + fingerprint(5, 199, keys)
    assert before != after


# -- forgeries of a ledger the engine wrote ---------------------------------------------------

RUN_ROWS = 64  # the writer's run size for these ledgers: several runs and a tail
_copies = itertools.count(1)


def _build(ledger: LedgerDb) -> None:
    """Write a ledger through the engine: 20 accounts, commits of varied size."""
    rng = random.Random(11)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(postings_module, "POSTINGS_RUN_ROWS", RUN_ROWS)
        with bank.Bank.open(ledger.db) as b:
            ids = [b.open_account(f"acct-{i:02d}", overdraft_limit=1_000).id for i in range(20)]
            for f in b.submit_many([bank.Deposit(account=i, amount=50_000) for i in ids]):
                f.result()
            for _ in range(9):
                commands = []
                for _ in range(rng.randint(5, 60)):
                    a, c = rng.sample(ids, 2)
                    commands.append(bank.Transfer(source=a, target=c, amount=rng.randint(1, 90)))
                for f in b.submit_many(commands):
                    f.result()
            # A tail above W, whatever batch the last run ended with.
            while _tail(ledger) == 0:
                b.transfer(ids[0], ids[1], 1)


def _tail(ledger: LedgerDb) -> int:
    """How many transfers lie above the watermark."""
    ((w,),) = ledger.query("SELECT seq FROM postings_upto")
    ((head,),) = ledger.query("SELECT max(seq) FROM transfers")
    return int(head) - int(w)


def _copy(ledger: LedgerDb) -> LedgerDb:
    """A copy of the template ledger: its file, or a database made from it."""
    if ledger.server is None:
        target = ledger.path.parent / f"copy-{next(_copies)}" / "ledger.db"
        target.parent.mkdir()
        shutil.copyfile(ledger.path, target)
        return LedgerDb.sqlite(target)
    import psycopg

    source = make_url(ledger.url).database
    name = f"{source}_p{os.getpid()}_{next(_copies)}"
    with psycopg.connect(postgres.libpq_conninfo(ledger.server.url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
    url = make_url(ledger.url).set(database=name).render_as_string(hide_password=False)
    return LedgerDb("postgres", url, url, ledger.server)


@pytest.fixture(scope="module", params=LEDGER_PARAMS)
def template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LedgerDb]:
    ledger = new_ledger(request, tmp_path_factory.mktemp("postings"))
    _build(ledger)
    yield ledger
    if ledger.server is not None:
        ledger.drop()


@pytest.fixture
def forged(template: LedgerDb) -> Iterator[LedgerDb]:
    ledger = _copy(template)
    yield ledger
    if ledger.server is not None:
        ledger.drop()


def _facts(ledger: LedgerDb) -> dict[str, int]:
    """W, the head, and a posting below W to forge with (and where it can go)."""
    ((w,),) = ledger.query("SELECT seq FROM postings_upto")
    ((head,),) = ledger.query("SELECT max(seq) FROM transfers")
    rows = ledger.query(
        f"SELECT seq, debit_account_id, credit_account_id FROM transfers WHERE seq <= {w} "
        "ORDER BY seq"
    )
    named = {seq: {d, c} for seq, d, c in rows}
    seq, account = 30, rows[29][1]
    other_account = min({a for _, a, _ in rows} - named[seq])
    other_seq = next(s for s in range(w // 2, w) if account not in named[s])
    return {
        "w": w,
        "head": head,
        "seq": seq,
        "account": account,
        "other_account": other_account,
        "other_seq": other_seq,
        "low_w": w - RUN_ROWS,
    }


def _audit(ledger: LedgerDb, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """`bank audit --json` through the CLI: its exit code and its report."""
    capsys.readouterr()
    code = main(["audit", "--db", str(ledger.db), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_the_engine_ledger_has_postings_below_and_a_tail_above_w(
    template: LedgerDb, capsys: pytest.CaptureFixture[str]
) -> None:
    facts = _facts(template)
    assert facts["w"] >= 3 * RUN_ROWS, facts  # several runs were flushed
    assert 0 < facts["head"] - facts["w"] < RUN_ROWS + 60, facts  # and a tail remains above W
    ((rows,),) = template.query("SELECT count(*) FROM postings")
    assert rows == 2 * facts["w"]
    code, report = _audit(template, capsys)
    assert (code, report["problems"]) == (0, [])


#: Each forgery (SQL both databases take), the kind of problem it must give, and what the
#: message must say. `{...}` are `_facts` of the ledger.
FORGERIES: dict[str, tuple[list[str], str, str]] = {
    "a posting deleted": (
        ["DELETE FROM postings WHERE account_id = {account} AND seq = {seq}"],
        "postings",
        "posting ({account}, {seq}) is lost: transfer {seq} names account {account}",
    ),
    "a posting added": (
        ["INSERT INTO postings (account_id, seq) VALUES ({other_account}, {seq})"],
        "postings",
        "posting ({other_account}, {seq}) is extra: no transfer at seq {seq} names account "
        "{other_account}",
    ),
    "a posting moved to another account": (
        [
            "UPDATE postings SET account_id = {other_account} "
            "WHERE account_id = {account} AND seq = {seq}"
        ],
        "postings",
        "the posting of transfer {seq} for account {account} was moved to account "
        "{other_account} instead of {account}",
    ),
    "a posting moved to another seq": (
        ["UPDATE postings SET seq = {other_seq} WHERE account_id = {account} AND seq = {seq}"],
        "postings",
        "the posting of transfer {seq} for account {account} was moved to seq {other_seq} "
        "instead of {seq}",
    ),
    "W beyond the head": (
        ["UPDATE postings_upto SET seq = {head} + 5"],
        "postings_watermark",
        "the watermark W) is {head_5}, beyond the last transfer {head}",
    ),
    "W set back": (
        ["UPDATE postings_upto SET seq = {low_w}"],
        "postings_watermark",
        f"{2 * RUN_ROWS} posting(s) above the watermark W={{low_w}} (the first at seq {{low_w_1}}",
    ),
    "a posting above W": (
        ["INSERT INTO postings (account_id, seq) VALUES ({account}, {head})"],
        "postings_watermark",
        "1 posting(s) above the watermark W={w} (the first at seq {head}, account {account})",
    ),
    "the watermark row deleted": (
        ["DELETE FROM postings_upto"],
        "schema",
        "postings_upto holds 0 rows, not exactly one: the postings watermark W is lost",
    ),
    "the postings table dropped": (
        ["DROP TABLE postings"],
        "schema",
        "table postings is missing (revision 0007 creates it)",
    ),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_each_forgery_of_postings_is_found_by_bank_audit(
    forgery: str, forged: LedgerDb, capsys: pytest.CaptureFixture[str]
) -> None:
    statements, kind, says = FORGERIES[forgery]
    facts = _facts(forged)
    values = {**facts, "head_5": facts["head"] + 5, "low_w_1": facts["low_w"] + 1}
    forged.execute(*(sql.format(**values) for sql in statements))
    code, report = _audit(forged, capsys)
    assert code == 1, report
    messages = [p["message"] for p in report["problems"] if p["kind"] == kind]
    assert any(says.format(**values) in m for m in messages), (says.format(**values), messages)
    # Nothing else of the ledger is blamed: the rows and balances are as they were.
    assert set(report["problem_counts"]) <= {"postings", "postings_watermark", "schema"}


def test_every_forgery_undone_audits_clean_again(
    forged: LedgerDb, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rule compares, it does not remember: the ledger as written is clean again."""
    facts = _facts(forged)
    forged.execute(f"UPDATE postings SET account_id = {facts['other_account']} "
                   f"WHERE account_id = {facts['account']} AND seq = {facts['seq']}")  # fmt: skip
    assert _audit(forged, capsys)[0] == 1
    forged.execute(f"UPDATE postings SET account_id = {facts['account']} "
                   f"WHERE account_id = {facts['other_account']} AND seq = {facts['seq']}")  # fmt: skip
    code, report = _audit(forged, capsys)
    assert (code, report["problems"]) == (0, [])


def test_the_human_report_names_the_rule(
    forged: LedgerDb, capsys: pytest.CaptureFixture[str]
) -> None:
    facts = _facts(forged)
    forged.execute(f"DELETE FROM postings WHERE account_id = {facts['account']} AND seq = {facts['seq']}")  # fmt: skip
    capsys.readouterr()
    assert main(["audit", "--db", str(forged.db)]) == 1
    out = capsys.readouterr().out
    assert "postings" in out and "lost" in out
