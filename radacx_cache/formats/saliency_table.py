"""The saliency table (docs/saliency.md) as a report section: one row per arm x method x metric."""
from __future__ import annotations

import numpy as np

from ..metrics import format_p
from ..saliency_metrics import CONTROL_TEXT, CONTROLS
from ..tables import Section, render_markdown

METRIC_TEXT = {
    "anatomy": "mass in lungs + heart",
    "organ": "mass in the predicted finding's organ",
    "pointing": "pointing game (peak in that organ)",
    "ink": "mass on the drawn overlay lines",
    "truth": "mass where the phantom drew the finding",
    "truth_pointing": "pointing game against the drawn finding",
    "box": "mass inside the radiologists' boxes",
    "box_pointing": "pointing game against the radiologists' boxes",
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
                         "the region the generator drew it in. On its own it validates only the measurement chain "
                         "(geometry, padding, resize); whether a model looks there is the check against the "
                         "controls below.")
    return sec


def variants_section(data: dict, n_boot: int) -> Section | None:
    """Saliency on the overlay ablation's derived variants (``saliency.variants``), against original."""
    sec = Section("Saliency per overlay variant (mean [95% CI], area baseline; paired difference to original)",
                  ["Arm", "Method", "Metric", "Variant", "Value", "− original [95% CI]", "p"])
    for rec in data["summary"]:
        for v in rec.get("variants", [])[2:]:
            d = rec.get(f"{v}_minus_original")
            sec.rows.append([rec["arm"], rec["method"], METRIC_TEXT[rec["metric"]], v, _cell(rec[v], rec[f"{v}_area"]),
                             f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "–",
                             format_p(d["p_value"], n_boot) if d else "–"])
    if not sec.rows:
        return None
    sec.notes.append("The ink metric uses the paper's line width for every variant (the band the stored masked "
                     "image draws); settings of each variant in shards/variants.json.")
    return sec


def _control_cell(c: dict | None) -> str:
    if c is None:
        return "n/a"
    d = c["diff"]
    mark = "beaten" if c["beaten"] else "not beaten"
    return f"{c['value'][0]:.3f} (arm − control {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], {mark})"


def checks_sections(data: dict) -> list[Section]:
    """The check that can fail: each arm against the four controls on the same images, per truth."""
    checks = data.get("checks") or []
    return [checks_section([c for c in checks if c["metric"] == m], data.get("check_method"))
            for m in dict.fromkeys(c["metric"] for c in checks)]


def checks_section(checks: list[dict], method: str) -> Section:
    metric = METRIC_TEXT.get(checks[0]["metric"], checks[0]["metric"])
    sec = Section(f"Saliency check against controls: {metric} ({method}, fixed before the run)",
                  ["Arm", "Test images", "Arm [95% CI]", *(CONTROL_TEXT[c] for c in CONTROLS), "Check"])
    for rec in checks:
        point, low, high = rec["model"]
        sec.rows.append([rec["arm"], rec["tested_on"], f"{point:.3f} [{low:.3f}, {high:.3f}] (n={rec['n']})",
                         *(_control_cell(rec["controls"].get(c)) for c in CONTROLS),
                         "PASSED" if rec["passed"] else "NOT PASSED"])
    sec.notes.append("PASSED only when the arm beats every control: the paired patient-bootstrap 95% CI of "
                     "(arm − control) over the same images lies above 0. Controls: a flat map over lungs + heart "
                     "and a centred Gaussian (no model), the same method on the arm's network with a random head, "
                     "and the arm's own maps scored on other images. A map drawn without a model cannot pass "
                     "(docs/saliency.md).")
    return sec


def saliency_sections(data: dict, n_boot: int) -> list[Section]:
    variants = variants_section(data, n_boot)
    return [saliency_section(data, n_boot), *([variants] if variants else []), *checks_sections(data)]


def saliency_markdown(data: dict, n_boot: int) -> str:
    return render_markdown(saliency_sections(data, n_boot), [])
