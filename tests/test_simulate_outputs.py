"""Output targets: what `--json`/`--csv`/`--plot` do with each kind of path, never replacing a non-file."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import bank.simulate.outputs
from bank.simulate.outputs import (
    OutputError,
    check_distinct,
    check_target,
    write_text,
)

OUTPUTS = Path(bank.simulate.outputs.__file__)


def test_a_new_file_is_created_atomically_and_a_regular_file_replaced_keeping_its_mode(
    tmp_path: Path,
) -> None:
    new = tmp_path / "r.json"
    write_text(check_target("--json", str(new)), "one\n")
    assert new.read_text() == "one\n"
    new.chmod(0o640)
    inode = new.stat().st_ino
    write_text(check_target("--json", str(new)), "two\n")
    assert new.read_text() == "two\n"
    assert stat.S_IMODE(new.stat().st_mode) == 0o640
    assert new.stat().st_ino != inode  # renamed over, not written in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left


def test_a_symlink_is_followed_and_kept(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_text(check_target("--json", str(link)), "new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new"


def test_a_dangling_symlink_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "dangling.json"
    link.symlink_to(tmp_path / "nowhere" / "x.json")
    with pytest.raises(OutputError, match=r"is a symlink to .*which does not exist"):
        check_target("--json", str(link))
    assert link.is_symlink()


def test_a_missing_directory_a_directory_and_a_socket_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"--csv .*: the directory .*nowhere does not exist"):
        check_target("--csv", str(tmp_path / "nowhere" / "i.csv"))
    with pytest.raises(OutputError, match="is a directory"):
        check_target("--json", str(tmp_path))
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        with pytest.raises(OutputError, match="is a socket"):
            check_target("--json", str(path))
    finally:
        server.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="Not a directory"):
        check_target("--json", str(tmp_path / "file" / "x.json"))


def test_a_block_device_is_refused(tmp_path: Path) -> None:
    node = tmp_path / "blk"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 200))
    except PermissionError:
        pytest.skip("making a block device node needs root")
    with pytest.raises(OutputError, match="is a block device"):
        check_target("--json", str(node))
    assert stat.S_ISBLK(node.stat().st_mode)


def test_a_character_device_is_written_through_never_replaced() -> None:
    target = check_target("--json", os.devnull)
    assert target.how == "through"
    write_text(target, "{}\n")
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_a_fifo_is_written_through_and_one_without_a_reader_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = check_target("--json", str(fifo))
    with pytest.raises(OutputError, match="FIFO that nobody is reading"):
        write_text(target, "x")
    got: list[bytes] = []

    def read() -> None:
        with fifo.open("rb") as reader:  # blocks until the writer opens
            got.append(reader.read())

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 30
    while True:  # the reader is waiting in open() once a non-blocking writer gets in
        try:
            write_text(target, "through the pipe\n")
            break
        except OutputError:
            assert time.monotonic() < deadline, "the reader never opened the FIFO"
            time.sleep(0.01)
    reader.join(10)
    assert got == [b"through the pipe\n"]
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_dev_stdout_is_stdout_and_is_never_replaced(tmp_path: Path) -> None:
    """As root, a rename onto /dev/stdout would replace the symlink for everyone."""
    # The module imports nothing of bank: load it alone (importing bank takes seconds
    # on a loaded machine).
    script = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('outputs', {str(OUTPUTS)!r})\n"
        "outputs = sys.modules['outputs'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(outputs)\n"
        "check_target, write_text = outputs.check_target, outputs.write_text\n"
        "for path in sys.argv[1:]:\n"
        "    t = check_target('--json', path)\n"
        "    print(t.how, file=sys.stderr)\n"
        "    write_text(t, f'RESULT {path}\\n')\n"
    )
    before = os.lstat("/dev/stdout")
    out = tmp_path / "out.txt"
    with out.open("w") as stdout:
        done = subprocess.run(
            [sys.executable, "-c", script, "/dev/stdout", "-"],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    assert done.stderr.split() == ["stdout", "stdout"]
    assert out.read_text() == "RESULT /dev/stdout\nRESULT -\n"
    after = os.lstat("/dev/stdout")
    assert stat.S_ISLNK(after.st_mode) and after.st_ino == before.st_ino


def test_history_needs_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="needs a file"):
        check_target("--history", "-", devices=False)
    with pytest.raises(OutputError, match="needs a regular file"):
        check_target("--history", os.devnull, devices=False)
    assert check_target("--history", str(tmp_path / "h.jsonl"), devices=False).how == "replace"


def test_two_outputs_onto_one_destination_are_refused(tmp_path: Path) -> None:
    same = str(tmp_path / "r.out")
    with pytest.raises(OutputError, match="name the same destination"):
        check_distinct([check_target("--json", same), check_target("--csv", same)])
    with pytest.raises(OutputError, match="name the same destination"):
        check_distinct([check_target("--json", "-"), check_target("--csv", "-")])
    check_distinct([check_target("--json", os.devnull), check_target("--csv", os.devnull)])
    check_distinct([check_target("--json", same), check_target("--csv", same + ".csv")])
