"""The `Bank` facade: lifecycle, the embedded API, and the threads behind it.

```
callers --submit--> BoundedBuffer --get_many--> Workers --stage--> LedgerWriter --commit--> the ledger's store
   ^                                                                    |
   +------------------- Future[Receipt], answered after the commit -----+
```

Lock order, everywhere: `_registry_lock` -> account locks (ascending id) ->
the writer's lock. The buffer's, the key claims' and the lifecycle's locks are leaves.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from bank import lockcheck
from bank.account import Account
from bank.answers import Answer, BatchAnswer, EngineFuture, Outcome, Reply
from bank.buffer import BoundedBuffer
from bank.clock import Clock, SystemClock
from bank.commands import (
    AccountSpec,
    BankCommand,
    Deposit,
    Hold,
    LimitSpec,
    Post,
    Transfer,
    Void,
    Withdrawal,
    check_key,
    is_validated,
    refusal,
)
from bank.errors import (
    AccountClosed,
    AccountNameTaken,
    AccountNotEmpty,
    AccountNotFound,
    BankClosed,
    BankError,
    CannotOpenLedger,
    CloseFromBankThread,
    InsufficientFunds,
    InvalidCommand,
    LedgerCorrupt,
    LedgerUnavailable,
    QueueFull,
    UnsupportedLedgerUrl,
    WaitOnBankThread,
)
from bank.expiry import ExpiryTimer
from bank.groups import LinkedGroup
from bank.holds import HoldBook, PendingHold
from bank.idempotency import KeyClaims
from bank.ledger import holds_store, migrate, store, verify
from bank.ledger.backend import Backend, Durability, OwnerLock
from bank.ledger.backends import backend_for, ledger_url
from bank.ledger.pipeline import settle
from bank.ledger.writer import LedgerWriter
from bank.limits import (
    BATCH_OPS_MAX,
    CASH_ACCOUNT_ID,
    COMMIT_BATCH_OPS_MAX,
    GROUP_COMMANDS_MAX,
    HISTORY_LIMIT_DEFAULT,
    JOIN_WAIT_S_MAX,
    KEY_WAIT_S_MAX,
    OPEN_PROBLEMS_SHOWN_MAX,
    QUEUE_CAPACITY_DEFAULT,
    QUEUE_CAPACITY_MAX,
    SUBMIT_CHUNK_OPS_MAX,
    WORKERS_DEFAULT,
    WORKERS_MAX,
)
from bank.locking import locked
from bank.records import Receipt, Snapshot
from bank.worker import Job, Worker, apply_move

if TYPE_CHECKING:
    from bank.ledger.audit import AuditReport

log = logging.getLogger(__name__)

T = TypeVar("T")


def _is_empty(account: Account, holds: HoldBook) -> bool:
    """Whether `account` may close: the one place that decides it (the caller holds its
    lock). An account closes only with a balance of 0, nothing held, and no pending hold
    naming it as its target either (a hold must never leave a closed account with money
    on its way in or out; holds are added and settled only under both accounts' locks,
    so the caller's lock keeps this true until the close is staged)."""
    return account.balance == 0 and account.held == 0 and not holds.involving(account.id)


@dataclass(frozen=True, slots=True)
class BankStats:
    """A reading of the engine's counters (for progress bars and reports)."""

    seq: int
    committed_seq: int
    accepted: int
    rejected: int
    commits: int
    queue_depth: int
    queue_capacity: int
    queue_high_water: int
    keys_in_flight: int
    workers: int


def _check_int(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise InvalidCommand(f"{what} must be an int from {low} to {high} (got {value!r})")
    return value


def _check_timeout(timeout: object) -> float | None:
    """A `timeout=` argument: None or a real number >= 0 (not a bool).

    `inf`, and anything past `threading.TIMEOUT_MAX` (where a wait would raise
    `OverflowError`), means no limit, like None.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidCommand(f"timeout must be None or a number of seconds >= 0 (got {timeout!r})")
    try:
        seconds = float(timeout)
    except OverflowError:  # an int too large for a float: longer than any wait
        seconds = math.inf
    if math.isnan(seconds) or seconds < 0:
        raise InvalidCommand(f"timeout must be None or a number of seconds >= 0 (got {timeout!r})")
    return None if seconds > threading.TIMEOUT_MAX else seconds


def _check_wait(wait_s: object) -> float:
    """A `wait_s=` argument: a finite number of seconds >= 0 (not a bool)."""
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)):
        raise InvalidCommand(f"wait_s must be a number of seconds >= 0 (got {wait_s!r})")
    try:
        seconds = float(wait_s)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidCommand(f"wait_s must be a finite number of seconds >= 0 (got {wait_s!r})")
    return seconds


def _first_refusal(batch: Sequence[object], where: str) -> InvalidCommand:
    """The refusal of the first item `is_validated` refuses (the caller knows there is one)."""
    for i, command in enumerate(batch):
        if not is_validated(command):
            return refusal(command, f"{where}: item {i}")
    raise AssertionError("no refused item")


def _checked_batch(commands: object, where: str) -> list[BankCommand]:
    """A batch for `submit_batch`: 1 to `BATCH_OPS_MAX` validated commands, else
    `InvalidCommand` (an iterator is read no further than one past the bound)."""
    if isinstance(commands, BaseModel | str | bytes | Mapping) or not isinstance(
        commands, Iterable
    ):
        one = ": use submit() for one" if isinstance(commands, BaseModel) else ""
        raise InvalidCommand(
            f"{where} takes a list (or any iterable) of commands "
            f"(got {type(commands).__name__}){one}"
        )
    batch: list[BankCommand] = list(islice(commands, BATCH_OPS_MAX + 1))
    if not batch:
        raise InvalidCommand(
            f"{where}: the batch is empty (it takes 1 to {BATCH_OPS_MAX:,} commands)"
        )
    if len(batch) > BATCH_OPS_MAX:
        raise InvalidCommand(
            f"{where}: more than BATCH_OPS_MAX ({BATCH_OPS_MAX:,}) commands: split it into batches"
        )
    if not all(map(is_validated, batch)):
        raise _first_refusal(batch, where)
    return batch


def _open_failure(db: object, exc: BaseException) -> BankError:
    """The specific error for a `db` that names no openable ledger (raised outside the driver).

    A path the OS refuses (too long, a NUL byte): `CannotOpenLedger`; a URL of a driver
    that is not installed or not known: `UnsupportedLedgerUrl`; not a path at all:
    `InvalidCommand`. Each names what it was given.
    """
    shown = repr(db) if not isinstance(db, str | os.PathLike | URL) else str(db)
    shown = repr(shown) if any(c < " " for c in shown) else shown  # a NUL, say, shown as \x00
    shown = shown if len(shown) <= 200 else f"{shown[:197]}..."
    if isinstance(exc, ImportError | ArgumentError):
        return UnsupportedLedgerUrl(f"{shown}: no driver for this URL ({exc})")
    if isinstance(exc, OSError):
        return CannotOpenLedger(f"{shown}: {exc.strerror or exc}")
    if isinstance(exc, TypeError):
        return InvalidCommand(f"db must be a path or an SQLAlchemy URL (got {shown})")
    return CannotOpenLedger(f"{shown}: not a usable path or URL ({exc})")


class _Lifecycle:
    """Ends a bank's threads and, only once the last has ended, releases its ledger.

    Shared by `Bank.close()`, the `Bank`'s finalizer (a forgotten bank that is
    collected) and an `atexit` hook, so it holds no reference to the `Bank`
    itself. The bank's threads are daemons: exit first waits for the program's
    own threads (which may still use the bank), then the `atexit` hook closes
    every bank still open, which drains the queue and commits and answers every
    accepted job before the interpreter stops. Shutdown runs in
    dependency order, each step started by the thread it waits for: the closed
    buffer lets the workers drain and exit; the last worker to exit stops the
    writer; the writer, after answering its last record, releases the flock and
    the engine. So the lock is never released while a bank thread is alive, even
    when `close()` gives up waiting on a stuck done-callback.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False  # under `lock`
        self.released = threading.Event()  # every bank thread is gone; the ledger is free
        self.buffer: BoundedBuffer[Job] | None = None
        self.workers: list[Worker] = []
        self.writer: LedgerWriter | None = None
        self.timer: ExpiryTimer | None = None
        self.release: Callable[[], None] = lambda: None
        self._live_workers = 0
        self._readers = 0  # callers reading the ledger through the engine (under `lock`)
        self._no_readers = threading.Condition(self.lock)  # notified by the last reader out
        #: Set in a forked child: the threads (and the ledger) stay with the parent.
        self.forked = False

    def start(
        self,
        buffer: BoundedBuffer[Job],
        workers: list[Worker],
        writer: LedgerWriter,
        release: Callable[[], None],
        timer: ExpiryTimer | None = None,
    ) -> None:
        """Take charge of the threads (not started yet) and of releasing the ledger.

        The expiry `timer` stages rows like a worker: it counts as one, so the writer
        stops only once it has ended too (`close()` stops it with the intake)."""
        self.buffer, self.workers, self.writer, self.release = buffer, workers, writer, release
        self.timer = timer
        stagers: list[Worker | ExpiryTimer] = [*workers, *([timer] if timer else [])]
        self._live_workers = len(stagers)
        for worker in stagers:
            worker.on_exit = self._worker_exited
        writer.on_exit = self._writer_exited
        with _OPEN_LOCK:
            _OPEN.add(self)
        try:
            writer.start()
        except BaseException:  # nothing runs (no thread could be made): release now
            self._writer_exited()
            raise
        started = 0
        try:
            for worker in stagers:
                worker.start()
                started += 1
        finally:
            for _ in range(len(stagers) - started):
                self._worker_exited()  # never ran; the last one out still stops the writer

    def refusal(self) -> BankClosed:
        """What a call gets once `closed` is set (read under `lock`)."""
        if self.forked:
            return BankClosed(
                "this bank belongs to the process that opened it (this is a forked "
                "child): open the ledger again here once that process has closed it"
            )
        return BankClosed("the bank is closed")

    def stage_here(self) -> bool:
        """Count the calling thread as a stager while it applies a command itself (a
        blocking call, `Bank._call`); `staged_here()` ends it. Raises `BankClosed` once
        `close()` began; False (queue the command instead) if no stager is left.

        The writer stops once the last stager is done, so a caller counted here stages
        before it stops: its record is committed and answered like a worker's.
        """
        with self.lock:
            if self.closed:
                raise self.refusal()
            if not self._live_workers:  # only after the workers died of a bug
                return False
            self._live_workers += 1
            return True

    def staged_here(self) -> None:
        """The caller counted by `stage_here()` has staged (or refused) its command."""
        self._worker_exited()

    def _worker_exited(self) -> None:
        with self.lock:
            self._live_workers -= 1
            last = self._live_workers == 0
        if last and self.writer is not None:
            self.writer.stop()  # nothing can stage transfers any more

    def _writer_exited(self) -> None:
        with self.lock:  # `closed` is set: no reader can start; wait for the ones inside
            while self._readers:
                self._no_readers.wait()
        try:
            self.release()
        finally:
            self.released.set()
            with _OPEN_LOCK:
                _OPEN.discard(self)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Read the ledger on the caller's thread; raises `BankClosed` once `close()` began.

        Checking "open" and then connecting is not enough: the ledger could be released
        in between, and the engine would open a new connection to a file this bank no
        longer owns and keep it open after `close()` returned. The release waits for
        every reader inside (a read is one bounded query).
        """
        with self.lock:
            if self.closed:
                raise BankClosed("the bank is closed")
            self._readers += 1
        try:
            yield
        finally:
            with self.lock:
                self._readers -= 1
                if not self._readers:
                    self._no_readers.notify_all()

    def on_bank_thread(self) -> bool:
        """True if the caller is one of the bank's threads."""
        me = threading.current_thread()
        return me is self.writer or me is self.timer or me in self.workers

    def collected(self) -> None:
        """The `Bank` was garbage-collected unclosed: close it from a thread of its own.

        A collection can run on any thread at any allocation, also inside one of
        the bank's critical sections (a worker in the buffer's lock): closing
        inline could take a lock that thread already holds.
        """
        threading.Thread(target=self.close, name="bank-closer", daemon=True).start()

    def close(self, wait_s: float = JOIN_WAIT_S_MAX) -> None:
        """Stop intake and wait (up to `wait_s`) for every thread to finish; idempotent.

        Every caller waits for the same thing (the ledger released by the last
        thread), so concurrent closers all return once the bank is shut. On a bank
        thread it only starts the shutdown, since a thread cannot wait for itself
        (`Bank.close()` refuses there, and a collected bank closes on a thread of its own).
        """
        if self.forked:  # a forked child: nothing of this bank runs here to wait for
            return
        with self.lock:
            first = not self.closed
            self.closed = True
        if self.buffer is None:  # never started
            return
        if first:
            self.buffer.close()  # queued jobs still drain; blocked submitters get BankClosed
            if self.timer is not None:
                self.timer.stop()
        if self.on_bank_thread():
            return
        if not self.released.wait(wait_s):
            stuck = [t.name for t in (*self.workers, self.timer, self.writer) if t and t.is_alive()]
            log.error(
                "threads still running %s s after close (a slow done-callback?): %s; "
                "the ledger stays locked until the last of them ends",
                wait_s,
                stuck,
            )
            return
        for thread in (*self.workers, self.timer, self.writer):
            if thread is not None and thread.ident is not None:  # started
                thread.join()  # past its last step (the release): ends at once


#: Banks whose threads run, closed by `_close_open_banks` at exit (removed at release).
_OPEN: set[_Lifecycle] = set()
_OPEN_LOCK = threading.Lock()


@atexit.register
def _close_open_banks() -> None:
    """Close every bank the program forgot: accepted work is committed and answered.

    `atexit` runs after the interpreter has joined the program's non-daemon threads
    (which may still have been using a bank) and before it stops the daemon ones.
    """
    with _OPEN_LOCK:
        lives = list(_OPEN)
    for life in lives:
        try:
            life.close()
        except Exception:
            log.exception("closing a forgotten bank at exit failed")


def _after_fork_in_child() -> None:
    """A forked child has none of a bank's threads: its banks are closed there at once.

    Otherwise a call in the child would queue work no thread takes (a wait that never
    ends), and `close()` (at exit too) would wait 60 s for threads that are not there.
    Locks held by a parent thread at the fork are replaced: nobody here will free them.
    """
    global _OPEN_LOCK  # noqa: PLW0603 (replaced once, in the child, before any thread runs)
    _OPEN_LOCK = threading.Lock()
    for life in _OPEN:
        life.lock = threading.Lock()
        life.closed = True
        life.forked = True
    _OPEN.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _releaser(engine: Engine | None, owner: OwnerLock | None) -> Callable[[], None]:
    """What frees a ledger, without a reference to its `Bank` (so a forgotten one is collected)."""

    def release() -> None:
        if engine is not None:
            engine.dispose()
        if owner is not None:
            owner.release()

    return release


class Bank:
    """A bank on a durable ledger. Use `Bank.open(...)`; every method is thread-safe."""

    def __init__(
        self,
        db: str | os.PathLike[str] | URL,
        *,
        workers: int = WORKERS_DEFAULT,
        queue_capacity: int = QUEUE_CAPACITY_DEFAULT,
        durability: Durability | str = Durability.FULL,
        commit_ops_max: int = COMMIT_BATCH_OPS_MAX,
        wait_s: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        _check_int(workers, "workers", 1, WORKERS_MAX)
        if clock is not None and not callable(getattr(clock, "now_us", None)):
            raise InvalidCommand(
                f"clock must have now_us() and subscribe(wake) (bank.clock.Clock; got {clock!r})"
            )
        self._clock: Clock = clock if clock is not None else SystemClock()
        wait_s = _check_wait(wait_s)
        _check_int(queue_capacity, "queue_capacity", 1, QUEUE_CAPACITY_MAX)
        _check_int(commit_ops_max, "commit_ops_max", 1, 1_000_000)
        try:
            self._durability = Durability(durability)
        except ValueError:
            raise InvalidCommand(
                f"durability must be 'full' or 'normal' (got {durability!r})"
            ) from None
        self._life = _Lifecycle()
        self._owner: OwnerLock | None = None
        self._engine: Engine | None = None
        try:
            self._open_ledger(ledger_url(db), wait_s)
        except BankError:
            raise
        except (OSError, ValueError, TypeError, ImportError, ArgumentError) as exc:
            raise _open_failure(db, exc) from None
        assert self._engine is not None
        self._buffer: BoundedBuffer[Job] = BoundedBuffer(queue_capacity)
        self._workers: list[Worker] = [
            Worker(
                i,
                self._buffer,
                self._accounts,
                self._writer,
                self._claims,
                self._engine,
                holds=self._holds,
            )
            for i in range(workers)
        ]
        timer = ExpiryTimer(self._accounts, self._holds, self._writer, self._clock)
        # The release must not hold the Bank (a bound method would): see `_Lifecycle`.
        release = _releaser(self._engine, self._owner)
        try:
            self._life.start(self._buffer, self._workers, self._writer, release, timer)
        except Exception as exc:  # e.g. no thread could be made: shut what did start
            self._life.close()
            raise LedgerUnavailable(
                f"the bank's threads could not start ({type(exc).__name__}: {exc})"
            ) from exc
        # A forgotten bank is closed when it is collected, or at exit (`_OPEN`).
        weakref.finalize(self, self._life.collected).atexit = False
        # Set by the writer in every case, failure included; bounded all the same.
        started = self._writer.ready.wait(JOIN_WAIT_S_MAX)
        failure = self._writer.failure
        if failure is not None or not started:
            self._life.close()
            why = failure if failure is not None else f"not ready within {JOIN_WAIT_S_MAX} s"
            raise LedgerUnavailable(f"the ledger writer could not start: {why}") from failure

    def _open_ledger(self, url: URL, wait_s: float) -> None:
        """Lock, judge, create or migrate, and recover the ledger at `url`, through its backend.

        Every failure is a specific `BankError` naming the ledger (`backend.where`), and
        leaves nothing behind: no lock, no connection, no half-created ledger.
        """
        backend = backend_for(url)
        self._backend: Backend = backend
        self._url = backend.url
        self._path = backend.path
        self._where = backend.where
        try:
            self._owner = backend.acquire(create=True, wait_s=wait_s)
        except Exception as exc:
            raise self._open_error(exc) from None
        owner = self._owner
        try:
            backend.preflight(owner)
            self._engine = backend.create_engine(self._durability, owner)
            self.revision = migrate.upgrade_to_head(self._engine, self._where)
            missing = migrate.missing_tables(self._engine)
            if missing:
                raise LedgerCorrupt(
                    f"{self._where}: the ledger's table(s) {', '.join(missing)} are missing "
                    "(dropped by hand?); run `bank audit`"
                )
            backend.check_writable(self._engine)
            self._recover()
        except BaseException as exc:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
            try:
                backend.discard_created(owner)
            finally:
                self._release_resources()
            if not isinstance(exc, Exception):
                raise
            raise self._open_error(exc) from None

    def _open_error(self, exc: Exception) -> Exception:
        """`exc` as the error `Bank.open` raises: a `BankError` as is, a driver's error as the
        backend names it, anything else unchanged (`__init__` classifies OSError & co)."""
        if isinstance(exc, BankError):
            return exc
        return self._backend.open_error(exc) or exc

    @classmethod
    def open(
        cls,
        db: str | os.PathLike[str] | URL,
        *,
        workers: int = WORKERS_DEFAULT,
        queue_capacity: int = QUEUE_CAPACITY_DEFAULT,
        durability: Durability | str = Durability.FULL,
        commit_ops_max: int = COMMIT_BATCH_OPS_MAX,
        wait_s: float = 0.0,
        clock: Clock | None = None,
    ) -> Bank:
        """Open (creating or migrating) the ledger at `db` and start the bank's threads.

        `durability="full"` (default) fsyncs every group commit before answering;
        `"normal"` survives a process crash but not a power loss. Raises
        `NotALedger` / `LedgerVersionError` for files it must not touch,
        `LedgerBusy` if another `Bank` has the ledger open (with `wait_s` > 0, after
        waiting up to that many seconds for it to close or die: a hot standby),
        `LedgerCorrupt` if the ledger's stored state disagrees with its rows (it is left
        as it was).

        `clock` (`bank.clock.Clock`, default the system clock) stamps every row and
        times every hold's expiry: tests pass a `bank.clock.ManualClock` and advance it.
        """
        return cls(
            db,
            workers=workers,
            queue_capacity=queue_capacity,
            durability=durability,
            commit_ops_max=commit_ops_max,
            wait_s=wait_s,
            clock=clock,
        )

    def _recover(self) -> None:
        """Rebuild in-memory state from the last commit (a crash leaves a prefix of seq).

        Raises `LedgerCorrupt` if the stored balances, limits or chain heads disagree
        with the ledger's rows (see `bank.ledger.verify`): nothing is acknowledged on
        top of an edited ledger.
        """
        assert self._engine is not None
        with self._engine.connect() as conn:  # one read transaction for all of it
            report = verify.verify_ledger(conn)
            if not report.ok:
                raise LedgerCorrupt(verify.describe(report, self._where, OPEN_PROBLEMS_SHOWN_MAX))
            rows = store.load_accounts(conn)
            closed = store.closed_accounts(conn)
            seq, head, event_seq, event_head = store.chain_heads(conn)
            pending = holds_store.pending_holds(conn)
            last_ts_us = holds_store.last_ts_us(conn)
        assert rows and rows[0].id == CASH_ACCOUNT_ID  # verified above
        self._registry_lock = lockcheck.lock("registry")
        self._accounts: dict[int, Account] = {
            r.id: Account(r.id, r.name, r.overdraft_limit, r.balance) for r in rows
        }
        for account_id in closed:  # closed for good (its 'close' event is chained)
            self._accounts[account_id].close()
        self._names: dict[str, int] = {r.name: r.id for r in rows}
        # Pending holds, with their deadlines: the timer's first look expires the ones
        # whose time ran out while the bank was closed.
        self._holds = HoldBook()
        for hold in pending:
            self._holds.add(PendingHold(*hold))
            self._accounts[hold.source]._held += hold.amount
        self._next_id = rows[-1].id + 1
        self._claims = KeyClaims()
        engine, backend = self._engine, self._backend
        self._writer = LedgerWriter(
            lambda: backend.batch_writer(engine),
            self._claims,
            seq=seq,
            head_hash=head,
            event_seq=event_seq,
            event_head_hash=event_head,
            owner=self._owner,
            now_us=self._clock.now_us,
            last_ts_us=last_ts_us,
        )
        assert self._owner is not None
        self._owner.watch(self._writer.lose)

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Bank:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Bank {self._where} {state}>"

    @property
    def path(self) -> Path | None:
        """The ledger file (None for a non-file URL)."""
        return self._path

    @property
    def closed(self) -> bool:
        """True once `close()` has begun."""
        with self._life.lock:
            return self._life.closed

    def close(self) -> None:
        """Stop accepting work, finish every accepted job, flush the ledger, join all threads.

        Idempotent; concurrent callers all return once the bank is fully closed. It
        waits up to `JOIN_WAIT_S_MAX` for a done-callback that is still running;
        past that it returns and the ledger stays locked (`LedgerBusy` for others)
        until the last bank thread has ended. Raises `CloseFromBankThread` on one of
        the bank's own threads (a done-callback), which it would wait for.
        """
        if self._life.on_bank_thread():
            raise CloseFromBankThread(
                "close() cannot run on the bank's own threads (it was called from a "
                "future's done-callback): call it from another thread"
            )
        self._life.close(JOIN_WAIT_S_MAX)

    def _release_resources(self) -> None:
        """Dispose the engine and drop the flock: only once no bank thread runs."""
        _releaser(self._engine, self._owner)()

    def _check_open(self) -> None:
        self._check_not_closed()
        self._check_broken()

    def _check_broken(self) -> None:
        if self._writer.broken.is_set():  # lock-free: this runs on every submit
            failure = self._writer.failure
            assert failure is not None
            raise failure

    def _check_not_closed(self) -> None:
        with self._life.lock:
            if self._life.closed:
                raise self._life.refusal()

    def _check_may_wait(self, call: str) -> None:
        """Refuse a waiting call on a bank thread (a done-callback runs on the writer):
        it would wait for the very thread it blocks, forever, and wedge the bank."""
        if self._life.on_bank_thread():
            raise WaitOnBankThread(
                f"{call}() waits for the ledger and was called on the bank's own thread (a "
                "future's done-callback): use submit() there, or call it from another thread"
            )

    # -- accounts ----------------------------------------------------------------------

    def open_account(
        self, name: str, overdraft_limit: int = 0, *, exist_ok: bool = False
    ) -> Account:
        """Open a customer account; returns it once its opening is durable.

        With `exist_ok=True`, an account of that name that exists is returned instead
        (once its opening is durable) if its overdraft limit is `overdraft_limit`; it may
        be closed (`.closed`). Raises `InvalidCommand` for a bad name, limit or
        `exist_ok` (a bool), `AccountNameTaken` (the name exists: without `exist_ok`, or
        with another limit).
        """
        spec = AccountSpec(name=name, overdraft_limit=overdraft_limit)
        if type(exist_ok) is not bool:
            raise InvalidCommand(f"open_account.exist_ok must be a bool (got {exist_ok!r})")
        self._check_open()
        self._check_may_wait("open_account")
        future: Future[int] = Future()
        with self._registry_lock:
            taken = self._names.get(spec.name)
            if taken is None:
                account = Account(self._next_id, spec.name, spec.overdraft_limit)
                future.set_running_or_notify_cancel()
                # Staged before it becomes visible, so no transfer reaches the ledger first.
                self._writer.stage_account_event(
                    "open", account.id, account.name, account.overdraft_limit, future
                )
                self._accounts[account.id] = account
                self._names[account.name] = account.id
                self._next_id += 1
            else:
                position, _ = self._writer.position()
        if taken is not None:
            # The opening it collides with may still be on its way to disk.
            self._writer.wait_for(position)
            existing = self._accounts[taken]
            if exist_ok and existing.overdraft_limit == spec.overdraft_limit:
                return existing
            if exist_ok:
                raise AccountNameTaken(
                    f"an account named {spec.name!r} exists (id {taken}) with overdraft limit "
                    f"{existing.overdraft_limit}, not {spec.overdraft_limit}"
                )
            raise AccountNameTaken(f"an account named {spec.name!r} exists (id {taken})")
        future.result()
        return account

    def account_named(self, name: str) -> Account:
        """The account named `name` (`@cash` included); raises `AccountNotFound`, or
        `InvalidCommand` for a name that is not a str."""
        if type(name) is not str:
            raise InvalidCommand(f"account_named.name must be a str (got {name!r})")
        self._check_open()
        with self._registry_lock:
            account_id = self._names.get(name)
        if account_id is None:
            raise AccountNotFound(f"no account named {name!r}")
        return self._accounts[account_id]

    def close_account(self, account: int) -> Account:
        """Close a customer account; returns it (`.closed` True) once its closing is durable.

        Only an empty account closes (`_is_empty`: a balance of 0, nothing held, no pending
        hold naming it as source or target). The closing is a chained
        `account_events` row ('close'), staged under the account's lock: every transfer
        that touched it is before it in the ledger, and every later operation on it is
        refused with `AccountClosed` (a closed account stays in `accounts()`).
        Raises `AccountNotFound`, `InvalidCommand` (`@cash`, or an id that is not an int),
        `AccountNotEmpty`, `AccountClosed` (closed already).
        """
        found = self.account(account)
        if found.is_system:
            raise InvalidCommand("close_account.account: @cash never closes")
        self._check_may_wait("close_account")
        future: Future[int] = Future()
        future.set_running_or_notify_cancel()
        with found.lock:
            refusal: BankError | None = None
            if found.closed:
                refusal = AccountClosed(f"account {found.id} ({found.name!r}) is closed already")
            elif not _is_empty(found, self._holds):
                pending = len(self._holds.involving(found.id))
                refusal = AccountNotEmpty(
                    f"account {found.id} ({found.name!r}) has a balance of {found.balance}, "
                    f"{found.held} held and {pending} pending hold(s) naming it: only an "
                    "empty account closes (post or void its holds first)"
                )
            else:
                self._writer.stage_account_event(
                    "close", found.id, found.name, found.overdraft_limit, future
                )
                found.close()
            position, _ = self._writer.position()
        if refusal is not None:
            # Judged on a balance that may include operations still being committed.
            self._writer.wait_for(position)
            raise refusal
        future.result()
        return found

    def set_overdraft_limit(self, account: int, overdraft_limit: int) -> Account:
        """Change a customer account's overdraft limit (a chained event in the ledger).

        Raises `InsufficientFunds` if the balance is already below the new floor.
        """
        spec = LimitSpec(account=account, overdraft_limit=overdraft_limit)
        self._check_open()
        self._check_may_wait("set_overdraft_limit")
        found = self.account(spec.account)
        if found.is_system:
            raise InvalidCommand("set_overdraft_limit.account: @cash has no overdraft limit to set")
        future: Future[int] = Future()
        future.set_running_or_notify_cancel()
        with found.lock:
            refusal: BankError | None
            if found.closed:  # nothing is chained after a close
                refusal = AccountClosed(f"account {found.id} ({found.name!r}) is closed")
                position, _ = self._writer.position()
            elif found.balance - found.held < -spec.overdraft_limit:
                held = f" ({found.held} held)" if found.held else ""
                refusal = InsufficientFunds(
                    f"account {found.id} has {found.balance}{held}: an overdraft limit "
                    f"of {spec.overdraft_limit} would leave it below its floor"
                )
                position, _ = self._writer.position()
            else:
                refusal = None
                self._writer.stage_account_event(
                    "limit", found.id, found.name, spec.overdraft_limit, future
                )
                found.set_overdraft_limit(spec.overdraft_limit)
        if refusal is not None:
            # Judged on a balance that may include operations still being committed.
            self._writer.wait_for(position)
            raise refusal
        future.result()
        return found

    def account(self, account: int) -> Account:
        """The account with this id (`0` is `@cash`); raises `AccountNotFound`."""
        if type(account) is not int:
            raise InvalidCommand(f"account id must be an int (got {account!r})")
        self._check_open()
        found = self._accounts.get(account)
        if found is None:
            raise AccountNotFound(f"account {account} does not exist")
        return found

    def accounts(self) -> list[Account]:
        """Every customer account (not `@cash`), by id."""
        self._check_open()
        with self._registry_lock:
            return [a for i, a in sorted(self._accounts.items()) if i != CASH_ACCOUNT_ID]

    # -- operations --------------------------------------------------------------------

    def deposit(
        self, account: int, amount: int, *, key: str | None = None, timeout: float | None = None
    ) -> Receipt:
        """Move `amount` from `@cash` into `account`; returns the receipt once durable."""
        self._check_may_wait("deposit")
        return self._call(Deposit(account=account, amount=amount, key=key), timeout)

    def withdraw(
        self, account: int, amount: int, *, key: str | None = None, timeout: float | None = None
    ) -> Receipt:
        """Move `amount` from `account` to `@cash`; raises `InsufficientFunds` past the limit."""
        self._check_may_wait("withdraw")
        return self._call(Withdrawal(account=account, amount=amount, key=key), timeout)

    def transfer(
        self,
        source: int,
        target: int,
        amount: int,
        *,
        key: str | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """Move `amount` from `source` to `target`; returns the receipt once durable."""
        self._check_may_wait("transfer")
        return self._call(Transfer(source=source, target=target, amount=amount, key=key), timeout)

    def _call(self, command: Transfer | Deposit | Withdrawal, timeout: float | None) -> Receipt:
        """Apply a command this bank built (so validated) and wait for its answer.

        Without a key, the caller's own thread applies it (`apply_move`: the accounts'
        locks, the move, the staged row) instead of queueing it for a worker: that
        hand-off, one thread waking another, was about a fifth of a blocking call's
        round trip, and two of its five context switches. Only while the queue has
        room: a full one holds the call back as before (back-pressure, `QueueFull`
        after `timeout`). A keyed command is queued, since claiming its key reads the
        ledger on a worker's connection.

        Never on the main thread: Python runs signal handlers there, so a Ctrl-C (a
        `KeyboardInterrupt`) could land between the move and its staged row (balances
        changed with no row, a seq skipped) or inside the stager count (the writer
        never stops, `close()` waits), and a SIGTERM handler that closes the bank would
        wait for the very call it interrupted. The main thread's call is queued, and a
        signal there lands only before the hand-off or in the wait for the answer.

        A `Reply` (two locks) instead of a `Future`: the caller blocks on a lock the
        ledger writer releases, the cheapest wake-up there is, and nothing else is made.
        """
        if timeout is not None:
            timeout = _check_timeout(timeout)
        reply = Reply()
        # `stage_here()` first: it refuses a closed bank (a forked child's too) before
        # `has_room()` takes the queue's mutex, which a parent thread may hold forever.
        here = (
            command.key is None
            and threading.current_thread() is not threading.main_thread()
            and self._life.stage_here()
        )
        if here:
            try:
                here = self._buffer.has_room()
                if here:
                    self._check_broken()
                    apply_move(command, reply, self._accounts, self._writer)
            finally:
                self._life.staged_here()
        if not here:
            self._check_open()
            self._buffer.put(Job([command], (reply,)), 1, timeout)
        result: Receipt = reply.wait()
        return result

    def hold(
        self,
        source: int,
        target: int,
        amount: int,
        *,
        key: str | None = None,
        expires_s: float | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """Reserve `amount` of `source` for `target` (receipt kind "hold"; its `seq` names
        the hold); raises `InsufficientFunds` beyond `source`'s `available`.

        With `expires_s`, the engine expires it (an "expire" row) if it is neither
        posted nor voided within that many seconds."""
        self._check_may_wait("hold")
        return self.submit(
            Hold(source=source, target=target, amount=amount, key=key, expires_s=expires_s),
            timeout=timeout,
        ).result()

    def post(
        self,
        hold: int,
        amount: int | None = None,
        *,
        key: str | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """Move `amount` (default: all) of hold `hold` to its target, releasing the rest
        (receipt kind "post"). Raises `HoldNotFound`, `HoldNotPending` (posted, voided
        or expired), `PostExceedsHold`."""
        self._check_may_wait("post")
        return self.submit(Post(hold=hold, amount=amount, key=key), timeout=timeout).result()

    def void(self, hold: int, *, key: str | None = None, timeout: float | None = None) -> Receipt:
        """Release all of hold `hold` (receipt kind "void"); raises like `post`."""
        self._check_may_wait("void")
        return self.submit(Void(hold=hold, key=key), timeout=timeout).result()

    def submit_linked(
        self, commands: Iterable[BankCommand], *, timeout: float | None = None
    ) -> Future[list[Receipt]]:
        """Queue an atomic group: every command applied, in order, or none.

        The future gets the receipts (consecutive seqs, each row carrying the group's
        `link_first` and `link_count`), or `LinkedCommandFailed` (`.index`, `.error`:
        the first command refused) and then nothing of the group is in the ledger or
        in memory. 1 to `GROUP_COMMANDS_MAX` (8,190) commands with distinct keys; an
        invalid item raises `InvalidCommand` here, naming it, and nothing is queued.
        A group whose keys were all used by this same committed group gets its
        original receipts; a key used by anything else fails the group
        (`LinkedCommandFailed` wrapping `IdempotencyConflict`).
        """
        group = self._check_group(commands)
        if timeout is not None:
            timeout = _check_timeout(timeout)
        self._check_open()
        future: Future[list[Receipt]] = Future()
        weight = min(len(group), self._buffer.capacity)
        job = Job([LinkedGroup(group)], [future])
        self._buffer.put(job, weight, timeout)
        return future

    def transact(
        self, commands: Iterable[BankCommand], *, timeout: float | None = None
    ) -> list[Receipt]:
        """`submit_linked(...)`, waiting for its answer: the receipts, or it raises
        `LinkedCommandFailed`."""
        self._check_may_wait("transact")
        return self.submit_linked(commands, timeout=timeout).result()

    def _check_group(self, commands: Iterable[BankCommand]) -> list[BankCommand]:
        if isinstance(commands, str | bytes | BaseModel) or not isinstance(commands, Iterable):
            raise InvalidCommand(
                f"submit_linked takes a list of commands (got {type(commands).__name__})"
            )
        group = list(commands)
        if not 1 <= len(group) <= GROUP_COMMANDS_MAX:
            raise InvalidCommand(
                f"submit_linked: a group holds 1 to {GROUP_COMMANDS_MAX} commands "
                f"(got {len(group)})"
            )
        keys: dict[str, int] = {}
        for i, command in enumerate(group):
            if not is_validated(command):
                raise refusal(command, f"submit_linked: item {i}")
            key = command.key
            if key is not None:
                if key in keys:
                    raise InvalidCommand(
                        f"submit_linked: item {i}: key {key!r} is also item {keys[key]}'s "
                        "(each command of a group needs its own key)"
                    )
                keys[key] = i
        return group

    def submit(self, command: BankCommand, *, timeout: float | None = None) -> Future[Receipt]:
        """Queue one command; its future gets the `Receipt` or the rejection.

        Blocks while the queue is full; with `timeout` raises `QueueFull` instead.
        `timeout` is None or a number of seconds >= 0 (`inf`: no limit); anything
        else (`nan`, a negative number, a bool, a str) raises `InvalidCommand`.
        """
        if not is_validated(command):  # model_construct, model_copy, wrong type: refused
            raise refusal(command, "submit")
        if timeout is not None:
            timeout = _check_timeout(timeout)
        self._check_open()
        future: Future[Receipt] = EngineFuture()
        self._buffer.put(Job([command], (future,)), 1, timeout)
        return future

    def submit_many(
        self, commands: Iterable[BankCommand], *, timeout: float | None = None
    ) -> list[Future[Receipt]]:
        """Queue many commands, one hand-off per chunk; returns their futures in order.

        `timeout` bounds the whole call: if not even the first chunk fits in time it
        raises `QueueFull` and nothing is queued; if a later chunk does not fit, the
        futures of the commands left out carry `QueueFull` (every future is answered).
        """
        batch = list(commands)
        if not all(map(is_validated, batch)):  # then name the first bad one; none is queued
            raise _first_refusal(batch, "submit_many")
        if timeout is not None:
            timeout = _check_timeout(timeout)
        self._check_open()
        futures: list[Future[Receipt]] = [EngineFuture() for _ in batch]
        self._put_chunks(batch, futures, timeout)
        return futures

    def submit_batch(
        self, commands: Iterable[BankCommand], *, timeout: float | None = None
    ) -> Future[list[Outcome]]:
        """Queue a batch of 1 to `BATCH_OPS_MAX` commands; ONE future gets every outcome.

        The future's result is a list with one element per command, in order: its
        `Receipt` or its refusal (the `BankError` object, not raised). A refusal never
        fails the batch; each element means what the outcome model says of it (a
        `LedgerUnavailable` element: that command was in flight when the ledger broke,
        its outcome unknown). Validation, keys and durability are `submit`'s: the
        list comes only once every command in it is answered, so once its receipts
        are durable. A key used twice in one batch is applied once; the later command
        gets the same receipt (or `IdempotencyConflict`).

        The batch counts against the queue's capacity command by command, handed
        over in chunks: a batch larger than the queue blocks until the workers have
        made room for each chunk (back-pressure). `timeout` bounds the whole call: if
        not even the first chunk fits in time, `QueueFull` is raised and nothing is
        queued; the commands of a later chunk that does not fit (or that meets a
        `close()`) get `QueueFull` (or `BankClosed`) elements, and the rest go on.
        `cancel()` on the future succeeds only before a worker has started the batch,
        and then none of it is applied.

        Raises `InvalidCommand` (nothing queued) for an empty batch, one over
        `BATCH_OPS_MAX`, a single command instead of a batch, or an item that is not
        a validated command (the message names its index).
        """
        batch = _checked_batch(commands, "submit_batch")
        if timeout is not None:
            timeout = _check_timeout(timeout)
        self._check_open()
        answer = BatchAnswer(len(batch))
        self._put_chunks(batch, answer.slots(), timeout)
        return answer.future

    def execute(
        self, commands: Iterable[BankCommand], *, timeout: float | None = None
    ) -> list[Outcome]:
        """`submit_batch(commands, timeout=timeout).result()`: every outcome, in order.

        Refusals are elements of the list, not raised; it raises what `submit_batch`
        raises, and `WaitOnBankThread` on a bank thread (a done-callback).
        """
        self._check_may_wait("execute")
        return self.submit_batch(commands, timeout=timeout).result()

    def _put_chunks(
        self, batch: list[BankCommand], answers: Sequence[Answer], timeout: float | None
    ) -> None:
        """Hand `batch` to the queue a chunk at a time, waiting for room for each.

        If the first chunk does not fit within `timeout` (or the bank closes) that
        error is raised and nothing is queued; for a later chunk, the commands left
        out are answered with it instead (each one named by its index).
        """
        chunk = min(SUBMIT_CHUNK_OPS_MAX, self._buffer.capacity)
        put = self._buffer.put
        if len(batch) <= chunk:  # the common case: one hand-off, no deadline to track
            put(Job(batch, answers), len(batch), timeout)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        for start in range(0, len(batch), chunk):
            stop = start + chunk
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            commands = batch[start:stop]
            try:
                put(Job(commands, answers[start:stop]), len(commands), remaining)
            except (QueueFull, BankClosed) as exc:
                if start == 0:
                    raise
                for index in range(start, len(batch)):
                    settle(
                        answers[index], error=type(exc)(f"{exc} (operation {index} of this batch)")
                    )
                break

    # -- reads -------------------------------------------------------------------------

    def balance(self, account: int, *, at_seq: int | None = None) -> int:
        """The account's balance once everything it reflects is durable; with `at_seq`,
        its balance right after transfer `at_seq` (0 before its first row), read from the
        ledger by key look-ups (the running balance of its last row at or before it:
        `postings`, revision 0007, and the few rows above its watermark).

        Raises `AccountNotFound`, `InvalidCommand` (an `at_seq` that is not an int from 0
        to 2**63 - 1), `SeqBeyondHead` (an `at_seq` past the last committed transfer).
        """
        found = self.account(account)
        if at_seq is not None:
            seq = store.check_seq(at_seq, "balance.at_seq")
            return self._read(
                lambda conn: store.committed_balance_at(conn, found.id, seq, self._where)
            )
        self._check_may_wait("balance")
        with found.lock:
            balance = found.balance
            position, _ = self._writer.position()
        self._writer.wait_for(position)
        return balance

    def snapshot(self) -> Snapshot:
        """All balances at one seq (every account locked at once, in id order), once durable."""
        self._check_open()
        self._check_may_wait("snapshot")
        with self._registry_lock, locked(self._accounts.values()) as ordered:
            balances = {a.id: a.balance for a in ordered}
            position, seq = self._writer.position()
        self._writer.wait_for(position)
        return Snapshot(seq, balances)

    def find(self, key: str) -> Receipt | None:
        """The receipt of the operation with idempotency key `key`, if one was accepted."""
        check_key(key, "find")
        self._check_open()
        # An operation with this key in flight is answered first, so that `find`
        # never reports "no such key" for an operation that was already accepted.
        # The claim is released just before the answer, once the row is committed;
        # the wait ends then, at close() (`BankClosed`) or at its deadline (`KeyInFlight`).
        if self._claims.holder(key) is not None:
            self._claims.wait_released(key, KEY_WAIT_S_MAX)
        assert self._engine is not None
        with self._life.reading(), self._engine.connect() as conn:
            return store.find_receipts(conn, [key]).get(key)

    def history(
        self, account: int, *, after_seq: int = 0, limit: int = HISTORY_LIMIT_DEFAULT
    ) -> list[Receipt]:
        """One page of the account's committed transfers: up to `limit` receipts with seq
        greater than `after_seq`, ascending (pass the last one's seq for the next page;
        `iter_history` does that for you). Index range scans: a page costs the same at
        any depth of a long history.

        Raises `AccountNotFound`, `InvalidCommand` (an `after_seq` that is not an int
        from 0 to 2**63 - 1, a `limit` that is not an int from 1 to `HISTORY_LIMIT_MAX`).
        """
        found = self.account(account)
        after = store.check_seq(after_seq, "history.after_seq")
        size = store.check_limit(limit, "history.limit")
        return self._read(lambda conn: store.history_page(conn, found.id, after, size))

    def iter_history(
        self, account: int, *, after_seq: int = 0, page: int = HISTORY_LIMIT_DEFAULT
    ) -> Iterator[Receipt]:
        """Stream the account's whole committed history after `after_seq`, ascending, read
        `page` receipts at a time (one short read each, memory of one page; what `bank
        history` prints from). Rows are append-only, so the pages never skip or repeat a
        row; the stream ends at the head as it is when the last page is read.

        Arguments are checked at once (`AccountNotFound`, `InvalidCommand`, as `history`);
        a page read after `close()` raises `BankClosed`.
        """
        found = self.account(account)
        after = store.check_seq(after_seq, "iter_history.after_seq")
        size = store.check_limit(page, "iter_history.page")

        def read_page(after: int, limit: int) -> list[Receipt]:
            return self._read(lambda conn: store.history_page(conn, found.id, after, limit))

        return store.iter_history(read_page, after, size)

    def _read(self, read: Callable[[Connection], T]) -> T:
        """`read` on one of the bank's connections, in one short read transaction; the
        release of the ledger at `close()` waits for it (`BankClosed` once it began)."""
        assert self._engine is not None
        with self._life.reading(), self._engine.connect() as conn:
            return read(conn)

    def stats(self) -> BankStats:
        """Counters of the queue and the ledger writer; raises `BankClosed` after `close()`."""
        self._check_not_closed()
        queue = self._buffer.stats()
        writer = self._writer.stats()
        return BankStats(
            seq=writer.seq,
            committed_seq=writer.committed_seq,
            accepted=writer.rows,
            rejected=writer.rejected,
            commits=writer.commits,
            queue_depth=queue.depth,
            queue_capacity=queue.capacity,
            queue_high_water=queue.high_water,
            keys_in_flight=len(self._claims),
            workers=len(self._workers),
        )

    def audit(self) -> AuditReport:
        """Verify the ledger read-only (see `bank.ledger.audit`)."""
        self._check_open()
        from bank.ledger.audit import audit_ledger

        assert self._owner is not None
        # The path may name another file by now (a symlink re-pointed, the ledger
        # renamed and another put in its place): auditing that would vouch for it.
        self._backend.check_still_held(self._owner)
        return audit_ledger(self._path if self._path is not None else self._backend.url)


__all__: Sequence[str] = ["Bank", "BankStats"]
