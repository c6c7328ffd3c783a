"""Metrics for the five-finding task, with patient-level bootstrap confidence intervals.

Accuracy follows the cohort's label policy: the top-1 prediction is correct when it is among the
image's positive classes (with ``single``/``first`` targets there is exactly one). Strict
single-label metrics (accuracy, balanced accuracy, confusion matrix) use the single-positive
subset. AUROC is one-vs-rest per class and undefined (NaN, reported as such) for a class with no
positives or no negatives in the test set.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score


def accuracy(proba: np.ndarray, targets: np.ndarray) -> float:
    if len(proba) == 0:
        return float("nan")
    return float(np.mean(targets[np.arange(len(proba)), proba.argmax(1)] > 0))


def per_class_auroc(proba: np.ndarray, targets: np.ndarray) -> np.ndarray:
    out = np.full(targets.shape[1], np.nan)
    for k in range(targets.shape[1]):
        y = targets[:, k] > 0
        if 0 < y.sum() < len(y):
            out[k] = roc_auc_score(y, proba[:, k])
    return out


def evaluate(proba: np.ndarray, targets: np.ndarray) -> dict:
    """All point metrics for one prediction set."""
    pred = proba.argmax(1)
    k = targets.shape[1]
    single = (targets > 0).sum(1) == 1
    true_single = targets[single].argmax(1)
    auroc = per_class_auroc(proba, targets)
    pred_onehot = np.eye(k)[pred]
    return {
        "n": int(len(proba)),
        "accuracy": accuracy(proba, targets),
        "n_single": int(single.sum()),
        "accuracy_single": float(np.mean(pred[single] == true_single)) if single.any() else float("nan"),
        "balanced_accuracy_single": float(balanced_accuracy_score(true_single, pred[single]))
        if single.any() else float("nan"),
        "macro_auroc": float(np.nanmean(auroc)) if np.isfinite(auroc).any() else float("nan"),
        "auroc": auroc.tolist(),
        "macro_f1": float(f1_score(targets > 0, pred_onehot > 0, average="macro", zero_division=0)),
        "confusion_single": confusion_matrix(true_single, pred[single], labels=list(range(k))).tolist(),
    }


def _patient_resamples(patients: np.ndarray, n_boot: int, seed: int):
    """Index arrays of bootstrap samples drawn by patient (all images of a drawn patient)."""
    uniq, inverse = np.unique(patients, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        draw = rng.integers(0, len(uniq), len(uniq))
        yield np.concatenate([members[i] for i in draw])


def bootstrap_ci(proba, targets, patients, *, metric=accuracy, n_boot=1000, seed=0, alpha=0.05):
    """(point, low, high) of ``metric`` with a percentile CI resampled by patient."""
    point = metric(proba, targets)
    vals = np.array([metric(proba[i], targets[i]) for i in _patient_resamples(patients, n_boot, seed)])
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return point, float("nan"), float("nan")
    return point, float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def paired_bootstrap(proba_a, proba_b, targets, patients, *, metric=accuracy, n_boot=1000, seed=0,
                     alpha=0.05) -> dict:
    """Difference ``metric(b) - metric(a)`` on the same images, resampled by patient.

    The p-value is two-sided: twice the smaller tail mass of the bootstrap differences at 0.
    """
    diff = metric(proba_b, targets) - metric(proba_a, targets)
    vals = np.array([metric(proba_b[i], targets[i]) - metric(proba_a[i], targets[i])
                     for i in _patient_resamples(patients, n_boot, seed)])
    p = 2 * min(np.mean(vals <= 0), np.mean(vals >= 0))
    return {"diff": float(diff), "low": float(np.quantile(vals, alpha / 2)),
            "high": float(np.quantile(vals, 1 - alpha / 2)), "p_value": float(min(1.0, p)),
            "n_boot": n_boot}
