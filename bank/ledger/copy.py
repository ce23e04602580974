"""`copy_ledger`: a ledger copied verbatim from one store to another (SQLite to PostgreSQL,
or back for a backup), then audited against the source's head.

Verbatim means every row as it is: same seqs, same hashes, same `chain_formats`.
Nothing is re-hashed or re-derived, so the copy ends where the source ends and the
audit of the copy, pinned to the source's head, proves both that the rows arrived
and that they still verify. The source is not audited first: if it was corrupt, that
audit of the copy says so (the same rules run on the same rows).

- The source is read through one read-only snapshot (`Backend.snapshot`), so a bank
  may keep writing it: the copy is then that snapshot's prefix of the ledger.
- The destination must be empty (a new file, or an empty database made with
  `createdb`). Its owner lock is held from before the first check to after the
  audit, so no bank writes it meanwhile; the schema is created and every row
  inserted in ONE transaction, so an interrupted or failed copy leaves it empty
  (a file this copy created is removed).
- `postings` and its watermark are derived data: not copied but rebuilt on the
  destination from its rows, in the same transaction (one sorted INSERT; W = the
  copy's head), so the copy's postings are right whatever the source's W was.
- Rows go in through SQLAlchemy Core (`insert(table)`, executemany in chunks), unless
  the destination's backend has a faster way of its own: a `bulk` module in its
  folder (`bank.ledger.<backend>.bulk.insert_rows`, e.g. PostgreSQL's COPY).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Connection, Table, delete, insert
from sqlalchemy.engine import URL

from bank.errors import (
    BankError,
    CannotAudit,
    CannotCopy,
    CannotOpenLedger,
    DestinationNotEmpty,
    InvalidExpectedHead,
    LedgerCorrupt,
    NotALedger,
)
from bank.ledger import migrate
from bank.ledger.audit import AuditReport, audit_ledger
from bank.ledger.backend import Backend, Durability, LedgerSnapshot, OwnerLock
from bank.ledger.backends import PACKAGES, backend_for, backend_module, ledger_url
from bank.ledger.chain import GENESIS
from bank.ledger.head import Head, parse_head
from bank.ledger.models import account_events, accounts, chain_formats, transfers
from bank.ledger.postings import rebuild_postings
from bank.limits import COPY_CHUNK_ROWS

__all__ = ["CopyReport", "copy_ledger"]

_log = logging.getLogger(__name__)

#: The tables copied, in an order the foreign keys allow (accounts before the rows naming them).
TABLES: Final = (accounts, account_events, transfers, chain_formats)

#: `insert_rows(conn, table, columns, rows) -> count` of a backend's `bulk` module.
BulkInsert = Callable[[Connection, Table, Sequence[str], Iterable[tuple[Any, ...]]], int]


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What `copy_ledger` did: rows copied per table, how long it took, both heads, and the
    audit of the copy (pinned to the source's head). `ok` iff the audit is clean and the
    copy ends where the source's snapshot ended."""

    source: str
    destination: str
    rows: dict[str, int]
    copy_s: float
    source_head: str
    audit: AuditReport

    @property
    def rows_total(self) -> int:
        return sum(self.rows.values())

    @property
    def rows_per_s(self) -> float:
        """Copy throughput, schema creation and commit included, audit excluded."""
        return self.rows_total / self.copy_s if self.copy_s > 0 else 0.0

    @property
    def destination_head(self) -> str:
        return self.audit.head

    @property
    def heads_match(self) -> bool:
        return self.destination_head == self.source_head

    @property
    def ok(self) -> bool:
        """True when the copy audits clean and has the source's head."""
        return self.audit.ok and self.heads_match

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (the audit's report included)."""
        return {
            "ok": self.ok,
            "source": self.source,
            "destination": self.destination,
            "rows": dict(self.rows),
            "rows_total": self.rows_total,
            "copy_s": round(self.copy_s, 6),
            "rows_per_s": round(self.rows_per_s, 1),
            "source_head": self.source_head,
            "destination_head": self.destination_head,
            "heads_match": self.heads_match,
            "audit": self.audit.as_dict(),
        }


def copy_ledger(src: str | os.PathLike[str] | URL, dst: str | os.PathLike[str] | URL) -> CopyReport:
    """Copy the ledger at `src` into the empty store at `dst` (paths or URLs, any backend),
    row for row, then audit the copy with `expect_head` = the source snapshot's head.

    Returns the `CopyReport` (check `.ok`: the audit found nothing and the heads match).
    Raises `CannotCopy` when the source is missing, not a ledger or not at the newest
    schema revision (`bank init --db SRC` upgrades it), when `src` and `dst` are the same
    ledger, or when the destination refused a row (the source breaks a constraint);
    `DestinationNotEmpty` for a destination holding a ledger or other tables;
    `LedgerBusy` when a bank has the destination open; `CannotOpenLedger` (and its
    kin) when the destination cannot be reached or written; `UnsupportedLedgerUrl`.
    On any failure, Ctrl-C included, the destination is left empty.
    """
    source = _backend(src)
    target = _backend(dst)
    _refuse_same(source, target)
    started = time.perf_counter()
    with _source_snapshot(source, after_stale=False) as snap:
        _check_source(snap, source.where)
        lock = target.acquire(create=True, wait_s=0)
        try:
            try:
                _check_empty(target, lock)
            except BaseException:
                target.discard_created(lock)  # e.g. the new file of a refused location
                raise
            copied = _copy_into(target, lock, snap)
            if copied is None:  # an immutable read saw the file change: read it again
                with _source_snapshot(source, after_stale=True) as again:
                    _check_source(again, source.where)
                    copied = _copy_into(target, lock, again)
            assert copied is not None, "a snapshot read through SQLite's locking is never stale"
            copy_s = time.perf_counter() - started
            # Still under the owner lock: no bank can have written the copy meanwhile.
            audit = _audit(dst, copied.head)
            report = CopyReport(
                source=source.where,
                destination=target.where,
                rows=copied.rows,
                copy_s=copy_s,
                source_head=str(copied.head),
                audit=audit,
            )
        finally:
            lock.release()
    return report


# -- checks before anything is written -------------------------------------------------------


def _backend(db: str | os.PathLike[str] | URL) -> Backend:
    try:
        return backend_for(ledger_url(db))
    except (TypeError, ValueError) as exc:  # not a path, a URL SQLAlchemy cannot parse
        if isinstance(exc, BankError):
            raise
        raise CannotCopy(f"{db!r}: not a ledger path or URL ({exc})") from None


def _location(backend: Backend) -> tuple[Any, ...]:
    """What names one store: the file, or the server and database (user, driver aside)."""
    url = backend.url
    return (url.get_backend_name(), url.host or "", url.port, url.database)


def _refuse_same(source: Backend, target: Backend) -> None:
    """Refuse to copy a ledger onto itself (any path, symlink or hard link of it), which
    would open and close the file behind the reading snapshot's back."""
    same = False
    if source.path is not None and target.path is not None:
        same = source.path == target.path
        if not same and source.path.exists() and target.path.exists():
            same = os.path.samefile(source.path, target.path)
    elif source.path is None and target.path is None:
        same = _location(source) == _location(target)
    if same:
        raise CannotCopy(f"{source.where} and {target.where} are the same ledger: nothing to copy")


def _source_snapshot(source: Backend, *, after_stale: bool) -> _Reraised:
    """The source's read-only snapshot; its errors (`CannotAudit`) become `CannotCopy`."""
    return _Reraised(source.snapshot(after_stale=after_stale))


class _Reraised:
    """A snapshot's context manager whose `CannotAudit` reads as a `CannotCopy` of the source."""

    def __init__(self, inner: AbstractContextManager[LedgerSnapshot]) -> None:
        self._inner = inner

    def __enter__(self) -> LedgerSnapshot:
        try:
            snap: LedgerSnapshot = self._inner.__enter__()
        except CannotAudit as exc:
            raise CannotCopy(f"source: {exc}") from None
        return snap

    def __exit__(self, *exc_info: Any) -> bool:
        try:
            return bool(self._inner.__exit__(*exc_info))
        except CannotAudit as exc:
            raise CannotCopy(f"source: {exc}") from None


def _check_source(snap: LedgerSnapshot, where: str) -> None:
    """A source is a ledger at the newest revision: the copy's schema is the newest one,
    and older rows would not fit it as they are (`bank init` migrates them first)."""
    try:
        versions = snap.revision_rows()  # CannotAudit for an empty or foreign database
    except CannotAudit as exc:
        raise CannotCopy(f"source: {exc}") from None
    if len(versions) != 1:
        raise CannotCopy(f"source {where}: expected one schema revision, found {len(versions)}")
    revision = str(versions[0])
    head = migrate.head_revision()
    if revision not in migrate.known_revisions():
        raise CannotCopy(
            f"source {where}: schema revision {revision!r} is newer than this bank knows "
            f"(newest known: {head!r}); upgrade bank to copy it"
        )
    if revision != head:
        raise CannotCopy(
            f"source {where}: schema revision {revision} is older than the newest ({head}); "
            f"run `bank init --db {where}` first to upgrade it, then copy"
        )
    missing = [t.name for t in TABLES if t.name not in snap.tables()]
    if missing:
        raise CannotCopy(f"source {where}: table(s) {', '.join(missing)} are missing")


def _check_empty(target: Backend, lock: OwnerLock) -> None:
    """Refuse a destination that holds anything: a copy never merges into, or replaces, data."""
    try:
        revision = target.preflight(lock)
    except CannotOpenLedger:  # unreachable, read-only, ...: not about what it holds
        raise
    except (NotALedger, LedgerCorrupt) as exc:
        raise DestinationNotEmpty(
            f"destination not empty: {exc} (copy into a new file or an empty database)"
        ) from None
    except Exception as exc:
        raise (target.open_error(exc) or exc) from None
    if revision is not None:
        raise DestinationNotEmpty(
            f"destination not empty: {target.where} already holds a ledger (schema revision "
            f"{revision}); copy into a new file or an empty database (createdb)"
        )


# -- the copy ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Copied:
    rows: dict[str, int]
    head: Head


class _SourceFailed(Exception):
    """A read of the source failed while the destination was being written (told apart from
    the destination's own failures, which the source snapshot must not take for its own)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _copy_into(target: Backend, lock: OwnerLock, snap: LedgerSnapshot) -> _Copied | None:
    """Create the schema and insert every row of `snap` in one transaction, and commit.

    Returns None, having rolled back, when `snap` says it went stale (read again). Any
    failure rolls back and removes what this copy created; it is raised as a `BankError`
    that names the side it came from.
    """
    engine = target.create_engine(Durability.FULL, lock)
    keep = False  # True once the destination holds the copy (or still nothing, to retry)
    try:
        target.check_writable(engine)
        bulk = _bulk_inserter(engine.dialect.name)
        with engine.connect() as conn:
            trans = conn.begin()
            try:
                migrate.upgrade_in_transaction(conn)
                # The rows the migrations seed (@cash, its opening, chain_formats) are
                # the source's to give: the copy holds the source's rows and no others.
                for table in reversed(TABLES):
                    conn.execute(delete(table))
                copied = _insert_all(conn, snap, bulk)
                rebuild_postings(conn, copied.head.seq)
                if snap.stale():
                    trans.rollback()
                    keep = True
                    return None
                lost = lock.lost()
                if lost is not None:
                    raise CannotCopy(f"{target.where}: {lost}; nothing was committed")
                trans.commit()
            except BaseException:
                if trans.is_active:
                    trans.rollback()
                raise
        keep = True
        return copied
    except BankError:
        raise
    except _SourceFailed as exc:
        raise CannotCopy(
            f"reading the source failed ({_reason(exc.cause)}); "
            f"the destination {target.where} was left empty"
        ) from None
    except Exception as exc:
        raise _destination_error(target, exc) from None
    finally:
        engine.dispose()
        if not keep:
            target.discard_created(lock)


def _insert_all(conn: Connection, snap: LedgerSnapshot, bulk: BulkInsert | None) -> _Copied:
    """Every table of `snap` into `conn`, in `TABLES` order; the chains' heads on the way."""
    streams: dict[str, Callable[[], Iterator[tuple[Any, ...]]]] = {
        accounts.name: snap.account_rows,
        account_events.name: snap.account_event_rows,
        transfers.name: snap.transfer_rows,
        chain_formats.name: snap.chain_format_rows,
    }
    ends: dict[str, tuple[int, str]] = {}
    rows: dict[str, int] = {}
    for table in TABLES:
        columns = tuple(c.name for c in table.columns)  # the snapshot's tuple order
        stream = _from_source(streams[table.name]())
        if table.name in (transfers.name, account_events.name):
            stream = _remember_last(stream, columns, ends, table.name)
        rows[table.name] = (bulk or _insert_rows)(conn, table, columns, stream)
    seq, hash_ = ends.get(transfers.name, (0, GENESIS))
    event_seq, event_hash = ends.get(account_events.name, (0, GENESIS))
    return _Copied(rows, Head(seq, hash_, event_seq, event_hash))


def _from_source(rows: Iterator[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    try:
        yield from rows
    except Exception as exc:
        raise _SourceFailed(exc) from exc


def _remember_last(
    rows: Iterator[tuple[Any, ...]],
    columns: Sequence[str],
    ends: dict[str, tuple[int, str]],
    chain: str,
) -> Iterator[tuple[Any, ...]]:
    """`rows` unchanged; the last one's (seq, hash) left in `ends[chain]` (the chain's head)."""
    seq_at, hash_at = columns.index("seq"), columns.index("hash")
    last: tuple[Any, ...] | None = None
    for row in rows:
        last = row
        yield row
    if last is not None:
        ends[chain] = (last[seq_at], last[hash_at])


def _chunks(rows: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _insert_rows(
    conn: Connection, table: Table, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
) -> int:
    """The backend-independent way: Core `insert(table)`, executemany per chunk."""
    statement = insert(table)
    count = 0
    for chunk in _chunks(rows, COPY_CHUNK_ROWS):
        conn.execute(statement, [dict(zip(columns, row, strict=True)) for row in chunk])
        count += len(chunk)
    return count


def _bulk_inserter(dialect: str) -> BulkInsert | None:
    """The destination backend's own `bulk.insert_rows`, if it has one."""
    name = f"{PACKAGES.get(dialect, '')}.bulk"
    try:
        module = backend_module(dialect, "bulk")
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None
    inserter: BulkInsert = module.insert_rows
    return inserter


# -- errors and the audit ---------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


def _is_integrity_error(exc: BaseException) -> bool:
    """A constraint refused a row: DB-API 2 (PEP 249) names that class `IntegrityError`
    in every driver, and SQLAlchemy wraps it in one of the same name."""
    orig = getattr(exc, "orig", None) or exc
    return any(
        cls.__name__ == "IntegrityError" for cls in (*type(exc).__mro__, *type(orig).__mro__)
    )


def _destination_error(target: Backend, exc: Exception) -> BankError:
    if _is_integrity_error(exc):
        return CannotCopy(
            f"{target.where} refused a row of the source ({_reason(exc)}): the source breaks "
            "the ledger's constraints, so it is damaged; run `bank audit` on it. "
            "The destination was left empty"
        )
    error = target.open_error(exc)
    why = str(error) if error is not None else f"{type(exc).__name__}: {_reason(exc)}"
    return CannotCopy(f"writing the copy failed ({why}); the destination was left empty")


def _audit(dst: str | os.PathLike[str] | URL, head: Head) -> AuditReport:
    """The audit of the copy, pinned to the source's head. A head that does not even parse
    (a damaged last hash) is left out: the audit reports that row itself."""
    try:
        expect: str | None = str(parse_head(str(head)))
    except InvalidExpectedHead:
        expect = None
    try:
        return audit_ledger(dst, expect_head=expect)
    except CannotAudit as exc:
        raise CannotCopy(f"the copy was committed but could not be audited: {exc}") from None
