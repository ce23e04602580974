"""What the audit reports: the kinds of problem, one `Problem`, and the capped collector.

Pure data, no database: every audit check (`bank.ledger.audit_*`) adds to one
`Problems`, whatever backend the rows came from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Final

from bank.limits import AMOUNT_MAX, KEY_LENGTH_MAX

#: Problems kept in a report; later ones are only counted (a wrecked ledger stays cheap).
PROBLEMS_KEPT_MAX: Final = 1000

#: Every kind of problem the audit reports, and what it means.
PROBLEM_KINDS: Final[dict[str, str]] = {
    "schema": "a table, column, constraint, index, view or trigger differs from what the "
    "migrations create up to the ledger's revision (or is missing, or was never created by them)",
    "integrity": "SQLite's integrity check failed: an index does not hold exactly its table's "
    "rows (one forged under its original text), or the file is damaged",
    "seq_gap": "transfers.seq skips numbers: rows were deleted",
    "bad_seq": "a transfers.seq below 1 (a forged row)",
    "hash_mismatch": "a transfer does not hash to its stored hash from the previous row's hash "
    "(a row holding a value of the wrong type never does)",
    "head_mismatch": "the head of the transfers or account_events chain differs from the "
    "pinned head (expect_head)",
    "bad_kind": "a transfer's kind is not deposit, withdrawal or transfer",
    "kind_accounts": "a deposit/withdrawal does not touch @cash on the right side, "
    "or a transfer touches @cash",
    "same_account": "a transfer debits and credits the same account",
    "bad_amount": f"an amount that is not an integer from 1 to {AMOUNT_MAX}",
    "unknown_account": "a transfer names an account that was never opened",
    "account_not_open": "a transfer names an account before its opening event",
    "overdraft": "replay takes a customer account below -overdraft_limit",
    "balance_overflow": "replay takes a balance outside signed 64 bits",
    "balance_mismatch": "accounts.balance differs from the account's credits minus debits",
    "balance_sum": "the stored balances do not sum to 0",
    "duplicate_key": "an idempotency key is used by more than one transfer",
    "bad_key": f"a key that is not NULL or a text of 1 to {KEY_LENGTH_MAX} characters",
    "event_seq_gap": "account_events.seq skips numbers: events were deleted",
    "event_hash_mismatch": "an account event does not hash to its stored hash from the previous one "
    "(an event holding a value of the wrong type never does)",
    "bad_type": "a column holds a value of another storage class than its type "
    "(a text or REAL where an integer belongs, ...)",
    "chain_format": "chain_formats does not describe the chains as the migrations write it",
    "bad_event": "an account event that breaks the rules (kind, order, limit, name, transfer_seq)",
    "account_without_open": "an accounts row with no opening event",
    "event_for_missing_account": "an account event for an account with no accounts row",
    "name_mismatch": "accounts.name differs from the account's latest event",
    "limit_mismatch": "accounts.overdraft_limit differs from the account's latest event",
    # holds and atomic groups (revision 0006)
    "hold_not_pending": "a post, void or expire names a hold that is not pending at its seq "
    "(never a hold, already settled, or not yet made): a hold is settled at most once",
    "hold_settlement": "a post, void or expire that does not match its hold (accounts, "
    "amount released), or a hold_seq/expires_us on a row that cannot carry it",
    "post_exceeds_hold": "a post moves more than its hold reserved",
    "hold_expiry": "a post or void at or after its hold's deadline, or an expire before it",
    "group_incomplete": "an atomic group's rows are not all there, consecutive, from its "
    "link_first for link_count rows",
    "running_balance": "a transfer's debit_balance or credit_balance differs from the replayed "
    "balance of that account right after the row (revision 0005)",
    "closed_account": "a transfer touches an account after the event that closed it",
    "close_not_empty": "an account was closed while its replayed balance was not 0, or while "
    "a pending hold named it",
    # postings, the history index (revision 0007)
    "postings": "postings disagree with the transfers up to the watermark W "
    "(postings_upto.seq): a posting lost, extra, or moved to another account or seq",
    "postings_watermark": "the watermark W (postings_upto.seq) is below 0 or beyond the last "
    "transfer, or postings lie above it",
}

Value = int | str | None


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the ledger, located by transfer `seq`, `event_seq` and/or `account`."""

    kind: str
    message: str
    seq: int | None = None
    account: int | None = None
    expected: Value = None
    found: Value = None
    event_seq: int | None = None

    def as_dict(self) -> dict[str, Value]:
        """A JSON-ready mapping (ints stay exact ints)."""
        return {
            "kind": self.kind,
            "seq": self.seq,
            "event_seq": self.event_seq,
            "account": self.account,
            "expected": self.expected,
            "found": self.found,
            "message": self.message,
        }


class Problems:
    """Collects problems, keeping the first `PROBLEMS_KEPT_MAX` and counting all."""

    def __init__(self, kept_max: int = PROBLEMS_KEPT_MAX) -> None:
        self.kept: list[Problem] = []
        self.counts: Counter[str] = Counter()
        self._kept_max = kept_max

    def add(
        self,
        kind: str,
        message: str,
        *,
        seq: int | None = None,
        account: int | None = None,
        expected: object = None,
        found: object = None,
        event_seq: int | None = None,
    ) -> None:
        assert kind in PROBLEM_KINDS, kind
        self.counts[kind] += 1
        if len(self.kept) < self._kept_max:
            self.kept.append(
                Problem(
                    kind,
                    message,
                    seq,
                    account,
                    shown_value(expected),
                    shown_value(found),
                    event_seq,
                )
            )

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def shown_value(v: object) -> Value:
    """Keep ints and text as they are; show anything else (REAL, BLOB) by its repr."""
    if v is None or type(v) is int or type(v) is str:
        return v
    return repr(v)


def is_int(v: object) -> bool:
    """An integer value as the database returns one (never a bool: no driver returns one)."""
    return type(v) is int
