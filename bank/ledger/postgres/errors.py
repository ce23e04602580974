"""psycopg failures at open, as specific `BankError`s (matched on SQLSTATE, then on text:
a failed connection attempt carries no SQLSTATE)."""

from __future__ import annotations

from bank.errors import BankError, CannotOpenLedger, LedgerBusy, LedgerCorrupt


def _driver_error(exc: BaseException) -> BaseException | None:
    """The psycopg exception behind `exc` (raw, or wrapped by SQLAlchemy), or None."""
    orig = getattr(exc, "orig", None) if type(exc).__module__.startswith("sqlalchemy") else exc
    if orig is not None and type(orig).__module__.startswith("psycopg"):
        return orig
    return None


def open_error(exc: BaseException, where: str) -> BankError | None:
    """A one-line `BankError` for a psycopg failure while opening `where`; None otherwise."""
    orig = _driver_error(exc)
    if orig is None:
        return None
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    reason = "; ".join(lines[:2]) if lines else type(orig).__name__
    state = getattr(orig, "sqlstate", None) or ""
    low = reason.lower()
    if (
        state in ("28P01", "28000")
        or "authentication failed" in low
        or "no pg_hba.conf" in low
        or ("role" in low and "does not exist" in low)
    ):
        return CannotOpenLedger(f"{where}: the server refused these credentials ({reason})")
    if state == "3D000" or ("database" in low and "does not exist" in low):
        return CannotOpenLedger(
            f"{where}: the database does not exist on the server; create it first "
            f"(createdb), bank does not create databases ({reason})"
        )
    if "connection refused" in low or "could not connect" in low or "no such file" in low:
        return CannotOpenLedger(
            f"{where}: no PostgreSQL server answers there (is it running, host and port "
            f"right?) ({reason})"
        )
    if "timeout expired" in low or "could not translate host name" in low:
        return CannotOpenLedger(f"{where}: the server cannot be reached ({reason})")
    if state in {"55P03", "40P01"}:
        return LedgerBusy(f"{where}: another session holds a lock the bank needs ({reason})")
    if state == "25006":
        return CannotOpenLedger(
            f"{where}: the server or session is read-only ({reason}); nothing was written"
        )
    if state in ("53100", "53200"):
        return CannotOpenLedger(f"{where}: the server is out of space or memory ({reason})")
    if state.startswith("42") and ("does not exist" in low):
        return LedgerCorrupt(
            f"{where}: part of the ledger's schema is missing ({reason}); run `bank audit`"
        )
    if state == "42501":
        return CannotOpenLedger(f"{where}: this user lacks a privilege the bank needs ({reason})")
    if state.startswith("57P") or state.startswith("08"):
        return CannotOpenLedger(f"{where}: the server closed the connection ({reason})")
    return CannotOpenLedger(f"{where}: PostgreSQL could not open it ({reason})")
