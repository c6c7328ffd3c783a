"""``radacx inspect``: what is in a shard or feature file, and a montage of original vs masked."""
from __future__ import annotations

from pathlib import Path

import h5py

from ..figures import montage
from ..formats.hdf5 import open_checked
from ..formats.shardset import check_row_shapes


def inspect_path(path: str | Path, png: str | Path | None = None, n: int = 8) -> str:
    path = Path(path)
    lines = [str(path)]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
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
    if png:
        if not is_shard:
            raise ValueError(f"{path}: --png needs a shard file (with original/masked images)")
        montage(path, png, n)
        lines.append(f"  montage written to {png}")
    return "\n".join(lines)
