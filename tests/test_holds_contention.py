"""Holds and atomic groups under contention (issue 11, invariant 9): 16+ threads on a few
hot accounts, fast thread switching, the lock-order checker on, every wait bounded.

No account's `available` ever goes below zero (sampled while the threads race, and
proved afterwards by the audit's replay); no hold is settled twice (two threads
settling the same hold: exactly one wins and the other gets `HoldNotPending`; an
expiry racing a post: exactly one of them); a refused group leaves nothing.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

import bank
from bank.clock import ManualClock
from bank.ledger.audit import audit_ledger
from tests.conftest import LedgerDb, run_threads

TELLERS = 16
#: Operations per teller in the mixed race (PostgreSQL commits cost more: fewer there).
OPS = {"sqlite": 60, "postgres": 30}
WAIT_S = 60.0  # every future's answer, at most
WATCHDOG_S = 120.0  # every thread's end, at most
#: The lock-order checker is on (tests/conftest.py), switching every 1 us.
SWITCH_INTERVAL_S = 1e-6

#: What a teller may be told, besides a receipt, in the mixed race.
REFUSALS = (
    bank.InsufficientFunds,
    bank.HoldNotPending,
    bank.HoldNotFound,
    bank.PostExceedsHold,
    bank.LinkedCommandFailed,
)


def _audit_clean(ledger_db: LedgerDb) -> None:
    """The audit's replay (holds against `available` at every seq, each hold settled at
    most once, posts within holds, nothing after expiry, groups whole) finds nothing."""
    report = audit_ledger(ledger_db.db)
    assert report.ok, report.problems[:5]


def _settlements(ledger_db: LedgerDb) -> dict[int, list[tuple[str, int]]]:
    """hold seq -> the (kind, seq) of every row that settles it, read beside the engine."""
    found: dict[int, list[tuple[str, int]]] = {}
    for hold_seq, kind, seq in ledger_db.query(
        "SELECT hold_seq, kind, seq FROM transfers WHERE hold_seq IS NOT NULL ORDER BY seq"
    ):
        found.setdefault(hold_seq, []).append((kind, seq))
    return found


class Sampler:
    """A thread that reads every account's `available` (and `held`) over and over while
    the others race, and records the lowest it saw."""

    def __init__(self, accounts: list[bank.Account]) -> None:
        self.accounts = accounts
        self.low: dict[int, int] = {a.id: a.available for a in accounts}
        self.bad_held: list[tuple[int, int]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for a in self.accounts:
                available, held = a.available, a.held
                self.low[a.id] = min(self.low[a.id], available)
                if held < 0:
                    self.bad_held.append((a.id, held))
            self.samples += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WATCHDOG_S)
        assert not self._thread.is_alive(), "watchdog: the sampler did not stop"


@pytest.mark.timeout(240)
def test_available_never_below_zero_and_no_hold_settled_twice(ledger_db: LedgerDb) -> None:
    """Holds, posts (all or part), voids, expiries, withdrawals, transfers and groups
    race on four hot accounts."""
    clock = ManualClock()
    b = bank.Bank.open(ledger_db.db, workers=4, queue_capacity=64, clock=clock)
    try:
        hot = [b.open_account(f"hot-{i}", overdraft_limit=(i % 2) * 300) for i in range(4)]
        for a in hot:
            b.deposit(a.id, 2_000)
        ids = [a.id for a in hot]
        holds: list[int] = []  # every hold placed (any teller may settle any)
        holds_lock = threading.Lock()
        wins: Counter[int] = Counter()  # hold seq -> post/void receipts received
        outcomes: Counter[str] = Counter()
        ops = OPS[ledger_db.backend]

        def record(what: str, receipt: bank.Receipt | None = None) -> None:
            with holds_lock:
                outcomes[what] += 1
                if receipt is not None and receipt.kind in ("post", "void"):
                    assert receipt.hold_seq is not None
                    wins[receipt.hold_seq] += 1
                if receipt is not None and receipt.kind == "hold":
                    holds.append(receipt.seq)

        def a_hold() -> int | None:
            with holds_lock:
                return random.choice(holds) if holds else None

        def teller(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(ops):
                src, dst = rng.sample(ids, 2)
                roll = rng.random()
                try:
                    if roll < 0.30:
                        expires = rng.choice([None, 0.001, 0.003, 0.010])
                        r = b.hold(src, dst, rng.randint(1, 900), expires_s=expires, timeout=WAIT_S)
                        record("hold", r)
                    elif roll < 0.50:
                        seq = a_hold()
                        if seq is not None:
                            amount = rng.choice([None, rng.randint(1, 200)])
                            record("post", b.post(seq, amount, timeout=WAIT_S))
                    elif roll < 0.62:
                        seq = a_hold()
                        if seq is not None:
                            record("void", b.void(seq, timeout=WAIT_S))
                    elif roll < 0.74:
                        record("withdrawal", b.withdraw(src, rng.randint(1, 900), timeout=WAIT_S))
                    elif roll < 0.86:
                        record(
                            "transfer", b.transfer(src, dst, rng.randint(1, 900), timeout=WAIT_S)
                        )
                    else:
                        seq = a_hold()
                        group: list[bank.Transfer | bank.Hold | bank.Post | bank.Withdrawal] = [
                            bank.Transfer(source=src, target=dst, amount=rng.randint(1, 400)),
                            bank.Hold(source=dst, target=src, amount=rng.randint(1, 400)),
                        ]
                        if seq is not None:
                            group.append(bank.Post(hold=seq))
                        if rng.random() < 0.3:
                            group.append(bank.Withdrawal(account=src, amount=10**9))  # refused
                        for r in b.submit_linked(group).result(timeout=WAIT_S):
                            record("group row", r)
                except REFUSALS as exc:
                    record(type(exc).__name__)

        def ticker() -> None:
            """Time passes in 1 ms steps while the tellers work (holds expire meanwhile)."""
            for _ in range(ops):
                clock.advance(0.001)
                time.sleep(0.0005)

        with Sampler([*hot, b.account(bank.CASH_ACCOUNT_ID)]) as sampler:
            run_threads(
                [*(lambda s=s: teller(s) for s in range(TELLERS)), ticker],
                timeout_s=WATCHDOG_S,
            )
        clock.advance(1.0)  # every hold with a deadline is due: the engine expires them
        deadline = time.monotonic() + WAIT_S
        while any(h.expires_us is not None for h in _pending_holds(ledger_db)):
            assert time.monotonic() < deadline, "watchdog: due holds never expired"
            time.sleep(0.005)
        for a in hot:
            assert sampler.low[a.id] >= 0, f"{a.name}: available went to {sampler.low[a.id]}"
            assert a.available >= 0 and a.held >= 0
        assert not sampler.bad_held, sampler.bad_held[:5]
        assert sampler.samples > 0
        assert outcomes["hold"] > 0 and outcomes["post"] + outcomes["void"] > 0, outcomes
        assert all(n == 1 for n in wins.values()), f"holds settled twice: {wins}"
        held_now = {a.id: a.held for a in hot}
    finally:
        b.close()
    settled = _settlements(ledger_db)
    assert all(len(rows) == 1 for rows in settled.values()), {
        h: rows for h, rows in settled.items() if len(rows) > 1
    }
    for hold_seq, n in wins.items():
        assert settled[hold_seq][0][0] in ("post", "void") and n == 1
    _audit_clean(ledger_db)
    # What is still held is exactly the pending holds (no deadline), after a reopen too.
    with bank.Bank.open(ledger_db.db, clock=clock) as again:
        assert {i: again.account(i).held for i in held_now} == held_now


class _StoredHold:
    def __init__(self, seq: int, expires_us: int | None) -> None:
        self.seq, self.expires_us = seq, expires_us


def _pending_holds(ledger_db: LedgerDb) -> list[_StoredHold]:
    """The hold rows no row settles yet, read beside the engine."""
    rows = ledger_db.query(
        "SELECT h.seq, h.expires_us FROM transfers h WHERE h.kind = 'hold' AND NOT EXISTS "
        "(SELECT 1 FROM transfers s WHERE s.hold_seq = h.seq)"
    )
    return [_StoredHold(seq, expires) for seq, expires in rows]


@pytest.mark.timeout(180)
def test_two_threads_settling_one_hold_exactly_one_wins(ledger_db: LedgerDb) -> None:
    """For each hold, two threads released together: post vs void, post vs post, void vs
    void. One receipt, one `HoldNotPending`, one settling row in the ledger."""
    pairs = 12 if ledger_db.backend == "sqlite" else 6
    with bank.Bank.open(ledger_db.db, workers=4, queue_capacity=64) as b:
        source = b.open_account("payer").id
        target = b.open_account("payee").id
        b.deposit(source, 10_000)
        races: list[tuple[int, tuple[str, str]]] = []
        for i in range(pairs * 3):
            seq = b.hold(source, target, 10 + i).seq
            how = (("post", "void"), ("post", "post"), ("void", "void"))[i % 3]
            races.append((seq, how))
        answers: dict[tuple[int, int], object] = {}
        lock = threading.Lock()

        def settle(seq: int, how: str, side: int, gate: threading.Barrier) -> Callable[[], None]:
            def go() -> None:
                gate.wait(WAIT_S)
                try:
                    r: object = b.post(seq) if how == "post" else b.void(seq)
                except bank.HoldNotPending as exc:
                    r = exc
                with lock:
                    answers[(seq, side)] = r

            return go

        targets: list[Callable[[], None]] = []
        for seq, (first, second) in races:
            gate = threading.Barrier(2)
            targets += [settle(seq, first, 0, gate), settle(seq, second, 1, gate)]
        run_threads(targets, timeout_s=WATCHDOG_S)
        for seq, _ in races:
            got = [answers[(seq, 0)], answers[(seq, 1)]]
            won = [r for r in got if isinstance(r, bank.Receipt)]
            lost = [r for r in got if isinstance(r, bank.HoldNotPending)]
            assert len(won) == 1 and len(lost) == 1, (seq, got)
            assert str(seq) in str(lost[0]) and won[0].kind in str(lost[0]).replace("ed", ""), (
                f"the refusal says which settled it: {lost[0]}"
            )
        payer = b.account(source)
        assert payer.held == 0
        moved = sum(
            r.amount for r in answers.values() if isinstance(r, bank.Receipt) and r.kind == "post"
        )
        assert payer.balance == 10_000 - moved and b.balance(target) == moved
    settled = _settlements(ledger_db)
    assert sorted(settled) == sorted(seq for seq, _ in races)
    assert all(len(rows) == 1 for rows in settled.values()), settled
    _audit_clean(ledger_db)


@pytest.mark.timeout(180)
def test_expiry_racing_a_post_exactly_one(ledger_db: LedgerDb) -> None:
    """Holds whose deadline the clock reaches while a thread posts them: each is either
    posted (a receipt, stamped before the deadline) or expired (the post refused with
    `HoldNotPending`, the engine's expire row) — never both, never neither."""
    count = 24 if ledger_db.backend == "sqlite" else 10
    clock = ManualClock()
    with bank.Bank.open(ledger_db.db, workers=4, queue_capacity=64, clock=clock) as b:
        source = b.open_account("payer").id
        target = b.open_account("payee").id
        b.deposit(source, 100_000)
        holds = [b.hold(source, target, 100 + i, expires_s=1) for i in range(count)]
        answers: dict[int, object] = {}
        lock = threading.Lock()
        gate = threading.Barrier(count + 1)

        def poster(h: bank.Receipt) -> Callable[[], None]:
            def go() -> None:
                gate.wait(WAIT_S)
                try:
                    r: object = b.post(h.seq)
                except bank.HoldNotPending as exc:
                    r = exc
                with lock:
                    answers[h.seq] = r

            return go

        def expirer() -> None:
            gate.wait(WAIT_S)
            for _ in range(20):
                clock.advance(0.05)  # the deadline (1 s) is reached midway

        run_threads([*(poster(h) for h in holds), expirer], timeout_s=WATCHDOG_S)
        deadline = time.monotonic() + WAIT_S
        while b.account(source).held:
            assert time.monotonic() < deadline, "watchdog: due holds never expired"
            time.sleep(0.005)
    settled = _settlements(ledger_db)
    ts = dict(ledger_db.query("SELECT seq, ts_us FROM transfers"))
    kinds: Counter[str] = Counter()
    for h in holds:
        assert h.expires_us is not None
        rows = settled.get(h.seq, [])
        assert len(rows) == 1, (h.seq, rows)
        kind, seq = rows[0]
        kinds[kind] += 1
        answer = answers[h.seq]
        if kind == "post":
            assert isinstance(answer, bank.Receipt) and answer.seq == seq
            assert ts[seq] < h.expires_us, "posted at or after its deadline"
        else:
            assert kind == "expire", rows
            assert isinstance(answer, bank.HoldNotPending), answer
            assert ts[seq] >= h.expires_us, "expired before its deadline"
    _audit_clean(ledger_db)
