"""Feature-cache throughput: the embed stage against a naive loop, over the same shards.

naive (baseline): per image, PIL image from the shard -> open_clip's eval preprocess -> batches of
32 -> fp32 ``encode_image``. stage: ``radacx_cache.stages.embed.embed_variant`` (bulk uint8 block reads,
conversion on the device, large batches, bf16 + channels_last on GPU).

    python benchmarks/embed.py                      # CPU: tiny and ViT-B/16 (BiomedCLIP architecture)
    python benchmarks/embed.py --device cuda --models biomedclip-random --images 20000 \\
        --batch-size 1024 --num-workers 8          # the GPU check: bf16 end to end from shards

On a GPU it also prints the fraction of the bf16 roofline (35.1 GFLOP per ViT-B/16 image,
989 TFLOP/s dense bf16 on an H100 SXM: ~28k img/s).
"""
from __future__ import annotations

import argparse
import shutil
import time

import numpy as np
import torch
from _common import small_pipeline
from PIL import Image

VIT_B16_GFLOP = 35.13  # open_clip model_profile.csv, image tower (docs/models.md)
H100_BF16_TFLOPS = 989.0


def naive(model, shards, n):
    import open_clip
    preprocess = open_clip.image_transform(model.image_size, is_train=False, mean=model.mean, std=model.std)
    feats, batch = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            batch.append(preprocess(Image.fromarray(shards[i]["original"]).convert("RGB")))
            if len(batch) == 32 or i == n - 1:
                feats.append(model.model.encode_image(torch.stack(batch)))
                batch = []
    return n / (time.perf_counter() - t0)


def stage(cfg, model, shards, n):
    from radacx_cache.formats.shard import ShardSet
    from radacx_cache.stages.embed import embed_variant
    sub = ShardSet(shards.root, shards.index.iloc[:n], shards.manifest)
    shutil.rmtree(cfg.work / "features", ignore_errors=True)
    t0 = time.perf_counter()
    embed_variant(cfg, model, sub, "original", progress=False)
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "biomedclip-random"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=0, help="images per measurement (default: 256 tiny, 48 ViT-B on CPU)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    from radacx_cache.formats.shard import open_shards
    from radacx_cache.models import load_model
    patients = 80 if args.device == "cpu" else max(80, args.images // 2)
    cfg = small_pipeline(n_patients=patients)
    cfg.runtime.device, cfg.embed.batch_size = args.device, args.batch_size
    cfg.embed.num_workers, cfg.runtime.precision = args.num_workers, args.precision
    shards = open_shards(cfg.work / "shards")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{len(shards)} shard rows available; device {args.device}; torch threads {torch.get_num_threads()}")
    for spec in args.models:
        n = args.images or (256 if spec == "tiny" else 48)
        n = min(n, len(shards))
        model = load_model(spec, device=args.device)
        if args.device == "cpu":
            naive(model, shards, min(n, 32))  # warm up
            base = naive(model, shards, n)
        else:
            base = float("nan")
        stage(cfg, model, shards, min(n, 64))  # warm up (allocator, kernels)
        fast = stage(cfg, model, shards, n)
        line = f"{spec:18s} {n:6d} img  naive fp32 loop {base:8.1f} img/s  stage {fast:8.1f} img/s"
        if np.isfinite(base):
            line += f"  ratio {fast / base:.2f}x"
        if args.device.startswith("cuda") and spec.startswith("biomedclip"):
            roofline = H100_BF16_TFLOPS * 1e12 / (VIT_B16_GFLOP * 1e9)
            line += f"  = {fast / roofline:.1%} of the H100 bf16 roofline ({roofline:,.0f} img/s)"
        print(line)


if __name__ == "__main__":
    main()
