"""Saliency measured against regions, the controls every run computes, and the check that can fail.

Pure functions (docs/saliency.md). A map is scored by ``image_metrics`` against an image's regions
(``regions``: lungs, heart, their lower thirds, the overlay's ink band) and, where known, the truth
(where the phantom drew the finding, or where radiologists drew a box). Because an anatomically
plausible map scores well without looking at anything, every arm is compared with four **controls**
on the same images and regions:

- ``uniform_anatomy``: a flat map over lungs + heart (no model at all);
- ``centred_gaussian``: a fixed Gaussian in the image centre (no model at all);
- ``random_head``: the same method on the arm's network with a randomly drawn head (the head only:
  the encoder stays the arm's; the cascading encoder randomisation is reported beside, as a rank
  correlation);
- ``shuffled_maps``: the arm's own maps, each scored on another image (a seeded derangement);
- ``input_intensity``: the test image's own grey levels as a map (no model: what a map that merely
  follows brightness scores).

``control_checks`` passes an arm only if it beats *every* control on the truth metric, each by a
paired patient-bootstrap CI of (arm − control) whose lower end is above 0.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .metrics import bootstrap_mean, paired_finite
from .render import boundary

CONTROLS = ("uniform_anatomy", "centred_gaussian", "random_head", "shuffled_maps", "input_intensity")
CONTROL_TEXT = {"uniform_anatomy": "uniform over lungs + heart", "centred_gaussian": "centred Gaussian",
                "random_head": "random head", "shuffled_maps": "maps shuffled across images",
                "input_intensity": "input intensity"}


def regions(masks: np.ndarray, line_width: int) -> dict[str, np.ndarray]:
    """The regions the metrics need, from one image's (3, H, W) masks (right lung, left lung, heart)."""
    right, left, heart = (m.astype(bool) for m in masks)
    lungs = right | left
    lower = np.zeros_like(lungs)
    for lung in (right, left):  # the lower third of each lung's height: where pleural fluid collects
        rows = np.flatnonzero(lung.any(1))
        if rows.size:
            cut = rows[0] + 2 * (rows[-1] - rows[0]) // 3
            lower[cut:] |= lung[cut:]
    ink = boundary(right, line_width) | boundary(left, line_width) | boundary(heart, line_width)
    return {"anatomy": lungs | heart, "lungs": lungs, "heart": heart, "lower_lungs": lower, "ink": ink}


def relevant_region(finding: str, reg: dict) -> np.ndarray:
    return {"Cardiomegaly": reg["heart"], "Pleural Effusion": reg["lower_lungs"]}.get(finding, reg["lungs"])


def image_metrics(smap: np.ndarray, reg: dict, finding: str, truth: np.ndarray | None = None,
                  box: np.ndarray | None = None) -> dict:
    """Per-image saliency metrics and their area baselines (the value of a uniform map); ``truth``:
    where the phantom drew ``finding``; ``box``: where radiologists boxed it (None: unknown)."""
    total = smap.sum()
    s = smap / total if total > 0 else np.full_like(smap, 1.0 / smap.size)
    peak = np.unravel_index(np.argmax(smap), smap.shape)
    organ = relevant_region(finding, reg)
    out = {"anatomy": s[reg["anatomy"]].sum(), "anatomy_area": reg["anatomy"].mean(),
           "organ": s[organ].sum(), "organ_area": organ.mean(), "pointing": float(organ[peak]),
           "ink": s[reg["ink"]].sum(), "ink_area": reg["ink"].mean(),
           "truth": np.nan, "truth_area": np.nan, "truth_pointing": np.nan,
           "box": np.nan, "box_area": np.nan, "box_pointing": np.nan}
    for name, region in (("truth", truth), ("box", box)):
        if region is not None and region.any():
            out.update({name: s[region].sum(), f"{name}_area": region.mean(), f"{name}_pointing": float(region[peak])})
    return {k: float(v) for k, v in out.items()}


def uniform_anatomy_map(reg: dict) -> np.ndarray:
    return reg["anatomy"].astype(np.float64)


def centred_gaussian_map(shape: tuple[int, int], sigma_fraction: float = 1 / 6) -> np.ndarray:
    """An isotropic Gaussian in the image centre, sigma a fraction of the side."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    sigma = sigma_fraction * max(h, w)
    return np.exp(-(((y - (h - 1) / 2) ** 2 + (x - (w - 1) / 2) ** 2) / (2 * sigma ** 2)))


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (n >= 2): image i gets map perm[i]."""
    if n < 2:
        return np.arange(n)
    rng = np.random.default_rng([seed, 13])
    shift = rng.permutation(n)
    # a random cyclic order: each image takes the next one's map
    perm = np.empty(n, int)
    perm[shift] = np.roll(shift, -1)
    return perm


def control_rows(model_rows: list[dict], seed: int) -> list[dict]:
    """Rows of the model-free controls and the shuffled-maps control for one arm's rows of one
    method (each row holds ``_map``, ``_reg``, ``_truth``, ``_box``, ``_grey``: the image's map,
    regions, truth, boxes and grey levels as the model saw them)."""
    out = []
    for variant in dict.fromkeys(r["tested_on"] for r in model_rows):
        rows = sorted((r for r in model_rows if r["tested_on"] == variant), key=lambda r: r["position"])
        perm = derangement(len(rows), seed)
        for i, row in enumerate(rows):
            maps = {"uniform_anatomy": uniform_anatomy_map(row["_reg"]),
                    "centred_gaussian": centred_gaussian_map(row["_map"].shape),
                    "shuffled_maps": rows[perm[i]]["_map"],
                    "input_intensity": np.asarray(row["_grey"], np.float64)}
            for source, smap in maps.items():
                out.append({**{k: v for k, v in row.items() if not k.startswith("_")}, "source": source,
                            **image_metrics(smap, row["_reg"], row["predicted"], row["_truth"], row.get("_box"))})
    return out


def control_checks(df: pd.DataFrame, method: str, n_boot: int, seed: int, metrics=("box", "truth")) -> list[dict]:
    """Per truth metric (radiologists' boxes, the phantom's drawn findings), arm and test variant: the
    arm's value beside each control's, with the paired difference (arm − control) over the images
    where it is defined. ``passed`` only when every control is beaten with the CI's lower end above 0;
    no check where the metric is undefined."""
    out = []
    for metric in metrics:
        if metric in df and np.isfinite(df[metric].to_numpy(float)).any():
            out += _checks(df[df["method"] == method], metric, method, n_boot, seed)
    return out


def _checks(mine: pd.DataFrame, metric: str, method: str, n_boot: int, seed: int) -> list[dict]:
    out = []
    for (arm, variant), grp in mine.groupby(["arm", "tested_on"], sort=False):
        model = grp[grp["source"] == "model"].set_index("dicom_id")
        ok_model = np.isfinite(model[metric].to_numpy())
        if not ok_model.any():
            continue
        rec = {"arm": arm, "tested_on": variant, "method": method, "metric": metric, "n": int(ok_model.sum()),
               "model": bootstrap_mean(np.nan_to_num(model[metric].to_numpy()), ok_model,
                                       model["subject_id"].to_numpy(), n_boot=n_boot, seed=seed),
               "controls": {}}
        for control in CONTROLS:
            rec["controls"][control] = _versus(model, grp[grp["source"] == control].set_index("dicom_id"),
                                               metric, n_boot, seed)
        rec["passed"] = all(c is not None and c["beaten"] for c in rec["controls"].values())
        out.append(rec)
    return out


def _versus(model: pd.DataFrame, control: pd.DataFrame, metric: str, n_boot: int, seed: int) -> dict | None:
    common = model.index.intersection(control.index)
    if len(common) < 2:
        return None
    a, b = control.loc[common, metric].to_numpy(float), model.loc[common, metric].to_numpy(float)
    patients = model.loc[common, "subject_id"].to_numpy()
    d = paired_finite(a, b, patients, n_boot=n_boot, seed=seed)
    if d is None:
        return None
    ok = np.isfinite(a) & np.isfinite(b)  # the control's value over the same images as the difference
    value = bootstrap_mean(np.nan_to_num(a), ok, patients, n_boot=n_boot, seed=seed)
    return {"value": value, "diff": d, "beaten": bool(d["low"] > 0)}
