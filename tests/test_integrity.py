"""Integrity and security under faults and hostile input (issue 11): each test reproduces one
attack or fault and asserts what must happen instead."""
import errno
import io
import json
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
from radacx_cache.formats.shard import ShardError, open_shards
from radacx_cache.render import RenderError, decode_grey
from radacx_cache.sources.mimic import archive_path, id_problem


def copy_work(pipeline, tmp_path, *parts, extra=()):
    cfg = pipeline["cfg"]
    for part in parts:
        shutil.copytree(Path(cfg.workdir) / part, tmp_path / part)
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
    for bad in ("files/../../outside/o.jpg", "/etc/passwd", "", "files//../x.jpg"):
        with pytest.raises(ValueError, match="leaves the archive"):
            archive_path(tmp_path / "archive", bad)
    # a link the archive's owner made (a tree of links into a read-only store) is followed ...
    (tmp_path / "archive" / "link.jpg").symlink_to(tmp_path / "outside" / "o.jpg")
    assert archive_path(tmp_path / "archive", "link.jpg").read_bytes() == b"not yours"
    # ... unless the strict mode is asked for
    with pytest.raises(ValueError, match="a link that leaves the archive root"):
        archive_path(tmp_path / "archive", "link.jpg", strict_links=True)


def test_an_archive_of_links_into_another_store_renders(pipeline, tmp_path):
    """A common cluster layout: the archive tree holds links into a read-only mount. Every image
    renders as from the original tree (was: every image rejected as leaving the root)."""
    from radacx_cache.stages.shards import build_shards
    cfg = pipeline["cfg"]
    store, links = Path(cfg.archive.root), tmp_path / "links"
    for src in store.rglob("*"):
        dst = links / src.relative_to(store)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    run = copy_work(pipeline, tmp_path / "w", "cohort", extra=(f"archive.root={links}",))
    manifest = build_shards(run, progress=False)
    assert manifest["rows"] == pipeline["shards"]["rows"] and manifest["rejects"] == pipeline["shards"]["rejects"]
    strict = load_config(None, [f"workdir={tmp_path / 'w2'}", f"archive.root={links}", "archive.strict_links=true",
                                "shards.max_reject_share=1", "shards.rows_per_shard=64"])
    shutil.copytree(tmp_path / "w" / "cohort", tmp_path / "w2" / "cohort")
    assert build_shards(strict, progress=False)["rows"] == 0  # every image a reject row, with the reason
    reasons = pd.read_csv(tmp_path / "w2" / "shards" / "rejects.csv")["reason"]
    assert reasons.str.contains("a link that leaves the archive root").mean() > 0.9


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
    from radacx_cache.models import load_model
    from radacx_cache.stages import embed
    cfg = copy_work(pipeline, tmp_path, "cohort", "shards")
    shards = open_shards(Path(cfg.workdir) / "shards")
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
    from radacx_cache.models import load_model
    from radacx_cache.stages.embed import embed_variant
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

    from radacx_cache.config import CohortConfig
    from radacx_cache.stages.cohort import select_cohort
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


# ---------------------------------------------------------------- issue 19: hostile files and values
def test_writes_never_follow_a_planted_link(pipeline, tmp_path):
    """A link at the lock's name, at a temporary name, or in place of an output folder: nothing is
    written outside the workdir."""
    from radacx_cache._io import UnsafePath, atomic_path, stage_run, write_json
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    work = tmp_path / "work"
    work.mkdir()
    (work / ".radacx-report.lock").symlink_to(victim)
    with pytest.raises(UnsafePath, match="is a link; refusing to open the stage lock"):
        with stage_run(work, "report"):
            pass
    assert victim.read_text() == "precious"
    (work / ".radacx-report.lock").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (work / "predictions").symlink_to(elsewhere)
    with stage_run(work, "report"):
        # the old predictable temporary names, planted for every pid nearby: never used
        for pid in range(os.getpid() - 2, os.getpid() + 3):
            (work / f".table1.md.{pid}.tmp").symlink_to(victim)
        with atomic_path(work / "table1.md") as tmp:
            tmp.write_text("table")
        with pytest.raises(UnsafePath, match="predictions is a link; refusing to write through it"):
            write_json(work / "predictions" / "V1" / "original.json", {"x": 1})
    assert victim.read_text() == "precious" and (work / "table1.md").read_text() == "table"
    assert not (work / "table1.md").is_symlink() and not list(elsewhere.rglob("*.json"))


def _plant_external(path: Path, dataset: str, outside: Path, shape, dtype=np.uint8):
    """Replace ``dataset`` of an HDF5 file with one whose bytes live in ``outside``."""
    outside.write_bytes(np.zeros(int(np.prod(shape)), dtype).tobytes())
    with h5py.File(path, "r+") as f:
        del f[dataset]
        f.create_dataset(dataset, shape, dtype, external=[(str(outside), 0, h5py.h5f.UNLIMITED)])


def test_hdf5_external_storage_and_links_are_refused(pipeline, features, tmp_path):
    from radacx_cache.formats.hdf5 import UnsafeHDF5, open_checked
    from radacx_cache.formats.shard import ShardSet
    cfg = copy_work(pipeline, tmp_path, "cohort", "shards")
    shard = sorted((tmp_path / "shards").glob("test-*.h5"))[0]
    with h5py.File(shard, "r") as f:
        shape = f["original"].shape
    _plant_external(shard, "original", tmp_path / "outside.raw", shape)
    with pytest.raises(ShardError, match="stored in an outside file"):
        ShardSet(tmp_path / "shards").file(shard.name)
    passwd = tmp_path / "inspect.h5"
    with h5py.File(passwd, "w") as f:
        f.create_dataset("original", (1, 4, 4), np.uint8, external=[("/etc/passwd", 0, 16)])
        f["link"] = h5py.ExternalLink("/etc/passwd.h5", "/x")
    with pytest.raises(UnsafeHDF5, match="external link|outside file"):
        open_checked(passwd)
    assert main(["inspect", str(passwd), "--png", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
    # a planted partial cache whose features live in an outside file: never written into
    from radacx_cache.models import load_model
    from radacx_cache.stages.embed import embed_variant
    model = load_model("tiny", seed=7)
    partial = tmp_path / "features" / model.tag / ".masked.h5.partial"
    partial.parent.mkdir(parents=True)
    outside = tmp_path / "outside-features.raw"
    with h5py.File(partial, "w") as f:
        f.attrs["fingerprints"] = "{}"
        f.create_dataset("features", (10, 4), np.float32, external=[(str(outside), 0, h5py.h5f.UNLIMITED)])
    outside.write_bytes(b"\0" * 160)
    shards = open_shards(tmp_path / "shards")
    shutil.copy(Path(pipeline["cfg"].workdir) / "shards" / shard.name, shard)  # the real shard back
    embed_variant(cfg, model, shards, "masked", progress=False)
    assert outside.read_bytes() == b"\0" * 160


def test_memory_bomb_caches_are_refused_and_set_aside(pipeline, features, tmp_path):
    """A 6 KB cache declaring 2^40 rows: refused before any read, moved aside, rebuilt."""
    from radacx_cache.models import load_model
    from radacx_cache.stages.embed import embed_variant
    cfg = copy_work(pipeline, tmp_path, "cohort", "shards", "features")
    cache = tmp_path / "features" / "tiny" / "masked.h5"
    with h5py.File(cache, "r+") as f:
        del f["features"]
        f.create_dataset("features", (2 ** 40, 64), np.float32, chunks=(1024, 64))
    assert cache.stat().st_size < 10 ** 6
    with pytest.raises(FeatureCacheError, match="declares"):
        FeatureCache(cache)
    embed_variant(cfg, load_model("tiny", seed=7), open_shards(tmp_path / "shards"), "masked", progress=False)
    assert (cache.parent / ".masked.h5.damaged").exists()
    session = FeatureCache(Path(pipeline["cfg"].workdir) / "features" / "tiny" / "masked.h5").features
    np.testing.assert_allclose(FeatureCache(cache).features, session, atol=1e-5)  # rebuilt


@pytest.mark.parametrize("kind", ["fifo", "sparse", "postscript"])
def test_hostile_image_files_become_reject_rows(pipeline, tmp_path, kind):
    """A FIFO at an image path (hung forever), a 1 TiB sparse file (MemoryError), PostScript named
    .jpg (Ghostscript ran): each is one reject row with its reason, and nothing else happens."""
    from radacx_cache.stages.shards import build_shards
    cfg = pipeline["cfg"]
    archive = tmp_path / "archive"
    shutil.copytree(cfg.archive.root, archive, symlinks=True)
    cohort = pd.read_csv(Path(cfg.workdir) / "cohort" / "cohort.csv", dtype={"dicom_id": str})
    victim = archive / cohort["path"].iloc[3]
    victim.unlink()
    if kind == "fifo":
        os.mkfifo(victim)
    elif kind == "sparse":
        with open(victim, "wb") as f:
            f.truncate(1 << 40)
    else:
        victim.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    run = copy_work(pipeline, tmp_path / "w", "cohort", extra=(f"archive.root={archive}",))
    build_shards(run, progress=False)
    rejects = pd.read_csv(tmp_path / "w" / "shards" / "rejects.csv", dtype={"id": str})
    reason = rejects.loc[rejects["id"] == cohort["dicom_id"].iloc[3], "reason"].iloc[0]
    expected = {"fifo": "not a regular file", "sparse": "more than the", "postscript": "not a JPEG file"}[kind]
    assert expected in reason


def test_a_shard_sidecar_holding_garbage_is_rebuilt_not_a_traceback(pipeline, tmp_path):
    from radacx_cache.stages.shards import build_shards
    cfg = copy_work(pipeline, tmp_path, "cohort", "shards")
    sidecars = sorted((tmp_path / "shards").glob("train-*.json"))
    sidecars[0].write_text("[]")
    sidecars[1].write_text("{not json")
    (tmp_path / "shards" / ".verified.json").write_text("[]")
    manifest = build_shards(cfg, progress=False)
    assert manifest["rows"] == pipeline["shards"]["rows"]
    assert json.loads(sidecars[0].read_text())["name"] == sidecars[0].with_suffix(".h5").name


def test_shards_smaller_than_the_model_input_are_refused_before_embedding(pipeline, tmp_path, caplog):
    from radacx_cache.formats.records import seal
    copy_work(pipeline, tmp_path, "cohort", "shards")
    path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("fingerprint")
    manifest["render_config"]["size"] = 64  # as if rendered with render.size=64
    path.write_text(json.dumps(seal(manifest)))
    assert main(["embed", "--set", f"workdir={tmp_path}", "--set", "seed=7"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "shards are 64 px, model tiny takes 224 px" in errors[0]


def test_inspect_lists_groups_and_refuses_dangling_links(tmp_path, capsys):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f.create_group("extra")
        f["original"] = np.zeros((1, 4, 4), np.uint8)
    assert main(["inspect", str(path)]) == 0
    assert "extra: (group)" in capsys.readouterr().out
    with h5py.File(path, "r+") as f:
        f["dangling"] = h5py.SoftLink("/nowhere")
    assert main(["inspect", str(path)]) == 2


def test_a_shard_declaring_enormous_images_is_refused_unread(pipeline, tmp_path):
    """8 images of 2^20 x 2^20 pixels declared in a small file: refused by shape, nothing read."""
    from radacx_cache.formats.shard import ShardSet
    copy_work(pipeline, tmp_path, "cohort", "shards")
    shard = sorted((tmp_path / "shards").glob("test-*.h5"))[0]
    with h5py.File(shard, "r+") as f:
        del f["original"]
        f.create_dataset("original", (f["dicom_id"].shape[0], 2 ** 20, 2 ** 20), np.uint8, chunks=(1, 256, 256))
    with pytest.raises(ShardError, match="original has shape"):
        ShardSet(tmp_path / "shards")[int(np.flatnonzero(ShardSet(tmp_path / "shards").index["shard"]
                                                          == shard.name)[0])]
    assert main(["inspect", str(shard), "--png", str(tmp_path / "m.png")]) == 2
