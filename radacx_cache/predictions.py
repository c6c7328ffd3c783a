"""Prediction files: one CSV per (arm, test image variant) plus a JSON of provenance beside it.

``predictions/<arm>/<image-variant>.csv`` has one row per test image of the shards, in the shard
index's order: ``dicom_id, subject_id, study_id``, ``target_<class>`` and ``prob_<class>`` for
each class. Written by zeroshot, probe and finetune; read by the report.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import write_csv, write_json


class PredictionError(ValueError):
    """A prediction file is incomplete, misaligned or does not belong to the current shards."""


@dataclass
class Predictions:
    frame: pd.DataFrame
    classes: list[str]
    proba: np.ndarray
    targets: np.ndarray
    meta: dict = field(default_factory=dict)
    path: Path | None = None


def write_predictions(path: str | Path, rows: pd.DataFrame, proba: np.ndarray, classes, meta: dict) -> None:
    """Write ``proba`` (N, K) for the index ``rows`` (N) of the test split, and its provenance."""
    path = Path(path)
    proba = np.asarray(proba)
    if proba.shape != (len(rows), len(classes)):
        raise PredictionError(f"{path}: probabilities of shape {proba.shape} for {len(rows)} rows and "
                              f"{len(classes)} classes")
    df = rows[["dicom_id", "subject_id", "study_id"]].reset_index(drop=True).copy()
    for c in classes:
        df[f"target_{c}"] = rows[f"target_{c}"].to_numpy()
    for j, c in enumerate(classes):
        df[f"prob_{c}"] = proba[:, j]
    write_csv(path, df)
    write_json(path.with_suffix(".json"), meta)


def load_predictions(path: str | Path) -> Predictions:
    path = Path(path)
    df = pd.read_csv(path, dtype={"dicom_id": str})
    classes = [c[len("prob_"):] for c in df.columns if c.startswith("prob_")]
    proba = df[[f"prob_{c}" for c in classes]].to_numpy(float)
    targets = df[[f"target_{c}" for c in classes]].to_numpy(float)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return Predictions(df, classes, proba, targets, meta, path)
