"""The outcome model: a callback never changes another answer; committed means a receipt."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import bank
from bank.ledger.writer import LedgerWriter
from tests.conftest import LedgerDb, working_threads


def _raiser(exc: BaseException, calls: list[str]) -> Callable[[object], None]:
    def callback(_f: object) -> None:
        calls.append(threading.current_thread().name)
        raise exc

    return callback


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), RuntimeError("x")], ids=repr
)
def test_a_raising_callback_changes_no_other_answer(
    make_ledger_bank: Callable[..., bank.Bank], exc: BaseException
) -> None:
    b = make_ledger_bank(workers=1)
    a = b.open_account("a").id
    calls: list[str] = []
    # Holding the account's lock keeps the worker from applying anything, so all the
    # callbacks are attached first and the whole lot goes to the writer as one batch.
    with b.account(a).lock:
        futures = b.submit_many([bank.Deposit(account=a, amount=1) for _ in range(50)])
        futures[0].add_done_callback(_raiser(exc, calls))
        futures[1].add_done_callback(_raiser(exc, calls))
    receipts = [f.result(timeout=10) for f in futures]  # no LedgerUnavailable among them
    assert [r.amount for r in receipts] == [1] * 50
    assert calls == ["bank-ledger-writer"] * 2
    assert b.deposit(a, 5).amount == 5  # the writer lives on
    assert b.balance(a) == 55
    assert len(working_threads()) == 2


@pytest.mark.timeout(60)
def test_a_raising_callback_on_a_worker_answer_leaves_the_worker_alive(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank(workers=1)
    a = b.open_account("a").id
    first = b.deposit(a, 1, key="dup")
    calls: list[str] = []
    with b.account(a).lock:  # a duplicate is answered by the worker, from the ledger
        blocker = b.submit(bank.Deposit(account=a, amount=2))
        dup = b.submit(bank.Deposit(account=a, amount=1, key="dup"))
        dup.add_done_callback(_raiser(SystemExit(1), calls))
        conflict = b.submit(bank.Deposit(account=a, amount=9, key="dup"))
        conflict.add_done_callback(_raiser(SystemExit(1), calls))
    assert blocker.result(timeout=10).amount == 2
    assert dup.result(timeout=10) == first
    with pytest.raises(bank.IdempotencyConflict):
        conflict.result(timeout=10)
    assert calls == ["bank-worker-0"] * 2
    assert b.deposit(a, 4).amount == 4  # the only worker still runs
    assert b.balance(a) == 7


class _Boom(BaseException):
    """A bug in the writer's own loop (not an `Exception`, so nothing on the way catches it)."""


@pytest.mark.timeout(60)
def test_a_committed_batch_gets_its_receipts_even_if_the_writer_then_fails(
    ledger_db: LedgerDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = LedgerWriter._prepare
    prepared = 0

    def prepare(self: LedgerWriter, cursor: Any, batch: list[Any]) -> Any:
        nonlocal prepared
        prepared += 1
        if prepared == 2:  # batch 1 committed; open-account event batch is 1
            time.sleep(0.3)  # let the worker stage the rest as the next batch
        if prepared == 3:
            raise _Boom("bug after a commit, before its answers")
        return original(self, cursor, batch)

    monkeypatch.setattr(LedgerWriter, "_prepare", prepare)
    b = bank.Bank.open(ledger_db.db, workers=1)
    try:
        a = b.open_account("a").id
        futures = [b.submit(bank.Deposit(account=a, amount=1, key="k0"))]
        time.sleep(0.05)  # the first deposit is in batch 2, alone
        futures += b.submit_many(
            [bank.Deposit(account=a, amount=1, key=f"k{i}") for i in range(1, 40)]
        )
        outcomes: list[bank.Receipt | BaseException] = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=10))
            except bank.LedgerUnavailable as exc:
                outcomes.append(exc)
    finally:
        b.close()
    assert prepared >= 3
    receipts = [o for o in outcomes if isinstance(o, bank.Receipt)]
    unknown = [o for o in outcomes if isinstance(o, bank.LedgerUnavailable)]
    assert receipts, "the committed batch must be answered with its receipts"
    assert unknown and "unknown" in str(unknown[0])
    monkeypatch.undo()
    with bank.Bank.open(ledger_db.db) as again:
        for i, outcome in enumerate(outcomes):  # a receipt means committed, every time
            if isinstance(outcome, bank.Receipt):
                assert again.find(f"k{i}") == outcome
        assert again.audit().ok


@pytest.mark.timeout(60)
def test_ledger_unavailable_says_the_outcome_is_unknown_and_how_to_learn_it(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    b = make_ledger_bank()
    a = b.open_account("a").id
    ledger_db.sabotage("no")
    with pytest.raises(bank.LedgerUnavailable) as caught:
        b.deposit(a, 5, key="k1")
    assert "outcome" in str(caught.value) and "unknown" in str(caught.value)
    assert "find(key)" in str(caught.value)
    calls: list[Callable[[], object]] = [
        lambda: b.open_account("b"),
        lambda: b.set_overdraft_limit(a, 3),
    ]
    for call in calls:
        with pytest.raises(bank.LedgerUnavailable):  # a broken ledger takes no events either
            call()
    assert "UNKNOWN" in (bank.LedgerUnavailable.__doc__ or "")


@pytest.mark.timeout(60)
def test_a_cancelled_holder_does_not_stall_a_waiter(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank(workers=1)
    a = b.open_account("a").id
    with b.account(a).lock:
        blocker = b.submit(bank.Deposit(account=a, amount=1))
        first = b.submit(bank.Deposit(account=a, amount=1, key="c"))
        second = b.submit(bank.Deposit(account=a, amount=1, key="c"))
        assert first.cancel()
    assert blocker.result(timeout=10)
    assert second.result(timeout=10).key == "c"
    assert b.find("c") == second.result()
