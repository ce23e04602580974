"""Under real storage faults (a full tmpfs, fsync and write failing with EIO or EROFS, a read-only
filesystem, lock holders in other processes, SIGKILL inside `Bank.open`) a child bank loses no
acknowledged operation, writes no refused one, stops at the first failed commit, and says what
went wrong with a specific one-line `BankError`; the ledger then reopens and audits clean."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import bank
from bank.ledger.audit import audit_ledger
from bank.limits import BUSY_TIMEOUT_MS
from tests import faults
from tests.faults import Answers, Child, parse_answers


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[faults.Tmpfs]:
    """A 256 KiB tmpfs for the ledger (skipped where mounting is refused)."""
    try:
        with faults.tmpfs(tmp_path / "fs", "256k") as mounted:
            yield mounted
    except faults.FaultUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def shim() -> Path:
    try:
        return faults.build_shim()
    except faults.FaultUnavailable as exc:
        pytest.skip(str(exc))


def _settle(child: Child, timeout_s: float = 60.0) -> Answers:
    """Wait for the child to end by itself (no hang) and parse what it was told."""
    child.wait(timeout_s)
    return parse_answers(child.lines())


def _assert_promises_kept(db: Path, answers: Answers) -> None:
    problems = faults.specific_error_problems(answers)
    problems += faults.stopped_after_first_unknown(answers)
    problems += faults.reopen_and_check(db, answers)
    assert not problems, "\n".join(problems)


def _file_digest(path: Path) -> str:
    # Only ever called while no Bank in this process has the file open.
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prepare_ledger(db: Path, ops: int = 20) -> Answers:
    """A ledger with some keyed operations, closed cleanly by its child."""
    child = Child(db, db.with_name("prepare.log"), ops=ops, prefix="p")
    answers = _settle(child)
    assert answers.closed and answers.acked, child.stderr()
    return answers


# -- a filesystem that fills -----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_filesystem_that_fills_during_load_loses_nothing_acknowledged(
    fs: faults.Tmpfs,
) -> None:
    db = fs.path / "ledger.db"
    child = Child(db, fs.path.parent / "child.log", tellers=3)
    answers = _settle(child)  # the disk fills; the bank stops; the tellers give up
    assert answers.opened, child.stderr()
    assert answers.unknown, f"the disk never filled: {len(answers.acked)} acks, {fs.free_bytes()}"
    assert answers.acked, "nothing was acknowledged before the disk filled"
    assert answers.closed, f"close() after a full disk: {answers.errors}"
    fs.resize("16m")  # the operator frees space; the bank restarts
    _assert_promises_kept(db, answers)


@pytest.mark.timeout(120)
def test_a_new_ledger_on_a_full_disk_is_refused_with_a_specific_error(
    fs: faults.Tmpfs,
) -> None:
    db = fs.path / "ledger.db"
    fs.fill()
    child = Child(db, fs.path.parent / "child.log")
    answers = _settle(child)
    assert not answers.opened, "a bank opened on a full disk"
    assert not faults.specific_error_problems(answers), faults.specific_error_problems(answers)
    assert answers.errors, f"no error was reported: {child.lines()}\n{child.stderr()}"
    fs.unfill()
    fs.resize("16m")
    _assert_promises_kept(db, answers)  # whatever was left, it opens as a ledger again


# -- fsync and write failing -----------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("ops", "error"),
    [("fsync", errno.EIO), ("write", errno.EIO), ("fsync,write", errno.EROFS)],
    ids=["fsync-EIO", "write-EIO", "read-only-EROFS"],
)
def test_failing_fsync_or_write_stops_the_bank_and_loses_nothing_acknowledged(
    tmp_path: Path, shim: Path, ops: str, error: int
) -> None:
    """EROFS on every write and sync is what a running process sees when the kernel
    remounts its filesystem read-only after an error (`errors=remount-ro`)."""
    db = tmp_path / "ledger.db"
    trigger, log = tmp_path / "trigger", tmp_path / "faults.log"
    env = faults.shim_env(
        shim, trigger=trigger, ops=ops, errno_value=error, path_filter=str(tmp_path), log=log
    )
    child = Child(db, tmp_path / "child.log", env=env, tellers=3)
    child.wait_acks(60)
    trigger.touch()
    answers = _settle(child)
    assert log.exists(), "the shim injected no fault"
    injected = log.read_text().splitlines()
    # The failed commit, and at most a few more calls while closing: a bank that went
    # on committing after its first failure would hit the shim once per commit.
    assert len(injected) <= 5, f"the bank kept writing after the failure: {injected}"
    assert answers.unknown, f"no operation was answered LedgerUnavailable: {child.lines()[-5:]}"
    assert answers.closed, f"close() after the failure: {answers.errors}"
    _assert_promises_kept(db, answers)


# -- a read-only filesystem ------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_crashed_ledger_on_a_read_only_filesystem_is_refused_then_recovers(
    fs: faults.Tmpfs,
) -> None:
    fs.resize("16m")
    db = fs.path / "ledger.db"
    child = Child(db, fs.path.parent / "child.log", tellers=2)
    child.wait_acks(40)
    child.kill()  # a hot WAL is left behind
    fs.remount_ro()
    try:
        reopen = Child(db, fs.path.parent / "reopen.log", ops=1)
        answers = _settle(reopen)
        assert not answers.opened, "a bank opened on a read-only filesystem"
        problems = faults.specific_error_problems(answers)
        assert not problems, problems
        assert answers.errors, f"no error reported: {reopen.lines()}\n{reopen.stderr()}"
        audit = subprocess.run(
            [sys.executable, "-m", "bank", "audit", "--db", str(db)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=faults.child_env(),
        )
        assert audit.returncode in (0, 2), audit.stdout + audit.stderr
        assert "Traceback" not in audit.stderr, audit.stderr
    finally:
        fs.remount_rw()
    _assert_promises_kept(db, parse_answers(child.lines()))


# -- lock holders ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "ledger", ["new", pytest.param("existing", marks=pytest.mark.slow)], ids=["new", "existing"]
)
def test_an_exclusive_sqlite3_lock_at_open_is_refused_with_a_specific_error(
    tmp_path: Path, ledger: str
) -> None:
    """`new`: the sqlite3 shell holds EXCLUSIVE on the (empty) file the bank is to create.
    `existing`: on a ledger at rest; the open itself writes nothing, so the first
    commit waits out the busy timeout and the bank stops with LedgerUnavailable."""
    db = tmp_path / "ledger.db"
    before = _prepare_ledger(db) if ledger == "existing" else Answers()
    try:
        with faults.sqlite_exclusive(db):
            digest = _file_digest(db)
            child = Child(db, tmp_path / "child.log", ops=5)
            answers = _settle(child, 30.0)
    except faults.FaultUnavailable as exc:
        pytest.skip(str(exc))
    assert not answers.opened or not answers.acked, "acknowledged under another's EXCLUSIVE lock"
    problems = faults.specific_error_problems(answers)
    assert not problems, problems
    assert answers.errors or answers.unknown, f"no error: {child.lines()}\n{child.stderr()}"
    assert _file_digest(db) == digest, "the refused open wrote the ledger"
    _assert_promises_kept(db, before)


@pytest.mark.timeout(120)
def test_an_exclusive_sqlite3_lock_mid_run_ends_in_answers_not_a_hang(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    child = Child(db, tmp_path / "child.log", tellers=2, pace_s=0.005)
    child.wait_acks(30)
    try:
        with faults.sqlite_exclusive(db):
            time.sleep(BUSY_TIMEOUT_MS / 1000 + 1.5)  # past the writer's wait
    except faults.FaultUnavailable as exc:
        child.kill()
        pytest.skip(str(exc))
    # Either the writer outwaited the holder and goes on, or it gave up and the bank stops.
    acked = len(parse_answers(child.lines()).acked)
    child.wait_for(
        lambda ls: (
            any(x.startswith("U ") for x in ls)
            or sum(1 for x in ls if x.startswith("A ")) >= acked + 30
        ),
        30.0,
    )
    child.kill()
    answers = parse_answers(child.lines())
    _assert_promises_kept(db, answers)


@pytest.mark.timeout(60)
def test_another_process_holding_the_flock_refuses_open_at_once(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    before = _prepare_ledger(db)
    digest = _file_digest(db)
    with faults.flock_holder(db):
        child = Child(db, tmp_path / "child.log", ops=5)
        child.wait_for(lambda ls: "OPENING" in ls, 30.0)
        started = time.monotonic()
        answers = _settle(child, 30.0)
        took_s = time.monotonic() - started
    assert [e[1] for e in answers.errors] == ["LedgerBusy"], (child.lines(), child.stderr())
    assert took_s < 3.0, f"LedgerBusy took {took_s:.1f} s (it must be at once)"
    assert not faults.specific_error_problems(answers)
    assert _file_digest(db) == digest, "the refused open wrote the ledger"
    _assert_promises_kept(db, before)


@pytest.mark.timeout(90)
def test_a_second_bank_in_another_process_and_a_sqlite3_reader_lose_nothing(
    tmp_path: Path,
) -> None:
    db = tmp_path / "ledger.db"
    child = Child(db, tmp_path / "child.log", tellers=2, pace_s=0.002)
    child.wait_acks(30)
    with pytest.raises(bank.LedgerBusy):
        bank.Bank.open(db)
    reader = subprocess.run(
        ["sqlite3", str(db), "SELECT count(*) FROM transfers"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert reader.returncode == 0, reader.stderr
    child.wait_acks(len(parse_answers(child.lines()).acked) + 30)
    child.kill()
    _assert_promises_kept(db, parse_answers(child.lines()))


# -- SIGKILL inside Bank.open on a new file --------------------------------------------------

KILLS_IN_OPEN = int(os.environ.get("BANK_KILLS_IN_OPEN", "12"))


def _kill_inside_open(server: faults.ForkServer, workdir: Path, delay_s: float) -> list[str]:
    """One round: a child creates a new ledger and is SIGKILLed `delay_s` after it calls
    `Bank.open`; then the ledger must audit (or be refused with `CannotAudit`) and open."""
    db = workdir / "ledger.db"
    log = workdir / "child.log"
    pid = server.spawn(
        faults.REPO_ROOT / "tests" / "faults.py",
        ["child", "--db", str(db), "--ops", "3", "--tellers", "1"],
        log,
        workdir / "child.stderr",
    )
    deadline = time.monotonic() + 30
    while "OPENING" not in faults.read_lines(log):
        assert time.monotonic() < deadline, "the child never reached Bank.open"
        time.sleep(0.0005)
    time.sleep(delay_s)
    os.kill(pid, signal.SIGKILL)
    code = server.wait(pid, 30)
    answers = parse_answers(faults.read_lines(log))
    problems = faults.specific_error_problems(answers)
    if code not in (-signal.SIGKILL, 0):
        problems.append(f"the child ended with {code}: {(workdir / 'child.stderr').read_text()}")
    if db.exists():
        try:
            audit_ledger(db)  # read-only: a half-made file is CannotAudit, never a raw error
        except bank.CannotAudit as exc:
            if "\n" in str(exc):
                problems.append(f"CannotAudit with a multi-line message: {exc}")
        except Exception as exc:
            problems.append(f"audit_ledger raised {type(exc).__name__}: {exc}")
    problems += faults.reopen_and_check(db, answers)
    return [f"killed {delay_s * 1000:.1f} ms into Bank.open: {p}" for p in problems]


@pytest.mark.timeout(180)
def test_sigkill_inside_bank_open_on_a_new_file(tmp_path: Path) -> None:
    seed = int(os.environ.get("BANK_FAULT_SEED") or random.randrange(2**31))
    rng = random.Random(seed)
    problems: list[str] = []
    with faults.ForkServer() as server:
        for i in range(KILLS_IN_OPEN):
            workdir = tmp_path / f"{i:03d}"
            workdir.mkdir()
            problems += _kill_inside_open(server, workdir, rng.uniform(0, 0.05))
    assert not problems, f"BANK_FAULT_SEED={seed}:\n" + "\n".join(problems)


# -- the harness itself ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_shim_fails_fsync_only_once_armed(tmp_path: Path, shim: Path) -> None:
    script = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)\n"
        "os.fsync(fd)\n"
        "open(sys.argv[2], 'w').close()\n"
        "try:\n    os.fsync(fd)\nexcept OSError as e:\n    print(e.errno)\n"
    )
    trigger = tmp_path / "trigger"
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "f"), str(trigger)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **faults.shim_env(shim, trigger=trigger)},
    )
    assert result.stdout.strip() == str(errno.EIO), result.stdout + result.stderr


#: More calls than creating a ledger, three accounts and one operation ever make.
CRASH_POINTS_MAX = 400


@pytest.mark.timeout(300)
def test_a_crash_before_each_write_and_sync_of_a_new_ledger(tmp_path: Path, shim: Path) -> None:
    """Deterministic crash points: the shim SIGKILLs the child just before its n-th
    write or fsync to the ledger's directory, for n = 0, 1, 2, ... until the child gets
    through creating the ledger, opening accounts, one operation and close()."""
    problems: list[str] = []
    completed_at = None
    with faults.ForkServer(faults.shim_env(shim, ops="fsync,write", kill=True)) as server:
        for n in range(CRASH_POINTS_MAX):
            workdir = tmp_path / f"{n:03d}"
            workdir.mkdir()
            db, log = workdir / "ledger.db", workdir / "child.log"
            pid = server.spawn(
                faults.REPO_ROOT / "tests" / "faults.py",
                ["child", "--db", str(db), "--ops", "1", "--tellers", "1"],
                log,
                workdir / "child.stderr",
                env={"BANK_FAULT_AFTER": str(n), "BANK_FAULT_PATH": str(workdir)},
            )
            code = server.wait(pid, 60)
            answers = parse_answers(faults.read_lines(log))
            round_problems = faults.specific_error_problems(answers)
            if code == 0 and answers.closed:
                completed_at = n
                break
            if code != -signal.SIGKILL:
                round_problems.append(f"exit {code}: {(workdir / 'child.stderr').read_text()}")
            if db.exists():
                try:
                    audit_ledger(db)
                except bank.CannotAudit:
                    pass  # a half-made file: refused by the audit, fine if it reopens
                except Exception as exc:
                    round_problems.append(f"audit_ledger raised {type(exc).__name__}: {exc}")
            round_problems += faults.reopen_and_check(db, answers)
            problems += [f"crash before call {n}: {p}" for p in round_problems]
    assert completed_at is not None, f"more than {CRASH_POINTS_MAX} writes and syncs"
    assert not problems, f"{len(problems)} problems in {completed_at} crash points:\n" + "\n".join(
        problems[:20]
    )
