"""The report stage: Table 1 (the paper's), reference rows, both paired effects, Table 2, figures.

Reads every arm's prediction files (``predictions/<arm>/<image-variant>.csv``), checks each is
complete for the current shards, and writes ``results/table1.{md,tex,csv,json}``,
``results/metrics.json``, ``results/per_class_auroc.csv`` and PNG figures. The markdown and LaTeX
tables are rendered from one list of sections, so they carry the same numbers (docs/metrics.md).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import atomic_path, read_json, write_csv, write_json
from ..arms import ARM_BY_NAME, ARMS, IMAGE_VARIANTS
from ..config import Config, FinetuneConfig, ProbeConfig
from ..figures import report_figures, stamp, variant_figure
from ..formats.context import StageContext, open_stage
from ..formats.predictions import Predictions, arm_record, check_complete, load_predictions
from ..formats.records import Verifier, write_record
from ..formats.shard import ShardSet
from ..metrics import (ALTERNATIVES, READING_TEXT, READINGS, best_constant, bootstrap_mean, correctness, evaluate,
                       format_p, paired_difference, per_class_auroc_ci, reading_values, reference_correctness)
from ..models import describe_spec
from ..tables import Section, render_latex, render_markdown
from ..tables.ablation import ablation_reference, ablation_results, ablation_sections
from ..tables.saliency import saliency_sections
from ..workdir import Workdir

log = logging.getLogger(__name__)
REFERENCES = (("chance", "uniform random class"),
              ("majority", "the train split's most frequent target"),
              ("prior", "random class drawn with the train split's target frequencies"))
POLICY_TEXT = {
    "uncertain": {"ignore": "uncertain (-1) labels are neither positive nor negative: they do not make an image "
                            "eligible and are left out of that class's AUROC and F1",
                  "zeros": "uncertain (-1) labels count as negative", "ones": "uncertain (-1) labels count as positive"},
    "multi_positive": {"any": "images with several positive findings are kept (training target: the "
                              "normalised multi-hot vector)",
                       "single": "only images with exactly one positive finding are kept",
                       "first": "images with several positives are kept (training target: the first "
                                "positive in the priority order)"},
    "split": {"paper": "patient-level split: the official test split kept, the other patients split "
                       "train:val about 5:1 (seeded)",
              "official": "the official patient-level split"},
}


def _ci(point, low, high) -> str:
    return "n/a" if not np.isfinite(point) else f"{point:.4f} [{low:.3f}, {high:.3f}]"


def _diff(d: dict) -> str:
    return f"{d['diff']:+.4f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def load_arm(arm: str, work: Workdir, shards: ShardSet, verifier: Verifier,
             variants=IMAGE_VARIANTS) -> dict[str, Predictions] | None:
    """The predictions of ``arm`` on ``variants`` (those it was tested on) read through its verified
    record (the chain above it checked up to the cohort) and checked complete for the current shards;
    None when it has not run."""
    if not work.predictions_record(arm).exists():
        log.info("report: no predictions for %s yet; left out", arm)
        return None
    record = arm_record(work, arm, verifier)
    test = shards.split("test")
    tested = record.facts.tested_on
    loaded = {v: load_predictions(record.file(work.predictions(arm, v).name)) for v in variants if v in tested}
    for pred in loaded.values():
        check_complete(pred, test.index["dicom_id"], shards.fingerprint, shards.target_names)
        # the report scores in the shards' order, whatever order the file is in
        order = pd.Index(pred.frame["dicom_id"].astype(str)).get_indexer(test.index["dicom_id"].astype(str))
        pred.frame, pred.proba = pred.frame.iloc[order].reset_index(drop=True), pred.proba[order]
        pred.positives, pred.uncertain = test.positives(), test.uncertain()
        pred.meta["record"] = record
    return loaded


def _correct(pred: Predictions, reading: str, order):
    return correctness(pred.proba.argmax(1), pred.positives, reading, order)


def _paired(a: Predictions, b: Predictions, patients, n_boot: int, seed: int, order) -> dict:
    """b − a in headline accuracy on the same test images, with its paired patient bootstrap."""
    va, mask = _correct(a, "argmax", order)
    vb, _ = _correct(b, "argmax", order)
    return paired_difference(va, vb, mask, patients, n_boot=n_boot, seed=seed)


def arm_results(arms: dict, shards: ShardSet, policy: str, n_boot: int, seed: int) -> dict:
    """Point metrics, CIs of every reading and the masked - original difference, per arm."""
    patients = shards.split("test").index["subject_id"].to_numpy()
    order = shards.target_order
    out = {}
    for name, preds in arms.items():
        res = {v: evaluate(p.proba, p.positives, p.uncertain, policy, order) for v, p in preds.items()}
        res["ci"] = {v: {r: bootstrap_mean(*_correct(p, r, order), patients, n_boot=n_boot, seed=seed)
                         for r in READINGS} for v, p in preds.items()}
        res["auroc_ci"] = {v: per_class_auroc_ci(p.proba, p.positives, p.uncertain, policy, patients, n_boot=n_boot,
                                                 seed=seed) for v, p in preds.items()}
        res["masked_minus_original"] = _paired(preds["original"], preds["masked"], patients, n_boot, seed, order)
        record = preds["original"].meta["record"]
        res["provenance"] = {"record": record.fingerprint, "model": record.facts.model_spec,
                             "model_fingerprint": record.facts.model_fingerprint,
                             "shards_fingerprint": shards.fingerprint}
        out[name] = res
    return out


def training_effects(arms: dict, shards: ShardSet, n_boot: int, seed: int) -> list[dict]:
    """The paper's first claim: masked-trained minus original-trained arm, per test image variant."""
    patients = shards.split("test").index["subject_id"].to_numpy()
    out = []
    for a, b in (("V1", "V2"), ("V3", "V4")):
        if a in arms and b in arms:
            for v in IMAGE_VARIANTS:
                out.append({"comparison": f"{b} − {a}", "test_images": v,
                            **_paired(arms[a][v], arms[b][v], patients, n_boot, seed, shards.target_order)})
    return out


def references(shards: ShardSet, classes, n_boot: int, seed: int) -> dict:
    """Chance, majority and prior rows on the test images, per reading, with CIs."""
    train, test = shards.split("train"), shards.split("test")
    patients = test.index["subject_id"].to_numpy()
    out = {}
    for reading in READINGS:
        ref = reference_correctness(train.positives(), test.positives(), reading, shards.target_order)
        out[reading] = {name: bootstrap_mean(*ref[name], patients, n_boot=n_boot, seed=seed) for name, _ in REFERENCES}
        out[reading]["majority_class"] = classes[ref["majority_class"]]
    return out


def _sections(results, effects, refs, descriptions, classes, n_test, n_boot, synthetic, archive) -> list[Section]:
    pub_head = "Published orig. / masked (MIMIC-CXR)"
    t1 = Section(f"Table 1: accuracy on original vs masked test images — {archive}",
                 ["Arm", "Description", "Original [95% CI]", "Masked [95% CI]", "Masked − original [95% CI]",
                  "p", pub_head])
    for arm in ARMS:
        if arm.name in results:
            r = results[arm.name]
            d = r["masked_minus_original"]
            t1.rows.append([arm.name, descriptions[arm.name], _ci(*r["ci"]["original"]["argmax"]),
                            _ci(*r["ci"]["masked"]["argmax"]), _diff(d), format_p(d, n_boot),
                            f"{arm.published[0]:.4f} / {arm.published[1]:.4f}"])
    missing = [arm for arm in ARMS if arm.name not in results]
    for arm in missing:  # stated in the table itself: a Table 1 without V3/V4 must say why
        t1.rows.append([arm.name, arm.description, "not run", "not run", "–", "–",
                        f"{arm.published[0]:.4f} / {arm.published[1]:.4f}"])
    for name, text in REFERENCES:
        if name == "majority":
            text = f"always {refs['argmax']['majority_class']} ({text})"
        t1.rows.append([name, text, _ci(*refs["argmax"][name]), _ci(*refs["argmax"][name]), "–", "–", "–"])
    if missing:
        t1.notes.append(f"Not run yet: {', '.join(a.name for a in missing)} (run `radacx "
                        f"{' / '.join(dict.fromkeys(STAGE_OF[a.method] for a in missing))}`, then `radacx report`).")
    t1.notes.append(f"Accuracy (headline): {READING_TEXT['argmax']}; {n_test} test images; chance = 1/{len(classes)}.")
    if synthetic:
        t1.notes.append("Synthetic phantom archive: the published MIMIC-CXR numbers are shown for reference "
                        "only and are not comparable.")
    elif "MIMIC" not in archive:
        t1.notes.append(f"The published numbers are MIMIC-CXR's; this table is {archive}: compare the "
                        f"direction of the effects, not the values.")
    te = Section("Training-image effect: masked-trained minus original-trained arm (same test images)",
                 ["Comparison", "Test images", "Difference [95% CI]", "p"],
                 [[e["comparison"], e["test_images"], _diff(e), format_p(e, n_boot)] for e in effects])
    t2 = Section("Table 2: balanced accuracy, macro-F1 and macro-AUROC",
                 ["Arm", "Test images", "Balanced accuracy", "Macro-F1", "Macro-AUROC"],
                 [[n, v, f"{r[v]['balanced_accuracy']:.4f}", f"{r[v]['macro_f1']:.4f}", f"{r[v]['macro_auroc']:.4f}"]
                  for n, r in results.items() for v in IMAGE_VARIANTS])
    t2.notes.append("Balanced accuracy over the headline targets (first positive finding); F1 and AUROC "
                    "one-vs-rest per class on the multi-hot positives, then averaged.")
    other = Section("Other readings of accuracy [95% CI]",
                    ["Arm", "Test images", "Top-1 among positives", "Strict single-label"],
                    [[n, v, _ci(*r["ci"][v]["any"]), _ci(*r["ci"][v]["single"])]
                     for n, r in results.items() for v in IMAGE_VARIANTS])
    other.rows += [[name, "either", _ci(*refs["any"][name]), _ci(*refs["single"][name])] for name, _ in REFERENCES]
    n_single = next(iter(results.values()))["original"]["n_single"] if results else 0
    other.notes.append(f"Top-1 among positives: {READING_TEXT['any']}. Strict single-label: "
                       f"{READING_TEXT['single']} ({n_single} images).")
    return [t1, te, t2, other]


def alternative_readings(arms: dict, shards: ShardSet, classes) -> Section:
    """Each arm's accuracy and rank under every way of making a multi-positive image one label, from
    the same predictions, beside the best constant guess (docs/metrics.md)."""
    positives, order = shards.split("test").positives(), shards.target_order
    values = {(n, v): reading_values(p.proba.argmax(1), positives, order)
              for n, preds in arms.items() for v, p in preds.items()}
    sec = Section("The headline assumes one reading: accuracy (rank among the arms) under each",
                  ["Arm", "Test images", *ALTERNATIVES.values()])
    for (name, variant), vals in values.items():
        cells = []
        for reading in ALTERNATIVES:
            peers = [values[(n, variant)][reading] for n in arms]
            rank = 1 + sum(v > vals[reading] for v in peers)
            cells.append(f"{vals[reading]:.4f} ({rank})" if np.isfinite(vals[reading]) else "n/a")
        sec.rows.append([name, variant, *cells])
    const = best_constant(positives, order)
    sec.rows.append(["best constant guess", "either",
                     *(f"{const[r][0]:.4f} (always {classes[const[r][1]]})" for r in ALTERNATIVES)])
    sec.notes.append("The paper does not say how an image with several positive findings becomes one label. "
                     "Headline: the first positive in the cohort's target order; a random positive (its expected "
                     "accuracy); every (image, positive finding) pair as one sample; top-1 among the positives; "
                     "single-positive images only. A constant guess above an arm under a reading means that "
                     "reading cannot rank that arm.")
    return sec


def out_saliency(work: Workdir, verifier: Verifier, arm_records: dict) -> dict | None:
    """The saliency stage's results, read through its verified record, when it ran on the arms of
    this report as they are now."""
    if not work.saliency_record.exists():
        return None
    record = verifier.record(work.saliency_record, "saliency")
    for name, rec in arm_records.items():
        if name in record["arms"]:
            verifier.require_upstream(record, rec)
    return read_json(record.file(work.saliency_file("json").name))


STAGE_OF = {"zeroshot": "zeroshot", "probe": "probe", "finetune": "finetune"}


def training_settings(records: dict) -> list[str]:
    """One line per group of arms trained with settings other than the defaults (``probe.*``,
    ``finetune.*`` as each arm's record holds them), e.g. a one-epoch fine-tune, so it shows in Table 1."""
    defaults = {"probe": dataclasses.asdict(ProbeConfig()), "finetune": dataclasses.asdict(FinetuneConfig())}
    groups: dict = {}
    for name, rec in records.items():
        method = ARM_BY_NAME[name].method if name in ARM_BY_NAME else None
        if method not in defaults:
            continue
        if rec.facts.training is None:
            groups.setdefault(f"{method} settings not recorded (written before records held them)", []).append(name)
            continue
        changed = {k: v for k, v in rec.facts.training.items()
                   if k in defaults[method] and k != "variants" and v != defaults[method][k]}
        text = ", ".join(f"{method}.{k} = {v} (default {defaults[method][k]})" for k, v in sorted(changed.items()))
        groups.setdefault(text or f"{method}: the defaults", []).append(name)
    return [f"Training settings, {', '.join(arms)}: {text}." for text, arms in groups.items()]


def _footer(provenance: dict, n_boot: int) -> list[str]:
    pol = provenance["label_policy"]
    return [f"CIs: percentile bootstrap over patients ({n_boot} resamples); p: paired patient bootstrap, "
            f"two-sided (< 2/{n_boot}: no resample reached 0; the smallest p the doubling can give is 2/B).",
            "Label policy: " + "; ".join(POLICY_TEXT[k][pol[k]] for k in ("uncertain", "multi_positive", "split"))
            + f"; CheXmask Dice RCA (Mean) >= {pol['min_mask_quality']}.",
            f"Archive: {provenance['archive']}. Cohort {provenance['cohort_fingerprint']}, shards "
            f"{provenance['shards_fingerprint']} (render {provenance['render_fingerprint']}), model "
            f"{provenance['model']}, seed {provenance['seed']}."]


def _unlabelled(shards: ShardSet, classes) -> list[str]:
    """A line naming each class with no positive test label (VinDr-CXR's Kaggle table has no Edema):
    the table is then a problem of fewer classes than its columns say."""
    counts = (shards.split("test").positives() > 0).sum(0)
    missing = [c for c, n in zip(classes, counts) if n == 0]
    if not missing:
        return []
    return [f"No positive test label for {', '.join(missing)} (not labelled in this archive, or absent from its test "
            f"split): Table 1 is a {len(classes) - len(missing)}-class problem here; read it against its majority row."]


def build_report(cfg: Config) -> dict:
    """The ``report`` stage: Table 1 and its companions from every arm's prediction files."""
    with open_stage(cfg.workdir, "report", cfg.permissions) as ctx:
        return _build_report(cfg, ctx)


def _build_report(cfg: Config, ctx: StageContext) -> dict:
    work, verifier, shards = ctx.work, ctx.verifier, ctx.shards
    cohort = verifier.record(work.cohort_manifest, "cohort")  # the policy the shards were built with
    policy, n_boot, classes = cohort.facts.policy, cfg.report.bootstrap, shards.target_names
    arms = {a.name: p for a in ARMS if (p := load_arm(a.name, work, shards, verifier)) is not None}
    if not arms:
        raise FileNotFoundError(f"no predictions under {work.predictions_dir}; run zeroshot / probe / finetune first")
    records = {name: preds["original"].meta["record"] for name, preds in arms.items()}
    results = arm_results(arms, shards, policy.uncertain, n_boot, cfg.seed)
    effects = training_effects(arms, shards, n_boot, cfg.seed)
    refs = references(shards, classes, n_boot, cfg.seed)
    synthetic = cohort.facts.synthetic_archive
    name = cohort.facts.archive_name
    archive = f"synthetic phantom in the {name} layout" if synthetic else name
    descriptions = {a.name: f"{a.description}, {describe_spec(records[a.name].facts.model_spec)}"
                    for a in ARMS if a.name in records}
    models = sorted({rec.facts.model_spec for rec in records.values()})
    n_test = len(shards.split("test"))
    provenance = {"cohort_fingerprint": cohort.fingerprint, "shards_fingerprint": shards.fingerprint,
                  "render_fingerprint": shards.manifest["render_fingerprint"], "model": ", ".join(models),
                  "label_policy": policy.as_dict(), "target_order": shards.manifest["target_order"], "n_bootstrap": n_boot,
                  "seed": cfg.seed, "archive": archive, "accuracy": READING_TEXT["argmax"],
                  "arm_records": {n: rec.fingerprint for n, rec in records.items()}}
    sections = _sections(results, effects, refs, descriptions, classes, n_test, n_boot, synthetic, archive)
    sections.append(alternative_readings(arms, shards, classes))
    saliency = out_saliency(work, verifier, records)
    if saliency is not None:
        sections += saliency_sections(saliency, n_boot)
    out = Written(work)
    ablation_records = _ablation(out, shards, verifier, sections, cfg.seed, n_boot, synthetic) if shards.derived else {}
    footer = _footer(provenance, n_boot) + training_settings(records) + _unlabelled(shards, classes)
    md = render_markdown(sections, footer)
    with atomic_path(out("table1.md")) as tmp:
        tmp.write_text(md)
    with atomic_path(out("table1.tex")) as tmp:
        tmp.write_text(render_latex(sections, footer))
    _write_data(out, results, effects, refs, descriptions, classes, provenance)
    figures = report_figures(out, results, refs, classes, work.shards_dir, published=not synthetic,
                             published_values={a.name: a.published for a in ARMS}, synthetic=synthetic,
                             descriptions=descriptions)
    upstream = list({**records, **ablation_records}.values()) + (
        [verifier.record(work.saliency_record)] if saliency is not None else [])
    write_record(work.report_record, work.root, "report", "radacx report", files=out.names(), upstream=upstream)
    return {"table": md, "results": str(work.results_dir), "figures": figures}


class Written:
    """The report's output paths (``Workdir.result``), remembering each one handed out: the report's
    record lists exactly the files it wrote, in the order of ``Workdir.RESULT_FILES``."""

    def __init__(self, work: Workdir):
        self.work, self._names = work, set()

    def __call__(self, name: str) -> Path:
        self._names.add(name)
        return self.work.result(name)

    def names(self) -> list[str]:
        return [n for n in self.work.RESULT_FILES if n in self._names and self.work.result(n).exists()]


def _ablation(out: Written, shards: ShardSet, verifier: Verifier, sections: list, seed: int, n_boot: int,
              synthetic: bool) -> dict:
    """The overlay ablation's sections (appended to ``sections``), ``ablation.json`` and the variants
    figure; returns the records of the arms it read."""
    work, loaded = out.work, {}

    def load(arm: str, variant: str):
        if arm not in loaded:  # an arm not run (a variant not fine-tuned) is simply not in the table
            loaded[arm] = load_arm(arm, work, shards, verifier, shards.variants) \
                if work.predictions_record(arm).exists() else None
        return (loaded[arm] or {}).get(variant)

    test = shards.split("test")
    rows = ablation_results(load, shards.variants, test.positives(), test.index["subject_id"].to_numpy(),
                            shards.target_order, n_boot, seed)
    reference = ablation_reference(test.positives(), shards.target_order)
    sections += ablation_sections(rows, shards.target_names, n_boot, reference)
    variants = verifier.record(work.shards_variants, "variants")  # verified with the shards
    specs = {"masked": variants["masked"], **{name: spec.as_dict() for name, spec in shards.derived.items()}}
    write_json(out("ablation.json"), {"variants": specs, "rows": rows, "reference": reference,
                                       "classes": shards.target_names})
    variant_figure(out("ablation_variants.png"), test, shards.variants, n=3, seed=seed)
    if synthetic:
        stamp(out("ablation_variants.png"))
    return {"variants.json": variants, **{arm: next(iter(p.values())).meta["record"] for arm, p in loaded.items() if p}}


def _write_data(out, results, effects, refs, descriptions, classes, provenance) -> None:
    rows = []
    for name, r in results.items():
        row = {"arm": name, "description": descriptions[name], "n_test": r["original"]["n"]}
        for v in IMAGE_VARIANTS:
            for reading in READINGS:
                point, low, high = r["ci"][v][reading]
                row.update({f"acc_{reading}_{v}": point, f"acc_{reading}_{v}_low": low, f"acc_{reading}_{v}_high": high})
            for key in ("balanced_accuracy", "macro_f1", "macro_auroc"):
                row[f"{key}_{v}"] = r[v][key]
        d = r["masked_minus_original"]
        row.update({"diff_masked_minus_original": d["diff"], "diff_low": d["low"], "diff_high": d["high"],
                    "p_value": d["p_value"], "p_bound": "<" if d["p_below"] else "="})
        rows.append(row)
    write_csv(out("table1.csv"), pd.DataFrame(rows))
    write_json(out("table1.json"), {"rows": rows, "training_effects": effects, "reference": refs,
                                     "provenance": provenance})
    write_json(out("metrics.json"), {"classes": classes, "arms": results, "provenance": provenance})
    per_class = pd.DataFrame([{"arm": n, "tested_on": v, "class": c, "auroc": r[v]["auroc"][k],
                               "auroc_low": r["auroc_ci"][v][k][0], "auroc_high": r["auroc_ci"][v][k][1],
                               "f1": r[v]["f1"][k]}
                              for n, r in results.items() for v in IMAGE_VARIANTS for k, c in enumerate(classes)])
    write_csv(out("per_class_auroc.csv"), per_class)

