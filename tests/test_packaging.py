"""A plain (non-editable) `pip install .` ships the migrations: the installed package creates ledgers."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

from bank.ledger.migrate import head_revision

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_installed_package_creates_and_audits_a_ledger(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(ROOT)], check=True)
    script = (
        "import bank, pathlib, sys\n"
        "assert 'site-packages' in bank.__file__, bank.__file__\n"
        "p = pathlib.Path(sys.argv[1])\n"
        "with bank.Bank.open(p) as b:\n"
        "    a = b.open_account('a').id\n"
        "    b.deposit(a, 5)\n"
        "    assert b.audit().ok\n"
        "    print(b.revision)\n"
    )
    out = subprocess.run(
        [python, "-c", script, str(tmp_path / "ledger.db")],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the source tree: the installed copy must stand alone
    )
    assert out.stdout.strip() == head_revision()  # every shipped migration ran
    cli = subprocess.run(
        [env_dir / "bin" / "bank", "audit", "--db", str(tmp_path / "ledger.db")],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr
