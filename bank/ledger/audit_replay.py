"""The transfer replay: seq contiguity, per-row rules, both sides' balances against the
limits in force, each row's stored running balances, closed accounts, and the transfers
chain, in one streaming pass in seq order.

Pure: rows in (plain tuples in the table's column order), problems and balances out.
This is the exact, serial reference; `bank.ledger.audit_ranges` is the parallel fast
path that proves a clean ledger clean and defers to this pass for everything else.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bank.ledger.audit_chain import GENESIS, HOLD_KINDS, KIND_SIDES, Formats, transfer_hash
from bank.ledger.audit_events import AccountState, LimitEvent
from bank.ledger.audit_holds import HoldReplay
from bank.ledger.audit_problems import Problems
from bank.limits import (
    AMOUNT_MAX,
    BALANCE_MAX,
    BALANCE_MIN,
    CASH_ACCOUNT_ID,
    OVERDRAFT_LIMIT_MAX,
)


@dataclass(slots=True)
class Replay:
    """Results of the transfer replay."""

    rows: int = 0
    last_seq: int = 0
    head: str = GENESIS
    balances: dict[int, int] = field(default_factory=dict)


def replay_transfers(
    transfer_rows: Iterable[tuple[Any, ...]],
    limit_events: Iterator[LimitEvent],
    accounts: dict[int, AccountState],
    problems: Problems,
    formats: Formats,
    *,
    running: bool = True,
) -> Replay:
    """Stream `transfers` in seq order: chain, per-row rules, and the balance replay.

    Rows carry the running balances last (`debit_balance`, `credit_balance`; NULL from
    a ledger before revision 0005, which `running` False says: then they are not
    compared). Each must equal the replayed balance of its account right after the
    row (`running_balance`). A 'close' event ends an account: it must be empty then
    (`close_not_empty`) and no later row may touch it (`closed_account`).

    The loop is the audit's hot path: plain tuples, locals only, and one combined
    test per row that sends the rare bad row to `_check_row` for the details.
    Each row is hashed in the format `formats` (`chain_formats` entries) gives its
    seq; the `:d` and `:s` format specs raise for a value of the wrong type, which
    then has no encoding and never verifies (the hot path pays nothing for the check).
    """
    balances: dict[int, int] = {}
    floors: dict[int, int] = {}  # accounts open so far -> lowest balance allowed
    closed: dict[int, int] = {}  # closed accounts -> the transfer seq they closed after
    events = limit_events
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
            if kind == "open" and account not in floors and account not in closed:
                balances.setdefault(account, 0)
                floors[account] = floor
            elif kind == "limit" and account in floors:
                floors[account] = floor
            elif kind == "close" and account in floors and account != CASH_ACCOUNT_ID:
                _close(problems, account, pending[0], balances.get(account, 0), holds)
                del floors[account]  # a later row touching it goes to `_check_row`
                closed[account] = pending[0]
            pending = next(events, None)
        return pending[0] if pending is not None else BALANCE_MAX

    switches = iter(formats)
    switch = next(switches, None)
    version = 1

    def next_version(seq: int) -> tuple[int, int]:
        """The format from `seq` on, and the seq of the next switch (for sorted entries)."""
        nonlocal switch
        current = version
        while switch is not None and switch[0] <= seq:
            current = switch[1]
            switch = next(switches, None)
        return current, switch[0] if switch is not None else BALANCE_MAX

    next_switch_at = switch[0] if switch is not None else BALANCE_MAX
    hash_of = transfer_hash
    kind_sides = KIND_SIDES
    hold_kinds = HOLD_KINDS
    holds = HoldReplay(problems)
    held = holds.held  # account -> what its pending holds reserve (empty: no holds)
    amount_max = AMOUNT_MAX
    balance_max = BALANCE_MAX
    prev = GENESIS
    expected_seq = 1
    rows = 0
    last_seq = 0
    seq = 0
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
        ) in transfer_rows:
            rows += 1
            if seq == expected_seq:
                expected_seq += 1
            else:
                expected_seq = _seq_problem(problems, seq, expected_seq)
            if seq > next_event_at:
                next_event_at = apply_events(seq)
            if seq >= next_switch_at:
                version, next_switch_at = next_version(seq)
            # None for a value of the wrong type: no encoding, never verifies.
            computed = hash_of(
                version, prev, seq, kind, debit, credit, amount, ts_us, key,
                after_d, after_c, hold_seq, expires_us, link_first, link_count,
            )  # fmt: skip
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
                kind in hold_kinds
                or link_first is not None
                or hold_seq is not None
                or expires_us is not None
                or holds.group_first is not None
            ) and not holds.row(
                seq, kind, debit, credit, amount, ts_us, hold_seq, expires_us, link_first,
                link_count,
            ):  # fmt: skip
                # A hold, void or expire: no money moves (a hold's reserve is checked here).
                _still(problems, seq, kind, debit, credit, amount, floors, balances, held)
                if running:
                    _check_running(problems, seq, debit, credit, after_d, after_c, balances)
                continue
            if (
                amount.__class__ is not int
                or amount <= 0
                or amount > amount_max
                or (
                    kind_sides.get(kind) != (debit == 0) + 2 * (credit == 0)
                    and kind not in hold_kinds  # a post: @cash on either side
                )
                or debit == credit
                or debit not in floors
                or credit not in floors
            ):
                _check_row(
                    problems, seq, kind, debit, credit, amount, accounts, floors, balances, closed
                )
                if running:
                    _check_running(problems, seq, debit, credit, after_d, after_c, balances)
                continue
            # Replay (cannot raise: both accounts are open and amount is an int).
            debit_balance = balances[debit] - amount
            credit_balance = balances[credit] + amount
            balances[debit] = debit_balance
            balances[credit] = credit_balance
            if (
                debit_balance < floors[debit]
                or credit_balance > balance_max
                or (held and debit_balance - held.get(debit, 0) < floors[debit])
            ):
                _limit_problem(
                    problems, seq, debit, credit, amount, debit_balance, credit_balance, floors,
                    held.get(debit, 0),
                )  # fmt: skip
            if (after_d != debit_balance or after_c != credit_balance) and running:
                _check_running(problems, seq, debit, credit, after_d, after_c, balances)
        if rows:
            last_seq = seq
        holds.finish(last_seq)
        # Events after the last row (a close at the end must be empty too).
        apply_events(BALANCE_MAX + 1)
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    return Replay(rows, last_seq, prev, balances)


def _seq_problem(problems: Problems, seq: int, expected_seq: int) -> int:
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


def _close(
    problems: Problems, account: int, transfer_seq: int, balance: int, holds: HoldReplay
) -> None:
    """Report an account closed while its replayed balance was not 0, or while a pending
    hold named it (as source or target: a post or expiry would touch it after its close)."""
    if balance != 0:
        problems.add(
            "close_not_empty",
            f"account closed after transfer seq {transfer_seq} with a balance of {balance}",
            seq=transfer_seq,
            account=account,
            expected=0,
            found=balance,
        )
        return
    naming = [s for s, h in holds.pending.items() if account in (h.source, h.target)]
    if naming:
        problems.add(
            "close_not_empty",
            f"account closed after transfer seq {transfer_seq} while pending hold(s) "
            f"{', '.join(map(str, naming))} named it",
            seq=transfer_seq,
            account=account,
            expected="no pending hold",
            found=naming[0],
        )


def _check_running(
    problems: Problems,
    seq: int,
    debit: object,
    credit: object,
    after_d: object,
    after_c: object,
    balances: dict[int, int],
) -> None:
    """Report each stored running balance that is not its account's replayed balance."""
    for role, account, stored in (("debit", debit, after_d), ("credit", credit, after_c)):
        acc = _account(account)
        replayed = balances.get(acc) if acc is not None else None
        if replayed is None:
            continue  # an account the row cannot name: reported by `_check_row`
        if stored != replayed or type(stored) is not int:
            problems.add(
                "running_balance",
                f"{role}_balance differs from the replayed balance of the {role} account "
                "right after the row",
                seq=seq,
                account=acc,
                expected=replayed,
                found=stored if stored is None or type(stored) in (int, str) else repr(stored),
            )


def _check_row(
    problems: Problems,
    seq: int,
    kind: object,
    debit: object,
    credit: object,
    amount: object,
    accounts: dict[int, AccountState],
    floors: dict[int, int],
    balances: dict[int, int],
    closed: dict[int, int],
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
    if kind not in KIND_SIDES and kind not in HOLD_KINDS:
        problems.add(
            "bad_kind",
            "unknown transfer kind",
            seq=seq,
            expected="deposit|withdrawal|transfer|hold|post|void|expire",
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
    elif kind in KIND_SIDES and KIND_SIDES[kind] != side:
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
        elif acc in closed:
            problems.add(
                "closed_account",
                f"{role} account is used after its close (after transfer seq {closed[acc]})",
                seq=seq,
                account=acc,
                expected=f"seq <= {closed[acc]}",
                found=seq,
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
    problems: Problems,
    seq: int,
    debit: int,
    credit: int,
    amount: int,
    debit_balance: int,
    credit_balance: int,
    floors: dict[int, int],
    held: int = 0,
) -> None:
    """Report the replayed balances that left their bounds (if any); `held`: what the
    debit account's pending holds reserve (its floor is that much higher)."""
    if debit_balance < BALANCE_MIN:
        problems.add(
            "balance_overflow",
            f"debit of {amount} takes the balance below signed 64 bits",
            seq=seq,
            account=debit,
            expected=f">= {BALANCE_MIN}",
            found=debit_balance,
        )
    elif debit in floors and debit_balance - held < floors[debit]:
        problems.add(
            "overdraft",
            f"debit of {amount} takes the balance below -overdraft_limit"
            + (f" plus the {held} its pending holds reserve" if held else ""),
            seq=seq,
            account=debit,
            expected=f">= {floors[debit] + held}",
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


def _still(
    problems: Problems,
    seq: int,
    kind: object,
    debit: object,
    credit: object,
    amount: object,
    floors: dict[int, int],
    balances: dict[int, int],
    held: dict[int, int],
) -> None:
    """A hold, void or expire: both accounts must be open, and a hold must fit in what its
    source has available (`held` already includes it)."""
    if type(amount) is not int or not 1 <= amount <= AMOUNT_MAX:
        problems.add(
            "bad_amount", f"amount outside 1..{AMOUNT_MAX}", seq=seq, expected="1..10**15",
            found=amount,
        )  # fmt: skip
    if debit == credit:
        problems.add(
            "same_account", "debit and credit are the same account", seq=seq,
            account=_account(debit), expected="two accounts", found=debit,
        )  # fmt: skip
    for role, account in (("debit", debit), ("credit", credit)):
        if account not in floors:
            problems.add(
                "account_not_open",
                f"{role} account of a {kind} is not open (never opened, or closed)",
                seq=seq,
                account=_account(account),
                expected="an open account",
                found=account,
            )
    if kind == "hold" and type(debit) is int and debit in floors:
        margin = balances.get(debit, 0) - held.get(debit, 0) - floors[debit]
        if margin < 0:
            problems.add(
                "overdraft",
                f"a hold of {amount} exceeds what the account has available",
                seq=seq,
                account=debit,
                expected=f"available >= {amount}",
                found=margin + (amount if type(amount) is int else 0),
            )
