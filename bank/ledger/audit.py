"""The ledger audit: a read-only, streaming re-derivation of everything the engine claims.

The audit trusts nothing the engine computed. It opens the file read-only, takes
one read transaction (a consistent snapshot, even while an engine is writing),
re-hashes both chains with the formula documented in `bank.ledger.chain`
(re-implemented inline on purpose: a bug there must not hide itself), replays
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
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from bank.errors import CannotAudit
from bank.ledger.migrate import SQLITE_MAGIC, known_revisions
from bank.ledger.sqlite import owned_here
from bank.ledger.views import AUDIT_VIEWS, REVISIONS_WITHOUT_VIEWS, normalize_sql
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
    "schema": "the database's tables, indexes, views or triggers differ from its schema revision",
    "seq_gap": "transfers.seq skips numbers: rows were deleted",
    "bad_seq": "a transfers.seq below 1 (a forged row)",
    "hash_mismatch": "a transfer does not hash to its stored hash from the previous row's hash",
    "head_mismatch": "the head hash differs from the one the auditor expected",
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
    "event_hash_mismatch": "an account event does not hash to its stored hash from the previous one",
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
_INDEXES: Final = ("uq_transfers_key",)

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

    `seq` is the last transfer seq of the snapshot audited and `head_hash` its hash
    (record it elsewhere and pass it back as `expect_head`); `problems` holds the
    first `PROBLEMS_KEPT_MAX` problems, `problems_total` counts them all.
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
    if head != SQLITE_MAGIC and _sidecar(path, "-journal") > 0:
        raise CannotAudit(
            f"{path}: a write was interrupted (a hot -journal); `bank init` recovers it"
        )
    if head and head != SQLITE_MAGIC:
        raise CannotAudit(f"{path}: not an SQLite database, so not a ledger")


def _check_schema(cur: sqlite3.Cursor, path: Path, problems: _Problems) -> str:
    """The schema revision, after checking the file is a `bank` ledger this code can read.

    Raises `CannotAudit` when it is not; reports a `schema` problem for a ledger whose
    indexes, views or triggers were changed after the fact.
    """
    objects = {
        (kind, name): sql
        for kind, name, sql in cur.execute("SELECT type, name, sql FROM sqlite_master")
    }
    tables = {name for kind, name in objects if kind == "table"}
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
            f"{path}: schema revision {revision!r} is newer than this bank knows; upgrade bank to audit it"
        )
    for table, columns in _COLUMNS.items():
        if table not in tables:
            raise CannotAudit(f"{path}: table {table!r} is missing (revision {revision})")
        have = {row[1] for row in cur.execute(f"PRAGMA table_info({table})")}
        missing = [c for c in columns if c not in have]
        if missing:
            raise CannotAudit(f"{path}: table {table!r} lacks column(s) {', '.join(missing)}")
    for index in _INDEXES:
        if ("index", index) not in objects:
            problems.add(
                "schema",
                f"index {index} is missing: duplicate keys are no longer refused",
                expected=index,
                found=None,
            )
    for kind, name in objects:
        if kind == "trigger":
            problems.add(
                "schema",
                f"unexpected trigger {name}: the ledger defines none",
                expected=None,
                found=name,
            )
    if revision not in REVISIONS_WITHOUT_VIEWS:
        for name, sql in AUDIT_VIEWS.items():
            stored = objects.get(("view", name))
            if stored is None:
                problems.add("schema", f"view {name} is missing", expected=name, found=None)
            elif normalize_sql(stored) != normalize_sql(sql):
                problems.add(
                    "schema",
                    f"view {name} was redefined: its text differs from the documented one",
                    expected=name,
                    found=stored.strip()[:200],
                )
    return str(revision)


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


def _audit_events(
    cur: sqlite3.Cursor, problems: _Problems
) -> tuple[dict[int, _AccountState], int, str, int, int]:
    """Check the account_events chain; returns (accounts, rows, head hash, last seq, max transfer_seq)."""
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
        text = f"{prev}\n{seq}|{account}|{kind}|{limit}|{transfer_seq}|{ts_us}|{name}"
        computed = sha256(text.encode()).hexdigest()
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


def _replay_transfers(
    conn: sqlite3.Connection, accounts: dict[int, _AccountState], problems: _Problems
) -> _Replay:
    """Stream `transfers` in seq order: chain, per-row rules, and the balance replay.

    The loop is the audit's hot path: plain tuples, locals only, and one combined
    test per row that sends the rare bad row to `_check_row` for the details.
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
            computed = hasher(
                f"{prev}\n{seq}|{kind}|{debit}|{credit}|{amount}|{ts_us}|{key or ''}".encode()
            ).hexdigest()
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


def _sidecar(path: Path, suffix: str) -> int:
    """Size of `path` + suffix (-wal, -journal), -1 when absent."""
    try:
        return path.with_name(path.name + suffix).stat().st_size
    except FileNotFoundError:
        return -1


def _fingerprint(path: Path) -> tuple[int, int, int, int, int]:
    """What changes when anyone writes the ledger: the file's identity, size, mtime, WAL size."""
    st = path.stat()
    return (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        _sidecar(path, "-wal"),
        _sidecar(path, "-journal"),
    )


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
    `expect_head`, if given, must equal the snapshot's transfers head hash (else a
    `head_mismatch` problem). Raises `CannotAudit` (one-line reason) for a missing
    file, a file that is not a ledger, a newer schema revision, or a database
    SQLite cannot read.
    """
    db = Path(os.fspath(path)).expanduser().absolute()
    # In the process that owns the ledger: no Python file I/O and no immutable mode
    # (both close descriptors behind SQLite's back); plain read-only connections only,
    # whose closes SQLite's unix VFS defers while the owner holds locks.
    owned = owned_here(db)
    _check_file(db, owned=owned)
    try:
        before = _fingerprint(db)
        if not owned and before[3] <= 0 and before[4] <= 0:
            report = _audit_once(db, expect_head, immutable=True)
            if _fingerprint(db) == before:
                return report
    except OSError as exc:
        raise CannotAudit(f"{db}: {exc.strerror or exc}") from None
    return _audit_once(db, expect_head, immutable=False)


def _audit_once(db: Path, expect_head: str | None, *, immutable: bool) -> AuditReport:
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
        state, events, accounts_head, accounts_seq, last_transfer_seq = _audit_events(cur, problems)
        replay = _replay_transfers(raw, state, problems)
        if last_transfer_seq > replay.last_seq:
            problems.add(
                "bad_event",
                "an account event refers to a transfer seq beyond the last transfer",
                expected=f"<= {replay.last_seq}",
                found=last_transfer_seq,
            )
        _audit_keys(cur, problems)
        accounts_checked = _audit_accounts(cur, state, replay.balances, problems)
        if expect_head is not None and expect_head != replay.head:
            row = cur.execute("SELECT seq FROM transfers WHERE hash = ?", (expect_head,)).fetchone()
            where = f"; it is the hash of seq {row[0]}" if row else "; no row has that hash"
            problems.add(
                "head_mismatch",
                f"head hash differs from the expected one{where}",
                seq=replay.last_seq,
                expected=expect_head,
                found=replay.head,
            )
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
        expect_head=expect_head,
    )


def _reason(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__
