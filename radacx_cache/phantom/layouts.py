"""The phantom's three file and table layouts: MIMIC-CXR-JPG, NIH ChestX-ray14, CheXpert (docs/archives.md).

The generator (``phantom.py``) draws patients, studies, findings and anatomy once, in one internal
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
from scipy import ndimage
from PIL import Image

from .._io import atomic_path, jpeg_bytes, stable_hash
from ..findings import FINDINGS
from ..sources import chexpert, nih
from ..sources.chexmask import ID_COLUMNS, decode_rle
from ..findings import FINDINGS_ALL
from ..sources.mimic import PREFIX, jpg_relpath

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

    def relpath(self, row: dict) -> str:
        return jpg_relpath(row["subject_id"], row["study_id"], row["dicom_id"])

    def stored_size(self, height: int, width: int) -> tuple[int, int]:
        """The file's size for a CheXmask frame of ``height x width`` (a downscaled copy is smaller)."""
        return height, width

    def encode(self, pixels: np.ndarray, rng) -> bytes:
        h, w = self.stored_size(*pixels.shape)
        if (h, w) != pixels.shape:
            pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.LANCZOS))
        return jpeg_bytes(pixels)

    def landmark_text(self, points: np.ndarray) -> str:
        """``back_mimic.py`` wrote the MIMIC landmarks as a NumPy repr."""
        return np.array2string(points, separator=" ", threshold=10 ** 6)

    def write_tables(self, root: Path, meta, labels, split, rng) -> None:
        for name, df in (("metadata", meta.drop(columns=["relpath"])), ("chexpert", labels),
                         ("negbio", _negbio(labels, rng)), ("split", split)):
            _write_csv(root / f"{PREFIX}-{name}.csv.gz", df, gz=True)

    def write_boxes(self, root: Path, truth_rows: list[dict]) -> None:
        """Radiologists' boxes in the archive's own format, where it has them (MIMIC-CXR: none)."""

    def write_chexmask(self, chexmask_dir: Path, masks: pd.DataFrame) -> Path:
        path = chexmask_dir / f"{self.chexmask_file}.csv"
        _write_csv(path, masks.rename(columns={"dicom_id": ID_COLUMNS[self.chexmask_file]}), gz=False)
        return path


class _OpenArchiveLayout(Layout):
    """What NIH's and CheXpert's layouts share: patients numbered from 1, and the landmarks as the
    flat comma-separated list their CheXmask files use (as in the real samples)."""

    def subjects(self, rng, n: int) -> np.ndarray:
        return np.arange(1, n + 1)

    def image_seed(self, row: dict) -> int:
        return int(stable_hash(row["dicom_id"])[:8], 16)

    def landmark_text(self, points: np.ndarray) -> str:
        return ",".join(str(int(v)) for v in points.reshape(-1))


class NIHLayout(_OpenArchiveLayout):
    """``Data_Entry_2017_v2020.csv``, ``train_val_list.txt``, ``test_list.txt``, ``images/*.png``."""
    name = "nih"
    subdir = "ChestXray-NIHCC"
    chexmask_file = "ChestX-Ray8"
    square = True
    frontal_only = True
    rgba_share = 0.02  # a few released PNGs are RGBA

    def split(self, rng) -> str:
        return "test" if rng.random() < 0.2 else "train"

    def study_id(self, study_pool, study_number: int) -> int:
        return study_number  # Follow-up #: 0, 1, ... per patient

    def image_id(self, rng, subject, study, study_number, view_number, view, split) -> str:
        return f"{subject:08d}_{study:03d}.png"

    def relpath(self, row: dict) -> str:
        return nih.png_relpath(row["dicom_id"])

    def encode(self, pixels: np.ndarray, rng) -> bytes:
        im = Image.fromarray(pixels)
        if rng.random() < self.rgba_share:
            im = im.convert("RGBA")
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    def write_boxes(self, root: Path, truth_rows: list[dict]) -> None:
        """``BBox_List_2017.csv`` in NIH's exact format (header ``Bbox [x,y,w,h],,,``, coordinates in the
        1024 x 1024 frame): one box around each connected region where a finding NIH boxes was drawn."""
        names = {v: k for k, v in nih.BOX_LABELS.items() if v}
        rows = []
        for t in truth_rows:
            if t["finding"] not in names:
                continue
            region = decode_rle(t["RLE"], (t["Height"], t["Width"]))
            labelled, n = ndimage.label(region)
            for sl in ndimage.find_objects(labelled)[:n]:
                fy, fx = nih.BBOX_FRAME / t["Height"], nih.BBOX_FRAME / t["Width"]
                y, x = sl[0].start * fy, sl[1].start * fx
                rows.append(f"{t['dicom_id']},{names[t['finding']]},{x!r},{y!r},{(sl[1].stop - sl[1].start) * fx!r},"
                            f"{(sl[0].stop - sl[0].start) * fy!r}\n")
        with atomic_path(root / nih.BBOX_NAME) as tmp:
            tmp.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + "".join(rows))

    def write_tables(self, root: Path, meta, labels, split, rng) -> None:
        df = meta.merge(labels, on=["subject_id", "study_id"], how="inner")  # a study without labels: no row
        names = {v: k for k, v in nih.NIH_LABELS.items() if v}
        finding_labels = []
        for row in df.to_dict("records"):
            tokens = [names[c] for c in names if c != "No Finding" and row[c] == 1]
            tokens += [str(row[c]) for c in FINDINGS if isinstance(row[c], str)]  # a planted bad label
            finding_labels.append("|".join(tokens) or "No Finding")
        n = len(df)
        entry = pd.DataFrame({
            "Image Index": df["dicom_id"], "Finding Labels": finding_labels, "Follow-up #": df["study_id"],
            "Patient ID": df["subject_id"], "Patient Age": rng.integers(20, 90, n),
            "Patient Gender": rng.choice(["M", "F"], n), "View Position": df["ViewPosition"],
            # the size *before* NIH resized the PNGs to 1024 x 1024: never the PNG's size
            "OriginalImage[Width": rng.integers(2000, 3000, n), "Height]": rng.integers(2000, 3000, n),
            "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143})
        # the real header: two bracketed names, each holding a comma, make four columns
        header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                  "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
        root.mkdir(parents=True, exist_ok=True)
        with atomic_path(root / nih.DATA_ENTRY_NAMES[0]) as tmp:
            tmp.write_text(header + entry.to_csv(index=False, header=False))
        for list_name, which in nih.SPLIT_LISTS.items():
            ids = split.loc[split["split"].replace({"validate": "train"}) == which, "dicom_id"]
            with atomic_path(root / list_name) as tmp:
                tmp.write_text("".join(f"{i}\n" for i in sorted(ids)))


class CheXpertLayout(_OpenArchiveLayout):
    """``CheXpert-v1.0-small/{train,valid}.csv`` and ``{train,valid}/patientNNNNN/studyN/viewN_*.jpg``,
    downscaled from CheXmask's frame as the widely used -small copy is."""
    name = "chexpert"
    subdir = "chexpert"
    chexmask_file = "CheXpert"
    prefix = chexpert.PREFIXES[0]

    def split(self, rng) -> str:
        return "test" if rng.random() < 0.15 else "train"

    def study_id(self, study_pool, study_number: int) -> int:
        return study_number + 1  # studyN: 1, 2, ... per patient

    def image_id(self, rng, subject, study, study_number, view_number, view, split) -> str:
        table = "valid" if split == "test" else "train"
        kind = "lateral" if view == "LATERAL" else "frontal"
        return f"{table}/patient{subject:05d}/study{study}/view{view_number + 1}_{kind}.jpg"

    def relpath(self, row: dict) -> str:
        return chexpert.jpg_relpath(self.prefix, row["dicom_id"])

    def stored_size(self, height: int, width: int) -> tuple[int, int]:
        return round(height * SMALL_SCALE), round(width * SMALL_SCALE)

    def write_tables(self, root: Path, meta, labels, split, rng) -> None:
        df = meta.merge(labels, on=["subject_id", "study_id"], how="inner")
        n = len(df)
        lateral = df["ViewPosition"] == "LATERAL"
        table = pd.DataFrame({
            "Path": self.prefix + "/" + df["dicom_id"], "Sex": rng.choice(["Female", "Male"], n),
            "Age": rng.integers(20, 90, n), "Frontal/Lateral": np.where(lateral, "Lateral", "Frontal"),
            "AP/PA": np.where(lateral, None, df["ViewPosition"])})
        for col in chexpert_label_order():
            table[col] = [_label_cell(v) for v in df[col]]
        is_valid = df["dicom_id"].str.startswith("valid/")
        for name, rows in (("train", ~is_valid), ("valid", is_valid)):
            _write_csv(root / self.prefix / f"{name}.csv", table[rows.to_numpy()], gz=False)


def chexpert_label_order() -> list[str]:
    """The 14 label columns in the order of CheXpert's train.csv."""
    return ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices"]


def _negbio(labels: pd.DataFrame, rng) -> pd.DataFrame:
    """NegBio disagrees with CheXpert on a few labels, as the real labelers do."""
    out = labels.copy()
    for name in FINDINGS:
        numeric = pd.to_numeric(out[name], errors="coerce")
        flip = rng.random(len(out)) < 0.03
        out.loc[flip & (numeric == -1).to_numpy(), name] = 1.0
    return out


LAYOUTS = {layout.name: layout for layout in (Layout(), NIHLayout(), CheXpertLayout())}
assert sorted(chexpert_label_order()) == sorted(FINDINGS_ALL)
