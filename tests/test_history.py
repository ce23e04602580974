"""A recorded `simulate --history` run checks clean, and `check-history` reports every planted fault."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bank import Bank, Deposit, Transfer, Withdrawal
from bank.check_history import HistoryCheck, check_history
from bank.cli import main
from bank.commands import AnyCommand
from bank.errors import CannotCheckHistory, InsufficientFunds, LedgerUnavailable
from bank.records import Receipt
from bank.simulate.history import HistoryRecorder, outcome_fields

Line = dict[str, Any]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One real short simulation with --history: (history file, ledger)."""
    root = tmp_path_factory.mktemp("history")
    db, history = root / "sim.db", root / "sim.jsonl"
    code = main(
        [
            "simulate",
            "--db", str(db),
            "--ops", "3000",
            "--tellers", "4",
            "--window", "8",
            "--accounts", "30",
            "--seed", "21",
            "--history", str(history),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    return history, db


def _lines(history: Path) -> list[Line]:
    return [json.loads(line) for line in history.read_text().splitlines()]


def _write(path: Path, lines: list[Line]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _ops(lines: list[Line], outcome: str | None = None) -> list[Line]:
    return [
        line
        for line in lines
        if line.get("type") == "op" and (outcome is None or line["outcome"] == outcome)
    ]


def _kinds(result: HistoryCheck) -> set[str]:
    return set(result.counts)


def _overwrite_row(db: Path, *, source_seq: int, target_seq: int) -> None:
    """Make the row at `target_seq` a copy of the command at `source_seq` (an edited ledger)."""
    conn = sqlite3.connect(db)
    for (trigger,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        conn.execute(f'DROP TRIGGER "{trigger}"')  # whatever guards the copy: this is a plant
    row = conn.execute(
        "SELECT kind, debit_account_id, credit_account_id, amount FROM transfers WHERE seq = ?",
        (source_seq,),
    ).fetchone()
    conn.execute(
        "UPDATE transfers SET kind = ?, debit_account_id = ?, credit_account_id = ?, amount = ? "
        "WHERE seq = ?",
        (*row, target_seq),
    )
    conn.commit()
    conn.close()


def _cli(history: Path, db: Path, *extra: str) -> int:
    return main(["check-history", str(history), "--db", str(db), *extra])


@pytest.mark.timeout(120)
def test_a_real_recorded_run_checks_clean(
    recorded: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    history, db = recorded
    lines = _lines(history)
    assert lines[0]["format"] == "bank-history" and lines[0]["seed"] == 21
    assert lines[-1]["type"] == "end"
    ops = _ops(lines)
    assert len(ops) == 3000
    assert {op["outcome"] for op in ops} == {"ok", "refused"}
    assert any(line.get("final") for line in lines if line.get("type") == "snapshot")
    capsys.readouterr()
    assert _cli(history, db) == 0
    assert "CONSISTENT" in capsys.readouterr().out
    assert _cli(history, db, "--json") == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ok"] is True and verdict["ops"] == 3000
    # The refusal rule ran on every refusal and found each justified (no false alarm).
    assert verdict["refusals_checked"] == verdict["refused"] > 0


def test_lost_write_an_ok_op_claims_a_seq_the_ledger_lacks(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    history, db = recorded
    lines = _lines(history)
    victim = _ops(lines, "ok")[100]
    victim["seq"] = 10**9
    planted = _write(tmp_path / "h.jsonl", lines)
    result = check_history(planted, db)
    lost = [v for v in result.violations if v.kind == "lost_write"]
    assert [v.op for v in lost] == [f"{victim['teller']}:{victim['n']}"]
    assert lost[0].seq == 10**9
    # Its row is still at its real seq; and its bogus seq does not make the ops after
    # it look out of real-time order or their refusals unjustified.
    assert [v.kind for v in result.violations] == ["lost_write", "duplicate_write"]
    assert _cli(planted, db) == 1


def test_lost_write_an_ok_op_whose_row_is_another_operation(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    history, db = recorded
    lines = _lines(history)
    victim = _ops(lines, "ok")[50]
    victim["amount"] += 1  # the ledger's row at its seq moved a different amount
    result = check_history(_write(tmp_path / "h.jsonl", lines), db)
    assert "lost_write" in _kinds(result)
    assert result.violations[0].seq == victim["seq"]


def test_duplicated_write_an_ok_op_recorded_twice(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    history, db = recorded
    lines = _lines(history)
    twice = _ops(lines, "ok")[7]
    lines.insert(len(lines) - 1, dict(twice))
    planted = _write(tmp_path / "h.jsonl", lines)
    result = check_history(planted, db)
    assert _kinds(result) == {"duplicate_write"}
    assert result.violations[0].op == f"{twice['teller']}:{twice['n']}"
    assert _cli(planted, db) == 1


def test_duplicated_write_the_ledger_has_two_rows_for_one_op(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    history, db = recorded
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    oks = sorted(_ops(_lines(history), "ok"), key=lambda op: op["seq"])
    original, overwritten = oks[200], oks[300]
    _overwrite_row(copy, source_seq=original["seq"], target_seq=overwritten["seq"])
    result = check_history(history, copy)
    dup = [v for v in result.violations if v.kind == "duplicate_write"]
    assert [(v.seq, v.op) for v in dup] == [
        (overwritten["seq"], f"{original['teller']}:{original['n']}")
    ]
    assert "lost_write" in _kinds(result)  # and the op whose row it replaced is lost
    assert _cli(history, copy) == 1


def test_wrong_total_a_snapshot_that_does_not_sum_to_zero(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    history, db = recorded
    lines = _lines(history)
    snapshot = [line for line in lines if line.get("type") == "snapshot"][-1]
    snapshot["balances"]["3"] += 5
    planted = _write(tmp_path / "h.jsonl", lines)
    result = check_history(planted, db)
    assert "wrong_total" in _kinds(result)
    assert _kinds(result) <= {"wrong_total", "snapshot_mismatch", "final_balance"}
    assert _cli(planted, db) == 1


def test_realtime_inversion(recorded: tuple[Path, Path], tmp_path: Path) -> None:
    history, db = recorded
    lines = _lines(history)
    by_seq = {op["seq"]: op for op in _ops(lines, "ok")}
    seq = next(s for s in sorted(by_seq) if s > 500 and s + 1 in by_seq)
    early, late = by_seq[seq], by_seq[seq + 1]
    # `late` (the larger seq) is now acknowledged before `early` is invoked.
    early["invoke"], early["complete"] = late["complete"] + 1, late["complete"] + 2
    planted = _write(tmp_path / "h.jsonl", lines)
    result = check_history(planted, db)
    assert _kinds(result) == {"realtime"}
    first = result.violations[0]
    assert (first.op, first.seq) == (f"{early['teller']}:{early['n']}", seq)
    assert _cli(planted, db) == 1


def test_unjustified_refusal(recorded: tuple[Path, Path], tmp_path: Path) -> None:
    history, db = recorded
    lines = _lines(history)
    refused = [op for op in _ops(lines, "refused") if op["reason"] == "InsufficientFunds"]
    assert len(refused) >= 10
    planted_ops = set()
    for op in refused[:10]:
        op["amount"] = 1  # every customer had at least 1 (they start with 1,000.00)...
        planted_ops.add(f"{op['teller']}:{op['n']}")
    planted = _write(tmp_path / "h.jsonl", lines)
    result = check_history(planted, db)
    assert _kinds(result) == {"unjustified_refusal"}
    flagged = {v.op for v in result.violations}
    # ... unless an account was drained to exactly 0: most of the ten must be caught.
    assert flagged <= planted_ops and len(flagged) >= 5
    assert _cli(planted, db) == 1


def test_a_refusal_of_an_open_account_as_not_found_is_unjustified(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    history, db = recorded
    lines = _lines(history)
    victim = _ops(lines, "refused")[0]
    victim["reason"] = "AccountNotFound"
    result = check_history(_write(tmp_path / "h.jsonl", lines), db)
    assert [v.op for v in result.violations] == [f"{victim['teller']}:{victim['n']}"]
    assert _kinds(result) == {"unjustified_refusal"}


def test_a_refused_op_that_is_in_the_ledger(recorded: tuple[Path, Path], tmp_path: Path) -> None:
    history, db = recorded
    lines = _lines(history)
    victim = _ops(lines, "ok")[30]
    seq = victim.pop("seq")
    del victim["hash"]
    victim.update(outcome="refused", reason="InsufficientFunds")
    result = check_history(_write(tmp_path / "h.jsonl", lines), db)
    written = [v for v in result.violations if v.kind == "refused_written"]
    assert [(v.op, v.seq) for v in written] == [(f"{victim['teller']}:{victim['n']}", seq)]


def test_a_row_no_operation_explains_is_a_phantom_but_an_unknown_op_may_explain_it(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    history, db = recorded
    lines = _lines(history)
    victim = _ops(lines, "ok")[40]
    seq = victim["seq"]
    dropped = [line for line in lines if line is not victim]
    result = check_history(_write(tmp_path / "a.jsonl", dropped), db)
    assert [(v.kind, v.seq) for v in result.violations] == [("phantom_write", seq)]
    # Outcome unknown (the ledger broke while it was in flight): committed once is fine.
    victim.pop("seq"), victim.pop("hash")
    victim.update(outcome="unknown", reason="LedgerUnavailable")
    assert check_history(_write(tmp_path / "b.jsonl", lines), db).ok


def test_an_unknown_op_is_in_the_ledger_at_most_once(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    history, db = recorded
    lines = _lines(history)
    oks = sorted(_ops(lines, "ok"), key=lambda op: op["seq"])
    unknown, overwritten = oks[400], oks[500]
    seq = unknown.pop("seq")
    unknown.pop("hash")
    unknown.update(outcome="unknown", reason="LedgerUnavailable")
    planted = _write(tmp_path / "h.jsonl", lines)
    assert check_history(planted, db).ok  # committed once: consistent
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    _overwrite_row(copy, source_seq=seq, target_seq=overwritten["seq"])
    result = check_history(planted, copy)
    dup = [v for v in result.violations if v.kind == "duplicate_write"]
    assert [v.op for v in dup] == [f"{unknown['teller']}:{unknown['n']}"]


def test_keyed_operations_are_exactly_once(tmp_path: Path) -> None:
    db, history = tmp_path / "k.db", tmp_path / "k.jsonl"
    with Bank.open(db) as b, HistoryRecorder(history, ledger=str(db), seed=0, options={}) as rec:
        alice, shop = b.open_account("alice").id, b.open_account("shop").id
        b.deposit(alice, 500)
        rec.snapshot(b.snapshot)
        log = rec.teller(0)
        commands: list[AnyCommand] = [
            Transfer(source=alice, target=shop, amount=100, key="order-1"),
            Transfer(source=alice, target=shop, amount=100, key="order-1"),  # a retry
            Withdrawal(account=alice, amount=10_000, key="big"),  # refused
            Deposit(account=shop, amount=7, key="order-1"),  # IdempotencyConflict
            Deposit(account=shop, amount=7),
        ]
        for number, command in zip(log.numbers(len(commands)), commands, strict=True):
            invoked = time.monotonic_ns()
            future = b.submit(command)
            future.add_done_callback(partial(log.answered, number, command, invoked))
            future.exception(timeout=30)
        log.flush(force=True)
        rec.snapshot(b.snapshot, final=True)
        rec.end(interrupted=False)
    clean = check_history(history, db)
    assert clean.ok, clean.violations
    assert (clean.acknowledged, clean.refused, clean.refusals_checked) == (3, 2, 2)
    lines = _lines(history)
    retry = _ops(lines)[1]
    assert retry["key"] == "order-1" and retry["outcome"] == "ok"
    retry["seq"] += 1  # the retry claims the row of the next op: the key has two seqs
    result = check_history(_write(tmp_path / "bad.jsonl", lines), db)
    assert "exactly_once" in _kinds(result)


def test_the_recorder_classifies_every_answer() -> None:
    def answered(how: str) -> Future[Receipt]:
        future: Future[Receipt] = Future()
        if how == "cancel":
            future.cancel()
        elif how == "ok":
            future.set_result(Receipt(5, "deposit", None, 9, 0, 1, 0, "ab" * 32))
        else:
            future.set_exception(
                {"refused": InsufficientFunds, "broke": LedgerUnavailable}.get(how, RuntimeError)()
            )
        return future

    def outcome(how: str) -> dict[str, object]:
        parsed: dict[str, object] = json.loads("{" + outcome_fields(answered(how)) + "}")
        return parsed

    assert outcome("ok") == {"outcome": "ok", "seq": 5, "hash": "ab" * 8}
    assert outcome("refused") == {"outcome": "refused", "reason": "InsufficientFunds"}
    assert outcome("broke") == {"outcome": "unknown", "reason": "LedgerUnavailable"}
    assert outcome("other") == {"outcome": "unknown", "reason": "RuntimeError"}
    assert outcome("cancel") == {"outcome": "unknown", "reason": "Cancelled"}


# -- could not check: exit 2, one line ---------------------------------------------------


def _exit_2(capsys: pytest.CaptureFixture[str], history: Path, db: Path) -> str:
    capsys.readouterr()
    assert _cli(history, db) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bank check-history: "), err
    with pytest.raises(CannotCheckHistory):
        check_history(history, db)
    return err


def test_missing_history_file(
    recorded: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "no such history file" in _exit_2(capsys, tmp_path / "nope.jsonl", recorded[1])


def test_truncated_history(
    recorded: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history, db = recorded
    cut = tmp_path / "cut.jsonl"
    data = history.read_bytes()
    # Cut inside a line, half way: moved off a line's end, where a cut leaves whole lines
    # (a run that did not finish, which is checked as such; CI once cut exactly there).
    middle = len(data) // 2
    while data[middle - 1 : middle] == b"\n":
        middle += 1
    cut.write_bytes(data[:middle])
    assert "truncated" in _exit_2(capsys, cut, db)


def test_malformed_line(
    recorded: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history, db = recorded
    lines = history.read_text().splitlines(keepends=True)
    lines[5] = '{"type": "op", "teller": 1\n'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines))
    assert ":6: not a JSON object" in _exit_2(capsys, bad, db)
    op = json.loads(lines[10])
    op["amount"] = "12.50"
    lines[10] = json.dumps(op) + "\n"
    lines[5] = lines[4]
    bad.write_text("".join(lines))
    assert ":11: 'amount' must be an integer" in _exit_2(capsys, bad, db)


def test_not_a_history_and_not_a_ledger(
    recorded: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history, db = recorded
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    assert "not a JSON object" in _exit_2(capsys, text, db)
    assert "not a ledger" in _exit_2(capsys, history, text)
    assert "no such ledger" in _exit_2(capsys, history, tmp_path / "missing.db")


def test_history_of_another_ledger(
    recorded: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history, _ = recorded
    other = tmp_path / "other.db"
    assert main(["simulate", "--db", str(other), "--ops", "300", "--accounts", "30",
                 "--seed", "21", "--no-progress"]) == 0  # fmt: skip
    assert "not the ledger of this history" in _exit_2(capsys, history, other)


# -- the soak (slow tier) ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_200000_operation_history_checks_clean_in_well_under_a_minute(tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "history_soak.py"
    spec = importlib.util.spec_from_file_location("bank_history_soak", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.soak(200_000, tmp_path, 9, [])
    assert figures["ops"] == 200_000
    assert figures["exit_code"] == 0, figures
    assert figures["check_s"] < 60, figures
