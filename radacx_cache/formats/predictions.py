"""Prediction files: one CSV per (arm, test image variant) plus a JSON of provenance beside it.

``predictions/<arm>/<image-variant>.csv`` has one row per test image of the shards, in the shard
index's order: ``dicom_id, subject_id, study_id``, then per class ``target_<class>`` (what training
fits), ``positive_<class>`` (multi-hot findings), ``uncertain_<class>`` (label -1) and
``prob_<class>``. The JSON beside it records the arm, the image variants, the model and the shard
set's fingerprint. ``predictions/<arm>/manifest.json`` is the arm's record (``write_arm_record``):
both variants' files with their sha256, the records they were made from (features, probes,
zero-shot prompts or the fine-tuned checkpoint) and the model, which the report and saliency take
from it. Written by zeroshot, probe and finetune; read by the report, which refuses a file that is
not complete for the current shards (``check_complete``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import write_csv, write_json
from ..arms import IMAGE_VARIANTS
from ..workdir import Workdir, sidecar_name
from .records import Record, Verifier, write_record


class PredictionError(ValueError):
    """A prediction file is incomplete, misaligned or does not belong to the current shards."""


@dataclass
class Predictions:
    frame: pd.DataFrame
    classes: list[str]
    proba: np.ndarray
    positives: np.ndarray
    uncertain: np.ndarray
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def patients(self) -> np.ndarray:
        return self.frame["subject_id"].to_numpy()


def write_predictions(path: str | Path, rows: pd.DataFrame, proba: np.ndarray, classes, meta: dict) -> None:
    """Write ``proba`` (N, K) for the index ``rows`` (N) of the test split, and its provenance."""
    path = Path(path)
    proba = np.asarray(proba)
    if proba.shape != (len(rows), len(classes)):
        raise PredictionError(f"{path}: probabilities of shape {proba.shape} for {len(rows)} rows and "
                              f"{len(classes)} classes")
    if not np.isfinite(proba).all():
        bad = rows["dicom_id"].to_numpy()[~np.isfinite(proba).all(1)]
        raise PredictionError(f"{path}: non-finite probabilities for {len(bad)} image(s), e.g. {bad[0]}")
    df = rows[["dicom_id", "subject_id", "study_id"]].reset_index(drop=True).copy()
    for kind in ("target", "positive", "uncertain"):
        for c in classes:
            df[f"{kind}_{c}"] = rows[f"{kind}_{c}"].to_numpy()
    for j, c in enumerate(classes):
        df[f"prob_{c}"] = proba[:, j]
    write_csv(path, df)
    write_json(path.with_name(sidecar_name(path.name)), meta)


def load_predictions(path: str | Path) -> Predictions:
    path = Path(path)
    df = pd.read_csv(path, dtype={"dicom_id": str})
    classes = [c[len("prob_"):] for c in df.columns if c.startswith("prob_")]
    missing = [f"{kind}_{c}" for kind in ("positive", "uncertain") for c in classes
               if f"{kind}_{c}" not in df.columns]
    if missing:
        raise PredictionError(f"{path}: no {missing[0]} column (written by an older version; rerun the "
                              f"stage that wrote it)")
    proba = df[[f"prob_{c}" for c in classes]].to_numpy(float)
    positives = df[[f"positive_{c}" for c in classes]].to_numpy(float)
    uncertain = df[[f"uncertain_{c}" for c in classes]].to_numpy(float)
    meta_path = path.with_name(sidecar_name(path.name))
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return Predictions(df, classes, proba, positives, uncertain, meta, path)


def check_complete(pred: Predictions, test_ids, shards_fingerprint: str, classes) -> None:
    """Refuse a prediction file that is not exactly one finite row per current test image.

    Raises PredictionError naming the file and the first offending image: a missing or extra row,
    a duplicate, non-finite probabilities, other classes, or another shard set's fingerprint.
    """
    where = pred.path or "predictions"
    made_from = pred.meta.get("shards_fingerprint")
    if made_from != shards_fingerprint:
        raise PredictionError(f"{where} was made from shard set {made_from}, the current shards are "
                              f"{shards_fingerprint}; rerun the stage that wrote it")
    if list(pred.classes) != list(classes):
        raise PredictionError(f"{where}: classes {pred.classes}, the shards have {list(classes)}")
    ids = pred.frame["dicom_id"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise PredictionError(f"{where}: image {dup.iloc[0]} has {int((ids == dup.iloc[0]).sum())} rows")
    want = pd.Index(pd.Series(test_ids).astype(str))
    missing, extra = want.difference(ids), pd.Index(ids).difference(want)
    if len(missing):
        raise PredictionError(f"{where}: no row for test image {missing[0]} ({len(missing)} missing)")
    if len(extra):
        raise PredictionError(f"{where}: image {extra[0]} is not a test image of the current shards "
                              f"({len(extra)} such rows)")
    bad = ~np.isfinite(pred.proba).all(1)
    if bad.any():
        raise PredictionError(f"{where}: non-finite probabilities for image {ids[bad].iloc[0]}")


def write_arm_record(work: Workdir, arm: str, command: str, upstream: list[Record], tested_on=IMAGE_VARIANTS,
                     **facts) -> Record:
    """An arm's record, written after its prediction files (one per test image variant in ``tested_on``):
    the commit point of the arm."""
    files = [p.name for v in tested_on for p in (work.predictions(arm, v), work.predictions_meta(arm, v))]
    return write_record(work.predictions_record(arm), work.root, "predictions", command, files=files,
                        upstream=upstream, arm=arm, tested_on=list(tested_on), **facts)


def arm_record(work: Workdir, arm: str, verifier: Verifier) -> Record:
    """An arm's verified record, with the chain above it (model caches or checkpoint, shards, cohort)."""
    return verifier.record(work.predictions_record(arm), "predictions")


def model_facts(model) -> dict:
    """What a record says of the model an arm ran (the report and saliency read it from there)."""
    return {"model_spec": model.spec, "model_fingerprint": model.fingerprint, "weights_seed": model.weights_seed}
