"""The account_events chain: its hashes, its rules, and what it says about each account.

Pure: rows in, problems and per-account state out (memory O(accounts)).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from bank.ledger.audit_chain import GENESIS, Formats, event_hash, version_at
from bank.ledger.audit_problems import Problems, is_int
from bank.limits import CASH_ACCOUNT_ID, NAME_LENGTH_MAX, OVERDRAFT_LIMIT_MAX


class AccountState:
    """What the chained events say about one account (its latest name and limit, and
    the event that closed it, if one did)."""

    __slots__ = ("close_event_seq", "limit", "name", "open_event_seq", "open_transfer_seq")

    def __init__(
        self, name: object, limit: object, open_event_seq: int, open_transfer_seq: object
    ) -> None:
        self.name = name
        self.limit = limit
        self.open_event_seq = open_event_seq
        self.open_transfer_seq = open_transfer_seq
        self.close_event_seq: int | None = None


@dataclass(slots=True)
class Events:
    """What the events chain gave: accounts by id, rows read, the head, the last seq and
    the largest transfer_seq."""

    accounts: dict[int, AccountState]
    rows: int
    head: str
    last_seq: int
    last_transfer_seq: int


def check_events(rows: Iterable[tuple[Any, ...]], problems: Problems, formats: Formats) -> Events:
    """Check the account_events chain and rules, from rows in seq order
    `(seq, account_id, kind, name, overdraft_limit, transfer_seq, ts_us, hash)`.

    `formats` are the chain's `(first_seq, version)` entries of `chain_formats`.
    """
    state: dict[int, AccountState] = {}
    prev = GENESIS
    expected_seq = 1
    count = 0
    last_seq = 0
    last_transfer_seq = 0
    for seq, account, kind, name, limit, transfer_seq, ts_us, stored in rows:
        count += 1
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
        version = version_at(formats, seq) if is_int(seq) else 1
        computed = event_hash(version, prev, seq, account, kind, limit, transfer_seq, ts_us, name)
        if computed != stored:
            problems.add(
                "event_hash_mismatch",
                "breaks the accounts hash chain (this event or the one before it was altered)",
                event_seq=seq,
                account=account if is_int(account) else None,
                expected=computed,
                found=stored,
            )
        prev = stored
        acc = account if is_int(account) else None
        if acc is None or acc < 0:
            problems.add(
                "bad_event",
                "account id is not a non-negative integer",
                event_seq=seq,
                expected=">= 0",
                found=account,
            )
            continue
        if not is_int(limit) or not 0 <= limit <= OVERDRAFT_LIMIT_MAX:
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
        if not is_int(transfer_seq) or transfer_seq < last_transfer_seq:
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
                state[acc] = AccountState(name, limit, seq, transfer_seq)
        elif kind in ("limit", "close") and known is not None and known.close_event_seq is not None:
            problems.add(
                "bad_event",
                f"{kind} event after the account's close (at event seq {known.close_event_seq})",
                event_seq=seq,
                account=acc,
                expected=None,
                found=kind,
            )
        elif kind == "close":
            if known is None:
                problems.add(
                    "bad_event",
                    "close before the account was opened",
                    event_seq=seq,
                    account=acc,
                    expected="open",
                    found="close",
                )
            elif acc == CASH_ACCOUNT_ID:
                problems.add(
                    "bad_event",
                    "@cash is closed (the system account never closes)",
                    event_seq=seq,
                    account=acc,
                    expected=None,
                    found="close",
                )
            else:
                known.name = name
                known.limit = limit
                known.close_event_seq = seq
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
                expected="open|limit|close",
                found=kind,
            )
    return Events(state, count, prev, last_seq, last_transfer_seq)


LimitEvent = tuple[int, int, str, object]


def usable_limit_events(rows: Iterable[tuple[Any, ...]]) -> Iterator[LimitEvent]:
    """(transfer_seq, account, kind, limit) of the events a replay can apply, from rows
    `(transfer_seq, account_id, kind, overdraft_limit)` in (transfer_seq, seq) order: the
    order they took effect in."""
    for transfer_seq, account, kind, limit in rows:
        if is_int(transfer_seq) and is_int(account) and kind in ("open", "limit", "close"):
            yield transfer_seq, account, kind, limit
