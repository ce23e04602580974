"""One head value pins both hash chains: a row deleted from, appended to or re-hashed at the end
of `transfers` or of `account_events` is a `head_mismatch` against it, and a bare transfers hash
(which would leave the events unpinned) is refused as a bad argument."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

import bank
from bank.cli import main
from bank.errors import CannotAudit, InvalidExpectedHead
from bank.ledger.audit import AuditReport, audit_ledger
from bank.ledger.audit_report import run_audit_command
from bank.ledger.head import parse_head
from tests.audit_ledgers import copy_ledger, edit, kinds, rechain

HEAD = re.compile(r"\d+:[0-9a-f]{64}/\d+:[0-9a-f]{64}")


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small engine-built ledger whose last account event is a limit change of bob's."""
    path = tmp_path_factory.mktemp("heads") / "clean.db"
    with bank.Bank.open(path, durability="normal") as b:
        alice = b.open_account("alice", overdraft_limit=100)
        bob = b.open_account("bob")
        for n in range(20):
            b.deposit(alice.id, 1_000 + n, key=f"dep-{n}")
            b.transfer(alice.id, bob.id, 10 + n)
        b.set_overdraft_limit(bob.id, 500)
    return path


@pytest.fixture
def ledger(clean: Path, tmp_path: Path) -> Path:
    return copy_ledger(clean, tmp_path / "ledger.db")


@pytest.fixture
def pin(clean: Path) -> str:
    """The head recorded from the clean ledger, as an auditor keeps it."""
    return audit_ledger(clean).head


def _mismatches(report: AuditReport) -> list[tuple[int | None, int | None, str]]:
    return [(p.seq, p.event_seq, p.message) for p in report.problems if p.kind == "head_mismatch"]


def test_head_is_one_value_for_both_chains(ledger: Path, pin: str) -> None:
    report = audit_ledger(ledger)
    assert report.ok and HEAD.fullmatch(report.head)
    assert report.head == (
        f"{report.seq}:{report.head_hash}/{report.accounts_seq}:{report.accounts_head_hash}"
    )
    assert report.as_dict()["head"] == report.head == pin
    pinned = audit_ledger(ledger, expect_head=pin)
    assert pinned.ok and pinned.expect_head == pin
    assert audit_ledger(ledger, expect_head=f"  {pin}\n").ok  # as `$(...)` or a file hands it over


def test_last_event_deleted_is_caught_only_by_the_pin(ledger: Path, pin: str) -> None:
    with edit(ledger) as conn:
        last, account = conn.execute(
            "SELECT seq, account_id FROM account_events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        conn.execute("DELETE FROM account_events WHERE seq = ?", (last,))
        # The forger puts the account's limit back to what the remaining events say.
        conn.execute("UPDATE accounts SET overdraft_limit = 0 WHERE id = ?", (account,))
    assert audit_ledger(ledger).ok  # the chain alone cannot see a shortened tail
    report = audit_ledger(ledger, expect_head=pin)
    assert kinds(report) == {"head_mismatch"}
    [(seq, event_seq, message)] = _mismatches(report)
    assert (seq, event_seq) == (None, last - 1)
    assert "account_events" in message and f"pinned row {last} is gone" in message


def test_forged_event_appended_with_its_hash_is_caught_by_the_pin(ledger: Path, pin: str) -> None:
    with edit(ledger) as conn:
        last, transfer_seq = conn.execute(
            "SELECT seq, transfer_seq FROM account_events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        conn.execute(
            "INSERT INTO account_events (seq, account_id, kind, name, overdraft_limit, "
            "transfer_seq, ts_us, hash) VALUES (?, 1, 'limit', 'alice', 1000000, ?, 1, '')",
            (last + 1, transfer_seq),
        )
        conn.execute("UPDATE accounts SET overdraft_limit = 1000000 WHERE id = 1")
        rechain(conn)
    assert audit_ledger(ledger).ok  # a correctly chained new event: only the pin can tell
    report = audit_ledger(ledger, expect_head=pin)
    assert kinds(report) == {"head_mismatch"}
    [(seq, event_seq, message)] = _mismatches(report)
    assert (seq, event_seq) == (None, last + 1)
    assert f"1 row(s) after the pinned seq {last}" in message


def test_last_event_edited_and_rehashed_is_caught_by_the_pin(ledger: Path, pin: str) -> None:
    with edit(ledger) as conn:
        last, account = conn.execute(
            "SELECT seq, account_id FROM account_events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        conn.execute("UPDATE account_events SET overdraft_limit = 50000 WHERE seq = ?", (last,))
        conn.execute("UPDATE accounts SET overdraft_limit = 50000 WHERE id = ?", (account,))
        rechain(conn)
    assert audit_ledger(ledger).ok
    report = audit_ledger(ledger, expect_head=pin)
    assert kinds(report) == {"head_mismatch"}
    [(seq, event_seq, message)] = _mismatches(report)
    assert (seq, event_seq) == (None, last)
    assert f"row at the pinned seq {last} has another hash" in message


def test_last_transfer_deleted_and_both_chains_moved(ledger: Path, pin: str) -> None:
    with edit(ledger) as conn:
        seq, debit, credit, amount = conn.execute(
            "SELECT seq, debit_account_id, credit_account_id, amount FROM transfers "
            "ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        conn.execute("DELETE FROM transfers WHERE seq = ?", (seq,))
        conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, debit))
        conn.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, credit))
        conn.execute(
            "UPDATE account_events SET transfer_seq = ? WHERE transfer_seq >= ?", (seq - 1, seq)
        )
        conn.execute("UPDATE account_events SET ts_us = ts_us + 1 WHERE seq = 2")
        rechain(conn)
    assert audit_ledger(ledger).ok
    report = audit_ledger(ledger, expect_head=pin)
    found = {(s, e) for s, e, _ in _mismatches(report)}
    events = audit_ledger(ledger).accounts_seq
    assert found == {(seq - 1, None), (None, events)}


def test_a_bare_transfers_hash_is_refused(ledger: Path) -> None:
    report = audit_ledger(ledger)
    with pytest.raises(InvalidExpectedHead, match="pins only the transfers chain"):
        audit_ledger(ledger, expect_head=report.head_hash)
    assert issubclass(InvalidExpectedHead, CannotAudit)
    err = io.StringIO()
    code = run_audit_command(
        str(ledger), as_json=False, expect_head=report.head_hash, out=io.StringIO(), err=err
    )
    assert code == 2 and "SEQ:HASH/EVENT_SEQ:EVENT_HASH" in err.getvalue()
    out = io.StringIO()
    assert run_audit_command(str(ledger), as_json=True, expect_head=report.head_hash, out=out) == 2
    assert "bare transfers hash" in json.loads(out.getvalue())["error"]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "head",
        "12:" + "a" * 64,
        "12:" + "A" * 64 + "/3:" + "a" * 64,
        "12:" + "a" * 63 + "/3:" + "a" * 64,
        "-1:" + "a" * 64 + "/3:" + "a" * 64,
        "012:" + "a" * 64 + "/3:" + "a" * 64,
        "99999999999999999999:" + "a" * 64 + "/3:" + "a" * 64,
        "12:" + "a" * 64 + "/3:" + "a" * 64 + "/4:" + "a" * 64,
    ],
)
def test_malformed_heads_are_refused_before_the_file_is_read(tmp_path: Path, value: str) -> None:
    with pytest.raises(InvalidExpectedHead):
        audit_ledger(tmp_path / "does-not-exist.db", expect_head=value)


def test_parse_head_round_trips() -> None:
    text = "12:" + "a" * 64 + "/0:" + "0" * 64
    head = parse_head(text)
    assert (head.seq, head.event_seq) == (12, 0) and str(head) == text


def test_command_prints_the_head_and_takes_it_back(
    ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "--db", str(ledger)]) == 0
    text = capsys.readouterr().out
    printed = HEAD.search(text)
    assert printed is not None
    assert main(["audit", "--db", str(ledger), "--json", "--expect-head", printed.group()]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["head"] == data["expect_head"] == printed.group()
    with edit(ledger) as conn:
        conn.execute("UPDATE account_events SET overdraft_limit = 7 WHERE seq = 2")
        conn.execute("UPDATE accounts SET overdraft_limit = 7 WHERE id = 1")
        rechain(conn)
    assert main(["audit", "--db", str(ledger)]) == 0
    capsys.readouterr()
    assert main(["audit", "--db", str(ledger), "--expect-head", printed.group()]) == 1
    assert "head_mismatch" in capsys.readouterr().out
