"""A hypothesis state machine drives a real file-backed `Bank` and a plain-Python model side by side and proves they never disagree, across restarts."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import bank
from bank.ledger.audit import audit_ledger
from tests import faults
from tests.conftest import LedgerDb

CASH = bank.CASH_ACCOUNT_ID
AMOUNT_MAX = bank.AMOUNT_MAX
BALANCE_MIN = -(2**63)
BALANCE_MAX = 2**63 - 1
GENESIS = "0" * 64
RESULT_WAIT_S = 30.0

# -- strategies ----------------------------------------------------------------------------

_TEXT_CHARS = st.characters(exclude_categories=("Cc", "Cs"))

valid_names = st.one_of(
    st.sampled_from(["alice", "bob", "carol", "shop 1", "Émile", "a|b", "n" * 64]),
    st.text(_TEXT_CHARS, min_size=1, max_size=64).filter(
        lambda s: s == s.strip() and not s.startswith("@")
    ),
)
INVALID_NAMES = ("", " alice", "alice ", "@cash", "@bank", "n" * 65, "a\x00b", "a\nb", "\u2028x")
invalid_names = st.sampled_from(INVALID_NAMES)
limits = st.one_of(
    st.integers(0, 500), st.sampled_from([0, 10**15, bank.AMOUNT_MAX * 2, BALANCE_MAX])
)
amounts = st.one_of(st.integers(1, 300), st.integers(1, AMOUNT_MAX))
# A small pool so that keys are reused often; plus any valid key now and then.
KEY_POOL = ["k1", "k2", "k3", "order-17", "é|1", "K" * 128]
keys = st.one_of(
    st.none(),
    st.sampled_from(KEY_POOL),
    st.text(_TEXT_CHARS, min_size=1, max_size=128),
)
kinds = st.sampled_from(["deposit", "withdrawal", "transfer"])


def _v(value: object) -> str:
    """V(value) of hash format 2 (bank/ledger/chain.py), re-implemented here."""
    if value is None:
        return "n"
    if type(value) is int:
        return f"i{value};"
    assert type(value) is str, value
    return f"s{len(value.encode())}:{value}"


def chain_hash(prev: str, r: bank.Receipt, debit_balance: int, credit_balance: int) -> str:
    """The documented `transfers.hash` formula, format 3 (every row of a new ledger): the
    row's columns, the two running balances and the (here NULL) hold and group columns."""
    values = (
        prev,
        r.seq,
        r.kind,
        r.debit_account,
        r.credit_account,
        r.amount,
        r.ts_us,
        r.key,
        debit_balance,
        credit_balance,
        r.hold_seq,
        r.expires_us,
        r.link_first,
        r.link_count,
    )
    text = "bank:transfers:3\n" + "".join(_v(v) for v in values)
    return hashlib.sha256(text.encode()).hexdigest()


def event_hash(prev: str, row: tuple[Any, ...]) -> str:
    """`account_events.hash`: format 1 for the `@cash` opening (event 1, migration 0001), else 2."""
    seq, account_id, kind, name, limit, transfer_seq, ts_us = row
    if seq == 1:
        text = f"{prev}\n{seq}|{account_id}|{kind}|{limit}|{transfer_seq}|{ts_us}|{name}"
    else:
        values = (prev, seq, account_id, kind, limit, transfer_seq, ts_us, name)
        text = "bank:account_events:2\n" + "".join(_v(v) for v in values)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ModelAccount:
    name: str
    limit: int
    balance: int = 0


@dataclass(frozen=True)
class Op:
    """A command as the model sees it."""

    kind: str
    debit: int
    credit: int
    amount: int
    key: str | None

    @property
    def signature(self) -> tuple[str, int, int, int]:
        return (self.kind, self.debit, self.credit, self.amount)

    def command(self) -> bank.Deposit | bank.Withdrawal | bank.Transfer:
        if self.kind == "deposit":
            return bank.Deposit(account=self.credit, amount=self.amount, key=self.key)
        if self.kind == "withdrawal":
            return bank.Withdrawal(account=self.debit, amount=self.amount, key=self.key)
        return bank.Transfer(
            source=self.debit, target=self.credit, amount=self.amount, key=self.key
        )

    def call(self, b: bank.Bank) -> bank.Receipt:
        """The blocking API call for this op."""
        if self.kind == "deposit":
            return b.deposit(self.credit, self.amount, key=self.key)
        if self.kind == "withdrawal":
            return b.withdraw(self.debit, self.amount, key=self.key)
        return b.transfer(self.debit, self.credit, self.amount, key=self.key)


class BankMachine(RuleBasedStateMachine):
    """The real engine on a temp-file ledger, checked against a dict-based model."""

    def __init__(self, new_ledger: Callable[[], LedgerDb] | None = None) -> None:
        """A new ledger per example: `new_ledger()` (e.g. `ledger_db.fresh`), else a temp file."""
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bank-stateful-")
        self.ledger = new_ledger() if new_ledger else LedgerDb.sqlite(Path(self.dir) / "ledger.db")
        self.path = self.ledger.db  # what `Bank.open` takes, on either backend
        self.bank: bank.Bank | None = None
        self.workers = 1
        self.queue_capacity = 64
        self.durability = "full"
        self.accounts: dict[int, ModelAccount] = {}
        self.cash = 0
        self.seq = 0
        self.head = GENESIS
        self.receipts: list[bank.Receipt] = []
        self.keys: dict[str, bank.Receipt] = {}  # accepted keys
        self.free_keys: set[str] = set()  # keys used only by rejected operations so far
        self.id_max = 0

    # -- helpers -----------------------------------------------------------------------

    @property
    def b(self) -> bank.Bank:
        assert self.bank is not None
        return self.bank

    def balance_of(self, account_id: int) -> int:
        return self.cash if account_id == CASH else self.accounts[account_id].balance

    def pick(self, data: st.DataObject, *, unknown_ok: bool = True) -> int:
        """A known customer account id, or (sometimes) one the bank has never opened."""
        known = sorted(self.accounts)
        if known and (not unknown_ok or data.draw(st.integers(0, 7), label="known?") > 0):
            return data.draw(st.sampled_from(known), label="account")
        return self.id_max + data.draw(st.integers(1, 1000), label="unknown account")

    def draw_op(self, data: st.DataObject, *, allow_self: bool = False) -> Op:
        kind = data.draw(kinds, label="kind")
        amount = data.draw(amounts, label="amount")
        key = data.draw(keys, label="key")
        if kind == "deposit":
            return Op(kind, CASH, self.pick(data), amount, key)
        if kind == "withdrawal":
            return Op(kind, self.pick(data), CASH, amount, key)
        source = self.pick(data)
        target = self.pick(data)
        if source == target and not allow_self:
            return Op("deposit", CASH, target, amount, key)
        return Op(kind, source, target, amount, key)

    def expect(self, op: Op) -> tuple[str, Any]:
        """What the engine must answer, judged in the order the engine judges it."""
        if op.key is not None and op.key in self.keys:
            original = self.keys[op.key]
            if original.signature() == op.signature:
                return ("duplicate", original)
            return ("error", bank.IdempotencyConflict)
        for account_id in (op.debit, op.credit):
            if account_id != CASH and account_id not in self.accounts:
                return ("error", bank.AccountNotFound)
        debit_after = self.balance_of(op.debit) - op.amount
        if op.debit == CASH:
            if debit_after < BALANCE_MIN:
                return ("error", bank.BalanceOverflow)
        elif debit_after < -self.accounts[op.debit].limit:
            return ("error", bank.InsufficientFunds)
        if self.balance_of(op.credit) + op.amount > BALANCE_MAX:
            return ("error", bank.BalanceOverflow)
        return ("accepted", None)

    def check_outcome(self, op: Op, future: Future[bank.Receipt]) -> None:
        """Compare one answered operation with the model, then advance the model."""
        what, detail = self.expect(op)
        event(f"{op.kind}: {detail.__name__ if what == 'error' else what}")
        error = future.exception(timeout=RESULT_WAIT_S)
        if what == "error":
            assert isinstance(error, detail), f"{op}: expected {detail.__name__}, got {error!r}"
            if op.key is not None and op.key not in self.keys:
                self.free_keys.add(op.key)  # a rejected first use leaves the key free
            return
        assert error is None, f"{op}: expected {what}, got {error!r}"
        receipt = future.result()
        if what == "duplicate":
            assert receipt == detail, f"{op}: a repeated key must return the original receipt"
            return
        self.seq += 1
        assert receipt.seq == self.seq, f"seq must grow by 1 per accepted op: {receipt}"
        assert (receipt.kind, receipt.debit_account, receipt.credit_account) == (
            op.kind,
            op.debit,
            op.credit,
        )
        assert receipt.amount == op.amount
        assert receipt.key == op.key
        assert type(receipt.ts_us) is int
        after = (self.balance_of(op.debit) - op.amount, self.balance_of(op.credit) + op.amount)
        assert receipt.hash == chain_hash(self.head, receipt, *after), (
            "receipt hash breaks the chain"
        )
        self.head = receipt.hash
        self.receipts.append(receipt)
        if op.debit == CASH:
            self.cash -= op.amount
        else:
            self.accounts[op.debit].balance -= op.amount
        if op.credit == CASH:
            self.cash += op.amount
        else:
            self.accounts[op.credit].balance += op.amount
        if op.key is not None:
            self.keys[op.key] = receipt
            self.free_keys.discard(op.key)

    def run_blocking(self, op: Op) -> Future[bank.Receipt]:
        """Run `op` through the blocking API; its outcome as a done future."""
        future: Future[bank.Receipt] = Future()
        try:
            future.set_result(op.call(self.b))
        except bank.BankError as exc:
            future.set_exception(exc)
        return future

    def check_ledger_file(self) -> None:
        """Read the ledger beside the engine (plain sqlite3 or psycopg) and compare every row
        with the model."""
        query = self.ledger.query
        rows = query(
            "SELECT seq, kind, key, amount, debit_account_id, credit_account_id, ts_us, hash "
            "FROM transfers ORDER BY seq"
        )
        assert [bank.Receipt(*row) for row in rows] == self.receipts
        stored = {
            r[0]: (r[1], r[2], r[3])
            for r in query("SELECT id, name, overdraft_limit, balance FROM accounts")
        }
        expected = {i: (a.name, a.limit, a.balance) for i, a in self.accounts.items()}
        cash = stored.pop(CASH)
        assert cash[0] == bank.CASH_ACCOUNT_NAME and cash[2] == self.cash
        assert stored == expected
        prev = GENESIS
        last_limit: dict[int, int] = {}
        for row in query(
            "SELECT seq, account_id, kind, name, overdraft_limit, transfer_seq, ts_us, hash "
            "FROM account_events ORDER BY seq"
        ):
            prev_ok = event_hash(prev, row[:7])
            assert row[7] == prev_ok, f"account_events chain broken at seq {row[0]}"
            prev = row[7]
            last_limit[row[1]] = row[4]
        assert {i: last_limit[i] for i in self.accounts} == {
            i: a.limit for i, a in self.accounts.items()
        }

    # -- lifecycle ---------------------------------------------------------------------

    @initialize(
        workers=st.integers(1, 3),
        queue_capacity=st.sampled_from([1, 2, 8, 64]),
        durability=st.sampled_from(["full", "normal"]),
        first_accounts=st.lists(st.tuples(valid_names, limits), max_size=4),
    )
    def open_bank(
        self,
        workers: int,
        queue_capacity: int,
        durability: str,
        first_accounts: list[tuple[str, int]],
    ) -> None:
        self.workers, self.queue_capacity, self.durability = workers, queue_capacity, durability
        self.bank = bank.Bank.open(
            self.path, workers=workers, queue_capacity=queue_capacity, durability=durability
        )
        for name, limit in first_accounts:
            self.open_account(name, limit)

    def teardown(self) -> None:
        try:
            if self.bank is not None:
                self.bank.close()
                self.check_ledger_file()
        finally:
            self.ledger.drop()
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(workers=st.integers(1, 3), durability=st.sampled_from(["full", "normal"]))
    def reopen(self, workers: int, durability: str) -> None:
        """Close and reopen the same file: everything is restored from the ledger alone."""
        event("reopen")
        old = self.b
        old.close()
        old.close()  # idempotent
        with pytest.raises(bank.BankClosed):
            old.balance(CASH)
        with pytest.raises(bank.BankClosed):
            old.submit(bank.Deposit(account=1, amount=1))
        self.check_ledger_file()
        self.workers, self.durability = workers, durability
        self.bank = bank.Bank.open(
            self.path, workers=workers, queue_capacity=self.queue_capacity, durability=durability
        )
        for key, receipt in self.keys.items():
            assert self.b.find(key) == receipt, f"key {key!r} lost its receipt across a reopen"
        for key in self.free_keys:
            assert self.b.find(key) is None, f"rejected key {key!r} is in the ledger"

    # -- accounts ----------------------------------------------------------------------

    @rule(name=valid_names, limit=limits)
    def open_account(self, name: str, limit: int) -> None:
        if any(a.name == name for a in self.accounts.values()):
            event("open_account: AccountNameTaken")
            with pytest.raises(bank.AccountNameTaken):
                self.b.open_account(name, overdraft_limit=limit)
            return
        account = self.b.open_account(name, overdraft_limit=limit)
        assert account.id > CASH and account.id not in self.accounts
        assert (account.name, account.overdraft_limit, account.balance) == (name, limit, 0)
        self.accounts[account.id] = ModelAccount(name, limit)
        self.id_max = max(self.id_max, account.id)

    @rule(
        name=st.one_of(invalid_names, valid_names),
        limit=st.sampled_from([-1, True, 1.5, "10", BALANCE_MAX + 1, None]),
    )
    def open_account_invalid(self, name: str, limit: Any) -> None:
        with pytest.raises(bank.InvalidCommand):
            self.b.open_account(name, overdraft_limit=limit)
        if name in INVALID_NAMES:
            with pytest.raises(bank.InvalidCommand):
                self.b.open_account(name)

    @rule(data=st.data(), limit=limits)
    def set_overdraft_limit(self, data: st.DataObject, limit: int) -> None:
        target = data.draw(st.sampled_from(["customer", "customer", "customer", "unknown", "cash"]))
        if target == "cash":
            with pytest.raises(bank.InvalidCommand):
                self.b.set_overdraft_limit(CASH, limit)
            return
        account_id = self.pick(data, unknown_ok=target == "unknown")
        if account_id not in self.accounts:
            with pytest.raises(bank.AccountNotFound):
                self.b.set_overdraft_limit(account_id, limit)
            return
        model = self.accounts[account_id]
        if model.balance < -limit:
            event("set_overdraft_limit: InsufficientFunds")
            with pytest.raises(bank.InsufficientFunds):
                self.b.set_overdraft_limit(account_id, limit)
            return
        event("set_overdraft_limit: changed")
        account = self.b.set_overdraft_limit(account_id, limit)
        assert account.id == account_id and account.overdraft_limit == limit
        model.limit = limit

    # -- operations --------------------------------------------------------------------

    @rule(data=st.data(), via=st.sampled_from(["call", "submit"]))
    def operate(self, data: st.DataObject, via: str) -> None:
        op = self.draw_op(data)
        future = self.run_blocking(op) if via == "call" else self.b.submit(op.command())
        self.check_outcome(op, future)

    @rule(data=st.data(), n=st.integers(1, 6))
    def operate_many(self, data: st.DataObject, n: int) -> None:
        """A batch through `submit_many`: one job per chunk, answered in list order."""
        if self.workers > 1:
            # Chunks of one batch may go to different workers and then their order is
            # not defined; keep the batch in one chunk so the model can predict it.
            n = min(n, self.queue_capacity)
        ops = [self.draw_op(data) for _ in range(n)]
        futures = self.b.submit_many([op.command() for op in ops])
        assert len(futures) == n
        for op, future in zip(ops, futures, strict=True):
            self.check_outcome(op, future)

    @precondition(lambda self: bool(self.accounts))
    @rule(data=st.data(), over=st.booleans(), via=st.sampled_from(["call", "submit"]))
    def debit_to_the_floor(self, data: st.DataObject, over: bool, via: str) -> None:
        """Debit exactly down to `-overdraft_limit`, or one cent past it."""
        source = self.pick(data, unknown_ok=False)
        model = self.accounts[source]
        amount = model.balance + model.limit + over
        if not 1 <= amount <= AMOUNT_MAX:
            return
        target = data.draw(st.sampled_from([CASH, *sorted(set(self.accounts) - {source})]))
        op = Op("withdrawal" if target == CASH else "transfer", source, target, amount, None)
        future = self.run_blocking(op) if via == "call" else self.b.submit(op.command())
        seq_before = self.seq
        self.check_outcome(op, future)
        if over:
            assert self.seq == seq_before, "one cent past the floor must be refused"
        else:
            assert model.balance == -model.limit, "down to the floor exactly must be accepted"

    @precondition(lambda self: any(a.balance < 0 for a in self.accounts.values()))
    @rule(data=st.data(), below=st.booleans())
    def set_overdraft_limit_at_the_balance(self, data: st.DataObject, below: bool) -> None:
        """Lower a limit to exactly the current overdraft, or one cent short of it."""
        source = data.draw(
            st.sampled_from(sorted(i for i, a in self.accounts.items() if a.balance < 0))
        )
        model = self.accounts[source]
        limit = -model.balance - below
        if below:
            with pytest.raises(bank.InsufficientFunds):
                self.b.set_overdraft_limit(source, limit)
        else:
            assert self.b.set_overdraft_limit(source, limit).overdraft_limit == limit
            model.limit = limit

    @precondition(lambda self: bool(self.keys))
    @rule(data=st.data(), same=st.booleans(), via=st.sampled_from(["call", "submit", "many"]))
    def reuse_key(self, data: st.DataObject, same: bool, via: str) -> None:
        """Repeat an accepted key: same command -> the original receipt, else a conflict."""
        key = data.draw(st.sampled_from(sorted(self.keys)), label="accepted key")
        r = self.keys[key]
        amount = r.amount
        if not same:
            amount = amount - 1 if amount == AMOUNT_MAX else amount + 1
        op = Op(r.kind, r.debit_account, r.credit_account, amount, key)
        if via == "call":
            future = self.run_blocking(op)
        elif via == "submit":
            future = self.b.submit(op.command())
        else:
            (future,) = self.b.submit_many([op.command()])
        what, _ = self.expect(op)
        assert what == ("duplicate" if same else "error")
        self.check_outcome(op, future)

    @rule(data=st.data(), amount=amounts, key=keys)
    def transfer_to_self(self, data: st.DataObject, amount: int, key: str | None) -> None:
        """`source == target` is refused when the command is built; nothing changes."""
        account_id = self.pick(data)
        with pytest.raises(bank.AccountsMustBeDifferent) as excinfo:
            bank.Transfer(source=account_id, target=account_id, amount=amount, key=key)
        assert isinstance(excinfo.value, bank.InvalidCommand)
        with pytest.raises(bank.AccountsMustBeDifferent):
            self.b.transfer(account_id, account_id, amount, key=key)

    @rule(
        build=st.sampled_from(
            [
                lambda: bank.Deposit(account=CASH, amount=1),
                lambda: bank.Withdrawal(account=CASH, amount=1),
                lambda: bank.Transfer(source=CASH, target=1, amount=1),
                lambda: bank.Deposit(account=1, amount=0),
                lambda: bank.Deposit(account=1, amount=-5),
                lambda: bank.Deposit(account=1, amount=AMOUNT_MAX + 1),
                lambda: bank.Deposit(account=1, amount=1.0),  # type: ignore[arg-type]
                lambda: bank.Deposit(account=1, amount=True),
                lambda: bank.Deposit(account=True, amount=1),
                lambda: bank.Deposit(account="1", amount=1),  # type: ignore[arg-type]
                lambda: bank.Deposit(account=1, amount=1, key=""),
                lambda: bank.Deposit(account=1, amount=1, key="k" * 129),
                lambda: bank.Deposit(account=1, amount=1, key="a\nb"),
                lambda: bank.Withdrawal(account=1, amount=1, key="\x00"),
                lambda: bank.Transfer(source=1, target=2, amount=1, extra=1),  # type: ignore[call-arg]
            ]
        )
    )
    def invalid_command(self, build: Any) -> None:
        with pytest.raises(bank.InvalidCommand):
            build()

    @rule(key=st.one_of(st.sampled_from(KEY_POOL), keys.filter(lambda k: k is not None)))
    def find(self, key: str) -> None:
        assert self.b.find(key) == self.keys.get(key)

    @rule(data=st.data(), limit=st.one_of(st.none(), st.integers(1, 5)))
    def history(self, data: st.DataObject, limit: int | None) -> None:
        account_id = self.pick(data) if data.draw(st.booleans()) else CASH
        if account_id != CASH and account_id not in self.accounts:
            with pytest.raises(bank.AccountNotFound):
                self.b.history(account_id)
            return
        mine = [r for r in self.receipts if account_id in (r.debit_account, r.credit_account)]
        if limit is None:  # the whole history, streamed in pages
            assert list(self.b.iter_history(account_id, page=2)) == mine
        else:
            assert self.b.history(account_id, limit=limit) == mine[:limit]

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def balances_match_the_model(self) -> None:
        if self.bank is None:
            return
        b = self.b
        for account_id, model in self.accounts.items():
            assert b.balance(account_id) == model.balance, f"account {account_id}"
        assert b.balance(CASH) == self.cash
        listed = [(a.id, a.name, a.overdraft_limit, a.balance) for a in b.accounts()]
        assert listed == [(i, a.name, a.limit, a.balance) for i, a in sorted(self.accounts.items())]

    @invariant()
    def snapshot_sums_to_zero(self) -> None:
        if self.bank is None:
            return
        snap = self.b.snapshot()
        assert snap.total == 0
        assert snap.seq == self.seq
        expected = {i: a.balance for i, a in self.accounts.items()}
        expected[CASH] = self.cash
        assert snap.balances == expected

    @invariant()
    def no_account_below_its_floor(self) -> None:
        for account_id, model in self.accounts.items():
            assert model.balance >= -model.limit, f"account {account_id} is below its floor"
        if self.bank is not None:
            for account in self.b.accounts():
                assert account.balance >= -account.overdraft_limit

    @invariant()
    def nothing_left_in_flight(self) -> None:
        if self.bank is None:
            return
        stats = self.b.stats()
        assert stats.seq == self.seq and stats.committed_seq == self.seq
        assert stats.queue_depth == 0
        assert stats.keys_in_flight == 0, "a key claim outlived its operation"


class FaultyBankMachine(BankMachine):
    """The same machine, plus two steps that real trouble brings: a crash (the files as a
    killed process leaves them, then a reopen) and a full disk (on a real tmpfs). After
    each, the model accepts the outcome: every acknowledged op kept, every refused one
    absent, and an op answered `LedgerUnavailable` either way, as `find(key)` then says."""

    def __init__(self) -> None:
        super().__init__()
        self.faults = 0  # makes each step's keys unique
        try:
            self.fs: faults.Tmpfs | None = faults.mount_tmpfs(Path(self.dir), "16m")
        except faults.FaultUnavailable:
            self.fs = None  # the disk-full step is then never chosen

    def teardown(self) -> None:
        try:
            if self.bank is not None:
                self.bank.close()
                self.check_ledger_file()
                self.bank = None
                # Only once closed: nothing in a process that owns a ledger may open
                # and close its file behind SQLite's back.
                report = audit_ledger(self.path)
                assert report.ok, [p.message for p in report.problems[:5]]
        finally:
            if self.fs is not None:
                self.fs.unmount()
            super().teardown()

    def _reopen_and_check_keys(self) -> None:
        self.bank = bank.Bank.open(
            self.path,
            workers=self.workers,
            queue_capacity=self.queue_capacity,
            durability=self.durability,
        )
        for key, receipt in self.keys.items():
            assert self.b.find(key) == receipt, f"key {key!r} lost its receipt across a crash"
        for key in self.free_keys:
            assert self.b.find(key) is None, f"rejected key {key!r} is in the ledger"

    @rule()
    def crash_and_reopen(self) -> None:
        """Copy the ledger's files as a SIGKILL would leave them (db, hot -wal, -shm), then
        reopen that copy: recovery must restore exactly what was acknowledged.

        Everything is answered here (the `nothing_left_in_flight` invariant), so the
        copy is one instant's state. `cp` runs in another process: this one owns the
        ledger and must never open and close its files behind SQLite's back.
        """
        event("crash_and_reopen")
        image = Path(self.dir) / "crash-image"
        image.mkdir()
        names = ("ledger.db", "ledger.db-wal", "ledger.db-shm")
        present = [n for n in names if (Path(self.dir) / n).exists()]
        assert "ledger.db-wal" in present, "a running bank has no -wal"
        subprocess.run(
            ["cp", "-p", *(str(Path(self.dir) / n) for n in present), str(image)],
            check=True,
            timeout=60,
        )
        self.b.close()  # the bank is gone; only the image of its files remains
        for n in names:
            (Path(self.dir) / n).unlink(missing_ok=True)
        for n in present:
            os.replace(image / n, Path(self.dir) / n)
        image.rmdir()
        self._reopen_and_check_keys()

    @precondition(lambda self: self.fs is not None and bool(self.accounts))
    @rule(data=st.data(), n=st.integers(1, 8))
    def disk_full(self, data: st.DataObject, n: int) -> None:
        """Fill the filesystem, submit keyed deposits, then free the space and reopen."""
        assert self.fs is not None
        self.faults += 1
        ops = [
            Op(
                "deposit",
                CASH,
                data.draw(st.sampled_from(sorted(self.accounts)), label="account"),
                data.draw(st.integers(1, 300), label="amount"),
                f"disk-full-{self.faults}-{i}",
            )
            for i in range(n)
        ]
        self.b.snapshot()  # nothing in flight before the disk fills
        self.fs.fill()
        try:
            futures = self.b.submit_many([op.command() for op in ops])
            unknown: list[Op] = []
            for op, future in zip(ops, futures, strict=True):
                error = future.exception(timeout=RESULT_WAIT_S)
                if isinstance(error, bank.LedgerUnavailable):
                    assert "\n" not in str(error), f"a multi-line message: {error}"
                    unknown.append(op)
                    continue
                assert not unknown, f"{op} answered {error!r} after an earlier failed commit"
                self.check_outcome(op, future)  # a receipt, or the refusal the model expects
            event(f"disk_full: {len(unknown)} of {n} unknown")
            if unknown:
                with pytest.raises(bank.LedgerUnavailable):
                    self.b.submit(ops[0].command())  # the bank stopped at the failed commit
                self.b.close()
        finally:
            self.fs.unfill()
        if not unknown:
            return
        self._reopen_and_check_keys()
        found = [self.b.find(op.key) for op in unknown if op.key is not None]
        committed = len([r for r in found if r is not None])
        assert all(r is not None for r in found[:committed]), (
            f"the unknown ops that committed are not a prefix of seq order: {found}"
        )
        for op, receipt in zip(unknown, found[:committed], strict=False):
            assert receipt is not None
            done: Future[bank.Receipt] = Future()
            done.set_result(receipt)
            self.check_outcome(op, done)  # the model takes it as accepted, in order


class ServedBank:
    """A child process serving a bank over a pipe (`python -m tests.faults serve`), with a
    reader thread that files every answer by key the moment the child writes it."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults", "serve", "--db", path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=faults.child_env(),
            cwd=faults.REPO_ROOT,
        )
        self.answers: dict[str, dict[str, Any]] = {}
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.ready = self.reply()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            message = json.loads(raw)
            if "ans" in message:
                with self.lock:
                    self.answers[message["key"]] = message
            else:
                self.replies.put(message)

    def send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        try:
            return self.replies.get(timeout=RESULT_WAIT_S)
        except queue.Empty:
            raise AssertionError(
                f"watchdog: the served bank did not answer: {self.stderr()}"
            ) from None

    def stderr(self) -> str:
        return f"exit code {self.proc.poll()}"

    def wait_answers(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + RESULT_WAIT_S
        while True:
            with self.lock:
                if all(k in self.answers for k in keys):
                    return dict(self.answers)
            assert time.monotonic() < deadline, "watchdog: operations left unanswered"
            time.sleep(0.001)

    def kill(self) -> dict[str, dict[str, Any]]:
        """SIGKILL the child; returns every answer it wrote before it died."""
        self.proc.kill()
        self.proc.wait(30)
        self.reader.join(30)
        with self.lock:
            return dict(self.answers)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send({"op": "close"})
            self.reply()
            self.proc.wait(30)
        self.reader.join(30)


@dataclass
class Pending:
    """An operation sent to the child, with the answer the model predicts for it."""

    op: Op
    predicted: str  # "accepted" or the refusal's class name


class KilledChildMachine(RuleBasedStateMachine):
    """A bank in a child process gets keyed operations without waiting for them, and is
    SIGKILLed at random moments. After each kill a new child reopens the ledger, and the
    model accepts what it finds: every acknowledged op present, every refused one absent,
    and of the unanswered ones a prefix of the accepted, in order (a crash keeps a prefix
    of seq order). Balances are then compared with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bank-killed-")
        self.path = os.path.join(self.dir, "ledger.db")
        self.child: ServedBank | None = None
        self.ids: list[int] = []
        self.limits: dict[int, int] = {}
        self.confirmed: dict[int, int] = {}  # balances as of the last settled state
        self.seq = 0
        self.pending: list[Pending] = []
        self.n = 0
        self.kills = 0

    @property
    def c(self) -> ServedBank:
        assert self.child is not None
        return self.child

    def _start(self) -> None:
        self.child = ServedBank(self.path)
        self.ids = self.c.ready["ready"]
        self.limits = {int(k): v for k, v in self.c.ready["limits"].items()}

    def _predicted_state(self, count: int | None = None) -> dict[int, int]:
        """Balances after the confirmed state plus the first `count` accepted pending ops."""
        state = dict(self.confirmed)
        applied = 0
        for p in self.pending:
            if p.predicted != "accepted":
                continue
            if count is not None and applied == count:
                break
            state[p.op.debit] -= p.op.amount
            state[p.op.credit] += p.op.amount
            applied += 1
        return state

    @initialize()
    def start(self) -> None:
        self._start()
        self.confirmed = {CASH: 0, **dict.fromkeys(self.ids, 0)}

    def teardown(self) -> None:
        try:
            if self.child is not None:
                self.child.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(data=st.data(), kind=kinds, amount=st.integers(1, 200))
    def submit(self, data: st.DataObject, kind: str, amount: int) -> None:
        if kind == "transfer":
            debit, credit = data.draw(st.permutations(self.ids))[:2]
        else:
            debit = credit = data.draw(st.sampled_from(self.ids))
        self._send(kind, debit, credit, amount)

    @rule(seed=st.integers(0, 2**32), n=st.integers(10, 80))
    def burst(self, seed: int, n: int) -> None:
        """Many operations at once, so that a kill lands while commits are in flight."""
        rng = random.Random(seed)
        for _ in range(n):
            debit, credit = rng.sample(self.ids, 2)
            self._send(
                rng.choice(["deposit", "withdrawal", "transfer"]),
                debit,
                credit,
                rng.randint(1, 200),
            )

    def _send(self, kind: str, debit: int, credit: int, amount: int) -> None:
        self.n += 1
        key = f"op-{self.n}"
        if kind == "deposit":
            op = Op(kind, CASH, credit, amount, key)
        elif kind == "withdrawal":
            op = Op(kind, debit, CASH, amount, key)
        else:
            op = Op(kind, debit, credit, amount, key)
        state = self._predicted_state()
        floor = -self.limits[op.debit] if op.debit != CASH else BALANCE_MIN
        predicted = "accepted" if state[op.debit] - amount >= floor else "InsufficientFunds"
        self.pending.append(Pending(op, predicted))
        self.c.send(
            {
                "op": "submit",
                "kind": kind,
                "debit": op.debit,
                "credit": op.credit,
                "amount": amount,
                "key": key,
            }
        )

    def _check_answers(self, answers: dict[str, dict[str, Any]]) -> None:
        seq = self.seq
        for p in self.pending:
            if p.predicted == "accepted":
                seq += 1
            answer = answers.get(p.op.key or "")
            if answer is None:
                continue
            if p.predicted == "accepted":
                assert answer == {"ans": "A", "key": p.op.key, "seq": seq}, (p, answer)
            else:
                assert answer == {"ans": "R", "key": p.op.key, "error": p.predicted}, (p, answer)

    @rule()
    def settle(self) -> None:
        """Wait for every answer; each must be the predicted one."""
        answers = self.c.wait_answers([p.op.key or "" for p in self.pending])
        self._check_answers(answers)
        accepted = sum(1 for p in self.pending if p.predicted == "accepted")
        self.confirmed = self._predicted_state()
        self.seq += accepted
        self.pending = []
        self._check_balances()

    def _check_balances(self) -> None:
        self.c.send({"op": "snapshot"})
        snap = self.c.reply()
        assert snap["seq"] == self.seq
        assert {int(k): v for k, v in snap["snapshot"].items()} == self.confirmed

    @rule(delay_s=st.sampled_from([0.0, 0.0005, 0.002, 0.01, 0.05]))
    def sigkill_and_reopen(self, delay_s: float) -> None:
        time.sleep(delay_s)
        answers = self.c.kill()
        self.kills += 1
        event(f"sigkill after {delay_s * 1000:g} ms")
        self._check_answers(answers)
        self._start()  # a new child: Bank.open recovers the ledger
        found: list[tuple[Pending, int | None]] = []
        for p in self.pending:
            self.c.send({"op": "find", "key": p.op.key})
            found.append((p, self.c.reply()["seq"]))
        present = [seq is not None for p, seq in found if p.predicted == "accepted"]
        committed = sum(present)
        assert present == [True] * committed + [False] * (len(present) - committed), (
            f"the ops kept are not a prefix of seq order: {present}"
        )
        for p, seq in found:
            if p.predicted != "accepted":
                assert seq is None, f"refused {p.op.key} is in the ledger"
            elif answers.get(p.op.key or "", {}).get("ans") == "A":
                assert seq is not None, f"acknowledged {p.op.key} was lost"
        event(
            f"unanswered kept: {committed - sum(1 for p, _ in found if p.op.key in answers and p.predicted == 'accepted')}"
        )
        self.confirmed = self._predicted_state(committed)
        self.seq += committed
        self.pending = []
        self._check_balances()


_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,  # no .hypothesis/ directory in the working tree
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}


#: Examples per backend: each PostgreSQL example pays for a new database and its migrations.
MODEL_EXAMPLES = {"sqlite": 100, "postgres": 25}


@pytest.mark.timeout(240)
def test_bank_matches_model(ledger_db: LedgerDb) -> None:
    class Machine(BankMachine):
        def __init__(self) -> None:
            super().__init__(ledger_db.fresh)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=MODEL_EXAMPLES[ledger_db.backend], stateful_step_count=50, **_SETTINGS
        ),
    )


@pytest.mark.timeout(240)
def test_bank_matches_model_through_crashes_and_full_disks() -> None:
    run_state_machine_as_test(
        FaultyBankMachine,
        settings=settings(max_examples=8, stateful_step_count=30, **_SETTINGS),
    )


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_bank_matches_model_through_crashes_and_full_disks_long() -> None:
    """BANK_STATEFUL_EXAMPLES sets the example count."""
    run_state_machine_as_test(
        FaultyBankMachine,
        settings=settings(
            max_examples=int(os.environ.get("BANK_STATEFUL_EXAMPLES", "200")),
            stateful_step_count=60,
            **_SETTINGS,
        ),
    )


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_bank_matches_model_long(request: pytest.FixtureRequest) -> None:
    """Run with `-m slow` or BANK_SLOW=1; BANK_STATEFUL_EXAMPLES sets the example count."""
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get(
        "BANK_SLOW"
    ):
        pytest.skip("slow: run with -m slow or BANK_SLOW=1")
    run_state_machine_as_test(
        BankMachine,
        settings=settings(
            max_examples=int(os.environ.get("BANK_STATEFUL_EXAMPLES", "400")),
            stateful_step_count=100,
            **_SETTINGS,
        ),
    )


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_killed_child_bank_matches_the_model() -> None:
    """A real SIGKILL of the process that owns the bank, at random moments mid-flight.

    BANK_KILLED_EXAMPLES sets the example count.
    """
    run_state_machine_as_test(
        KilledChildMachine,
        settings=settings(
            max_examples=int(os.environ.get("BANK_KILLED_EXAMPLES", "30")),
            stateful_step_count=40,
            **_SETTINGS,
        ),
    )
