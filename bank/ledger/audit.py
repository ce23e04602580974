"""The ledger audit: a read-only, streaming re-derivation of everything the engine claims.

The audit trusts nothing the engine computed. It opens the file read-only, takes
one read transaction (a consistent snapshot, even while an engine is writing),
re-hashes both chains with the formats documented in `bank.ledger.chain`
(re-implemented here on purpose: a bug there must not hide itself), each row in the
format `chain_formats` names for it, checks the storage class of every column of
every row (SQLite `typeof`; a text where an integer belongs is how an edit hid
inside the ambiguous version-1 text), replays
`transfers` in seq order against the overdraft limits that `account_events`
says were in force, and compares what it rebuilt with the stored `accounts`.

Memory is O(accounts): transfers are streamed from a plain DB-API cursor and
only per-account state is kept; the problems list is capped.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass, field
from hashlib import sha256
from itertools import pairwise
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from bank.errors import CannotAudit
from bank.ledger.head import Head, parse_head
from bank.ledger.migrate import known_revisions
from bank.ledger.schema_ref import (
    compare_schema,
    matching_revisions,
    read_schema,
    reference_schemas,
)
from bank.ledger.sqlite import SQLITE_MAGIC, fingerprint, owned_here, side_file_size
from bank.limits import (
    AMOUNT_MAX,
    BALANCE_MAX,
    BALANCE_MIN,
    BUSY_TIMEOUT_MS,
    CASH_ACCOUNT_ID,
    KEY_LENGTH_MAX,
    NAME_LENGTH_MAX,
    OVERDRAFT_LIMIT_MAX,
)

#: Problems kept in a report; later ones are only counted (a wrecked ledger stays cheap).
PROBLEMS_KEPT_MAX: Final = 1000

GENESIS: Final = "0" * 64

#: Every kind of problem the audit reports, and what it means.
PROBLEM_KINDS: Final[dict[str, str]] = {
    "schema": "a table, column, constraint, index, view or trigger differs from what the "
    "migrations create up to the ledger's revision (or is missing, or was never created by them)",
    "integrity": "SQLite's integrity check failed: an index does not hold exactly its table's "
    "rows (one forged under its original text), or the file is damaged",
    "seq_gap": "transfers.seq skips numbers: rows were deleted",
    "bad_seq": "a transfers.seq below 1 (a forged row)",
    "hash_mismatch": "a transfer does not hash to its stored hash from the previous row's hash "
    "(a row holding a value of the wrong type never does)",
    "head_mismatch": "the head of the transfers or account_events chain differs from the "
    "pinned head (expect_head)",
    "bad_kind": "a transfer's kind is not deposit, withdrawal or transfer",
    "kind_accounts": "a deposit/withdrawal does not touch @cash on the right side, "
    "or a transfer touches @cash",
    "same_account": "a transfer debits and credits the same account",
    "bad_amount": f"an amount that is not an integer from 1 to {AMOUNT_MAX}",
    "unknown_account": "a transfer names an account that was never opened",
    "account_not_open": "a transfer names an account before its opening event",
    "overdraft": "replay takes a customer account below -overdraft_limit",
    "balance_overflow": "replay takes a balance outside signed 64 bits",
    "balance_mismatch": "accounts.balance differs from the account's credits minus debits",
    "balance_sum": "the stored balances do not sum to 0",
    "duplicate_key": "an idempotency key is used by more than one transfer",
    "bad_key": f"a key that is not NULL or a text of 1 to {KEY_LENGTH_MAX} characters",
    "event_seq_gap": "account_events.seq skips numbers: events were deleted",
    "event_hash_mismatch": "an account event does not hash to its stored hash from the previous one "
    "(an event holding a value of the wrong type never does)",
    "bad_type": "a column holds a value of another storage class than its type "
    "(a text or REAL where an integer belongs, ...)",
    "chain_format": "chain_formats does not describe the chains as the migrations write it",
    "bad_event": "an account event that breaks the rules (kind, order, limit, name, transfer_seq)",
    "account_without_open": "an accounts row with no opening event",
    "event_for_missing_account": "an account event for an account with no accounts row",
    "name_mismatch": "accounts.name differs from the account's latest event",
    "limit_mismatch": "accounts.overdraft_limit differs from the account's latest event",
}

#: Tables and columns the audit reads, as every known revision has them.
_COLUMNS: Final = {
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

# Where each kind must have @cash: value = (debit is @cash) + 2 * (credit is @cash).
_KIND_SIDES: Final = {"transfer": 0, "deposit": 1, "withdrawal": 2}

Value = int | str | None


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the ledger, located by transfer `seq`, `event_seq` and/or `account`."""

    kind: str
    message: str
    seq: int | None = None
    account: int | None = None
    expected: Value = None
    found: Value = None
    event_seq: int | None = None

    def as_dict(self) -> dict[str, Value]:
        """A JSON-ready mapping (ints stay exact ints)."""
        return {
            "kind": self.kind,
            "seq": self.seq,
            "event_seq": self.event_seq,
            "account": self.account,
            "expected": self.expected,
            "found": self.found,
            "message": self.message,
        }


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


class _Problems:
    """Collects problems, keeping the first `PROBLEMS_KEPT_MAX` and counting all."""

    def __init__(self, kept_max: int = PROBLEMS_KEPT_MAX) -> None:
        self.kept: list[Problem] = []
        self.counts: Counter[str] = Counter()
        self._kept_max = kept_max

    def add(
        self,
        kind: str,
        message: str,
        *,
        seq: int | None = None,
        account: int | None = None,
        expected: object = None,
        found: object = None,
        event_seq: int | None = None,
    ) -> None:
        assert kind in PROBLEM_KINDS, kind
        self.counts[kind] += 1
        if len(self.kept) < self._kept_max:
            self.kept.append(
                Problem(kind, message, seq, account, _value(expected), _value(found), event_seq)
            )

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _value(v: object) -> Value:
    """Keep ints and text as they are; show anything else (REAL, BLOB) by its repr."""
    if v is None or type(v) is int or type(v) is str:
        return v
    return repr(v)


def _int(v: object) -> bool:
    return type(v) is int


# -- opening ---------------------------------------------------------------------------


def _check_file(path: Path, *, owned: bool = False) -> None:
    """Refuse what cannot be a ledger before SQLite sees it (reads at most 16 bytes).

    `owned`: a `Bank` of this process holds the file, so it is a ledger and its header
    must not be read with Python I/O (closing that descriptor would drop SQLite's locks).
    """
    if not path.exists():
        raise CannotAudit(f"{path}: no such file")
    if not path.is_file():
        raise CannotAudit(f"{path}: not a regular file")
    if owned:
        return
    try:
        with path.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise CannotAudit(f"{path}: cannot be read ({exc.strerror})") from None
    wal = path.with_name(path.name + "-wal")
    if not head and not (wal.exists() and wal.stat().st_size > 0):
        raise CannotAudit(f"{path}: an empty file, not a ledger")
    if head != SQLITE_MAGIC and side_file_size(path, "-journal") > 0:
        raise CannotAudit(
            f"{path}: a write was interrupted (a hot -journal); `bank init` recovers it"
        )
    if head and head != SQLITE_MAGIC:
        raise CannotAudit(f"{path}: not an SQLite database, so not a ledger")


def _check_schema(cur: sqlite3.Cursor, path: Path, problems: _Problems) -> str:
    """The schema revision, after checking the file is a `bank` ledger this code can read.

    Raises `CannotAudit` when it is not. Every object of the ledger (tables with
    their columns, types and constraints, indexes with their definitions, views,
    triggers) is compared with what the shipped migrations create up to the
    revision the ledger claims (`bank.ledger.schema_ref`): each missing, extra or
    different object is a `schema` problem. The revision number decides only which
    reference to compare with, never what is checked: a revision set back or moved
    forward shows up as the objects of the other revision.
    """
    found = read_schema(cur)
    tables = {name for name, obj in found.items() if obj.type == "table"}
    if "alembic_version" not in tables:
        if not tables:
            raise CannotAudit(f"{path}: an empty SQLite database, not a ledger")
        if tables & _COLUMNS.keys():
            raise CannotAudit(f"{path}: has ledger tables but no schema revision (alembic_version)")
        listed = ", ".join(sorted(tables)[:5])
        raise CannotAudit(f"{path}: an SQLite database of another program (tables: {listed})")
    versions = [row[0] for row in cur.execute("SELECT version_num FROM alembic_version")]
    if len(versions) != 1:
        raise CannotAudit(f"{path}: expected one schema revision, found {len(versions)}")
    revision = versions[0]
    if revision not in known_revisions():
        raise CannotAudit(
            f"{path}: schema revision {revision!r} is not one this bank knows (a newer bank's "
            "ledger: upgrade bank to audit it; or a forged alembic_version)"
        )
    revision = str(revision)
    try:
        schemas = reference_schemas()
    except Exception as exc:  # a broken installation, not a broken ledger
        raise CannotAudit(
            f"the shipped migrations could not build the reference schema ({_reason(exc)})"
        ) from None
    differences = compare_schema(schemas[revision], found, revision)
    for difference in differences:
        problems.add(
            "schema", difference.message, expected=difference.expected, found=difference.found
        )
    if differences:
        others = [rev for rev in matching_revisions(found, schemas) if rev != revision]
        if others:
            problems.add(
                "schema",
                f"alembic_version says {revision}, but the schema is exactly revision "
                f"{others[-1]}'s: the revision number was changed",
                expected=revision,
                found=others[-1],
            )
    _check_index_contents(cur, problems)
    first = (
        f" (and {len(differences)} schema difference(s), first: {differences[0].message})"
        if differences
        else ""
    )
    for table, columns in _COLUMNS.items():
        if table not in tables:
            raise CannotAudit(f"{path}: table {table!r} is missing (revision {revision})" + first)
        have = {column[1] for column in found[table].columns}
        missing = [c for c in columns if c not in have]
        if missing:
            raise CannotAudit(
                f"{path}: table {table!r} lacks column(s) {', '.join(missing)}" + first
            )
    return revision


#: Findings of SQLite's integrity check kept as problems (the rest are counted in one).
_INTEGRITY_FINDINGS_MAX: Final = 20


def _check_index_contents(cur: sqlite3.Cursor, problems: _Problems) -> None:
    """Every index holds exactly the rows its definition says (`PRAGMA integrity_check`).

    An index's text can be made to say one thing while its b-tree holds another
    (`PRAGMA writable_schema`: create `uq_transfers_key ... WHERE 0`, then restore
    the original text): every key then looks free, to the engine and to any query
    that reads keys through the index, while the text compares equal. Only a
    comparison of each index with its table finds that; SQLite's integrity check
    does it for every index, and finds a damaged file too (~0.25 s per 1,000,000
    transfers here). CHECK constraints are left to the row checks, which name the
    row (`ignore_check_constraints` for this one statement; a setting of this
    connection only, nothing is written).
    """
    cur.execute("PRAGMA ignore_check_constraints = ON")
    try:
        findings = [
            str(row[0])
            for row in cur.execute(f"PRAGMA integrity_check({_INTEGRITY_FINDINGS_MAX + 1})")
        ]
    finally:
        cur.execute("PRAGMA ignore_check_constraints = OFF")
    if findings == ["ok"]:
        return
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


# -- column types and chain formats ----------------------------------------------------

#: The storage classes (SQLite `typeof`) each column may hold, NULL only where allowed.
COLUMN_TYPES: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "accounts": {
        "id": ("integer",),
        "name": ("text",),
        "overdraft_limit": ("integer",),
        "balance": ("integer",),
    },
    "transfers": {
        "seq": ("integer",),
        "key": ("text", "null"),
        "kind": ("text",),
        "debit_account_id": ("integer",),
        "credit_account_id": ("integer",),
        "amount": ("integer",),
        "ts_us": ("integer",),
        "hash": ("text",),
    },
    "account_events": {
        "seq": ("integer",),
        "account_id": ("integer",),
        "kind": ("text",),
        "name": ("text",),
        "overdraft_limit": ("integer",),
        "transfer_seq": ("integer",),
        "ts_us": ("integer",),
        "hash": ("text",),
    },
    "chain_formats": {"chain": ("text",), "first_seq": ("integer",), "version": ("integer",)},
}
#: Where each table's problems are located (the Problem field and the column).
_ROW_KEYS: Final = {
    "accounts": ("account", "id"),
    "transfers": ("seq", "seq"),
    "account_events": ("event_seq", "seq"),
    "chain_formats": (None, "first_seq"),
}

CHAIN_NAMES: Final = ("transfers", "account_events")
#: Hash formats this audit verifies (see `bank.ledger.chain`).
FORMAT_VERSIONS: Final = frozenset({1, 2})
_TRANSFERS_TAG_V2: Final = "bank:transfers:2\n"
_EVENTS_TAG_V2: Final = "bank:account_events:2\n"


def _tables(cur: sqlite3.Cursor) -> set[str]:
    return {row[0] for row in cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _audit_types(cur: sqlite3.Cursor, tables: set[str], problems: _Problems) -> None:
    """Report every value whose storage class differs from its column's type (`bad_type`).

    One scan per table inside SQLite, whatever the revision: STRICT tables (0003)
    refuse such values, but a ledger at 0002, or one whose table was rebuilt by
    hand, may hold them, and the version-1 chain text cannot tell 12 from '12'.
    """
    for table, columns in COLUMN_TYPES.items():
        if table not in tables:
            continue
        where, key_column = _ROW_KEYS[table]
        wrong = " OR ".join(
            f"typeof({c}) NOT IN ({', '.join(repr(t) for t in allowed)})"
            for c, allowed in columns.items()
        )
        cur.execute(
            f"SELECT {key_column}, {', '.join(f'typeof({c}), {c}' for c in columns)} "
            f"FROM {table} WHERE {wrong} ORDER BY {key_column}"
        )
        for row in cur:
            for i, (column, allowed) in enumerate(columns.items()):
                stored_type, value = row[1 + 2 * i], row[2 + 2 * i]
                if stored_type in allowed:
                    continue
                location: dict[str, Any] = {}
                if where is not None and _int(row[0]):
                    location[where] = row[0]
                problems.add(
                    "bad_type",
                    f"{table}.{column} holds {stored_type} {_value(value)!r}, "
                    f"not {' or '.join(a.upper() for a in allowed)}",
                    expected=" or ".join(allowed),
                    found=stored_type,
                    **location,
                )


def _chain_formats(
    cur: sqlite3.Cursor, tables: set[str], problems: _Problems
) -> dict[str, list[tuple[int, int]]]:
    """Each chain's sorted `(first_seq, version)` entries; none (all version 1) without the table.

    What migration 0003 writes: per chain, an entry at seq 1, versions that never go
    back, all known. Anything else is reported (`chain_format`); the rows are then
    verified with the entries as they stand, so a moved boundary also shows up as the
    hash mismatches of the rows it moved over.
    """
    formats: dict[str, list[tuple[int, int]]] = {chain: [] for chain in CHAIN_NAMES}
    if "chain_formats" not in tables:
        return formats
    rows = cur.execute(
        "SELECT chain, first_seq, version FROM chain_formats ORDER BY chain, first_seq"
    ).fetchall()
    for chain, first_seq, version in rows:
        if chain not in formats or not _int(first_seq) or first_seq < 1:
            problems.add(
                "chain_format",
                "an entry for an unknown chain or with a first_seq below 1",
                expected="transfers|account_events, first_seq >= 1",
                found=f"{chain!r}, {first_seq!r}",
            )
        elif version not in FORMAT_VERSIONS or not _int(version):
            problems.add(
                "chain_format",
                f"{chain} from seq {first_seq}: unknown hash format {version!r}",
                expected="1 or 2",
                found=_value(version),
            )
        else:
            formats[chain].append((first_seq, version))
    for chain, entries in formats.items():
        if not entries or entries[0][0] != 1:
            problems.add(
                "chain_format",
                f"no entry for {chain} at seq 1 (an entry was deleted?)",
                expected=f"({chain}, 1, ...)",
                found=entries[0][0] if entries else None,
            )
        for (_, before), (first_seq, after) in pairwise(entries):
            if after <= before:
                problems.add(
                    "chain_format",
                    f"{chain} goes from format {before} to {after} at seq {first_seq}",
                    expected=f"> {before}",
                    found=after,
                )
    return formats


def _code(value: object) -> str:
    """V(value) of hash format 2 (`bank.ledger.chain`); TypeError for REAL or BLOB."""
    if value is None:
        return "n"
    if value.__class__ is int:
        return f"i{value};"
    if value.__class__ is str:
        assert isinstance(value, str)
        return f"s{len(value.encode())}:{value}"
    raise TypeError("no encoding")


# -- account events --------------------------------------------------------------------


class _AccountState:
    """What the chained events say about one account (its latest name and limit)."""

    __slots__ = ("limit", "name", "open_event_seq", "open_transfer_seq")

    def __init__(
        self, name: object, limit: object, open_event_seq: int, open_transfer_seq: object
    ) -> None:
        self.name = name
        self.limit = limit
        self.open_event_seq = open_event_seq
        self.open_transfer_seq = open_transfer_seq


def _event_hash(
    version: int,
    prev: object,
    seq: object,
    account: object,
    kind: object,
    limit: object,
    transfer_seq: object,
    ts_us: object,
    name: object,
) -> str | None:
    """The hash an event must have in hash format `version`; None if its types have no encoding."""
    ints = (seq, account, limit, transfer_seq, ts_us)
    if any(v.__class__ is not int for v in ints) or kind.__class__ is not str:
        return None
    if name.__class__ is not str:
        return None
    if version == 1:
        text = f"{prev}\n{seq}|{account}|{kind}|{limit}|{transfer_seq}|{ts_us}|{name}"
    else:
        try:
            values = (prev, seq, account, kind, limit, transfer_seq, ts_us, name)
            text = _EVENTS_TAG_V2 + "".join(map(_code, values))
        except TypeError:
            return None
    return sha256(text.encode()).hexdigest()


def _version_at(entries: list[tuple[int, int]], seq: int) -> int:
    """The hash format of row `seq` (1 before the first entry)."""
    version = 1
    for first_seq, v in entries:
        if first_seq > seq:
            break
        version = v
    return version


def _audit_events(
    cur: sqlite3.Cursor, problems: _Problems, formats: list[tuple[int, int]]
) -> tuple[dict[int, _AccountState], int, str, int, int]:
    """Check the account_events chain; returns (accounts, rows, head hash, last seq, max transfer_seq).

    `formats` are the chain's `(first_seq, version)` entries of `chain_formats`.
    """
    state: dict[int, _AccountState] = {}
    prev = GENESIS
    expected_seq = 1
    rows = 0
    last_seq = 0
    last_transfer_seq = 0
    cur.execute(
        "SELECT seq, account_id, kind, name, overdraft_limit, transfer_seq, ts_us, hash "
        "FROM account_events ORDER BY seq"
    )
    for seq, account, kind, name, limit, transfer_seq, ts_us, stored in cur:
        rows += 1
        last_seq = seq
        if seq < 1:
            problems.add(
                "bad_event",
                "event seq below 1 (a forged event)",
                event_seq=seq,
                expected=">= 1",
                found=seq,
            )
        elif seq != expected_seq:
            problems.add(
                "event_seq_gap",
                f"account_events seq {expected_seq}..{seq - 1} missing (deleted events)",
                event_seq=expected_seq,
                expected=expected_seq,
                found=seq,
            )
        if seq >= 1:
            expected_seq = seq + 1
        version = _version_at(formats, seq) if _int(seq) else 1
        computed = _event_hash(version, prev, seq, account, kind, limit, transfer_seq, ts_us, name)
        if computed != stored:
            problems.add(
                "event_hash_mismatch",
                "breaks the accounts hash chain (this event or the one before it was altered)",
                event_seq=seq,
                account=account if _int(account) else None,
                expected=computed,
                found=stored,
            )
        prev = stored
        acc = account if _int(account) else None
        if acc is None or acc < 0:
            problems.add(
                "bad_event",
                "account id is not a non-negative integer",
                event_seq=seq,
                expected=">= 0",
                found=account,
            )
            continue
        if not _int(limit) or not 0 <= limit <= OVERDRAFT_LIMIT_MAX:
            problems.add(
                "bad_event",
                f"overdraft limit is not an integer from 0 to {OVERDRAFT_LIMIT_MAX}",
                event_seq=seq,
                account=acc,
                expected=f"0..{OVERDRAFT_LIMIT_MAX}",
                found=limit,
            )
        if type(name) is not str or not 1 <= len(name) <= NAME_LENGTH_MAX:
            problems.add(
                "bad_event",
                f"name is not a text of 1 to {NAME_LENGTH_MAX} characters",
                event_seq=seq,
                account=acc,
                expected=f"1..{NAME_LENGTH_MAX} characters",
                found=name,
            )
        if not _int(transfer_seq) or transfer_seq < last_transfer_seq:
            problems.add(
                "bad_event",
                "transfer_seq goes back in time (events are chained in commit order)",
                event_seq=seq,
                account=acc,
                expected=f">= {last_transfer_seq}",
                found=transfer_seq,
            )
        else:
            last_transfer_seq = transfer_seq
        known = state.get(acc)
        if kind == "open":
            if known is not None:
                problems.add(
                    "bad_event",
                    f"account opened a second time (first at event seq {known.open_event_seq})",
                    event_seq=seq,
                    account=acc,
                    expected=None,
                    found="open",
                )
            else:
                state[acc] = _AccountState(name, limit, seq, transfer_seq)
        elif kind == "limit":
            if known is None:
                problems.add(
                    "bad_event",
                    "limit change before the account was opened",
                    event_seq=seq,
                    account=acc,
                    expected="open",
                    found="limit",
                )
            else:
                known.name = name
                known.limit = limit
        else:
            problems.add(
                "bad_event",
                "unknown event kind",
                event_seq=seq,
                account=acc,
                expected="open|limit",
                found=kind,
            )
    return state, rows, prev, last_seq, last_transfer_seq


def _limit_events(conn: sqlite3.Connection) -> Generator[tuple[int, int, str, object]]:
    """(transfer_seq, account, kind, limit) of usable events, in the order they took effect."""
    cur = conn.execute(
        "SELECT transfer_seq, account_id, kind, overdraft_limit FROM account_events "
        "ORDER BY transfer_seq, seq"
    )
    try:
        for transfer_seq, account, kind, limit in cur:
            if _int(transfer_seq) and _int(account) and kind in ("open", "limit"):
                yield transfer_seq, account, kind, limit
    finally:
        cur.close()


# -- transfers -------------------------------------------------------------------------


@dataclass(slots=True)
class _Replay:
    """Results of the transfer replay."""

    rows: int = 0
    last_seq: int = 0
    head: str = GENESIS
    balances: dict[int, int] = field(default_factory=dict)


def _text_code(value: object) -> str:
    """V(text) of hash format 2; TypeError for anything but a text (it never verifies)."""
    if value.__class__ is not str:
        raise TypeError("not a text")
    assert isinstance(value, str)
    return f"s{len(value.encode())}:{value}"


#: V(kind) of the transfer kinds, precomputed (kinds are ASCII).
_KIND_CODES: Final = {kind: f"s{len(kind)}:{kind}" for kind in _KIND_SIDES}


def _replay_transfers(
    conn: sqlite3.Connection,
    accounts: dict[int, _AccountState],
    problems: _Problems,
    formats: list[tuple[int, int]],
) -> _Replay:
    """Stream `transfers` in seq order: chain, per-row rules, and the balance replay.

    The loop is the audit's hot path: plain tuples, locals only, and one combined
    test per row that sends the rare bad row to `_check_row` for the details.
    Each row is hashed in the format `formats` (`chain_formats` entries) gives its
    seq; the `:d` and `:s` format specs raise for a value of the wrong type, which
    then has no encoding and never verifies (the hot path pays nothing for the check).
    """
    balances: dict[int, int] = {}
    floors: dict[int, int] = {}  # accounts open so far -> lowest balance allowed
    events = _limit_events(conn)
    pending = next(events, None)
    next_event_at = pending[0] if pending is not None else BALANCE_MAX

    def apply_events(seq: int) -> int:
        """Apply every event that took effect before transfer `seq`; returns the next's transfer_seq."""
        nonlocal pending
        while pending is not None and pending[0] < seq:
            _, account, kind, limit = pending
            # A bad limit was reported with its event; replay it as the strictest one, 0.
            floor = -limit if type(limit) is int and 0 <= limit <= OVERDRAFT_LIMIT_MAX else 0
            if account == CASH_ACCOUNT_ID:
                floor = BALANCE_MIN
            if kind == "open" and account not in floors:
                balances.setdefault(account, 0)
                floors[account] = floor
            elif kind == "limit" and account in floors:
                floors[account] = floor
            pending = next(events, None)
        return pending[0] if pending is not None else BALANCE_MAX

    switches = iter(formats)
    switch = next(switches, None)
    version = 1

    def next_version(seq: int) -> tuple[int, int]:
        """The format from `seq` on, and the seq of the next switch (for sorted entries)."""
        nonlocal switch
        current = version
        while switch is not None and switch[0] <= seq:
            current = switch[1]
            switch = next(switches, None)
        return current, switch[0] if switch is not None else BALANCE_MAX

    next_switch_at = switch[0] if switch is not None else BALANCE_MAX
    tag = _TRANSFERS_TAG_V2
    kind_codes = _KIND_CODES
    text_code = _text_code
    kind_sides = _KIND_SIDES
    amount_max = AMOUNT_MAX
    balance_max = BALANCE_MAX
    hasher = sha256
    prev = GENESIS
    expected_seq = 1
    rows = 0
    last_seq = 0
    cur = conn.cursor()
    cur.arraysize = 1024
    cur.execute(
        "SELECT seq, kind, debit_account_id, credit_account_id, amount, ts_us, key, hash "
        "FROM transfers ORDER BY seq"
    )
    try:
        for seq, kind, debit, credit, amount, ts_us, key, stored in cur:
            rows += 1
            if seq == expected_seq:
                expected_seq += 1
            else:
                expected_seq = _seq_problem(problems, seq, expected_seq)
            if seq > next_event_at:
                next_event_at = apply_events(seq)
            if seq >= next_switch_at:
                version, next_switch_at = next_version(seq)
            computed: str | None
            try:
                if version == 2:
                    p = (
                        f"s{len(prev)}:{prev}"
                        if prev.__class__ is str and prev.isascii()
                        else text_code(prev)
                    )
                    k = (
                        "n"
                        if key is None
                        else f"s{len(key)}:{key}"
                        if key.__class__ is str and key.isascii()
                        else text_code(key)
                    )
                    text = (
                        f"{tag}{p}i{seq:d};{kind_codes.get(kind) or text_code(kind)}"
                        f"i{debit:d};i{credit:d};i{amount:d};i{ts_us:d};{k}"
                    )
                else:
                    text = (
                        f"{prev}\n{seq:d}|{kind:s}|{debit:d}|{credit:d}|{amount:d}|{ts_us:d}|"
                        f"{'' if key is None else key:s}"
                    )
                computed = hasher(text.encode()).hexdigest()
            except (TypeError, ValueError):
                computed = None  # a value of the wrong type: no encoding, never verifies
            if computed != stored:
                problems.add(
                    "hash_mismatch",
                    "breaks the hash chain (this row or the one before it was altered)",
                    seq=seq,
                    expected=computed,
                    found=stored,
                )
            prev = stored
            if (
                amount.__class__ is not int
                or amount <= 0
                or amount > amount_max
                or kind_sides.get(kind) != (debit == 0) + 2 * (credit == 0)
                or debit == credit
                or debit not in floors
                or credit not in floors
            ):
                _check_row(problems, seq, kind, debit, credit, amount, accounts, floors, balances)
                continue
            # Replay (cannot raise: both accounts are open and amount is an int).
            debit_balance = balances[debit] - amount
            credit_balance = balances[credit] + amount
            balances[debit] = debit_balance
            balances[credit] = credit_balance
            if debit_balance < floors[debit] or credit_balance > balance_max:
                _limit_problem(
                    problems, seq, debit, credit, amount, debit_balance, credit_balance, floors
                )
        if rows:
            last_seq = seq
    finally:
        cur.close()
        events.close()
    return _Replay(rows, last_seq, prev, balances)


def _seq_problem(problems: _Problems, seq: int, expected_seq: int) -> int:
    """Report a seq out of line; returns the seq expected next."""
    if seq < 1:
        problems.add(
            "bad_seq", "transfers.seq below 1 (a forged row)", seq=seq, expected=">= 1", found=seq
        )
        return expected_seq
    problems.add(
        "seq_gap",
        f"transfers seq {expected_seq}..{seq - 1} missing (deleted rows)"
        if seq > expected_seq + 1
        else f"transfers seq {expected_seq} missing (a deleted row)",
        seq=expected_seq,
        expected=expected_seq,
        found=seq,
    )
    return seq + 1


def _check_row(
    problems: _Problems,
    seq: int,
    kind: object,
    debit: object,
    credit: object,
    amount: object,
    accounts: dict[int, _AccountState],
    floors: dict[int, int],
    balances: dict[int, int],
) -> None:
    """Report what is wrong with one transfer row, then replay what can be replayed.

    An integer amount is replayed even when the row is wrong, and the side of an
    account that is unknown or not yet open too: the stored balances were built
    from these rows, so only the rows themselves are reported, not every balance
    they touched.
    """
    if type(amount) is not int:
        problems.add(
            "bad_amount", "amount is not an integer", seq=seq, expected="integer", found=amount
        )
    elif not 1 <= amount <= AMOUNT_MAX:
        problems.add(
            "bad_amount",
            f"amount outside 1..{AMOUNT_MAX}",
            seq=seq,
            expected="1..10**15",
            found=amount,
        )
    side = (debit == CASH_ACCOUNT_ID) + 2 * (credit == CASH_ACCOUNT_ID)
    if kind not in _KIND_SIDES:
        problems.add(
            "bad_kind",
            "unknown transfer kind",
            seq=seq,
            expected="deposit|withdrawal|transfer",
            found=kind,
        )
    elif debit == credit:
        problems.add(
            "same_account",
            "debit and credit are the same account",
            seq=seq,
            account=_account(debit),
            expected="two accounts",
            found=debit,
        )
    elif _KIND_SIDES[kind] != side:
        rule = {
            "deposit": "a deposit debits @cash and credits a customer",
            "withdrawal": "a withdrawal debits a customer and credits @cash",
            "transfer": "a transfer moves money between two customer accounts",
        }[kind]
        problems.add(
            "kind_accounts",
            rule,
            seq=seq,
            account=_account(credit if kind == "withdrawal" else debit),
            expected=kind,
            found=f"debit {debit} -> credit {credit}",
        )
    for role, account in (("debit", debit), ("credit", credit)):
        acc = _account(account)
        known = accounts.get(acc) if acc is not None else None
        if known is None:
            problems.add(
                "unknown_account",
                f"{role} account was never opened",
                seq=seq,
                account=acc,
                expected="an opened account",
                found=account,
            )
        elif acc not in floors:
            problems.add(
                "account_not_open",
                f"{role} account is used before its opening (event seq {known.open_event_seq})",
                seq=seq,
                account=acc,
                expected=f"seq > {known.open_transfer_seq}",
                found=seq,
            )
    if type(amount) is not int:
        return
    d = _account(debit)
    c = _account(credit)
    debit_balance = credit_balance = 0
    if d is not None:
        debit_balance = balances.get(d, 0) - amount
        balances[d] = debit_balance
    if c is not None:
        credit_balance = balances.get(c, 0) + amount
        balances[c] = credit_balance
    if d is not None and c is not None and d != c:
        _limit_problem(problems, seq, d, c, amount, debit_balance, credit_balance, floors)


def _account(v: object) -> int | None:
    return v if type(v) is int else None


def _limit_problem(
    problems: _Problems,
    seq: int,
    debit: int,
    credit: int,
    amount: int,
    debit_balance: int,
    credit_balance: int,
    floors: dict[int, int],
) -> None:
    """Report the replayed balances that left their bounds (if any)."""
    if debit_balance < BALANCE_MIN:
        problems.add(
            "balance_overflow",
            f"debit of {amount} takes the balance below signed 64 bits",
            seq=seq,
            account=debit,
            expected=f">= {BALANCE_MIN}",
            found=debit_balance,
        )
    elif debit in floors and debit_balance < floors[debit]:
        problems.add(
            "overdraft",
            f"debit of {amount} takes the balance below -overdraft_limit",
            seq=seq,
            account=debit,
            expected=f">= {floors[debit]}",
            found=debit_balance,
        )
    if credit_balance > BALANCE_MAX:
        problems.add(
            "balance_overflow",
            f"credit of {amount} takes the balance above signed 64 bits",
            seq=seq,
            account=credit,
            expected=f"<= {BALANCE_MAX}",
            found=credit_balance,
        )


# -- keys and accounts -----------------------------------------------------------------


def _audit_keys(cur: sqlite3.Cursor, problems: _Problems) -> None:
    """Keys are unique non-empty texts: one pass in key order (the unique index's order)."""
    previous: object = None
    previous_seq = 0
    cur.execute("SELECT key, seq FROM transfers WHERE key IS NOT NULL ORDER BY key, seq")
    for key, seq in cur:
        if type(key) is not str or not 1 <= len(key) <= KEY_LENGTH_MAX:
            problems.add(
                "bad_key",
                f"key is not a text of 1 to {KEY_LENGTH_MAX} characters (an empty key hashes like NULL)",
                seq=seq,
                expected=f"NULL or 1..{KEY_LENGTH_MAX} characters",
                found=key,
            )
        elif key == previous:
            problems.add(
                "duplicate_key",
                f"key already used by seq {previous_seq}",
                seq=seq,
                expected="unique",
                found=key,
            )
        previous, previous_seq = key, seq


def _audit_accounts(
    cur: sqlite3.Cursor,
    state: dict[int, _AccountState],
    balances: dict[int, int],
    problems: _Problems,
) -> int:
    """Compare every `accounts` row with the events and the replay; returns rows read."""
    rows = 0
    total = 0
    seen: set[int] = set()
    cur.execute("SELECT id, name, overdraft_limit, balance FROM accounts ORDER BY id")
    for account, name, limit, balance in cur:
        rows += 1
        seen.add(account)
        known = state.get(account)
        if known is None:
            problems.add(
                "account_without_open",
                "accounts row has no opening event",
                account=account,
                expected="an open event",
                found=name,
            )
        else:
            if name != known.name:
                problems.add(
                    "name_mismatch",
                    "name differs from the latest chained event",
                    account=account,
                    expected=known.name,
                    found=name,
                )
            if limit != known.limit:
                problems.add(
                    "limit_mismatch",
                    "limit differs from the latest chained event (edited in place?)",
                    account=account,
                    expected=known.limit,
                    found=limit,
                )
        recomputed = balances.get(account, 0)
        if balance != recomputed or not _int(balance):
            problems.add(
                "balance_mismatch",
                "stored balance differs from credits minus debits",
                account=account,
                expected=recomputed,
                found=balance,
            )
        if _int(balance):
            total += balance
    if total != 0:
        problems.add("balance_sum", "stored balances do not sum to 0", expected=0, found=total)
    for account in sorted(state.keys() - seen):
        problems.add(
            "event_for_missing_account",
            "account has chained events but no accounts row (deleted?)",
            account=account,
            event_seq=state[account].open_event_seq,
            expected=state[account].name,
            found=None,
        )
    return rows


# -- the audit -------------------------------------------------------------------------


def _connect(path: Path, *, immutable: bool) -> sqlite3.Connection:
    """A read-only connection (`mode=ro`, `query_only`), autocommit so BEGIN is ours.

    `immutable=1` reads the main file alone, with no locks and no -wal/-shm files
    created; only sound when nothing is in a WAL or journal (the caller checks).
    """
    uri = f"file:{quote(str(path))}?mode=ro" + ("&immutable=1" if immutable else "")
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA query_only = ON")
    return conn


def audit_ledger(path: str | os.PathLike[str], *, expect_head: str | None = None) -> AuditReport:
    """Audit the ledger file at `path` read-only and return the report.

    Reads one consistent snapshot (safe while an engine writes to the file) and
    never creates, migrates or writes a ledger. A ledger at rest (no -wal or journal
    content) is read as `immutable`, so not even SQLite's -wal/-shm side files
    appear; if the file changed meanwhile, the audit runs again through SQLite's
    locking (which, like every WAL reader, may create the -shm index). A ledger owned
    by a `Bank` of this process is only read through SQLite (never immutable).
    `expect_head`, if given, is a head as the report's `head` gives it
    (`SEQ:HASH/EVENT_SEQ:EVENT_HASH`); each chain whose end differs from it is a
    `head_mismatch` problem. Raises `InvalidExpectedHead` (a `CannotAudit`) for any
    other `expect_head`, a bare transfers hash included, and `CannotAudit`
    (one-line reason) for a missing file, a file that is not a ledger, a newer
    schema revision, or a database SQLite cannot read.
    """
    pinned = None if expect_head is None else parse_head(expect_head)
    try:
        db = Path(os.fspath(path)).expanduser().absolute()
    except TypeError:
        raise CannotAudit(f"the audit takes a path to a ledger file (got {path!r})") from None
    # In the process that owns the ledger: no Python file I/O and no immutable mode
    # (both close descriptors behind SQLite's back); plain read-only connections only,
    # whose closes SQLite's unix VFS defers while the owner holds locks.
    try:
        owned = owned_here(db)
        _check_file(db, owned=owned)
    except OSError as exc:  # a name too long, a loop of symlinks, ...
        raise CannotAudit(f"{db}: cannot be examined ({exc.strerror or exc})") from None
    except ValueError as exc:  # a NUL in the path (a BankError is not a ValueError)
        raise CannotAudit(f"{str(db)!r}: not a usable path ({exc})") from None
    try:
        before = fingerprint(db)
        if not owned and before[3] <= 0 and before[4] <= 0:
            report = _audit_once(db, pinned, immutable=True)
            if fingerprint(db) == before:
                return report
    except OSError as exc:
        raise CannotAudit(f"{db}: {exc.strerror or exc}") from None
    return _audit_once(db, pinned, immutable=False)


def _audit_once(db: Path, pinned: Head | None, *, immutable: bool) -> AuditReport:
    started = time.perf_counter()
    problems = _Problems()
    try:
        raw = _connect(db, immutable=immutable)
    except sqlite3.Error as exc:
        raise CannotAudit(f"{db}: SQLite could not open it ({_reason(exc)})") from None
    try:
        cur = raw.cursor()
        cur.execute("BEGIN")
        # The first read pins the snapshot: every query below sees the same commit.
        revision = _check_schema(cur, db, problems)
        tables = _tables(cur)
        _audit_types(cur, tables, problems)
        formats = _chain_formats(cur, tables, problems)
        state, events, accounts_head, accounts_seq, last_transfer_seq = _audit_events(
            cur, problems, formats["account_events"]
        )
        replay = _replay_transfers(raw, state, problems, formats["transfers"])
        if last_transfer_seq > replay.last_seq:
            problems.add(
                "bad_event",
                "an account event refers to a transfer seq beyond the last transfer",
                expected=f"<= {replay.last_seq}",
                found=last_transfer_seq,
            )
        _audit_keys(cur, problems)
        accounts_checked = _audit_accounts(cur, state, replay.balances, problems)
        if pinned is not None:
            found = Head(replay.last_seq, replay.head, accounts_seq, accounts_head)
            _check_head(cur, pinned, found, problems)
        cur.execute("ROLLBACK")
        cur.close()
    except sqlite3.Error as exc:
        raise CannotAudit(f"{db}: SQLite could not read it ({_reason(exc)})") from None
    finally:
        raw.close()
    return AuditReport(
        path=str(db),
        revision=revision,
        seq=replay.last_seq,
        head_hash=replay.head,
        accounts_seq=accounts_seq,
        accounts_head_hash=accounts_head,
        transfers_checked=replay.rows,
        accounts_checked=accounts_checked,
        account_events_checked=events,
        problems=tuple(problems.kept),
        problems_total=problems.total,
        problem_counts=dict(problems.counts),
        duration_s=time.perf_counter() - started,
        expect_head=None if pinned is None else str(pinned),
    )


def _check_head(cur: sqlite3.Cursor, pinned: Head, found: Head, problems: _Problems) -> None:
    """One `head_mismatch` per chain whose end is not the pinned one, saying how it moved."""
    for table, pin_seq, pin_hash, seq, stored in (
        ("transfers", pinned.seq, pinned.hash, found.seq, found.hash),
        ("account_events", pinned.event_seq, pinned.event_hash, found.event_seq, found.event_hash),
    ):
        if (pin_seq, pin_hash) == (seq, stored):
            continue
        row = cur.execute(f"SELECT hash FROM {table} WHERE seq = ?", (pin_seq,)).fetchone()
        at_pin = row[0] if row is not None else (GENESIS if pin_seq == 0 else None)
        if at_pin is None:
            how = f"the pinned row {pin_seq} is gone: the chain now ends at {seq} (rows deleted?)"
        elif at_pin != pin_hash:
            how = f"the row at the pinned seq {pin_seq} has another hash (rewritten and re-hashed?)"
        elif seq > pin_seq:
            how = f"{seq - pin_seq} row(s) after the pinned seq {pin_seq} (appended since the pin)"
        else:
            how = f"the chain ends at {seq}, before the pinned seq {pin_seq}"
        problems.add(
            "head_mismatch",
            f"{table} head differs from the pinned one: {how}",
            seq=seq if table == "transfers" else None,
            event_seq=seq if table == "account_events" else None,
            expected=f"{pin_seq}:{pin_hash}",
            found=f"{seq}:{stored}",
        )


def _reason(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__
