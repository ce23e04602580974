"""A child process running keyed load is SIGKILLed at random instants, and the reopened ledger still holds every acknowledged operation, an intact hash chain, gapless seqs and balances equal to a replay of `transfers`."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "crash_loop.py"


def _load_crash_loop() -> ModuleType:
    # The harness (child program, kill, independent sqlite3/hashlib checks) lives in
    # scripts/crash_loop.py so that the long crash loop can also be run by hand.
    spec = importlib.util.spec_from_file_location("crash_loop", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("crash_loop", module)
    spec.loader.exec_module(module)
    return module


crash_loop = _load_crash_loop()


def _seed() -> int:
    return int(os.environ.get("BANK_CRASH_SEED") or random.randrange(1, 2**31))


def _run(tmp_path: Path, durability: str, seed: int, iteration: int) -> None:
    workdir = tmp_path / f"{iteration:03d}-{durability}"
    workdir.mkdir()
    try:
        outcome = crash_loop.run_once(workdir, durability, seed)
    except crash_loop.CrashCheckFailed as exc:
        pytest.fail(
            f"durability={durability} seed={seed} (BANK_CRASH_SEED={seed} to retry): {exc}\n"
            f"ledger and ack file kept in {workdir}",
            pytrace=False,
        )
    assert outcome.rows >= outcome.acked


@pytest.mark.timeout(120)
@pytest.mark.parametrize("durability", ["full", "normal"])
def test_sigkill_at_random_instants_loses_nothing_acknowledged(
    tmp_path: Path, durability: str
) -> None:
    seed = _seed()
    for i in range(3):
        _run(tmp_path, durability, seed + i, i)


@pytest.mark.timeout(30)
def test_crash_loop_script_has_help() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0
    assert "--iterations" in result.stdout and "SIGKILL" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_crash_loop_long(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """50 kills, alternating durability. Run with `-m slow` or BANK_SLOW=1."""
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get(
        "BANK_SLOW"
    ):
        pytest.skip("slow: run with -m slow or BANK_SLOW=1")
    seed = _seed()
    for i in range(int(os.environ.get("BANK_CRASH_ITERATIONS", "50"))):
        _run(tmp_path, ("full", "normal")[i % 2], seed + i, i)
