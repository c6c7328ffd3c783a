"""Does a model *use* a region? Interventions on the test images, as pure functions (docs/saliency.md).

A saliency map shows where a gradient signal sits; only an intervention shows use: change the image
and see whether the prediction changes. Two interventions, both drawn at read time from what the
shards store (nothing stored is changed):

- **Occlusion.** A region of the radiograph is *deleted* (its pixels replaced by the fill) or *kept*
  alone (every other pixel replaced). The test variant is then drawn on top from the unchanged
  masks (``render.draw_variant``): an overlay is a function of the masks, which the intervention
  does not touch, so a masked-trained arm sees its usual overlay and the intervention removes the
  radiograph's content, not the drawing. Regions (``OCCLUSION_REGIONS``): lungs, heart, lungs +
  heart, everything outside them, and the finding (where the phantom drew it, or the boxes) each
  beside equal-area controls (``equal_area_region``): a seeded random blob of the same number of
  pixels anywhere in the image, and one outside the anatomy.
- **Deletion and insertion curves** (Petsiuk et al., 2018). The model's input pixels are replaced
  (deletion) or put back into the fill (insertion) in the order a map ranks them, in ``steps``
  equal steps, and the target probability is integrated over the fraction changed
  (``curve_auc``). A faithful map deletes the evidence first (low deletion area) and inserts it
  first (high insertion area), compared with a random order, a flat map over the anatomy and the
  input's own intensity as maps.

The fill is a Gaussian-blurred copy of the image by default (``fill_image``): it removes the
detail while keeping the image's brightness and layout, so an occluded image stays closer to the
training distribution than a black hole would (a black region is itself a strong, out-of-
distribution signal); ``mean`` (the image's mean grey) is the option.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from .arms import original_counterpart
from .metrics import bootstrap_finite, paired_finite, prediction_spread

FILLS = ("blur", "mean")
OCCLUSION_REGIONS = ("lungs", "heart", "anatomy", "outside_anatomy", "finding")
MODES = ("delete", "keep")
CONTROLS = ("equal_area", "equal_area_outside")  # a random blob of the region's area: anywhere, outside the anatomy
CURVE_MAPS = ("model", "random_order", "uniform_anatomy", "input_intensity")
CURVES = ("deletion", "insertion")


def fill_image(image: np.ndarray, how: str = "blur", sigma: float = 8.0) -> np.ndarray:
    """What replaces removed pixels of ``image`` ((H, W) or (H, W, 3) uint8): a Gaussian blur of it
    (``sigma`` pixels, per channel) or its mean grey; uint8 of the same shape."""
    img = np.asarray(image, np.float32)
    if how == "blur":
        if not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"blur sigma {sigma!r}: expected a positive number of pixels")
        out = ndimage.gaussian_filter(img, (sigma, sigma, 0)[:img.ndim], mode="nearest")
    elif how == "mean":
        out = np.broadcast_to(img.mean(axis=(0, 1), keepdims=True), img.shape)
    else:
        raise ValueError(f"fill {how!r}: expected one of {', '.join(FILLS)}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def occlude(image: np.ndarray, region: np.ndarray, fill: np.ndarray, mode: str) -> np.ndarray:
    """``image`` with ``region`` (H, W) replaced by ``fill`` (``delete``), or with everything but
    ``region`` replaced (``keep``)."""
    if mode not in MODES:
        raise ValueError(f"occlusion mode {mode!r}: expected one of {', '.join(MODES)}")
    replace = np.asarray(region, bool)
    if mode == "keep":
        replace = ~replace
    return np.where(replace if image.ndim == 2 else replace[..., None], fill, image)


def equal_area_region(area: int, allowed: np.ndarray, rng: np.random.Generator,
                      smooth: float = 12.0) -> np.ndarray | None:
    """A seeded random region of exactly ``area`` pixels inside ``allowed`` (None where it holds
    fewer, or ``area`` is 0): the ``area`` highest pixels of smoothed noise, so the control is a few
    organ-like blobs, not salt and pepper (scattered pixels are far easier to fill in from their
    neighbours, and would make any region look important)."""
    allowed = np.asarray(allowed, bool)
    if area <= 0 or area > int(allowed.sum()):
        return None
    noise = ndimage.gaussian_filter(rng.standard_normal(allowed.shape), smooth, mode="wrap")
    noise = np.where(allowed, noise, -np.inf).ravel()
    out = np.zeros(allowed.size, bool)
    out[np.argpartition(noise, -area)[-area:]] = True
    return out.reshape(allowed.shape)


def occlusion_regions(reg: dict, finding: np.ndarray | None, rng: np.random.Generator) -> dict:
    """{region name: {"region": mask, "equal_area": control, "equal_area_outside": control or None}}
    for one image's regions (``saliency_metrics.regions``) and, where known, its finding's region."""
    anatomy = reg["anatomy"]
    named = {"lungs": reg["lungs"], "heart": reg["heart"], "anatomy": anatomy, "outside_anatomy": ~anatomy}
    if finding is not None and np.any(finding):
        named["finding"] = np.asarray(finding, bool)
    everywhere = np.ones_like(anatomy, bool)
    out = {}
    for name, region in named.items():
        area = int(region.sum())
        out[name] = {"region": region, "equal_area": equal_area_region(area, everywhere, rng),
                     "equal_area_outside": None if name == "outside_anatomy"
                     else equal_area_region(area, ~anatomy, rng)}
    return out


def rank_pixels(smap: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices from the map's highest value down; ties (a flat map, a map of zeros) are
    broken in a seeded random order, never in raster order (which would delete the top rows first)."""
    values = np.asarray(smap, np.float64).ravel()
    shuffled = rng.permutation(values.size)  # a stable sort of a random order: ties stay in that random order
    return shuffled[np.argsort(-values[shuffled], kind="stable")]


def curve_images(image: np.ndarray, fill: np.ndarray, order: np.ndarray, steps: int, curve: str) -> np.ndarray:
    """(steps + 1, *image.shape): the image with the first ``j / steps`` of ``order``'s pixels
    replaced by ``fill`` (``deletion``), or the fill with them put back (``insertion``), j = 0..steps."""
    if curve not in CURVES:
        raise ValueError(f"curve {curve!r}: expected one of {', '.join(CURVES)}")
    start, end = (image, fill) if curve == "deletion" else (fill, image)
    h, w = image.shape[:2]
    out = np.empty((steps + 1, *image.shape), image.dtype)
    changed = np.zeros(h * w, bool)
    done = 0
    for j in range(steps + 1):
        upto = int(round(j * h * w / steps))
        changed[order[done:upto]] = True
        done = upto
        sel = changed.reshape(h, w)
        out[j] = np.where(sel if image.ndim == 2 else sel[..., None], end, start)
    return out


def curve_auc(probabilities: np.ndarray) -> float:
    """Area under a target-probability curve sampled at equal steps of the fraction changed (0..1)."""
    p = np.asarray(probabilities, np.float64)
    return float(((p[1:] + p[:-1]) / 2).mean()) if len(p) > 1 else float("nan")


# ---------------------------------------------------------------- summaries over per-image rows


def _boot(values: np.ndarray, patients: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    return bootstrap_finite(values, patients, n_boot=n_boot, seed=seed)


def _paired(a: np.ndarray, b: np.ndarray, patients: np.ndarray, n_boot: int, seed: int) -> dict | None:
    """mean(b − a) over the images where both are finite, paired patient bootstrap (None: under two)."""
    return paired_finite(a, b, patients, n_boot=n_boot, seed=seed)


def occlusion_summary(df: pd.DataFrame, n_boot: int, seed: int) -> list[dict]:
    """Per arm, test variant, region and mode: the mean drop of the target's probability and of
    accuracy (intact − occluded) with patient CIs, each control's, and the region's **effect beyond
    each control**, paired on the same images: for ``delete`` drop(region) − drop(control), for
    ``keep`` drop(control) − drop(region). Positive: the prediction depends on the region more than
    on as many random pixels (the first), or the region alone carries more of it (the second)."""
    out = []
    if df.empty:
        return out
    df = df.assign(drop=df["p_intact"] - df["p"],
                   accuracy_drop=df["correct_intact"].astype(float) - df["correct"].astype(float))
    for (arm, variant, region, mode), grp in df.groupby(["arm", "tested_on", "region", "mode"], sort=False):
        by = {probe: g.set_index("dicom_id") for probe, g in grp.groupby("probe")}
        if "region" not in by:
            continue
        mine = by["region"]
        patients = mine["subject_id"].to_numpy()
        rec = {"arm": arm, "tested_on": variant, "region": region, "mode": mode, "n": int(len(mine)),
               "area": float(mine["area"].mean()), "p_intact": _boot(mine["p_intact"].to_numpy(), patients, n_boot, seed),
               "drop": _boot(mine["drop"].to_numpy(), patients, n_boot, seed),
               "accuracy_drop": _boot(mine["accuracy_drop"].to_numpy(), patients, n_boot, seed), "controls": {}}
        for control in CONTROLS:
            if control not in by:
                continue
            other = by[control].reindex(mine.index)
            a, b = mine["drop"].to_numpy(), other["drop"].to_numpy()
            rec["controls"][control] = {
                "drop": _boot(b, patients, n_boot, seed),
                "effect": _paired(b, a, patients, n_boot, seed) if mode == "delete" else _paired(a, b, patients, n_boot, seed),
                "n": int(np.isfinite(b).sum())}
        out.append(rec)
    return out


def arm_pairs(arms) -> list[tuple[str, str]]:
    """(arm trained on an overlay, the same method's arm trained on original): V2 and V1, V4 and V3,
    V2-<variant> and V1, V4-<variant> and V3, for the arms present."""
    present = set(arms)
    return [(a, base) for a in arms if (base := original_counterpart(a)) in present]


def arm_contrasts(df: pd.DataFrame, trained_on: dict, n_boot: int, seed: int, mode: str = "delete") -> list[dict]:
    """The paper's question as one paired number per region: does the arm trained on an overlay lose
    more than the same method trained on original images when the region is deleted? drop(overlay
    arm) − drop(original arm) on the same images, paired patient bootstrap; on each test variant
    both were tested on, and "as trained" (each on its own training variant's images)."""
    out = []
    if df.empty:
        return out
    df = df[(df["probe"] == "region") & (df["mode"] == mode)].assign(drop=lambda d: d["p_intact"] - d["p"])
    for arm, base in arm_pairs(list(dict.fromkeys(df["arm"]))):
        variants = [v for v in dict.fromkeys(df["tested_on"]) if ((df["arm"] == arm) & (df["tested_on"] == v)).any()
                    and ((df["arm"] == base) & (df["tested_on"] == v)).any()]
        tests = [(v, v, v) for v in variants] + [("as trained", trained_on.get(arm), trained_on.get(base))]
        for label, v_arm, v_base in tests:
            for region in dict.fromkeys(df["region"]):
                a = df[(df["arm"] == base) & (df["tested_on"] == v_base) & (df["region"] == region)].set_index("dicom_id")
                b = df[(df["arm"] == arm) & (df["tested_on"] == v_arm) & (df["region"] == region)].set_index("dicom_id")
                common = a.index.intersection(b.index)
                if len(common) < 2:
                    continue
                d = _paired(a.loc[common, "drop"].to_numpy(), b.loc[common, "drop"].to_numpy(),
                            a.loc[common, "subject_id"].to_numpy(), n_boot, seed)
                out.append({"arm": arm, "versus": base, "tested_on": label, "region": region, "mode": mode,
                            "n": int(len(common)), "arm_drop": float(b.loc[common, "drop"].mean()),
                            "versus_drop": float(a.loc[common, "drop"].mean()), "difference": d})
    return out


def curve_summary(df: pd.DataFrame, n_boot: int, seed: int) -> list[dict]:
    """Per arm, test variant and curve: each map's mean area [CI], and the model map's **gain** over
    each map made without the model, paired on the same images (insertion: model − control;
    deletion: control − model; positive = the model's map ranks the evidence better).
    ``beats_intensity``: the gain over the input's own intensity has a CI above 0."""
    out = []
    if df.empty:
        return out
    for (arm, variant, curve), grp in df.groupby(["arm", "tested_on", "curve"], sort=False):
        by = {m: g.set_index("dicom_id")["auc"] for m, g in grp.groupby("map")}
        model = grp[grp["map"] == "model"].set_index("dicom_id")
        patients = model["subject_id"].to_numpy()
        mine = model["auc"].to_numpy()
        rec = {"arm": arm, "tested_on": variant, "curve": curve, "n": int(len(model)),
               "auc": {m: _boot(by[m].reindex(model.index).to_numpy(), patients, n_boot, seed) for m in CURVE_MAPS if m in by},
               "gain": {}}
        for m in CURVE_MAPS[1:]:
            if m in by:
                other = by[m].reindex(model.index).to_numpy()
                rec["gain"][m] = _paired(other, mine, patients, n_boot, seed) if curve == "insertion" \
                    else _paired(mine, other, patients, n_boot, seed)
        g = rec["gain"].get("input_intensity")
        rec["beats_intensity"] = bool(g is not None and g["low"] > 0)
        out.append(rec)
    return out


def cascade_summary(df: pd.DataFrame, n_boot: int, seed: int) -> list[dict]:
    """Per arm, test variant and randomisation level: the mean rank correlation of the arm's maps
    with the randomised network's [patient CI]. Near 1: the maps do not depend on the re-drawn
    weights (they show the input or the lower layers); a map that explains the model falls."""
    out = []
    for (arm, variant, level), grp in df.groupby(["arm", "tested_on", "level"], sort=False) if not df.empty else []:
        out.append({"arm": arm, "tested_on": variant, "level": level, "n": int(np.isfinite(grp["rank_correlation"]).sum()),
                    "rank_correlation": _boot(grp["rank_correlation"].to_numpy(float), grp["subject_id"].to_numpy(),
                                              n_boot, seed)})
    return out


FLAT_OUTPUT = 0.03  # a head whose top-1 probability varies less than this (SD over the images) is flagged


def head_summary(df: pd.DataFrame, method: str, classes) -> list[dict]:
    """Per arm and test variant, on the sampled images: how spread the predictions are (a head that
    predicts one class for > 90% is flagged near-constant; one whose top-1 probability varies by less
    than 0.03 (SD) across the images flat: either way its maps explain a near-constant), the mean
    size of the explained output's change from the baseline, and how well Integrated Gradients'
    attributions add up to it (completeness)."""
    out = []
    rows = df[(df["source"] == "model") & (df["method"] == method)]
    for (arm, variant), grp in rows.groupby(["arm", "tested_on"], sort=False):
        change = grp["output_change"].to_numpy(float)
        gap = np.abs(grp["completeness"].to_numpy(float) - change)
        spread = prediction_spread(grp["predicted"].map({c: i for i, c in enumerate(classes)}).to_numpy(), len(classes))
        out.append({"arm": arm, "tested_on": variant, "n": int(len(grp)), **spread,
                    "top_prediction": classes[spread["top_class"]],
                    "mean_p_predicted": float(grp["p_predicted"].mean()),
                    "sd_p_predicted": float(grp["p_predicted"].std(ddof=0)),
                    "flat_output": bool(grp["p_predicted"].std(ddof=0) < FLAT_OUTPUT),
                    "mean_abs_output_change": float(np.nanmean(np.abs(change))),
                    "completeness_gap": float(np.nanmean(gap) / max(np.nanmean(np.abs(change)), 1e-12))
                    if np.isfinite(gap).any() else float("nan")})
    return out
