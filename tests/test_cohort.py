from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from radacx_cache.stages.cohort import apply_label_policy, patient_split

FAULT_EXPECTATIONS = {
    "missing_jpeg": ("shards", "image file not found"),
    "empty_jpeg": ("shards", "empty"),
    "truncated_jpeg": ("shards", "cannot decode"),
    "corrupt_jpeg": ("shards", "cannot decode"),
    "rle_odd_count": ("shards", "odd number"),
    "rle_decreasing_starts": ("shards", "not strictly increasing"),
    "rle_out_of_bounds": ("shards", "past the end"),
    "jpeg_size_mismatch": ("shards", "but the tables / CheXmask say"),  # caught before decoding
    "mask_size_mismatch": ("cohort", "!= metadata Rows x Columns"),
    "missing_mask_row": ("cohort", "no CheXmask row"),
    "missing_label_row": ("cohort", "no row in chexpert labels"),
    "duplicate_label_row": ("cohort", "several rows in chexpert"),
    "blank_view": ("cohort", "view <blank>"),
    "bad_label_value": ("cohort", "= 'yes' is not 1, 0, -1 or blank"),
}
CLASSES = ["A", "B", "C"]


def labels(rows):
    return pd.DataFrame(rows, columns=CLASSES)


def test_uncertain_policies():
    df = labels([[-1, np.nan, 0], [1, -1, np.nan]])
    t, status = apply_label_policy(df, CLASSES, "ignore", "any", CLASSES)
    assert status.tolist() == [1, 0] and t[1].tolist() == [1, 0, 0]
    t, status = apply_label_policy(df, CLASSES, "ones", "any", CLASSES)
    assert status.tolist() == [0, 0] and t[1].tolist() == [1, 1, 0]
    t, status = apply_label_policy(df, CLASSES, "zeros", "any", CLASSES)
    assert status.tolist() == [1, 0]


def test_multi_positive_policies():
    df = labels([[1, 1, 0], [0, 1, np.nan]])
    _, status = apply_label_policy(df, CLASSES, "ignore", "single", CLASSES)
    assert status.tolist() == [2, 0]
    t, _ = apply_label_policy(df, CLASSES, "ignore", "first", ["B", "A", "C"])
    assert t.tolist() == [[0, 1, 0], [0, 1, 0]]
    t, _ = apply_label_policy(df, CLASSES, "ignore", "any", CLASSES)
    assert t.tolist() == [[1, 1, 0], [0, 1, 0]]


def test_splits_are_patient_disjoint_seeded_and_sized():
    rng = np.random.default_rng(0)
    subjects = rng.integers(0, 300, 2000)
    official = np.where(subjects < 20, "test", np.where(subjects < 30, "validate", "train"))
    paper = patient_split(subjects, official, "paper", 1 / 6, seed=1)
    for split in ("train", "val", "test"):
        others = set(subjects[paper != split])
        assert not set(subjects[paper == split]) & others
    assert set(subjects[paper == "test"]) == set(subjects[official == "test"])
    pool = paper != "test"
    assert abs((paper[pool] == "val").mean() - 1 / 6) < 0.03
    assert (paper == patient_split(subjects, official, "paper", 1 / 6, seed=1)).all()
    assert (paper != patient_split(subjects, official, "paper", 1 / 6, seed=2)).any()
    off = patient_split(subjects, official, "official", 1 / 6, seed=1)
    assert set(off) == {"train", "val", "test"}
    leaky = official.copy()
    leaky[np.flatnonzero(subjects == subjects[0])[-1]] = "test" if official[0] != "test" else "train"
    with pytest.raises(ValueError, match="several splits"):
        patient_split(subjects, leaky, "paper", 1 / 6, seed=1)


def test_every_planted_fault_is_rejected_with_its_reason(pipeline, phantom):
    work = Path(pipeline["cfg"].workdir)
    rejects = pd.concat([pd.read_csv(work / "cohort" / "rejects.csv"),
                         pd.read_csv(work / "shards" / "rejects.csv")])
    assert {f["fault"] for f in phantom["planted"]} == set(FAULT_EXPECTATIONS)
    for fault in phantom["planted"]:
        stage, reason = FAULT_EXPECTATIONS[fault["fault"]]
        if fault["fault"] in ("missing_label_row", "duplicate_label_row"):
            cohort = pd.read_csv(work / "cohort" / "cohort.csv")
            assert not ((cohort["study_id"] == fault["study_id"]) & (cohort["subject_id"] == fault["subject_id"])).any()
            hits = rejects[rejects["reason"].str.contains(reason, regex=False)]
            assert len(hits), fault
            continue
        row = rejects[rejects["id"] == fault["dicom_id"]]
        assert len(row) == 1, fault
        assert row["stage"].iloc[0] == stage, fault
        assert reason in row["reason"].iloc[0], (fault, row["reason"].iloc[0])


def test_cohort_is_patient_disjoint_positive_and_good_masks(pipeline):
    cfg = pipeline["cfg"]
    cohort = pd.read_csv(Path(cfg.workdir) / "cohort" / "cohort.csv")
    per_patient = cohort.groupby("subject_id")["split"].nunique()
    assert (per_patient == 1).all()
    assert (cohort[[f"target_{c}" for c in cfg.cohort.classes]].sum(axis=1) >= 1).all()
    assert (cohort["quality_mean"] >= 0.7).all()
    assert set(cohort["ViewPosition"]) <= {"PA", "AP"}
    assert pipeline["cohort"]["rows"] == len(cohort) > 300
    rejects = pd.read_csv(Path(cfg.workdir) / "cohort" / "rejects.csv")
    assert rejects["reason"].str.contains("mask quality").any()  # low-quality masks were planted
    assert rejects["reason"].str.contains("LATERAL").any()


def test_cohort_rerun_is_a_no_op(pipeline):
    from radacx_cache.stages.cohort import build_cohort
    path = Path(pipeline["cfg"].workdir) / "cohort" / "cohort.csv"
    before = path.stat().st_mtime_ns
    build_cohort(pipeline["cfg"])
    assert path.stat().st_mtime_ns == before


def test_phantom_and_cohort_reruns_keep_the_fingerprint(phantom, tmp_path):
    import os

    from conftest import make_config

    from radacx_cache.phantom.generator import generate
    from radacx_cache.stages.cohort import build_cohort
    root = os.path.dirname(os.path.dirname(phantom["root"]))  # <out>/mimic-cxr-jpg/2.0.0
    again = generate(root, n_patients=400, long_side=256, seed=7, faults=True, progress=False)
    assert again == phantom  # up to date: nothing regenerated
    cfg = make_config(phantom, tmp_path)
    first = build_cohort(cfg, progress=False)
    os.utime(phantom["chexmask_csv"])  # touched, not changed: the cohort is recomputed ...
    second = build_cohort(cfg, progress=False)
    assert second["inputs_fingerprint"] != first["inputs_fingerprint"]
    assert second["fingerprint"] == first["fingerprint"]  # ... to the same content: shards stay valid


def small_tables(**chexmask_overrides):
    """Archive tables without files: 4 patients, one frontal image each, masks of 10x10."""
    from radacx_cache.findings import FINDINGS_ALL
    from radacx_cache.stages.cohort import ArchiveTables
    ids = [f"{i:08x}-00000000-00000000-00000000-0000000{i}" for i in range(4)]  # real-format dicom_ids
    meta = pd.DataFrame({"dicom_id": ids, "subject_id": [10000001, 10000002, 10000003, 10000004],
                         "study_id": [50000001, 50000002, 50000003, 50000004], "ViewPosition": ["PA"] * 4,
                         "Rows": [10] * 4, "Columns": [10] * 4})
    labels = meta[["subject_id", "study_id"]].copy()
    for c in FINDINGS_ALL:
        labels[c] = np.nan
    labels["Edema"] = [1.0, 1.0, 1.0, 1.0]
    labels["Atelectasis"] = [-1.0, 0.0, 1.0, np.nan]  # uncertain, negative, positive, blank
    split = meta[["dicom_id", "study_id", "subject_id"]].assign(split=["train", "train", "validate", "test"])
    chexmask = pd.DataFrame({"dicom_id": ids, "quality_mean": [0.8] * 4, "quality_max": [0.9] * 4,
                             "height": [10] * 4, "width": [10] * 4, "landmarks": [""] * 4,
                             "right_lung": ["1 5"] * 4, "left_lung": ["7 3"] * 4, "heart": ["50 5"] * 4})
    for col, (row, value) in chexmask_overrides.items():
        chexmask.loc[row, col] = value
    return ArchiveTables(meta, labels, split, chexmask)


def test_select_cohort_is_pure_and_rejects_a_swapped_dice_row():
    from radacx_cache.config import CohortConfig
    from radacx_cache.stages.cohort import select_cohort
    cohort, rejects = select_cohort(small_tables(quality_mean=(1, 0.95)), CohortConfig(), seed=0)
    img = small_tables().metadata["dicom_id"].tolist()
    assert set(cohort["dicom_id"]) == {img[0], img[2], img[3]}
    assert rejects == [{"id": img[1], "stage": "cohort", "reason": "CheXmask Dice RCA (Mean) > (Max): the columns look swapped"}]
    row = cohort.set_index("dicom_id")
    assert row.loc[img[0], "uncertain_Atelectasis"] == 1 and row.loc[img[0], "positive_Atelectasis"] == 0
    assert row.loc[img[2], "positive_Atelectasis"] == 1 and row.loc[img[3], "uncertain_Atelectasis"] == 0
    ones, _ = select_cohort(small_tables(), CohortConfig(uncertain="ones"), seed=0)
    assert ones.set_index("dicom_id").loc[img[0], "positive_Atelectasis"] == 1  # under `ones`, -1 is positive
    first, _ = select_cohort(small_tables(), CohortConfig(multi_positive="first"), seed=0)
    r2 = first.set_index("dicom_id").loc[img[2]]  # Atelectasis and Edema: the first in priority is trained ...
    assert (r2["target_Atelectasis"], r2["target_Edema"]) == (1, 0)
    assert (r2["positive_Atelectasis"], r2["positive_Edema"]) == (1, 1)  # ... but both are scored as positive


@pytest.mark.parametrize("compressed", [False, True])
def test_streamed_cohort_equals_the_in_memory_reference(pipeline, tmp_path, compressed, monkeypatch):
    """The streaming cohort (CheXmask read chunk by chunk, RLE written as it goes) changes no result:
    the same cohort.csv, the same masks (RLE content hash) and the same rejects as the whole table in
    memory; a .csv.gz CheXmask table gives the same again."""
    import gzip
    import shutil

    from conftest import make_config

    from radacx_cache.formats.cohort_files import read_rle_rows, rle_content_hash, row_digest
    from radacx_cache.sources.chexmask import MASK_NAMES
    from radacx_cache.stages import cohort as cohort_module
    from radacx_cache.stages.cohort import build_cohort, read_archive_tables, select_cohort
    monkeypatch.setattr(cohort_module, "CHEXMASK_CHUNK_ROWS", 37)  # many chunks, a ragged last one
    cfg = pipeline["cfg"]
    chexmask = cfg.archive.chexmask_csv
    if compressed:
        chexmask = str(tmp_path / "MIMIC-CXR-JPG.csv.gz")
        with open(cfg.archive.chexmask_csv, "rb") as src, gzip.open(chexmask, "wb") as dst:
            shutil.copyfileobj(src, dst)
    phantom = {"root": cfg.archive.root, "chexmask_csv": chexmask}
    streamed_cfg = make_config(phantom, tmp_path / "work")
    manifest = build_cohort(streamed_cfg, progress=False)
    ref, ref_rejects = select_cohort(read_archive_tables(cfg), cfg.cohort, seed=cfg.seed, labeler=cfg.archive.labeler)
    cohort = pd.read_csv(tmp_path / "work" / "cohort" / "cohort.csv", dtype={"dicom_id": str})
    cols = [c for c in cohort.columns if c != "rle_row"]
    ref_csv = tmp_path / "ref.csv"
    ref[cols].to_csv(ref_csv, index=False)
    pd.testing.assert_frame_equal(cohort[cols], pd.read_csv(ref_csv, dtype={"dicom_id": str}))
    ref_hash = rle_content_hash(row_digest(t) for t in zip(*(ref[n] for n in MASK_NAMES)))
    assert manifest["rle_hash"] == ref_hash
    stored = read_rle_rows(tmp_path / "work" / "cohort" / "masks-rle.h5", cohort["rle_row"])
    assert rle_content_hash(row_digest([stored[d][n] for n in MASK_NAMES]) for d in cohort["dicom_id"]) == ref_hash
    rejects = pd.read_csv(tmp_path / "work" / "cohort" / "rejects.csv")
    assert sorted(zip(rejects["id"], rejects["reason"])) == sorted((r["id"], r["reason"]) for r in ref_rejects)


def test_a_cohort_rerun_that_fails_half_way_leaves_no_committed_mix(pipeline, tmp_path, monkeypatch):
    """The old cohort stays committed until the new one is ready; once outputs start to be replaced
    the old commit is withdrawn, so later stages refuse instead of mixing old rows with new masks."""
    import shutil

    from conftest import make_config

    from radacx_cache.formats.cohort_files import load_cohort
    from radacx_cache.stages import cohort as cohort_module
    from radacx_cache.workdir import Workdir
    cfg = pipeline["cfg"]
    work = tmp_path / "w"
    shutil.copytree(Path(cfg.workdir) / "cohort", work / "cohort")
    run = make_config({"root": cfg.archive.root, "chexmask_csv": cfg.archive.chexmask_csv}, work,
                      "cohort.min_mask_quality=0.75")  # another policy: a rerun must replace the cohort
    before = (work / "cohort" / "masks-rle.h5").read_bytes()

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed while streaming")
    monkeypatch.setattr(cohort_module, "iter_chexmask", dies)
    with pytest.raises(KeyboardInterrupt):
        cohort_module.build_cohort(run, progress=False)
    assert (work / "cohort" / "masks-rle.h5").read_bytes() == before  # untouched: still the committed one
    assert load_cohort(Workdir(work)) is not None
    assert not list((work / "cohort").glob(".*.tmp"))
    monkeypatch.undo()

    from radacx_cache.formats import cohort_files

    def csv_then_die(path, df):  # the cohort's tables are written by its format module
        raise KeyboardInterrupt("killed while writing the tables")
    monkeypatch.setattr(cohort_files, "write_csv", csv_then_die)
    with pytest.raises(KeyboardInterrupt):
        cohort_module.build_cohort(run, progress=False)
    from radacx_cache.formats.records import RecordError
    with pytest.raises(RecordError, match="no finished record"):
        load_cohort(Workdir(work))  # withdrawn: nothing downstream can read a mix
    monkeypatch.undo()
    assert cohort_module.build_cohort(run, progress=False)["rows"] > 0


# ---------------------------------------------------------------- hostile tables (issue 19)
def _mimic_tables(phantom, tmp_path):
    import shutil
    root = tmp_path / "archive"
    shutil.copytree(phantom["root"], root, ignore=shutil.ignore_patterns("*.jpg", "files"))
    return root


def test_a_non_utf8_byte_names_the_file_and_line(phantom, tmp_path):
    import gzip

    from radacx_cache.sources.mimic import read_metadata, table_path
    root = _mimic_tables(phantom, tmp_path)
    path = table_path(root, "metadata")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        lines = f.read().split(b"\n")
    view = next(i for i, line in enumerate(lines) if i and (b",PA," in line or b",AP," in line))
    lines[view] = lines[view].replace(b",PA,", b",P\xe9,").replace(b",AP,", b",A\xe9,")  # in a column read
    with opener(path, "wb") as f:
        f.write(b"\n".join(lines))
    with pytest.raises(ValueError, match=rf"line {view + 1} \(byte 0xe9\): not UTF-8 text"):
        read_metadata(root)


def test_a_duplicated_header_or_an_empty_table_is_refused_by_name(phantom, tmp_path):
    from radacx_cache.sources.mimic import read_metadata, table_path
    root = _mimic_tables(phantom, tmp_path)
    path = table_path(root, "metadata")
    df = pd.read_csv(path, dtype=str)
    flipped = df.assign(ViewPosition2=df["ViewPosition"].map({"PA": "LATERAL", "AP": "LL"}).fillna("LL"))
    flipped.to_csv(path, index=False, header=[*df.columns, "ViewPosition"])  # a second, disagreeing copy
    with pytest.raises(ValueError, match="column 'ViewPosition' appears 2 times in the header"):
        read_metadata(root)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{path.name}: empty table"):
        read_metadata(root)


def test_grouped_reject_reasons_show_the_range_of_their_values_not_a_placeholder():
    """Issue 29: "Dice RCA (Mean) N < 0.7" told nothing; each group shows the range its rows span, a
    group of one its value, and the rule's own numbers (0.7, the labels) stay."""
    from radacx_cache.formats.cohort_files import reason_counts
    reasons = pd.Series(["mask quality: CheXmask Dice RCA (Mean) 0.45 < 0.7",
                         "mask quality: CheXmask Dice RCA (Mean) 0.69 < 0.7",
                         "mask quality: CheXmask Dice RCA (Mean) 0.52 < 0.7",
                         "image 100x200 but CheXmask 300x400", "image 120x220 but CheXmask 300x400",
                         "image 50x60 but CheXmask 70x80 (a PNG)"[:-8]])
    assert reason_counts(reasons) == {"mask quality: CheXmask Dice RCA (Mean) 0.45 to 0.69 < 0.7": 3,
                                      "image 50x60 to 120x220 but CheXmask 70x80 to 300x400": 3}
    assert reason_counts(pd.Series(["mask quality: CheXmask Dice RCA (Mean) 0.61 < 0.7"])) == {
        "mask quality: CheXmask Dice RCA (Mean) 0.61 < 0.7": 1}
