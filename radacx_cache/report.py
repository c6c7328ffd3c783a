"""The results table (the paper's Table 1) with CIs, per-class metrics and figures.

Reads ``predictions/<variant>/<original|masked>.csv`` (written by zeroshot, probe and finetune)
and writes ``results/table1.{md,csv,json,tex}``, ``results/metrics.json`` and PNG figures.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import atomic_path, write_csv, write_json
from .config import Config
from .metrics import bootstrap_ci, evaluate, paired_bootstrap

log = logging.getLogger(__name__)
ROWS = (("Baseline", "zero-shot BiomedCLIP"), ("V1", "linear head, original"),
        ("V2", "linear head, masked"), ("V3", "encoder + head, original"),
        ("V4", "encoder + head, masked"))
PUBLISHED = {"Baseline": (0.2367, 0.3467), "V1": (0.4460, 0.4509), "V2": (0.4205, 0.4215),
             "V3": (0.4005, 0.4039), "V4": (0.3484, 0.4318)}  # the paper's MIMIC numbers


def load_predictions(path: Path):
    df = pd.read_csv(path, dtype={"dicom_id": str})
    classes = [c[len("prob_"):] for c in df.columns if c.startswith("prob_")]
    proba = df[[f"prob_{c}" for c in classes]].to_numpy(float)
    targets = df[[f"target_{c}" for c in classes]].to_numpy(float)
    meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").exists() else {}
    return df, classes, proba, targets, meta


def _fmt(point, low, high):
    return "n/a" if not np.isfinite(point) else f"{point:.4f} [{low:.3f}, {high:.3f}]"


def build_report(cfg: Config) -> dict:
    pred_dir = cfg.work / "predictions"
    out = cfg.work / "results"
    out.mkdir(parents=True, exist_ok=True)
    n_boot = cfg.report.bootstrap
    rows, metrics, classes = [], {}, None
    for name, desc in ROWS:
        paths = {v: pred_dir / name / f"{v}.csv" for v in ("original", "masked")}
        if not all(p.exists() for p in paths.values()):
            log.info("report: no predictions for %s yet; row left out", name)
            continue
        loaded = {v: load_predictions(p) for v, p in paths.items()}
        df_o, classes_o, po, to, meta_o = loaded["original"]
        df_m, classes_m, pm, tm, meta_m = loaded["masked"]
        if classes_o != classes_m or not df_o["dicom_id"].equals(df_m["dicom_id"]):
            raise ValueError(f"{name}: original and masked predictions are not over the same test images")
        classes = classes_o
        patients = df_o["subject_id"].to_numpy()
        cis = {v: bootstrap_ci(p, t, patients, n_boot=n_boot, seed=cfg.seed)
               for v, p, t in (("original", po, to), ("masked", pm, tm))}
        paired = paired_bootstrap(po, pm, to, patients, n_boot=n_boot, seed=cfg.seed)
        metrics[name] = {"description": desc, "original": evaluate(po, to), "masked": evaluate(pm, tm),
                         "ci": {v: list(c) for v, c in cis.items()}, "masked_minus_original": paired,
                         "provenance": {v: {k: m.get(k) for k in ("model", "model_fingerprint",
                                                                   "feature_fingerprints",
                                                                   "shards_fingerprint", "checkpoint")}
                                        for v, m in (("original", meta_o), ("masked", meta_m))}}
        pub = PUBLISHED[name]
        rows.append({"variant": name, "description": desc,
                     "acc_original": cis["original"][0], "ci_original": cis["original"][1:],
                     "acc_masked": cis["masked"][0], "ci_masked": cis["masked"][1:],
                     "diff": paired["diff"], "p_value": paired["p_value"],
                     "macro_auroc_original": metrics[name]["original"]["macro_auroc"],
                     "macro_auroc_masked": metrics[name]["masked"]["macro_auroc"],
                     "published_original": pub[0], "published_masked": pub[1], "n_test": len(po),
                     **{f"{key}_{v}": metrics[name][v][key] for v in ("original", "masked")
                        for key in ("accuracy_single", "balanced_accuracy_single", "macro_f1")}})
    if not rows:
        raise FileNotFoundError(f"no predictions under {pred_dir}; run zeroshot / probe / finetune first")
    table = pd.DataFrame(rows)
    cohort = json.loads((cfg.work / "cohort" / "manifest.json").read_text())
    shards = json.loads((cfg.work / "shards" / "manifest.json").read_text())
    provenance = {"cohort_fingerprint": cohort["fingerprint"], "shards_fingerprint": shards["fingerprint"],
                  "render_fingerprint": shards["render_fingerprint"], "model": cfg.embed.model,
                  "label_policy": cohort["policy"], "n_bootstrap": n_boot, "seed": cfg.seed}
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
                              for name in metrics for v in ("original", "masked") for k, c in enumerate(classes)])
    write_csv(out / "per_class_auroc.csv", per_class)
    figures = _figures(out, table, metrics, classes, cfg)
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


def _figures(out: Path, table: pd.DataFrame, metrics: dict, classes, cfg: Config) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    # original vs masked accuracy with CIs
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(table))
    for j, (v, color) in enumerate((("original", "#4c72b0"), ("masked", "#dd8452"))):
        acc = table[f"acc_{v}"].to_numpy()
        ci = np.array(table[f"ci_{v}"].tolist())
        ax.bar(x + (j - 0.5) * 0.38, acc, 0.38, color=color, label=f"{v} test images",
               yerr=[acc - ci[:, 0], ci[:, 1] - acc], capsize=3)
    ax.scatter(x - 0.19, table["published_original"], marker="_", color="k", s=200, label="published (MIMIC)")
    ax.scatter(x + 0.19, table["published_masked"], marker="_", color="k", s=200)
    ax.set_xticks(x, table["variant"])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy on original vs masked test images (95% patient bootstrap CI)")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    paths.append(str(out / "accuracy.png"))
    # per-class AUROC
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = list(metrics)
    width = 0.8 / (2 * len(names))
    for i, name in enumerate(names):
        for j, v in enumerate(("original", "masked")):
            au = np.array(metrics[name][v]["auroc"], float)
            ax.bar(np.arange(len(classes)) + (2 * i + j - len(names)) * width + width / 2, np.nan_to_num(au),
                   width, label=f"{name} {v}", alpha=0.9 if v == "original" else 0.55)
    ax.set_xticks(np.arange(len(classes)), classes, fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("AUROC (one-vs-rest)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=len(names))
    fig.tight_layout()
    fig.savefig(out / "auroc_per_class.png", dpi=120)
    plt.close(fig)
    paths.append(str(out / "auroc_per_class.png"))
    # confusion matrices (single-positive subset)
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.4), squeeze=False)
    for i, name in enumerate(names):
        for j, v in enumerate(("original", "masked")):
            cm = np.array(metrics[name][v]["confusion_single"], float)
            cm = cm / cm.sum(1, keepdims=True).clip(1)
            ax = axes[j, i]
            ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
            ax.set_title(f"{name} / {v}", fontsize=8)
            short = [c[:5] for c in classes]
            ax.set_xticks(range(len(classes)), short, fontsize=6, rotation=45)
            ax.set_yticks(range(len(classes)), short, fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)
    paths.append(str(out / "confusion.png"))
    # figure 1: original / masked montage of test images
    shard = sorted((cfg.work / "shards").glob("test-*.h5"))
    if shard:
        from .inspect import montage
        montage(shard[0], out / "figure1_montage.png", n=6)
        paths.append(str(out / "figure1_montage.png"))
    return paths
