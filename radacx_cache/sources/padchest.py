"""Reader of PadChest (BIMCV, https://bimcv.cipf.es/bimcv-projects/padchest/), the fifth CheXmask archive
(docs/archives.md).

The release holds one table, ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (``.gz`` too;
160,861 rows, 67,625 patients), and the PNGs in numbered subfolders ``<ImageDir>/<ImageID>``
(``0/`` ... ``54/``). The columns read, by name:

- ``ImageID`` (the file name, and CheXmask's ``ImageID`` in ``Padchest.csv``), ``ImageDir`` (its
  subfolder, an integer), ``StudyID``, ``PatientID`` (both long digit strings: read as text);
- ``Projection``: PA, L, AP_horizontal (supine AP), AP, COSTAL, EXCLUDE, UNK; it becomes
  ``ViewPosition`` unchanged, so ``cohort.views`` (PA, AP by default) says whether supine AP is in;
- ``MethodLabel``: ``Physician`` (a radiologist labelled the report; 39,053 images) or ``RNN_model``
  (labels extracted by a network; 121,808);
- ``Labels``: a Python list literal of report terms, e.g. ``['pleural effusion', 'cardiomegaly']``,
  parsed as quoted strings (never evaluated).

Labels: PadChest states findings, it has no uncertain label: a finding is 1 where one of its terms
(``TERMS``) is listed, 0 otherwise. ``normal`` fills No Finding. A row listing ``exclude`` or
``suboptimal study`` (the labellers' own marks for unusable images), or whose Labels cell is empty
or not a list, is rejected with that reason. Images are 16-bit PNGs with 12 or 10 bits stored
(``BitsStored_DICOM``); the renderer windows them by percentiles. There is no official split: the
cohort draws a seeded, patient-disjoint test split (``stages.cohort.patient_split``).

CheXmask's ``Padchest.csv`` has ``Dice RCA (Mean) > (Max)`` on 30 of its 50 published rows and the
reverse on 20: the two columns are not in a fixed order there, so Mean > Max is no evidence of a
swapped header for this archive (``mean_above_max_is_suspect`` False) and rows are judged by the
Mean alone, as for every archive.

``archive.options.physician_only: true`` keeps the images whose labels a physician wrote; the
cohort record counts the images of each ``MethodLabel`` either way.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..findings import FINDINGS_ALL
from ._tables import read_table, require_columns
from .archive import Archive, ArchiveTables

TABLE_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
COLUMNS = ("ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "MethodLabel", "Labels")
# report terms -> the finding they state (every term mapped is listed here and in docs/archives.md)
TERMS = {
    "atelectasis": "Atelectasis", "laminar atelectasis": "Atelectasis", "segmental atelectasis": "Atelectasis",
    "lobar atelectasis": "Atelectasis", "atelectasis basal": "Atelectasis", "total atelectasis": "Atelectasis",
    "round atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "pulmonary edema": "Edema",
    "pleural effusion": "Pleural Effusion", "loculated pleural effusion": "Pleural Effusion",
    "loculated fissural effusion": "Pleural Effusion",  # not "pericardial effusion": fluid around the heart
    "normal": "No Finding",
}
UNUSABLE = ("exclude", "suboptimal study")  # the labellers' marks for images that cannot be read
METHODS = ("Physician", "RNN_model")
MAX_LABELS_CELL = 4096  # characters; the longest real cell is a few hundred
_TERM = re.compile(r"'([^'\\]*)'")
_LIST = re.compile(r"\[\s*(?:'[^'\\]*'\s*(?:,\s*'[^'\\]*'\s*)*)?\]")
_IMAGE_ID = re.compile(r"[0-9][0-9_\-]{5,90}_[0-9a-z\-]{1,40}\.png")  # <StudyID>_<code>.png
_STUDY = re.compile(r"[0-9][0-9_\-]{0,90}")  # digits, with '-' and '_' in some of the older studies
_DIGITS = re.compile(r"[0-9]{1,64}")


def table_path(root: str | Path) -> Path:
    """``root/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` or its ``.gz``."""
    for suffix in ("", ".gz"):
        if (Path(root) / (TABLE_NAME + suffix)).exists():
            return Path(root) / (TABLE_NAME + suffix)
    raise FileNotFoundError(f"PadChest table {TABLE_NAME}(.gz) not found in {root}; point archive.root at the "
                            f"folder holding it and the numbered image folders 0/ ... 54/")


def parse_labels(cell) -> tuple[list[str], str | None]:
    """(terms, None) from a ``Labels`` cell such as ``['pleural effusion', 'cardiomegaly']``, or
    ([], why it cannot be read). Quoted strings are taken as they are; nothing is evaluated."""
    text = "" if cell is None or (isinstance(cell, float) and cell != cell) else str(cell).strip()
    if not text:
        return [], "Labels is empty"
    if len(text) > MAX_LABELS_CELL or not _LIST.fullmatch(text):
        return [], f"Labels {text[:60]!r} is not a list of quoted terms"
    return [t.strip().lower() for t in _TERM.findall(text)], None


def read_table_rows(root) -> pd.DataFrame:
    """One row per image with the canonical columns (``dicom_id`` = ImageID; ``subject_id`` and
    ``study_id``: ``number_of`` PatientID and StudyID, as text, or the raw value where it is not one,
    for ``id_problem`` to reject; ``ViewPosition`` = Projection; ``prefix`` = ImageDir;
    ``label_method`` = MethodLabel), the FINDINGS_ALL labels (the five findings and No Finding: 1 / 0;
    the others NaN) and ``label_problem``."""
    path = table_path(root)
    require_columns(path, COLUMNS)
    raw = read_table(path, usecols=list(COLUMNS), dtype=str, keep_default_na=False)
    patient, study = raw["PatientID"].str.strip(), raw["StudyID"].str.strip()
    bad = ~patient.str.fullmatch(_DIGITS.pattern) | ~study.str.fullmatch(_STUDY.pattern)
    df = pd.DataFrame({"dicom_id": raw["ImageID"].str.strip(),
                       "subject_id": np.where(bad, patient.str[:40], patient.map(number_of).astype(str)),
                       "study_id": np.where(bad, study.str[:40], study.map(number_of).astype(str)),
                       "ViewPosition": raw["Projection"].str.strip().replace("", None),
                       "Rows": np.nan, "Columns": np.nan, "prefix": raw["ImageDir"].str.strip(),
                       "label_method": raw["MethodLabel"].str.strip()})
    stated = set(TERMS.values())
    labels = {c: np.full(len(df), 0.0 if c in stated else np.nan, np.float32) for c in FINDINGS_ALL}
    problems: list = [None] * len(df)
    for i, cell in enumerate(raw["Labels"]):
        terms, problem = parse_labels(cell)
        unusable = [t for t in terms if t in UNUSABLE]
        if problem or unusable:
            problems[i] = problem or f"Labels lists {unusable[0]!r} (the labellers marked the image unusable)"
            continue
        for t in terms:
            if t in TERMS:
                labels[TERMS[t]][i] = 1.0
    for col in FINDINGS_ALL:
        df[col] = labels[col]
    df["label_problem"] = problems
    return df


def number_of(text: str) -> int:
    """The int64 stand-in of a PadChest PatientID or StudyID (38-digit numbers, some studies with '-'
    or '_': too long for the shards' integer ids): the first 60 bits of its SHA-1 (a collision among
    67,625 patients has a chance of about 2e-9)."""
    return int(hashlib.sha1(str(text).encode()).hexdigest()[:15], 16)


def id_problem(image_id, subject_id, study_id) -> str | None:
    """Why a row's identifiers are not PadChest's (ImageID ``<StudyID>_<code>.png``; ``subject_id`` the
    stand-in of a digit PatientID; ``study_id`` that of the StudyID the ImageID starts with), or None."""
    name = str(image_id).strip() if image_id is not None else ""
    if not _IMAGE_ID.fullmatch(name):
        return f"ImageID {name[:60]!r} is not a PadChest file name (<StudyID>_<code>.png)"
    if not _DIGITS.fullmatch(str(subject_id).strip()) or int(str(subject_id).strip()) >= 2 ** 60:
        return f"PatientID {str(subject_id)[:40]!r} is not a number"
    if str(study_id).strip() != str(number_of(name.rsplit("_", 1)[0])):
        return f"StudyID {str(study_id)[:40]!r} is not the study ImageID {name} names"
    return None


class PadChest(Archive):
    kind = "padchest"
    id_rule = staticmethod(id_problem)  # the module's id check, applied by Archive.id_problem
    name = "PadChest"
    chexmask_file = "Padchest"
    id_name = "ImageID"
    tables = {"metadata": TABLE_NAME, "labels": TABLE_NAME, "split": "(no official split)"}
    label_key = ("dicom_id",)
    sizes_in_tables = False  # CheXmask's Height x Width is checked against the PNG itself
    image_formats = ("PNG",)
    mean_above_max_is_suspect = False
    options = {"physician_only": False}

    def read(self, cfg) -> ArchiveTables:
        root = Path(cfg.archive.root)
        entries = read_table_rows(root)
        rejects = []
        if self.checked_options(cfg.archive.options)["physician_only"]:
            other = entries["label_method"] != "Physician"
            rejects = [{"id": i[:80], "stage": "cohort", "reason": f"MethodLabel {m[:20]!r} is not Physician "
                        "(archive.options.physician_only)"} for i, m in zip(entries.loc[other, "dicom_id"],
                                                                           entries.loc[other, "label_method"])]
            entries = entries[~other].reset_index(drop=True)
        split = entries[["dicom_id"]].assign(split="train")  # no official split: the cohort draws the test split
        return ArchiveTables(entries, entries, split, kind=self.kind, rejects=rejects)

    def relpath(self, tables: ArchiveTables, row) -> str:
        prefix = str(row["prefix"]).strip()
        if not _DIGITS.fullmatch(prefix):
            raise ValueError(f"ImageDir {prefix[:20]!r} is not a folder number")
        return f"{int(prefix)}/{row['dicom_id']}"

    def input_files(self, root: Path) -> list[Path]:
        return [table_path(root)]

    def summary(self, cohort: pd.DataFrame) -> dict:
        """How many of the cohort's images each labelling method labelled."""
        if "label_method" not in cohort:
            return {}
        counts = cohort["label_method"].value_counts()
        return {"label_method": {m: int(counts.get(m, 0)) for m in (*METHODS, *sorted(set(counts.index) - set(METHODS)))}}
