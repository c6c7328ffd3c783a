"""Bring your own archive (``archive.kind: generic``; docs/archives.md): one manifest CSV and a mask table.

``<archive.root>/manifest.csv``, columns read by name:

- ``image`` (required): the image file, relative to ``archive.root`` (PNG or JPEG); it is the image's id;
- ``patient`` (required): any text that names the patient (splits never divide a patient);
- ``study`` (optional, default: one study per image), ``view`` (optional, default ``PA``; ``cohort.views``
  filters on it), ``split`` (optional: ``train``, ``validate`` or ``test``; without a test split the
  cohort draws a seeded, patient-disjoint one);
- one column per finding, named as in ``findings.FINDINGS_ALL`` (``Atelectasis``, ``Pleural Effusion``, ...):
  1 (present), 0 (absent), -1 (uncertain) or blank; a finding without a column is blank everywhere.

Masks: ``archive.chexmask_csv`` in CheXmask's format (``Right Lung``, ``Left Lung``, ``Heart`` as RLE in
the image's own frame, ``Height``, ``Width``, ``Dice RCA (Mean)``, ``Dice RCA (Max)``), keyed by an ``image``
column that holds the manifest's ``image``. Masks drawn as PNGs (one per structure, or one for both
lungs) become such a table with ``write_mask_table`` (manual masks are given quality 1.0).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from ..findings import FINDINGS_ALL
from ._tables import read_table, require_columns
from .archive import Archive, ArchiveTables
from .chexmask import GENERIC_MASK_TABLE, ID_COLUMNS, MASK_COLUMNS, QUALITY_MAX, QUALITY_MEAN, encode_rle

MANIFEST = "manifest.csv"
REQUIRED = ("image", "patient")
OPTIONAL = ("study", "view", "split")
SPLITS = {"train": "train", "validate": "validate", "val": "validate", "test": "test", "": "train"}
LABELS = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": np.nan}
_IMAGE = re.compile(r"[\w\-. /]{1,240}\.(png|jpg|jpeg)", re.IGNORECASE)
MAX_TEXT = 200


def number_of(text: str) -> int:
    """The int64 id of a patient or study name (the first 60 bits of its SHA-1: ids of any form)."""
    return int(hashlib.sha1(str(text).encode()).hexdigest()[:15], 16)


def id_problem(image, subject_id, study_id) -> str | None:
    """Why a manifest row's image is not a plain relative PNG/JPEG path inside the archive, or None."""
    name = str(image).strip() if image is not None else ""
    rel = PurePosixPath(name)
    if not _IMAGE.fullmatch(name) or rel.is_absolute() or ".." in rel.parts or "" in name.split("/"):
        return f"image {name[:60]!r} is not a relative .png/.jpg path inside archive.root"
    for what, value in (("patient", subject_id), ("study", study_id)):
        if not str(value).isdigit():
            return f"{what} of {name[:60]!r} is missing"
    return None


def read_manifest(root: str | Path) -> pd.DataFrame:
    """The manifest's rows with the canonical columns (docs/archives.md) and ``label_problem``."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; a generic archive is a folder with manifest.csv "
                                f"(image, patient, [study, view, split], finding columns)")
    require_columns(path, REQUIRED)
    raw = read_table(path, dtype=str, keep_default_na=False)
    text = {c: (raw[c] if c in raw else pd.Series([""] * len(raw))).astype(str).str.strip().str[:MAX_TEXT]
            for c in (*REQUIRED, *OPTIONAL)}
    study = text["study"].where(text["study"] != "", text["image"])
    df = pd.DataFrame({"dicom_id": text["image"],
                       "subject_id": [str(number_of(p)) if p else "" for p in text["patient"]],
                       "study_id": [str(number_of(f"{p}/{s}")) for p, s in zip(text["patient"], study)],
                       "ViewPosition": text["view"].where(text["view"] != "", "PA"),
                       "Rows": np.nan, "Columns": np.nan, "split": text["split"].str.lower()})
    problems = [None if s in SPLITS else f"split {s[:20]!r} is not train, validate or test" for s in df["split"]]
    for col in FINDINGS_ALL:
        cells = raw[col].astype(str).str.strip() if col in raw else pd.Series([""] * len(raw))
        df[col] = cells.map(LABELS).astype(np.float32)
        for i in np.flatnonzero(~cells.isin(list(LABELS)).to_numpy()):
            problems[i] = problems[i] or f"{col} {cells.iloc[i][:20]!r} is not 1, 0, -1 or blank"
    df["split"] = df["split"].map(SPLITS).fillna("train")
    df["label_problem"] = problems
    return df


class Generic(Archive):
    kind = "generic"
    id_rule = staticmethod(id_problem)
    name = "generic archive"
    chexmask_file = GENERIC_MASK_TABLE
    id_name = "image"
    tables = {"metadata": MANIFEST, "labels": MANIFEST, "split": f"{MANIFEST} (split column)"}
    label_key = ("dicom_id",)
    sizes_in_tables = False  # the mask table's Height x Width is checked against the image itself
    image_formats = ("PNG", "JPEG")
    absent_structures = True  # e.g. lungs only: the heart is then an empty mask, drawn as nothing

    def read(self, cfg) -> ArchiveTables:
        entries = read_manifest(cfg.archive.root)
        return ArchiveTables(entries, entries, entries[["dicom_id", "split"]], kind=self.kind)

    def relpath(self, tables: ArchiveTables, row) -> str:
        return str(row["dicom_id"])

    def input_files(self, root: Path) -> list[Path]:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no manifest")
        return [path]


def _mask(path: Path, shape: tuple[int, int] | None) -> np.ndarray:
    with Image.open(path, formats=("PNG",)) as im:
        mask = np.asarray(im.convert("L")) > 127
    if shape is not None and mask.shape != shape:
        raise ValueError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]}, its image {shape[0]}x{shape[1]}")
    return mask


def split_lungs(lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right lung, left lung) of a mask covering both: the two largest connected regions, the one on the
    image's left being the patient's right (a frontal view); ValueError if there are not two."""
    labelled, n = ndimage.label(lungs)
    if n < 2:
        raise ValueError(f"a both-lungs mask with {n} connected region(s); expected two")
    sizes = ndimage.sum(lungs, labelled, range(1, n + 1))
    a, b = (np.argsort(sizes)[::-1][:2] + 1).tolist()
    centre = {k: ndimage.center_of_mass(labelled == k)[1] for k in (a, b)}
    right, left = sorted((a, b), key=lambda k: centre[k])
    return labelled == right, labelled == left


def write_mask_table(root: str | Path, out_csv: str | Path, masks: dict[str, dict[str, str]]) -> Path:
    """A CheXmask-format mask table from PNG masks: ``masks`` maps each manifest ``image`` to its mask
    files relative to ``root``: ``right_lung``, ``left_lung``, ``heart``, or ``lungs`` (both lungs in one
    file: ``split_lungs``). A structure without a mask is an empty mask. Quality 1.0 (manual masks)."""
    rows = []
    for image, files in masks.items():
        with Image.open(Path(root) / image, formats=("PNG", "JPEG")) as im:
            shape = (im.height, im.width)
        found = {k: _mask(Path(root) / v, shape) for k, v in files.items()}
        if "lungs" in found:
            found["right_lung"], found["left_lung"] = split_lungs(found.pop("lungs"))
        empty = np.zeros(shape, bool)
        rows.append({ID_COLUMNS[GENERIC_MASK_TABLE]: image, QUALITY_MEAN: 1.0, QUALITY_MAX: 1.0, "Landmarks": "",
                     **{col: encode_rle(found.get(name, empty)) for name, col in MASK_COLUMNS.items()},
                     "Height": shape[0], "Width": shape[1]})
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out, index=False)
    return out
