"""Faults the phantom plants (``--faults``), one of each bad input the pipeline must reject with a reason."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ._io import jpeg_bytes
from .config import FINDINGS
from .sources.mimic import jpg_relpath

FAULTS = ("missing_jpeg", "empty_jpeg", "truncated_jpeg", "corrupt_jpeg", "rle_odd_count",
          "rle_decreasing_starts", "rle_out_of_bounds", "mask_size_mismatch", "jpeg_size_mismatch",
          "missing_mask_row", "missing_label_row", "duplicate_label_row", "blank_view")


def plant_faults(mimic_root: Path, meta: pd.DataFrame, labels: pd.DataFrame, masks: pd.DataFrame, rng):
    """Plant one of each bad input on otherwise-eligible images.

    Returns what was planted where, and the (modified copies of the) three tables.
    """
    meta, labels, masks = meta.copy(), labels.copy(), masks.copy()
    eligible = set(masks["dicom_id"][masks["Dice RCA (Mean)"] >= 0.7])
    positive_studies = set(labels["study_id"][(labels[list(FINDINGS)] == 1).any(axis=1)])
    # one image per study, so that each fault owns its study
    meta_ok = meta[meta["dicom_id"].isin(eligible) & meta["study_id"].isin(positive_studies)
                   & (meta["Rows"] != meta["Columns"])].drop_duplicates("study_id")
    picks = meta_ok.sample(len(FAULTS), random_state=int(rng.integers(2 ** 31))).to_dict("records")
    planted = []
    for fault, row in zip(FAULTS, picks):
        path = mimic_root / jpg_relpath(row["subject_id"], row["study_id"], row["dicom_id"])
        m = masks.index[masks["dicom_id"] == row["dicom_id"]]
        if fault == "missing_jpeg":
            path.unlink()
        elif fault == "empty_jpeg":
            path.write_bytes(b"")
        elif fault == "truncated_jpeg":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        elif fault == "corrupt_jpeg":
            path.write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(4000))
        elif fault == "rle_odd_count":
            masks.loc[m, "Heart"] = masks.loc[m, "Heart"].str.rsplit(" ", n=1).str[0]
        elif fault == "rle_decreasing_starts":
            v = masks.loc[m, "Left Lung"].iloc[0].split()
            v[0:2], v[2:4] = v[2:4], v[0:2]
            masks.loc[m, "Left Lung"] = " ".join(v)
        elif fault == "rle_out_of_bounds":
            masks.loc[m, "Right Lung"] += f" {row['Rows'] * row['Columns'] + 5} 10"
        elif fault == "mask_size_mismatch":  # Height/Width swapped against the metadata
            masks.loc[m, ["Height", "Width"]] = [row["Columns"], row["Rows"]]
        elif fault == "jpeg_size_mismatch":  # the JPEG on disk is not the image the tables describe
            with Image.open(path) as im:
                small = im.resize((im.width - 7, im.height - 5))
            path.write_bytes(jpeg_bytes(np.asarray(small)))
        elif fault == "missing_mask_row":
            masks = masks.drop(index=m)
        elif fault == "missing_label_row":
            labels = labels[labels["study_id"] != row["study_id"]]
        elif fault == "duplicate_label_row":
            labels = pd.concat([labels, labels[labels["study_id"] == row["study_id"]]], ignore_index=True)
        elif fault == "blank_view":
            meta.loc[meta["dicom_id"] == row["dicom_id"], "ViewPosition"] = None
        planted.append({"fault": fault, "dicom_id": row["dicom_id"], "study_id": int(row["study_id"])})
    return planted, meta, labels, masks.reset_index(drop=True)
