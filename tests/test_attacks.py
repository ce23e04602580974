"""Attacks on the promises of issue 9 that once broke them: each test failed before its fix."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

import bank
from bank.commands import is_validated


def _rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT seq, amount, typeof(amount) FROM transfers").fetchall()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "launder",
    [
        lambda: bank.Deposit.model_validate(bank.Deposit.model_construct(account=1, amount=1.5)),  # type: ignore[arg-type]
        lambda: bank.Deposit.model_validate(bank.Deposit.model_construct(account=1, amount=True)),
        lambda: bank.Transfer.model_validate(
            bank.Transfer.model_construct(source=1, target=2, amount=10**16)
        ),
        lambda: bank.Withdrawal.model_validate(
            bank.Withdrawal(account=1, amount=1).model_copy(update={"amount": 0})
        ),
    ],
    ids=["construct-real", "construct-bool", "construct-huge", "copy-update-zero"],
)
def test_model_validate_of_an_instance_validates_it(launder: object, tmp_path: Path) -> None:
    """`model_validate(instance)`: pydantic returns the instance unvalidated; it was sealed.

    Before the fix the laundered command passed the gate and a REAL amount stopped the bank.
    """
    path = tmp_path / "l.db"
    with bank.Bank.open(path) as b:
        b.open_account("a")
        b.open_account("b")
        b.deposit(1, 100)
        command: object = None
        with pytest.raises(bank.InvalidCommand):
            command = launder()  # type: ignore[operator]
            b.submit(command).result(timeout=10)  # type: ignore[arg-type]
        assert command is None or not is_validated(command)
        assert b.deposit(1, 1).seq == 2  # the bank still works: nothing reached the writer
    assert _rows(path) == [(1, 100, "integer"), (2, 1, "integer")]


def test_model_validate_of_an_edited_command_is_refused() -> None:
    """A sealed command edited behind frozen=True is not re-sealed by model_validate."""
    command = bank.Deposit(account=1, amount=5)
    object.__setattr__(command, "amount", 2.5)
    assert not is_validated(command)
    with pytest.raises(bank.InvalidCommand, match=r"Deposit\.amount"):
        bank.Deposit.model_validate(command)
    assert not is_validated(command)


@pytest.mark.parametrize(
    "call",
    [
        lambda: bank.Deposit.model_validate({"account": 1, "amount": 1.5}),
        lambda: bank.Deposit.model_validate_json('{"account": 1, "amount": 1.5}'),
        lambda: bank.Transfer.model_validate({"source": 1, "target": 1, "amount": 1}),
        lambda: bank.Withdrawal.model_validate_json("not json"),
    ],
    ids=["dict", "json", "same-accounts", "bad-json"],
)
def test_model_validate_raises_invalid_command(call: object) -> None:
    """Bad input through model_validate(_json) is an InvalidCommand, not pydantic's error."""
    with pytest.raises(bank.InvalidCommand) as info:
        call()  # type: ignore[operator]
    assert "source/target: " not in str(info.value).split(".", 1)[0]
    assert "\n" not in str(info.value)


# -- bad paths and URLs: a specific BankError, never a raw OSError/TypeError -----------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("db", "error"),
    [
        ("x" * 5000, bank.CannotOpenLedger),
        ("x" * 300 + "/l.db", bank.CannotOpenLedger),
        ("a\x00b.db", bank.CannotOpenLedger),
        ("sqlite:///" + "y" * 5000, bank.CannotOpenLedger),
        ("sqlite:///a%00b.db", bank.CannotOpenLedger),
        ("notaurl://x", bank.UnsupportedLedgerUrl),
        ("mysql://u@127.0.0.1:1/db", bank.UnsupportedLedgerUrl),
        (b"b.db", bank.InvalidCommand),
        (123, bank.InvalidCommand),
        (None, bank.InvalidCommand),
    ],
    ids=[
        "name-too-long",
        "dir-too-long",
        "nul",
        "url-too-long",
        "url-nul",
        "unknown-dialect",
        "driver-not-installed",
        "bytes",
        "int",
        "none",
    ],
)
def test_open_of_an_unusable_db_is_a_bank_error(
    db: object, error: type[bank.BankError], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: raw OSError, ValueError, TypeError, NoSuchModuleError, ModuleNotFoundError."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as info:
        bank.Bank.open(db)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "path", ["x" * 5000, "a\x00b", 5], ids=["name-too-long", "nul", "not-a-path"]
)
def test_audit_of_an_unusable_path_is_cannot_audit(
    path: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`audit_ledger` promises CannotAudit; it raised OSError, ValueError, TypeError."""
    from bank.ledger.audit import audit_ledger

    monkeypatch.chdir(tmp_path)
    with pytest.raises(bank.CannotAudit):
        audit_ledger(path)  # type: ignore[arg-type]


def test_reader_of_a_name_too_long_is_a_bank_error(tmp_path: Path) -> None:
    from bank.ledger.reader import LedgerReader

    with pytest.raises(bank.CannotOpenLedger, match="cannot be examined"):
        LedgerReader(tmp_path / ("x" * 5000))


@pytest.mark.timeout(60)
def test_cli_could_not_run_is_exit_2_not_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An OSError (a name too long) meant exit 1, which reads as "problems found"."""
    from bank.cli import main

    long = str(tmp_path / ("x" * 5000))
    for argv in (["audit", "--db", long], ["accounts", "--db", long], ["init", "--db", long]):
        assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_check_history_of_a_fifo_or_device_ends(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check-history FIFO` blocked forever in open(); `/dev/zero` read forever."""
    import os

    from bank.cli import main

    db = tmp_path / "l.db"
    with bank.Bank.open(db):
        pass
    if kind == "fifo":
        history = tmp_path / "h.fifo"
        os.mkfifo(history)
    else:
        history = Path("/dev/zero")
    assert main(["check-history", str(history), "--db", str(db)]) == 2
    assert "not a regular file" in capsys.readouterr().err


# -- a tampered schema: Bank.open refuses what the migrations did not make --------------------


def _sound_ledger(path: Path) -> None:
    with bank.Bank.open(path) as b:
        alice = b.open_account("alice")
        b.deposit(alice.id, 1000, key="d1")


def _edit(path: Path, sql: str) -> None:
    """An edit with plain sqlite3, as an attacker with write access makes it."""
    conn = sqlite3.connect(path)
    try:
        conn.executescript(sql)
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_open_refuses_a_trigger_that_swallows_the_writers_rows(tmp_path: Path) -> None:
    """Two `RAISE(IGNORE)` triggers made every INSERT into transfers and UPDATE of accounts
    a silent no-op: Bank.open accepted the ledger, acknowledged a deposit (a receipt with a
    seq), and after reopening (accepted again) `find` did not know the key: lost."""
    path = tmp_path / "l.db"
    _sound_ledger(path)
    _edit(
        path,
        "CREATE TRIGGER t1 BEFORE INSERT ON transfers BEGIN SELECT RAISE(IGNORE); END;"
        "CREATE TRIGGER t2 BEFORE UPDATE ON accounts BEGIN SELECT RAISE(IGNORE); END;",
    )
    acknowledged: list[str] = []
    with (
        pytest.raises(bank.LedgerCorrupt, match="unexpected trigger t1 on transfers") as info,
        bank.Bank.open(path) as b,
    ):
        acknowledged.append(b.deposit(1, 777, key="gone").key or "")
    assert acknowledged == []
    assert "bank audit" in str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TRIGGER t AFTER INSERT ON transfers BEGIN "
        "UPDATE transfers SET key = NULL WHERE seq = new.seq; END;",
        "CREATE VIEW v AS SELECT 1;",
        "CREATE INDEX ix ON transfers(amount);",
        "CREATE TABLE zz(x);",
    ],
    ids=["trigger-drops-keys", "view", "index", "table"],
)
def test_open_refuses_schema_objects_no_migration_made(sql: str, tmp_path: Path) -> None:
    """The audit reported them; Bank.open opened the ledger and wrote through them."""
    path = tmp_path / "l.db"
    _sound_ledger(path)
    _edit(path, sql)
    with pytest.raises(bank.LedgerCorrupt, match="schema: unexpected"):
        bank.Bank.open(path)


def test_open_accepts_planner_statistics(tmp_path: Path) -> None:
    """ANALYZE (sqlite_stat1) and VACUUM change no result: still a sound ledger."""
    path = tmp_path / "l.db"
    _sound_ledger(path)
    _edit(path, "ANALYZE; VACUUM;")
    with bank.Bank.open(path) as b:
        assert b.balance(1) == 1000


def test_open_of_two_schema_revisions_is_ledger_corrupt(tmp_path: Path) -> None:
    """A second alembic_version row: Bank.open raised alembic's raw CommandError."""
    path = tmp_path / "l.db"
    _sound_ledger(path)
    _edit(path, "INSERT INTO alembic_version VALUES ('0002');")
    with pytest.raises(bank.LedgerCorrupt, match="more than one schema revision"):
        bank.Bank.open(path)


def _forge_trigger(path: Path, name: str, table: str, body: str) -> None:
    """A trigger under a name `CREATE TRIGGER` refuses (sqlite_stat1): via writable_schema."""
    sql = f"CREATE TRIGGER {name} BEFORE {body} ON {table} BEGIN SELECT RAISE(IGNORE); END"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute(
            "INSERT INTO sqlite_master(type, name, tbl_name, rootpage, sql) "
            "VALUES ('trigger', ?, ?, 0, ?)",
            (name, table, sql),
        )
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_a_trigger_named_like_planner_statistics_is_not_ignored(tmp_path: Path) -> None:
    """The schema check skipped every object *named* sqlite_stat1..4, whatever its type:
    two RAISE(IGNORE) triggers so named swallowed an acknowledged deposit, and the audit
    said CLEAN even with --expect-head (the pinned head had not moved); Bank.open accepted."""
    from bank.ledger.audit import audit_ledger
    from bank.ledger.migrate import head_revision

    path = tmp_path / "l.db"
    _sound_ledger(path)
    head = audit_ledger(path).head
    _forge_trigger(path, "sqlite_stat1", "transfers", "INSERT")
    _forge_trigger(path, "sqlite_stat4", "accounts", "UPDATE")
    report = audit_ledger(path, expect_head=head)
    assert not report.ok
    assert {p.message for p in report.problems} >= {
        "unexpected trigger sqlite_stat1 on transfers: no migration up to revision "
        f"{head_revision()} creates it"
    }
    with pytest.raises(bank.LedgerCorrupt, match="unexpected trigger sqlite_stat1"):
        bank.Bank.open(path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["symlink-repointed", "renamed-and-replaced"])
def test_bank_audit_never_vouches_for_another_file(how: str, tmp_path: Path) -> None:
    """`Bank.audit()` audited whatever its path named now: after the symlink it was opened
    through was re-pointed (or the file renamed and another ledger put in its place) it
    reported the *other* ledger CLEAN as its own."""
    other = tmp_path / "other.db"
    with bank.Bank.open(other) as o:
        o.open_account("zed")
    real = tmp_path / "real.db"
    link = tmp_path / "link.db"
    if how == "symlink-repointed":
        link.symlink_to(real)
        opened = link
    else:
        opened = real
    with bank.Bank.open(opened) as b:
        b.deposit(b.open_account("a").id, 5)
        assert b.audit().ok
        if how == "symlink-repointed":
            link.unlink()
            link.symlink_to(other)
        else:
            real.rename(tmp_path / "moved.db")
            other.rename(real)
        with pytest.raises(bank.CannotAudit, match="no longer the file this bank holds"):
            b.audit()
        assert b.deposit(1, 1).seq == 2  # the bank goes on, on its own file


@pytest.mark.timeout(120)
@pytest.mark.parametrize("through", ["fifo", "symlink-to-fifo"])
def test_simulate_json_to_a_fifo_writes_through_it(through: str, tmp_path: Path) -> None:
    """`--json` renamed a temporary file over its target: `--json /dev/full` (tried as
    root) replaced the device with a regular file, `--json /dev/stdout` would replace that
    link for every process. A FIFO stands in for the device here: it must stay a FIFO
    and its reader must get the JSON."""
    import json
    import os
    import stat
    import threading

    from bank.cli import main

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    target = fifo
    if through == "symlink-to-fifo":
        target = tmp_path / "link"
        target.symlink_to(fifo)
    received: list[str] = []

    def read() -> None:
        with fifo.open(encoding="utf-8") as inp:
            received.append(inp.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    argv = ["simulate", "--db", str(tmp_path / "s.db"), "--ops", "50", "--tellers", "2"]
    code = main([*argv, "--accounts", "5", "--json", str(target), "--no-progress"])
    if not received:  # before the fix nothing opened the FIFO: let the reader go
        with fifo.open("w") if stat.S_ISFIFO(os.stat(fifo).st_mode) else open(os.devnull, "w"):
            pass
    reader.join(10)
    assert code == 0
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert json.loads(received[0])["ops"] == 50


# -- a done-callback that waits on the bank: it ran on the writer and waited for itself --------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.balance(1),
        lambda b: b.deposit(1, 1),
        lambda b: b.withdraw(1, 1),
        lambda b: b.transfer(1, 2, 1),
        lambda b: b.snapshot(),
        lambda b: b.open_account("late"),
        lambda b: b.set_overdraft_limit(1, 10),
    ],
    ids=[
        "balance",
        "deposit",
        "withdraw",
        "transfer",
        "snapshot",
        "open_account",
        "set_overdraft_limit",
    ],
)
def test_a_waiting_call_from_a_done_callback_is_refused(call: object, tmp_path: Path) -> None:
    """Each of these, called in a done-callback (on the ledger writer), waited forever for
    the writer it was blocking: the bank was wedged, and close() gave up after 60 s with
    the ledger locked. Now WaitOnBankThread at once, and the bank goes on."""
    import threading

    path = tmp_path / "l.db"
    outcome: list[BaseException | object] = []
    done = threading.Event()
    with bank.Bank.open(path) as b:
        b.open_account("a")
        b.open_account("b")
        b.deposit(1, 100)

        def callback(_future: object) -> None:
            try:
                outcome.append(call(b))  # type: ignore[operator]
            except BaseException as exc:
                outcome.append(exc)
            done.set()

        b.submit(bank.Deposit(account=1, amount=5)).add_done_callback(callback)
        assert done.wait(10), "the call in the callback never returned (the bank is wedged)"
        assert isinstance(outcome[0], bank.WaitOnBankThread), outcome
        assert b.deposit(1, 1).seq == 3  # nothing of the refused call was written
    assert [r[0] for r in _rows(path)] == [1, 2, 3]


# -- fork: a child has none of the bank's threads ---------------------------------------------


def _in_fork_child(child: Callable[[], str], timeout_s: float) -> str:
    """Run `child` in a forked child (which leaves with os._exit); its text, or a timeout."""
    import os
    import select

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(read_end)
            os.write(write_end, child().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout_s)
        return os.read(read_end, 4096).decode() if ready else "TIMEOUT"
    finally:
        os.close(read_end)
        os.kill(pid, 9)
        os.waitpid(pid, 0)


@pytest.mark.timeout(60)
def test_a_forked_child_neither_waits_forever_nor_60_s(tmp_path: Path) -> None:
    """In a child forked from a process with an open bank, `deposit` queued work that no
    thread would ever take (it waited forever) and close() - also the one at exit - waited
    60 s for threads that are not there. Now BankClosed at once, close() returns at once."""
    import time

    from bank.engine import _close_open_banks

    with bank.Bank.open(tmp_path / "l.db") as b:
        b.deposit(b.open_account("a").id, 5)

        def child() -> str:
            started = time.monotonic()
            try:
                b.deposit(1, 1)
                answer = "deposited"
            except bank.BankClosed as exc:
                answer = f"BankClosed: {exc}"
            b.close()
            _close_open_banks()  # what atexit runs
            return f"{answer} in {time.monotonic() - started:.1f} s"

        answer = _in_fork_child(child, timeout_s=20)
        assert answer.startswith("BankClosed: this bank belongs to the process"), answer
        assert answer.endswith(" in 0.0 s"), answer
        assert b.deposit(1, 1).seq == 2  # the parent's bank is untouched


@pytest.mark.timeout(60)
def test_close_releases_the_ledger_while_a_forked_child_lives(tmp_path: Path) -> None:
    """The flock was released by closing its descriptor only: a forked child's copy of that
    descriptor kept the lock, so the ledger stayed LedgerBusy until the child ended."""
    import os
    import time

    path = tmp_path / "l.db"
    b = bank.Bank.open(path)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child: lives until the parent is done)
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    try:
        b.close()
        deadline = time.monotonic() + 5
        with bank.Bank.open(path) as again:  # LedgerBusy before the fix
            assert again.path == path
        assert time.monotonic() < deadline
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)
