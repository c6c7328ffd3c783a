"""Known truth of the phantom archive: where the generator drew each finding in each image.

Written by ``radacx demo-data`` *outside* the real-format tree, as ``<phantom>/truth/findings.csv.gz``
with columns ``dicom_id, finding, Height, Width, RLE`` (the RLE in CheXmask's convention, at the
image's original resolution), so the saliency stage can map it onto the shards' 224 x 224 grid
with the same geometry as the CheXmask masks. Real archives have no such file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .render import sample_grid
from .sources.chexmask import parse_rle, sample_rle

TRUTH_FILE = Path("truth") / "findings.csv.gz"


def truth_path(mimic_root: str | Path) -> Path | None:
    """The truth file of the phantom whose MIMIC tree is ``mimic_root`` (None for a real archive)."""
    root = Path(mimic_root).resolve()
    if len(root.parents) < 2:
        return None
    path = root.parents[1] / TRUTH_FILE
    return path if path.exists() else None


def read_truth(path: Path, ids) -> dict[str, dict]:
    """{dicom_id: {"shape": (h, w), finding: RLE, ...}} for the given images."""
    df = pd.read_csv(path, dtype={"dicom_id": str}, keep_default_na=False)
    df = df[df["dicom_id"].isin(set(ids))]
    out: dict[str, dict] = {}
    for d, finding, h, w, rle in zip(df["dicom_id"], df["finding"], df["Height"], df["Width"], df["RLE"]):
        out.setdefault(d, {"shape": (int(h), int(w))})[finding] = rle
    return out


def region_at(rle: str, shape: tuple[int, int], geometry, size: int) -> np.ndarray:
    """A truth region sampled on the output grid (centre of each output pixel), like the masks."""
    starts, ends = parse_rle(rle, shape)
    rows, cols = sample_grid(geometry, size, 1)
    return sample_rle(starts, ends, shape[1], rows, cols)
