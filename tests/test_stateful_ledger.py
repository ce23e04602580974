"""A hypothesis state machine drives issue 11's ledger features on a real `Bank` beside a
plain-Python model, on both backends, and after every step compares them.

The machine opens and closes accounts (refused closes included), moves money,
retries keyed operations, reopens the bank (recovery) and reads `balance(at_seq=)` at
random earlier seqs and `history` pages; the last step audits the ledger. The model
knows nothing of the engine: balances, closed accounts, the rows the ledger must hold.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import bank
from bank import lockcheck
from tests.conftest import LedgerDb
from tests.ledger_templates import LedgerTemplate

CASH = bank.CASH_ACCOUNT_ID
BALANCE_MIN = -(2**63)
BALANCE_MAX = 2**63 - 1

NAMES = ("alice", "bob", "carol", "shop")
KEYS = ("k1", "k2", "k3", "k4", "k5", "k6")
limits = st.sampled_from([0, 0, 100, 10**15])
amounts = st.one_of(st.integers(1, 300), st.sampled_from([bank.AMOUNT_MAX]))
keys = st.one_of(st.none(), st.none(), st.sampled_from(KEYS))


@pytest.fixture(autouse=True)
def _lock_checked() -> Iterator[None]:
    """Every lock's order checked (a violation fails the test), fast thread switching."""
    lockcheck.reset()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with lockcheck.enabled(True):
            yield
    finally:
        sys.setswitchinterval(old)
    found = lockcheck.violations()
    lockcheck.reset()
    assert not found, f"lock-order violations: {found}"


@dataclass
class MAccount:
    """An account as the model knows it."""

    name: str
    limit: int
    balance: int = 0
    closed: bool = False


@dataclass(frozen=True)
class Op:
    """A one-step money command as the model sees it (debit -> credit)."""

    kind: str
    debit: int
    credit: int
    amount: int
    key: str | None

    def call(self, b: bank.Bank) -> bank.Receipt:
        if self.kind == "deposit":
            return b.deposit(self.credit, self.amount, key=self.key)
        if self.kind == "withdrawal":
            return b.withdraw(self.debit, self.amount, key=self.key)
        return b.transfer(self.debit, self.credit, self.amount, key=self.key)

    def signature(self) -> tuple[str, int, int, int]:
        return (self.kind, self.debit, self.credit, self.amount)


@dataclass
class Model:
    """What the ledger must hold: accounts, every accepted row, keys in use."""

    accounts: dict[int, MAccount] = field(default_factory=dict)
    cash: int = 0
    rows: list[bank.Receipt] = field(default_factory=list)
    keys: dict[str, bank.Receipt] = field(default_factory=dict)
    free_keys: set[str] = field(default_factory=set)

    @property
    def seq(self) -> int:
        return len(self.rows)

    def balance(self, account: int) -> int:
        return self.cash if account == CASH else self.accounts[account].balance

    def add(self, account: int, delta: int) -> None:
        if account == CASH:
            self.cash += delta
        else:
            self.accounts[account].balance += delta

    def balance_at(self, account: int, seq: int) -> int:
        """The balance right after row `seq`, by replaying the model's rows."""
        total = 0
        for r in self.rows[:seq]:
            if r.kind in ("deposit", "withdrawal", "transfer", "post"):
                if r.debit_account == account:
                    total -= r.amount
                if r.credit_account == account:
                    total += r.amount
        return total

    def history(self, account: int, after: int, limit: int) -> list[bank.Receipt]:
        rows = [r for r in self.rows[after:] if account in (r.debit_account, r.credit_account)]
        return rows[:limit]

    def floor(self, account: int) -> int:
        return BALANCE_MIN if account == CASH else -self.accounts[account].limit

    def judge(self, op: Op) -> tuple[str, Any]:
        """The engine's answer, judged in its order: key, existence, closed, funds, overflow."""
        if op.key is not None and op.key in self.keys:
            original = self.keys[op.key]
            if original.signature() == op.signature():
                return ("duplicate", original)
            return ("error", bank.IdempotencyConflict)
        for account in (op.debit, op.credit):
            if account != CASH and account not in self.accounts:
                return ("error", bank.AccountNotFound)
        for account in (op.debit, op.credit):
            if account != CASH and self.accounts[account].closed:
                return ("error", bank.AccountClosed)
        if self.balance(op.debit) - op.amount < self.floor(op.debit):
            return ("error", bank.BalanceOverflow if op.debit == CASH else bank.InsufficientFunds)
        if self.balance(op.credit) + op.amount > BALANCE_MAX:
            return ("error", bank.BalanceOverflow)
        return ("accepted", None)


class LedgerMachine(RuleBasedStateMachine):
    """The real engine on a fresh ledger of one backend, against `Model`."""

    def __init__(self, new_ledger: Callable[[], LedgerDb]) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bank-stateful-ledger-")
        self.ledger = new_ledger()
        self.model = Model()
        self.bank: bank.Bank | None = None

    @property
    def b(self) -> bank.Bank:
        assert self.bank is not None
        return self.bank

    def _open(self, workers: int) -> None:
        self.bank = bank.Bank.open(self.ledger.db, workers=workers, durability="normal")

    def pick(self, data: st.DataObject, label: str = "account") -> int:
        """A known customer account (closed ones included), sometimes an unknown id."""
        known = sorted(self.model.accounts)
        if known and data.draw(st.integers(0, 9), label=f"{label} known?") > 0:
            return data.draw(st.sampled_from(known), label=label)
        return max(known, default=0) + data.draw(st.integers(1, 3), label=f"{label} unknown")

    # -- lifecycle -------------------------------------------------------------------

    @initialize(workers=st.integers(1, 3))
    def start(self, workers: int) -> None:
        self._open(workers)
        self.compare()

    def teardown(self) -> None:
        try:
            if self.bank is not None:
                self.compare()
                report = self.b.audit()
                assert report.ok, f"the audit found problems: {report.problems}"
                self.bank.close()
                self.check_rows()
        finally:
            if self.bank is not None:
                self.bank.close()
            self.ledger.drop()
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(workers=st.integers(1, 3))
    def reopen(self, workers: int) -> None:
        """Close and reopen: everything comes back from the ledger alone."""
        event("reopen")
        self.b.close()
        self.check_rows()
        self._open(workers)
        for key, receipt in self.model.keys.items():
            assert self.b.find(key) == receipt, f"key {key!r} lost its receipt across a reopen"
        for key in self.model.free_keys:
            assert self.b.find(key) is None, f"refused key {key!r} is in the ledger"

    # -- accounts ----------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), limit=limits, exist_ok=st.booleans())
    def open_account(self, name: str, limit: int, exist_ok: bool) -> None:
        existing = [i for i, a in self.model.accounts.items() if a.name == name]
        if existing:
            mine = self.model.accounts[existing[0]]
            if exist_ok and mine.limit == limit:
                event("open_account: exist_ok returns it")
                account = self.b.open_account(name, limit, exist_ok=True)
                assert account.id == existing[0]
                assert account.closed == mine.closed
                return
            event("open_account: AccountNameTaken")
            with pytest.raises(bank.AccountNameTaken):
                self.b.open_account(name, limit, exist_ok=exist_ok)
            return
        account = self.b.open_account(name, limit, exist_ok=exist_ok)
        assert account.id not in self.model.accounts and account.id > CASH
        assert (account.name, account.overdraft_limit, account.balance) == (name, limit, 0)
        assert not account.closed
        self.model.accounts[account.id] = MAccount(name, limit)

    @rule(data=st.data())
    def close_account(self, data: st.DataObject) -> None:
        account = self.pick(data)
        mine = self.model.accounts.get(account)
        expected: type[bank.BankError] | None
        if mine is None:
            expected = bank.AccountNotFound
        elif mine.closed:
            expected = bank.AccountClosed
        elif mine.balance != 0:
            expected = bank.AccountNotEmpty
        else:
            expected = None
        event(f"close_account: {expected.__name__ if expected else 'closed'}")
        if expected is not None:
            with pytest.raises(expected):
                self.b.close_account(account)
            return
        closed = self.b.close_account(account)
        assert closed.id == account and closed.closed
        assert mine is not None
        mine.closed = True

    @rule()
    def close_cash(self) -> None:
        with pytest.raises(bank.InvalidCommand):
            self.b.close_account(CASH)

    @rule(data=st.data())
    def empty_account(self, data: st.DataObject) -> None:
        """Bring an open account to zero (a withdrawal or deposit), so that closes succeed."""
        open_ids = sorted(i for i, a in self.model.accounts.items() if not a.closed)
        if not open_ids:
            return
        account = data.draw(st.sampled_from(open_ids), label="account to empty")
        balance = self.model.accounts[account].balance
        if balance > 0:
            self.run(Op("withdrawal", account, CASH, min(balance, bank.AMOUNT_MAX), None))
        elif balance < 0:
            self.run(Op("deposit", CASH, account, min(-balance, bank.AMOUNT_MAX), None))

    @rule(name=st.sampled_from((*NAMES, "nobody", bank.CASH_ACCOUNT_NAME)))
    def account_named(self, name: str) -> None:
        if name == bank.CASH_ACCOUNT_NAME:
            assert self.b.account_named(name).id == CASH
            return
        found = [i for i, a in self.model.accounts.items() if a.name == name]
        if not found:
            with pytest.raises(bank.AccountNotFound):
                self.b.account_named(name)
            return
        account = self.b.account_named(name)
        assert account.id == found[0] and account.closed == self.model.accounts[found[0]].closed

    # -- money -----------------------------------------------------------------------

    def draw_op(self, data: st.DataObject) -> Op:
        kind = data.draw(st.sampled_from(["deposit", "withdrawal", "transfer"]), label="kind")
        amount = data.draw(amounts, label="amount")
        key = data.draw(keys, label="key")
        if kind == "deposit":
            return Op(kind, CASH, self.pick(data), amount, key)
        if kind == "withdrawal":
            return Op(kind, self.pick(data), CASH, amount, key)
        source, target = self.pick(data, "source"), self.pick(data, "target")
        if source == target:
            return Op("deposit", CASH, target, amount, key)
        return Op(kind, source, target, amount, key)

    def run(self, op: Op) -> None:
        """Run `op` (blocking API) and compare its answer with the model's judgement."""
        what, detail = self.model.judge(op)
        event(f"{op.kind}: {detail.__name__ if what == 'error' else what}")
        if what == "error":
            with pytest.raises(detail):
                op.call(self.b)
            if op.key is not None and op.key not in self.model.keys:
                self.model.free_keys.add(op.key)
            return
        receipt = op.call(self.b)
        if what == "duplicate":
            assert receipt == detail, f"{op}: a repeated key must return the original receipt"
            return
        self.accept(receipt, op.kind, op.debit, op.credit, op.amount, op.key)
        self.model.add(op.debit, -op.amount)
        self.model.add(op.credit, op.amount)

    def accept(
        self,
        receipt: bank.Receipt,
        kind: str,
        debit: int,
        credit: int,
        amount: int,
        key: str | None,
    ) -> None:
        """Check a new row's receipt and append it to the model's rows."""
        assert receipt.seq == self.model.seq + 1, f"seqs must grow by one: {receipt}"
        assert (receipt.kind, receipt.debit_account, receipt.credit_account) == (
            kind,
            debit,
            credit,
        )
        assert (receipt.amount, receipt.key) == (amount, key)
        self.model.rows.append(receipt)
        if key is not None:
            self.model.keys[key] = receipt
            self.model.free_keys.discard(key)

    @rule(data=st.data())
    def money(self, data: st.DataObject) -> None:
        self.run(self.draw_op(data))

    @rule(data=st.data())
    def retry_keyed(self, data: st.DataObject) -> None:
        """Repeat an accepted keyed operation exactly: the original receipt, whatever
        happened since (its account may be closed by now)."""
        if not self.model.keys:
            return
        key = data.draw(st.sampled_from(sorted(self.model.keys)), label="retried key")
        original = self.model.keys[key]
        if original.kind not in ("deposit", "withdrawal", "transfer"):
            return
        op = Op(
            original.kind, original.debit_account, original.credit_account, original.amount, key
        )
        assert op.call(self.b) == original

    # -- reads -------------------------------------------------------------------------

    @rule(data=st.data())
    def balance_at(self, data: st.DataObject) -> None:
        account = data.draw(st.sampled_from([CASH, *sorted(self.model.accounts)]), label="acct")
        seq = data.draw(st.integers(0, self.model.seq), label="at_seq")
        assert self.b.balance(account, at_seq=seq) == self.model.balance_at(account, seq)
        with pytest.raises(bank.SeqBeyondHead):
            self.b.balance(account, at_seq=self.model.seq + data.draw(st.integers(1, 5)))
        with pytest.raises(bank.InvalidCommand):
            bad: Any = data.draw(st.sampled_from([-1, True, 1.0, "1", 2**63]), label="bad seq")
            self.b.balance(account, at_seq=bad)

    @rule(data=st.data())
    def history_page(self, data: st.DataObject) -> None:
        account = data.draw(st.sampled_from([CASH, *sorted(self.model.accounts)]), label="acct")
        after = data.draw(st.integers(0, self.model.seq + 1), label="after_seq")
        limit = data.draw(st.integers(1, 5), label="limit")
        page = self.b.history(account, after_seq=after, limit=limit)
        assert page == self.model.history(account, after, limit)

    # -- comparisons -------------------------------------------------------------------

    def compare(self) -> None:
        """Every account object, every balance, the seq: as the model says."""
        got = {a.id: a for a in self.b.accounts()}
        assert set(got) == set(self.model.accounts)
        assert self.b.account(CASH).balance == self.model.cash
        for account_id, mine in self.model.accounts.items():
            a = got[account_id]
            assert (a.name, a.overdraft_limit, a.balance, a.closed) == (
                mine.name,
                mine.limit,
                mine.balance,
                mine.closed,
            ), f"account {account_id}: engine {a!r} model {mine}"
            assert self.b.balance(account_id) == mine.balance
        snap = self.b.snapshot()
        assert snap.seq == self.model.seq and snap.total == 0

    def check_rows(self) -> None:
        """The ledger, read beside the engine: every row and every closing as the model's."""
        rows = self.ledger.query(
            "SELECT seq, kind, key, amount, debit_account_id, credit_account_id "
            "FROM transfers ORDER BY seq"
        )
        assert rows == [
            (r.seq, r.kind, r.key, r.amount, r.debit_account, r.credit_account)
            for r in self.model.rows
        ]
        closed = {
            row[0]
            for row in self.ledger.query(
                "SELECT account_id FROM account_events WHERE kind = 'close'"
            )
        }
        assert closed == {i for i, a in self.model.accounts.items() if a.closed}
        balances = dict(self.ledger.query("SELECT id, balance FROM accounts"))
        assert balances == {
            CASH: self.model.cash,
            **{i: a.balance for i, a in self.model.accounts.items()},
        }

    @invariant()
    def matches_model(self) -> None:
        if self.bank is not None:
            self.compare()


_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}

#: Examples per backend in the default run: a PostgreSQL `Bank.open` costs about a second
#: here (each example opens one, and each `reopen` step another). `-m slow` runs
#: `BANK_STATEFUL_LEDGER_EXAMPLES` (default 300) on each.
EXAMPLES = {"sqlite": 20, "postgres": 3}
STEPS = 30


def _run(ledger_db: LedgerDb, examples: int, steps: int) -> None:
    template = LedgerTemplate(ledger_db)

    class Machine(LedgerMachine):
        def __init__(self) -> None:
            super().__init__(template.new)

    try:
        run_state_machine_as_test(
            Machine,
            settings=settings(max_examples=examples, stateful_step_count=steps, **_SETTINGS),
        )
    finally:
        template.drop()


@pytest.mark.timeout(240)
def test_ledger_matches_model(ledger_db: LedgerDb) -> None:
    _run(ledger_db, EXAMPLES[ledger_db.backend], STEPS)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_ledger_matches_model_long(ledger_db: LedgerDb) -> None:
    _run(ledger_db, int(os.environ.get("BANK_STATEFUL_LEDGER_EXAMPLES", "300")), 60)
