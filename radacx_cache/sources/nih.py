"""Reader of the NIH ChestX-ray14 tables and file tree (docs/archives.md).

The release (NIH Clinical Center, https://nihcc.app.box.com/v/ChestXray-NIHCC) holds
``Data_Entry_2017_v2020.csv`` (one row per image), the patient-wise official split as two lists of
file names, ``train_val_list.txt`` and ``test_list.txt``, and 112,120 PNGs, all resized by NIH to
1024 x 1024, unpacked from ``images_001.tar.gz`` ... ``images_012.tar.gz`` into ``images/`` (the
Kaggle copy keeps them in ``images_001/images/`` ...; both are read).

Points that bite: the header ``OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]`` reads as
four columns (``OriginalImage[Width``, ``Height]``, ...), and those are the sizes *before* NIH's
resize, so they are never compared with anything; the labels are one ``|``-separated column
(``No Finding`` when empty); "Effusion" is pleural effusion; there are no uncertain labels.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..findings import FINDINGS_ALL
from ._tables import header_of, read_table, require_columns
from .archive import Archive, ArchiveTables

DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
SPLIT_LISTS = {"train_val_list.txt": "train", "test_list.txt": "test"}
COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position")
# the 14 NIH labels and "No Finding"; the value is the column of FINDINGS_ALL it fills (None: no such column)
NIH_LABELS = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
              "Edema": "Edema", "Effusion": "Pleural Effusion", "Pneumonia": "Pneumonia",
              "Pneumothorax": "Pneumothorax", "No Finding": "No Finding", "Infiltration": None, "Mass": None,
              "Nodule": None, "Emphysema": None, "Fibrosis": None, "Pleural_Thickening": None, "Hernia": None}
_IMAGE_INDEX = re.compile(r"(\d{8})_(\d{3})\.png")


def data_entry_path(root: str | Path) -> Path:
    """``root/Data_Entry_2017_v2020.csv`` (or ``.csv.gz``, or the 2017 name), whichever exists."""
    root = Path(root)
    for name in DATA_ENTRY_NAMES:
        for suffix in ("", ".gz"):
            if (root / (name + suffix)).exists():
                return root / (name + suffix)
    raise FileNotFoundError(f"NIH ChestX-ray14 table {DATA_ENTRY_NAMES[0]}(.gz) not found in {root}; point "
                            f"archive.root at the folder holding it, the two split lists and images/")


def read_data_entry(root) -> pd.DataFrame:
    """One row per image: the canonical columns (``dicom_id`` = Image Index, ``subject_id`` = Patient
    ID, ``study_id`` = Follow-up #, all as text, ``ViewPosition``) and the labels as FINDINGS_ALL
    columns: 1 where the finding is listed, 0 where it is not, NaN for the columns NIH does not label.
    Rows whose labels cannot be read carry the reason in ``label_problem``."""
    path = data_entry_path(root)
    require_columns(path, COLUMNS)
    raw = read_table(path, usecols=list(COLUMNS), dtype=str, keep_default_na=False)
    df = pd.DataFrame({"dicom_id": raw["Image Index"].str.strip(), "subject_id": raw["Patient ID"].str.strip(),
                       "study_id": raw["Follow-up #"].str.strip(),
                       "ViewPosition": raw["View Position"].str.strip().replace("", None),
                       "Rows": np.nan, "Columns": np.nan})  # the PNG's size is not in the table
    labels, problems = finding_matrix(raw["Finding Labels"])
    for col in FINDINGS_ALL:
        df[col] = labels[col]
    df["label_problem"] = problems
    return df


def finding_matrix(cells: pd.Series) -> tuple[dict, list]:
    """The ``Finding Labels`` cells as FINDINGS_ALL columns, and a problem (or None) per row."""
    mapped = [v for v in NIH_LABELS.values() if v]
    out = {c: np.full(len(cells), np.nan if c not in mapped else 0.0, np.float32) for c in FINDINGS_ALL}
    problems: list = [None] * len(cells)
    for i, cell in enumerate(cells):
        tokens = [t.strip() for t in str(cell).split("|")]
        unknown = [t for t in tokens if t not in NIH_LABELS]
        if unknown or not cell:
            problems[i] = (f"Finding Labels {cell!r}: unknown label {unknown[0][:40]!r}" if unknown
                           else "Finding Labels is blank (NIH writes 'No Finding')")
            continue
        for t in tokens:
            if NIH_LABELS[t]:
                out[NIH_LABELS[t]][i] = 1.0
    return out, problems


def read_split_lists(root) -> pd.DataFrame:
    """``dicom_id, split`` (train / test) from ``train_val_list.txt`` and ``test_list.txt``; an image in
    both lists appears twice (the cohort rejects it as conflicting)."""
    root = Path(root)
    parts = []
    for name, split in SPLIT_LISTS.items():
        path = root / name
        if not path.exists():
            raise FileNotFoundError(f"NIH ChestX-ray14 split list {path} not found (the official patient-wise "
                                    f"split: train_val_list.txt and test_list.txt)")
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        parts.append(pd.DataFrame({"dicom_id": ids, "split": split}))
    return pd.concat(parts, ignore_index=True)


def id_problem(image_index, patient_id, follow_up) -> str | None:
    """Why a row's identifiers are not NIH identifiers (``00000001_000.png``, Patient ID 1, Follow-up #
    0, the first two agreeing), or None. Paths are built only from rows that pass."""
    name = str(image_index).strip() if image_index is not None else ""
    m = _IMAGE_INDEX.fullmatch(name)
    if not m:
        shown = name if len(name) <= 60 else name[:60] + "..."
        return f"Image Index {shown!r} is not an NIH ChestX-ray14 file name (8 digits, '_', 3 digits, '.png')"
    for what, value, expected in (("Patient ID", patient_id, int(m.group(1))),
                                  ("Follow-up #", follow_up, int(m.group(2)))):
        text = str(value).strip() if value is not None else ""
        if not text.isdigit() or int(text) != expected:
            return f"{what} {text[:20]!r} does not match Image Index {name} (expected {expected})"
    return None


def parse_image_index(image_index) -> tuple[int, int] | None:
    """(Patient ID, Follow-up #) that an Image Index names, or None."""
    m = _IMAGE_INDEX.fullmatch(str(image_index).strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def image_folders(root) -> dict[str, str] | None:
    """None when the PNGs are in ``images/`` (the NIH release unpacked); for the Kaggle copy
    (``images_001/images/`` ...), which folder holds each file."""
    root = Path(root)
    if (root / "images").is_dir():
        return None
    found = {}
    for folder in sorted(root.glob("images_[0-9][0-9][0-9]/images")):
        for p in folder.iterdir():
            found[p.name] = str(folder.relative_to(root))
    return found


def png_relpath(image_index: str, folders: dict[str, str] | None = None) -> str:
    """``images/00000001_000.png`` (or its Kaggle folder)."""
    folder = "images" if folders is None else folders.get(image_index, "images")
    return f"{folder}/{image_index}"


# ---------------------------------------------------------------- radiologists' boxes
BBOX_NAME = "BBox_List_2017.csv"
BBOX_FRAME = 1024  # the boxes' coordinates are in the 1024 x 1024 frame NIH resized every PNG to
# NIH box labels -> FINDINGS_ALL (None: a finding outside the 14 columns; its boxes are not used)
BOX_LABELS = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
              "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Infiltrate": None, "Infiltration": None,
              "Mass": None, "Nodule": None}
BOX_COLUMNS = ["dicom_id", "finding", "x0", "y0", "x1", "y1", "reader"]


def bbox_path(root: str | Path) -> Path | None:
    """``root/BBox_List_2017.csv`` (or ``.csv.gz``), or None when the archive has no box table."""
    for suffix in ("", ".gz"):
        if (Path(root) / (BBOX_NAME + suffix)).exists():
            return Path(root) / (BBOX_NAME + suffix)
    return None


def read_bboxes(path: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """Radiologists' boxes as ``BOX_COLUMNS`` (x0, y0, x1, y1 as fractions of the image's width and
    height), and rejects (id, reason) for rows that cannot be boxes.

    The real header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: the bracketed name spans four
    columns (its comma splits it, three unnamed columns follow), so the coordinates are read by
    position after checking the first two names. ``Effusion`` is pleural effusion."""
    header = header_of(path)
    if header[:2] != ["Image Index", "Finding Label"] or len(header) < 6:
        raise ValueError(f"{path}: header {header[:6]} is not NIH's 'Image Index,Finding Label,Bbox [x,y,w,h],,,'")
    raw = read_table(path, header=None, skiprows=1, usecols=range(6), dtype=str, keep_default_na=False)
    raw.columns = ["dicom_id", "label", "x", "y", "w", "h"]
    xywh = raw[["x", "y", "w", "h"]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    x, y, w, h = xywh.T
    bad = ~np.isfinite(xywh).all(1) | (w <= 0) | (h <= 0) | (x < 0) | (y < 0) \
        | (x + w > BBOX_FRAME + 1e-6) | (y + h > BBOX_FRAME + 1e-6)
    unknown = ~raw["label"].isin(list(BOX_LABELS))
    rejects = [{"id": str(i)[:80], "stage": "cohort", "reason": f"{BBOX_NAME} row: " + (
               f"unknown Finding Label {lab[:40]!r}" if unk else "box is not inside the 1024 x 1024 frame")}
               for i, lab, unk, b in zip(raw["dicom_id"], raw["label"], unknown, bad) if unk or b]
    keep = ~(bad | unknown)
    out = pd.DataFrame({"dicom_id": raw["dicom_id"].str.strip(), "finding": raw["label"].map(BOX_LABELS),
                        "x0": x / BBOX_FRAME, "y0": y / BBOX_FRAME, "x1": (x + w) / BBOX_FRAME,
                        "y1": (y + h) / BBOX_FRAME, "reader": 0})[keep]
    return out[out["finding"].notna()].reset_index(drop=True)[BOX_COLUMNS], rejects


class NIH(Archive):
    kind = "nih"
    id_rule = staticmethod(id_problem)  # the module's id check, applied by Archive.id_problem
    name = "NIH ChestX-ray14"
    chexmask_file = "ChestX-Ray8"
    id_name = "Image Index"
    tables = {"metadata": "Data_Entry_2017_v2020.csv", "labels": "Data_Entry_2017_v2020.csv",
              "split": "train_val_list.txt / test_list.txt"}
    image_formats = ("PNG",)

    def read(self, cfg) -> ArchiveTables:
        root = Path(cfg.archive.root)
        entries = read_data_entry(root)
        split = read_split_lists(root)
        unlisted = sorted(set(split["dicom_id"]) - set(entries["dicom_id"]))
        rejects = [{"id": i[:80], "stage": "cohort", "reason": f"in the split lists but has no row in {DATA_ENTRY_NAMES[0]}"}
                   for i in unlisted]
        boxes = None
        if (path := bbox_path(root)) is not None:
            boxes, box_rejects = read_bboxes(path)
            rejects += box_rejects
        return ArchiveTables(entries, entries, split, kind=self.kind, rejects=rejects, image_folders=image_folders(root),
                             boxes=boxes)

    def relpath(self, tables: ArchiveTables, row) -> str:
        return png_relpath(row["dicom_id"], tables.image_folders)

    def input_files(self, root: Path) -> list[Path]:
        files = [data_entry_path(root), *(Path(root) / name for name in SPLIT_LISTS)]
        return files + [p for p in [bbox_path(root)] if p is not None]
