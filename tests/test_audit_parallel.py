"""The audit's fast path (seq ranges checked by worker processes) gives exactly the report
of the one-process pass: on a clean ledger by joining the ranges, on a forged one by
falling back to the exact pass, from a process with threads too (a `Bank` open)."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest

import bank
from bank.ledger.audit import AuditReport, audit
from bank.ledger.audit_ranges import split
from tests.audit_ledgers import build_engine_ledger, copy_ledger, edit, rechain


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit-parallel") / "clean.db"
    build_engine_ledger(path, transfers=2_500)
    return path


def _report(a: AuditReport) -> tuple[object, ...]:
    return (
        a.head,
        a.transfers_checked,
        a.accounts_checked,
        a.account_events_checked,
        [p.as_dict() for p in a.problems],
        a.problem_counts,
    )


def _fast(path: Path, caplog: pytest.LogCaptureFixture, **kw: object) -> AuditReport:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bank.ledger.audit"):
        return audit(path, processes=3, parallel_rows_min=1, **kw)  # type: ignore[arg-type]


def _fell_back(caplog: pytest.LogCaptureFixture) -> bool:
    return any("exact pass" in r.getMessage() for r in caplog.records)


def test_split_covers_every_seq_once() -> None:
    for first, last, parts in ((1, 1, 4), (1, 10, 3), (1, 1_000_003, 8), (5, 9, 10)):
        ranges = split(first, last, parts)
        assert ranges[0][0] == first and ranges[-1][1] == last
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges))
        assert len(ranges) <= parts


def test_a_clean_ledger_is_joined_from_ranges(
    clean: Path, caplog: pytest.LogCaptureFixture
) -> None:
    serial = audit(clean, processes=1)
    fast = _fast(clean, caplog, expect_head=serial.head)
    assert serial.ok and fast.ok
    assert not _fell_back(caplog)
    assert _report(fast) == _report(audit(clean, processes=1, expect_head=serial.head))


FORGERIES = {
    "amount": "UPDATE transfers SET amount = amount + 1 WHERE seq = 1700",
    "deleted": "DELETE FROM transfers WHERE seq = 900",
    "balance": "UPDATE accounts SET balance = balance - 3 WHERE id = 2",
    "limit_event": "UPDATE account_events SET overdraft_limit = overdraft_limit + 1 "
    "WHERE seq = (SELECT max(seq) FROM account_events)",
    "kind": "UPDATE transfers SET kind = 'deposit' WHERE seq = 2000 AND kind = 'transfer'",
    "appended_far": "INSERT INTO transfers SELECT seq + 100000, NULL, kind, debit_account_id, "
    "credit_account_id, amount, ts_us, hash, debit_balance, credit_balance, hold_seq, "
    "expires_us, link_first, link_count FROM transfers WHERE seq = 10",
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
@pytest.mark.parametrize("rehashed", [False, True])
def test_a_forged_ledger_gets_the_exact_report(
    forgery: str, rehashed: bool, clean: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = copy_ledger(clean, tmp_path / "forged.db")
    with edit(path, checks=False) as conn:
        conn.execute(FORGERIES[forgery])
        if rehashed:
            rechain(conn)
    serial = audit(path, processes=1)
    fast = _fast(path, caplog)
    assert not serial.ok
    assert _report(fast) == _report(serial)


def test_an_overdraft_across_ranges_is_found(
    clean: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every row rechained and every stored balance consistent: only the replay of the
    limits, from the true start balances of each range, can tell."""
    path = copy_ledger(clean, tmp_path / "overdrawn.db")
    with edit(path) as conn:
        account, limit = conn.execute(
            "SELECT id, overdraft_limit FROM accounts WHERE id > 0 ORDER BY id LIMIT 1"
        ).fetchone()
        seq = conn.execute(
            "SELECT max(seq) FROM transfers WHERE debit_account_id = ?", (account,)
        ).fetchone()[0]
        balance = conn.execute("SELECT balance FROM accounts WHERE id = ?", (account,)).fetchone()[
            0
        ]
        extra = balance + limit + 1  # one more than the account could pay
        conn.execute("UPDATE transfers SET amount = amount + ? WHERE seq = ?", (extra, seq))
        credit = conn.execute(
            "SELECT credit_account_id FROM transfers WHERE seq = ?", (seq,)
        ).fetchone()[0]
        conn.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (extra, account))
        conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (extra, credit))
        rechain(conn)
    serial = audit(path, processes=1)
    assert "overdraft" in serial.problem_counts, serial.problem_counts
    fast = _fast(path, caplog)
    assert _fell_back(caplog)
    assert _report(fast) == _report(serial)


def test_workers_start_safely_from_a_process_with_threads(
    clean: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With a `Bank` open (threads running) the workers come from the fork server, and the
    ledger the bank owns is read through SQLite only."""
    path = copy_ledger(clean, tmp_path / "owned.db")
    with bank.Bank.open(path) as b:
        b.deposit(1, 5)
        fast = _fast(path, caplog)
        assert fast.ok and not _fell_back(caplog)
        assert _report(fast) == _report(audit(path, processes=1))


def test_the_fast_path_works_without_the_postgres_extra(clean: Path, tmp_path: Path) -> None:
    """With psycopg not installed (a module of that name that refuses to import, on the
    path of this process and of the fork server it starts), an audit from a process with
    threads still runs in parallel on SQLite instead of killing the fork server."""
    import subprocess
    import sys
    import textwrap

    fake = tmp_path / "no-driver"
    fake.mkdir()
    (fake / "psycopg.py").write_text("raise ImportError('psycopg is not installed')\n")
    path = copy_ledger(clean, tmp_path / "owned.db")
    script = textwrap.dedent(
        f"""
        import logging, threading
        import bank
        from bank.ledger.audit import audit
        logging.basicConfig(level=logging.INFO)
        with bank.Bank.open({str(path)!r}) as b:
            assert threading.active_count() > 1
            report = audit({str(path)!r}, processes=3, parallel_rows_min=1)
            print("ok" if report.ok and report.transfers_checked > 1 else report)
        """
    )
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PYTHONPATH": f"{fake}:{repo}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
    assert "exact pass" not in result.stderr  # the workers ran: no fallback


def test_values_of_the_wrong_type_get_the_exact_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a revision-0002 ledger (no STRICT tables) every edit that changes a value's type
    is reported by the fast path exactly as by the one-process pass (`bad_type` included,
    although a clean fast path skips the scan of `transfers` for it)."""
    from tests.test_chain_encoding import ATTACKS, attack, build_0002_ledger, forger

    source = tmp_path / "rev0002.db"
    ids = build_0002_ledger(source)
    for name in ATTACKS:
        path = copy_ledger(source, tmp_path / f"{name}.db")
        with forger(path) as conn:
            attack(conn, name, ids)
        serial = audit(path, processes=1)
        assert "bad_type" in serial.problem_counts, name
        assert _report(_fast(path, caplog)) == _report(serial), name
    with edit(copy_ledger(source, tmp_path / "real.db")) as conn:
        # 1000.5 prints as 1000 with %d, the amount the row's hash was made with.
        assert conn.execute("SELECT amount FROM transfers WHERE seq = 3").fetchone() == (1000,)
        conn.execute("UPDATE transfers SET amount = 1000.5 WHERE seq = 3")
    serial = audit(tmp_path / "real.db", processes=1)
    assert {"bad_type", "hash_mismatch"} <= serial.problem_counts.keys()
    assert _report(_fast(tmp_path / "real.db", caplog)) == _report(serial)
