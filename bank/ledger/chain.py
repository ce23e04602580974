"""The hash chain: the canonical bytes of each ledger row and how rows link.

This is part of the public schema: an auditor may re-implement it from this text.

Each row's `hash` is the lowercase hex SHA-256 of the row's message, and each
message starts with `prev`, the previous row's stored hash in the same table (by
seq), or `GENESIS` (64 zeros) for the first row. Which format a row uses is
recorded in the table `chain_formats(chain, first_seq, version)`: a row of chain
`chain` ("transfers" or "account_events") with seq `s` uses the `version` of the
entry with the largest `first_seq <= s`. A ledger without that table (revisions
0001 and 0002) is version 1 throughout. Migration 0003 wrote the table: version 1
for the rows that existed then (their hashes are never rewritten), version 2 from
one past the last row; a new ledger's transfers are version 2 from seq 1 (its
`@cash` opening, account event 1, was written by migration 0001 in version 1).

Version 2 (every row written since revision 0003): the message is the UTF-8 text

    transfers:      "bank:transfers:2\\n"      + V(prev) + V(seq) + V(kind) + V(debit_account_id)
                    + V(credit_account_id) + V(amount) + V(ts_us) + V(key)
    account_events: "bank:account_events:2\\n" + V(prev) + V(seq) + V(account_id) + V(kind)
                    + V(overdraft_limit) + V(transfer_seq) + V(ts_us) + V(name)

where V encodes one value with its type, so that every field delimits itself:

    an integer n:  "i" + n in decimal ("-" before a negative one, no leading zeros) + ";"
    a text t:      "s" + the number of bytes of t in UTF-8, in decimal + ":" + t
    NULL:          "n"

A message is therefore parsed back one way only, and an integer never encodes like
a text (12 is "i12;", the text "12" is "s2:12"). The leading tag names the table
and the version, so a version-2 row never verifies as version 1 (and the reverse):
moving the boundary in `chain_formats` breaks the hashes of the rows it moves over.
Only integers, texts and NULL have an encoding: a row holding a REAL or a BLOB
never verifies, and neither does a row whose columns do not hold their declared
types (a text in an INTEGER column; the audit reports it as `bad_type` too).

Version 3 (transfers written since revision 0006; the account_events chain stays at
version 2): the message covers every column of the row, in this order:

    transfers:      "bank:transfers:3\n"      + V(prev) + V(seq) + V(kind) + V(debit_account_id)
                    + V(credit_account_id) + V(amount) + V(ts_us) + V(key)
                    + V(debit_balance) + V(credit_balance) + V(hold_seq) + V(expires_us)
                    + V(link_first) + V(link_count)

so the running balances (revision 0005), a post's or void's hold, a hold's deadline
and a row's atomic group are tamper-evident like the rest. Migration 0006 wrote the
`chain_formats` entry: version 3 for transfers from one past the last row then.

Version 1 (rows written before revision 0003), kept verifiable:

    transfers:      prev + "\\n" + f"{seq}|{kind}|{debit}|{credit}|{amount}|{ts_us}|{key}"
    account_events: prev + "\\n" + f"{seq}|{account_id}|{kind}|{overdraft_limit}|{transfer_seq}|{ts_us}|{name}"

with `key` "" for NULL. This text is unambiguous only for rows whose integer
columns hold integers, whose kind is one of the known kinds and whose key is NULL
or a non-empty text: the audit checks all three on every row, and a version-1 row
with a value of the wrong type does not verify.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import sha256
from typing import Final

GENESIS: Final = "0" * 64

#: The chains, as named in `chain_formats.chain`.
TRANSFERS_CHAIN: Final = "transfers"
ACCOUNT_EVENTS_CHAIN: Final = "account_events"
#: Format versions; the writer writes `FORMAT_CURRENT`.
FORMAT_V1: Final = 1
FORMAT_V2: Final = 2
FORMAT_V3: Final = 3
#: What the writer writes: transfers in version 3, account events in version 2.
FORMAT_CURRENT: Final = FORMAT_V3
EVENTS_FORMAT_CURRENT: Final = FORMAT_V2
FORMAT_VERSIONS: Final = frozenset({FORMAT_V1, FORMAT_V2, FORMAT_V3})

TRANSFERS_TAG_V2: Final = "bank:transfers:2\n"
TRANSFERS_TAG_V3: Final = "bank:transfers:3\n"
ACCOUNT_EVENTS_TAG_V2: Final = "bank:account_events:2\n"

#: V(kind) of the kinds the engine writes (a look-up instead of a length per row).
_KIND_CODES: Final = {
    kind: f"s{len(kind)}:{kind}"
    for kind in (
        "deposit",
        "withdrawal",
        "transfer",
        "hold",
        "post",
        "void",
        "expire",
        "open",
        "limit",
        "close",
    )
}


def encode_value(value: int | str | None) -> str:
    """V(value): the typed, self-delimiting encoding of one column value.

    Raises `TypeError` for anything but an int, a str or None (bool included:
    SQLite never returns one, so a bool here is a bug upstream).
    """
    if value is None:
        return "n"
    if type(value) is int:
        return f"i{value};"
    if type(value) is str:
        return f"s{len(value) if value.isascii() else len(value.encode())}:{value}"
    raise TypeError(f"no chain encoding for a {type(value).__name__}")


def transfer_hash(
    prev: str,
    seq: int,
    kind: str,
    debit: int,
    credit: int,
    amount: int,
    ts_us: int,
    key: str | None,
    debit_balance: int,
    credit_balance: int,
    hold_seq: int | None = None,
    expires_us: int | None = None,
    link_first: int | None = None,
    link_count: int | None = None,
) -> str:
    """Version-3 hash of one `transfers` row chained to `prev` (the writer's hot path).

    The arguments are the writer's own, correctly typed values; `prev` is a hash
    (ASCII hex), so its length in characters is its length in bytes.
    """
    if key is None:
        k = "n"
    elif key.isascii():  # O(1) in CPython: the string knows it is ASCII
        k = f"s{len(key)}:{key}"
    else:
        k = f"s{len(key.encode())}:{key}"
    if hold_seq is None and expires_us is None and link_first is None and link_count is None:
        tail = "nnnn"  # the one-step operations: most rows
    else:
        tail = (
            f"{encode_value(hold_seq)}{encode_value(expires_us)}"
            f"{encode_value(link_first)}{encode_value(link_count)}"
        )
    text = (
        f"{TRANSFERS_TAG_V3}s{len(prev)}:{prev}i{seq};{_KIND_CODES.get(kind) or encode_value(kind)}"
        f"i{debit};i{credit};i{amount};i{ts_us};{k}i{debit_balance};i{credit_balance};{tail}"
    )
    return sha256(text.encode()).hexdigest()


def transfer_hash_v2(
    prev: str,
    seq: int,
    kind: str,
    debit: int,
    credit: int,
    amount: int,
    ts_us: int,
    key: str | None,
) -> str:
    """Version-2 hash of one `transfers` row chained to `prev` (revisions 0003 to 0005).

    The arguments are the writer's own, correctly typed values; `prev` is a hash
    (ASCII hex), so its length in characters is its length in bytes.
    """
    if key is None:
        k = "n"
    elif key.isascii():  # O(1) in CPython: the string knows it is ASCII
        k = f"s{len(key)}:{key}"
    else:
        k = f"s{len(key.encode())}:{key}"
    text = (
        f"{TRANSFERS_TAG_V2}s{len(prev)}:{prev}i{seq};{_KIND_CODES.get(kind) or encode_value(kind)}"
        f"i{debit};i{credit};i{amount};i{ts_us};{k}"
    )
    return sha256(text.encode()).hexdigest()


def account_event_hash(
    prev: str,
    seq: int,
    account_id: int,
    kind: str,
    overdraft_limit: int,
    transfer_seq: int,
    ts_us: int,
    name: str,
) -> str:
    """Version-2 hash of one `account_events` row chained to `prev`."""
    text = (
        f"{ACCOUNT_EVENTS_TAG_V2}{encode_value(prev)}i{seq};i{account_id};{encode_value(kind)}"
        f"i{overdraft_limit};i{transfer_seq};i{ts_us};{encode_value(name)}"
    )
    return sha256(text.encode()).hexdigest()


def transfer_hash_v1(
    prev: str,
    seq: int,
    kind: str,
    debit: int,
    credit: int,
    amount: int,
    ts_us: int,
    key: str | None,
) -> str:
    """Version-1 hash of one `transfers` row (rows written before revision 0003)."""
    text = f"{prev}\n{seq}|{kind}|{debit}|{credit}|{amount}|{ts_us}|{key or ''}"
    return sha256(text.encode()).hexdigest()


def account_event_hash_v1(
    prev: str,
    seq: int,
    account_id: int,
    kind: str,
    overdraft_limit: int,
    transfer_seq: int,
    ts_us: int,
    name: str,
) -> str:
    """Version-1 hash of one `account_events` row (migration 0001's `@cash` opening, and
    every event written before revision 0003)."""
    text = f"{prev}\n{seq}|{account_id}|{kind}|{overdraft_limit}|{transfer_seq}|{ts_us}|{name}"
    return sha256(text.encode()).hexdigest()


def stored_transfer_hash(
    version: int,
    prev: object,
    seq: object,
    kind: object,
    debit: object,
    credit: object,
    amount: object,
    ts_us: object,
    key: object,
    *extra: object,
) -> str | None:
    """The hash a stored `transfers` row must have in `version`, from values as read back.

    None when the values are not of the types the format encodes (such a row never
    verifies) or the version is unknown. For code that re-checks rows it did not
    write (recovery, tools).
    """
    if not (
        type(prev) is str
        and type(seq) is int
        and type(kind) is str
        and type(debit) is int
        and type(credit) is int
        and type(amount) is int
        and type(ts_us) is int
        and (key is None or type(key) is str)
    ):
        return None
    if version == FORMAT_V1:
        return transfer_hash_v1(prev, seq, kind, debit, credit, amount, ts_us, key)
    if version == FORMAT_V2:
        return transfer_hash_v2(prev, seq, kind, debit, credit, amount, ts_us, key)
    if version == FORMAT_V3:
        # `extra`: debit_balance, credit_balance, hold_seq, expires_us, link_first,
        # link_count, as stored (the two balances integers, the rest integers or NULL).
        if len(extra) != 6 or not all(type(v) is int for v in extra[:2]):
            return None
        if not all(v is None or type(v) is int for v in extra[2:]):
            return None
        debit_balance, credit_balance, hold_seq, expires_us, link_first, link_count = extra
        assert type(debit_balance) is int and type(credit_balance) is int
        return transfer_hash(
            prev,
            seq,
            kind,
            debit,
            credit,
            amount,
            ts_us,
            key,
            debit_balance,
            credit_balance,
            hold_seq,  # type: ignore[arg-type]
            expires_us,  # type: ignore[arg-type]
            link_first,  # type: ignore[arg-type]
            link_count,  # type: ignore[arg-type]
        )
    return None


def stored_account_event_hash(
    version: int,
    prev: object,
    seq: object,
    account_id: object,
    kind: object,
    overdraft_limit: object,
    transfer_seq: object,
    ts_us: object,
    name: object,
) -> str | None:
    """The hash a stored `account_events` row must have in `version` (None: never verifies)."""
    if not (
        type(prev) is str
        and type(seq) is int
        and type(account_id) is int
        and type(kind) is str
        and type(overdraft_limit) is int
        and type(transfer_seq) is int
        and type(ts_us) is int
        and type(name) is str
    ):
        return None
    if version == FORMAT_V1:
        return account_event_hash_v1(
            prev, seq, account_id, kind, overdraft_limit, transfer_seq, ts_us, name
        )
    if version == FORMAT_V2:
        return account_event_hash(
            prev, seq, account_id, kind, overdraft_limit, transfer_seq, ts_us, name
        )
    return None


def version_at(boundaries: Sequence[tuple[int, int]], seq: int) -> int:
    """The format of row `seq` given one chain's `(first_seq, version)` entries, sorted.

    Rows before the first entry (and every row of a ledger without `chain_formats`:
    pass no entries) are version 1.
    """
    version = FORMAT_V1
    for first_seq, v in boundaries:
        if first_seq > seq:
            break
        version = v
    return version
