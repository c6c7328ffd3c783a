"""Streaming input throughput against the in-memory ceiling, and tiny training-step speed.

ceiling (baseline): the same rows already in a numpy array in RAM, gathered in the same shuffled
batches. stream: ``radacx_cache.formats.stream.ShardStream`` through a DataLoader with 1 and 2 workers
(chunk-aligned block reads, bounded shuffle buffer). Goal (issue 5): stream >= 80% of the ceiling.

    python benchmarks/stream.py [--epochs 3]
    python benchmarks/stream.py --device cuda --model biomedclip-random --batch-size 256 --steps 50
        # the GPU check: ViT-B/16 bf16 training images/s end to end from shards
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=6, help="training steps to time (the first is warm-up)")
    args = ap.parse_args()
    from radacx_cache.formats.shard import open_shards
    from radacx_cache.formats.stream import ShardStream, consumer_order
    from radacx_cache.models import load_model
    from radacx_cache.stages.finetune import Classifier, soft_ce
    cfg = small_pipeline(n_patients=400, long_side=256)
    train = open_shards(cfg.work / "shards").split("train")
    n = len(train)
    print(f"{n} training rows, batch {args.batch_size}, {args.epochs} epochs, variant masked (150 KB/row)")
    # ceiling: rows in RAM, same shuffled order
    arrays = {s: train.file(s)["masked"][:] for s in train.index["shard"].unique()}
    ram = np.concatenate([arrays[s][r:r + 1] for s, r in zip(train.index["shard"], train.index["row"])])
    stream = ShardStream(train, "masked", args.batch_size, seed=0, block_rows=64, shuffle_buffer=1024)
    for epoch in range(-1, args.epochs):  # epoch -1 warms the allocator, untimed
        if epoch == 0:
            t0 = time.perf_counter()
        order = consumer_order(stream.sizes, seed=0, epoch=max(epoch, 0), consumer=0, n_consumers=1, buffer=1024)
        pos = np.array([stream.blocks[b][3][r] for b, r in order])
        for i in range(0, n, args.batch_size):
            batch = torch.from_numpy(ram[np.sort(pos[i:i + args.batch_size])])
    ceiling = args.epochs * n / (time.perf_counter() - t0)
    print(f"in-memory ceiling          : {ceiling:9.0f} img/s")
    for workers in (0, 1, 2):
        stream.num_workers = max(1, workers)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                             persistent_workers=workers > 0)
        for _ in loader:  # warm up: a whole untimed epoch (worker start, page cache, allocator)
            pass
        t0 = time.perf_counter()
        seen = 0
        for epoch in range(args.epochs):
            stream.set_epoch(epoch)
            for batch in loader:
                seen += len(batch["index"])
        rate = seen / (time.perf_counter() - t0)
        label = "main process" if workers == 0 else f"{workers} worker(s)"
        print(f"stream, {label:16s}: {rate:9.0f} img/s = {rate / ceiling:.0%} of the ceiling (target >= 80%)")
    # training steps end to end from the shards: stream -> device -> (bf16 on GPU) forward/backward
    from radacx_cache.runtime import autocast_dtype
    device = torch.device(args.device)
    dtype = autocast_dtype("auto", device)
    lm = load_model(args.model, device=device)
    with torch.no_grad():
        width = lm.model.visual(torch.zeros(1, 3, 224, 224, device=device)).shape[1]
    model = Classifier(lm.model.visual, width, 5).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stream.num_workers = 1
    done, t0 = 0, None
    while done < args.steps:
        for batch in stream:
            if done == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, seen = time.perf_counter(), 0
            x = lm.to_input(batch["pixels"].to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = soft_ce(model(x), batch["targets"].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done > 1:
                seen += len(x)
            if done >= args.steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_rate = seen / (time.perf_counter() - t0)
    print(f"{args.model} training from shards ({args.device}{', bf16' if dtype else ''}): {step_rate:9.0f} img/s "
          f"-> the main-process stream is {ceiling / step_rate:.0f}x faster than the training step")


if __name__ == "__main__":
    main()
