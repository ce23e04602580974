"""When the ledger breaks the bank stops cleanly; cancelled futures are never applied."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

import bank
from tests.conftest import LedgerDb, bank_threads


@pytest.mark.timeout(60)
def test_a_failed_commit_fails_its_operations_and_stops_the_bank(ledger_db: LedgerDb) -> None:
    b = bank.Bank.open(ledger_db.db)
    a = b.open_account("a").id
    b.deposit(a, 100)
    ledger_db.sabotage("disk on fire")
    with pytest.raises(bank.LedgerUnavailable, match="disk on fire"):
        b.deposit(a, 5)
    with pytest.raises(bank.LedgerUnavailable):
        b.submit(bank.Deposit(account=a, amount=1))
    with pytest.raises(bank.LedgerUnavailable):
        b.balance(a)
    b.close()
    assert bank_threads() == []
    ledger_db.repair()
    with bank.Bank.open(ledger_db.db) as again:  # the last commit is what counts
        assert again.balance(a) == 100
        assert again.snapshot().seq == 1
        assert again.audit().ok


@pytest.mark.timeout(60)
def test_cancelled_futures_are_never_applied(make_ledger_bank: Callable[..., bank.Bank]) -> None:
    b = make_ledger_bank(workers=1)
    a = b.open_account("a").id
    account = b.account(a)
    account.lock.acquire()
    try:
        first = b.submit(bank.Deposit(account=a, amount=1))
        while b.stats().queue_depth:
            time.sleep(0.001)
        later = b.submit_many([bank.Deposit(account=a, amount=10, key=f"c{i}") for i in range(5)])
        assert all(f.cancel() for f in later)
    finally:
        account.lock.release()
    assert first.result(timeout=10).amount == 1
    assert b.deposit(a, 10, key="c0").amount == 10  # the key of a cancelled op is free
    assert b.balance(a) == 11  # none of the five cancelled deposits was applied
    assert b.stats().keys_in_flight == 0
    assert all(b.find(f"c{i}") is None for i in range(1, 5))


@pytest.mark.timeout(60)
def test_find_agrees_with_the_futures_while_operations_are_in_flight(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank(workers=2)
    a = b.open_account("a").id
    futures = b.submit_many([bank.Deposit(account=a, amount=1, key=f"f{i}") for i in range(500)])
    early = {i: b.find(f"f{i}") for i in range(0, 500, 7)}
    receipts = [f.result(timeout=10) for f in futures]
    for i, found in early.items():
        assert found is None or found == receipts[i]  # not yet accepted, or exactly the receipt
    assert all(b.find(f"f{i}") == receipts[i] for i in range(500))
    assert b.deposit(a, 1, key="f0") == receipts[0]
