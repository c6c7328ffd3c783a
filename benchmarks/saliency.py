"""Saliency cost: images per second per method, against a plain forward pass in the same run.

    python benchmarks/saliency.py [--device cuda] [--models tiny biomedclip-random] [--images N]

For each model: the forward pass (inference, the baseline), Grad-CAM and Integrated Gradients
(``--ig-steps``) on 224 x 224 inputs; printed as img/s and as the cost relative to the forward pass.
The ViT-B/16 row is the BiomedCLIP architecture with random weights (no hub access needed).
"""
from __future__ import annotations

import argparse
import time

import torch
from _common import timed  # noqa: F401  (sets sys.path)

from radacx_cache.attribution import saliency_maps
from radacx_cache.models import Classifier, load_model


def rate(fn, n: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "biomedclip-random"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=0, help="per measurement (default: 32 tiny, 4 ViT-B on CPU)")
    ap.add_argument("--ig-steps", type=int, default=16)
    args = ap.parse_args()
    dev = torch.device(args.device)
    print(f"device {dev}; torch threads {torch.get_num_threads()}; Integrated Gradients with {args.ig_steps} steps")
    for spec in args.models:
        lm = load_model(spec)
        with torch.no_grad():
            width = lm.model.visual(torch.zeros(1, 3, 224, 224)).shape[1]
        model = Classifier(lm.model.visual, width, 5).to(dev).eval()
        n = args.images or (32 if spec == "tiny" else 4 if dev.type == "cpu" else 256)
        x = torch.randn(n, 3, 224, 224, device=dev)
        targets = [i % 5 for i in range(n)]

        def forward():
            with torch.no_grad():
                model(x)
        base = rate(forward, n)
        print(f"{spec:18s} forward (baseline)     : {base:9.1f} img/s")
        for method in ("gradcam", "integrated_gradients"):
            r = rate(lambda: saliency_maps(method, model, x, targets, ig_steps=args.ig_steps), n)
            print(f"{spec:18s} {method:22s}: {r:9.1f} img/s  ({base / r:.1f}x the forward pass's cost)")


if __name__ == "__main__":
    main()
