from pathlib import Path

import numpy as np
import pytest
import torch

from radacx_cache import open_shards
from radacx_cache.config import load_config
from radacx_cache.stages.finetune import TrainingError, train_variant


def cfg_for(pipeline, tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for part in ("cohort", "shards"):
        (tmp_path / part).symlink_to(Path(pipeline["cfg"].workdir) / part)
    return load_config(None, [f"workdir={tmp_path}", "seed=7", "finetune.batch_size=16",
                              "finetune.block_rows=32", "finetune.shuffle_buffer=64",
                              "finetune.lr_encoder=0.002", "finetune.lr_head=0.002",
                              "finetune.warmup_steps=5", *extra])


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_interrupted_and_resumed_run_ends_with_the_same_weights(pipeline, tmp_path):
    extra = ("finetune.epochs=2", "finetune.checkpoint_every=0", "finetune.patience=5")
    a = cfg_for(pipeline, tmp_path / "a", *extra)
    b = cfg_for(pipeline, tmp_path / "b", *extra)
    full = train_variant(a, "masked", progress=False)
    steps_per_epoch = full["steps"] // 2
    cut = steps_per_epoch + 3  # inside the second epoch, mid-stream
    assert train_variant(b, "masked", progress=False, stop_after_steps=cut) == {"interrupted_at_step": cut}
    resumed = train_variant(b, "masked", progress=False, resume=True)
    assert resumed["steps"] == full["steps"]
    wa, wb = weights(Path(a.workdir) / "finetune/masked/last.pt"), weights(Path(b.workdir) / "finetune/masked/last.pt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    assert resumed["test_original"] == pytest.approx(full["test_original"])
    for variant in ("original", "masked"):
        assert (Path(b.workdir) / "predictions" / "V4" / f"{variant}.csv").exists()
    stamp = (Path(a.workdir) / "finetune/masked/last.pt").stat().st_mtime_ns
    assert train_variant(a, "masked", progress=False)["steps"] == full["steps"]  # finished: a no-op
    assert (Path(a.workdir) / "finetune/masked/last.pt").stat().st_mtime_ns == stamp


def test_resume_with_another_config_is_refused(pipeline, tmp_path):
    cfg = cfg_for(pipeline, tmp_path, "finetune.epochs=1")
    train_variant(cfg, "original", progress=False, stop_after_steps=2)
    other = load_config(None, [f"workdir={tmp_path}", "seed=7", "finetune.batch_size=16",
                               "finetune.lr_head=0.5"])
    with pytest.raises(TrainingError, match="another configuration"):
        train_variant(other, "original", progress=False, resume=True)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(pipeline, tmp_path, monkeypatch):
    from radacx_cache.stages import finetune
    cfg = cfg_for(pipeline, tmp_path, "finetune.epochs=1", "finetune.checkpoint_every=2")
    real = finetune.soft_ce
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(finetune, "soft_ce", poisoned)
    with pytest.raises(TrainingError, match="loss is nan"):
        train_variant(cfg, "original", progress=False)
    ckpt = torch.load(tmp_path / "finetune/original/last.pt", map_location="cpu", weights_only=True)
    assert ckpt["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_tiny_model_learns_the_phantom_task(pipeline, tmp_path):
    cfg = cfg_for(pipeline, tmp_path, "finetune.epochs=20", "finetune.patience=20",
                  "finetune.checkpoint_every=0")
    result = train_variant(cfg, "original", progress=False)
    from radacx_cache.metrics import first_positive, reference_correctness
    shards = open_shards(Path(pipeline["cfg"].workdir) / "shards")
    train_p, val_p = shards.split("train").positives(), shards.split("val").positives()
    majority = float(reference_correctness(train_p, val_p, "argmax")["majority"][0].mean())
    best_constant = float(np.bincount(first_positive(val_p)).max() / len(val_p))  # even knowing val
    assert result["best_val_accuracy"] > max(majority, best_constant) + 0.05, (result, majority, best_constant)


def test_test_predictions_come_from_the_best_checkpoint(pipeline, tmp_path):
    """V3/V4 predictions equal a prediction made with best.pt (not with the last weights)."""
    import pandas as pd

    from radacx_cache.models import load_model
    from radacx_cache.stages.finetune import Classifier, evaluate
    cfg = cfg_for(pipeline, tmp_path, "finetune.epochs=3", "finetune.patience=5", "finetune.checkpoint_every=0",
                  "finetune.lr_encoder=0.05", "finetune.lr_head=0.05")  # large steps: epochs differ
    summary = train_variant(cfg, "original", progress=False)
    best = torch.load(tmp_path / "finetune/original/best.pt", map_location="cpu", weights_only=True)
    last = torch.load(tmp_path / "finetune/original/last.pt", map_location="cpu", weights_only=True)
    lm = load_model("tiny", seed=7)
    shards = open_shards(Path(pipeline["cfg"].workdir) / "shards")
    test = shards.split("test")
    model = Classifier(lm.model.visual, 64, len(shards.target_names))
    preds = pd.read_csv(tmp_path / "predictions/V3/masked.csv", dtype={"dicom_id": str})
    got = preds[[c for c in preds.columns if c.startswith("prob_")]].to_numpy()
    model.load_state_dict(best["model"])
    want = evaluate(model, test, "masked", lm, torch.device("cpu"), None)
    np.testing.assert_allclose(got, want, atol=1e-5)
    model.load_state_dict(last["model"])
    if best["state"]["epoch"] != last["state"]["epoch"]:  # the last epoch was not the best
        assert np.abs(got - evaluate(model, test, "masked", lm, torch.device("cpu"), None)).max() > 1e-4
    assert summary["best_val_accuracy"] == max(h["val_accuracy"] for h in last["state"]["history"])


def test_a_kill_during_the_checkpoint_write_keeps_log_and_checkpoint_together(pipeline, tmp_path, monkeypatch):
    """Killed while ``last.pt`` was being written, then ``--resume``: the log has its header and
    exactly the rows of an uninterrupted run (was: header and 3 rows lost), no temporary file stays."""
    import pandas as pd
    extra = ("finetune.epochs=2", "finetune.checkpoint_every=3", "finetune.patience=5")
    a, b = cfg_for(pipeline, tmp_path / "a", *extra), cfg_for(pipeline, tmp_path / "b", *extra)
    train_variant(a, "original", progress=False)
    real_save, calls = torch.save, {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            Path(f).write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt("killed while writing the checkpoint")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_variant(b, "original", progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    out = Path(b.workdir) / "finetune" / "original"
    (out / ".last.pt.k1ll3d.tmp").write_bytes(b"what a SIGKILL leaves behind")
    assert list(pd.read_csv(out / "train_log.csv").columns)[:2] == ["epoch", "step"]
    train_variant(b, "original", progress=False, resume=True)
    cols = ["epoch", "step", "loss", "lr_head", "val_accuracy"]
    logs = [pd.read_csv(Path(c.workdir) / "finetune" / "original" / "train_log.csv")[cols] for c in (a, b)]
    pd.testing.assert_frame_equal(logs[0], logs[1])
    assert not list(out.glob(".*.tmp"))
