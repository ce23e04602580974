"""The audit's own re-implementation of the hash chains (`bank.ledger.chain` documents them).

Re-implemented here on purpose: a bug in the writer's hash code must not hide
itself by being used to check its own output. Pure functions over values as a
snapshot returns them; a value of a type a format has no encoding for gives None
(never verifies).
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import sha256
from itertools import pairwise
from typing import Any, Final

from bank.ledger.audit_problems import Problems, is_int, shown_value

GENESIS: Final = "0" * 64

CHAIN_NAMES: Final = ("transfers", "account_events")
#: Hash formats this audit verifies (see `bank.ledger.chain`).
FORMAT_VERSIONS: Final = frozenset({1, 2, 3})
TRANSFERS_TAG_V2: Final = "bank:transfers:2\n"
TRANSFERS_TAG_V3: Final = "bank:transfers:3\n"
EVENTS_TAG_V2: Final = "bank:account_events:2\n"
#: Where each kind must have @cash: value = (debit is @cash) + 2 * (credit is @cash).
KIND_SIDES: Final = {"transfer": 0, "deposit": 1, "withdrawal": 2}
#: The two-phase kinds (revision 0006): @cash may be on either side (not both).
HOLD_KINDS: Final = frozenset({"hold", "post", "void", "expire"})
#: V(kind) of the transfer kinds, precomputed (kinds are ASCII).
KIND_CODES: Final = {kind: f"s{len(kind)}:{kind}" for kind in KIND_SIDES}

#: One chain's sorted `(first_seq, version)` entries of `chain_formats`.
Formats = list[tuple[int, int]]


def check_chain_formats(rows: Iterable[tuple[Any, ...]], problems: Problems) -> dict[str, Formats]:
    """Each chain's sorted `(first_seq, version)` entries, from `(chain, first_seq, version)`
    rows in (chain, first_seq) order; no rows (a ledger before 0003): all version 1.

    What migration 0003 writes: per chain, an entry at seq 1, versions that never go
    back, all known. Anything else is reported (`chain_format`); the rows are then
    verified with the entries as they stand, so a moved boundary also shows up as the
    hash mismatches of the rows it moved over. Call only when the table exists.
    """
    formats: dict[str, Formats] = {chain: [] for chain in CHAIN_NAMES}
    for chain, first_seq, version in rows:
        if chain not in formats or not is_int(first_seq) or first_seq < 1:
            problems.add(
                "chain_format",
                "an entry for an unknown chain or with a first_seq below 1",
                expected="transfers|account_events, first_seq >= 1",
                found=f"{chain!r}, {first_seq!r}",
            )
        elif version not in FORMAT_VERSIONS or not is_int(version):
            problems.add(
                "chain_format",
                f"{chain} from seq {first_seq}: unknown hash format {version!r}",
                expected="1, 2 or 3",
                found=shown_value(version),
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


def version_at(entries: Formats, seq: int) -> int:
    """The hash format of row `seq` (1 before the first entry)."""
    version = 1
    for first_seq, v in entries:
        if first_seq > seq:
            break
        version = v
    return version


def code(value: object) -> str:
    """V(value) of hash format 2; TypeError for anything but an int, a text or NULL."""
    if value is None:
        return "n"
    if value.__class__ is int:
        return f"i{value};"
    if value.__class__ is str:
        assert isinstance(value, str)
        return f"s{len(value.encode())}:{value}"
    raise TypeError("no encoding")


def text_code(value: object) -> str:
    """V(text) of hash format 2; TypeError for anything but a text (it never verifies)."""
    if value.__class__ is not str:
        raise TypeError("not a text")
    assert isinstance(value, str)
    return f"s{len(value.encode())}:{value}"


def event_hash(
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
            text = EVENTS_TAG_V2 + "".join(map(code, values))
        except TypeError:
            return None
    return sha256(text.encode()).hexdigest()


def transfer_hash(
    version: int,
    prev: Any,
    seq: Any,
    kind: Any,
    debit: Any,
    credit: Any,
    amount: Any,
    ts_us: Any,
    key: Any,
    debit_balance: Any = None,
    credit_balance: Any = None,
    hold_seq: Any = None,
    expires_us: Any = None,
    link_first: Any = None,
    link_count: Any = None,
) -> str | None:
    """The hash a transfer must have in format `version`; None if a value has no encoding.

    The `:d` and `:s` format specs raise for a value of the wrong type (a text where
    an integer belongs, a REAL), which then never verifies. Format 3 also covers the
    running balances (integers) and the 0006 columns (integers or NULL).
    """
    try:
        if version == 3:
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
            tail = "".join(
                "n" if v is None else f"i{v:d};"
                for v in (hold_seq, expires_us, link_first, link_count)
            )
            if debit_balance.__class__ is not int or credit_balance.__class__ is not int:
                return None
            text = (
                f"{TRANSFERS_TAG_V3}{p}i{seq:d};{KIND_CODES.get(kind) or text_code(kind)}"
                f"i{debit:d};i{credit:d};i{amount:d};i{ts_us:d};{k}"
                f"i{debit_balance:d};i{credit_balance:d};{tail}"
            )
        elif version == 2:
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
                f"{TRANSFERS_TAG_V2}{p}i{seq:d};{KIND_CODES.get(kind) or text_code(kind)}"
                f"i{debit:d};i{credit:d};i{amount:d};i{ts_us:d};{k}"
            )
        else:
            text = (
                f"{prev}\n{seq:d}|{kind:s}|{debit:d}|{credit:d}|{amount:d}|{ts_us:d}|"
                f"{'' if key is None else key:s}"
            )
    except (TypeError, ValueError):
        return None
    return sha256(text.encode()).hexdigest()
