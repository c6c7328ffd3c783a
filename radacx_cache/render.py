"""Pure per-image functions: decode, pad to a centred square, resize, anatomical overlay.

Geometry convention (recorded per image in the shards, ``GEOMETRY_FIELDS``): the original
``height x width`` image is zero-padded to a square of side ``side = max(height, width)`` with
``pad_top = (side - height) // 2`` and ``pad_left = (side - width) // 2`` (floor, as CheXmask's own
preprocessing), then resized by ``scale = size / side``. An output pixel centre ``(i + .5, j + .5)``
maps back to original pixel coordinates ``((i + .5) / scale - pad_top, (j + .5) / scale - pad_left)``.
``mask_height x mask_width`` is the frame of the CheXmask masks: the image's own size, except for a
downscaled copy of an archive (CheXpert-v1.0-small), whose masks are mapped from CheXmask's
full-resolution frame (same aspect ratio; scale ``height / mask_height``) with ``mask_frame()``.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import RenderConfig
from .overlays import DEFAULT_COLORS, PAPER_STYLES, OverlaySpec
from .sources.chexmask import MASK_NAMES, parse_rle, sample_rle
from .sources.dicom import DicomError, decode_dicom, is_dicom, percentile_window

GEOMETRY_FIELDS = ("height", "width", "side", "pad_top", "pad_left", "scale", "decode_reduce",
                   "mask_height", "mask_width")


class RenderError(ValueError):
    """An image cannot be rendered (bad JPEG, mask/image mismatch, ...)."""


@dataclass(frozen=True)
class Geometry:
    height: int
    width: int
    side: int
    pad_top: int
    pad_left: int
    scale: float
    decode_reduce: int = 1
    mask_height: int = 0  # 0: the image's own size
    mask_width: int = 0

    def __post_init__(self):
        if not self.mask_height:
            object.__setattr__(self, "mask_height", self.height)
            object.__setattr__(self, "mask_width", self.width)

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in GEOMETRY_FIELDS], np.float32)

    @classmethod
    def from_array(cls, values) -> "Geometry":
        """The inverse of ``as_array`` (a shard's ``geometry`` row)."""
        if len(values) != len(GEOMETRY_FIELDS):
            raise ValueError(f"a geometry row has {len(GEOMETRY_FIELDS)} values ({', '.join(GEOMETRY_FIELDS)}), "
                             f"not {len(values)}")
        h, w, side, top, left, scale, reduce, mask_h, mask_w = (float(v) for v in values)
        return cls(int(h), int(w), int(side), int(top), int(left), scale, int(reduce), int(mask_h), int(mask_w))

    def mask_frame(self) -> "Geometry":
        """The same square padding and output grid, in the masks' frame (itself unless downscaled)."""
        if (self.mask_height, self.mask_width) == (self.height, self.width):
            return self
        return square_geometry(self.mask_height, self.mask_width, round(self.scale * self.side))

    def to_original(self, rows, cols):
        """Map output-pixel coordinates (centres) back to original pixel coordinates."""
        rows = (np.asarray(rows, float) + 0.5) / self.scale - self.pad_top - 0.5
        cols = (np.asarray(cols, float) + 0.5) / self.scale - self.pad_left - 0.5
        return rows, cols


def box_to_output(geom: Geometry, x0: float, y0: float, x1: float, y1: float) -> tuple[float, ...]:
    """A box given as fractions of the image's width and height, in output-pixel edge coordinates
    (the same padding and scale as the image: a box stays on the anatomy it was drawn on)."""
    return ((x0 * geom.width + geom.pad_left) * geom.scale, (y0 * geom.height + geom.pad_top) * geom.scale,
            (x1 * geom.width + geom.pad_left) * geom.scale, (y1 * geom.height + geom.pad_top) * geom.scale)


def box_region(boxes, size: int) -> np.ndarray:
    """(size, size) bool: output pixels whose centre lies inside any of ``boxes`` (x0, y0, x1, y1 in
    output edge coordinates)."""
    centres = np.arange(size) + 0.5
    out = np.zeros((size, size), bool)
    for x0, y0, x1, y1 in boxes:
        rows = (centres >= y0) & (centres < y1)
        cols = (centres >= x0) & (centres < x1)
        out |= rows[:, None] & cols[None, :]
    return out


def square_geometry(height: int, width: int, size: int, decode_reduce: int = 1,
                    mask_shape: tuple[int, int] | None = None) -> Geometry:
    side = max(height, width)
    mask_h, mask_w = mask_shape or (height, width)
    return Geometry(height, width, side, (side - height) // 2, (side - width) // 2,
                    size / side, decode_reduce, int(mask_h), int(mask_w))


def same_aspect(small: tuple[int, int], full: tuple[int, int]) -> bool:
    """True when ``small`` is ``full`` scaled down by one factor, up to the rounding of each side to
    whole pixels (CheXpert-v1.0-small against CheXmask's full-resolution frame)."""
    (h, w), (big_h, big_w) = small, full
    if not (0 < h <= big_h and 0 < w <= big_w):
        return False
    # h = s * big_h + e1, w = s * big_w + e2 with |e| < 1: |h * big_w - w * big_h| < big_w + big_h
    return abs(h * big_w - w * big_h) < big_w + big_h


def fits_frame(size: tuple[int, int], frame: tuple[int, int], scaled_ok: bool) -> bool:
    """An image of ``size`` belongs to a frame (tables, CheXmask) of ``frame``: the same size, or, where
    downscaled copies are read, the same aspect ratio (``same_aspect``)."""
    return tuple(size) == tuple(frame) or (scaled_ok and same_aspect(tuple(size), tuple(frame)))


MAX_PIXELS = 64_000_000  # ~8000 x 8000: far above any radiograph, far below a decompression bomb
MIN_OVERLAY_SHARE = 0.002  # an overlay that changes fewer pixels than this drew (almost) nothing


IMAGE_FORMATS = ("JPEG", "PNG", "DICOM")  # every archive's image formats; an archive reads only its own


def decode_grey(data: bytes, min_side: int | None = None, expected: tuple[int, int] | None = None,
                max_pixels: int = MAX_PIXELS, scaled_ok: bool = False,
                formats: tuple[str, ...] = IMAGE_FORMATS) -> tuple[np.ndarray, int, tuple[int, int]]:
    """Decode an image to 8-bit grey, with libjpeg's DCT scaling when ``min_side`` allows it.

    With ``min_side`` the JPEG is decoded at the smallest 1/1, 1/2, 1/4 or 1/8 scale whose result
    still has at least ``min_side`` pixels on its long side, which is equivalent for a later
    antialiased resize to ``min_side`` and skips most of the inverse DCT work.
    The size the header declares is checked against ``expected`` (height, width), e.g. the
    metadata's Rows x Columns, and against ``max_pixels`` *before* anything is decoded, so a tiny file
    declaring a huge image costs nothing; with ``scaled_ok`` a smaller image of the same aspect ratio
    (a downscaled copy) passes too. 16-bit images are windowed to 8 bit between their 0.5th
    and 99.5th percentiles (a hot pixel cannot turn the image black).
    Only ``formats`` are opened (Pillow never hands a PostScript file named ``.jpg`` to Ghostscript);
    ``DICOM`` (VinDr-CXR) goes to ``sources.dicom`` (modality LUT, VOI window, MONOCHROME1 inverted).
    Returns the pixels, the reduction factor and the original (height, width).
    """
    if len(data) == 0:
        raise RenderError("file is empty (0 bytes)")
    if "DICOM" in formats and (is_dicom(data) or not set(formats) - {"DICOM"}):
        try:  # no DCT scaling for DICOM: the modality LUT and VOI window need every stored value
            pixels, size = decode_dicom(data, expected, max_pixels, fits=lambda got, want: fits_frame(got, want, scaled_ok))
        except DicomError as exc:
            raise RenderError(str(exc)) from None
        return pixels, 1, size
    try:
        im = Image.open(io.BytesIO(data), formats=[f for f in formats if f != "DICOM"])  # reads the header only
    except UnidentifiedImageError:
        raise RenderError(f"cannot decode image: not a {' or '.join(formats)} file") from None
    except Exception as exc:
        raise RenderError(f"cannot decode image ({type(exc).__name__}: {exc})") from None
    try:
        height, width = im.height, im.width
        want = None if expected is None else tuple(int(v) for v in expected)
        if want is not None and not fits_frame((height, width), want, scaled_ok):
            if scaled_ok:
                raise RenderError(f"image is {height}x{width}: neither the {want[0]}x{want[1]} of CheXmask nor a "
                                  f"downscaled copy of the same aspect ratio; not decoded")
            raise RenderError(f"image is {height}x{width} but the tables / CheXmask say {want[0]}x{want[1]}; "
                              f"not decoded")
        if height * width > max_pixels:
            raise RenderError(f"image declares {height}x{width} pixels, more than the {max_pixels} allowed; "
                              f"not decoded")
        if min_side and im.format == "JPEG":
            long_side = max(height, width)
            reduce = 1
            while reduce < 8 and math.ceil(long_side / (reduce * 2)) >= min_side:
                reduce *= 2
            if reduce > 1:
                im.draft("L", (math.ceil(width / reduce), math.ceil(height / reduce)))
        if im.mode not in ("L", "I;16", "I"):
            im = im.convert("L")
        im.load()
    except RenderError:
        raise
    except Exception as exc:
        raise RenderError(f"cannot decode image ({type(exc).__name__}: {exc})") from None
    if im.mode != "L":  # 16-bit PNGs: a robust window to 8 bit
        arr = (255 * percentile_window(np.asarray(im, dtype=np.float32), min_range=1.0)).astype(np.uint8)
    else:
        arr = np.asarray(im)
    reduce = max(1, round(width / arr.shape[1]))
    return arr, reduce, (height, width)


def pad_resize(pixels: np.ndarray, geom: Geometry, size: int) -> np.ndarray:
    """Pad ``pixels`` (decoded at 1/``geom.decode_reduce``) to the centred square and resize."""
    d = geom.decode_reduce
    margin = math.ceil(max(geom.pad_top, geom.pad_left) / d) + 1
    canvas_side = math.ceil(geom.side / d) + 2 * margin
    canvas = Image.new("L", (canvas_side, canvas_side), 0)
    canvas.paste(Image.fromarray(pixels), (margin, margin))
    x0 = margin - geom.pad_left / d
    y0 = margin - geom.pad_top / d
    box = (x0, y0, x0 + geom.side / d, y0 + geom.side / d)
    out = canvas.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(out)


def sample_grid(geom: Geometry, size: int, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Original pixel indices (or -1 outside the image) of the output grid's sample points."""
    k = max(1, int(supersample))
    offsets = (np.arange(size * k) + 0.5) / k  # sub-pixel centres in output-pixel units
    rows = np.floor(offsets / geom.scale - geom.pad_top).astype(np.int64)
    cols = np.floor(offsets / geom.scale - geom.pad_left).astype(np.int64)
    rows[(rows < 0) | (rows >= geom.height)] = -1
    cols[(cols < 0) | (cols >= geom.width)] = -1
    return rows, cols


def masks_at(rles: dict[str, str], mask_shape: tuple[int, int], geom: Geometry, size: int,
             supersample: int = 2) -> np.ndarray:
    """(3, size, size) bool masks (right lung, left lung, heart) under the image's geometry.

    Samples the RLE directly at ``supersample**2`` points per output pixel (majority vote), so
    the full-resolution mask is never materialised.
    """
    if tuple(mask_shape) != (geom.mask_height, geom.mask_width):
        raise RenderError(f"mask Height x Width {mask_shape[0]}x{mask_shape[1]} does not match the "
                          f"image's {geom.mask_height}x{geom.mask_width}")
    geom = geom.mask_frame()
    rows, cols = sample_grid(geom, size, supersample)
    k = max(1, int(supersample))
    out = np.zeros((len(MASK_NAMES), size, size), bool)
    for i, name in enumerate(MASK_NAMES):
        try:
            starts, ends = parse_rle(rles[name], mask_shape)
        except ValueError as exc:
            raise RenderError(f"{name} mask: {exc}") from None
        hits = sample_rle(starts, ends, geom.width, rows, cols)  # geom is in the mask frame here
        if k > 1:  # majority of the k x k sub-samples: 2 * votes >= k * k, i.e. their mean >= 0.5
            votes = np.zeros((size, size), np.int32)
            for dy in range(k):
                for dx in range(k):
                    votes += hits[dy::k, dx::k]
            hits = 2 * votes >= k * k
        out[i] = hits
    return out


def _shift_and(mask: np.ndarray, op) -> np.ndarray:
    p = np.pad(mask, 1, mode="constant", constant_values=op is np.logical_and)
    h, w = mask.shape
    out = mask.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out = op(out, p[dy:dy + h, dx:dx + w])
    return out


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        mask = _shift_and(mask, np.logical_and)
    return mask


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        mask = _shift_and(mask, np.logical_or)
    return mask


def boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """A band of ``width`` pixels centred on the mask's border."""
    outer = width // 2
    inner = width - outer
    return dilate(mask, outer) & ~erode(mask, inner)


def overlay(grey: np.ndarray, masks: np.ndarray, mode: str = "boundary", *,
            colors: dict | None = None, line_width: int = 2, alpha: float = 0.35) -> np.ndarray:
    """Draw the anatomy on a grey image; returns (H, W, 3) uint8.

    ``boundary`` draws coloured borders (the paper's figure 1), ``fill`` alpha-blends the regions,
    ``crop`` keeps only pixels inside the lungs and heart.
    """
    colors = colors or DEFAULT_COLORS
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if mode == "crop":
        return rgb * masks.any(axis=0)[..., None].astype(np.uint8)
    out = rgb.astype(np.float32) if mode == "fill" else rgb.copy()
    for name, mask in zip(MASK_NAMES, masks):
        color = np.asarray(colors[name], np.float32)
        if mode == "boundary":
            out[boundary(mask, line_width)] = color.astype(np.uint8)
        elif mode == "fill":
            out[mask] = (1 - alpha) * out[mask] + alpha * color
        else:
            raise ValueError(f"overlay mode {mode!r}: expected one of {', '.join(PAPER_STYLES)}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8) if mode == "fill" else out


def draw_variant(original: np.ndarray, masks: np.ndarray, spec: OverlaySpec) -> np.ndarray:
    """An overlay variant drawn at read time: ``original`` (H, W) or (N, H, W) uint8 and its
    ``masks`` ((N,) 3, H, W) bool, as the shards store them, drawn with ``spec`` (``overlays.OverlaySpec``;
    a settings dict as records hold it is read with ``OverlaySpec.from_record``); (..., H, W, 3) uint8. The paper's settings (``RenderConfig.paper_overlay``)
    give exactly the stored ``masked`` pixels; a style of ``none`` (or no structures) gives the
    original in three channels."""
    if original.ndim == 3:
        out = np.empty((*original.shape, 3), np.uint8)
        for i in range(len(original)):
            out[i] = draw_variant(original[i], masks[i], spec)
        return out
    masks = np.asarray(masks, dtype=bool)  # the shards store them as uint8 0/1: never an index array
    chosen = np.array([name in spec.structures for name in MASK_NAMES])
    if spec.style == "none" or not chosen.any():
        return np.repeat(original[..., None], 3, axis=2)
    if not chosen.all():
        masks = masks & chosen[:, None, None]  # a structure left out draws nothing
    colors = spec.colors if spec.ink is None else {name: [spec.ink] * 3 for name in MASK_NAMES}
    return overlay(original, masks, spec.style, colors=colors, line_width=spec.line_width, alpha=spec.fill_alpha)


def render_image(data: bytes, rles: dict[str, str], mask_shape: tuple[int, int],
                 cfg: RenderConfig | None = None, expected: tuple[int, int] | None = None,
                 scaled_ok: bool = False, formats: tuple[str, ...] = IMAGE_FORMATS) -> dict:
    """Decode → pad → resize → masks → overlay for one image. Raises RenderError with the reason.

    ``expected``: the image's (height, width) according to the archive's metadata, checked before
    decoding. ``scaled_ok``: a downscaled copy (same aspect ratio as ``mask_shape``) is accepted and
    the masks are mapped onto it from their own frame.
    """
    cfg = cfg or RenderConfig()
    size = cfg.size
    pixels, reduce, (height, width) = decode_grey(data, size if cfg.draft else None, expected, scaled_ok=scaled_ok,
                                                  formats=formats)
    if not fits_frame((height, width), mask_shape, scaled_ok):
        raise RenderError(f"mask Height x Width {mask_shape[0]}x{mask_shape[1]} does not match the "
                          f"image's {height}x{width}")
    geom = square_geometry(height, width, size, reduce, mask_shape=tuple(mask_shape))
    masks = masks_at(rles, mask_shape, geom, size, cfg.mask_supersample)
    original = pad_resize(pixels, geom, size)
    masked = draw_variant(original, masks, cfg.paper_overlay())  # the one drawing path of every variant
    differs = masked != original[..., None]
    changed = np.count_nonzero(differs[..., 0] | differs[..., 1] | differs[..., 2]) / original.size
    if changed < MIN_OVERLAY_SHARE:
        raise RenderError(f"the overlay changed {changed:.2%} of the pixels (expected >= {MIN_OVERLAY_SHARE:.1%}): "
                          f"empty masks, or a render config that draws nothing")
    return {"original": original, "masked": masked, "masks": masks, "geometry": geom}
