"""Each scenario script in scripts/ runs clean at a small size, in-process, under a watchdog."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

#: Each scenario with small-but-meaningful sizes (the defaults are a little larger).
SMALL = {
    "scenario_card_authorisations": [
        *("--customers", "16", "--auths", "5", "--tellers", "6"),
        *("--withdrawers", "2", "--withdrawals", "5", "--expiry", "0.1"),
    ],
    "scenario_hot_merchant": ["--customers", "60", "--payments", "15", "--tellers", "6"],
    "scenario_payday_bank_run": ["--accounts", "40", "--tellers", "6", "--attempts", "3"],
    "scenario_ring": ["--accounts", "12", "--rounds", "8", "--tellers", "12"],
    "scenario_idempotent_retries": ["--ops", "400", "--tellers", "6", "--accounts", "10"],
}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_scenario_runs_clean(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "scenario.db"
    code = _load(name).main([*SMALL[name], "--db", str(db), "--watchdog", "90"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FAIL" not in out
    assert "PASSED" in out and "audit is clean" in out
    assert db.exists()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_scenario_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _load(name).main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--db" in text and "Expectations" in text


def test_scenario_refuses_an_existing_ledger(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    db.write_bytes(b"")
    with pytest.raises(SystemExit, match="exists"):
        _load("scenario_ring").main(["--db", str(db)])


@pytest.mark.timeout(120)
def test_a_scenario_runs_as_a_script_with_a_temporary_ledger() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "scenario_ring.py"), "--rounds", "2", "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASSED" in done.stdout
