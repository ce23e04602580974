"""The ledger audit: a read-only, streaming re-derivation of everything the engine claims.

The audit trusts nothing the engine computed. It reads one consistent snapshot of
the ledger (`bank.ledger.backend.LedgerSnapshot`: SQLite's one read transaction,
PostgreSQL's one REPEATABLE READ READ ONLY transaction), compares the schema with
what the shipped migrations create, re-hashes both chains in the formats
`chain_formats` names (`bank.ledger.audit_chain`), checks the type of every
column of every row, replays `transfers` in seq order against the overdraft
limits that `account_events` says were in force, and compares what it rebuilt
with the stored `accounts`.

The rules are pure checks over the snapshot's row streams, written once for every
backend (`audit_events`, `audit_replay`, `audit_checks`); this module only runs them
in order. A long, clean ledger is checked by several processes at once, each a
seq range of the same snapshot (`audit_ranges`, `audit_parallel`); anything out of
the ordinary there sends the audit to the exact serial pass, so the report is the
same either way. Memory is O(accounts): rows are streamed, the problems list capped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import URL

from bank.errors import BankError, CannotAudit
from bank.ledger.audit_chain import Formats, check_chain_formats
from bank.ledger.audit_checks import check_accounts, check_head, check_keys, check_types
from bank.ledger.audit_events import check_events, usable_limit_events
from bank.ledger.audit_parallel import PARALLEL_ROWS_MIN, RangeJobs, processes_default
from bank.ledger.audit_postings import (
    LOCATED_MAX,
    POSTINGS_COLUMNS,
    FingerprintKeys,
    check_postings,
    check_watermark,
)
from bank.ledger.audit_problems import (
    PROBLEM_KINDS,
    PROBLEMS_KEPT_MAX,
    Problem,
    Problems,
    Value,
)
from bank.ledger.audit_ranges import RangeSummary, join_ranges
from bank.ledger.audit_replay import Replay, replay_transfers
from bank.ledger.backend import LedgerSnapshot
from bank.ledger.backends import backend_for, ledger_url
from bank.ledger.head import Head, parse_head
from bank.ledger.migrate import known_revisions

__all__ = [
    "PROBLEMS_KEPT_MAX",
    "PROBLEM_KINDS",
    "AuditReport",
    "Problem",
    "Value",
    "audit_ledger",
]

_log = logging.getLogger(__name__)

#: Tables and columns the audit reads, as every known revision has them.
_COLUMNS = {
    "accounts": ("id", "name", "overdraft_limit", "balance"),
    "transfers": (
        "seq",
        "key",
        "kind",
        "debit_account_id",
        "credit_account_id",
        "amount",
        "ts_us",
        "hash",
    ),
    "account_events": (
        "seq",
        "account_id",
        "kind",
        "name",
        "overdraft_limit",
        "transfer_seq",
        "ts_us",
        "hash",
    ),
}


#: The running balances of revision 0005 (absent before it: then not compared).
_RUNNING_COLUMNS = frozenset({"debit_balance", "credit_balance"})


@dataclass(frozen=True, slots=True)
class AuditReport:
    """The verdict on one snapshot of a ledger: `ok` iff no problem was found.

    `seq` is the last transfer seq of the snapshot audited and `head_hash` its hash,
    `accounts_seq` and `accounts_head_hash` the same for account events; `head`
    joins all four in one value (`bank.ledger.head`: record it elsewhere and pass it
    back as `expect_head` to pin both chains). `problems` holds the first
    `PROBLEMS_KEPT_MAX` problems, `problems_total` counts them all.
    """

    path: str
    revision: str
    seq: int
    head_hash: str
    accounts_seq: int
    accounts_head_hash: str
    transfers_checked: int
    accounts_checked: int
    account_events_checked: int
    problems: tuple[Problem, ...]
    problems_total: int
    problem_counts: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    expect_head: str | None = None

    @property
    def ok(self) -> bool:
        """True when the audit found nothing wrong."""
        return self.problems_total == 0

    @property
    def head(self) -> str:
        """Both chain heads in one value, `SEQ:HASH/EVENT_SEQ:EVENT_HASH`, for `expect_head`."""
        return f"{self.seq}:{self.head_hash}/{self.accounts_seq}:{self.accounts_head_hash}"

    @property
    def truncated(self) -> bool:
        """True when more problems were found than `problems` holds."""
        return self.problems_total > len(self.problems)

    @property
    def transfers_per_s(self) -> float:
        """Audit throughput (a statistic, never money)."""
        return self.transfers_checked / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping of the whole report."""
        return {
            "ok": self.ok,
            "path": self.path,
            "revision": self.revision,
            "head": self.head,
            "seq": self.seq,
            "head_hash": self.head_hash,
            "accounts_seq": self.accounts_seq,
            "accounts_head_hash": self.accounts_head_hash,
            "expect_head": self.expect_head,
            "transfers_checked": self.transfers_checked,
            "accounts_checked": self.accounts_checked,
            "account_events_checked": self.account_events_checked,
            "problems_total": self.problems_total,
            "problem_counts": dict(self.problem_counts),
            "truncated": self.truncated,
            "problems": [p.as_dict() for p in self.problems],
            "duration_s": round(self.duration_s, 6),
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        """The report as JSON text."""
        return json.dumps(self.as_dict(), indent=indent)


# -- opening ---------------------------------------------------------------------------


def _snapshot_for(url: URL, *, after_stale: bool) -> AbstractContextManager[LedgerSnapshot]:
    """The read-only snapshot of the ledger at `url`, from its backend."""
    try:
        backend = backend_for(url)
    except CannotAudit:
        raise
    except BankError as exc:  # a URL no backend takes, or a driver that is not installed
        raise CannotAudit(str(exc)) from None
    return backend.snapshot(after_stale=after_stale)


def audit_ledger(
    db: str | os.PathLike[str] | URL, *, expect_head: str | None = None
) -> AuditReport:
    """Audit the ledger at `db` (a path, an SQLite URL or a PostgreSQL URL) read-only.

    Reads one consistent snapshot (safe while an engine writes to the ledger) and
    never creates, migrates or writes a ledger. An SQLite ledger at rest (no -wal or
    journal content) is read as `immutable`, so not even SQLite's -wal/-shm side files
    appear; if the file changed meanwhile, the audit runs again through SQLite's
    locking (which, like every WAL reader, may create the -shm index). A ledger owned
    by a `Bank` of this process is only read through SQLite (never immutable).
    `expect_head`, if given, is a head as the report's `head` gives it
    (`SEQ:HASH/EVENT_SEQ:EVENT_HASH`); each chain whose end differs from it is a
    `head_mismatch` problem. Raises `InvalidExpectedHead` (a `CannotAudit`) for any
    other `expect_head`, a bare transfers hash included, and `CannotAudit`
    (one-line reason) for a missing file, a file that is not a ledger, a newer
    schema revision, or a database that cannot be read.
    """
    return audit(db, expect_head=expect_head)


def audit(
    db: str | os.PathLike[str] | URL,
    *,
    expect_head: str | None = None,
    processes: int | None = None,
    parallel_rows_min: int = PARALLEL_ROWS_MIN,
) -> AuditReport:
    """`audit_ledger` with the fast path's knobs: `processes` (default one per core;
    1: never parallel) and the ledger length from which it runs in parallel."""
    pinned = None if expect_head is None else parse_head(expect_head)
    try:
        url = db if isinstance(db, URL) else ledger_url(os.fspath(db))
    except TypeError:
        raise CannotAudit(f"the audit takes a path to a ledger file (got {db!r})") from None
    except ValueError as exc:  # a URL SQLAlchemy cannot parse
        raise CannotAudit(f"{db!r}: not a ledger path or URL ({exc})") from None
    run = _Run(pinned, processes or processes_default(), parallel_rows_min)
    with _snapshot_for(url, after_stale=False) as snapshot:
        report = run.audit(snapshot)
        stale = snapshot.stale()
    if not stale:
        return report
    with _snapshot_for(url, after_stale=True) as snapshot:
        return run.audit(snapshot)


@dataclass(frozen=True, slots=True)
class _Run:
    pinned: Head | None
    processes: int
    parallel_rows_min: int

    def audit(self, snap: LedgerSnapshot) -> AuditReport:
        """Every check, in the order the report lists problems."""
        started = time.perf_counter()
        problems = Problems()
        revision = _check_schema(snap, problems)
        tables = snap.tables()
        # Revision 0005's running balances, compared on every row where the ledger has them.
        running = snap.columns("transfers") >= _RUNNING_COLUMNS
        jobs = self._start_ranges(snap, tables, running)
        fast: Replay | None = None
        try:
            _check_integrity(snap.integrity_problems(), problems)
            _check_postings(snap, tables, problems)  # two scans in SQL, beside the workers
            if jobs is not None:
                fast = self._join(snap, jobs.finish(snap))
                jobs = None
        finally:
            if jobs is not None:
                jobs.cancel()
        # A clean fast path saw every transfer's values with their types: no scan of those.
        check_types(snap.type_problems(skip={"transfers"} if fast else set()), problems)
        formats: dict[str, Formats] = {"transfers": [], "account_events": []}
        if "chain_formats" in tables:
            formats = check_chain_formats(snap.chain_format_rows(), problems)
        events = check_events(snap.account_event_rows(), problems, formats["account_events"])
        if fast is not None and events.last_transfer_seq > fast.last_seq:
            fast = None  # events past the last row: the exact pass applies them all
        replay = fast or replay_transfers(
            snap.transfer_rows(),
            usable_limit_events(snap.limit_event_rows()),
            events.accounts,
            problems,
            formats["transfers"],
            running=running,
        )
        if events.last_transfer_seq > replay.last_seq:
            problems.add(
                "bad_event",
                "an account event refers to a transfer seq beyond the last transfer",
                expected=f"<= {replay.last_seq}",
                found=events.last_transfer_seq,
            )
        check_keys(snap.key_rows(), problems)
        accounts_checked = check_accounts(
            snap.account_rows(), events.accounts, replay.balances, problems
        )
        if self.pinned is not None:
            found = Head(replay.last_seq, replay.head, events.last_seq, events.head)
            check_head(self.pinned, found, snap.hash_at, problems)
        return AuditReport(
            path=snap.where,
            revision=revision,
            seq=replay.last_seq,
            head_hash=replay.head,
            accounts_seq=events.last_seq,
            accounts_head_hash=events.head,
            transfers_checked=replay.rows,
            accounts_checked=accounts_checked,
            account_events_checked=events.rows,
            problems=tuple(problems.kept),
            problems_total=problems.total,
            problem_counts=dict(problems.counts),
            duration_s=time.perf_counter() - started,
            expect_head=None if self.pinned is None else str(self.pinned),
        )

    def _start_ranges(
        self, snap: LedgerSnapshot, tables: set[str], running: bool
    ) -> RangeJobs | None:
        """Worker processes checking seq ranges of a long ledger, started before the other
        checks so both run at once (None: this ledger is checked in one pass).

        They get the chain formats and limit events as the snapshot has them; the
        checks that report problems about those run in order afterwards, and any
        problem at all sends the audit to the exact pass.
        """
        last = snap.pinned_max_seq
        if self.processes < 2 or last < max(1, self.parallel_rows_min):
            return None
        token = snap.export_token()
        if token is None or snap.transfer_count() != last:
            return None  # gaps or forged seqs: the exact pass says where
        formats: Formats = []
        if "chain_formats" in tables:
            formats = check_chain_formats(snap.chain_format_rows(), Problems())["transfers"]
        limit_events = list(usable_limit_events(snap.limit_event_rows()))
        return RangeJobs(token, last, limit_events, formats, self.processes, running)

    def _join(self, snap: LedgerSnapshot, summaries: list[RangeSummary]) -> Replay | None:
        """The ranges as one replay, or None (something to report: the exact pass)."""
        joined = join_ranges(summaries)
        # The workers' chain must end where this snapshot's does: then (SHA-256) they
        # read exactly this snapshot's rows.
        if (
            joined is None
            or joined.last_seq != snap.pinned_max_seq
            or snap.hash_at("transfers", joined.last_seq) != joined.head
        ):
            _log.info("audit of %s: the fast path found something; exact pass", snap.where)
            return None
        return Replay(joined.rows, joined.last_seq, joined.head, joined.balances)


def _check_schema(snap: LedgerSnapshot, problems: Problems) -> str:
    """The schema revision, after checking the store is a `bank` ledger this code can read.

    Raises `CannotAudit` when it is not. Every object of the ledger (tables with
    their columns, types and constraints, indexes with their definitions, views,
    triggers) is compared with what the shipped migrations create up to the
    revision the ledger claims: each missing, extra or different object is a
    `schema` problem. The revision number decides only which reference to compare
    with, never what is checked: a revision set back or moved forward shows up as
    the objects of the other revision.
    """
    where = snap.where
    versions = snap.revision_rows()
    if len(versions) != 1:
        raise CannotAudit(f"{where}: expected one schema revision, found {len(versions)}")
    revision = versions[0]
    if revision not in known_revisions():
        raise CannotAudit(
            f"{where}: schema revision {revision!r} is not one this bank knows (a newer bank's "
            "ledger: upgrade bank to audit it; or a forged alembic_version)"
        )
    revision = str(revision)
    differences = snap.schema_differences(revision)
    for difference in differences:
        problems.add(
            "schema", difference.message, expected=difference.expected, found=difference.found
        )
    if differences:
        others = [rev for rev in snap.matching_revisions() if rev != revision]
        if others:
            problems.add(
                "schema",
                f"alembic_version says {revision}, but the schema is exactly revision "
                f"{others[-1]}'s: the revision number was changed",
                expected=revision,
                found=others[-1],
            )
    first = (
        f" (and {len(differences)} schema difference(s), first: {differences[0].message})"
        if differences
        else ""
    )
    tables = snap.tables()
    for table, columns in _COLUMNS.items():
        if table not in tables:
            raise CannotAudit(f"{where}: table {table!r} is missing (revision {revision})" + first)
        have = snap.columns(table)
        missing = [c for c in columns if c not in have]
        if missing:
            raise CannotAudit(
                f"{where}: table {table!r} lacks column(s) {', '.join(missing)}" + first
            )
    return revision


def _check_postings(snap: LedgerSnapshot, tables: set[str], problems: Problems) -> None:
    """Revision 0007's postings agree with transfers (`bank.ledger.audit_postings`).

    Checked wherever the ledger has both tables with their columns, whatever its
    revision says; a table or column missing is the schema check's problem (the rule
    then has nothing to read). The fingerprint's keys are drawn anew for each audit.
    """
    for table, columns in POSTINGS_COLUMNS.items():
        if table not in tables or not snap.columns(table) >= columns:
            return
    watermark = check_watermark(snap.postings_watermark_rows(), snap.pinned_max_seq, problems)
    if watermark is None:
        return
    sums = snap.postings_sums(watermark, FingerprintKeys.draw())
    check_postings(
        watermark, sums, lambda: snap.postings_differences(watermark, LOCATED_MAX), problems
    )


#: Findings of the store's integrity check kept as problems (the rest are counted in one).
_INTEGRITY_FINDINGS_MAX = 20


def _check_integrity(findings: list[str], problems: Problems) -> None:
    for finding in findings[:_INTEGRITY_FINDINGS_MAX]:
        problems.add(
            "integrity",
            f"SQLite's integrity check: {finding}",
            expected="ok",
            found=finding,
        )
    if len(findings) > _INTEGRITY_FINDINGS_MAX:
        problems.add(
            "integrity",
            f"SQLite's integrity check found more than {_INTEGRITY_FINDINGS_MAX} problems",
            expected="ok",
            found=f"> {_INTEGRITY_FINDINGS_MAX} findings",
        )
