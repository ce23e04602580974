"""Holds (two-phase transfers): hold, post, void, expiry by the bank's clock, recovery,
keys, the ledger's rows and views, on both backends."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import bank
from bank.clock import ManualClock
from bank.ledger.audit import audit_ledger
from bank.limits import BALANCE_MAX
from tests.conftest import LedgerDb, run_threads, wait_until


def _rows(ledger_db: LedgerDb, where: str = "") -> list[tuple[Any, ...]]:
    return ledger_db.query(
        "SELECT seq, kind, debit_account_id, credit_account_id, amount, hold_seq, expires_us, "
        f"link_first, link_count FROM transfers {where} ORDER BY seq"
    )


def _audit_ok(ledger_db: LedgerDb) -> None:
    report = audit_ledger(ledger_db.db)
    assert report.ok, report.problems[:5]


def test_a_hold_reserves_and_a_post_moves_part_and_releases_the_rest(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    b = make_ledger_bank()
    alice = b.open_account("alice", overdraft_limit=10_00).id
    shop = b.open_account("shop").id
    b.deposit(alice, 100_00)
    h = b.hold(alice, shop, 80_00)
    assert (h.kind, h.amount, h.source, h.target, h.hold_seq, h.expires_us) == (
        "hold", 80_00, alice, shop, None, None,
    )  # fmt: skip
    a = b.account(alice)
    assert (a.balance, a.held, a.available) == (100_00, 80_00, 30_00)
    with pytest.raises(bank.InsufficientFunds, match="available 3000"):
        b.withdraw(alice, 30_01)
    with pytest.raises(bank.InsufficientFunds):
        b.hold(alice, shop, 30_01)
    with pytest.raises(bank.InsufficientFunds):
        b.transfer(alice, shop, 30_01)
    b.withdraw(alice, 30_00)  # exactly what is available
    p = b.post(h.seq, 50_00)
    assert (p.kind, p.amount, p.hold_seq, p.source, p.target) == ("post", 50_00, h.seq, alice, shop)
    assert (a.balance, a.held, a.available) == (20_00, 0, 30_00)
    assert b.balance(shop) == 50_00
    with pytest.raises(
        bank.HoldNotPending, match=f"hold {h.seq} was already posted at seq {p.seq}"
    ):
        b.post(h.seq)
    with pytest.raises(bank.HoldNotPending, match="already posted"):
        b.void(h.seq)
    rows = _rows(ledger_db, "WHERE kind IN ('hold', 'post')")
    assert [r[1:6] for r in rows] == [
        ("hold", alice, shop, 80_00, None),
        ("post", alice, shop, 50_00, h.seq),
    ]
    _audit_ok(ledger_db)


def test_void_post_of_all_and_the_refusals(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    b = make_ledger_bank()
    alice = b.open_account("alice").id
    shop = b.open_account("shop").id
    d = b.deposit(alice, 100_00)
    h1 = b.hold(alice, shop, 60_00)
    with pytest.raises(bank.PostExceedsHold, match="reserved 6000: cannot post 6001"):
        b.post(h1.seq, 60_01)
    v = b.void(h1.seq)
    assert (v.kind, v.amount, v.hold_seq) == ("void", 60_00, h1.seq)
    assert b.account(alice).held == 0
    with pytest.raises(bank.HoldNotPending, match=f"already voided at seq {v.seq}"):
        b.post(h1.seq)
    with pytest.raises(bank.HoldNotFound, match=f"no hold at seq {d.seq} .*deposit"):
        b.post(d.seq)
    with pytest.raises(bank.HoldNotFound, match="no such row"):
        b.void(10_000)
    h2 = b.hold(alice, shop, 70_00)
    p = b.post(h2.seq)  # all of it
    assert p.amount == 70_00
    assert (b.balance(alice), b.balance(shop), b.account(alice).held) == (30_00, 70_00, 0)
    # @cash on either side: a pending withdrawal and a pending deposit
    w = b.hold(alice, bank.CASH_ACCOUNT_ID, 30_00)
    assert b.account(alice).available == 0
    b.post(w.seq, 10_00)
    dep = b.hold(bank.CASH_ACCOUNT_ID, shop, 5_00)
    b.post(dep.seq)
    assert (b.balance(alice), b.balance(shop)) == (20_00, 75_00)
    with pytest.raises(bank.AccountNotFound):
        b.hold(alice, 999, 1)
    assert b.snapshot().total == 0
    _audit_ok(ledger_db)


def test_expiry_is_exact_by_the_banks_clock(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    clock = ManualClock(start_us=1_700_000_000_000_000)
    b = make_ledger_bank(clock=clock)
    alice = b.open_account("alice").id
    shop = b.open_account("shop").id
    b.deposit(alice, 100_00)
    h = b.hold(alice, shop, 40_00, expires_s=10)
    assert h.expires_us == h.ts_us + 10_000_000
    late = b.hold(alice, shop, 10_00, expires_s=10)
    assert h.expires_us is not None and late.expires_us is not None
    clock.set_us(h.expires_us - 1)  # the last microsecond: a post still succeeds
    assert b.post(h.seq, 1_00).ts_us == h.expires_us - 1
    clock.set_us(late.expires_us)  # the deadline itself: too late
    # Refused on the post's own stamp, or found expired by the timer first: either way.
    with pytest.raises(bank.HoldNotPending, match=f"hold {late.seq} (was already )?expired at seq"):
        b.post(late.seq)
    wait_until(lambda: b.account(alice).held == 0)
    expired = _rows(ledger_db, "WHERE kind = 'expire'")
    assert [r[1:6] for r in expired] == [("expire", alice, shop, 10_00, late.seq)]
    assert b.balance(alice) == 99_00
    _audit_ok(ledger_db)


def test_the_timer_expires_holds_and_a_reopened_bank_expires_what_expired_while_closed(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    clock = ManualClock(start_us=1_700_000_000_000_000)
    b = make_ledger_bank(clock=clock)
    alice = b.open_account("alice").id
    shop = b.open_account("shop").id
    b.deposit(alice, 100_00)
    soon = b.hold(alice, shop, 10_00, expires_s=1)
    later = b.hold(alice, shop, 20_00, expires_s=60, key="h-later")
    never = b.hold(alice, shop, 30_00)
    clock.advance(1)
    wait_until(lambda: b.account(alice).held == 50_00)  # the timer wrote soon's expire
    b.close()
    clock.advance(3600)
    b = make_ledger_bank(clock=clock)
    wait_until(lambda: b.account(alice).held == 30_00)  # later expired while closed
    a = b.account(alice)
    assert (a.balance, a.available) == (100_00, 70_00)
    b.snapshot()  # durable
    kinds = [(r[1], r[5]) for r in _rows(ledger_db, "WHERE kind = 'expire'")]
    assert kinds == [("expire", soon.seq), ("expire", later.seq)]
    assert b.hold(alice, shop, 20_00, expires_s=60, key="h-later") == later  # the key stands
    assert b.post(never.seq).amount == 30_00  # restored with the bank, still pending
    _audit_ok(ledger_db)


def test_keys_cover_hold_post_and_void_across_a_restart(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank()
    alice = b.open_account("alice").id
    shop = b.open_account("shop").id
    b.deposit(alice, 100_00)
    h = b.hold(alice, shop, 50_00, key="auth-1", expires_s=600)
    p = b.post(h.seq, 20_00, key="capture-1")
    h2 = b.hold(alice, shop, 10_00, key="auth-2")
    v = b.void(h2.seq, key="void-2")
    b.close()
    b = make_ledger_bank()
    assert b.hold(alice, shop, 50_00, key="auth-1", expires_s=600) == h
    assert b.post(h.seq, 20_00, key="capture-1") == p
    assert b.post(h.seq, key="capture-1") == p  # "all" names the same post
    assert b.void(h2.seq, key="void-2") == v
    for other in (
        bank.Hold(source=alice, target=shop, amount=50_00, key="auth-1"),  # no expiry
        bank.Hold(source=alice, target=shop, amount=50_00, key="auth-1", expires_s=60),
        bank.Post(hold=h.seq, amount=20_01, key="capture-1"),
        bank.Void(hold=h.seq, key="capture-1"),
        bank.Transfer(source=alice, target=shop, amount=1, key="void-2"),
    ):
        with pytest.raises(bank.IdempotencyConflict):
            b.submit(other).result(timeout=10)
    assert (b.balance(alice), b.balance(shop), b.account(alice).held) == (80_00, 20_00, 0)
    assert b.stats().keys_in_flight == 0


def test_two_phase_commands_are_validated_like_the_others(
    make_bank: Callable[..., bank.Bank],
) -> None:
    for bad, rule in (
        ({"source": 1, "target": 1, "amount": 5}, "different accounts"),
        ({"source": 1, "target": 2, "amount": 0}, "amount"),
        ({"source": 1, "target": 2, "amount": 5, "expires_s": 0}, "expires_s"),
        ({"source": 1, "target": 2, "amount": 5, "expires_s": float("inf")}, "expires_s"),
        ({"source": 1, "target": 2, "amount": 5, "expires_s": True}, "expires_s"),
        ({"source": 1, "target": 2, "amount": 5, "expires_s": "5"}, "expires_s"),
        ({"source": 1, "target": 2, "amount": 5.0}, "amount"),
    ):
        with pytest.raises(bank.InvalidCommand, match=rule):
            bank.Hold(**bad)
    for bad_post in ({"hold": 0}, {"hold": 1, "amount": 0}, {"hold": "1"}, {"hold": 1, "x": 2}):
        with pytest.raises(bank.InvalidCommand):
            bank.Post(**bad_post)
    with pytest.raises(bank.InvalidCommand):
        bank.Void(hold=-1)
    b = make_bank()
    forged: list[object] = [
        bank.Post.model_construct(hold=1, amount=None, key=None),
        bank.Hold(source=1, target=2, amount=5).model_copy(update={"amount": 0}),
        bank.Void(hold=3).model_copy(),
    ]
    for command in forged:
        with pytest.raises(bank.InvalidCommand):
            b.submit(command)  # type: ignore[arg-type]
    with pytest.raises(bank.InvalidCommand, match=r"Post\.amount: must be an int"):
        b.submit(bank.Post(hold=2).model_copy(update={"amount": 0}))
    assert b.stats().accepted == 0


def test_views_show_held_amounts_available_balances_and_open_holds(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    b = make_ledger_bank()
    alice = b.open_account("alice", overdraft_limit=5_00).id
    shop = b.open_account("shop").id
    b.deposit(alice, 100_00)
    h1 = b.hold(alice, shop, 30_00, expires_s=600)
    b.hold(alice, shop, 20_00)
    h3 = b.hold(alice, shop, 10_00)
    b.void(h3.seq)
    b.post(h1.seq, 5_00)
    held = ledger_db.query(
        "SELECT account_id, open_holds, held, available FROM account_holds ORDER BY account_id"
    )
    assert [tuple(int(v) for v in r) for r in held] == [
        (0, 0, 0, -100_00 + BALANCE_MAX),  # @cash: its floor is 64 bits
        (alice, 1, 20_00, 95_00 + 5_00 - 20_00),
        (shop, 0, 0, 5_00),
    ]
    rows = ledger_db.query(
        "SELECT hold_seq, source_id, target_id, amount, expires_us FROM open_holds ORDER BY hold_seq"
    )
    assert [tuple(r) for r in rows] == [(h1.seq + 1, alice, shop, 20_00, None)]
    assert b.account(alice).available == 80_00
    _audit_ok(ledger_db)


def test_under_contention_available_never_goes_below_zero_and_no_hold_settles_twice(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    b = make_ledger_bank(workers=4)
    hot = b.open_account("hot").id
    shops = [b.open_account(f"shop{i}").id for i in range(3)]
    b.deposit(hot, 1_000)
    holds: list[int] = []
    holds_lock = threading.Lock()
    low = [0]
    stop = threading.Event()
    settled: list[int] = []

    def holder(i: int) -> None:
        for n in range(25):
            try:
                r = b.hold(hot, shops[n % 3], 7 + i, expires_s=0.05 if n % 5 == 0 else None)
            except bank.InsufficientFunds:
                continue
            with holds_lock:
                holds.append(r.seq)

    def settler(i: int) -> None:
        for n in range(40):
            with holds_lock:
                seq = holds.pop() if holds else None
            if seq is None:
                time.sleep(0.001)
                continue
            for attempt in range(2):  # the second always refused: a hold settles once
                try:
                    r = b.post(seq, 3) if (n + attempt) % 2 else b.void(seq)
                    settled.append(r.hold_seq or 0)
                except (bank.HoldNotPending, bank.HoldNotFound):
                    pass

    def spender() -> None:
        for _ in range(40):
            with contextlib.suppress(bank.InsufficientFunds):
                b.withdraw(hot, 5)

    def watcher() -> None:
        while not stop.is_set():
            low[0] = min(low[0], b.account(hot).available)

    watch = threading.Thread(target=watcher)
    watch.start()
    try:
        run_threads(
            [
                *(lambda i=i: holder(i) for i in range(4)),
                *(lambda i=i: settler(i) for i in range(4)),
            ]
            + [spender] * 4,
            timeout_s=60,
        )
    finally:
        stop.set()
        watch.join()
    assert low[0] >= 0
    assert len(settled) == len(set(settled))
    settle_rows = ledger_db.query(
        "SELECT hold_seq, COUNT(*) FROM transfers WHERE hold_seq IS NOT NULL GROUP BY hold_seq "
        "HAVING COUNT(*) > 1"
    )
    assert settle_rows == []
    wait_until(lambda: b.account(hot).held == sum(h.amount for h in _pending(ledger_db, hot)))
    assert b.snapshot().total == 0
    b.close()
    _audit_ok(ledger_db)


class _Hold:
    def __init__(self, amount: int) -> None:
        self.amount = amount


def _pending(ledger_db: LedgerDb, source: int) -> list[_Hold]:
    rows = ledger_db.query(f"SELECT amount FROM open_holds WHERE source_id = {source}")
    return [_Hold(int(r[0])) for r in rows]


def test_a_close_needs_nothing_held_and_no_pending_hold_and_then_refuses_holds(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank()
    alice = b.open_account("alice").id
    shop = b.open_account("shop").id
    other = b.open_account("other").id
    b.deposit(alice, 10_00)
    h = b.hold(alice, shop, 10_00)
    with pytest.raises(bank.AccountNotEmpty, match="pending hold"):
        b.close_account(shop)  # the target of a pending hold
    b.void(h.seq)
    b.withdraw(alice, 10_00)
    b.close_account(shop)
    with pytest.raises(bank.AccountClosed):
        b.hold(alice, shop, 1)
    with pytest.raises(bank.AccountClosed):
        b.hold(shop, alice, 1)
    b.deposit(alice, 5_00)
    held = b.hold(alice, other, 5_00)
    with pytest.raises(bank.AccountNotEmpty, match="500 held"):
        b.close_account(alice)
    b.post(held.seq)
    b.close_account(alice)  # balance 0, nothing held, no hold naming it
    with pytest.raises(bank.LinkedCommandFailed) as caught:
        b.transact(
            [bank.Deposit(account=other, amount=1), bank.Hold(source=other, target=alice, amount=1)]
        )
    assert isinstance(caught.value.error, bank.AccountClosed)
