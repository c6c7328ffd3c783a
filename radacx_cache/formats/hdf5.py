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


MAX_LINKS = 100_000  # a shard holds ~12 datasets; a file with more links than this is not one of ours


def unsafe_objects(f: h5py.File, max_links: int = MAX_LINKS) -> list[str]:
    """Names of the links and datasets that would make a reader leave the file, or point nowhere.

    Objects are visited once each, by address, not once per path: groups that hard-link the next
    level twice have 2^depth paths but few objects, and a group linked below itself is a cycle. More
    than ``max_links`` links is itself a finding (nothing this tool writes comes near it)."""
    found, seen, links = [], set(), 0
    todo = [(f, "")]
    while todo and not found:
        group, prefix = todo.pop()
        for name in group:
            links += 1
            if links > max_links:
                return [f"{prefix}/{name} (more than {max_links} links: not a file this tool wrote)"]
            link = group.get(name, getlink=True)
            full = f"{prefix}/{name}"
            if isinstance(link, h5py.ExternalLink):
                found.append(f"{full} (external link to {link.filename})")
                continue
            if isinstance(link, h5py.SoftLink):
                found.append(f"{full} (soft link to {link.path})")
                continue
            obj = group[name]
            info = h5py.h5o.get_info(obj.id)
            if (info.fileno, info.addr) in seen:
                continue  # another path to an object already walked
            seen.add((info.fileno, info.addr))
            if isinstance(obj, h5py.Group):
                todo.append((obj, full))
            elif isinstance(obj, h5py.Dataset):
                if obj.external:
                    found.append(f"{full} (stored in an outside file: {obj.external[0][0]!r})")
                elif obj.is_virtual:
                    found.append(f"{full} (virtual dataset mapping other files)")
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
