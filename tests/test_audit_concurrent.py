"""Audits running while a bank writes under load each see one clean, consistent snapshot: a
prefix of the final ledger, named by the seq and head hash they report."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
from pathlib import Path

import bank
from bank.errors import InsufficientFunds
from bank.ledger.audit import AuditReport, audit_ledger
from tests.conftest import run_threads

AUDITS = 12
LOAD_BATCH = 400


def test_audits_during_a_load_are_clean_consistent_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    reports: list[AuditReport] = []
    loaded = threading.Event()
    stop = threading.Event()
    with bank.Bank.open(path, workers=4) as b:
        ids = [b.open_account(f"a{i}", overdraft_limit=1_000).id for i in range(16)]
        for i in ids:
            b.deposit(i, 50_000)

        def load() -> None:
            rng = random.Random(11)
            batch = 0
            while not stop.is_set():
                commands: list[bank.Deposit | bank.Withdrawal | bank.Transfer] = []
                for _ in range(LOAD_BATCH):
                    source, target = rng.sample(ids, 2)
                    amount = rng.randint(1, 3_000)
                    roll = rng.random()
                    if roll < 0.1:
                        commands.append(bank.Deposit(account=target, amount=amount))
                    elif roll < 0.2:
                        commands.append(bank.Withdrawal(account=source, amount=amount))
                    else:
                        commands.append(bank.Transfer(source=source, target=target, amount=amount))
                for f in b.submit_many(commands):
                    error = f.exception()
                    assert error is None or isinstance(error, InsufficientFunds), error
                batch += 1
                if batch % 3 == 0:
                    # Lowering a limit below an account's debt is refused (and changes
                    # nothing): as legitimate an outcome under load as a refused transfer.
                    with contextlib.suppress(InsufficientFunds):
                        b.set_overdraft_limit(rng.choice(ids), rng.choice((1_000, 5_000)))
                if batch == 2:
                    loaded.set()

        def audit() -> None:
            assert loaded.wait(60), "the load never started"
            try:
                for _ in range(AUDITS):
                    reports.append(audit_ledger(path))
            finally:
                stop.set()

        run_threads([load, audit], timeout_s=120)
        final_seq = b.snapshot().seq
    assert len(reports) == AUDITS
    for report in reports:
        assert report.ok, (report.seq, report.problems[:5])
    seqs = [r.seq for r in reports]
    assert seqs == sorted(seqs) and len(set(seqs)) >= 3 and seqs[0] > LOAD_BATCH
    # Each snapshot is a prefix of the final ledger: its head is the final ledger's row at its seq.
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for report in reports:
            (stored,) = conn.execute(
                "SELECT hash FROM transfers WHERE seq = ?", (report.seq,)
            ).fetchone()
            assert stored == report.head_hash
            assert report.transfers_checked == report.seq
    finally:
        conn.close()
    final = audit_ledger(path)
    assert final.ok and final.seq == final_seq >= seqs[-1]
