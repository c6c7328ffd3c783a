import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from radacx_cache import open_shards
from radacx_cache.config import load_config
from radacx_cache.formats.features import FeatureCache, FeatureCacheError, cache_fingerprints
from radacx_cache.models import load_model
from radacx_cache.stages.embed import embed_variant, merge_rank_partials
from radacx_cache.workdir import Workdir


def private_cfg(pipeline, tmp_path, *extra):
    cfg = pipeline["cfg"]
    for part in ("cohort", "shards"):
        (tmp_path / part).symlink_to(Path(cfg.workdir) / part)
    return load_config(None, [f"workdir={tmp_path}", "embed.batch_size=32", "embed.block_rows=96", *extra])


def test_cached_features_equal_open_clip_preprocess_and_encode_image(pipeline, features):
    import open_clip
    cfg = pipeline["cfg"]
    model = load_model("tiny", seed=cfg.seed)
    shards = open_shards(Path(cfg.workdir) / "shards")
    preprocess = open_clip.image_transform(224, is_train=False, mean=model.mean, std=model.std)
    for variant in ("original", "masked"):
        cache = FeatureCache(features["features"][variant], cache_fingerprints(model, shards, variant))
        assert list(cache.dicom_id) == list(shards.index["dicom_id"])
        rows = [0, 17, len(shards) - 1]
        images = []
        for i in rows:
            pixels = shards[i][variant]
            images.append(preprocess(Image.fromarray(pixels).convert("RGB")))
        with torch.no_grad():
            want = model.model.encode_image(torch.stack(images)).numpy()
        np.testing.assert_allclose(cache.features[rows], want, rtol=1e-4, atol=1e-4)


def test_rerun_is_a_no_op_and_another_model_is_refused(pipeline, features):
    cfg = pipeline["cfg"]
    shards = open_shards(Path(cfg.workdir) / "shards")
    path = features["features"]["original"]
    stamp = __import__("os").stat(path).st_mtime_ns
    model = load_model("tiny", seed=cfg.seed)
    assert str(embed_variant(cfg, model, shards, "original", progress=False)) == path
    assert __import__("os").stat(path).st_mtime_ns == stamp
    other = load_model("tiny", seed=cfg.seed + 1)
    other.tag = model.tag  # same folder, different weights: must not be reused silently
    with pytest.raises(FeatureCacheError, match="model"):
        embed_variant(cfg, other, shards, "original", progress=False)


def test_interrupted_run_resumes_to_the_same_cache(pipeline, features, tmp_path, monkeypatch):
    from radacx_cache.stages import embed
    cfg = private_cfg(pipeline, tmp_path)
    shards = open_shards(Path(cfg.workdir) / "shards")
    model = load_model("tiny", seed=pipeline["cfg"].seed)
    real = embed._encode
    calls = {"n": 0}

    def dying(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args)

    monkeypatch.setattr(embed, "_encode", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_variant(cfg, model, shards, "masked", progress=False)
    partial = tmp_path / "features" / model.tag / ".masked.h5.partial"
    with h5py.File(partial, "r") as f:
        done = f["row_done"][:]
    assert 0 < done.sum() < len(done)
    monkeypatch.setattr(embed, "_encode", real)
    final = embed_variant(cfg, model, shards, "masked", progress=False)
    assert not partial.exists()
    a = FeatureCache(final).features
    b = FeatureCache(features["features"]["masked"]).features
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_two_ranks_take_disjoint_blocks_and_merge(pipeline, features, tmp_path):
    cfg = private_cfg(pipeline, tmp_path)
    shards = open_shards(Path(cfg.workdir) / "shards")
    model = load_model("tiny", seed=pipeline["cfg"].seed)
    parts = [embed_variant(cfg, model, shards, "original", rank=r, world=2, progress=False) for r in (0, 1)]
    done = []
    for p in parts:
        with h5py.File(p, "r") as f:
            done.append(f["row_done"][:])
    assert not (done[0] & done[1]).any() and (done[0] | done[1]).all()
    final = merge_rank_partials(Workdir(tmp_path), model.tag, "original", 2)
    np.testing.assert_allclose(FeatureCache(final).features,
                               FeatureCache(features["features"]["original"]).features, rtol=1e-5, atol=1e-6)


def test_nan_features_are_refused(features, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(features["features"]["original"], bad)
    with h5py.File(bad, "r+") as f:
        f["features"][3, 0] = np.nan
    with pytest.raises(FeatureCacheError, match="NaN"):
        FeatureCache(bad)


@pytest.mark.slow
def test_torchrun_two_processes_build_the_same_cache(pipeline, features, tmp_path):
    import os
    import subprocess
    import sys
    cfg = pipeline["cfg"]
    for part in ("cohort", "shards"):
        (tmp_path / part).symlink_to(Path(cfg.workdir) / part)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", "--master_port=29517", "-m", "radacx_cache.cli", "embed",
           "--set", f"workdir={tmp_path}", "--set", "seed=7", "--set", "embed.block_rows=96",
           "--set", "embed.batch_size=32"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    for variant in ("original", "masked"):
        merged = FeatureCache(tmp_path / "features" / "tiny" / f"{variant}.h5")
        single = FeatureCache(features["features"][variant])
        np.testing.assert_allclose(merged.features, single.features, rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "features" / "tiny").glob(".*partial"))


def test_out_of_memory_batches_back_off_and_continue(pipeline, features, tmp_path, monkeypatch, caplog):
    from radacx_cache.stages import embed
    cfg = private_cfg(pipeline, tmp_path)
    shards = open_shards(Path(cfg.workdir) / "shards")
    model = load_model("tiny", seed=pipeline["cfg"].seed)
    real = embed._encode

    def small_device(encoder, x, dtype):
        if x.shape[0] > 8:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(encoder, x, dtype)

    monkeypatch.setattr(embed, "_encode", small_device)
    final = embed_variant(cfg, model, shards, "original", progress=False)
    assert "batch size lowered to 8" in caplog.text
    np.testing.assert_allclose(FeatureCache(final).features,
                               FeatureCache(features["features"]["original"]).features, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "zeroed-header"])
def test_a_full_disk_then_a_damaged_partial_recovers_on_rerun_with_identical_features(pipeline, features, tmp_path,
                                                                                     monkeypatch, damage):
    """The disk-full regression (issue 28): the write fails with ENOSPC (one line, nothing committed),
    h5py leaves the partial file damaged, and the rerun with space freed moves it aside
    (``.masked.h5.partial.damaged``) and rebuilds: the same features as a clean build."""
    import errno

    from radacx_cache.stages import embed
    cfg = private_cfg(pipeline, tmp_path)
    shards = open_shards(Path(cfg.workdir) / "shards")
    model = load_model("tiny", seed=pipeline["cfg"].seed)
    real, calls = embed.write_rows, {"n": 0}

    def disk_full(*args):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)
    monkeypatch.setattr(embed, "write_rows", disk_full)
    with pytest.raises(FeatureCacheError, match="disk full while writing"):
        embed_variant(cfg, model, shards, "masked", progress=False)
    monkeypatch.setattr(embed, "write_rows", real)
    partial = tmp_path / "features" / model.tag / ".masked.h5.partial"
    data = partial.read_bytes()
    partial.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\0" * 512 + data[512:])
    final = embed_variant(cfg, model, shards, "masked", progress=False)
    assert partial.with_name(partial.name + ".damaged").exists() and not partial.exists()
    np.testing.assert_allclose(FeatureCache(final).features, FeatureCache(features["features"]["masked"]).features,
                               rtol=1e-5, atol=1e-6)
