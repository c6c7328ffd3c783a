"""Attribution and interventions on a network (docs/saliency.md): the maps (grad-cam, captum) with a
class-contrastive target, the head and encoder randomisations that control them, and the occlusion
and deletion/insertion rows of one image, from the pure functions of ``interventions``."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from captum.attr import IntegratedGradients
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from .interventions import CONTROLS as OCCLUSION_CONTROLS
from .interventions import CURVES, MODES, curve_auc, curve_images, occlude, occlusion_regions, rank_pixels
from .models import LoadedModel
from .render import draw_variant

METHODS = ("gradcam", "integrated_gradients")


class RandomHead(torch.nn.Module):
    """An arm's network with its trained head replaced by a seeded random one of the same scale: the
    control that shows what a method draws from the encoder and the input alone (the head only:
    the encoder is the arm's own; ``randomised`` re-draws encoder blocks too)."""

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


class Contrastive(torch.nn.Module):
    """Logits minus their mean over the classes: explaining output k explains "k rather than the
    others" (a class-contrastive target). A plain logit also carries what every class shares, so
    its maps follow the input and the encoder whatever the head says (docs/saliency.md)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)
        return logits - logits.mean(1, keepdim=True)


@contextmanager
def randomised(model: torch.nn.Module, n_blocks: int, seed: int):
    """The arm's network with its head and the top ``n_blocks`` transformer blocks of its encoder
    re-drawn (a cascading model-randomisation step, Adebayo et al., 2018): weight matrices at their
    own scale, fresh seeded directions. The blocks are re-drawn in place and restored on exit (a
    copy of BiomedCLIP would cost ~0.8 GB), so the arm is unchanged afterwards."""
    blocks = list(getattr(getattr(model.visual, "trunk", None), "blocks", []))
    chosen = blocks[len(blocks) - n_blocks:] if n_blocks else []
    saved = [[p.detach().clone() for p in block.parameters()] for block in chosen]
    gen = torch.Generator().manual_seed(seed + 1)
    try:
        with torch.no_grad():
            for block in chosen:
                for p in block.parameters():
                    if p.ndim > 1:
                        p.copy_(torch.randn(p.shape, generator=gen) * p.std().clamp_min(1e-3))
        yield RandomHead(model, seed).eval()
    finally:
        with torch.no_grad():
            for block, params in zip(chosen, saved):
                for p, old in zip(block.parameters(), params):
                    p.copy_(old)


def _vit_reshape(trunk):
    prefix = getattr(trunk, "num_prefix_tokens", 1)
    grid = trunk.patch_embed.grid_size

    def reshape(tokens):  # (B, prefix + h*w, C) -> (B, C, h, w), the layout a CAM expects
        out = tokens[:, prefix:, :].reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[2])
        return out.permute(0, 3, 1, 2)
    return reshape


def saliency_maps(method: str, model: torch.nn.Module, x: torch.Tensor, targets: list[int], *,
                  baseline: torch.Tensor | None = None, ig_steps: int = 16, cam_layer=None,
                  reshape=None, contrastive: bool = True) -> np.ndarray:
    """(B, H, W) non-negative maps of the model's evidence for ``targets`` at input resolution."""
    return explain(method, model, x, targets, baseline=baseline, ig_steps=ig_steps, cam_layer=cam_layer,
                   reshape=reshape, contrastive=contrastive)[0]


def explain(method: str, model: torch.nn.Module, x: torch.Tensor, targets: list[int], *,
            baseline: torch.Tensor | None = None, ig_steps: int = 16, cam_layer=None, reshape=None,
            contrastive: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(maps, completeness): (B, H, W) non-negative maps for ``targets`` and, for Integrated
    Gradients, each map's signed attribution sum (B,) (completeness: it equals the explained output's
    change from the baseline up to the path's discretisation; None for Grad-CAM). ``contrastive``:
    explain the target logit minus the mean logit (``Contrastive``) instead of the plain logit."""
    net = Contrastive(model) if contrastive else model
    if method == "gradcam":
        if cam_layer is None:
            trunk = model.visual.trunk
            cam_layer, reshape = trunk.blocks[-1].norm1, _vit_reshape(trunk)
        with GradCAM(model=net, target_layers=[cam_layer], reshape_transform=reshape) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        return np.clip(np.asarray(maps, np.float64), 0, None), None
    if method == "integrated_gradients":
        ig = IntegratedGradients(net)
        attr = ig.attribute(x, baselines=baseline if baseline is not None else torch.zeros_like(x),
                            target=torch.as_tensor(targets), n_steps=ig_steps, internal_batch_size=len(x) * 4)
        signed = attr.sum(1).detach().numpy().astype(np.float64)
        return np.clip(signed, 0, None), signed.sum((1, 2))
    raise ValueError(f"saliency method {method!r}: expected one of {', '.join(METHODS)}")


def predict(model: torch.nn.Module, lm: LoadedModel, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, K) of shard-format pixels."""
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            x = lm.to_input(torch.from_numpy(np.ascontiguousarray(pixels[start:start + batch_size])))
            out.append(torch.softmax(model(x).float(), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def occlusion_rows(model, lm, original: np.ndarray, fill: np.ndarray, masks: np.ndarray, spec: dict | None,
                   reg: dict, finding: np.ndarray | None, target: int, intact: np.ndarray, rng,
                   ids: dict) -> list[dict]:
    """One image's occlusion rows: every region and its equal-area controls, deleted (replaced by
    ``fill``, the radiograph's ``fill_image``) and kept alone, drawn as the test variant (``spec``;
    None: original) over the occluded radiograph."""
    plan, images = [], []
    for region, found in occlusion_regions(reg, finding, rng).items():
        for probe in ("region", *OCCLUSION_CONTROLS):
            mask = found[probe]
            if mask is None:
                continue
            for mode in MODES:
                grey = occlude(original, mask, fill, mode)
                images.append(grey if spec is None else draw_variant(grey, masks, spec))
                plan.append({"region": region, "probe": probe, "mode": mode, "area": float(mask.mean())})
    proba = predict(model, lm, np.stack(images))
    return [{**ids, **p, "target": target, "p_intact": float(intact[target]), "p": float(q[target]),
             "correct_intact": bool(intact.argmax() == target), "correct": bool(q.argmax() == target)}
            for p, q in zip(plan, proba)]


def curve_rows(model, lm, image: np.ndarray, fill: np.ndarray, smap: np.ndarray, reg: dict, target: int,
               steps: int, rng, ids: dict) -> list[dict]:
    """One image's deletion and insertion areas for the class ``target`` (the one its map explains),
    for the model's map and the three orders a map without the model gives."""
    grey = image if image.ndim == 2 else image.mean(-1)
    maps = {"model": smap, "random_order": np.zeros(grey.shape), "uniform_anatomy": reg["anatomy"].astype(float),
            "input_intensity": grey.astype(float)}
    plan, images = [], []
    for name, m in maps.items():
        order = rank_pixels(m, rng)
        for curve in CURVES:
            images.append(curve_images(image, fill, order, steps, curve))
            plan.append((name, curve))
    proba = predict(model, lm, np.concatenate(images))[:, target].reshape(len(plan), steps + 1)
    return [{**ids, "map": name, "curve": curve, "target": target, "auc": curve_auc(p)}
            for (name, curve), p in zip(plan, proba)]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps' pixels (NaN where one is constant)."""
    ra = pd.Series(np.ravel(a)).rank().to_numpy()
    rb = pd.Series(np.ravel(b)).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
