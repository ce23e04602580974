"""The error hierarchy: every expected failure is a `BankError` named like a sentence."""


class BankError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidCommand(BankError, ValueError):
    """A command or argument breaks a rule (the message names the field and the rule)."""


class AccountsMustBeDifferent(InvalidCommand):
    """A transfer names the same account as source and target."""


class AccountNotFound(BankError, LookupError):
    """An operation names an account id the bank has never opened."""


class AccountNameTaken(BankError):
    """`open_account` was given a name another account already has."""


class InsufficientFunds(BankError):
    """A debit would take a customer account below its overdraft limit."""


class BalanceOverflow(BankError):
    """An operation would take a balance outside signed 64 bits."""


class IdempotencyConflict(BankError):
    """An idempotency key was reused with a different command."""


class QueueFull(BankError):
    """The job queue stayed full for the whole `timeout` of a submit."""


class BankClosed(BankError):
    """The bank was closed: it accepts no more calls (you closed it)."""


class LedgerUnavailable(BankError):
    """The ledger could not be written; the bank stopped to keep memory and disk equal (it broke)."""


class NotALedger(BankError):
    """The file exists but is not a `bank` ledger; it was left untouched."""


class LedgerVersionError(NotALedger):
    """The ledger was written by a newer `bank` (an unknown schema revision)."""


class LedgerBusy(BankError):
    """Another open `Bank` (in this or another process) owns the ledger file."""


class CannotAudit(BankError):
    """The audit could not run: missing file, not a ledger, unknown schema revision."""


class LedgerCorrupt(BankError):
    """`Bank.open` found stored balances, limits or chain heads that disagree with a replay
    of the ledger: it refuses to acknowledge anything on top of them (run `bank audit`)."""


class UnsupportedLedgerUrl(NotALedger):
    """The URL names no durable single-writer ledger file (in memory, read-only, immutable,
    nolock, another VFS or driver): refused before anything is opened."""


class CannotOpenLedger(NotALedger):
    """SQLite could not open or create the ledger (disk full, read-only, I/O error, a hot
    journal a reader cannot roll back); nothing was written and nothing half-made is left."""
