"""The storage seam on SQLite: a hot standby that waits for the owner lock (`wait_s`),
and a bank that stops for good once its owner lock reports itself lost."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

import bank
from bank.idempotency import KeyClaims
from bank.ledger import store
from bank.ledger.audit import audit_ledger
from bank.ledger.backends import backend_for, ledger_url
from bank.ledger.sqlite import SqliteBatchWriter, create_ledger_engine
from bank.ledger.writer import LedgerWriter
from bank.limits import CASH_ACCOUNT_ID
from bank.records import Receipt

#: A child that owns the ledger and prints every key once its deposit is acknowledged.
_HOLDER = """
import sys
import bank
b = bank.Bank.open(sys.argv[1])
a = b.open_account("standby").id
i = 0
while True:
    b.deposit(a, 1, key=f"k{i}")
    print(f"k{i}", flush=True)
    i += 1
"""


@pytest.mark.parametrize("wait_s", [-1, -0.5, math.nan, math.inf, "1", True, None, 10**400])
def test_a_bad_wait_s_is_refused_before_anything_is_opened(
    ledger_path: Path, wait_s: object
) -> None:
    with pytest.raises(bank.InvalidCommand, match="wait_s"):
        bank.Bank.open(ledger_path, wait_s=wait_s)  # type: ignore[arg-type]
    assert not ledger_path.exists()


@pytest.mark.timeout(60)
def test_wait_s_zero_is_busy_at_once_and_a_wait_gives_up_at_its_deadline(
    make_bank: Callable[..., bank.Bank], ledger_path: Path
) -> None:
    make_bank()
    with pytest.raises(bank.LedgerBusy, match="another Bank of this process"):
        bank.Bank.open(ledger_path)
    started = time.monotonic()
    with pytest.raises(bank.LedgerBusy, match=r"waited 0\.3 s"):
        bank.Bank.open(ledger_path, wait_s=0.3)
    assert time.monotonic() - started >= 0.3


@pytest.mark.timeout(60)
def test_a_standby_in_this_process_gets_the_ledger_when_the_owner_closes(
    ledger_path: Path,
) -> None:
    first = bank.Bank.open(ledger_path)
    a = first.open_account("a").id
    first.deposit(a, 5, key="before")
    threading.Timer(0.3, first.close).start()
    with bank.Bank.open(ledger_path, wait_s=10) as second:
        assert first.closed
        assert second.balance(a) == 5 and second.find("before") is not None


@pytest.mark.timeout(120)
def test_a_standby_takes_over_after_the_holder_is_sigkilled(ledger_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(ledger_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged: list[str] = []
    try:
        assert child.stdout is not None
        while len(acknowledged) < 20:
            line = child.stdout.readline()
            assert line, "the holder died before acknowledging anything"
            acknowledged.append(line.strip())
        opened: list[bank.Bank] = []
        errors: list[BaseException] = []

        def standby() -> None:
            try:
                opened.append(bank.Bank.open(ledger_path, wait_s=30))
            except BaseException as exc:
                errors.append(exc)

        waiter = threading.Thread(target=standby)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive(), f"the standby did not wait: {opened or errors}"
        child.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # Everything the holder printed before it died was acknowledged.
        acknowledged += [line.strip() for line in child.stdout if line.strip()]
        child.wait(30)
        waiter.join(60)
        took_over_s = time.monotonic() - killed
        assert not errors and opened, errors
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    with opened[0] as b:
        account = next(x for x in b.accounts() if x.name == "standby").id
        for key in acknowledged:
            assert b.find(key) is not None, f"acknowledged {key} is missing"
        b.deposit(account, 1, key="after-takeover")  # the standby writes on
    assert audit_ledger(ledger_path).ok
    print(f"took over {took_over_s:.2f} s after the SIGKILL; {len(acknowledged)} keys acknowledged")


class _Lease:
    """An owner lock that another thread can declare lost (as a lost PostgreSQL lease)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.watchers: list[Callable[[str], None]] = []

    def lost(self) -> str | None:
        return self.reason

    def watch(self, on_lost: Callable[[str], None]) -> None:
        self.watchers.append(on_lost)

    def release(self) -> None:
        pass

    def lose(self, *, tell: bool) -> None:
        self.reason = "the lease connection was closed"
        if tell:
            for watcher in self.watchers:
                watcher(self.reason)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tell", [False, True], ids=["checked-before-commit", "watched"])
def test_a_writer_whose_owner_lock_is_lost_never_writes_again(
    ledger_path: Path, tell: bool
) -> None:
    with bank.Bank.open(ledger_path) as b:
        account = b.open_account("a").id
        b.deposit(account, 3)
    engine = create_ledger_engine(ledger_url(ledger_path))
    lease = _Lease()
    try:
        with engine.connect() as conn:
            seq, head, event_seq, event_head = store.chain_heads(conn)
        writer = LedgerWriter(
            lambda: SqliteBatchWriter(engine),
            KeyClaims(),
            seq=seq,
            head_hash=head,
            event_seq=event_seq,
            event_head_hash=event_head,
            owner=lease,
        )
        lease.watch(writer.lose)
        writer.start()
        assert writer.ready.wait(10) and writer.failure is None

        def deposit(n: int) -> Future[Receipt]:
            future: Future[Receipt] = Future()
            future.set_running_or_notify_cancel()
            balance = 3 + n  # what the account has after this deposit (@cash: the opposite)
            writer.stage_transfer(
                "deposit", CASH_ACCOUNT_ID, account, 1, f"k{n}", future, -balance, balance
            )
            return future

        assert deposit(1).result(10).seq == seq + 1
        lease.lose(tell=tell)
        with pytest.raises(bank.LedgerUnavailable, match="lost its hold"):
            deposit(2).result(10)
        assert writer.broken.is_set()
        with pytest.raises(bank.LedgerUnavailable, match="lost its hold"):
            writer.stage_account_event("open", 99, "late", 0, Future())
        with pytest.raises(bank.LedgerUnavailable):
            deposit(3).result(10)
        writer.stop()
        writer.join(10)
        assert not writer.is_alive()
    finally:
        engine.dispose()
    with bank.Bank.open(ledger_path) as b:
        assert b.find("k1") is not None
        assert b.find("k2") is None and b.find("k3") is None
        assert b.balance(account) == 4


def test_the_engine_reaches_sqlite_only_through_the_backend() -> None:
    import bank.engine

    source = Path(bank.engine.__file__).read_text()
    assert "sqlite" not in source.lower()
    backend = backend_for(ledger_url("relative.db"))
    assert backend.name == "sqlite" and backend.path is not None and backend.path.is_absolute()
    assert backend.where == str(backend.path)
