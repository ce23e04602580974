"""The ledger writer: one thread that turns staged records into group commits.

Workers stage records while they hold the accounts' locks, so the order of the
`_pending` list is the order in which balances changed; `seq` is assigned
here, under the writer's lock, in that same order. The writer takes everything
pending (up to `COMMIT_BATCH_OPS_MAX`), writes it in one SQLite transaction
(transfer rows, account rows and events, final balances) and only after the
commit answers the batch's futures, in order. Rejections travel the same
list, so a refusal is also answered only once everything it was judged
against is durable.

The writer never waits on a worker or on the job queue, so a worker may wait
for the writer (see `wait_for`) without any risk of deadlock.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import chain
from typing import Any

from sqlalchemy import Engine, bindparam, insert, update

from bank.errors import BankError, LedgerUnavailable
from bank.idempotency import KeyClaims
from bank.ledger.chain import account_event_hash, transfer_hash
from bank.ledger.models import account_events, accounts, transfers
from bank.limits import (
    COMMIT_BATCH_OPS_MAX,
    INSERT_ROWS_PER_STATEMENT_MAX,
    UPDATE_ROWS_PER_STATEMENT_MAX,
)
from bank.records import Receipt

log = logging.getLogger(__name__)

# Record tags (first element of each staged tuple).
_TRANSFER = 0
_REJECT = 1
_EVENT = 2

#: The INSERT names its columns in `Receipt` field order, so a receipt is its own row.
_RECEIPT_COLUMNS = (
    "seq",
    "kind",
    "key",
    "amount",
    "debit_account_id",
    "credit_account_id",
    "ts_us",
    "hash",
)


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters of the writer, read under its lock."""

    seq: int
    committed_seq: int
    commits: int
    rows: int
    rejected: int
    pending: int


class LedgerWriter(threading.Thread):
    """Single writer of the ledger: group commit, then answer."""

    def __init__(
        self,
        engine: Engine,
        claims: KeyClaims,
        *,
        seq: int,
        head_hash: str,
        event_seq: int,
        event_head_hash: str,
        commit_ops_max: int = COMMIT_BATCH_OPS_MAX,
    ) -> None:
        super().__init__(name="bank-ledger-writer")
        self._engine = engine
        self._claims = claims
        self._commit_ops_max = commit_ops_max
        self._lock = threading.Lock()
        # Workers notify `_wake` when they stage into an idle writer.
        self._wake = threading.Condition(self._lock)
        # The writer notifies `_progress` after every batch it has answered.
        self._progress = threading.Condition(self._lock)
        self._pending: list[tuple[Any, ...]] = []
        self._idle = False
        self._stopping = False
        self._failure: LedgerUnavailable | None = None
        #: Set once `_failure` is: callers check it without taking the writer's lock.
        self.broken = threading.Event()
        self._seq = seq  # last transfer seq handed out
        self._committed_seq = seq
        self._event_seq = event_seq
        self._staged = 0  # records ever staged (positions for wait_for)
        self._done = 0  # records answered
        self._commits = 0
        self._rows = 0
        self._rejected = 0
        # Only the writer thread touches the chain heads.
        self._head_hash = head_hash
        self._event_head_hash = event_head_hash
        assert sorted(_RECEIPT_COLUMNS) == sorted(c.name for c in transfers.c), "layout drifted"
        self._insert_sql: dict[int, str] = {}
        self._update_sql: dict[int, str] = {}

    # -- staging (called by workers with the accounts' locks held; never raises) ----

    def stage_transfer(
        self,
        kind: str,
        debit: int,
        credit: int,
        amount: int,
        key: str | None,
        future: Future[Receipt],
        debit_balance: int,
        credit_balance: int,
    ) -> None:
        """Queue an applied operation for the next commit; seq is assigned here, in order."""
        with self._lock:
            self._seq += 1
            self._staged += 1
            self._pending.append(
                (
                    _TRANSFER,
                    self._seq,
                    kind,
                    debit,
                    credit,
                    amount,
                    key,
                    future,
                    debit_balance,
                    credit_balance,
                )
            )
            if self._idle:
                self._wake.notify()

    def stage_rejection(self, future: Future[Any], error: BaseException, key: str | None) -> None:
        """Answer `future` with `error` once everything staged before it is durable."""
        with self._lock:
            self._staged += 1
            self._pending.append((_REJECT, future, error, key))
            if self._idle:
                self._wake.notify()

    def stage_account_event(
        self, kind: str, account_id: int, name: str, overdraft_limit: int, future: Future[Any]
    ) -> None:
        """Queue an account opening ('open') or limit change ('limit'); `future` gets its event seq."""
        with self._lock:
            self._event_seq += 1
            self._staged += 1
            self._pending.append(
                (
                    _EVENT,
                    self._event_seq,
                    kind,
                    account_id,
                    name,
                    overdraft_limit,
                    self._seq,
                    future,
                )
            )
            if self._idle:
                self._wake.notify()

    def position(self) -> tuple[int, int]:
        """(records staged so far, last transfer seq): pass the first to `wait_for`."""
        with self._lock:
            return self._staged, self._seq

    def wait_for(self, position: int, timeout: float | None = None) -> None:
        """Block until every record staged before `position` is committed and answered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._done < position:
                if self._failure is not None:
                    raise self._failure
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"the ledger did not catch up within {timeout} s")
                if self._idle:
                    self._wake.notify()
                self._progress.wait(remaining)
            if self._failure is not None:
                raise self._failure

    @property
    def failure(self) -> LedgerUnavailable | None:
        """Why the writer stopped writing, once it has failed."""
        with self._lock:
            return self._failure

    def stats(self) -> WriterStats:
        """Counters for progress displays."""
        with self._lock:
            return WriterStats(
                self._seq,
                self._committed_seq,
                self._commits,
                self._rows,
                self._rejected,
                len(self._pending),
            )

    def stop(self) -> None:
        """Finish what is pending, then end the thread (the caller joins it)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()

    # -- the writer thread -------------------------------------------------------

    def run(self) -> None:
        """Cycle: prepare batch k+1 in an open transaction, answer batch k, commit k+1.

        Answering wakes callers, whose next operations then run while this thread
        sits in COMMIT's fsync (which releases the GIL) instead of competing with
        the writer's own statements. Batch k is answered only after its commit.
        """
        conn = self._engine.connect()
        committed: _Prepared | None = None  # durable, not yet answered
        try:
            while True:
                with self._lock:
                    while not self._pending and not self._stopping and committed is None:
                        self._idle = True
                        self._wake.wait()
                        self._idle = False
                    if not self._pending and committed is None:
                        return
                    batch = self._pending[: self._commit_ops_max]
                    del self._pending[: self._commit_ops_max]
                    failure = self._failure
                try:
                    committed = self._cycle(conn, batch, committed, failure)
                except BaseException as exc:  # a bug: never leave a future pending
                    broken = self._broke(exc)
                    left = batch + (committed.batch if committed is not None else [])
                    self._fail(
                        [r for r in left if not _future_of(r).done()], broken, answered=len(left)
                    )
                    committed = None
        finally:
            conn.close()

    def _cycle(
        self,
        conn: Any,
        batch: list[tuple[Any, ...]],
        committed: _Prepared | None,
        failure: LedgerUnavailable | None,
    ) -> _Prepared | None:
        """One turn of `run`; returns the batch now durable and waiting to be answered."""
        prepared: _Prepared | None = None
        broken = failure
        if batch and failure is None:
            try:
                prepared = self._prepare(conn, batch)
            except Exception as exc:
                broken = self._broke(exc)
        if committed is not None:
            self._answer(committed)
        if prepared is not None:
            try:
                prepared.transaction.commit()
            except Exception as exc:
                broken = self._broke(exc)
                _rollback(prepared)
            else:
                self._head_hash = prepared.head_hash
                self._event_head_hash = prepared.event_head_hash
                return prepared
        if batch and broken is not None:
            self._fail(batch, broken)
        return None

    def _broke(self, exc: BaseException) -> LedgerUnavailable:
        """Record that the ledger can no longer be written; returns the error to answer with."""
        log.error("ledger commit failed; the bank stops accepting work", exc_info=exc)
        failure = LedgerUnavailable(
            f"the ledger could not be written ({type(exc).__name__}: {exc})"
        )
        with self._lock:
            if self._failure is None:
                self._failure = failure
                self.broken.set()
            return self._failure

    def _prepare(self, conn: Any, batch: list[tuple[Any, ...]]) -> _Prepared:
        """Write a batch inside a transaction left open for the caller to commit."""
        ts_us = time.time_ns() // 1000
        prev = self._head_hash
        event_prev = self._event_head_hash
        rows: list[Receipt] = []
        balances: dict[int, int] = {}
        new_accounts: list[dict[str, Any]] = []
        limits: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        keys: list[str] = []
        last_seq = 0
        rejected = 0
        for rec in batch:
            tag = rec[0]
            if tag == _TRANSFER:
                _, seq, kind, debit, credit, amount, key, _f, debit_balance, credit_balance = rec
                prev = transfer_hash(prev, seq, kind, debit, credit, amount, ts_us, key)
                rows.append(Receipt(seq, kind, key, amount, debit, credit, ts_us, prev))
                balances[debit] = debit_balance
                balances[credit] = credit_balance
                last_seq = seq
                if key is not None:
                    keys.append(key)
            elif tag == _REJECT:
                rejected += 1
            elif tag == _EVENT:
                _, eseq, kind, account_id, name, limit, transfer_seq, _f = rec
                event_prev = account_event_hash(
                    event_prev, eseq, account_id, kind, limit, transfer_seq, ts_us, name
                )
                events.append(
                    {
                        "seq": eseq,
                        "account_id": account_id,
                        "kind": kind,
                        "name": name,
                        "overdraft_limit": limit,
                        "transfer_seq": transfer_seq,
                        "ts_us": ts_us,
                        "hash": event_prev,
                    }
                )
                if kind == "open":
                    new_accounts.append(
                        {"id": account_id, "name": name, "overdraft_limit": limit, "balance": 0}
                    )
                else:
                    limits.append({"b_id": account_id, "b_limit": limit})
        transaction = conn.begin()
        prepared = _Prepared(batch, transaction, rows, keys, last_seq, rejected, prev, event_prev)
        try:
            # Accounts first: this batch's transfers may already reference them.
            if new_accounts:
                conn.execute(insert(accounts), new_accounts)
            if events:
                conn.execute(insert(account_events), events)
            if limits:
                conn.execute(
                    update(accounts)
                    .where(accounts.c.id == bindparam("b_id"))
                    .values(overdraft_limit=bindparam("b_limit")),
                    limits,
                )
            if rows:
                self._insert_transfers(conn, rows)
            if balances:
                self._update_balances(conn, balances)
        except BaseException:
            _rollback(prepared)
            raise
        return prepared

    def _answer(self, done: _Prepared) -> None:
        """Answer a committed batch, in order."""
        # Keys go back before anyone is answered: a retry that wakes on the answer
        # must find the key in the ledger, not a stale claim.
        if done.keys:
            self._claims.release_many(done.keys)
        receipts = iter(done.rows)
        for rec in done.batch:
            tag = rec[0]
            if tag == _TRANSFER:
                rec[7].set_result(next(receipts))
            elif tag == _REJECT:
                _, future, error, key = rec
                if key is not None:
                    self._claims.release(key)
                future.set_exception(error)
            elif tag == _EVENT:
                rec[7].set_result(rec[1])
        with self._lock:
            if done.last_seq:
                self._committed_seq = done.last_seq
            self._done += len(done.batch)
            self._commits += 1
            self._rows += len(done.rows)
            self._rejected += done.rejected
            self._progress.notify_all()

    def _insert_transfers(self, conn: Any, rows: list[Receipt]) -> None:
        """Insert rows as multi-row INSERT pages (SQLAlchemy's "insertmanyvalues" technique).

        On SQLite this is about twice as fast as DB-API executemany, which binds,
        steps and releases the GIL once per row; a page does that once per
        `INSERT_ROWS_PER_STATEMENT_MAX` rows. The statement text is derived from
        the Core table, and rows are the receipts themselves (no per-row dicts).
        """
        page = INSERT_ROWS_PER_STATEMENT_MAX
        for start in range(0, len(rows), page):
            chunk = rows[start : start + page]
            sql = self._insert_sql.get(len(chunk))
            if sql is None:
                columns = ", ".join(_RECEIPT_COLUMNS)
                row = "(" + ", ".join("?" for _ in _RECEIPT_COLUMNS) + ")"
                sql = f"INSERT INTO {transfers.name} ({columns}) VALUES " + ", ".join(
                    [row] * len(chunk)
                )
                self._insert_sql[len(chunk)] = sql
            conn.exec_driver_sql(sql, tuple(chain.from_iterable(chunk)))

    def _update_balances(self, conn: Any, balances: dict[int, int]) -> None:
        """Write the batch's final balances with one `UPDATE ... FROM (VALUES ...)` per page.

        DB-API executemany would step once per account, and each step releases and
        re-takes the GIL: under load every re-take waits behind other threads.
        """
        items = list(balances.items())
        page = UPDATE_ROWS_PER_STATEMENT_MAX
        for start in range(0, len(items), page):
            chunk = items[start : start + page]
            sql = self._update_sql.get(len(chunk))
            if sql is None:
                values = ", ".join(["(?, ?)"] * len(chunk))
                sql = (
                    f"UPDATE {accounts.name} SET {accounts.c.balance.name} = v.column2 "
                    f"FROM (VALUES {values}) AS v "
                    f"WHERE {accounts.name}.{accounts.c.id.name} = v.column1"
                )
                self._update_sql[len(chunk)] = sql
            conn.exec_driver_sql(sql, tuple(chain.from_iterable(chunk)))

    def _fail(
        self, batch: list[tuple[Any, ...]], failure: BankError, answered: int | None = None
    ) -> None:
        """Answer a batch that will never be written (`answered`: records it completes)."""
        for rec in batch:
            future = _future_of(rec)
            key = rec[6] if rec[0] == _TRANSFER else rec[3] if rec[0] == _REJECT else None
            if key is not None:
                self._claims.release(key)
            future.set_exception(failure)
        with self._lock:
            self._done += len(batch) if answered is None else answered
            self._progress.notify_all()


@dataclass(slots=True)
class _Prepared:
    """A batch written inside an open transaction, and what answering it needs."""

    batch: list[tuple[Any, ...]]
    transaction: Any
    rows: list[Receipt]
    keys: list[str]
    last_seq: int
    rejected: int
    head_hash: str
    event_head_hash: str


def _rollback(prepared: _Prepared) -> None:
    try:
        prepared.transaction.rollback()
    except Exception:  # the connection is already broken; the failure is reported anyway
        log.warning("rollback failed", exc_info=True)


def _future_of(rec: tuple[Any, ...]) -> Future[Any]:
    """The future a staged record answers."""
    future: Future[Any] = rec[1] if rec[0] == _REJECT else rec[7]
    return future
