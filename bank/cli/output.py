"""Rows out of `bank accounts` and `bank history`: a table, JSON, CSV or JSON lines, streamed.

Every format writes each row as it comes and keeps nothing but the current row (and, for
the table, the first page that sizes its columns), so a million-row history prints in
seconds with flat memory. The default is a table on a terminal and JSON otherwise, as
sqlite-utils does: a pipe or a file gets something a program can read.

- `json`: one array, one object per line (`[{...},\\n {...}]`), amounts in minor units;
- `nl`: newline-delimited JSON, one object per line, nothing around them (`jq -c`, JSON lines);
- `csv`: a header row, then one row per record (RFC 4180, `\\r\\n` line ends as the `csv`
  module writes them), amounts in minor units, an absent key empty;
- `table`: aligned columns for people, amounts in major units, fitted to the terminal's
  width (long names and keys are shortened with `…`; numbers never are).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Final, TextIO

#: The choices of `--format`.
FORMATS: Final = ("table", "json", "csv", "nl")
#: Rows a table reads before it fixes its column widths (wider values later widen them).
TABLE_SAMPLE_ROWS: Final = 1000
#: A shortened column keeps at least this many characters.
TABLE_COLUMN_MIN: Final = 6
_GAP: Final = "  "


def choose_format(requested: str | None, out: TextIO) -> str:
    """`--format`, or by default a table on a terminal and JSON into a pipe or file."""
    if requested is not None:
        return requested
    return "table" if out.isatty() else "json"


def terminal_width(out: TextIO) -> int | None:
    """The width to fit a table into: the terminal's (COLUMNS wins), None when `out` is not one."""
    if not out.isatty():
        return None
    return shutil.get_terminal_size().columns


def write_json(fields: Sequence[str], rows: Iterable[Sequence[object]], out: TextIO) -> int:
    """A JSON array of objects, one per line, written as the rows come; returns the count."""
    count = 0
    encode = json.JSONEncoder(ensure_ascii=False).encode
    out.write("[")
    for row in rows:
        out.write(("\n " if count == 0 else ",\n ") + encode(dict(zip(fields, row, strict=True))))
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count


def write_nl(fields: Sequence[str], rows: Iterable[Sequence[object]], out: TextIO) -> int:
    """One JSON object per line (JSON lines); returns the count."""
    count = 0
    encode = json.JSONEncoder(ensure_ascii=False).encode
    for row in rows:
        out.write(encode(dict(zip(fields, row, strict=True))) + "\n")
        count += 1
    return count


def write_csv(fields: Sequence[str], rows: Iterable[Sequence[object]], out: TextIO) -> int:
    """A header, then one CSV row per record (None is empty); returns the count."""
    writer = csv.writer(out)
    writer.writerow(fields)
    count = 0
    for chunk in _chunks(rows, TABLE_SAMPLE_ROWS):
        writer.writerows(chunk)
        count += len(chunk)
    return count


@dataclass(frozen=True)
class Column:
    """A table column: its header, alignment, and whether it may be shortened to fit."""

    header: str
    right: bool = False
    flexible: bool = False


def write_table(
    columns: Sequence[Column],
    cells: Iterable[Sequence[str]],
    out: TextIO,
    *,
    width: int | None,
) -> int:
    """Aligned text columns, streamed: the first `TABLE_SAMPLE_ROWS` rows size them; a wider
    value later widens its column from that row on. With a `width`, flexible columns are
    shortened so a line fits in it (a table of fixed columns alone may still be wider).
    Returns the count of rows."""
    rows = iter(cells)
    sample = list(islice(rows, TABLE_SAMPLE_ROWS))
    widths = [len(c.header) for c in columns]
    for row in sample:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    caps = _fit(columns, widths, width)
    out.write(_line(columns, [c.header for c in columns], widths, caps) + "\n")
    out.write(_GAP.join("-" * min(w, cap) for w, cap in zip(widths, caps, strict=True)) + "\n")
    count = 0
    for row in _chain(sample, rows):
        for i, cell in enumerate(row):
            if len(cell) > widths[i] and not columns[i].flexible:
                widths[i] = len(cell)
        out.write(_line(columns, row, widths, caps) + "\n")
        count += 1
    return count


def _fit(columns: Sequence[Column], widths: list[int], width: int | None) -> list[int]:
    """Per column, the most characters it may show: flexible columns give up room, widest
    first, until a line fits `width`."""
    caps = list(widths)
    if width is None:
        return caps
    total = sum(caps) + len(_GAP) * (len(caps) - 1)
    flexible = [i for i, c in enumerate(columns) if c.flexible]
    while total > width and flexible:
        i = max(flexible, key=lambda j: caps[j])
        floor = max(TABLE_COLUMN_MIN, len(columns[i].header))
        if caps[i] <= floor:
            flexible.remove(i)
            continue
        cut = min(caps[i] - floor, total - width)
        caps[i] -= cut
        total -= cut
    return caps


def _line(columns: Sequence[Column], row: Sequence[str], widths: list[int], caps: list[int]) -> str:
    parts = []
    for column, cell, w, cap in zip(columns, row, widths, caps, strict=True):
        shown = min(w, cap) if column.flexible else w
        text = cell if len(cell) <= shown else cell[: shown - 1] + "…"
        parts.append(text.rjust(shown) if column.right else text.ljust(shown))
    return _GAP.join(parts).rstrip()


def _chain(first: list[Sequence[str]], rest: Iterator[Sequence[str]]) -> Iterator[Sequence[str]]:
    yield from first
    yield from rest


def _chunks(rows: Iterable[Sequence[object]], size: int) -> Iterator[list[Sequence[object]]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


#: A writer of machine formats: (fields, rows, out) -> count.
Writer = Callable[[Sequence[str], Iterable[Sequence[object]], TextIO], int]
#: The machine formats' writers, by `--format` name.
WRITERS: Final[dict[str, Writer]] = {"json": write_json, "nl": write_nl, "csv": write_csv}
