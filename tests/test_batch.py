"""`submit_batch`/`execute`: one future per batch, one outcome per command, in order, with
`submit`'s validation, keys, durability and outcome model (refusals never fail a batch)."""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

import pytest

import bank
from bank.ledger.writer import LedgerWriter
from bank.limits import BATCH_OPS_MAX
from tests.conftest import LedgerDb, run_threads, wait_until

Cmd = bank.Deposit | bank.Withdrawal | bank.Transfer


@pytest.mark.timeout(60)
def test_mixed_good_and_refused_commands_each_get_their_outcome_in_order(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank()
    a = b.open_account("a").id
    c = b.open_account("c", overdraft_limit=10).id
    commands: list[Cmd] = [
        bank.Deposit(account=a, amount=100),
        bank.Withdrawal(account=a, amount=1_000),  # InsufficientFunds
        bank.Transfer(source=a, target=999, amount=5),  # AccountNotFound
        bank.Transfer(source=a, target=c, amount=60),
        bank.Withdrawal(account=c, amount=71),  # 60 + limit 10: refused
        bank.Withdrawal(account=c, amount=70),
    ]
    future = b.submit_batch(commands)
    outcomes = future.result(timeout=20)
    assert future.exception() is None  # refusals are elements, never the batch's failure
    assert len(outcomes) == len(commands)
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == [
        "Receipt",
        "InsufficientFunds",
        "AccountNotFound",
        "Receipt",
        "InsufficientFunds",
        "Receipt",
    ]
    receipts = [o for o in outcomes if isinstance(o, bank.Receipt)]
    assert [r.kind for r in receipts] == ["deposit", "transfer", "withdrawal"]
    assert [r.seq for r in receipts] == sorted(r.seq for r in receipts)
    assert all(isinstance(o, bank.BankError) for o in outcomes if not isinstance(o, bank.Receipt))
    assert "999" in str(outcomes[2])
    assert b.balance(a) == 40 and b.balance(c) == -10
    # execute is the blocking twin: the same list, in order.
    again = b.execute([bank.Deposit(account=c, amount=10), bank.Withdrawal(account=a, amount=41)])
    assert isinstance(again[0], bank.Receipt) and isinstance(again[1], bank.InsufficientFunds)
    assert b.snapshot().total == 0
    assert b.audit().ok


@pytest.mark.timeout(60)
def test_a_refusal_does_not_pin_the_frames_that_refused_it(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    """A refusal held by its caller keeps no worker frames (and their locals) alive; raised
    by `result()`, it carries the caller's traceback."""
    b = make_ledger_bank()
    a = b.open_account("a").id
    (refused,) = b.execute([bank.Withdrawal(account=a, amount=1)])
    assert isinstance(refused, bank.InsufficientFunds) and refused.__traceback__ is None
    future = b.submit(bank.Transfer(source=a, target=424242, amount=1))
    error = future.exception(timeout=20)
    assert isinstance(error, bank.AccountNotFound) and error.__traceback__ is None
    with pytest.raises(bank.AccountNotFound) as raised:
        future.result()
    names = []
    tb = raised.value.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "test_a_refusal_does_not_pin_the_frames_that_refused_it" in names
    assert not {"move", "check_debit", "_apply"} & set(names), names
    with pytest.raises(bank.InsufficientFunds) as blocking:
        b.withdraw(a, 1)
    assert blocking.value.__traceback__ is not None


@pytest.mark.timeout(60)
def test_keys_repeated_inside_and_across_batches_apply_once(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    b = make_ledger_bank(workers=2)
    a = b.open_account("a").id
    first = b.execute(
        [
            bank.Deposit(account=a, amount=5, key="k1"),
            bank.Deposit(account=a, amount=1, key="k2"),
            bank.Deposit(account=a, amount=5, key="k1"),  # the same command: the same receipt
            bank.Deposit(account=a, amount=6, key="k1"),  # another command: a conflict
            bank.Withdrawal(account=a, amount=10**6, key="k3"),  # refused: k3 stays free
        ]
    )
    r1, r2, r1_again, conflict, refused = first
    assert isinstance(r1, bank.Receipt) and isinstance(r2, bank.Receipt)
    assert r1_again == r1
    assert isinstance(conflict, bank.IdempotencyConflict) and "k1" in str(conflict)
    assert isinstance(refused, bank.InsufficientFunds)
    second = b.execute(
        [
            bank.Deposit(account=a, amount=1, key="k2"),  # across batches: the original
            bank.Withdrawal(account=a, amount=2, key="k3"),  # free after the refusal
            bank.Deposit(account=a, amount=5, key="k1"),
            bank.Withdrawal(account=a, amount=2, key="k3"),  # repeated, now committed
        ]
    )
    assert second[0] == r2 and second[2] == r1
    assert isinstance(second[1], bank.Receipt) and second[3] == second[1]
    assert b.balance(a) == 5 + 1 - 2
    keyed = ledger_db.query(
        "SELECT key, COUNT(*) FROM transfers WHERE key IS NOT NULL GROUP BY key"
    )
    assert sorted(keyed) == [("k1", 1), ("k2", 1), ("k3", 1)]
    assert b.stats().keys_in_flight == 0


@pytest.mark.timeout(60)
def test_a_batch_larger_than_the_queue_goes_through_in_chunks(
    make_bank: Callable[..., bank.Bank],
) -> None:
    b = make_bank(queue_capacity=16, workers=1)
    a = b.open_account("a").id
    size = BATCH_OPS_MAX  # the largest batch, 512 times the queue's capacity
    outcomes = b.execute([bank.Deposit(account=a, amount=1) for _ in range(size)])
    assert len(outcomes) == size
    assert all(isinstance(o, bank.Receipt) for o in outcomes)
    seqs = [o.seq for o in outcomes if isinstance(o, bank.Receipt)]
    assert seqs == list(range(seqs[0], seqs[0] + size))  # one worker: in order, no gaps
    stats = b.stats()
    assert stats.queue_high_water <= 16 and stats.queue_depth == 0
    assert b.balance(a) == size


@pytest.mark.timeout(60)
def test_timeout_bounds_the_whole_call_and_later_chunks_get_queue_full(
    make_bank: Callable[..., bank.Bank],
) -> None:
    b = make_bank(queue_capacity=8, workers=1)
    a = b.open_account("a").id
    held = b.account(a)
    with held.lock:  # the one worker blocks on `a`, so the queue fills and stays full
        blocker = b.submit(bank.Deposit(account=a, amount=1))
        wait_until(lambda: b.stats().queue_depth == 0, "the worker takes the blocker")
        future = b.submit_batch(
            [bank.Deposit(account=a, amount=1) for _ in range(100)], timeout=0.2
        )
        # The first chunk fitted, the queue then stayed full: nothing more goes in.
        with pytest.raises(bank.QueueFull):
            b.submit_batch([bank.Deposit(account=a, amount=1)], timeout=0.05)
        with pytest.raises(bank.QueueFull):
            b.execute([bank.Deposit(account=a, amount=1)], timeout=0)
    outcomes = future.result(timeout=20)
    blocker.result(timeout=20)
    taken = [o for o in outcomes if isinstance(o, bank.Receipt)]
    left = outcomes[len(taken) :]
    assert len(taken) % 8 == 0 and 8 <= len(taken) < 100  # whole chunks, then the refused rest
    assert left and all(isinstance(o, bank.QueueFull) for o in left)
    assert f"operation {len(taken)} of this batch" in str(left[0])
    assert b.balance(a) == 1 + len(taken)  # what was refused changed nothing


@pytest.mark.timeout(60)
def test_cancel_before_a_worker_starts_it_applies_nothing(
    make_bank: Callable[..., bank.Bank],
) -> None:
    b = make_bank(workers=1)
    a = b.open_account("a").id
    with b.account(a).lock:
        blocker = b.submit(bank.Deposit(account=a, amount=1))
        wait_until(lambda: b.stats().queue_depth == 0, "the worker takes the blocker")
        future = b.submit_batch([bank.Deposit(account=a, amount=7, key=f"c{i}") for i in range(3)])
        assert future.cancel()
    blocker.result(timeout=20)
    with pytest.raises(CancelledError):
        future.result(timeout=5)
    assert b.balance(a) == 1
    # The worker still passes over the cancelled batch (claiming and releasing its keys
    # as it goes) after the future says cancelled: wait for it, never for a fixed time.
    wait_until(lambda: b.stats().keys_in_flight == 0, "the worker passes the cancelled batch")
    assert b.find("c0") is None
    assert isinstance(b.execute([bank.Deposit(account=a, amount=7, key="c0")])[0], bank.Receipt)
    # Once a worker has started a batch it runs to the end: cancel() says so.
    with b.account(a).lock:
        running = b.submit_batch([bank.Deposit(account=a, amount=1) for _ in range(3)])
        wait_until(running.running, "the worker starts the batch")
        assert not running.cancel()
    assert all(isinstance(o, bank.Receipt) for o in running.result(timeout=20))
    assert b.balance(a) == 1 + 7 + 3


@pytest.mark.timeout(90)
def test_close_during_a_batch_commits_what_was_accepted_and_refuses_the_rest(
    ledger_db: LedgerDb,
) -> None:
    b = bank.Bank.open(ledger_db.db, queue_capacity=16, workers=1)
    a = b.open_account("a").id
    got: list[list[Any]] = []
    size = BATCH_OPS_MAX

    def caller() -> None:
        got.append(b.execute([bank.Deposit(account=a, amount=1, key=f"z{i}") for i in range(size)]))

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    wait_until(lambda: b.stats().accepted > 40, "the batch gets going", 30)
    b.close()
    thread.join(30)
    assert not thread.is_alive() and got
    outcomes = got[0]
    assert len(outcomes) == size
    done = [o for o in outcomes if isinstance(o, bank.Receipt)]
    rest = outcomes[len(done) :]
    assert done, "what was accepted before close() is committed and answered"
    assert all(isinstance(o, bank.BankClosed) for o in rest)  # a suffix, nothing else
    with pytest.raises(bank.BankClosed):
        b.submit_batch([bank.Deposit(account=a, amount=1)])
    with bank.Bank.open(ledger_db.db) as again:
        for i in (0, len(done) - 1):
            assert again.find(f"z{i}") == outcomes[i]
        if rest:
            assert again.find(f"z{len(done)}") is None
        assert again.balance(a) == len(done)


@pytest.mark.timeout(60)
def test_a_ledger_failure_answers_in_flight_members_with_ledger_unavailable(
    ledger_db: LedgerDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = LedgerWriter._prepare
    failing = threading.Event()

    def prepare(self: LedgerWriter, writer: Any, batch: list[Any]) -> Any:
        if failing.is_set():
            raise OSError("disk on fire")
        return original(self, writer, batch)

    monkeypatch.setattr(LedgerWriter, "_prepare", prepare)
    b = bank.Bank.open(ledger_db.db, workers=1)
    try:
        a = b.open_account("a").id
        committed = b.execute([bank.Deposit(account=a, amount=2)])
        failing.set()
        outcomes = b.submit_batch(
            [bank.Deposit(account=a, amount=1), bank.Withdrawal(account=a, amount=10**6)]
        ).result(timeout=20)  # the batch's future itself does not fail
        assert all(isinstance(o, bank.LedgerUnavailable) for o in outcomes)
        assert "unknown" in str(outcomes[0])
        with pytest.raises(bank.LedgerUnavailable):  # the bank stops, as after submit
            b.submit_batch([bank.Deposit(account=a, amount=1)])
    finally:
        b.close()
    assert isinstance(committed[0], bank.Receipt)


@pytest.mark.timeout(30)
def test_bad_input_is_refused_and_nothing_is_queued(make_bank: Callable[..., bank.Bank]) -> None:
    b = make_bank()
    a = b.open_account("a").id
    ok = bank.Deposit(account=a, amount=1)
    unvalidated = bank.Deposit.model_construct(account=a, amount=1, key=None)
    cases: list[tuple[Any, str]] = [
        ([], "the batch is empty"),
        (iter(()), "the batch is empty"),
        ([ok] * (BATCH_OPS_MAX + 1), "more than BATCH_OPS_MAX"),
        ([ok, ok, 17], "item 2"),
        ([ok, unvalidated], "item 1"),
        ([None], "item 0"),
        (ok, r"use submit\(\) for one"),
        ("deposits", r"\(got str\)"),
        ({"account": a}, r"\(got dict\)"),
        (None, r"\(got NoneType\)"),
        (42, r"\(got int\)"),
    ]
    for batch, message in cases:
        for call in (b.submit_batch, b.execute):
            with pytest.raises(bank.InvalidCommand, match=message):
                call(batch)
    with pytest.raises(bank.InvalidCommand, match="timeout"):
        b.submit_batch([ok], timeout=-1)
    # An endless iterator is read only one past the bound.
    endless = iter(lambda: ok, None)
    with pytest.raises(bank.InvalidCommand, match="more than BATCH_OPS_MAX"):
        b.submit_batch(endless)
    assert next(endless) is ok
    assert b.stats().accepted == 0 and b.balance(a) == 0


@pytest.mark.timeout(60)
def test_callbacks_run_once_per_batch_and_execute_refuses_on_a_bank_thread(
    make_bank: Callable[..., bank.Bank],
) -> None:
    b = make_bank()
    a = b.open_account("a").id
    seen: list[Any] = []

    def callback(future: Any) -> None:
        seen.append(len(future.result()))
        try:
            b.execute([bank.Deposit(account=a, amount=1)])
        except bank.WaitOnBankThread as exc:
            seen.append(type(exc).__name__)
        seen.append(threading.current_thread().name)

    future = b.submit_batch([bank.Deposit(account=a, amount=1) for _ in range(10)])
    future.add_done_callback(callback)
    future.result(timeout=20)
    wait_until(lambda: len(seen) == 3, "the callback ran")
    assert seen[:2] == [10, "WaitOnBankThread"] and seen[2].startswith("bank-")
    assert b.balance(a) == 10


@pytest.mark.timeout(120)
def test_many_callers_with_batches_on_hot_accounts_conserve_money(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    b = make_ledger_bank(workers=3, queue_capacity=48)
    hot = [b.open_account(f"h{i}", overdraft_limit=100 * (i % 2)).id for i in range(4)]
    b.execute([bank.Deposit(account=h, amount=500) for h in hot])
    counts = {"ok": 0, "refused": 0}
    lock = threading.Lock()

    def teller(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(6):
            batch: list[Cmd] = []
            for j in range(rng.randint(1, 70)):
                s, t = rng.sample(hot, 2)
                batch.append(
                    bank.Transfer(
                        source=s, target=t, amount=rng.randint(1, 400), key=f"t{seed}-{j % 9}"
                    )
                    if j % 4 == 0
                    else bank.Transfer(source=s, target=t, amount=rng.randint(1, 400))
                )
            outcomes = b.execute(batch)
            assert len(outcomes) == len(batch)
            with lock:
                for o in outcomes:
                    counts["ok" if isinstance(o, bank.Receipt) else "refused"] += 1
                    assert isinstance(
                        o, bank.Receipt | bank.InsufficientFunds | bank.IdempotencyConflict
                    ), o

    run_threads([functools.partial(teller, s) for s in range(8)], timeout_s=90)
    assert counts["ok"] > 0
    snapshot = b.snapshot()
    assert snapshot.total == 0
    for i, h in enumerate(hot):  # no account below its limit (100 for odd i, else 0)
        assert snapshot.balances[h] >= -100 * (i % 2)
    assert b.stats().keys_in_flight == 0
    assert b.audit().ok
