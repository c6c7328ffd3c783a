"""``radacx inspect``: what is in a shard or feature file, and a montage of original vs masked."""
from __future__ import annotations

import json
from pathlib import Path

import h5py

from ..figures import montage
from ..formats.hdf5 import open_checked
from ..formats.shard import MANIFEST_NAME, SPLITS, ShardSet, check_row_shapes
from ..workdir import Workdir


def workdir_summary(root: Path) -> str:
    """One line per finished stage of a workdir, from its records (read, not verified: `radacx verify`)."""
    work = Workdir(root)
    records = [("cohort", work.cohort_manifest), ("shards", work.shards_manifest),
               *(("embed", work.features_record(p.name)) for p in sorted(work.features_dir("*").parent.glob("*"))),
               ("probe", work.probes_record),
               *(("finetune", work.finetune_record(p.name)) for p in sorted(work.finetune_dir("*").parent.glob("*"))),
               *(("predictions", work.predictions_record(p.name)) for p in sorted(work.predictions_dir.glob("*"))),
               ("saliency", work.saliency_record), ("report", work.report_record)]
    lines = [f"{root}: a radacx workdir"]
    for stage, path in records:
        if not path.is_file():
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            lines.append(f"  {stage:11s} {path.relative_to(root)}: unreadable")
            continue
        facts = {"cohort": lambda r: f"{r.get('rows')} images, {r.get('rejects')} rejected ({r.get('archive_name')})",
                 "shards": lambda r: f"{sum(s.get('rows', 0) for s in r.get('shards', []))} images in "
                                     f"{len(r.get('shards', []))} shards",
                 "predictions": lambda r: f"arm {r.get('arm')}, tested on {', '.join(r.get('tested_on', []))}"}
        fact = facts.get(stage, lambda r: f"{len(r.get('files', {}))} file(s)")(rec)
        lines.append(f"  {stage:11s} {str(path.parent.relative_to(root)):24s} {fact}")
    lines.append("integrity: `radacx verify " + str(root) + "` re-hashes every file and checks each chain")
    return "\n".join(lines)


def inspect_path(path: str | Path, png: str | Path | None = None, n: int = 8) -> str:
    path = Path(path)
    lines = [str(path)]
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return _folder_summary(path)
    if path.is_dir() and Workdir(path).cohort_manifest.is_file():
        return workdir_summary(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a workdir, a shard, a feature cache or a shard "
                                f"folder)")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file (expected a shard or a feature cache)")
    with open_checked(path) as f:  # no links, external storage or virtual datasets
        for key, value in sorted(f.attrs.items()):
            text = str(value)
            lines.append(f"  @{key} = {text[:120]}{'...' if len(text) > 120 else ''}")
        for key in f:
            obj = f[key]
            kind = f"{obj.shape} {obj.dtype}" if isinstance(obj, h5py.Dataset) else "(group)"
            lines.append(f"  {key}: {kind}")
        is_shard = "original" in f and "dicom_id" in f
        if png and is_shard:
            check_row_shapes(path, f, f["dicom_id"].shape[0])  # before any image is read
    if png and not is_shard:
        lines.append("  no montage: --png needs a shard file (with original/masked images)")
    elif png:
        montage(path, png, n)
        lines.append(f"  montage written to {png}")
    return "\n".join(lines)


def _folder_summary(folder: Path) -> str:
    """A shard folder: its record's counts per split, render settings and fingerprint."""
    shards = ShardSet(folder)
    counts = shards.index["split"].value_counts().to_dict()
    m = shards.manifest
    return "\n".join([f"{folder}: shard set, {len(shards)} images in {len(m['shards'])} files, {m['rejects']} rejected",
                      "  " + ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS),
                      f"  classes: {', '.join(shards.target_names)}", f"  render: {json.dumps(m['render_config'])}",
                      f"  fingerprint {shards.fingerprint} (record_version {m.get('record_version')})",
                      "  read it with h5py alone: docs/shard-format.md"])
