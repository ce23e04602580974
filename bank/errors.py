"""The error hierarchy: every expected failure is a `BankError` named like a sentence.

The outcome model (what an answer means for an operation):
- a `Receipt`: committed and durable;
- a refusal (`InvalidCommand`, `AccountNotFound`, `InsufficientFunds`,
  `BalanceOverflow`, `IdempotencyConflict`, `QueueFull`, `KeyInFlight`, ...):
  nothing changed, nothing was written, a keyed refusal leaves its key free;
- `BankClosed`: refused because the bank was closed; nothing changed;
- `LedgerUnavailable` on an operation in flight: the outcome is unknown (its
  commit may have reached the disk); reopen the ledger and `find(key)` tells.
An operation the bank knows it committed is only ever answered with its receipt.
"""


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


class KeyInFlight(BankError):
    """An operation with the same idempotency key stayed unanswered past the wait's deadline;
    this one changed nothing (retry it)."""


class BankClosed(BankError):
    """The bank was closed (you closed it, or the program is exiting): nothing was changed."""


class CloseFromBankThread(BankError):
    """`close()` was called on one of the bank's own threads (a future's done-callback):
    it would wait for itself; close from another thread."""


class WaitOnBankThread(BankError):
    """A call that waits for the ledger (`deposit`, `balance`, `snapshot`, `open_account`,
    ...) was made on one of the bank's own threads (a done-callback): it would wait for
    itself forever; `submit` without waiting, or call from another thread."""


class LedgerUnavailable(BankError):
    """The ledger could not be written (it broke), so the bank stopped: on an operation in
    flight the outcome is UNKNOWN (its commit may have reached the disk): after reopening,
    `find(key)` tells whether it was committed."""


class NotALedger(BankError):
    """The file exists but is not a `bank` ledger; it was left untouched."""


class LedgerVersionError(NotALedger):
    """The ledger was written by a newer `bank` (an unknown schema revision)."""


class LedgerBusy(BankError):
    """Another open `Bank` (in this or another process) owns the ledger file, or another
    process kept SQLite's lock on it past the busy timeout."""


class CannotAudit(BankError):
    """The audit could not run: missing file, not a ledger, unknown schema revision."""


class InvalidExpectedHead(CannotAudit, ValueError):
    """`expect_head` is not a head as `bank audit` prints it (`SEQ:HASH/EVENT_SEQ:EVENT_HASH`)."""


class CannotCopy(BankError):
    """`copy_ledger` could not copy: the source is not a ledger at the newest revision, the
    destination is the source or not empty, or a row was refused; the destination was
    left empty (a new file removed)."""


class DestinationNotEmpty(CannotCopy):
    """The destination of `copy_ledger` already holds a ledger or another program's tables:
    a copy goes only into a new file or an empty database (it was left untouched)."""


class LedgerCorrupt(BankError):
    """`Bank.open` found stored balances, limits or chain heads that disagree with a replay
    of the ledger, a ledger table missing, or (upgrading) a value of the wrong type: it
    refuses to acknowledge anything on top of them (run `bank audit`)."""


class CannotCheckHistory(BankError):
    """`check-history` could not run: a missing or malformed history, or not its ledger."""


class SchemaDowngradeRefused(BankError):
    """A schema downgrade would leave rows that the older revision cannot verify."""


class UnsupportedLedgerUrl(NotALedger):
    """The URL names no durable single-writer ledger file (in memory, read-only, immutable,
    nolock, another VFS or driver): refused before anything is opened."""


class CannotOpenLedger(NotALedger):
    """SQLite could not open or create the ledger (disk full, read-only, I/O error, a hot
    journal a reader cannot roll back); nothing was written and nothing half-made is left."""


class ServerNotDurable(CannotOpenLedger):
    """`durability="full"` was asked of a PostgreSQL server that cannot make a commit
    durable (it runs with `fsync=off`): refused before anything is written."""


# -- reads as of a seq, account lifecycle (issue 11: history, balances, closing) ---------------


class SeqBeyondHead(BankError, ValueError):
    """A read as of a seq (`at_seq=`) past the ledger's last committed transfer: that
    point of the ledger does not exist (yet)."""


class AccountClosed(BankError):
    """An operation names an account that `close_account` closed: nothing touches it again."""


class AccountNotEmpty(BankError):
    """`close_account` on an account whose balance is not 0 (an account closes only empty)."""


# -- holds and atomic groups (issue 11) -------------------------------------------------


class HoldNotFound(BankError, LookupError):
    """A `Post` or `Void` names a seq that is not a hold's (no such row, or another kind)."""


class HoldNotPending(BankError):
    """A `Post` or `Void` names a hold that was already posted, voided or expired (the
    message says which, at what seq): a hold is settled at most once."""


class PostExceedsHold(BankError):
    """A `Post` asks for more than its hold reserved."""


class LinkedCommandFailed(BankError):
    """A command of an atomic group was refused, so none of the group was applied:
    `.index` is its position in the group, `.error` its refusal."""

    def __init__(self, index: int, error: BankError) -> None:
        super().__init__(f"command {index} of the group was refused, so none was applied: {error}")
        self.index = index
        self.error = error

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.index, self.error))
