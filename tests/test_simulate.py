"""Small real simulations: every op is counted, JSON and PNG are right, Ctrl-C is clean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bank
from bank.cli import main
from bank.simulate.report import result_json
from bank.simulate.runner import SimulationConfig, run_simulation
from bank.simulate.workload import parse_mix, parse_skew

#: The keys DESIGN.md section 3 promises in `--json`.
DESIGN_KEYS = {
    "ops",
    "committed",
    "rejected",
    "duration_s",
    "throughput_ops_s",
    "latency_ms",
    "audit",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(db: Path, **options: object) -> SimulationConfig:
    base: dict[str, object] = {
        "db": str(db),
        "tellers": 4,
        "window": 8,
        "workers": 2,
        "accounts": 40,
        "ops": 2_000,
        "seed": 5,
    }
    base.update(options)
    return SimulationConfig(**base)  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_cli_simulate_writes_json_and_png_and_the_audit_is_clean(tmp_path: Path) -> None:
    db, out, png = tmp_path / "sim.db", tmp_path / "r.json", tmp_path / "r.png"
    code = main(
        [
            "simulate",
            "--db", str(db),
            "--ops", "3000",
            "--tellers", "6",
            "--accounts", "60",
            "--seed", "11",
            "--skew", "zipf:1.1",
            "--json", str(out),
            "--plot", str(png),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc.keys() >= DESIGN_KEYS
    assert doc["ops"] == 3000
    assert doc["committed"] + sum(doc["rejected"].values()) == doc["ops"]
    assert set(doc["rejected"]) <= {"InsufficientFunds"}
    assert 0 < sum(doc["rejected"].values()) < 0.3 * doc["ops"]
    assert set(doc["latency_ms"]) >= {"p50", "p90", "p99", "max"}
    lat = doc["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert doc["duration_s"] > 0
    assert doc["throughput_ops_s"] == pytest.approx(doc["ops"] / doc["duration_s"], rel=1e-3)
    assert doc["audit"]["ok"] is True and doc["audit"]["problems"] == []
    assert doc["seed"] == 11 and doc["skew"] == "zipf:1.1" and doc["tellers"] == 6
    assert 0 < doc["queue_high_water"] <= doc["queue_capacity"]
    assert doc["total_balance"] == 0
    assert doc["samples"], "the observer took at least one sample"
    assert sum(doc["per_teller_ops"]) == 3000
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 10_000
    assert main(["audit", "--db", str(db)]) == 0


@pytest.mark.timeout(120)
def test_window_one_waits_for_every_answer(tmp_path: Path) -> None:
    result = run_simulation(_config(tmp_path / "w1.db", window=1, ops=600))
    assert result.ok and result.exit_code() == 0
    assert result.ops == 600 == result.totals.committed + result.totals.rejected_total
    assert result.per_teller_ops == [150, 150, 150, 150]
    # Four tellers, one operation each in flight: the queue never holds more than four.
    assert result.queue_high_water <= 4


@pytest.mark.timeout(120)
def test_duration_ends_the_run(tmp_path: Path) -> None:
    result = run_simulation(_config(tmp_path / "d.db", ops=None, duration_s=1.5))
    assert result.ok
    assert result.ops > 0
    assert result.ops == result.totals.committed + result.totals.rejected_total
    assert 1.4 <= result.duration_s < 10
    assert result.samples and result.samples[-1].completed == result.ops
    assert result_json(result)["requested_duration_s"] == 1.5


@pytest.mark.timeout(120)
def test_same_seed_same_commands_per_teller_in_a_real_run(tmp_path: Path) -> None:
    """Threads interleave differently every run; each teller's command sequence does not."""
    first = run_simulation(_config(tmp_path / "a.db", seed=123), keep_commands=True)
    again = run_simulation(_config(tmp_path / "b.db", seed=123), keep_commands=True)
    other = run_simulation(_config(tmp_path / "c.db", seed=124), keep_commands=True)
    assert first.commands is not None and again.commands is not None
    assert other.commands is not None
    assert first.commands == again.commands
    assert [len(c) for c in first.commands.values()] == [500] * 4
    assert first.commands != other.commands


@pytest.mark.timeout(120)
def test_a_reused_ledger_keeps_its_accounts_and_stays_clean(tmp_path: Path) -> None:
    db = tmp_path / "reuse.db"
    run_simulation(_config(db, ops=500))
    second = run_simulation(_config(db, ops=500, mix=parse_mix("deposit=1,withdraw=1")))
    assert second.ok
    with bank.Bank.open(db) as b:
        assert len(b.accounts()) == 40
        assert b.snapshot().total == 0


@pytest.mark.timeout(120)
def test_only_deposits_and_a_skewed_mix_work(tmp_path: Path) -> None:
    result = run_simulation(
        _config(tmp_path / "dep.db", mix=parse_mix("deposit=1"), skew=parse_skew("zipf:3"))
    )
    assert result.ok and result.totals.committed == 2_000


@pytest.mark.parametrize(
    "argv",
    [
        ["--mix", "transfer=80,loan=20"],
        ["--skew", "zipf:0"],
        ["--ops", "10", "--duration", "1"],
        ["--ops", "0"],
        ["--window", "0"],
        ["--tellers", "many"],
        ["--accounts", "1", "--mix", "transfer=1"],
    ],
)
def test_bad_simulate_arguments_exit_2(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--db", str(tmp_path / "x.db"), *argv]) == 2
    assert capsys.readouterr().err.strip()
    assert not (tmp_path / "x.db").exists()


@pytest.mark.timeout(120)
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT semantics")
def test_ctrl_c_stops_cleanly_audits_and_exits_130(tmp_path: Path) -> None:
    db, out = tmp_path / "int.db", tmp_path / "int.json"
    command = [
        sys.executable, "-m", "bank", "simulate",
        "--db", str(db),
        "--duration", "60",
        "--tellers", "4",
        "--accounts", "20",
        "--seed", "1",
        "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # the first progress line: the tellers are running
        if "ops/s" in line:
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stdout + stderr
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is True
    assert doc["ops"] > 0
    assert doc["committed"] + sum(doc["rejected"].values()) == doc["ops"]
    assert doc["audit"]["ok"] is True
    with bank.Bank.open(db) as b:
        # Nothing lost or half-written: every committed op is in the ledger.
        assert b.snapshot().seq == doc["ledger_seq"]
    assert main(["audit", "--db", str(db)]) == 0
