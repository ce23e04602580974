"""Which file a SQLite ledger URL names, resolved as SQLite resolves it, and the URLs refused."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

from sqlalchemy.engine import URL

from bank.errors import UnsupportedLedgerUrl


def sqlite_path(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None for another backend or `:memory:` (no URI
    resolution: `resolve_sqlite_target` says which file SQLite really opens)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


#: Query parameters SQLAlchemy hands to the `sqlite3` driver itself, not to SQLite.
_DRIVER_OPTIONS = frozenset(
    {"timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements"}
)
#: SQLite URI parameters that still give a durable, locked, single-writer file; any other
#: (`mode=ro|memory`, `immutable`, `nolock`, `vfs`, `cache=shared`, ...) is refused.
_URI_PARAMETERS_OK: dict[str, frozenset[str] | None] = {
    "mode": frozenset({"rw", "rwc"}),
    "cache": frozenset({"private"}),
    "psow": None,
}


class SqliteTarget:
    """The file SQLite will open for a ledger URL, resolved the way SQLite resolves it.

    `engine_url` names that file by its absolute path (no URI), so the engine opens
    exactly the file the owner lock is taken on; `create` is False for `mode=rw`.
    """

    def __init__(self, path: Path, engine_url: URL, *, create: bool) -> None:
        self.path = path
        self.engine_url = engine_url
        self.create = create


def _refuse(shown: str, why: str) -> UnsupportedLedgerUrl:
    return UnsupportedLedgerUrl(f"{shown}: {why}; a ledger needs a durable file with locking")


def _uri_path(uri: str, shown: str) -> tuple[str, bool]:
    """(file name, may create) of an SQLite `file:` URI, as sqlite3_open_v2 parses it."""
    rest = uri[len("file:") :].partition("#")[0]
    name, _, query = rest.partition("?")
    if name.startswith("//"):
        authority, slash, tail = name[2:].partition("/")
        if authority not in ("", "localhost"):
            raise _refuse(shown, f"the URI names a remote host {authority!r}")
        name = slash + tail
    create = True
    for item in query.split("&"):
        if not item:
            continue
        key, _, value = (unquote(part) for part in item.partition("="))
        if key not in _URI_PARAMETERS_OK:
            raise _refuse(shown, f"the SQLite URI parameter {key}={value} is not allowed")
        allowed = _URI_PARAMETERS_OK[key]
        if allowed is not None and value not in allowed:
            raise _refuse(shown, f"the SQLite URI parameter {key}={value} is not allowed")
        if key == "mode":
            create = value == "rwc"
    return unquote(name), create


def resolve_sqlite_target(url: URL) -> SqliteTarget | None:
    """Where a SQLite ledger URL really points; None for another backend.

    Resolves `file:` URIs (percent-decoding, `//localhost`, relative to the current
    directory) as SQLite does, with or without `?uri=true` (this SQLite is built with
    `SQLITE_USE_URI`). Raises `UnsupportedLedgerUrl` for an in-memory or temporary
    database, a URI parameter that weakens durability or locking, or another driver.
    """
    if url.get_backend_name() != "sqlite":
        return None
    shown = unquote(url.render_as_string(hide_password=True))
    if url.get_driver_name() != "pysqlite":
        raise _refuse(shown, f"the driver {url.get_driver_name()!r} is not supported")
    database = url.database or ""
    driver_query = {k: v for k, v in url.query.items() if k in _DRIVER_OPTIONS}
    extra = {k: v for k, v in url.query.items() if k not in _DRIVER_OPTIONS and k != "uri"}
    uri_flag = str(url.query.get("uri", "false")).lower() in ("true", "1", "yes", "on")
    if extra and not uri_flag:
        raise _refuse(shown, f"query parameters {sorted(extra)} need ?uri=true and are not allowed")
    create = True
    if database.startswith("file:"):
        if extra:
            database += ("&" if "?" in database else "?") + "&".join(
                f"{k}={v}" for k, v in sorted(extra.items()) if isinstance(v, str)
            )
        database, create = _uri_path(database, shown)
    elif extra:
        raise _refuse(shown, f"query parameters {sorted(extra)} are not allowed")
    if database in ("", ":memory:"):
        raise _refuse(shown, "an in-memory or temporary database is not durable")
    path = Path(os.path.abspath(Path(database).expanduser()))
    engine_url = URL.create(url.drivername, database=str(path), query=driver_query)
    return SqliteTarget(path, engine_url, create=create)
