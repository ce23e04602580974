"""Applying two-phase commands and atomic groups on a worker (or the expiry timer).

Every one of them runs the same way: find the accounts involved (a post's or void's
come from its pending hold), lock them all in id order (`bank.locking`), plan each
command against a `bank.tentative.Tentative` (nothing changes yet), stage the rows
in the sequencer in one acquisition of its lock (a group's as consecutive seqs, one
record that no commit splits), and only then write the planned state into the
accounts and the hold book. A refusal anywhere leaves nothing behind.

A post or void whose hold is not pending is refused from the ledger: once everything
staged so far is committed (`wait_for`, no lock held), the row at that seq tells
whether it is a hold at all (`HoldNotFound`) and which row settled it
(`HoldNotPending`, with its kind and seq).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy import Connection

from bank.account import Account
from bank.answers import Answer
from bank.commands import BankCommand, Post, Void
from bank.errors import (
    AccountNotFound,
    BankError,
    HoldNotFound,
    HoldNotPending,
    IdempotencyConflict,
    LedgerUnavailable,
    LinkedCommandFailed,
)
from bank.holds import HoldBook, PendingHold
from bank.idempotency import KeyClaims
from bank.ledger.holds_store import group_receipts, hold_status
from bank.ledger.pipeline import settle
from bank.ledger.writer import LedgerWriter
from bank.limits import KEY_WAIT_S_MAX
from bank.locking import locked
from bank.records import Receipt
from bank.tentative import HoldMissing, Tentative, accounts_of, past_tense

#: Attempts at a post or void whose hold was being added or settled as it was looked
#: up (it then is, or is not, pending the next time: two suffice; the bound is a guard).
_ATTEMPTS_MAX = 4


class LinkedGroup:
    """An atomic group as the queue carries it: one job item, one future (the list of
    receipts). `key` is None: the members' keys are claimed when it is applied."""

    __slots__ = ("commands",)
    kind: ClassVar[str] = "group"
    key: ClassVar[None] = None

    def __init__(self, commands: list[BankCommand]) -> None:
        self.commands = commands


@dataclass(frozen=True, slots=True)
class ApplyContext:
    """What applying needs of the bank: accounts, holds, the writer, the key claims and a
    connection of the calling thread's own for look-ups."""

    accounts: Mapping[int, Account]
    holds: HoldBook
    writer: LedgerWriter
    claims: KeyClaims
    conn: Connection
    lookup: Callable[[list[str]], dict[str, Receipt]]


# -- one two-phase command ---------------------------------------------------------------


def apply_two_phase(command: BankCommand, future: Answer, ctx: ApplyContext) -> None:
    """Apply a `Hold`, `Post` or `Void` (its key is already claimed by `future`)."""
    writer = ctx.writer
    for _ in range(_ATTEMPTS_MAX):
        found: dict[int, PendingHold | None] = {}
        ids = accounts_of(command, ctx.holds, found)
        if ids is not None:
            involved = _accounts(ctx.accounts, ids)
            if isinstance(involved, BankError):
                writer.stage_rejection(future, involved, command.key)
                return
            with locked(involved):
                plan = Tentative(ctx.accounts, ctx.holds, found)
                try:
                    row = plan.plan(0, command)
                except HoldMissing:
                    pass  # asked of the ledger below, with no lock held
                except BankError as exc:
                    writer.stage_rejection(future, exc, command.key)
                    return
                else:
                    receipt = writer.stage_two_phase(
                        row.kind,
                        row.debit,
                        row.credit,
                        row.amount,
                        row.key,
                        future,
                        row.debit_balance,
                        row.credit_balance,
                        row.hold_seq,
                        row.expires_after_us,
                        row.before_us,
                        None,
                    )
                    if receipt is not None:
                        plan.apply([receipt])  # cannot raise
                        return
                    # Stamped at or past the hold's deadline: it expires now, instead.
                    hold = plan.settling[0]
                    expired = expire_locked(ctx.accounts, ctx.holds, writer, hold)
                    writer.stage_rejection(future, _expired(hold, expired), command.key)
                    return
        assert isinstance(command, Post | Void)
        error = hold_refusal(ctx, command.hold)
        if error is not None:
            writer.stage_rejection(future, error, command.key)
            return
    writer.stage_rejection(
        future,
        LedgerUnavailable(f"hold {command.hold} kept changing while it was looked up"),  # type: ignore[union-attr]
        command.key,
    )


def _expired(hold: PendingHold, expired: Receipt | None) -> HoldNotPending:
    where = f" at seq {expired.seq}" if expired is not None else ""
    return HoldNotPending(
        f"hold {hold.seq} expired{where}: its deadline ({hold.expires_us} us) had passed"
    )


def _accounts(accounts: Mapping[int, Account], ids: Sequence[int]) -> list[Account] | BankError:
    """The accounts with these ids, or the `AccountNotFound` of the first missing one."""
    found: list[Account] = []
    for account_id in ids:
        account = accounts.get(account_id)
        if account is None:
            return AccountNotFound(f"account {account_id} does not exist")
        found.append(account)
    return found


def expire_locked(
    accounts: Mapping[int, Account], holds: HoldBook, writer: LedgerWriter, hold: PendingHold
) -> Receipt | None:
    """Expire `hold` (pending, its accounts locked by the caller): stage its `expire` row
    and release what it held. None (nothing done) if the clock, read under the writer's
    lock, is still before the deadline."""
    source, target = accounts[hold.source], accounts[hold.target]
    receipt = writer.stage_two_phase(
        "expire",
        hold.source,
        hold.target,
        hold.amount,
        None,
        Future(),  # nobody waits for it: the engine's own row
        source._balance,
        target._balance,
        hold.seq,
        None,
        None,
        hold.expires_us,
    )
    if receipt is None:
        return None
    source._held -= hold.amount  # cannot raise
    holds.remove(hold.seq)
    return receipt


def expire_due(
    accounts: Mapping[int, Account], holds: HoldBook, writer: LedgerWriter, hold: PendingHold
) -> bool:
    """The expiry timer's step for one due hold; False if it was not due after all."""
    with locked([accounts[hold.source], accounts[hold.target]]):
        if holds.get(hold.seq) is not hold:
            return True  # posted or voided meanwhile
        return expire_locked(accounts, holds, writer, hold) is not None


def hold_refusal(ctx: ApplyContext, seq: int) -> BankError | None:
    """Why a post or void of `seq` is refused, from the ledger once everything staged is
    committed; None if the hold is pending after all (added meanwhile: try again)."""
    position, _ = ctx.writer.position()
    ctx.writer.wait_for(position)
    if ctx.holds.get(seq) is not None:
        return None
    try:
        with ctx.conn.begin():
            status = hold_status(ctx.conn, seq)
    except Exception as exc:
        raise LedgerUnavailable(
            f"the ledger could not be read ({type(exc).__name__}: {exc})"
        ) from exc
    if status.kind is None:
        return HoldNotFound(f"no hold at seq {seq} (the ledger has no such row)")
    if status.kind != "hold":
        return HoldNotFound(f"no hold at seq {seq} (that row is a {status.kind})")
    if status.settled_kind is None:
        return None  # its settlement is staged but not committed yet: look again
    return HoldNotPending(
        f"hold {seq} was already {past_tense(status.settled_kind)} at seq {status.settled_seq}"
    )


# -- an atomic group ------------------------------------------------------------------------


def apply_group(group: LinkedGroup, future: Answer, ctx: ApplyContext) -> None:
    """Apply every command of `group` in order, or none: claim the members' keys, answer
    a repeated group from the ledger, else plan all under every account's lock and stage
    them as one record."""
    commands = group.commands
    keys = sorted({c.key for c in commands if c.key is not None})
    claimed: list[str] = []
    try:
        for key in keys:  # sorted: two groups sharing keys never wait for each other
            ctx.claims.claim_when_free(key, future, KEY_WAIT_S_MAX)
            claimed.append(key)
        if keys:
            try:
                known = ctx.lookup(keys)
            except Exception as exc:
                raise LedgerUnavailable(
                    f"the ledger could not be read ({type(exc).__name__}: {exc})"
                ) from exc
            if known:
                ctx.claims.release_many(claimed)
                claimed = []
                _answer_repeated(commands, known, future, ctx)
                return
        staged = _apply_group(commands, future, ctx)
        if staged:
            claimed = []  # the pipeline releases them once the group is committed
    except BankError as exc:
        settle(future, error=exc)
    finally:
        if claimed:
            ctx.claims.release_many(claimed)


def _answer_repeated(
    commands: Sequence[BankCommand],
    known: dict[str, Receipt],
    future: Answer,
    ctx: ApplyContext,
) -> None:
    """Some member's key is in the ledger: the original receipts if this exact group was
    committed (every keyed member's key on its own row of one group of this size, every
    row the same command), else refused at the first member whose key was used."""
    first_used = next(i for i, c in enumerate(commands) if c.key in known)
    receipt = known[commands[first_used].key]  # type: ignore[index]
    first, count = receipt.link_first, receipt.link_count
    if first is not None and count == len(commands):
        try:
            with ctx.conn.begin():
                rows = group_receipts(ctx.conn, first, count)
        except Exception as exc:
            raise LedgerUnavailable(
                f"the ledger could not be read ({type(exc).__name__}: {exc})"
            ) from exc
        if len(rows) == count and all(
            c.key == r.key and c.same_as(r) for c, r in zip(commands, rows, strict=True)
        ):
            settle(future, rows)
            return
    command = commands[first_used]
    what = (
        f"seq {receipt.seq}"
        if first is None
        else f"seq {receipt.seq}, in the group of seqs {first}..{first + (count or 1) - 1}"
    )
    error = IdempotencyConflict(
        f"key {command.key!r} was used at {what} ({receipt.kind}); this group is not that "
        "operation: a group is answered from the ledger only when all of it repeats a "
        "committed group"
    )
    settle(future, error=LinkedCommandFailed(first_used, error))


def _apply_group(commands: Sequence[BankCommand], future: Answer, ctx: ApplyContext) -> bool:
    """Plan and stage the group; True if it was staged (else it was answered: refused)."""
    writer = ctx.writer
    for _ in range(_ATTEMPTS_MAX):
        found: dict[int, PendingHold | None] = {}
        ids: set[int] = set()
        for command in commands:
            pair = accounts_of(command, ctx.holds, found)
            if pair is not None:
                ids.update(pair)
        # Only the accounts that exist are locked: a command naming one that does not
        # is refused by the plan (`Tentative.account`), in command order, so an earlier
        # command's refusal comes first.
        involved = [ctx.accounts[i] for i in sorted(ids) if i in ctx.accounts]
        missing: HoldMissing | None = None
        with locked(involved):
            # The locked accounts only: one opened meanwhile is not planned unlocked.
            plan = Tentative({a.id: a for a in involved}, ctx.holds, found)
            rows = []
            try:
                for index, command in enumerate(commands):
                    rows.append(plan.plan(index, command))
            except HoldMissing as exc:
                missing = exc
            except BankError as exc:
                _refuse(writer, future, index, exc)
                return False
            else:
                staged = writer.stage_group(rows, future)
                if isinstance(staged, list):
                    plan.apply(staged)  # cannot raise
                    return True
                # A post or void stamped past its hold's deadline: that hold expires now.
                hold = ctx.holds.get(rows[staged].hold_seq or 0)
                expired = (
                    expire_locked(ctx.accounts, ctx.holds, writer, hold)
                    if hold is not None
                    else None
                )
                expired_error = (
                    _expired(hold, expired)
                    if hold is not None
                    else HoldNotPending(f"hold {rows[staged].hold_seq} expired")
                )
                _refuse(writer, future, staged, expired_error)
                return False
        assert missing is not None
        error = hold_refusal(ctx, missing.hold)
        if error is not None:
            _refuse(writer, future, missing.index, error)
            return False
    _refuse(writer, future, 0, LedgerUnavailable("the group's holds kept changing"))
    return False


def _refuse(writer: LedgerWriter, future: Answer, index: int, error: BankError) -> None:
    """Answer the group with the refusal of command `index`, once what it was judged on
    is durable (the members' keys are released by the caller)."""
    writer.stage_rejection(future, LinkedCommandFailed(index, error), None)
