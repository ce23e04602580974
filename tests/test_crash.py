"""A child process running keyed load is SIGKILLed at random instants, and the reopened ledger still holds every acknowledged operation, an intact hash chain, gapless seqs and balances equal to a replay of `transfers`."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import LedgerDb
from tests.faults import ForkServer

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


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    """One pre-imported process that forks every child of this module's crash loops."""
    with ForkServer() as s:
        yield s


def _run(
    tmp_path: Path,
    durability: str,
    seed: int,
    iteration: int,
    server: ForkServer | None,
    ledger: LedgerDb | None = None,
) -> Any:
    """One kill-and-check round in a new directory; on PostgreSQL (`ledger`), in a new
    database on the test server, passed to the harness as `db=` (its file is `workdir`'s
    ledger.db otherwise)."""
    workdir = tmp_path / f"{iteration:03d}-{durability}"
    workdir.mkdir()
    fresh = ledger.fresh() if ledger is not None and ledger.backend == "postgres" else None
    where: dict[str, Any] = {} if fresh is None else {"db": fresh.db}
    try:
        outcome = crash_loop.run_once(workdir, durability, seed, server=server, **where)
    except crash_loop.CrashCheckFailed as exc:
        pytest.fail(  # the ledger is kept (a PostgreSQL one until the server stops)
            f"durability={durability} seed={seed} (BANK_CRASH_SEED={seed} to retry): {exc}\n"
            f"ledger and ack file kept in {fresh.db if fresh else workdir}",
            pytrace=False,
        )
    except BaseException:
        if fresh is not None:
            fresh.drop()
        raise
    if fresh is not None:
        fresh.drop()
    assert outcome.rows >= outcome.acked
    return outcome


@pytest.mark.timeout(120)
@pytest.mark.parametrize("durability", ["full", "normal"])
def test_sigkill_at_random_instants_loses_nothing_acknowledged(
    tmp_path: Path, durability: str, server: ForkServer, ledger_db: LedgerDb
) -> None:
    seed = _seed()
    for i in range(5):
        _run(tmp_path, durability, seed + i, i, server, ledger_db)


@pytest.mark.timeout(120)
def test_a_fresh_interpreter_child_is_killed_and_checked_too(tmp_path: Path) -> None:
    """The same round without the fork server (the way `--no-fork-server` runs)."""
    _run(tmp_path, "full", _seed(), 0, None)


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
@pytest.mark.timeout(3600)
def test_crash_loop_long(
    tmp_path: Path, request: pytest.FixtureRequest, server: ForkServer
) -> None:
    """1,000 kills, alternating durability, each round checked by key and by the audit.

    Run with `-m slow` or BANK_SLOW=1; BANK_CRASH_ITERATIONS changes the count.
    """
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get(
        "BANK_SLOW"
    ):
        pytest.skip("slow: run with -m slow or BANK_SLOW=1")
    seed = _seed()
    rounds = int(os.environ.get("BANK_CRASH_ITERATIONS", "1000"))
    started = time.monotonic()
    phases: Counter[str] = Counter()
    acked = in_flight = 0
    for i in range(rounds):
        outcome = _run(tmp_path, ("full", "normal")[i % 2], seed + i, i, server)
        shutil.rmtree(tmp_path / f"{i:03d}-{('full', 'normal')[i % 2]}")
        phases[outcome.phase] += 1
        acked += outcome.acked
        in_flight += outcome.in_flight_committed
    print(
        f"{rounds} kills (seeds {seed}..{seed + rounds - 1}; {dict(phases)}), "
        f"{acked} acknowledged ops checked, 0 lost, {in_flight} committed while unanswered, "
        f"every audit clean, {time.monotonic() - started:.1f} s"
    )
