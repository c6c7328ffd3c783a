"""The cohort stage's outputs, read by the shard writer: ``cohort.csv`` and the RLE store.

``masks-rle.h5`` holds the cohort's CheXmask RLE strings (zlib-compressed, row-aligned with
``cohort.csv``) so that shard workers never re-read the multi-GB CheXmask CSV.
"""
from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from ._io import atomic_path
from .sources.chexmask import MASK_NAMES
from .workdir import Workdir


def write_rle(path: Path, df: pd.DataFrame) -> str:
    """The cohort's RLE strings, zlib-compressed, row-aligned with cohort.csv; returns their hash."""
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["dicom_id"] = df["dicom_id"].to_numpy().astype("S")
        f["shape"] = df[["height", "width"]].to_numpy(np.int64)
        vlen = h5py.vlen_dtype(np.uint8)
        for name in MASK_NAMES:
            ds = f.create_dataset(name, (len(df),), dtype=vlen)
            for i, text in enumerate(df[name].astype(str)):
                digest.update(text.encode() + b"\n")
                ds[i] = np.frombuffer(zlib.compress(text.encode(), 1), np.uint8)
    return digest.hexdigest()


def read_rle_rows(path: Path, rows) -> dict[str, dict]:
    """RLE strings and mask shape of the given cohort rows, keyed by dicom_id."""
    out = {}
    rows = np.asarray(rows)
    with h5py.File(path, "r") as f:
        order = np.argsort(rows)
        sel = rows[order]
        ids = f["dicom_id"][sel]
        shapes = f["shape"][sel]
        cols = {n: f[n][sel] for n in MASK_NAMES}
    for k in range(len(order)):
        out[ids[k].decode()] = {"shape": tuple(int(v) for v in shapes[k]),
                                **{n: zlib.decompress(cols[n][k].tobytes()).decode() for n in MASK_NAMES}}
    return out


def load_cohort(work: Workdir) -> pd.DataFrame:
    """The finished cohort table (one row per image); raises unless the cohort stage committed."""
    if not work.cohort_manifest.exists():
        raise FileNotFoundError(f"no finished cohort in {work.cohort_dir}; run `radacx cohort` first")
    return pd.read_csv(work.cohort_csv, dtype={"dicom_id": str})
