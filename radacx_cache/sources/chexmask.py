"""Reader of the CheXmask tables (docs/archives.md).

RLE convention (CheXmask ``DataPostprocessing/utils.py``): whitespace-separated ``start length``
pairs, starts 1-based and strictly increasing, over the row-major flattening of a
``Height x Width`` mask; runs may wrap across rows. Foreground is 255 in the reference decoder; we
return booleans.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ._tables import decoded_chunks, read_table, require_columns

MASK_COLUMNS = {"right_lung": "Right Lung", "left_lung": "Left Lung", "heart": "Heart"}
MASK_NAMES = ("right_lung", "left_lung", "heart")  # order of every mask stack in this project
LANDMARK_SPLIT = {"right_lung": (0, 44), "left_lung": (44, 94), "heart": (94, 120)}
QUALITY_MEAN, QUALITY_MAX = "Dice RCA (Mean)", "Dice RCA (Max)"
# the image-id column of each CheXmask file (its name without .csv / .csv.gz)
GENERIC_MASK_TABLE = "radacx-generic"  # not a CheXmask file: a generic archive's masks in CheXmask's format
ID_COLUMNS = {"MIMIC-CXR-JPG": "dicom_id", "ChestX-Ray8": "Image Index", "CheXpert": "Path",
              "Padchest": "ImageID", "VinDr-CXR": "image_id", "CANDID-PTX": "ImageID", GENERIC_MASK_TABLE: "image"}
SWAPPED_SHARE = 0.9  # Mean > Max on this share of a file's first rows: its header has the two swapped
log = logging.getLogger(__name__)
_INT = re.compile(r"-?\d+")
_UINT = re.compile(r"[0-9]+")


class RLEError(ValueError):
    """An RLE string breaks the CheXmask convention."""


def parse_rle(text: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Validate an RLE string and return 0-based (starts, ends) with ``ends`` exclusive.

    Every field must be a plain non-negative decimal integer; starts and lengths are checked
    against the mask size as Python integers *before* any int64 arithmetic, so no value can overflow
    or wrap. Raises RLEError naming the offending field or run.
    """
    height, width = shape
    if text is None or (isinstance(text, float) and np.isnan(text)) or not isinstance(text, str):
        raise RLEError("RLE is empty (blank cell)" if text is None or isinstance(text, float)
                       else f"RLE is not text ({type(text).__name__})")
    fields = text.split()
    if not fields:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    joined = "".join(fields)
    if not (joined.isascii() and joined.isdigit()):  # one C-level check for the common, valid case
        bad = next(f for f in fields if not _UINT.fullmatch(f))
        raise RLEError(f"RLE has a field {bad[:40]!r} that is not a non-negative integer")
    if len(fields) % 2:
        raise RLEError(f"RLE has an odd number of fields ({len(fields)}); expected start/length pairs")
    size = height * width
    longest = max(fields, key=len)
    if len(longest) > 18:  # would not fit int64 arithmetic; no real mask is that large
        raise RLEError(f"RLE value {longest[:40]} runs past the end of the {height}x{width} mask ({size} pixels)")
    values = np.array(fields, dtype=np.int64)
    if values.max() > size:  # checked before any addition, so starts + lengths cannot wrap
        raise RLEError(f"RLE value {values.max()} runs past the end of the {height}x{width} mask ({size} pixels)")
    starts = values[0::2] - 1
    lengths = values[1::2]
    if starts[0] < 0:
        raise RLEError(f"RLE start {starts[0] + 1} < 1 (starts are 1-based)")
    if np.any(lengths <= 0):
        i = int(np.argmax(lengths <= 0))
        raise RLEError(f"RLE run {i} has non-positive length {lengths[i]}")
    if np.any(np.diff(starts) <= 0):
        i = int(np.argmax(np.diff(starts) <= 0)) + 1
        raise RLEError(f"RLE starts not strictly increasing at run {i} "
                       f"({starts[i - 1] + 1} then {starts[i] + 1})")
    ends = starts + lengths
    if ends[-1] > size:
        raise RLEError(f"RLE runs past the end of a {height}x{width} mask "
                       f"(last pixel {ends[-1]} > {size})")
    if np.any(ends[:-1] > starts[1:]):
        i = int(np.argmax(ends[:-1] > starts[1:]))
        raise RLEError(f"RLE runs {i} and {i + 1} overlap")
    return starts, ends


def decode_rle(text: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode a CheXmask RLE string to a boolean (H, W) mask at full resolution."""
    starts, ends = parse_rle(text, shape)
    height, width = shape
    delta = np.zeros(height * width + 1, np.int8)
    np.add.at(delta, starts, 1)
    np.add.at(delta, ends, -1)
    return np.cumsum(delta[:-1], dtype=np.int8).astype(bool).reshape(height, width)


def encode_rle(mask: np.ndarray) -> str:
    """Encode a boolean/0-255 mask exactly as CheXmask's ``get_RLE_from_mask`` does."""
    flat = np.concatenate([[0], (np.asarray(mask).reshape(-1) > 0).astype(np.int8), [0]])
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    change[1::2] -= change[0::2]
    return " ".join(map(str, change))


def sample_rle(starts: np.ndarray, ends: np.ndarray, width: int,
               rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Mask values at the grid ``rows x cols`` (pixel indices, -1 = outside) without a full decode.

    The hot path of the shard renderer, where a 3000x2500 mask is only ever needed at 224 (or 448)
    sample points. The distinct inside rows and columns make a sorted list of flat indices, so the
    runs are located *in the grid* (2 x runs binary searches, then one cumulative sum) rather than
    every grid point in the runs: the same values as ``sample_rle_direct``, a few times faster.
    """
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    out = np.zeros((len(rows), len(cols)), bool)
    ri, ci = np.flatnonzero(rows >= 0), np.flatnonzero(cols >= 0)
    if starts.size == 0 or not len(ri) or not len(ci):
        return out
    urows, rinv = _distinct(rows[ri])
    ucols, cinv = _distinct(cols[ci])
    flat = (urows[:, None] * width + ucols[None, :]).ravel()  # strictly increasing (ucols < width)
    first = np.searchsorted(flat, starts, side="left")  # first grid point of each run [start, end)
    stop = np.searchsorted(flat, ends, side="left")
    delta = np.bincount(first, minlength=len(flat) + 1) - np.bincount(stop, minlength=len(flat) + 1)
    block = (np.cumsum(delta[:-1]) > 0).reshape(len(urows), len(ucols))
    block = block if rinv is None else block[rinv]
    block = block if cinv is None else block[:, cinv]
    if ri[-1] - ri[0] + 1 == len(ri) and ci[-1] - ci[0] + 1 == len(ci):  # sample_grid's case: one block
        out[ri[0]:ri[-1] + 1, ci[0]:ci[-1] + 1] = block
    else:
        out[np.ix_(ri, ci)] = block
    return out


def _distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(sorted distinct values, where each value went), or (values, None) when already strictly increasing."""
    if len(values) < 2 or (np.diff(values) > 0).all():
        return values, None
    return np.unique(values, return_inverse=True)


def sample_rle_direct(starts: np.ndarray, ends: np.ndarray, width: int,
                      rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``sample_rle`` by a binary search of every grid point in the runs (the reference it is tested against)."""
    r = rows[:, None].astype(np.int64)
    c = cols[None, :].astype(np.int64)
    flat = r * width + c
    inside = (r >= 0) & (c >= 0)
    if starts.size == 0:
        return np.zeros(flat.shape, bool)
    run = np.searchsorted(starts, flat, side="right") - 1
    hit = (run >= 0) & (flat < ends[np.maximum(run, 0)])
    return hit & inside


def parse_landmarks(text) -> dict[str, np.ndarray]:
    """Parse the ``Landmarks`` cell in any of its known forms (flat list, NumPy repr, JSON).

    Returns (x, y) = (column, row) points per organ: right lung 44, left lung 50, heart 26.
    """
    values = [int(v) for v in _INT.findall(str(text))] if isinstance(text, str) else []
    if len(values) != 240:
        raise ValueError(f"Landmarks: expected 240 integers (120 points), found {len(values)}")
    points = np.array(values, dtype=np.int64).reshape(120, 2)
    return {name: points[a:b] for name, (a, b) in LANDMARK_SPLIT.items()}


def polygon_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a closed landmark contour as a filled polygon (how CheXmask masks were made)."""
    height, width = shape
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(map(int, p)) for p in points], fill=255, outline=255)
    return np.asarray(canvas) > 0


def _float_or_nan(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce")


def _chexmask_columns(path: Path, id_column: str, with_rle: bool) -> list[str]:
    wanted = [id_column, QUALITY_MEAN, QUALITY_MAX, "Height", "Width"]
    if with_rle:
        wanted += ["Landmarks", *MASK_COLUMNS.values()]
    require_columns(path, wanted, what="CheXmask table ")
    return wanted


def id_column_for(path: str | Path) -> str:
    """The image-id column of a CheXmask file, from its name (``ChestX-Ray8.csv`` -> ``Image Index``)."""
    name = Path(path).name.removesuffix(".gz").removesuffix(".csv")
    if name not in ID_COLUMNS:
        raise ValueError(f"{path}: not a CheXmask file name this reader knows ({', '.join(ID_COLUMNS)}); "
                         f"pass id_column=")
    return ID_COLUMNS[name]


def dice_columns_swapped(chunk: pd.DataFrame) -> bool:
    """True when nearly every row has Dice RCA (Mean) > (Max): the file's header swapped the two
    (the mean of five values cannot exceed their maximum), as in CheXmask's PadChest sample."""
    mean, top = _float_or_nan(chunk[QUALITY_MEAN]), _float_or_nan(chunk[QUALITY_MAX])
    both = mean.notna() & top.notna()
    return bool(both.sum() >= 10 and (mean[both] > top[both]).mean() >= SWAPPED_SHARE)


def iter_chexmask(path: str | Path, *, id_column: str | None = "dicom_id", with_rle: bool = True, ids=None,
                  chunksize: int = 2000):
    """Stream a CheXmask table (``.csv`` or ``.csv.gz``) as DataFrames with canonical columns.

    Only the rows whose id is in ``ids`` are yielded (all rows when None), chunk by chunk, so the
    multi-GB file is never held in memory. Canonical columns: ``dicom_id``, ``quality_mean``,
    ``quality_max``, ``height``, ``width`` and, with ``with_rle``, ``landmarks``, ``right_lung``,
    ``left_lung``, ``heart``. ``id_column=None``: the file's own (``id_column_for``). A file whose
    two Dice RCA columns are swapped in its header is detected on its first rows and corrected, with
    a warning naming the file, instead of every row being rejected.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CheXmask table {path} does not exist")
    id_column = id_column or id_column_for(path)
    wanted = _chexmask_columns(path, id_column, with_rle)
    keep = None if ids is None else set(map(str, ids))
    rename = {id_column: "dicom_id", QUALITY_MEAN: "quality_mean", QUALITY_MAX: "quality_max",
              "Height": "height", "Width": "width", "Landmarks": "landmarks"}
    rename.update({v: k for k, v in MASK_COLUMNS.items()})
    # pandas' C parser reads these long rows at several hundred MB/s and has no field-size limit
    swapped = None
    reader = read_table(path, usecols=wanted, dtype={id_column: str}, chunksize=chunksize)
    for chunk in decoded_chunks(reader, path):
        if swapped is None:
            swapped = dice_columns_swapped(chunk)
            if swapped:
                log.warning("%s: Dice RCA (Mean) > (Max) on nearly every row: the two columns are swapped in "
                            "this file's header; reading them the other way round", path)
        if swapped:
            chunk = chunk.rename(columns={QUALITY_MEAN: QUALITY_MAX, QUALITY_MAX: QUALITY_MEAN})
        if keep is not None:
            chunk = chunk[chunk[id_column].isin(keep)]
        chunk = chunk.rename(columns=rename)
        for col in ("quality_mean", "quality_max", "height", "width"):
            chunk[col] = _float_or_nan(chunk[col])
        yield chunk


def read_chexmask(path: str | Path, *, id_column: str = "dicom_id", with_rle: bool = True,
                  ids=None, chunksize: int = 2000) -> pd.DataFrame:
    """Read a CheXmask table (``.csv`` or ``.csv.gz``) by column name into memory (see ``iter_chexmask``
    for the columns). For small tables and tests; the cohort stage streams the real one."""
    parts = list(iter_chexmask(path, id_column=id_column, with_rle=with_rle, ids=ids, chunksize=chunksize))
    if parts:
        return pd.concat(parts, ignore_index=True)
    cols = ["dicom_id", "quality_mean", "quality_max", "height", "width"]
    return pd.DataFrame(columns=cols + (["landmarks", *MASK_NAMES] if with_rle else []))
