"""Immutable results handed back to callers: receipts and snapshots."""

from __future__ import annotations

from typing import NamedTuple

from bank.limits import CASH_ACCOUNT_ID


class Receipt(NamedTuple):
    """Proof that an operation is in the ledger: its row in `transfers`, once durable.

    A `NamedTuple` because the ledger writer builds one per operation on the hot path
    and it must be cheap, immutable and hashable.

    Kinds: deposit, withdrawal, transfer, and the two-phase ones: hold (reserves
    `amount` of the debit account), post (moves `amount` of hold `hold_seq`), void and
    expire (release hold `hold_seq`'s `amount`). `expires_us`: a hold's deadline (same
    clock as `ts_us`; None: never). `link_first`/`link_count`: the first seq and the
    size of the atomic group the row belongs to (None: not in a group).
    """

    seq: int
    kind: str
    key: str | None
    amount: int
    debit_account: int
    credit_account: int
    ts_us: int
    hash: str
    hold_seq: int | None = None
    expires_us: int | None = None
    link_first: int | None = None
    link_count: int | None = None

    @property
    def account(self) -> int:
        """The customer account of a deposit or withdrawal (the source of a transfer)."""
        return self.debit_account if self.credit_account == CASH_ACCOUNT_ID else self.credit_account

    @property
    def hold(self) -> int | None:
        """The hold this row settles (post, void, expire), this hold's own seq, or None."""
        return self.seq if self.kind == "hold" else self.hold_seq

    @property
    def source(self) -> int:
        """Alias of `debit_account`, named as a `Transfer` names it."""
        return self.debit_account

    @property
    def target(self) -> int:
        """Alias of `credit_account`, named as a `Transfer` names it."""
        return self.credit_account

    def signature(self) -> tuple[str, int, int, int]:
        """Same shape as `Command.signature()`, to detect idempotency conflicts."""
        return (self.kind, self.debit_account, self.credit_account, self.amount)


class Snapshot(NamedTuple):
    """Every balance at one instant: after operation `seq` and before `seq + 1`."""

    seq: int
    balances: dict[int, int]

    @property
    def total(self) -> int:
        """Sum of all balances, `@cash` included: always 0."""
        return sum(self.balances.values())


class AccountInfo(NamedTuple):
    """A row of `accounts` as the ledger holds it (used by recovery and the CLI)."""

    id: int
    name: str
    overdraft_limit: int
    balance: int


class AccountSummary(NamedTuple):
    """An account as `bank accounts` lists it: what it holds, what its pending holds
    reserve, what it may still spend, and whether it is closed. `available` is None
    for `@cash`, which has no overdraft limit."""

    id: int
    name: str
    balance: int
    overdraft_limit: int
    held: int
    available: int | None
    closed: bool

    @classmethod
    def of(
        cls, account_id: int, name: str, balance: int, overdraft_limit: int, held: int, closed: bool
    ) -> AccountSummary:
        """The summary, with `available` derived as the engine computes it
        (`balance + overdraft_limit - held`; None for `@cash`)."""
        available = None if account_id == CASH_ACCOUNT_ID else balance + overdraft_limit - held
        return cls(account_id, name, balance, overdraft_limit, held, available, closed)
