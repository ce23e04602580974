"""Worker threads: take jobs from the queue, apply them to accounts, stage them for the ledger.

For each operation: check everything first (accounts exist, limits, 64-bit
range, the idempotency key), then change balances and stage the record while
both accounts' locks are held, so that seq order equals the order in which each
account's balance changed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Final

from sqlalchemy import Connection, Engine

from bank.account import Account, move
from bank.answers import Answer
from bank.buffer import BoundedBuffer
from bank.commands import BankCommand, Deposit, Transfer, Withdrawal
from bank.errors import AccountNotFound, BankError, IdempotencyConflict, LedgerUnavailable
from bank.groups import ApplyContext, LinkedGroup, apply_group, apply_two_phase
from bank.holds import HoldBook
from bank.idempotency import KeyClaims
from bank.ledger.pipeline import settle
from bank.ledger.store import find_receipts
from bank.ledger.writer import LedgerWriter
from bank.limits import CASH_ACCOUNT_ID, KEY_WAIT_S_MAX, WORKER_BATCH_OPS_MAX
from bank.records import Receipt

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Job:
    """Commands handed over in one piece, and where each one's answer goes.

    `answers[i]` answers `commands[i]`: a `Future[Receipt]` (`submit`, `submit_many`),
    a slot of one batch's list (`submit_batch`, see `bank.answers`), or, for an atomic
    group (one `LinkedGroup`), the future that gets the group's list of receipts.
    """

    commands: Sequence[BankCommand | LinkedGroup]
    answers: Sequence[Answer]


_key_of = attrgetter("key")

#: The commands `apply_move` applies: one debit, one credit, no hold.
_MOVES: Final = (Transfer, Deposit, Withdrawal)


def answer_duplicate(command: BankCommand, receipt: Receipt, future: Answer) -> None:
    """Answer a repeated key from the ledger: the original receipt, or a conflict."""
    if command.same_as(receipt):
        settle(future, receipt)
    else:
        settle(future, error=key_conflict(command, receipt))


def key_conflict(command: BankCommand, receipt: Receipt) -> IdempotencyConflict:
    """The refusal of `command` whose key the ledger has for another operation."""
    what = (
        f"{receipt.kind} {receipt.debit_account}->{receipt.credit_account} amount {receipt.amount}"
    )
    if receipt.hold_seq is not None:
        what += f" of hold {receipt.hold_seq}"
    return IdempotencyConflict(
        f"key {command.key!r} was used at seq {receipt.seq} for {what}; this "
        f"{command.describe()} is a different command"
    )


def apply_move(
    command: Transfer | Deposit | Withdrawal,
    future: Answer,
    accounts: Mapping[int, Account],
    writer: LedgerWriter,
) -> None:
    """Apply a deposit, withdrawal or transfer and stage its row (or its refusal).

    Run by the workers, and by a blocking call's own thread for a command without a
    key (`Bank._call`): it needs no connection and no key claim, only the accounts'
    locks, so the caller applies it where it stands instead of waking a worker.
    """
    if isinstance(command, Transfer):
        debit_id, credit_id = command.source, command.target
    elif isinstance(command, Deposit):
        debit_id, credit_id = CASH_ACCOUNT_ID, command.account
    else:
        debit_id, credit_id = command.account, CASH_ACCOUNT_ID
    # The registry only ever grows, under the bank's registry lock; a lookup is a
    # single dict read, which is atomic in free-threaded CPython as well.
    source = accounts.get(debit_id)
    target = accounts.get(credit_id)
    if source is None or target is None:
        missing = debit_id if source is None else credit_id
        writer.stage_rejection(
            future, AccountNotFound(f"account {missing} does not exist"), command.key
        )
        return
    first, second = (source, target) if debit_id < credit_id else (target, source)
    with first.lock, second.lock:
        try:
            debit_balance, credit_balance = move(source, target, command.amount)
        except BankError as exc:
            # Staged under the locks: answered only after what it was judged on is durable.
            writer.stage_rejection(future, exc, command.key)
            return
        writer.stage_transfer(
            command.kind,
            debit_id,
            credit_id,
            command.amount,
            command.key,
            future,
            debit_balance,
            credit_balance,
        )


class Worker(threading.Thread):
    """Applies jobs from the queue until it is closed and drained."""

    def __init__(
        self,
        index: int,
        buffer: BoundedBuffer[Job],
        accounts: Mapping[int, Account],
        writer: LedgerWriter,
        claims: KeyClaims,
        engine: Engine,
        on_exit: Callable[[], None] | None = None,
        holds: HoldBook | None = None,
    ) -> None:
        # A daemon so that a forgotten bank cannot hold up exit; `bank.engine`'s atexit
        # hook drains it first (see `bank.engine._Lifecycle`).
        super().__init__(name=f"bank-worker-{index}", daemon=True)
        self.on_exit = on_exit  # told when this thread ends, however it ends
        self._buffer = buffer
        self._accounts = accounts
        self._writer = writer
        self._claims = claims
        self._engine = engine
        self._holds = holds if holds is not None else HoldBook()
        self._conn: Connection | None = None

    def run(self) -> None:
        try:
            # One connection per worker, for idempotency look-ups (thread-local by construction).
            self._conn = self._engine.connect()
            try:
                while True:
                    jobs = self._buffer.get_many(WORKER_BATCH_OPS_MAX)
                    if not jobs:
                        return
                    for job in jobs:
                        self._run_job(job.commands, job.answers)
            finally:
                self._conn.close()
        finally:
            if self.on_exit is not None:
                self.on_exit()

    def _run_job(
        self, commands: Sequence[BankCommand | LinkedGroup], futures: Sequence[Answer]
    ) -> None:
        try:
            known = self._claim_keys(commands, futures)
        except Exception as exc:  # the look-up failed: nothing was applied, refuse the job
            log.error("idempotency look-up failed", exc_info=True)
            error = LedgerUnavailable(f"the ledger could not be read ({type(exc).__name__}: {exc})")
            for future in futures:
                if future.set_running_or_notify_cancel():
                    settle(future, error=error)
            return
        for command, future in zip(commands, futures, strict=True):
            try:
                if not future.set_running_or_notify_cancel():
                    if command.key is not None and known.get(command.key, (None,))[0] is future:
                        self._claims.release(command.key)
                    continue
                if command.key is not None and self._answered_by_ledger(command, future, known):
                    continue
                self._apply(command, future)
            except BankError as exc:  # a refusal found before anything changed (KeyInFlight)
                if command.key is not None:
                    self._claims.release_if_owner(command.key, future)
                if not future.done():
                    settle(future, error=exc)
            except Exception as exc:
                # A bug or a failed read, not a rejection: keep the worker alive.
                log.error("worker failed on %r", command, exc_info=True)
                if command.key is not None:
                    self._claims.release_if_owner(command.key, future)
                if not future.done():
                    settle(future, error=exc)

    # -- idempotency ---------------------------------------------------------------

    def _claim_keys(
        self, commands: Sequence[BankCommand | LinkedGroup], futures: Sequence[Answer]
    ) -> dict[str, tuple[Answer, Receipt | None]]:
        """Claim the job's keys and look the claimed ones up in one query.

        Returns key -> (the future that owns the claim, the committed receipt or None).
        Looking up only after claiming matters: a key committed by someone else
        between a look-up and a claim would otherwise be applied twice. Claiming stops
        at the first key held elsewhere: a command that waits for a key must not hold
        claims for the commands after it, or two workers with batches sharing keys in
        opposite orders would each wait for a key the other holds. The rest are claimed
        one by one as they come (`_answered_by_ledger`).
        """
        if not any(map(_key_of, commands)):  # no keys (never empty): skip the loop
            return {}
        owned: dict[str, Answer] = {}
        for command, future in zip(commands, futures, strict=True):
            key = command.key
            if key is not None and key not in owned:
                if self._claims.claim(key, future) is not None:
                    break
                owned[key] = future
        if not owned:
            return {}
        try:
            found = self._lookup(list(owned))
        except Exception:
            self._claims.release_many(list(owned))
            raise
        return {key: (future, found.get(key)) for key, future in owned.items()}

    def _lookup(self, keys: list[str]) -> dict[str, Receipt]:
        assert self._conn is not None
        with self._conn.begin():  # a short read transaction: never pin an old snapshot
            return find_receipts(self._conn, keys)

    def _answered_by_ledger(
        self,
        command: BankCommand,
        future: Answer,
        known: dict[str, tuple[Answer, Receipt | None]],
    ) -> bool:
        """Settle a keyed command against the ledger; True if it needs no applying."""
        key = command.key
        assert key is not None
        owner, receipt = known.get(key, (None, None))
        if owner is not future:
            # Someone (maybe an earlier command of this job) holds the key: wait until
            # it is released (the writer notifies as it answers). No lock is held here
            # and the writer never waits on a worker, so this ends; the deadline bounds
            # it all the same (`KeyInFlight`, nothing changed).
            self._claims.claim_when_free(key, future, KEY_WAIT_S_MAX)
            try:
                receipt = self._lookup([key]).get(key)
            except Exception as exc:  # as for the job's first look-up: nothing was applied
                raise LedgerUnavailable(
                    f"the ledger could not be read ({type(exc).__name__}: {exc})"
                ) from exc
        if receipt is None:
            return False  # we own the claim; the writer releases it
        self._claims.release(key)
        answer_duplicate(command, receipt, future)
        return True

    # -- applying --------------------------------------------------------------------

    def _apply(self, command: BankCommand | LinkedGroup, future: Answer) -> None:
        if isinstance(command, _MOVES):
            apply_move(command, future, self._accounts, self._writer)
        elif isinstance(command, LinkedGroup):
            apply_group(command, future, self._context())
        else:  # Hold, Post, Void
            apply_two_phase(command, future, self._context())

    def _context(self) -> ApplyContext:
        """What the two-phase and group application need of this worker."""
        assert self._conn is not None
        return ApplyContext(
            self._accounts, self._holds, self._writer, self._claims, self._conn, self._lookup
        )
