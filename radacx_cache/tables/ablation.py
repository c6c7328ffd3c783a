"""The overlay ablation (issue 22, docs/pipeline.md): every image variant x arm, from the arms' own
prediction files, under the headline reading.

Per column of ``arms.ABLATION_COLUMNS`` (zero-shot; the V1 head tested on each variant; a head
trained and tested on each variant; V3 tested on each variant; fine-tuned and tested on each
variant) and variant: accuracy with its patient-bootstrap CI, the paired difference (same test
images, paired patient bootstrap, two-sided p) to ``original`` and to the paper's ``masked`` in the
same column, and the per-class accuracy difference to ``original`` (images whose headline target is
that class). Cells whose arm has not run (a variant not fine-tuned) are left out.
"""
from __future__ import annotations

import numpy as np

from ..arms import ABLATION_COLUMNS
from ..findings import first_positive
from ..metrics import (COLLAPSE_SHARE, best_constant, bootstrap_mean, correctness, format_difference, paired_difference,
                       prediction_spread)
from . import Section


def ablation_results(load, variants, positives, patients, order, n_boot: int, seed: int) -> list[dict]:
    """One dict per (column, variant) whose predictions exist; ``load(arm, variant)`` gives a
    Predictions (rows in the test split's order) or None."""
    targets = first_positive(positives > 0, order)
    has_target = positives.any(1)
    rows = []
    for column, arm_of in ABLATION_COLUMNS:
        preds = {v: load(arm_of(v), v) for v in variants}
        if preds.get("original") is None:
            continue
        correct = {v: correctness(p.proba.argmax(1), positives, "argmax", order) for v, p in preds.items() if p is not None}
        base_values, mask = correct["original"]
        for v in variants:
            if v not in correct:
                continue
            values, _ = correct[v]
            row = {"column": column, "variant": v, "arm": arm_of(v), "n": int(mask.sum()),
                   "accuracy": bootstrap_mean(values, mask, patients, n_boot=n_boot, seed=seed),
                   "predictions": prediction_spread(preds[v].proba.argmax(1)[mask], positives.shape[1])}
            for ref in ("original", "masked"):
                row[f"minus_{ref}"] = None if v == ref or ref not in correct else paired_difference(
                    correct[ref][0], values, mask, patients, n_boot=n_boot, seed=seed)
            row["per_class_minus_original"] = [
                float(values[sel].mean() - base_values[sel].mean()) if (sel := mask & has_target & (targets == k)).any()
                else float("nan") for k in range(positives.shape[1])]
            rows.append(row)
    return rows


def ablation_reference(positives: np.ndarray, order) -> dict:
    """The rows every ablation table carries: always the most frequent test target, and chance."""
    has = np.asarray(positives).any(1)
    best, k = best_constant(np.asarray(positives)[has], order)["argmax"] if has.any() else (float("nan"), 0)
    return {"majority": float(best), "majority_class": int(k), "chance": 1.0 / np.asarray(positives).shape[1],
            "n": int(has.sum())}


def _spread_cells(row: dict, classes) -> list[str]:
    s = row.get("predictions")
    if not s:
        return ["–", "–"]
    mark = " **COLLAPSED**" if s["collapsed"] else ""
    return [str(s["distinct"]), f"{classes[s['top_class']]} {s['top_share']:.2f}{mark}"]


def ablation_sections(rows: list[dict], classes, n_boot: int, reference: dict | None = None) -> list[Section]:
    table = Section("Overlay ablation: accuracy per image variant [95% CI], paired differences",
                    ["Arm", "Variant", "Accuracy [95% CI]", "− original [95% CI]", "p", "− masked [95% CI]", "p",
                     "Classes predicted", "Most common prediction (share)"])
    if reference:
        table.rows.append(["reference: always the most frequent test target", "any",
                           f"{reference['majority']:.4f}", "–", "–", "–", "–", "1",
                           f"{classes[reference['majority_class']]} 1.00 **COLLAPSED**"])
        table.rows.append(["reference: a uniformly random class (chance)", "any", f"{reference['chance']:.4f}",
                           "–", "–", "–", "–", str(len(classes)), "–"])
    for row in rows:
        point, low, high = row["accuracy"]
        table.rows.append([f"{row['arm']}: {row['column']}", row["variant"], f"{point:.4f} [{low:.3f}, {high:.3f}]",
                           *format_difference(row["minus_original"], n_boot),
                           *format_difference(row["minus_masked"], n_boot),
                           *_spread_cells(row, classes)])
    table.notes.append("Headline accuracy (the first positive in the cohort's target order) on the same test images "
                       "for every variant; differences paired by image, patient bootstrap, each p from the same "
                       "replicates as its CI; masked is the paper's overlay; the variants' settings are in "
                       f"shards/variants.json. COLLAPSED: one class takes more than {COLLAPSE_SHARE:.0%} of the "
                       "predictions (a near-constant classifier: compare it with the majority row, not with the "
                       "other variants).")
    per_class = Section("Overlay ablation per class: accuracy difference to original (images whose target is "
                        "the class; point estimates on the n images of each class, no CI)",
                        ["Arm", "Variant", *classes])
    per_class.rows = [[row["arm"], row["variant"], *(f"{d:+.3f}" if np.isfinite(d) else "n/a"
                                                     for d in row["per_class_minus_original"])]
                      for row in rows if row["variant"] != "original"]
    return [table, per_class]
