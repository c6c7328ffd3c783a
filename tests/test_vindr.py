"""VinDr-CXR: the DICOM display pipeline, the three-reader label rule, the real Kaggle table that
torchxrayvision ships, and hostile DICOMs and rows (issue 20)."""
from __future__ import annotations

import gzip
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pydicom = pytest.importorskip("pydicom")


def gradient(h=96, w=80) -> np.ndarray:
    """A radiograph-like test card: every grey level, a dark square, a bright bar."""
    img = np.tile(np.linspace(0, 255, w), (h, 1))
    img[10:30, 10:30] = 3
    img[60:70, :] = 250
    return img.round().astype(np.uint8)


def dicoms(n=12):
    """The phantom's DICOMs of one test card under n header draws (slope, intercept, window,
    MONOCHROME1 or 2, no window)."""
    from radacx_cache.phantom.layouts import LAYOUTS
    lay = LAYOUTS["vindr"]
    return [lay.encode(gradient(), np.random.default_rng(seed)) for seed in range(n)]


def test_the_display_pipeline_gives_back_the_drawn_pixels():
    """Stored values -> modality LUT -> VOI window -> MONOCHROME1 inverted: the phantom wrote each
    card so that only the whole chain gives the card back, to within one grey level. The draws
    cover both photometric interpretations, both slopes and intercepts."""
    from radacx_cache.sources.dicom import decode_dicom
    seen = set()
    for data in dicoms():
        ds = pydicom.dcmread(io.BytesIO(data))
        grey, size = decode_dicom(data, expected=(96, 80))
        assert size == (96, 80)
        if "WindowCenter" not in ds:  # no window: the percentile stretch keeps order, not values
            assert np.corrcoef(grey.ravel(), gradient().ravel())[0, 1] > 0.99
            continue
        assert np.abs(grey.astype(int) - gradient()).max() <= 1, (ds.PhotometricInterpretation, ds.RescaleSlope)
        seen.add((str(ds.PhotometricInterpretation), float(ds.RescaleSlope), float(ds.RescaleIntercept)))
    assert {p for p, _, _ in seen} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({(s, i) for _, s, i in seen}) >= 3


@pytest.mark.parametrize("skip", ["rescale", "window", "invert"])
def test_each_step_of_the_display_pipeline_is_needed(skip, monkeypatch):
    """A control for the test above: leave out any one step (a planted bug) and some card is off by
    far more than one grey level."""
    from radacx_cache.sources import dicom
    if skip == "rescale":
        real_number = dicom._number
        monkeypatch.setattr(dicom, "_number", lambda ds, k, d=None: d if k.startswith("Rescale") else real_number(ds, k, d))
    elif skip == "window":
        monkeypatch.setattr(dicom, "linear_window", lambda v, c, w: np.clip((v - v.min()) / np.ptp(v), 0, 1))
    else:
        real_grey = dicom.to_grey
        monkeypatch.setattr(dicom, "to_grey", lambda ds: real_grey(_as_monochrome2(ds)))
    worst = max(np.abs(dicom.decode_dicom(d)[0].astype(int) - gradient()).max()
                for d in dicoms() if "WindowCenter" in pydicom.dcmread(io.BytesIO(d)))
    assert worst > 20


def _as_monochrome2(ds):
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _dicom(**change) -> bytes:
    """One phantom DICOM with attributes changed (None deletes one)."""
    ds = pydicom.dcmread(io.BytesIO(dicoms(1)[0]))
    for key, value in change.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("data,reason", [
    (b"\xff\xd8\xff\xe0" + bytes(400), "not a DICOM file"),
    (bytes(128) + b"DICM" + b"\x00" * 40, "DICOM file has no"),
    ("PhotometricInterpretation=RGB", "is not MONOCHROME1/2"),
    ("WindowWidth=0", "WindowWidth 0 < 1"),
    ("RescaleSlope=nan", "RescaleSlope is nan"),
    ("RescaleSlope=0", "RescaleSlope is 0"),
    ("BitsAllocated=32", "BitsAllocated 32"),
    ("Rows=60000", "60000x80 pixels"),  # declared size over the budget: refused before decoding
])
def test_hostile_dicoms_are_refused_with_a_reason(data, reason):
    from radacx_cache.render import RenderError, decode_grey
    if isinstance(data, str):
        key, value = data.split("=")
        data = _dicom(**{key: value if key == "PhotometricInterpretation" else
                         (int(value) if value.isdigit() else value)})
    with pytest.raises(RenderError, match=reason.replace("(", r"\(")):
        decode_grey(data, formats=("DICOM",), max_pixels=1_000_000)


def test_a_dicom_is_decoded_only_for_an_archive_of_dicoms():
    """NIH reads PNG only: a DICOM handed to it is refused like any other foreign file."""
    from radacx_cache.render import RenderError, decode_grey
    with pytest.raises(RenderError, match="not a PNG file"):
        decode_grey(dicoms(1)[0], formats=("PNG",))
    assert decode_grey(dicoms(1)[0], formats=("DICOM",))[0].shape == (96, 80)


def test_the_size_is_checked_before_the_pixel_data_is_decoded(monkeypatch):
    from radacx_cache.render import RenderError, decode_grey
    from radacx_cache.sources import dicom
    monkeypatch.setattr(dicom, "to_grey", lambda ds: pytest.fail("pixel data decoded"))
    with pytest.raises(RenderError, match="but the tables / CheXmask say 80x96"):
        decode_grey(dicoms(1)[0], expected=(80, 96), formats=("DICOM",))


# ---------------------------------------------------------------- tables
def _table(tmp_path, rows, name="annotations/annotations_train.csv", columns=None) -> Path:
    columns = columns or ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return tmp_path


A, B = "a" * 32, "b" * 32


@pytest.mark.parametrize("min_readers,expected", [(1, (1, 1, 0)), (2, (1, -1, 0)), (3, (-1, -1, 0))])
def test_the_three_reader_rule(tmp_path, min_readers, expected):
    """Cardiomegaly boxed by two of three readers (one of them twice), effusion by one, edema by none."""
    from radacx_cache.sources.vindr import read_tables
    root = _table(tmp_path, [
        (A, "R1", "Cardiomegaly", 10, 20, 30, 40), (A, "R1", "Cardiomegaly", 12, 20, 30, 40),
        (A, "R2", "Cardiomegaly", 11, 21, 31, 41), (A, "R2", "Pleural effusion", 1, 2, 3, 4),
        (A, "R3", "No finding", "", "", "", "")])
    entries, split, boxes, rejects = read_tables(root, min_readers)
    row = entries.iloc[0]
    assert (row["Cardiomegaly"], row["Pleural Effusion"], row["Edema"]) == expected
    assert row["No Finding"] == 0 and rejects == [] and split["split"].tolist() == ["train"]
    assert len(boxes) == 4 and set(boxes["reader"]) == {1, 2}


def test_the_consensus_test_table_needs_one_mark(tmp_path):
    from radacx_cache.sources.vindr import read_tables
    root = _table(tmp_path, [(A, "R1", "Cardiomegaly", 1, 2, 3, 4), (A, "R2", "No finding", "", "", "", ""),
                             (A, "R3", "No finding", "", "", "", "")])
    _table(root, [(B, "Atelectasis", 1, 2, 3, 4)], "annotations/annotations_test.csv",
           ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"])
    entries = read_tables(root, 2)[0].set_index("dicom_id")
    assert entries.loc[A, "Cardiomegaly"] == -1 and entries.loc[B, "Atelectasis"] == 1
    assert entries.loc[B, "split"] == "test" and entries.loc[B, "prefix"] == "test"


def test_bad_rows_become_reasons(tmp_path):
    from radacx_cache.sources.vindr import id_problem, read_tables
    root = _table(tmp_path, [(A, "R1", "yes", "", "", "", ""), (B, "R1", "Cardiomegaly", 30, 2, 10, 4),
                             (B, "R2", "Cardiomegaly", "1e999", 2, 3, 4)])
    entries, _, boxes, rejects = read_tables(root)
    assert "class_name 'yes' is not a VinDr-CXR label" in entries.set_index("dicom_id").loc[A, "label_problem"]
    assert len(boxes) == 0 and len(rejects) == 2
    assert all("is not a box" in r["reason"] and r["id"] == B for r in rejects)
    assert "not a VinDr-CXR image id" in id_problem("../" + A, "1", "1")


def test_a_table_without_its_columns_is_one_line_naming_it(tmp_path):
    from radacx_cache.sources.vindr import read_tables
    root = _table(tmp_path, [(A, "R1", "Cardiomegaly")], columns=["image_id", "rad_id", "class_name"])
    with pytest.raises(ValueError, match=r"annotations_train.csv: missing column\(s\) \['x_min'"):
        read_tables(root)
    with pytest.raises(FileNotFoundError, match="VinDr-CXR tables not found"):
        read_tables(tmp_path / "nowhere")


def test_reader_on_the_real_kaggle_table(tmp_path):
    """torchxrayvision ships the challenge's train.csv (vinbigdata-train.csv.gz): 67,914 rows, 15,000
    images, three readers each; the box counts of the four findings the issue names match, and the
    label rule recounts from the raw rows with plain pandas."""
    txv = pytest.importorskip("torchxrayvision")
    src = Path(txv.__file__).parent / "data" / "vinbigdata-train.csv.gz"
    if not src.exists():
        pytest.skip("this torchxrayvision does not ship vinbigdata-train.csv.gz")
    with gzip.open(src, "rb") as f, open(tmp_path / "train.csv", "wb") as out:
        shutil.copyfileobj(f, out)
    from radacx_cache.sources.vindr import read_tables
    entries, split, boxes, rejects = read_tables(tmp_path, 2)
    raw = pd.read_csv(tmp_path / "train.csv")
    assert (len(raw), raw["image_id"].nunique(), len(entries)) == (67_914, 15_000, 15_000) and rejects == []
    counts = boxes["finding"].value_counts()
    assert (counts["Cardiomegaly"], counts["Pleural Effusion"], counts["Consolidation"], counts["Atelectasis"]) == \
        (5_427, 2_476, 556, 279)
    # kept as truth by the cohort: only where the readers agreed on the finding (>= 2 of 3)
    from radacx_cache.stages.cohort import cohort_boxes
    classes = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    cohort = entries.assign(Rows=1e6, Columns=1e6, **{f"positive_{k}": entries[k].fillna(0) for k in classes})
    kept, _ = cohort_boxes(boxes, cohort, classes, in_pixels=True)
    kept_counts = kept["finding"].value_counts()
    assert tuple(kept_counts[k] for k in ("Cardiomegaly", "Pleural Effusion", "Consolidation", "Atelectasis")) == \
        (4_943, 2_007, 311, 146)
    assert entries["Edema"].isna().all()  # the challenge's 14 classes have no edema
    for ours, theirs in (("Cardiomegaly", "Cardiomegaly"), ("Pleural Effusion", "Pleural effusion")):
        readers = raw[raw["class_name"] == theirs].groupby("image_id")["rad_id"].nunique()
        want = readers.reindex(entries["dicom_id"], fill_value=0).to_numpy()
        got = entries[ours].to_numpy()
        assert ((got == 1) == (want >= 2)).all() and ((got == -1) == (want == 1)).all()
    assert ((boxes["x1"] > boxes["x0"]) & (boxes["y1"] > boxes["y0"]) & (boxes[["x0", "y0"]] >= 0).all(1)).all()


def test_real_chexmask_rows_are_vindr_ids():
    from conftest import shared_path

    from radacx_cache.sources import vindr
    from radacx_cache.sources.chexmask import read_chexmask
    df = read_chexmask(shared_path("chexmask-samples", "VinDr-CXR.csv"), id_column="image_id")
    assert len(df) >= 50
    for image_id in df["dicom_id"]:
        n = str(vindr.subject_of(image_id))
        assert vindr.id_problem(image_id, n, n) is None, image_id


def test_torchxrayvision_reads_our_dicoms_as_we_do(tmp_path):
    """torchxrayvision's VinDr_Dataset decodes the phantom's DICOMs with pydicom's own modality LUT
    and windowing and its own MONOCHROME1 rule: its pixels and ours agree (correlation > 0.99)."""
    xrv = pytest.importorskip("torchxrayvision")
    from radacx_cache.render import decode_grey
    (tmp_path / "train").mkdir()
    rows = []
    for k, data in enumerate(dicoms(6)):
        image_id = f"{'f' * 31}{k:x}"
        (tmp_path / "train" / f"{image_id}.dicom").write_bytes(data)
        rows.append((image_id, "R1", "Cardiomegaly", 10.0, 20.0, 50.0, 60.0))
    _table(tmp_path, rows, "train.csv")
    ds = xrv.datasets.VinDr_Dataset(imgpath=str(tmp_path / "train"), csvpath=str(tmp_path / "train.csv"))
    for i in range(len(ds)):
        theirs = ds[i]["img"][0]
        ours = decode_grey((tmp_path / "train" / f"{ds.csv['image_id'].iloc[i]}.dicom").read_bytes(),
                           formats=("DICOM",))[0]
        assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.99, i
    assert os.path.exists(tmp_path / "train.csv")
