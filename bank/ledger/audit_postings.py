"""The audit's rule for revision 0007's postings: they agree with `transfers`.

`postings (account_id, seq)` is the history index written in sorted runs
(`bank.ledger.postings`); `postings_upto` holds its watermark W in one row. What
the reads rely on, and what this rule proves:

- 0 <= W <= the last transfer seq (the head);
- the postings at seq <= W are exactly `(debit_account_id, seq)` and
  `(credit_account_id, seq)` of every transfer at seq <= W: none lost (an
  account's history and balance look-ups would skip a row), none extra, none moved
  to another account or seq;
- no posting lies above W (the reads take rows above W from `transfers` itself,
  so such a posting means W was set back or a posting was forged there).

Proved by two aggregate scans inside the database, on the audit's own snapshot
(`LedgerSnapshot.postings_sums`): over postings, and over the transfers up to W,
the number of (expected) postings and the sum of a fingerprint `F(account, seq)`.
F is keyed: its coefficients are drawn anew for every audit, so no edit can be made
to cancel out in it beforehand. It squares a keyed line of (account, seq), each
value taken whole (in three parts below p, each with its own key), modulo
a prime below 2**31 (degree 2: an edit that moves one posting up a seq and another
down changes it), then takes a keyed line of that modulo another prime (so that
edits whose low moments cancel modulo the first still change the integer sums).
Every product stays below 2**63 on both backends, each sum too for up to 2**32
postings; each line is computed once per row (in a subquery that the backend's `fence`, a
LIMIT or OFFSET clause, keeps its planner from flattening).
Only when a figure differs does the audit look for the postings that differ
(`postings_differences`: anti-joins, each capped), to name them.

Pure here (no database): the snapshot runs the SQL this module writes, and this
module turns the figures into problems.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from bank.ledger.audit_problems import Problems, is_int

#: The moduli of F: primes below 2**31 (their products with a key stay below 2**62).
FINGERPRINT_P: Final = 2_147_483_579
FINGERPRINT_Q: Final = 2_147_483_549
#: Postings named one by one when the figures differ (each of lost and extra).
LOCATED_MAX: Final = 50
#: The tables and columns the rule reads (a ledger lacking one: the schema check says so).
POSTINGS_COLUMNS: Final = {
    "postings": frozenset({"account_id", "seq"}),
    "postings_upto": frozenset({"id", "seq"}),
}


@dataclass(frozen=True, slots=True)
class FingerprintKeys:
    """The coefficients of one audit's F: `k1..k3` and `k6..k9` below p, `k4`, `k5` below
    q (all >= 1). `k1`, `k6`, `k8` weigh an account's three parts (`PART`), `k2`, `k7`,
    `k9` a seq's."""

    k1: int
    k2: int
    k3: int
    k4: int
    k5: int
    k6: int = 1
    k7: int = 1
    k8: int = 1
    k9: int = 1

    @classmethod
    def draw(cls) -> FingerprintKeys:
        """Fresh keys from the OS's random source (a forger cannot know them beforehand)."""

        def key(modulus: int) -> int:
            return 1 + secrets.randbelow(modulus - 1)

        p, q = FINGERPRINT_P, FINGERPRINT_Q
        return cls(key(p), key(p), key(p), key(q), key(q), key(p), key(p), key(p), key(p))


#: A value is taken in three parts of base 2**30 (below p): v % B, (v / B) % B and v / B**2
#: (truncated toward zero, as `%` and `/` on integers are in SQLite and PostgreSQL). Each
#: part is below p and together they are the whole 64-bit value, so two different values
#: differ in some part by less than p: a keyed line tells them apart but for a 1-in-p
#: chance. Reducing the value itself mod p let a posting moved by a multiple of p go
#: unseen (attack finding 1).
PART: Final = 2**30


def line_sql(account: str, seq: str, keys: FingerprintKeys) -> str:
    """x = (the keyed parts of the account + the keyed parts of the seq + k3) % p (`PART`),
    every term reduced mod p first, in integer SQL that SQLite and PostgreSQL evaluate
    alike (`%` and `/` truncate toward zero on both; no product or sum reaches 2**63,
    whatever 64-bit values a forger stored). The keys are ints of this module, inlined as
    literals (no parameter style to differ between drivers)."""
    p, b = FINGERPRINT_P, PART

    def parts(value: str, low: int, mid: int, high: int) -> str:
        # A value in 0..B-1 (every real id and seq below 2**30) has parts (v, 0, 0): the
        # same sum from one product, and half the scan's arithmetic in the database's VM.
        return (
            f"(CASE WHEN ({value}) >= 0 AND ({value}) < {b} THEN ({value}) * {low} % {p} "
            f"ELSE (({value}) % {b}) * {low} % {p} + ((({value}) / {b}) % {b}) * {mid} % {p}"
            f" + (({value}) / {b * b}) * {high} % {p} END)"
        )

    return (
        f"({parts(account, keys.k1, keys.k6, keys.k8)} + "
        f"{parts(seq, keys.k2, keys.k7, keys.k9)} + {keys.k3}) % {p}"
    )


def mix_sql(x: str, keys: FingerprintKeys) -> str:
    """F from the line x: ((x * x % p) * k4 + k5) % q. `x` is a column of a subquery the
    database does not flatten (the snapshot's fence): written twice, computed once."""
    return f"((({x}) * ({x}) % {FINGERPRINT_P}) * {keys.k4} + {keys.k5}) % {FINGERPRINT_Q}"


def fingerprint_sql(account: str, seq: str, keys: FingerprintKeys) -> str:
    """F(account, seq) as one expression (its line written twice: for tests, not scans)."""
    return mix_sql(line_sql(account, seq, keys), keys)


def fingerprint(account: int, seq: int, keys: FingerprintKeys) -> int:
    """F in Python, exactly as the SQL computes it (truncating `%` and `/`): for tests and
    for auditors who re-implement the rule."""

    def rem(n: int, m: int) -> int:
        r = abs(n) % m
        return -r if n < 0 else r

    def quot(n: int, m: int) -> int:
        q = abs(n) // m
        return -q if n < 0 else q

    p, q, b = FINGERPRINT_P, FINGERPRINT_Q, PART

    def parts(value: int, low: int, mid: int, high: int) -> int:
        return (
            rem(rem(value, b) * low, p)
            + rem(rem(quot(value, b), b) * mid, p)
            + rem(quot(value, b * b) * high, p)
        )

    x = rem(
        parts(account, keys.k1, keys.k6, keys.k8) + parts(seq, keys.k2, keys.k7, keys.k9) + keys.k3,
        p,
    )
    return rem(rem(x * x, p) * keys.k4 + keys.k5, q)


@dataclass(frozen=True, slots=True)
class Sums:
    """How many postings, and the sum of their fingerprints (exact ints)."""

    rows: int
    fingerprint_sum: int


@dataclass(frozen=True, slots=True)
class PostingsSums:
    """The two aggregate scans of one snapshot, for a watermark W.

    `postings`: over the postings at seq <= W; `expected`: what the `transfers` rows
    at seq <= W need (two postings each); `above`: how many postings lie above W, and
    the lowest of them (`first_above`: seq, account) if any.
    """

    postings: Sums
    expected: Sums
    transfers: int
    above: int
    first_above: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class PostingsDifferences:
    """The postings that differ, each `(seq, account)` in (seq, account) order, at most
    `LOCATED_MAX` each: `lost` (a transfer's side without its posting), `extra` (a
    posting at seq <= W that no transfer at its seq names)."""

    lost: Sequence[tuple[object, object]]
    extra: Sequence[tuple[object, object]]


def _int(value: object) -> int:
    """An aggregate's value as an exact int: None (an empty sum) is 0, PostgreSQL's
    `numeric` sums come as integral Decimals."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    raise TypeError(f"an aggregate of integers gave {value!r}")


def check_watermark(
    rows: Sequence[tuple[object, object]], head: int, problems: Problems
) -> int | None:
    """W from the `(id, seq)` rows of postings_upto, or None when it cannot be used.

    Not exactly one row is a `schema` problem (the table's CHECK makes it one row; only
    a forger's DELETE or a rebuilt table gives another number); a W that is no integer,
    below 0 or beyond the head is a `postings_watermark` problem.
    """
    if len(rows) != 1:
        problems.add(
            "schema",
            f"postings_upto holds {len(rows)} rows, not exactly one: the postings watermark W "
            "is " + ("lost" if not rows else "ambiguous") + ", so the postings cannot be checked",
            expected="1 row",
            found=f"{len(rows)} rows",
        )
        return None
    row_id, watermark = rows[0]
    if row_id != 1:
        problems.add(
            "schema",
            f"postings_upto's one row has id {row_id!r}, not 1",
            expected=1,
            found=row_id,
        )
    if not is_int(watermark):
        problems.add(
            "postings_watermark",
            f"postings_upto.seq (the watermark W) holds {watermark!r}, not an integer",
            expected="an integer",
            found=watermark,
        )
        return None
    assert isinstance(watermark, int)
    if watermark < 0:
        problems.add(
            "postings_watermark",
            f"postings_upto.seq (the watermark W) is {watermark}, below 0",
            expected=">= 0",
            found=watermark,
        )
        return None
    if watermark > head:
        problems.add(
            "postings_watermark",
            f"postings_upto.seq (the watermark W) is {watermark}, beyond the last transfer "
            f"{head}: it claims postings for rows that do not exist",
            seq=watermark,
            expected=f"<= {head}",
            found=watermark,
        )
    return watermark


def check_postings(
    watermark: int,
    sums: PostingsSums,
    differences: Callable[[], PostingsDifferences],
    problems: Problems,
) -> None:
    """Turn the figures for W into problems; `differences` is called only when they differ."""
    if sums.above:
        first_seq, first_account = sums.first_above or (None, None)
        problems.add(
            "postings_watermark",
            f"{sums.above} posting(s) above the watermark W={watermark} (the first at seq "
            f"{first_seq}, account {first_account}): none may be there, so W was set back "
            "or postings were added above it",
            seq=first_seq,
            account=first_account,
            expected=f"no posting above seq {watermark}",
            found=f"{sums.above} posting(s)",
        )
    found, wanted = sums.postings, sums.expected
    if found == wanted:
        return
    located = differences()
    problems.add(
        "postings",
        f"postings disagree with transfers up to the watermark W={watermark}: "
        f"{found.rows} posting(s) at seq <= W, the {sums.transfers} transfer(s) up to W need "
        f"{wanted.rows}; {_what_differs(found, wanted, located)}",
        expected=f"{wanted.rows} postings",
        found=f"{found.rows} postings",
    )
    _name_differences(located, problems)


def _what_differs(found: Sums, wanted: Sums, located: PostingsDifferences) -> str:
    def counted(items: Sequence[object], what: str) -> str:
        capped = len(items) >= LOCATED_MAX
        return f"{'at least ' if capped else ''}{len(items)} {what}"

    if located.lost or located.extra:
        return f"{counted(located.lost, 'lost')}, {counted(located.extra, 'extra')}"
    if found.rows != wanted.rows:
        # A transfer naming one account on both sides needs two postings that are one row.
        return "no single posting differs (a transfer names the same account twice?)"
    return "the same number, but other postings (moved to another account or seq)"


@dataclass(frozen=True, slots=True)
class _LostRun:
    """Consecutive transfers `first..last` that lost both their postings."""

    first: int
    last: int


def _runs(lost: list[tuple[object, object]]) -> list[_LostRun | tuple[object, object]]:
    """The lost postings in order, consecutive transfers that lost both postings joined
    into one `_LostRun` (of two or more seqs), the others as they are.

    A watermark moved beyond the head loses every posting above the real one: one
    problem says so, not one per posting.
    """
    by_seq: dict[object, list[tuple[object, object]]] = {}
    for item in lost:
        by_seq.setdefault(item[0], []).append(item)
    out: list[_LostRun | tuple[object, object]] = []
    run: list[int] = []

    def flush() -> None:
        if len(run) > 1:
            out.append(_LostRun(run[0], run[-1]))
        elif run:
            out.extend(by_seq[run[0]])
        run.clear()

    for seq, items in by_seq.items():  # in seq order, as the query returns them
        if len(items) == 2 and isinstance(seq, int) and is_int(seq):
            if run and run[-1] != seq - 1:
                flush()
            run.append(seq)
            continue
        flush()
        out.extend(items)
    flush()
    return out


def _located(seq: object, account: object) -> dict[str, int]:
    """The problem's seq and account, where they are integers (SQLite without STRICT
    could hold a text)."""
    where = {"seq": seq, "account": account}
    return {k: v for k, v in where.items() if isinstance(v, int) and is_int(v)}


def _name_differences(located: PostingsDifferences, problems: Problems) -> None:
    """One problem per posting that differs; a lost and an extra posting of the same seq
    (or the same account) are one posting moved to another account (or seq)."""
    lost = list(located.lost)
    extra = list(located.extra)
    moved: list[tuple[tuple[object, object], tuple[object, object]]] = []
    for key in (0, 1):  # same seq: moved to another account; same account: another seq
        for e in list(extra):
            match = next((item for item in lost if item[key] == e[key]), None)
            if match is not None:
                lost.remove(match)
                extra.remove(e)
                moved.append((match, e))
    for (seq, account), (to_seq, to_account) in moved:
        where = (
            f"account {to_account} instead of {account}"
            if to_seq == seq
            else f"seq {to_seq} instead of {seq}"
        )
        problems.add(
            "postings",
            f"the posting of transfer {seq} for account {account} was moved to {where}: "
            f"account {account}'s history misses the row",
            **_located(seq, account),
            expected=f"({account}, {seq})",
            found=f"({to_account}, {to_seq})",
        )
    for item in _runs(lost):
        if isinstance(item, _LostRun):
            first, last = item.first, item.last
            problems.add(
                "postings",
                f"both postings of each transfer {first}..{last} are lost "
                f"({2 * (last - first + 1)} postings): those rows are missing from their "
                "accounts' histories and balance look-ups",
                seq=first,
                expected=f"2 postings per transfer {first}..{last}",
                found=None,
            )
            continue
        seq, account = item
        problems.add(
            "postings",
            f"posting ({account}, {seq}) is lost: transfer {seq} names account {account}, "
            "so its history and balance look-ups miss the row",
            **_located(seq, account),
            expected=f"({account}, {seq})",
            found=None,
        )
    for seq, account in extra:
        problems.add(
            "postings",
            f"posting ({account}, {seq}) is extra: no transfer at seq {seq} names account "
            f"{account}",
            **_located(seq, account),
            expected=None,
            found=f"({account}, {seq})",
        )


# -- the SQL both snapshots run (plain integer SQL: SQLite and PostgreSQL alike) ---------


def postings_sums_sql(watermark: int, keys: FingerprintKeys, fence: str) -> str:
    """One scan of postings: how many, their F sum, and how many lie above W."""
    assert type(watermark) is int
    return (
        f"SELECT count(*), sum({mix_sql('x', keys)}), "
        f"sum(CASE WHEN seq > {watermark} THEN 1 ELSE 0 END) FROM ("
        f"SELECT {line_sql('account_id', 'seq', keys)} AS x, seq FROM postings{fence}) AS lines"
    )


def postings_above_sql(watermark: int, keys: FingerprintKeys, fence: str) -> str:
    """The same sums over the postings above W alone (run only when there are some)."""
    assert type(watermark) is int
    return (
        f"SELECT count(*), sum({mix_sql('x', keys)}) FROM ("
        f"SELECT {line_sql('account_id', 'seq', keys)} AS x FROM postings "
        f"WHERE seq > {watermark}{fence}) AS lines"
    )


def first_above_sql(watermark: int) -> str:
    assert type(watermark) is int
    return (
        f"SELECT seq, account_id FROM postings WHERE seq > {watermark} "
        "ORDER BY seq, account_id LIMIT 1"
    )


def expected_sums_sql(watermark: int, keys: FingerprintKeys, fence: str) -> str:
    """One range scan of transfers up to W: rows, and both sides' F sum."""
    assert type(watermark) is int
    return (
        f"SELECT count(*), sum({mix_sql('x', keys)} + {mix_sql('y', keys)}) FROM ("
        f"SELECT {line_sql('debit_account_id', 'seq', keys)} AS x, "
        f"{line_sql('credit_account_id', 'seq', keys)} AS y FROM transfers "
        f"WHERE seq <= {watermark}{fence}) AS lines"
    )


def lost_sql(watermark: int, limit: int) -> str:
    """Each side of a transfer up to W without its posting, in (seq, account) order."""
    assert type(watermark) is int and type(limit) is int
    return (
        "SELECT sides.seq, sides.account_id FROM ("
        f"SELECT seq, debit_account_id AS account_id FROM transfers WHERE seq <= {watermark} "
        "UNION ALL "
        f"SELECT seq, credit_account_id AS account_id FROM transfers WHERE seq <= {watermark}"
        ") AS sides WHERE NOT EXISTS (SELECT 1 FROM postings AS p "
        "WHERE p.account_id = sides.account_id AND p.seq = sides.seq) "
        f"ORDER BY sides.seq, sides.account_id LIMIT {limit}"
    )


def extra_sql(watermark: int, limit: int) -> str:
    """Each posting up to W that no transfer at its seq names, in (seq, account) order."""
    assert type(watermark) is int and type(limit) is int
    return (
        f"SELECT p.seq, p.account_id FROM postings AS p WHERE p.seq <= {watermark} "
        "AND NOT EXISTS (SELECT 1 FROM transfers AS t WHERE t.seq = p.seq "
        "AND (t.debit_account_id = p.account_id OR t.credit_account_id = p.account_id)) "
        f"ORDER BY p.seq, p.account_id LIMIT {limit}"
    )


def postings_sums(
    one: Callable[[str], Sequence[object] | None],
    watermark: int,
    keys: FingerprintKeys,
    fence: str,
) -> PostingsSums:
    """The figures, by `one(sql)` (a snapshot's: the first row of a query in its own
    transaction; `fence` the clause that keeps its planner from flattening a subquery
    into the aggregate, which would compute each line twice): two scans, and two small
    queries if postings lie above W."""
    top = one(postings_sums_sql(watermark, keys, fence)) or (0, 0, 0)
    every = Sums(_int(top[0]), _int(top[1]))
    above = _int(top[2])
    postings, first_above = every, None
    if above:
        high = one(postings_above_sql(watermark, keys, fence)) or (0, 0)
        postings = Sums(every.rows - _int(high[0]), every.fingerprint_sum - _int(high[1]))
        row = one(first_above_sql(watermark))
        if row is not None and is_int(row[0]) and is_int(row[1]):
            first_above = (_int(row[0]), _int(row[1]))
    sides = one(expected_sums_sql(watermark, keys, fence)) or (0, 0)
    transfers = _int(sides[0])
    expected = Sums(2 * transfers, _int(sides[1]))
    return PostingsSums(postings, expected, transfers, above, first_above)
