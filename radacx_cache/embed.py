"""Feature cache: the frozen image encoder over the shards, once (docs/cache-format.md).

``features/<model-tag>/<variant>.h5`` holds ``features`` (N, D) (the projected embedding),
``pre_projection`` (N, W) where the vision tower exposes it, ``dicom_id`` aligned with
``shards/index.csv``, and attributes with the fingerprints (model, shard set, preprocessing).
The file is built as ``.<variant>.h5.partial`` in blocks (a ``row_done`` flag per row, so an
interrupted run continues where it stopped) and renamed into place when complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from ._io import stable_hash
from .config import Config
from .shards import VARIANTS, ShardSet, open_shards

log = logging.getLogger(__name__)
CACHE_SCHEMA = "radacx-features"
CACHE_VERSION = 1


class FeatureCacheError(RuntimeError):
    """A feature cache does not match what was asked for, or is unreadable."""


def preprocess_spec(model) -> dict:
    return {"mean": list(model.mean), "std": list(model.std), "size": model.image_size,
            "input": "uint8 shard pixels / 255, grey repeated to RGB, (x - mean) / std, no resampling"}


def cache_fingerprints(model, shards: ShardSet, variant: str) -> dict:
    return {"model": model.fingerprint, "model_spec": model.spec, "shards": shards.fingerprint,
            "preprocess": stable_hash(preprocess_spec(model)), "variant": variant,
            "schema_version": CACHE_VERSION}


def check_fingerprints(path: Path, expected: dict) -> None:
    with h5py.File(path, "r") as f:
        found = json.loads(f.attrs.get("fingerprints", "{}"))
    diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if diff:
        what = "; ".join(f"{k}: cache has {a!r}, asked for {b!r}" for k, (a, b) in diff.items())
        raise FeatureCacheError(f"{path} was built differently ({what}). Delete it to rebuild, or use "
                                f"the model/shards it was built from.")


class FeatureCache:
    """Read side of a finished cache: features, ids and fingerprints, checked on open."""

    def __init__(self, path: str | Path, expected: dict | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FeatureCacheError(f"{self.path}: no feature cache (run `radacx embed` first)")
        if expected:
            check_fingerprints(self.path, expected)
        with h5py.File(self.path, "r") as f:
            if f.attrs.get("schema") != CACHE_SCHEMA:
                raise FeatureCacheError(f"{self.path}: not a {CACHE_SCHEMA} file")
            self.fingerprints = json.loads(f.attrs["fingerprints"])
            self.dicom_id = f["dicom_id"][:].astype(str)
            self.features = f["features"][:]
            self.pre_projection = f["pre_projection"][:] if "pre_projection" in f else None
        if not np.isfinite(self.features).all():
            bad = int((~np.isfinite(self.features)).any(1).sum())
            raise FeatureCacheError(f"{self.path}: {bad} rows hold NaN/inf features")

    def get(self, kind: str = "features") -> np.ndarray:
        if kind == "pre_projection" and self.pre_projection is None:
            raise FeatureCacheError(f"{self.path}: no pre_projection features for this model")
        return self.features if kind == "features" else self.pre_projection


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device):
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class _Blocks(torch.utils.data.Dataset):
    """One item = one contiguous run of rows of one shard (bulk HDF5 read in the worker)."""

    def __init__(self, shards: ShardSet, variant: str, runs: list):
        self.shards, self.variant, self.runs = shards, variant, runs

    def __len__(self):
        return len(self.runs)

    def __getitem__(self, i):
        shard, start, stop, positions = self.runs[i]
        pixels = self.shards.read(shard, self.variant, start, stop)
        return torch.from_numpy(np.ascontiguousarray(pixels)), torch.from_numpy(np.array(positions))


def _worker_init(_):
    torch.set_num_threads(1)


def unit_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) grey or (B, H, W, 3) RGB -> float (B, 3, H, W) in [0, 1]."""
    x = pixels.float().div_(255)
    return x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def to_model_input(pixels: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """Shard pixels on the device -> the model's normalised input (B, 3, H, W); no resampling."""
    x = normalise(unit_pixels(pixels), mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def autocast(device: torch.device, dtype):
    """bf16/fp16 autocast on the device, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _encode(encoder, x: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    with autocast(x.device, dtype):
        feat, pre = encoder(x)
    return feat.float(), (pre.float() if pre is not None else None)


def embed_variant(cfg: Config, model, shards: ShardSet, variant: str, *, rank: int = 0,
                  world: int = 1, progress: bool = True) -> Path:
    """Build (or resume, or confirm) one variant's cache; returns its path.

    With ``world > 1`` (torchrun) rank ``r`` computes blocks ``b % world == r`` into its own
    partial file; ``merge_rank_partials`` then joins them into one cache.
    """
    e = cfg.embed
    out_dir = cfg.work / "features" / model.tag
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{variant}.h5"
    fps = cache_fingerprints(model, shards, variant)
    if final.exists():
        check_fingerprints(final, fps)
        log.info("embed: %s is up to date", final)
        return final
    partial = out_dir / (f".{variant}.h5.partial" if world == 1 else f".{variant}.rank{rank}of{world}.partial")
    n = len(shards)
    blocks = list(shards.blocks(e.block_rows))
    device = resolve_device(e.device)
    dtype = autocast_dtype(e.precision, device)
    net = model.model.to(device).eval()
    if e.channels_last and device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    encoder = model.encode_image_parts
    if e.compile:
        encoder = torch.compile(encoder)
    with torch.inference_mode():  # one blank image tells the output widths
        blank = to_model_input(torch.zeros(1, model.image_size, model.image_size, dtype=torch.uint8,
                                           device=device), model.mean, model.std)
        f0, p0 = _encode(encoder, blank, dtype)
    dim, pdim = f0.shape[1], (p0.shape[1] if p0 is not None else 0)
    if partial.exists():
        try:
            check_fingerprints(partial, fps)
        except (FeatureCacheError, OSError) as exc:
            log.warning("embed: discarding partial cache %s (%s)", partial, exc)
            partial.unlink()
    if not partial.exists():
        with h5py.File(partial, "w") as f:
            f.attrs["schema"] = CACHE_SCHEMA
            f.attrs["schema_version"] = CACHE_VERSION
            f.attrs["fingerprints"] = json.dumps(fps, sort_keys=True)
            f.attrs["preprocess"] = json.dumps(preprocess_spec(model))
            f.attrs["model_spec"] = model.spec
            f.create_dataset("features", (n, dim), np.float32)
            if pdim:
                f.create_dataset("pre_projection", (n, pdim), np.float32)
            f["dicom_id"] = shards.index["dicom_id"].to_numpy().astype("S44")
            f.create_dataset("row_done", (n,), bool)
    with h5py.File(partial, "r") as f:
        row_done = f["row_done"][:]
    # resume by rows, not block numbers: a changed embed.block_rows cannot misplace anything
    todo = [i for i, blk in enumerate(blocks) if not row_done[blk[3]].all() and i % world == rank]
    runs = []  # split blocks into batches so that a DataLoader item is one batch
    for b in todo:
        shard, start, stop, pos = blocks[b]
        for s in range(start, stop, e.batch_size):
            t = min(s + e.batch_size, stop)
            runs.append((b, (shard, s, t, pos[s - start:t - start])))
    loader = torch.utils.data.DataLoader(
        _Blocks(shards, variant, [r for _, r in runs]), batch_size=None, shuffle=False,
        num_workers=e.num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if e.num_workers else None,
        persistent_workers=False, prefetch_factor=4 if e.num_workers else None)
    bar = tqdm(total=sum(len(r[3]) for _, r in runs), desc=f"embed {variant}", unit="img",
               disable=not progress)
    batch_size = e.batch_size
    pending_block, feats, pres, poss = None, [], [], []
    t0 = time.perf_counter()
    with h5py.File(partial, "r+") as f, torch.inference_mode():
        def flush(block):
            if block is None or not poss:
                return
            pos = np.concatenate(poss)
            order = np.argsort(pos)
            f["features"][pos[order]] = np.concatenate(feats)[order]
            if pdim:
                f["pre_projection"][pos[order]] = np.concatenate(pres)[order]
            f["row_done"][pos[order]] = True
            f.flush()
            feats.clear(), pres.clear(), poss.clear()
        for (block, _), (pixels, positions) in zip(runs, loader):
            if block != pending_block:
                flush(pending_block)
                pending_block = block
            pixels = pixels.to(device, non_blocking=True)
            outs = []
            start = 0
            while start < len(pixels):  # back off the batch size on an out-of-memory batch
                chunk = pixels[start:start + batch_size]
                try:
                    x = to_model_input(chunk, model.mean, model.std, e.channels_last and device.type == "cuda")
                    outs.append(_encode(encoder, x, dtype))
                    start += len(chunk)
                except torch.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    batch_size = max(1, batch_size // 2)
                    torch.cuda.empty_cache()
                    log.warning("embed: out of memory; batch size lowered to %d", batch_size)
            feats.append(torch.cat([o[0] for o in outs]).cpu().numpy())
            if pdim:
                pres.append(torch.cat([o[1] for o in outs]).cpu().numpy())
            poss.append(positions.numpy())
            bar.update(len(pixels))
        flush(pending_block)
    bar.close()
    elapsed = time.perf_counter() - t0
    if runs:
        log.info("embed %s: %d images in %.1fs (%.0f img/s on %s)", variant, bar.n, elapsed,
                 bar.n / max(elapsed, 1e-9), device)
    if world > 1:
        return partial
    with h5py.File(partial, "r") as f:
        if not f["row_done"][:].all():
            raise FeatureCacheError(f"{partial}: not every row was computed")
    os.replace(partial, final)
    return final


def merge_rank_partials(out_dir: Path, variant: str, world: int) -> Path:
    """Join the per-rank partial files of a torchrun job into one cache (rank 0 calls this)."""
    parts = [out_dir / f".{variant}.rank{r}of{world}.partial" for r in range(world)]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise FeatureCacheError(f"cannot merge: missing rank file(s) {[str(p) for p in missing]}")
    final = out_dir / f"{variant}.h5"
    tmp = out_dir / f".{variant}.h5.merging"
    with h5py.File(parts[0], "r") as first, h5py.File(tmp, "w") as out:
        for k, v in first.attrs.items():
            out.attrs[k] = v
        for name in ("features", "pre_projection", "dicom_id"):
            if name in first:
                out.create_dataset(name, data=first[name][:])
        done = first["row_done"][:].copy()
        for p in parts[1:]:
            with h5py.File(p, "r") as f:
                if f.attrs["fingerprints"] != first.attrs["fingerprints"]:
                    raise FeatureCacheError(f"{p}: fingerprints differ from rank 0's")
                mine = np.flatnonzero(f["row_done"][:])
                done[mine] = True
                for name in ("features", "pre_projection"):
                    if name in f:
                        out[name][mine] = f[name][mine]
        if not done.all():
            raise FeatureCacheError(f"cannot merge {variant}: rows {np.flatnonzero(~done)[:10]} missing")
        out.create_dataset("row_done", data=done)
    os.replace(tmp, final)
    for p in parts:
        p.unlink()
    return final


def embed_all(cfg: Config, variants=VARIANTS, progress: bool = True) -> dict:
    """The ``embed`` stage: both variants, one model. Under torchrun each rank takes its blocks."""
    from .models import load_model
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and cfg.embed.device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    shards = open_shards(cfg.work / "shards")
    shards.validate()
    model = load_model(cfg.embed.model, seed=cfg.seed)
    paths = {}
    for variant in variants:
        paths[variant] = str(embed_variant(cfg, model, shards, variant, rank=rank, world=world,
                                           progress=progress and rank == 0))
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        dist.barrier()
        if rank == 0:
            for variant in variants:
                final = cfg.work / "features" / model.tag / f"{variant}.h5"
                if not final.exists():
                    paths[variant] = str(merge_rank_partials(final.parent, variant, world))
        dist.barrier()
    return {"model": model.spec, "tag": model.tag, "features": paths}


def feature_path(cfg: Config, model_tag: str, variant: str) -> Path:
    return cfg.work / "features" / model_tag / f"{variant}.h5"
