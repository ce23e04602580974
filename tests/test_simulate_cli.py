"""`bank simulate`'s load-tool options: --rate, --threshold, --json -, --csv, --interval, --plot."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path

import pytest

from bank.cli import main
from bank.exit_codes import EXIT_OK, EXIT_THRESHOLD, EXIT_USAGE
from bank.simulate.metrics import SAMPLES_MIN

SMALL = ["--tellers", "4", "--window", "8", "--workers", "1", "--accounts", "40", "--seed", "2"]


def _simulate(tmp_path: Path, *argv: str) -> int:
    return main(["simulate", "--db", str(tmp_path / "sim.db"), "--no-progress", *SMALL, *argv])


@pytest.mark.timeout(120)
def test_json_to_stdout_csv_svg_and_thresholds_that_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "70")
    table, svg = tmp_path / "i.csv", tmp_path / "r.svg"
    code = _simulate(
        tmp_path,
        "--ops", "3000",
        "--json", "-",
        "--csv", str(table),
        "--plot", str(svg),
        "--threshold", "errors==0",
        "--threshold", "p99_ms < 600000",
        "--threshold", "rejected_pct<=100",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    doc = json.loads(out)  # stdout holds the JSON document and nothing else
    assert doc["ops"] == 3000 and doc["audit"]["ok"] and doc["model"] == "closed"
    assert doc["thresholds_ok"] is True
    assert [t["expr"] for t in doc["thresholds"]] == [
        "errors==0",
        "p99_ms < 600000",
        "rejected_pct<=100",
    ]
    assert all(t["ok"] for t in doc["thresholds"])
    assert doc["thresholds"][0]["value"] == 0
    # The summary went to stderr, as wide as the 70-column terminal.
    assert "throughput" in err and "pass" in err and "FAIL" not in err
    table_lines = [line for line in err.splitlines() if line[:1] in "┌│├└b"]
    assert len(table_lines) > 20 and max(len(line) for line in table_lines) <= 70, err
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert len(rows) >= SAMPLES_MIN  # a sub-second run still has 20 intervals
    assert sum(int(r["ops"]) for r in rows) == 3000
    assert sum(int(r["committed"]) for r in rows) == doc["committed"]
    rejected = doc["rejected"].get("InsufficientFunds", 0)
    assert sum(int(r.get("rejected_InsufficientFunds", 0)) for r in rows) == rejected
    assert {"t_s", "ops_s", "p50_ms", "p99_ms", "max_ms", "queue_depth"} <= set(rows[0])
    assert len(doc["samples"]) == len(rows)
    head = svg.read_bytes()[:300]
    assert b"<svg" in head or head.startswith(b"<?xml")


@pytest.mark.timeout(120)
def test_an_open_model_run_reports_its_schedule_and_a_failed_threshold_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    png = tmp_path / "r.PNG"
    code = _simulate(
        tmp_path,
        "--rate", "1000:3000",
        "--arrival", "poisson",
        "--duration", "0.6",
        "--interval", "0.1",
        "--json", str(out),
        "--plot", str(png),
        "--threshold", "throughput_ops_s>1e9",
        "--threshold", "dropped_pct<=100",
    )  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == EXIT_THRESHOLD
    assert "FAIL" in stdout and "throughput_ops_s>1e9" in stdout and "late" in stdout
    doc = json.loads(out.read_text())
    assert doc["audit"]["ok"] and doc["model"] == "open" and doc["thresholds_ok"] is False
    assert [t["ok"] for t in doc["thresholds"]] == [False, True]
    schedule = doc["schedule"]
    assert schedule["rate"] == "1000:3000" and schedule["arrival"] == "poisson"
    assert schedule["due"] == schedule["submitted"] + schedule["dropped"]
    assert schedule["submitted"] == doc["ops"]
    assert 0 <= schedule["late"] <= schedule["submitted"]
    assert schedule["latency_from"] == "intended start"
    # One sample per 0.1 s of the run (its 0.6 s, then the drain, longer on a busy machine).
    assert doc["interval_s"] == 0.1
    assert 5 <= len(doc["samples"]) <= round(doc["duration_s"] / 0.1) + 2, doc["duration_s"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "fast"], "not a number of operations per second"),
        (["--rate", "0"], "more than 0"),
        (["--rate", "1:2:3"], "more than one ':'"),
        (["--arrival", "poisson"], "needs --rate"),
        (["--arrival", "bursty"], "invalid choice"),
        (["--threshold", "p99_ms"], "does not parse"),
        (["--threshold", "p95_ms<10"], "unknown figure 'p95_ms'"),
        (["--threshold", "latency<1"], "known: ops, committed, rejected"),
        (["--threshold", "late_pct<1"], "only with --rate"),
        (["--interval", "0"], "must be from 0.01"),
        (["--interval", "soon"], "expected a number of seconds"),
        (["--plot", "r.pdf"], "PNG (.png) or SVG (.svg)"),
        (["--plot", "plot"], "no extension"),
        (["--plot", "-"], "needs a file name"),
        (["--json", "-", "--csv", "-"], "name the same destination"),
        (["--history", "-"], "needs a file"),
    ],
)
def test_bad_load_tool_options_exit_2_naming_the_problem(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "x.db"
    assert main(["simulate", "--db", str(db), *argv]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not db.exists()


def test_outputs_that_cannot_be_written_are_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "x.db"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "gone.json")
    block: Path | None = tmp_path / "blk"
    assert block is not None
    try:
        os.mknod(block, stat.S_IFBLK | 0o600, os.makedev(7, 201))
    except PermissionError:
        block = None
    cases = [
        (["--csv", str(tmp_path / "missing" / "i.csv")], "does not exist"),
        (["--json", str(tmp_path)], "is a directory"),
        (["--json", str(dangling)], "which does not exist"),
        (["--plot", str(tmp_path / "missing" / "p.png")], "does not exist"),
    ]
    if block is not None:
        cases.append((["--json", str(block)], "is a block device"))
    for argv, message in cases:
        assert main(["simulate", "--db", str(db), *argv]) == EXIT_USAGE, argv
        assert message in capsys.readouterr().err, argv
        assert not db.exists()
    assert dangling.is_symlink() and not (tmp_path / "gone.json").exists()
    if block is not None:
        assert stat.S_ISBLK(block.lstat().st_mode)
