"""The shard stage: renders the cohort into HDF5 shards (docs/shard-format.md) in parallel.

The format lives in ``formats/shard/`` (schema, writer, reader); this stage plans, runs the workers
(joblib, the renderer) and commits. Only this module needs joblib.

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
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from joblib import Parallel, delayed, parallel_config

from .._io import (apply_permissions, atomic_path, cap_threads, file_sha256, progress_bar, read_json, remove_stale_tmp,
                   spreadsheet_safe, stable_hash, stage_lock, write_csv, write_json)
from .._version import __version__
from ..archives import archive
from ..config import Config, RenderConfig
from ..formats.cohort_files import cohort_record, has_boxes, load_boxes, load_cohort, read_rle_rows
from ..formats.records import Record, Verifier, write_record
from ..formats.shard import SCHEMA, SCHEMA_VERSION, ShardError, root_attributes, validate_shard, write_shard
from ..render import IMAGE_FORMATS, RenderError, render_image
from ..sources.chexmask import MASK_NAMES
from ..sources.mimic import archive_path
from ..workdir import SHARD_SIDECARS, Workdir, shard_name, sidecar_name

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


def stored_render_config(cfg: Config) -> dict:
    """The render settings the shards are drawn with: all but ``variants``, which are drawn at read
    time (``variants.json``), so that adding one never invalidates a finished shard."""
    return {k: v for k, v in cfg.to_dict()["render"].items() if k != "variants"}


def render_fingerprint(cfg: Config) -> str:
    return stable_hash({"render": stored_render_config(cfg), "schema_version": SCHEMA_VERSION})


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
            tasks.append(ShardTask(shard_name(split, k), split, tuple(int(r) for r in block), fp))
    return tasks


MAX_IMAGE_BYTES = 256 << 20  # a MIMIC JPEG is ~1-3 MB, an NIH PNG ~3 MB, a DICOM ~10-30 MB


def read_image(path: Path, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """An image file's bytes, after checking (on the opened file itself) that it is a regular file
    below ``max_bytes``: a FIFO never hangs the stage, a 1 TiB sparse file is never read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RenderError("not a regular file (a FIFO, device or folder at the image's path); not read")
        if st.st_size > max_bytes:
            raise RenderError(f"file is {st.st_size} bytes, more than the {max_bytes} an image may have; not read")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(max_bytes + 1)
    finally:
        os.close(fd)


def _image_bytes(root: str, relpath: str, strict_links: bool) -> tuple[bytes | None, str | None, bool]:
    """(bytes, None, _) or (None, reject reason, whether a rerun may find the file)."""
    try:
        return read_image(archive_path(root, relpath, strict_links)), None, False
    except ValueError as exc:  # a path that would leave the archive: never read (RenderError included)
        return None, str(exc), False
    except FileNotFoundError:
        return None, "image file not found", True
    except OSError as exc:
        return None, f"image file unreadable ({exc.strerror or exc})", True


def render_shard(task: ShardTask, records: list[dict], root: str, rle_path: str,
                 render_cfg: dict, out_dir: str, attrs: dict,
                 on_written: WrittenHook | None = None, source: dict | None = None) -> dict:
    """Render one planned shard (runs in a worker): returns its sidecar record. ``source``: how the
    archive's images are read (``formats``, ``strict_links``)."""
    cap_threads(1)
    source = source or {}
    render = RenderConfig(**render_cfg)
    rles = read_rle_rows(Path(rle_path), [int(rec["rle_row"]) for rec in records])
    items, kept, rejects = [], [], []
    for rec in records:
        retry = False
        try:
            data, problem, retry = _image_bytes(root, rec["path"], bool(source.get("strict_links")))
            if problem:
                raise RenderError(problem)
            mask = rles[rec["dicom_id"]]
            if source.get("absent_structures"):  # a structure without a mask: drawn as nothing
                mask = {k: "" if v is None and k in MASK_NAMES else v for k, v in mask.items()}
            item = render_image(data, mask, mask["shape"], render, expected=(rec["Rows"], rec["Columns"]),
                                scaled_ok=bool(attrs.get("scaled_copies")),
                                formats=tuple(source.get("formats", IMAGE_FORMATS)))
        except RenderError as exc:
            rejects.append({"id": rec["dicom_id"], "stage": "shards", "reason": f"{exc} ({rec['path']})",
                            "path": rec["path"], "retry": retry})
            continue
        except Exception as exc:  # noqa: BLE001  one item's failure of any kind is its reject row, never the run's end
            rejects.append({"id": rec["dicom_id"], "stage": "shards", "path": rec["path"], "retry": False,
                            "reason": f"{type(exc).__name__} while reading or rendering: {str(exc)[:200]} ({rec['path']})"})
            continue
        items.append(item)
        kept.append(rec)
    out = Path(out_dir) / task.name
    with atomic_path(out) as tmp:
        write_shard(tmp, task.split, items, kept, attrs)
        if on_written is not None:
            on_written(task.name, tmp)
    sidecar = {"name": task.name, "split": task.split, "fingerprint": task.fingerprint,
               "render_fingerprint": attrs["render_fingerprint"], "render_config": render_cfg,
               "rows": len(kept), "bytes": out.stat().st_size, "sha256": file_sha256(out),
               "dicom_id": [r["dicom_id"] for r in kept], "rejects": rejects}
    write_json(Path(out_dir) / sidecar_name(task.name), sidecar)
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


def build_shards(cfg: Config, progress: bool = True, on_written: WrittenHook | None = None,
                 rebuild: bool = False) -> dict:
    """Run (or resume) the shard stage for ``cfg``; returns the manifest.

    Finished shards are never deleted because the plan changed (another cohort, another
    ``rows_per_shard``): the stage refuses and says so, unless ``rebuild`` (``radacx shards --rebuild``).
    """
    apply_permissions(cfg.permissions)
    work = Workdir(cfg.workdir)
    with stage_lock(work.root, "shards"):
        return _build(cfg, work, progress, on_written, rebuild)


def _sort_tasks(out: Path, tasks: list[ShardTask], root: Path) -> tuple[dict, list, list]:
    """(finished sidecars, tasks to render, finished shards the plan no longer wants)."""
    done, pending, obsolete = {}, [], []
    for task in tasks:
        sidecar_path = out / sidecar_name(task.name)
        if not sidecar_path.exists():
            pending.append(task)
            continue
        sidecar = _read_sidecar(sidecar_path)
        if sidecar is None:  # unreadable or not an object: the shard is not known to be finished
            log.warning("shards: rebuilding %s (its sidecar %s is not a JSON object)", task.name, sidecar_path.name)
            pending.append(task)
            continue
        if sidecar.get("fingerprint") != task.fingerprint:
            obsolete.append(task.name)
            pending.append(task)
            continue
        try:
            validate_shard(out / task.name, sidecar)
        except ShardError as exc:  # broken, not finished: rebuilt without asking
            log.warning("shards: rebuilding %s (%s)", task.name, exc)
            pending.append(task)
            continue
        back = [r for r in sidecar["rejects"] if r.get("retry") and (root / r["path"]).exists()]
        if back:  # an I/O reject whose file is back (a remounted disk, a restored file): retried
            log.info("shards: re-rendering %s: %d image(s) that could not be read are back", task.name, len(back))
            pending.append(task)
            continue
        done[task.name] = sidecar
    planned = {t.name for t in tasks}
    obsolete += sorted(p.name for p in out.glob("*.h5") if p.name not in planned)
    return done, pending, obsolete


def _read_sidecar(path: Path) -> dict | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def plan_render(cfg: Config) -> tuple[list[ShardTask], dict, list]:
    """What a shards run would do, without doing it: (plan, finished shards, shards to render)."""
    work = Workdir(cfg.workdir)
    record = cohort_record(work)
    tasks = plan_shards(load_cohort(work), cfg.shards.rows_per_shard, render_fingerprint(cfg), record.fingerprint)
    done, pending, _ = _sort_tasks(work.shards_dir, tasks, Path(cfg.archive.root))
    return tasks, done, pending


def _build(cfg: Config, work: Workdir, progress: bool, on_written: WrittenHook | None, rebuild: bool) -> dict:
    out = work.shards_dir
    verifier = Verifier(work.root)
    record = cohort_record(work, verifier)  # raises unless the cohort stage finished and is intact
    cohort = load_cohort(work, verifier)
    root = Path(cfg.archive.root)
    if not root.is_dir():
        raise ShardError(f"archive.root {root} is not a folder (unmounted, or a wrong path?); "
                         f"nothing was rendered or rejected")
    cohort_fp = record.fingerprint
    render_fp = render_fingerprint(cfg)
    _refuse_mixing(out, render_fp, cfg)
    out.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_tmp(out)
    if stale:
        log.warning("shards: removed %d temporary file(s) left by an interrupted run", stale)
    tasks = plan_shards(cohort, cfg.shards.rows_per_shard, render_fp, cohort_fp)
    done, pending, obsolete = _sort_tasks(out, tasks, root)
    if obsolete and not rebuild:
        raise ShardError(f"{len(obsolete)} finished shard(s) in {out} no longer match the plan (the cohort or "
                         f"shards.rows_per_shard changed), e.g. {obsolete[0]}. Refusing to replace them: use a "
                         f"fresh workdir (--set workdir=...) or pass --rebuild to replace them.")
    for name in obsolete:
        if name not in {t.name for t in tasks}:
            log.warning("shards: --rebuild: removing %s (not in the plan)", name)
            (out / name).unlink()
            (out / sidecar_name(name)).unlink(missing_ok=True)
    log.info("shards: %d planned, %d complete, %d to render", len(tasks), len(done), len(pending))
    attrs = root_attributes(target_names=record.facts.classes, render_config=stored_render_config(cfg),
                            render_fingerprint=render_fp, cohort_fingerprint=cohort_fp, size=cfg.render.size,
                            created_with=f"radacx-cache {__version__}", archive=cfg.archive.kind,
                            scaled_copies=archive(cfg.archive.kind).scaled_copies,
                            boxes=has_boxes(record))
    if pending:
        _render(cfg, work, pending, _with_boxes(cohort, record), attrs, done, progress, on_written)
    _check_reject_share(done, len(cohort), cfg.shards.max_reject_share)
    manifest = _commit(work, tasks, done, attrs, cohort, record)
    _write_variants(cfg, work, Record(work.shards_manifest, manifest))
    return manifest


def _write_variants(cfg: Config, work: Workdir, shard_record: Record) -> None:
    """``variants.json``: the overlay variants later stages draw from this shard set at read time
    (docs/shard-format.md), where there are any. Its own record, so adding a variant rewrites only this file."""
    path = work.shards_variants
    derived = cfg.render.variants
    if not derived:  # only original and masked: a folder without variants.json says exactly that
        path.unlink(missing_ok=True)
        return
    before = _read_sidecar(path) or {}
    if before.get("variants") != derived or shard_record.fingerprint not in before.get("upstream", {}).values():
        added = sorted(set(derived) - set(before.get("variants") or {}))
        if added:
            log.info("shards: variant(s) %s recorded in %s (drawn at read time: no shard is rendered for them)",
                     ", ".join(added), path.name)
        write_record(path, work.root, "variants", "radacx shards", upstream=[shard_record],
                     masked=cfg.render.paper_overlay().as_dict(), variants=derived)


def _with_boxes(cohort: pd.DataFrame, record: Record) -> list[dict]:
    """The cohort's rows, each with its radiologists' boxes (finding, x0, y0, x1, y1 as fractions)."""
    records = cohort.to_dict("records")
    boxes = load_boxes(record)
    if boxes is not None:
        by_id: dict = {}
        for b in boxes.itertuples(index=False):
            by_id.setdefault(b.dicom_id, []).append((b.finding, b.x0, b.y0, b.x1, b.y1))
        for rec in records:
            rec["_boxes"] = by_id.get(rec["dicom_id"], [])
    return records


def _render(cfg: Config, work: Workdir, pending: list, records: list, attrs: dict, done: dict, progress: bool,
            on_written: WrittenHook | None) -> None:
    client, context = _backend_context(cfg)
    try:
        with context:
            jobs = (delayed(render_shard)(t, [records[r] for r in t.rows], cfg.archive.root,
                                          str(work.masks_rle), cfg.to_dict()["render"],
                                          str(work.shards_dir), attrs, on_written,
                                          {"formats": archive(cfg.archive.kind).image_formats,
                                           "strict_links": cfg.archive.strict_links,
                                           "absent_structures": archive(cfg.archive.kind).absent_structures})
                    for t in pending)
            bar = progress_bar(total=sum(len(t.rows) for t in pending), desc="shards", unit="img", enabled=progress)
            for sidecar in Parallel(n_jobs=cfg.shards.n_jobs, return_as="generator_unordered")(jobs):
                done[sidecar["name"]] = sidecar
                bar.update(sidecar["rows"] + len(sidecar["rejects"]))
            bar.close()
    finally:
        if client is not None:
            client.close()


def _check_reject_share(done: dict, n_cohort: int, limit: float) -> None:
    """Stop before committing when more of the cohort was rejected than ``limit`` (a wrong archive
    path, an unmounted disk, another render problem): the rejects are not the answer then."""
    rejects = [r for sc in done.values() for r in sc["rejects"]]
    if n_cohort and len(rejects) / n_cohort > limit:
        counts = pd.Series([re.sub(r"\(.*\)$", "", r["reason"]).strip() for r in rejects]).value_counts()
        top = "; ".join(f"{n} x {reason}" for reason, n in counts.head(5).items())
        raise ShardError(f"{len(rejects)} of {n_cohort} images ({len(rejects) / n_cohort:.1%}) were rejected, more "
                         f"than shards.max_reject_share={limit:.0%}: {top}. Nothing committed; fix the cause "
                         f"and rerun (finished shards are kept).")


def _refuse_mixing(out: Path, render_fp: str, cfg: Config) -> None:
    """A shard folder built with another render config is never silently mixed with this one."""
    for path in sorted(out.glob(SHARD_SIDECARS)):
        entry = _read_sidecar(path) or {}
        if entry.get("render_fingerprint", render_fp) != render_fp:
            raise ShardError(
                f"{out} holds shards rendered with another render config ({path.name}: "
                f"{json.dumps(entry.get('render_config'))}); this run asks for "
                f"{json.dumps(stored_render_config(cfg))}. Use another workdir (--set workdir=...) "
                f"or delete {out} to rebuild.")


def _commit(work: Workdir, tasks: list[ShardTask], done: dict, attrs: dict, cohort: pd.DataFrame,
            cohort_rec: Record) -> dict:
    """index.csv, rejects.csv, then the shard set's record ``manifest.json`` (the commit point)."""
    rows, rejects, shards = [], [], []
    decided = cohort_rec.facts
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
    write_csv(work.shards_index, index)
    write_csv(work.shards_rejects, spreadsheet_safe(pd.DataFrame(rejects, columns=["id", "stage", "reason", "retry"]),
                                                    ("id", "reason")))
    # the cohort's decisions travel with the shards (readers elsewhere have only this folder); the
    # record's upstream fingerprint ties them to the cohort record they were copied from
    record = write_record(
        work.shards_manifest, work.root, "shards", "radacx shards",
        files=[work.shards_index.name, work.shards_rejects.name, *(s["name"] for s in shards)], upstream=[cohort_rec],
        known={s["name"]: s["sha256"] for s in shards},  # hashed by the workers, or verified on resume
        schema=SCHEMA, schema_version=SCHEMA_VERSION, shards=shards, rows=len(index), rejects=len(rejects),
        render_config=attrs["render_config"], render_fingerprint=attrs["render_fingerprint"],
        cohort_fingerprint=attrs["cohort_fingerprint"], target_names=attrs["target_names"],
        target_order=list(decided.target_order), multi_positive=decided.policy.multi_positive,
        uncertain=decided.policy.uncertain, archive=attrs["archive"], created_with=attrs["created_with"])
    log.debug("shards: %d images in %d shards, %d rejected", len(index), len(shards), len(rejects))
    return record.data
