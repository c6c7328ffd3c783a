"""Streaming input throughput against the in-memory ceiling, and tiny training-step speed.

ceiling (baseline): the same rows already in a numpy array in RAM, gathered in the same shuffled
batches. stream: ``radacx_cache.stream.ShardStream`` through a DataLoader with 1 and 2 workers
(chunk-aligned block reads, bounded shuffle buffer). Goal (issue 5): stream >= 80% of the ceiling.

    python benchmarks/stream.py [--epochs 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import small_pipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    from radacx_cache.finetune import Classifier, normalise, soft_ce, unit_pixels
    from radacx_cache.models import load_model
    from radacx_cache.shards import open_shards
    from radacx_cache.stream import ShardStream, consumer_order
    cfg = small_pipeline(n_patients=400, long_side=256)
    train = open_shards(cfg.work / "shards").split("train")
    n = len(train)
    print(f"{n} training rows, batch {args.batch_size}, {args.epochs} epochs, variant masked (150 KB/row)")
    # ceiling: rows in RAM, same shuffled order
    arrays = {s: train.file(s)["masked"][:] for s in train.index["shard"].unique()}
    ram = np.concatenate([arrays[s][r:r + 1] for s, r in zip(train.index["shard"], train.index["row"])])
    stream = ShardStream(train, "masked", args.batch_size, seed=0, block_rows=64, shuffle_buffer=1024)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        order = consumer_order(stream.sizes, seed=0, epoch=epoch, consumer=0, n_consumers=1, buffer=1024)
        pos = np.array([stream.blocks[b][3][r] for b, r in order])
        for i in range(0, n, args.batch_size):
            batch = torch.from_numpy(ram[np.sort(pos[i:i + args.batch_size])])
    ceiling = args.epochs * n / (time.perf_counter() - t0)
    print(f"in-memory ceiling          : {ceiling:9.0f} img/s")
    for workers in (0, 1, 2):
        stream.num_workers = max(1, workers)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                             persistent_workers=workers > 0)
        for _ in loader:  # warm up (worker start, page cache)
            break
        t0 = time.perf_counter()
        seen = 0
        for epoch in range(args.epochs):
            stream.set_epoch(epoch)
            for batch in loader:
                seen += len(batch["index"])
        rate = seen / (time.perf_counter() - t0)
        label = "main process" if workers == 0 else f"{workers} worker(s)"
        print(f"stream, {label:16s}: {rate:9.0f} img/s = {rate / ceiling:.0%} of the ceiling (target >= 80%)")
    # training step, tiny, CPU
    lm = load_model("tiny")
    model = Classifier(lm.model.visual, 64, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.from_numpy(ram[:args.batch_size])
    y = torch.from_numpy(train.targets()[:args.batch_size])
    for i in range(6):
        if i == 1:
            t0 = time.perf_counter()
        loss = soft_ce(model(normalise(unit_pixels(x), lm.mean, lm.std)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step_rate = 5 * args.batch_size / (time.perf_counter() - t0)
    print(f"tiny training step (CPU)   : {step_rate:9.0f} img/s -> input is {ceiling / step_rate:.0f}x faster "
          f"than compute")


if __name__ == "__main__":
    main()
