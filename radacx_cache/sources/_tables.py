"""What every table reader here does first: check the header holds the columns it reads by name."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def require_columns(path: str | Path, columns, what: str = "") -> None:
    """Raise ValueError naming the file, the missing columns and those found, unless the header of
    ``path`` (``.csv`` or ``.csv.gz``) holds every one of ``columns`` (their order does not matter)."""
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{what}{path}: missing column(s) {missing}; found {list(header)}")
