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
from ..metrics import bootstrap_mean, correctness, format_p, paired_difference
from ..tables import Section


def _diff_cell(d: dict | None, n_boot: int) -> tuple[str, str]:
    if d is None:
        return "–", "–"
    return f"{d['diff']:+.4f} [{d['low']:+.3f}, {d['high']:+.3f}]", format_p(d["p_value"], n_boot)


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
                   "accuracy": bootstrap_mean(values, mask, patients, n_boot=n_boot, seed=seed)}
            for ref in ("original", "masked"):
                row[f"minus_{ref}"] = None if v == ref or ref not in correct else paired_difference(
                    correct[ref][0], values, mask, patients, n_boot=n_boot, seed=seed)
            row["per_class_minus_original"] = [
                float(values[sel].mean() - base_values[sel].mean()) if (sel := mask & has_target & (targets == k)).any()
                else float("nan") for k in range(positives.shape[1])]
            rows.append(row)
    return rows


def ablation_sections(rows: list[dict], classes, n_boot: int) -> list[Section]:
    table = Section("Overlay ablation: accuracy per image variant [95% CI], paired differences",
                    ["Arm", "Variant", "Accuracy [95% CI]", "− original [95% CI]", "p", "− masked [95% CI]", "p"])
    for row in rows:
        point, low, high = row["accuracy"]
        table.rows.append([f"{row['arm']}: {row['column']}", row["variant"], f"{point:.4f} [{low:.3f}, {high:.3f}]",
                           *_diff_cell(row["minus_original"], n_boot), *_diff_cell(row["minus_masked"], n_boot)])
    table.notes.append("Headline accuracy (the first positive in the cohort's target order) on the same test images "
                       "for every variant; differences paired by image, patient bootstrap; masked is the paper's "
                       "overlay; the variants' settings are in shards/variants.json.")
    per_class = Section("Overlay ablation per class: accuracy difference to original (images whose target is "
                        "the class)", ["Arm", "Variant", *classes])
    per_class.rows = [[row["arm"], row["variant"], *(f"{d:+.3f}" if np.isfinite(d) else "n/a"
                                                     for d in row["per_class_minus_original"])]
                      for row in rows if row["variant"] != "original"]
    return [table, per_class]
