"""Where separately built features meet: holds and groups inside submit_batch, closes
against pending holds and groups, running balances and history of rows that move no
money, `bank copy` of all of it, and the audit of the result (both backends)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import bank
from bank.cli import main as cli_main
from bank.clock import ManualClock
from bank.commands import BankCommand
from bank.ledger.audit import audit_ledger
from bank.ledger.copy import copy_ledger
from tests.conftest import LEDGER_PARAMS, LedgerDb, new_ledger, run_threads, wait_until
from tests.ledger_templates import LedgerTemplate

START_US = 1_700_000_000_000_000


@pytest.fixture(scope="module", params=LEDGER_PARAMS)
def _template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LedgerTemplate]:
    """One migrated empty ledger per backend (migrations cost about a second a ledger)."""
    base = new_ledger(request, tmp_path_factory.mktemp("interactions"))
    template = LedgerTemplate(base)
    yield template
    template.drop()
    if base.server is not None:
        base.drop()


@pytest.fixture
def ledger_db(_template: LedgerTemplate) -> Iterator[LedgerDb]:
    """A fresh migrated ledger on each backend in turn (a copy of the template)."""
    ledger = _template.new()
    yield ledger
    ledger.drop()


@pytest.fixture(scope="module")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> LedgerTemplate:
    return LedgerTemplate(LedgerDb.sqlite(tmp_path_factory.mktemp("interactions") / "l.db"))


@pytest.fixture
def sqlite_db(_sqlite_template: LedgerTemplate) -> LedgerDb:
    """A fresh migrated SQLite ledger: for what the backend does not decide (the engine's
    in-memory rules, the CLI, the copy), the PostgreSQL twin costs seconds and adds little."""
    return _sqlite_template.new()


@pytest.fixture
def make_sqlite_bank(sqlite_db: LedgerDb) -> Iterator[Callable[..., bank.Bank]]:
    """Open banks on `sqlite_db` (options passed through); all are closed at teardown."""
    opened: list[bank.Bank] = []

    def _make(**options: object) -> bank.Bank:
        b = bank.Bank.open(sqlite_db.db, **options)  # type: ignore[arg-type]
        opened.append(b)
        return b

    yield _make
    for b in opened:
        b.close()


def _audit_ok(db: Path | str) -> None:
    report = audit_ledger(db)
    assert report.ok, report.problems[:5]


# -- close vs pending holds ---------------------------------------------------------------


def test_an_account_with_a_pending_hold_does_not_close_as_source_or_target(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    """DESIGN: close_account needs a zero balance and nothing held, else AccountNotEmpty;
    a hold's target that closed would be credited by the post after its close."""
    b = make_ledger_bank()
    src = b.open_account("src", overdraft_limit=100).id  # balance 0, holds on its overdraft
    tgt = b.open_account("tgt").id  # balance 0, the target of a pending hold
    h = b.hold(src, tgt, 30)
    with pytest.raises(bank.AccountNotEmpty, match="held"):
        b.close_account(src)
    with pytest.raises(bank.AccountNotEmpty, match="pending hold"):
        b.close_account(tgt)
    assert not b.account(src).closed and not b.account(tgt).closed
    b.void(h.seq)
    assert b.close_account(src).closed and b.close_account(tgt).closed
    b.close()
    _audit_ok(ledger_db.db)


def test_an_expiry_due_after_a_refused_close_lands_and_the_close_then_succeeds(
    make_sqlite_bank: Callable[..., bank.Bank], sqlite_db: LedgerDb
) -> None:
    clock = ManualClock(start_us=START_US)
    b = make_sqlite_bank(clock=clock)
    src = b.open_account("src").id
    tgt = b.open_account("tgt").id
    b.deposit(src, 50)
    b.withdraw(src, 50)
    b.deposit(src, 20)
    h = b.hold(src, tgt, 20, expires_s=5)
    with pytest.raises(bank.AccountNotEmpty):
        b.close_account(tgt)
    clock.advance(5)
    wait_until(lambda: b.account(src).held == 0)
    b.close_account(tgt)  # the hold expired: nothing points at it any more
    with pytest.raises(bank.HoldNotPending, match="expired"):
        b.post(h.seq)
    b.withdraw(src, 20)
    b.close_account(src)
    b.close()
    _audit_ok(sqlite_db.db)


# -- closed accounts inside batches and groups ----------------------------------------------


def test_holds_and_groups_touching_a_closed_account_are_refused(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    """Every later operation on a closed account is refused with AccountClosed: a Hold
    (single, in a batch) and each member of an atomic group too."""
    b = make_ledger_bank()
    a = b.open_account("a").id
    gone = b.open_account("gone").id
    b.deposit(a, 100)
    b.close_account(gone)
    out = b.execute(
        [
            bank.Hold(source=a, target=gone, amount=1),
            bank.Deposit(account=gone, amount=1),
            bank.Deposit(account=a, amount=1),
        ]
    )
    assert isinstance(out[0], bank.AccountClosed), out[0]
    assert isinstance(out[1], bank.AccountClosed), out[1]
    assert isinstance(out[2], bank.Receipt)
    with pytest.raises(bank.AccountClosed):
        b.hold(a, gone, 1)
    groups: list[list[BankCommand]] = [
        [bank.Deposit(account=a, amount=1), bank.Transfer(source=a, target=gone, amount=1)],
        [bank.Hold(source=a, target=gone, amount=1)],
    ]
    for members in groups:
        with pytest.raises(bank.LinkedCommandFailed) as failed:
            b.transact(members)
        assert isinstance(failed.value.error, bank.AccountClosed), failed.value.error
    assert (b.balance(a), b.account(a).held, b.balance(gone)) == (101, 0, 0)
    b.close()
    _audit_ok(ledger_db.db)


def test_batches_carry_holds_posts_voids_and_share_keys_with_single_submits(
    make_sqlite_bank: Callable[..., bank.Bank], sqlite_db: LedgerDb
) -> None:
    b = make_sqlite_bank()
    a = b.open_account("a").id
    t = b.open_account("t").id
    b.deposit(a, 100)
    hold = bank.Hold(source=a, target=t, amount=30, key="h1", expires_s=60)
    out = b.execute([hold, hold, bank.Hold(source=a, target=t, amount=80, key="h2")])
    assert isinstance(out[0], bank.Receipt) and out[1] == out[0]  # one key, one row
    assert isinstance(out[2], bank.InsufficientFunds)  # 70 available
    h1 = out[0].seq
    assert b.hold(a, t, 30, key="h1", expires_s=60) == out[0]  # the single repeat: same
    with pytest.raises(bank.IdempotencyConflict):
        b.hold(a, t, 31, key="h1")
    out = b.execute(
        [
            bank.Post(hold=h1, amount=10, key="p1"),
            bank.Void(hold=h1, key="v1"),
            bank.Post(hold=h1, amount=10, key="p1"),
            bank.Post(hold=999_999),
        ]
    )
    assert isinstance(out[0], bank.Receipt) and out[2] == out[0]
    assert isinstance(out[1], bank.HoldNotPending)
    assert isinstance(out[3], bank.HoldNotFound)
    assert b.post(h1, 10, key="p1") == out[0]
    with pytest.raises(bank.LinkedCommandFailed) as failed:  # p1's key, another command
        b.transact([bank.Void(hold=h1, key="p1")])
    assert isinstance(failed.value.error, bank.IdempotencyConflict | bank.HoldNotPending)
    assert (b.balance(a), b.balance(t), b.account(a).held) == (90, 10, 0)
    b.close()
    _audit_ok(sqlite_db.db)


def test_groups_and_batches_race_a_close_on_the_same_accounts(
    make_sqlite_bank: Callable[..., bank.Bank], sqlite_db: LedgerDb, fast_switching: None
) -> None:
    """Either the close wins (later holds refused) or a hold wins (the close refused,
    until it is voided): never a hold on a closed account, and the audit stays clean."""
    b = make_sqlite_bank()
    payer = b.open_account("payer").id
    shops = [b.open_account(f"shop{i}").id for i in range(4)]
    b.deposit(payer, 1_000)
    closes: list[object] = []

    def batcher() -> None:
        for _ in range(10):
            b.execute([bank.Hold(source=payer, target=s, amount=1) for s in shops])

    def grouper() -> None:
        for _ in range(10):
            try:
                b.transact([bank.Hold(source=payer, target=s, amount=1) for s in shops])
            except bank.LinkedCommandFailed as exc:
                assert isinstance(exc.error, bank.AccountClosed), exc.error

    def closer() -> None:
        for s in shops:
            try:
                closes.append(b.close_account(s))
            except bank.AccountNotEmpty as exc:
                closes.append(exc)

    run_threads([batcher, grouper, closer], timeout_s=60)
    for s in shops:
        if b.account(s).closed:
            continue
        assert b.account(s).balance == 0
    b.close()
    _audit_ok(sqlite_db.db)
    again = bank.Bank.open(sqlite_db.db)
    try:
        for s in shops:
            if again.account(s).closed:
                assert again.balance(s) == 0
    finally:
        again.close()


# -- running balances, history pages, the CLI, over rows that move no money ------------------


def _mixed_ledger(b: bank.Bank, clock: ManualClock) -> tuple[int, int, list[bank.Receipt]]:
    a = b.open_account("a").id
    t = b.open_account("t").id
    rows = [b.deposit(a, 100)]
    h1 = b.hold(a, t, 30, expires_s=5)
    h2 = b.hold(a, t, 20)
    h3 = b.hold(a, t, 10)
    rows += [h1, h2, h3, b.post(h2.seq, 15), b.void(h3.seq)]
    rows += b.transact(
        [bank.Hold(source=a, target=t, amount=5), bank.Transfer(source=a, target=t, amount=5)]
    )
    clock.advance(5)
    return a, t, rows


def test_running_balances_pages_and_cli_output_of_hold_rows(
    make_sqlite_bank: Callable[..., bank.Bank],
    sqlite_db: LedgerDb,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = ManualClock(start_us=START_US)
    b = make_sqlite_bank(clock=clock)
    a, t, _ = _mixed_ledger(b, clock)
    wait_until(lambda: len(b.history(a, limit=100)) == 9)
    history = b.history(a, limit=100)
    kinds = [r.kind for r in history]
    assert kinds == [
        "deposit",
        "hold",
        "hold",
        "hold",
        "post",
        "void",
        "hold",
        "transfer",
        "expire",
    ]
    moved = {"deposit": 1, "transfer": -1, "post": -1}
    expected, want = 0, []
    for r in history:
        expected += moved.get(r.kind, 0) * r.amount
        want.append(expected)
        assert b.balance(a, at_seq=r.seq) == expected, (r.kind, r.seq)
    assert want[-1] == b.balance(a) == 80
    # pages of two, ascending, reach every row exactly once
    seen, after = [], 0
    while page := b.history(a, after_seq=after, limit=2):
        seen += page
        after = page[-1].seq
    assert seen == history
    assert list(b.iter_history(t)) == b.history(t, limit=100)
    head = history[-1].seq
    b.close()
    db = str(sqlite_db.db)
    for fmt in ("table", "json", "csv", "nl"):
        assert cli_main(["history", "--db", db, "a", "--format", fmt]) == 0
        out = capsys.readouterr().out
        for kind in ("hold", "post", "void", "expire"):
            assert kind in out, (fmt, kind)
        if fmt == "json":
            parsed = json.loads(out)
            assert [p["kind"] for p in parsed] == kinds
            assert [p["hold_seq"] for p in parsed][4:6] == [history[2].seq, history[3].seq]
        elif fmt == "csv":
            parsed_rows = list(csv.DictReader(io.StringIO(out)))
            assert [p["kind"] for p in parsed_rows] == kinds
    assert cli_main(["balance", "--db", db, "a"]) == 0
    assert "0.80" in capsys.readouterr().out
    assert cli_main(["balance", "--db", db, "a", "--at-seq", str(head - 1)]) == 0
    assert "0.80" in capsys.readouterr().out  # the expire row moved nothing
    _audit_ok(sqlite_db.db)


# -- copy, reopen, tamper --------------------------------------------------------------------


def test_a_copy_keeps_pending_holds_their_deadlines_groups_and_closes(
    make_sqlite_bank: Callable[..., bank.Bank], sqlite_db: LedgerDb, tmp_path: Path
) -> None:
    clock = ManualClock(start_us=START_US)
    b = make_sqlite_bank(clock=clock)
    a = b.open_account("a").id
    t = b.open_account("t").id
    gone = b.open_account("gone").id
    b.deposit(a, 100)
    b.transact([bank.Deposit(account=gone, amount=3), bank.Withdrawal(account=gone, amount=3)])
    b.close_account(gone)
    soon = b.hold(a, t, 30, expires_s=10)
    never = b.hold(a, t, 20)
    b.close()
    copy = tmp_path / "copy.db"
    assert copy_ledger(sqlite_db.db, copy).ok
    _audit_ok(copy)
    c = bank.Bank.open(copy, clock=clock)
    try:
        assert c.account(gone).closed and c.account(a).held == 50
        with pytest.raises(bank.AccountClosed):
            c.deposit(gone, 1)
        with pytest.raises(bank.AccountNotEmpty):
            c.close_account(t)  # still the target of two pending holds
        clock.advance(10)
        wait_until(lambda: c.account(a).held == 20)
        expired = c.history(a, limit=100)[-1]
        assert (expired.kind, expired.hold_seq) == ("expire", soon.seq)
        assert c.post(never.seq).amount == 20
    finally:
        c.close()
    _audit_ok(copy)


def test_the_audit_finds_a_tampered_hold_or_group_column(
    make_sqlite_bank: Callable[..., bank.Bank], sqlite_db: LedgerDb, tmp_path: Path
) -> None:
    clock = ManualClock(start_us=START_US)
    b = make_sqlite_bank(clock=clock)
    a = b.open_account("a").id
    t = b.open_account("t").id
    b.deposit(a, 100)
    h = b.hold(a, t, 30, expires_s=60)
    p = b.post(h.seq, 10)
    g = b.transact(
        [bank.Hold(source=a, target=t, amount=5), bank.Transfer(source=a, target=t, amount=5)]
    )
    b.close()
    _audit_ok(sqlite_db.db)
    for column, seq in [
        ("hold_seq", p.seq),
        ("link_count", g[0].seq),
        ("link_first", g[1].seq),
        ("debit_balance", p.seq),
        ("credit_balance", h.seq),  # a hold row's running balance: the unchanged one
        ("expires_us", h.seq),
    ]:
        copy = tmp_path / f"{column}.db"
        shutil.copyfile(sqlite_db.path, copy)
        tampered = LedgerDb.sqlite(copy)
        tampered.execute(f"UPDATE transfers SET {column} = {column} + 1 WHERE seq = {seq}")
        assert not audit_ledger(copy).ok, column


def test_the_audit_finds_an_account_closed_with_a_pending_hold(
    make_sqlite_bank: Callable[..., bank.Bank], sqlite_db: LedgerDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger written by an engine that let such a close through (as this one did before
    `_is_empty` looked at holds): the reopened bank has a closed account holding money,
    and the expiry would later write a row touching it. The audit says so at the close."""
    b = make_sqlite_bank()
    src = b.open_account("src", overdraft_limit=100).id
    tgt = b.open_account("tgt").id
    h = b.hold(src, tgt, 30, expires_s=3600)
    with monkeypatch.context() as patched:
        patched.setattr(bank.engine, "_is_empty", lambda account, holds: True)
        b.close_account(src)
        b.close_account(tgt)
    b.close()
    found = [(p.kind, p.account) for p in audit_ledger(sqlite_db.db).problems]
    assert found == [("close_not_empty", src), ("close_not_empty", tgt)], found
    assert h.seq == 1


def test_a_cancelled_batch_of_holds_leaves_nothing_and_an_answered_one_everything(
    make_sqlite_bank: Callable[..., bank.Bank],
) -> None:
    """`cancel()` on submit_batch's future: none of it applied (no hold, no held amount,
    no key taken), else every member answered; the keys of a cancelled batch stay free."""
    b = make_sqlite_bank()
    a = b.open_account("a").id
    t = b.open_account("t").id
    b.deposit(a, 10_000)
    held = 0
    for i in range(20):
        batch: list[BankCommand] = [
            bank.Hold(source=a, target=t, amount=1, key=f"h{i}-{j}") for j in range(20)
        ]
        batch.append(bank.Transfer(source=a, target=t, amount=1, key=f"x{i}"))
        future = b.submit_batch(batch)
        if future.cancel():
            assert all(b.find(c.key) is None for c in batch if c.key is not None), i
            assert b.account(a).held == held
            assert b.hold(a, t, 1, key=f"h{i}-0").kind == "hold"  # the key is free
            held += 1
        else:
            assert all(isinstance(r, bank.Receipt) for r in future.result())
            held += 20
        assert b.account(a).held == held
