"""Faults the phantom plants (``--faults``), one of each bad input the pipeline must reject with a reason."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..findings import FINDINGS

FAULTS = ("missing_jpeg", "empty_jpeg", "truncated_jpeg", "corrupt_jpeg", "rle_odd_count",
          "rle_decreasing_starts", "rle_out_of_bounds", "mask_size_mismatch", "jpeg_size_mismatch",
          "missing_mask_row", "missing_label_row", "duplicate_label_row", "blank_view", "bad_label_value")


def plant_faults(root: Path, meta: pd.DataFrame, labels: pd.DataFrame, masks: pd.DataFrame, rng, layout):
    """Plant one of each bad input on otherwise-eligible images (files under ``root``, at each
    row's ``relpath``; tables in the generator's internal model, which ``layout``, a
    ``phantom.layouts.Layout``, then writes).

    Returns what was planted where, and the (modified copies of the) three tables.
    """
    meta, labels, masks = meta.copy(), labels.copy(), masks.copy()
    labels[list(FINDINGS)] = labels[list(FINDINGS)].astype(object)  # room for a bad label value
    eligible = set(masks["dicom_id"][masks["Dice RCA (Mean)"] >= 0.7])
    positive = (labels[list(FINDINGS)] == 1).any(axis=1)
    positive_keys = set(zip(labels.loc[positive, "subject_id"], labels.loc[positive, "study_id"]))
    # one image per study, so that each fault owns its study
    in_positive = [k in positive_keys for k in zip(meta["subject_id"], meta["study_id"])]
    meta_ok = meta[meta["dicom_id"].isin(eligible) & pd.Series(in_positive, index=meta.index)
                   & ((meta["Rows"] != meta["Columns"]) | layout.square)].drop_duplicates(["subject_id", "study_id"])
    faults = [f for f in FAULTS if f not in layout.faults_not_in_layout]
    if len(meta_ok) < len(faults):  # a tiny phantom: fewer studies than faults to plant
        raise ValueError(f"phantom: {len(meta_ok)} studies can carry a planted fault, {len(faults)} are planted; "
                         f"use more patients (--set phantom.n_patients=...) or --no-faults")
    picks = meta_ok.sample(len(faults), random_state=int(rng.integers(2 ** 31))).to_dict("records")
    planted = []
    for fault, row in zip(faults, picks):
        path = root / row["relpath"]
        m = masks.index[masks["dicom_id"] == row["dicom_id"]]
        study = (labels["subject_id"] == row["subject_id"]) & (labels["study_id"] == row["study_id"])
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
        elif fault == "mask_size_mismatch":  # Height/Width swapped against the image (taller: square images)
            masks.loc[m, ["Height", "Width"]] = ([row["Columns"], row["Rows"]] if row["Rows"] != row["Columns"]
                                                 else [row["Rows"] + 16, row["Columns"]])
        elif fault == "jpeg_size_mismatch":  # the file on disk is not the image the tables describe
            path.write_bytes(layout.resized(path.read_bytes(), rng))  # another aspect ratio: not a downscaled copy either
        elif fault == "missing_mask_row":
            masks = masks.drop(index=m)
        elif fault == "missing_label_row":
            labels = labels[~study]
        elif fault == "duplicate_label_row":
            labels = pd.concat([labels, labels[study]], ignore_index=True)
        elif fault == "blank_view":
            meta.loc[meta["dicom_id"] == row["dicom_id"], "ViewPosition"] = None
        elif fault == "bad_label_value":  # a label cell that is not 1, 0, -1 or blank
            first = next(c for c in FINDINGS if (labels.loc[study, c] == 1).any())
            labels.loc[study, first] = "yes"
        planted.append({"fault": fault, "dicom_id": row["dicom_id"], "subject_id": int(row["subject_id"]),
                        "study_id": int(row["study_id"])})
    return planted, meta, labels, masks.reset_index(drop=True)
