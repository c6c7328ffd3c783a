"""Integrity and security under faults and hostile input (issue 11): each test reproduces one
attack or fault and asserts what must happen instead."""
import errno
import io
import os
import shutil
import stat
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from radacx_cache._io import StageBusy, stage_lock
from radacx_cache.cli import main
from radacx_cache.config import ConfigError, load_config
from radacx_cache.formats.features import FeatureCache, FeatureCacheError
from radacx_cache.render import RenderError, decode_grey
from radacx_cache.formats.shardset import ShardError, open_shards
from radacx_cache.sources.mimic import archive_path, id_problem


def copy_work(pipeline, tmp_path, *parts, extra=()):
    cfg = pipeline["cfg"]
    for part in parts:
        shutil.copytree(cfg.work / part, tmp_path / part)
    return load_config(None, [f"workdir={tmp_path}", f"archive.root={cfg.archive.root}",
                              f"archive.chexmask_csv={cfg.archive.chexmask_csv}", "seed=7",
                              "shards.rows_per_shard=64", "shards.n_jobs=2", "embed.batch_size=32",
                              "embed.block_rows=96", *extra])


# ---------------------------------------------------------------- security
class Payload:
    """Unpickling this runs code (it creates a file): a planted checkpoint's attack."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_checkpoint_runs_no_code(pipeline, tmp_path):
    from radacx_cache.stages.finetune import TrainingError, train_variant
    marker = tmp_path / "pwned"
    cfg = copy_work(pipeline, tmp_path, "cohort", "shards", extra=("finetune.epochs=1",))
    out = tmp_path / "finetune" / "original"
    out.mkdir(parents=True)
    torch.save({"config_fingerprint": "x", "model": Payload(str(marker))}, out / "last.pt")
    with pytest.raises(TrainingError, match="not a checkpoint this tool wrote"):
        train_variant(cfg, "original", progress=False, resume=True)
    assert not marker.exists()


def test_model_configs_never_go_to_a_predictable_temp_path(tmp_path, monkeypatch):
    from radacx_cache import models
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    trap = tmp_path / f"radacx-open_clip-configs-{os.getuid()}"  # what another user could pre-create
    trap.mkdir()
    (trap / "radacx-tiny.json").symlink_to(victim)
    monkeypatch.setattr(models, "_PRIVATE", None)
    models.load_model("tiny")
    assert victim.read_text() == "precious"
    private = models._private_dir()
    assert private.parent == tmp_path and private != trap
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


@pytest.mark.parametrize("dicom_id,subject,study,fragment", [
    ("../../../../outside/o", 10000032, 50414267, "dicom_id"),
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014/../../x", 10000032, 50414267, "dicom_id"),
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "abc", 50414267, "subject_id 'abc'"),
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", 10000032, "5041426/..", "study_id"),
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014-long-tail-beyond-44-characters", 10000032, 50414267, "dicom_id"),
    ("0ééé804e-bde0afdd-112c0b34-7bc16630-4e384014", 10000032, 50414267, "dicom_id"),
])
def test_identifiers_are_validated_before_any_path_is_built(dicom_id, subject, study, fragment):
    assert fragment in id_problem(dicom_id, subject, study)
    assert id_problem("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", 10000032, 50414267) is None


def test_a_path_leaving_the_archive_is_never_read(tmp_path):
    (tmp_path / "archive").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "o.jpg").write_bytes(b"not yours")
    with pytest.raises(ValueError, match="leaves the archive"):
        archive_path(tmp_path / "archive", "files/../../outside/o.jpg")
    (tmp_path / "archive" / "link.jpg").symlink_to(tmp_path / "outside" / "o.jpg")
    with pytest.raises(ValueError, match="leaves the archive"):
        archive_path(tmp_path / "archive", "link.jpg")


def test_hostile_metadata_rows_become_rejects_not_tracebacks(pipeline, tmp_path):
    """Traversal, text and non-ASCII ids, and a blank Rows cell, in a copy of the phantom's tables."""
    from radacx_cache.stages.cohort import build_cohort
    src = Path(pipeline["cfg"].archive.root)
    root = tmp_path / "mimic"
    root.mkdir()
    for p in src.glob("mimic-cxr-2.0.0-*.csv.gz"):
        shutil.copy(p, root / p.name)
    (root / "files").symlink_to(src / "files")
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    frontal = meta.index[meta["ViewPosition"].isin(["PA", "AP"])]
    meta.loc[frontal[0], "dicom_id"] = "../../../../outside/o"
    meta.loc[frontal[1], "subject_id"] = "patient-one"
    meta.loc[frontal[2], "dicom_id"] = "0ééé804e-bde0afdd-112c0b34-7bc16630-4e384014"
    lateral = meta.index[meta["ViewPosition"] == "LATERAL"][0]
    meta.loc[lateral, "Rows"] = ""  # a blank cell made the whole column float and broke a message
    meta.loc[frontal[3], "Rows"] = ""
    meta.to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    cfg = copy_work(pipeline, tmp_path, extra=(f"archive.root={root}",))
    manifest = build_cohort(cfg, progress=False)
    rejects = pd.read_csv(tmp_path / "cohort" / "rejects.csv")
    reasons = " | ".join(rejects["reason"])
    assert "dicom_id '../../../../outside/o' is not a MIMIC-CXR-JPG dicom_id" in reasons
    assert "subject_id 'patient-one'" in reasons and "Rows x Columns is blank" in reasons
    assert manifest["rows"] > 300
    cohort = pd.read_csv(tmp_path / "cohort" / "cohort.csv")
    assert not cohort["path"].str.contains(r"\.\.").any()


def test_workdir_permissions_setting_is_honoured(pipeline, tmp_path):
    from radacx_cache.stages.cohort import build_cohort
    old = os.umask(0o022)
    try:
        cfg = copy_work(pipeline, tmp_path, extra=("permissions=private",))
        build_cohort(cfg, progress=False)
        for p in (tmp_path / "cohort").iterdir():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p
        cfg = copy_work(pipeline, tmp_path / "g", extra=("permissions=group",))
        build_cohort(cfg, progress=False)
        for p in (tmp_path / "g" / "cohort").iterdir():
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode & 0o007 == 0 and mode & 0o040, p
    finally:
        os.umask(old)


# ---------------------------------------------------------------- nothing lost
def test_disk_full_while_embedding_commits_nothing_and_a_rerun_repairs(pipeline, features, tmp_path, monkeypatch):
    from radacx_cache.stages import embed
    from radacx_cache.models import load_model
    cfg = copy_work(pipeline, tmp_path, "cohort", "shards")
    shards = open_shards(cfg.work / "shards")
    model = load_model("tiny", seed=7)
    real, calls = embed.write_rows, {"n": 0}

    def full_disk(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(embed, "write_rows", full_disk)
    with pytest.raises(FeatureCacheError, match="disk full"):
        embed.embed_variant(cfg, model, shards, "original", progress=False)
    final = tmp_path / "features" / "tiny" / "original.h5"
    assert not final.exists()
    partial = tmp_path / "features" / "tiny" / ".original.h5.partial"
    with h5py.File(partial, "r+") as f:  # rows marked done that never got their features
        f["row_done"][:] = True
    monkeypatch.setattr(embed, "write_rows", real)
    embed.embed_variant(cfg, model, shards, "original", progress=False)
    np.testing.assert_allclose(FeatureCache(final).features, FeatureCache(features["features"]["original"]).features,
                               rtol=1e-5, atol=1e-6)


def test_a_committed_cache_damaged_later_is_refused_and_rebuilt(pipeline, features, tmp_path):
    from radacx_cache.stages.embed import embed_variant
    from radacx_cache.models import load_model
    cfg = copy_work(pipeline, tmp_path, "cohort", "shards", "features")
    path = tmp_path / "features" / "tiny" / "masked.h5"
    with h5py.File(path, "r+") as f:
        f["features"][10:20] = 0  # the disk-full symptom: rows of zeros in a committed file
    with pytest.raises(FeatureCacheError, match="no embedding"):
        FeatureCache(path)
    embed_variant(cfg, load_model("tiny", seed=7), open_shards(tmp_path / "shards"), "masked", progress=False)
    assert (tmp_path / "features" / "tiny" / ".masked.h5.damaged").exists()
    FeatureCache(path)  # rebuilt and verified
    with h5py.File(path, "r+") as f:  # permuted rows with their ids: the checksum no longer fits
        order = np.random.default_rng(0).permutation(f["features"].shape[0])
        f["features"][:] = f["features"][:][order]
        f["dicom_id"][:] = f["dicom_id"][:][order]
    with pytest.raises(FeatureCacheError, match="checksum"):
        FeatureCache(path)


def test_a_shard_overwritten_in_place_is_refused(pipeline, tmp_path):
    from radacx_cache.stages.embed import embed_all
    cfg = copy_work(pipeline, tmp_path, "cohort", "shards")
    open_shards(tmp_path / "shards").validate()  # verified once, remembered by size + mtime
    victim = sorted((tmp_path / "shards").glob("train-*.h5"))[0]
    size = victim.stat().st_size
    with open(victim, "r+b") as f:  # half of `original` rewritten, same size
        f.seek(size // 3)
        f.write(os.urandom(size // 4))
    assert victim.stat().st_size == size
    with pytest.raises(ShardError, match="sha256"):
        embed_all(cfg, progress=False)


def test_a_config_value_never_deletes_finished_shards(pipeline, tmp_path):
    from radacx_cache.stages.shards import build_shards
    cfg = copy_work(pipeline, tmp_path, "cohort", "shards", extra=("shards.rows_per_shard=48",))
    before = sorted(p.name for p in (tmp_path / "shards").glob("*.h5"))
    with pytest.raises(ShardError, match="Refusing to replace them"):
        build_shards(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.h5")) == before
    with pytest.raises(ConfigError, match="rows_per_shard"):
        load_config(None, ["shards.rows_per_shard=-1"])
    with pytest.raises(ConfigError, match="line_width"):
        load_config(None, ["render.line_width=0"])
    manifest = build_shards(cfg, progress=False, rebuild=True)  # explicit: replaced
    assert manifest["rows"] == pipeline["shards"]["rows"]


def test_a_missing_archive_is_an_error_and_missing_images_are_retried(pipeline, tmp_path):
    from radacx_cache.stages.shards import build_shards
    cfg = copy_work(pipeline, tmp_path, "cohort", extra=(f"archive.root={tmp_path / 'unmounted'}",))
    with pytest.raises(ShardError, match="not a folder"):
        build_shards(cfg, progress=False)
    assert not (tmp_path / "shards" / "manifest.json").exists()
    # one JPEG moved away, then back: a reject the first time, in the shards after the rerun
    src = Path(pipeline["cfg"].archive.root)
    root = tmp_path / "mimic"
    shutil.copytree(src, root)
    cohort = pd.read_csv(tmp_path / "cohort" / "cohort.csv", dtype={"dicom_id": str})
    moved = root / cohort["path"].iloc[5]
    shutil.move(moved, tmp_path / "aside.jpg")
    cfg = copy_work(pipeline, tmp_path / "w", "cohort", extra=(f"archive.root={root}",))
    build_shards(cfg, progress=False)
    assert cohort["dicom_id"].iloc[5] not in set(open_shards(tmp_path / "w" / "shards").index["dicom_id"])
    shutil.move(tmp_path / "aside.jpg", moved)
    build_shards(cfg, progress=False)
    assert cohort["dicom_id"].iloc[5] in set(open_shards(tmp_path / "w" / "shards").index["dicom_id"])
    # most images unreadable (a wrong root with the same layout): the stage stops, nothing committed
    shutil.rmtree(root / "files" / sorted(os.listdir(root / "files"))[0])
    for d in sorted(os.listdir(root / "files"))[:6]:
        shutil.rmtree(root / "files" / d, ignore_errors=True)
    cfg = copy_work(pipeline, tmp_path / "x", "cohort", extra=(f"archive.root={root}",))
    with pytest.raises(ShardError, match="max_reject_share"):
        build_shards(cfg, progress=False)
    assert not (tmp_path / "x" / "shards" / "manifest.json").exists()


def test_conflicting_duplicates_are_rejected_and_no_image_is_written_twice():
    from test_cohort import small_tables
    from radacx_cache.stages.cohort import select_cohort
    from radacx_cache.config import CohortConfig
    tables = small_tables()
    img = tables.metadata["dicom_id"].tolist()
    dup_mask = tables.chexmask.iloc[[0]].assign(quality_mean=0.75)  # a second, different row for image 0
    same_split = tables.split.iloc[[2]]  # an identical duplicate split row for image 2
    tables.chexmask = pd.concat([tables.chexmask, dup_mask], ignore_index=True)
    tables.split = pd.concat([tables.split, same_split], ignore_index=True)
    cohort, rejects = select_cohort(tables, CohortConfig(), seed=0)
    assert {"id": img[0], "stage": "cohort", "reason": "conflicting duplicate rows in the CheXmask table"} in rejects
    assert cohort["dicom_id"].tolist().count(img[2]) == 1 and img[0] not in set(cohort["dicom_id"])


def test_a_second_run_of_a_stage_on_the_same_workdir_is_refused(pipeline, tmp_path):
    from radacx_cache.stages.shards import build_shards
    cfg = copy_work(pipeline, tmp_path, "cohort", "shards")
    with stage_lock(tmp_path, "shards"):
        with pytest.raises(StageBusy, match=f"pid {os.getpid()}"):
            build_shards(cfg, progress=False)
    build_shards(cfg, progress=False)  # free again


def test_memory_bombs_are_refused_before_decoding_and_16_bit_images_windowed():
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG")  # ~35 KB on disk, 36 Mpx declared
    data = buf.getvalue()
    assert len(data) < 100_000
    with pytest.raises(RenderError, match="CheXmask say 3000x2500; not decoded"):
        decode_grey(data, 224, expected=(3000, 2500))
    with pytest.raises(RenderError, match="more than the 1000000 allowed"):
        decode_grey(data, 224, max_pixels=1_000_000)
    arr = np.random.default_rng(0).integers(1000, 3000, (300, 300)).astype(np.uint16)
    arr[0, 0] = 65535  # one hot pixel
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    pixels, _, _ = decode_grey(buf.getvalue())
    assert pixels.mean() > 60 and pixels.std() > 30  # not crushed to black by the hot pixel


def test_probe_refuses_features_of_another_seed(pipeline, features, tmp_path):
    from radacx_cache.stages.probe import run_probes
    cfg = copy_work(pipeline, tmp_path, "cohort", "shards", "features", extra=("seed=1",))
    with pytest.raises(FeatureCacheError, match="weights_seed: cache has 7, asked for 1"):
        run_probes(cfg)


def test_cli_prints_one_clear_line_and_exits_non_zero(pipeline, tmp_path, caplog):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: !!python/object/apply:os.system ['touch pwned']\n")
    assert main(["cohort", "--config", str(bad)]) == 2 and "not plain YAML data" in caplog.text
    assert not Path("pwned").exists()
    not_h5 = tmp_path / "x.h5"
    not_h5.write_text("hello")
    assert main(["inspect", str(not_h5)]) == 2 and "not an HDF5 file" in caplog.text
    for key in ("render.size=0", "shards.rows_per_shard=0"):
        assert main(["cohort", "--set", key]) == 2 and key.split("=")[0] in caplog.text
    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = pipeline["cfg"]
    (ro / "cohort").mkdir()
    os.chmod(ro / "cohort", 0o500)
    try:
        code = main(["cohort", "--set", f"workdir={ro}", "--set", f"archive.root={cfg.archive.root}",
                     "--set", f"archive.chexmask_csv={cfg.archive.chexmask_csv}"])
    finally:
        os.chmod(ro / "cohort", 0o700)
    if os.geteuid() != 0:  # root writes anywhere: the read-only case cannot happen as root
        assert code == 2 and "Permission denied" in caplog.text
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a workdir that cannot be created, even by root
    code = main(["cohort", "--set", f"workdir={blocker / 'run'}", "--set", f"archive.root={cfg.archive.root}",
                 "--set", f"archive.chexmask_csv={cfg.archive.chexmask_csv}"])
    assert code == 2 and "Not a directory" in caplog.text and str(blocker) in caplog.text
