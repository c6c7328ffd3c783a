"""Fine-tune encoder + linear head from the shards (V3: original images, V4: masked).

Streaming from the HDF5 shards (``stream.ShardStream``), soft multi-hot cross-entropy (the
``any`` label policy; one-hot under ``single``/``first``), AdamW with separate encoder/head learning
rates, linear warm-up + cosine decay, gradient clipping and accumulation, bf16 autocast on GPU,
validation every epoch with early stopping. ``finetune/<variant>/last.pt`` (written atomically
every ``checkpoint_every`` optimiser steps and at each epoch end) holds everything ``--resume``
needs: model, optimiser, scheduler, scaler, RNG states and the stream position.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ._io import atomic_path, stable_hash, write_json
from .config import Config
from .embed import autocast, autocast_dtype, normalise, resolve_device, unit_pixels
from .shards import ShardSet, open_shards
from .stream import ShardStream, augment

log = logging.getLogger(__name__)
VARIANT_NAMES = {"original": "V3", "masked": "V4"}


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a checkpoint from another config, ...)."""


class Classifier(torch.nn.Module):
    """The model's vision tower + a randomly initialised linear head on its embedding."""

    def __init__(self, visual: torch.nn.Module, embed_dim: int, n_classes: int):
        super().__init__()
        self.visual = visual
        self.head = torch.nn.Linear(embed_dim, n_classes)

    def forward(self, x):
        return self.head(self.visual(x))


def soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    q = targets / targets.sum(1, keepdim=True).clamp_min(1e-12)
    return -(q * torch.log_softmax(logits.float(), 1)).sum(1).mean()


def lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.inference_mode()
def predict(model: Classifier, shards: ShardSet, variant: str, lm, device, dtype, batch_size: int = 64):
    """Class probabilities for every row of ``shards`` (in index order)."""
    model.eval()
    stream = ShardStream(shards, variant, batch_size, shuffle=False, block_rows=max(batch_size, 32))
    out = np.zeros((len(shards), len(shards.target_names)), np.float32)
    for batch in stream:
        x = normalise(unit_pixels(batch["pixels"].to(device)), lm.mean, lm.std)
        with autocast(device, dtype):
            logits = model(x)
        out[batch["index"].numpy()] = torch.softmax(logits.float(), 1).cpu().numpy()
    return out


def train_variant(cfg: Config, variant: str, *, resume: bool = False, progress: bool = True,
                  stop_after_steps: int | None = None) -> dict:
    """Train one variant; returns a summary. ``stop_after_steps`` simulates an interruption."""
    from .models import load_model
    from .probe import policy_accuracy, write_predictions
    ft = cfg.finetune
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg.embed.device)
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    dtype = autocast_dtype(cfg.embed.precision, device)
    shards = open_shards(cfg.work / "shards")
    shards.validate()
    train, val = shards.split("train"), shards.split("val")
    if len(train) == 0 or len(val) == 0:
        raise TrainingError("fine-tuning needs non-empty train and val splits")
    lm = load_model(cfg.embed.model, seed=cfg.seed)
    with torch.no_grad():
        embed_dim = lm.model.visual(torch.zeros(1, 3, lm.image_size, lm.image_size)).shape[1]
    torch.manual_seed(cfg.seed)
    model = Classifier(lm.model.visual, embed_dim, len(shards.target_names)).to(device)
    if ft.grad_checkpointing and hasattr(model.visual, "set_grad_checkpointing"):
        model.visual.set_grad_checkpointing(True)
    out_dir = cfg.work / "finetune" / variant
    out_dir.mkdir(parents=True, exist_ok=True)
    config_fp = stable_hash({"finetune": cfg.to_dict()["finetune"], "model": lm.fingerprint,
                             "shards": shards.fingerprint, "variant": variant, "seed": cfg.seed,
                             "precision": cfg.embed.precision})
    stream = ShardStream(train, variant, ft.batch_size, seed=cfg.seed, block_rows=ft.block_rows,
                         shuffle_buffer=ft.shuffle_buffer, rank=rank, world=world)
    stream.num_workers = max(1, ft.num_workers)
    steps_per_epoch = math.ceil(len(stream) / ft.accumulate)
    total = steps_per_epoch * ft.epochs
    if ft.max_steps:
        total = min(total, ft.max_steps)
    opt = torch.optim.AdamW([{"params": model.visual.parameters(), "lr": ft.lr_encoder},
                             {"params": model.head.parameters(), "lr": ft.lr_head}],
                            weight_decay=ft.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ft.warmup_steps, total))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = {"epoch": 0, "step": 0, "batches_consumed": 0, "best": -1.0, "bad_epochs": 0, "history": []}
    last = out_dir / "last.pt"
    done = out_dir / "summary.json"
    if not resume and stop_after_steps is None and done.exists():
        previous = json.loads(done.read_text())
        preds = [cfg.work / "predictions" / VARIANT_NAMES[variant] / f"{v}.csv" for v in ("original", "masked")]
        if previous.get("config_fingerprint") == config_fp and all(p.exists() for p in preds):
            log.info("finetune %s: %s is up to date (delete it to train again)", variant, done)
            return previous
    if resume and last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        if ckpt["config_fingerprint"] != config_fp:
            raise TrainingError(f"{last} was written by another configuration or model "
                                f"({ckpt['config_fingerprint']} != {config_fp}); refusing to resume. "
                                f"Start fresh without --resume or restore the config it was made with.")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        stream.load_state_dict(ckpt["stream"])
        state = ckpt["state"]
        log.info("finetune %s: resumed at epoch %d step %d", variant, state["epoch"], state["step"])
    elif not resume:
        for stale in ("last.pt", "best.pt", "summary.json"):
            (out_dir / stale).unlink(missing_ok=True)

    def save(path: Path):
        if rank != 0:
            return
        with atomic_path(path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                        "stream": stream.state_dict(state["batches_consumed"]), "state": state,
                        "config_fingerprint": config_fp, "classes": shards.target_names,
                        "model_spec": lm.spec}, tmp)

    log_path = out_dir / "train_log.csv"
    new_log = not log_path.exists() or not resume
    log_file = open(log_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log_file)
    if new_log:
        writer.writerow(["epoch", "step", "loss", "lr_encoder", "lr_head", "images_per_s", "val_accuracy"])
    tb = None
    try:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(out_dir / "tensorboard")) if rank == 0 else None
    except Exception:  # tensorboard is optional
        tb = None
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=ft.num_workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    aug_gen = torch.Generator().manual_seed(cfg.seed)
    stopped, skipped_rows = None, 0
    try:
        while state["epoch"] < ft.epochs and state["step"] < total and stopped is None:
            stream.set_epoch(state["epoch"])
            model.train()
            bar = tqdm(total=len(stream), initial=state["batches_consumed"], unit="batch",
                       desc=f"{VARIANT_NAMES[variant]} epoch {state['epoch']}", disable=not progress)
            t0, seen = time.perf_counter(), 0
            join = contextlib.nullcontext()
            if world > 1:
                from torch.distributed.algorithms.join import Join
                join = Join([ddp])  # ranks may hold one batch more or less: exactly-once partitioning
            with join:
                for batch in loader:
                    aug_gen.manual_seed(cfg.seed * 1_000_003 + state["epoch"] * 100_003 + state["batches_consumed"])
                    x = unit_pixels(batch["pixels"].to(device, non_blocking=True))
                    if ft.augment:
                        x = augment(x, aug_gen)
                    x = normalise(x, lm.mean, lm.std)
                    y = batch["targets"].to(device)
                    with autocast(device, dtype):
                        loss = soft_ce(ddp(x), y)
                    if not torch.isfinite(loss):
                        stopped = (f"loss is {loss.item()} at epoch {state['epoch']} step {state['step']}; "
                                   f"stopped, {last.name} keeps the last good state (lower the learning rates)")
                        break
                    scaler.scale(loss / ft.accumulate).backward()
                    state["batches_consumed"] += 1
                    skipped_rows = max(skipped_rows, int(batch["skipped"]))
                    seen += len(x)
                    bar.update(1)
                    if state["batches_consumed"] % ft.accumulate == 0 or state["batches_consumed"] == len(stream):
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), ft.grad_clip)
                        scaler.step(opt)
                        scaler.update()
                        opt.zero_grad(set_to_none=True)
                        sched.step()
                        state["step"] += 1
                        rate = seen / max(time.perf_counter() - t0, 1e-9)
                        lrs = sched.get_last_lr()
                        writer.writerow([state["epoch"], state["step"], f"{loss.item():.5f}",
                                         f"{lrs[0]:.3g}", f"{lrs[1]:.3g}", f"{rate:.1f}", ""])
                        if tb:
                            tb.add_scalar("loss/train", loss.item(), state["step"])
                        bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
                        if ft.checkpoint_every and state["step"] % ft.checkpoint_every == 0:
                            save(last)
                        if stop_after_steps is not None and state["step"] >= stop_after_steps:
                            save(last)
                            return {"interrupted_at_step": state["step"]}
                        if state["step"] >= total:
                            break
            bar.close()
            if stopped:
                break
            val_proba = predict(model, val, variant, lm, device, dtype, ft.batch_size)
            val_acc = policy_accuracy(val_proba, val.targets())
            state["history"].append({"epoch": state["epoch"], "val_accuracy": val_acc})
            writer.writerow([state["epoch"], state["step"], "", "", "", "", f"{val_acc:.5f}"])
            log_file.flush()
            log.info("finetune %s: epoch %d val accuracy %.4f", variant, state["epoch"], val_acc)
            state["epoch"] += 1
            state["batches_consumed"] = 0
            stream.resume_batches = 0
            if val_acc > state["best"]:
                state["best"], state["bad_epochs"] = val_acc, 0
                save(out_dir / "best.pt")
            else:
                state["bad_epochs"] += 1
            save(last)
            if state["bad_epochs"] >= ft.patience:
                log.info("finetune %s: early stop after %d epochs without improvement", variant, ft.patience)
                break
    finally:
        log_file.close()
        if tb:
            tb.close()
    if stopped:
        raise TrainingError(f"finetune {variant}: {stopped}")
    if skipped_rows:
        log.warning("finetune %s: %d training rows were skipped (unreadable shards, see log)", variant,
                    skipped_rows)
    best = torch.load(out_dir / "best.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(best["model"])
    summary = {"variant": VARIANT_NAMES[variant], "config_fingerprint": config_fp, "best_val_accuracy": state["best"],
               "epochs": state["epoch"], "steps": state["step"], "skipped_rows": skipped_rows}
    if rank == 0:
        test = shards.split("test")
        rows = test.index
        for test_variant in ("original", "masked"):
            proba = predict(model, test, test_variant, lm, device, dtype, ft.batch_size)
            meta = {"variant": VARIANT_NAMES[variant], "trained_on": variant, "tested_on": test_variant,
                    "model": lm.spec, "model_fingerprint": lm.fingerprint, "shards_fingerprint": shards.fingerprint,
                    "checkpoint": str(out_dir / "best.pt"), "config_fingerprint": config_fp,
                    "history": state["history"]}
            write_predictions(cfg.work / "predictions" / VARIANT_NAMES[variant] / f"{test_variant}.csv",
                              rows, proba, shards.target_names, meta)
            summary[f"test_{test_variant}"] = policy_accuracy(proba, test.targets())
        write_json(out_dir / "summary.json", summary)
    return summary


def run_finetune(cfg: Config, variants=("original", "masked"), resume: bool = False) -> dict:
    return {VARIANT_NAMES[v]: train_variant(cfg, v, resume=resume) for v in variants}
