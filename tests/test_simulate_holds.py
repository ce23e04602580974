"""`bank simulate --mix hold=N,linked=N --hold-expiry S`: holds followed up by their teller,
payments with their fee as one group, and the bad-input twins of each option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bank.cli import main
from bank.exit_codes import EXIT_OK, EXIT_USAGE
from bank.simulate.workload import HoldPlan, LinkedPayment, WorkloadSpec, parse_mix, parse_skew

SMALL = ["--tellers", "4", "--window", "8", "--workers", "1", "--accounts", "20", "--seed", "5"]


@pytest.mark.timeout(120)
def test_holds_and_linked_payments_run_clean_and_are_counted_by_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    argv = ["simulate", "--db", str(tmp_path / "sim.db"), "--no-progress", *SMALL]
    mix = "transfer=20,withdraw=10,hold=50,linked=20"
    code = main([*argv, "--ops", "200", "--mix", mix, "--hold-expiry", "0.05", "--json", "-"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    doc = json.loads(captured.out)
    assert doc["ok"] and doc["audit"]["ok"] and doc["total_balance"] == 0
    assert doc["mix"] == "transfer=20,deposit=0,withdraw=10,hold=50,linked=20"
    assert doc["hold_expiry_s"] == 0.05
    kinds = doc["kinds"]
    assert kinds["hold"] > 0 and kinds["linked"] > 0 and kinds["post"] > 0
    # Quota operations are drawn from the mix; posts and voids follow their holds.
    drawn = sum(n for kind, n in kinds.items() if kind not in ("post", "void"))
    assert drawn == 200
    assert kinds["post"] + kinds.get("void", 0) <= kinds["hold"]
    assert doc["ops"] == sum(kinds.values())
    assert doc["ops"] == doc["committed"] + sum(doc["rejected"].values())
    assert "sent" in captured.err and "holds expire after 0.05 s" in captured.err


def test_the_default_mix_has_no_holds_and_no_expiry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--db", str(tmp_path / "sim.db"), "--no-progress", *SMALL]
    assert main([*argv, "--ops", "60", "--json", "-"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["mix"] == "transfer=80,deposit=10,withdraw=10"
    assert doc["hold_expiry_s"] is None
    assert set(doc["kinds"]) <= {"deposit", "withdrawal", "transfer"}


def test_a_hold_plan_is_seeded_and_its_follow_up_names_the_hold() -> None:
    spec = WorkloadSpec(
        (1, 2, 3), parse_mix("hold=1,linked=1"), parse_skew("uniform"), 9, 1000, hold_expiry_s=2.0
    )
    ops = spec.stream(0).take(200)
    assert ops == spec.stream(0).take(200)
    plans = [op for op in ops if isinstance(op, HoldPlan)]
    fates = {p.fate for p in plans}
    assert fates == {"post", "partial", "void", "expire"}
    for plan in plans:
        assert plan.hold.expires_s == 2.0 and plan.hold.source != plan.hold.target
        follow_up = plan.follow_up(41)
        if plan.fate == "expire":
            assert follow_up is None
        else:
            assert follow_up is not None and follow_up.hold == 41
        if plan.fate == "partial":
            assert plan.post_amount is not None and 1 <= plan.post_amount <= plan.hold.amount
    for payment in (op for op in ops if isinstance(op, LinkedPayment)):
        assert payment.fee.source == payment.payment.source
        assert payment.fee.target != payment.fee.source and payment.fee.amount >= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mix", "hold=10", "--hold-expiry", "0"], "more than 0"),
        (["--mix", "hold=10", "--hold-expiry", "-1"], "more than 0"),
        (["--mix", "hold=10", "--hold-expiry", "soon"], "expected a number of seconds"),
        (["--mix", "hold=10", "--hold-expiry", "nan"], "more than 0"),
        (["--mix", "hold=10", "--hold-expiry", "1e9"], "at most 86400"),
        (["--hold-expiry", "1"], "--hold-expiry needs holds in the mix"),
        (["--mix", "linked=5", "--hold-expiry", "1"], "--hold-expiry needs holds in the mix"),
        (["--mix", "hold=x"], "weight must be a non-negative integer"),
        (["--mix", "hold=1,hold=2"], "given more than once"),
        (["--mix", "escrow=5"], "unknown kind 'escrow'"),
        (["--mix", "hold=1", "--accounts", "1"], "need at least 2 accounts"),
        (["--mix", "hold=1", "--rate", "100"], "closed loop only"),
        (["--mix", "linked=1", "--history", "h.jsonl"], "--history records deposits"),
    ],
)
def test_bad_hold_and_linked_options_exit_2_naming_the_problem(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "x.db"
    assert main(["simulate", "--db", str(db), "--no-progress", *argv]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not db.exists()
