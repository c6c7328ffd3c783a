"""HDF5 shards (schema v1, docs/shard-format.md): parallel writer, validation and reader.

The stage is share-nothing: the parent cuts the cohort into a deterministic plan of contiguous row
blocks (``<split>-NNNNN.h5``), each joblib task renders one whole block into its own temporary file
and renames it when complete, then writes a small sidecar ``<shard>.json`` (ids, rejects, sha256).
The parent writes ``index.csv``, ``rejects.csv`` and, last, ``manifest.json``: the commit point.
A rerun skips shards whose sidecar and checksum agree with the plan and redoes the others.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from joblib import Parallel, delayed, parallel_config
from tqdm import tqdm

from . import __version__
from ._io import (atomic_path, cap_threads, file_sha256, read_json, remove_stale_tmp, stable_hash,
                  write_csv, write_json)
from .config import FINDINGS_ALL, Config
from .render import GEOMETRY_FIELDS, RenderError, render_image
from .sources.chexmask import MASK_NAMES

log = logging.getLogger(__name__)
SCHEMA, SCHEMA_VERSION = "radacx-shard", 1
VARIANTS = ("original", "masked")
_FAULT_ENV = "RADACX_FAULT_KILL_SHARD"  # fault injection for the resume tests: worker dies here


class ShardError(RuntimeError):
    """A shard file or folder is invalid, incomplete or was built with another config."""


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
                 kill_at: str | None = None) -> dict:
    """Render one planned shard (runs in a worker): returns its sidecar record."""
    cap_threads(1)
    from .cohort import read_rle_rows
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
            item = render_image(data, mask, mask["shape"], size=render_cfg["size"],
                                mode=render_cfg["overlay"], colors=render_cfg["colors"],
                                line_width=render_cfg["line_width"], alpha=render_cfg["fill_alpha"],
                                draft=render_cfg["draft"], supersample=render_cfg["mask_supersample"])
        except RenderError as exc:
            rejects.append({"id": rec["dicom_id"], "stage": "shards", "reason": f"{exc} ({rec['path']})"})
            continue
        items.append(item)
        kept.append(rec)
    out = Path(out_dir) / task.name
    with atomic_path(out) as tmp:
        _write_shard(tmp, items, kept, {**attrs, "split": task.split}, classes)
        if kill_at == task.name:
            os._exit(17)  # simulate a worker killed mid-write: the temp file stays behind
    sidecar = {"name": task.name, "split": task.split, "fingerprint": task.fingerprint,
               "render_fingerprint": attrs["render_fingerprint"], "render_config": render_cfg,
               "rows": len(kept), "bytes": out.stat().st_size, "sha256": file_sha256(out),
               "dicom_id": [r["dicom_id"] for r in kept], "rejects": rejects}
    write_json(out.with_suffix(".json"), sidecar)
    return sidecar


def validate_shard(path: Path, expected: dict | None = None) -> None:
    """Raise ShardError naming the file and the reason if a shard is unusable."""
    if not path.exists():
        raise ShardError(f"{path}: shard file is missing")
    if expected is not None and path.stat().st_size != expected["bytes"]:
        raise ShardError(f"{path}: size {path.stat().st_size} != {expected['bytes']} bytes in its "
                         f"manifest entry (truncated or overwritten)")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema") != SCHEMA:
                raise ShardError(f"{path}: not a {SCHEMA} file (schema attribute {f.attrs.get('schema')!r})")
            version = int(f.attrs.get("schema_version", -1))
            if version != SCHEMA_VERSION:
                raise ShardError(f"{path}: schema_version {version}; this reader understands "
                                 f"{SCHEMA_VERSION}")
            n = f["dicom_id"].shape[0]
            for name in ("original", "masked", "masks", "labels", "geometry", "mask_quality"):
                if f[name].shape[0] != n:
                    raise ShardError(f"{path}: dataset {name} has {f[name].shape[0]} rows, dicom_id {n}")
    except ShardError:
        raise
    except Exception as exc:
        raise ShardError(f"{path}: cannot be read as HDF5 ({exc})") from None
    if expected is not None and expected.get("sha256") and file_sha256(path) != expected["sha256"]:
        raise ShardError(f"{path}: sha256 differs from its manifest entry (corrupted)")


def _backend_context(cfg: Config):
    """joblib backend: loky here, or the same tasks on a Dask / Ray cluster."""
    backend = cfg.shards.backend
    if backend == "dask":
        from dask.distributed import Client, LocalCluster
        if cfg.shards.dask_scheduler:
            client = Client(cfg.shards.dask_scheduler)
        else:
            client = Client(LocalCluster(n_workers=cfg.shards.n_jobs, threads_per_worker=1,
                                         processes=True, host="127.0.0.1", dashboard_address=None))
        return client, parallel_config(backend="dask")
    if backend == "ray":
        try:
            from ray.util.joblib import register_ray
        except ImportError:
            raise ShardError("shards.backend=ray needs Ray: pip install 'ray[default]'") from None
        register_ray()
        return None, parallel_config(backend="ray")
    if backend == "sequential":
        return None, parallel_config(backend="sequential")
    return None, parallel_config(backend=backend, n_jobs=cfg.shards.n_jobs)


def build_shards(cfg: Config, progress: bool = True) -> dict:
    """Run (or resume) the shard stage for ``cfg``; returns the manifest."""
    from .cohort import load_cohort
    out = cfg.work / "shards"
    cohort = load_cohort(cfg)  # raises unless the cohort stage finished
    cohort_fp = read_json(cfg.work / "cohort" / "manifest.json")["fingerprint"]
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
                                              str(cfg.work / "cohort" / "masks-rle.h5"),
                                              cfg.to_dict()["render"], list(cfg.cohort.classes), str(out),
                                              attrs, os.environ.get(_FAULT_ENV)) for t in pending)
                bar = tqdm(total=sum(len(t.rows) for t in pending), desc="shards", unit="img",
                           disable=not progress)
                for sidecar in Parallel(n_jobs=cfg.shards.n_jobs, return_as="generator_unordered")(jobs):
                    done[sidecar["name"]] = sidecar
                    bar.update(sidecar["rows"] + len(sidecar["rejects"]))
                bar.close()
        finally:
            if client is not None:
                client.close()
    return _commit(out, tasks, done, attrs)


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


def _commit(out: Path, tasks: list[ShardTask], done: dict, attrs: dict) -> dict:
    rows, rejects, shards = [], [], []
    for task in tasks:
        sc = done[task.name]
        shards.append({k: sc[k] for k in ("name", "split", "rows", "bytes", "sha256", "fingerprint")})
        rows += [{"shard": task.name, "row": i, "dicom_id": d, "split": task.split}
                 for i, d in enumerate(sc["dicom_id"])]
        rejects += sc["rejects"]
    index = pd.DataFrame(rows, columns=["shard", "row", "dicom_id", "split"])
    if len(index):
        labels = []
        for task in tasks:
            if done[task.name]["rows"]:
                with h5py.File(out / task.name, "r") as f:
                    t = f["targets"][:]
                    labels.append(np.column_stack([f["subject_id"][:], f["study_id"][:], t]))
        lab = np.vstack(labels)
        index["subject_id"] = lab[:, 0].astype(np.int64)
        index["study_id"] = lab[:, 1].astype(np.int64)
        for j, name in enumerate(attrs["target_names"]):
            index[f"target_{name}"] = lab[:, 2 + j]
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


class ShardSet:
    """Read access to a finished shard folder (``open_shards``).

    Item access by position (``shards[i]``) or by id (``shards.get(dicom_id)``), split views
    (``shards.split("test")``), block reads and a torch Dataset view. HDF5 handles are opened
    lazily per process, so a ShardSet can be handed to DataLoader workers.
    """

    def __init__(self, root: str | Path, index: pd.DataFrame | None = None, manifest: dict | None = None):
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if manifest is None:
            if not mpath.exists():
                raise ShardError(f"{self.root}: no manifest.json (the shard stage did not finish; "
                                 f"rerun `radacx shards` to complete it)")
            manifest = read_json(mpath)
            if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
                raise ShardError(f"{mpath}: schema {manifest.get('schema')} v{manifest.get('schema_version')}"
                                 f"; this reader understands {SCHEMA} v{SCHEMA_VERSION}")
        self.manifest = manifest
        if index is None:
            index = pd.read_csv(self.root / "index.csv", dtype={"dicom_id": str})
        self.index = index.reset_index(drop=True)
        self._handles: dict = {}
        self._pid = None
        self._by_id = None

    def __len__(self) -> int:
        return len(self.index)

    def validate(self, checksum: bool = False) -> None:
        """Check every shard against the manifest before a long job reads it.

        Size, schema and render config always (cheap); the sha256 too with ``checksum``. Raises
        ShardError naming the shard and the reason (a truncated file, a shard of another render
        config copied into the folder, ...).
        """
        for entry in self.manifest["shards"]:
            path = self.root / entry["name"]
            validate_shard(path, entry if checksum else {**entry, "sha256": None})
            with h5py.File(path, "r") as f:
                found = f.attrs.get("render_fingerprint")
            if found != self.manifest["render_fingerprint"]:
                raise ShardError(f"{path}: rendered with render config {found}, the folder's manifest says "
                                 f"{self.manifest['render_fingerprint']}; shards of different configs are "
                                 f"never mixed (rebuild the folder)")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None  # h5py handles never cross processes
        state.pop("_views", None)
        return state

    @property
    def target_names(self) -> list[str]:
        return list(self.manifest["target_names"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def file(self, shard: str) -> h5py.File:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = h5py.File(self.root / shard, "r")
        return self._handles[shard]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def split(self, name: str) -> "ShardSet":
        return ShardSet(self.root, self.index[self.index["split"] == name], self.manifest)

    def __getitem__(self, i: int) -> dict:
        row = self.index.iloc[int(i)]
        f = self.file(row["shard"])
        r = int(row["row"])
        out = {name: f[name][r] for name in ("original", "masked", "masks", "labels", "targets",
                                              "mask_quality", "geometry")}
        out.update(dicom_id=row["dicom_id"], subject_id=int(row["subject_id"]),
                   study_id=int(row["study_id"]), split=row["split"])
        return out

    def get(self, dicom_id: str) -> dict:
        if self._by_id is None:
            self._by_id = {d: i for i, d in enumerate(self.index["dicom_id"])}
        if dicom_id not in self._by_id:
            raise KeyError(f"dicom_id {dicom_id} is not in {self.root}")
        return self[self._by_id[dicom_id]]

    def blocks(self, max_rows: int):
        """(shard, start, stop, index positions): contiguous row runs for bulk reads."""
        for shard, grp in self.index.groupby("shard", sort=True):
            rows = grp["row"].to_numpy()
            pos = grp.index.to_numpy()
            cut = np.flatnonzero(np.diff(rows) != 1) + 1
            for r, p in zip(np.split(rows, cut), np.split(pos, cut)):
                for s in range(0, len(r), max_rows):
                    yield shard, int(r[s]), int(r[min(s + max_rows, len(r)) - 1]) + 1, p[s:s + max_rows]

    def read(self, shard: str, variant: str, start: int, stop: int) -> np.ndarray:
        if variant not in VARIANTS + ("masks",):
            raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
        return self.file(shard)[variant][start:stop]

    def view(self, shard: str, variant: str) -> np.ndarray:
        """A read-only memory map of a whole image dataset (zero-copy; opened lazily per process).

        Falls back to reading the dataset when it is chunked or compressed (shards written by
        other tools).
        """
        key = (os.getpid(), shard, variant)
        cache = self.__dict__.setdefault("_views", {})
        if key not in cache:
            ds = self.file(shard)[variant]
            offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
            if offset is None:
                cache[key] = ds[:]
            else:
                cache[key] = np.memmap(self.root / shard, dtype=ds.dtype, mode="r", offset=offset,
                                       shape=ds.shape)
        return cache[key]

    def targets(self) -> np.ndarray:
        return self.index[[f"target_{n}" for n in self.target_names]].to_numpy(np.float32)

    def torch_dataset(self, variant: str = "original"):
        from .stream import ShardMapDataset
        return ShardMapDataset(self, variant)


def open_shards(path: str | Path, split: str | None = None) -> ShardSet:
    """Open a finished shard folder (``<workdir>/shards``)."""
    shards = ShardSet(path)
    return shards.split(split) if split else shards
