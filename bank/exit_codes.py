"""Every exit code of the `bank` command line, in one place (DESIGN.md section 3).

A script can tell the outcomes apart: 1 means the command ran and found a problem
(an audit, a history check, a copy whose audit is not clean, a refused operation);
2 means it could not run at all; 3 is a load test that met its goals badly (a
`simulate --threshold` failed) on a ledger that audits clean. Outside the CLI
package so the library's own command helpers (the audit report) use the same values
without importing the command line.
"""

from __future__ import annotations

from typing import Final

#: Success (for `simulate`, `audit` and `copy`: the audit is clean).
EXIT_OK: Final = 0
#: The command ran and found a problem: audit problems, history violations, a copy whose
#: audit is not clean, a refused operation, an unknown account.
EXIT_PROBLEM: Final = 1
#: The command could not run: bad usage, a missing file, a file that is not a ledger, a
#: ledger written by a newer bank or owned by another process, a non-empty copy target.
EXIT_USAGE: Final = 2
#: `simulate`: a `--threshold` failed (the audit was clean; a failed audit exits 1).
EXIT_THRESHOLD: Final = 3
#: Interrupted with Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED: Final = 130

#: The table printed by `bank --help` (one source for the help and the README).
EXIT_CODES_HELP: Final = """\
Exit codes, for every command:
  0    success (for `simulate`, `audit` and `copy`: the audit is clean)
  1    the command ran and found a problem (audit problems, history violations, a
       copy whose audit is not clean, a refused operation, an unknown account)
  2    could not run: usage errors and anything that could not be opened or
       audited (a missing file, a file that is not a ledger, a ledger written by a
       newer bank, a ledger another process has open, a copy into a non-empty store)
  3    `simulate`: a --threshold failed (on a clean audit; a failed audit wins: 1)
  130  interrupted with Ctrl-C (`simulate` still finishes its in-flight work, closes
       the ledger cleanly and audits it; a failed audit wins and exits 1)
"""
