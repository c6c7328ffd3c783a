"""The saliency table (docs/saliency.md) as a report section: one row per arm x method x metric."""
from __future__ import annotations

import numpy as np

from ..metrics import format_difference
from ..saliency_metrics import CONTROL_TEXT, CONTROLS
from . import Section, render_markdown

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


def _cell(ci, area, n: int | None = None) -> str:
    point, low, high = ci
    if not np.isfinite(point):
        return "n/a"
    return f"{point:.3f} [{low:.3f}, {high:.3f}] (area {area:.3f}{f', n={n}' if n is not None else ''})"


def _ci(ci, digits: int = 3) -> str:
    point, low, high = ci
    return "n/a" if not np.isfinite(point) else f"{point:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _diff(d: dict | None, n_boot: int) -> tuple[str, str]:
    return format_difference(d, n_boot, digits=3)


def _metric_text(metric: str, data: dict) -> str:
    text = METRIC_TEXT.get(metric, metric)
    return text.replace("radiologists' boxes", "phantom boxes") if data.get("synthetic") else text


def saliency_section(data: dict, n_boot: int) -> Section:
    sec = Section("Saliency: where the models look (mean over test images [95% CI], area baseline)",
                  ["Arm", "Method", "Metric", "Original", "Masked", "Masked − original [95% CI]", "p"])
    for rec in data["summary"]:
        sec.rows.append([rec["arm"], rec["method"], _metric_text(rec["metric"], data),
                         _cell(rec["original"], rec["original_area"], rec.get("original_n")),
                         _cell(rec["masked"], rec["masked_area"], rec.get("masked_n")),
                         *_diff(rec.get("masked_minus_original"), n_boot)])
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
            sec.rows.append([rec["arm"], rec["method"], _metric_text(rec["metric"], data), v,
                             _cell(rec[v], rec[f"{v}_area"], rec.get(f"{v}_n")),
                             *_diff(rec.get(f"{v}_minus_original"), n_boot)])
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
    return [checks_section([c for c in checks if c["metric"] == m], data.get("check_method"), data)
            for m in dict.fromkeys(c["metric"] for c in checks)]


def checks_section(checks: list[dict], method: str, data: dict | None = None) -> Section:
    metric = _metric_text(checks[0]["metric"], data or {})
    sec = Section(f"Saliency check against controls: {metric} ({method}, fixed before the run)",
                  ["Arm", "Test images", "Arm [95% CI]", *(CONTROL_TEXT[c] for c in CONTROLS), "Check"])
    for rec in checks:
        point, low, high = rec["model"]
        sec.rows.append([rec["arm"], rec["tested_on"], f"{point:.3f} [{low:.3f}, {high:.3f}] (n={rec['n']})",
                         *(_control_cell(rec["controls"].get(c)) for c in CONTROLS),
                         "PASSED" if rec["passed"] else "NOT PASSED"])
    sec.notes.append("PASSED only when the arm beats every control: the paired patient-bootstrap 95% CI of "
                     "(arm − control) over the same images lies above 0. Controls: a flat map over lungs + heart, "
                     "a centred Gaussian and the image's own intensity (no model), the same method on the arm's "
                     "network with a random head, and the arm's own maps scored on other images. A map drawn "
                     "without a model cannot pass. A pass says where the maps sit, not that the model uses it: "
                     "that is the occlusion table's question (docs/saliency.md).")
    return sec


REGION_TEXT = {"lungs": "lungs", "heart": "heart", "anatomy": "lungs + heart", "outside_anatomy": "outside the anatomy",
               "finding": "the finding (boxes / drawn region)"}


def occlusion_section(data: dict, n_boot: int) -> Section | None:
    """Drop of the target's probability when a region is deleted or kept alone, beside equal-area controls."""
    rows = data.get("occlusion") or []
    if not rows:
        return None
    ref = data.get("reference") or {}
    sec = Section(f"Occlusion: does the prediction depend on the region? (fill: {data.get('fill', 'blur')}; drop = "
                  "p(target) intact − occluded, mean [95% CI])",
                  ["Arm", "Test images", "Region", "Mode", "n", "Drop", "Drop, equal area", "Effect beyond it", "p",
                   "Drop, equal area outside anatomy", "Effect beyond it", "p", "Accuracy drop"])
    sec.rows.append(["reference: a model that ignores the image (e.g. always the majority class "
                     f"{ref.get('majority_class', '?')}, accuracy {ref.get('majority', float('nan')):.3f}; chance "
                     f"{ref.get('chance', float('nan')):.3f})", "any", "any", "any", ref.get("n", "–"),
                     "+0.000", "+0.000", "+0.000", "–", "+0.000", "+0.000", "–", "+0.000"])
    for r in rows:
        c = r["controls"]
        inside, outside = c.get("equal_area"), c.get("equal_area_outside")
        sec.rows.append([r["arm"], r["tested_on"], REGION_TEXT.get(r["region"], r["region"]), r["mode"], r["n"],
                         _ci(r["drop"]), _ci(inside["drop"]) if inside else "–",
                         *_diff(inside["effect"] if inside else None, n_boot),
                         _ci(outside["drop"]) if outside else "–", *_diff(outside["effect"] if outside else None, n_boot),
                         _ci(r["accuracy_drop"])])
    sec.notes.append("delete: the region's radiograph pixels replaced by the fill; keep: every other pixel replaced. "
                     "The test variant's overlay is drawn on top from the unchanged masks. Equal-area controls: a "
                     "seeded random region of as many pixels anywhere in the image, and outside the anatomy. Effect "
                     "beyond a control: delete, drop(region) − drop(control); keep, drop(control) − drop(region); "
                     "paired patient bootstrap, two-sided p from the same replicates as the CI. Positive: the "
                     "prediction uses the region more than as many other pixels. A model that ignores the image "
                     "drops by 0 everywhere (the reference row).")
    return sec


def contrast_section(data: dict, n_boot: int) -> Section | None:
    """The paper's question as paired numbers: does training on the overlay make the arm lose more?"""
    rows = data.get("arm_contrasts") or []
    if not rows:
        return None
    sec = Section("Do overlay-trained arms depend more on the region? drop(arm) − drop(original-trained arm) when "
                  "the region is deleted, same images [95% CI]",
                  ["Arm", "Versus", "Test images", "Region", "n", "Arm's drop", "Versus' drop", "Difference", "p"])
    for r in rows:
        sec.rows.append([r["arm"], r["versus"], r["tested_on"], REGION_TEXT.get(r["region"], r["region"]), r["n"],
                         f"{r['arm_drop']:+.3f}", f"{r['versus_drop']:+.3f}", *_diff(r["difference"], n_boot)])
    sec.notes.append("'as trained': each arm on its own training variant's test images (the same radiographs). "
                     "Positive: the overlay-trained arm loses more of its target probability when the region's "
                     "content is removed, i.e. relies on it more.")
    return sec


def curves_section(data: dict, n_boot: int) -> Section | None:
    rows = data.get("curves") or []
    if not rows:
        return None
    method = data.get("check_method", "")
    sec = Section(f"Faithfulness of the maps ({method}): deletion and insertion areas (target probability over "
                  f"the fraction of pixels changed, {data.get('curve_steps', '?')} steps), gain of the arm's map "
                  "over maps made without the model [95% CI]",
                  ["Arm", "Test images", "Curve", "n", "Arm's map", "Random order", "Flat anatomy", "Input intensity",
                   "Gain vs random", "Gain vs anatomy", "Gain vs intensity", "Verdict"])
    for r in rows:
        auc, gain = r["auc"], r["gain"]
        cell = {m: (f"{auc[m][0]:.3f}" if m in auc else "–") for m in ("model", "random_order", "uniform_anatomy",
                                                                          "input_intensity")}
        sec.rows.append([r["arm"], r["tested_on"], r["curve"], r["n"], _ci(auc["model"]).lstrip("+"),
                         cell["random_order"], cell["uniform_anatomy"], cell["input_intensity"],
                         *(_diff(gain.get(m), n_boot)[0] for m in ("random_order", "uniform_anatomy", "input_intensity")),
                         "ranks better than input intensity" if r["beats_intensity"]
                         else "no better than its input intensity"])
    sec.notes.append("Deletion: lower is better (the evidence goes first); insertion: higher is better. Gain is "
                     "signed so that positive favours the arm's map (deletion: control − arm; insertion: arm − "
                     "control), paired on the same images. The curves follow the class each map explains.")
    return sec


def cascade_section(data: dict) -> Section | None:
    rows = data.get("cascade") or []
    if not rows:
        return None
    sec = Section(f"Cascading randomisation ({data.get('check_method', '')}): rank correlation of each arm's maps "
                  "with the maps of its network re-drawn from the top [95% CI]",
                  ["Arm", "Test images", "Re-drawn", "n", "Rank correlation"])
    for r in rows:
        sec.rows.append([r["arm"], r["tested_on"], r["level"], r["n"], _ci(r["rank_correlation"])])
    sec.notes.append("Near 1: the maps barely depend on the re-drawn weights (they follow the input or the lower "
                     "layers); maps that explain the model fall as more of it is re-drawn (Adebayo et al., 2018).")
    return sec


def _head_flag(head: dict | None) -> str:
    if not head:
        return ""
    flags = (["NEAR-CONSTANT (> 90% one class)"] if head["collapsed"] else []) + \
        (["FLAT OUTPUT (top-1 p varies < 0.03)"] if head.get("flat_output") else [])
    return ", ".join(flags)


def heads_section(data: dict) -> Section | None:
    rows = data.get("heads") or []
    if not rows:
        return None
    sec = Section("What the maps explain: predictions on the saliency images, and Integrated Gradients' completeness",
                  ["Arm", "Test images", "n", "Classes predicted", "Most common (share)", "Top-1 p: mean (SD)", "Flag",
                   "Mean |output change|", "Completeness gap"])
    for r in rows:
        sec.rows.append([r["arm"], r["tested_on"], r["n"], r["distinct"], f"{r['top_prediction']} ({r['top_share']:.2f})",
                         f"{r.get('mean_p_predicted', float('nan')):.3f} ({r.get('sd_p_predicted', float('nan')):.3f})",
                         _head_flag(r),
                         f"{r['mean_abs_output_change']:.3f}",
                         "n/a" if not np.isfinite(r["completeness_gap"]) else f"{r['completeness_gap']:.2f}"])
    sec.notes.append(f"Output: the {data.get('target', 'contrastive')} target (target logit − mean logit when "
                     f"contrastive) at the image minus at the {data.get('baseline', 'blur')} baseline; the gap is "
                     "|sum of attributions − output change| / mean |output change| (0: the attributions add up). A "
                     "near-constant head's maps explain a constant, whatever the region scores say.")
    return sec


GLANCE = "Interventions at a glance"


def glance_section(data: dict, n_boot: int) -> Section | None:
    """One row per arm and test variant: the numbers the paper's second question turns on."""
    occ = {(r["arm"], r["tested_on"], r["region"], r["mode"]): r for r in data.get("occlusion") or []}
    curves = {(r["arm"], r["tested_on"], r["curve"]): r for r in data.get("curves") or []}
    heads = {(r["arm"], r["tested_on"]): r for r in data.get("heads") or []}
    if not occ:
        return None
    sec = Section(f"{GLANCE}: does each arm use the anatomy and the finding? (drop of p(target) when deleted "
                  "[95% CI], and beyond an equal-area control)",
                  ["Arm", "Test images", "n", "Lungs + heart deleted", "beyond equal area outside anatomy",
                   "Finding deleted", "beyond equal area", "Map vs intensity: deletion gain", "insertion gain", "Head"])
    ref = data.get("reference") or {}
    sec.rows.append([f"reference: ignores the image (majority {ref.get('majority_class', '?')} "
                     f"{ref.get('majority', float('nan')):.3f}, chance {ref.get('chance', float('nan')):.3f})", "any",
                     ref.get("n", "–"), "+0.000", "+0.000", "+0.000", "+0.000", "+0.000", "+0.000", "constant"])
    for arm, variant in dict.fromkeys((k[0], k[1]) for k in occ):
        anat, find = occ.get((arm, variant, "anatomy", "delete")), occ.get((arm, variant, "finding", "delete"))
        out_eff = anat and anat["controls"].get("equal_area_outside")
        find_eff = find and find["controls"].get("equal_area")
        gains = [curves.get((arm, variant, c), {}).get("gain", {}).get("input_intensity") for c in ("deletion", "insertion")]
        head = heads.get((arm, variant))
        sec.rows.append([arm, variant, anat["n"] if anat else "–", _ci(anat["drop"]) if anat else "–",
                         _diff(out_eff["effect"] if out_eff else None, n_boot)[0],
                         f"{_ci(find['drop'])} (n={find['n']})" if find else "–",
                         _diff(find_eff["effect"] if find_eff else None, n_boot)[0],
                         *(_diff(g, n_boot)[0] for g in gains),
                         _head_flag(head) or "ok"])
    sec.notes.append("Drops and gains on the same sampled images, paired patient bootstrap; a model that ignores the "
                     "image scores +0.000 everywhere (the reference row). Full tables, keep-alone, every region, the "
                     "cascade and completeness: results/saliency.md (docs/saliency.md).")
    return sec


def saliency_sections(data: dict, n_boot: int) -> list[Section]:
    variants = variants_section(data, n_boot)
    optional = [glance_section(data, n_boot), contrast_section(data, n_boot), occlusion_section(data, n_boot),
                curves_section(data, n_boot), cascade_section(data), heads_section(data)]
    return [saliency_section(data, n_boot), *([variants] if variants else []), *checks_sections(data),
            *(s for s in optional if s is not None)]


def saliency_markdown(data: dict, n_boot: int) -> str:
    return render_markdown(saliency_sections(data, n_boot), [])
