"""Shard renderer throughput at MIMIC resolution (~3000x2500, JPEG q95), per worker.

Baselines measured in the same run, on the same files:
- naive: full PIL decode, full-resolution RLE decode of the three masks, skimage.transform.resize
  of image and masks, skimage.segmentation.find_boundaries for the overlay;
- decode-only bound: the fastest decode PIL offers for these files (libjpeg DCT scaling to 1/8,
  nothing else).
Targets (issue 2): renderer >= 4x naive, >= 50% of the decode-only bound, 2 workers >= 1.7x one.

    python benchmarks/shards.py [--images 12]
"""
from __future__ import annotations

import argparse
import io
import os

import numpy as np
from joblib import Parallel, delayed
from PIL import Image

from _common import full_resolution_items, timed


def naive_render(data, rles, shape, size=224):
    from skimage.segmentation import find_boundaries
    from skimage.transform import resize
    from radacx_cache.sources.chexmask import MASK_NAMES, decode_rle
    img = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    side = max(img.shape)
    top, left = (side - img.shape[0]) // 2, (side - img.shape[1]) // 2
    canvas = np.zeros((side, side), np.uint8)
    canvas[top:top + img.shape[0], left:left + img.shape[1]] = img
    small = (resize(canvas, (size, size), anti_aliasing=True) * 255).astype(np.uint8)
    rgb = np.repeat(small[..., None], 3, 2)
    for k, name in enumerate(MASK_NAMES):
        m = np.zeros((side, side), bool)
        m[top:top + img.shape[0], left:left + img.shape[1]] = decode_rle(rles[name], shape)
        m = resize(m.astype(float), (size, size), order=0) > 0.5
        rgb[find_boundaries(m)] = [(255, 0, 0), (0, 255, 0), (0, 0, 255)][k]
    return small, rgb


def decode_only(data):
    im = Image.open(io.BytesIO(data))
    im.draft("L", (im.width // 8, im.height // 8))
    im.load()
    return im


def fast_render(items):
    from radacx_cache.render import render_image
    for data, rles, shape in items:
        render_image(data, rles, shape)
    return len(items)


def _worker_batch(items):
    from radacx_cache._io import cap_threads
    cap_threads(1)
    return fast_render(items)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=12)
    args = ap.parse_args()
    items = full_resolution_items(args.images)
    h, w = items[0][2]
    print(f"{len(items)} phantom JPEGs ~{h}x{w}, quality 95, mean {np.mean([len(i[0]) for i in items]) / 1e6:.2f} MB")
    _, t_fast = timed(fast_render, items, repeat=3)
    _, t_naive = timed(lambda: [naive_render(*i) for i in items])
    _, t_decode = timed(lambda: [decode_only(i[0]) for i in items], repeat=3)
    _, t_full_decode = timed(lambda: [Image.open(io.BytesIO(i[0])).load() for i in items], repeat=2)
    n = len(items)
    print(f"{'method':44s} {'img/s/worker':>12s} {'ratio':>8s}")
    rows = [("shard renderer (radacx_cache.render)", n / t_fast),
            ("naive baseline (PIL full + skimage)", n / t_naive),
            ("decode-only bound (PIL draft 1/8)", n / t_decode),
            ("full-resolution PIL decode only", n / t_full_decode)]
    for name, rate in rows:
        print(f"{name:44s} {rate:12.1f} {rate / rows[1][1]:7.1f}x naive")
    print(f"renderer / naive baseline      = {t_naive / t_fast:.2f}x   (target >= 4)")
    print(f"renderer / decode-only bound   = {t_decode / t_fast:.0%}   (target >= 50%)")
    # scaling: same work split over 1 and 2 loky workers (warm pool, BLAS capped at 1 thread)
    work = items * 4
    for n_jobs in (1, 2):
        Parallel(n_jobs=n_jobs)(delayed(_worker_batch)(work[:2]) for _ in range(n_jobs))  # warm up
    rates = {}
    for n_jobs in (1, 2):
        chunks = [work[i::n_jobs * 4] for i in range(n_jobs * 4)]
        _, t = timed(lambda: Parallel(n_jobs=n_jobs)(delayed(_worker_batch)(c) for c in chunks))
        rates[n_jobs] = len(work) / t
        print(f"{n_jobs} worker(s): {rates[n_jobs]:.1f} img/s")
    print(f"2 workers / 1 worker            = {rates[2] / rates[1]:.2f}x   (target >= 1.7; {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
