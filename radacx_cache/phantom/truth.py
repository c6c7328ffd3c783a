"""Known truth of the phantom archive: where the generator drew each finding in each image.

Written by ``radacx demo-data`` *outside* the real-format tree, as ``<phantom>/truth/findings.csv.gz``
with columns ``dicom_id, finding, Height, Width, RLE`` (the RLE in CheXmask's convention, at the
image's original resolution), so the saliency stage can map it onto the shards' 224 x 224 grid
with the same geometry as the CheXmask masks. Real archives have no such file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..render import sample_grid
from ..sources.chexmask import parse_rle, sample_rle

TRUTH_FILE = Path("truth") / "findings.csv.gz"


def phantom_file(layout: str = "mimic") -> str:
    """The marker a phantom of ``layout`` leaves in its folder (the three layouts can share one)."""
    return "phantom.json" if layout == "mimic" else f"phantom-{layout}.json"


def truth_file(layout: str = "mimic") -> Path:
    return TRUTH_FILE if layout == "mimic" else TRUTH_FILE.with_name(f"findings-{layout}.csv.gz")


def phantom_home(root: str | Path) -> Path | None:
    """The folder of the generated phantom whose archive root is ``root`` (a ``phantom*.json`` there
    names that root, one to three levels up), or None for a real archive."""
    return _phantom_marker(root)[0]


def _phantom_marker(root) -> tuple[Path | None, dict]:
    root = Path(root).resolve()
    for home in root.parents[:3]:
        for marker in sorted(home.glob("phantom*.json")):
            try:
                data = json.loads(marker.read_text())
                if Path(data["root"]).resolve() == root:
                    return home, data
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    return None, {}


def truth_path(root: str | Path) -> Path | None:
    """The truth file of the phantom whose archive root is ``root`` (None for a real archive)."""
    home, data = _phantom_marker(root)
    path = home / truth_file(data.get("layout", "mimic")) if home is not None else None
    return path if path is not None and path.exists() else None


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
    if tuple(shape) == (geometry.mask_height, geometry.mask_width):  # drawn in CheXmask's frame
        geometry = geometry.mask_frame()
    rows, cols = sample_grid(geometry, size, 1)
    return sample_rle(starts, ends, shape[1], rows, cols)
