"""The audit's fast path: one seq range of transfers checked on its own, then joined.

Each row's hash can be checked once the previous row's stored hash is known, and
each account's replay within a range is a running sum from an unknown start. So a
range yields its chain ends, each account's net change, its lowest margin above
its floor and its highest running balance; `join_ranges` then chains the ranges
and checks every limit with the true starting balances. The stored running balances
(revision 0005) minus the range's running change must give one start per account,
which must be that account's true balance before the range; an account closed in the
range records its change up to the close, which must bring it to 0, and touching it
afterwards is out of the ordinary. Both are pure.

This path only proves a clean ledger clean, type of every value included (so the
audit skips its scan of `transfers` for `bad_type` when every range is clean): `%d`
never meets anything but an int (`a | b | ...` first), a key is a text or NULL, a
stored hash a text. At the first thing out of the ordinary (a gap, a mismatch, a bad row, an
account not open, a limit broken across ranges) it gives up, and the audit runs
the exact serial pass (`bank.ledger.audit_replay`), which names every problem in
order. The reports are the same either way.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any, Final

from bank.ledger.audit_chain import GENESIS, KIND_CODES, KIND_SIDES, Formats, transfer_hash
from bank.ledger.audit_events import LimitEvent
from bank.limits import (
    AMOUNT_MAX,
    BALANCE_MAX,
    BALANCE_MIN,
    CASH_ACCOUNT_ID,
    OVERDRAFT_LIMIT_MAX,
)

# Version-2 messages with the prev hash (64 ASCII hex digits: a stored hash that is not
# breaks its own row first) and V(kind) filled in; `%d` refuses a text.
_V2_NO_KEY: Final = "bank:transfers:2\ns64:%si%d;%s%s%si%d;i%d;n"
_V2_KEY: Final = "bank:transfers:2\ns64:%si%d;%s%s%si%d;i%d;s%d:%s"
# Version 3 (revision 0006) of a row with no hold or group (those go to the exact pass):
# the running balances, then four NULLs.
_V3_NO_KEY: Final = "bank:transfers:3\ns64:%si%d;%s%s%si%d;i%d;ni%d;i%d;nnnn"
_V3_KEY: Final = "bank:transfers:3\ns64:%si%d;%s%s%si%d;i%d;s%d:%si%d;i%d;nnnn"
#: kind -> (V(kind), where it has @cash: see `KIND_SIDES`), one look-up per row.
_KINDS: Final = {kind: (KIND_CODES[kind], side) for kind, side in KIND_SIDES.items()}
#: Above every margin a real balance can have: "not touched in this range".
_UNTOUCHED: Final = 1 << 80


@dataclass(slots=True)
class RangeSummary:
    """What one range of transfers `lo..hi` gave (`clean` False: give up, run the exact pass)."""

    lo: int
    hi: int
    clean: bool
    rows: int = 0
    prev: object = None  # the stored hash of the row before `lo`, as this range read it
    last_hash: object = None
    deltas: dict[int, int] = field(default_factory=dict)  # account -> net change
    lows: dict[int, int] = field(default_factory=dict)  # min(running change - floor), debits
    highs: dict[int, int] = field(default_factory=dict)  # max(running change), credits
    starts: dict[int, int] = field(default_factory=dict)  # balance before `lo`, as stored
    closes: dict[int, int] = field(default_factory=dict)  # net change up to its close


def split(first: int, last: int, parts: int) -> list[tuple[int, int]]:
    """`first..last` cut into at most `parts` consecutive ranges of near-equal length."""
    count = last - first + 1
    parts = max(1, min(parts, count))
    size, extra = divmod(count, parts)
    ranges: list[tuple[int, int]] = []
    lo = first
    for i in range(parts):
        hi = lo + size - 1 + (1 if i < extra else 0)
        ranges.append((lo, hi))
        lo = hi + 1
    return ranges


#: Accounts kept in lists (faster than dicts) when every id is below this.
_LIST_IDS_MAX: Final = 1 << 20


def _table(ids: set[int], fill: Any) -> Any:
    """Per-account values, `fill` for each of `ids`: a list when the ids are small
    non-negative ints (an unknown id then raises IndexError), else a dict (KeyError)."""
    if all(0 <= i < _LIST_IDS_MAX for i in ids):
        return [fill] * (max(ids, default=0) + 1)
    return dict.fromkeys(ids, fill)


def _items(table: Any, skip: object) -> dict[int, int]:
    pairs = enumerate(table) if isinstance(table, list) else table.items()
    return {account: value for account, value in pairs if value != skip and value is not None}


def check_range(
    lo: int,
    hi: int,
    prev: object,
    rows: Iterable[tuple[Any, ...]],
    limit_events: Sequence[LimitEvent],
    formats: Formats,
    running: bool = True,
    *,
    own_process: bool = False,
) -> RangeSummary:
    """Check transfers `lo..hi` (rows in seq order, the table's column order) chained to
    `prev`, the stored hash before `lo` (None: `lo` is the first row). `running`: the
    rows' last two columns are running balances to check (False: NULLs, before 0005).

    `own_process`: the caller is an audit worker process, whose collector this may
    switch off for the loop. In any other process (an application's, auditing its own
    bank) the collector is the application's: a library never changes it.

    The loop is the audit's hot path: locals only, one `%` format per message, and
    one combined test per row; `a | b | ...` raises for anything but ints (a REAL, a
    text), and a negative id or seq is out of the ordinary too.
    """
    start_prev = GENESIS if prev is None else prev
    ids = {account for _, account, kind, _ in limit_events if kind == "open"}
    floors = _table(ids, None)
    deltas = _table(ids, None)  # None: not open (yet), so `+`/`-` raise TypeError (dirty)
    lows = _table(ids, _UNTOUCHED)
    highs = _table(ids, -_UNTOUCHED)
    starts = _table(ids, None)  # None: no row of the account seen yet
    closes: dict[int, int] = {}
    # V(id) of every account, looked up instead of formatted (an unknown id: dirty).
    accounts = (
        [f"i{i};" for i in range(len(floors))]
        if isinstance(floors, list)
        else {i: f"i{i};" for i in ids}
    )
    events = iter(limit_events)
    pending = next(events, None)

    def apply_events(seq: int) -> int:
        """The serial pass's `apply_events`, for the floors alone (balances start at 0)."""
        nonlocal pending
        while pending is not None and pending[0] < seq:
            _, account, kind, limit = pending
            floor = -limit if type(limit) is int and 0 <= limit <= OVERDRAFT_LIMIT_MAX else 0
            if account == CASH_ACCOUNT_ID:
                floor = BALANCE_MIN
            if kind == "open" and floors[account] is None:
                floors[account] = floor
                deltas[account] = 0
            elif kind == "limit" and account in ids and floors[account] is not None:
                floors[account] = floor
            elif (
                kind == "close"
                and account in ids
                and account != CASH_ACCOUNT_ID
                and deltas[account] is not None
            ):
                closes[account] = deltas[account]
                deltas[account] = None  # touched after its close: TypeError, dirty
            pending = next(events, None)
        return pending[0] if pending is not None else BALANCE_MAX

    switches = list(formats)
    version = 1

    def next_stop(seq: int) -> int:
        """Apply what changes before row `seq`; the next seq at which something does."""
        nonlocal version
        event_at = apply_events(seq)
        while switches and switches[0][0] <= seq:
            version = switches.pop(0)[1]
        switch_at = switches[0][0] if switches else BALANCE_MAX
        return min(event_at + 1, switch_at)

    stop = next_stop(lo)
    kinds = _KINDS
    amount_max = AMOUNT_MAX
    no_key = _V2_NO_KEY
    with_key = _V2_KEY
    v3_no_key = _V3_NO_KEY
    v3_key = _V3_KEY
    hasher = sha256
    expected = lo
    last = start_prev
    dirty = RangeSummary(lo, hi, clean=False)
    # Every row is a fresh tuple of ints and texts (no cycles): the cyclic collector
    # would only scan them, every 700 rows (in a worker process of the audit's own).
    collecting = own_process and gc.isenabled()
    if collecting:
        gc.disable()
    try:
        for (
            seq,
            key,
            kind,
            debit,
            credit,
            amount,
            ts_us,
            stored,
            after_d,
            after_c,
            hold_seq,
            expires_us,
            link_first,
            link_count,
        ) in rows:
            if seq != expected:
                return dirty
            if (
                hold_seq is not None
                or expires_us is not None
                or link_first is not None
                or link_count is not None
            ):
                return dirty  # holds and groups: the exact pass replays them
            expected += 1
            if seq >= stop:
                stop = next_stop(seq)
            code, sides = kinds[kind]
            if version == 2:
                if key is None:
                    text = no_key % (
                        last,
                        seq,
                        code,
                        accounts[debit],
                        accounts[credit],
                        amount,
                        ts_us,
                    )
                elif key.__class__ is str:
                    size = len(key) if key.isascii() else len(key.encode())
                    text = with_key % (
                        last,
                        seq,
                        code,
                        accounts[debit],
                        accounts[credit],
                        amount,
                        ts_us,
                        size,
                        key,
                    )
                else:
                    return dirty  # a key that is not a text (a BLOB)
                if hasher(text.encode()).hexdigest() != stored:
                    return dirty
            elif version == 3:
                if key is None:
                    text = v3_no_key % (
                        last, seq, code, accounts[debit], accounts[credit], amount, ts_us,
                        after_d, after_c,
                    )  # fmt: skip
                elif key.__class__ is str:
                    size = len(key) if key.isascii() else len(key.encode())
                    text = v3_key % (
                        last, seq, code, accounts[debit], accounts[credit], amount, ts_us,
                        size, key, after_d, after_c,
                    )  # fmt: skip
                else:
                    return dirty
                if hasher(text.encode()).hexdigest() != stored:
                    return dirty
            elif (
                transfer_hash(version, last, seq, kind, debit, credit, amount, ts_us, key) != stored
            ):
                return dirty
            last = stored
            if (
                (seq | debit | credit | amount | ts_us) < 0
                or not 0 < amount <= amount_max
                or sides != (debit == 0) + 2 * (credit == 0)
                or debit == credit
            ):
                return dirty
            # Replay from 0 (an account not open has delta None: TypeError, dirty).
            balance = deltas[debit] - amount
            deltas[debit] = balance
            balance -= floors[debit]
            if balance < lows[debit]:  # noqa: PLR1730 (a call per row costs more)
                lows[debit] = balance
            if running:
                # Stored balance minus running change: the same start on every row of an
                # account (`| 0` raises for anything but an int: the types are proven).
                start = (after_d | 0) - deltas[debit]
                if start != starts[debit]:
                    if starts[debit] is not None:
                        return dirty
                    starts[debit] = start
            balance = deltas[credit] + amount
            deltas[credit] = balance
            if balance > highs[credit]:  # noqa: PLR1730
                highs[credit] = balance
            if running:
                start = (after_c | 0) - balance
                if start != starts[credit]:
                    if starts[credit] is not None:
                        return dirty
                    starts[credit] = start
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return dirty  # a value out of the ordinary: the exact pass says what
    finally:
        if collecting:
            gc.enable()
    if expected != hi + 1:
        return dirty
    next_stop(hi + 1)  # events after the range's last row: a close at its end
    return RangeSummary(
        lo,
        hi,
        clean=True,
        rows=hi - lo + 1,
        prev=prev,
        last_hash=last,
        deltas=_items(deltas, 0),
        lows=_items(lows, _UNTOUCHED),
        highs=_items(highs, -_UNTOUCHED),
        starts=_items(starts, None),
        closes=closes,
    )


@dataclass(frozen=True, slots=True)
class Joined:
    """The ranges joined: what the serial pass would give for a clean ledger."""

    rows: int
    last_seq: int
    head: str
    balances: dict[int, int]


def join_ranges(summaries: Sequence[RangeSummary]) -> Joined | None:
    """Chain the ranges (in seq order, from seq 1) and check every limit with the true
    starting balances; None if anything is out of the ordinary (run the exact pass)."""
    balances: dict[int, int] = {}
    prev: object = GENESIS
    lo = 1
    for s in summaries:
        if not s.clean or s.lo != lo or (GENESIS if s.prev is None else s.prev) != prev:
            return None
        for account, low in s.lows.items():
            if balances.get(account, 0) + low < 0:
                return None  # a debit broke its floor (or signed 64 bits)
        for account, high in s.highs.items():
            if balances.get(account, 0) + high > BALANCE_MAX:
                return None
        for account, start in s.starts.items():
            if balances.get(account, 0) != start:
                return None  # a stored running balance is not the replayed one
        for account, delta in s.deltas.items():
            balances[account] = balances.get(account, 0) + delta
        for account, delta in s.closes.items():
            if balances.get(account, 0) + delta != 0:
                return None  # closed while not empty
            balances[account] = 0
        prev = s.last_hash
        lo = s.hi + 1
    if not summaries or not isinstance(prev, str):
        return None
    return Joined(lo - 1, lo - 1, prev, balances)
