"""Opening HDF5 files that may come from elsewhere (docs/security.md).

An HDF5 file can make a reader touch other files: an external link, a dataset whose bytes live in
an outside raw file (external storage), a virtual dataset mapping other files. A sha256 of the
container does not cover those bytes. Every format in this package is plain: no links, no external
storage, no virtual datasets, so ``open_checked`` refuses any of them before a byte of data is read,
and ``check_shape`` refuses a declared shape larger than the reader expects (a 6 KB file declaring
2^40 rows must cost nothing).
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


class UnsafeHDF5(ValueError):
    """An HDF5 file holds a link, external storage, a virtual dataset or an impossible shape."""


def unsafe_objects(f: h5py.File) -> list[str]:
    """Names of the links and datasets that would make a reader leave the file, or point nowhere."""
    found = []

    def walk(group: h5py.Group, prefix: str) -> None:
        for name in group:
            link = group.get(name, getlink=True)
            full = f"{prefix}/{name}"
            if isinstance(link, h5py.ExternalLink):
                found.append(f"{full} (external link to {link.filename})")
                continue
            if isinstance(link, h5py.SoftLink):
                found.append(f"{full} (soft link to {link.path})")
                continue
            obj = group[name]
            if isinstance(obj, h5py.Group):
                walk(obj, full)
            elif isinstance(obj, h5py.Dataset):
                if obj.external:
                    found.append(f"{full} (stored in an outside file: {obj.external[0][0]!r})")
                elif obj.is_virtual:
                    found.append(f"{full} (virtual dataset mapping other files)")
    walk(f, "")
    return found


def open_checked(path: str | Path, mode: str = "r") -> h5py.File:
    """``h5py.File(path, mode)`` for a file of this package's formats; raises UnsafeHDF5 naming the
    file and the first offending object if it links or stores data outside itself."""
    f = h5py.File(path, mode)
    try:
        bad = unsafe_objects(f)
    except Exception:
        f.close()
        raise
    if bad:
        f.close()
        raise UnsafeHDF5(f"{path}: {bad[0]}; files of this tool never hold links, external storage or "
                         f"virtual datasets, so it is refused unread")
    return f


def check_shape(path, ds: h5py.Dataset, rows: int | None = None, tail: tuple | None = None,
                max_bytes: int = 1 << 36) -> None:
    """Refuse a dataset whose declared shape is not ``(rows, *tail)`` (None: any) or whose size
    exceeds ``max_bytes``, before anything is read."""
    shape = tuple(ds.shape)
    if rows is not None and (not shape or shape[0] != rows):
        raise UnsafeHDF5(f"{path}: {ds.name} declares {shape[0] if shape else 'no'} rows, expected {rows}")
    if tail is not None and shape[1:] != tuple(tail):
        raise UnsafeHDF5(f"{path}: {ds.name} has shape {shape}, expected (N, {', '.join(map(str, tail))})")
    size = int(np.prod(shape, dtype=object)) * ds.dtype.itemsize
    if size > max_bytes:
        raise UnsafeHDF5(f"{path}: {ds.name} declares {shape} ({size / 2**30:.0f} GiB), more than the "
                         f"{max_bytes / 2**30:.0f} GiB a reader here accepts")
