"""The saliency stage: where each trained arm looks, measured against the anatomy in the shards.

Methods (``saliency.methods``), from maintained libraries: ``gradcam`` (pytorch-grad-cam's GradCAM
on the last transformer block, with the ViT token -> grid reshape) and ``integrated_gradients``
(captum, black-image baseline). For V1/V2 (frozen encoder + the fitted linear head) and V3/V4
(fine-tuned encoder + head), on a seeded sample of test images, original and masked. Each map is
made non-negative and normalised to sum 1; then, per image (docs/saliency.md):

- ``anatomy``: saliency mass inside lungs + heart; ``organ``: inside the region relevant to the
  predicted class (heart for Cardiomegaly, the lower third of each lung for Pleural Effusion, the
  lungs otherwise); ``pointing``: is the map's maximum inside that region; ``ink``: mass on the
  overlay's drawn boundary band (as rendered), so attention to ink is not mistaken for anatomy;
- each beside its area baseline (what a uniform map scores);
- on the phantom, ``truth``: mass inside the region where the generator drew the predicted finding.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .._io import atomic_path, progress_bar, read_json, write_csv, write_json
from ..arms import ARM_BY_NAME, ARMS, IMAGE_VARIANTS
from ..arms import trained_on as arm_trained_on
from ..attribution import (Contrastive, RandomHead, curve_rows, explain, occlusion_rows, predict, randomised,
                           rank_correlation)
from ..config import Config
from ..figures import saliency_panels, stamp
from ..findings import first_positive
from ..formats.checkpoints import load_checkpoint
from ..formats.context import StageContext, open_stage
from ..formats.predictions import arm_record
from ..formats.probes import ProbeHead, read_probe
from ..formats.records import Record, RecordError, Verifier, write_record
from ..formats.shard import ShardSet
from ..interventions import arm_contrasts, cascade_summary, curve_summary, fill_image, head_summary, occlusion_summary
from ..metrics import bootstrap_finite, paired_finite
from ..models import Classifier, LoadedModel, load_model
from ..phantom.truth import read_truth, region_at, truth_path
from ..render import Geometry, box_region
from ..saliency_metrics import control_checks, control_rows, image_metrics, regions
from ..tables.saliency import saliency_markdown
from ..workdir import Workdir

log = logging.getLogger(__name__)
METRICS = ("anatomy", "organ", "pointing", "ink", "truth", "truth_pointing", "box", "box_pointing")
AREA = {"anatomy": "anatomy_area", "organ": "organ_area", "pointing": "organ_area", "ink": "ink_area",
        "truth": "truth_area", "truth_pointing": "truth_area", "box": "box_area", "box_pointing": "box_area"}
OPTIONAL = ("box", "box_pointing")  # reported only where radiologists' boxes exist


def arm_model(record: Record, work: Workdir, verifier: Verifier, classes) -> torch.nn.Module:
    """The trained network of an arm, in eval mode, on the CPU (weights never unpickled): the model its
    verified record names, the head or checkpoint from the verified record above it."""
    made = record.facts
    lm = load_model(made.model_spec, seed=made.weights_seed or 0)
    if lm.fingerprint != made.model_fingerprint:
        raise RecordError(f"{record.path}: made with model {made.model_fingerprint}, {made.model_spec} "
                          f"now loads as {lm.fingerprint} (other weights); rerun `{record['command']}`")
    spec = ARM_BY_NAME[made.arm]
    rebuilders = {"probe_head": _probe_head, "checkpoint": _fine_tuned}
    if spec.rebuild not in rebuilders:
        raise KeyError(f"arm {spec.name}: no network to explain (rebuild {spec.rebuild!r}; known: {', '.join(rebuilders)})")
    model = rebuilders[spec.rebuild](spec, lm, work, verifier, classes)
    model.lm = lm
    return model.eval()


def _probe_head(spec, lm: LoadedModel, work: Workdir, verifier: Verifier, classes) -> torch.nn.Module:
    probes = verifier.record(work.probes_record, "probe")
    return ProbeHead(lm, read_probe(probes.file(work.probe_weights(spec.name).name)))


def _fine_tuned(spec, lm: LoadedModel, work: Workdir, verifier: Verifier, classes) -> torch.nn.Module:
    trained = verifier.record(work.finetune_record(spec.trained_on), "finetune")
    with torch.no_grad():
        width = lm.model.visual(torch.zeros(1, 3, lm.image_size, lm.image_size)).shape[1]
    model = Classifier(lm.model.visual, width, len(classes))
    model.load_state_dict(load_checkpoint(trained.file(work.finetune_best(spec.trained_on).name))["model"])
    return model


def sample_images(test: ShardSet, n: int, seed: int, boxed: np.ndarray | None = None, cap: int = 0) -> np.ndarray:
    """A fixed, seeded sample of test positions (the same images for every arm and variant), and on
    top of it every position in ``boxed`` (images with boxes), at most ``cap`` of them (seeded): a
    uniform sample of a real archive holds few boxed images (NIH: 457 of ~27k)."""
    n = min(n, len(test))
    chosen = np.random.default_rng([seed, 9]).choice(len(test), n, replace=False)
    if boxed is not None and len(boxed) and cap > 0:
        boxed = np.asarray(boxed, int)
        if len(boxed) > cap:
            boxed = np.random.default_rng([seed, 10]).choice(boxed, cap, replace=False)
        chosen = np.union1d(chosen, boxed)
    return np.sort(chosen)


def boxed_positions(test: ShardSet) -> np.ndarray:
    """Test positions whose image has at least one box (empty without boxes)."""
    return np.array([i for i in range(len(test)) if test.boxes_at(i)], int)


def _truth_regions(cfg: Config, test: ShardSet, positions, classes) -> dict:
    size = test.render_config["size"]
    path = truth_path(cfg.archive.root)
    if path is None:
        return {}
    ids = test.index["dicom_id"].to_numpy()[positions]
    found = read_truth(path, ids)
    out = {}
    for i, d in zip(positions, ids):
        if d in found:
            geom = Geometry.from_array(test.row(i, ("geometry",))["geometry"])
            out[d] = {f: region_at(rle, found[d]["shape"], geom, size)
                      for f, rle in found[d].items() if f in classes}
    return out


def _box_regions(test: ShardSet, positions, classes) -> dict:
    """{dicom_id: {finding: region}} of the radiologists' boxes in the shards (empty without boxes)."""
    size, out = test.render_config["size"], {}
    for i in positions:
        by_class: dict = {}
        for k, *box in test.boxes_at(i):
            by_class.setdefault(classes[k], []).append(box)
        if by_class:
            out[test.index["dicom_id"].iloc[int(i)]] = {f: box_region(b, size) for f, b in by_class.items()}
    return out


@dataclass
class _Batch:
    """One batch of sampled images on one test variant, as the arm sees them."""
    positions: np.ndarray
    items: list  # the shard rows (original, masks, the variants' pixels, ids)
    regs: list  # each image's regions (``saliency_metrics.regions``)
    variant: str
    pixels: np.ndarray  # the variant's pixels, as the shards serve them
    fills: np.ndarray  # their blurred (or mean) copies: IG's baseline, the curves' fill
    x: torch.Tensor  # the model's input
    base: torch.Tensor  # the baseline's
    proba: np.ndarray
    pred: np.ndarray


def run_arm(arm: str, model, test: ShardSet, positions, cfg: Config, classes, truth: dict,
            boxes: dict | None = None, variants=IMAGE_VARIANTS, cascade_on: str = "original") -> dict:
    """Everything measured on one arm, on the sampled images and every test ``variant``:

    - ``rows``: per image, method and ``source`` the region metrics of the saliency map for the
      predicted class (``source`` ``model``; the random head and the model-free controls are made
      from these: ``control_rows``);
    - ``occlusion``: per image, region, control and mode, the headline target's probability with the
      region deleted or kept alone (``interventions``), beside the intact image's;
    - ``curves``: per image and map (the model's, a random order, the anatomy, the input intensity),
      the deletion and insertion areas for the class the map explains;
    - ``cascade``: per image and randomisation level, on the ``cascade_on`` test images (the arm's
      own training variant: the check is of the method, one variant suffices), the rank correlation
      of the map with the map of a network whose head (and top encoder blocks) were re-drawn."""
    sc, out = cfg.saliency, {"rows": [], "occlusion": [], "curves": [], "cascade": []}
    target = first_positive(test.positives(), test.target_order)  # the headline reading's target
    line_width = test.render_config["line_width"]  # the ink as the shards were drawn
    nets = {"model": model, "random_head": RandomHead(model, cfg.seed).eval()}
    depth = len(getattr(getattr(model.visual, "trunk", None), "blocks", []))
    levels = {f"head + top {k} of {depth} blocks": k for k in sorted({1, depth}) if sc.cascade and 0 < k <= depth}
    rng = np.random.default_rng([cfg.seed, 21])  # equal-area controls and tie-breaking: one stream per arm
    specs = {v: test.variant_spec(v) for v in variants}
    for start in range(0, len(positions), sc.batch_size):
        batch = positions[start:start + sc.batch_size]
        items = [test.row(i, ("original", "masks", *variants)) for i in batch]
        regs = [regions(it["masks"], line_width) for it in items]  # one image's, for every map of it
        fills = [fill_image(it["original"], sc.fill, sc.blur_sigma) if sc.occlusion else None for it in items]
        for variant in variants:
            b = _batch(model, sc, batch, items, regs, variant)
            checked = _map_rows(out["rows"], arm, nets, b, sc, classes, target, truth, boxes)
            for name, n_blocks in levels.items() if variant == cascade_on else ():
                with randomised(model, n_blocks, cfg.seed) as net:
                    maps, _ = explain(sc.check_method, net, b.x, b.pred.tolist(), baseline=b.base,
                                      ig_steps=sc.ig_steps, contrastive=sc.target == "contrastive")
                out["cascade"] += [{"arm": arm, "tested_on": variant, "level": name, "dicom_id": it["dicom_id"],
                                    "subject_id": it["subject_id"], "rank_correlation": rank_correlation(mine, smap)}
                                   for it, mine, smap in zip(items, checked, maps)]
            _intervention_rows(out, arm, model, b, fills, specs[variant], sc, classes, target, truth, boxes, checked,
                               rng)
    checked = [r for r in out["rows"] if r["source"] == "model" and r["method"] == sc.check_method]
    out["rows"] += control_rows(checked, cfg.seed)
    return out


def _batch(model, sc, positions, items, regs, variant: str) -> _Batch:
    lm = model.lm
    pixels = np.stack([it[variant] for it in items])
    fills = np.stack([fill_image(p, sc.fill, sc.blur_sigma) for p in pixels])  # the curves' fill
    blurred = fills if sc.fill == "blur" else np.stack([fill_image(p, "blur", sc.blur_sigma) for p in pixels])
    x = lm.to_input(torch.from_numpy(pixels))
    # IG's baseline is the blurred image (saliency.baseline), whatever fill the interventions use
    base = lm.to_input(torch.from_numpy(blurred) if sc.baseline == "blur" else torch.zeros_like(torch.from_numpy(pixels)))
    proba = predict(model, lm, pixels)
    return _Batch(positions, items, regs, variant, pixels, fills, x, base, proba, proba.argmax(1))


def _map_rows(rows: list, arm: str, nets: dict, b: _Batch, sc, classes, target, truth: dict,
              boxes: dict | None) -> list[np.ndarray]:
    """Append the region metrics of every method's map (and the random head's, for the check
    method) of one batch to ``rows``; returns the check method's maps of the arm."""
    contrastive = sc.target == "contrastive"
    explained = Contrastive(nets["model"]) if contrastive else nets["model"]
    with torch.no_grad():
        change = (explained(b.x) - explained(b.base)).numpy()[np.arange(len(b.pred)), b.pred]
    grey = b.pixels if b.pixels.ndim == 3 else b.pixels.mean(-1)
    checked = []
    for method, source in [(m, "model") for m in sc.methods] + [(sc.check_method, "random_head")]:
        # the random head explains the arm's own prediction: the same class, the same regions
        maps, complete = explain(method, nets[source], b.x, b.pred.tolist(), baseline=b.base, ig_steps=sc.ig_steps,
                                 contrastive=contrastive)
        if source == "model" and method == sc.check_method:
            checked = list(maps)
        for j, (pos, it, reg, smap, k) in enumerate(zip(b.positions, b.items, b.regs, maps, b.pred)):
            finding = classes[k]
            found = truth.get(it["dicom_id"], {}).get(finding)
            boxed = (boxes or {}).get(it["dicom_id"], {}).get(finding)
            rows.append({"arm": arm, "method": method, "source": source, "tested_on": b.variant,
                         "dicom_id": it["dicom_id"], "subject_id": it["subject_id"], "position": int(pos),
                         "predicted": finding, "correct": bool(k == target[pos]), "p_predicted": float(b.proba[j, k]),
                         "completeness": float(complete[j]) if complete is not None else np.nan,
                         "output_change": float(change[j]) if source == "model" else np.nan,
                         **image_metrics(smap, reg, finding, found, boxed), "_map": smap, "_reg": reg,
                         "_truth": found, "_box": boxed, "_grey": grey[j]})
    return checked


def _intervention_rows(out: dict, arm: str, model, b: _Batch, fills: list, spec: dict | None, sc, classes, target,
                       truth: dict, boxes: dict | None, checked: list, rng) -> None:
    """Append one batch's occlusion rows (the headline target; ``fills``: each radiograph's fill, made
    once for every test variant) and curve rows (the class each map explains) to ``out``."""
    for j, (pos, it, reg) in enumerate(zip(b.positions, b.items, b.regs)):
        ids = {"arm": arm, "tested_on": b.variant, "dicom_id": it["dicom_id"], "subject_id": it["subject_id"],
               "position": int(pos)}
        if sc.occlusion:
            finding = _finding_region(truth, boxes, it["dicom_id"], classes[target[pos]])
            out["occlusion"] += occlusion_rows(model, model.lm, it["original"], fills[j], it["masks"], spec, reg,
                                               finding, int(target[pos]), b.proba[j], rng, ids)
        if sc.curves:
            out["curves"] += curve_rows(model, model.lm, b.pixels[j], b.fills[j], checked[j], reg, int(b.pred[j]),
                                        sc.curve_steps, rng, ids)


def _finding_region(truth: dict, boxes: dict | None, dicom_id: str, finding: str) -> np.ndarray | None:
    """Where the image's target finding is: the radiologists' boxes where there are any, else where
    the phantom drew it (None: unknown)."""
    boxed = (boxes or {}).get(dicom_id, {}).get(finding)
    return boxed if boxed is not None else truth.get(dicom_id, {}).get(finding)


def summarise(df: pd.DataFrame, n_boot: int, seed: int) -> list[dict]:
    """Mean of each metric with its patient bootstrap CI and area baseline; paired masked - original."""
    out = []
    for (arm, method), grp in df[df["source"] == "model"].groupby(["arm", "method"], sort=False):
        variants = list(dict.fromkeys(grp["tested_on"]))  # original, masked, then saliency.variants
        by = {v: grp[grp["tested_on"] == v].set_index("dicom_id") for v in variants}
        for metric in METRICS:
            if metric in OPTIONAL and not np.isfinite(grp[metric].to_numpy(float)).any():
                continue
            rec = {"arm": arm, "method": method, "metric": metric, "variants": variants}
            for v in variants:
                vals, area = by[v][metric].to_numpy(float), by[v][AREA[metric]].to_numpy()
                ok = np.isfinite(vals)
                rec[v] = bootstrap_finite(vals, by[v]["subject_id"].to_numpy(), n_boot=n_boot, seed=seed)
                rec[f"{v}_area"] = float(np.mean(area[ok])) if ok.any() else np.nan
                rec[f"{v}_n"] = int(ok.sum())
            for v in variants[1:]:
                rec[f"{v}_minus_original"] = _paired(by["original"], by[v], metric, n_boot, seed)
            out.append(rec)
    return out


def _paired(base: pd.DataFrame, other: pd.DataFrame, metric: str, n_boot: int, seed: int) -> dict | None:
    """other − base on the images both hold, paired patient bootstrap (None: fewer than two)."""
    common = base.index.intersection(other.index)
    return paired_finite(base.loc[common, metric].to_numpy(float), other.loc[common, metric].to_numpy(float),
                         base.loc[common, "subject_id"].to_numpy(), n_boot=n_boot, seed=seed)


def _current_arms(work: Workdir, verifier: Verifier) -> list[Record]:
    """The verified records of the trained arms that have run (the chain above each checked)."""
    out = []
    for arm in ARMS:
        if arm.rebuild is not None and work.predictions_record(arm.name).exists():
            out.append(arm_record(work, arm.name, verifier))
    return out


def run_saliency(cfg: Config, progress: bool = True) -> dict:
    """The ``saliency`` stage: every trained arm that has run, every configured method."""
    with open_stage(cfg.workdir, "saliency", cfg.permissions) as ctx:
        return _run_saliency(cfg, ctx, progress)


def _run_saliency(cfg: Config, ctx: StageContext, progress: bool) -> dict:
    work, verifier, shards = ctx.work, ctx.verifier, ctx.shards
    test = shards.split("test")
    classes = shards.target_names
    boxed = boxed_positions(test)
    positions = sample_images(test, cfg.saliency.images, cfg.seed, boxed, cfg.saliency.boxed_images)
    truth = _truth_regions(cfg, test, positions, classes)
    boxes = _box_regions(test, positions, classes)
    synthetic = bool(verifier.record(work.cohort_manifest, "cohort").get("synthetic_archive"))
    records = _current_arms(work, verifier)
    for name in cfg.saliency.variants:
        test.check_variant(name)  # a derived variant of this shard set (variants.json)
    variants = (*IMAGE_VARIANTS, *cfg.saliency.variants)
    trained_on = {r["arm"]: arm_trained_on(r["arm"]) for r in records}
    found: dict = {"rows": [], "occlusion": [], "curves": [], "cascade": []}
    log.info("saliency: %d arm(s) x %d test variant(s) x %d images (%d with boxes)", len(records), len(variants),
             len(positions), len(boxes))
    for rec in progress_bar(records, desc="saliency arms", enabled=progress):
        started = time.monotonic()
        for key, rows in run_arm(rec["arm"], arm_model(rec, work, verifier, classes), test, positions, cfg, classes,
                                 truth, boxes, variants, trained_on[rec["arm"]]).items():
            found[key] += rows
        log.info("saliency: %s done in %.0f s (%.2f s per image and test variant)", rec["arm"],
                 time.monotonic() - started, (time.monotonic() - started) / max(1, len(positions) * len(variants)))
    rows = found["rows"]
    if not rows:
        raise FileNotFoundError(f"no trained arm in {work.root} (run probe and finetune first)")
    df = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    frames = {k: pd.DataFrame(found[k]) for k in ("occlusion", "curves", "cascade")}
    n_boot, seed = cfg.report.bootstrap, cfg.seed
    summary = summarise(df, n_boot, seed)
    checks = control_checks(df, cfg.saliency.check_method, n_boot, seed)
    write_csv(work.saliency_file("csv"), df)
    for kind, frame in frames.items():
        write_csv(work.intervention_rows(kind), frame)
    write_json(work.saliency_file("json"), {
        "summary": summary, "checks": checks, "images": int(len(positions)), "boxed_images": len(boxes),
        "methods": list(cfg.saliency.methods), "check_method": cfg.saliency.check_method,
        "target": cfg.saliency.target, "baseline": cfg.saliency.baseline, "fill": cfg.saliency.fill,
        "blur_sigma": cfg.saliency.blur_sigma, "curve_steps": cfg.saliency.curve_steps,
        "phantom_truth": bool(truth), "radiologist_boxes": len(boxes), "synthetic": synthetic,
        "heads": head_summary(df, cfg.saliency.check_method, classes),
        "occlusion": occlusion_summary(frames["occlusion"], n_boot, seed),
        "arm_contrasts": arm_contrasts(frames["occlusion"], trained_on, n_boot, seed),
        "curves": curve_summary(frames["curves"], n_boot, seed),
        "cascade": cascade_summary(frames["cascade"], n_boot, seed),
        "reference": reference_on_sample(test, positions),
        "shards_fingerprint": shards.fingerprint})
    panels = saliency_panels(work.saliency_dir, [r for r in rows if r["source"] == "model"], test,
                             cfg.saliency.panels, cfg.seed)
    if synthetic:
        for png in panels:
            stamp(png)  # a figure made from the phantom says so
    md = saliency_markdown(read_json(work.saliency_file("json")), n_boot)
    with atomic_path(work.saliency_file("md")) as tmp:
        tmp.write_text(md)
    write_record(work.saliency_record, work.root, "saliency", "radacx saliency",
                 files=[work.saliency_file(s).name for s in ("json", "csv", "md")]
                 + [work.intervention_rows(k).name for k in frames],
                 upstream=[verifier.record(work.shards_manifest, "shards"), *records,
                           *([verifier.record(work.shards_variants, "variants")] if cfg.saliency.variants else [])],
                 arms=[r["arm"] for r in records])
    return {"table": md, "panels": panels, "images": int(len(positions))}


def reference_on_sample(test: ShardSet, positions) -> dict:
    """Accuracy of doing nothing useful on the sampled images: always the sample's majority target,
    and a uniform random class (what an arm's intact accuracy on the same images is read against)."""
    positives = test.positives()[positions]
    target = first_positive(positives, test.target_order)
    has = positives.any(1) if len(positives) else np.zeros(0, bool)
    counts = np.bincount(target[has], minlength=positives.shape[1])
    return {"n": int(has.sum()), "majority": float(counts.max() / max(1, counts.sum())),
            "majority_class": test.target_names[int(counts.argmax())], "chance": 1.0 / positives.shape[1]}
