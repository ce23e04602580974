"""Check-then-apply over tentative state: holds, posts, voids and atomic groups.

A worker holding the locks of every account a group (or a single two-phase command)
touches plans each command in order against a `Tentative`: the accounts' balances and
held amounts as the earlier commands would leave them, and the holds they settle.
Planning changes no `Account` and no pending hold: a refusal of any command leaves
nothing to undo. Only once the sequencer has staged the rows (`stage_group`,
`stage_two_phase`) does `apply` write the tentative state into the accounts and the
hold book; that step cannot raise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bank.account import Account
from bank.commands import BankCommand, Deposit, Hold, Post, Transfer, Void, Withdrawal
from bank.errors import (
    AccountClosed,
    AccountNotFound,
    BalanceOverflow,
    HoldNotPending,
    InsufficientFunds,
    PostExceedsHold,
)
from bank.holds import HoldBook, PendingHold
from bank.ledger.sequencer import GroupRow
from bank.limits import BALANCE_MAX, BALANCE_MIN, CASH_ACCOUNT_ID
from bank.records import Receipt


class HoldMissing(Exception):
    """A post or void names a hold that is not pending here: the ledger says why
    (never opened, or settled: the worker asks it, with no lock held)."""

    def __init__(self, index: int, hold: int) -> None:
        super().__init__(f"hold {hold} is not pending")
        self.index = index
        self.hold = hold


def accounts_of(
    command: BankCommand, book: HoldBook, found: dict[int, PendingHold | None]
) -> tuple[int, int] | None:
    """The (debit, credit) account ids `command` touches; None for a post or void whose
    hold is not pending. `found` collects the holds looked up (to confirm under locks)."""
    if isinstance(command, Post | Void):
        hold = book.get(command.hold)
        found[command.hold] = hold
        return None if hold is None else (hold.source, hold.target)
    return command.debit_account, command.credit_account


class Tentative:
    """The state of the locked accounts as the commands planned so far leave it."""

    def __init__(
        self,
        accounts: Mapping[int, Account],
        book: HoldBook,
        holds: Mapping[int, PendingHold | None],
    ) -> None:
        self._accounts = accounts
        self._book = book
        #: The holds as looked up before locking; each is confirmed against the book.
        self._holds = holds
        self.balances: dict[int, int] = {}
        self.held: dict[int, int] = {}
        #: hold seq -> (kind, index of the command that settles it in this plan)
        self.settled: dict[int, tuple[str, int]] = {}
        #: index of each hold this plan makes -> (source, target, amount, expires_after_us)
        self.new_holds: dict[int, tuple[int, int, int, int | None]] = {}
        #: holds this plan settles, with the pending record each was planned against
        self.settling: list[PendingHold] = []

    # -- reading, through the plan ----------------------------------------------------

    def account(self, account_id: int) -> Account:
        account = self._accounts.get(account_id)
        if account is None:
            raise AccountNotFound(f"account {account_id} does not exist")
        if account._closed:  # read under its lock: a close cannot race the plan
            raise AccountClosed(f"account {account.id} ({account.name!r}) is closed")
        return account

    def balance(self, account: Account) -> int:
        got = self.balances.get(account.id)
        return account._balance if got is None else got

    def held_of(self, account: Account) -> int:
        got = self.held.get(account.id)
        return account._held if got is None else got

    def _floor_check(self, account: Account, after: int, amount: int, verb: str) -> None:
        """Raise if `after` (balance after, minus what stays held) is below the floor."""
        if account.id == CASH_ACCOUNT_ID:
            if after < BALANCE_MIN:
                raise BalanceOverflow(
                    f"@cash has {self.balance(account)}: {verb}ing {amount} would leave "
                    "signed 64 bits"
                )
        elif after < -account._overdraft_limit:
            balance, held = self.balance(account), self.held_of(account)
            raise InsufficientFunds(
                f"account {account.id} has {balance}"
                + (f", {held} held" if held else "")
                + f", overdraft limit {account._overdraft_limit}: cannot {verb} {amount} "
                f"(available {balance + account._overdraft_limit - held})"
            )

    def _credit(self, account: Account, amount: int) -> int:
        credited = self.balance(account) + amount
        if credited > BALANCE_MAX:
            raise BalanceOverflow(
                f"account {account.id} has {self.balance(account)}: crediting {amount} "
                "would leave signed 64 bits"
            )
        return credited

    def pending(self, index: int, seq: int) -> PendingHold:
        """The hold `seq` as pending now (under the locks), or raise why not."""
        if seq in self.settled:
            kind, by = self.settled[seq]
            raise HoldNotPending(
                f"hold {seq} is already {_PAST[kind]} by command {by} of this group"
            )
        looked_up = self._holds.get(seq)
        hold = self._book.get(seq)
        if hold is None or hold is not looked_up:
            raise HoldMissing(index, seq)  # settled (or never a hold): the ledger says which
        return hold

    # -- planning (changes nothing outside this object) -------------------------------

    def plan(self, index: int, command: BankCommand) -> GroupRow:
        """Check `command` against the state so far and record its effect; raises the
        refusal (a `BankError`, or `HoldMissing`) and then records nothing."""
        if isinstance(command, Post | Void):
            return self._plan_settle(index, command)
        source = self.account(command.debit_account)
        target = self.account(command.credit_account)
        amount = command.amount
        if isinstance(command, Hold):
            held = self.held_of(source) + amount
            self._floor_check(source, self.balance(source) - held, amount, "hold")
            self.held[source.id] = held
            self.new_holds[index] = (source.id, target.id, amount, command.expires_after_us)
            return GroupRow(
                "hold",
                source.id,
                target.id,
                amount,
                command.key,
                self.balance(source),
                self.balance(target),
                None,
                command.expires_after_us,
                None,
            )
        assert isinstance(command, Deposit | Withdrawal | Transfer)
        debited = self.balance(source) - amount
        self._floor_check(source, debited - self.held_of(source), amount, "debit")
        credited = self._credit(target, amount)
        self.balances[source.id] = debited
        self.balances[target.id] = credited
        return GroupRow(
            command.kind, source.id, target.id, amount, command.key, debited, credited,
            None, None, None,
        )  # fmt: skip

    def _plan_settle(self, index: int, command: Post | Void) -> GroupRow:
        hold = self.pending(index, command.hold)
        source = self.account(hold.source)
        target = self.account(hold.target)
        if isinstance(command, Void):
            kind, amount = "void", hold.amount
            debited, credited = self.balance(source), self.balance(target)
        else:
            kind = "post"
            amount = hold.amount if command.amount is None else command.amount
            if amount > hold.amount:
                raise PostExceedsHold(
                    f"hold {hold.seq} reserved {hold.amount}: cannot post {amount}"
                )
            # The hold reserved the amount: the source's available only grows here.
            debited = self.balance(source) - amount
            credited = self._credit(target, amount)
        self.held[source.id] = self.held_of(source) - hold.amount
        self.balances[source.id] = debited
        self.balances[target.id] = credited
        self.settled[hold.seq] = (kind, index)
        self.settling.append(hold)
        return GroupRow(
            kind, source.id, target.id, amount, command.key, debited, credited, hold.seq,
            None, hold.expires_us,
        )  # fmt: skip

    # -- applying (after staging; cannot raise) ----------------------------------------

    def apply(self, receipts: Sequence[Receipt]) -> None:
        """Write the planned state into the accounts and the book (`receipts`: the rows
        as staged, in command order). The caller still holds every account's lock."""
        accounts = self._accounts
        for account_id, balance in self.balances.items():
            accounts[account_id]._balance = balance
        for account_id, held in self.held.items():
            accounts[account_id]._held = held
        book = self._book
        for hold in self.settling:
            book.remove(hold.seq)
        for index, (source, target, amount, _) in self.new_holds.items():
            receipt = receipts[index]
            book.add(PendingHold(receipt.seq, source, target, amount, receipt.expires_us))


_PAST = {"post": "posted", "void": "voided", "expire": "expired"}


def past_tense(kind: str) -> str:
    """'posted', 'voided', 'expired' for a settling row's kind."""
    return _PAST.get(kind, kind)
