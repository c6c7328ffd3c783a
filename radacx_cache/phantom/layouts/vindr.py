"""The VinDr-CXR (PhysioNet 1.0.0) layout of the phantom."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ...findings import FINDINGS
from ...sources import vindr
from .base import _OpenArchiveLayout, _write_csv, region_boxes


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
    # an image *is* its readers' rows (none: no image), a repeated row is the same mark, no view in the tables
    faults_not_in_layout = {"missing_label_row", "duplicate_label_row", "blank_view"}
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
        from ...sources.dicom import decode_dicom
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
