"""bank: a simulated banking transaction engine with a durable, hash-chained ledger.

The embedded engine (`Bank`), its commands, records and errors. `import bank` loads only
what embedding needs: the command line (`bank.cli`), the simulator (`bank.simulate`, the
`simulate` extra), Alembic (until a ledger is opened) and rich are imported on use.
"""

from importlib.metadata import PackageNotFoundError, version

from bank.account import Account
from bank.clock import Clock, ManualClock, SystemClock
from bank.commands import (
    AccountSpec,
    AnyCommand,
    BankCommand,
    Deposit,
    Hold,
    Post,
    Transfer,
    Void,
    Withdrawal,
)
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
    HoldNotFound,
    HoldNotPending,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidCommand,
    InvalidExpectedHead,
    KeyInFlight,
    LedgerBusy,
    LedgerCorrupt,
    LedgerUnavailable,
    LedgerVersionError,
    LinkedCommandFailed,
    NotALedger,
    PostExceedsHold,
    QueueFull,
    SchemaDowngradeRefused,
    SeqBeyondHead,
    ServerNotDurable,
    UnsupportedLedgerUrl,
    WaitOnBankThread,
)
from bank.ledger.audit import AuditReport, Problem
from bank.limits import AMOUNT_MAX, CASH_ACCOUNT_ID, CASH_ACCOUNT_NAME, GROUP_COMMANDS_MAX
from bank.records import Receipt, Snapshot

try:
    __version__ = version("bank")
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AMOUNT_MAX",
    "CASH_ACCOUNT_ID",
    "CASH_ACCOUNT_NAME",
    "GROUP_COMMANDS_MAX",
    "Account",
    "AccountClosed",
    "AccountNameTaken",
    "AccountNotEmpty",
    "AccountNotFound",
    "AccountSpec",
    "AccountsMustBeDifferent",
    "AnyCommand",
    "AuditReport",
    "BalanceOverflow",
    "Bank",
    "BankClosed",
    "BankCommand",
    "BankError",
    "BankStats",
    "CannotAudit",
    "CannotCheckHistory",
    "CannotCopy",
    "CannotOpenLedger",
    "Clock",
    "CloseFromBankThread",
    "Deposit",
    "DestinationNotEmpty",
    "Hold",
    "HoldNotFound",
    "HoldNotPending",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidCommand",
    "InvalidExpectedHead",
    "KeyInFlight",
    "LedgerBusy",
    "LedgerCorrupt",
    "LedgerUnavailable",
    "LedgerVersionError",
    "LinkedCommandFailed",
    "ManualClock",
    "NotALedger",
    "Post",
    "PostExceedsHold",
    "Problem",
    "QueueFull",
    "Receipt",
    "SchemaDowngradeRefused",
    "SeqBeyondHead",
    "ServerNotDurable",
    "Snapshot",
    "SystemClock",
    "Transfer",
    "UnsupportedLedgerUrl",
    "Void",
    "WaitOnBankThread",
    "Withdrawal",
]
