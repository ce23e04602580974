#!/usr/bin/env python3
"""Crash loop: run a load in a child process, SIGKILL it at a random instant, check the ledger.

Each iteration starts this same file as a child (`--child`), which opens a bank,
opens accounts and then, from several teller threads, submits keyed deposits,
withdrawals and transfers (single `submit`s and `submit_many` batches), while
one more thread raises and lowers overdraft limits. For each answer it
receives it appends one line to an ack file with `os.write` on an O_APPEND
descriptor: `A key seq kind debit credit amount` for a receipt, `R key Reason`
for a rejection, `D key seq` for a deliberate retry of an acknowledged key,
`L account limit` / `LR account limit` for a limit change / refusal. The
parent waits until the child has created the ledger or acknowledged some
operations, sleeps a random time and kills it with SIGKILL.

Then, on a copy of the files exactly as the kill left them:

- `bank.ledger.audit.audit_ledger` must find nothing wrong: gapless seqs, both
  hash chains, the replay of `transfers` against the limits in force, stored
  balances and limits, keys (the audit is the one independent re-derivation, so
  this script keeps no private copy of the chain formula);
- read with plain `sqlite3`: every acknowledged key is in the ledger with the
  acknowledged seq and fields; every key acknowledged as rejected is absent;
  retries got the original seq; every acknowledged limit change is in
  `account_events`;
- per teller, the ack file has no holes and the only unacknowledged keys in
  the ledger are the ones that were in flight at the kill;

and then through `bank.Bank.open` on the original files (the first to touch
them after the kill): the restored balances equal the audited ones, `find(key)`
returns every acknowledged receipt, a retry of an acknowledged key returns it
again, and a new operation continues the chain at seq N+1.

Children are forked from a pre-imported server (`tests.faults.ForkServer`), so a
round costs ~0.4-0.6 s; `--no-fork-server` starts a fresh interpreter each time.

    .venv/bin/python scripts/crash_loop.py --iterations 1000
    .venv/bin/python scripts/crash_loop.py --iterations 10 --durability normal --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.faults import ForkServer

CASH_ID = 0
#: Largest `submit_many` batch a child teller sends (bounds what can be in flight).
BATCH_OPS_MAX = 16
#: A child that is never killed gives up after this long (so none is ever orphaned).
CHILD_LIFETIME_S_MAX = 120.0
#: A kill at start-up lands at most this long after the child creates the ledger file.
STARTUP_WINDOW_S = 0.15
#: How long the parent waits for the child's first acknowledgements.
STARTUP_WAIT_S_MAX = 60.0
#: The child's postings run size: small, so that every round writes several runs.
POSTINGS_RUN_ROWS_DEFAULT = 32
REPO_ROOT = Path(__file__).resolve().parents[1]


# -- the child ---------------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> int:
    """Open the bank and run keyed load from `args.threads` tellers until killed."""
    import bank
    from bank.ledger import postings

    # Postings flushed every few commits (revision 0007), so kills land before, inside
    # and after a flush's transaction too; the audit checks them against the rows.
    setattr(postings, "POSTINGS_RUN_ROWS", args.postings_run_rows)  # noqa: B010 (a Final)
    b = bank.Bank.open(args.db, workers=args.workers, durability=args.durability)
    rng = random.Random(args.seed)
    ids = [
        b.open_account(f"acct-{i}", overdraft_limit=rng.choice([0, 0, 500, 5_000])).id
        for i in range(args.accounts)
    ]
    fd = os.open(args.acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def ack(line: str) -> None:
        # One write(2) per line on an O_APPEND fd: lines from threads never interleave,
        # and a line is in the file (page cache) before the next operation is sent.
        os.write(fd, line.encode())

    def teller(t: int) -> None:
        trng = random.Random(args.seed * 1_000 + t)
        acked: list[tuple[bank.Deposit | bank.Withdrawal | bank.Transfer, int]] = []
        n = 0
        while True:
            if acked and trng.random() < 0.05:
                command, _seq = trng.choice(acked)  # a client retrying an answered request
                receipt = b.submit(command).result()
                ack(f"D {command.key} {receipt.seq}\n")
                continue
            batch: list[bank.Deposit | bank.Withdrawal | bank.Transfer] = []
            for _ in range(trng.choice([1, 1, 2, 4, BATCH_OPS_MAX])):
                n += 1
                key = f"t{t}-{n}"
                kind = trng.choices(["transfer", "deposit", "withdrawal"], [70, 15, 15])[0]
                amount = trng.randint(1, 2_000)
                account = trng.choice(ids)
                if kind == "deposit":
                    batch.append(bank.Deposit(account=account, amount=amount, key=key))
                elif kind == "withdrawal":
                    batch.append(bank.Withdrawal(account=account, amount=amount, key=key))
                else:
                    target = trng.choice([i for i in ids if i != account])
                    batch.append(
                        bank.Transfer(source=account, target=target, amount=amount, key=key)
                    )
            futures = [b.submit(batch[0])] if len(batch) == 1 else b.submit_many(batch)
            for command, future in zip(batch, futures, strict=True):
                try:
                    r = future.result()
                except bank.BankError as exc:
                    ack(f"R {command.key} {type(exc).__name__}\n")
                else:
                    ack(
                        f"A {command.key} {r.seq} {r.kind} {r.debit_account} "
                        f"{r.credit_account} {r.amount}\n"
                    )
                    acked.append((command, r.seq))

    def guarded_teller(t: int) -> None:
        try:
            teller(t)
        except BaseException as exc:  # any surprise must reach the parent, not vanish
            ack(f"X teller-{t} {exc!r}".replace("\n", " ") + "\n")
            raise

    def limit_setter() -> None:
        lrng = random.Random(args.seed * 7_919)
        try:
            while True:
                time.sleep(lrng.uniform(0, 0.02))
                account, limit = lrng.choice(ids), lrng.choice([0, 100, 500, 5_000, 20_000])
                try:
                    b.set_overdraft_limit(account, limit)
                except bank.InsufficientFunds:
                    ack(f"LR {account} {limit}\n")
                else:
                    ack(f"L {account} {limit}\n")
        except BaseException as exc:
            ack(f"X limit-setter {exc!r}".replace("\n", " ") + "\n")
            raise

    threading.Thread(target=limit_setter, name="limit-setter", daemon=True).start()
    for t in range(args.threads):
        threading.Thread(target=guarded_teller, args=(t,), name=f"teller-{t}", daemon=True).start()
    time.sleep(CHILD_LIFETIME_S_MAX)
    os._exit(3)  # nobody killed us: the parent is gone


# -- the parent: run, kill, verify --------------------------------------------------------


class CrashCheckFailed(AssertionError):
    """The ledger left by a killed child breaks a promise (the message says which)."""


@dataclass(frozen=True)
class Outcome:
    """What one iteration saw."""

    durability: str
    seed: int
    phase: str
    killed_after_s: float
    acked: int
    rejected: int
    retries: int
    rows: int
    in_flight_committed: int
    limit_changes: int = 0

    def line(self) -> str:
        return (
            f"durability={self.durability} seed={self.seed} killed in {self.phase} after "
            f"{self.killed_after_s:.3f} s: {self.acked} acked, {self.rejected} rejected, "
            f"{self.retries} retries, {self.limit_changes} limit changes, {self.rows} rows "
            f"({self.in_flight_committed} committed but unacknowledged)"
        )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CrashCheckFailed(message)


def read_acks(path: Path) -> list[list[str]]:
    """The ack file's complete lines, split into fields."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")[:-1]  # a torn last line (no newline) is not an ack
    return [line.split(" ") for line in lines]


def count_acks(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _tables(db: Path | str) -> set[str]:
    """The tables of the ledger file or server database `db`, read by SQLAlchemy's inspector."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.pool import NullPool

    from bank.ledger.backends import ledger_url

    url = ledger_url(db)
    if isinstance(db, Path):  # read-only: the copy must stay as the kill left it
        url = url.set(database=f"file:{db}?mode=ro", query={"uri": "true"})
    engine = create_engine(url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _rows(db: Path | str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of `sql` read beside the bank: plain sqlite3 on a file, else the read-only reader."""
    if isinstance(db, Path):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    from sqlalchemy import text

    from bank.ledger.reader import LedgerReader

    with LedgerReader(db) as reader:
        return reader.read(lambda conn: [tuple(r) for r in conn.execute(text(sql))])


def _started(ledger: Path | str, acks: Path) -> bool:
    """The child has begun on the ledger: its file exists (a server database always
    does: then the ack file, created once the accounts are open, tells)."""
    return ledger.exists() if isinstance(ledger, Path) else acks.exists()


def has_schema(db: Path | str) -> bool:
    """True if `db` holds the ledger's tables (False for a missing, empty or blank file,
    or an empty database)."""
    if isinstance(db, Path) and (not db.exists() or db.stat().st_size == 0):
        return False
    names = _tables(db)
    required = {"accounts", "transfers", "account_events", "alembic_version"}
    _check(not names or required <= names, f"a half-created ledger: tables {sorted(names)}")
    return bool(names)


@dataclass
class LedgerState:
    """What plain sqlite3 finds in the ledger, already verified."""

    rows: int
    balances: dict[int, int]
    by_key: dict[str, tuple[int, str, int, int, int]]  # key -> (seq, kind, debit, credit, amount)
    limit_history: dict[int, list[int]]  # account -> its limit changes, in order


def verify_file(db: Path | str) -> LedgerState:
    """Audit the ledger (`bank.ledger.audit.audit_ledger`: seq, both hash chains, the
    replay against the limits in force, stored balances and limits), then read what the
    ack checks need with plain sqlite3.

    The audit is the one independent re-derivation of the chain and the replay; this
    script no longer keeps a private copy of either, so a change of the chain's
    encoding is checked here by the same code that `bank audit` runs.
    """
    from bank.errors import CannotAudit
    from bank.ledger.audit import audit_ledger

    try:
        report = audit_ledger(db)
    except CannotAudit as exc:
        raise CrashCheckFailed(f"the killed ledger cannot be audited: {exc}") from None
    _check(
        report.ok,
        f"audit: {report.problems_total} problems: "
        + "; ".join(f"{p.kind} {p.message}" for p in report.problems[:5]),
    )
    rows = _rows(
        db,
        "SELECT seq, key, kind, debit_account_id, credit_account_id, amount "
        "FROM transfers ORDER BY seq",
    )
    balances: dict[int, int] = dict(_rows(db, "SELECT id, balance FROM accounts"))
    events = _rows(
        db,
        "SELECT account_id, overdraft_limit FROM account_events WHERE kind = 'limit' ORDER BY seq",
    )
    _check(len(rows) == report.seq, f"the audit saw {report.seq} rows, a plain read {len(rows)}")
    limit_history: dict[int, list[int]] = {}
    for account_id, limit in events:
        limit_history.setdefault(account_id, []).append(limit)
    # Gapless seqs, unique keys, both chains, the replay against the limits in force and
    # the stored balances (their sum included) are the audit's: nothing is re-derived here.
    by_key = {
        key: (seq, kind, debit, credit, amount)
        for seq, key, kind, debit, credit, amount in rows
        if key is not None
    }
    return LedgerState(len(rows), balances, by_key, limit_history)


def verify_acks(state: LedgerState, acks: list[list[str]]) -> tuple[int, int, int, int]:
    """Check every acknowledgement against the ledger; returns (acked, rejected, retries, in flight)."""
    acked = rejected = retries = 0
    answered: dict[str, list[int]] = {}  # teller -> acknowledged indices, in ack order
    limits_set: dict[int, list[int]] = {}  # account -> acknowledged limit changes, in order
    for fields in acks:
        tag, key = fields[0], fields[1]
        if tag in ("L", "LR"):
            if tag == "L":
                limits_set.setdefault(int(fields[1]), []).append(int(fields[2]))
            continue
        if tag == "A":
            acked += 1
            seq, kind, debit, credit, amount = fields[2:]
            _check(
                key in state.by_key, f"acknowledged key {key!r} (seq {seq}) is not in the ledger"
            )
            expected = (int(seq), kind, int(debit), int(credit), int(amount))
            _check(
                state.by_key[key] == expected,
                f"key {key!r}: acknowledged as {expected}, ledger has {state.by_key[key]}",
            )
        elif tag == "R":
            rejected += 1
            # Every account exists and amounts are small: a lack of funds is the only
            # legitimate reason to refuse (a fresh key can never conflict).
            _check(fields[2] == "InsufficientFunds", f"key {key!r} refused: {fields[2]}")
            _check(
                key not in state.by_key,
                f"key {key!r} was rejected ({fields[2]}) but is in the ledger",
            )
        elif tag == "D":
            retries += 1
            _check(
                key in state.by_key and state.by_key[key][0] == int(fields[2]),
                f"retry of key {key!r} got seq {fields[2]}, not the original",
            )
            continue
        else:
            raise CrashCheckFailed(f"ack file: unexpected line {' '.join(fields)!r}")
        teller, index = key[1:].split("-")
        answered.setdefault(teller, []).append(int(index))
    for teller, indices in answered.items():
        _check(
            indices == list(range(1, len(indices) + 1)),
            f"teller {teller}: acknowledgements out of order or missing: {indices[:20]}...",
        )
    for account, acknowledged in limits_set.items():
        history = state.limit_history.get(account, [])
        # One limit setter: the ledger has every acknowledged change, plus at most the
        # one in flight at the kill.
        _check(
            history[: len(acknowledged)] == acknowledged and len(history) <= len(acknowledged) + 1,
            f"account {account}: limit changes acknowledged {acknowledged}, ledger has {history}",
        )
    in_flight = 0
    for key in state.by_key:
        teller, index = key[1:].split("-")
        last = len(answered.get(teller, []))
        if int(index) > last:
            in_flight += 1
            _check(
                int(index) <= last + BATCH_OPS_MAX,
                f"key {key!r} is in the ledger but teller {teller} had only sent up to "
                f"index {last + BATCH_OPS_MAX}",
            )
    return acked, rejected, retries, in_flight


def verify_reopen(
    db: Path | str, durability: str, state: LedgerState, acks: list[list[str]]
) -> None:
    """Reopen with `bank.Bank.open` and check what it restored; then extend the chain by one.

    Any exception on the way (a raw `OperationalError` from `Bank.open` on a file killed
    mid-creation, say) fails the round with its seed, like a broken promise.
    """
    try:
        _verify_reopen(db, durability, state, acks)
    except CrashCheckFailed:
        raise
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise CrashCheckFailed(
            f"reopening after the kill raised {type(exc).__module__}.{type(exc).__name__}: {first}"
        ) from exc


def _verify_reopen(
    db: Path | str, durability: str, state: LedgerState, acks: list[list[str]]
) -> None:
    import bank

    with bank.Bank.open(db, workers=2, durability=durability) as b:
        snap = b.snapshot()
        _check(snap.seq == state.rows, f"reopened at seq {snap.seq}, the ledger has {state.rows}")
        _check(snap.balances == state.balances, "reopened balances differ from the replay")
        _check(snap.total == 0, f"reopened balances sum to {snap.total}")
        accepted = [f for f in acks if f[0] == "A"]
        for fields in accepted:
            receipt = b.find(fields[1])
            _check(
                receipt is not None and receipt.seq == int(fields[2]),
                f"find({fields[1]!r}) after reopen gave {receipt}",
            )
        for fields in acks:
            if fields[0] == "R":
                _check(b.find(fields[1]) is None, f"rejected key {fields[1]!r} found after reopen")
        if accepted:
            key, seq, kind, debit, credit, amount = accepted[-1][1:]
            if kind == "deposit":
                again = b.deposit(int(credit), int(amount), key=key)
            elif kind == "withdrawal":
                again = b.withdraw(int(debit), int(amount), key=key)
            else:
                again = b.transfer(int(debit), int(credit), int(amount), key=key)
            _check(again.seq == int(seq), f"retry of {key!r} after reopen got seq {again.seq}")
        customers = [a for a in sorted(state.balances) if a != CASH_ID]
        customer = customers[0] if customers else b.open_account("after-the-crash").id
        fresh = b.deposit(customer, 1, key="after-the-crash")
        _check(fresh.seq == state.rows + 1, f"first op after reopen got seq {fresh.seq}")
    after = verify_file(db)  # the chain continues from the recovered head
    _check(after.rows == state.rows + 1, "the post-crash operation is not in the ledger")


class _Child:
    """The killed child: a subprocess, or a process forked by a `ForkServer`."""

    def __init__(
        self, command: list[str], stderr_path: Path, env: dict[str, str], server: ForkServer | None
    ) -> None:
        self._server = server
        self._code: int | None = None
        if server is None:
            with stderr_path.open("wb") as err:
                self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, stderr=err, env=env
                )
            self.pid = self._proc.pid
        else:
            self._proc = None
            self.pid = server.spawn(Path(command[1]), command[2:], Path(os.devnull), stderr_path)

    def poll(self) -> int | None:
        """The exit code if the child has ended (a forked child: only if it is gone)."""
        if self._proc is not None:
            return self._proc.poll()
        if self._code is None:
            try:
                os.kill(self.pid, 0)
                with Path(f"/proc/{self.pid}/stat").open() as fh:
                    if fh.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not reaped
                        self._code = self.reap()
            except (ProcessLookupError, FileNotFoundError):
                self._code = self.reap()
        return self._code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def reap(self) -> int:
        """Kill the child if it still runs and return its exit code."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            return self._proc.wait()
        if self._code is None:
            assert self._server is not None
            self.kill()
            self._code = self._server.wait(self.pid, 30)
        return self._code


def run_once(
    workdir: Path,
    durability: str,
    seed: int,
    *,
    threads: int = 4,
    accounts: int = 6,
    workers: int = 3,
    server: ForkServer | None = None,
    db: str | None = None,
    postings_run_rows: int = POSTINGS_RUN_ROWS_DEFAULT,
) -> Outcome:
    """One iteration in `workdir` (which must be empty); raises `CrashCheckFailed`.

    `db`: the URL of an empty server database to run on (PostgreSQL) instead of the
    file `workdir/ledger.db`; the server keeps the killed state, so it is read in place.

    With a `server` (`tests.faults.ForkServer`) the child is forked from a process that
    has `bank` imported already (milliseconds instead of a fresh interpreter's ~0.5 s).
    """
    rng = random.Random(seed)
    ledger: Path | str = workdir / "ledger.db" if db is None else db
    acks_path = workdir / "acks.log"
    stderr_path = workdir / "child.stderr"
    # Kill at start-up (creating the ledger, opening accounts), at the first commits,
    # mid-load or after a while: wait for the file or for that many acks, then a while.
    min_acks = rng.choice([0, 1, 20, 200])
    # A kill at start-up lands 0-50 ms after the file appears (inside `Bank.open`, which
    # takes ~20 ms on a new file) or a little later (opening the accounts).
    if min_acks == 0:
        window_s = rng.choice([0.05, STARTUP_WINDOW_S])
    else:
        window_s = rng.choice([0.02, 0.1, 0.4])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--db",
        str(ledger),
        "--acks",
        str(acks_path),
        "--durability",
        durability,
        "--seed",
        str(seed),
        "--threads",
        str(threads),
        "--accounts",
        str(accounts),
        "--workers",
        str(workers),
        "--postings-run-rows",
        str(postings_run_rows),
    ]
    child = _Child(command, stderr_path, env, server)
    try:
        deadline = time.monotonic() + STARTUP_WAIT_S_MAX
        while count_acks(acks_path) < min_acks or not _started(ledger, acks_path):
            if child.poll() is not None:
                raise CrashCheckFailed(
                    f"the child exited ({child.poll()}) before it was killed:\n"
                    + stderr_path.read_text()[-3000:]
                )
            _check(time.monotonic() < deadline, "the child acknowledged nothing in time")
            time.sleep(0.001)
        started = time.monotonic()
        time.sleep(rng.uniform(0, window_s))
        child.kill()
        killed_after_s = time.monotonic() - started
    finally:
        returncode = child.reap()
    _check(
        returncode == -signal.SIGKILL,
        f"the child ended with {returncode}, not SIGKILL:\n{stderr_path.read_text()[-3000:]}",
    )
    acks = read_acks(acks_path)
    phase = "load" if acks else "start-up"
    # The independent checks read a copy of the files exactly as the kill left them
    # (the -wal and -shm too), so that `Bank.open` is the first to touch the original:
    # the reopen is tested on a real crashed ledger, not on one sqlite3 has cleaned up.
    # A server database is read in place: the server, not the killed child, owns it.
    examined: Path | str = ledger
    if isinstance(ledger, Path):
        pristine = workdir / "as-killed"
        pristine.mkdir()
        if acks:
            _check(
                Path(f"{ledger}-wal").exists(),
                "the killed child left no WAL: is the ledger in WAL mode?",
            )
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{ledger}{suffix}").exists():
                shutil.copy2(f"{ledger}{suffix}", pristine / f"{ledger.name}{suffix}")
        examined = pristine / ledger.name
    if not has_schema(examined):
        # Killed before the ledger's first migration committed: opening must create it.
        _check(not acks, "operations were acknowledged on a ledger that has no schema")
        verify_reopen(ledger, durability, LedgerState(0, {CASH_ID: 0}, {}, {}), acks)
        return Outcome(durability, seed, phase, killed_after_s, 0, 0, 0, 0, 0)
    state = verify_file(examined)
    acked, rejected, retries, in_flight = verify_acks(state, acks)
    verify_reopen(ledger, durability, state, acks)
    limit_changes = sum(len(h) for h in state.limit_history.values())
    return Outcome(
        durability,
        seed,
        phase,
        killed_after_s,
        acked,
        rejected,
        retries,
        state.rows,
        in_flight,
        limit_changes,
    )


def fork_server() -> ForkServer:
    """A `tests.faults.ForkServer` (the repository root is put on `sys.path` for it)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.faults import ForkServer

    return ForkServer()


# -- the command line ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the crash loop; 0 if every iteration's ledger kept every promise."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Exit status: 0 all iterations passed, 1 a check failed (its directory is kept).",
    )
    parser.add_argument("--iterations", type=int, default=50, help="kills to run (default 50)")
    parser.add_argument(
        "--durability",
        choices=["full", "normal", "both"],
        default="both",
        help="ledger durability mode; 'both' alternates (default)",
    )
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    parser.add_argument("--threads", type=int, default=4, help="teller threads in the child")
    parser.add_argument("--accounts", type=int, default=6, help="customer accounts in the child")
    parser.add_argument("--workers", type=int, default=3, help="bank worker threads in the child")
    parser.add_argument(
        "--postings-run-rows",
        type=int,
        default=POSTINGS_RUN_ROWS_DEFAULT,
        help="the child's postings run size (revision 0007; default "
        f"{POSTINGS_RUN_ROWS_DEFAULT}: a flush every few commits, not every 8,192 rows)",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to work (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep every iteration's directory")
    parser.add_argument(
        "--no-fork-server",
        action="store_true",
        help="start each child as a fresh interpreter (slower) instead of forking it",
    )
    # The child side (internal): run load until killed.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--acks", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.threads < 1 or args.accounts < 2 or args.workers < 1 or args.postings_run_rows < 1:
        parser.error("--threads, --workers and --postings-run-rows must be >= 1, --accounts >= 2")
    seed = args.seed if args.seed is not None else random.randrange(1, 2**31)
    root = Path(tempfile.mkdtemp(prefix="bank-crash-", dir=args.dir))
    modes = ["full", "normal"] if args.durability == "both" else [args.durability]
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        server = None if args.no_fork_server else stack.enter_context(fork_server())
        for i in range(args.iterations):
            durability = modes[i % len(modes)]
            workdir = root / f"{i:04d}-{durability}"
            workdir.mkdir()
            try:
                outcome = run_once(
                    workdir,
                    durability,
                    seed + i,
                    threads=args.threads,
                    accounts=args.accounts,
                    workers=args.workers,
                    server=server,
                    postings_run_rows=args.postings_run_rows,
                )
            except CrashCheckFailed as exc:
                print(f"iteration {i + 1}/{args.iterations} FAILED (seed {seed + i}): {exc}")
                print(f"the ledger and ack file are kept in {workdir}")
                return 1
            print(f"iteration {i + 1}/{args.iterations} ok: {outcome.line()}", flush=True)
            if not args.keep:
                shutil.rmtree(workdir)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{args.iterations} kills, every ledger intact "
        f"({time.monotonic() - started:.1f} s, seeds {seed}..{seed + args.iterations - 1})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
