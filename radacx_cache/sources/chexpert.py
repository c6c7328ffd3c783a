"""Reader of the CheXpert tables and file tree (docs/archives.md).

The release (Stanford AIMI, https://stanfordmlgroup.github.io/competitions/chexpert/) unpacks to
``CheXpert-v1.0/`` (full resolution) or the widely used downscaled ``CheXpert-v1.0-small/``, each
with ``train.csv`` and ``valid.csv`` (one row per image) and ``train/patientNNNNN/studyN/viewN_
{frontal,lateral}.jpg``. A table's ``Path`` starts with that folder name
(``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``) and so is relative to the
folder *holding* it: that folder is ``archive.root``. CheXmask's ``Path`` lacks the prefix.

Columns: ``Path, Sex, Age, Frontal/Lateral, AP/PA``, then the 14 labels of the CheXpert labeler
(the same names as MIMIC's ``mimic-cxr-2.0.0-chexpert.csv``): 1 positive, 0 negative, -1
uncertain, blank not mentioned. ``AP/PA`` is blank on lateral rows and ``LL``/``RL`` on a few
frontal ones. ``valid.csv`` (radiologist consensus, patients disjoint from train) has no
uncertain labels. Tables carry no image sizes.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..findings import FINDINGS_ALL
from ._tables import read_table, require_columns
from .archive import Archive, ArchiveTables
from .mimic import parse_label_cells

PREFIXES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
TABLES = {"train": "train", "valid": "test"}  # table -> official split: valid.csv is the held-out set
COLUMNS = ("Path", "Frontal/Lateral", "AP/PA")
_PATH = re.compile(r"(CheXpert-v1\.0(?:-small)?/)?((?:train|valid|test)/patient(\d{5})/study(\d{1,4})/"
                   r"view\d{1,2}_(?:frontal|lateral)\.jpg)")


def table_paths(root: str | Path) -> dict[str, Path]:
    """``{"train": .../train.csv, "valid": .../valid.csv}`` under the copy found in ``root``."""
    root = Path(root)
    for prefix in PREFIXES:
        found = {t: root / prefix / f"{t}{s}" for t in TABLES for s in (".csv", ".csv.gz")
                 if (root / prefix / f"{t}{s}").exists()}
        if "train" in found:
            return found
    hint = (" (that is the CheXpert folder itself: point archive.root at the folder holding it)"
            if (root / "train.csv").exists() else "")
    raise FileNotFoundError(f"CheXpert table {PREFIXES[1]}(-small)/train.csv not found in {root}{hint}")


def read_tables(root) -> pd.DataFrame:
    """One row per image of ``train.csv`` and ``valid.csv``: ``table_path`` (as written), ``prefix``,
    the canonical ``dicom_id`` (the path without the prefix, as CheXmask writes it), ``subject_id``
    and ``study_id`` (text, from the path; blank when the path is not a CheXpert path),
    ``ViewPosition`` (AP/PA for frontal images, LATERAL otherwise), ``split``, the 14 labels as
    floats (1, 0, -1, NaN) and ``label_problem`` (``mimic.parse_label_cells``)."""
    parts = []
    for table, path in table_paths(root).items():
        require_columns(path, (*COLUMNS, *FINDINGS_ALL))
        raw = read_table(path, usecols=[*COLUMNS, *FINDINGS_ALL], dtype=str, keep_default_na=False)
        parts.append(_canonical(raw, TABLES[table]))
    return pd.concat(parts, ignore_index=True)


def _canonical(raw: pd.DataFrame, split: str) -> pd.DataFrame:
    parsed = raw["Path"].str.strip().str.extract("^" + _PATH.pattern + "$")
    ok = parsed[0].notna()  # a table's Path must carry the prefix
    df = pd.DataFrame({"table_path": raw["Path"], "prefix": parsed[0].str.rstrip("/").fillna(""),
                       "dicom_id": parsed[1].where(ok, raw["Path"]),
                       "subject_id": parsed[2].where(ok, ""), "study_id": parsed[3].where(ok, "")})
    frontal = raw["Frontal/Lateral"].str.strip() == "Frontal"
    lateral = raw["Frontal/Lateral"].str.strip() == "Lateral"
    view = raw["AP/PA"].str.strip().replace("", None)
    df["ViewPosition"] = np.where(frontal, view, np.where(lateral, "LATERAL", None))
    df["split"] = split
    df["Rows"], df["Columns"] = np.nan, np.nan  # no image size in CheXpert's tables
    values, problems = parse_label_cells(raw, FINDINGS_ALL)
    return df.assign(**values, label_problem=problems)


def id_problem(dicom_id, subject_id, study_id) -> str | None:
    """Why a row's path is not a CheXpert image path (``train/patient00001/study1/view1_frontal.jpg``
    after the ``CheXpert-v1.0(-small)/`` prefix), or None. Paths are built only from rows that pass."""
    text = str(dicom_id).strip() if dicom_id is not None else ""
    if not (str(subject_id).isdigit() and str(study_id).isdigit()) or ".." in text:
        shown = text if len(text) <= 80 else text[:80] + "..."
        return (f"Path {shown!r} is not a CheXpert image path (CheXpert-v1.0(-small)/{{train,valid}}/"
                f"patientNNNNN/studyN/viewN_{{frontal,lateral}}.jpg)")
    return None


def parse_path(text: str) -> tuple[str, int, int] | None:
    """``(id, patient, study)`` of a CheXpert image path with or without its ``CheXpert-v1.0(-small)/``
    prefix (CheXmask writes it without), or None when it is not one."""
    m = _PATH.fullmatch(str(text).strip())
    return (m.group(2), int(m.group(3)), int(m.group(4))) if m else None


def jpg_relpath(prefix: str, dicom_id: str) -> str:
    """``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``: the table's own path."""
    if prefix not in PREFIXES:
        raise ValueError(f"CheXpert folder {prefix!r} is not one of {PREFIXES}")
    return f"{prefix}/{dicom_id}"


class CheXpert(Archive):
    kind = "chexpert"
    id_rule = staticmethod(id_problem)  # the module's id check, applied by Archive.id_problem
    name = "CheXpert"
    chexmask_file = "CheXpert"
    id_name = "Path"
    tables = {"metadata": "train.csv / valid.csv", "labels": "train.csv / valid.csv", "split": "train.csv / valid.csv"}
    scaled_copies = True  # CheXpert-v1.0-small: a downscaled copy, read when its aspect ratio agrees
    image_formats = ("JPEG",)

    def read(self, cfg) -> ArchiveTables:
        root = Path(cfg.archive.root)
        entries = read_tables(root)
        return ArchiveTables(entries, entries, entries[["dicom_id", "split"]], kind=self.kind)

    def relpath(self, tables: ArchiveTables, row) -> str:
        return jpg_relpath(row["prefix"], row["dicom_id"])

    def input_files(self, root: Path) -> list[Path]:
        return list(table_paths(root).values())
