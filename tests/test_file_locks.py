"""A process that owns a ledger never opens and closes the ledger's file behind SQLite's back
(POSIX would drop its locks, a real `sqlite3` reader would then delete the live -wal and
every later acknowledgement would be lost), and one ledger file has one writer, whatever
spelling of its path (symlink, hard link, SQLite URI) a second opener uses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import IO
from urllib.parse import quote

import pytest
from sqlalchemy.engine import URL

import bank
from bank.errors import LedgerBusy, NotALedger, UnsupportedLedgerUrl
from bank.ledger.sqlite import FileLock, create_ledger_engine

SQLITE3 = shutil.which("sqlite3")

# The child owns a bank, pulls one in-process trigger, waits while the test runs a real
# `sqlite3` reader, then keeps depositing with keys, printing each acknowledged key.
CHILD = textwrap.dedent(
    """
    import os, sys
    import bank
    from bank.errors import LedgerBusy
    from bank.ledger.audit import audit_ledger
    from bank.ledger.reader import LedgerReader

    path, triggers = sys.argv[1], sys.argv[2:]
    b = bank.Bank.open(path)
    acct = b.open_account("a")
    n = 0

    def deposit(count):
        global n
        for _ in range(count):
            n += 1
            b.deposit(acct.id, 1, key=f"k{n}")
            print(f"ACK k{n}", flush=True)

    def refused(target):
        try:
            bank.Bank.open(target)
        except LedgerBusy:
            return
        raise SystemExit("a second open was not refused")

    deposit(5)
    for trigger in triggers:
        if trigger == "bank_audit":
            assert b.audit().ok
        elif trigger == "audit_ledger":
            assert audit_ledger(path).ok
        elif trigger == "second_open":
            refused(path)
        elif trigger == "symlink":
            os.symlink(path, path + ".link")
            refused(path + ".link")
        elif trigger == "hardlink":
            os.link(path, path + ".hard")
            refused(path + ".hard")
        elif trigger == "uri":
            refused(f"sqlite:///file:{path}?uri=true")
        elif trigger == "reader":
            with LedgerReader(path) as reader:
                assert len(reader.accounts()) == 2
        print("TRIGGERED", flush=True)
        sys.stdin.readline()
        deposit(10)
        print("DONE", flush=True)
    sys.stdin.readline()
    """
)

TRIGGERS = ["bank_audit", "audit_ledger", "second_open", "symlink", "hardlink", "uri", "reader"]


def _read_until(stream: IO[str], marker: str, acked: list[str]) -> None:
    for raw in stream:
        line = raw.strip()
        if line.startswith("ACK "):
            acked.append(line[4:])
        if line == marker:
            return
    raise AssertionError(f"the child ended before printing {marker}")


def _run_triggers(path: Path, triggers: list[str]) -> None:
    """The child pulls each trigger; after each, a real `sqlite3` reader process reads the
    ledger; then the child is SIGKILLed and every acknowledged key must be in the ledger."""
    assert SQLITE3 is not None
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), *triggers],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: dict[str, str] = {}  # key -> the last trigger pulled before it was acknowledged
    try:
        assert child.stdout is not None and child.stdin is not None
        phase: list[str] = []
        _read_until(child.stdout, "TRIGGERED", phase)
        acked.update(dict.fromkeys(phase, "(none)"))
        for i, trigger in enumerate(triggers):
            # A real reader process: if the child lost its locks, this one believes it is
            # the last connection, checkpoints and deletes the -wal the child appends to.
            reader = subprocess.run(
                [SQLITE3, str(path), "select count(*) from transfers"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert reader.returncode == 0, reader.stderr
            child.stdin.write("go\n")
            child.stdin.flush()
            phase = []
            _read_until(child.stdout, "DONE", phase)
            acked.update(dict.fromkeys(phase, trigger))
            if i + 1 < len(triggers):
                phase = []
                _read_until(child.stdout, "TRIGGERED", phase)
                acked.update(dict.fromkeys(phase, trigger))
    finally:
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=30)
    assert len(acked) == 5 + 10 * len(triggers), err
    with bank.Bank.open(path) as b:
        lost = [key for key in acked if b.find(key) is None]
    after = sorted({acked[key] for key in lost})
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged deposits lost, after {after}"


@pytest.mark.skipif(SQLITE3 is None, reason="needs the sqlite3 command-line shell")
@pytest.mark.timeout(60)
def test_in_process_triggers_then_sqlite3_readers_lose_nothing(tmp_path: Path) -> None:
    _run_triggers(tmp_path / "ledger.db", TRIGGERS)


@pytest.mark.slow
@pytest.mark.skipif(SQLITE3 is None, reason="needs the sqlite3 command-line shell")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_each_in_process_trigger_alone_loses_nothing(tmp_path: Path, trigger: str) -> None:
    _run_triggers(tmp_path / "ledger.db", [trigger])


def test_second_open_in_process_is_refused_without_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    link = tmp_path / "link.db"
    hard = tmp_path / "hard.db"
    with bank.Bank.open(path):
        link.symlink_to(path)
        os.link(path, hard)
        spellings: list[object] = [
            path,
            str(path),
            link,
            hard,
            tmp_path / "." / "ledger.db",
            f"sqlite:///{path}",
            f"sqlite:///file:{path}?uri=true",
        ]
        for spelling in spellings:
            with pytest.raises(LedgerBusy, match="already open"):
                bank.Bank.open(spelling)  # type: ignore[arg-type]
    with bank.Bank.open(link) as b:  # released: any spelling opens it again
        assert b.path is not None


HOLDER = textwrap.dedent(
    """
    import sys
    import bank

    with bank.Bank.open(sys.argv[1]) as b:
        b.open_account("held")
        print("READY", flush=True)
        sys.stdin.readline()
    """
)


def _spellings(tmp_path: Path) -> dict[str, str]:
    """Ways to name tmp_path/"l b.db" (a space, so percent-decoding matters)."""
    path = tmp_path / "l b.db"
    link = tmp_path / "link.db"
    if not link.exists():
        link.symlink_to(path)
    return {
        "path": str(path),
        "uri": f"sqlite:///file:{quote(str(path))}?uri=true",
        "uri_localhost": f"sqlite:///file://localhost{quote(str(path))}?uri=true&mode=rwc",
        "uri_without_flag": f"sqlite:///file:{quote(str(path))}",
        "symlink": str(link),
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first", ["path", "uri"])
def test_two_processes_one_ledger_whatever_the_spelling(tmp_path: Path, first: str) -> None:
    names = _spellings(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, names[first]],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "READY", holder.stderr
        for name, spelling in names.items():
            with pytest.raises(LedgerBusy):
                bank.Bank.open(spelling)
                pytest.fail(f"opened by {name} while another process holds it by {first}")
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == ["l b.db", "link.db"]
    for spelling in names.values():  # the one ledger, with the holder's account
        with bank.Bank.open(spelling) as b:
            assert [a.name for a in b.accounts()] == ["held"]


def test_relative_uri_is_resolved_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with bank.Bank.open("sqlite:///file:l.db?uri=true") as b:
        assert b.path == tmp_path / "l.db"
        with pytest.raises(LedgerBusy):
            bank.Bank.open(tmp_path / "l.db")
    assert not (tmp_path / "file:l.db").exists()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file::memory:?uri=true",
        "sqlite:///file:?uri=true",
        "sqlite:///file:{p}?uri=true&mode=ro",
        "sqlite:///file:{p}?uri=true&mode=memory",
        "sqlite:///file:{p}?uri=true&immutable=1",
        "sqlite:///file:{p}?uri=true&nolock=1",
        "sqlite:///file:{p}?uri=true&vfs=unix-none",
        "sqlite:///file:{p}?uri=true&cache=shared",
        "sqlite:///file://otherhost{p}?uri=true",
        "sqlite:///{p}?mode=ro",
        "sqlite+aiosqlite:///{p}",
    ],
)
def test_urls_that_cannot_hold_a_durable_single_writer_ledger_are_refused(
    tmp_path: Path, url: str
) -> None:
    path = tmp_path / "l.db"
    text = url.format(p=path)
    with pytest.raises(UnsupportedLedgerUrl) as caught:
        bank.Bank.open(text)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(text.split("?")[0][:12])
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing written


def test_mode_rw_opens_an_existing_ledger_but_creates_none(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    url = f"sqlite:///file:{path}?uri=true&mode=rw"
    with pytest.raises(NotALedger, match="no ledger at"):
        bank.Bank.open(url)
    assert list(tmp_path.iterdir()) == []
    bank.Bank.open(path).close()
    with bank.Bank.open(url) as b:
        assert b.path == path


def test_a_connection_to_another_file_than_the_locked_one_is_refused(tmp_path: Path) -> None:
    locked, other = tmp_path / "locked.db", tmp_path / "other.db"
    lock = FileLock(locked)
    try:
        engine = create_ledger_engine(URL.create("sqlite", database=str(other)), lock=lock)
        with pytest.raises(LedgerBusy, match="not the file this bank locked"):
            engine.connect()
        engine.dispose()
        assert other.stat().st_size == 0  # refused before the WAL pragma could write it
    finally:
        lock.release()
