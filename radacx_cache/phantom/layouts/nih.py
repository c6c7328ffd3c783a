"""The NIH ChestX-ray14 layout of the phantom."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..._io import atomic_path
from ...findings import FINDINGS
from ...sources import nih
from .base import _OpenArchiveLayout, region_boxes


class NIHLayout(_OpenArchiveLayout):
    """``Data_Entry_2017_v2020.csv``, ``train_val_list.txt``, ``test_list.txt``, ``images/*.png``."""
    name = "nih"
    subdir = "ChestXray-NIHCC"
    chexmask_file = "ChestX-Ray8"
    square = True
    frontal_only = True
    rgba_share = 0.02  # a few released PNGs are RGBA

    def split(self, rng) -> str:
        return "test" if rng.random() < 0.2 else "train"

    def study_id(self, study_pool, study_number: int) -> int:
        return study_number  # Follow-up #: 0, 1, ... per patient

    def image_id(self, rng, subject, study, study_number, view_number, view, split) -> str:
        return f"{subject:08d}_{study:03d}.png"

    def relpath(self, row: dict, split: str = "train") -> str:
        return nih.png_relpath(row["dicom_id"])

    def encode(self, pixels: np.ndarray, rng) -> bytes:
        im = Image.fromarray(pixels)
        if rng.random() < self.rgba_share:
            im = im.convert("RGBA")
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    def write_boxes(self, root: Path, truth_rows: list[dict]) -> None:
        """``BBox_List_2017.csv`` in NIH's exact format (header ``Bbox [x,y,w,h],,,``, coordinates in the
        1024 x 1024 frame): one box around each connected region where a finding NIH boxes was drawn."""
        names = {v: k for k, v in nih.BOX_LABELS.items() if v}
        rows = []
        for t in truth_rows:
            if t["finding"] not in names:
                continue
            fy, fx = nih.BBOX_FRAME / t["Height"], nih.BBOX_FRAME / t["Width"]
            for x0, y0, x1, y1 in region_boxes(t):
                rows.append(f"{t['dicom_id']},{names[t['finding']]},{x0 * fx!r},{y0 * fy!r},{(x1 - x0) * fx!r},"
                            f"{(y1 - y0) * fy!r}\n")
        with atomic_path(root / nih.BBOX_NAME) as tmp:
            tmp.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + "".join(rows))

    def write_tables(self, root: Path, meta, labels, split, rng, truth_rows=()) -> None:
        df = meta.merge(labels, on=["subject_id", "study_id"], how="inner")  # a study without labels: no row
        names = {v: k for k, v in nih.NIH_LABELS.items() if v}
        finding_labels = []
        for row in df.to_dict("records"):
            tokens = [names[c] for c in names if c != "No Finding" and row[c] == 1]
            tokens += [str(row[c]) for c in FINDINGS if isinstance(row[c], str)]  # a planted bad label
            finding_labels.append("|".join(tokens) or "No Finding")
        n = len(df)
        entry = pd.DataFrame({
            "Image Index": df["dicom_id"], "Finding Labels": finding_labels, "Follow-up #": df["study_id"],
            "Patient ID": df["subject_id"], "Patient Age": rng.integers(20, 90, n),
            "Patient Gender": rng.choice(["M", "F"], n), "View Position": df["ViewPosition"],
            # the size *before* NIH resized the PNGs to 1024 x 1024: never the PNG's size
            "OriginalImage[Width": rng.integers(2000, 3000, n), "Height]": rng.integers(2000, 3000, n),
            "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143})
        # the real header: two bracketed names, each holding a comma, make four columns
        header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                  "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
        root.mkdir(parents=True, exist_ok=True)
        with atomic_path(root / nih.DATA_ENTRY_NAMES[0]) as tmp:
            tmp.write_text(header + entry.to_csv(index=False, header=False))
        for list_name, which in nih.SPLIT_LISTS.items():
            ids = split.loc[split["split"].replace({"validate": "train"}) == which, "dicom_id"]
            with atomic_path(root / list_name) as tmp:
                tmp.write_text("".join(f"{i}\n" for i in sorted(ids)))
