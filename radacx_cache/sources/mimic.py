"""Reader of the MIMIC-CXR-JPG tables and file tree (docs/archives.md)."""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from ..findings import FINDINGS_ALL
from ._tables import read_table, require_columns
from .archive import Archive, ArchiveTables

PREFIX = "mimic-cxr-2.0.0"
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns")
SPLIT_VALUES = ("train", "validate", "test")
# The 14 CheXpert labels of mimic-cxr-2.0.0-chexpert.csv / -negbio.csv, in the file's column order.


def table_path(root: str | Path, name: str) -> Path:
    """``root/mimic-cxr-2.0.0-<name>.csv.gz`` or the uncompressed ``.csv``, whichever exists."""
    root = Path(root)
    for suffix in (".csv.gz", ".csv"):
        p = root / f"{PREFIX}-{name}{suffix}"
        if p.exists():
            return p
    raise FileNotFoundError(
        f"MIMIC-CXR-JPG table {PREFIX}-{name}.csv(.gz) not found in {root}; "
        f"point archive.root at the folder holding files/ and the {PREFIX}-*.csv.gz tables")


def _read(path: Path, columns, ids_as_text: bool = False) -> pd.DataFrame:
    require_columns(path, columns)
    dtype = {c: str for c in ("dicom_id", "subject_id", "study_id")} if ids_as_text else {"dicom_id": str}
    return read_table(path, usecols=list(columns), dtype={k: v for k, v in dtype.items() if k in columns},
                       keep_default_na=not ids_as_text, na_values=[""] if ids_as_text else None)


def _numeric_ids(df: pd.DataFrame) -> pd.DataFrame:
    """subject_id / study_id as int64; rows whose ids are not integers are dropped (they cannot join
    any image; the images they were meant for are rejected as having no row here)."""
    ids = {c: pd.to_numeric(df[c], errors="coerce") for c in ("subject_id", "study_id") if c in df}
    ok = np.logical_and.reduce([v.notna().to_numpy() for v in ids.values()])
    out = df[ok].copy()
    for c, v in ids.items():
        out[c] = v[ok].astype(np.int64)
    return out


def read_metadata(root) -> pd.DataFrame:
    """One row per image: dicom_id, subject_id, study_id, ViewPosition, Rows, Columns.

    Identifiers are returned as text, exactly as in the file (validate them with ``id_problem``);
    Rows and Columns as floats (NaN where blank or not a number).
    """
    df = _read(table_path(root, "metadata"), METADATA_COLUMNS, ids_as_text=True)
    df["ViewPosition"] = df["ViewPosition"].astype(object).where(df["ViewPosition"].notna(), None)
    for col in ("Rows", "Columns"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def read_labels(root, labeler: str = "chexpert") -> pd.DataFrame:
    """One row per study: subject_id, study_id, the 14 labels as floats (1, 0, -1, NaN) and
    ``label_problem`` (None, or why a cell is not a label: the study's images are then rejected)."""
    if labeler not in ("chexpert", "negbio"):
        raise ValueError(f"labeler {labeler!r}: expected 'chexpert' or 'negbio'")
    path = table_path(root, labeler)
    require_columns(path, ("subject_id", "study_id", *FINDINGS_ALL))
    raw = read_table(path, usecols=["subject_id", "study_id", *FINDINGS_ALL], dtype=str, keep_default_na=False)
    df = _numeric_ids(raw)
    values, problems = parse_label_cells(df, FINDINGS_ALL)
    return df[["subject_id", "study_id"]].assign(**values, label_problem=problems)


LABEL_VALUES = (1.0, 0.0, -1.0)


def parse_label_cells(raw: pd.DataFrame, columns) -> tuple[dict, list]:
    """Label cells (text) as float32 columns (1, 0, -1, NaN for blank) and, per row, the first cell
    that is none of these (``"yes"``, ``"2"``), named, or None. The CheXpert labeler's tables (MIMIC's
    and CheXpert's own) write 1.0 / 0.0 / -1.0 / blank."""
    values, problems = {}, [None] * len(raw)
    for col in columns:
        text = raw[col].astype(str).str.strip()
        number = pd.to_numeric(text.replace({"": None, "nan": None}), errors="coerce")
        bad = (text != "") & (text != "nan") & ~number.isin(LABEL_VALUES)
        for i in np.flatnonzero(bad.to_numpy()):
            if problems[i] is None:
                problems[i] = f"label {col} = {text.iloc[i][:20]!r} is not 1, 0, -1 or blank"
        values[col] = number.where(~bad).astype(np.float32).to_numpy()
    return values, problems


def read_split(root) -> pd.DataFrame:
    """One row per image: dicom_id, study_id, subject_id, split (train / validate / test)."""
    df = _numeric_ids(_read(table_path(root, "split"), ("dicom_id", "study_id", "subject_id", "split")))
    bad = sorted(set(df["split"].dropna()) - set(SPLIT_VALUES))
    if bad:
        raise ValueError(f"split table: unknown split value(s) {bad}; expected {SPLIT_VALUES}")
    return df


# identifier formats (MIT-LCP mimic-cxr overview): dicom_id 5 dash-separated groups of 8 hex digits;
# subject_id 8 digits starting with 1; study_id 8 digits starting with 5
_DICOM_ID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{8}){4}")
_SUBJECT_ID = re.compile(r"1[0-9]{7}")
_STUDY_ID = re.compile(r"5[0-9]{7}")


def id_problem(dicom_id, subject_id, study_id) -> str | None:
    """Why a row's identifiers are not MIMIC-CXR-JPG identifiers, or None when they are.

    Paths are built only from identifiers that pass, so a table cannot point outside the archive.
    """
    for name, value, pattern, form in (
            ("dicom_id", dicom_id, _DICOM_ID, "5 dash-separated groups of 8 hex digits"),
            ("subject_id", subject_id, _SUBJECT_ID, "8 digits starting with 1"),
            ("study_id", study_id, _STUDY_ID, "8 digits starting with 5")):
        text = str(value).strip() if value is not None and value == value else ""
        if name != "dicom_id" and text.endswith(".0"):  # an integer column pandas read as float
            text = text[:-2]
        if not pattern.fullmatch(text):
            shown = text if len(text) <= 60 else text[:60] + "..."
            return f"{name} {shown!r} is not a MIMIC-CXR-JPG {name} ({form})"
    return None


def jpg_relpath(subject_id: int, study_id: int, dicom_id: str) -> str:
    """``files/p10/p10000032/s50414267/<dicom_id>.jpg``: the real folder layout."""
    subject = f"p{int(subject_id)}"
    return f"files/{subject[:3]}/{subject}/s{int(study_id)}/{dicom_id}.jpg"


def archive_path(root: str | Path, relpath: str, strict_links: bool = False) -> Path:
    """``root / relpath`` for a path built from table values: refused (ValueError) when the path
    itself would leave ``root`` (absolute, ``..``, an empty part). Links inside the archive are the
    archive owner's (a tree of links into a read-only store is a common layout) and are followed,
    unless ``strict_links``: then the resolved file must lie inside the resolved root."""
    rel = PurePosixPath(str(relpath))
    if not str(relpath) or rel.is_absolute() or any(p in ("", "..", ".") for p in rel.parts) or "\\" in str(relpath):
        raise ValueError(f"path {relpath!r} leaves the archive root {root}")
    path = Path(root) / rel
    if strict_links and not path.resolve().is_relative_to(Path(root).resolve()):
        raise ValueError(f"path {relpath!r} is a link that leaves the archive root {Path(root).resolve()} "
                         f"(archive.strict_links is on)")
    return path


class MIMIC(Archive):
    kind = "mimic"
    id_rule = staticmethod(id_problem)  # the module's id check, applied by Archive.id_problem
    name = "MIMIC-CXR-JPG"
    chexmask_file = "MIMIC-CXR-JPG"
    id_name = "dicom_id"
    tables = {"metadata": "metadata", "labels": "{labeler} labels", "split": "split table"}
    label_key = ("subject_id", "study_id")  # MIMIC labels studies, not images
    sizes_in_tables = True
    image_formats = ("JPEG",)

    def read(self, cfg) -> ArchiveTables:
        root = Path(cfg.archive.root)
        return ArchiveTables(read_metadata(root), read_labels(root, cfg.archive.labeler), read_split(root),
                             kind=self.kind)

    def relpath(self, tables: ArchiveTables, row) -> str:
        return jpg_relpath(row["subject_id"], row["study_id"], row["dicom_id"])

    def input_files(self, root: Path) -> list[Path]:
        return sorted(Path(root).glob(f"{PREFIX}-*.csv*"))
