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

import numpy as np
import pandas as pd
import torch
from captum.attr import IntegratedGradients
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from tqdm import tqdm

from .._io import atomic_path, read_json, stage_run, write_csv, write_json
from ..arms import ARM_BY_NAME, ARMS, IMAGE_VARIANTS
from ..config import Config
from ..formats.checkpoints import Classifier, load_checkpoint
from ..figures import saliency_panels, stamp
from ..metrics import bootstrap_mean, paired_difference
from ..models import LoadedModel, load_model
from ..render import Geometry, box_region
from ..saliency_metrics import control_checks, control_rows, image_metrics, regions
from ..formats.saliency_table import saliency_markdown
from ..findings import first_positive
from ..formats.predictions import arm_record
from ..formats.records import Record, RecordError, Verifier, write_record
from ..formats.shardset import VARIANTS_NAME, ShardSet, open_verified
from ..phantom.truth import read_truth, region_at, truth_path
from ..workdir import Workdir

log = logging.getLogger(__name__)
METHODS = ("gradcam", "integrated_gradients")
METRICS = ("anatomy", "organ", "pointing", "ink", "truth", "truth_pointing", "box", "box_pointing")
AREA = {"anatomy": "anatomy_area", "organ": "organ_area", "pointing": "organ_area", "ink": "ink_area",
        "truth": "truth_area", "truth_pointing": "truth_area", "box": "box_area", "box_pointing": "box_area"}
OPTIONAL = ("box", "box_pointing")  # reported only where radiologists' boxes exist


class ProbeHead(torch.nn.Module):
    """Frozen vision tower + the probe's saved preprocessing and linear head: V1/V2 as one network
    (the same function of the features as ``LinearProbe.predict_proba``, as logits)."""

    def __init__(self, lm: LoadedModel, weights: dict):
        super().__init__()
        self.lm = lm
        self.visual = lm.model.visual
        self.register_buffer("mean", torch.as_tensor(weights["mean"]))
        self.register_buffer("scale", torch.as_tensor(weights["scale"]))
        self.head = torch.nn.Linear(weights["coef"].shape[1], weights["coef"].shape[0])
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(weights["coef"]))
            self.head.bias.copy_(torch.as_tensor(weights["intercept"]))
        self.pre = str(weights["feature"]) == "pre_projection"
        self.preprocess = str(weights["preprocess"])
        if self.preprocess not in ("standardize", "l2", "none"):
            raise ValueError(f"probe preprocess {self.preprocess!r}: expected standardize, l2 or none")

    def features(self, x):
        """What the head reads: the chosen features, preprocessed as the probe was."""
        feats, pre = self.lm.encode_image_parts(x)
        f = pre if self.pre else feats
        if self.preprocess == "standardize":
            f = (f - self.mean) / self.scale
        elif self.preprocess == "l2":
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return f

    def forward(self, x):
        return self.head(self.features(x))


class UntrainedHead(torch.nn.Module):
    """An arm's network with its trained head replaced by a seeded random one of the same scale: the
    control that shows what a method draws from the architecture alone."""

    def __init__(self, model: torch.nn.Module, seed: int):
        super().__init__()
        self.model, self.visual = model, model.visual
        trained = model.head
        self.head = torch.nn.Linear(trained.in_features, trained.out_features)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(trained.weight.shape, generator=gen) * trained.weight.std())
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.model.features(x))


def arm_model(record: Record, work: Workdir, verifier: Verifier, classes) -> torch.nn.Module:
    """The trained network of an arm, in eval mode, on the CPU (weights never unpickled): the model its
    verified record names, the head or checkpoint from the verified record above it."""
    lm = load_model(record["model_spec"], seed=record["weights_seed"] or 0)
    if lm.fingerprint != record["model_fingerprint"]:
        raise RecordError(f"{record.path}: made with model {record['model_fingerprint']}, {record['model_spec']} "
                          f"now loads as {lm.fingerprint} (other weights); rerun `{record['command']}`")
    spec = ARM_BY_NAME[record["arm"]]
    if spec.method == "probe":
        probes = verifier.record(work.probes_record, "probe")
        with np.load(probes.file(work.probe_weights(spec.name).name), allow_pickle=False) as f:
            model = ProbeHead(lm, {k: f[k] for k in f.files})
    else:
        trained = verifier.record(work.finetune_record(spec.trained_on), "finetune")
        with torch.no_grad():
            width = lm.model.visual(torch.zeros(1, 3, lm.image_size, lm.image_size)).shape[1]
        model = Classifier(lm.model.visual, width, len(classes))
        model.load_state_dict(load_checkpoint(trained.file(work.finetune_best(spec.trained_on).name))["model"])
    model.lm = lm
    return model.eval()


def _vit_reshape(trunk):
    prefix = getattr(trunk, "num_prefix_tokens", 1)
    grid = trunk.patch_embed.grid_size

    def reshape(tokens):  # (B, prefix + h*w, C) -> (B, C, h, w), the layout a CAM expects
        out = tokens[:, prefix:, :].reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[2])
        return out.permute(0, 3, 1, 2)
    return reshape


def saliency_maps(method: str, model: torch.nn.Module, x: torch.Tensor, targets: list[int], *,
                  baseline: torch.Tensor | None = None, ig_steps: int = 16, cam_layer=None,
                  reshape=None) -> np.ndarray:
    """(B, H, W) non-negative maps of the model's evidence for ``targets`` at input resolution."""
    if method == "gradcam":
        if cam_layer is None:
            trunk = model.visual.trunk
            cam_layer, reshape = trunk.blocks[-1].norm1, _vit_reshape(trunk)
        with GradCAM(model=model, target_layers=[cam_layer], reshape_transform=reshape) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        return np.clip(np.asarray(maps, np.float64), 0, None)
    if method == "integrated_gradients":
        ig = IntegratedGradients(model)
        attr = ig.attribute(x, baselines=baseline if baseline is not None else torch.zeros_like(x),
                            target=torch.as_tensor(targets), n_steps=ig_steps, internal_batch_size=len(x) * 4)
        return np.clip(attr.sum(1).detach().numpy().astype(np.float64), 0, None)
    raise ValueError(f"saliency method {method!r}: expected one of {', '.join(METHODS)}")


def sample_images(test: ShardSet, n: int, seed: int) -> np.ndarray:
    """A fixed, seeded sample of test positions (the same images for every arm and variant)."""
    n = min(n, len(test))
    return np.sort(np.random.default_rng([seed, 9]).choice(len(test), n, replace=False))


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


def run_arm(arm: str, model, test: ShardSet, positions, cfg: Config, classes, truth: dict,
            boxes: dict | None = None, variants=IMAGE_VARIANTS) -> list[dict]:
    """Per-image rows for one arm: every method on the test image ``variants`` of the sampled images,
    and, for ``saliency.check_method``, the same method on the arm's network with an untrained head
    (``source`` says which; the other controls are made from these rows: ``control_rows``)."""
    sc, rows = cfg.saliency, []
    target = first_positive(test.positives(), test.target_order)  # the headline reading's target
    line_width = test.render_config["line_width"]  # the ink as the shards were drawn
    lm = model.lm
    baseline = lm.to_input(torch.zeros(1, lm.image_size, lm.image_size, dtype=torch.uint8))
    nets = {"model": model, "untrained_head": UntrainedHead(model, cfg.seed).eval()}
    for start in range(0, len(positions), sc.batch_size):
        batch = positions[start:start + sc.batch_size]
        items = [test.row(i, ("masks", *variants)) for i in batch]
        regs = [regions(it["masks"], line_width) for it in items]  # one image's, for every map of it
        for variant in variants:
            x = lm.to_input(torch.from_numpy(np.stack([it[variant] for it in items])))
            with torch.no_grad():
                pred = torch.softmax(model(x), 1).numpy().argmax(1)
            runs = [(m, "model") for m in sc.methods] + [(sc.check_method, "untrained_head")]
            for method, source in runs:
                # the untrained head explains the arm's own prediction: the same class, the same regions
                maps = saliency_maps(method, nets[source], x, pred.tolist(), baseline=baseline.expand_as(x),
                                     ig_steps=sc.ig_steps)
                for pos, it, reg, smap, k in zip(batch, items, regs, maps, pred):
                    finding = classes[k]
                    found = truth.get(it["dicom_id"], {}).get(finding)
                    boxed = (boxes or {}).get(it["dicom_id"], {}).get(finding)
                    rows.append({"arm": arm, "method": method, "source": source, "tested_on": variant,
                                 "dicom_id": it["dicom_id"], "subject_id": it["subject_id"], "position": int(pos),
                                 "predicted": finding, "correct": bool(k == target[pos]),
                                 **image_metrics(smap, reg, finding, found, boxed), "_map": smap, "_reg": reg,
                                 "_truth": found, "_box": boxed})
    checked = [r for r in rows if r["source"] == "model" and r["method"] == sc.check_method]
    return rows + control_rows(checked, cfg.seed)


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
                vals, area = by[v][metric].to_numpy(), by[v][AREA[metric]].to_numpy()
                ok = np.isfinite(vals)
                rec[v] = bootstrap_mean(np.nan_to_num(vals), ok, by[v]["subject_id"].to_numpy(), n_boot=n_boot,
                                        seed=seed) if ok.any() else (np.nan, np.nan, np.nan)
                rec[f"{v}_area"] = float(np.mean(area[ok])) if ok.any() else np.nan
                rec[f"{v}_n"] = int(ok.sum())
            for v in variants[1:]:
                rec[f"{v}_minus_original"] = _paired(by["original"], by[v], metric, n_boot, seed)
            out.append(rec)
    return out


def _paired(base: pd.DataFrame, other: pd.DataFrame, metric: str, n_boot: int, seed: int) -> dict | None:
    """other − base on the images both hold, paired patient bootstrap (None: fewer than two)."""
    common = base.index.intersection(other.index)
    a, b = base.loc[common, metric].to_numpy(), other.loc[common, metric].to_numpy()
    ok = np.isfinite(a) & np.isfinite(b)
    return paired_difference(np.nan_to_num(a), np.nan_to_num(b), ok, base.loc[common, "subject_id"].to_numpy(),
                             n_boot=n_boot, seed=seed) if ok.sum() > 1 else None


def _current_arms(work: Workdir, verifier: Verifier) -> list[Record]:
    """The verified records of the trained arms that have run (the chain above each checked)."""
    out = []
    for arm in ARMS:
        if arm.method != "zeroshot" and work.predictions_record(arm.name).exists():
            out.append(arm_record(work, arm.name, verifier))
    return out


def run_saliency(cfg: Config, progress: bool = True) -> dict:
    """The ``saliency`` stage: every trained arm that has run, every configured method."""
    with stage_run(cfg.workdir, "saliency", cfg.permissions):
        return _run_saliency(cfg, progress)


def _run_saliency(cfg: Config, progress: bool) -> dict:
    work = Workdir(cfg.workdir)
    verifier = Verifier(work.root)
    shards = open_verified(work, verifier)
    test = shards.split("test")
    classes = shards.target_names
    positions = sample_images(test, cfg.saliency.images, cfg.seed)
    truth = _truth_regions(cfg, test, positions, classes)
    boxes = _box_regions(test, positions, classes)
    rows = []
    records = _current_arms(work, verifier)
    for name in cfg.saliency.variants:
        test.check_variant(name)  # a derived variant of this shard set (variants.json)
    variants = (*IMAGE_VARIANTS, *cfg.saliency.variants)
    for rec in tqdm(records, desc="saliency", disable=None if progress else True):
        rows += run_arm(rec["arm"], arm_model(rec, work, verifier, classes), test, positions, cfg, classes, truth,
                        boxes, variants)
    if not rows:
        raise FileNotFoundError(f"no trained arm in {work.root} (run probe and finetune first)")
    df = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    summary = summarise(df, cfg.report.bootstrap, cfg.seed)
    checks = control_checks(df, cfg.saliency.check_method, cfg.report.bootstrap, cfg.seed)
    write_csv(work.saliency_file("csv"), df)
    write_json(work.saliency_file("json"), {"summary": summary, "checks": checks, "images": int(len(positions)),
                                            "methods": list(cfg.saliency.methods),
                                            "check_method": cfg.saliency.check_method,
                                            "phantom_truth": bool(truth), "radiologist_boxes": len(boxes),
                                            "shards_fingerprint": shards.fingerprint})
    panels = saliency_panels(work.saliency_dir, [r for r in rows if r["source"] == "model"], test,
                             cfg.saliency.panels, cfg.seed)
    if verifier.record(work.cohort_manifest, "cohort").get("synthetic_archive"):
        for png in panels:
            stamp(png)  # a figure made from the phantom says so
    md = saliency_markdown(read_json(work.saliency_file("json")), cfg.report.bootstrap)
    with atomic_path(work.saliency_file("md")) as tmp:
        tmp.write_text(md)
    write_record(work.saliency_record, work.root, "saliency", "radacx saliency",
                 files=[work.saliency_file(s).name for s in ("json", "csv", "md")],
                 upstream=[verifier.record(work.shards_manifest, "shards"), *records,
                           *([verifier.record(work.shards_dir / VARIANTS_NAME, "variants")] if cfg.saliency.variants else [])],
                 arms=[r["arm"] for r in records])
    return {"table": md, "panels": panels, "images": int(len(positions))}
