"""The generic layout of the phantom (``archive.kind: generic``): the folder a researcher brings."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ...findings import FINDINGS_ALL
from ...sources.chexmask import GENERIC_MASK_TABLE
from ...sources.generic import MANIFEST
from .base import _label_cell, _OpenArchiveLayout, _write_csv


class GenericLayout(_OpenArchiveLayout):
    """``manifest.csv`` (image, patient, study, view, split, one column per finding) and
    ``images/<patient>_<study>_<view>.png`` (8-bit grey), with the masks in CheXmask's format keyed by
    the manifest's ``image``. A blank view is ``PA`` in this format, so the phantom plants none."""
    name = "generic"
    subdir = "generic"
    chexmask_file = GENERIC_MASK_TABLE
    faults_not_in_layout = {"missing_label_row", "blank_view"}  # labels live in the image's row; blank = PA

    def image_id(self, rng, subject, study, study_number, view_number, view, split) -> str:
        return f"images/p{subject:05d}_s{study_number + 1}_v{view_number + 1}.png"

    def relpath(self, row: dict, split: str = "train") -> str:
        return row["dicom_id"]

    def encode(self, pixels: np.ndarray, rng) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        return buf.getvalue()

    def write_tables(self, root: Path, meta, labels, split, rng, truth_rows=()) -> None:
        df = meta.merge(labels, on=["subject_id", "study_id"], how="inner").merge(
            split[["dicom_id", "split"]], on="dicom_id", how="left")
        table = pd.DataFrame({"image": df["dicom_id"], "patient": "patient-" + df["subject_id"].astype(str),
                              "study": "study-" + df["study_id"].astype(str),
                              "view": df["ViewPosition"].fillna(""), "split": df["split"].fillna("")})
        for col in FINDINGS_ALL:
            table[col] = [_label_cell(v) for v in df[col]] if col in df else ""
        _write_csv(root / MANIFEST, table, gz=False)
