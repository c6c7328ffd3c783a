"""The CheXpert (-small) layout of the phantom."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ...findings import FINDINGS_ALL
from ...sources import chexpert
from .base import SMALL_SCALE, _label_cell, _OpenArchiveLayout, _write_csv


class CheXpertLayout(_OpenArchiveLayout):
    """``CheXpert-v1.0-small/{train,valid}.csv`` and ``{train,valid}/patientNNNNN/studyN/viewN_*.jpg``,
    downscaled from CheXmask's frame as the widely used -small copy is."""
    name = "chexpert"
    subdir = "chexpert"
    chexmask_file = "CheXpert"
    faults_not_in_layout = {"missing_label_row"}  # the table row *is* the image's only record
    prefix = chexpert.PREFIXES[0]

    def split(self, rng) -> str:
        return "test" if rng.random() < 0.15 else "train"

    def study_id(self, study_pool, study_number: int) -> int:
        return study_number + 1  # studyN: 1, 2, ... per patient

    def image_id(self, rng, subject, study, study_number, view_number, view, split) -> str:
        table = "valid" if split == "test" else "train"
        kind = "lateral" if view == "LATERAL" else "frontal"
        return f"{table}/patient{subject:05d}/study{study}/view{view_number + 1}_{kind}.jpg"

    def relpath(self, row: dict, split: str = "train") -> str:
        return chexpert.jpg_relpath(self.prefix, row["dicom_id"])

    def stored_size(self, height: int, width: int) -> tuple[int, int]:
        return round(height * SMALL_SCALE), round(width * SMALL_SCALE)

    def write_tables(self, root: Path, meta, labels, split, rng, truth_rows=()) -> None:
        df = meta.merge(labels, on=["subject_id", "study_id"], how="inner")
        n = len(df)
        lateral = df["ViewPosition"] == "LATERAL"
        table = pd.DataFrame({
            "Path": self.prefix + "/" + df["dicom_id"], "Sex": rng.choice(["Female", "Male"], n),
            "Age": rng.integers(20, 90, n), "Frontal/Lateral": np.where(lateral, "Lateral", "Frontal"),
            "AP/PA": np.where(lateral, None, df["ViewPosition"])})
        for col in chexpert_label_order():
            table[col] = [_label_cell(v) for v in df[col]]
        is_valid = df["dicom_id"].str.startswith("valid/")
        for name, rows in (("train", ~is_valid), ("valid", is_valid)):
            _write_csv(root / self.prefix / f"{name}.csv", table[rows.to_numpy()], gz=False)


def chexpert_label_order() -> list[str]:
    """The 14 label columns in the order of CheXpert's train.csv."""
    return ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices"]


assert sorted(chexpert_label_order()) == sorted(FINDINGS_ALL)
