"""Nothing SQLite-specific outside `bank/ledger/sqlite/`, nothing PostgreSQL-specific outside
`bank/ledger/postgres/` (issue 10, acceptance item 4).

Reads the code of every module under `bank/` (names and string literals; comments and
docstrings are prose and may name either database) and looks for each backend's own
names: its driver, its catalog, its SQL dialect, its files, its dialect name. The
shared code reaches a backend only through `bank.ledger.backends.backend_for`, the one
module allowed to name both. The migrations may branch on the dialect (a revision
creates each backend's own schema), but never import a driver or a backend package:
Alembic hands them the connection.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANK = ROOT / "bank"
MIGRATIONS = ROOT / "migrations"


@dataclass(frozen=True)
class Rule:
    what: str
    pattern: re.Pattern[str]
    homes: tuple[Path, ...]  # the only places these names may appear
    strings_only: bool  # a dialect's name is a string; as a variable name it is innocent


def _rule(what: str, pattern: str, *homes: str, strings_only: bool = False) -> Rule:
    return Rule(what, re.compile(pattern), tuple(BANK / "ledger" / h for h in homes), strings_only)


RULES = [
    # SQLite: the driver, the catalog, pragmas, type probes, URI flags, side files,
    # `?` placeholders and its transaction statements, the dialect's name.
    _rule("the sqlite3 driver", r"\bsqlite3\b", "sqlite"),
    _rule("SQLite's catalog", r"\bsqlite_(master|schema|sequence|temp_master)\b", "sqlite"),
    _rule("a PRAGMA", r"(?i)\bpragma\b", "sqlite"),
    _rule("SQLite's typeof()", r"(?i)\btypeof\s*\(", "sqlite"),
    _rule("an SQLite URI flag", r"\b(immutable|mode|nolock|vfs)=(1|ro|rw|rwc|0)\b", "sqlite"),
    _rule("SQLite's side files", r"-(wal|shm|journal)\b", "sqlite"),
    _rule("SQLite's header", r"SQLite format 3", "sqlite"),
    _rule(
        "a ? placeholder",
        r"(=|\(|,|\bIN|\bVALUES|\bLIMIT)\s*\?(?=\s*[,)]|\s*$|\s+(AND|OR|LIMIT|ORDER)\b)",
        "sqlite",
    ),
    _rule("BEGIN IMMEDIATE/EXCLUSIVE", r"(?i)\bBEGIN\s+(IMMEDIATE|EXCLUSIVE|DEFERRED)\b", "sqlite"),
    _rule("a ? placeholder list", r"^\(?\?(\s*,\s*\?)*\)?$", "sqlite", strings_only=True),
    _rule(
        "the sqlite3 connection's internals",
        r"\b(positiontup|in_transaction|getlimit|setlimit|SQLITE_[A-Z_]+)\b",
        "sqlite",
    ),
    # Either backend: transactions driven by literal statements belong in its batch writer.
    _rule(
        "a literal transaction statement",
        r"(?i)^\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE)\b[\w\s]*;?\s*$",
        "sqlite",
        "postgres",
        strings_only=True,
    ),
    _rule("the sqlite dialect", r"^sqlite(\+\w+)?(:|$)", "sqlite", strings_only=True),
    _rule("the SQLite backend package", r"\bbank\.ledger\.sqlite\b", "sqlite"),
    # PostgreSQL: the driver, the catalog and its functions, the dialect's name.
    _rule("the psycopg driver", r"\bpsycopg\w*\b", "postgres"),
    _rule("PostgreSQL's catalog or functions", r"\bpg_\w+", "postgres"),
    _rule("the postgresql dialect", r"^postgres(ql)?(\+\w+)?(:|$)", "postgres", strings_only=True),
    _rule("PostgreSQL's casts", r"::(text|bigint|numeric|regclass|int8)\b", "postgres"),
    _rule("the PostgreSQL backend package", r"\bbank\.ledger\.postgres\b", "postgres"),
]

#: (module, rule) pairs allowed outside the homes, each with why.
ALLOWED: dict[tuple[str, str], str] = {
    # The typed schema of both backends (kept in step with the migrations by `alembic
    # check`): SQLAlchemy's variants and options are keyed by dialect name.
    ("bank/ledger/models.py", "the sqlite dialect"): "with_variant(..., 'sqlite')",
    ("bank/ledger/models.py", "the postgresql dialect"): "with_variant(..., 'postgresql')",
    # `backend_for(url)` picks the implementation: it names both dialects and packages.
    ("bank/ledger/backends.py", "the sqlite dialect"): "picks the backend",
    ("bank/ledger/backends.py", "the postgresql dialect"): "picks the backend",
    ("bank/ledger/backends.py", "the SQLite backend package"): "imports it lazily",
    ("bank/ledger/backends.py", "the PostgreSQL backend package"): "imports it lazily",
    ("bank/ledger/backends.py", "the sqlite3 driver"): "tells a bare cursor's dialect",
    ("bank/ledger/backends.py", "the psycopg driver"): "tells a bare cursor's dialect",
}

#: In migrations: nothing may reach past Alembic's connection.
MIGRATION_RULES = [
    re.compile(r"\bimport\s+(sqlite3|psycopg\w*)\b"),
    re.compile(r"\bfrom\s+(sqlite3|psycopg\w*)\b"),
    re.compile(r"\bbank\.ledger\.(sqlite|postgres)\b"),
]


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            first = body[0] if body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


@dataclass(frozen=True)
class Token:
    line: int
    text: str
    is_string: bool


def code_tokens(path: Path) -> list[Token]:
    """Every name, operator and string literal in `path`, without comments or docstrings;
    a string's text is its value (an f-string's is its source, braces and all)."""
    source = path.read_text()
    docstrings = _docstring_lines(ast.parse(source))
    found: list[Token] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT or tok.start[0] in docstrings:
            continue
        if tok.type == tokenize.STRING:
            try:
                value = str(ast.literal_eval(tok.string))
            except (ValueError, SyntaxError):
                value = re.sub(r"^[rRbBuUfF]*(\'\'\'|\"\"\"|'|\")|('|\")+$", "", tok.string)
            found.append(Token(tok.start[0], value, True))
        elif tok.type in (tokenize.NAME, tokenize.OP):
            found.append(Token(tok.start[0], tok.string, False))
    return found


def _dotted_lines(path: Path) -> list[Token]:
    """Each line's names and operators joined (strings left out), so that
    `bank.ledger.sqlite` and `from bank.ledger import sqlite` are seen whole."""
    by_line: dict[int, list[str]] = {}
    for tok in code_tokens(path):
        if not tok.is_string:
            by_line.setdefault(tok.line, []).append(tok.text)
    joined = []
    for line, parts in sorted(by_line.items()):
        text = " ".join(parts).replace(" . ", ".")
        text = re.sub(r"\bfrom bank\.ledger import (sqlite|postgres)\b", r"bank.ledger.\1", text)
        joined.append(Token(line, text, False))
    return joined


def layout_problems() -> list[str]:
    """Every backend-specific name outside its backend's package, as `path:line: what: text`."""
    problems: list[str] = []
    for path in sorted(BANK.rglob("*.py")):
        module = path.relative_to(ROOT).as_posix()
        items = code_tokens(path) + _dotted_lines(path)
        for rule in RULES:
            if any(path.is_relative_to(h) for h in rule.homes) or (module, rule.what) in ALLOWED:
                continue
            lines = sorted(
                {
                    t.line
                    for t in items
                    if (t.is_string or not rule.strings_only) and rule.pattern.search(t.text)
                }
            )
            problems += [f"{module}:{line}: {rule.what}" for line in lines]
    return problems


def migration_problems() -> list[str]:
    problems: list[str] = []
    for path in sorted(MIGRATIONS.rglob("*.py")):
        for t in _dotted_lines(path):
            if any(p.search(t.text) for p in MIGRATION_RULES):
                problems.append(f"{path.relative_to(ROOT).as_posix()}:{t.line}: {t.text}")
    return problems


def test_each_backend_lives_in_its_own_package() -> None:
    problems = layout_problems()
    assert problems == [], "backend-specific code outside its package:\n" + "\n".join(problems)


def test_migrations_use_only_alembics_connection() -> None:
    problems = migration_problems()
    assert problems == [], "migrations reaching past Alembic:\n" + "\n".join(problems)


def test_the_scanner_sees_what_it_must() -> None:
    """The scanner itself, on a module written for it: it finds code, not prose."""
    sample = ROOT / "tests" / "source_layout_sample.txt"
    assert sample.exists()
    items = code_tokens(sample) + _dotted_lines(sample)
    hits = {
        r.what
        for r in RULES
        for t in items
        if (t.is_string or not r.strings_only) and r.pattern.search(t.text)
    }
    assert hits == {
        "the sqlite3 driver",
        "a PRAGMA",
        "a ? placeholder",
        "a ? placeholder list",
        "a literal transaction statement",
        "the sqlite3 connection's internals",
        "the sqlite dialect",
        "the SQLite backend package",
        "the psycopg driver",
        "PostgreSQL's catalog or functions",
        "the PostgreSQL backend package",
    }
