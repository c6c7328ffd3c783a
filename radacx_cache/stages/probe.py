"""The probe stage: linear probes on cached features (V1: trained on original images, V2: on masked).

The estimator, its solver and the C search live in ``linear_probe.py``. Here: C is chosen by the
headline (argmax) validation accuracy of full-data fits on the train split; the selected probe is
refit on train + val with the same per-sample penalty; both test image variants are predicted.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from .._io import stable_hash
from ..arms import IMAGE_VARIANTS, variant_arm
from ..config import Config
from ..estimators.linear_probe import LinearProbe, fit_final, sweep_c
from ..findings import first_positive
from ..formats.context import StageContext, open_stage
from ..formats.features import FeatureCache, cached_variants, features_record
from ..formats.predictions import write_arm_record, write_predictions
from ..formats.probes import write_probe
from ..formats.records import write_record
from ..formats.shard import ShardSet
from ..metrics import accuracy
from ..models import model_tag, weights_seed

log = logging.getLogger(__name__)


def _split_arrays(feats: np.ndarray, shards: ShardSet, split: str):
    """(features, training targets, multi-hot positives, index rows) of one split."""
    sel = (shards.index["split"] == split).to_numpy()
    return feats[sel], shards.targets()[sel], shards.positives()[sel], shards.index[sel]


def headline_onehot(positives: np.ndarray, order) -> np.ndarray:
    """One-hot of each row's first positive in the cohort's target order (zero rows stay zero): the
    C search's validation accuracy is then the headline reading under that order."""
    out = np.zeros_like(positives, dtype=np.float32)
    has = (positives > 0).any(1)
    out[np.flatnonzero(has), first_positive(positives[has], order)] = 1
    return out


def _train_probe(X: np.ndarray, shards: ShardSet, p, seed: int, name: str) -> tuple[LinearProbe, dict]:
    """Choose C on train/val (full data), refit on train + val; returns (probe, search summary)."""
    Xtr, Ytr, _, _ = _split_arrays(X, shards, "train")
    Xva, Yva, Pva, _ = _split_arrays(X, shards, "val")
    Pva = headline_onehot(Pva, shards.target_order)
    if len(Xva) == 0:
        raise ValueError("the val split is empty: the C search needs validation images")
    empty = [c for c, n in zip(shards.target_names, Ytr.sum(0)) if n == 0]
    if empty:
        log.warning("probe %s: no training positives for %s", name, ", ".join(empty))
    result = sweep_c(Xtr, Ytr, Xva, Pva, c_min_log10=p.c_min_log10, c_max_log10=p.c_max_log10,
                     refine_steps=p.refine_steps, patience=p.patience, preprocess=p.preprocess,
                     max_iter=p.max_iter, tol=p.tol, max_rows=p.sweep_max_rows, seed=seed)
    final = fit_final(result, Xtr, Ytr, Xva, Yva)
    result["final_c"] = float(final.C)
    result["final_rows"] = len(Xtr) + len(Xva)
    log.info("probe %s: C=%.3g (val accuracy %.3f, %d fits, %d passes, %.1fs)", name, result["best_c"],
             result["val_score"], result["fits"], result["passes"], result["seconds"])
    return final, result


def run_probes(cfg: Config) -> dict:
    """Train V1 (original), V2 (masked) and V2-<variant> per derived variant, and predict their test images."""
    with open_stage(cfg.workdir, "probe", cfg.permissions) as ctx:
        return _run_probes(cfg, ctx)


def _run_probes(cfg: Config, ctx: StageContext) -> dict:
    work, verifier, shards = ctx.work, ctx.verifier, ctx.shards
    classes = shards.target_names
    # the caches' model fingerprint (weights hash) was checked when `embed` built or reused them;
    # here the spec, the shard set, the variant and the seed of a random-weight model must match,
    # without loading the model again
    features = features_record(work, model_tag(cfg.model.spec), verifier)
    expected = {"model_spec": cfg.model.spec, "weights_seed": weights_seed(cfg.model.spec, cfg.seed),
                "shards": shards.fingerprint}
    variants = cached_variants(features, shards)  # original, masked and the derived ones (render.variants)
    specs = features.get("variant_specs", {})
    tag = model_tag(cfg.model.spec)
    caches = {v: FeatureCache(features.file(work.features(tag, v).name),
                              {**expected, "variant": v, **({"variant_spec": stable_hash(specs[v])} if v in specs else {})})
              for v in variants}
    for cache in caches.values():
        cache.check_aligned(shards)
    p = cfg.probe
    trained = {}
    for train_variant in variants:  # V1, V2, and V2-<variant> for each derived variant
        name = variant_arm("probe", train_variant)
        trained[name] = _train_probe(caches[train_variant].get(p.feature), shards, p, cfg.seed, name)
        write_probe(work.probe_weights(name), trained[name][0], p.feature, shards.fingerprint)
    facts = {k: features[k] for k in ("model_spec", "model_fingerprint", "weights_seed")}
    probes = write_record(work.probes_record, work.root, "probe", "radacx probe",
                          files=[work.probe_weights(n).name for n in trained], upstream=[features],
                          feature=p.feature, **facts)
    summary = {}
    trained_on = dict(zip(trained, variants))
    for name, (final, result) in trained.items():
        # V1 is tested on every variant (the frozen head's test-time ablation), V2 on original and
        # masked, V2-<variant> on its own variant
        tested_on = variants if name == "V1" else IMAGE_VARIANTS if name == "V2" else (trained_on[name],)
        for test_variant in tested_on:
            Xte, _, Pte, rows = _split_arrays(caches[test_variant].get(p.feature), shards, "test")
            proba = final.predict_proba(Xte)
            meta = {"variant": name, "trained_on": trained_on[name],
                    "tested_on": test_variant, "model": facts["model_spec"],
                    "model_fingerprint": caches[test_variant].fingerprints["model"],
                    "feature_fingerprints": caches[test_variant].fingerprints,
                    "features_file": caches[test_variant].path.name, "shards_fingerprint": shards.fingerprint,
                    # the search's summary, less its wall time: a rerun with the same result writes the same file
                    "probe": {k: v for k, v in result.items() if k not in ("path", "probe", "_train", "_val",
                                                                          "seconds")},
                    "c_path": result["path"], "config": cfg.to_dict()["probe"]}
            write_predictions(work.predictions(name, test_variant), rows, proba, classes, meta)
            summary[f"{name}/{test_variant}"] = accuracy(proba, Pte, order=shards.target_order)
        summary[f"{name}/C"] = result["best_c"]
        write_arm_record(work, name, "radacx probe", [probes, features], tested_on=tested_on,
                         training=dataclasses.asdict(p), **facts)
    return summary
