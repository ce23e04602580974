"""The writer's pipeline: one thread that turns staged records into group commits.

It takes everything pending (up to `COMMIT_BATCH_OPS_MAX`), writes it in one
transaction through the backend's `BatchWriter` and only after the commit answers
the batch's futures, in order. It never waits on a worker or on the job queue, so a
worker may wait for it (see `wait_for`) without any risk of deadlock. Key claims are
released here, never in the storage layer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bank.answers import Answer, Reply
from bank.errors import BankClosed, BankError, LedgerUnavailable
from bank.ledger.backend import AccountEventRow, BatchWriter, OwnerLock, WriteBatch
from bank.ledger.sequencer import Sequencer, Staged, StagedGroup, StagedRejection
from bank.limits import COMMIT_BATCH_OPS_MAX, GATHER_WAIT_S_MAX, GATHER_WRITE_S_MIN
from bank.records import Receipt

log = logging.getLogger(__name__)


def settle(future: Answer, result: Any = None, *, error: BaseException | None = None) -> None:
    """Answer `future`; a done-callback's exception, even `SystemExit`, goes to the log.

    `Future` catches only `Exception` from callbacks: anything else would escape
    `set_result` into the answering thread (the writer, mid-batch) and change
    other futures' answers. A callback cannot stop a bank thread: `KeyboardInterrupt`
    and `SystemExit` raised there are logged, not obeyed.
    """
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except BaseException:
        log.exception("a future's done-callback raised; the answer stands")


class KeyReleaser(Protocol):
    """What the pipeline needs of the engine's in-flight key claims (`bank.idempotency`),
    without the ledger importing from the layer above it."""

    def release(self, key: str) -> None: ...
    def release_many(self, keys: list[str]) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters of the writer, read under its lock."""

    seq: int
    committed_seq: int
    commits: int
    rows: int
    rejected: int
    pending: int


#: The fields `Pipeline._prepare` reads by index on its hot path.
_RECEIPT_AT = {"key": 2, "debit_account": 4, "credit_account": 5, "hold_seq": 8, "expires_us": 9}
assert all(Receipt._fields[i] == name for name, i in _RECEIPT_AT.items()), "Receipt drifted"


def _never_lost() -> str | None:
    return None


class Pipeline(threading.Thread):
    """Cycle: prepare batch k+1 in an open transaction, answer batch k, commit k+1."""

    def __init__(
        self,
        sequencer: Sequencer,
        open_writer: Callable[[], BatchWriter],
        claims: KeyReleaser,
        *,
        owner: OwnerLock | None = None,
        commit_ops_max: int = COMMIT_BATCH_OPS_MAX,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        # A daemon so that a forgotten bank cannot hold up exit; `bank.engine`'s atexit
        # hook drains it first (see `bank.engine._Lifecycle`).
        super().__init__(name="bank-ledger-writer", daemon=True)
        self.on_exit = on_exit  # told when this thread ends, after its last answer
        self._sequencer = sequencer
        self._open_writer = open_writer
        self._claims = claims
        #: Asked before every commit: a writer that lost its lease must not commit.
        self._owner_lost = owner.lost if owner is not None else _never_lost
        self._commit_ops_max = commit_ops_max
        self._lock = sequencer.lock
        #: Set once the writer is ready to write, or failed to get ready (see `failure`).
        self.ready = threading.Event()
        #: Set once the failure is: callers check it without taking the writer's lock.
        self.broken = threading.Event()
        self._committed_seq = sequencer.seq
        self._commit_s = 0.0  # how long a COMMIT takes, smoothed (bounds `_gather`)
        self._write_s = 0.0  # a batch's statements and COMMIT, smoothed (see `_gather`)
        self._commits = 0
        self._rows = 0
        self._rejected = 0

    # -- callers -----------------------------------------------------------------

    def wait_for(self, position: int, timeout: float | None = None) -> None:
        """Block until every record staged before `position` is committed and answered."""
        s = self._sequencer
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while s.done < position:
                if s.failure is not None:
                    raise s.failure
                if s.exited:  # only if the thread died of a bug: never wait for it
                    raise BankClosed("the ledger writer has stopped")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"the ledger did not catch up within {timeout} s")
                if s.idle:
                    s.wake.notify()
                s.progress.wait(remaining)
            if s.failure is not None:
                raise s.failure

    @property
    def failure(self) -> LedgerUnavailable | None:
        """Why the writer stopped writing, once it has failed."""
        with self._lock:
            return self._sequencer.failure

    def stats(self) -> WriterStats:
        """Counters for progress displays."""
        s = self._sequencer
        with self._lock:
            return WriterStats(
                s.seq,
                self._committed_seq,
                self._commits,
                self._rows,
                self._rejected,
                len(s.pending),
            )

    def stop(self) -> None:
        """Finish what is pending, then end the thread (`close()` joins it).

        Called once no worker can stage any more (the last worker to exit calls it);
        account events staged after it are refused with `BankClosed`.
        """
        with self._lock:
            self._sequencer.stopping = True
            self._sequencer.wake.notify()

    def lose(self, reason: str) -> None:
        """The owner lock is lost (`OwnerLock.watch` calls this, from any thread): the
        bank stops now and never writes again; a batch in flight is not committed."""
        log.error("the ledger's owner lock was lost (%s); the bank stops", reason)
        self._fail_bank(
            LedgerUnavailable(
                f"this bank lost its hold on the ledger ({reason}) and stopped writing; the "
                "outcome of operations in flight is unknown: reopen the ledger and find(key) tells"
            )
        )

    # -- the thread --------------------------------------------------------------

    def run(self) -> None:
        """Answering wakes callers, whose next operations then run while this thread
        waits in COMMIT's fsync (which releases the GIL) instead of competing with the
        writer's own statements. Batch k is answered only after its commit."""
        s = self._sequencer
        try:
            self._run()
        finally:
            with self._lock:
                s.exited = True
                left, s.pending = s.pending, []
                failure = s.failure
                s.progress.notify_all()
            if left:  # only after a bug in the loop itself: still, no future stays pending
                self._fail(left, failure or BankClosed("the ledger writer stopped"))
            self.ready.set()
            self._claims.close()
            if self.on_exit is not None:
                self.on_exit()

    def _open_batch_writer(self) -> BatchWriter:
        """The backend's connection for group commits (set-up failures fail the open)."""
        return self._open_writer()

    def _run(self) -> None:
        s = self._sequencer
        writer: BatchWriter | None = None
        committed: _Prepared | None = None  # durable, not yet answered
        try:
            try:
                writer = self._open_batch_writer()
            except BaseException as exc:  # the loop below then fails everything staged
                self._broke(exc)
            finally:
                self.ready.set()
            while True:
                answered = 0
                if committed is not None and self._callers_wait_for(committed):
                    # Closed-loop callers (blocking calls): answer them now, before taking
                    # the next batch, and give them a moment (no longer than a commit
                    # takes) to stage again, so that they share the next commit instead
                    # of splitting into two groups that alternate commits.
                    answered = len(committed.batch)
                    try:
                        self._answer(committed)
                    except BaseException as exc:  # a bug: the batch is durable, answer it
                        broken = self._broke(exc)
                        self._answer_left(committed)
                        self._fail([], broken, answered=answered)
                    committed = None
                with self._lock:
                    if answered:
                        self._gather(answered)
                    while not s.pending and not s.stopping and committed is None:
                        s.idle = True
                        s.wake.wait()
                        s.idle = False
                    if not s.pending and committed is None:
                        return
                    batch = s.pending[: self._commit_ops_max]
                    del s.pending[: self._commit_ops_max]
                    failure = s.failure
                try:
                    committed = self._cycle(writer, batch, committed, failure)
                except BaseException as exc:  # a bug: never leave a future pending
                    broken = self._broke(exc)
                    answered = len(batch)
                    if committed is not None and not committed.answered:
                        # Durable: its operations get their receipts, never a failure.
                        self._answer_left(committed)
                        answered += len(committed.batch)
                    self._fail([r for r in batch if not r[0].done()], broken, answered=answered)
                    committed = None
        finally:
            if writer is not None:
                writer.close()

    def _callers_wait_for(self, committed: _Prepared) -> bool:
        """True when `committed` answers blocking calls (its last record's answer is a
        `Reply`) and fewer operations are staged than it is about to answer: its callers
        are then (likely) the ones who will stage the next ones.

        Only blocking calls: pipelined callers (`submit_many`, `submit_batch`) keep
        operations in flight, and gathering for them made the writer wait where it
        should write (bench.py (c), 16 x 64 in flight: 110 of 180 commits gathered).
        And only where writing a batch is slow (`GATHER_WRITE_S_MIN`, a smoothed
        figure): 8 blocking callers on SQLite (0.08 ms of statements and a 0.3 ms
        COMMIT here) made 7.8-10.2k calls/s without gathering against 6.0-7.2k with
        it; on PostgreSQL (0.85 ms and 0.55 ms, two round trips) 2.3-2.8k without
        against 3.0-3.4k with it.
        """
        if not committed.batch or type(committed.batch[-1][0]) is not Reply:
            return False
        if self._write_s < GATHER_WRITE_S_MIN:
            # Writing a batch takes less than the callers' way back (wake-up, GIL, the
            # next call): waiting for them costs more than two groups taking turns, one
            # making its next calls while the other's batch is written.
            return False
        with self._lock:
            return len(self._sequencer.pending) < len(committed.batch)

    def _gather(self, answered: int) -> None:
        """Wait (lock held) until `answered` records are staged again, at most as long
        as a commit takes (and `GATHER_WAIT_S_MAX`): a wait shorter than a commit that
        lets one commit carry what two would."""
        s = self._sequencer
        deadline = time.monotonic() + min(self._commit_s, GATHER_WAIT_S_MAX)
        while len(s.pending) < answered and not s.stopping and s.failure is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            s.idle = True
            s.wake.wait(remaining)
            s.idle = False

    def _cycle(
        self,
        writer: BatchWriter | None,
        batch: list[Staged],
        committed: _Prepared | None,
        failure: LedgerUnavailable | None,
    ) -> _Prepared | None:
        """One turn of `run`; returns the batch now durable and waiting to be answered."""
        prepared: _Prepared | None = None
        broken = failure
        preparing = 0.0
        if batch and failure is None:
            assert writer is not None, "no failure, so the batch writer opened"
            try:
                started = time.monotonic()
                prepared = self._prepare(writer, batch)
                preparing = time.monotonic() - started
            except Exception as exc:
                broken = self._broke(exc)
        if committed is not None:
            self._answer(committed)
        if prepared is not None:
            assert writer is not None
            lost = self._owner_lost()
            if lost is not None:
                writer.rollback()
                self.lose(lost)
                broken = self._sequencer.failure
            else:
                try:
                    started = time.monotonic()
                    writer.commit()
                    took = time.monotonic() - started
                    # Smoothed: one slow fsync must not switch gathering on and off.
                    self._commit_s += (took - self._commit_s) / 8
                    self._write_s += (preparing + took - self._write_s) / 8
                except Exception as exc:
                    broken = self._broke(exc)
                    writer.rollback()
                else:
                    return prepared
        if batch and broken is not None:
            self._fail(batch, broken)
        return None

    def _broke(self, exc: BaseException) -> LedgerUnavailable:
        """Record that the ledger can no longer be written; returns the error to answer with."""
        log.error("ledger commit failed; the bank stops accepting work", exc_info=exc)
        # A COMMIT that raised may still have reached the disk (an fsync error after the
        # WAL frames were written is replayed at the next open): the outcome is unknown.
        return self._fail_bank(
            LedgerUnavailable(
                f"the ledger could not be written ({type(exc).__name__}: {exc}); the outcome of "
                "operations in flight is unknown: reopen the ledger and find(key) tells"
            )
        )

    def _fail_bank(self, failure: LedgerUnavailable) -> LedgerUnavailable:
        """Set the bank's failure (the first one stands) and wake whoever waits."""
        s = self._sequencer
        with self._lock:
            if s.failure is None:
                s.failure = failure
                self.broken.set()
                s.progress.notify_all()
            return s.failure

    def _prepare(self, writer: BatchWriter, batch: list[Staged]) -> _Prepared:
        """Write a batch inside a transaction left open for the caller to commit."""
        rows: list[Receipt] = []
        running: list[tuple[int, int]] = []
        balances: dict[int, int] = {}
        events: list[AccountEventRow] = []
        keys: list[str] = []
        rejected = 0
        extended = False  # a row of a hold, a post, a void, an expire or a group
        for rec in batch:
            if len(rec) != 4:  # not a transfer (see `bank.ledger.sequencer`)
                if isinstance(rec, StagedRejection):
                    rejected += 1
                elif isinstance(rec, StagedGroup):
                    extended = True
                    rows.extend(rec.receipts)
                    for receipt, debit_balance, credit_balance in zip(
                        rec.receipts, rec.debit_balances, rec.credit_balances, strict=True
                    ):
                        balances[receipt[4]] = debit_balance
                        balances[receipt[5]] = credit_balance
                        running.append((debit_balance, credit_balance))
                    keys.extend(rec.keys)
                else:
                    events.append(rec.row)
                continue
            # A transfer, (future, receipt, debit balance, credit balance). Indexes, not
            # names: a NamedTuple's attribute costs about 3x its index, and this loop runs
            # once per operation (`_RECEIPT_AT` checks the receipt's layout).
            receipt = rec[1]
            rows.append(receipt)
            running.append(rec[2:])  # the row's debit_balance, credit_balance
            balances[receipt[4]] = rec[2]  # debit account: its balance after
            balances[receipt[5]] = rec[3]  # credit account: its balance after
            key = receipt[2]
            if key is not None:
                keys.append(key)
            if receipt[8] is not None or receipt[9] is not None:  # hold_seq, expires_us
                extended = True
        write = WriteBatch(
            transfers=rows,
            running=running,
            balances=balances,
            keyed=bool(keys),
            extended=extended,
        )
        if events:
            write.events = events
            write.new_accounts = [e for e in events if e.kind == "open"]
            write.limits = [e for e in events if e.kind == "limit"]
        last_seq = rows[-1].seq if rows else 0
        prepared = _Prepared(batch, rows, keys, last_seq, rejected)
        writer.begin()
        try:
            writer.write(write)
        except BaseException:
            writer.rollback()
            raise
        return prepared

    def _answer(self, done: _Prepared) -> None:
        """Answer a committed batch, in order."""
        # Keys go back before anyone is answered: a retry that wakes on the answer
        # must find the key in the ledger, not a stale claim.
        if done.keys:
            self._claims.release_many(done.keys)
        for rec in done.batch:
            # A done-callback runs inside set_result; whatever it raises (SystemExit
            # included) must not reach this loop (the try costs nothing until it raises).
            try:
                if len(rec) == 4:
                    rec[0].set_result(rec[1])  # a transfer: its future, its receipt
                elif isinstance(rec, StagedRejection):
                    if rec.key is not None:
                        self._claims.release(rec.key)
                    rec.future.set_exception(rec.error)
                elif isinstance(rec, StagedGroup):
                    rec.future.set_result(list(rec.receipts))
                else:
                    rec.future.set_result(rec.row.seq)
            except BaseException:
                log.exception("a future's done-callback raised; the answer stands")
        done.answered = True
        s = self._sequencer
        with self._lock:
            if done.last_seq:
                self._committed_seq = done.last_seq
            s.done += len(done.batch)
            self._commits += 1
            self._rows += len(done.rows)
            self._rejected += done.rejected
            s.progress.notify_all()

    def _answer_left(self, done: _Prepared) -> None:
        """Answer what a committed batch left unanswered (after a bug): receipts, durable."""
        self._claims.release_many(done.keys)
        for rec in done.batch:
            if rec[0].done():
                continue
            if len(rec) == 4:
                settle(rec[0], rec[1])
            elif isinstance(rec, StagedRejection):
                if rec.key is not None:
                    self._claims.release(rec.key)
                settle(rec.future, error=rec.error)
            elif isinstance(rec, StagedGroup):
                settle(rec.future, list(rec.receipts))
            else:
                settle(rec.future, rec.row.seq)
        done.answered = True

    def _fail(self, batch: list[Staged], failure: BankError, answered: int | None = None) -> None:
        """Answer a batch that will never be written (`answered`: records it completes)."""
        for rec in batch:
            if len(rec) == 4:
                key = rec[1].key
            elif isinstance(rec, StagedRejection):
                key = rec.key
            else:
                key = None
                if isinstance(rec, StagedGroup) and rec.keys:
                    self._claims.release_many(rec.keys)
            if key is not None:
                self._claims.release(key)
            settle(rec[0], error=failure)
        s = self._sequencer
        with self._lock:
            s.done += len(batch) if answered is None else answered
            s.progress.notify_all()


@dataclass(slots=True)
class _Prepared:
    """A batch written inside an open transaction, and what answering it needs."""

    batch: list[Staged]
    rows: list[Receipt]
    keys: list[str]
    last_seq: int
    rejected: int
    answered: bool = False
