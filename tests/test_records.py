"""Every number traceable (issue 18): each stage reads the verified record of the stage before it.

Each case below once changed results silently (exit 0); each must now be refused with one line that
names both fingerprints or the changed file and the command that fixes it, or be made impossible.
"""
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from radacx_cache.cli import main
from radacx_cache.config import load_config
from radacx_cache.formats.records import RecordError, Verifier, read_record, record_fingerprint, seal
from radacx_cache.formats.shard import ShardError, ShardSet, open_verified
from radacx_cache.workdir import Workdir

RUN_PARTS = ("cohort", "shards", "features", "zeroshot", "probes", "predictions")


@pytest.fixture(scope="module")
def trained(pipeline, features):
    """The session pipeline with the zero-shot baseline and the probes (V1, V2) run."""
    from radacx_cache.stages.probe import run_probes
    from radacx_cache.stages.zeroshot import run_zeroshot
    run_zeroshot(pipeline["cfg"])
    run_probes(pipeline["cfg"])
    return pipeline["cfg"]


def copy_run(cfg, tmp_path, *extra, parts=RUN_PARTS):
    for part in parts:
        shutil.copytree(Path(cfg.workdir) / part, tmp_path / part)
    return load_config(None, [f"workdir={tmp_path}", f"archive.root={cfg.archive.root}",
                              f"archive.chexmask_csv={cfg.archive.chexmask_csv}", "seed=7",
                              "shards.rows_per_shard=64", "shards.n_jobs=2", "embed.batch_size=32",
                              "embed.block_rows=96", "report.bootstrap=50", *extra])


def cli(cfg, stage, *extra):
    return main([stage, "--set", f"workdir={cfg.workdir}", "--set", f"archive.root={cfg.archive.root}",
                 "--set", f"archive.chexmask_csv={cfg.archive.chexmask_csv}", "--set", "seed=7",
                 "--set", "shards.rows_per_shard=64", "--set", "report.bootstrap=50", *extra])


def one_error_line(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in errors[0], errors
    return errors[0]


# ---------------------------------------------------------------- the record format itself
def test_a_record_edited_by_hand_no_longer_matches_its_fingerprint(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    from radacx_cache.formats.records import write_record
    rec = write_record(tmp_path / "manifest.json", tmp_path, "demo", "radacx demo", files=["a.txt"], policy={"k": 1})
    assert read_record(rec.path).fingerprint == rec.fingerprint == record_fingerprint(rec.data)
    data = json.loads(rec.path.read_text())
    data["policy"]["k"] = 2  # a decision changed without re-sealing
    rec.path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match="was edited after it was written"):
        read_record(rec.path)
    rec.path.write_text(json.dumps(seal({k: v for k, v in data.items() if k != "fingerprint"})))
    assert read_record(rec.path).fingerprint != rec.fingerprint  # re-sealed: another record


def test_a_rewrite_keeping_size_and_mtime_is_caught(tmp_path):
    """``touch -r``: the verified-once cache is keyed on inode, ctime, size and mtime, not size + mtime."""
    from radacx_cache.formats.records import write_record
    target = tmp_path / "data.bin"
    target.write_bytes(b"a" * 4096)
    write_record(tmp_path / "manifest.json", tmp_path, "demo", "radacx demo", files=["data.bin"])
    Verifier(tmp_path).record(tmp_path / "manifest.json")  # verified once: cached
    st = target.stat()
    with open(target, "r+b") as f:  # in place: same inode, same size
        f.write(b"b")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored
    assert target.stat().st_mtime_ns == st.st_mtime_ns and target.stat().st_size == st.st_size
    with pytest.raises(RecordError, match="data.bin changed after `radacx demo` wrote it"):
        Verifier(tmp_path).record(tmp_path / "manifest.json")


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "a/../../b", ""])
def test_record_names_never_leave_their_folder(tmp_path, name):
    data = seal({"stage": "demo", "command": "radacx demo", "files": {name: {"bytes": 1, "sha256": "0" * 64}},
                 "upstream": {}})
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(RecordError, match="not a plain relative path"):
        Verifier(tmp_path).record(tmp_path / "manifest.json")


# ---------------------------------------------------------------- the review's cases
def test_an_edited_label_in_index_csv_is_refused(trained, tmp_path, caplog):
    cfg = copy_run(trained, tmp_path)
    index = tmp_path / "shards" / "index.csv"
    df = pd.read_csv(index, dtype=str, keep_default_na=False)
    df.loc[0, "positive_Edema"] = "1.0" if df.loc[0, "positive_Edema"] != "1.0" else "0.0"
    df.to_csv(index, index=False)
    assert cli(cfg, "report") == 2
    line = one_error_line(caplog)
    assert "index.csv changed after `radacx shards` wrote it" in line and "rerun `radacx shards`" in line


def test_an_index_row_naming_a_shard_outside_the_folder_is_refused(trained, tmp_path):
    """Even with the record re-sealed around the edit, a row may only name a shard the record lists."""
    copy_run(trained, tmp_path, parts=("cohort", "shards"))
    outside = tmp_path / "elsewhere.h5"
    shutil.copy(tmp_path / "shards" / "test-00000.h5", outside)
    index = tmp_path / "shards" / "index.csv"
    df = pd.read_csv(index, dtype=str)
    df.loc[df["split"] == "test", "shard"] = "../elsewhere.h5"
    df.to_csv(index, index=False)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    manifest["files"]["index.csv"] = {"bytes": index.stat().st_size,
                                      "sha256": __import__("hashlib").sha256(index.read_bytes()).hexdigest()}
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(seal(
        {k: v for k, v in manifest.items() if k != "fingerprint"})))
    with pytest.raises(ShardError, match="names shard '../elsewhere.h5', which the folder's manifest does not list"):
        ShardSet(tmp_path / "shards")


def test_a_cohort_rerun_after_the_shards_is_refused_downstream(trained, tmp_path, caplog):
    """``radacx cohort --set cohort.uncertain=ones`` then ``radacx report``: the report no longer states
    the new policy over the old shards; it names both cohort fingerprints and ``radacx shards``."""
    cfg = copy_run(trained, tmp_path)
    old = json.loads((tmp_path / "cohort" / "manifest.json").read_text())["fingerprint"]
    assert cli(cfg, "cohort", "--set", "cohort.uncertain=ones") == 0
    new = json.loads((tmp_path / "cohort" / "manifest.json").read_text())["fingerprint"]
    assert new != old
    caplog.clear()
    assert cli(cfg, "report") == 2
    line = one_error_line(caplog)
    assert old in line and new in line and "rerun `radacx shards`" in line
    assert not (tmp_path / "results" / "table1.md").exists()


def test_edited_prompt_embeddings_cannot_change_the_baseline(trained, tmp_path, caplog):
    from radacx_cache.stages.zeroshot import run_zeroshot
    cfg = copy_run(trained, tmp_path)
    before = pd.read_csv(tmp_path / "predictions" / "Baseline" / "masked.csv")
    text = next((tmp_path / "zeroshot").rglob("text.npz"))
    with np.load(text) as f:
        arrays = dict(f)
    arrays["text"] = arrays["text"][::-1].copy()  # the class embeddings swapped round
    np.savez(text, **arrays)
    assert cli(cfg, "report") == 2  # the Baseline's record chains the prompt embeddings it used
    assert "text.npz changed after `radacx zeroshot` wrote it" in one_error_line(caplog)
    np.savez(text, **arrays)
    run_zeroshot(cfg)  # a rerun computes them again: the stored copy is never read back
    after = pd.read_csv(tmp_path / "predictions" / "Baseline" / "masked.csv")
    pd.testing.assert_frame_equal(before, after)


def test_a_shard_rewritten_with_size_and_mtime_kept_is_refused(trained, tmp_path):
    copy_run(trained, tmp_path, parts=("cohort", "shards"))
    work = Workdir(tmp_path)
    open_verified(work)  # verified once: the cache now knows every file
    shard = tmp_path / "shards" / "test-00000.h5"
    st = shard.stat()
    with h5py.File(shard, "r+") as f:  # flip the first image's pixels in place
        f["original"][0] = 255 - f["original"][0]
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ShardError, match="test-00000.h5 changed after `radacx shards` wrote it"):
        open_verified(work)


def test_the_report_names_the_model_of_the_prediction_files_not_the_config(trained, tmp_path):
    from radacx_cache.stages.report import build_report
    cfg = copy_run(trained, tmp_path, "model.spec=biomedclip")
    md = build_report(cfg)["table"]
    assert "tiny model (random weights)" in md and "BiomedCLIP" not in md
    assert json.loads((tmp_path / "results" / "table1.json").read_text())["provenance"]["model"] == "tiny"


def test_saliency_measures_ink_as_the_shards_drew_it(trained, tmp_path):
    """``--set render.line_width=9`` after the shards were drawn at 2 px changes nothing."""
    from radacx_cache.render import boundary
    from radacx_cache.stages.saliency import run_saliency
    cfg = copy_run(trained, tmp_path, "render.line_width=9", "saliency.images=4", "saliency.methods=[gradcam]", "saliency.check_method=gradcam",
                   "saliency.panels=0")
    run_saliency(cfg, progress=False)
    rows = pd.read_csv(tmp_path / "results" / "saliency.csv", dtype={"dicom_id": str})
    shards = open_verified(Workdir(tmp_path))
    drawn = shards.render_config["line_width"]
    assert drawn == 2
    for _, row in rows.head(4).iterrows():
        masks = shards.get(row["dicom_id"])["masks"].astype(bool)
        ink = np.zeros(masks.shape[1:], bool)
        for m in masks:
            ink |= boundary(m, drawn)
        assert row["ink_area"] == pytest.approx(ink.mean())
    saliency = read_record(tmp_path / "results" / "saliency-manifest.json", "saliency")
    assert set(saliency["arms"]) == {"V1", "V2"}


# ---------------------------------------------------------------- one target rule
def test_training_target_and_scoring_target_are_one_rule():
    """``multi_positive=first`` with a reversed priority: the cohort's training target, the headline
    metric's target and saliency's all come from ``findings.first_positive`` in the record's order."""
    from radacx_cache.findings import FINDINGS, first_positive, target_order
    from radacx_cache.metrics import accuracy
    from radacx_cache.stages.cohort import apply_label_policy
    rng = np.random.default_rng(0)
    labels = pd.DataFrame(rng.choice([1.0, 0.0, np.nan], size=(400, 5), p=[0.35, 0.5, 0.15]), columns=FINDINGS)
    priority = list(FINDINGS)[::-1]
    targets, status = apply_label_policy(labels, FINDINGS, "ignore", "first", priority)
    keep = status == 0
    positives = (labels.to_numpy() == 1)[keep]
    order = target_order(FINDINGS, priority)
    assert order == [4, 3, 2, 1, 0]
    train_target = targets[keep].argmax(1)
    assert np.array_equal(train_target, first_positive(positives, order))
    multi = positives.sum(1) > 1
    assert multi.sum() > 50 and (train_target[multi] != first_positive(positives[multi])).mean() > 0.5
    perfect = np.eye(5)[train_target]  # a model that predicts exactly the training target
    assert accuracy(perfect, positives, order=order) == 1.0
    assert accuracy(perfect, positives) < 0.8  # scored in class order it would look wrong


def test_saliency_probe_head_applies_the_probe_s_own_preprocessing():
    import torch

    from radacx_cache.estimators.linear_probe import LinearProbe
    from radacx_cache.formats.probes import ProbeHead
    from radacx_cache.models import load_model
    lm = load_model("tiny", seed=3)
    rng = np.random.default_rng(1)
    pixels = torch.from_numpy(rng.integers(0, 255, (40, lm.image_size, lm.image_size), dtype=np.uint8))
    x = lm.to_input(pixels)
    with torch.no_grad():
        feats = lm.encode_image_parts(x)[0].numpy()
    y = np.eye(3)[rng.integers(0, 3, 40)]
    probe = LinearProbe(C=10.0, preprocess="l2").fit(feats * rng.uniform(0.5, 3, (40, 1)).astype(np.float32), y)
    weights = {"coef": probe.coef_, "intercept": probe.intercept_, "mean": probe.mean_.numpy(),
               "scale": probe.scale_.numpy(), "feature": np.array("features"), "preprocess": np.array("l2")}
    with torch.no_grad():
        head = ProbeHead(lm, weights)(x).softmax(1).numpy()
    np.testing.assert_allclose(head, probe.predict_proba(feats), atol=1e-4)


def test_probe_predictions_recompute_from_the_raw_files(trained):
    """V1/V2 on each test variant, recomputed with h5py and numpy from that variant's cache and the
    saved head: a probe scoring the masked test set from the original cache cannot pass."""
    work = Path(trained.workdir)
    index = pd.read_csv(work / "shards" / "index.csv", dtype={"dicom_id": str})
    test = (index["split"] == "test").to_numpy()
    for arm in ("V1", "V2"):
        with np.load(work / "probes" / f"{arm}.npz", allow_pickle=False) as f:
            coef, intercept, mean, scale = f["coef"], f["intercept"], f["mean"], f["scale"]
            assert str(f["preprocess"]) == "standardize" and str(f["feature"]) == "features"
        for variant in ("original", "masked"):
            with h5py.File(work / "features" / "tiny" / f"{variant}.h5", "r") as f:
                X = f["features"][:][test].astype(np.float64)
                assert [d.decode() for d in f["dicom_id"][:][test]] == index["dicom_id"][test].tolist()
            z = ((X - mean) / scale) @ coef.T + intercept
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            pred = pd.read_csv(work / "predictions" / arm / f"{variant}.csv", dtype={"dicom_id": str})
            assert pred["dicom_id"].tolist() == index["dicom_id"][test].tolist()
            np.testing.assert_allclose(pred[[c for c in pred.columns if c.startswith("prob_")]].to_numpy(), p,
                                       atol=2e-4, err_msg=f"{arm} on {variant}")


def test_verify_reports_every_record_and_names_a_break(trained, tmp_path, capsys):
    copy_run(trained, tmp_path)
    assert main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out][:2] == ["cohort/manifest.json", "shards/manifest.json"]
    assert all(line.startswith("intact") for line in out[:-1]) and len(out) >= 9
    assert out[-1] == f"verdict: INTACT: {len(out) - 1} of {len(out) - 1} records intact"
    with open(next((tmp_path / "features").rglob("masked.h5")), "r+b") as f:  # one byte, size kept
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert main(["verify", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "BROKEN  features/tiny/manifest.json" in out and "masked.h5 changed after `radacx embed`" in out
    assert "BROKEN  predictions/V2/manifest.json" in out  # everything built on it
    assert "intact  shards/manifest.json" in out
    assert out.splitlines()[-1].startswith("verdict: BROKEN: ") and " broken (rerun" in out.splitlines()[-1]


# ---------------------------------------------------------------- typed decisions, checked on read
def _resealed(pipeline, tmp_path, edit, record="cohort/manifest.json"):
    """The session's cohort (or another) record with ``edit`` applied and sealed again (a valid
    fingerprint: what a record from elsewhere can carry), written beside nothing else."""
    data = json.loads((Path(pipeline["cfg"].workdir) / record).read_text())
    data = {k: v for k, v in data.items() if k not in ("fingerprint", "record_version")}
    edit(data)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(seal(data)))
    return path


@pytest.mark.parametrize("edit, accepted", [
    (lambda d: None, True),
    (lambda d: d["policy"].update(val_fraction=1.0), True),  # the edge of the range is in it
    (lambda d: d["policy"].update(val_fraction=1.01), False),
    (lambda d: d.update(target_order=d["target_order"][:-1] + ["Pneumonia"]), False),  # not an order of the classes
    (lambda d: d.update(target_order=list(reversed(d["target_order"]))), True),
    (lambda d: d.update(classes=d["classes"] + d["classes"][:1]), False),  # a class twice
    (lambda d: d["policy"].update(uncertain="maybe"), False),
    (lambda d: d.update(rows=-1), False),
])
def test_a_sealed_cohort_record_with_an_impossible_decision_is_refused_naming_the_field(pipeline, tmp_path, edit,
                                                                                      accepted):
    path = _resealed(pipeline, tmp_path, edit)
    if accepted:
        facts = read_record(path, "cohort").facts
        assert set(facts.target_order) == set(facts.classes) and facts.policy.uncertain in ("ignore", "zeros", "ones")
    else:
        with pytest.raises(RecordError, match=r"'(val_fraction|target_order|classes|uncertain|rows)'"):
            read_record(path, "cohort")


def test_the_typed_policy_round_trips_to_the_recorded_one(pipeline):
    """Table 1's provenance prints ``LabelPolicy.as_dict()``: it is the record's policy, key for key."""
    rec = read_record(Path(pipeline["cfg"].workdir) / "cohort" / "manifest.json", "cohort")
    assert list(rec.facts.policy.as_dict().items()) == list(rec["policy"].items())


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["files"].update({"index.csv": "deadbeef"}), "'files' entry 'index.csv'"),
    (lambda d: d.update(shards=7), "'shards'"),
    (lambda d: d["shards"].append({"name": "test-00009.h5", "rows": -1, "bytes": 10}), "'shards' entry"),
    (lambda d: d.update(target_order=d["target_order"][::-1][:-1]), "'target_order'"),
])
def test_a_sealed_shard_record_of_the_wrong_shape_is_refused_naming_the_key(pipeline, tmp_path, edit, field):
    """Each once ended in a traceback deep in a stage (issue 28)."""
    path = _resealed(pipeline, tmp_path, edit, "shards/manifest.json")
    with pytest.raises(RecordError) as err:
        read_record(path, "shards")
    assert field in str(err.value) and "\n" not in str(err.value)
