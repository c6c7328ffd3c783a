import io

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from radacx_cache.config import RenderConfig
from radacx_cache.render import (RenderError, boundary, decode_grey, masks_at, overlay, pad_resize, render_image,
                                 sample_grid, square_geometry)
from radacx_cache.sources.chexmask import decode_rle, encode_rle

COLORS = {"right_lung": [255, 0, 0], "left_lung": [0, 255, 0], "heart": [0, 0, 255]}


def jpeg_bytes(arr, quality=95):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def wikimedia():
    base = shared_path("realcxr")
    data = (base / "images" / "wikimedia_normal_pa_chexmask_example.jpg").read_bytes()
    masks = {}
    for organ, stem in (("right_lung", "lung_right"), ("left_lung", "lung_left"), ("heart", "heart")):
        masks[organ] = np.asarray(Image.open(base / "masks" / f"wikimedia_normal_pa_chexmask_example__{stem}.png")) > 127
    return data, masks


def test_geometry_pads_to_a_centred_square_like_chexmask():
    g = square_geometry(899, 786, 224)
    assert (g.side, g.pad_top, g.pad_left) == (899, 0, 56)
    assert g.scale == pytest.approx(224 / 899)
    rows, cols = g.to_original([0, 223], [0, 223])
    assert rows[0] < 2 and rows[1] > 896  # output corners map back near the image corners
    assert cols[0] < -50  # left padding


def test_pad_resize_maps_a_point_where_the_geometry_says():
    img = np.zeros((300, 200), np.uint8)
    img[150:160, 40:50] = 255  # a bright square centred at (155, 45)
    g = square_geometry(300, 200, 100)
    out = pad_resize(img, g, 100)
    r, c = np.unravel_index(out.argmax(), out.shape)
    assert abs(r - (155 + g.pad_top) * g.scale) <= 1.5
    assert abs(c - (45 + g.pad_left) * g.scale) <= 1.5
    assert out[:, :5].max() < 5  # the padding is black


def test_reduced_size_decoding_is_equivalent_at_224():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:2400, 0:2000]
    img = (127 + 80 * np.sin(xx / 90) * np.cos(yy / 120) + rng.normal(0, 6, xx.shape)).clip(0, 255).astype(np.uint8)
    data = jpeg_bytes(img)
    rle = {k: encode_rle(np.zeros((2400, 2000), bool) | (k == "heart")) for k in COLORS}
    fast = render_image(data, rle, (2400, 2000), RenderConfig(draft=True))
    full = render_image(data, rle, (2400, 2000), RenderConfig(draft=False))
    assert fast["geometry"].decode_reduce == 8 and full["geometry"].decode_reduce == 1
    diff = np.abs(fast["original"].astype(int) - full["original"].astype(int))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 8


def test_sampled_masks_agree_with_full_decode_then_resize():
    data, masks = wikimedia()
    shape = masks["heart"].shape
    rles = {k: encode_rle(v) for k, v in masks.items()}
    g = square_geometry(*shape, 224)
    got = masks_at(rles, shape, g, 224, supersample=2)
    for i, organ in enumerate(("right_lung", "left_lung", "heart")):
        full = decode_rle(rles[organ], shape)
        canvas = np.zeros((g.side, g.side), np.uint8)
        canvas[g.pad_top:g.pad_top + shape[0], g.pad_left:g.pad_left + shape[1]] = full * 255
        ref = np.asarray(Image.fromarray(canvas).resize((224, 224), Image.Resampling.BOX)) >= 128
        iou = (ref & got[i]).sum() / (ref | got[i]).sum()
        assert iou > 0.97, organ


def test_overlay_lies_on_the_mask_borders_of_a_real_radiograph():
    data, masks = wikimedia()
    rles = {k: encode_rle(v) for k, v in masks.items()}
    out = render_image(data, rles, masks["heart"].shape,
                       RenderConfig(overlay="boundary", colors=COLORS, line_width=2))
    masked, m = out["masked"], out["masks"]
    for i, organ in enumerate(("right_lung", "left_lung", "heart")):
        painted = np.all(masked == COLORS[organ], axis=2)
        border = boundary(m[i], 2)
        assert painted.sum() > 100
        # every painted pixel of this colour is on this organ's border band (the heart, drawn last,
        # may cover lung border pixels, never the other way round)
        assert (painted & ~border).sum() == 0, organ
        if organ == "heart":
            assert painted.sum() == border.sum()
    cx = {organ: np.nonzero(np.all(masked == COLORS[organ], axis=2))[1].mean() for organ in COLORS}
    assert cx["right_lung"] < 112 < cx["left_lung"]  # patient's right on the image's left
    # outside the borders the masked image is the original, grey
    untouched = ~np.any([boundary(mk, 2) for mk in m], axis=0)
    np.testing.assert_array_equal(masked[untouched][:, 0], out["original"][untouched])


def test_lung_masks_of_mhh_radiographs_split_into_sides():
    from scipy import ndimage
    base = shared_path("realcxr")
    for stem in ("mhh_82a78c13", "mhh_5782ae15"):
        data = (base / "images" / f"{stem}.png").read_bytes()
        lungs = np.asarray(Image.open(base / "masks" / f"{stem}__lungs.png")) > 127
        labels, n = ndimage.label(lungs)
        sizes = ndimage.sum(lungs, labels, range(1, n + 1))
        a, b = np.argsort(sizes)[-2:] + 1
        comps = sorted([labels == a, labels == b], key=lambda c: np.nonzero(c)[1].mean())
        rles = {"right_lung": encode_rle(comps[0]), "left_lung": encode_rle(comps[1]),
                "heart": encode_rle(np.zeros_like(lungs))}
        out = render_image(data, rles, lungs.shape, RenderConfig(colors=COLORS))
        red = np.nonzero(np.all(out["masked"] == COLORS["right_lung"], axis=2))[1]
        green = np.nonzero(np.all(out["masked"] == COLORS["left_lung"], axis=2))[1]
        assert red.mean() < 112 < green.mean()


def test_fill_and_crop_modes():
    grey = np.full((8, 8), 100, np.uint8)
    masks = np.zeros((3, 8, 8), bool)
    masks[0, 1:4, 1:4] = True
    crop = overlay(grey, masks, "crop")
    assert crop[2, 2].tolist() == [100, 100, 100] and crop[6, 6].tolist() == [0, 0, 0]
    fill = overlay(grey, masks, "fill", colors=COLORS, alpha=0.5)
    assert fill[2, 2].tolist() == [178, 50, 50] and fill[6, 6].tolist() == [100, 100, 100]
    with pytest.raises(ValueError, match="overlay mode"):
        overlay(grey, masks, "glow")


@pytest.mark.parametrize("data,message", [(b"", "empty"), (b"\xff\xd8\xff\xe0garbage", "cannot decode"),
                                           (b"not an image at all", "cannot decode")])
def test_bad_image_bytes_raise_a_clear_error(data, message):
    with pytest.raises(RenderError, match=message):
        decode_grey(data, 224)


def test_truncated_jpeg_and_size_mismatch_are_errors():
    img = (np.random.default_rng(1).random((400, 300)) * 255).astype(np.uint8)
    data = jpeg_bytes(img)
    with pytest.raises(RenderError, match="cannot decode"):
        decode_grey(data[: len(data) // 3], 224)
    rles = {k: "1 10" for k in COLORS}
    with pytest.raises(RenderError, match="does not match"):
        render_image(data, rles, (300, 400))


def test_sample_grid_marks_padding_as_outside():
    g = square_geometry(100, 50, 20)
    rows, cols = sample_grid(g, 20)
    assert (rows >= 0).all() and (cols[:4] == -1).all() and (cols[-4:] == -1).all()


@pytest.mark.parametrize("factor", [0.5, 0.1371])  # 0.137: about CheXpert-v1.0-small against full resolution
def test_a_downscaled_copy_gets_the_full_resolution_masks_scaled_onto_it(factor):
    """CheXmask's frame is the full-resolution image; the -small copy of it (same aspect ratio) gets the
    same masks at 224 as the full image, with both sizes recorded in the geometry; a copy of another
    aspect ratio, or a smaller image where no downscaled copy is expected, is refused."""
    data, masks = wikimedia()
    shape = masks["heart"].shape
    rles = {k: encode_rle(v) for k, v in masks.items()}
    full = render_image(data, rles, shape, RenderConfig(), expected=shape)
    with Image.open(io.BytesIO(data)) as im:
        small_size = (round(im.width * factor), round(im.height * factor))
        small = jpeg_bytes(np.asarray(im.convert("L").resize(small_size, Image.Resampling.LANCZOS)))
    got = render_image(small, rles, shape, RenderConfig(), expected=shape, scaled_ok=True)
    g = got["geometry"]
    assert (g.height, g.width, g.mask_height, g.mask_width) == (small_size[1], small_size[0], *shape)
    for i in range(3):
        iou = (full["masks"][i] & got["masks"][i]).sum() / (full["masks"][i] | got["masks"][i]).sum()
        assert iou > 0.97
    diff = np.abs(full["original"].astype(int) - got["original"].astype(int))
    assert np.median(diff) < 6  # the same picture, at the same place
    with pytest.raises(RenderError, match="but the tables / CheXmask say"):
        render_image(small, rles, shape, RenderConfig(), expected=shape)  # MIMIC / NIH: exact sizes only
    with Image.open(io.BytesIO(data)) as im:
        squashed = jpeg_bytes(np.asarray(im.convert("L").resize((small_size[0], small_size[1] * 3 // 4))))
    with pytest.raises(RenderError, match="nor a downscaled copy"):
        render_image(squashed, rles, shape, RenderConfig(), expected=shape, scaled_ok=True)


def test_a_geometry_row_has_every_field_or_is_refused():
    from radacx_cache.render import Geometry
    g = Geometry.from_array([300, 200, 300, 0, 50, 224 / 300, 1, 300, 200])
    assert (g.mask_height, g.mask_width) == (300, 200) and g.mask_frame() is g
    np.testing.assert_allclose(Geometry.from_array(g.as_array()).as_array(), g.as_array())
    with pytest.raises(ValueError, match="9 values"):  # a schema-1 row: its shards are refused anyway
        Geometry.from_array([300, 200, 300, 0, 50, 224 / 300, 1])


# ---------------------------------------------------------------- contracts fixed in advance
def _three_regions(shape=(64, 64)):
    """Right lung on the image's left (the patient's right in a PA view), left lung on its right,
    heart between them: disjoint blocks."""
    masks = np.zeros((3, *shape), bool)
    masks[0, 8:56, 4:24] = True
    masks[1, 8:56, 40:60] = True
    masks[2, 30:50, 26:38] = True
    return masks


def test_overlay_colour_contract():
    """The colours other projects rely on (docs/shard-format.md): right lung red, left lung green,
    heart blue; in the config's defaults and in the overlay's."""
    assert RenderConfig().colors == {"right_lung": [255, 0, 0], "left_lung": [0, 255, 0], "heart": [0, 0, 255]}
    masks = _three_regions()
    for out in (overlay(np.zeros((64, 64), np.uint8), masks),
                overlay(np.zeros((64, 64), np.uint8), masks, colors=RenderConfig().colors)):
        assert out[8, 10].tolist() == [255, 0, 0]    # top border of the block on the image's left
        assert out[8, 50].tolist() == [0, 255, 0]    # top border of the block on the image's right
        assert out[30, 30].tolist() == [0, 0, 255]   # top border of the heart
        assert out[30, 14].tolist() == [0, 0, 0]     # inside the right lung: no ink


def test_masks_land_on_the_source_pixels_of_an_upscaled_small_image():
    """A 28 x 28 image rendered at 224 (x8): a mask over source rows 4-19, columns 3-10 must cover
    output rows 32-159, columns 24-87 (to within the sub-pixel sampling), so a mask offset by one
    *source* pixel (8 output pixels) cannot pass."""
    from radacx_cache._io import jpeg_bytes
    src = np.zeros((3, 28, 28), bool)
    src[0, 4:20, 3:11] = True
    src[1, 4:20, 17:25] = True
    src[2, 14:22, 11:17] = True
    data = jpeg_bytes(np.full((28, 28), 128, np.uint8))
    rles = {name: encode_rle(m.astype(np.uint8)) for name, m in zip(("right_lung", "left_lung", "heart"), src)}
    item = render_image(data, rles, (28, 28), RenderConfig(draft=False))
    right = item["masks"][0].astype(bool)
    rows, cols = np.flatnonzero(right.any(1)), np.flatnonzero(right.any(0))
    assert abs(rows[0] - 32) <= 2 and abs(rows[-1] - 159) <= 2, (rows[0], rows[-1])
    assert abs(cols[0] - 24) <= 2 and abs(cols[-1] - 87) <= 2, (cols[0], cols[-1])
    heart = item["masks"][2].astype(bool)
    assert abs(np.flatnonzero(heart.any(1))[0] - 112) <= 2 and abs(np.flatnonzero(heart.any(0))[0] - 88) <= 2


def test_boxes_take_the_image_s_padding_and_scale():
    """A 200 (high) x 400 (wide) image is padded to 400 x 400 (100 rows on top) and scaled by 224/400.
    A box over the left half, full height: output x 0..112, y (0 + 100) * 0.56 = 56 .. (200 + 100) * 0.56 = 168."""
    from radacx_cache.render import box_region, box_to_output
    geom = square_geometry(200, 400, 224)
    assert box_to_output(geom, 0.0, 0.0, 0.5, 1.0) == pytest.approx((0.0, 56.0, 112.0, 168.0))
    region = box_region([box_to_output(geom, 0.0, 0.0, 0.5, 1.0)], 224)
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (56, 167, 0, 111)


def test_masks_at_is_the_majority_of_its_sub_samples_ties_inside():
    """masks_at against the definition, from the fully decoded mask: each output pixel is inside when at
    least half of its k x k sub-samples are (a 2-of-4 tie counts as inside, as the stored shards have it)."""
    from radacx_cache.render import masks_at, sample_grid, square_geometry
    from radacx_cache.sources.chexmask import MASK_NAMES
    data, masks = wikimedia()
    shape = masks["heart"].shape
    rles = {k: encode_rle(v) for k, v in masks.items()}
    for k in (2, 3):
        geom = square_geometry(*shape, 224, 1, mask_shape=shape)
        rows, cols = sample_grid(geom, 224, k)
        got = masks_at(rles, shape, geom, 224, k)
        ties = 0
        for i, name in enumerate(MASK_NAMES):
            full = masks[name][np.clip(rows, 0, None)][:, np.clip(cols, 0, None)] & (rows[:, None] >= 0) & (cols[None, :] >= 0)
            share = full.reshape(224, k, 224, k).mean(axis=(1, 3))
            assert np.array_equal(got[i], share >= 0.5), (k, name)
            ties += int((share == 0.5).sum())
        assert k == 3 or ties > 0  # the data holds ties, so the rule for them is tested
