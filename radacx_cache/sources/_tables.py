"""What every table reader here does first: check the header (the columns it reads by name, present
once each) and read through ``read_table``, which names the file and line of an undecodable byte."""
from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import pandas as pd


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")  # -sig: Excel's BOM


def header_of(path: str | Path) -> list[str]:
    """The header row of a ``.csv`` / ``.csv.gz`` table (an empty file: ValueError naming it)."""
    with _open_text(Path(path)) as f:
        row = next(csv.reader(f), None)
    if not row:
        raise ValueError(f"{path}: empty table (no header row)")
    return [c.strip() for c in row]


def require_columns(path: str | Path, columns, what: str = "") -> None:
    """Raise ValueError naming the file, unless the header of ``path`` (``.csv`` or ``.csv.gz``) holds
    every one of ``columns`` exactly once (their order does not matter). A column the reader uses that
    appears twice is refused: which copy is meant cannot be known."""
    header = header_of(path)
    missing = [c for c in columns if c not in header]
    if missing:
        shown = header if len(header) <= 40 else header[:40] + [f"... {len(header) - 40} more"]
        raise ValueError(f"{what}{path}: missing column(s) {missing}; found {shown}")
    twice = [c for c in columns if header.count(c) > 1]
    if twice:
        raise ValueError(f"{what}{path}: column {twice[0]!r} appears {header.count(twice[0])} times in the header; "
                         f"refusing to guess which one is meant")


def first_bad_line(path: str | Path) -> tuple[int, int] | None:
    """(line number, byte) of the first line that is not UTF-8, or None."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return n, line[exc.start]
    return None


def read_table(path: str | Path, **kwargs):
    """``pd.read_csv`` (or its chunk iterator) with an undecodable byte reported as one line that
    names the file and the line."""
    try:  # utf-8-sig: a table saved by Excel starts with a byte-order mark, which is not part of its header
        return pd.read_csv(path, **{"encoding": "utf-8-sig", **kwargs})
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty table (no header row)") from None


def not_utf8(path: str | Path) -> ValueError:
    where = first_bad_line(path)
    at = f", line {where[0]} (byte 0x{where[1]:02x})" if where else ""
    return ValueError(f"{path}{at}: not UTF-8 text; re-encode the table as UTF-8")


def decoded_chunks(reader, path: str | Path):
    """The chunks of a ``read_table(..., chunksize=...)`` reader, an undecodable byte named as above."""
    try:
        yield from reader
    except UnicodeDecodeError:
        raise not_utf8(path) from None
