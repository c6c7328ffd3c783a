"""DICOM radiographs (VinDr-CXR) to 8-bit grey, as a radiologist's viewer shows them (docs/archives.md).

The display pipeline of the DICOM standard (PS3.3 C.11), in order:

1. the stored values (8 or 16 bits, signed or not) through the **modality LUT**: ``RescaleSlope`` and
   ``RescaleIntercept``, or a Modality LUT Sequence (``pydicom.pixels.apply_modality_lut``);
2. the **VOI window**: the first ``WindowCenter`` / ``WindowWidth`` pair with the standard's linear
   function (C.11.2.1.2.1), or a VOI LUT Sequence (``pydicom.pixels.apply_voi_lut``); without either,
   the 0.5th to 99.5th percentile (as for 16-bit PNGs: a hot pixel cannot turn the image black);
3. **MONOCHROME1** (the lowest value is white) inverted, so that bone is always bright.

Only what a chest radiograph is is accepted: one frame, one sample per pixel, MONOCHROME1/2,
8 or 16 bits allocated, a size checked against CheXmask's frame and a pixel budget *before* the pixel
data is decoded, finite rescale and window numbers. Compressed transfer syntaxes decode where pydicom
has a handler for them (pylibjpeg, gdcm); without one the image is rejected with the syntax named.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math

import numpy as np

from .._lazy import LazyModule

pydicom = LazyModule("pydicom")  # imported on the first DICOM: the other archives never need it
filereader = LazyModule("pydicom.filereader")
MAGIC_OFFSET = 128  # a DICOM file: 128-byte preamble, then b"DICM" (PS3.10 7.1)
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


class DicomError(ValueError):
    """A DICOM file that is not a readable chest radiograph (the reason says why)."""


def is_dicom(data: bytes) -> bool:
    return data[MAGIC_OFFSET:MAGIC_OFFSET + 4] == b"DICM"


def _number(ds, keyword: str, default=None):
    """A numeric attribute as float (the first of a multi-valued one), checked finite; ``default``
    where absent."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    if not isinstance(value, (int, float)) and hasattr(value, "__len__") and not isinstance(value, str):
        value = value[0] if len(value) else None
        if value is None:
            return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DicomError(f"{keyword} {str(value)[:30]!r} is not a number") from None
    if not math.isfinite(out):
        raise DicomError(f"{keyword} is {out} (not finite)")
    return out


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian


def _integer(ds, keyword: str, default=None, low: int = 0, high: int = 1 << 20) -> int | None:
    """An integer attribute, checked: present (or ``default``), a whole number in [low, high]. Every
    integer of the header is read here (an empty ``Rows`` is a DicomError, not ``int(None)``)."""
    if keyword in ds and ds.get(keyword) in (None, ""):
        raise DicomError(f"{keyword} is empty (a header element without a value)")
    value = _number(ds, keyword, default)
    if value is None:
        raise DicomError(f"DICOM file has no {keyword}")
    if value != int(value) or not low <= value <= high:
        raise DicomError(f"{keyword} {value:g} is not a whole number in [{low}, {high}]")
    return int(value)


def transfer_syntax(data: bytes) -> str:
    """The file meta's TransferSyntaxUID, read before the dataset (whose parsing may inflate it)."""
    fp = io.BytesIO(data)
    try:
        filereader.read_preamble(fp, False)
        meta = filereader._read_file_meta_info(fp)  # pydicom 3's reader of group 0002 alone (pinned < 4)
    except Exception as exc:
        raise DicomError(f"cannot read the DICOM file meta ({type(exc).__name__}: {str(exc)[:120]})") from None
    return str(meta.get("TransferSyntaxUID", "")).strip()


def read_header(data: bytes):
    """The parsed dataset, its attributes checked; the pixel data not yet decoded. The file meta is read
    first: a deflated dataset is refused before pydicom inflates it (a 1 MB file can inflate to 1 GiB)."""
    if not is_dicom(data):
        raise DicomError("not a DICOM file (no 'DICM' after the 128-byte preamble)")
    if transfer_syntax(data) == DEFLATED:
        raise DicomError("transfer syntax Deflated Explicit VR Little Endian is refused (the whole dataset would be "
                         "inflated before any size check); save the file uncompressed or as JPEG / JPEG 2000")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except Exception as exc:
        raise DicomError(f"cannot parse the DICOM file ({type(exc).__name__}: {str(exc)[:120]})") from None
    for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation", "PixelData"):
        if keyword not in ds:
            raise DicomError(f"DICOM file has no {keyword}")
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric not in PHOTOMETRIC:
        raise DicomError(f"PhotometricInterpretation {photometric[:20]!r} is not MONOCHROME1/2 (not a grey radiograph)")
    if _integer(ds, "SamplesPerPixel", 1) != 1 or (_integer(ds, "NumberOfFrames", 1) or 1) != 1:
        raise DicomError("DICOM file holds several samples per pixel or several frames (not one grey radiograph)")
    if _integer(ds, "BitsAllocated") not in (8, 16):
        raise DicomError(f"BitsAllocated {_integer(ds, 'BitsAllocated')} is not 8 or 16")
    _integer(ds, "Rows", low=1), _integer(ds, "Columns", low=1)
    return ds


def to_grey(ds) -> np.ndarray:
    """(Rows, Columns) uint8: modality LUT, VOI window, MONOCHROME1 inverted (the module docstring)."""
    try:
        stored = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise DicomError(f"cannot decode the pixel data (transfer syntax {name}: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160]})") from None
    rows, cols = _integer(ds, "Rows", low=1), _integer(ds, "Columns", low=1)
    if stored.shape != (rows, cols):
        raise DicomError(f"pixel data is {stored.shape}, not the declared {rows}x{cols}")
    slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
    if slope == 0:
        raise DicomError("RescaleSlope is 0 (every pixel would be the same)")
    if "ModalityLUTSequence" in ds:
        values = np.asarray(_lut(pydicom.pixels.apply_modality_lut, stored, ds, "Modality LUT"), np.float64)
    else:
        values = stored.astype(np.float64) * slope + intercept
    center, width = _number(ds, "WindowCenter"), _number(ds, "WindowWidth")
    if center is not None and width is not None:
        if width < 1:
            raise DicomError(f"WindowWidth {width:g} < 1 (the standard's minimum)")
        grey = linear_window(values, center, width)
    else:
        if "VOILUTSequence" in ds:
            values = np.asarray(_lut(pydicom.pixels.apply_voi_lut, values, ds, "VOI LUT"), np.float64)
        grey = percentile_window(values, min_range=1e-9)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        grey = 1.0 - grey
    return np.round(grey * 255).astype(np.uint8)


def _lut(apply, values, ds, what: str):
    """A LUT sequence applied by pydicom; a descriptor that promises more entries than its data holds
    (or any other malformed LUT) is a DicomError naming it."""
    try:
        out = apply(values, ds)
    except Exception as exc:
        raise DicomError(f"{what} Sequence cannot be applied ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not np.isfinite(np.asarray(out, np.float64)).all():
        raise DicomError(f"{what} Sequence gives non-finite values")
    return out


def percentile_window(values: np.ndarray, min_range: float) -> np.ndarray:
    """[0, 1] between the 0.5th and 99.5th percentile (a hot pixel cannot turn the image black): the
    window of an image that brings none (a 16-bit PNG too), over at least ``min_range`` values."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    return np.clip((values - lo) / max(float(hi - lo), min_range), 0, 1)


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM standard's linear VOI function (PS3.3 C.11.2.1.2.1), scaled to [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) if width > 1 else \
        (values > center - 0.5).astype(np.float64)


@contextlib.contextmanager
def _pydicom_quiet():
    """pydicom logs an ERROR and a traceback for every pixel decoder that fails before it raises; that
    failure becomes this file's one-line reject row, so its log records are dropped while decoding."""
    names = [n for n in list(logging.root.manager.loggerDict) if n == "pydicom" or n.startswith("pydicom.")]
    loggers = [logging.getLogger(n) for n in names]  # records are emitted by the module loggers themselves
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was


def decode_dicom(data: bytes, expected: tuple[int, int] | None = None, max_pixels: int = 64_000_000,
                 fits=None) -> tuple[np.ndarray, tuple[int, int]]:
    """8-bit grey pixels and (Rows, Columns) of a DICOM radiograph. The size is checked against
    ``expected`` (with ``fits(size, expected)``, exact equality by default) and ``max_pixels`` before
    the pixel data is decoded. Any failure inside pydicom (it converts a header element when it is
    first read: a wrong length, an unknown VR) is a DicomError naming what pydicom said."""
    try:
        with _pydicom_quiet():
            return _decode(data, expected, max_pixels, fits)
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001  a malformed element read lazily: this file's reject, one line
        raise DicomError(f"malformed DICOM header or pixel data ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160]})") from None


def _decode(data: bytes, expected, max_pixels: int, fits) -> tuple[np.ndarray, tuple[int, int]]:
    ds = read_header(data)
    size = (_integer(ds, "Rows", low=1), _integer(ds, "Columns", low=1))
    if expected is not None:
        want = tuple(int(v) for v in expected)
        if not (fits(size, want) if fits else size == want):
            raise DicomError(f"image is {size[0]}x{size[1]} but the tables / CheXmask say {want[0]}x{want[1]}; "
                             f"not decoded")
    if size[0] * size[1] > max_pixels or min(size) < 1:
        raise DicomError(f"image declares {size[0]}x{size[1]} pixels (allowed: 1 to {max_pixels}); not decoded")
    return to_grey(ds), size
