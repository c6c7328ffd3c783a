"""The phantom's file and table layouts: MIMIC-CXR-JPG, NIH ChestX-ray14, CheXpert, VinDr-CXR (docs/archives.md).

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
from ..sources import chexpert, nih, vindr
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
    one_image_per_patient = False  # VinDr: no patient ids, every image its own patient

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

    def relpath(self, row: dict, split: str = "train") -> str:
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
            fy, fx = nih.BBOX_FRAME / t["Height"], nih.BBOX_FRAME / t["Width"]
            for x0, y0, x1, y1 in region_boxes(t):
                rows.append(f"{t['dicom_id']},{names[t['finding']]},{x0 * fx!r},{y0 * fy!r},{(x1 - x0) * fx!r},"
                            f"{(y1 - y0) * fy!r}\n")
        with atomic_path(root / nih.BBOX_NAME) as tmp:
            tmp.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + "".join(rows))

    def write_tables(self, root: Path, meta, labels, split, rng, truth_rows=()) -> None:
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

    def relpath(self, row: dict, split: str = "train") -> str:
        return chexpert.jpg_relpath(self.prefix, row["dicom_id"])

    def stored_size(self, height: int, width: int) -> tuple[int, int]:
        return round(height * SMALL_SCALE), round(width * SMALL_SCALE)

    def write_tables(self, root: Path, meta, labels, split, rng, truth_rows=()) -> None:
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


class VinDrLayout(_OpenArchiveLayout):
    """PhysioNet's VinDr-CXR 1.0.0: ``annotations/annotations_{train,test}.csv`` (one row per reader,
    finding and box; three readers per training image, one consensus reading per test image) and
    ``{train,test}/<image_id>.dicom``: 16-bit DICOMs with a modality rescale, a VOI window and, for
    some, MONOCHROME1, so that only the full display pipeline gives back the drawn pixels."""
    name = "vindr"
    subdir = "vindr-cxr/1.0.0"
    chexmask_file = "VinDr-CXR"
    frontal_only = True
    one_image_per_patient = True
    readers = tuple(f"R{i}" for i in range(1, 18))
    monochrome1_share = 0.3
    unwindowed_share = 0.1  # no window in the header: the reader's percentile window applies

    def split(self, rng) -> str:
        return "test" if rng.random() < 0.17 else "train"

    def study_id(self, study_pool, study_number: int) -> int:
        return study_number

    def image_id(self, rng, subject, study, study_number, view_number, view, split) -> str:
        return "".join(f"{v:08x}" for v in rng.integers(0, 2 ** 32, 4))

    def relpath(self, row: dict, split: str = "train") -> str:
        return vindr.dicom_relpath("test" if split == "test" else "train", row["dicom_id"])

    def encode(self, pixels: np.ndarray, rng) -> bytes:
        """A DICOM whose stored values, through RescaleSlope/Intercept and the linear VOI window (and
        MONOCHROME1's inversion), give back ``pixels`` to within one grey level."""
        mono1 = rng.random() < self.monochrome1_share
        # a negative intercept only with MONOCHROME2: torchxrayvision inverts MONOCHROME1 as 2**bits - x,
        # which assumes values >= 0 (its reader would refuse the image, not ours)
        slope, intercept = float(rng.choice([1.0, 0.5])), 0.0 if mono1 else float(rng.choice([0.0, -1024.0]))
        lo, hi = rng.uniform(200, 600), rng.uniform(3300, 3900)  # stored values of black and white
        v_lo, v_hi = slope * lo + intercept, slope * hi + intercept
        width, center = v_hi - v_lo + 1, (v_lo + v_hi) / 2 + 0.5
        grey = pixels.astype(np.float64) / 255
        if mono1:
            grey = 1 - grey
        values = center - 0.5 + (grey - 0.5) * (width - 1)
        # as in real radiographs, values beyond the window (collimator, markers) that it clips
        values[grey <= 0] -= slope * rng.uniform(300, 900)
        values[grey >= 1] += slope * rng.uniform(300, 900)
        stored = np.clip(np.round((values - intercept) / slope), 0, 4095).astype(np.uint16)
        return dicom_bytes(stored, "MONOCHROME1" if mono1 else "MONOCHROME2", slope, intercept,
                           None if rng.random() < self.unwindowed_share else (center, width))

    def resized(self, data: bytes, rng) -> bytes:
        from ..sources.dicom import decode_dicom
        grey, (h, w) = decode_dicom(data)
        return self.encode(np.asarray(Image.fromarray(grey).resize((w - max(7, w // 8), h - 5))), rng)

    def write_tables(self, root: Path, meta, labels, split, rng, truth_rows=()) -> None:
        """The two annotation tables: each training image read by three of the 17 readers (a drawn
        finding marked by all three or two of them, a half-strength one by one), each test image by
        one consensus; every mark with that reader's box around the drawn region."""
        df = meta.merge(labels, on=["subject_id", "study_id"], how="inner")
        regions = {(t["dicom_id"], t["finding"]): region_boxes(t) for t in truth_rows}
        names = {v: k for k, v in vindr.CLASS_NAMES.items() if v in FINDINGS}
        official = dict(zip(split["dicom_id"], split["split"]))
        tables: dict = {"train": [], "test": []}
        for row in df.to_dict("records"):
            which = "test" if official[row["dicom_id"]] == "test" else "train"
            readers = ["consensus"] if which == "test" else list(rng.choice(self.readers, 3, replace=False))
            marked = {r: [] for r in readers}
            for finding in FINDINGS:
                value = row[finding]
                if isinstance(value, str):  # a planted bad label: a class name VinDr does not have
                    marked[readers[0]].append((value, None))
                    continue
                n = (1 if value == 1 else 0) if which == "test" else \
                    (3 if rng.random() < 0.75 else 2) if value == 1 else 1 if value == -1 else 0
                for reader in readers[:n]:
                    for box in regions.get((row["dicom_id"], finding)) or [_central_box(row)]:
                        marked[reader].append((names[finding].capitalize(), _jitter(box, row, rng)))
            for reader, marks in marked.items():
                for name, box in marks or [("No finding", None)]:
                    cells = ["" if box is None else f"{v:.1f}" for v in (box or (0, 0, 0, 0))]
                    tables[which].append([row["dicom_id"], reader, name, *cells])
        for which, rows in tables.items():
            out = pd.DataFrame(rows, columns=["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"])
            if which == "test":  # one consensus reading (the phantom writes it without reader ids)
                out = out.drop(columns="rad_id")
            _write_csv(root / vindr.PHYSIONET_TABLES[which], out, gz=False)


def _central_box(row: dict) -> tuple:
    h, w = row["Rows"], row["Columns"]
    return (w / 4, h / 4, 3 * w / 4, 3 * h / 4)


def _jitter(box: tuple, row: dict, rng) -> tuple:
    """One reader's box around a region: each edge moved by ~1.5% of the image, kept inside it."""
    h, w = row["Rows"], row["Columns"]
    x0, y0, x1, y1 = (v + rng.normal(0, 0.015 * s) for v, s in zip(box, (w, h, w, h)))
    x0, y0 = float(np.clip(x0, 0, w - 2)), float(np.clip(y0, 0, h - 2))
    return x0, y0, float(np.clip(x1, x0 + 2, w)), float(np.clip(y1, y0 + 2, h))


def dicom_bytes(stored: np.ndarray, photometric: str, slope: float, intercept: float, window) -> bytes:
    """A Digital X-Ray (for presentation) DICOM file of 12-bit values in 16 bits, explicit VR little endian."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[stored.tobytes()[:4096].hex()])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", ""
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:.2f}", f"{window[1]:.2f}"
    ds.PixelData = stored.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


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


LAYOUTS = {layout.name: layout for layout in (Layout(), NIHLayout(), CheXpertLayout(), VinDrLayout())}
assert sorted(chexpert_label_order()) == sorted(FINDINGS_ALL)
