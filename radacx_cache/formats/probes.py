"""The fitted probe heads (V1, V2, V2-<variant>): ``probes/<arm>.npz``, written and read here, and the
torch network that applies one to images, which the saliency stage explains (docs/probe.md).

One ``.npz`` of plain arrays per arm (``np.load(allow_pickle=False)`` reads it; nothing is unpickled):

| array | dtype, shape | what |
|---|---|---|
| ``coef`` | float32 (K, D) | the linear head's weights on the preprocessed features |
| ``intercept`` | float32 (K,) | its bias |
| ``mean``, ``scale`` | float32 (D,) | the standardisation the probe fitted (unused for ``l2`` / ``none``) |
| ``feature`` | str | which features it reads: ``features`` (projected) or ``pre_projection`` |
| ``preprocess`` | str | ``standardize``, ``l2`` or ``none`` |
| ``shards_fingerprint`` | str | the shard set its training features came from |
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .._io import write_npz

FEATURES = ("features", "pre_projection")
PREPROCESS = ("standardize", "l2", "none")
MAX_CLASSES, MAX_WIDTH = 1024, 65_536


class ProbeFormatError(ValueError):
    """A probe file that is not one this tool wrote (names the file and the array)."""


def write_probe(path: str | Path, probe, feature: str, shards_fingerprint: str) -> None:
    """``probe`` (a fitted ``LinearProbe``) as the arrays above, atomically, byte-stable."""
    write_npz(path, coef=probe.coef_, intercept=probe.intercept_, mean=probe.mean_.numpy(),
              scale=probe.scale_.numpy(), feature=np.array(feature), preprocess=np.array(probe.preprocess),
              shards_fingerprint=np.array(shards_fingerprint))


def read_probe(path: str | Path) -> dict:
    """The arrays of a probe file, each checked (names, shapes, finite numbers, known settings)."""
    with np.load(path, allow_pickle=False) as f:
        missing = sorted({"coef", "intercept", "mean", "scale", "feature", "preprocess"} - set(f.files))
        if missing:
            raise ProbeFormatError(f"{path}: missing array(s) {missing}; rerun `radacx probe`")
        w = {k: f[k] for k in f.files}
    coef = w["coef"]
    if coef.ndim != 2 or not (1 <= coef.shape[0] <= MAX_CLASSES and 1 <= coef.shape[1] <= MAX_WIDTH):
        raise ProbeFormatError(f"{path}: coef has shape {coef.shape}, expected (classes, width)")
    k, d = coef.shape
    for name, shape in (("intercept", (k,)), ("mean", (d,)), ("scale", (d,))):
        if w[name].shape != shape:
            raise ProbeFormatError(f"{path}: {name} has shape {w[name].shape}, expected {shape}")
    for name in ("coef", "intercept", "mean", "scale"):
        if w[name].dtype.kind != "f" or not np.isfinite(w[name]).all():
            raise ProbeFormatError(f"{path}: {name} is not finite floating point")
    for name, allowed in (("feature", FEATURES), ("preprocess", PREPROCESS)):
        if str(w[name]) not in allowed:
            raise ProbeFormatError(f"{path}: {name} {str(w[name])[:40]!r}; expected one of {', '.join(allowed)}")
    return w


class ProbeHead(torch.nn.Module):
    """Frozen vision tower + the probe's saved preprocessing and linear head: V1/V2 as one network
    (the same function of the features as ``LinearProbe.predict_proba``, as logits)."""

    def __init__(self, lm, weights: dict):
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
        if self.preprocess not in PREPROCESS:
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
