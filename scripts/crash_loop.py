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

Then, reading a copy of the files as the kill left them with plain `sqlite3`
and nothing from `bank` (the checks are independent of the code they check):

- `transfers.seq` runs 1..N without a gap;
- the hash chains of `transfers` and `account_events` match the documented
  formats (bank/ledger/chain.py: format 2, and format 1 for the `@cash` opening),
  recomputed with hashlib;
- replaying `transfers` in seq order, with each limit change applied where it
  took effect, never takes a customer below its overdraft limit, gives
  exactly the stored `accounts.balance` and `overdraft_limit`, and sums to 0;
- every acknowledged key is in the ledger with the acknowledged seq and fields;
  every key acknowledged as rejected is absent; retries got the original seq;
  every acknowledged limit change is in `account_events`;
- per teller, the ack file has no holes and the only unacknowledged keys in
  the ledger are the ones that were in flight at the kill;

and then through `bank.Bank.open` on the original files (the first to touch
them after the kill): the restored balances equal the replay, `find(key)`
returns every acknowledged receipt, a retry of an acknowledged key returns it
again, and a new operation continues the chain at seq N+1.

    .venv/bin/python scripts/crash_loop.py --iterations 50
    .venv/bin/python scripts/crash_loop.py --iterations 10 --durability normal --seed 7
"""

from __future__ import annotations

import argparse
import hashlib
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

GENESIS = "0" * 64
CASH_ID = 0
#: Largest `submit_many` batch a child teller sends (bounds what can be in flight).
BATCH_OPS_MAX = 16
#: A child that is never killed gives up after this long (so none is ever orphaned).
CHILD_LIFETIME_S_MAX = 120.0
#: A kill at start-up lands at most this long after the child creates the ledger file.
STARTUP_WINDOW_S = 0.15
#: How long the parent waits for the child's first acknowledgements.
STARTUP_WAIT_S_MAX = 60.0
REPO_ROOT = Path(__file__).resolve().parents[1]


# -- the child ---------------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> int:
    """Open the bank and run keyed load from `args.threads` tellers until killed."""
    import bank

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


def _v(value: object) -> str:
    """V(value) of hash format 2, re-implemented from bank/ledger/chain.py."""
    if value is None:
        return "n"
    if type(value) is int:
        return f"i{value};"
    if type(value) is str:
        return f"s{len(value.encode())}:{value}"
    raise TypeError(f"no chain encoding for {value!r}")


def transfer_hash(prev: str, row: tuple[object, ...]) -> str:
    """`transfers.hash`, format 2 (every transfer of a ledger this script creates)."""
    seq, key, kind, debit, credit, amount, ts_us = row
    values = (prev, seq, kind, debit, credit, amount, ts_us, key)
    text = "bank:transfers:2\n" + "".join(_v(v) for v in values)
    return hashlib.sha256(text.encode()).hexdigest()


def event_hash(prev: str, row: tuple[object, ...]) -> str:
    """`account_events.hash`: format 1 for the `@cash` opening (event 1, migration 0001), else 2."""
    seq, account_id, kind, name, limit, transfer_seq, ts_us = row
    if seq == 1:
        text = f"{prev}\n{seq}|{account_id}|{kind}|{limit}|{transfer_seq}|{ts_us}|{name}"
    else:
        values = (prev, seq, account_id, kind, limit, transfer_seq, ts_us, name)
        text = "bank:account_events:2\n" + "".join(_v(v) for v in values)
    return hashlib.sha256(text.encode()).hexdigest()


def has_schema(db: Path) -> bool:
    """True if `db` holds the ledger's tables (False for a missing, empty or blank file)."""
    if not db.exists() or db.stat().st_size == 0:
        return False
    con = sqlite3.connect(db)
    try:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()
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


def verify_file(db: Path) -> LedgerState:
    """Check seq, both hash chains, the replay and the stored balances with plain sqlite3.

    The replay applies each account event when it took effect: an event with
    `transfer_seq = s` came after transfer `s` and before `s + 1`.
    """
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT seq, key, kind, debit_account_id, credit_account_id, amount, ts_us, hash "
            "FROM transfers ORDER BY seq"
        ).fetchall()
        stored = {
            r[0]: (r[1], r[2])
            for r in con.execute("SELECT id, overdraft_limit, balance FROM accounts")
        }
        events = con.execute(
            "SELECT seq, account_id, kind, name, overdraft_limit, transfer_seq, ts_us, hash "
            "FROM account_events ORDER BY seq"
        ).fetchall()
    finally:
        con.close()
    prev = GENESIS
    limit_history: dict[int, list[int]] = {}
    for i, row in enumerate(events, start=1):
        _check(row[0] == i, f"account_events: seq {row[0]} where {i} was expected")
        _check(row[7] == event_hash(prev, row[:7]), f"account_events: chain broken at seq {i}")
        prev = row[7]
        if row[2] == "limit":
            limit_history.setdefault(row[1], []).append(row[4])
    _check(
        sorted(stored) == sorted(r[1] for r in events if r[2] == "open"),
        "accounts and their opening events differ",
    )
    balances = dict.fromkeys(stored, 0)
    limits: dict[int, int] = {}
    pending = list(events)
    by_key: dict[str, tuple[int, str, int, int, int]] = {}
    prev = GENESIS
    for i, row in enumerate([*rows, None], start=1):
        while pending and pending[0][5] < i:  # events that took effect before transfer i
            _eseq, account_id, _kind, _name, limit, *_ = pending.pop(0)
            if account_id != CASH_ID:
                _check(
                    balances[account_id] >= -limit,
                    f"account_events: account {account_id} got limit {limit} while at "
                    f"{balances[account_id]}",
                )
            limits[account_id] = limit
        if row is None:
            break
        seq, key, kind, debit, credit, amount, _ts, stored_hash = row
        _check(seq == i, f"transfers: seq {seq} where {i} was expected (a gap or a reorder)")
        _check(stored_hash == transfer_hash(prev, row[:7]), f"transfers: chain broken at seq {seq}")
        prev = stored_hash
        _check(amount > 0 and debit != credit, f"transfers: malformed row at seq {seq}")
        _check(debit in limits and credit in limits, f"transfers: seq {seq} before an opening")
        balances[debit] -= amount
        balances[credit] += amount
        if debit != CASH_ID:
            _check(
                balances[debit] >= -limits[debit],
                f"replay: seq {seq} takes account {debit} to {balances[debit]}, "
                f"below its limit {limits[debit]}",
            )
        _check(all(-(2**63) <= balances[a] < 2**63 for a in (debit, credit)), "replay: overflow")
        if key is not None:
            _check(key not in by_key, f"transfers: key {key!r} appears twice")
            by_key[key] = (seq, kind, debit, credit, amount)
    _check(not pending, f"account_events after the last transfer: {pending[:3]}")
    stored_limits = {a: limit for a, (limit, _bal) in stored.items()}
    _check(
        stored_limits == limits, f"stored limits {stored_limits} differ from the events {limits}"
    )
    stored_balances = {a: bal for a, (_limit, bal) in stored.items()}
    _check(
        stored_balances == balances,
        f"stored balances {stored_balances} differ from the replay {balances}",
    )
    _check(sum(balances.values()) == 0, f"balances sum to {sum(balances.values())}, not 0")
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


def verify_reopen(db: Path, durability: str, state: LedgerState, acks: list[list[str]]) -> None:
    """Reopen with `bank.Bank.open` and check what it restored; then extend the chain by one."""
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


def run_once(
    workdir: Path,
    durability: str,
    seed: int,
    *,
    threads: int = 4,
    accounts: int = 6,
    workers: int = 3,
) -> Outcome:
    """One iteration in `workdir` (which must be empty); raises `CrashCheckFailed`."""
    rng = random.Random(seed)
    db = workdir / "ledger.db"
    acks_path = workdir / "acks.log"
    stderr_path = workdir / "child.stderr"
    # Kill at start-up (creating the ledger, opening accounts), at the first commits,
    # mid-load or after a while: wait for the file or for that many acks, then a while.
    min_acks = rng.choice([0, 1, 20, 200])
    window_s = STARTUP_WINDOW_S if min_acks == 0 else rng.choice([0.05, 0.3, 1.0])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--db",
        str(db),
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
    ]
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.monotonic() + STARTUP_WAIT_S_MAX
        while count_acks(acks_path) < min_acks or not db.exists():
            if proc.poll() is not None:
                raise CrashCheckFailed(
                    f"the child exited ({proc.returncode}) before it was killed:\n"
                    + stderr_path.read_text()[-3000:]
                )
            _check(time.monotonic() < deadline, "the child acknowledged nothing in time")
            time.sleep(0.002)
        started = time.monotonic()
        time.sleep(rng.uniform(0, window_s))
        os.kill(proc.pid, signal.SIGKILL)
        killed_after_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    _check(
        proc.returncode == -signal.SIGKILL,
        f"the child ended with {proc.returncode}, not SIGKILL:\n{stderr_path.read_text()[-3000:]}",
    )
    acks = read_acks(acks_path)
    phase = "load" if acks else "start-up"
    # The independent checks read a copy of the files exactly as the kill left them
    # (the -wal and -shm too), so that `Bank.open` is the first to touch the original:
    # the reopen is tested on a real crashed ledger, not on one sqlite3 has cleaned up.
    pristine = workdir / "as-killed"
    pristine.mkdir()
    if acks:
        _check(
            Path(f"{db}-wal").exists(), "the killed child left no WAL: is the ledger in WAL mode?"
        )
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{db}{suffix}").exists():
            shutil.copy2(f"{db}{suffix}", pristine / f"{db.name}{suffix}")
    if not has_schema(pristine / db.name):
        # Killed before the ledger's first migration committed: opening must create it.
        _check(not acks, "operations were acknowledged on a ledger that has no schema")
        verify_reopen(db, durability, LedgerState(0, {CASH_ID: 0}, {}, {}), acks)
        return Outcome(durability, seed, phase, killed_after_s, 0, 0, 0, 0, 0)
    state = verify_file(pristine / db.name)
    acked, rejected, retries, in_flight = verify_acks(state, acks)
    verify_reopen(db, durability, state, acks)
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
        "--dir", type=Path, default=None, help="where to work (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep every iteration's directory")
    # The child side (internal): run load until killed.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--acks", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.threads < 1 or args.accounts < 2 or args.workers < 1:
        parser.error("--threads and --workers must be >= 1, --accounts >= 2")
    seed = args.seed if args.seed is not None else random.randrange(1, 2**31)
    root = Path(tempfile.mkdtemp(prefix="bank-crash-", dir=args.dir))
    modes = ["full", "normal"] if args.durability == "both" else [args.durability]
    started = time.monotonic()
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
