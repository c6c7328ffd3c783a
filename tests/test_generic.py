"""Bring your own archive (issue 29): ``archive.kind: generic`` on real radiographs with manual masks.

The archive is built the way docs/archives.md tells a researcher to: a folder of images, a
``manifest.csv`` and a CheXmask-format mask table written from PNG masks by ``write_mask_table``.
The images are ``../shared/realcxr``'s Hannover radiographs (one manual mask covering both lungs) and
the CheXmask example (right lung, left lung and heart). They carry no labels for the five findings,
so the test gives each image one finding in turn: the point is the path from the folder to Table 1.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import shared_path

from radacx_cache.findings import FINDINGS

pytestmark = pytest.mark.pipeline


def realcxr_archive(root: Path) -> tuple[Path, Path]:
    """(archive root, mask table) of a generic archive built from ../shared/realcxr."""
    source = shared_path("realcxr")
    listing = pd.read_csv(source / "manifest.csv")
    listing = listing[listing["mask_files"].notna()].sort_values("file").reset_index(drop=True)
    (root / "images").mkdir(parents=True)
    rows, masks = [], {}
    for i, rec in enumerate(listing.to_dict("records")):
        image = rec["file"]
        shutil.copy(source / image, root / image)
        files = {}
        for mask in str(rec["mask_files"]).split(";"):
            kind = mask.rsplit("__", 1)[1].removesuffix(".png")
            name = {"lungs": "lungs", "lung_right": "right_lung", "lung_left": "left_lung", "heart": "heart"}[kind]
            (root / "masks").mkdir(exist_ok=True)
            shutil.copy(source / mask, root / mask)
            files[name] = mask
        if {"right_lung", "left_lung"} <= set(files):
            files.pop("lungs", None)
        masks[image] = files
        patient = str(rec["notes"]).split("patient ")[1].split(",")[0] if "patient " in str(rec["notes"]) else image
        split = "test" if i % 4 == 3 else "validate" if i % 4 == 2 and i < 8 else "train"
        rows.append({"image": image, "patient": patient, "view": "PA", "split": split,
                     **{c: (1 if k == i % len(FINDINGS) else 0) for k, c in enumerate(FINDINGS)}})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    from radacx_cache.sources.generic import write_mask_table
    table = write_mask_table(root, root / "masks.csv", masks)
    return root, table


@pytest.fixture(scope="module")
def generic_run(tmp_path_factory):
    from radacx_cache.config import load_config
    from radacx_cache.stages.cohort import build_cohort
    from radacx_cache.stages.embed import embed_all
    from radacx_cache.stages.probe import run_probes
    from radacx_cache.stages.report import build_report
    from radacx_cache.stages.shards import build_shards
    from radacx_cache.stages.zeroshot import run_zeroshot
    root, table = realcxr_archive(tmp_path_factory.mktemp("realcxr-generic"))
    cfg = load_config(None, [f"workdir={tmp_path_factory.mktemp('work-generic')}", "archive.kind=generic",
                             f"archive.root={root}", f"archive.chexmask_csv={table}", "seed=3",
                             "shards.n_jobs=1", "report.bootstrap=50"])
    out = {"cfg": cfg, "root": root, "cohort": build_cohort(cfg, progress=False),
           "shards": build_shards(cfg, progress=False)}
    embed_all(cfg, progress=False)
    run_zeroshot(cfg)
    run_probes(cfg)
    out["report"] = build_report(cfg)
    return out


def test_a_generic_archive_of_real_radiographs_runs_from_cohort_to_table_1(generic_run):
    work = Path(generic_run["cfg"].workdir)
    cohort = pd.read_csv(work / "cohort" / "cohort.csv")
    assert len(cohort) == 17 and generic_run["cohort"]["archive_name"] == "generic archive"
    assert (cohort.groupby("subject_id")["split"].nunique() == 1).all()
    assert generic_run["shards"]["rows"] == 17 and generic_run["shards"]["rejects"] == 0
    table1 = (work / "results" / "table1.md").read_text()
    assert "generic archive" in table1 and "Baseline" in table1 and "V1" in table1


def test_the_masks_land_on_the_real_lungs_right_lung_on_the_image_left(generic_run):
    """The Hannover masks cover both lungs in one file: split into the patient's right lung (the image's
    left) and left lung; in the shards the lungs are darker than the rest of the body, as on any film."""
    from radacx_cache.formats.shard import open_shards
    shards = open_shards(Path(generic_run["cfg"].workdir) / "shards")
    for i in range(len(shards)):
        item = shards[i]
        right, left, heart = item["masks"].astype(bool)
        assert right.sum() > 1000 and left.sum() > 1000
        assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean()
        body = item["original"] > 20
        assert item["original"][right | left].mean() < item["original"][body & ~(right | left)].mean()
        if item["dicom_id"].startswith("images/wikimedia"):
            assert heart.sum() > 500  # the CheXmask example has its heart; Hannover's masks have none


def test_split_lungs_takes_the_two_largest_regions_and_names_them_by_side():
    from radacx_cache.sources.generic import split_lungs
    lungs = np.zeros((40, 60), bool)
    lungs[5:35, 5:25] = True  # the image's left: the patient's right lung
    lungs[5:35, 35:55] = True
    lungs[0:2, 0:2] = True  # a speck, not a lung
    right, left = split_lungs(lungs)
    assert right[10, 10] and left[10, 40] and not right[0, 0] and not left[0, 0]
    with pytest.raises(ValueError, match="1 connected region"):
        split_lungs(lungs[2:, :30])  # one lung only (the speck cut off)


@pytest.mark.parametrize("cell, problem", [("1", None), ("-1.0", None), ("", None), ("yes", "'yes' is not 1, 0"),
                                           ("2", "'2' is not 1, 0")])
def test_a_manifest_label_is_one_of_the_policy_values(tmp_path, cell, problem):
    from radacx_cache.sources.generic import read_manifest
    pd.DataFrame([{"image": "a.png", "patient": "p1", "Edema": cell}]).to_csv(tmp_path / "manifest.csv", index=False)
    df = read_manifest(tmp_path)
    assert df["label_problem"].iloc[0] == (None if problem is None else df["label_problem"].iloc[0])
    if problem:
        assert problem in df["label_problem"].iloc[0]
    assert df["ViewPosition"].iloc[0] == "PA" and df["split"].iloc[0] == "train"


@pytest.mark.parametrize("image, ok", [("images/a.png", True), ("a b/c.JPG", True), ("../a.png", False),
                                       ("/etc/a.png", False), ("images//a.png", False), ("a.gif", False)])
def test_a_manifest_image_is_a_relative_png_or_jpeg_inside_the_archive(image, ok):
    from radacx_cache.sources.generic import id_problem
    assert (id_problem(image, "12", "34") is None) == ok
