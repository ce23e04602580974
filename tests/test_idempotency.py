"""A key makes an operation exactly-once, forever: same receipt, across restarts and races."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait

import pytest

import bank
from bank.answers import Answer
from tests.conftest import LedgerDb, run_threads


def test_same_key_same_command_returns_the_original_receipt(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank()
    alice = b.open_account("alice").id
    shop = b.open_account("shop").id
    b.deposit(alice, 100_00)
    first = b.transfer(alice, shop, 25_00, key="order-17")
    again = b.transfer(alice, shop, 25_00, key="order-17")
    assert again == first
    assert b.balance(alice) == 75_00  # applied once
    assert b.stats().accepted == 2
    assert b.find("order-17") == first
    assert b.find("order-18") is None


def test_same_key_other_command_is_a_conflict_and_changes_nothing(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank()
    alice = b.open_account("alice").id
    shop = b.open_account("shop").id
    b.deposit(alice, 100_00, key="dep-1")
    before = b.snapshot()
    for other in (
        bank.Deposit(account=alice, amount=99, key="dep-1"),
        bank.Deposit(account=shop, amount=100_00, key="dep-1"),
        bank.Withdrawal(account=alice, amount=100_00, key="dep-1"),
        bank.Transfer(source=alice, target=shop, amount=100_00, key="dep-1"),
    ):
        with pytest.raises(bank.IdempotencyConflict, match="dep-1"):
            b.submit(other).result(timeout=10)
    assert b.snapshot() == before


def test_keys_survive_a_restart(ledger_db: LedgerDb) -> None:
    with bank.Bank.open(ledger_db.db) as b:
        alice = b.open_account("alice").id
        first = b.deposit(alice, 500, key="payday")
    with bank.Bank.open(ledger_db.db) as b:
        assert b.deposit(alice, 500, key="payday") == first
        assert b.balance(alice) == 500
        with pytest.raises(bank.IdempotencyConflict):
            b.deposit(alice, 501, key="payday")
        assert b.find("payday") == first


def test_a_refused_operation_does_not_use_up_its_key(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank()
    alice = b.open_account("alice").id
    with pytest.raises(bank.InsufficientFunds):
        b.withdraw(alice, 10, key="w-1")
    assert b.find("w-1") is None
    b.deposit(alice, 10)
    receipt = b.withdraw(alice, 10, key="w-1")
    assert receipt.kind == "withdrawal"
    assert b.withdraw(alice, 10, key="w-1") == receipt
    assert b.balance(alice) == 0


def test_duplicates_inside_one_batch(make_ledger_bank: Callable[..., bank.Bank]) -> None:
    b = make_ledger_bank(workers=1)
    alice = b.open_account("alice").id
    futures = b.submit_many(
        [bank.Deposit(account=alice, amount=5, key="d")] * 3
        + [bank.Deposit(account=alice, amount=6, key="d")]
    )
    receipts = [f.result(timeout=10) for f in futures[:3]]
    assert receipts[0] == receipts[1] == receipts[2]
    with pytest.raises(bank.IdempotencyConflict):
        futures[3].result(timeout=10)
    assert b.balance(alice) == 5


@pytest.mark.timeout(120)
def test_racing_duplicates_apply_exactly_once(
    make_ledger_bank: Callable[..., bank.Bank], fast_switching: None
) -> None:
    b = make_ledger_bank(workers=4)
    alice = b.open_account("alice").id
    keys = [f"k-{i}" for i in range(150)]
    seen: dict[str, set[int]] = {k: set() for k in keys}
    lock = threading.Lock()

    def retrier(offset: int) -> None:
        for i in range(len(keys)):
            key = keys[(i + offset) % len(keys)]
            receipt = b.submit(bank.Deposit(account=alice, amount=3, key=key)).result(timeout=60)
            with lock:
                seen[key].add(receipt.seq)

    run_threads([functools.partial(retrier, o * 7) for o in range(12)], timeout_s=100)
    assert all(len(seqs) == 1 for seqs in seen.values())
    assert b.balance(alice) == 3 * len(keys)
    assert b.stats().accepted == len(keys)
    assert b.stats().keys_in_flight == 0  # nothing is kept per key once it is durable


def test_memory_for_keys_does_not_grow_with_the_number_of_keys(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    """Keys live in the ledger's unique index; memory holds only keys still in flight."""
    b = make_ledger_bank()
    alice = b.open_account("alice").id
    for chunk in range(4):
        futures = b.submit_many(
            [bank.Deposit(account=alice, amount=1, key=f"{chunk}-{i}") for i in range(2_000)]
        )
        for f in futures:
            f.result(timeout=60)
        assert b.stats().keys_in_flight == 0
    assert b.balance(alice) == 8_000
    assert b.find("3-1999") is not None


@pytest.mark.parametrize("key", ["", "x" * 129, 5, None, "a\nb"])
def test_find_refuses_bad_keys(make_ledger_bank: Callable[..., bank.Bank], key: object) -> None:
    b = make_ledger_bank()
    with pytest.raises(bank.InvalidCommand, match="key"):
        b.find(key)  # type: ignore[arg-type]


def test_batches_with_shared_keys_in_opposite_orders_do_not_wait_on_each_other(
    make_ledger_bank: Callable[..., bank.Bank], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker used to claim all of a batch's keys up front, then wait at an earlier
    command for a key held elsewhere: two workers could each hold the key the other
    waits for (a cycle only `KeyInFlight` broke, 60 s later, refusing both)."""
    b = make_ledger_bank(workers=2)
    alice = b.open_account("alice").id
    claims = b._claims
    real_claim = claims.claim
    in_flight: Future[bank.Receipt] = Future()  # an operation with key "k2" still in flight
    assert real_claim("k2", in_flight) is None

    def claim(key: str, future: Answer) -> Answer | None:
        # The in-flight "k2" is answered just as another batch claims it (the race, won
        # by that batch, made deterministic): the claim passes straight to it.
        with claims._lock:
            if key == "k2" and claims._claims.get(key) is in_flight and future is not first[0]:
                claims._claims[key] = future
                return None
        return real_claim(key, future)

    monkeypatch.setattr(claims, "claim", claim)
    x, a = (
        bank.Deposit(account=alice, amount=1, key="k2"),
        bank.Deposit(account=alice, amount=2, key="k"),
    )
    first = b.submit_many([x, a])  # waits at x for "k2" (a's "k" claimed, or not)
    deadline = time.monotonic() + 10
    while claims._waiting == 0:
        assert time.monotonic() < deadline, "watchdog: the first batch never waited for its key"
        time.sleep(0.001)
    second = b.submit_many([a, x])  # "k" before "k2"
    _, pending = wait([*first, *second], timeout=15)
    assert not pending, "watchdog: the batches wait on each other's keys"
    outcomes = [f.exception() or f.result() for f in (*first, *second)]
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    assert b.balance(alice) == 3  # each key applied once
