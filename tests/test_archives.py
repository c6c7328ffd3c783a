"""The open archives of the registry (NIH ChestX-ray14, CheXpert, VinDr-CXR, PadChest): readers, phantoms
in their layouts, the torchxrayvision peer, the real label tables torchxrayvision ships, and the same
planted faults as the MIMIC phantom. The archives come from the registry: one added there is tested here."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import shared_path
from test_cohort import FAULT_EXPECTATIONS

from radacx_cache.sources import ARCHIVES

LAYOUTS = tuple(kind for kind in ARCHIVES if kind != "mimic")  # MIMIC's phantom: tests/test_cohort.py
# where NIH / CheXpert differ from MIMIC in how a planted fault shows (the fault is the same)
LAYOUT_EXPECTATIONS = {
    "nih": {"mask_size_mismatch": ("shards", "but the tables / CheXmask say"),  # no sizes in NIH's tables:
            "missing_label_row": ("cohort", "has no row in Data_Entry_2017_v2020.csv"),  # checked on the PNG
            "duplicate_label_row": ("cohort", "Image Index appears several times in Data_Entry_2017_v2020.csv"),
            "bad_label_value": ("cohort", "unknown label 'yes'")},
    "chexpert": {"mask_size_mismatch": ("shards", "nor a downscaled copy of the same aspect ratio"),
                 "jpeg_size_mismatch": ("shards", "nor a downscaled copy of the same aspect ratio"),
                 "duplicate_label_row": ("cohort", "Path appears several times in train.csv / valid.csv"),
                 "bad_label_value": ("cohort", "= 'yes' is not 1, 0, -1 or blank")},
    "vindr": {"mask_size_mismatch": ("shards", "but the tables / CheXmask say"),  # checked on the DICOM
              "corrupt_jpeg": ("shards", "not a DICOM file"),
              "bad_label_value": ("cohort", "class_name 'yes' is not a VinDr-CXR label")},
    "padchest": {"mask_size_mismatch": ("shards", "but the tables / CheXmask say"),  # checked on the PNG
                 "duplicate_label_row": ("cohort", "ImageID appears several times in"),
                 "bad_label_value": ("cohort", "Labels 'yes' is not a list of quoted terms")},
    "generic": {"mask_size_mismatch": ("shards", "but the tables / CheXmask say"),  # checked on the PNG
                "duplicate_label_row": ("cohort", "image appears several times in manifest.csv"),
                "bad_label_value": ("cohort", "'yes' is not 1, 0, -1 or blank")},
}


def txv_data(name: str):
    """A table torchxrayvision ships in its data/ folder (real NIH / CheXpert label tables)."""
    txv = pytest.importorskip("torchxrayvision")
    path = os.path.join(os.path.dirname(txv.__file__), "data", name)
    if not os.path.exists(path):
        pytest.skip(f"torchxrayvision {txv.__version__} does not ship {name}")
    return path


@pytest.fixture(scope="module", params=LAYOUTS)
def archive(request, tmp_path_factory):
    """A small phantom in the layout, with faults, through cohort and shards."""
    from conftest import make_config

    from radacx_cache.phantom.generator import generate
    from radacx_cache.stages.cohort import build_cohort
    from radacx_cache.stages.shards import build_shards
    layout = request.param
    out = tmp_path_factory.mktemp(f"phantom-{layout}")
    patients = 330 if layout == "vindr" else 110  # VinDr: one image per patient
    summary = generate(out, n_patients=patients, long_side=160, seed=5, faults=True, progress=False, layout=layout)
    cfg = make_config(summary, tmp_path_factory.mktemp(f"work-{layout}"), f"archive.kind={layout}",
                      "shards.max_reject_share=0.2")
    return {"layout": layout, "phantom": summary, "cfg": cfg, "cohort": build_cohort(cfg, progress=False),
            "shards": build_shards(cfg, progress=False)}


def test_every_planted_fault_is_rejected_with_its_reason(archive):
    work, layout = Path(archive["cfg"].workdir), archive["layout"]
    rejects = pd.concat([pd.read_csv(work / "cohort" / "rejects.csv"), pd.read_csv(work / "shards" / "rejects.csv")])
    expected = {**FAULT_EXPECTATIONS, **LAYOUT_EXPECTATIONS[layout]}
    from radacx_cache.phantom.layouts import LAYOUTS as PHANTOM_LAYOUTS
    planted = {f["fault"] for f in archive["phantom"]["planted"]}
    assert planted == set(FAULT_EXPECTATIONS) - PHANTOM_LAYOUTS[layout].faults_not_in_layout
    assert len(planted) >= 11
    for fault in archive["phantom"]["planted"]:
        stage, reason = expected[fault["fault"]]
        row = rejects[rejects["id"] == fault["dicom_id"]]
        assert len(row) == 1, fault
        assert row["stage"].iloc[0] == stage, (fault, row["reason"].iloc[0])
        assert reason in row["reason"].iloc[0], (fault, row["reason"].iloc[0])


def test_the_cohort_contract_holds_on_every_layout(archive):
    cfg, layout = archive["cfg"], archive["layout"]
    cohort = pd.read_csv(Path(cfg.workdir) / "cohort" / "cohort.csv")
    assert (cohort.groupby("subject_id")["split"].nunique() == 1).all()  # patient-disjoint
    assert set(cohort["split"]) == {"train", "val", "test"}
    assert set(cohort["ViewPosition"]) <= {"PA", "AP"}
    assert (cohort[[f"target_{c}" for c in cfg.cohort.classes]].sum(axis=1) == 1).all()
    assert archive["cohort"]["archive_name"] == {"nih": "NIH ChestX-ray14", "chexpert": "CheXpert",
                                                 "vindr": "VinDr-CXR", "padchest": "PadChest",
                                                 "generic": "generic archive"}[layout]
    if layout == "vindr":  # one image per "patient"; the official test table stays the test split
        assert cohort["path"].str.fullmatch(r"(train|test)/[0-9a-f]{32}\.dicom").all()
        assert (cohort.loc[cohort["split"] == "test", "path"].str.startswith("test/")).all()
        assert cohort["subject_id"].is_unique and archive["cohort"]["policy"]["min_readers"] == 2
        assert cohort[[f"uncertain_{c}" for c in cfg.cohort.classes]].to_numpy().sum() > 0  # one reader of three
    elif layout == "padchest":  # no uncertain labels, no official split, Mean > Max kept, methods counted
        assert cohort[[f"uncertain_{c}" for c in cfg.cohort.classes]].to_numpy().sum() == 0
        assert cohort["path"].str.fullmatch(r"\d{1,2}/2\d{20}_[0-9a-z]{6}\.png").all()
        assert (cohort["quality_mean"] > cohort["quality_max"]).mean() > 0.4
        methods = archive["cohort"]["archive_summary"]["label_method"]
        assert sum(methods.values()) == len(cohort) and methods["Physician"] > 0 and methods["RNN_model"] > 0
    elif layout == "generic":  # the manifest's image paths are the ids; its split column is kept
        assert cohort["path"].str.fullmatch(r"images/p\d{5}_s\d+_v\d\.png").all()
        assert (cohort["path"] == cohort["dicom_id"]).all()
        assert cohort[[f"uncertain_{c}" for c in cfg.cohort.classes]].to_numpy().sum() > 0  # -1 cells read
    elif layout == "nih":  # NIH has no uncertain labels, and its Rows x Columns come from CheXmask
        assert cohort[[f"uncertain_{c}" for c in cfg.cohort.classes]].to_numpy().sum() == 0
        assert cohort["path"].str.fullmatch(r"images/\d{8}_\d{3}\.png").all()
    else:
        assert cohort["path"].str.startswith("CheXpert-v1.0-small/").all()
        test_tables = cohort.loc[cohort["split"] == "test", "path"]
        assert test_tables.str.contains("/valid/").all()  # the official held-out table stays the test split


def test_masks_land_on_the_anatomy_at_the_image_size_or_its_downscaled_copy(archive):
    """NIH: the PNG is CheXmask's frame. CheXpert-v1.0-small: the JPEG is smaller than CheXmask's
    frame; the shard records both sizes and the masks still land on the lungs."""
    from radacx_cache.formats.shard import ShardSet
    train = ShardSet(Path(archive["cfg"].workdir) / "shards").split("train")
    for i in range(0, len(train), max(1, len(train) // 6)):
        height, width, *_, mask_height, mask_width = train.row(i, ("geometry",))["geometry"]
        if archive["layout"] == "chexpert":
            assert (height, width) == (round(mask_height * 0.75), round(mask_width * 0.75))
        else:
            assert (height, width) == (mask_height, mask_width)
        item = train.row(i, ("original", "masks"))
        lungs, body = item["masks"][:2].any(0), item["original"] > 0
        # the phantom's lungs are darker than the rest of the body (mediastinum, bone, soft tissue)
        assert item["original"][lungs].mean() < item["original"][~lungs & body].mean() - 10


def test_torchxrayvision_reads_the_phantom_layout(archive):
    """A peer reader nobody here wrote: torchxrayvision's own dataset class for the archive reads the
    phantom's tables and frontal images, with the same labels, and images of the size CheXmask says
    (NIH) or the -small copy of it (CheXpert)."""
    xrv = pytest.importorskip("torchxrayvision")
    layout, summary = archive["layout"], archive["phantom"]
    work = Path(archive["cfg"].workdir)
    cohort = pd.read_csv(work / "cohort" / "cohort.csv")
    broken = set(pd.read_csv(work / "shards" / "rejects.csv")["id"])  # the planted bad files
    cohort = cohort[~cohort["dicom_id"].isin(broken)].set_index("path")
    chexmask = pd.read_csv(summary["chexmask_csv"],
                           usecols=lambda c: c in ("Image Index", "Path", "image_id", "Height", "Width"))
    root = summary["root"]
    if layout == "nih":
        ds = xrv.datasets.NIH_Dataset(imgpath=os.path.join(root, "images"),
                                      csvpath=os.path.join(root, "Data_Entry_2017_v2020.csv"),
                                      views=["PA", "AP"], unique_patients=False)
        rel = "images/" + ds.csv["Image Index"]
        effusion = ds.pathologies.index("Effusion")
        sizes = chexmask.set_index("Image Index")
        keys = ds.csv["Image Index"]
    elif layout == "vindr":  # labels: torchxrayvision counts a finding any reader marked
        ds = xrv.datasets.VinDr_Dataset(imgpath=os.path.join(root, "train"),
                                        csvpath=os.path.join(root, "annotations", "annotations_train.csv"))
        rel = "train/" + ds.csv["image_id"] + ".dicom"
        effusion = ds.pathologies.index("Effusion")
        sizes = chexmask.set_index("image_id")
        keys = ds.csv["image_id"]
    elif layout == "padchest":
        pytest.skip("PC_Dataset reads a flat image folder: its peer test is tests/test_padchest.py")
    elif layout == "generic":
        pytest.skip("a generic archive is ours: no peer reader exists; tests/test_generic.py reads real radiographs")
    else:
        ds = xrv.datasets.CheX_Dataset(imgpath=os.path.join(root, "CheXpert-v1.0-small"),
                                       csvpath=os.path.join(root, "CheXpert-v1.0-small", "train.csv"),
                                       views=["PA", "AP"], unique_patients=False)
        rel = ds.csv["Path"]
        effusion = ds.pathologies.index("Effusion")
        sizes = chexmask.set_index("Path")
        keys = ds.csv["Path"].str.replace("CheXpert-v1.0-small/", "", regex=False)
    shared = [i for i, p in enumerate(rel) if p in cohort.index][:12]
    assert len(shared) >= 8
    checked = 0
    for i in shared:
        ours = cohort.loc[rel.iloc[i]]
        # "Effusion" is pleural effusion; torchxrayvision writes NaN for blank and uncertain labels
        marked = ours["positive_Pleural Effusion"] == 1 or (layout == "vindr" and ours["uncertain_Pleural Effusion"] == 1)
        assert (ds.labels[i, effusion] == 1) == marked
        img = ds[i]["img"]  # (1, H, W), read with skimage (pydicom for VinDr) by torchxrayvision
        h, w = sizes.loc[keys.iloc[i], ["Height", "Width"]]
        want = (h, w) if layout in ("nih", "vindr") else (round(h * 0.75), round(w * 0.75))
        assert img.shape[1:] == want
        checked += 1
    assert checked == len(shared)


def test_nih_reader_on_the_real_data_entry_table(tmp_path):
    """The real Data_Entry_2017_v2020.csv (shipped by torchxrayvision): its bracketed header reads as
    four columns we never use; labels agree with torchxrayvision's for every mapped finding."""
    from radacx_cache.sources.nih import NIH_LABELS, read_data_entry
    src = txv_data("Data_Entry_2017_v2020.csv.gz")
    shutil.copy(src, tmp_path / "Data_Entry_2017_v2020.csv.gz")
    df = read_data_entry(tmp_path)
    assert len(df) == 112_120 and df["label_problem"].isna().all()
    raw = pd.read_csv(src)
    assert {"OriginalImage[Width", "Height]"} <= set(raw.columns)
    for nih_name, ours in NIH_LABELS.items():
        if ours:
            expected = raw["Finding Labels"].str.split("|").map(lambda t: nih_name in t).to_numpy()
            assert (df[ours].to_numpy() == 1).tolist() == expected.tolist(), nih_name
    assert int(df["Pleural Effusion"].sum()) == 13_317
    assert df["Lung Opacity"].isna().all()  # NIH does not label it: unknown, not negative


def test_chexpert_reader_on_the_real_train_table(tmp_path):
    """The real CheXpert train table (shipped by torchxrayvision): views, the prefix, the labels as
    written, and the count of frontal images with one of the five findings positive (123,801)."""
    from radacx_cache.findings import FINDINGS
    from radacx_cache.sources.chexpert import read_tables
    from radacx_cache.stages.cohort import label_matrices
    src = txv_data("chexpert_train.csv.gz")
    (tmp_path / "CheXpert-v1.0-small").mkdir()
    shutil.copy(src, tmp_path / "CheXpert-v1.0-small" / "train.csv.gz")
    df = read_tables(tmp_path)
    raw = pd.read_csv(src)
    assert len(df) == len(raw) == 223_414 and df["label_problem"].isna().all()
    assert set(df["prefix"]) == {"CheXpert-v1.0-small"}
    assert not df["dicom_id"].str.startswith("CheXpert").any()
    assert df["ViewPosition"].value_counts().to_dict() == {"AP": 161_590, "LATERAL": 32_387, "PA": 29_420,
                                                           "LL": 16, "RL": 1}
    np.testing.assert_array_equal(df["Edema"].to_numpy(), raw["Edema"].to_numpy(np.float32))
    frontal = (raw["Frontal/Lateral"] == "Frontal").to_numpy()
    positive = label_matrices(df, FINDINGS, "ignore")[0].any(axis=1)
    assert int((frontal & positive).sum()) == 123_801


def test_readers_refuse_ids_that_could_leave_the_archive(tmp_path):
    from radacx_cache.sources import chexpert, nih
    assert nih.id_problem("00000001_000.png", "1", "0") is None
    assert "not an NIH" in nih.id_problem("../../etc/passwd", "1", "0")
    assert "does not match" in nih.id_problem("00000001_000.png", "2", "0")
    assert chexpert.parse_path("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")[1:] == (1, 1)
    assert chexpert.parse_path("CheXpert-v1.0-small/../../etc/view1_frontal.jpg") is None
    (tmp_path / "CheXpert-v1.0-small").mkdir()
    pd.DataFrame({"Path": ["CheXpert-v1.0-small/train/../../x/view1_frontal.jpg"], "Sex": ["Male"], "Age": [50],
                  "Frontal/Lateral": ["Frontal"], "AP/PA": ["PA"],
                  **{c: [1.0] for c in chexpert.FINDINGS_ALL}}).to_csv(
        tmp_path / "CheXpert-v1.0-small" / "train.csv", index=False)
    row = chexpert.read_tables(tmp_path).iloc[0]
    assert "not a CheXpert image path" in chexpert.id_problem(row["dicom_id"], row["subject_id"], row["study_id"])


def test_nih_kaggle_folders_are_found(tmp_path):
    from radacx_cache.sources.nih import image_folders, png_relpath
    (tmp_path / "images_002" / "images").mkdir(parents=True)
    (tmp_path / "images_002" / "images" / "00000001_000.png").write_bytes(b"")
    folders = image_folders(tmp_path)
    assert png_relpath("00000001_000.png", folders) == "images_002/images/00000001_000.png"
    (tmp_path / "images").mkdir()
    assert image_folders(tmp_path) is None


@pytest.mark.parametrize("name,kind", [("ChestX-Ray8.csv", "nih"), ("CheXpert.csv", "chexpert"),
                                       ("Padchest.csv", "padchest")])
def test_real_chexmask_rows_are_this_archives_ids(name, kind):
    """The real CheXmask rows of NIH, CheXpert and PadChest, read the way the cohort reads them: by
    the archive's id column, every id one the archive's reader would accept and join."""
    from radacx_cache.sources import chexpert, nih, padchest
    from radacx_cache.sources.chexmask import read_chexmask
    df = read_chexmask(shared_path("chexmask-samples", name), id_column=ARCHIVES[kind].chexmask_id_column)
    assert len(df) >= 50
    if kind == "padchest":  # Mean and Max in no fixed order: 30 of 50 rows Mean > Max, so not a swapped header
        assert ((df["quality_mean"] > df["quality_max"]).sum(), (df["quality_mean"] < df["quality_max"]).sum()) == (30, 20)
        assert not ARCHIVES["padchest"].mean_above_max_is_suspect and ARCHIVES["nih"].mean_above_max_is_suspect
    for image_id in df["dicom_id"]:
        if kind == "padchest":
            study = padchest.number_of(image_id.rsplit("_", 1)[0])
            assert padchest.id_problem(image_id, "1", str(study)) is None, image_id
        elif kind == "nih":  # the Image Index names its patient and follow-up, as Data_Entry has them
            parts = nih.parse_image_index(image_id)
            assert parts is not None and nih.id_problem(image_id, *parts) is None, image_id
        else:  # exactly the id the CheXpert reader makes of a table's Path (the prefix stripped)
            parsed = chexpert.parse_path(image_id)
            assert parsed is not None and parsed[0] == image_id, image_id
            assert chexpert.id_problem(*parsed) is None


# ---------------------------------------------------------------- radiologists' boxes (issue 20)
def test_nih_box_reader_on_the_real_bbox_table():
    """torchxrayvision ships NIH's BBox_List_2017.csv.gz (its real header, 'Bbox [x,y,w,h],,,'): 984
    boxes; the classes the five findings share are counted as NIH publishes them, every box lies in
    the 1024 x 1024 frame."""
    xrv = pytest.importorskip("torchxrayvision")
    from radacx_cache.sources.nih import read_bboxes
    path = Path(xrv.__file__).parent / "data" / "BBox_List_2017.csv.gz"
    boxes, rejects = read_bboxes(path)
    assert rejects == [] and len(pd.read_csv(path)) == 984
    counts = boxes["finding"].value_counts().to_dict()
    assert (counts["Atelectasis"], counts["Cardiomegaly"], counts["Pleural Effusion"]) == (180, 146, 153)
    assert ((boxes[["x0", "y0"]] >= 0).all().all() and (boxes[["x1", "y1"]] <= 1).all().all()
            and (boxes["x1"] > boxes["x0"]).all() and (boxes["y1"] > boxes["y0"]).all())
    first = boxes.iloc[0]  # 00013118_008.png,Atelectasis,225.08,547.02,86.78,79.19
    assert (first["dicom_id"], first["finding"]) == ("00013118_008.png", "Atelectasis")
    assert first["x0"] * 1024 == pytest.approx(225.084745762712) and first["y1"] * 1024 == pytest.approx(
        547.019216763771 + 79.1864406779661)


@pytest.mark.parametrize("archive", ["nih"], indirect=True)
def test_torchxrayvision_box_masks_agree_with_the_boxes_in_the_shards(archive):
    """The NIH phantom's BBox_List_2017.csv read by torchxrayvision's NIH_Dataset(pathology_masks=True)
    gives, in each image's frame, the boxes that the shards hold in theirs (mapped back through the
    stored geometry): IoU > 0.9 for every box of the five findings."""
    xrv = pytest.importorskip("torchxrayvision")
    from radacx_cache.formats.shard import ShardSet
    from radacx_cache.render import Geometry
    root, work = archive["phantom"]["root"], Path(archive["cfg"].workdir)
    ds = xrv.datasets.NIH_Dataset(imgpath=os.path.join(root, "images"),
                                  csvpath=os.path.join(root, "Data_Entry_2017_v2020.csv"),
                                  bbox_list_path=os.path.join(root, "BBox_List_2017.csv"), views=["PA", "AP"],
                                  unique_patients=False, pathology_masks=True)
    shards = ShardSet(work / "shards")
    names = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Effusion"}
    compared = 0
    for pos in range(len(shards)):
        boxes = shards.boxes_at(pos)
        if not boxes:
            continue
        item = shards.row(pos, ("geometry",))
        geom = Geometry.from_array(item["geometry"])
        theirs = ds.get_mask_dict(item["dicom_id"], geom.width)
        ours: dict = {}
        for k, x0, y0, x1, y1 in boxes:  # back to the image's frame
            box = np.zeros((geom.height, geom.width), bool)
            c0, c1 = [int(round(v / geom.scale - geom.pad_left)) for v in (x0, x1)]
            r0, r1 = [int(round(v / geom.scale - geom.pad_top)) for v in (y0, y1)]
            box[r0:r1, c0:c1] = True
            ours.setdefault(shards.target_names[k], []).append(box)
        for finding, mine in ours.items():
            if finding not in names:
                continue
            # torchxrayvision keeps one box per finding (the table's last): it must be one of ours
            mask = theirs[ds.pathologies.index(names[finding])][0] > 0
            assert max((b & mask).sum() / (b | mask).sum() for b in mine) > 0.9, (item["dicom_id"], finding)
            compared += 1
        if compared >= 10:
            break
    assert compared >= 5


@pytest.mark.parametrize("archive", ["vindr"], indirect=True)
def test_torchxrayvision_vindr_box_masks_agree_with_the_boxes_in_the_shards(archive):
    """The VinDr phantom's annotations_train.csv read by torchxrayvision's VinDr_Dataset(pathology_masks=True)
    (the union of every reader's boxes of a finding, in the DICOM's pixels) against the shards' boxes
    mapped back through the stored geometry: the same region for each finding the readers agreed on."""
    xrv = pytest.importorskip("torchxrayvision")
    from radacx_cache.formats.shard import ShardSet
    from radacx_cache.render import Geometry
    root, work = archive["phantom"]["root"], Path(archive["cfg"].workdir)
    ds = xrv.datasets.VinDr_Dataset(imgpath=os.path.join(root, "train"), pathology_masks=True,
                                    csvpath=os.path.join(root, "annotations", "annotations_train.csv"))
    names = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
             "Pleural Effusion": "Effusion"}
    train = ShardSet(work / "shards")
    ious = []
    for pos in range(len(train)):
        boxes, item = train.boxes_at(pos), train.row(pos, ("geometry",))
        if not boxes or not (ds.csv["image_id"] == item["dicom_id"]).any():
            continue
        geom = Geometry.from_array(item["geometry"])
        theirs = ds.get_mask_dict(item["dicom_id"], (1, geom.height, geom.width))
        ours: dict = {}
        for k, x0, y0, x1, y1 in boxes:  # back to the DICOM's pixels, cut as torchxrayvision cuts them (int())
            region = ours.setdefault(train.target_names[k], np.zeros((geom.height, geom.width), bool))
            c0, c1 = [int(v / geom.scale - geom.pad_left + 1e-4) for v in (x0, x1)]
            r0, r1 = [int(v / geom.scale - geom.pad_top + 1e-4) for v in (y0, y1)]
            region[r0:r1, c0:c1] = True
        for finding, mine in ours.items():
            if finding not in names:  # Edema: not among torchxrayvision's 14 VinDr classes
                continue
            mask = theirs[ds.pathologies.index(names[finding])][0] > 0
            ious.append((mine & mask).sum() / (mine | mask).sum())
    assert len(ious) >= 10 and min(ious) > 0.97, sorted(ious)[:5]
