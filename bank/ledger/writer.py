"""The ledger writer: one thread that turns staged records into group commits.

Workers stage records while they hold the accounts' locks, so the order of the
`_pending` list is the order in which balances changed; `seq`, the timestamp
and the chain hash are assigned there, under the writer's lock, in that same
order. The writer takes everything
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
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import chain
from typing import Any, Protocol

from sqlalchemy import Dialect, Engine, bindparam, insert, update
from sqlalchemy.sql.expression import ClauseElement

from bank import lockcheck
from bank.errors import BankClosed, BankError, LedgerUnavailable
from bank.ledger.chain import account_event_hash, transfer_hash
from bank.ledger.models import account_events, accounts, transfers
from bank.ledger.sqlite import BEGIN_SQL, bound_variables_max
from bank.limits import COMMIT_BATCH_OPS_MAX, ROWS_PER_STATEMENT_MAX
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
#: Where the key sits in a receipt; a batch with no keys leaves the column out (NULL).
_KEY_INDEX = _RECEIPT_COLUMNS.index("key")
#: The INSERT of a batch without keys. sqlite3 looks for an adapter for every None it
#: binds (measured: a quarter of a 512-row page's cost), so those rows bind no key.
_KEYLESS_COLUMNS = tuple(c for c in _RECEIPT_COLUMNS if c != "key")
#: Builds a `Receipt` without the NamedTuple's Python-level `__new__` (70 ns, not 170).
_new_receipt = tuple.__new__


def settle(future: Future[Any], result: Any = None, *, error: BaseException | None = None) -> None:
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


def page_sizes(rows: int, largest: int) -> Iterator[int]:
    """Split `rows` into pages whose sizes are powers of two no larger than `largest`.

    Every page size is one statement text; with powers of two there are at most
    log2(largest) + 1 of them per statement, so they all stay in sqlite3's
    statement cache. Sizing pages to fit each batch exactly gave hundreds of texts:
    each missed the cache and was parsed again (600 us for 400 rows).
    """
    while rows:
        size = min(largest, 1 << (rows.bit_length() - 1))
        yield size
        rows -= size


def _largest_page(columns: int, variables_max: int) -> int:
    """The largest power-of-two page of `columns`-wide rows that fits in one statement."""
    fits = min(ROWS_PER_STATEMENT_MAX, variables_max // columns)
    return 1 << (fits.bit_length() - 1)


class KeyReleaser(Protocol):
    """What the writer needs of the engine's in-flight key claims (`bank.idempotency`),
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


class LedgerWriter(threading.Thread):
    """Single writer of the ledger: group commit, then answer."""

    def __init__(
        self,
        engine: Engine,
        claims: KeyReleaser,
        *,
        seq: int,
        head_hash: str,
        event_seq: int,
        event_head_hash: str,
        commit_ops_max: int = COMMIT_BATCH_OPS_MAX,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        # A daemon so that a forgotten bank cannot hold up exit; `bank.engine`'s atexit
        # hook drains it first (see `bank.engine._Lifecycle`).
        super().__init__(name="bank-ledger-writer", daemon=True)
        self.on_exit = on_exit  # told when this thread ends, after its last answer
        self._engine = engine
        self._claims = claims
        self._commit_ops_max = commit_ops_max
        self._lock = lockcheck.lock("writer")
        # Workers notify `_wake` when they stage into an idle writer.
        self._wake = threading.Condition(self._lock)
        # The writer notifies `_progress` after every batch it has answered.
        self._progress = threading.Condition(self._lock)
        self._pending: list[tuple[Any, ...]] = []
        self._idle = False
        self._stopping = False
        self._exited = False  # the thread has answered its last record and ended
        #: Set once the writer is ready to write, or failed to get ready (see `failure`).
        self.ready = threading.Event()
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
        # Chain heads of what is staged (not yet committed): advanced under the lock.
        self._head_hash = head_hash
        self._event_head_hash = event_head_hash
        assert sorted(_RECEIPT_COLUMNS) == sorted(c.name for c in transfers.c), "layout drifted"
        # Statement texts by page size, indexed by `keyed`: [without keys, with keys].
        self._insert_sql: tuple[dict[int, str], dict[int, str]] = ({}, {})
        self._update_sql: dict[int, str] = {}
        self._insert_page = self._update_page = 1  # set from the connection in `run`
        self._events_sql = _EventStatements(engine.dialect)

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
        """Queue an applied operation for the next commit.

        Its seq, timestamp and chain hash are fixed here, under the writer's lock, in
        the order the balances changed: the calling worker does that share of the
        work, so the writer thread (the pipeline's one serial stage) only writes.
        """
        with self._lock:
            seq = self._seq + 1
            ts_us = time.time_ns() // 1000
            head = transfer_hash(self._head_hash, seq, kind, debit, credit, amount, ts_us, key)
            self._seq = seq
            self._head_hash = head
            self._staged += 1
            receipt: Receipt = _new_receipt(
                Receipt, (seq, kind, key, amount, debit, credit, ts_us, head)
            )
            self._pending.append((_TRANSFER, future, receipt, debit_balance, credit_balance))
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
        """Queue an account opening ('open') or limit change ('limit'); `future` gets its event seq.

        Raises `BankClosed` (nothing staged) once the writer is stopping: callers
        outside the workers may race `close()`, and a record staged after the last
        batch would never be answered. Raises the failure if the ledger broke.
        """
        with self._lock:
            if self._stopping or self._exited:
                raise BankClosed("the bank is closed: it accepts no more operations")
            if self._failure is not None:
                raise self._failure
            seq = self._event_seq + 1
            ts_us = time.time_ns() // 1000
            head = account_event_hash(
                self._event_head_hash,
                seq,
                account_id,
                kind,
                overdraft_limit,
                self._seq,
                ts_us,
                name,
            )
            self._event_seq = seq
            self._event_head_hash = head
            self._staged += 1
            row = {
                "seq": seq,
                "account_id": account_id,
                "kind": kind,
                "name": name,
                "overdraft_limit": overdraft_limit,
                "transfer_seq": self._seq,
                "ts_us": ts_us,
                "hash": head,
            }
            self._pending.append((_EVENT, future, row))
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
                if self._exited:  # only if the thread died of a bug: never wait for it
                    raise BankClosed("the ledger writer has stopped")
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
        """Finish what is pending, then end the thread (`close()` joins it).

        Called once no worker can stage any more (the last worker to exit calls it);
        account events staged after it are refused with `BankClosed`.
        """
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
        # The writer drives its pooled connection's DB-API cursor itself: a batch is a
        # handful of statements whose texts are compiled from the Core tables once,
        # and SQLAlchemy's per-statement work (about 7 us each) would be most of a
        # small commit's Python time.
        try:
            self._run()
        finally:
            with self._lock:
                self._exited = True
                left, self._pending = self._pending, []
                failure = self._failure
                self._progress.notify_all()
            if left:  # only after a bug in the loop itself: still, no future stays pending
                self._fail(left, failure or BankClosed("the ledger writer stopped"))
            self.ready.set()
            self._claims.close()
            if self.on_exit is not None:
                self.on_exit()

    def _run(self) -> None:
        conn = cursor = None
        committed: _Prepared | None = None  # durable, not yet answered
        try:
            try:
                conn = self._engine.connect()
                driver = conn.connection.driver_connection
                assert driver is not None, "a live pooled connection has a driver connection"
                cursor = driver.cursor()
                self._configure(driver)
            except BaseException as exc:  # the loop below then fails everything staged
                self._broke(exc)
            finally:
                self.ready.set()
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
                    committed = self._cycle(cursor, batch, committed, failure)
                except BaseException as exc:  # a bug: never leave a future pending
                    broken = self._broke(exc)
                    answered = len(batch)
                    if committed is not None and not committed.answered:
                        # Durable: its operations get their receipts, never a failure.
                        self._answer_left(committed)
                        answered += len(committed.batch)
                    self._fail(
                        [r for r in batch if not _future_of(r).done()], broken, answered=answered
                    )
                    committed = None
        finally:
            if cursor is not None:
                cursor.close()
            if conn is not None:
                conn.close()

    def _configure(self, driver: Any) -> None:
        """Size the statement pages for this connection's limit of bound variables."""
        variables_max = bound_variables_max(driver)
        self._insert_page = _largest_page(len(_RECEIPT_COLUMNS), variables_max)
        self._update_page = _largest_page(2, variables_max)

    def _cycle(
        self,
        cursor: Any,
        batch: list[tuple[Any, ...]],
        committed: _Prepared | None,
        failure: LedgerUnavailable | None,
    ) -> _Prepared | None:
        """One turn of `run`; returns the batch now durable and waiting to be answered."""
        prepared: _Prepared | None = None
        broken = failure
        if batch and failure is None:
            try:
                prepared = self._prepare(cursor, batch)
            except Exception as exc:
                broken = self._broke(exc)
        if committed is not None:
            self._answer(committed)
        if prepared is not None:
            try:
                cursor.execute("COMMIT")
            except Exception as exc:
                broken = self._broke(exc)
                _rollback(prepared)
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
        failure = LedgerUnavailable(
            f"the ledger could not be written ({type(exc).__name__}: {exc}); the outcome of "
            "operations in flight is unknown: reopen the ledger and find(key) tells"
        )
        with self._lock:
            if self._failure is None:
                self._failure = failure
                self.broken.set()
            return self._failure

    def _prepare(self, cursor: Any, batch: list[tuple[Any, ...]]) -> _Prepared:
        """Write a batch inside a transaction left open for the caller to commit."""
        rows: list[Receipt] = []
        balances: dict[int, int] = {}
        new_accounts: list[dict[str, Any]] = []
        limits: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        keys: list[str] = []
        rejected = 0
        for rec in batch:
            tag = rec[0]
            if tag == _TRANSFER:
                _, _f, receipt, debit_balance, credit_balance = rec
                rows.append(receipt)
                balances[receipt.debit_account] = debit_balance
                balances[receipt.credit_account] = credit_balance
                if receipt.key is not None:
                    keys.append(receipt.key)
            elif tag == _REJECT:
                rejected += 1
            elif tag == _EVENT:
                row = rec[2]
                events.append(row)
                if row["kind"] == "open":
                    new_accounts.append(
                        {
                            "id": row["account_id"],
                            "name": row["name"],
                            "overdraft_limit": row["overdraft_limit"],
                            "balance": 0,
                        }
                    )
                else:
                    limits.append({"b_id": row["account_id"], "b_limit": row["overdraft_limit"]})
        last_seq = rows[-1].seq if rows else 0
        prepared = _Prepared(batch, cursor, rows, keys, last_seq, rejected)
        cursor.execute(BEGIN_SQL)
        try:
            # Accounts first: this batch's transfers may already reference them.
            if new_accounts:
                self._events_sql.open_account.run(cursor, new_accounts)
            if events:
                self._events_sql.add_event.run(cursor, events)
            if limits:
                self._events_sql.set_limit.run(cursor, limits)
            if rows:
                self._insert_transfers(cursor, rows, keyed=bool(keys))
            if balances:
                self._update_balances(cursor, balances)
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
        for rec in done.batch:
            # A done-callback runs inside set_result; whatever it raises (SystemExit
            # included) must not reach this loop (the try costs nothing until it raises).
            try:
                tag = rec[0]
                if tag == _TRANSFER:
                    rec[1].set_result(rec[2])
                elif tag == _REJECT:
                    _, future, error, key = rec
                    if key is not None:
                        self._claims.release(key)
                    future.set_exception(error)
                elif tag == _EVENT:
                    rec[1].set_result(rec[2]["seq"])
            except BaseException:
                log.exception("a future's done-callback raised; the answer stands")
        done.answered = True
        with self._lock:
            if done.last_seq:
                self._committed_seq = done.last_seq
            self._done += len(done.batch)
            self._commits += 1
            self._rows += len(done.rows)
            self._rejected += done.rejected
            self._progress.notify_all()

    def _answer_left(self, done: _Prepared) -> None:
        """Answer what a committed batch left unanswered (after a bug): receipts, durable."""
        self._claims.release_many(done.keys)
        for rec in done.batch:
            future = _future_of(rec)
            if future.done():
                continue
            if rec[0] == _TRANSFER:
                settle(future, rec[2])
            elif rec[0] == _REJECT:
                if rec[3] is not None:
                    self._claims.release(rec[3])
                settle(future, error=rec[2])
            else:
                settle(future, rec[2]["seq"])
        done.answered = True

    def _insert_transfers(self, cursor: Any, rows: list[Receipt], *, keyed: bool) -> None:
        """Insert rows as multi-row INSERT pages (SQLAlchemy's "insertmanyvalues" technique).

        On SQLite this is about twice as fast as DB-API executemany, which binds,
        steps and releases the GIL once per row; a page does that once per up to
        `ROWS_PER_STATEMENT_MAX` rows. The statement text is derived from
        the Core table, and rows are the receipts themselves (no per-row dicts).
        Without keys in the batch (`keyed` false) the key column is left out.
        """
        columns = _RECEIPT_COLUMNS if keyed else _KEYLESS_COLUMNS
        texts = self._insert_sql[keyed]
        start = 0
        for size in page_sizes(len(rows), self._insert_page):
            sql = texts.get(size)
            if sql is None:
                row = "(" + ", ".join("?" for _ in columns) + ")"
                sql = f"INSERT INTO {transfers.name} ({', '.join(columns)}) VALUES " + ", ".join(
                    [row] * size
                )
                texts[size] = sql
            params = list(chain.from_iterable(rows[start : start + size]))
            if not keyed:
                del params[_KEY_INDEX :: len(_RECEIPT_COLUMNS)]
            cursor.execute(sql, params)
            start += size

    def _update_balances(self, cursor: Any, balances: dict[int, int]) -> None:
        """Write the batch's final balances with one `UPDATE ... FROM (VALUES ...)` per page.

        DB-API executemany would step once per account, and each step releases and
        re-takes the GIL: under load every re-take waits behind other threads.
        """
        items = list(balances.items())
        start = 0
        for size in page_sizes(len(items), self._update_page):
            sql = self._update_sql.get(size)
            if sql is None:
                values = ", ".join(["(?, ?)"] * size)
                sql = (
                    f"UPDATE {accounts.name} SET {accounts.c.balance.name} = v.column2 "
                    f"FROM (VALUES {values}) AS v "
                    f"WHERE {accounts.name}.{accounts.c.id.name} = v.column1"
                )
                self._update_sql[size] = sql
            cursor.execute(sql, tuple(chain.from_iterable(items[start : start + size])))
            start += size

    def _fail(
        self, batch: list[tuple[Any, ...]], failure: BankError, answered: int | None = None
    ) -> None:
        """Answer a batch that will never be written (`answered`: records it completes)."""
        for rec in batch:
            future = _future_of(rec)
            key = rec[2].key if rec[0] == _TRANSFER else rec[3] if rec[0] == _REJECT else None
            if key is not None:
                self._claims.release(key)
            settle(future, error=failure)
        with self._lock:
            self._done += len(batch) if answered is None else answered
            self._progress.notify_all()


@dataclass(slots=True)
class _Prepared:
    """A batch written inside an open transaction, and what answering it needs."""

    batch: list[tuple[Any, ...]]
    cursor: Any  # its connection holds the open transaction
    rows: list[Receipt]
    keys: list[str]
    last_seq: int
    rejected: int
    answered: bool = False


class _Compiled:
    """A Core statement compiled once to driver SQL, with the order of its parameters."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self._sql = compiled.string
        self._order = tuple(getattr(compiled, "positiontup", None) or ())

    def run(self, cursor: Any, rows: list[dict[str, Any]]) -> None:
        """Execute once per row (rows are dicts keyed by parameter name)."""
        cursor.executemany(self._sql, [tuple(row[key] for key in self._order) for row in rows])


class _EventStatements:
    """The statements of account openings and limit changes (rare: executemany is fine)."""

    def __init__(self, dialect: Dialect) -> None:
        self.open_account = _Compiled(insert(accounts), dialect)
        self.add_event = _Compiled(insert(account_events), dialect)
        self.set_limit = _Compiled(
            update(accounts)
            .where(accounts.c.id == bindparam("b_id"))
            .values(overdraft_limit=bindparam("b_limit")),
            dialect,
        )


def _rollback(prepared: _Prepared) -> None:
    try:
        if prepared.cursor.connection.in_transaction:
            prepared.cursor.execute("ROLLBACK")
    except Exception:  # the connection is already broken; the failure is reported anyway
        log.warning("rollback failed", exc_info=True)


def _future_of(rec: tuple[Any, ...]) -> Future[Any]:
    """The future a staged record answers."""
    future: Future[Any] = rec[1]
    return future
