"""bank: a simulated banking transaction engine with a durable, hash-chained SQLite ledger."""

from bank.account import Account
from bank.commands import AccountSpec, Deposit, Transfer, Withdrawal
from bank.engine import Bank, BankStats
from bank.errors import (
    AccountNameTaken,
    AccountNotFound,
    AccountsMustBeDifferent,
    BalanceOverflow,
    BankClosed,
    BankError,
    CannotAudit,
    CannotOpenLedger,
    CloseFromBankThread,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidCommand,
    InvalidExpectedHead,
    KeyInFlight,
    LedgerBusy,
    LedgerCorrupt,
    LedgerUnavailable,
    LedgerVersionError,
    NotALedger,
    QueueFull,
    UnsupportedLedgerUrl,
)
from bank.ledger.audit import AuditReport, Problem
from bank.limits import AMOUNT_MAX, CASH_ACCOUNT_ID, CASH_ACCOUNT_NAME
from bank.records import Receipt, Snapshot

__all__ = [
    "AMOUNT_MAX",
    "CASH_ACCOUNT_ID",
    "CASH_ACCOUNT_NAME",
    "Account",
    "AccountNameTaken",
    "AccountNotFound",
    "AccountSpec",
    "AccountsMustBeDifferent",
    "AuditReport",
    "BalanceOverflow",
    "Bank",
    "BankClosed",
    "BankError",
    "BankStats",
    "CannotAudit",
    "CannotOpenLedger",
    "CloseFromBankThread",
    "Deposit",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidCommand",
    "InvalidExpectedHead",
    "KeyInFlight",
    "LedgerBusy",
    "LedgerCorrupt",
    "LedgerUnavailable",
    "LedgerVersionError",
    "NotALedger",
    "Problem",
    "QueueFull",
    "Receipt",
    "Snapshot",
    "Transfer",
    "UnsupportedLedgerUrl",
    "Withdrawal",
]
