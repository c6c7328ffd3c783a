"""Metrics for the five-finding task, with patient-level bootstrap confidence intervals (docs/metrics.md).

Three readings of "accuracy" for multi-label images, each a mean of per-image correctness:

- ``argmax`` (the headline): the top-1 prediction equals the *first* positive finding in the
  cohort's target order (``findings.first_positive``; by default the class order Atelectasis,
  Cardiomegaly, Consolidation, Edema, Pleural Effusion), the very rule that made the training
  target. Chance is 1/K. The paper does not say how it made a multi-positive image one label.
- ``any``: the top-1 prediction is among the image's positive findings (a constant guess of the
  most frequent finding scores high on multi-positive labels).
- ``single``: the top-1 prediction equals the finding, on images with exactly one positive.

Per-class AUROC and F1 use the multi-hot positives and the label policy's treatment of uncertain
labels: under ``ignore`` an uncertain entry is left out of that class's metric; under ``zeros`` and
``ones`` the cohort already made it a negative / a positive.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from .findings import first_positive

READINGS = ("argmax", "any", "single")
READING_TEXT = {
    "argmax": "top-1 = the first positive finding in the cohort's target order",
    "any": "top-1 among the image's positive findings",
    "single": "top-1 = the finding, images with exactly one positive only",
}


def correctness(pred: np.ndarray, positives: np.ndarray, reading: str = "argmax",
                order=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness (N,) float and the images the reading counts (N,) bool; ``order``:
    the cohort's target order (class indices), None for the class order."""
    pos = np.asarray(positives) > 0
    pred = np.asarray(pred)
    rows = np.arange(len(pred))
    if reading == "argmax":
        return (pred == first_positive(pos, order)).astype(float), pos.any(1)
    if reading == "any":
        return pos[rows, pred].astype(float), pos.any(1)
    if reading == "single":
        return (pred == first_positive(pos, order)).astype(float), pos.sum(1) == 1
    raise ValueError(f"accuracy reading {reading!r}: expected one of {READINGS}")


def accuracy(proba: np.ndarray, positives: np.ndarray, reading: str = "argmax", order=None) -> float:
    """Accuracy of ``proba`` (N, K) under ``reading`` (the headline ``argmax`` by default)."""
    if len(proba) == 0:
        return float("nan")
    values, mask = correctness(np.asarray(proba).argmax(1), positives, reading, order)
    return float(values[mask].mean()) if mask.any() else float("nan")


def accuracy_argmax(proba, positives) -> float:
    return accuracy(proba, positives, "argmax")


def accuracy_any(proba, positives) -> float:
    return accuracy(proba, positives, "any")


# ---------------------------------------------------------------- reference rows
COLLAPSE_SHARE = 0.9  # a row whose most common prediction takes more than this share is marked


def prediction_spread(pred: np.ndarray, k: int) -> dict:
    """How many classes a set of top-1 predictions uses, the most common one's share, and whether
    that share marks a collapse (> ``COLLAPSE_SHARE``: a near-constant classifier)."""
    counts = np.bincount(np.asarray(pred, int), minlength=k)
    share = float(counts.max() / counts.sum()) if counts.sum() else float("nan")
    return {"distinct": int((counts > 0).sum()), "top_class": int(counts.argmax()), "top_share": share,
            "collapsed": bool(share > COLLAPSE_SHARE)}



def reference_correctness(train_positives: np.ndarray, test_positives: np.ndarray, reading: str,
                          order=None) -> dict:
    """Expected per-image correctness of doing nothing useful, on the test images, per reading:
    ``chance`` (a uniform random class), ``majority`` (always the train split's most frequent target
    under this reading) and ``prior`` (a random class drawn with the train split's target frequencies)."""
    tr, te = np.asarray(train_positives) > 0, np.asarray(test_positives) > 0
    k = tr.shape[1]
    if reading == "any":
        prior = tr.sum(0) / max(1, tr.sum())
        majority = int(tr.sum(0).argmax())
        chance = te.sum(1) / k
        by_prior = (te * prior).sum(1)
    else:
        rows = tr.sum(1) == 1 if reading == "single" else tr.any(1)
        prior = np.bincount(first_positive(tr[rows], order), minlength=k) / max(1, rows.sum())
        majority = int(prior.argmax())
        target = first_positive(te, order)
        chance = np.full(len(te), 1.0 / k)
        by_prior = prior[target]
    values_major, _ = correctness(np.full(len(te), majority), te, reading, order)
    _, mask = correctness(np.zeros(len(te), int), te, reading, order)
    return {"chance": (chance, mask), "majority": (values_major, mask), "prior": (by_prior, mask),
            "majority_class": majority, "prior_frequencies": prior.tolist()}


# ---------------------------------------------------------------- per-class and summary metrics
def _class_rows(positives, uncertain, k: int, policy: str) -> np.ndarray:
    if uncertain is None or policy != "ignore":
        return np.ones(len(positives), bool)
    return ~(np.asarray(uncertain)[:, k] > 0)


def per_class_auroc(proba: np.ndarray, positives: np.ndarray, uncertain: np.ndarray | None = None,
                    policy: str = "ignore") -> np.ndarray:
    """One-vs-rest AUROC per class (NaN where a class has no positives or no negatives)."""
    out = np.full(positives.shape[1], np.nan)
    for k in range(positives.shape[1]):
        keep = _class_rows(positives, uncertain, k, policy)
        y = positives[keep, k] > 0
        if 0 < y.sum() < len(y):
            out[k] = roc_auc_score(y, proba[keep, k])
    return out


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` for the boolean ``positive`` under each row of ``weights`` ((B, n) image
    weights: a bootstrap replicate's draw counts), ties counted half (Mann-Whitney); one sort for
    every replicate. Equals ``roc_auc_score`` with unit weights; NaN where a replicate lacks a class."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, pos = scores[order], positive[order].astype(bool)
    w = np.asarray(weights, float)[:, order]
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_scores) != 0])  # groups of tied scores
    neg_w = np.add.reduceat(w * ~pos, starts, axis=1)
    pos_w = np.add.reduceat(w * pos, starts, axis=1)
    below = np.cumsum(neg_w, axis=1) - neg_w
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos_w * (below + 0.5 * neg_w)).sum(1) / (pos_w.sum(1) * neg_w.sum(1))


def per_class_auroc_ci(proba: np.ndarray, positives: np.ndarray, uncertain: np.ndarray | None, policy: str,
                       patients: np.ndarray, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> list:
    """Per class: (low, high) of the one-vs-rest AUROC over a patient bootstrap (the same replicates as
    the accuracy CIs), (nan, nan) where the class has no positives or no negatives."""
    weights, inverse = patient_weights(patients, n_boot, seed)
    out = []
    for k in range(positives.shape[1]):
        keep = _class_rows(positives, uncertain, k, policy)
        y = positives[keep, k] > 0
        reps = weighted_auroc(proba[keep, k], y, weights[:, inverse[keep]]) if 0 < y.sum() < len(y) else np.array([])
        reps = reps[np.isfinite(reps)]
        out.append(percentile_interval(reps, alpha) if len(reps) else (float("nan"), float("nan")))
    return out


def per_class_f1(proba: np.ndarray, positives: np.ndarray, uncertain: np.ndarray | None = None,
                 policy: str = "ignore") -> np.ndarray:
    """F1 of "top-1 is class k" against "class k is positive", per class."""
    pred = proba.argmax(1)
    out = np.zeros(positives.shape[1])
    for k in range(positives.shape[1]):
        keep = _class_rows(positives, uncertain, k, policy)
        out[k] = f1_score(positives[keep, k] > 0, pred[keep] == k, zero_division=0)
    return out


def evaluate(proba: np.ndarray, positives: np.ndarray, uncertain: np.ndarray | None = None,
             policy: str = "ignore", order=None) -> dict:
    """All point metrics for one prediction set."""
    pred = proba.argmax(1)
    k = positives.shape[1]
    target = first_positive(positives, order)
    auroc = per_class_auroc(proba, positives, uncertain, policy)
    f1 = per_class_f1(proba, positives, uncertain, policy)
    single = (positives > 0).sum(1) == 1
    return {
        "n": int(len(proba)), "n_single": int(single.sum()),
        **{f"accuracy_{r}": accuracy(proba, positives, r, order) for r in READINGS},
        "balanced_accuracy": float(balanced_accuracy_score(target, pred)) if len(pred) else float("nan"),
        "macro_auroc": float(np.nanmean(auroc)) if np.isfinite(auroc).any() else float("nan"),
        "auroc": auroc.tolist(), "macro_f1": float(f1.mean()), "f1": f1.tolist(),
        "confusion": confusion_matrix(target, pred, labels=list(range(k))).tolist(),
    }


# ---------------------------------------------------------------- patient bootstrap
def patient_weights(patients: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_boot, P) draw counts of each patient per bootstrap replicate, and each image's patient."""
    uniq, inverse = np.unique(patients, return_inverse=True)
    p = len(uniq)
    draws = np.random.default_rng(seed).integers(0, p, (n_boot, p))
    counts = np.bincount((draws + p * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * p)
    return counts.reshape(n_boot, p).astype(float), inverse


def _replicates(values, mask, patients, n_boot, seed):
    weights, inverse = patient_weights(patients, n_boot, seed)
    mask = np.asarray(mask, float)
    sums = np.bincount(inverse, np.asarray(values, float) * mask, minlength=weights.shape[1])
    counts = np.bincount(inverse, mask, minlength=weights.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ sums) / (weights @ counts)


def bootstrap_mean(values, mask, patients, *, n_boot=1000, seed=0, alpha=0.05) -> tuple[float, float, float]:
    """(point, low, high): the masked mean of per-image ``values`` with a percentile CI, resampled by patient."""
    mask = np.asarray(mask, bool)
    point = float(np.asarray(values)[mask].mean()) if mask.any() else float("nan")
    reps = _replicates(values, mask, patients, n_boot, seed)
    reps = reps[np.isfinite(reps)]
    if len(reps) == 0:
        return point, float("nan"), float("nan")
    return point, *percentile_interval(reps, alpha)


def percentile_interval(reps: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The bootstrap percentile interval as order statistics of the replicates (no interpolation):
    its lower end is above 0 exactly when fewer than alpha/2 of the replicates are <= 0 (its upper end
    below 0 when fewer than alpha/2 are >= 0), which is
    the rule the two-sided p of ``paired_difference`` counts, so a CI and its p always agree (an
    interpolated quantile printed [+0.003, +0.179] beside p = 0.052)."""
    # the upper end mirrors the lower (the alpha/2-th largest replicate), so both ends count the same way
    return (float(np.quantile(reps, alpha / 2, method="inverted_cdf")),
            -float(np.quantile(-np.asarray(reps), alpha / 2, method="inverted_cdf")))


def paired_difference(values_a, values_b, mask, patients, *, n_boot=1000, seed=0, alpha=0.05) -> dict:
    """``mean(b) - mean(a)`` over the same images, resampled by patient; two-sided p.

    p is twice the smaller share of bootstrap differences on either side of 0 (capped at 1). When no
    replicate reached 0, ``p_value`` is the bound ``2 / n_boot`` and ``p_below`` is True: p < p_value.
    A stored p is never 0 (files people paste into papers).
    """
    mask = np.asarray(mask, bool)
    delta = np.asarray(values_b, float) - np.asarray(values_a, float)
    diff = float(delta[mask].mean()) if mask.any() else float("nan")
    reps = _replicates(delta, mask, patients, n_boot, seed)
    reps = reps[np.isfinite(reps)]
    p = float(min(1.0, 2 * min(np.mean(reps <= 0), np.mean(reps >= 0)))) if len(reps) else float("nan")
    low, high = percentile_interval(reps, alpha) if len(reps) else (float("nan"), float("nan"))
    below = bool(p == 0.0)
    return {"diff": diff, "low": low, "high": high, "p_value": 2.0 / n_boot if below else p, "p_below": below,
            "n_boot": n_boot}


def bootstrap_finite(values, patients, *, n_boot=1000, seed=0) -> tuple[float, float, float]:
    """``bootstrap_mean`` over the images whose value is finite (NaN: undefined there, e.g. no box);
    (nan, nan, nan) where none is."""
    values = np.asarray(values, float)
    ok = np.isfinite(values)
    return bootstrap_mean(np.nan_to_num(values), ok, patients, n_boot=n_boot, seed=seed) if ok.any() \
        else (float("nan"),) * 3


def paired_finite(values_a, values_b, patients, *, n_boot=1000, seed=0) -> dict | None:
    """``paired_difference`` (mean(b) − mean(a)) over the images where both values are finite; None
    where fewer than two are."""
    a, b = np.asarray(values_a, float), np.asarray(values_b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return None
    return paired_difference(np.nan_to_num(a), np.nan_to_num(b), ok, patients, n_boot=n_boot, seed=seed)


def bootstrap_ci(proba, positives, patients, *, reading="argmax", n_boot=1000, seed=0, alpha=0.05):
    """(point, low, high) of the accuracy under ``reading``, resampled by patient."""
    values, mask = correctness(np.asarray(proba).argmax(1), positives, reading)
    return bootstrap_mean(values, mask, patients, n_boot=n_boot, seed=seed, alpha=alpha)


def paired_bootstrap(proba_a, proba_b, positives, patients, *, reading="argmax", n_boot=1000, seed=0,
                     alpha=0.05) -> dict:
    """Accuracy of ``proba_b`` minus that of ``proba_a`` on the same images, resampled by patient."""
    va, mask = correctness(np.asarray(proba_a).argmax(1), positives, reading)
    vb, _ = correctness(np.asarray(proba_b).argmax(1), positives, reading)
    return paired_difference(va, vb, mask, patients, n_boot=n_boot, seed=seed, alpha=alpha)


def format_p(p, n_boot: int) -> str:
    """p for a table, from a paired difference (``paired_difference``'s dict) or a number: ``< 2/B``
    when no bootstrap replicate crossed 0 (the smallest two-sided p the doubling can give is 2/B)."""
    if isinstance(p, dict):
        if p.get("p_below"):
            return f"< 2/{n_boot}"
        p = p["p_value"]
    if not np.isfinite(p):
        return "n/a"
    return f"< 2/{n_boot}" if p == 0 else f"{p:.3f}"


def format_difference(d: dict | None, n_boot: int, digits: int = 4) -> tuple[str, str]:
    """A paired difference for a table: ("+0.0123 [-0.004, +0.031]", its p), or ("–", "–") for none."""
    if d is None:
        return "–", "–"
    return f"{d['diff']:+.{digits}f} [{d['low']:+.3f}, {d['high']:+.3f}]", format_p(d, n_boot)


# ---------------------------------------------------------------- how a multi-positive image is read
ALTERNATIVES = {
    "argmax": "first positive in the target order (headline)",
    "random_positive": "a uniformly random positive (expected)",
    "per_positive": "one sample per positive finding",
    "any": "top-1 among the positives",
    "single": "single-positive images only",
}


def reading_values(pred: np.ndarray, positives: np.ndarray, order=None) -> dict:
    """Accuracy of the top-1 predictions ``pred`` under each way of making a multi-positive image one
    label (``ALTERNATIVES``): the paper does not say which it used."""
    pos = np.asarray(positives) > 0
    pred = np.asarray(pred)
    hit = pos[np.arange(len(pred)), pred] if len(pred) else np.zeros(0, bool)
    has, n_pos = pos.any(1), pos.sum(1)
    single = n_pos == 1

    def mean(values, mask):
        return float(np.mean(values[mask])) if mask.any() else float("nan")
    return {"argmax": mean((pred == first_positive(pos, order)).astype(float), has),
            "random_positive": mean(hit / np.maximum(n_pos, 1), has),
            "per_positive": float(hit.sum() / max(1, n_pos.sum())),
            "any": mean(hit.astype(float), has),
            "single": mean(hit.astype(float), single)}


def best_constant(positives: np.ndarray, order=None) -> dict:
    """Per reading, the best accuracy of always predicting one class, and that class's index."""
    k = np.asarray(positives).shape[1]
    values = [reading_values(np.full(len(positives), c), positives, order) for c in range(k)]
    return {r: (max(v[r] for v in values), int(np.argmax([v[r] for v in values]))) for r in ALTERNATIVES}
