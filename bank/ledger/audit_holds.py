"""The audit's replay of holds and atomic groups (revision 0006): pure, row by row.

The transfer replay (`bank.ledger.audit_replay`) hands every row here that is a
hold, post, void or expire, or that carries any of the 0006 columns, and asks
`held(account)` for each debit's floor test (what a customer may use is its
balance plus its limit minus what it holds). What is proved, by replay:

- a hold never exceeds `available` at its seq (tested by the caller, which knows
  the balances and floors: `check_floor` with the held amount included);
- a hold is settled at most once, by a post, void or expire naming a pending hold,
  with the hold's accounts; a void or expire releases exactly the hold's amount, a
  post moves at most it;
- nothing is posted or voided at or after the hold's deadline (`ts_us <
  expires_us`), and an expire comes no earlier than it;
- the held amount of every account is the sum of its pending holds;
- a group is complete and consecutive: its first row has `link_first == seq`, each
  of its `link_count` (1..8190) rows carries the same pair, and no other row cuts in.

Memory stays flat in the number of rows: only pending holds are kept (a settlement
of a hold that is not pending is reported as such, whether it was settled already,
never a hold, or not yet made).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from bank.ledger.audit_problems import Problems, is_int
from bank.limits import GROUP_COMMANDS_MAX

#: The kinds of revision 0006: which settle a hold, and which move money.
HOLD_KINDS: Final = frozenset({"hold", "post", "void", "expire"})
SETTLE_KINDS: Final = frozenset({"post", "void", "expire"})
#: The kinds whose amount moves from the debit to the credit account.
MOVING_KINDS: Final = frozenset({"deposit", "withdrawal", "transfer", "post"})


@dataclass(frozen=True, slots=True)
class _Pending:
    source: int
    target: int
    amount: int
    expires_us: int | None


@dataclass(slots=True)
class HoldReplay:
    """Pending holds, held amounts and the group in progress, as the replay goes."""

    problems: Problems
    pending: dict[int, _Pending] = field(default_factory=dict)
    held: dict[int, int] = field(default_factory=dict)
    group_first: int | None = None  # the open group: its first seq and size
    group_count: int = 0

    def held_by(self, account: object) -> int:
        """What `account` holds now (0 for an account that holds nothing)."""
        return self.held.get(account, 0) if type(account) is int else 0

    def row(
        self,
        seq: int,
        kind: object,
        debit: object,
        credit: object,
        amount: object,
        ts_us: object,
        hold_seq: object,
        expires_us: object,
        link_first: object,
        link_count: object,
    ) -> bool:
        """Check one row's 0006 columns and apply its effect on holds; True if the row
        moves money (the caller replays its balances), False if it moves none."""
        self._group(seq, link_first, link_count)
        if kind not in HOLD_KINDS:
            if hold_seq is not None or expires_us is not None:
                self._bad(seq, kind, "carries hold_seq or expires_us", hold_seq, expires_us)
            return True
        if kind == "hold":
            if hold_seq is not None:
                self._bad(seq, kind, "a hold names no hold_seq", None, hold_seq)
            if expires_us is not None and not (
                is_int(expires_us) and is_int(ts_us) and expires_us > ts_us  # type: ignore[operator]
            ):
                self._bad(
                    seq, kind, "a hold's deadline must come after it", f"> {ts_us}", expires_us
                )
            if is_int(amount) and is_int(debit) and is_int(credit):
                assert isinstance(amount, int) and isinstance(debit, int)
                self.pending[seq] = _Pending(
                    debit,
                    credit,  # type: ignore[arg-type]
                    amount,
                    expires_us if is_int(expires_us) else None,  # type: ignore[arg-type]
                )
                self.held[debit] = self.held.get(debit, 0) + amount
            return False
        return self._settle(seq, kind, debit, credit, amount, ts_us, hold_seq, expires_us)

    def _settle(
        self,
        seq: int,
        kind: object,
        debit: object,
        credit: object,
        amount: object,
        ts_us: object,
        hold_seq: object,
        expires_us: object,
    ) -> bool:
        problems = self.problems
        if expires_us is not None:
            self._bad(seq, kind, "only a hold carries expires_us", None, expires_us)
        hold = self.pending.pop(hold_seq, None) if is_int(hold_seq) else None  # type: ignore[call-overload]
        if hold is None:
            problems.add(
                "hold_not_pending",
                f"a {kind} of hold {hold_seq!r}, which is not pending at this seq (never a "
                "hold, already settled, or not yet made)",
                seq=seq,
                expected="a pending hold",
                found=hold_seq,
            )
            return kind == "post"
        if self.held.get(hold.source, 0) >= hold.amount:
            self.held[hold.source] -= hold.amount
            if not self.held[hold.source]:
                del self.held[hold.source]
        if (debit, credit) != (hold.source, hold.target):
            problems.add(
                "hold_settlement",
                f"a {kind} of hold {hold_seq} names other accounts than the hold",
                seq=seq,
                expected=f"{hold.source} -> {hold.target}",
                found=f"{debit} -> {credit}",
            )
        if kind == "post":
            if is_int(amount) and amount > hold.amount:
                problems.add(
                    "post_exceeds_hold",
                    f"a post of {amount} from hold {hold_seq}, which reserved {hold.amount}",
                    seq=seq,
                    expected=f"<= {hold.amount}",
                    found=amount,
                )
        elif amount != hold.amount:
            problems.add(
                "hold_settlement",
                f"a {kind} releases another amount than hold {hold_seq} reserved",
                seq=seq,
                expected=hold.amount,
                found=amount,
            )
        deadline = hold.expires_us
        if deadline is not None and is_int(ts_us):
            assert isinstance(ts_us, int)
            if kind == "expire" and ts_us < deadline:
                problems.add(
                    "hold_expiry",
                    f"hold {hold_seq} expired before its deadline",
                    seq=seq,
                    expected=f">= {deadline}",
                    found=ts_us,
                )
            elif kind != "expire" and ts_us >= deadline:
                problems.add(
                    "hold_expiry",
                    f"a {kind} of hold {hold_seq} at or after its deadline",
                    seq=seq,
                    expected=f"< {deadline}",
                    found=ts_us,
                )
        elif kind == "expire":
            problems.add(
                "hold_expiry",
                f"hold {hold_seq} has no deadline but expired",
                seq=seq,
                expected="a deadline",
                found=None,
            )
        return kind == "post"

    def _bad(self, seq: int, kind: object, rule: str, expected: object, found: object) -> None:
        self.problems.add(
            "hold_settlement", f"{kind}: {rule}", seq=seq, expected=expected, found=found
        )

    def _group(self, seq: int, link_first: object, link_count: object) -> None:
        problems = self.problems
        first = self.group_first
        if first is not None and seq >= first + self.group_count:
            first = self.group_first = None  # the open group ended where it should
        if link_first is None and link_count is None:
            if first is not None:
                problems.add(
                    "group_incomplete",
                    f"the group of seqs {first}..{first + self.group_count - 1} ends early "
                    "(a row without its group cuts in)",
                    seq=seq,
                    expected=f"link_first {first}",
                    found=None,
                )
                self.group_first = None
            return
        if first is None:
            if link_first != seq or not (
                is_int(link_count) and 1 <= link_count <= GROUP_COMMANDS_MAX  # type: ignore[operator]
            ):
                problems.add(
                    "group_incomplete",
                    "a row of a group that does not start at it (its first rows are missing) "
                    f"or of a size outside 1..{GROUP_COMMANDS_MAX}",
                    seq=seq,
                    expected=f"link_first {seq}, link_count 1..{GROUP_COMMANDS_MAX}",
                    found=f"link_first {link_first!r}, link_count {link_count!r}",
                )
                return
            assert isinstance(link_count, int)
            self.group_first, self.group_count = seq, link_count
            return
        if (link_first, link_count) != (first, self.group_count):
            problems.add(
                "group_incomplete",
                f"a row inside the group of seqs {first}..{first + self.group_count - 1} "
                "names another group",
                seq=seq,
                expected=f"link_first {first}, link_count {self.group_count}",
                found=f"link_first {link_first!r}, link_count {link_count!r}",
            )

    def finish(self, last_seq: int) -> None:
        """After the last row: a group still open is incomplete (its last rows missing)."""
        first = self.group_first
        if first is not None and last_seq < first + self.group_count - 1:
            self.problems.add(
                "group_incomplete",
                f"the group of seqs {first}..{first + self.group_count - 1} ends at the "
                f"ledger's last row {last_seq}",
                seq=last_seq + 1,  # the first row missing
                expected=f"seq {first + self.group_count - 1}",
                found=last_seq,
            )
