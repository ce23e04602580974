"""Attacks on the promises of holds, atomic groups and closes (issue 11).

A refused hold, post, void, group or close changes nothing, in memory or in the ledger;
a repeated key returns the original receipt; crafted inputs (`model_construct`,
`model_copy(update=...)`, bools, bad deadlines, seqs that are no hold, groups too big,
empty or nested) are refused with `InvalidCommand` before anything is queued; a process
SIGKILLed amid groups and holds leaves whole groups and expires its holds at reopen;
and the audit finds every edit of the new columns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bank
from bank.clock import ManualClock
from bank.ledger.audit import audit_ledger
from tests.conftest import LedgerDb

CASH = bank.CASH_ACCOUNT_ID
WAIT_S = 60.0
#: Input checks and planning that no backend touches: run on SQLite only (a PostgreSQL
#: `Bank.open` costs a second or more of the test-time budget).
SQLITE_ONLY = pytest.mark.parametrize("ledger_db", ["sqlite"], indirect=True)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def b(ledger_db: LedgerDb, clock: ManualClock) -> Iterator[bank.Bank]:
    with bank.Bank.open(ledger_db.db, workers=2, clock=clock) as opened:
        yield opened


def _state(b: bank.Bank, ledger_db: LedgerDb) -> tuple[Any, ...]:
    """Everything a refusal must leave as it was: every account (balance, held,
    available, closed), the snapshot, and the ledger's rows and events."""
    accounts = tuple(
        (a.id, a.balance, a.held, a.available, a.closed) for a in [b.account(CASH), *b.accounts()]
    )
    rows = ledger_db.query("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM transfers")[0]
    events = ledger_db.query("SELECT COUNT(*) FROM account_events")[0]
    return (accounts, b.snapshot(), rows, events)


def _setup(b: bank.Bank) -> tuple[int, int, bank.Receipt]:
    """Two accounts, 1,000 in the first, a hold of 600 of it for the second."""
    alice = b.open_account("alice").id
    shop = b.open_account("shop").id
    b.deposit(alice, 1_000)
    return alice, shop, b.hold(alice, shop, 600)


# -- refusals change nothing ---------------------------------------------------------------


def test_refused_holds_posts_voids_groups_and_closes_change_nothing(
    b: bank.Bank, ledger_db: LedgerDb
) -> None:
    alice, shop, hold = _setup(b)
    deposit_seq = 1
    voided = b.hold(alice, shop, 10)
    b.void(voided.seq)
    before = _state(b, ledger_db)
    refusals: list[tuple[Any, type[bank.BankError]]] = [
        (lambda: b.hold(alice, shop, 401), bank.InsufficientFunds),  # available is 400
        (lambda: b.withdraw(alice, 401), bank.InsufficientFunds),
        (lambda: b.transfer(alice, shop, 401), bank.InsufficientFunds),
        (lambda: b.hold(alice, 999, 1), bank.AccountNotFound),
        (lambda: b.post(deposit_seq), bank.HoldNotFound),  # a seq that is no hold
        (lambda: b.void(deposit_seq), bank.HoldNotFound),
        (lambda: b.post(10_000), bank.HoldNotFound),  # beyond the head
        (lambda: b.void(10_000), bank.HoldNotFound),
        (lambda: b.post(hold.seq, 601), bank.PostExceedsHold),
        (lambda: b.post(voided.seq), bank.HoldNotPending),
        (lambda: b.void(voided.seq), bank.HoldNotPending),
        (lambda: b.close_account(alice), bank.AccountNotEmpty),
        (
            lambda: b.transact(
                [
                    bank.Deposit(account=shop, amount=5),
                    bank.Post(hold=hold.seq, amount=100),
                    bank.Withdrawal(account=alice, amount=10**6),
                ]
            ),
            bank.LinkedCommandFailed,
        ),
        (
            lambda: b.transact([bank.Void(hold=hold.seq), bank.Void(hold=hold.seq)]),
            bank.LinkedCommandFailed,
        ),
    ]
    for call, error in refusals:
        with pytest.raises(error):
            call()
        assert _state(b, ledger_db) == before, f"a refused call changed something: {error}"
    assert b.audit().ok


@SQLITE_ONLY
def test_a_close_with_only_a_hold_left_is_refused(b: bank.Bank, ledger_db: LedgerDb) -> None:
    """`close_account` needs a zero balance and nothing held: an account with a limit
    holds money it does not have (balance 0, held 50) and must not close."""
    alice = b.open_account("alice", overdraft_limit=100).id
    shop = b.open_account("shop").id
    h = b.hold(alice, shop, 50)
    assert b.account(alice).balance == 0 and b.account(alice).held == 50
    before = _state(b, ledger_db)
    with pytest.raises(bank.AccountNotEmpty):
        b.close_account(alice)
    assert _state(b, ledger_db) == before
    b.void(h.seq)
    assert b.close_account(alice).closed


@SQLITE_ONLY
def test_refusal_messages_say_what_settled_the_hold(b: bank.Bank) -> None:
    alice, shop, hold = _setup(b)
    posted = b.post(hold.seq, 100)
    with pytest.raises(bank.HoldNotPending, match=rf"posted.*{posted.seq}|{posted.seq}.*posted"):
        b.void(hold.seq)
    other = b.hold(alice, shop, 5)
    voided = b.void(other.seq)
    with pytest.raises(bank.HoldNotPending, match=rf"voided.*{voided.seq}|{voided.seq}.*voided"):
        b.post(other.seq)


def test_a_group_names_its_first_refused_command(b: bank.Bank, ledger_db: LedgerDb) -> None:
    """Commands are judged in order: the group's refusal is the first command that would
    be refused (as `submit_linked` documents), not a later one naming a missing account."""
    alice, shop, hold = _setup(b)
    before = _state(b, ledger_db)
    cases: list[tuple[list[Any], int, type[bank.BankError]]] = [
        (
            [bank.Withdrawal(account=alice, amount=10**6), bank.Deposit(account=999, amount=1)],
            0,
            bank.InsufficientFunds,
        ),
        ([bank.Post(hold=1), bank.Deposit(account=999, amount=1)], 0, bank.HoldNotFound),
        (
            [
                bank.Deposit(account=shop, amount=1),
                bank.Post(hold=hold.seq, amount=601),
                bank.Transfer(source=998, target=shop, amount=1),
            ],
            1,
            bank.PostExceedsHold,
        ),
    ]
    for commands, index, error in cases:
        with pytest.raises(bank.LinkedCommandFailed) as caught:
            b.transact(commands)
        assert (caught.value.index, type(caught.value.error)) == (index, error), caught.value
        assert _state(b, ledger_db) == before


# -- idempotency ---------------------------------------------------------------------------


def test_a_keyed_post_repeated_returns_the_original_receipt(b: bank.Bank) -> None:
    alice, shop, hold = _setup(b)
    posted = b.post(hold.seq, 250, key="capture-1")
    assert b.post(hold.seq, 250, key="capture-1") == posted
    assert b.submit(bank.Post(hold=hold.seq, amount=250, key="capture-1")).result() == posted
    with pytest.raises(bank.IdempotencyConflict):
        b.post(hold.seq, 300, key="capture-1")
    with pytest.raises(bank.IdempotencyConflict):
        b.void(hold.seq, key="capture-1")
    keyed_hold = b.hold(alice, shop, 7, key="auth-1", expires_s=60)
    assert b.hold(alice, shop, 7, key="auth-1", expires_s=60) == keyed_hold
    with pytest.raises(bank.IdempotencyConflict):
        b.hold(alice, shop, 7, key="auth-1", expires_s=61)  # another deadline
    voided = b.void(keyed_hold.seq, key="release-1")
    assert b.void(keyed_hold.seq, key="release-1") == voided
    # Still the original after a reopen, and after the hold it names was settled.
    assert b.hold(alice, shop, 7, key="auth-1", expires_s=60) == keyed_hold
    assert b.balance(shop) == 250 and b.account(alice).held == 0


def test_a_keyed_group_repeated_returns_its_receipts_and_a_refused_one_frees_its_keys(
    b: bank.Bank,
) -> None:
    alice, shop, hold = _setup(b)
    group: list[Any] = [
        bank.Post(hold=hold.seq, amount=100, key="g-post"),
        bank.Transfer(source=shop, target=alice, amount=10, key="g-fee"),
    ]
    receipts = b.transact(group)
    assert b.transact(group) == receipts
    assert b.submit_linked(group).result(timeout=WAIT_S) == receipts
    assert [r.link_first for r in receipts] == [receipts[0].seq] * 2
    assert [r.link_count for r in receipts] == [2, 2]
    with pytest.raises(bank.LinkedCommandFailed):
        b.transact(
            [
                bank.Deposit(account=alice, amount=1, key="free-1"),
                bank.Withdrawal(account=alice, amount=10**6, key="free-2"),
            ]
        )
    assert b.find("free-1") is None and b.find("free-2") is None
    assert b.deposit(alice, 1, key="free-1").kind == "deposit"


# -- crafted inputs ------------------------------------------------------------------------


def _crafted(alice: int, shop: int, hold: int) -> list[Any]:
    return [
        bank.Hold.model_construct(source=alice, target=shop, amount=5),
        bank.Hold.model_construct(source=alice, target=shop, amount=-5),
        bank.Post.model_construct(hold=hold, amount=10**6),
        bank.Void.model_construct(hold=hold),
        bank.Hold(source=alice, target=shop, amount=5).model_copy(update={"amount": -5}),
        bank.Hold(source=alice, target=shop, amount=5).model_copy(update={"target": alice}),
        bank.Hold(source=alice, target=shop, amount=5).model_copy(update={"expires_s": -1}),
        bank.Post(hold=hold).model_copy(update={"amount": 0}),
        bank.Post(hold=hold).model_copy(),  # a copy is not validated either
        bank.Void(hold=hold).model_copy(update={"hold": True}),
    ]


@SQLITE_ONLY
def test_crafted_commands_are_refused_everywhere(b: bank.Bank, ledger_db: LedgerDb) -> None:
    alice, shop, hold = _setup(b)
    before = _state(b, ledger_db)
    for command in _crafted(alice, shop, hold.seq):
        with pytest.raises(bank.InvalidCommand):
            b.submit(command)
        with pytest.raises(bank.InvalidCommand):
            b.submit_linked([bank.Deposit(account=alice, amount=1), command])
        with pytest.raises(bank.InvalidCommand):
            b.transact([command])
        with pytest.raises(bank.InvalidCommand):
            b.execute([command])
    assert _state(b, ledger_db) == before


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"amount": True}, "amount"),
        ({"amount": 0}, "amount"),
        ({"amount": 1.0}, "amount"),
        ({"amount": bank.AMOUNT_MAX + 1}, "amount"),
        ({"source": True}, "source"),
        ({"expires_s": -1}, "expires_s"),
        ({"expires_s": 0}, "expires_s"),
        ({"expires_s": 0.0000001}, "expires_s"),
        ({"expires_s": float("nan")}, "expires_s"),
        ({"expires_s": float("inf")}, "expires_s"),
        ({"expires_s": 2**64}, "expires_s"),
        ({"expires_s": True}, "expires_s"),
        ({"expires_s": "60"}, "expires_s"),
        ({"target": 1}, "target"),  # the same account as the source
    ],
)
def test_bad_hold_fields_are_refused_by_name(fields: dict[str, Any], field: str) -> None:
    values: dict[str, Any] = {"source": 1, "target": 2, "amount": 5, **fields}
    with pytest.raises(bank.InvalidCommand, match=field if field != "target" else "different"):
        bank.Hold(**values)


@pytest.mark.parametrize(
    "fields",
    [{"hold": 0}, {"hold": -1}, {"hold": True}, {"hold": 2**63}, {"hold": "1"}, {"hold": 1.0},
     {"hold": 1, "amount": 0}, {"hold": 1, "amount": True}, {"hold": 1, "amount": 10**16},
     {"hold": 1, "key": ""}, {"hold": 1, "extra": 1}],
)  # fmt: skip
def test_bad_post_and_void_fields_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(bank.InvalidCommand):
        bank.Post(**fields)
    if "amount" not in fields:
        with pytest.raises(bank.InvalidCommand):
            bank.Void(**fields)


@SQLITE_ONLY
def test_blocking_calls_refuse_bad_arguments(b: bank.Bank, ledger_db: LedgerDb) -> None:
    alice, shop, hold = _setup(b)
    before = _state(b, ledger_db)
    bad: list[Any] = [
        lambda: b.hold(alice, shop, True),
        lambda: b.hold(alice, shop, 5, expires_s=-3),
        lambda: b.hold(alice, shop, 5, expires_s=float("nan")),
        lambda: b.post(True),
        lambda: b.post(hold.seq, True),
        lambda: b.post(hold.seq, 0),
        lambda: b.void(0),
        lambda: b.void("1"),  # type: ignore[arg-type]
    ]
    for call in bad:
        with pytest.raises(bank.InvalidCommand):
            call()
    assert _state(b, ledger_db) == before


@SQLITE_ONLY
def test_group_sizes_and_shapes(b: bank.Bank, ledger_db: LedgerDb) -> None:
    """1 to 8,190 commands; an empty group, a 8,191st command, a non-command, a nested
    list, a string, a duplicate key: `InvalidCommand` at once, nothing queued."""
    alice, shop, _ = _setup(b)
    one = bank.Deposit(account=alice, amount=1)
    before = _state(b, ledger_db)
    shapes: list[Any] = [
        [],
        [one] * 8_191,
        [one, None],
        [one, [one]],
        [one, "deposit"],
        "deposits",
        one,
        [bank.Deposit(account=alice, amount=1, key="dup"), bank.Deposit(account=shop, amount=1, key="dup")],
    ]  # fmt: skip
    for shape in shapes:
        with pytest.raises(bank.InvalidCommand):
            b.submit_linked(shape)
        with pytest.raises(bank.InvalidCommand):
            b.transact(shape)
    assert _state(b, ledger_db) == before
    # A generator is an iterable of commands like a list.
    assert len(b.transact(bank.Deposit(account=alice, amount=1) for _ in range(3))) == 3


def test_the_largest_group_is_one_run_of_consecutive_seqs(tmp_path: Path) -> None:
    """8,190 commands, all or nothing: one group of consecutive seqs; with one bad
    member at the end, none of them."""
    with bank.Bank.open(tmp_path / "l.db", durability="normal") as b:
        alice = b.open_account("alice").id
        big: list[Any] = [bank.Deposit(account=alice, amount=1) for _ in range(8_190)]
        receipts = b.transact(big)
        assert [r.seq for r in receipts] == list(range(1, 8_191))
        assert {(r.link_first, r.link_count) for r in receipts} == {(1, 8_190)}
        spoiled = [*big[:-1], bank.Withdrawal(account=alice, amount=10**9)]
        with pytest.raises(bank.LinkedCommandFailed) as caught:
            b.transact(spoiled)
        assert caught.value.index == 8_189
        assert b.balance(alice) == 8_190 and b.snapshot().seq == 8_190
        assert b.audit().ok


@SQLITE_ONLY
def test_nested_weirdness_in_a_group(b: bank.Bank, ledger_db: LedgerDb) -> None:
    """A hold and a post of it in one group (the post names a seq not yet a hold); a
    post and a void of one hold; two posts of it; a void then a new hold on the
    released money: each judged in order, all or nothing."""
    alice, shop, hold = _setup(b)
    before = _state(b, ledger_db)
    head = b.snapshot().seq
    with pytest.raises(bank.LinkedCommandFailed) as caught:
        b.transact([bank.Hold(source=alice, target=shop, amount=5), bank.Post(hold=head + 1)])
    assert (caught.value.index, type(caught.value.error)) == (1, bank.HoldNotFound)
    twices: list[list[Any]] = [
        [bank.Post(hold=hold.seq, amount=1), bank.Void(hold=hold.seq)],
        [bank.Post(hold=hold.seq, amount=1), bank.Post(hold=hold.seq, amount=1)],
    ]
    for twice in twices:
        with pytest.raises(bank.LinkedCommandFailed) as caught:
            b.transact(twice)
        assert (caught.value.index, type(caught.value.error)) == (1, bank.HoldNotPending)
        assert _state(b, ledger_db) == before
    # Releasing the hold makes its money available to the next command of the group.
    receipts = b.transact(
        [bank.Void(hold=hold.seq), bank.Hold(source=alice, target=shop, amount=1_000)]
    )
    assert [r.kind for r in receipts] == ["void", "hold"]
    assert b.account(alice).held == 1_000 and b.account(alice).available == 0


# -- closed accounts and holds ----------------------------------------------------------------


def test_an_account_named_by_a_pending_hold_does_not_close(
    b: bank.Bank, ledger_db: LedgerDb, clock: ManualClock
) -> None:
    """The target of a pending hold is empty, but money is on its way in: the close is
    refused (`AccountNotEmpty`, nothing changes) until the hold is voided or expires;
    once closed, nothing may hold for it."""
    alice, shop, hold = _setup(b)
    other = b.hold(alice, shop, 100, expires_s=5)
    before = _state(b, ledger_db)
    with pytest.raises(bank.AccountNotEmpty):
        b.close_account(shop)
    assert _state(b, ledger_db) == before
    b.void(hold.seq)
    with pytest.raises(bank.AccountNotEmpty):
        b.close_account(shop)
    clock.advance(5)
    deadline = time.monotonic() + WAIT_S
    while b.account(alice).held:
        assert time.monotonic() < deadline, "watchdog: the hold never expired"
        time.sleep(0.005)
    assert ledger_db.query(f"SELECT kind FROM transfers WHERE hold_seq = {other.seq}") == [
        ("expire",)
    ]
    assert b.close_account(shop).closed
    before = _state(b, ledger_db)
    with pytest.raises(bank.AccountClosed):
        b.hold(alice, shop, 1)
    with pytest.raises(bank.LinkedCommandFailed) as caught:
        b.transact(
            [bank.Deposit(account=alice, amount=1), bank.Hold(source=alice, target=shop, amount=1)]
        )
    assert caught.value.index == 1 and isinstance(caught.value.error, bank.AccountClosed)
    assert _state(b, ledger_db) == before
    report = b.audit()
    assert report.ok, report.problems[:5]


# -- a process killed amid groups and holds ---------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, bank
    db, mode = sys.argv[1], sys.argv[2]
    b = bank.Bank.open(db, workers=2)
    a = b.open_account("a", exist_ok=True).id
    c = b.open_account("c", exist_ok=True).id
    b.deposit(a, 10**12, key="seed")
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        if mode == "groups":
            r = b.transact([
                bank.Transfer(source=a, target=c, amount=3, key=f"pay-{i}"),
                bank.Hold(source=a, target=c, amount=2, key=f"auth-{i}"),
                bank.Transfer(source=c, target=a, amount=1, key=f"fee-{i}"),
            ])
            print("group", i, r[0].seq, flush=True)
        else:
            h = b.hold(a, c, 5, expires_s=0.05, key=f"auth-{i}")
            print("hold", i, h.seq, h.expires_us, flush=True)
            if i % 2:
                try:
                    b.post(h.seq, 1)
                except bank.HoldNotPending:
                    pass
    """
)


def _kill_child(db: Path, mode: str, acked: int) -> list[list[str]]:
    """Run the child until it acknowledged `acked` lines, SIGKILL it, return its lines."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db), mode],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    lines: list[list[str]] = []
    deadline = time.monotonic() + WAIT_S
    try:
        while len(lines) < acked:
            assert time.monotonic() < deadline, "watchdog: the child made no progress"
            line = child.stdout.readline()
            assert line, f"the child ended early (rc {child.poll()})"
            if line.startswith(mode[:-1] if mode.endswith("s") else mode):
                lines.append(line.split())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(WAIT_S)
    return lines


@pytest.mark.timeout(120)
def test_sigkill_amid_groups_leaves_each_group_whole(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    acked = _kill_child(db, "groups", 40)
    report = audit_ledger(db)  # the audit checks every group is complete and consecutive
    assert report.ok, report.problems[:5]
    with bank.Bank.open(db) as b:
        for line in acked:
            pay = b.find(f"pay-{line[1]}")
            assert pay is not None and pay.seq == int(line[2]), f"acknowledged {line} lost"
        # Every group in the ledger is whole: all three keys or none, consecutive.
        n = int(acked[-1][1]) + 5
        for g in range(1, n):
            found = [b.find(f"{k}-{g}") for k in ("pay", "auth", "fee")]
            if found[0] is None:
                assert found == [None, None, None], f"group {g} is partly in the ledger"
                continue
            seqs = [r.seq for r in found if r is not None]
            assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2], found
            assert {(r.link_first, r.link_count) for r in found if r} == {(seqs[0], 3)}
        assert b.snapshot().total == 0


@pytest.mark.timeout(120)
def test_sigkill_amid_holds_with_deadlines_expires_them_at_reopen(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    _kill_child(db, "hold", 30)
    later = ManualClock(time.time_ns() // 1000 + 10_000_000)  # every deadline has passed
    with bank.Bank.open(db, clock=later) as b:
        deadline = time.monotonic() + WAIT_S
        while b.account(b.account_named("a").id).held:
            assert time.monotonic() < deadline, "watchdog: holds never expired after reopen"
            time.sleep(0.005)
        snap = b.snapshot()
    rows = LedgerDb.sqlite(db).query(
        "SELECT h.seq, h.expires_us, s.kind, s.ts_us FROM transfers h "
        "LEFT JOIN transfers s ON s.hold_seq = h.seq WHERE h.kind = 'hold'"
    )
    assert rows, "no holds were written"
    for seq, expires_us, kind, ts_us in rows:
        assert kind in ("post", "expire"), f"hold {seq} was left pending"
        if kind == "post":
            assert ts_us < expires_us, f"hold {seq} was posted after its deadline"
        else:
            assert ts_us >= expires_us, f"hold {seq} expired early"
    assert snap.total == 0
    report = audit_ledger(db)
    assert report.ok, report.problems[:5]


# -- tampering with the new columns ---------------------------------------------------------


def _tamper_ledger(ledger_db: LedgerDb) -> dict[str, int]:
    """A ledger with every new kind of row: a group, a hold posted in part, one voided,
    one expired, one pending with a deadline, a closed account. Returns their seqs."""
    clock = ManualClock()
    with bank.Bank.open(ledger_db.db, clock=clock) as b:
        alice = b.open_account("alice").id
        shop = b.open_account("shop").id
        gone = b.open_account("gone").id
        b.deposit(alice, 1_000)
        group = b.transact(
            [
                bank.Transfer(source=alice, target=shop, amount=10),
                bank.Deposit(account=shop, amount=5),
            ]
        )
        posted = b.hold(alice, shop, 100)
        post = b.post(posted.seq, 40)
        voided = b.hold(alice, shop, 50)
        b.void(voided.seq)
        expired = b.hold(alice, shop, 30, expires_s=1)
        pending = b.hold(alice, shop, 20, expires_s=3600)
        clock.advance(2)
        deadline = time.monotonic() + WAIT_S
        while b.account(alice).held != 20:
            assert time.monotonic() < deadline, "watchdog: the hold never expired"
            time.sleep(0.005)
        b.close_account(gone)
        b.open_account("after")  # the close is not the chain's last event
        assert b.audit().ok
    return {
        "group": group[0].seq,
        "post": post.seq,
        "posted": posted.seq,
        "expired": expired.seq,
        "pending": pending.seq,
        "gone": gone,
        "alice": alice,
    }


TAMPERS: list[tuple[str, str]] = [
    ("hold_seq of a post", "UPDATE transfers SET hold_seq = {pending} WHERE seq = {post}"),
    ("hold_seq dropped", "UPDATE transfers SET hold_seq = NULL WHERE seq = {post}"),
    ("expires_us moved", "UPDATE transfers SET expires_us = expires_us + 1 WHERE seq = {pending}"),
    ("expires_us dropped", "UPDATE transfers SET expires_us = NULL WHERE seq = {expired}"),
    ("link_first", "UPDATE transfers SET link_first = NULL WHERE seq = {group}"),
    ("link_count", "UPDATE transfers SET link_count = 3 WHERE seq = {group}"),
    ("debit_balance", "UPDATE transfers SET debit_balance = debit_balance + 1 WHERE seq = {post}"),
    ("credit_balance", "UPDATE transfers SET credit_balance = credit_balance - 1 WHERE seq = {posted}"),
    ("a post's amount", "UPDATE transfers SET amount = 101 WHERE seq = {post}"),
    ("a hold's kind", "UPDATE transfers SET kind = 'transfer' WHERE seq = {pending}"),
    ("close event removed", "DELETE FROM account_events WHERE kind = 'close'"),
    ("close event's account", "UPDATE account_events SET account_id = {alice} WHERE kind = 'close'"),
]  # fmt: skip


@pytest.fixture(scope="module")
def tamper_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tamper") / "ledger.db"
    seqs = _tamper_ledger(LedgerDb.sqlite(path))
    (path.parent / "seqs").write_text(repr(seqs))
    return path


@pytest.mark.parametrize(("what", "sql"), TAMPERS, ids=[t[0] for t in TAMPERS])
def test_the_audit_finds_an_edit_of_the_new_columns(
    tamper_template: Path, tmp_path: Path, what: str, sql: str
) -> None:
    seqs: dict[str, int] = eval((tamper_template.parent / "seqs").read_text())
    path = tmp_path / "ledger.db"
    path.write_bytes(tamper_template.read_bytes())
    ledger = LedgerDb.sqlite(path)
    ledger.execute(sql.format(**seqs))
    report = audit_ledger(path)
    assert not report.ok, f"the audit missed: {what}"


#: Edits and their undoing, for one PostgreSQL ledger (each database costs a second).
PG_TAMPERS: list[tuple[str, str, str]] = [
    ("expires_us", "UPDATE transfers SET expires_us = expires_us + 1 WHERE seq = {pending}",
     "UPDATE transfers SET expires_us = expires_us - 1 WHERE seq = {pending}"),
    ("hold_seq", "UPDATE transfers SET hold_seq = {pending} WHERE seq = {post}",
     "UPDATE transfers SET hold_seq = {posted} WHERE seq = {post}"),
    ("link_count", "UPDATE transfers SET link_count = 3 WHERE seq = {group}",
     "UPDATE transfers SET link_count = 2 WHERE seq = {group}"),
    ("debit_balance", "UPDATE transfers SET debit_balance = debit_balance + 1 WHERE seq = {post}",
     "UPDATE transfers SET debit_balance = debit_balance - 1 WHERE seq = {post}"),
]  # fmt: skip


def test_the_audit_finds_edits_of_the_new_columns_on_postgres(pg_url: str) -> None:
    ledger_db = LedgerDb("postgres", pg_url, pg_url)
    seqs = _tamper_ledger(ledger_db)
    for what, edit, undo in PG_TAMPERS:
        ledger_db.execute(edit.format(**seqs))
        assert not audit_ledger(ledger_db.db).ok, f"the audit missed: {what}"
        ledger_db.execute(undo.format(**seqs))
        report = audit_ledger(ledger_db.db)
        assert report.ok, (what, report.problems[:3])
