"""The shard stage: the parallel writer of HDF5 shards (schema v1, docs/shard-format.md).

The format and the reader live in ``shardset.py``; only this module needs joblib and the renderer.

The stage is share-nothing: the parent cuts the cohort into a deterministic plan of contiguous row
blocks (``<split>-NNNNN.h5``), each joblib task renders one whole block into its own temporary file
and renames it when complete, then writes a small sidecar ``<shard>.json`` (ids, rejects, sha256).
The parent writes ``index.csv``, ``rejects.csv`` and, last, ``manifest.json``: the commit point.
A rerun skips shards whose sidecar and checksum agree with the plan and redoes the others.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pandas as pd
from joblib import Parallel, delayed, parallel_config
from tqdm import tqdm

from ._io import atomic_path, cap_threads, file_sha256, read_json, remove_stale_tmp, stable_hash, write_csv, write_json
from ._version import __version__
from .cohort_files import load_cohort, read_rle_rows
from .config import Config, RenderConfig
from .render import GEOMETRY_FIELDS, RenderError, render_image
from .shardset import SCHEMA, SCHEMA_VERSION, ShardError, validate_shard
from .sources.chexmask import MASK_NAMES
from .sources.mimic import FINDINGS_ALL
from .workdir import Workdir

log = logging.getLogger(__name__)
# called in the worker with (shard name, temporary path) after a shard is written and before it is
# renamed into place: the resume tests kill the worker there
WrittenHook = Callable[[str, Path], None]


@dataclass(frozen=True)
class ShardTask:
    name: str
    split: str
    rows: tuple  # cohort row numbers
    fingerprint: str


def render_fingerprint(cfg: Config) -> str:
    return stable_hash({"render": cfg.to_dict()["render"], "schema_version": SCHEMA_VERSION})


def plan_shards(cohort: pd.DataFrame, rows_per_shard: int, render_fp: str,
                cohort_fp: str) -> list[ShardTask]:
    """Deterministic plan: contiguous cohort rows, one split per shard, numbered per split."""
    tasks = []
    for split in ("train", "val", "test"):
        rows = np.flatnonzero(cohort["split"].to_numpy() == split)
        for k, start in enumerate(range(0, len(rows), rows_per_shard)):
            block = rows[start:start + rows_per_shard]
            ids = cohort["dicom_id"].to_numpy()[block].tolist()
            fp = stable_hash({"ids": ids, "render": render_fp, "cohort": cohort_fp})
            tasks.append(ShardTask(f"{split}-{k:05d}.h5", split, tuple(int(r) for r in block), fp))
    return tasks


def _write_shard(path: Path, items: list[dict], records: list[dict], attrs: dict, classes) -> None:
    n, size = len(items), attrs["size"]
    with h5py.File(path, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value if not isinstance(value, (dict, list)) else json.dumps(value)
        # images: contiguous and uncompressed, so that readers can memory-map them (zero-copy
        # row gathers, ShardSet.view); masks: chunked per row and gzip (they compress ~50x)
        original = f.create_dataset("original", (n, size, size), np.uint8)  # contiguous
        masked = f.create_dataset("masked", (n, size, size, 3), np.uint8)  # contiguous
        masks = f.create_dataset("masks", (n, 3, size, size), np.uint8, chunks=(1, 3, size, size) if n else None,
                                 compression="gzip" if n else None, compression_opts=1 if n else None)
        for i, item in enumerate(items):  # row by row: no second copy of the shard in memory
            original[i] = item["original"]
            masked[i] = item["masked"]
            masks[i] = item["masks"]
        f["labels"] = np.array([[r[c] for c in FINDINGS_ALL] for r in records], np.float32).reshape(n, 14)
        f["targets"] = np.array([[r[f"target_{c}"] for c in classes] for r in records],
                                np.float32).reshape(n, len(classes))
        f["dicom_id"] = np.array([r["dicom_id"] for r in records], dtype="S44")
        f["subject_id"] = np.array([r["subject_id"] for r in records], np.int64)
        f["study_id"] = np.array([r["study_id"] for r in records], np.int64)
        f["mask_quality"] = np.array([r["quality_mean"] for r in records], np.float32)
        f["geometry"] = np.array([it["geometry"].as_array() for it in items], np.float32
                                 ).reshape(n, len(GEOMETRY_FIELDS))


def render_shard(task: ShardTask, records: list[dict], mimic_root: str, rle_path: str,
                 render_cfg: dict, classes: list, out_dir: str, attrs: dict,
                 on_written: WrittenHook | None = None) -> dict:
    """Render one planned shard (runs in a worker): returns its sidecar record."""
    cap_threads(1)
    render = RenderConfig(**render_cfg)
    rles = read_rle_rows(Path(rle_path), task.rows)
    items, kept, rejects = [], [], []
    for rec in records:
        path = Path(mimic_root) / rec["path"]
        try:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise RenderError("JPEG not found") from None
            mask = rles[rec["dicom_id"]]
            item = render_image(data, mask, mask["shape"], render)
        except RenderError as exc:
            rejects.append({"id": rec["dicom_id"], "stage": "shards", "reason": f"{exc} ({rec['path']})"})
            continue
        items.append(item)
        kept.append(rec)
    out = Path(out_dir) / task.name
    with atomic_path(out) as tmp:
        _write_shard(tmp, items, kept, {**attrs, "split": task.split}, classes)
        if on_written is not None:
            on_written(task.name, tmp)
    sidecar = {"name": task.name, "split": task.split, "fingerprint": task.fingerprint,
               "render_fingerprint": attrs["render_fingerprint"], "render_config": render_cfg,
               "rows": len(kept), "bytes": out.stat().st_size, "sha256": file_sha256(out),
               "dicom_id": [r["dicom_id"] for r in kept], "rejects": rejects}
    write_json(out.with_suffix(".json"), sidecar)
    return sidecar


def _backend_context(cfg: Config):
    """joblib backend: loky here, or the same tasks on a Dask cluster (docs/pipeline.md)."""
    backend = cfg.shards.backend
    if backend == "dask":
        from dask.distributed import Client, LocalCluster  # optional: the `dask` extra
        if cfg.shards.dask_scheduler:
            client = Client(cfg.shards.dask_scheduler)
        else:
            client = Client(LocalCluster(n_workers=cfg.shards.n_jobs, threads_per_worker=1,
                                         processes=True, host="127.0.0.1", dashboard_address=None))
        return client, parallel_config(backend="dask")
    if backend == "sequential":
        return None, parallel_config(backend="sequential")
    return None, parallel_config(backend=backend, n_jobs=cfg.shards.n_jobs)


def build_shards(cfg: Config, progress: bool = True, on_written: WrittenHook | None = None) -> dict:
    """Run (or resume) the shard stage for ``cfg``; returns the manifest."""
    work = Workdir(cfg.workdir)
    out = work.shards_dir
    cohort = load_cohort(work)  # raises unless the cohort stage finished
    cohort_fp = read_json(work.cohort_manifest)["fingerprint"]
    render_fp = render_fingerprint(cfg)
    _refuse_mixing(out, render_fp, cfg)
    out.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_tmp(out)
    if stale:
        log.warning("shards: removed %d temporary file(s) left by an interrupted run", stale)
    tasks = plan_shards(cohort, cfg.shards.rows_per_shard, render_fp, cohort_fp)
    done, pending = {}, []
    for task in tasks:
        sidecar_path = (out / task.name).with_suffix(".json")
        if sidecar_path.exists():
            sidecar = read_json(sidecar_path)
            try:
                if sidecar.get("fingerprint") != task.fingerprint:
                    raise ShardError(f"{task.name}: planned rows or config changed")
                validate_shard(out / task.name, sidecar)
                done[task.name] = sidecar
                continue
            except ShardError as exc:
                log.warning("shards: rebuilding %s (%s)", task.name, exc)
                sidecar_path.unlink()
        pending.append(task)
    for old in set(p.name for p in out.glob("*.h5")) - {t.name for t in tasks}:
        log.warning("shards: %s is not in the plan; removing it", old)
        (out / old).unlink()
        (out / old).with_suffix(".json").unlink(missing_ok=True)
    log.info("shards: %d planned, %d complete, %d to render", len(tasks), len(done), len(pending))
    attrs = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "label_names": list(FINDINGS_ALL),
             "mask_names": list(MASK_NAMES), "target_names": list(cfg.cohort.classes),
             "geometry_fields": list(GEOMETRY_FIELDS), "render_config": cfg.to_dict()["render"],
             "render_fingerprint": render_fp, "cohort_fingerprint": cohort_fp,
             "size": cfg.render.size, "created_with": f"radacx-cache {__version__}"}
    records = cohort.to_dict("records")
    if pending:
        client, context = _backend_context(cfg)
        try:
            with context:
                jobs = (delayed(render_shard)(t, [records[r] for r in t.rows], cfg.archive.mimic_root,
                                              str(work.masks_rle), cfg.to_dict()["render"],
                                              list(cfg.cohort.classes), str(out), attrs, on_written)
                        for t in pending)
                bar = tqdm(total=sum(len(t.rows) for t in pending), desc="shards", unit="img",
                           disable=not progress)
                for sidecar in Parallel(n_jobs=cfg.shards.n_jobs, return_as="generator_unordered")(jobs):
                    done[sidecar["name"]] = sidecar
                    bar.update(sidecar["rows"] + len(sidecar["rejects"]))
                bar.close()
        finally:
            if client is not None:
                client.close()
    return _commit(out, tasks, done, attrs, cohort)


def _refuse_mixing(out: Path, render_fp: str, cfg: Config) -> None:
    """A shard folder built with another render config is never silently mixed with this one."""
    for path in sorted(out.glob("*.json")):
        entry = read_json(path)
        if entry.get("render_fingerprint", render_fp) != render_fp:
            raise ShardError(
                f"{out} holds shards rendered with another render config ({path.name}: "
                f"{json.dumps(entry.get('render_config'))}); this run asks for "
                f"{json.dumps(cfg.to_dict()['render'])}. Use another workdir (--set workdir=...) "
                f"or delete {out} to rebuild.")


def _commit(out: Path, tasks: list[ShardTask], done: dict, attrs: dict, cohort: pd.DataFrame) -> dict:
    """index.csv, rejects.csv, then manifest.json (the commit point) for the finished shards."""
    rows, rejects, shards = [], [], []
    for task in tasks:
        sc = done[task.name]
        shards.append({k: sc[k] for k in ("name", "split", "rows", "bytes", "sha256", "fingerprint")})
        rows += [{"shard": task.name, "row": i, "dicom_id": d, "split": task.split}
                 for i, d in enumerate(sc["dicom_id"])]
        rejects += sc["rejects"]
    index = pd.DataFrame(rows, columns=["shard", "row", "dicom_id", "split"])
    # ids, targets, multi-hot positives and uncertain flags as the cohort stated them (the shards'
    # own `targets` come from the same rows)
    label_cols = [f"{kind}_{c}" for kind in ("target", "positive", "uncertain") for c in attrs["target_names"]]
    index = index.merge(cohort[["dicom_id", "subject_id", "study_id", *label_cols]], on="dicom_id",
                        how="left", validate="one_to_one")
    write_csv(out / "index.csv", index)
    write_csv(out / "rejects.csv", pd.DataFrame(rejects, columns=["id", "stage", "reason"]))
    manifest = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "shards": shards,
                "rows": len(index), "rejects": len(rejects),
                "render_config": attrs["render_config"], "render_fingerprint": attrs["render_fingerprint"],
                "cohort_fingerprint": attrs["cohort_fingerprint"], "target_names": attrs["target_names"],
                "fingerprint": stable_hash([s["sha256"] for s in shards]),
                "created_with": attrs["created_with"]}
    write_json(out / "manifest.json", manifest)
    log.info("shards: %d images in %d shards, %d rejected", len(index), len(shards), len(rejects))
    return manifest
