"""The shard writer: one shard file from rendered rows, dataset by dataset as ``schema.DATASETS`` says.

The shard stage (``stages/shards.py``) keeps the planning, the workers and the commit; this module
only turns rows into one file, so that a writer elsewhere (another archive tool, a test) writes what
the reader reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ...findings import FINDINGS_ALL
from ...render import box_to_output
from .schema import DATASETS, tail_shape


def _columns(items: list[dict], records: list[dict], classes) -> dict:
    """Each small dataset's values, from the rendered items and their cohort rows."""
    return {
        "labels": [[r[c] for c in FINDINGS_ALL] for r in records],
        "targets": [[r[f"target_{c}"] for c in classes] for r in records],
        "dicom_id": [r["dicom_id"] for r in records],
        "subject_id": [r["subject_id"] for r in records],
        "study_id": [r["study_id"] for r in records],
        "mask_quality": [r["quality_mean"] for r in records],
        "geometry": [it["geometry"].as_array() for it in items],
        # (row, class index, x0, y0, x1, y1) in output-pixel edge coordinates
        "boxes": [[i, classes.index(b[0]), *box_to_output(it["geometry"], *b[1:])]
                  for i, (it, r) in enumerate(zip(items, records)) for b in r.get("_boxes", ())],
    }


def write_shard(path: Path, split: str, items: list[dict], records: list[dict], attrs: dict) -> None:
    """Write one shard file at ``path``: ``items`` are rendered rows (original, masked, masks,
    geometry), ``records`` their cohort rows (labels, targets, ids, quality, ``_boxes``), ``attrs``
    the root attributes (``schema.root_attributes``)."""
    n, size, classes = len(items), attrs["size"], list(attrs["target_names"])
    columns = None
    with h5py.File(path, "w") as f:
        for key, value in {**attrs, "split": split}.items():
            f.attrs[key] = value if not isinstance(value, (dict, list)) else json.dumps(value)
        for ds in DATASETS:
            if not ds.per_row and not attrs.get(ds.name):
                continue  # an optional table this archive has none of
            tail = tail_shape(ds, size, len(classes))
            if ds.storage in ("contiguous", "row-chunks"):
                # images contiguous and uncompressed, so that readers can memory-map them (ShardSet.view);
                # masks chunked per row and gzip (they compress ~50x); filled row by row: no second copy
                chunked = ds.storage == "row-chunks" and n > 0
                out = f.create_dataset(ds.name, (n, *tail), ds.dtype, chunks=(1, *tail) if chunked else None,
                                       compression="gzip" if chunked else None,
                                       compression_opts=1 if chunked else None)
                for i, item in enumerate(items):
                    out[i] = item[ds.name]
                continue
            columns = columns or _columns(items, records, classes)
            values = columns[ds.name]
            rows = n if ds.per_row else len(values)
            f[ds.name] = np.array(values, ds.dtype).reshape(rows, *tail)
