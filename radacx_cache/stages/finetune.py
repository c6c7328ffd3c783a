"""Fine-tune encoder + linear head from the shards (V3: original images, V4: masked).

Streaming from the HDF5 shards (``stream.ShardStream``), soft multi-hot cross-entropy (the
``any`` label policy; one-hot under ``single``/``first``), AdamW with separate encoder/head learning
rates, linear warm-up + cosine decay, gradient clipping and accumulation, bf16 autocast on GPU,
validation every epoch with early stopping. ``finetune/<image-variant>/last.pt`` (written
atomically every ``checkpoint_every`` optimiser steps and at each epoch end) holds everything
``--resume`` needs: model, optimiser, scheduler, scaler, RNG states and the stream position, as
tensors and plain values only, so it is loaded with ``torch.load(weights_only=True)``.

The shape follows open_clip_train: ``train_variant`` sets up and resumes, ``train_one_epoch`` runs
the loop, ``evaluate`` predicts a split in order, ``write_test_predictions`` writes the arm's files.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.algorithms.join import Join

from .._io import atomic_path, progress_bar, remove_stale_tmp, stable_hash, write_json
from ..arms import IMAGE_VARIANTS, finetune_test_variants, variant_arm
from ..augment import augment
from ..config import Config, FinetuneConfig
from ..formats.checkpoints import TrainingError, load_checkpoint
from ..formats.context import StageContext, open_stage
from ..formats.predictions import model_facts, write_arm_record, write_predictions
from ..formats.records import RecordError, write_record
from ..formats.shard import ShardSet
from ..formats.stream import ShardStream, ordered_loader, ordered_runs
from ..metrics import accuracy
from ..models import Classifier, LoadedModel, load_model, unit_pixels
from ..runtime import World, autocast, autocast_dtype, init_distributed, rng_state, set_rng_state

log = logging.getLogger(__name__)


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


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (plain values only)."""
    epoch: int = 0
    step: int = 0
    batches_consumed: int = 0  # in the current epoch
    best: float = -1.0
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    log: list = field(default_factory=list)  # train_log.csv's rows: committed with every checkpoint


LOG_HEADER = ["epoch", "step", "loss", "lr_encoder", "lr_head", "images_per_s", "val_accuracy"]


class _LogRows:
    """``csv.writer``-like: rows go into the training state, so ``train_log.csv`` is written only with
    a checkpoint and a resume continues the log the checkpoint saw (never a half-written one)."""

    def __init__(self, run: "Run"):
        self.run = run

    def writerow(self, row) -> None:
        self.run.state.log.append([str(v) for v in row])


@dataclass
class Run:
    """Everything one variant's training loop reads and updates: the stage's context (paths, verifier,
    shards), the fine-tune settings and the seed; never the whole config."""
    ctx: StageContext
    ft: FinetuneConfig
    seed: int
    variant: str
    world: World
    device: torch.device
    dtype: object
    lm: LoadedModel
    model: Classifier
    ddp: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    stream: ShardStream
    total_steps: int
    out_dir: Path
    config_fp: str
    classes: list
    state: TrainState = field(default_factory=TrainState)

    @property
    def arm(self) -> str:
        return variant_arm("finetune", self.variant)

    @property
    def last(self) -> Path:
        return self.ctx.work.finetune_last(self.variant)

    @property
    def best(self) -> Path:
        return self.ctx.work.finetune_best(self.variant)

    def save(self, path: Path) -> None:
        """The checkpoint, then the training log as of that checkpoint (each written atomically)."""
        if not self.world.is_main:
            return
        with atomic_path(path) as tmp:
            torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                        "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                        "rng": rng_state(), "stream": self.stream.state_dict(self.state.batches_consumed),
                        "state": dataclasses.asdict(self.state), "config_fingerprint": self.config_fp,
                        "classes": self.classes, "model_spec": self.lm.spec}, tmp)
        with atomic_path(self.ctx.work.finetune_log(self.variant)) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(LOG_HEADER)
                writer.writerows(self.state.log)


def _setup(cfg: Config, ctx: StageContext, variant: str) -> Run:
    """Model, optimiser, schedule and stream for one variant, before any resume."""
    ft, shards = cfg.finetune, ctx.shards
    world, device = init_distributed(cfg.runtime.device)
    dtype = autocast_dtype(cfg.runtime.precision, device)
    lm = load_model(cfg.model.spec, seed=cfg.seed)
    with torch.no_grad():
        embed_dim = lm.model.visual(torch.zeros(1, 3, lm.image_size, lm.image_size)).shape[1]
    torch.manual_seed(cfg.seed)
    model = Classifier(lm.model.visual, embed_dim, len(shards.target_names)).to(device)
    if ft.grad_checkpointing and hasattr(model.visual, "set_grad_checkpointing"):
        model.visual.set_grad_checkpointing(True)
    # which variants get their own arm is not how one is trained: adding one retrains nothing
    settings = {k: v for k, v in cfg.to_dict()["finetune"].items() if k != "variants"}
    config_fp = stable_hash({"finetune": settings, "model": lm.fingerprint,
                             "shards": shards.fingerprint, "variant": variant, "seed": cfg.seed,
                             "precision": cfg.runtime.precision})
    stream = ShardStream(shards.split("train"), variant, ft.batch_size, seed=cfg.seed, block_rows=ft.block_rows,
                         shuffle_buffer=ft.shuffle_buffer, rank=world.rank, world=world.size,
                         num_workers=ft.num_workers)
    total = math.ceil(len(stream) / ft.accumulate) * ft.epochs
    if ft.max_steps:
        total = min(total, ft.max_steps)
    opt = torch.optim.AdamW([{"params": model.visual.parameters(), "lr": ft.lr_encoder},
                             {"params": model.head.parameters(), "lr": ft.lr_head}],
                            weight_decay=ft.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ft.warmup_steps, total))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ddp = model
    if world.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(ctx, ft, cfg.seed, variant, world, device, dtype, lm, model, ddp, opt, sched, scaler, stream, total,
               ctx.work.finetune_dir(variant), config_fp, shards.target_names)


def load_or_init_checkpoint(run: Run, resume: bool) -> None:
    """Continue from ``last.pt`` (same config only) or start clean (stale files removed)."""
    last = run.last
    if resume and last.exists():
        ckpt = load_checkpoint(last)
        if ckpt["config_fingerprint"] != run.config_fp:
            raise TrainingError(f"{last} was written by another configuration or model "
                                f"({ckpt['config_fingerprint']} != {run.config_fp}); refusing to resume. "
                                f"Start fresh without --resume or restore the config it was made with.")
        run.model.load_state_dict(ckpt["model"])
        run.opt.load_state_dict(ckpt["optimizer"])
        run.sched.load_state_dict(ckpt["scheduler"])
        run.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        run.stream.load_state_dict(ckpt["stream"])
        run.state = TrainState(**ckpt["state"])
        log.info("finetune %s: resumed at epoch %d step %d", run.variant, run.state.epoch, run.state.step)
    elif not resume:
        work = run.ctx.work
        for stale in (run.last, run.best, work.finetune_summary(run.variant), work.finetune_record(run.variant)):
            stale.unlink(missing_ok=True)


def _optimiser_step(run: Run) -> None:
    run.scaler.unscale_(run.opt)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.ft.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    run.sched.step()
    run.state.step += 1


def train_one_epoch(run: Run, loader, log_rows, *, progress: bool = True,
                    stop_after_steps: int | None = None) -> dict:
    """One epoch (or the rest of one, after a resume). Returns {"skipped": rows lost to unreadable
    shards, "stop": None | "interrupted" | "nan", "message": text}."""
    ft, state = run.ft, run.state
    aug_gen = torch.Generator().manual_seed(run.seed)
    run.model.train()
    bar = progress_bar(total=len(run.stream), initial=state.batches_consumed, unit="batch", enabled=progress,
                       desc=f"{run.arm} epoch {state.epoch + 1}/{ft.epochs}")
    t0, seen, skipped = time.perf_counter(), 0, 0
    join = contextlib.nullcontext()
    if run.world.distributed:
        join = Join([run.ddp])  # ranks may hold one batch more or less: exactly-once partitioning
    try:
        with join:
            for batch in loader:
                aug_gen.manual_seed(run.seed * 1_000_003 + state.epoch * 100_003 + state.batches_consumed)
                x = unit_pixels(batch["pixels"].to(run.device, non_blocking=True))
                if ft.augment:
                    x = augment(x, aug_gen)
                x = run.lm.normalise(x)
                with autocast(run.device, run.dtype):
                    loss = soft_ce(run.ddp(x), batch["targets"].to(run.device))
                if not torch.isfinite(loss):
                    return {"skipped": skipped, "stop": "nan",
                            "message": f"loss is {loss.item()} at epoch {state.epoch} step {state.step}; stopped, "
                                       f"last.pt keeps the last good state (lower the learning rates)"}
                run.scaler.scale(loss / ft.accumulate).backward()
                state.batches_consumed += 1
                skipped = max(skipped, int(batch["skipped"]))
                seen += len(x)
                bar.update(1)
                if state.batches_consumed % ft.accumulate and state.batches_consumed != len(run.stream):
                    continue
                _optimiser_step(run)
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                lrs = run.sched.get_last_lr()
                log_rows.writerow([state.epoch, state.step, f"{loss.item():.5f}", f"{lrs[0]:.3g}",
                                   f"{lrs[1]:.3g}", f"{rate:.1f}", ""])
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
                if ft.checkpoint_every and state.step % ft.checkpoint_every == 0:
                    run.save(run.last)
                if stop_after_steps is not None and state.step >= stop_after_steps:
                    run.save(run.last)
                    return {"skipped": skipped, "stop": "interrupted", "message": ""}
                if state.step >= run.total_steps:
                    break  # the epoch ends here: it is validated like any other
    finally:
        bar.close()
    return {"skipped": skipped, "stop": None, "message": ""}


@torch.inference_mode()
def evaluate(model: torch.nn.Module, shards: ShardSet, variant: str, lm: LoadedModel, device, dtype,
             batch_size: int = 64) -> np.ndarray:
    """Class probabilities for every row of ``shards``, in index order (the in-order reader)."""
    model.eval()
    out = np.zeros((len(shards), len(shards.target_names)), np.float32)
    runs = ordered_runs(shards, batch_size, max(batch_size, 32))
    for pixels, positions in ordered_loader(shards, variant, [r for _, r in runs]):
        with autocast(device, dtype):
            logits = model(lm.to_input(pixels.to(device)))
        out[positions.numpy()] = torch.softmax(logits.float(), 1).cpu().numpy()
    return out


def _end_of_epoch(run: Run, val: ShardSet, log_rows) -> bool:
    """Validate, keep the best checkpoint, save ``last.pt``; True when early stopping says stop."""
    state = run.state
    val_acc = accuracy(evaluate(run.model, val, run.variant, run.lm, run.device, run.dtype,
                                run.ft.batch_size), val.positives(), order=val.target_order)  # headline
    state.history.append({"epoch": state.epoch, "val_accuracy": val_acc})
    log_rows.writerow([state.epoch, state.step, "", "", "", "", f"{val_acc:.5f}"])
    state.epoch += 1
    state.batches_consumed = 0
    run.stream.resume_batches = 0
    if val_acc > state.best:
        state.best, state.bad_epochs = val_acc, 0
        run.save(run.best)
    else:
        state.bad_epochs += 1
    log.info("finetune %s: epoch %d/%d val accuracy %.4f (best %.4f; %d of %d epochs without gain)", run.variant,
             state.epoch, run.ft.epochs, val_acc, state.best, state.bad_epochs, run.ft.patience)
    run.save(run.last)
    if state.bad_epochs >= run.ft.patience:
        log.info("finetune %s: early stop after %d epochs without improvement", run.variant, run.ft.patience)
        return True
    return False


def write_test_predictions(run: Run, test: ShardSet, shards_fingerprint: str) -> dict:
    """Predict the arm's test image variants (``arms.finetune_test_variants``) with the model as it is
    (the best checkpoint, loaded by the caller); returns the test accuracies."""
    work = run.ctx.work
    out = {}
    for test_variant in finetune_test_variants(run.variant, test.variants):
        proba = evaluate(run.model, test, test_variant, run.lm, run.device, run.dtype, run.ft.batch_size)
        meta = {"variant": run.arm, "trained_on": run.variant, "tested_on": test_variant,
                "model": run.lm.spec, "model_fingerprint": run.lm.fingerprint,
                "shards_fingerprint": shards_fingerprint, "checkpoint": run.best.name,
                "config_fingerprint": run.config_fp, "history": run.state.history}
        write_predictions(work.predictions(run.arm, test_variant), test.index, proba, run.classes, meta)
        out[f"test_{test_variant}"] = accuracy(proba, test.positives(), order=test.target_order)
    return out


def _finished(run: Run) -> dict | None:
    """The summary of an identical, finished training whose training record (best checkpoint, log)
    is intact: nothing to train again."""
    work = run.ctx.work
    done = work.finetune_summary(run.variant)
    if not done.exists():
        return None
    previous = json.loads(done.read_text())
    if previous.get("config_fingerprint") != run.config_fp:
        return None
    try:
        run.ctx.record(work.finetune_record(run.variant), "finetune")
    except RecordError as exc:
        log.warning("finetune %s: training again (%s)", run.variant, exc)
        return None
    return previous


def _predictions_current(run: Run, wanted) -> bool:
    """The arm's predictions cover ``wanted``, their chain intact (a changed ``variants.json`` breaks it)."""
    try:
        record = run.ctx.record(run.ctx.work.predictions_record(run.arm), "predictions")
    except RecordError:
        return False
    return set(wanted) <= set(record.facts.tested_on)


def write_records(run: Run, shards_record, tested_on) -> None:
    """The variant's record (best checkpoint, log, summary) and then its arm's (the predictions)."""
    work = run.ctx.work
    folder = work.finetune_dir(run.variant)
    files = [p.relative_to(folder).as_posix() for p in (run.best, work.finetune_log(run.variant),
                                                        work.finetune_summary(run.variant))]
    trained = write_record(work.finetune_record(run.variant), work.root, "finetune", "radacx finetune",
                           files=files, upstream=[shards_record], variant=run.variant,
                           config_fingerprint=run.config_fp, classes=run.classes, **model_facts(run.lm))
    ups = [trained]
    if any(v not in IMAGE_VARIANTS for v in tested_on):  # drawn with the settings of variants.json
        ups.append(run.ctx.record(work.shards_variants, "variants"))
    write_arm_record(work, run.arm, "radacx finetune", ups, tested_on=tested_on, training=dataclasses.asdict(run.ft),
                     **model_facts(run.lm))


def train_variant(cfg: Config, variant: str, *, resume: bool = False, progress: bool = True,
                  stop_after_steps: int | None = None, ctx: StageContext | None = None) -> dict:
    """Train one variant; returns a summary. ``stop_after_steps`` simulates an interruption; ``ctx``:
    the stage's context (``run_finetune``), else the workdir's, verified here."""
    ctx = ctx or StageContext.of(cfg.workdir)
    shards = ctx.shards
    val = shards.split("val")
    if len(shards.split("train")) == 0 or len(val) == 0:
        raise TrainingError("fine-tuning needs non-empty train and val splits")
    run = _setup(cfg, ctx, variant)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    wanted = finetune_test_variants(variant, shards.variants)
    if not resume and stop_after_steps is None and (previous := _finished(run)) is not None:
        if _predictions_current(run, wanted):
            log.info("finetune %s: %s is up to date (delete it to train again)", variant, run.out_dir)
            return previous
        # variants added or redefined since: the finished model predicts them, nothing is trained again
        log.info("finetune %s: predicting %s with the finished model (no training)", variant, ", ".join(wanted))
        best = load_checkpoint(run.best)
        run.model.load_state_dict(best["model"])
        run.state.history = best["state"]["history"]
        previous.update(write_test_predictions(run, shards.split("test"), shards.fingerprint))
        return _commit_summary(run, previous, list(wanted))
    if removed := remove_stale_tmp(run.out_dir):  # a checkpoint write that was killed half-way
        log.warning("finetune %s: removed %d temporary file(s) left by an interrupted run", variant, removed)
    load_or_init_checkpoint(run, resume)
    skipped, log_rows = 0, _LogRows(run)  # the log is committed with each checkpoint (Run.save)
    loader = torch.utils.data.DataLoader(run.stream, batch_size=None, num_workers=run.ft.num_workers,
                                         pin_memory=run.device.type == "cuda", persistent_workers=False)
    while run.state.epoch < run.ft.epochs and run.state.step < run.total_steps:
        run.stream.set_epoch(run.state.epoch)
        outcome = train_one_epoch(run, loader, log_rows, progress=progress, stop_after_steps=stop_after_steps)
        skipped = max(skipped, outcome["skipped"])
        if outcome["stop"] == "nan":
            raise TrainingError(f"finetune {variant}: {outcome['message']}")
        if outcome["stop"] == "interrupted":
            return {"interrupted_at_step": run.state.step}
        if _end_of_epoch(run, val, log_rows):
            break
    if skipped:
        log.warning("finetune %s: %d training rows were skipped (unreadable shards, see log)", variant, skipped)
    run.model.load_state_dict(load_checkpoint(run.best)["model"])
    summary = {"variant": run.arm, "config_fingerprint": run.config_fp, "best_val_accuracy": run.state.best,
               "epochs": run.state.epoch, "steps": run.state.step, "skipped_rows": skipped}
    if run.world.is_main:
        summary.update(write_test_predictions(run, shards.split("test"), shards.fingerprint))
        summary = _commit_summary(run, summary, list(wanted))
    return summary


def _commit_summary(run: Run, summary: dict, tested_on: list) -> dict:
    summary = {**summary, "tested_on": list(tested_on)}
    write_json(run.ctx.work.finetune_summary(run.variant), summary)
    write_records(run, run.ctx.record(run.ctx.work.shards_manifest, "shards"), tested_on)
    return summary


def run_finetune(cfg: Config, variants=None, resume: bool = False) -> dict:
    """The ``finetune`` stage: V3 (original) and V4 (masked), and V4-<name> for each name in
    ``finetune.variants`` (overlay ablations)."""
    variants = [*IMAGE_VARIANTS, *cfg.finetune.variants] if variants is None else list(variants)
    with open_stage(cfg.workdir, f"finetune.rank{World.from_env().rank}", cfg.permissions) as ctx:
        return {variant_arm("finetune", v): train_variant(cfg, v, resume=resume, ctx=ctx) for v in variants}
