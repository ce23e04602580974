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

import pytest

import bank
from bank.errors import LedgerBusy

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

    path, trigger = sys.argv[1], sys.argv[2]
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
    if trigger == "bank_audit":
        assert b.audit().ok
    elif trigger == "audit_ledger":
        assert audit_ledger(path).ok
    elif trigger == "second_open":
        refused(path)
    elif trigger == "symlink":
        link = path + ".link"
        os.symlink(path, link)
        refused(link)
    elif trigger == "hardlink":
        link = path + ".hard"
        os.link(path, link)
        refused(link)
    elif trigger == "uri":
        refused(f"sqlite:///file:{path}?uri=true")
    elif trigger == "reader":
        with LedgerReader(path) as reader:
            assert len(reader.accounts()) == 2
    print("TRIGGERED", flush=True)
    sys.stdin.readline()
    deposit(40)
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


@pytest.mark.skipif(SQLITE3 is None, reason="needs the sqlite3 command-line shell")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_in_process_trigger_then_sqlite3_reader_loses_nothing(tmp_path: Path, trigger: str) -> None:
    assert SQLITE3 is not None
    path = tmp_path / "ledger.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), trigger],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: list[str] = []
    try:
        assert child.stdout is not None and child.stdin is not None
        _read_until(child.stdout, "TRIGGERED", acked)
        # A real reader process: if the child lost its locks, this one believes it is the
        # last connection, checkpoints and deletes the -wal the child still appends to.
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
        _read_until(child.stdout, "DONE", acked)
    finally:
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=30)
    assert len(acked) == 45, err
    with bank.Bank.open(path) as b:
        lost = [key for key in acked if b.find(key) is None]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged deposits lost after {trigger}"


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
