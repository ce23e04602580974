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
(`LedgerSnapshot.postings_sums`): over postings and over the transfers up to W,
the number of (expected) postings, the sum of their seqs (in 32-bit halves: no
sum overflows 64 bits) and the sum of a keyed fingerprint `F(account, seq)`. F is
two rounds of a cube modulo a prime below 2**31 (each a bijection: p = 2 mod 3) of a
line with random coefficients drawn anew for every audit: a forger who changes
postings cannot make both sums agree without knowing the keys, not even with edits
whose low moments cancel (the second round, modulo another prime, is no polynomial
over the first's field), and every product stays below 2**62 on both backends.
Only when a figure differs does the audit look for the postings that differ
(`postings_differences`: anti-joins, each capped), to name them.

Pure here (no database): the snapshot computes the figures, this module turns them
into problems.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from bank.ledger.audit_problems import Problems, is_int

#: The moduli of F's two rounds: primes below 2**31 with p % 3 == 2 (cubing permutes).
FINGERPRINT_P: Final = 2_147_483_579
FINGERPRINT_Q: Final = 2_147_483_549
#: Postings named one by one when the figures differ (each of lost, extra, above W).
LOCATED_MAX: Final = 50
#: The tables and columns the rule reads (a ledger lacking one: the schema check says so).
POSTINGS_COLUMNS: Final = {
    "postings": frozenset({"account_id", "seq"}),
    "postings_upto": frozenset({"id", "seq"}),
}
_HALF: Final = 32


@dataclass(frozen=True, slots=True)
class FingerprintKeys:
    """The random coefficients of one audit's F (each in 1..p-1)."""

    a1: int
    s1: int
    c1: int
    a2: int
    c2: int

    @classmethod
    def draw(cls) -> FingerprintKeys:
        """Fresh keys from the OS's random source (a forger cannot know them beforehand)."""

        def key(modulus: int) -> int:
            return 1 + secrets.randbelow(modulus - 1)

        p, q = FINGERPRINT_P, FINGERPRINT_Q
        return cls(key(p), key(p), key(p), key(q), key(q))


def fingerprint_sql(account: str, seq: str, keys: FingerprintKeys) -> str:
    """F(account, seq) as one integer SQL expression that SQLite and PostgreSQL both
    evaluate the same (`%` truncates toward zero on both; bigint products below 2**62).

    x = ((account % p) * a1 + (seq % p) * s1 + c1) % p, y = x**3 % p;
    z = (y * a2 + c2) % q, F = z**3 % q. The keys are integers of this module,
    inlined as literals (no parameter style to differ between drivers).
    """
    p, q = FINGERPRINT_P, FINGERPRINT_Q
    x = f"((({account}) % {p}) * {keys.a1} + (({seq}) % {p}) * {keys.s1} + {keys.c1}) % {p}"
    y = f"((({x}) * ({x})) % {p}) * ({x}) % {p}"
    z = f"(({y}) * {keys.a2} + {keys.c2}) % {q}"
    return f"((({z}) * ({z})) % {q}) * ({z}) % {q}"


def fingerprint(account: int, seq: int, keys: FingerprintKeys) -> int:
    """F in Python, as the SQL computes it (truncating `%`): for tests and auditors."""

    def rem(n: int, m: int) -> int:
        r = abs(n) % m
        return -r if n < 0 else r

    p, q = FINGERPRINT_P, FINGERPRINT_Q
    x = rem(rem(account, p) * keys.a1 + rem(seq, p) * keys.s1 + keys.c1, p)
    y = rem(rem(x * x, p) * x, p)
    z = rem(y * keys.a2 + keys.c2, q)
    return rem(rem(z * z, q) * z, q)


def seq_halves_sql(seq: str) -> tuple[str, str]:
    """`seq >> 32` and `seq & 0xffffffff`: summed apart, no SUM can overflow 64 bits."""
    return f"(({seq}) >> {_HALF})", f"(({seq}) & {(1 << _HALF) - 1})"


@dataclass(frozen=True, slots=True)
class Sums:
    """How many postings, their seqs' sum and their fingerprints' sum (exact ints)."""

    rows: int
    seq_sum: int
    fingerprint_sum: int


@dataclass(frozen=True, slots=True)
class PostingsSums:
    """The two aggregate scans of one snapshot, for a watermark W.

    `postings`: over postings at seq <= W; `expected`: what the transfers at seq <= W
    need (two per row); `above`: postings at seq > W, the lowest of them
    (`first_above`, its account) if any; `bad_types`: postings values that are not
    integers (SQLite only: a table rebuilt without STRICT).
    """

    postings: Sums
    expected: Sums
    transfers: int
    above: int
    first_above: tuple[int, int] | None = None
    bad_types: int = 0


@dataclass(frozen=True, slots=True)
class PostingsDifferences:
    """The postings that differ, each `(seq, account)` in (seq, account) order, capped at
    `LOCATED_MAX`: `lost` (a transfer's side without its posting), `extra` (a posting at
    seq <= W that no transfer at its seq names)."""

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


def halves(high: object, low: object) -> int:
    """The exact sum from its two summed halves (None: an empty sum, 0)."""
    return (_int(high) << _HALF) + _int(low)


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
    if sums.bad_types:
        problems.add(
            "bad_type",
            f"postings holds {sums.bad_types} account_id/seq value(s) that are not INTEGER",
            expected="integer",
            found=f"{sums.bad_types} other value(s)",
        )
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
    if found.seq_sum != wanted.seq_sum:
        return "the postings' seqs differ (a posting moved to another seq)"
    return "the postings' accounts differ (a posting moved to another account)"


def _runs(
    lost: list[tuple[object, object]],
) -> list[tuple[object, object, Any]]:
    """The lost postings as runs: `(first, last, n)` for consecutive transfers that lost
    both postings (first < last), else `(seq, seq, [(seq, account), ...])` for one seq.

    A watermark moved beyond the head loses every posting above the real one: one
    problem says so, not one per posting.
    """
    by_seq: dict[object, list[tuple[object, object]]] = {}
    for item in lost:
        by_seq.setdefault(item[0], []).append(item)
    out: list[tuple[object, object, Any]] = []
    run: list[int] = []

    def flush() -> None:
        if len(run) > 1:
            out.append((run[0], run[-1], 2 * len(run)))
        elif run:
            out.append((run[0], run[0], by_seq[run[0]]))
        run.clear()

    for seq, items in by_seq.items():  # in seq order, as the query returns them
        if len(items) == 2 and isinstance(seq, int) and is_int(seq):
            if run and run[-1] != seq - 1:
                flush()
            run.append(seq)
            continue
        flush()
        out.append((seq, seq, items))
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
    for first, last, sides in _runs(lost):
        if first != last:
            problems.add(
                "postings",
                f"both postings of each transfer {first}..{last} are lost ({sides} postings): "
                "those rows are missing from their accounts' histories and balance look-ups",
                **_located(first, None),
                expected=f"2 postings per transfer {first}..{last}",
                found=None,
            )
            continue
        for seq, account in sides:
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


def _sums_columns(account: str, keys: FingerprintKeys) -> str:
    high, low = seq_halves_sql("seq")
    return f"count(*), sum({high}), sum({low}), sum({fingerprint_sql(account, 'seq', keys)})"


def postings_sums_sql(watermark: int, keys: FingerprintKeys, *, typeof: bool) -> str:
    """One scan of postings: `count, seq high half, seq low half, F sum` over every
    posting, how many are above W, and (SQLite, `typeof`) how many hold a non-integer."""
    assert type(watermark) is int
    wrong = (
        ", sum(CASE WHEN typeof(account_id) = 'integer' AND typeof(seq) = 'integer' "
        "THEN 0 ELSE 1 END)"
        if typeof
        else ", 0"
    )
    return (
        f"SELECT {_sums_columns('account_id', keys)}, "
        f"sum(CASE WHEN seq > {watermark} THEN 1 ELSE 0 END){wrong} FROM postings"
    )


def postings_above_sql(watermark: int, keys: FingerprintKeys) -> str:
    """The same sums over the postings above W only (run only when there are some)."""
    assert type(watermark) is int
    return f"SELECT {_sums_columns('account_id', keys)} FROM postings WHERE seq > {watermark}"


def first_above_sql(watermark: int) -> str:
    assert type(watermark) is int
    return (
        f"SELECT seq, account_id FROM postings WHERE seq > {watermark} "
        "ORDER BY seq, account_id LIMIT 1"
    )


def expected_sums_sql(watermark: int, keys: FingerprintKeys) -> str:
    """One range scan of transfers up to W: rows, seq halves, and both sides' F sum."""
    assert type(watermark) is int
    high, low = seq_halves_sql("seq")
    both = (
        f"{fingerprint_sql('debit_account_id', 'seq', keys)} + "
        f"{fingerprint_sql('credit_account_id', 'seq', keys)}"
    )
    return (
        f"SELECT count(*), sum({high}), sum({low}), sum({both}) FROM transfers "
        f"WHERE seq <= {watermark}"
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


def sums_of(row: Sequence[object] | None) -> Sums:
    """`count, high, low, F` as a query above returns them (PostgreSQL: numeric sums)."""
    if row is None:
        return Sums(0, 0, 0)
    rows, high, low, mixed = row[:4]
    return Sums(_int(rows), halves(high, low), _int(mixed))


def postings_sums(
    one: Callable[[str], Sequence[object] | None],
    watermark: int,
    keys: FingerprintKeys,
    *,
    typeof: bool,
) -> PostingsSums:
    """The figures, by `one(sql)` (a snapshot's: the first row of a query on its own
    transaction), with the SQL above: two scans, plus two small queries if postings lie
    above W."""
    top = one(postings_sums_sql(watermark, keys, typeof=typeof))
    every = sums_of(top)
    above = _int(top[4]) if top is not None else 0
    bad_types = _int(top[5]) if top is not None else 0
    first_above: tuple[int, int] | None = None
    postings = every
    if above:
        high = sums_of(one(postings_above_sql(watermark, keys)))
        postings = Sums(
            every.rows - high.rows,
            every.seq_sum - high.seq_sum,
            every.fingerprint_sum - high.fingerprint_sum,
        )
        row = one(first_above_sql(watermark))
        if row is not None and is_int(row[0]) and is_int(row[1]):
            first_above = (_int(row[0]), _int(row[1]))
    transfers = sums_of(one(expected_sums_sql(watermark, keys)))
    expected = Sums(2 * transfers.rows, 2 * transfers.seq_sum, transfers.fingerprint_sum)
    return PostingsSums(postings, expected, transfers.rows, above, first_above, bad_types)
