"""The archives the cohort reads, behind one contract (docs/archives.md).

Each kind's reader (``sources/``) returns ``ArchiveTables`` with canonical columns, so the cohort
policy (views, labels, masks, split) is written once:

- ``metadata``: one row per image: ``dicom_id`` (the image's id in its archive and in CheXmask: a
  MIMIC dicom_id, an NIH Image Index, a CheXpert path without its prefix), ``subject_id``,
  ``study_id`` (text until validated), ``ViewPosition``, ``Rows``, ``Columns`` (NaN where the
  archive's tables carry no image size) and what the kind needs to build the file path;
- ``labels``: FINDINGS_ALL columns (1, 0, -1, NaN) keyed by ``ArchiveKind.label_key``, and
  ``label_problem`` (None, or why the row's labels cannot be read);
- ``split``: ``dicom_id, split`` (train / validate / test: the archive's official assignment);
- ``rejects``: images the reader itself could not take, with their reasons.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .config import Config
from .sources import chexpert, mimic, nih, vindr
from .sources.chexmask import ID_COLUMNS, read_chexmask


@dataclass(frozen=True)
class ArchiveKind:
    name: str
    chexmask_file: str  # the CheXmask file of this archive (its id column: sources.chexmask.ID_COLUMNS)
    id_name: str  # what the archive calls an image's id, for reject reasons
    tables: dict  # what each canonical table is in the archive, for reject reasons
    label_key: tuple  # labels are per study (MIMIC) or per image
    sizes_in_tables: bool  # False: CheXmask's Height x Width is checked against the image itself
    scaled_copies: bool  # True: a downscaled copy of the archive is read when its aspect ratio agrees
    image_formats: tuple = ("JPEG",)  # the only formats its image files are opened as


KINDS = {
    "mimic": ArchiveKind("MIMIC-CXR-JPG", "MIMIC-CXR-JPG", "dicom_id",
                         {"metadata": "metadata", "labels": "{labeler} labels", "split": "split table"},
                         ("subject_id", "study_id"), True, False, ("JPEG",)),
    "nih": ArchiveKind("NIH ChestX-ray14", "ChestX-Ray8", "Image Index",
                       {"metadata": "Data_Entry_2017_v2020.csv", "labels": "Data_Entry_2017_v2020.csv",
                        "split": "train_val_list.txt / test_list.txt"}, ("dicom_id",), False, False, ("PNG",)),
    "chexpert": ArchiveKind("CheXpert", "CheXpert", "Path",
                            {"metadata": "train.csv / valid.csv", "labels": "train.csv / valid.csv",
                             "split": "train.csv / valid.csv"}, ("dicom_id",), False, True, ("JPEG",)),
    "vindr": ArchiveKind("VinDr-CXR", "VinDr-CXR", "image_id",
                         {"metadata": "annotations_*.csv", "labels": "annotations_*.csv",
                          "split": "annotations_train.csv / annotations_test.csv"}, ("dicom_id",), False, False,
                         ("DICOM",)),
}


@dataclass
class ArchiveTables:
    """An archive's tables with canonical columns, as the readers in ``sources`` return them."""
    metadata: pd.DataFrame
    labels: pd.DataFrame
    split: pd.DataFrame
    chexmask: pd.DataFrame | None = None
    kind: str = "mimic"
    rejects: list = field(default_factory=list)
    image_folders: dict | None = None  # NIH Kaggle copy: the images_NNN/images folder of each file
    boxes: pd.DataFrame | None = None  # radiologists' boxes (sources.nih.BOX_COLUMNS), where the archive has them
    boxes_in_pixels: bool = False  # VinDr: the boxes are in the image's pixels (the cohort makes them fractions)


def id_problem(kind: str, row) -> str | None:
    """Why a metadata row's identifiers are not this archive's, or None (then paths may be built)."""
    check = {"mimic": mimic.id_problem, "nih": nih.id_problem, "chexpert": chexpert.id_problem,
             "vindr": vindr.id_problem}[kind]
    return check(row["dicom_id"], row["subject_id"], row["study_id"])


def relpath(tables: ArchiveTables, row) -> str:
    """The image file of a validated row, relative to ``archive.root``."""
    if tables.kind == "mimic":
        return mimic.jpg_relpath(row["subject_id"], row["study_id"], row["dicom_id"])
    if tables.kind == "nih":
        return nih.png_relpath(row["dicom_id"], tables.image_folders)
    if tables.kind == "vindr":
        return vindr.dicom_relpath(row["prefix"], row["dicom_id"])
    return chexpert.jpg_relpath(row["prefix"], row["dicom_id"])


def read_archive_tables(cfg: Config, with_chexmask: bool = True) -> ArchiveTables:
    """Read the archive's tables (and, for small archives and tests, the whole CheXmask table)."""
    root = Path(cfg.archive.root)
    if not root.is_dir():
        raise FileNotFoundError(f"archive.root {root} is not a folder (unmounted, or a wrong path?); "
                                f"nothing was rejected or written")
    kind = cfg.archive.kind
    if kind == "mimic":
        tables = ArchiveTables(mimic.read_metadata(root), mimic.read_labels(root, cfg.archive.labeler),
                               mimic.read_split(root))
    elif kind == "nih":
        tables = _nih_tables(root)
    elif kind == "vindr":
        entries, split, boxes, rejects = vindr.read_tables(root, cfg.cohort.min_readers)
        tables = ArchiveTables(entries, entries, split, kind="vindr", rejects=rejects, boxes=boxes, boxes_in_pixels=True)
    else:
        entries = chexpert.read_tables(root)
        tables = ArchiveTables(entries, entries, entries[["dicom_id", "split"]], kind="chexpert")
    if with_chexmask:
        frontal_ids = tables.metadata.loc[tables.metadata["ViewPosition"].isin(cfg.cohort.views), "dicom_id"]
        tables.chexmask = read_chexmask(cfg.archive.chexmask_csv, id_column=chexmask_id_column(cfg), ids=frontal_ids)
    return tables


def _nih_tables(root: Path) -> ArchiveTables:
    entries = nih.read_data_entry(root)
    split = nih.read_split_lists(root)
    unlisted = sorted(set(split["dicom_id"]) - set(entries["dicom_id"]))
    rejects = [{"id": i[:80], "stage": "cohort", "reason": f"in the split lists but has no row in {nih.DATA_ENTRY_NAMES[0]}"}
               for i in unlisted]
    boxes = None
    if (path := nih.bbox_path(root)) is not None:
        boxes, box_rejects = nih.read_bboxes(path)
        rejects += box_rejects
    return ArchiveTables(entries, entries, split, kind="nih", rejects=rejects, image_folders=nih.image_folders(root),
                         boxes=boxes)


def chexmask_id_column(cfg: Config) -> str:
    """The image-id column of this archive's CheXmask file (``Image Index`` for NIH, ...)."""
    return ID_COLUMNS[KINDS[cfg.archive.kind].chexmask_file]


def input_files(cfg: Config) -> list[Path]:
    """Every table the cohort reads: a change to any of them (size, mtime) invalidates it."""
    root = Path(cfg.archive.root)
    try:
        if cfg.archive.kind == "mimic":
            files = sorted(root.glob(f"{mimic.PREFIX}-*.csv*"))
        elif cfg.archive.kind == "nih":
            files = [nih.data_entry_path(root), *(root / name for name in nih.SPLIT_LISTS)]
            files += [p for p in [nih.bbox_path(root)] if p is not None]
        elif cfg.archive.kind == "vindr":
            files = list(vindr.table_paths(root).values())
        else:
            files = list(chexpert.table_paths(root).values())
    except FileNotFoundError:  # the readers say what is missing, and where, when they run
        files = []
    return files + [Path(cfg.archive.chexmask_csv)]
