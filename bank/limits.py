"""Every bound the engine enforces, in one place (units last in the name)."""

from typing import Final

#: Largest single amount, in minor units (10**15 cents is ten trillion).
AMOUNT_MAX: Final = 10**15
#: Balances live in signed 64 bits, like the ledger's INTEGER column.
BALANCE_MIN: Final = -(2**63)
BALANCE_MAX: Final = 2**63 - 1
#: An overdraft limit is how far below zero a customer account may go.
OVERDRAFT_LIMIT_MAX: Final = BALANCE_MAX
#: Account ids are positive signed 64-bit integers (0 is `@cash`).
ACCOUNT_ID_MAX: Final = BALANCE_MAX

KEY_LENGTH_MAX: Final = 128
NAME_LENGTH_MAX: Final = 64

#: The system account every deposit comes from and every withdrawal goes to.
CASH_ACCOUNT_ID: Final = 0
CASH_ACCOUNT_NAME: Final = "@cash"

#: Job queue capacity, counted in operations. Room for every operation a busy set of
#: callers keeps in flight (16 x 64 in the benchmark) with a margin: a producer that
#: blocks on a full queue costs two context switches (measured: 4-5% of throughput).
QUEUE_CAPACITY_DEFAULT: Final = 4096
QUEUE_CAPACITY_MAX: Final = 1_000_000
#: Under CPython's GIL one worker already keeps up with the ledger writer; more add
#: contention (measured: 1 worker ~5-15% faster than 4 in `scripts/bench.py`). Two
#: keep intake moving while one waits on an in-flight duplicate key or a key look-up.
WORKERS_DEFAULT: Final = 2
WORKERS_MAX: Final = 64
#: Operations a worker takes from the queue in one hand-off.
WORKER_BATCH_OPS_MAX: Final = 256
#: Operations the ledger writer commits in one SQLite transaction.
COMMIT_BATCH_OPS_MAX: Final = 4096
#: Rows per multi-row INSERT or `UPDATE ... FROM (VALUES ...)` page. Pages are powers
#: of two (see `bank.ledger.writer.page_sizes`), so a handful of statement texts cover
#: every batch and all stay prepared in sqlite3's statement cache; a page is also
#: kept under the connection's limit of bound variables (999 on SQLite < 3.32).
ROWS_PER_STATEMENT_MAX: Final = 512
#: Rows `copy_ledger` hands the destination per executemany (or COPY buffer flush):
#: memory stays flat however long the ledger, and a few thousand rows per round trip
#: already reach the driver's speed.
COPY_CHUNK_ROWS: Final = 5000
#: Operations `submit_many` puts in the queue per hand-off.
SUBMIT_CHUNK_OPS_MAX: Final = 256

#: How long `Bank.open` waits for SQLite's write lock before giving up.
BUSY_TIMEOUT_MS: Final = 5000
#: How long a lease holder's probe of its server may go unanswered before the lease
#: counts as lost (a frozen or unreachable server: a SIGSTOPped process tree or a hung
#: machine keeps every socket open and ACKed, so no TCP timer fires). Generous, so a
#: loaded server in a checkpoint does not stop the bank; the bank then cuts its own
#: connections to that server, and every wait on it ends.
LEASE_PROBE_TIMEOUT_S: Final = 15.0
#: How long close() waits for a thread before reporting it stuck (the ledger's lock is
#: then released by the last bank thread to exit, never while one still runs).
JOIN_WAIT_S_MAX: Final = 60.0
#: How long an operation (or `find`) waits for another in-flight operation with the
#: same idempotency key to be answered before giving up with `KeyInFlight`.
KEY_WAIT_S_MAX: Final = 60.0
#: Problems a `LedgerCorrupt` from `Bank.open` lists (the rest are counted).
OPEN_PROBLEMS_SHOWN_MAX: Final = 5
#: Most commands `Bank.submit_batch`/`execute` take at once (TigerBeetle's batch size; also
#: a group's bound). One future carries the whole batch's list of outcomes, so the bound
#: caps what one call holds in memory and how long one caller keeps the queue's room;
#: more commands go in several batches.
BATCH_OPS_MAX: Final = 8190
#: Longest the ledger writer waits, after answering callers that block on their answer
#: (deposit/withdraw/transfer), for them to stage their next operations so that one
#: commit carries them all; never longer than a commit takes.
GATHER_WAIT_S_MAX: Final = 0.001
#: The writer gathers for blocking callers only once writing a batch (its statements
#: and COMMIT, smoothed) takes this long: below it, their way back takes longer than
#: the write it would save (SQLite here 0.36 ms: not; PostgreSQL 1.4 ms: gathers).
GATHER_WRITE_S_MIN: Final = 0.0007
#: Receipts one `history` page may hold (`limit=`), and its default (h11read, issue 11).
HISTORY_LIMIT_MAX: Final = 100_000
HISTORY_LIMIT_DEFAULT: Final = 1000

#: The longest a hold may wait for its post or void (`Hold.expires_s`): about 136 years,
#: TigerBeetle's u32 seconds. Its deadline, in microseconds, then stays far inside 64 bits.
HOLD_EXPIRES_S_MAX: Final = 2**32 - 1
#: The longest the expiry timer sleeps between looks at the clock (it is woken earlier by
#: a nearer deadline, a controllable clock's advance, or close()).
HOLD_TIMER_WAIT_S_MAX: Final = 5.0
#: Commands in one atomic group (`Bank.submit_linked`), as in TigerBeetle (8190 events
#: per request).
GROUP_COMMANDS_MAX: Final = 8190
