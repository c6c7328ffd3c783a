import functools
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from radacx_cache import open_shards
from radacx_cache.config import load_config
from radacx_cache.formats.shard import SCHEMA_VERSION, ShardError, validate_shard
from radacx_cache.formats.stream import ShardMapDataset
from radacx_cache.stages.shards import build_shards
from radacx_cache.workdir import Workdir

DATASETS = ("original", "masked", "masks", "labels", "targets", "dicom_id", "subject_id", "study_id",
            "mask_quality", "geometry")


def clone(pipeline, tmp_path, *overrides, with_shards=True):
    """A private copy of the session's cohort (and shards) under a new workdir."""
    cfg = pipeline["cfg"]
    shutil.copytree(Path(cfg.workdir) / "cohort", tmp_path / "cohort")
    if with_shards:
        shutil.copytree(Path(cfg.workdir) / "shards", tmp_path / "shards")
    return load_config(None, [f"workdir={tmp_path}", f"archive.root={cfg.archive.root}",
                              f"archive.chexmask_csv={cfg.archive.chexmask_csv}", "seed=7",
                              "shards.rows_per_shard=64", "shards.n_jobs=2", *overrides])


def contents(folder):
    out = {}
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path, "r") as f:
            out[path.name] = {k: f[k][:] for k in DATASETS}
    return out


def assert_same_shards(a, b):
    ca, cb = contents(a), contents(b)
    assert ca.keys() == cb.keys() and len(ca) > 0
    for name in ca:
        for key in DATASETS:
            np.testing.assert_array_equal(ca[name][key], cb[name][key], err_msg=f"{name}/{key}")


def test_shard_schema_and_reader(pipeline):
    cfg = pipeline["cfg"]
    shards = open_shards(Path(cfg.workdir) / "shards")
    manifest = pipeline["shards"]
    assert len(shards) == manifest["rows"] == sum(s["rows"] for s in manifest["shards"])
    assert manifest["rows"] + manifest["rejects"] == pipeline["cohort"]["rows"]
    path = Path(cfg.workdir) / "shards" / manifest["shards"][0]["name"]
    with h5py.File(path, "r") as f:
        assert f.attrs["schema"] == "radacx-shard" and f.attrs["schema_version"] == SCHEMA_VERSION
        n = f["original"].shape[0]
        assert f["original"].shape == (n, 224, 224) and f["original"].dtype == np.uint8
        assert f["masked"].shape == (n, 224, 224, 3)
        assert f["masks"].shape == (n, 3, 224, 224)
        assert f["labels"].shape == (n, 14) and f["geometry"].shape[0] == n
    item = shards[3]
    assert item["masked"].shape == (224, 224, 3) and item["targets"].sum() >= 1
    again = shards.get(item["dicom_id"])
    np.testing.assert_array_equal(again["original"], item["original"])
    test = shards.split("test")
    assert 0 < len(test) < len(shards) and set(test.index["split"]) == {"test"}
    # patient-disjoint splits, in the shards too
    per_patient = shards.index.groupby("subject_id")["split"].nunique()
    assert (per_patient == 1).all()
    for variant in ("original", "masked"):  # the zero-copy memory map equals an h5py read
        shard = shards.index["shard"].iloc[0]
        np.testing.assert_array_equal(np.asarray(shards.view(shard, variant)),
                                      shards.read(shard, variant, 0, 10 ** 9))
    ds = ShardMapDataset(shards, "masked")
    item = ds[5]
    assert tuple(item["pixels"].shape) == (224, 224, 3) and item["targets"].sum() >= 1 and item["index"] == 5
    with pytest.raises(KeyError):
        shards.get("no-such-id")


def test_written_shards_hold_what_the_schema_table_says(pipeline):
    """Every dataset of a written shard is a row of ``schema.DATASETS`` with its dtype, tail shape and
    storage; the images are contiguous (memory-mappable) and the masks chunked per row."""
    from radacx_cache.formats.shard import DATASETS, tail_shape
    path = Path(pipeline["cfg"].workdir) / "shards" / pipeline["shards"]["shards"][0]["name"]
    with h5py.File(path, "r") as f:
        n, size, k = f["dicom_id"].shape[0], int(f.attrs["size"]), len(json.loads(f.attrs["target_names"]))
        assert set(f) == {d.name for d in DATASETS if d.required}
        for d in DATASETS:
            if d.name not in f:
                continue
            ds = f[d.name]
            assert ds.shape == (n, *tail_shape(d, size, k)), d.name
            assert ds.dtype.kind == "S" if d.dtype == "S" else ds.dtype == np.dtype(d.dtype), d.name
            assert (ds.chunks is None) == (d.storage != "row-chunks"), d.name
            if d.storage == "row-chunks":
                assert ds.chunks == (1, *tail_shape(d, size, k)) and ds.compression == "gzip"


def test_the_reader_refuses_a_shard_off_the_schema(pipeline, tmp_path):
    """A shard whose geometry rows have 7 values (schema 1) or whose masks lost a structure is refused
    by the reader's schema check, naming the dataset."""
    src = Path(pipeline["cfg"].workdir) / "shards" / pipeline["shards"]["shards"][0]["name"]
    for name, bad in (("geometry", lambda a: a[:, :7]), ("masks", lambda a: a[:, :2])):
        copy = tmp_path / f"{name}.h5"
        shutil.copy(src, copy)
        with h5py.File(copy, "r+") as f:
            values = bad(f[name][:])
            del f[name]
            f[name] = values
        with pytest.raises(ShardError, match=name):
            validate_shard(copy)


def test_shard_rows_equal_a_fresh_render(pipeline):
    from radacx_cache.formats.cohort_files import load_cohort, read_rle_rows
    from radacx_cache.render import render_image
    cfg = pipeline["cfg"]
    shards = open_shards(Path(cfg.workdir) / "shards")
    cohort = load_cohort(Workdir(cfg.workdir))
    row = cohort[cohort["dicom_id"] == shards.index["dicom_id"].iloc[10]].iloc[0]
    rle = read_rle_rows(Path(cfg.workdir) / "cohort" / "masks-rle.h5", [row["rle_row"]])[row["dicom_id"]]
    data = (cfg.archive.root + "/" + row["path"])
    out = render_image(open(data, "rb").read(), rle, rle["shape"])
    item = shards[10]
    np.testing.assert_array_equal(out["original"], item["original"])
    np.testing.assert_array_equal(out["masks"], item["masks"].astype(bool))


def test_rerun_is_a_no_op(pipeline):
    folder = Path(pipeline["cfg"].workdir) / "shards"
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5")}
    build_shards(pipeline["cfg"], progress=False)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5")}


def test_other_render_config_is_refused(pipeline, tmp_path):
    cfg = clone(pipeline, tmp_path, "render.line_width=3")
    with pytest.raises(ShardError, match="another render config"):
        build_shards(cfg, progress=False)


def test_truncated_shard_is_detected_and_rebuilt(pipeline, tmp_path):
    cfg = clone(pipeline, tmp_path)
    victim = sorted((tmp_path / "shards").glob("*.h5"))[1]
    sidecar = pd.read_json(victim.with_suffix(".json"), typ="series")
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(ShardError, match="truncated"):
        validate_shard(victim, sidecar.to_dict())
    build_shards(cfg, progress=False)
    assert_same_shards(tmp_path / "shards", Path(pipeline["cfg"].workdir) / "shards")


def kill_worker_at(victim, name, tmp):
    """Test hook run in the worker after a shard is written: dies without cleaning up."""
    if name == victim:
        os._exit(17)  # a worker killed mid-write: its temporary file stays behind


def test_killed_worker_then_rerun_gives_identical_shards(pipeline, tmp_path):
    cfg = clone(pipeline, tmp_path, with_shards=False)
    with pytest.raises(Exception):
        build_shards(cfg, progress=False, on_written=functools.partial(kill_worker_at, "train-00002.h5"))
    assert not (tmp_path / "shards" / "manifest.json").exists()  # nothing committed
    assert not (tmp_path / "shards" / "train-00002.h5").exists()
    build_shards(cfg, progress=False)
    assert not list((tmp_path / "shards").glob(".*.tmp"))
    assert_same_shards(tmp_path / "shards", Path(pipeline["cfg"].workdir) / "shards")
    a = pd.read_csv(tmp_path / "shards" / "index.csv")
    b = pd.read_csv(Path(pipeline["cfg"].workdir) / "shards" / "index.csv")
    pd.testing.assert_frame_equal(a, b)


def test_dask_backend_on_a_local_cluster_gives_the_same_shards(pipeline, tmp_path):
    pytest.importorskip("dask.distributed")
    cfg = clone(pipeline, tmp_path, "shards.backend=dask", with_shards=False)
    build_shards(cfg, progress=False)
    assert_same_shards(tmp_path / "shards", Path(pipeline["cfg"].workdir) / "shards")


def test_inspect_writes_a_montage(pipeline, tmp_path):
    from radacx_cache.cli import main
    shard = sorted((Path(pipeline["cfg"].workdir) / "shards").glob("test-*.h5"))[0]
    png = tmp_path / "m.png"
    assert main(["inspect", str(shard), "--png", str(png), "--n", "4"]) == 0
    assert png.stat().st_size > 10_000
    from PIL import Image
    assert Image.open(png).size[0] > Image.open(png).size[1]


def test_unfinished_folder_is_not_opened(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(ShardError, match="manifest"):
        open_shards(tmp_path / "shards")


def test_a_shard_of_another_render_config_in_the_folder_is_refused(pipeline, tmp_path):
    import json

    from radacx_cache.stages.embed import embed_all
    cfg = clone(pipeline, tmp_path)
    victim = sorted((tmp_path / "shards").glob("val-*.h5"))[0]
    with h5py.File(victim, "r+") as f:
        f.attrs["render_fingerprint"] = "0123456789abcdef"
    with pytest.raises(ShardError, match=f"{victim.name} changed after `radacx shards` wrote it"):
        embed_all(cfg, progress=False)
    from radacx_cache._io import file_sha256
    from radacx_cache.formats.records import seal
    manifest_path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = {"bytes": victim.stat().st_size, "sha256": file_sha256(victim)}
    manifest["files"][victim.name] = entry  # a hand-edited manifest that hides the change ...
    for shard in manifest["shards"]:
        if shard["name"] == victim.name:
            shard.update(entry)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="was edited after it was written"):  # ... its fingerprint sees it
        embed_all(cfg, progress=False)
    manifest.pop("fingerprint")
    manifest_path.write_text(json.dumps(seal(manifest)))  # a fully forged, re-sealed record ...
    with pytest.raises(ShardError, match="render config 0123456789abcdef"):  # ... the render config still does
        embed_all(cfg, progress=False)


def test_masked_images_are_the_overlay_of_the_originals_with_the_configured_colours(pipeline):
    """Every masked image equals overlay(original, masks) with the run's colours; the patient's right
    lung (its colour) lies on the image's left, the left lung on the image's right."""
    from radacx_cache.render import overlay
    cfg = pipeline["cfg"]
    shards = open_shards(Path(cfg.workdir) / "shards")
    colors = cfg.render.colors
    right_x, left_x = [], []
    for i in range(0, len(shards), max(1, len(shards) // 25)):
        item = shards[i]
        want = overlay(item["original"], item["masks"].astype(bool), cfg.render.overlay, colors=colors,
                       line_width=cfg.render.line_width, alpha=cfg.render.fill_alpha)
        np.testing.assert_array_equal(item["masked"], want, err_msg=item["dicom_id"])
        for organ, xs in (("right_lung", right_x), ("left_lung", left_x)):
            painted = np.all(item["masked"] == colors[organ], axis=2)
            assert painted.sum() > 50, (item["dicom_id"], organ)
            xs.append(np.nonzero(painted)[1].mean())
        differ = np.any(item["masked"] != item["original"][..., None], axis=2).mean()
        assert 0.01 < differ < 0.25  # the overlay changes a plausible share of the pixels
    assert all(r < 112 < l for r, l in zip(right_x, left_x))


def test_an_unknown_split_name_is_an_error_not_an_empty_set(pipeline):
    from radacx_cache import open_shards as lazily_imported
    shards = lazily_imported(Path(pipeline["cfg"].workdir) / "shards")
    assert len(shards.split("val")) > 0
    for wrong in ("validation", "validate", "Test"):
        with pytest.raises(ValueError, match="expected one of train, val, test"):
            shards.split(wrong)


def test_radacx_help_imports_no_heavy_library():
    """``radacx --help`` answers at once: the stages (torch, open_clip, h5py) load only when they run."""
    import subprocess
    import sys
    code = ("import sys; from radacx_cache.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'open_clip', 'h5py', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("stage, needs", [("embed", "shards"), ("report", "shards"), ("shards", "cohort")])
def test_a_stage_run_too_early_says_what_to_run_loads_no_torch_and_creates_nothing(tmp_path, stage, needs):
    """In an empty workdir a stage answers with one line naming the stage to run first, before torch is
    imported and before its lock file or any folder exists."""
    import subprocess
    import sys
    work = tmp_path / "empty"
    code = ("import sys; from radacx_cache.cli import main\n"
            f"rc = main([{stage!r}, '--set', 'workdir={work}'])\n"
            "print(rc, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "2 False"
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and f"run `radacx {needs}`" in errors[0]
    assert not work.exists()
