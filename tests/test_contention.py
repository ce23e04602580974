"""Money is conserved and limits hold under heavy contention: many threads, few hot accounts, cycles."""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future

import pytest

import bank
from bank.ledger.audit import audit_ledger
from tests.conftest import LedgerDb, bank_threads, run_threads

TELLERS = 16
OPS_PER_TELLER = 400


def _ledger_balances(ledger_db: LedgerDb) -> dict[int, int]:
    """The stored balances, once the audit (the one replay of `transfers` against the
    limits in force, both chains, the sum) finds the ledger clean."""
    report = audit_ledger(ledger_db.db)
    assert report.ok, report.problems[:5]
    return dict(ledger_db.query("SELECT id, balance FROM accounts"))


@pytest.mark.timeout(180)
def test_conservation_under_contention(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb, fast_switching: None
) -> None:
    b = make_ledger_bank(workers=4, queue_capacity=64)
    hot = [b.open_account(f"hot-{i}", overdraft_limit=(i % 2) * 500).id for i in range(5)]
    for account in hot:
        b.deposit(account, 2_000)
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def teller(seed: int) -> None:
        rng = random.Random(seed)
        local: dict[str, int] = {}
        pending: list[Future[bank.Receipt]] = []
        for i in range(OPS_PER_TELLER):
            roll = rng.random()
            if roll < 0.15:
                # A cycle A->B->C->A over three hot accounts, in both directions.
                a, c2, c3 = rng.sample(hot, 3)
                cmds: list[bank.Deposit | bank.Withdrawal | bank.Transfer] = [
                    bank.Transfer(source=a, target=c2, amount=rng.randint(1, 900)),
                    bank.Transfer(source=c2, target=c3, amount=rng.randint(1, 900)),
                    bank.Transfer(source=c3, target=a, amount=rng.randint(1, 900)),
                ]
                pending.extend(b.submit_many(cmds))
            elif roll < 0.25:
                pending.append(
                    b.submit(bank.Deposit(account=rng.choice(hot), amount=rng.randint(1, 300)))
                )
            elif roll < 0.40:
                # Mostly too large: these must be refused, not half-applied.
                pending.append(
                    b.submit(bank.Withdrawal(account=rng.choice(hot), amount=rng.randint(1, 5_000)))
                )
            elif roll < 0.45:
                try:
                    b.transfer(rng.choice(hot), 10_000 + i, 1)  # unknown account
                except bank.AccountNotFound:
                    local["AccountNotFound"] = local.get("AccountNotFound", 0) + 1
            else:
                src, dst = rng.sample(hot, 2)
                if rng.random() < 0.5:
                    try:
                        b.transfer(src, dst, rng.randint(1, 3_000))
                        local["ok"] = local.get("ok", 0) + 1
                    except bank.InsufficientFunds:
                        local["InsufficientFunds"] = local.get("InsufficientFunds", 0) + 1
                else:
                    pending.append(
                        b.submit(
                            bank.Transfer(source=src, target=dst, amount=rng.randint(1, 3_000))
                        )
                    )
        for fut in pending:
            exc = fut.exception(timeout=60)
            name = "ok" if exc is None else type(exc).__name__
            local[name] = local.get(name, 0) + 1
        with lock:
            for k, v in local.items():
                outcomes[k] = outcomes.get(k, 0) + v

    run_threads([functools.partial(teller, s) for s in range(TELLERS)], timeout_s=150)

    assert set(outcomes) <= {"ok", "InsufficientFunds", "AccountNotFound"}, outcomes
    assert outcomes["InsufficientFunds"] > 100, outcomes  # the refusals really happened
    assert outcomes["ok"] > 1_000, outcomes
    snap = b.snapshot()
    assert snap.total == 0
    for account in hot:
        acct = b.account(account)
        assert snap.balances[account] >= -acct.overdraft_limit
        assert b.balance(account) == snap.balances[account] == acct.balance
    stats = b.stats()
    assert stats.accepted == snap.seq == stats.committed_seq
    assert stats.accepted == outcomes["ok"] + 5  # + the five opening deposits
    b.close()
    stored = _ledger_balances(ledger_db)
    assert stored == {0: snap.balances[0], **{a: snap.balances[a] for a in hot}}
    assert sum(stored.values()) == 0
    assert bank_threads() == []


@pytest.mark.timeout(120)
def test_ring_of_transfers_in_both_directions_never_deadlocks(
    make_ledger_bank: Callable[..., bank.Bank], fast_switching: None
) -> None:
    b = make_ledger_bank(workers=4)
    ring = [b.open_account(f"ring-{i}").id for i in range(6)]
    for account in ring:
        b.deposit(account, 1_000)

    def walker(direction: int) -> None:
        for step in range(300):
            i = step % len(ring)
            src, dst = ring[i], ring[(i + direction) % len(ring)]
            b.transfer(src, dst, 7)

    run_threads([functools.partial(walker, d) for d in (1, -1) * 6], timeout_s=100)
    snap = b.snapshot()
    assert snap.total == 0
    assert sum(snap.balances[a] for a in ring) == 6_000
    assert all(snap.balances[a] >= 0 for a in ring)


@pytest.mark.timeout(120)
def test_one_hot_account_drained_by_many_threads_never_goes_below_its_limit(
    make_ledger_bank: Callable[..., bank.Bank], fast_switching: None
) -> None:
    b = make_ledger_bank(workers=4)
    hot = b.open_account("hot", overdraft_limit=250).id
    b.deposit(hot, 10_000)
    accepted = []
    lock = threading.Lock()

    def drain() -> None:
        for _ in range(200):
            try:
                b.withdraw(hot, 7)
                with lock:
                    accepted.append(7)
            except bank.InsufficientFunds:
                pass

    run_threads([drain for _ in range(16)], timeout_s=100)
    # 10,250 available in steps of 7: exactly floor(10250 / 7) withdrawals can succeed.
    assert len(accepted) == 10_250 // 7
    assert b.balance(hot) == 10_000 - 7 * (10_250 // 7)
    assert b.balance(hot) >= -250
    assert b.snapshot().total == 0
