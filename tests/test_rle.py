import gzip
import json

import numpy as np
import pandas as pd
import pytest
from conftest import shared_path

from radacx_cache.sources.chexmask import (MASK_NAMES, RLEError, decode_rle, encode_rle, parse_landmarks, parse_rle,
                                           polygon_mask, read_chexmask, sample_rle)


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_toy_vector_from_formats_doc():
    mask = np.zeros((3, 4), bool)
    mask[0, 1] = mask[0, 2] = mask[1, 3] = mask[2, 0] = True
    assert encode_rle(mask) == "2 2 8 2"
    np.testing.assert_array_equal(decode_rle("2 2 8 2", (3, 4)), mask)  # run wraps row 1 -> row 2


@pytest.mark.parametrize("name,id_column", [("VinDr-CXR.csv", "image_id"), ("Padchest.csv", "ImageID")])
def test_real_chexmask_rows_decode_to_their_landmark_polygons(name, id_column):
    df = read_chexmask(shared_path("chexmask-samples", name), id_column=id_column)
    assert len(df) == 50
    checked = 0
    for row in df.itertuples():
        # PadChest writes Height/Width as floats and leaves some blank; its masks are 1024^2
        shape = (1024, 1024) if np.isnan(row.height) else (int(row.height), int(row.width))
        landmarks = parse_landmarks(row.landmarks)
        for organ in MASK_NAMES:
            text = getattr(row, organ)
            mask = decode_rle(text, shape)
            assert dice(mask, polygon_mask(landmarks[organ], shape)) >= 0.99, (row.dicom_id, organ)
            assert encode_rle(mask) == text  # byte-exact round trip
            checked += 1
    assert checked == 150


def test_real_rows_right_lung_is_on_the_image_left():
    df = read_chexmask(shared_path("chexmask-samples", "VinDr-CXR.csv"), id_column="image_id")
    for row in df.head(10).itertuples():
        right = decode_rle(row.right_lung, (1024, 1024))
        left = decode_rle(row.left_lung, (1024, 1024))
        assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean()


@pytest.mark.parametrize("text,shape,message", [
    ("2 2 8", (3, 4), "odd number"),
    ("8 2 2 2", (3, 4), "not strictly increasing"),
    ("2 2 12 5", (3, 4), "past the end"),
    ("2 4 4 2", (3, 4), "overlap"),
    ("2 x", (3, 4), "not a non-negative integer"),
    ("0 2", (3, 4), "1-based"),
    ("2 0", (3, 4), "non-positive length"),
    (None, (3, 4), "blank cell"),  # a blank CSV cell
    (float("nan"), (3, 4), "blank cell"),
    ("99999999999999999999 5", (3, 4), "past the end of the 3x4 mask"),  # would overflow int64
    ("--5 3", (3, 4), "not a non-negative integer"),
    ("2 9223372036854775807 10 5", (3, 4), "past the end of the 3x4 mask"),  # would wrap int64 silently
])
def test_malformed_rle_is_rejected_with_the_reason(text, shape, message):
    with pytest.raises(RLEError, match=message):
        parse_rle(text, shape)


def test_sampled_decode_equals_full_decode():
    rng = np.random.default_rng(0)
    mask = rng.random((97, 131)) < 0.3
    mask[20:60, 30:90] = True
    starts, ends = parse_rle(encode_rle(mask), mask.shape)
    rows = np.array([-1, 0, 5, 50, 96])
    cols = np.array([0, 7, 64, 130, -1])
    got = sample_rle(starts, ends, mask.shape[1], rows, cols)
    want = mask[np.ix_(np.clip(rows, 0, None), np.clip(cols, 0, None))]
    want[rows < 0, :] = False
    want[:, cols < 0] = False
    np.testing.assert_array_equal(got, want)


def test_landmarks_parse_every_known_text_form():
    pts = np.arange(240).reshape(120, 2)
    flat = ",".join(map(str, pts.ravel()))
    numpy_repr = np.array2string(pts, separator=" ", threshold=10 ** 6)
    as_json = json.dumps(pts.tolist())
    for text in (flat, numpy_repr, as_json):
        parsed = parse_landmarks(text)
        assert [len(parsed[k]) for k in MASK_NAMES] == [44, 50, 26]
        np.testing.assert_array_equal(parsed["heart"][0], [188, 189])
    with pytest.raises(ValueError, match="expected 240"):
        parse_landmarks("1,2,3")


def test_reader_accepts_gzip_index_column_and_names_missing_columns(tmp_path):
    src = shared_path("chexmask-samples", "VinDr-CXR.csv")
    df = pd.read_csv(src).rename(columns={"image_id": "dicom_id"})
    gz = tmp_path / "MIMIC-CXR-JPG.csv.gz"
    with gzip.open(gz, "wt") as f:
        df.to_csv(f)  # writes the unnamed index column some versions had
    got = read_chexmask(gz, ids=df["dicom_id"][:3])
    assert list(got["dicom_id"]) == list(df["dicom_id"][:3])
    assert got["quality_mean"].le(got["quality_max"]).all()
    bad = tmp_path / "bad.csv"
    df.drop(columns=["Heart"]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="Heart"):
        read_chexmask(bad)


@pytest.mark.parametrize("name", ["ChestX-Ray8.csv", "CheXpert.csv", "Padchest.csv", "VinDr-CXR.csv"])
def test_every_archives_real_rows_through_its_id_column(name, caplog):
    """Each CheXmask sample file read by its own id column: masks match their landmarks, the right
    lung is on the image's left, and Mean <= Max after the per-file swap check."""
    from radacx_cache.sources.chexmask import id_column_for
    path = shared_path("chexmask-samples", name)
    df = read_chexmask(path, id_column=None)
    assert len(df) >= 50 and df["dicom_id"].notna().all()
    if name == "CheXpert.csv":  # CheXmask's CheXpert ids are relative paths without the CheXpert-v1.0 prefix
        assert df["dicom_id"].str.match(r"(train|valid)/patient\d+/study\d+/view\d+_\w+\.jpg").all()
    q = df.dropna(subset=["quality_mean", "quality_max"])
    consistent = (q["quality_mean"] <= q["quality_max"] + 1e-9).mean()
    # PadChest's sample is not a clean swap: 30 of 50 rows have Mean > Max, 20 Mean < Max, so no
    # column order makes it consistent; it is read as written and judged row by row (cohort rejects)
    assert consistent == (0.4 if name == "Padchest.csv" else 1.0)
    assert "swapped" not in caplog.text
    for row in df.head(8).itertuples():
        shape = (1024, 1024) if np.isnan(row.height) else (int(row.height), int(row.width))
        landmarks = parse_landmarks(row.landmarks)
        right, left = decode_rle(row.right_lung, shape), decode_rle(row.left_lung, shape)
        assert dice(right, polygon_mask(landmarks["right_lung"], shape)) >= 0.99
        assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean()
    assert id_column_for(path) in pd.read_csv(path, nrows=0).columns


def test_a_file_with_swapped_dice_headers_is_corrected_with_a_warning(tmp_path, caplog):
    src = shared_path("chexmask-samples", "VinDr-CXR.csv")
    header, body = src.read_text().split("\n", 1)
    swapped = tmp_path / "VinDr-CXR.csv"
    swapped.write_text(header.replace("Dice RCA (Mean)", "@").replace("Dice RCA (Max)", "Dice RCA (Mean)")
                       .replace("@", "Dice RCA (Max)") + "\n" + body)
    fixed = read_chexmask(swapped, id_column=None)
    original = read_chexmask(src, id_column=None)
    np.testing.assert_allclose(fixed["quality_mean"], original["quality_mean"])
    assert str(swapped) in caplog.text and "swapped" in caplog.text


def test_sampling_runs_in_the_grid_equals_the_per_point_search():
    """The renderer's shortcut (runs located in the sorted grid, one cumulative sum) against the
    exact per-point binary search, on grids that punish it: unsorted and repeated rows (an upscaled
    image), -1 (padding) at both ends, runs shorter than the grid spacing, empty and full masks."""
    from radacx_cache.sources.chexmask import parse_rle, sample_rle, sample_rle_direct
    rng = np.random.default_rng(3)
    for t in range(300):
        h, w = (int(v) for v in rng.integers(2, 200, 2))
        mask = rng.random((h, w)) < [0.0, 1.0, 0.02, 0.5, 0.98][t % 5]
        starts, ends = parse_rle(encode_rle(mask), (h, w))
        n, m = (int(v) for v in rng.integers(1, 90, 2))
        rows, cols = np.sort(rng.integers(-1, h, n)), np.sort(rng.integers(-1, w, m))
        if t % 3 == 1:
            rows = rng.integers(-1, h, n)
        if t % 3 == 2:
            rows = np.r_[-1, -1, np.repeat(np.arange(h), 2), -1]
        expected = sample_rle_direct(starts, ends, w, rows, cols)
        assert np.array_equal(sample_rle(starts, ends, w, rows, cols), expected), t
        inside = (rows[:, None] >= 0) & (cols[None, :] >= 0)
        assert np.array_equal(expected, inside & mask[np.clip(rows, 0, None)][:, np.clip(cols, 0, None)])
