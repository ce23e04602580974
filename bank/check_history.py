"""`bank check-history`: is a recorded history consistent with its ledger? (Jepsen's bank
checker, plus what it lacks: refusals, exactly-once and real-time order, checked against
the ledger itself rather than only against reads.)

The history format is documented in `bank.simulate.history`; this module depends on
that format only, not on the simulator. The ledger (a path, or an SQLite or
PostgreSQL URL) is read read-only through `bank.ledger.reader` (no `Bank`, no
lock, no migration), from one read transaction.

What is checked, and the violation kind each failure is reported as:

| rule | kind |
|---|---|
| every `ok` op's seq holds a row with its kind, accounts, amount and key | `lost_write` |
| ... and with its receipt's hash | `row_mismatch` |
| an op acknowledged twice, or one seq acknowledged to two ops | `duplicate_write`, `duplicate_ack` |
| a row of the run that no `ok`/`unknown` op accounts for: it repeats an `ok` op / a refused op / nothing | `duplicate_write` / `refused_written` / `phantom_write` |
| acknowledged before another op was invoked => smaller seq (ops and snapshots) | `realtime` |
| every snapshot sums to 0 | `wrong_total` |
| ... shows no customer below its overdraft limit | `snapshot_overdraft` |
| ... equals the replay of the ledger at its seq (the final one: `final_balance`) | `snapshot_mismatch` |
| `accounts.balance` equals the replay | `final_balance` |
| a refusal was justified at some seq position it could have seen | `unjustified_refusal` |
| one key, one row, one seq | `exactly_once` |

A refusal of op R could have been decided at any position p with `lo <= p < hi`:
`lo` is the largest seq acknowledged before R was invoked, `hi` the smallest seq
of an op invoked after R completed (per account, the engine applies operations
in seq order under the account's lock, so the balance R saw is the replayed one
at such a p). `InsufficientFunds` is justified iff at some such p the source's
replayed balance plus its limit is below the amount (the limit taken as the
smallest one in force during the window: lenient when a limit changes inside it);
`AccountNotFound` iff an account was not yet open at some p; `BalanceOverflow`
iff the debit or credit would leave signed 64 bits at some p; `IdempotencyConflict`
iff the key's row differs from the command; `InvalidCommand` iff the command breaks
a rule by itself. Other refusals (`BankClosed`, `QueueFull`, ...) depend on no
ledger state and are counted as not checked.

Cost: O(n log n) in operations, O(rows) memory: per account, the seqs at which
its balance changed and the balance after each, so a window costs a bisect and
a walk over that account's changes inside it.
"""

from __future__ import annotations

import json
import os
import time
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from sqlalchemy import Connection, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchTableError

from bank.errors import CannotCheckHistory, NotALedger
from bank.exit_codes import EXIT_OK, EXIT_PROBLEM
from bank.ledger.reader import open_read_only
from bank.limits import AMOUNT_MAX, BALANCE_MAX, BALANCE_MIN, CASH_ACCOUNT_ID, KEY_LENGTH_MAX

FORMAT_NAME: Final = "bank-history"
FORMAT_VERSIONS: Final = frozenset({1})
#: Violations kept in a result; later ones are only counted.
VIOLATIONS_KEPT_MAX: Final = 1000
#: Violations the text report prints.
VIOLATIONS_PRINTED_MAX: Final = 50

VIOLATION_KINDS: Final[dict[str, str]] = {
    "lost_write": "an acknowledged operation (or snapshot seq) is not in the ledger as answered",
    "row_mismatch": "the row at an acknowledged seq matches the command but not its receipt hash",
    "duplicate_write": "one operation is in the ledger (or acknowledged) more than once",
    "duplicate_ack": "one seq was acknowledged to two different operations",
    "refused_written": "a refused operation is in the ledger",
    "phantom_write": "a row written during the run that no operation of the history explains",
    "realtime": "an operation acknowledged before another was invoked has the larger seq",
    "wrong_total": "a snapshot's balances do not sum to 0",
    "snapshot_overdraft": "a snapshot shows a customer below its overdraft limit",
    "snapshot_mismatch": "a snapshot differs from the replay of the ledger at its seq",
    "final_balance": "final balances (last snapshot, accounts table) differ from the replay",
    "unjustified_refusal": "a refusal no balance at any seq it could have seen explains",
    "exactly_once": "one idempotency key has several rows or several acknowledged seqs",
}

_OK, _REFUSED, _UNKNOWN = 0, 1, 2
_OUTCOMES: Final = {"ok": _OK, "refused": _REFUSED, "unknown": _UNKNOWN}
#: Refusal reasons whose justification is checked against the replay.
_CHECKED_REASONS: Final = frozenset(
    {
        "InsufficientFunds",
        "AccountNotFound",
        "BalanceOverflow",
        "IdempotencyConflict",
        "InvalidCommand",
        "AccountsMustBeDifferent",
    }
)
_LEDGER_COLUMNS: Final = {
    "transfers": ("seq", "kind", "debit_account_id", "credit_account_id", "amount", "key", "hash"),
    "accounts": ("id", "balance"),
    "account_events": ("seq", "account_id", "kind", "overdraft_limit", "transfer_seq"),
}

Sig = tuple[str, int, int, int, "str | None"]


@dataclass(frozen=True, slots=True)
class Violation:
    """One inconsistency, located by operation (`teller:n`) and/or ledger seq."""

    kind: str
    message: str
    op: str | None = None
    seq: int | None = None
    other: str | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON form (only the fields that are set)."""
        out: dict[str, object] = {"kind": self.kind, "message": self.message}
        for name in ("op", "seq", "other"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(slots=True)
class HistoryCheck:
    """The verdict of `check_history`; `ok` iff no violation was found."""

    history: str
    db: str
    ops: int = 0
    acknowledged: int = 0
    refused: int = 0
    unknown: int = 0
    snapshots: int = 0
    rows_checked: int = 0
    refusals_checked: int = 0
    refusals_not_checked: int = 0
    complete: bool = True
    violations: list[Violation] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    duration_s: float = 0.0

    @property
    def total(self) -> int:
        """Violations found (kept or not)."""
        return sum(self.counts.values())

    @property
    def ok(self) -> bool:
        """True iff the history is consistent with the ledger."""
        return self.total == 0

    def add(self, kind: str, message: str, **where: Any) -> None:
        """Record a violation (kept up to `VIOLATIONS_KEPT_MAX`, always counted)."""
        self.counts[kind] += 1
        if len(self.violations) < VIOLATIONS_KEPT_MAX:
            self.violations.append(Violation(kind, message, **where))

    def as_dict(self) -> dict[str, object]:
        """The `--json` document."""
        return {
            "ok": self.ok,
            "history": self.history,
            "db": self.db,
            "ops": self.ops,
            "acknowledged": self.acknowledged,
            "refused": self.refused,
            "unknown": self.unknown,
            "snapshots": self.snapshots,
            "rows_checked": self.rows_checked,
            "refusals_checked": self.refusals_checked,
            "refusals_not_checked": self.refusals_not_checked,
            "complete": self.complete,
            "violations_total": self.total,
            "violation_counts": dict(self.counts),
            "violations": [v.as_dict() for v in self.violations],
            "duration_s": round(self.duration_s, 3),
        }


# -- reading the history ---------------------------------------------------------------


class _Op:
    """One recorded operation, as the checker needs it (debit/credit as the ledger names them)."""

    __slots__ = (
        "amount",
        "complete",
        "credit",
        "debit",
        "hash",
        "invoke",
        "key",
        "kind",
        "name",
        "outcome",
        "reason",
        "seq",
    )

    def __init__(
        self,
        name: str,
        kind: str,
        debit: int,
        credit: int,
        amount: int,
        key: str | None,
        invoke: int,
        complete: int,
        outcome: int,
        seq: int,
        hash_: str,
        reason: str,
    ) -> None:
        self.name = name
        self.kind = kind
        self.debit = debit
        self.credit = credit
        self.amount = amount
        self.key = key
        self.invoke = invoke
        self.complete = complete
        self.outcome = outcome
        self.seq = seq
        self.hash = hash_
        self.reason = reason

    def sig(self) -> Sig:
        return (self.kind, self.debit, self.credit, self.amount, self.key)


@dataclass(slots=True)
class _Snap:
    invoke: int
    complete: int
    seq: int
    balances: dict[int, int]
    final: bool
    line: int


@dataclass(slots=True)
class _History:
    header: dict[str, Any]
    ops: list[_Op]
    snaps: list[_Snap]
    end: dict[str, Any] | None
    repeated: list[tuple[_Op, _Op]]


def _is_int(v: object) -> bool:
    return type(v) is int


def _bad(path: Path, line: int, what: str) -> CannotCheckHistory:
    return CannotCheckHistory(f"{path}:{line}: {what}")


def _int_field(path: Path, line: int, obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if type(value) is not int:
        raise _bad(path, line, f"{name!r} must be an integer, got {value!r}")
    return value


def _parse_op(path: Path, line: int, obj: dict[str, Any]) -> _Op:
    # The hot loop of reading: one combined type test; the slow path names the bad field.
    get: Callable[[str], Any] = obj.get
    teller, n, amount = get("teller"), get("n"), get("amount")
    invoke, complete = get("invoke"), get("complete")
    if not (
        type(teller) is int
        and type(n) is int
        and type(amount) is int
        and type(invoke) is int
        and type(complete) is int
    ):
        for name in ("teller", "n", "amount", "invoke", "complete"):
            _int_field(path, line, obj, name)
    kind, accounts = get("kind"), get("accounts")
    if type(accounts) is not list or not all(type(a) is int for a in accounts):
        raise _bad(path, line, f"'accounts' must be a list of integers, got {accounts!r}")
    if kind == "transfer" and len(accounts) == 2:
        debit, credit = accounts
    elif kind == "deposit" and len(accounts) == 1:
        debit, credit = CASH_ACCOUNT_ID, accounts[0]
    elif kind == "withdrawal" and len(accounts) == 1:
        debit, credit = accounts[0], CASH_ACCOUNT_ID
    else:
        raise _bad(path, line, f"unknown kind {kind!r} with accounts {accounts!r}")
    key = get("key")
    if key is not None and type(key) is not str:
        raise _bad(path, line, f"'key' must be a string or null, got {key!r}")
    if complete < invoke:
        raise _bad(path, line, f"completes ({complete}) before it is invoked ({invoke})")
    given = get("outcome")
    outcome = _OUTCOMES.get(given) if type(given) is str else None
    if outcome is None:
        raise _bad(path, line, f"'outcome' must be ok, refused or unknown, got {given!r}")
    seq, hash_, reason = 0, "", ""
    if outcome == _OK:
        seq, hash_ = get("seq"), get("hash")
        if type(seq) is not int:
            _int_field(path, line, obj, "seq")
        if type(hash_) is not str:
            raise _bad(path, line, f"'hash' must be a string, got {hash_!r}")
    else:
        reason = get("reason")
        if type(reason) is not str:
            raise _bad(path, line, f"'reason' must be a string, got {reason!r}")
    return _Op(
        f"{teller}:{n}",
        kind,
        debit,
        credit,
        amount,
        key,
        invoke,
        complete,
        outcome,
        seq,
        hash_,
        reason,
    )


def _parse_snapshot(path: Path, line: int, obj: dict[str, Any]) -> _Snap:
    invoke = _int_field(path, line, obj, "invoke")
    complete = _int_field(path, line, obj, "complete")
    seq = _int_field(path, line, obj, "seq")
    raw = obj.get("balances")
    if not isinstance(raw, dict):
        raise _bad(path, line, "'balances' must be an object of account id to balance")
    balances: dict[int, int] = {}
    for k, v in raw.items():
        if not k.isdigit() or type(v) is not int:
            raise _bad(path, line, f"balance {k!r}: {v!r} is not account id: integer")
        balances[int(k)] = v
    return _Snap(invoke, complete, seq, balances, obj.get("final") is True, line)


def read_history(path: str | os.PathLike[str]) -> _History:
    """Parse a history file; raises `CannotCheckHistory` naming the first bad line."""
    p = Path(path)
    try:
        # A FIFO or a device (`/dev/zero`) would block or never end: regular files only.
        if p.exists() and not p.is_dir() and not p.is_file():
            raise CannotCheckHistory(f"{p}: not a regular file, so not a history")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CannotCheckHistory(f"{p}: no such history file") from None
    except IsADirectoryError:
        raise CannotCheckHistory(f"{p}: a directory, not a history file") from None
    except UnicodeDecodeError:
        raise CannotCheckHistory(f"{p}: not UTF-8 text, so not a history") from None
    except OSError as exc:
        raise CannotCheckHistory(f"{p}: cannot be read ({exc.strerror})") from None
    if not text:
        raise CannotCheckHistory(f"{p}: an empty file, not a history")
    if not text.endswith("\n"):
        raise CannotCheckHistory(f"{p}: the last line is cut short (a truncated history)")
    lines = text.split("\n")
    lines.pop()
    loads = json.loads
    ops: list[_Op] = []
    snaps: list[_Snap] = []
    end: dict[str, Any] | None = None
    header: dict[str, Any] = {}
    seen: dict[str, _Op] = {}
    repeated: list[tuple[_Op, _Op]] = []
    for number, raw in enumerate(lines, 1):
        try:
            obj = loads(raw)
        except ValueError:
            raise _bad(p, number, "not a JSON object (a malformed or truncated line)") from None
        if not isinstance(obj, dict):
            raise _bad(p, number, "not a JSON object")
        if number == 1:
            if obj.get("format") != FORMAT_NAME:
                raise _bad(p, 1, f"not a {FORMAT_NAME} file (no header line)")
            if obj.get("version") not in FORMAT_VERSIONS:
                raise _bad(p, 1, f"unknown history format version {obj.get('version')!r}")
            header = obj
            continue
        if end is not None:
            raise _bad(p, number, "a line after the 'end' line")
        kind = obj.get("type")
        if kind == "op":
            op = _parse_op(p, number, obj)
            first = seen.get(op.name)
            if first is None:
                seen[op.name] = op
                ops.append(op)
            else:
                repeated.append((first, op))
        elif kind == "snapshot":
            snaps.append(_parse_snapshot(p, number, obj))
        elif kind == "end":
            end = obj
        else:
            raise _bad(p, number, f"unknown line type {kind!r}")
    return _History(header, ops, snaps, end, repeated)


# -- reading the ledger ----------------------------------------------------------------


@dataclass(slots=True)
class _Ledger:
    #: (seq, kind, debit, credit, amount, key, hash) in seq order.
    rows: list[tuple[Any, ...]]
    #: (event seq, account, kind, limit, transfer_seq) in event seq order.
    events: list[tuple[Any, ...]]
    stored: dict[int, int]


def _read_rows(conn: Connection, where: str) -> _Ledger:
    """The ledger's rows, in the caller's read transaction (one snapshot)."""
    inspector = inspect(conn)
    for table, columns in _LEDGER_COLUMNS.items():
        try:
            have = {column["name"] for column in inspector.get_columns(table)}
        except NoSuchTableError:
            have = set()
        missing = [c for c in columns if c not in have]
        if missing:
            raise CannotCheckHistory(
                f"{where}: not a ledger (table {table} lacks {', '.join(missing)})"
            )
    rows = [
        tuple(row)
        for row in conn.exec_driver_sql(
            "SELECT seq, kind, debit_account_id, credit_account_id, amount, key, hash "
            "FROM transfers ORDER BY seq"
        )
    ]
    events = [
        tuple(row)
        for row in conn.exec_driver_sql(
            "SELECT seq, account_id, kind, overdraft_limit, transfer_seq "
            "FROM account_events ORDER BY seq"
        )
    ]
    stored = {int(a): int(b) for a, b in conn.exec_driver_sql("SELECT id, balance FROM accounts")}
    return _Ledger(rows, events, stored)


def _where(db: str | os.PathLike[str]) -> tuple[str | Path, str]:
    """The ledger to open (an absolute path, or a URL's text) and how messages name it."""
    text = os.fspath(db)
    if "://" in text:
        try:
            return text, make_url(text).render_as_string(hide_password=True)
        except ArgumentError:
            return text, text
    path = Path(text).expanduser().absolute()
    return path, str(path)


def read_ledger(db: str | os.PathLike[str]) -> _Ledger:
    """Every transfer, account event and stored balance, from one read-only transaction.

    `db` is a path (SQLite) or a URL (SQLite or PostgreSQL): read through
    `bank.ledger.reader`, never owned, never written.
    """
    target, where = _where(db)
    if isinstance(target, Path):
        if not target.exists():
            raise CannotCheckHistory(f"{where}: no such ledger")
        if not target.is_file():
            raise CannotCheckHistory(f"{where}: not a regular file, so not a ledger")
    try:
        ledger = open_read_only(target)
    except NotALedger as exc:
        raise CannotCheckHistory(f"{where}: not a ledger that can be read ({exc})") from None
    try:
        return ledger.read(lambda conn: _read_rows(conn, where))
    except NotALedger as exc:  # CannotOpenLedger included: the database, not the history
        raise CannotCheckHistory(f"{where}: not a ledger that can be read ({exc})") from None
    except DBAPIError as exc:  # e.g. a table that is missing altogether
        reason = str(exc.orig).splitlines()[0] if str(exc.orig) else type(exc.orig).__name__
        raise CannotCheckHistory(f"{where}: not a ledger that can be read ({reason})") from None
    finally:
        ledger.close()


# -- the replay ------------------------------------------------------------------------


class _Account:
    """One account's trajectory: balance after each seq that changed it, limits, opening."""

    __slots__ = ("bals", "limit_at", "limits", "open_at", "seqs")

    def __init__(self, open_at: int) -> None:
        self.open_at = open_at  # the account exists at every position > open_at
        self.seqs: list[int] = []
        self.bals: list[int] = []
        self.limit_at: list[int] = []  # transfer_seq of each limit (opening included)
        self.limits: list[int] = []

    def balance_range(self, lo: int, hi: int) -> tuple[int, int]:
        """(min, max) replayed balance over positions lo..hi (inclusive)."""
        seqs, bals = self.seqs, self.bals
        i = bisect_right(seqs, lo) - 1
        b = bals[i] if i >= 0 else 0
        low = high = b
        j = i + 1
        end = len(seqs)
        while j < end and seqs[j] <= hi:
            b = bals[j]
            if b < low:
                low = b
            elif b > high:
                high = b
            j += 1
        return low, high

    def smallest_limit(self, lo: int, hi: int) -> int:
        """The smallest overdraft limit in force at some position in lo..hi."""
        at = self.limit_at
        if not at:
            return 0
        i = max(0, bisect_right(at, lo) - 1)
        j = bisect_right(at, hi)
        return min(self.limits[i : max(j, i + 1)])


def _customer(account: int) -> bool:
    return account != CASH_ACCOUNT_ID


# -- the check -------------------------------------------------------------------------


def check_history(history: str | os.PathLike[str], db: str | os.PathLike[str]) -> HistoryCheck:
    """Check the history file against the ledger at `db` (read-only).

    Returns the verdict; raises `CannotCheckHistory` (one-line reason) for a missing
    or malformed history, a file that is not a ledger, or a history of another ledger.
    """
    started = time.perf_counter()
    hist_path = Path(os.fspath(history))
    _, where = _where(db)
    h = read_history(hist_path)
    ledger = read_ledger(db)
    result = HistoryCheck(history=str(hist_path), db=where)
    _Checker(h, ledger, result, where).run()
    result.duration_s = time.perf_counter() - started
    return result


class _Checker:
    """One check run; the steps share the replay and the real-time indexes."""

    def __init__(self, h: _History, ledger: _Ledger, result: HistoryCheck, db: str) -> None:
        self.h = h
        self.ledger = ledger
        self.r = result
        self.db = db
        self.by_seq: dict[int, tuple[Any, ...]] = {row[0]: row for row in ledger.rows}
        self.last_seq = ledger.rows[-1][0] if ledger.rows else 0
        self.accounts: dict[int, _Account] = {}
        self.key_rows: dict[str, list[int]] = {}
        ok = [op for op in h.ops if op.outcome == _OK]
        self.ok = ok
        initial = min(h.snaps, key=lambda s: s.invoke, default=None)
        self.start_seq = initial.seq if initial is not None else 0
        # The run's rows are (start_seq, end_seq]; later ones belong to later users.
        final = [s.seq for s in h.snaps if s.final]
        self.end_seq = max(final) if final and h.end is not None else self.last_seq
        self.claimed: dict[int, _Op] = {}  # seq -> the ok op whose row it is
        self.found: set[str] = set()  # ok ops whose row is at their seq

    def run(self) -> None:
        r, h = self.r, self.h
        r.ops = len(h.ops)
        r.acknowledged = len(self.ok)
        r.refused = sum(1 for op in h.ops if op.outcome == _REFUSED)
        r.unknown = sum(1 for op in h.ops if op.outcome == _UNKNOWN)
        r.snapshots = len(h.snaps)
        r.rows_checked = len(self.ledger.rows)
        r.complete = h.end is not None
        self._check_identity()
        self._check_acknowledged()
        self._index_realtime()
        self._replay()
        self._check_rows_of_run()
        self._check_realtime()
        self._check_refusals()
        self._check_keys()

    # identity: a history of another ledger cannot be checked (exit 2), not "all lost"
    def _check_identity(self) -> None:
        with_hash = [op for op in self.ok if op.hash]
        if not with_hash:
            return
        for op in with_hash:
            row = self.by_seq.get(op.seq)
            if row is not None and isinstance(row[6], str) and row[6].startswith(op.hash):
                return
        recorded = self.h.header.get("ledger")
        raise CannotCheckHistory(
            f"{self.db}: not the ledger of this history (none of its {len(with_hash)} "
            f"acknowledged operations is at its seq; it was recorded on {recorded})"
        )

    # real time: acknowledged-before-invoked bounds, as sorted arrays with prefix extremes
    def _index_realtime(self) -> None:
        # Only ops whose row was found: one lost op's bogus seq must not make every
        # later op and refusal look out of order.
        found = [op for op in self.ok if op.name in self.found]
        by_complete = sorted(found, key=lambda op: op.complete)
        self.complete_times = [op.complete for op in by_complete]
        self.prefix_max: list[_Op] = []
        best: _Op | None = None
        for op in by_complete:
            if best is None or op.seq > best.seq:
                best = op
            self.prefix_max.append(best)
        by_invoke = sorted(found, key=lambda op: op.invoke)
        self.by_invoke = by_invoke
        self.invoke_times = [op.invoke for op in by_invoke]
        self.suffix_min: list[_Op] = list(by_invoke)
        for i in range(len(by_invoke) - 2, -1, -1):
            if self.suffix_min[i + 1].seq < self.suffix_min[i].seq:
                self.suffix_min[i] = self.suffix_min[i + 1]

    def _acked_before(self, t: int) -> _Op | None:
        """The op with the largest seq among those acknowledged before time t."""
        i = bisect_left(self.complete_times, t)
        return self.prefix_max[i - 1] if i else None

    def _invoked_after(self, t: int) -> _Op | None:
        """The op with the smallest seq among those invoked after time t."""
        i = bisect_right(self.invoke_times, t)
        return self.suffix_min[i] if i < len(self.suffix_min) else None

    def _window(self, invoke: int, complete: int) -> tuple[int, int]:
        """Positions (inclusive) an op or read over [invoke, complete] could have seen."""
        before = self._acked_before(invoke)
        after = self._invoked_after(complete)
        lo = max(self.start_seq, before.seq if before is not None else 0)
        end = min(self.last_seq, max(self.end_seq, lo))
        hi = min(end, after.seq - 1 if after is not None else end)
        return lo, max(lo, hi)

    # the replay, with snapshots compared at their seq
    def _replay(self) -> None:
        accounts = self.accounts
        events = sorted(
            (e for e in self.ledger.events if _is_int(e[1]) and _is_int(e[4]) and _is_int(e[3])),
            key=lambda e: (e[4], e[0]),
        )
        for _, account, kind, limit, transfer_seq in events:
            if kind == "open" and account not in accounts:
                accounts[account] = _Account(transfer_seq)
            state = accounts.get(account)
            if state is not None and kind in ("open", "limit"):
                state.limit_at.append(transfer_seq)
                state.limits.append(limit)
        # Limits in force at the current position, for the snapshot checks.
        limit_events = [(e[4], e[1], e[3]) for e in events]
        next_event = 0
        current_limit: dict[int, int] = {}
        balances: dict[int, int] = dict.fromkeys(accounts, 0)
        snaps = sorted(self.h.snaps, key=lambda s: s.seq)
        next_snap = 0
        key_rows = self.key_rows
        pos = 0

        def settle(position: int) -> None:
            """Compare every snapshot at `position` and apply events that took effect by then."""
            nonlocal next_snap, next_event
            while next_event < len(limit_events) and limit_events[next_event][0] <= position:
                _, account, limit = limit_events[next_event]
                current_limit[account] = limit
                next_event += 1
            while next_snap < len(snaps) and snaps[next_snap].seq <= position:
                self._check_snapshot(snaps[next_snap], balances, current_limit)
                next_snap += 1

        for row in self.ledger.rows:
            seq, kind, debit, credit, amount, key = row[:6]
            if not (_is_int(seq) and _is_int(debit) and _is_int(credit) and _is_int(amount)):
                continue  # a row of the wrong types: the audit reports it
            settle(seq - 1)
            pos = seq
            if key is not None:
                key_rows.setdefault(key, []).append(seq)
            for account, delta in ((debit, -amount), (credit, amount)):
                b = balances.get(account, 0) + delta
                balances[account] = b
                state = accounts.get(account)
                if state is None:
                    state = accounts[account] = _Account(-1)
                state.seqs.append(seq)
                state.bals.append(b)
        settle(pos)
        for snap in snaps[next_snap:]:
            self.r.add(
                "lost_write",
                f"a snapshot (line {snap.line}) was read at seq {snap.seq}, "
                f"but the ledger ends at seq {self.last_seq}",
                seq=snap.seq,
            )
        for account, stored in sorted(self.ledger.stored.items()):
            replayed = balances.get(account, 0)
            if stored != replayed:
                self.r.add(
                    "final_balance",
                    f"account {account}: accounts.balance is {stored}, the replay gives {replayed}",
                    seq=self.last_seq,
                )

    def _check_snapshot(
        self, snap: _Snap, balances: dict[int, int], limits: dict[int, int]
    ) -> None:
        r = self.r
        total = sum(snap.balances.values())
        if total != 0:
            r.add(
                "wrong_total",
                f"the snapshot (line {snap.line}) at seq {snap.seq} sums to {total}, not 0",
                seq=snap.seq,
            )
        kind = "final_balance" if snap.final else "snapshot_mismatch"
        differ = 0
        for account, balance in snap.balances.items():
            if _customer(account) and balance < -limits.get(account, 0):
                r.add(
                    "snapshot_overdraft",
                    f"the snapshot (line {snap.line}) at seq {snap.seq} shows account {account} "
                    f"at {balance}, below its limit -{limits.get(account, 0)}",
                    seq=snap.seq,
                )
            replayed = balances.get(account)
            if replayed != balance:
                differ += 1
                if differ <= 3:
                    r.add(
                        kind,
                        f"the snapshot (line {snap.line}) at seq {snap.seq} shows account "
                        f"{account} at {balance}; the replay gives {replayed}",
                        seq=snap.seq,
                    )
        if differ > 3:
            r.add(
                kind, f"... and {differ - 3} more accounts differ at seq {snap.seq}", seq=snap.seq
            )
        lo, hi = self._window(snap.invoke, snap.complete)
        if not lo <= snap.seq <= hi:
            r.add(
                "realtime",
                f"the snapshot (line {snap.line}) read seq {snap.seq}, but it could only have "
                f"seen seq {lo} to {hi} (acknowledged before it / invoked after it)",
                seq=snap.seq,
            )

    # acknowledged operations: their row, once
    def _check_acknowledged(self) -> None:
        r = self.r
        for first, again in self.h.repeated:
            r.add(
                "duplicate_write",
                f"operation {first.name} is recorded twice "
                f"({_outcome_text(first)}, then {_outcome_text(again)})",
                op=first.name,
                seq=again.seq or first.seq or None,
            )
        for op in self.ok:
            row = self.by_seq.get(op.seq)
            if row is None:
                r.add(
                    "lost_write",
                    f"{op.kind} of {op.amount} was acknowledged with seq {op.seq}, "
                    f"which is not in the ledger (it ends at seq {self.last_seq})",
                    op=op.name,
                    seq=op.seq,
                )
                continue
            if tuple(row[1:6]) != op.sig():
                r.add(
                    "lost_write",
                    f"acknowledged as seq {op.seq}, but that row is {_row_text(row)}, "
                    f"not this {_sig_text(op.sig())}",
                    op=op.name,
                    seq=op.seq,
                )
                continue
            if op.hash and not (isinstance(row[6], str) and row[6].startswith(op.hash)):
                r.add(
                    "row_mismatch",
                    f"seq {op.seq} holds the command but its hash {str(row[6])[:16]} is not "
                    f"the receipt's {op.hash}: the row was rewritten",
                    op=op.name,
                    seq=op.seq,
                )
            self.found.add(op.name)
            holder = self.claimed.get(op.seq)
            if holder is None:
                self.claimed[op.seq] = op
            elif holder.key is None or holder.key != op.key:
                r.add(
                    "duplicate_ack",
                    f"seq {op.seq} was acknowledged to {holder.name} and to {op.name}",
                    op=op.name,
                    seq=op.seq,
                    other=holder.name,
                )

    # rows of the run that no op accounts for
    def _check_rows_of_run(self) -> None:
        r, h = self.r, self.h
        unknown_pool: Counter[Sig] = Counter()
        unknown: dict[Sig, _Op] = {}
        unknown_keys: dict[str, _Op] = {}
        refused: dict[Sig, _Op] = {}
        acked: dict[Sig, _Op] = {}
        for op in h.ops:
            if op.outcome == _UNKNOWN:
                if op.key is not None:
                    unknown_keys[op.key] = op
                else:
                    unknown_pool[op.sig()] += 1
                    unknown.setdefault(op.sig(), op)
            elif op.outcome == _REFUSED:
                refused.setdefault(op.sig(), op)
            else:
                acked.setdefault(op.sig(), op)
        end_seq = self.end_seq
        for row in self.ledger.rows:
            seq = row[0]
            if not _is_int(seq) or seq <= self.start_seq or seq > end_seq or seq in self.claimed:
                continue
            sig: Sig = tuple(row[1:6])
            key = sig[4]
            if key is not None and key in unknown_keys and unknown_keys[key].sig() == sig:
                continue  # an unknown op that did commit: fine, once (exactly_once checks)
            if key is None and unknown_pool[sig] > 0:
                unknown_pool[sig] -= 1
                continue
            if not h.end:
                continue  # an unfinished run: the op may just not have been recorded
            if sig in refused:
                op = refused[sig]
                r.add(
                    "refused_written",
                    f"{op.name} was refused ({op.reason}) but seq {seq} is {_sig_text(sig)}",
                    op=op.name,
                    seq=seq,
                )
            elif sig in unknown:
                op = unknown[sig]
                r.add(
                    "duplicate_write",
                    f"seq {seq} repeats {op.name} ({_sig_text(sig)}, outcome unknown), "
                    "which is already in the ledger: an unknown op is there at most once",
                    op=op.name,
                    seq=seq,
                )
            elif sig in acked:
                op = acked[sig]
                r.add(
                    "duplicate_write",
                    f"seq {seq} repeats {op.name} ({_sig_text(sig)}, acknowledged as seq {op.seq})",
                    op=op.name,
                    seq=seq,
                )
            else:
                r.add(
                    "phantom_write",
                    f"seq {seq} ({_sig_text(sig)}) was written during the run by no "
                    "operation of the history",
                    seq=seq,
                )

    def _check_realtime(self) -> None:
        for op in self.by_invoke:
            before = self._acked_before(op.invoke)
            if before is not None and before.seq > op.seq:
                self.r.add(
                    "realtime",
                    f"{before.name} (seq {before.seq}) was acknowledged before {op.name} was "
                    f"invoked, yet {op.name} has the smaller seq {op.seq}",
                    op=op.name,
                    seq=op.seq,
                    other=before.name,
                )

    def _check_refusals(self) -> None:
        r = self.r
        for op in self.h.ops:
            if op.outcome != _REFUSED:
                continue
            if op.reason not in _CHECKED_REASONS:
                r.refusals_not_checked += 1
                continue
            r.refusals_checked += 1
            lo, hi = self._window(op.invoke, op.complete)
            why = self._unjustified(op, lo, hi)
            if why is not None:
                r.add(
                    "unjustified_refusal",
                    f"{_sig_text(op.sig())} refused with {op.reason}, but {why} "
                    f"at every seq from {lo} to {hi}",
                    op=op.name,
                    seq=lo,
                )

    def _unjustified(self, op: _Op, lo: int, hi: int) -> str | None:
        """None if the refusal is justified somewhere in lo..hi, else why not."""
        reason = op.reason
        if reason in ("InvalidCommand", "AccountsMustBeDifferent"):
            key_ok = op.key is None or 1 <= len(op.key) <= KEY_LENGTH_MAX
            if op.debit == op.credit or not 1 <= op.amount <= AMOUNT_MAX or not key_ok:
                return None
            return "the command is valid"
        if reason == "IdempotencyConflict":
            seqs = self.key_rows.get(op.key) if op.key is not None else None
            for seq in seqs or ():
                if seq <= hi and tuple(self.by_seq[seq][1:6]) != op.sig():
                    return None
            return "no other command holds its key"
        debit = self.accounts.get(op.debit)
        credit = self.accounts.get(op.credit)
        if reason == "AccountNotFound":
            for state in (debit, credit):
                if state is None or state.open_at >= lo:
                    return None
            return "both accounts were open"
        if debit is None or credit is None or max(debit.open_at, credit.open_at) >= hi:
            return "an account was not open (AccountNotFound was due)"
        lo = max(lo, debit.open_at, credit.open_at)
        low, _ = debit.balance_range(lo, hi)
        if reason == "BalanceOverflow":
            _, high = credit.balance_range(lo, hi)
            if low - op.amount < BALANCE_MIN or high + op.amount > BALANCE_MAX:
                return None
            return "both balances stayed within signed 64 bits"
        assert reason == "InsufficientFunds"
        if not _customer(op.debit):
            return "@cash has no overdraft limit"
        limit = debit.smallest_limit(lo, hi)
        if low - op.amount < -limit:
            return None
        return f"account {op.debit} had at least {low + limit} available"

    def _check_keys(self) -> None:
        r = self.r
        acked: dict[str, set[int]] = {}
        names: dict[str, str] = {}
        for op in self.ok:
            if op.key is not None:
                acked.setdefault(op.key, set()).add(op.seq)
                names.setdefault(op.key, op.name)
        keys: Iterable[str] = {op.key for op in self.h.ops if op.key is not None}
        for key in sorted(keys):
            rows = self.key_rows.get(key, [])
            seqs = acked.get(key, set())
            if len(rows) > 1:
                r.add(
                    "exactly_once",
                    f"key {key!r} is on {len(rows)} rows (seqs {rows[:5]})",
                    op=names.get(key),
                    seq=rows[1],
                )
            if len(seqs) > 1:
                r.add(
                    "exactly_once",
                    f"key {key!r} was acknowledged with {len(seqs)} seqs {sorted(seqs)[:5]}",
                    op=names.get(key),
                    seq=max(seqs),
                )
            elif seqs and rows and rows[0] not in seqs:
                r.add(
                    "exactly_once",
                    f"key {key!r} was acknowledged as seq {min(seqs)} but is at seq {rows[0]}",
                    op=names.get(key),
                    seq=rows[0],
                )


def _sig_text(sig: Sig) -> str:
    kind, debit, credit, amount, key = sig
    keyed = f" key {key!r}" if key is not None else ""
    return f"{kind} {debit}->{credit} of {amount}{keyed}"


def _row_text(row: tuple[Any, ...]) -> str:
    return _sig_text(tuple(row[1:6]))


def _outcome_text(op: _Op) -> str:
    if op.outcome == _OK:
        return f"ok seq {op.seq}"
    return f"{'refused' if op.outcome == _REFUSED else 'unknown'} {op.reason}"


def print_report(result: HistoryCheck, out: TextIO) -> None:
    """The human-readable verdict: a summary line, then the first violations."""
    verdict = "CONSISTENT" if result.ok else f"{result.total} VIOLATION(S)"
    print(
        f"history {result.history} against {result.db}: {verdict}\n"
        f"  {result.ops} ops ({result.acknowledged} ok, {result.refused} refused, "
        f"{result.unknown} unknown), {result.snapshots} snapshots, {result.rows_checked} "
        f"ledger rows; {result.refusals_checked} refusals checked, "
        f"{result.refusals_not_checked} not checkable; {result.duration_s:.2f} s",
        file=out,
    )
    if not result.complete:
        print("  note: the history has no 'end' line (the run did not finish)", file=out)
    if result.counts:
        counts = ", ".join(f"{k} {n}" for k, n in sorted(result.counts.items()))
        print(f"  by kind: {counts}", file=out)
    for v in result.violations[:VIOLATIONS_PRINTED_MAX]:
        where = " ".join(
            part
            for part in (
                f"op {v.op}" if v.op else "",
                f"seq {v.seq}" if v.seq is not None else "",
            )
            if part
        )
        print(f"  {v.kind:20} {where:24} {v.message}", file=out)
    if result.total > VIOLATIONS_PRINTED_MAX:
        print(f"  ... {result.total - VIOLATIONS_PRINTED_MAX} more (see --json)", file=out)


def run_check_history_command(history: str, db: str, *, as_json: bool, out: TextIO) -> int:
    """`bank check-history`: 0 consistent, 1 violations (raises `CannotCheckHistory` for 2)."""
    result = check_history(history, db)
    if as_json:
        out.write(json.dumps(result.as_dict(), indent=2) + "\n")
    else:
        print_report(result, out)
    return EXIT_OK if result.ok else EXIT_PROBLEM
