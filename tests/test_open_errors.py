"""Every way `Bank.open` (and `bank init` / `accounts` / `history`) can fail ends in a
specific one-line `BankError` that names the path, never a raw SQLite or SQLAlchemy error,
and writes nothing: in-memory URLs, a lock held by another process, a full disk, a dropped
table, a kill during creation; and the CLI's reads leave no side file beside a ledger at rest."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import bank
from bank import cli
from bank.errors import (
    BankError,
    CannotAudit,
    CannotOpenLedger,
    LedgerBusy,
    LedgerCorrupt,
    NotALedger,
    UnsupportedLedgerUrl,
)
from bank.ledger.audit import audit_ledger
from bank.ledger.reader import LedgerReader

SQLITE3 = shutil.which("sqlite3")


def _one_line_naming(exc: BaseException, path: Path | str) -> None:
    message = str(exc)
    assert "\n" not in message, message
    assert str(path) in message, message
    assert not message.startswith("None"), message


def _state(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file in `directory` with its size and mtime: 'nothing written' is equality."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def _ledger(path: Path) -> None:
    with bank.Bank.open(path) as b:
        a = b.open_account("a")
        b.deposit(a.id, 100, key="first")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_urls_are_refused_by_the_cli_too(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UnsupportedLedgerUrl, match="not durable"):
        bank.Bank.open(url)
    assert cli.main(["init", "--db", url]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "not durable" in err and "Traceback" not in err


HOLD_EXCLUSIVE = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    if sys.argv[2] == "rollback":
        conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("CREATE TABLE IF NOT EXISTS held (x)")
    print("HELD", flush=True)
    sys.stdin.readline()
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("journal", ["wal", "rollback"])
def test_an_exclusive_lock_held_by_another_process_gives_ledger_busy(
    tmp_path: Path, journal: str
) -> None:
    path = tmp_path / "l.db"
    if journal == "wal":
        _ledger(path)  # a WAL ledger at rest; the holder is another writer
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_EXCLUSIVE, str(path), journal],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "HELD"
        before = _state(tmp_path)
        started = time.monotonic()
        with pytest.raises(LedgerBusy) as caught:
            bank.Bank.open(path)
        waited = time.monotonic() - started
        _one_line_naming(caught.value, path)
        assert "another process holds a lock" in str(caught.value)
        assert waited < 15, f"open waited {waited:.1f} s: the busy wait must be bounded"
        after = _state(tmp_path)
        assert {k: v for k, v in after.items() if not k.endswith("-shm")} == {
            k: v for k, v in before.items() if not k.endswith("-shm")
        }
    finally:
        holder.kill()
        holder.communicate(timeout=30)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only): a disk that is full before a ledger fits."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path, leave: int) -> None:
    """Fill the file system of `directory` up to `leave` free bytes."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    with (directory / "filler").open("wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("leave", [0, 8 * 1024, 32 * 1024, 64 * 1024])
def test_a_new_ledger_on_a_full_disk_fails_specifically_and_leaves_nothing(
    tiny_fs: Path, leave: int
) -> None:
    _fill(tiny_fs, leave)
    path = tiny_fs / "l.db"
    with pytest.raises(CannotOpenLedger) as caught:
        bank.Bank.open(path)
    _one_line_naming(caught.value, path)
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler"]  # no half-made ledger
    (tiny_fs / "filler").unlink()
    with bank.Bank.open(path) as b:  # and with room, the same path makes a sound ledger
        b.deposit(b.open_account("a").id, 1)
        assert b.audit().ok


@pytest.mark.parametrize("table", ["accounts", "transfers", "account_events"])
def test_a_dropped_table_is_refused_as_corrupt(tmp_path: Path, table: str) -> None:
    path = tmp_path / "l.db"
    _ledger(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute(f"DROP TABLE {table}")
    conn.commit()
    conn.close()
    before = _state(tmp_path)
    with pytest.raises(LedgerCorrupt) as caught:
        bank.Bank.open(path)
    _one_line_naming(caught.value, path)
    assert table in str(caught.value)
    assert _state(tmp_path) == before


def test_messages_name_the_path_not_none(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE recipes (name TEXT)")
    conn.commit()
    conn.close()
    newer = tmp_path / "newer.db"
    _ledger(newer)
    conn = sqlite3.connect(newer)
    conn.execute("UPDATE alembic_version SET version_num = '9999_future'")
    conn.commit()
    conn.close()
    for path in (foreign, newer):
        for opener in (bank.Bank.open, LedgerReader):
            with pytest.raises(NotALedger) as caught:
                opener(path)
            _one_line_naming(caught.value, path)


@pytest.mark.parametrize("command", [["accounts"], ["history", "a"], ["accounts", "--json"]])
def test_cli_reads_leave_no_side_file_beside_a_ledger_at_rest(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "l.db"
    _ledger(path)
    before = _state(tmp_path)
    assert list(before) == ["l.db"]
    assert cli.main([command[0], "--db", str(path), *command[1:]]) == cli.EXIT_OK
    assert "a" in capsys.readouterr().out
    assert _state(tmp_path) == before


def test_reader_of_a_running_ledger_sees_its_commits(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with bank.Bank.open(path) as b:
        a = b.open_account("a")
        b.deposit(a.id, 5)
        with LedgerReader(path) as reader:  # owned here: SQLite's locking, not immutable
            assert [r.amount for r in reader.history(a.id)] == [5]
        b.deposit(a.id, 7)
        assert b.balance(a.id) == 12


HOT_JOURNAL = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA cache_size = 1")  # spill pages into the file before the commit
    conn.execute("BEGIN")
    conn.execute("CREATE TABLE filler (x)")
    conn.executemany("INSERT INTO filler VALUES (?)", ((b"x" * 500,) for _ in range(200)))
    print("DIRTY", flush=True)
    sys.stdin.readline()
    """
)


@pytest.mark.timeout(60)
def test_a_hot_journal_from_an_interrupted_creation_is_rolled_back_by_the_owner(
    tmp_path: Path,
) -> None:
    path = tmp_path / "l.db"
    child = subprocess.Popen(
        [sys.executable, "-c", HOT_JOURNAL, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "DIRTY"
    child.kill()
    child.communicate(timeout=30)
    assert path.stat().st_size > 0
    assert (tmp_path / "l.db-journal").stat().st_size > 0
    before = _state(tmp_path)
    with pytest.raises(CannotOpenLedger, match="hot -journal") as caught:
        LedgerReader(path)  # a reader may not roll it back, and says so
    _one_line_naming(caught.value, path)
    assert cli.main(["accounts", "--db", str(path)]) == cli.EXIT_USAGE
    with pytest.raises(CannotAudit, match="hot -journal"):
        audit_ledger(path)
    assert _state(tmp_path) == before
    with bank.Bank.open(path) as b:  # the owner rolls it back (to an empty file) and creates
        b.deposit(b.open_account("a").id, 1)
    assert audit_ledger(path).ok


# -- a kill during the creation of a new ledger ---------------------------------------------


def _open_in_forked_child(path: Path) -> int:
    """Fork a child (bank is already imported: no start-up cost) that creates `path`."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            bank.Bank.open(path).close()
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def _kill_during_creation(workdir: Path, rng: random.Random, delay_s_max: float) -> str:
    """Create a ledger in a child, SIGKILL it at a random instant, then reopen: the reopen
    and a reader work, or raise a specific error; never anything else."""
    path = workdir / "l.db"
    pid = _open_in_forked_child(path)
    time.sleep(rng.uniform(0, delay_s_max))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    left = ",".join(sorted(p.name[len("l.db") :] or "db" for p in workdir.iterdir()))
    try:
        with LedgerReader(path) as reader:
            reader.accounts()
    except BankError as exc:  # e.g. an empty file, or a hot journal a reader cannot undo
        assert type(exc) is not BankError, exc
        _one_line_naming(exc, path)
    with bank.Bank.open(path) as b:  # the owner recovers an interrupted creation
        b.deposit(b.open_account("a").id, 1)
    assert audit_ledger(path).ok
    return left


def _crash_rounds(tmp_path: Path, rounds: int) -> dict[str, int]:
    rng = random.Random(int(os.environ.get("BANK_CRASH_SEED") or random.randrange(2**31)))
    seen: dict[str, int] = {}
    for i in range(rounds):
        workdir = tmp_path / f"{i:04d}"
        workdir.mkdir()
        left = _kill_during_creation(workdir, rng, delay_s_max=0.12)
        seen[left] = seen.get(left, 0) + 1
        shutil.rmtree(workdir)
    return seen


@pytest.mark.timeout(120)
def test_sigkill_during_creation_never_leaves_an_unopenable_ledger(tmp_path: Path) -> None:
    seen = _crash_rounds(tmp_path, 30)
    assert seen  # which side files the kills left: printed on failure only
    print(seen)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_during_creation_many_rounds(tmp_path: Path) -> None:
    seen = _crash_rounds(tmp_path, 500)
    print(seen)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(SQLITE3 is None, reason="needs the sqlite3 command-line shell")
def test_sigkill_of_bank_init_then_bank_init_never_prints_a_traceback(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("BANK_CRASH_SEED") or random.randrange(2**31)))
    exe = [sys.executable, "-m", "bank"]
    for i in range(50):
        workdir = tmp_path / f"{i:03d}"
        workdir.mkdir()
        path = workdir / "l.db"
        child = subprocess.Popen([*exe, "init", "--db", str(path)], stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.5))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        for command in (["accounts"], ["init"]):
            done = subprocess.run(
                [*exe, *command, "--db", str(path)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == 0, done.stderr


def test_cli_init_and_accounts_take_a_sqlite_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    url = "sqlite:///file:l.db?uri=true"
    assert cli.main(["init", "--db", url]) == cli.EXIT_OK
    assert "created ledger" in capsys.readouterr().out
    assert cli.main(["init", "--db", url]) == cli.EXIT_OK
    assert "opened existing ledger" in capsys.readouterr().out
    assert cli.main(["accounts", "--db", url]) == cli.EXIT_OK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.db"]  # no stray `file:l.db`


def test_every_bank_error_is_public_with_a_one_line_docstring() -> None:
    """Callers catch what the README lists as `bank.X` (`CannotCheckHistory` and
    `SchemaDowngradeRefused` were raised but not exported)."""
    import bank.errors

    errors = [
        obj
        for obj in vars(bank.errors).values()
        if isinstance(obj, type) and issubclass(obj, bank.BankError)
    ]
    assert len(errors) > 20
    for error in errors:
        assert getattr(bank, error.__name__, None) is error, error.__name__
        assert error.__name__ in bank.__all__, error.__name__
        assert error.__doc__ and error.__doc__.strip(), error.__name__
