"""A hypothesis state machine drives a real file-backed `Bank` and a plain-Python model side by side and proves they never disagree, across restarts."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tempfile
from concurrent.futures import Future
from dataclasses import dataclass
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


def chain_hash(prev: str, r: bank.Receipt) -> str:
    """The documented `transfers.hash` formula, format 2 (every row of a new ledger)."""
    values = (prev, r.seq, r.kind, r.debit_account, r.credit_account, r.amount, r.ts_us, r.key)
    text = "bank:transfers:2\n" + "".join(_v(v) for v in values)
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

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bank-stateful-")
        self.path = os.path.join(self.dir, "ledger.db")
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
        assert receipt.hash == chain_hash(self.head, receipt), "receipt hash breaks the chain"
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
        """Read the ledger with plain sqlite3 and compare every row with the model."""
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT seq, kind, key, amount, debit_account_id, credit_account_id, ts_us, hash "
                "FROM transfers ORDER BY seq"
            ).fetchall()
            assert [bank.Receipt(*row) for row in rows] == self.receipts
            stored = {
                r[0]: (r[1], r[2], r[3])
                for r in con.execute("SELECT id, name, overdraft_limit, balance FROM accounts")
            }
            expected = {i: (a.name, a.limit, a.balance) for i, a in self.accounts.items()}
            cash = stored.pop(CASH)
            assert cash[0] == bank.CASH_ACCOUNT_NAME and cash[2] == self.cash
            assert stored == expected
            prev = GENESIS
            last_limit: dict[int, int] = {}
            for row in con.execute(
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
        finally:
            con.close()

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


_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,  # no .hypothesis/ directory in the working tree
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}


@pytest.mark.timeout(240)
def test_bank_matches_model() -> None:
    run_state_machine_as_test(
        BankMachine,
        settings=settings(max_examples=100, stateful_step_count=50, **_SETTINGS),
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
