"""PadChest (issue 26): the reader on the real BIMCV table torchxrayvision ships, its label terms,
ids and unusable-image marks, and torchxrayvision's ``PC_Dataset`` as the peer reader of the phantom.
The phantom's cohort and shards, with every planted fault, run in tests/test_archives.py."""
from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from radacx_cache.sources.padchest import TABLE_NAME, TERMS, id_problem, number_of, parse_labels, read_table_rows


def real_table():
    txv = pytest.importorskip("torchxrayvision")
    path = os.path.join(os.path.dirname(txv.__file__), "data", TABLE_NAME + ".gz")
    if not os.path.exists(path):
        pytest.skip(f"torchxrayvision {txv.__version__} does not ship {TABLE_NAME}.gz")
    return path


def test_the_real_table_is_read_and_counted(tmp_path):
    """160,861 images of 67,625 patients; the five findings recounted from the raw cells with plain
    pandas string matching, the unusable and unreadable rows rejected with their reason."""
    shutil.copy(real_table(), tmp_path / (TABLE_NAME + ".gz"))
    df = read_table_rows(tmp_path)
    raw = pd.read_csv(tmp_path / (TABLE_NAME + ".gz"), dtype=str, keep_default_na=False,
                      usecols=["ImageID", "PatientID", "Labels", "MethodLabel", "Projection"])
    assert (len(df), df["subject_id"].nunique(), raw["PatientID"].nunique()) == (160_861, 67_625, 67_625)
    assert df["label_method"].value_counts().to_dict() == {"RNN_model": 121_808, "Physician": 39_053}
    assert df["ViewPosition"].value_counts()[["PA", "L", "AP_horizontal", "AP"]].tolist() == [91_728, 49_579, 14_346, 4_559]
    problems = df["label_problem"].dropna()
    unusable = raw["Labels"].str.contains(r"'\s*(?:exclude|suboptimal study)\s*'")
    unreadable = ~raw["Labels"].str.strip().str.startswith("[")
    assert len(problems) == int((unusable | unreadable).sum()) and unusable.sum() > 3000 and unreadable.sum() == 103
    ok = df["label_problem"].isna().to_numpy()
    cells = raw["Labels"][ok]
    for finding in ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"):
        terms = [t for t, f in TERMS.items() if f == finding]
        pattern = "'\\s*(?:" + "|".join(map(re.escape, terms)) + ")\\s*'"  # the terms, quoted, spaces around
        want = cells.str.lower().str.contains(pattern).to_numpy()
        assert ((df.loc[ok, finding] == 1).to_numpy() == want).all(), finding
        assert want.sum() > 1000, finding
    # 'pericardial effusion' is fluid around the heart, not a pleural effusion
    pericardial_only = cells.str.contains(r"'\s*pericardial effusion\s*'") & \
        ~cells.str.contains(r"'\s*pleural effusion\s*'|loculated")
    assert pericardial_only.sum() > 10 and (df.loc[ok, "Pleural Effusion"][pericardial_only.to_numpy()] == 0).all()
    # every validated id builds a path; the stand-in ids are stable and distinct per patient
    assert df.apply(lambda r: id_problem(r["dicom_id"], r["subject_id"], r["study_id"]), axis=1).isna().all()
    assert df.groupby("subject_id")["subject_id"].size().sum() == len(df)


@pytest.mark.parametrize("cell,terms,problem", [
    ("['pleural effusion', 'cardiomegaly']", ["pleural effusion", "cardiomegaly"], None),
    ("['normal']", ["normal"], None),
    ("[]", [], None),
    ("[ 'Pulmonary Edema' ]", ["pulmonary edema"], None),
    ("", [], "Labels is empty"),
    (float("nan"), [], "Labels is empty"),
    ("pleural effusion", [], "is not a list"),
    ("['a', __import__('os').system('x')]", [], "is not a list"),  # never evaluated
    ("['unclosed", [], "is not a list"),
    ("[" + "'x'," * 2000 + "'x']", [], "is not a list"),  # longer than any real cell
])
def test_labels_cells_are_parsed_never_evaluated(cell, terms, problem):
    got, why = parse_labels(cell)
    assert got == terms
    assert (why is None) if problem is None else (problem in why)


def test_ids():
    good = "216840111366964012819207061112010307142602253_04-014-084.png"
    study = good.rsplit("_", 1)[0]
    assert id_problem(good, str(number_of("123")), str(number_of(study))) is None
    assert "not the study" in id_problem(good, str(number_of("123")), str(number_of(study + "1")))
    assert "not a PadChest file name" in id_problem("../../etc/passwd", "1", "1")
    assert "not a PadChest file name" in id_problem("1_2.jpg", "1", "1")
    assert "not a number" in id_problem(good, "12a", str(number_of(study)))
    assert number_of(study) < 2 ** 60 and number_of(study) == number_of(study)


def test_torchxrayvision_reads_the_phantom_as_we_do(tmp_path):
    """torchxrayvision's PC_Dataset (flat image folder, its own 16-bit normalisation and term matching)
    on the phantom: the same images, pixels that correlate with ours, and the same Cardiomegaly labels;
    its Effusion counts 'pericardial effusion' too, ours does not (the only place they may differ)."""
    txv = pytest.importorskip("torchxrayvision")
    from radacx_cache.phantom.generator import generate
    from radacx_cache.render import decode_grey
    summary = generate(tmp_path / "phantom", n_patients=40, long_side=128, seed=3, faults=False, progress=False,
                       layout="padchest")
    root = summary["root"]
    flat = tmp_path / "flat"
    flat.mkdir()
    ours = read_table_rows(root)
    for d, prefix in zip(ours["dicom_id"], ours["prefix"]):
        shutil.copy(os.path.join(root, prefix, d), flat / d)
    theirs = txv.datasets.PC_Dataset(imgpath=str(flat), csvpath=os.path.join(root, TABLE_NAME + ".gz"),
                                     views=["PA", "AP"], unique_patients=False)
    ours = ours[ours["label_problem"].isna() & ours["ViewPosition"].isin(["PA", "AP"])].set_index("dicom_id")
    ids = theirs.csv["ImageID"].tolist()
    assert len(ids) > 20 and set(ids) <= set(ours.index)
    k_card, k_eff = theirs.pathologies.index("Cardiomegaly"), theirs.pathologies.index("Effusion")
    for i in range(0, len(ids), max(1, len(ids) // 6)):
        sample = theirs[i]
        mine, _, _ = decode_grey((flat / ids[i]).read_bytes(), formats=("PNG",))
        r = np.corrcoef(sample["img"][0].ravel(), mine.astype(float).ravel())[0, 1]
        assert r > 0.99, (ids[i], r)
    card = ours.loc[ids, "Cardiomegaly"].to_numpy() == 1
    assert (theirs.labels[:, k_card] == 1).tolist() == card.tolist()
    effusion = ours.loc[ids, "Pleural Effusion"].to_numpy() == 1
    differ = (theirs.labels[:, k_eff] == 1) != effusion
    cells = theirs.csv["Labels"].to_numpy()
    assert all("pericardial effusion" in c and not effusion[j] for j, c in enumerate(cells) if differ[j])
    assert not re.search("eval|exec", str(theirs.csv["Labels"].iloc[0]))
