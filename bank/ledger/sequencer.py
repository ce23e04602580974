"""Staging: the order of the ledger, fixed under the writer's lock.

Workers stage records while they hold the accounts' locks, so the order of the
pending list is the order in which balances changed; `seq`, the timestamp and the
chain hash are assigned here, under the writer's lock, in that same order. The calling
worker does that share of the work, so the pipeline's thread (the one serial stage)
only writes. Rejections travel the same list, so a refusal is answered only once
everything it was judged against is durable. Nothing here knows how rows are stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

from bank import lockcheck
from bank.answers import Answer
from bank.errors import BankClosed, LedgerUnavailable
from bank.ledger.backend import AccountEventRow
from bank.ledger.chain import account_event_hash, transfer_hash
from bank.records import Receipt

#: An applied operation: (future, receipt, debit balance after, credit balance after).
#: The one record staged per operation, so a plain tuple on purpose: a NamedTuple costs
#: about 140 ns more to build and unpacks slower (it is not an exact tuple); the rare
#: records below are NamedTuples of other lengths, which is how the pipeline tells them apart.
StagedTransfer = tuple[Answer, Receipt, int, int]


class StagedRejection(NamedTuple):
    """A refusal, answered once everything staged before it is durable."""

    future: Answer
    error: BaseException
    key: str | None


class StagedEvent(NamedTuple):
    """An account opening or limit change; its future gets the event's seq."""

    future: Future[int]
    row: AccountEventRow


class StagedGroup(NamedTuple):
    """An atomic group: consecutive rows, one record, so no commit ever splits it; its
    future gets the list of receipts."""

    future: Answer
    receipts: list[Receipt]
    debit_balances: list[int]
    credit_balances: list[int]
    keys: list[str]


class GroupRow(NamedTuple):
    """One member of a group as a worker applied it (tentatively), for `stage_group`."""

    kind: str
    debit: int
    credit: int
    amount: int
    key: str | None
    debit_balance: int
    credit_balance: int
    hold_seq: int | None
    expires_after_us: int | None
    #: A post or void: the hold's deadline (the row must come before it), else None.
    before_us: int | None


Staged = StagedTransfer | StagedRejection | StagedEvent | StagedGroup
# The pipeline tells a transfer by its length, `len(rec) == 4` (20 ns a record, where an
# isinstance against both rare classes costs 45; mypy narrows on it too); every record's
# future is `rec[0]`.
assert 4 not in {len(StagedRejection._fields), len(StagedEvent._fields), len(StagedGroup._fields)}
assert len({len(StagedRejection._fields), len(StagedEvent._fields), len(StagedGroup._fields)}) == 3

#: Builds a `Receipt` without the NamedTuple's Python-level `__new__` (70 ns, not 170).
_new = tuple.__new__


def _system_now_us() -> int:
    return time.time_ns() // 1000


class Sequencer:
    """The staged records and the chain heads; every field is guarded by `lock`.

    The pipeline takes `pending` and reports back through `done`, `failure`,
    `stopping` and `exited`, under the same lock, notifying `progress`.
    """

    def __init__(
        self,
        *,
        seq: int,
        head_hash: str,
        event_seq: int,
        event_head_hash: str,
        now_us: Callable[[], int] | None = None,
        last_ts_us: int = 0,
    ) -> None:
        self.lock = lockcheck.lock("writer")
        #: The clock rows are stamped with (`bank.clock`); `ts_us` never goes back:
        #: a row is stamped no earlier than the row before it, so once a post is too late
        #: for its hold's deadline, every later row is too (and an expire is not early).
        self._now_us: Callable[[], int] = now_us if now_us is not None else _system_now_us
        self.ts_us = last_ts_us
        #: Workers notify `wake` when they stage into an idle pipeline.
        self.wake = threading.Condition(self.lock)
        #: The pipeline notifies `progress` after every batch it has answered.
        self.progress = threading.Condition(self.lock)
        self.pending: list[Staged] = []
        self.idle = False
        self.stopping = False
        self.exited = False  # the thread has answered its last record and ended
        self.failure: LedgerUnavailable | None = None
        self.seq = seq  # last transfer seq handed out
        self.event_seq = event_seq
        self.staged = 0  # records ever staged (positions for wait_for)
        self.done = 0  # records answered
        # Chain heads of what is staged (not yet committed).
        self.head_hash = head_hash
        self.event_head_hash = event_head_hash

    # -- staging (called by workers with the accounts' locks held; never raises) ----

    def _stamp(self) -> int:
        """The next row's timestamp: now, or the last one if the clock went back (the
        caller holds `lock`; timestamps never decrease along the chain)."""
        ts_us = self._now_us()
        return ts_us if ts_us >= self.ts_us else self.ts_us

    def stage_transfer(
        self,
        kind: str,
        debit: int,
        credit: int,
        amount: int,
        key: str | None,
        future: Answer,
        debit_balance: int,
        credit_balance: int,
    ) -> None:
        """Queue an applied operation for the next commit, with its seq, time and hash."""
        with self.lock:
            seq = self.seq + 1
            ts_us = self._stamp()
            self.ts_us = ts_us
            head = transfer_hash(
                self.head_hash,
                seq,
                kind,
                debit,
                credit,
                amount,
                ts_us,
                key,
                debit_balance,
                credit_balance,
            )
            self.seq = seq
            self.head_hash = head
            self.staged += 1
            receipt: Receipt = _new(
                Receipt,
                (seq, kind, key, amount, debit, credit, ts_us, head, None, None, None, None),
            )
            self.pending.append((future, receipt, debit_balance, credit_balance))
            if self.idle:
                self.wake.notify()

    def stage_two_phase(
        self,
        kind: str,
        debit: int,
        credit: int,
        amount: int,
        key: str | None,
        future: Answer,
        debit_balance: int,
        credit_balance: int,
        hold_seq: int | None,
        expires_after_us: int | None,
        before_us: int | None,
        not_before_us: int | None,
    ) -> Receipt | None:
        """Queue a hold, post, void or expire row; returns its receipt, or None (nothing
        staged) if its timestamp misses its bound.

        The bound is tested on the very timestamp the row gets, under this lock: a post
        or void must be stamped before its hold's deadline (`before_us`), an expire at
        or after it (`not_before_us`). A hold's deadline is its own stamp plus
        `expires_after_us`.
        """
        with self.lock:
            ts_us = self._stamp()
            if (before_us is not None and ts_us >= before_us) or (
                not_before_us is not None and ts_us < not_before_us
            ):
                return None
            self.ts_us = ts_us
            seq = self.seq + 1
            expires_us = None if expires_after_us is None else ts_us + expires_after_us
            head = transfer_hash(
                self.head_hash,
                seq,
                kind,
                debit,
                credit,
                amount,
                ts_us,
                key,
                debit_balance,
                credit_balance,
                hold_seq,
                expires_us,
            )
            self.seq = seq
            self.head_hash = head
            self.staged += 1
            receipt = Receipt(
                seq, kind, key, amount, debit, credit, ts_us, head, hold_seq, expires_us
            )
            self.pending.append((future, receipt, debit_balance, credit_balance))
            if self.idle:
                self.wake.notify()
            return receipt

    def stage_group(self, rows: Sequence[GroupRow], future: Answer) -> list[Receipt] | int:
        """Queue an atomic group as one record of consecutive seqs, all stamped with one
        timestamp; returns the receipts, or the index of the first post or void whose
        hold's deadline that timestamp misses (nothing staged)."""
        with self.lock:
            ts_us = self._stamp()
            for index, row in enumerate(rows):
                if row.before_us is not None and ts_us >= row.before_us:
                    return index
            self.ts_us = ts_us
            first = self.seq + 1
            count = len(rows)
            head = self.head_hash
            receipts: list[Receipt] = []
            keys: list[str] = []
            for offset, row in enumerate(rows):
                seq = first + offset
                expires_us = None if row.expires_after_us is None else ts_us + row.expires_after_us
                head = transfer_hash(
                    head,
                    seq,
                    row.kind,
                    row.debit,
                    row.credit,
                    row.amount,
                    ts_us,
                    row.key,
                    row.debit_balance,
                    row.credit_balance,
                    row.hold_seq,
                    expires_us,
                    first,
                    count,
                )
                receipts.append(
                    Receipt(
                        seq,
                        row.kind,
                        row.key,
                        row.amount,
                        row.debit,
                        row.credit,
                        ts_us,
                        head,
                        row.hold_seq,
                        expires_us,
                        first,
                        count,
                    )
                )
                if row.key is not None:
                    keys.append(row.key)
            self.seq = first + count - 1
            self.head_hash = head
            self.staged += 1
            self.pending.append(
                StagedGroup(
                    future,
                    receipts,
                    [r.debit_balance for r in rows],
                    [r.credit_balance for r in rows],
                    keys,
                )
            )
            if self.idle:
                self.wake.notify()
            return receipts

    def stage_rejection(self, future: Answer, error: BaseException, key: str | None) -> None:
        """Answer `future` with `error` once everything staged before it is durable.

        The refusal is an answer, not a crash: its traceback (the frames of the check
        that raised it, and their locals) is dropped here, so it does not keep about six
        objects per refusal alive for the collector to walk until the caller lets the
        answer go. Raising it (`Future.result()`) gives it the caller's traceback.
        """
        error.__traceback__ = None
        with self.lock:
            self.staged += 1
            self.pending.append(StagedRejection(future, error, key))
            if self.idle:
                self.wake.notify()

    def stage_account_event(
        self, kind: str, account_id: int, name: str, overdraft_limit: int, future: Future[Any]
    ) -> None:
        """Queue an account opening ('open') or limit change ('limit'); `future` gets its event seq.

        Raises `BankClosed` (nothing staged) once the writer is stopping: callers
        outside the workers may race `close()`, and a record staged after the last
        batch would never be answered. Raises the failure if the ledger broke.
        """
        with self.lock:
            if self.stopping or self.exited:
                raise BankClosed("the bank is closed: it accepts no more operations")
            if self.failure is not None:
                raise self.failure
            seq = self.event_seq + 1
            ts_us = self._now_us()
            head = account_event_hash(
                self.event_head_hash, seq, account_id, kind, overdraft_limit, self.seq, ts_us, name
            )
            self.event_seq = seq
            self.event_head_hash = head
            self.staged += 1
            row = AccountEventRow(
                seq=seq,
                account_id=account_id,
                kind=kind,
                name=name,
                overdraft_limit=overdraft_limit,
                transfer_seq=self.seq,
                ts_us=ts_us,
                hash=head,
            )
            self.pending.append(StagedEvent(future, row))
            if self.idle:
                self.wake.notify()

    def position(self) -> tuple[int, int]:
        """(records staged so far, last transfer seq): pass the first to `wait_for`."""
        with self.lock:
            return self.staged, self.seq
