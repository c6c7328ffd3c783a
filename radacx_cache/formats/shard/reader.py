"""The shard reader: ``ShardSet`` / ``open_shards`` (docs/shard-format.md; the schema in ``schema.py``).

The read side only (mosaic streaming keeps ``reader.py`` apart from ``writer.py``): embed, stream,
probe and fine-tune import it and never the shard stage or joblib. HDF5 handles are opened lazily
per process, so a ShardSet can be handed to DataLoader workers (h5py handles cannot cross a fork:
pytorch/pytorch#11887).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from ..._io import file_sha256
from ...arms import IMAGE_VARIANTS
from ...overlays import OverlaySpec, checked_full_variants
from ...render import draw_variant
from ...workdir import Workdir
from ..hdf5 import UnsafeHDF5, check_shape, open_checked
from ..records import RecordError, Verifier, check_files, read_record
from .schema import (DATASETS, INDEX_NAME, MANIFEST_NAME, MAX_BOXES, MAX_SIZE, MIN_SIZE, SCHEMA, SCHEMA_VERSION, SPLITS,
                     VARIANTS_NAME, tail_shape)


class ShardError(RuntimeError):
    """A shard file or folder is invalid, incomplete or was built with another config."""


def validate_shard(path: Path, expected: dict | None = None) -> None:
    """Raise ShardError naming the file and the reason if a shard is unusable.

    ``expected`` is the shard's manifest (or sidecar) entry: its ``bytes`` are always compared,
    its ``sha256`` when present and not None.
    """
    if not path.exists():
        raise ShardError(f"{path}: shard file is missing")
    if expected is not None and path.stat().st_size != expected["bytes"]:
        raise ShardError(f"{path}: size {path.stat().st_size} != {expected['bytes']} bytes in its "
                         f"manifest entry (truncated or overwritten)")
    try:
        with open_checked(path) as f:
            if f.attrs.get("schema") != SCHEMA:
                raise ShardError(f"{path}: not a {SCHEMA} file (schema attribute {f.attrs.get('schema')!r})")
            version = int(f.attrs.get("schema_version", -1))
            if version != SCHEMA_VERSION:
                raise ShardError(f"{path}: schema_version {version}; this reader understands "
                                 f"{SCHEMA_VERSION}")
            n = f["dicom_id"].shape[0]
            if expected is not None and "rows" in expected and n != expected["rows"]:
                raise ShardError(f"{path}: {n} rows, its manifest entry says {expected['rows']}")
            check_row_shapes(path, f, n)
    except ShardError:
        raise
    except UnsafeHDF5 as exc:
        raise ShardError(str(exc)) from None
    except Exception as exc:
        raise ShardError(f"{path}: cannot be read as HDF5 ({exc})") from None
    if expected is not None and expected.get("sha256") and file_sha256(path) != expected["sha256"]:
        raise ShardError(f"{path}: sha256 differs from its manifest entry (corrupted)")


def check_row_shapes(path: Path, f: h5py.File, n: int) -> None:
    """Every row dataset has ``n`` rows of the shape the schema gives at the file's ``size``, before
    anything is read (a small file declaring huge images costs nothing)."""
    size = int(f.attrs.get("size", 224))
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ShardError(f"{path}: @size {size} is outside {MIN_SIZE}-{MAX_SIZE}")
    k = len(json.loads(f.attrs["target_names"])) if "target_names" in f.attrs else None
    try:
        for ds in DATASETS:
            if ds.name in f:
                check_shape(path, f[ds.name], rows=n if ds.per_row else None, tail=tail_shape(ds, size, k))
                if not ds.per_row and f[ds.name].shape[0] > MAX_BOXES:
                    raise ShardError(f"{path}: {ds.name} has {f[ds.name].shape[0]} rows, more than {MAX_BOXES}")
            elif ds.required and not (ds.name == "targets" and k is None):
                raise ShardError(f"{path}: no dataset {ds.name}")
    except UnsafeHDF5 as exc:
        raise ShardError(str(exc)) from None


def checked_boxes(path: Path, table: np.ndarray, rows: int, classes: int) -> np.ndarray:
    """A shard's ``boxes`` table, each row naming a row of the file and a class in range, with finite
    edge coordinates (a negative class index would silently pick the last class)."""
    bad = ~np.isfinite(table).all(1)
    row, cls = table[:, 0], table[:, 1]
    bad |= (row < 0) | (row >= rows) | (row != np.round(row)) | (cls < 0) | (cls >= classes) | (cls != np.round(cls))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ShardError(f"{path}: boxes row {i} ({', '.join(f'{v:g}' for v in table[i])}) names no row of the "
                         f"{rows} or no class of the {classes}, or is not finite")
    return table


def row_blocks(index: pd.DataFrame, max_rows: int):
    """(shard, start, stop, index positions): contiguous row runs of ``index`` for bulk reads."""
    for shard, grp in index.groupby("shard", sort=True):
        rows = grp["row"].to_numpy()
        pos = grp.index.to_numpy()
        cut = np.flatnonzero(np.diff(rows) != 1) + 1
        for r, p in zip(np.split(rows, cut), np.split(pos, cut)):
            for s in range(0, len(r), max_rows):
                yield shard, int(r[s]), int(r[min(s + max_rows, len(r)) - 1]) + 1, p[s:s + max_rows]


class ShardSet:
    """Read access to a finished shard folder (``open_shards``).

    Item access by position (``shards[i]``) or by id (``shards.get(dicom_id)``), split views
    (``shards.split("test")``), block reads and zero-copy memory maps. For torch, see
    ``stream.ShardStream`` (training) and ``stream.ShardMapDataset`` (one image per item).
    """

    def __init__(self, root: str | Path, index: pd.DataFrame | None = None, manifest: dict | None = None,
                 derived: dict | None = None):
        self.root = Path(root)
        self._derived = derived  # {name: OverlaySpec} of the variants drawn at read time (variants.json)
        if manifest is None:
            try:
                manifest = read_record(self.root / MANIFEST_NAME, "shards").data
            except RecordError as exc:
                raise ShardError(str(exc)) from None
            if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
                raise ShardError(f"{self.root / MANIFEST_NAME}: schema {manifest.get('schema')} "
                                 f"v{manifest.get('schema_version')}; this reader understands {SCHEMA} v{SCHEMA_VERSION}")
        self.manifest = manifest
        if index is None:
            index = pd.read_csv(self.root / INDEX_NAME, dtype={"dicom_id": str, "shard": str})
            # a row may only name a shard the record lists (never a path out of the folder)
            unknown = sorted(set(index["shard"]) - {s["name"] for s in manifest["shards"]})
            if unknown:
                raise ShardError(f"{self.root / INDEX_NAME}: names shard {unknown[0]!r}, which the folder's "
                                 f"manifest does not list; rerun `radacx shards`")
        self.index = index.reset_index(drop=True)
        self._handles: dict = {}
        self._views: dict = {}
        self._pid = None
        self._by_id = None

    def __len__(self) -> int:
        return len(self.index)

    def validate(self, checksum: bool = True) -> None:
        """Check the folder against its record before a long job reads it.

        Every file the record lists (shards, ``index.csv``, ``rejects.csv``): size and sha256, each
        hashed once per (inode, ctime, size, mtime) (``records.check_files``); then each shard's
        schema, row counts and render config. Raises ShardError naming the file and the reason.
        """
        where = str(self.root / MANIFEST_NAME)
        try:
            if checksum:
                check_files(self.root, self.manifest.get("files", {}), where, "radacx shards")
        except RecordError as exc:
            raise ShardError(str(exc)) from None
        for entry in self.manifest["shards"]:
            path = self.root / entry["name"]
            validate_shard(path, {**entry, "sha256": None})
            with open_checked(path) as f:
                found = f.attrs.get("render_fingerprint")
            if found != self.manifest["render_fingerprint"]:
                raise ShardError(f"{path}: rendered with render config {found}, the folder's manifest says "
                                 f"{self.manifest['render_fingerprint']}; shards of different configs are "
                                 f"never mixed (rebuild the folder)")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_views"], state["_pid"] = {}, {}, None  # never across processes
        return state

    @property
    def target_names(self) -> list[str]:
        return list(self.manifest["target_names"])

    @property
    def target_order(self) -> list[int]:
        """Class indices in the cohort's order for a multi-positive image (``findings.first_positive``)."""
        names = self.target_names
        return [names.index(c) for c in self.manifest["target_order"]]

    @property
    def render_config(self) -> dict:
        """The render settings the shards were drawn with (size, line width, colours, ...)."""
        return dict(self.manifest["render_config"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def file(self, shard: str) -> h5py.File:
        if self._pid != os.getpid():
            self._handles, self._views, self._pid = {}, {}, os.getpid()
        if shard not in self._handles:
            try:
                f = open_checked(self.root / shard)
            except UnsafeHDF5 as exc:
                raise ShardError(str(exc)) from None
            try:  # shapes as the schema says before any row is read (a memory bomb costs nothing)
                check_row_shapes(self.root / shard, f, f["dicom_id"].shape[0])
            except Exception:
                f.close()
                raise
            self._handles[shard] = f
        return self._handles[shard]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles, self._views = {}, {}

    def split(self, name: str) -> "ShardSet":
        """The rows of split ``name``: ``train``, ``val`` or ``test`` (anything else is an error, not
        an empty set: MIMIC's ``validate`` is ``val`` here)."""
        if name not in SPLITS:
            hint = " (MIMIC's 'validate' split is called 'val' here)" if name in ("validate", "validation") else ""
            raise ValueError(f"split {name!r}: expected one of {', '.join(SPLITS)}{hint}")
        return ShardSet(self.root, self.index[self.index["split"] == name], self.manifest, self._derived)

    @property
    def derived(self) -> dict:
        """{name: overlay settings} of the variants drawn at read time from ``original`` and ``masks``
        (``variants.json``, written by the shard stage for this very shard set; {} without one)."""
        if self._derived is None:
            self._derived = read_variants(self.root, self.fingerprint)
        return self._derived

    @property
    def variants(self) -> tuple[str, ...]:
        """Every image variant this set serves: the stored ``original`` and ``masked``, then the derived ones."""
        return (*IMAGE_VARIANTS, *self.derived)

    def check_variant(self, variant: str) -> None:
        if variant not in self.variants:
            raise ValueError(f"image variant {variant!r}: this shard set has {', '.join(self.variants)} (add one "
                             f"under render.variants and rerun `radacx shards`: nothing is re-rendered)")

    def variant_spec(self, variant: str) -> OverlaySpec | None:
        """The overlay settings ``render.draw_variant`` draws ``variant`` with from the stored original
        and masks (None for ``original``): the paper's from this shard record, derived ones from
        ``variants.json``. Interventions that change the original redraw a variant with these."""
        self.check_variant(variant)
        if variant == "original":
            return None
        return OverlaySpec.paper(self.render_config) if variant == "masked" else self.derived[variant]

    def __getitem__(self, i: int) -> dict:
        return self.row(i)

    def row(self, i: int, fields=("original", "masked", "masks", "labels", "targets", "mask_quality",
                                  "geometry")) -> dict:
        """Position ``i``'s ids and the given datasets only (e.g. ``("geometry",)``: no image read)."""
        row = self.index.iloc[int(i)]
        f = self.file(row["shard"])
        r = int(row["row"])
        out = {name: f[name][r] if name not in self.derived else self.read(row["shard"], name, r, r + 1)[0]
               for name in fields}
        out.update(dicom_id=row["dicom_id"], subject_id=int(row["subject_id"]),
                   study_id=int(row["study_id"]), split=row["split"])
        return out

    def boxes_at(self, i: int) -> list[tuple]:
        """Position ``i``'s radiologists' boxes: (class index, x0, y0, x1, y1) in output-pixel edge
        coordinates; empty where the archive has none (the ``boxes`` dataset is a v2 addition)."""
        row = self.index.iloc[int(i)]
        f = self.file(row["shard"])
        if "boxes" not in f:
            return []
        key = ("boxes", row["shard"])
        if key not in self._views:
            self._views[key] = checked_boxes(self.root / row["shard"], f["boxes"][:], f["dicom_id"].shape[0],
                                             len(self.target_names))  # its shape was checked on open
        table = self._views[key]
        mine = table[table[:, 0] == int(row["row"])]
        return [(int(b[1]), *map(float, b[2:])) for b in mine]

    def get(self, dicom_id: str) -> dict:
        if self._by_id is None:
            self._by_id = {d: i for i, d in enumerate(self.index["dicom_id"])}
        if dicom_id not in self._by_id:
            raise KeyError(f"dicom_id {dicom_id} is not in {self.root}")
        return self[self._by_id[dicom_id]]

    def blocks(self, max_rows: int):
        """(shard, start, stop, index positions): contiguous row runs for bulk reads."""
        return row_blocks(self.index, max_rows)

    def read(self, shard: str, variant: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of one shard's image variant (or ``masks``); a derived variant is drawn
        from the stored original and masks (``render.draw_variant``)."""
        if variant != "masks":
            self.check_variant(variant)
        f = self.file(shard)
        if variant in self.derived:
            return draw_variant(f["original"][start:stop], f["masks"][start:stop], self.derived[variant])
        return f[variant][start:stop]

    def view(self, shard: str, variant: str) -> np.ndarray:
        """A read-only memory map of a whole image dataset (zero-copy; opened lazily per process).

        Falls back to reading the dataset when it is chunked or compressed (shards written by
        other tools).
        """
        if variant in self.derived:
            return DerivedView(self, shard, variant)
        ds = self.file(shard)[variant]  # also resets the per-process caches after a fork
        if (shard, variant) not in self._views:
            offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
            if offset is None:
                self._views[shard, variant] = ds[:]
            else:
                self._views[shard, variant] = np.memmap(self.root / shard, dtype=ds.dtype, mode="r",
                                                        offset=offset, shape=ds.shape)
        return self._views[shard, variant]

    def targets(self) -> np.ndarray:
        """(N, K) training targets (multi-hot under ``any``, one-hot under ``single``/``first``)."""
        return self._labels("target")

    def positives(self) -> np.ndarray:
        """(N, K) multi-hot positive findings under the uncertain policy (what metrics score)."""
        return self._labels("positive")

    def uncertain(self) -> np.ndarray:
        """(N, K) 1 where the label table says uncertain (-1)."""
        return self._labels("uncertain")

    def _labels(self, kind: str) -> np.ndarray:
        cols = [f"{kind}_{n}" for n in self.target_names]
        missing = [c for c in cols if c not in self.index.columns]
        if missing:
            raise ShardError(f"{self.root}/index.csv has no {missing[0]} column (written by an older "
                             f"version: rerun `radacx cohort` and `radacx shards`)")
        return self.index[cols].to_numpy(np.float32)


class DerivedView:
    """What ``ShardSet.view`` gives for a derived variant: sliced like the memory map of a stored one,
    each slice drawn from the stored original and masks."""

    def __init__(self, shards: ShardSet, shard: str, variant: str):
        self.shards, self.shard, self.variant = shards, shard, variant
        self.shape = (*shards.view(shard, "original").shape, 3)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a derived variant is read in contiguous row slices")
        start, stop, _ = key.indices(self.shape[0])
        return self.shards.read(self.shard, self.variant, start, stop)


def read_variants(root: Path, shards_fingerprint: str, verifier: Verifier | None = None) -> dict:
    """The derived variants recorded in ``root/variants.json`` for the shard set of
    ``shards_fingerprint`` ({} where there is no such record). A record written for another shard
    set (or edited) is refused: its variants were not decided for these shards."""
    path = Path(root) / VARIANTS_NAME
    if not path.exists():
        return {}
    try:
        record = verifier.record(path, "variants") if verifier else read_record(path, "variants")
    except RecordError as exc:
        raise ShardError(str(exc)) from None
    if shards_fingerprint not in record.get("upstream", {}).values():
        raise ShardError(f"{path} was written for another shard set (not {shards_fingerprint}); rerun `radacx shards`")
    try:
        return checked_full_variants(record.get("variants", {}))
    except ValueError as exc:
        raise ShardError(f"{path}: {exc}; rerun `radacx shards`") from None


def open_shards(path: str | Path, split: str | None = None) -> ShardSet:
    """Open a finished shard folder (``<workdir>/shards``)."""
    shards = ShardSet(path)
    return shards.split(split) if split else shards


def open_verified(work: Workdir, verifier: Verifier | None = None) -> ShardSet:
    """The workdir's shard set, with the chain above it verified (cohort record -> shard record ->
    every listed file) and each shard's structure checked: what every later stage reads."""
    verifier = verifier or Verifier(work.root)
    if not work.shards_manifest.exists() and not work.cohort_manifest.exists():
        raise ShardError(f"{work.root}: no cohort and no shards yet; run `radacx cohort`, then `radacx shards`")
    try:
        record = verifier.record(work.shards_manifest, "shards")
    except RecordError as exc:
        raise ShardError(str(exc)) from None
    shards = ShardSet(work.shards_dir, manifest=record.data,
                      derived=read_variants(work.shards_dir, record.fingerprint, verifier))
    shards.validate(checksum=False)  # the files were just verified with the record
    return shards
