"""bank: a simulated banking transaction engine with a durable, hash-chained ledger.

The embedded engine (`Bank`), its commands, records and errors. `import bank` loads only
what embedding needs: the command line (`bank.cli`), the simulator (`bank.simulate`, the
`simulate` extra), Alembic (until a ledger is opened) and rich are imported on use.
"""

from importlib.metadata import PackageNotFoundError, version

from bank.account import Account
from bank.commands import AccountSpec, Deposit, Transfer, Withdrawal
from bank.engine import Bank, BankStats
from bank.errors import (
    AccountClosed,
    AccountNameTaken,
    AccountNotEmpty,
    AccountNotFound,
    AccountsMustBeDifferent,
    BalanceOverflow,
    BankClosed,
    BankError,
    CannotAudit,
    CannotCheckHistory,
    CannotCopy,
    CannotOpenLedger,
    CloseFromBankThread,
    DestinationNotEmpty,
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
    SchemaDowngradeRefused,
    SeqBeyondHead,
    ServerNotDurable,
    UnsupportedLedgerUrl,
    WaitOnBankThread,
)
from bank.ledger.audit import AuditReport, Problem
from bank.limits import AMOUNT_MAX, CASH_ACCOUNT_ID, CASH_ACCOUNT_NAME
from bank.records import Receipt, Snapshot

try:
    __version__ = version("bank")
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AMOUNT_MAX",
    "CASH_ACCOUNT_ID",
    "CASH_ACCOUNT_NAME",
    "Account",
    "AccountClosed",
    "AccountNameTaken",
    "AccountNotEmpty",
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
    "CannotCheckHistory",
    "CannotCopy",
    "CannotOpenLedger",
    "CloseFromBankThread",
    "Deposit",
    "DestinationNotEmpty",
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
    "SchemaDowngradeRefused",
    "SeqBeyondHead",
    "ServerNotDurable",
    "Snapshot",
    "Transfer",
    "UnsupportedLedgerUrl",
    "WaitOnBankThread",
    "Withdrawal",
]
