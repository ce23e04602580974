"""The audit's checks of keys, accounts, column types and pinned heads: pure, over rows.

Each takes the rows a snapshot streams (plain tuples) and adds to `Problems`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

from bank.ledger.audit_chain import GENESIS
from bank.ledger.audit_events import AccountState
from bank.ledger.audit_problems import Problems, is_int, shown_value
from bank.ledger.head import Head
from bank.limits import KEY_LENGTH_MAX

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
        "debit_balance": ("integer",),  # revision 0005 on
        "credit_balance": ("integer",),
        "hold_seq": ("integer", "null"),
        "expires_us": ("integer", "null"),
        "link_first": ("integer", "null"),
        "link_count": ("integer", "null"),
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
ROW_KEYS: Final = {
    "accounts": ("account", "id"),
    "transfers": ("seq", "seq"),
    "account_events": ("event_seq", "seq"),
    "chain_formats": (None, "first_seq"),
}


def check_types(found: Iterable[tuple[str, str, object, str, object]], problems: Problems) -> None:
    """Report every value whose storage class differs from its column's (`bad_type`).

    `found` yields `(table, column, row key, stored type, value)` for each such value,
    in table order then row-key order (a snapshot finds them: SQLite `typeof`; on a
    server with typed columns the catalog check stands in for it and none are found).
    """
    for table, column, row_key, stored_type, value in found:
        allowed = COLUMN_TYPES[table][column]
        where = ROW_KEYS[table][0]
        location: dict[str, Any] = {}
        if where is not None and is_int(row_key):
            location[where] = row_key
        problems.add(
            "bad_type",
            f"{table}.{column} holds {stored_type} {shown_value(value)!r}, "
            f"not {' or '.join(a.upper() for a in allowed)}",
            expected=" or ".join(allowed),
            found=stored_type,
            **location,
        )


def check_keys(rows: Iterable[tuple[Any, ...]], problems: Problems) -> None:
    """Keys are unique non-empty texts: one pass over `(key, seq)` rows of the non-NULL
    keys in (key, seq) order (the unique index's order)."""
    previous: object = None
    previous_seq = 0
    for key, seq in rows:
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


def check_accounts(
    rows: Iterable[tuple[Any, ...]],
    state: dict[int, AccountState],
    balances: dict[int, int],
    problems: Problems,
) -> int:
    """Compare every `accounts` row `(id, name, overdraft_limit, balance)`, in id order,
    with the events and the replay; returns rows read."""
    count = 0
    total = 0
    seen: set[int] = set()
    for account, name, limit, balance in rows:
        count += 1
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
        if balance != recomputed or not is_int(balance):
            problems.add(
                "balance_mismatch",
                "stored balance differs from credits minus debits",
                account=account,
                expected=recomputed,
                found=balance,
            )
        if is_int(balance):
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
    return count


def check_head(
    pinned: Head, found: Head, hash_at: Callable[[str, int], object], problems: Problems
) -> None:
    """One `head_mismatch` per chain whose end is not the pinned one, saying how it moved.

    `hash_at(table, seq)` is the stored hash of that row in the snapshot (None: no row).
    """
    for table, pin_seq, pin_hash, seq, stored in (
        ("transfers", pinned.seq, pinned.hash, found.seq, found.hash),
        ("account_events", pinned.event_seq, pinned.event_hash, found.event_seq, found.event_hash),
    ):
        if (pin_seq, pin_hash) == (seq, stored):
            continue
        at_pin = hash_at(table, pin_seq)
        if at_pin is None and pin_seq == 0:
            at_pin = GENESIS
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
