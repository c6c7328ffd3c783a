"""The cohort's files, writer beside reader (docs/cohort.md): ``cohort.csv``, ``rejects.csv``,
``boxes.csv`` (archives with radiologists' boxes) and the RLE store ``masks-rle.h5``. The cohort
stage decides what goes in them; the shard stage reads them through the cohort's verified record.

``masks-rle.h5`` holds the cohort's CheXmask RLE strings (zlib-compressed, row-aligned with
``cohort.csv``) so that shard workers never re-read the multi-GB CheXmask CSV.
"""
from __future__ import annotations

import hashlib
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .._io import spreadsheet_safe, write_csv
from ..sources.chexmask import MASK_NAMES
from ..workdir import Workdir
from .hdf5 import open_checked
from .records import Record, Verifier

REJECT_COLUMNS = ["id", "stage", "reason"]  # rejects.csv of the cohort (the shard stage adds ``retry``)
BOXES_COLUMNS = ["dicom_id", "finding", "x0", "y0", "x1", "y1", "reader"]  # x, y as fractions of the image
_BOXES_FILE = Workdir(".").cohort_boxes.name  # its name inside the cohort folder (and the record's file list)


def row_digest(texts) -> bytes:
    """The identity of one image's three RLE strings (right lung, left lung, heart)."""
    return hashlib.sha256("\n".join(str(t) for t in texts).encode()).digest()


def rle_content_hash(digests) -> str:
    """The hash of a cohort's masks: its rows' digests, in cohort order."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return h.hexdigest()


_BLANK = "\x00"  # a blank CSV cell, told apart from an empty mask ("")


def _compress(text) -> np.ndarray:
    text = _BLANK if text is None or (isinstance(text, float) and text != text) else str(text)
    return np.frombuffer(zlib.compress(text.encode(), 1), np.uint8)


def _decompress(blob: np.ndarray) -> str | None:
    text = zlib.decompress(blob.tobytes()).decode()
    return None if text == _BLANK else text


class RLEStore:
    """``masks-rle.h5`` written chunk by chunk: each appended row gets the next ``rle_row``.

    Holds the zlib-compressed RLE text of every candidate image (in the order the CheXmask table
    lists them; ``cohort.csv``'s ``rle_row`` points into it), so the shard workers never re-read
    the multi-GB CheXmask CSV and the cohort stage never holds all of it in memory.
    """

    def __init__(self, path: Path, threads: int = 2):
        self.file = h5py.File(path, "w")
        self.n = 0
        vlen = h5py.vlen_dtype(np.uint8)
        self.file.create_dataset("dicom_id", (0,), dtype=h5py.string_dtype("ascii"), maxshape=(None,), chunks=(4096,))
        self.file.create_dataset("shape", (0, 2), dtype=np.int64, maxshape=(None, 2), chunks=(4096, 2))
        for name in MASK_NAMES:
            self.file.create_dataset(name, (0,), dtype=vlen, maxshape=(None,), chunks=(1024,))
        self.pool = ThreadPoolExecutor(threads)  # zlib releases the GIL: compression on every core

    def append(self, chunk: pd.DataFrame) -> tuple[np.ndarray, list[bytes]]:
        """Append a chunk's rows in one write per dataset; returns their rle_row numbers and digests."""
        k = len(chunk)
        rows = np.arange(self.n, self.n + k)
        if k == 0:
            return rows, []
        texts = {name: chunk[name].tolist() for name in MASK_NAMES}
        digests = [row_digest(t) for t in zip(*(texts[n] for n in MASK_NAMES))]
        shape = chunk[["height", "width"]].to_numpy(float)
        for name in ("dicom_id", "shape", *MASK_NAMES):
            self.file[name].resize(self.n + k, axis=0)
        self.file["dicom_id"][self.n:] = chunk["dicom_id"].astype(str).tolist()
        self.file["shape"][self.n:] = np.nan_to_num(shape, nan=-1).astype(np.int64)
        for name in MASK_NAMES:
            blobs = np.empty(k, object)
            blobs[:] = list(self.pool.map(_compress, texts[name]))
            self.file[name][self.n:] = blobs
        self.n += k
        return rows, digests

    def close(self) -> None:
        self.pool.shutdown()
        self.file.close()


def read_rle_rows(path: Path, rows) -> dict[str, dict]:
    """RLE strings and mask shape of the given ``rle_row`` numbers, keyed by dicom_id."""
    out = {}
    rows = np.asarray(rows, dtype=np.int64)
    with open_checked(path) as f:
        order = np.argsort(rows)
        sel = rows[order]
        ids = f["dicom_id"][sel]
        shapes = f["shape"][sel]
        cols = {n: f[n][sel] for n in MASK_NAMES}
    for k in range(len(order)):
        key = ids[k].decode() if isinstance(ids[k], bytes) else str(ids[k])
        out[key] = {"shape": tuple(int(v) for v in shapes[k]),
                    **{n: _decompress(cols[n][k]) for n in MASK_NAMES}}
    return out


def cohort_record(work: Workdir, verifier: Verifier | None = None) -> Record:
    """The cohort stage's verified record (its files re-hashed unless unchanged since the last check)."""
    return (verifier or Verifier(work.root)).record(work.cohort_manifest, "cohort")


def load_cohort(work: Workdir, verifier: Verifier | None = None) -> pd.DataFrame:
    """The finished cohort table (one row per image), read only through its verified record."""
    record = cohort_record(work, verifier)
    return pd.read_csv(record.file(work.cohort_csv.name), dtype={"dicom_id": str})


def write_cohort_tables(work: Workdir, cohort: pd.DataFrame, boxes: pd.DataFrame | None,
                        rejects: pd.DataFrame) -> list[Path]:
    """Write ``cohort.csv``, ``boxes.csv`` (only where the archive has boxes; an old one is removed)
    and ``rejects.csv`` (archive text made spreadsheet-safe); returns the files written, for the record."""
    write_csv(work.cohort_csv, cohort)
    files = [work.cohort_csv, work.cohort_rejects, work.masks_rle]
    work.cohort_boxes.unlink(missing_ok=True)
    if boxes is not None:
        write_csv(work.cohort_boxes, boxes[BOXES_COLUMNS])
        files.append(work.cohort_boxes)
    write_csv(work.cohort_rejects, spreadsheet_safe(rejects[REJECT_COLUMNS], ("id", "reason")))
    return files


def has_boxes(record: Record) -> bool:
    """Whether the cohort of ``record`` has radiologists' boxes (``boxes.csv``)."""
    return _BOXES_FILE in record.get("files", {})


def load_boxes(record: Record) -> pd.DataFrame | None:
    """The cohort's radiologists' boxes (``BOXES_COLUMNS``), read through its verified record; None
    where the archive has none."""
    if not has_boxes(record):
        return None
    return pd.read_csv(record.file(_BOXES_FILE), dtype={"dicom_id": str})


_SIZE = r"\d+x\d+"
_DICE = r"(?<=Dice RCA \(Mean\) )-?\d+(?:\.\d+)?"


def reason_counts(reasons: pd.Series) -> dict:
    """Reject reasons grouped with their image-specific numbers (sizes, scores) replaced by the range
    the group spans: "mask quality ... Dice RCA (Mean) 0.45-0.69 < 0.7", "image 2048x2500-3000x2992 ...";
    the numbers a rule names (a threshold, the labels 1, 0, -1) are kept."""
    reasons = reasons.astype(str)
    generic = reasons.str.replace(_SIZE, "NxN", regex=True).str.replace(_DICE, "N", regex=True)
    out = {}
    for text, group in reasons.groupby(generic, sort=False):
        out[_with_ranges(str(text), group)] = int(len(group))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _with_ranges(text: str, group: pd.Series) -> str:
    """``text`` with each placeholder replaced by the range of the values it stands for in ``group``."""
    found = group.str.findall(_SIZE)
    for i in range(text.count("NxN")):  # each size of the reason, in its place
        sizes = sorted({f[i] for f in found if len(f) > i}, key=lambda v: int(v.split("x")[0]) * int(v.split("x")[1]))
        if sizes:
            text = text.replace("NxN", sizes[0] if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}", 1)
    if "Dice RCA (Mean) N" in text:
        values = pd.to_numeric(group.str.extract(f"({_DICE})", expand=False), errors="coerce").dropna()
        if len(values):
            low, high = values.min(), values.max()
            text = text.replace("Dice RCA (Mean) N", f"Dice RCA (Mean) {low:.2f}" if low == high else
                                f"Dice RCA (Mean) {low:.2f} to {high:.2f}", 1)
    return text
