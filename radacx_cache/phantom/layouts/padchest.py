"""The PadChest (BIMCV) layout of the phantom."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..._io import stable_hash
from ...findings import FINDINGS
from ...sources.padchest import TABLE_NAME
from .base import _OpenArchiveLayout, _write_csv


class PadChestLayout(_OpenArchiveLayout):
    """BIMCV's PadChest: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz`` (one row per image,
    the report's terms as a Python-list string in ``Labels``, ``MethodLabel`` Physician or RNN_model)
    and ``<ImageDir>/<ImageID>``: 16-bit PNGs with 12 or 10 bits stored. No official split. Its CheXmask
    file, like the real ``Padchest.csv``, has Dice RCA (Mean) above (Max) on about 60% of its rows."""
    name = "padchest"
    subdir = "padchest"
    chexmask_file = "Padchest"
    faults_not_in_layout = {"missing_label_row"}  # the table row is the image's only record
    terms = {"Atelectasis": ("atelectasis", "laminar atelectasis", "segmental atelectasis", "lobar atelectasis"),
             "Cardiomegaly": ("cardiomegaly",), "Consolidation": ("consolidation",), "Edema": ("pulmonary edema",),
             "Pleural Effusion": ("pleural effusion", "loculated pleural effusion")}
    distractors = ("pericardial effusion", "costophrenic angle blunting", "aortic elongation", "scoliosis")
    physician_share = 0.25
    unusable_share = 0.01  # 'suboptimal study' / 'exclude': the labellers' marks for unusable images

    def split(self, rng) -> str:
        return "train"  # PadChest publishes no split (the cohort draws a seeded test split)

    def study_id(self, study_pool, study_number: int) -> int:
        return int(next(study_pool))

    def image_id(self, rng, subject, study, study_number, view_number, view, split) -> str:
        code = "".join(rng.choice(list("0123456789abcdefghijklmnopqrstuvwxyz"), 6))
        return f"{_padchest_study(study)}_{code}.png"

    @staticmethod
    def image_dir(dicom_id: str) -> int:
        return int(stable_hash(dicom_id)[:6], 16) % 55  # the release's 0/ ... 54/

    def relpath(self, row: dict, split: str = "train") -> str:
        return f"{self.image_dir(row['dicom_id'])}/{row['dicom_id']}"

    def encode(self, pixels: np.ndarray, rng) -> bytes:
        bits = 12 if rng.random() < 0.9 else 10
        values = np.round(pixels.astype(np.float64) / 255 * (2 ** bits - 1) * 0.9 + rng.uniform(20, 200))
        buf = io.BytesIO()
        Image.fromarray(np.clip(values, 0, 2 ** bits - 1).astype(np.uint16)).save(buf, "PNG")
        return buf.getvalue()

    def write_tables(self, root: Path, meta, labels, split, rng, truth_rows=()) -> None:
        df = meta.merge(labels, on=["subject_id", "study_id"], how="inner")
        cells, methods = [], []
        for row in df.to_dict("records"):
            bad = [row[c] for c in FINDINGS if isinstance(row[c], str)]
            if bad:  # a planted bad label: a cell that is not a list of terms
                cells.append(str(bad[0]))
            else:
                terms = [str(rng.choice(self.terms[c])) for c in FINDINGS if row[c] == 1]
                terms += [str(rng.choice(self.distractors))] if rng.random() < 0.3 else []
                terms += [str(rng.choice(["suboptimal study", "exclude"]))] if rng.random() < self.unusable_share else []
                cells.append(str(terms or ["normal"]))
            methods.append("Physician" if rng.random() < self.physician_share else "RNN_model")
        n = len(df)
        projection = df["ViewPosition"].replace({"LATERAL": "L"})
        table = pd.DataFrame({
            "ImageID": df["dicom_id"], "ImageDir": df["dicom_id"].map(self.image_dir),
            "StudyDate_DICOM": rng.integers(2009, 2018, n) * 10_000 + rng.integers(1, 13, n) * 100 + rng.integers(1, 29, n),
            "StudyID": df["study_id"].map(_padchest_study),
            "PatientID": df["subject_id"].map(lambda s: f"{10 ** 37 + int(s) * 7_919_000_000_001}"),
            "PatientBirth": rng.integers(1920, 2000, n).astype(float), "PatientSex_DICOM": rng.choice(["M", "F"], n),
            "ViewPosition_DICOM": projection.replace({"PA": "POSTEROANTERIOR", "AP": "ANTEROPOSTERIOR", "L": "LATERAL"}),
            "Projection": projection, "MethodProjection": "Manual review of DICOM fields", "Pediatric": "No",
            "Modality_DICOM": "CR", "BitsStored_DICOM": 12, "Rows_DICOM": df["Rows"], "Columns_DICOM": df["Columns"],
            "ReportID": rng.integers(10 ** 6, 10 ** 7, n), "Report": " hallazg .", "MethodLabel": methods,
            "Labels": cells, "Localizations": "[]"})
        _write_csv(root / (TABLE_NAME + ".gz"), table, gz=True)

    def write_chexmask(self, chexmask_dir: Path, masks: pd.DataFrame) -> Path:
        """``Padchest.csv``: Mean and Max in no fixed order, as in the real file (about 60% Mean > Max)."""
        masks = masks.copy()
        swap = masks["dicom_id"].map(lambda d: int(stable_hash(d)[:4], 16) % 10 < 6).to_numpy()
        mean, top = masks["Dice RCA (Mean)"].to_numpy().copy(), masks["Dice RCA (Max)"].to_numpy().copy()
        lo, hi = np.minimum(mean, top), np.maximum(mean, top)
        masks["Dice RCA (Mean)"], masks["Dice RCA (Max)"] = np.where(swap, hi, lo), np.where(swap, lo, hi)
        return super().write_chexmask(chexmask_dir, masks)


def _padchest_study(study: int) -> str:
    """A PadChest-like StudyID (a long digit string) for the generator's study number."""
    return f"2{int(study):08d}{int(study) * 7_654_321 % 10 ** 12:012d}"
