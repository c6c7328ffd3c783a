"""The feature cache format (docs/cache-format.md) and its reader, ``FeatureCache``.

``features/<model-tag>/<image-variant>.h5`` holds ``features`` (N, D) (the projected embedding),
``pre_projection`` (N, W) where the vision tower exposes it, ``dicom_id`` aligned with
``shards/index.csv``, ``row_done`` and attributes with the fingerprints (model, shard set,
preprocessing). Written by the embed stage; read by zeroshot and probe.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from .._io import stable_hash
from ..arms import IMAGE_VARIANTS
from ..workdir import Workdir
from .hdf5 import UnsafeHDF5, check_shape, open_checked
from .records import Record, RecordError, Verifier
from .shard import ShardSet

CACHE_SCHEMA = "radacx-features"
CACHE_VERSION = 2  # 2: content_sha256, verified before commit and on open


class FeatureCacheError(RuntimeError):
    """A feature cache does not match what was asked for, or is unreadable."""


def features_record(work: Workdir, model_tag: str, verifier: Verifier, model_fingerprint: str | None = None) -> Record:
    """The verified record of a model's feature caches, built from the current shards (and, when
    ``model_fingerprint`` is given, by that model)."""
    record = verifier.record(work.features_record(model_tag), "embed")
    verifier.require_upstream(record, verifier.record(work.shards_manifest, "shards"))
    if model_fingerprint is not None and record["model_fingerprint"] != model_fingerprint:
        raise RecordError(f"{record.path}: built with model {record['model_fingerprint']}, the configured model "
                          f"is {model_fingerprint}; rerun `radacx embed`")
    return record


def cached_variants(record: Record, shards: ShardSet) -> list[str]:
    """The image variants a features record lists, each one the shard set serves (a name becomes a
    file and an arm name: nothing else is taken), original and masked among them."""
    variants = record.get("variants")
    if not isinstance(variants, list) or any(v not in shards.variants for v in variants) \
            or not set(IMAGE_VARIANTS) <= set(variants):
        raise RecordError(f"{record.path}: variants {str(variants)[:120]} are not original, masked and variants "
                          f"of this shard set ({', '.join(shards.variants)}); rerun `radacx embed`")
    return variants


def cache_fingerprints(model, shards: ShardSet, variant: str) -> dict:
    """What a cache of ``model`` over ``shards``' ``variant`` images must record."""
    out = {"model": model.fingerprint, "model_spec": model.spec, "weights_seed": model.weights_seed,
           "shards": shards.fingerprint, "preprocess": stable_hash(model.preprocess_spec()), "variant": variant,
           "schema_version": CACHE_VERSION}
    if variant in shards.derived:  # drawn at read time: the settings are part of what the cache holds
        out["variant_spec"] = stable_hash(shards.derived[variant].as_dict())
    return out


def check_fingerprints(path: Path, expected: dict) -> None:
    """Raise FeatureCacheError naming each fingerprint of ``path`` that differs from ``expected``."""
    with _open(path) as f:
        try:
            found = json.loads(f.attrs.get("fingerprints", "{}"))
        except ValueError:
            raise FeatureCacheError(f"{path}: its fingerprints attribute is not JSON") from None
    if not isinstance(found, dict):
        raise FeatureCacheError(f"{path}: its fingerprints attribute is not a mapping")
    diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if diff:
        what = "; ".join(f"{k}: cache has {a!r}, asked for {b!r}" for k, (a, b) in diff.items())
        raise FingerprintMismatch(f"{path} was built differently ({what}). Delete it to rebuild, or use "
                                f"the model/shards it was built from.")


class FingerprintMismatch(FeatureCacheError):
    """A readable cache built with another model, shard set, variant or preprocessing."""


class FeatureCache:
    """Read side of a finished cache: features, ids and fingerprints, checked on open."""

    def __init__(self, path: str | Path, expected: dict | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FeatureCacheError(f"{self.path}: no feature cache (run `radacx embed` first)")
        if expected:
            check_fingerprints(self.path, expected)
        with _open(self.path) as f:
            if f.attrs.get("schema") != CACHE_SCHEMA:
                raise FeatureCacheError(f"{self.path}: not a {CACHE_SCHEMA} file")
            self.fingerprints = json.loads(f.attrs["fingerprints"])
            _check_shapes(self.path, f)
            self.dicom_id = f["dicom_id"][:].astype(str)
            self.features = f["features"][:]
            self.pre_projection = f["pre_projection"][:] if "pre_projection" in f else None
            stamped = f.attrs.get("content_sha256")
        if not np.isfinite(self.features).all():
            bad = int((~np.isfinite(self.features)).any(1).sum())
            raise FeatureCacheError(f"{self.path}: {bad} rows hold NaN/inf features")
        if bad_rows(self.features).any():
            raise FeatureCacheError(f"{self.path}: {int(bad_rows(self.features).sum())} rows hold no embedding "
                                    f"(all zeros); delete it and run `radacx embed`")
        if stamped != content_sha256(self.dicom_id, self.features, self.pre_projection):
            raise FeatureCacheError(f"{self.path}: content does not match its checksum (changed after it was "
                                    f"written, or an unfinished file); delete it and run `radacx embed`")

    def get(self, kind: str = "features") -> np.ndarray:
        if kind == "pre_projection" and self.pre_projection is None:
            raise FeatureCacheError(f"{self.path}: no pre_projection features for this model")
        return self.features if kind == "features" else self.pre_projection

    def check_aligned(self, shards: ShardSet) -> None:
        """Rows must be the shard index's rows, in its order."""
        if not np.array_equal(self.dicom_id, shards.index["dicom_id"].to_numpy().astype(str)):
            raise FeatureCacheError(f"{self.path}: rows are not aligned with {shards.root}/index.csv")


MAX_ROWS, MAX_WIDTH = 50_000_000, 1 << 16  # far above MIMIC-CXR (377k images) and any encoder's width


def _open(path: Path) -> h5py.File:
    try:
        return open_checked(path)
    except UnsafeHDF5 as exc:
        raise FeatureCacheError(str(exc)) from None
    except OSError as exc:
        raise FeatureCacheError(f"{path}: cannot be read as HDF5 ({exc})") from None


def _check_shapes(path: Path, f: h5py.File) -> None:
    """Rows and widths bounded and consistent before any dataset is read (a memory bomb costs nothing)."""
    try:
        n = f["dicom_id"].shape[0] if f["dicom_id"].ndim == 1 else -1
        if not 0 <= n <= MAX_ROWS:
            raise FeatureCacheError(f"{path}: dicom_id declares {f['dicom_id'].shape}, expected (N,) with "
                                    f"N <= {MAX_ROWS}")
        for name in ("features", "pre_projection"):
            if name in f:
                ds = f[name]
                if ds.ndim != 2 or not 0 < ds.shape[1] <= MAX_WIDTH:
                    raise FeatureCacheError(f"{path}: {name} has shape {ds.shape}, expected (N, D) with "
                                            f"D <= {MAX_WIDTH}")
                check_shape(path, ds, rows=n)
    except UnsafeHDF5 as exc:
        raise FeatureCacheError(str(exc)) from None
    except KeyError as exc:
        raise FeatureCacheError(f"{path}: no dataset {exc}") from None


def content_sha256(ids, features: np.ndarray, pre_projection: np.ndarray | None) -> str:
    """Checksum of a cache's rows (ids, features, pre-projection features), stamped at commit."""
    h = hashlib.sha256()
    h.update("\n".join(map(str, ids)).encode())
    for arr in (features, pre_projection):
        if arr is not None:
            h.update(np.ascontiguousarray(arr, np.float32).tobytes())
    return h.hexdigest()


def bad_rows(features: np.ndarray) -> np.ndarray:
    """Rows that cannot be real embeddings: all zeros (never written) or non-finite."""
    return ~np.isfinite(features).all(1) | ~features.any(1)


def create_partial(path: Path, fingerprints: dict, model, shards: ShardSet, dim: int, pdim: int) -> None:
    """An empty cache to be filled row by row (``row_done`` marks the rows written)."""
    n = len(shards)
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = CACHE_SCHEMA
        f.attrs["schema_version"] = CACHE_VERSION
        f.attrs["fingerprints"] = json.dumps(fingerprints, sort_keys=True)
        f.attrs["preprocess"] = json.dumps(model.preprocess_spec())
        f.attrs["model_spec"] = model.spec
        f.create_dataset("features", (n, dim), np.float32)
        if pdim:
            f.create_dataset("pre_projection", (n, pdim), np.float32)
        f["dicom_id"] = shards.index["dicom_id"].to_numpy().astype("S")  # never truncated
        f.create_dataset("row_done", (n,), bool)
