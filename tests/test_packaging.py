"""Packaging: what `import bank` loads, the metadata, the extras, and a real `pip install .`.

The slow test builds a fresh venv with a plain `pip install .` (no extras, from the package
index): the installed package creates, fills and audits a ledger without rich, numpy,
matplotlib or hdrhistogram, and `bank simulate` says how to install them. The fast tests
check the same code paths in this venv with those modules blocked at import.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import venv
from importlib.metadata import metadata, requires, version
from pathlib import Path

import pytest

import bank
from bank.ledger.migrate import head_revision

ROOT = Path(__file__).resolve().parent.parent
EXTRA_MODULES = ("rich", "numpy", "matplotlib", "hdrh")

#: Makes the simulate extra's modules unimportable, as in a venv without `bank[simulate]`.
BLOCK_EXTRAS = f"""
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRA_MODULES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Blocked())
"""


def _run(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_import_bank_loads_neither_the_cli_nor_the_simulator_nor_alembic(tmp_path: Path) -> None:
    done = _run("import bank, json, sys; print(json.dumps(sorted(sys.modules)))", tmp_path)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    for name in ("bank.cli", "bank.simulate", "alembic", *EXTRA_MODULES):
        assert not {m for m in loaded if m == name or m.startswith(name + ".")}, name


def test_the_metadata_names_only_the_engines_dependencies() -> None:
    base = {
        re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower()
        for r in requires("bank") or []
        if "extra ==" not in r
    }
    assert base == {"sqlalchemy", "alembic", "pydantic"}
    info = metadata("bank")
    assert set(info.get_all("Provides-Extra") or []) >= {"simulate", "postgres", "dev"}
    assert info["License-Expression"] and info["Summary"] and info["Requires-Python"]
    assert any(c.startswith("Typing :: Typed") for c in info.get_all("Classifier") or [])
    assert bank.__version__ == version("bank") == info["Version"]


def test_without_the_simulate_extra_the_engine_and_ledger_commands_work(tmp_path: Path) -> None:
    script = (
        BLOCK_EXTRAS
        + """
import bank
from bank.cli import main
db = sys.argv[1]
with bank.Bank.open(db) as b:
    a = b.open_account("a").id
    b.deposit(a, 5_00)
    assert b.audit().ok
for argv in (["init", "--db", db], ["accounts", "--db", db, "--format", "table"],
             ["history", "a", "--db", db, "--format", "table"], ["audit", "--db", db]):
    assert main(argv) == 0, argv
print("simulate exit", main(["simulate", "--ops", "10"]))
"""
    )
    done = _run(script, tmp_path, str(tmp_path / "ledger.db"))
    assert done.returncode == 0, done.stderr
    assert "audit of" in done.stdout and "CLEAN" in done.stdout and "5.00" in done.stdout
    assert "simulate exit 2" in done.stdout
    hint = done.stderr.strip().splitlines()
    assert len(hint) == 1 and "pip install 'bank[simulate]'" in hint[0], done.stderr


def test_mypy_finds_the_installed_bank_from_anywhere(tmp_path: Path) -> None:
    """The venv's editable install is a plain path entry that mypy follows (not an import
    hook, which static tools cannot run): its module finder resolves `bank` to a typed
    package from a directory outside the checkout."""
    script = """
import sys
from mypy.modulefinder import FindModuleCache, SearchPaths, get_search_dirs
from mypy.options import Options
sys_path, site_packages = get_search_dirs(sys.executable)
paths = SearchPaths((), (), tuple(sys_path) + tuple(site_packages), ())
found = FindModuleCache(paths, None, Options()).find_module("bank")
print(found)
"""
    done = _run(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(ROOT / "bank" / "__init__.py"), done.stdout
    assert (ROOT / "bank" / "py.typed").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mypy_strict_passes_on_a_users_program(tmp_path: Path) -> None:
    program = tmp_path / "user.py"
    program.write_text(
        "import bank\n\n\n"
        "def pay(b: bank.Bank, account: int) -> int:\n"
        "    receipt: bank.Receipt = b.deposit(account, 5)\n"
        "    return receipt.seq\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(program)],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout + done.stderr


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
    # No extras: the simulator's and rich output's modules are not installed at all.
    absent = subprocess.run(
        [
            python,
            "-c",
            f"import importlib.util as u; print([m for m in {EXTRA_MODULES!r} if u.find_spec(m)])",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert absent.stdout.strip() == "[]"
    simulate = subprocess.run(
        [env_dir / "bin" / "bank", "simulate", "--ops", "10"],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert simulate.returncode == 2 and "bank[simulate]" in simulate.stderr, simulate.stderr
    cli = subprocess.run(
        [env_dir / "bin" / "bank", "audit", "--db", str(tmp_path / "ledger.db")],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr
