import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from radacx_cache.cli import main


@pytest.fixture(scope="module")
def reported(pipeline, features):
    from radacx_cache.stages.probe import run_probes
    from radacx_cache.stages.report import build_report
    from radacx_cache.stages.zeroshot import run_zeroshot
    cfg = pipeline["cfg"]
    zs = run_zeroshot(cfg)
    probes = run_probes(cfg)
    return {"zeroshot": zs, "probes": probes, "report": build_report(cfg), "cfg": cfg}


def test_report_table_files_and_figures(reported):
    out = Path(reported["cfg"].workdir) / "results"
    table = pd.read_csv(out / "table1.csv")
    assert list(table["arm"]) == ["Baseline", "V1", "V2"]  # V3/V4 appear once fine-tuned
    for col in ("acc_argmax_original", "acc_any_masked", "acc_single_original", "balanced_accuracy_masked",
                "macro_f1_original", "macro_auroc_masked"):
        assert table[col].between(0, 1).all(), col
    per_class = pd.read_csv(out / "per_class_auroc.csv")
    assert len(per_class) == 3 * 2 * 5 and per_class["auroc"].dropna().between(0, 1).all()
    md, tex = (out / "table1.md").read_text(), (out / "table1.tex").read_text()
    assert "0.4460 / 0.4509" in md and "Published" in md and "first positive finding" in md
    assert "tiny model (random weights)" in md and "BiomedCLIP" not in md.split("Arm")[1].split("chance")[0]
    for row in ("chance", "majority", "prior", "V2 − V1", "Balanced accuracy", "Top-1 among positives"):
        assert row in md, row
    assert r"\begin{tabular}" in tex
    data = json.loads((out / "table1.json").read_text())
    for r in data["rows"]:  # every CI and p printed in markdown is in the LaTeX too
        for v in ("original", "masked"):
            cell = f"{r[f'acc_argmax_{v}']:.4f} [{r[f'acc_argmax_{v}_low']:.3f}, {r[f'acc_argmax_{v}_high']:.3f}]"
            assert cell in md and cell in tex, cell
    assert data["provenance"]["shards_fingerprint"] == json.loads(
        (Path(reported["cfg"].workdir) / "shards" / "manifest.json").read_text())["fingerprint"]
    for fig in reported["report"]["figures"]:
        im = Image.open(fig)
        assert im.size[0] > 300 and im.size[1] > 200
    # arms not run yet are rows of Table 1 that say so (issue 29), not silently missing
    for arm in ("V3", "V4"):
        assert f"| {arm} | encoder + head, " in md and "not run" in md.split(f"| {arm} |")[1].split("\n")[0]
    assert "Not run yet: V3, V4 (run `radacx finetune`" in md
    assert "Training settings, V1, V2: probe: the defaults." in md
    assert "Table 1: accuracy" not in tex and r"\caption{accuracy on original" in tex and "booktabs" in tex


def test_training_settings_other_than_the_defaults_show_in_table_1():
    """``--set finetune.epochs=1`` must leave a trace: each arm's record holds its training settings and
    the provenance lines name the ones that differ from the defaults."""
    import dataclasses
    from types import SimpleNamespace

    from radacx_cache.config import FinetuneConfig
    from radacx_cache.stages.report import training_settings
    ft = dataclasses.asdict(FinetuneConfig())
    arm = lambda training: SimpleNamespace(facts=SimpleNamespace(training=training))
    lines = training_settings({"V3": arm({**ft, "epochs": 1}), "V4": arm({**ft, "epochs": 1}), "Baseline": arm(None),
                               "V1": arm(None)})
    assert lines == [f"Training settings, V3, V4: finetune.epochs = 1 (default {ft['epochs']}).",
                     "Training settings, V1: probe settings not recorded (written before records held them)."]
    assert training_settings({"V3": arm(ft)}) == ["Training settings, V3: finetune: the defaults."]


def test_table1_recomputed_from_the_prediction_files(reported):
    """Accuracies, CIs, paired differences and p, recomputed with the metric functions."""
    import numpy as np

    from radacx_cache.formats.predictions import load_predictions
    from radacx_cache.metrics import bootstrap_ci, paired_bootstrap
    cfg = reported["cfg"]
    work, n_boot = Path(cfg.workdir), cfg.report.bootstrap
    data = json.loads((work / "results" / "table1.json").read_text())
    rows = {r["arm"]: r for r in data["rows"]}
    loaded = {}
    for arm in rows:
        preds = {v: load_predictions(work / "predictions" / arm / f"{v}.csv") for v in ("original", "masked")}
        loaded[arm] = preds
        patients = preds["original"].patients
        for v, p in preds.items():
            point, low, high = bootstrap_ci(p.proba, p.positives, patients, n_boot=n_boot, seed=cfg.seed,
                                            alpha=0.05)  # the 95% the table prints
            assert (rows[arm][f"acc_argmax_{v}"], rows[arm][f"acc_argmax_{v}_low"],
                    rows[arm][f"acc_argmax_{v}_high"]) == pytest.approx((point, low, high)), (arm, v)
            any_point = bootstrap_ci(p.proba, p.positives, patients, reading="any", n_boot=n_boot, seed=cfg.seed)[0]
            assert rows[arm][f"acc_any_{v}"] == pytest.approx(any_point)
        d = paired_bootstrap(preds["original"].proba, preds["masked"].proba, preds["original"].positives,
                             patients, n_boot=n_boot, seed=cfg.seed)
        assert rows[arm]["diff_masked_minus_original"] == pytest.approx(d["diff"])
        assert (rows[arm]["diff_low"], rows[arm]["diff_high"], rows[arm]["p_value"]) == pytest.approx(
            (d["low"], d["high"], d["p_value"]))
    effects = {(e["comparison"], e["test_images"]): e for e in data["training_effects"]}
    for v in ("original", "masked"):
        d = paired_bootstrap(loaded["V1"][v].proba, loaded["V2"][v].proba, loaded["V1"][v].positives,
                             loaded["V1"][v].patients, n_boot=n_boot, seed=cfg.seed)
        e = effects[("V2 − V1", v)]
        assert (e["diff"], e["low"], e["high"], e["p_value"]) == pytest.approx((d["diff"], d["low"], d["high"],
                                                                                  d["p_value"]))
    ref = data["reference"]["argmax"]
    assert ref["chance"][0] == pytest.approx(0.2)
    # the majority row from the raw index: the *train* split's most frequent first-positive target
    index = pd.read_csv(work / "shards" / "index.csv")
    classes = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    pos = index[[f"positive_{c}" for c in classes]].to_numpy() > 0
    first = np.where(pos.any(1), pos.argmax(1), -1)
    train, test = (index["split"] == "train").to_numpy(), (index["split"] == "test").to_numpy()
    majority = np.bincount(first[train & (first >= 0)], minlength=5).argmax()
    assert ref["majority_class"] == classes[majority]
    assert ref["majority"][0] == pytest.approx(np.mean(first[test & (first >= 0)] == majority))


def test_incomplete_or_edited_predictions_are_refused(reported, tmp_path):
    import shutil

    from radacx_cache.config import load_config
    from radacx_cache.formats.predictions import PredictionError
    from radacx_cache.formats.records import RecordError, write_record
    from radacx_cache.stages.report import build_report
    work = Path(reported["cfg"].workdir)
    for part in ("cohort", "shards", "features", "zeroshot", "probes", "predictions"):
        shutil.copytree(work / part, tmp_path / part)
    cfg = load_config(None, [f"workdir={tmp_path}", "seed=7", "report.bootstrap=20"])
    victim = tmp_path / "predictions" / "V1" / "masked.csv"
    df = pd.read_csv(victim, dtype={"dicom_id": str})
    df.iloc[1:].to_csv(victim, index=False)  # one test image never predicted
    with pytest.raises(RecordError, match="masked.csv changed after `radacx probe` wrote it"):
        build_report(cfg)
    record = json.loads((tmp_path / "predictions" / "V1" / "manifest.json").read_text())
    from radacx_cache.formats.records import Verifier
    ups = [Verifier(tmp_path).record(tmp_path / rel) for rel in record["upstream"]]
    facts = {k: record[k] for k in ("arm", "tested_on", "model_spec", "model_fingerprint", "weights_seed")}
    write_record(tmp_path / "predictions" / "V1" / "manifest.json", tmp_path, "predictions", "radacx probe",
                 files=list(record["files"]), upstream=ups, **facts)  # even sealed anew, incomplete is refused
    with pytest.raises(PredictionError, match=f"no row for test image {df['dicom_id'].iloc[0]}"):
        build_report(cfg)


def test_predictions_trace_back_to_their_inputs(reported):
    work = Path(reported["cfg"].workdir)
    meta = json.loads((work / "predictions" / "V1" / "masked.json").read_text())
    assert meta["trained_on"] == "original" and meta["tested_on"] == "masked"
    assert meta["feature_fingerprints"]["variant"] == "masked"
    preds = pd.read_csv(work / "predictions" / "V1" / "masked.csv")
    probs = preds[[c for c in preds.columns if c.startswith("prob_")]]
    assert ((probs.sum(axis=1) - 1).abs() < 1e-5).all()
    assert set(preds["dicom_id"]) == set(pd.read_csv(work / "shards" / "index.csv").query("split == 'test'")["dicom_id"])
    assert {"positive_Edema", "uncertain_Edema", "target_Edema"} <= set(preds.columns)


def test_cli_reports_config_errors_with_the_key(caplog):
    assert main(["cohort", "--set", "cohort.uncertain=maybe"]) == 2
    assert "cohort.uncertain" in caplog.text and "ignore, zeros, ones" in caplog.text


def test_cli_cohort_summary(pipeline, capsys):
    cfg = pipeline["cfg"]
    args = ["cohort", "--set", f"workdir={Path(cfg.workdir)}", "--set", f"archive.root={cfg.archive.root}",
            "--set", f"archive.chexmask_csv={cfg.archive.chexmask_csv}", "--set", "seed=7"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "images kept" in out and "reject:" in out and "train" in out


def test_probe_refuses_features_of_other_shards(reported, tmp_path):
    import shutil

    from radacx_cache.config import load_config
    from radacx_cache.formats.records import RecordError, seal
    from radacx_cache.stages.probe import run_probes
    work = Path(reported["cfg"].workdir)
    for part in ("cohort", "shards", "features"):
        shutil.copytree(work / part, tmp_path / part)
    path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(path.read_text())
    old = manifest.pop("fingerprint")
    manifest["rejects"] += 1  # e.g. the shards were rebuilt after an image came back
    path.write_text(json.dumps(seal(manifest)))
    new = json.loads(path.read_text())["fingerprint"]
    with pytest.raises(RecordError, match=f"shards/manifest.json {old}, which is now {new}; rerun `radacx embed`"):
        run_probes(load_config(None, [f"workdir={tmp_path}", "seed=7"]))


def test_zeroshot_predicts_each_test_variant_from_its_own_cache(reported):
    import numpy as np

    from radacx_cache.formats.features import FeatureCache
    from radacx_cache.formats.predictions import load_predictions
    from radacx_cache.formats.shard import open_shards
    from radacx_cache.models import load_model
    from radacx_cache.stages.zeroshot import class_prompts, text_embeddings, zeroshot_proba
    cfg = reported["cfg"]
    shards = open_shards(Path(cfg.workdir) / "shards")
    test = (shards.index["split"] == "test").to_numpy()
    model = load_model("tiny", seed=cfg.seed)
    text = text_embeddings(model, class_prompts(shards.target_names, cfg.zeroshot.template, {}))
    scale = float(model.model.logit_scale.exp())
    for variant in ("original", "masked"):
        feats = FeatureCache(Path(cfg.workdir) / "features" / "tiny" / f"{variant}.h5").features[test]
        got = load_predictions(Path(cfg.workdir) / "predictions" / "Baseline" / f"{variant}.csv").proba
        np.testing.assert_allclose(got, zeroshot_proba(feats, text, scale), atol=1e-5)


def test_figures_from_the_phantom_say_so_and_the_readings_table_is_there(reported):
    from PIL import Image
    out = Path(reported["cfg"].workdir) / "results"
    for name in ("accuracy.png", "confusion.png", "figure1_montage.png"):
        im = Image.open(out / name).convert("RGB")
        assert im.getpixel((2, 2)) == (178, 34, 34), name  # the band that says "synthetic phantom"
    md = (out / "table1.md").read_text()
    assert "The headline assumes one reading" in md and "best constant guess" in md
    assert "< 1/" not in md
    cohort = json.loads((Path(reported["cfg"].workdir) / "cohort" / "manifest.json").read_text())
    counts = cohort["counts"]["train"]
    assert sum(counts["targets"].values()) == counts["images"] <= sum(counts["positives"].values())


def test_results_load_matches_the_markdown_table(reported):
    """radacx_cache.results.load: every Table 1 cell of table1.md is a row of the tidy table (same
    numbers at the printed precision), p is never 0, and a results file changed since the report
    wrote it is refused."""
    import re

    from radacx_cache import results
    from radacx_cache.formats.records import RecordError
    work = Path(reported["cfg"].workdir)
    df = results.load(work)
    assert list(df.columns) == results.COLUMNS and not (df["p"] == 0).any()
    md = (work / "results" / "table1.md").read_text()
    table = md.split("### Table 1", 1)[1].split("\n\n")[1]
    checked = 0
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] not in ("Baseline", "V1", "V2"):
            continue
        for variant, cell in (("original", cells[2]), ("masked", cells[3])):
            point, low, high = map(float, re.match(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", cell).groups())
            row = df[(df.section == "table1") & (df.arm == cells[0]) & (df.tested_on == variant)
                     & (df.quantity == "accuracy") & (df.detail == "argmax")].iloc[0]
            assert (round(row.value, 4), round(row.low, 3), round(row.high, 3)) == (point, low, high), cells
            checked += 1
        d = df[(df.section == "table1_difference") & (df.arm == cells[0])].iloc[0]
        assert f"{d.value:+.4f}" in cells[4] and (cells[5].startswith("<") == bool(d.p_below))
    assert checked == 6
    path = work / "results" / "table1.json"
    original = path.read_bytes()
    try:
        path.write_bytes(original.replace(b'"n_test"', b'"n_test" ', 1))
        with pytest.raises(RecordError, match="changed after"):
            results.load(work)
    finally:
        path.write_bytes(original)
