"""The saliency table (docs/saliency.md) as a report section: one row per arm x method x metric."""
from __future__ import annotations

import numpy as np

from ..metrics import format_p
from ..tables import Section, render_markdown

METRIC_TEXT = {
    "anatomy": "mass in lungs + heart",
    "organ": "mass in the predicted finding's organ",
    "pointing": "pointing game (peak in that organ)",
    "ink": "mass on the drawn overlay lines",
    "truth": "mass where the phantom drew the finding",
    "truth_pointing": "pointing game against the drawn finding",
}


def _cell(ci, area) -> str:
    point, low, high = ci
    if not np.isfinite(point):
        return "n/a"
    return f"{point:.3f} [{low:.3f}, {high:.3f}] (area {area:.3f})"


def saliency_section(data: dict, n_boot: int) -> Section:
    sec = Section("Saliency: where the models look (mean over test images [95% CI], area baseline)",
                  ["Arm", "Method", "Metric", "Original", "Masked", "Masked − original [95% CI]", "p"])
    for rec in data["summary"]:
        d = rec.get("masked_minus_original")
        diff = f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "–"
        sec.rows.append([rec["arm"], rec["method"], METRIC_TEXT[rec["metric"]],
                         _cell(rec["original"], rec["original_area"]), _cell(rec["masked"], rec["masked_area"]),
                         diff, format_p(d["p_value"], n_boot) if d else "–"])
    sec.notes.append(f"{data['images']} seeded test images per arm, the same for every arm and variant; maps are "
                     "made non-negative and sum to 1; 'area' is what a uniform map scores. Saliency shows where "
                     "the gradient signal is, not what caused a prediction (docs/saliency.md).")
    if data.get("phantom_truth"):
        sec.notes.append("Phantom truth: on images where the predicted finding was drawn, the share of saliency in "
                         "the region the generator drew it in; above its area baseline, the measurement chain "
                         "(geometry, padding, resize) is validated.")
        sec.notes += truth_check(data)
    return sec


def truth_check(data: dict) -> list[str]:
    """Per fine-tuned arm: does some method put clearly more mass where the finding was drawn than a
    uniform map (the CI's lower end above the area baseline, on original test images)?"""
    lines = []
    for arm in ("V3", "V4"):
        recs = [r for r in data["summary"] if r["arm"] == arm and r["metric"] == "truth" and np.isfinite(r["original"][0])]
        if not recs:
            continue
        best = max(recs, key=lambda r: r["original"][1] - r["original_area"])
        ok = best["original"][1] > best["original_area"]
        lines.append(f"Phantom truth check, {arm}: {'PASSED' if ok else 'NOT PASSED'} ({best['method']}: "
                     f"{best['original'][0]:.3f} [{best['original'][1]:.3f}, {best['original'][2]:.3f}] of the "
                     f"map where the finding was drawn, area baseline {best['original_area']:.3f}).")
    return lines


def saliency_markdown(data: dict, n_boot: int) -> str:
    return render_markdown([saliency_section(data, n_boot)], [])
