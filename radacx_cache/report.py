"""The results table (the paper's Table 1) with CIs, per-class metrics and figures.

Reads ``predictions/<variant>/<original|masked>.csv`` (written by zeroshot, probe and finetune)
and writes ``results/table1.{md,csv,json,tex}``, ``results/metrics.json`` and PNG figures.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from ._io import atomic_path, read_json, write_csv, write_json
from .arms import ARMS, IMAGE_VARIANTS
from .config import Config
from .figures import report_figures
from .metrics import bootstrap_ci, evaluate, paired_bootstrap
from .predictions import load_predictions
from .workdir import Workdir

log = logging.getLogger(__name__)


def _fmt(point, low, high):
    return "n/a" if not np.isfinite(point) else f"{point:.4f} [{low:.3f}, {high:.3f}]"


def _arm_result(arm, work: Workdir, n_boot: int, seed: int) -> tuple[dict, dict, list] | None:
    """(table row, metrics, classes) of one arm from its two prediction files, or None if absent."""
    paths = {v: work.predictions(arm.name, v) for v in IMAGE_VARIANTS}
    if not all(p.exists() for p in paths.values()):
        log.info("report: no predictions for %s yet; row left out", arm.name)
        return None
    orig, masked = (load_predictions(paths[v]) for v in IMAGE_VARIANTS)
    if orig.classes != masked.classes or not orig.frame["dicom_id"].equals(masked.frame["dicom_id"]):
        raise ValueError(f"{arm.name}: original and masked predictions are not over the same test images")
    patients = orig.frame["subject_id"].to_numpy()
    cis = {v: bootstrap_ci(p.proba, p.targets, patients, n_boot=n_boot, seed=seed)
           for v, p in (("original", orig), ("masked", masked))}
    paired = paired_bootstrap(orig.proba, masked.proba, orig.targets, patients, n_boot=n_boot, seed=seed)
    metrics = {"description": arm.description, "original": evaluate(orig.proba, orig.targets),
               "masked": evaluate(masked.proba, masked.targets),
               "ci": {v: list(c) for v, c in cis.items()}, "masked_minus_original": paired,
               "provenance": {v: {k: p.meta.get(k) for k in ("model", "model_fingerprint", "feature_fingerprints",
                                                              "shards_fingerprint", "checkpoint")}
                              for v, p in (("original", orig), ("masked", masked))}}
    row = {"variant": arm.name, "description": arm.description,
           "acc_original": cis["original"][0], "ci_original": cis["original"][1:],
           "acc_masked": cis["masked"][0], "ci_masked": cis["masked"][1:],
           "diff": paired["diff"], "p_value": paired["p_value"],
           "macro_auroc_original": metrics["original"]["macro_auroc"],
           "macro_auroc_masked": metrics["masked"]["macro_auroc"],
           "published_original": arm.published[0], "published_masked": arm.published[1], "n_test": len(orig.proba),
           **{f"{key}_{v}": metrics[v][key] for v in IMAGE_VARIANTS
              for key in ("accuracy_single", "balanced_accuracy_single", "macro_f1")}}
    return row, metrics, orig.classes


def _write_tables(out, table: pd.DataFrame, metrics: dict, classes, provenance: dict) -> str:
    md = _markdown(table, provenance)
    with atomic_path(out / "table1.md") as tmp:
        tmp.write_text(md)
    flat = table.assign(ci_original=table["ci_original"].map(lambda c: f"{c[0]:.4f}-{c[1]:.4f}"),
                        ci_masked=table["ci_masked"].map(lambda c: f"{c[0]:.4f}-{c[1]:.4f}"))
    write_csv(out / "table1.csv", flat)
    write_json(out / "table1.json", {"rows": flat.to_dict("records"), "provenance": provenance})
    with atomic_path(out / "table1.tex") as tmp:
        tmp.write_text(_latex(table))
    write_json(out / "metrics.json", {"classes": classes, "variants": metrics, "provenance": provenance})
    per_class = pd.DataFrame([{"variant": name, "tested_on": v, "class": c, "auroc": metrics[name][v]["auroc"][k]}
                              for name in metrics for v in IMAGE_VARIANTS for k, c in enumerate(classes)])
    write_csv(out / "per_class_auroc.csv", per_class)
    return md


def build_report(cfg: Config) -> dict:
    """The ``report`` stage: Table 1 and its companions from every arm's prediction files."""
    work = Workdir(cfg.workdir)
    out = work.results_dir
    out.mkdir(parents=True, exist_ok=True)
    rows, metrics, classes = [], {}, None
    for arm in ARMS:
        result = _arm_result(arm, work, cfg.report.bootstrap, cfg.seed)
        if result is not None:
            rows.append(result[0])
            metrics[arm.name], classes = result[1], result[2]
    if not rows:
        raise FileNotFoundError(f"no predictions under {work.predictions_dir}; run zeroshot / probe / finetune first")
    table = pd.DataFrame(rows)
    cohort = read_json(work.cohort_manifest)
    shards = read_json(work.shards_manifest)
    provenance = {"cohort_fingerprint": cohort["fingerprint"], "shards_fingerprint": shards["fingerprint"],
                  "render_fingerprint": shards["render_fingerprint"], "model": cfg.model.spec,
                  "label_policy": cohort["policy"], "n_bootstrap": cfg.report.bootstrap, "seed": cfg.seed}
    md = _write_tables(out, table, metrics, classes, provenance)
    figures = report_figures(out, table, metrics, classes, work.shards_dir)
    return {"table": md, "results": str(out), "figures": figures}


def _markdown(table: pd.DataFrame, provenance: dict) -> str:
    lines = ["| Variant | Description | Acc. original [95% CI] | Acc. masked [95% CI] | masked − original (p) "
             "| Macro AUROC orig / masked | Published orig / masked |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(
            f"| {r.variant} | {r.description} | {_fmt(r.acc_original, *r.ci_original)} | "
            f"{_fmt(r.acc_masked, *r.ci_masked)} | {r.diff:+.4f} (p={r.p_value:.3f}) | "
            f"{r.macro_auroc_original:.3f} / {r.macro_auroc_masked:.3f} | "
            f"{r.published_original:.4f} / {r.published_masked:.4f} |")
    lines += ["", f"Test images: {int(table['n_test'].max())}. CIs: percentile bootstrap by patient "
              f"({provenance['n_bootstrap']} resamples); p: paired patient bootstrap, two-sided. "
              f"Published: the paper's MIMIC-CXR numbers, shown for reference only.",
              f"Cohort {provenance['cohort_fingerprint']}, shards {provenance['shards_fingerprint']} "
              f"(render {provenance['render_fingerprint']}), model {provenance['model']}, "
              f"label policy {json.dumps(provenance['label_policy'])}.", ""]
    return "\n".join(lines)


def _latex(table: pd.DataFrame) -> str:
    lines = [r"\begin{tabular}{llcccc}", r"\toprule",
             r"Variant & Description & Original & Masked & Published orig. & Published masked \\",
             r"\midrule"]
    for r in table.itertuples():
        lines.append(f"{r.variant} & {r.description} & {r.acc_original:.4f} & {r.acc_masked:.4f} & "
                     f"{r.published_original:.4f} & {r.published_masked:.4f} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)
