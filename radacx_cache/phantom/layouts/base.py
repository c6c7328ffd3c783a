"""The phantom's layouts, base: the MIMIC-CXR-JPG layout every other archive's layout refines, and
what the open archives' layouts share (docs/archives.md).

The generator (``generator.py``) draws patients, studies, findings and anatomy once, in one internal
model (MIMIC's columns: ``dicom_id, subject_id, study_id, ViewPosition, Rows, Columns``, labels per
study, an official split per image); a layout names the images, says how large each file is and
in which format, and writes the archive's own tables and the CheXmask file of that archive.
"""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from ..._io import atomic_path, jpeg_bytes, stable_hash
from ...findings import FINDINGS
from ...sources.chexmask import ID_COLUMNS, decode_rle
from ...sources.mimic import PREFIX, jpg_relpath

CHEXMASK_SUBDIR = "chexmask-cxr-segmentation-data/1.0.0/OriginalResolution"
SMALL_SCALE = 0.75  # the phantom's CheXpert-v1.0-small copy: each side x 0.75 of CheXmask's frame


def _write_csv(path: Path, df: pd.DataFrame, gz: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if gz:
            with gzip.open(tmp, "wt") as f:
                df.to_csv(f, index=False)
        else:
            df.to_csv(tmp, index=False)


def _label_cell(value) -> str:
    """A label as the archives write it: 1.0 / 0.0 / -1.0, blank when not mentioned; a planted bad
    value (text) as it is."""
    if isinstance(value, str):
        return value
    return "" if value is None or value != value else f"{float(value):.1f}"


class Layout:
    name = "mimic"
    subdir = "mimic-cxr-jpg/2.0.0"
    chexmask_file = "MIMIC-CXR-JPG"
    square = False  # NIH: every released PNG is square (1024 x 1024)
    frontal_only = False
    one_image_per_patient = False  # VinDr: no patient ids, every image its own patient
    faults_not_in_layout: set = set()  # planted faults this archive's format cannot carry (phantom/faults.py)

    def subjects(self, rng, n: int) -> np.ndarray:
        return rng.choice(np.arange(10_000_000, 20_000_000), n, replace=False)

    def split(self, rng) -> str:
        return str(rng.choice(["train", "validate", "test"], p=[0.78, 0.07, 0.15]))

    def study_id(self, study_pool, study_number: int) -> int:
        """MIMIC's study ids are unique 8-digit numbers drawn from a pool."""
        return int(next(study_pool))

    def image_seed(self, row: dict) -> int:
        """The seed of an image's own random stream (its pixels and mask do not depend on the others)."""
        return int(row["dicom_id"][:8], 16)

    def image_id(self, rng, subject: int, study: int, study_number: int, view_number: int, view: str,
                 split: str) -> str:
        return "-".join(f"{v:08x}" for v in rng.integers(0, 2 ** 32, 5))

    def relpath(self, row: dict, split: str = "train") -> str:
        return jpg_relpath(row["subject_id"], row["study_id"], row["dicom_id"])

    def stored_size(self, height: int, width: int) -> tuple[int, int]:
        """The file's size for a CheXmask frame of ``height x width`` (a downscaled copy is smaller)."""
        return height, width

    def encode(self, pixels: np.ndarray, rng) -> bytes:
        h, w = self.stored_size(*pixels.shape)
        if (h, w) != pixels.shape:
            pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.LANCZOS))
        return jpeg_bytes(pixels)

    def resized(self, data: bytes, rng) -> bytes:
        """The file re-encoded at another size and aspect ratio (the planted size mismatch)."""
        with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as im:
            small = im.convert("L").resize((im.width - max(7, im.width // 8), im.height - 5))
            fmt = im.format
        buf = io.BytesIO()
        small.save(buf, fmt)
        return buf.getvalue()

    def landmark_text(self, points: np.ndarray) -> str:
        """``back_mimic.py`` wrote the MIMIC landmarks as a NumPy repr."""
        return np.array2string(points, separator=" ", threshold=10 ** 6)

    def write_tables(self, root: Path, meta, labels, split, rng, truth_rows=()) -> None:
        for name, df in (("metadata", meta.drop(columns=["relpath"])), ("chexpert", labels),
                         ("negbio", _negbio(labels, rng)), ("split", split)):
            _write_csv(root / f"{PREFIX}-{name}.csv.gz", df, gz=True)

    def write_boxes(self, root: Path, truth_rows: list[dict]) -> None:
        """Radiologists' boxes in the archive's own format, where it has them (MIMIC-CXR: none)."""

    def write_chexmask(self, chexmask_dir: Path, masks: pd.DataFrame) -> Path:
        path = chexmask_dir / f"{self.chexmask_file}.csv"
        _write_csv(path, masks.rename(columns={"dicom_id": ID_COLUMNS[self.chexmask_file]}), gz=False)
        return path


def region_boxes(truth_row: dict) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) pixel edges of each connected region where the phantom drew a finding: the
    boxes its radiologists draw (NIH, VinDr)."""
    labelled, n = ndimage.label(decode_rle(truth_row["RLE"], (truth_row["Height"], truth_row["Width"])))
    return [(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) for sl in ndimage.find_objects(labelled)[:n]]


class _OpenArchiveLayout(Layout):
    """What NIH's and CheXpert's layouts share: patients numbered from 1, and the landmarks as the
    flat comma-separated list their CheXmask files use (as in the real samples)."""

    def subjects(self, rng, n: int) -> np.ndarray:
        return np.arange(1, n + 1)

    def image_seed(self, row: dict) -> int:
        return int(stable_hash(row["dicom_id"])[:8], 16)

    def landmark_text(self, points: np.ndarray) -> str:
        return ",".join(str(int(v)) for v in points.reshape(-1))


def _negbio(labels: pd.DataFrame, rng) -> pd.DataFrame:
    """NegBio disagrees with CheXpert on a few labels, as the real labelers do."""
    out = labels.copy()
    for name in FINDINGS:
        numeric = pd.to_numeric(out[name], errors="coerce")
        flip = rng.random(len(out)) < 0.03
        out.loc[flip & (numeric == -1).to_numpy(), name] = 1.0
    return out
