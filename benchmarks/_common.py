"""Helpers shared by the benchmarks: synthetic inputs and a timer. Not part of the package."""
from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, *args, repeat: int = 1, **kwargs):
    """(result, best seconds over ``repeat`` runs)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return out, best


def full_resolution_items(n: int, seed: int = 0, size: tuple[int, int] = (3056, 2544)):
    """``n`` phantom radiographs at MIMIC resolution: (jpeg bytes, RLE dict, shape)."""
    from radacx_cache.phantom.generator import draw_frontal, make_anatomy
    from radacx_cache.sources.chexmask import encode_rle
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        h = int(size[0] * rng.uniform(0.92, 1.0))
        w = int(size[1] * rng.uniform(0.9, 1.05))
        anatomy = make_anatomy(h, w, rng, ctr=rng.uniform(0.38, 0.6))
        pixels, masks, _ = draw_frontal(h, w, anatomy, {"Pleural Effusion": float(i % 2)}, rng)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=95)
        items.append((buf.getvalue(), {k: encode_rle(v) for k, v in masks.items()}, (h, w)))
    return items


def small_pipeline(n_patients: int = 80, long_side: int = 256, seed: int = 0, workdir: str | None = None):
    """A phantom archive + cohort + shards in a temporary folder; returns the config."""
    from radacx_cache.config import load_config
    from radacx_cache.phantom.generator import generate
    from radacx_cache.stages.cohort import build_cohort
    from radacx_cache.stages.shards import build_shards
    root = Path(workdir or tempfile.mkdtemp(prefix="radacx-bench-"))
    summary = generate(root / "phantom", n_patients=n_patients, long_side=long_side, seed=seed,
                       faults=False, progress=False)
    cfg = load_config(None, [f"workdir={root / 'work'}", f"archive.root={summary['root']}",
                             f"archive.chexmask_csv={summary['chexmask_csv']}", "shards.rows_per_shard=128"])
    build_cohort(cfg, progress=False)
    build_shards(cfg, progress=False)
    return cfg
