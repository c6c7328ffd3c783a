"""Reader of VinDr-CXR's tables and file tree (docs/archives.md).

Two releases, one row format (one row per radiologist, finding and box; ``No finding`` and global
labels without a box):

- PhysioNet (``vindr-cxr/1.0.0``): ``annotations/annotations_train.csv`` (15,000 images, each read
  independently by three of 17 radiologists, ``rad_id`` R1 ... R17) and ``annotations_test.csv``
  (3,000 images, the consensus of five radiologists), 22 local labels with boxes; DICOMs in
  ``train/<image_id>.dicom`` and ``test/<image_id>.dicom``;
- the Kaggle challenge (VinBigData): ``train.csv`` (``image_id,class_name,class_id,rad_id,x_min,
  y_min,x_max,y_max``; 14 of the local labels, the training images only, no Edema).

Labels come from the readers' rows (one source for labels and boxes): a finding is positive (1)
where at least ``min_readers`` of the image's readers marked it, uncertain (-1) where fewer but
at least one did (the cohort's ``uncertain`` policy then decides), negative (0) where none did.
The test table is one consensus reading, so one mark is enough there. A finding the release does
not label (Edema in the Kaggle table) is NaN. Box coordinates are in the DICOM's pixels (edges:
``x_min <= x < x_max``); the cohort turns them into fractions of CheXmask's frame, which the shard
stage checks against the DICOM itself. VinDr publishes no patient identifier: every image is its
own patient (``subject_id`` = the first 15 hex digits of ``image_id`` as an integer), so a split of
VinDr cannot be checked for patients on both sides. The tables carry no view; the release is of
posteroanterior radiographs, so every row reads as ``PA`` (the DICOM's own tag is not consulted).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..findings import FINDINGS_ALL
from ._tables import read_table, require_columns
from .archive import Archive, ArchiveTables

PHYSIONET_TABLES = {"train": "annotations/annotations_train.csv", "test": "annotations/annotations_test.csv"}
CHALLENGE_TABLE = "train.csv"  # the Kaggle copy: the training images only
COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")  # rad_id: where there are several readers
# every label of the two releases (lower case) -> the FINDINGS_ALL column it fills (None: outside them)
CLASS_NAMES = {
    "atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "consolidation": "Consolidation",
    "edema": "Edema", "pleural effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax",
    "lung opacity": "Lung Opacity", "pneumonia": "Pneumonia", "rib fracture": "Fracture",
    "clavicle fracture": "Fracture", "no finding": "No Finding",
    **{name: None for name in (
        "aortic enlargement", "calcification", "emphysema", "enlarged pa", "ild", "infiltration",
        "lung cavity", "lung cyst", "mediastinal shift", "nodule/mass", "other lesion", "pleural thickening",
        "pulmonary fibrosis", "lung tumor", "tuberculosis", "other disease", "other diseases", "copd")}}
# the FINDINGS_ALL columns each release labels (the others stay NaN)
CHALLENGE_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Pleural Effusion", "Pneumothorax",
                      "Lung Opacity", "No Finding")
PHYSIONET_FINDINGS = CHALLENGE_FINDINGS + ("Edema", "Fracture")
BOX_COLUMNS = ["dicom_id", "finding", "x0", "y0", "x1", "y1", "reader"]
_IMAGE_ID = re.compile(r"[0-9a-f]{32}")


def table_paths(root: str | Path) -> dict[str, Path]:
    """{split: annotation table}: PhysioNet's two tables where they exist, else Kaggle's ``train.csv``."""
    root = Path(root)
    found = {split: root / name for split, name in PHYSIONET_TABLES.items() if (root / name).exists()}
    if found:
        return found
    if (root / CHALLENGE_TABLE).exists():
        return {"train": root / CHALLENGE_TABLE}
    raise FileNotFoundError(f"VinDr-CXR tables not found in {root}: expected {PHYSIONET_TABLES['train']} (PhysioNet) "
                            f"or {CHALLENGE_TABLE} (Kaggle); point archive.root at the folder holding them and train/")


def subject_of(image_id: str) -> int:
    """The stand-in patient number of an image (VinDr has no patient ids): its first 15 hex digits."""
    return int(image_id[:15], 16)


def id_problem(image_id, subject_id, study_id) -> str | None:
    """Why a row's identifiers are not VinDr's (32 lower-case hex digits), or None."""
    name = str(image_id).strip() if image_id is not None else ""
    if not _IMAGE_ID.fullmatch(name):
        return f"image_id {name[:60]!r} is not a VinDr-CXR image id (32 hexadecimal digits)"
    for what, value in (("subject", subject_id), ("study", study_id)):
        if str(value).strip() != str(subject_of(name)):
            return f"{what} {str(value)[:20]!r} is not the one image_id {name} stands for"
    return None


def dicom_relpath(folder: str, image_id: str) -> str:
    """``train/<image_id>.dicom`` (or ``test/``)."""
    return f"{folder}/{image_id}.dicom"


def read_tables(root, min_readers: int = 2) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[dict]]:
    """(entries, split, boxes, rejects) of every annotation table under ``root``.

    ``entries``: one row per image with the canonical columns (``prefix`` = its folder, ``Rows`` and
    ``Columns`` NaN: the tables carry no size) and the FINDINGS_ALL labels under the readers' rule;
    ``boxes``: ``BOX_COLUMNS`` in pixels; rejects: rows that cannot be read, with the reason."""
    entries, boxes, rejects = [], [], []
    for split, path in table_paths(root).items():
        e, b, r = read_annotations(path, split, min_readers)
        entries.append(e)
        boxes.append(b)
        rejects += r
    entries = pd.concat(entries, ignore_index=True)
    return entries, entries[["dicom_id", "split"]], pd.concat(boxes, ignore_index=True), rejects


def read_annotations(path: Path, split: str, min_readers: int = 2) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """One annotation table: (entries, boxes in pixels, rejects); see ``read_tables``."""
    require_columns(path, COLUMNS)
    raw = read_table(path, dtype=str, keep_default_na=False)
    consensus = split == "test" or "rad_id" not in raw  # one reading per image: one mark is enough
    readers = pd.Series("consensus", raw.index) if consensus else raw["rad_id"].str.strip()
    image = raw["image_id"].str.strip()
    name = raw["class_name"].str.strip()
    finding = name.str.lower().map(CLASS_NAMES)
    known = name.str.lower().isin(list(CLASS_NAMES))
    # a row whose class is not VinDr's makes its image's labels unreadable (the cohort rejects the image)
    unknown_by_image: dict = {}
    for n, (i, c) in enumerate(zip(image, name)):
        if c.lower() not in CLASS_NAMES:
            unknown_by_image.setdefault(i, f"{path.name} row {n + 2}: class_name {c[:40]!r} is not a VinDr-CXR label")
    labelled = PHYSIONET_FINDINGS if path.name != CHALLENGE_TABLE else CHALLENGE_FINDINGS

    marks = pd.DataFrame({"dicom_id": image, "reader": readers, "finding": finding})[known.to_numpy()]
    n_readers = pd.DataFrame({"dicom_id": image, "reader": readers}).groupby("dicom_id")["reader"].nunique()
    per_finding = marks.dropna(subset=["finding"]).drop_duplicates().groupby(["dicom_id", "finding"]).size()
    ids = n_readers.index.to_numpy()
    needed = np.ones(len(ids)) if consensus else np.minimum(min_readers, n_readers.to_numpy())
    entries = pd.DataFrame({"dicom_id": ids, "subject_id": [str(subject_of(i)) if _IMAGE_ID.fullmatch(i) else "" for i in ids]})
    entries["study_id"] = entries["subject_id"]
    entries["ViewPosition"], entries["Rows"], entries["Columns"] = "PA", np.nan, np.nan
    entries["prefix"], entries["split"] = split, split
    for col in FINDINGS_ALL:
        if col not in labelled:
            entries[col] = np.nan
            continue
        count = per_finding.xs(col, level="finding").reindex(ids, fill_value=0).to_numpy() \
            if col in per_finding.index.get_level_values("finding") else np.zeros(len(ids))
        if col == "No Finding":  # every reader found nothing (and no finding is marked)
            entries[col] = (count >= n_readers.to_numpy()).astype(np.float32)
            continue
        entries[col] = np.where(count >= needed, 1.0, np.where(count > 0, -1.0, 0.0)).astype(np.float32)
    entries["label_problem"] = entries["dicom_id"].map(unknown_by_image).astype(object)
    entries.loc[entries["label_problem"].isna(), "label_problem"] = None
    boxes, rejects = _boxes(raw, image, readers, finding, path)
    return entries, boxes, rejects


def _boxes(raw, image, readers, finding, path: Path) -> tuple[pd.DataFrame, list[dict]]:
    """The rows' boxes of FINDINGS_ALL findings, in pixels; a row whose box is not a box is rejected."""
    xyxy = raw[["x_min", "y_min", "x_max", "y_max"]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    blank = (raw[["x_min", "y_min", "x_max", "y_max"]] == "").all(axis=1).to_numpy()
    x0, y0, x1, y1 = xyxy.T
    with np.errstate(invalid="ignore"):
        bad = ~blank & (~np.isfinite(xyxy).all(1) | (x0 < 0) | (y0 < 0) | (x1 <= x0) | (y1 <= y0))
    number = readers.str.extract(r"(\d+)$")[0].fillna("0")
    oversized = (number.str.len() > 9).to_numpy()  # a reader number beyond int32: not a reader id, a reject row
    reader_number = number.where(~oversized, "0").astype(int)
    has_box = finding.notna().to_numpy() & ~blank & ~bad & (finding != "No Finding").to_numpy() & ~oversized
    boxes = pd.DataFrame({"dicom_id": image, "finding": finding, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                          "reader": reader_number})[has_box].reset_index(drop=True)
    rejects = [{"id": i[:80], "stage": "cohort", "reason": f"{path.name} row {n + 2}: box "
                f"({', '.join(v[:12] for v in row)}) is not a box (numbers, x_min < x_max, y_min < y_max, >= 0)"}
               for n, (i, row, b) in enumerate(zip(image, raw[["x_min", "y_min", "x_max", "y_max"]].to_numpy(), bad)) if b]
    rejects += [{"id": i[:80], "stage": "cohort", "reason": f"{path.name} row {n + 2}: rad_id {r[:30]!r} is not a "
                 f"reader id (more than 9 digits); its box is not used"}
                for n, (i, r, o) in enumerate(zip(image, readers, oversized)) if o]
    return boxes[BOX_COLUMNS], rejects


class VinDr(Archive):
    kind = "vindr"
    id_rule = staticmethod(id_problem)  # the module's id check, applied by Archive.id_problem
    name = "VinDr-CXR"
    chexmask_file = "VinDr-CXR"
    id_name = "image_id"
    tables = {"metadata": "annotations_*.csv", "labels": "annotations_*.csv",
              "split": "annotations_train.csv / annotations_test.csv"}
    image_formats = ("DICOM",)

    def read(self, cfg) -> ArchiveTables:
        root = Path(cfg.archive.root)
        entries, split, boxes, rejects = read_tables(root, cfg.cohort.min_readers)
        return ArchiveTables(entries, entries, split, kind=self.kind, rejects=rejects, boxes=boxes, boxes_in_pixels=True)

    def relpath(self, tables: ArchiveTables, row) -> str:
        return dicom_relpath(row["prefix"], row["dicom_id"])

    def input_files(self, root: Path) -> list[Path]:
        return list(table_paths(root).values())

    def policy(self, cfg) -> dict:
        return {"min_readers": cfg.cohort.min_readers}
