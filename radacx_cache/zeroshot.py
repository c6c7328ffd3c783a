"""Zero-shot baseline from cached image features and the model's text tower.

Prompts per class: ``zeroshot.prompts[class]`` when configured (several prompts are ensembled by
their mean normalised embedding), else BiomedCLIP's model-card template
``'this is a photo of ' + class name``. Text embeddings are cached in
``zeroshot/<model-tag>/text.npz`` with the model fingerprint and the prompts.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ._io import atomic_path, stable_hash, stage_run
from .arms import IMAGE_VARIANTS
from .config import Config
from .features import FeatureCache, cache_fingerprints
from .metrics import accuracy
from .models import load_model
from .predictions import write_predictions
from .shardset import open_shards
from .workdir import Workdir

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
    """The zero-shot baseline on both test image variants."""
    with stage_run(cfg.workdir, "zeroshot", cfg.permissions):
        return _run_zeroshot(cfg)


def _run_zeroshot(cfg: Config) -> dict:
    work = Workdir(cfg.workdir)
    shards = open_shards(work.shards_dir)
    shards.validate()
    model = load_model(cfg.model.spec, seed=cfg.seed)
    classes = shards.target_names
    prompts = class_prompts(classes, cfg.zeroshot.template, cfg.zeroshot.prompts)
    key = stable_hash({"model": model.fingerprint, "prompts": prompts})
    cache = work.zeroshot_text(model.tag)
    text = None
    if cache.exists():
        stored = np.load(cache)
        if str(stored["key"]) == key:
            text = stored["text"]
    if text is None:
        text = text_embeddings(model, prompts)
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, text=text, key=np.array(key))
    scale = float(model.model.logit_scale.exp().item())
    index = shards.index
    test = (index["split"] == "test").to_numpy()
    rows = index[test]
    positives = shards.positives()[test]
    summary = {}
    for variant in IMAGE_VARIANTS:
        feats = FeatureCache(work.features(model.tag, variant),
                             cache_fingerprints(model, shards, variant))
        feats.check_aligned(shards)
        proba = zeroshot_proba(feats.features[test], text, scale)
        meta = {"variant": "Baseline", "tested_on": variant, "model": model.spec,
                "model_fingerprint": model.fingerprint, "feature_fingerprints": feats.fingerprints,
                "shards_fingerprint": shards.fingerprint, "prompts": prompts, "logit_scale": scale}
        write_predictions(work.predictions("Baseline", variant), rows, proba, classes, meta)
        summary[f"Baseline/{variant}"] = accuracy(proba, positives)
    return summary
