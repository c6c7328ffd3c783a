"""The embed stage: the frozen image encoder over the shards, once, into feature caches.

A cache is built as a partial file (``Workdir.features_partial``) in blocks, with a ``row_done``
flag per row so that an interrupted run continues where it stopped, and renamed into place when
every row is written. Under torchrun each rank computes its share of blocks into its own partial
file and rank 0 merges them (``merge_rank_partials``).
"""
from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from .._io import atomic_path, progress_bar, refuse_links_below_root
from ..config import Config
from ..formats.context import StageContext, open_stage
from ..formats.features import (FeatureCache, FeatureCacheError, FingerprintMismatch, bad_rows, cache_fingerprints,
                                check_fingerprints, content_sha256, create_partial)
from ..formats.hdf5 import check_shape, open_checked
from ..formats.records import Verifier, write_record
from ..formats.shard import ShardError, ShardSet
from ..formats.stream import ordered_loader, ordered_runs
from ..models import LoadedModel, load_model
from ..runtime import autocast, autocast_dtype, barrier, init_distributed
from ..workdir import Workdir

log = logging.getLogger(__name__)


def _encode(encoder, x: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    with autocast(x.device, dtype):
        feat, pre = encoder(x)
    return feat.float(), (pre.float() if pre is not None else None)


class _Encoder:
    """The model on its device, with the batch size it can afford (halved on out-of-memory)."""

    def __init__(self, model: LoadedModel, cfg: Config, device: torch.device):
        rt = cfg.runtime
        self.model, self.device = model, device
        self.dtype = autocast_dtype(rt.precision, device)
        self.channels_last = rt.channels_last and device.type == "cuda"
        net = model.model.to(device).eval()
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        self.fn = torch.compile(model.encode_image_parts) if rt.compile else model.encode_image_parts
        self.batch_size = cfg.embed.batch_size

    def widths(self) -> tuple[int, int]:
        """(embedding width, pre-projection width or 0), from one blank image."""
        size = self.model.image_size
        with torch.inference_mode():
            f0, p0 = _encode(self.fn, self.model.to_input(
                torch.zeros(1, size, size, dtype=torch.uint8, device=self.device)), self.dtype)
        return f0.shape[1], (p0.shape[1] if p0 is not None else 0)

    def __call__(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Features of a batch of uint8 pixels; backs the batch size off on an out-of-memory error."""
        outs, start = [], 0
        while start < len(pixels):
            chunk = pixels[start:start + self.batch_size]
            try:
                outs.append(_encode(self.fn, self.model.to_input(chunk, self.channels_last), self.dtype))
                start += len(chunk)
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                torch.cuda.empty_cache()
                log.warning("embed: out of memory; batch size lowered to %d", self.batch_size)
        feats = torch.cat([o[0] for o in outs]).cpu().numpy()
        pres = torch.cat([o[1] for o in outs]).cpu().numpy() if outs[0][1] is not None else None
        return feats, pres


def open_or_resume(partial: Path, fps: dict, encoder: _Encoder, shards: ShardSet) -> np.ndarray:
    """Create the partial cache, or keep a matching one; returns its ``row_done`` flags."""
    if partial.is_symlink():  # planted: never written through
        log.warning("embed: removing %s (a link, not a partial cache this stage wrote)", partial)
        partial.unlink()
    refuse_links_below_root(partial.parent)
    if partial.exists():
        try:
            check_fingerprints(partial, fps)
            return _row_done(partial, len(shards))
        except FingerprintMismatch as exc:  # built for another model or shard set: not this run's work
            log.warning("embed: discarding partial cache %s (%s)", partial, exc)
            partial.unlink()
        except Exception as exc:  # noqa: BLE001  damaged (a full disk, a killed writer): kept aside, rebuilt
            aside = partial.with_name(partial.name + ".damaged")
            os.replace(partial, aside)
            log.warning("embed: %s is damaged (%s: %s); moved aside to %s and rebuilt", partial,
                        type(exc).__name__, " ".join(str(exc).split())[:160], aside.name)
    create_partial(partial, fps, encoder.model, shards, *encoder.widths())
    return _row_done(partial, len(shards))


def _row_done(partial: Path, rows: int) -> np.ndarray:
    """The partial cache's ``row_done`` flags, read only if they have the shard set's length."""
    with open_checked(partial) as f:
        check_shape(partial, f["row_done"], rows=rows, tail=())
        return f["row_done"][:]


def pending_runs(shards: ShardSet, row_done: np.ndarray, *, batch_size: int, block_rows: int,
                 rank: int = 0, world: int = 1) -> list[tuple]:
    """This rank's runs of blocks with a row still to compute (by rows, so that a changed
    ``block_rows`` cannot misplace anything); a block is never split across ranks."""
    return [(b, run) for b, run in ordered_runs(shards, batch_size, block_rows)
            if b % world == rank and not row_done[run[3]].all()]


def write_rows(f: h5py.File, positions: np.ndarray, feats: np.ndarray, pres: np.ndarray | None) -> None:
    """Write one block's rows in position order and mark them done (flushed: a crash keeps them)."""
    order = np.argsort(positions)
    pos = positions[order]
    f["features"][pos] = feats[order]
    if pres is not None:
        f["pre_projection"][pos] = pres[order]
    f["row_done"][pos] = True
    f.flush()


def _compute(partial: Path, runs: list[tuple], encoder: _Encoder, shards: ShardSet, variant: str,
             num_workers: int, progress: bool) -> None:
    """Encode ``runs`` into ``partial``, one block's rows written at a time."""
    loader = ordered_loader(shards, variant, [r for _, r in runs], num_workers=num_workers,
                            pin_memory=encoder.device.type == "cuda")
    bar = progress_bar(total=sum(len(r[3]) for _, r in runs), desc=f"embed {variant}", unit="img", enabled=progress)
    block, parts, done = None, [], 0  # counted here: a disabled bar (no terminal) counts nothing
    t0 = time.perf_counter()

    def flush():
        if parts:
            write_rows(f, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                       np.concatenate([p[2] for p in parts]) if parts[0][2] is not None else None)
            parts.clear()
    with h5py.File(partial, "r+") as f, torch.inference_mode():
        for (b, _), (pixels, positions) in zip(runs, loader):
            if b != block:
                flush()
                block = b
            feats, pres = encoder(pixels.to(encoder.device, non_blocking=True))
            parts.append((positions.numpy(), feats, pres))
            bar.update(len(pixels))
            done += len(pixels)
        flush()
    bar.close()
    if runs:
        elapsed = time.perf_counter() - t0
        log.info("embed %s: %d images in %.1fs (%.0f img/s on %s)", variant, done, elapsed,
                 done / max(elapsed, 1e-9), encoder.device)


def embed_variant(cfg: Config, model: LoadedModel, shards: ShardSet, variant: str, *, rank: int = 0,
                  world: int = 1, progress: bool = True, device: torch.device | None = None) -> Path:
    """Build (or resume, or confirm) one image variant's cache; returns its path.

    With ``world > 1`` (torchrun) rank ``r`` computes blocks ``b % world == r`` into its own
    partial file; ``merge_rank_partials`` then joins them into one cache.
    """
    work = Workdir(cfg.workdir)
    final = work.features(model.tag, variant)
    final.parent.mkdir(parents=True, exist_ok=True)
    fps = cache_fingerprints(model, shards, variant)
    if final.exists():
        try:
            found = FeatureCache(final).fingerprints  # safe to open, bounded, checksum and rows verified
        except FeatureCacheError as exc:  # damaged after commit: set aside (not deleted) and rebuilt
            aside = final.with_name(f".{final.name}.damaged")
            os.replace(final, aside)
            log.warning("embed: %s failed verification (%s); moved to %s and rebuilt", final, exc, aside)
        else:
            redefined = found.get("variant_spec") != fps.get("variant_spec") and \
                {**found, "variant_spec": None} == {**fps, "variant_spec": None}
            if redefined and "variant_spec" in fps:  # render.variants.<name> was given other settings
                aside = final.with_name(f".{final.name}.superseded")
                os.replace(final, aside)
                log.warning("embed: %s holds variant %r as it was defined before; moved to %s and rebuilt",
                            final, variant, aside)
            else:
                check_fingerprints(final, fps)  # another model or shard set: refused, never reused
                log.info("embed: %s is up to date", final)
                return final
    partial = work.features_partial(model.tag, variant, rank, world)
    encoder = _Encoder(model, cfg, device or init_distributed(cfg.runtime.device)[1])
    row_done = open_or_resume(partial, fps, encoder, shards)
    runs = pending_runs(shards, row_done, batch_size=cfg.embed.batch_size, block_rows=cfg.embed.block_rows,
                        rank=rank, world=world)
    _compute_or_explain(partial, runs, encoder, shards, variant, cfg.embed.num_workers, progress)
    if world > 1:
        return partial
    redo = verify_partial(partial)
    if len(redo):  # rows marked done that hold no embedding (a crash between write and flush): redone once
        log.warning("embed: %d row(s) of %s were marked done but hold no embedding; recomputing them", len(redo), partial)
        runs = pending_runs(shards, ~np.isin(np.arange(len(shards)), redo), batch_size=cfg.embed.batch_size,
                            block_rows=cfg.embed.block_rows)
        _compute_or_explain(partial, runs, encoder, shards, variant, cfg.embed.num_workers, progress)
        if len(verify_partial(partial)):
            raise FeatureCacheError(f"{partial}: rows still empty after recomputing them; not committed")
    commit_cache(partial, final)
    return final


def _compute_or_explain(partial: Path, runs, encoder, shards, variant, num_workers, progress) -> None:
    try:
        _compute(partial, runs, encoder, shards, variant, num_workers, progress)
    except OSError as exc:
        if exc.errno == errno.ENOSPC or "No space left" in str(exc):
            raise FeatureCacheError(f"disk full while writing {partial}; free space and rerun `radacx embed`: the rows "
                                    f"written and flushed so far are kept, nothing was committed") from None
        raise


def verify_partial(partial: Path) -> np.ndarray:
    """Positions of rows that are not done, or done but empty / non-finite (all must be redone)."""
    with h5py.File(partial, "r") as f:
        done = f["row_done"][:]
        bad = bad_rows(f["features"][:])
    redo = np.flatnonzero(~done | bad)
    with h5py.File(partial, "r+") as f:
        f["row_done"][redo] = False
    return redo


def commit_cache(partial: Path, final: Path) -> None:
    """Stamp the content checksum, flush, and rename into place: the commit point of a cache."""
    with h5py.File(partial, "r+") as f:
        ids = f["dicom_id"][:].astype(str)
        pre = f["pre_projection"][:] if "pre_projection" in f else None
        f.attrs["content_sha256"] = content_sha256(ids, f["features"][:], pre)
        f.flush()
    with open(partial, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, final)


def merge_rank_partials(work: Workdir, model_tag: str, variant: str, world: int) -> Path:
    """Join the per-rank partial files of a torchrun job into one cache (rank 0 calls this)."""
    parts = [work.features_partial(model_tag, variant, r, world) for r in range(world)]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise FeatureCacheError(f"cannot merge: missing rank file(s) {[str(p) for p in missing]}")
    final = work.features(model_tag, variant)
    with h5py.File(parts[0], "r") as first, atomic_path(final) as tmp, h5py.File(tmp, "w") as out:
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
        if bad_rows(out["features"][:]).any():
            raise FeatureCacheError(f"cannot merge {variant}: rows {np.flatnonzero(bad_rows(out['features'][:]))[:10]} "
                                    f"hold no embedding; rerun `radacx embed`")
        out.create_dataset("row_done", data=done)
        pre = out["pre_projection"][:] if "pre_projection" in out else None
        out.attrs["content_sha256"] = content_sha256(out["dicom_id"][:].astype(str), out["features"][:], pre)
    for p in parts:
        p.unlink()
    return final


def embed_all(cfg: Config, variants=None, progress: bool = True) -> dict:
    """The ``embed`` stage: every image variant of the shard set (original, masked and the derived
    ones of ``variants.json``; or ``variants``), one model. Under torchrun each rank takes its blocks."""
    world, device = init_distributed(cfg.runtime.device)
    with open_stage(cfg.workdir, f"embed.rank{world.rank}", cfg.permissions) as ctx:
        return _embed_all(cfg, ctx, variants, progress, world, device)


def _embed_all(cfg: Config, ctx: StageContext, variants, progress: bool, world, device) -> dict:
    work, verifier, shards = ctx.work, ctx.verifier, ctx.shards
    model = load_model(cfg.model.spec, seed=cfg.seed)
    if shards.render_config["size"] != model.image_size:
        raise ShardError(f"{work.shards_manifest}: shards are {shards.render_config['size']} px, model "
                         f"{model.spec} takes {model.image_size} px; render the shards at render.size="
                         f"{model.image_size} (a new workdir) or choose another model")
    variants = shards.variants if variants is None else tuple(variants)
    for v in variants:
        shards.check_variant(v)
    paths = {v: str(embed_variant(cfg, model, shards, v, rank=world.rank, world=world.size,
                                  progress=progress and world.is_main, device=device)) for v in variants}
    if world.distributed:
        barrier(world)
        if world.is_main:
            for v in variants:
                if not work.features(model.tag, v).exists():
                    paths[v] = str(merge_rank_partials(work, model.tag, v, world.size))
        barrier(world)
    if world.is_main:
        write_features_record(work, model, verifier, shards)
    return {"model": model.spec, "tag": model.tag, "features": paths}


def write_features_record(work: Workdir, model: LoadedModel, verifier: Verifier, shards: ShardSet) -> None:
    """The embed stage's record: every committed cache of this model whose variant the shard set
    still serves, chained to the shard record (and to ``variants.json``, where derived variants are cached)."""
    folder = work.features_dir(model.tag)
    caches = [v for v in shards.variants if work.features(model.tag, v).exists()]
    ups = [verifier.record(work.shards_manifest, "shards")]
    if any(v in shards.derived for v in caches):
        ups.append(verifier.record(work.shards_variants, "variants"))
    write_record(work.features_record(model.tag), work.root, "embed", "radacx embed",
                 files=[work.features(model.tag, v).relative_to(folder).as_posix() for v in caches],
                 upstream=ups, variants=caches, variant_specs={v: shards.derived[v].as_dict() for v in caches
                                                                if v in shards.derived},
                 model_spec=model.spec, model_tag=model.tag,
                 model_fingerprint=model.fingerprint, weights_seed=model.weights_seed,
                 preprocess=model.preprocess_spec())
