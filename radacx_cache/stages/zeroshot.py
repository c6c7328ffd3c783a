"""Zero-shot baseline from cached image features and the model's text tower.

Prompts per class: ``zeroshot.prompts[class]`` when configured (several prompts are ensembled by
their mean normalised embedding), else BiomedCLIP's model-card template
``'this is a photo of ' + class name``. The text embeddings are computed every run and written to
``zeroshot/<model-tag>/text.npz`` for inspection, listed in that folder's record with the prompts;
nothing reads them back (an edited copy cannot change the Baseline row).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .._io import write_npz
from ..config import Config
from ..formats.context import StageContext, open_stage
from ..formats.features import FeatureCache, cache_fingerprints, cached_variants, features_record
from ..formats.predictions import model_facts, write_arm_record, write_predictions
from ..formats.records import write_record
from ..metrics import accuracy
from ..models import load_model

log = logging.getLogger(__name__)


def class_prompts(classes, template: str, prompts: dict) -> dict[str, list[str]]:
    unknown = sorted(set(prompts) - set(classes))
    if unknown:
        raise ValueError(f"zeroshot.prompts names unknown class(es) {unknown}; classes are {list(classes)}")
    return {c: list(prompts.get(c) or [template + c]) for c in classes}


def text_embeddings(model, prompts: dict[str, list[str]]) -> np.ndarray:
    """(K, D) unit-norm class embeddings: mean of each class's normalised prompt embeddings."""
    if model.tokenizer is None:
        raise ValueError(f"model {model.spec} has no tokenizer; zero-shot needs the text tower")
    out = []
    with torch.inference_mode():
        for texts in prompts.values():
            tokens = model.tokenizer(texts).to(next(model.model.parameters()).device)
            emb = model.model.encode_text(tokens).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            out.append((mean / mean.norm()).cpu().numpy())
    return np.stack(out)


def zeroshot_proba(image_features: np.ndarray, text: np.ndarray, logit_scale: float) -> np.ndarray:
    img = image_features / np.linalg.norm(image_features, axis=1, keepdims=True).clip(1e-12)
    z = logit_scale * img @ text.T
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def run_zeroshot(cfg: Config) -> dict:
    """The zero-shot baseline on every cached test image variant."""
    with open_stage(cfg.workdir, "zeroshot", cfg.permissions) as ctx:
        return _run_zeroshot(cfg, ctx)


def _run_zeroshot(cfg: Config, ctx: StageContext) -> dict:
    work, verifier, shards = ctx.work, ctx.verifier, ctx.shards
    model = load_model(cfg.model.spec, seed=cfg.seed)
    features = features_record(work, model.tag, verifier, model.fingerprint)
    classes = shards.target_names
    prompts = class_prompts(classes, cfg.zeroshot.template, cfg.zeroshot.prompts)
    # computed every run (a few prompts through the text tower): a stored copy is never read back
    text = text_embeddings(model, prompts)
    scale = float(model.model.logit_scale.exp().item())
    write_npz(work.zeroshot_text(model.tag), text=text, logit_scale=np.array(scale))
    zs = write_record(work.zeroshot_record(model.tag), work.root, "zeroshot", "radacx zeroshot",
                      files=[work.zeroshot_text(model.tag).name], upstream=[features], prompts=prompts, logit_scale=scale,
                      **model_facts(model))
    index = shards.index
    test = (index["split"] == "test").to_numpy()
    rows = index[test]
    positives = shards.positives()[test]
    summary = {}
    variants = cached_variants(features, shards)  # every cached variant: original, masked and the derived ones
    for variant in variants:
        feats = FeatureCache(features.file(work.features(model.tag, variant).name), cache_fingerprints(model, shards, variant))
        feats.check_aligned(shards)
        proba = zeroshot_proba(feats.features[test], text, scale)
        meta = {"variant": "Baseline", "tested_on": variant, "model": model.spec,
                "model_fingerprint": model.fingerprint, "feature_fingerprints": feats.fingerprints,
                "features_file": feats.path.name, "shards_fingerprint": shards.fingerprint, "prompts": prompts,
                "logit_scale": scale}
        write_predictions(work.predictions("Baseline", variant), rows, proba, classes, meta)
        summary[f"Baseline/{variant}"] = accuracy(proba, positives, order=shards.target_order)
    write_arm_record(work, "Baseline", "radacx zeroshot", [zs, features], tested_on=variants, **model_facts(model))
    return summary
