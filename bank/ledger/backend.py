"""The storage seam: what the engine, the writer's pipeline and the audit need of a ledger store.

Two implementations exist, `bank.ledger.sqlite` (an embedded file) and
`bank.ledger.postgres` (a server). Everything above this seam (sequencing, the
hash chains, the pipeline thread, the audit's rules, recovery) is written once
and is backend-independent; everything below it (SQL dialect details, locks,
durability settings, how rows are streamed) lives in one backend's folder.

`bank.ledger.backends.backend_for(url)` picks the implementation from the URL.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from bank.errors import BankError
from bank.ledger.audit_postings import FingerprintKeys, PostingsDifferences, PostingsSums
from bank.records import Receipt


class Durability(StrEnum):
    """How an acknowledged operation survives trouble (each backend says how it maps).

    FULL: every group commit is durable on disk before anyone is answered, so an
    acknowledged operation survives a power loss (SQLite: WAL + `synchronous=FULL`;
    PostgreSQL: `synchronous_commit=on` on a server with `fsync=on`).
    NORMAL: an acknowledged operation survives a crash of the bank's process, but a
    crash of the machine (SQLite) or of the server (PostgreSQL) may take the last
    commits back; the ledger stays consistent: a prefix survives.
    """

    FULL = "full"
    NORMAL = "normal"


# -- what one group commit writes ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountEventRow:
    """One row of `account_events` (an opening, kind 'open', or a limit change, 'limit')."""

    seq: int
    account_id: int
    kind: str
    name: str
    overdraft_limit: int
    transfer_seq: int
    ts_us: int
    hash: str


@dataclass(slots=True)
class WriteBatch:
    """Everything one transaction writes, in the order a backend must write it.

    Accounts first (this batch's transfers may reference them), then their events,
    then limit changes, then transfer rows (receipts are rows, in `Receipt` field
    order, followed by their running balances), then the batch's final balances.
    """

    new_accounts: list[AccountEventRow] = field(default_factory=list)  # kind 'open'
    events: list[AccountEventRow] = field(default_factory=list)  # all events, seq order
    limits: list[AccountEventRow] = field(default_factory=list)  # kind 'limit'
    transfers: list[Receipt] = field(default_factory=list)  # seq order
    #: (debit balance, credit balance) right after each transfer, in `transfers` order:
    #: the rows' `debit_balance` and `credit_balance` columns (revision 0005).
    running: list[tuple[int, int]] = field(default_factory=list)
    balances: dict[int, int] = field(default_factory=dict)  # account id -> final balance
    keyed: bool = False  # some transfer carries an idempotency key
    #: Some row carries hold_seq, expires_us, link_first or link_count (revision 0006);
    #: without, a backend may leave those columns out (NULL).
    extended: bool = False

    def __bool__(self) -> bool:
        return bool(self.events or self.transfers)


class BatchWriter(Protocol):
    """One connection that writes group commits; used only from the writer thread.

    `begin` + `write` + `commit` is one durable transaction; any of them may raise
    (the pipeline then fails the batch and stops the bank: the outcome of a commit
    that raised is unknown). `rollback` never raises.
    """

    def begin(self) -> None: ...
    def write(self, batch: WriteBatch) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


# -- the owner -----------------------------------------------------------------------------


class OwnerLock(Protocol):
    """Proof that this process is the ledger's one writer, held from open to close.

    SQLite: an flock on the file (cannot be lost while the process lives).
    PostgreSQL: a session advisory lock on a dedicated connection (a lease: it is
    lost with that connection, and `lost` then returns a reason; the bank stops).
    """

    def lost(self) -> str | None: ...

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Have `on_lost(reason)` called (once, from any thread) when the lock is lost, so
        that the bank stops at once instead of at its next commit. The pipeline also
        checks `lost()` before every commit. A lock that cannot be lost ignores it."""
        ...

    def release(self) -> None: ...


# -- reading -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotToken:
    """How another process reopens the same snapshot (picklable).

    `module` is the backend module whose `open_range_reader(token)` does it; `args` is
    what it needs (SQLite: the path, whether immutable, the fingerprint; PostgreSQL:
    the URL and the `pg_export_snapshot()` id).
    """

    module: str
    args: tuple[Any, ...]


class RangeReader(Protocol):
    """A worker's view of a snapshot: transfers by seq range, for the parallel hash check."""

    def hash_before(self, seq: int) -> object:
        """The stored hash of the transfer with the largest seq below `seq` (None: none)."""
        ...

    def transfer_rows(
        self, first_seq: int | None = None, last_seq: int | None = None
    ) -> Iterator[tuple[Any, ...]]: ...


#: `open_range_reader(token)` of a backend's snapshot module.
RangeReaderOpener = Callable[[SnapshotToken], AbstractContextManager[RangeReader]]


class LedgerSnapshot(Protocol):
    """One consistent, read-only view of a ledger; rows stream in seq (or id) order.

    Memory stays flat: every `*_rows` method streams from the store (SQLite: one
    read transaction; PostgreSQL: one REPEATABLE READ READ ONLY transaction with
    server-side cursors). Rows are plain tuples in the columns' declared order
    (the models' order) unless a method says otherwise. The audit's rules
    (`bank.ledger.audit_*`) are written once over these streams.
    """

    where: str
    #: The largest transfers seq this snapshot holds (0: none); workers read no further.
    pinned_max_seq: int

    def revision(self) -> str | None: ...
    def tables(self) -> set[str]: ...
    def transfer_rows(
        self, first_seq: int | None = None, last_seq: int | None = None
    ) -> Iterator[tuple[Any, ...]]: ...
    def account_event_rows(self) -> Iterator[tuple[Any, ...]]: ...
    def account_rows(self) -> Iterator[tuple[Any, ...]]: ...
    def chain_format_rows(self) -> Iterator[tuple[Any, ...]]:
        """`(chain, first_seq, version)` in (chain, first_seq) order."""
        ...

    # -- added for the audit (issue 10) --
    def revision_rows(self) -> list[object]:
        """Every `alembic_version.version_num` (a ledger has exactly one)."""
        ...

    def columns(self, table: str) -> set[str]:
        """The column names of `table` as the store has them."""
        ...

    def schema_differences(self, revision: str) -> list[Any]:
        """Each way the schema differs from what the migrations create up to `revision`
        (`bank.ledger.schema_ref.Difference`s: `.message`, `.expected`, `.found`)."""
        ...

    def matching_revisions(self) -> list[str]:
        """The revisions whose schema this one is exactly (to name a revision set back)."""
        ...

    def integrity_problems(self) -> list[str]:
        """Findings of the store's own consistency check (SQLite `integrity_check`: an
        index holding other rows than its table), empty when sound."""
        ...

    def type_problems(
        self, skip: Collection[str] = ()
    ) -> Iterator[tuple[str, str, object, str, object]]:
        """`(table, column, row key, stored type, value)` of every value whose type is not
        its column's (`bank.ledger.audit_checks.COLUMN_TYPES`), in table, key order;
        the tables in `skip` are not scanned."""
        ...

    def limit_event_rows(self) -> Iterator[tuple[Any, ...]]:
        """`(transfer_seq, account_id, kind, overdraft_limit)` of account_events in
        (transfer_seq, seq) order: the order the events took effect in."""
        ...

    def key_rows(self) -> Iterator[tuple[Any, ...]]:
        """`(key, seq)` of the transfers with a key, in (key, seq) order."""
        ...

    def hash_at(self, table: str, seq: int) -> object:
        """The stored hash of row `seq` of `table` (transfers, account_events), None if none."""
        ...

    def transfer_count(self) -> int: ...

    # -- added for revision 0007's postings (`bank.ledger.audit_postings`) --
    def postings_watermark_rows(self) -> list[tuple[object, object]]:
        """Every `(id, seq)` row of postings_upto (a sound ledger has exactly one)."""
        ...

    def postings_sums(self, watermark: int, keys: FingerprintKeys) -> PostingsSums:
        """The postings' and the transfers' figures for `watermark`, computed by the
        database on this snapshot (`bank.ledger.audit_postings.postings_sums`)."""
        ...

    def postings_differences(self, watermark: int, limit: int) -> PostingsDifferences:
        """The postings that differ from the transfers up to `watermark`, at most `limit`
        lost and `limit` extra (only asked for when the figures differ)."""
        ...

    def hash_before(self, seq: int) -> object:
        """As `RangeReader.hash_before`: the snapshot checks a range itself too."""
        ...

    def export_token(self) -> SnapshotToken | None:
        """How a worker process reads this same snapshot (None: it cannot)."""
        ...

    def stale(self) -> bool:
        """True if the store changed under a read that assumed it would not (SQLite's
        immutable mode): the results are void, audit again. Call at the end."""
        ...


# -- the backend ----------------------------------------------------------------------------


class Backend(Protocol):
    """One ledger location (a file or a server database) and how to store a ledger there."""

    #: "sqlite" or "postgresql".
    name: str
    #: The SQLAlchemy URL the engine connects with (passwords stay in it; show `where`).
    url: URL
    #: How messages name the ledger: a path, or the URL without its password.
    where: str
    #: The file, for a file-backed ledger (else None).
    path: Path | None

    def acquire(self, *, create: bool, wait_s: float) -> OwnerLock:
        """Become the ledger's one writer, or raise `LedgerBusy` (after `wait_s`)."""
        ...

    def preflight(self, lock: OwnerLock) -> str | None:
        """The ledger's revision (None: empty, a new ledger), or a `BankError` for a
        location that is not a ledger or one this version must not touch. Writes nothing."""
        ...

    def create_engine(self, durability: Durability, lock: OwnerLock) -> Engine:
        """The pooled engine of the bank's own connections (workers' reads, recovery)."""
        ...

    def check_writable(self, engine: Engine) -> None:
        """Raise a specific `BankError` if the ledger cannot take a commit (read-only, ...)."""
        ...

    def batch_writer(self, engine: Engine) -> BatchWriter:
        """The writer thread's connection."""
        ...

    def snapshot(self, *, after_stale: bool = False) -> AbstractContextManager[LedgerSnapshot]:
        """A read-only snapshot for the audit (never locks the writer out). `after_stale`:
        the previous snapshot said `stale()`; read through the store's locking this time."""
        ...

    def open_error(self, exc: BaseException) -> BankError | None:
        """The specific error for a driver exception at open, or None if it is not the driver's."""
        ...

    def check_still_held(self, lock: OwnerLock) -> None:
        """Raise `CannotAudit` if `where` no longer names the ledger `lock` holds (SQLite:
        the file renamed or replaced while the bank runs); before an audit of a running
        bank, which must not vouch for another ledger. A server database cannot move."""
        ...

    def discard_created(self, lock: OwnerLock) -> None:
        """Undo a ledger this open created and could not finish (SQLite: remove the file)."""
        ...
