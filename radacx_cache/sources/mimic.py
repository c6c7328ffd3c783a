"""Reader of the MIMIC-CXR-JPG tables and file tree (docs/archives.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

PREFIX = "mimic-cxr-2.0.0"
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns")
SPLIT_VALUES = ("train", "validate", "test")
# The 14 CheXpert labels of mimic-cxr-2.0.0-chexpert.csv / -negbio.csv, in the file's column order.
FINDINGS_ALL = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices")


def table_path(root: str | Path, name: str) -> Path:
    """``root/mimic-cxr-2.0.0-<name>.csv.gz`` or the uncompressed ``.csv``, whichever exists."""
    root = Path(root)
    for suffix in (".csv.gz", ".csv"):
        p = root / f"{PREFIX}-{name}{suffix}"
        if p.exists():
            return p
    raise FileNotFoundError(
        f"MIMIC-CXR-JPG table {PREFIX}-{name}.csv(.gz) not found in {root}; "
        f"point archive.mimic_root at the folder holding files/ and the {PREFIX}-*.csv.gz tables")


def _read(path: Path, columns) -> pd.DataFrame:
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(header)}")
    return pd.read_csv(path, usecols=list(columns), dtype={"dicom_id": str})


def read_metadata(root) -> pd.DataFrame:
    """One row per image: dicom_id, subject_id, study_id, ViewPosition, Rows, Columns."""
    df = _read(table_path(root, "metadata"), METADATA_COLUMNS)
    df["ViewPosition"] = df["ViewPosition"].astype(object).where(df["ViewPosition"].notna(), None)
    return df


def read_labels(root, labeler: str = "chexpert") -> pd.DataFrame:
    """One row per study: subject_id, study_id and the 14 labels as floats (1, 0, -1, NaN)."""
    if labeler not in ("chexpert", "negbio"):
        raise ValueError(f"labeler {labeler!r}: expected 'chexpert' or 'negbio'")
    df = _read(table_path(root, labeler), ("subject_id", "study_id", *FINDINGS_ALL))
    for col in FINDINGS_ALL:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(np.float32)
    return df


def read_split(root) -> pd.DataFrame:
    """One row per image: dicom_id, study_id, subject_id, split (train / validate / test)."""
    df = _read(table_path(root, "split"), ("dicom_id", "study_id", "subject_id", "split"))
    bad = sorted(set(df["split"].dropna()) - set(SPLIT_VALUES))
    if bad:
        raise ValueError(f"split table: unknown split value(s) {bad}; expected {SPLIT_VALUES}")
    return df


def jpg_relpath(subject_id: int, study_id: int, dicom_id: str) -> str:
    """``files/p10/p10000032/s50414267/<dicom_id>.jpg``: the real folder layout."""
    subject = f"p{int(subject_id)}"
    return f"files/{subject[:3]}/{subject}/s{int(study_id)}/{dicom_id}.jpg"
