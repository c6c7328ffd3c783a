import json

import pandas as pd
import pytest
from PIL import Image

from radacx_cache.cli import main


@pytest.fixture(scope="module")
def reported(pipeline, features):
    from radacx_cache.probe import run_probes
    from radacx_cache.report import build_report
    from radacx_cache.zeroshot import run_zeroshot
    cfg = pipeline["cfg"]
    zs = run_zeroshot(cfg)
    probes = run_probes(cfg)
    return {"zeroshot": zs, "probes": probes, "report": build_report(cfg), "cfg": cfg}


def test_report_table_files_and_figures(reported):
    out = reported["cfg"].work / "results"
    table = pd.read_csv(out / "table1.csv")
    assert list(table["variant"]) == ["Baseline", "V1", "V2"]  # V3/V4 appear once fine-tuned
    for col in ("acc_original", "acc_masked", "accuracy_single_masked", "balanced_accuracy_single_original",
                "macro_f1_masked"):
        assert table[col].between(0, 1).all(), col
    per_class = pd.read_csv(out / "per_class_auroc.csv")
    assert len(per_class) == 3 * 2 * 5 and per_class["auroc"].dropna().between(0, 1).all()
    md = (out / "table1.md").read_text()
    assert "0.4460 / 0.4509" in md and "published" in md.lower()
    assert r"\begin{tabular}" in (out / "table1.tex").read_text()
    data = json.loads((out / "table1.json").read_text())
    assert data["provenance"]["shards_fingerprint"] == json.loads(
        (reported["cfg"].work / "shards" / "manifest.json").read_text())["fingerprint"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["variants"]["V1"]["original"]["auroc"]) == 5
    assert 0 <= metrics["variants"]["V2"]["masked_minus_original"]["p_value"] <= 1
    for fig in reported["report"]["figures"]:
        im = Image.open(fig)
        assert im.size[0] > 300 and im.size[1] > 200


def test_predictions_trace_back_to_their_inputs(reported):
    work = reported["cfg"].work
    meta = json.loads((work / "predictions" / "V1" / "masked.json").read_text())
    assert meta["trained_on"] == "original" and meta["tested_on"] == "masked"
    assert meta["feature_fingerprints"]["variant"] == "masked"
    preds = pd.read_csv(work / "predictions" / "V1" / "masked.csv")
    probs = preds[[c for c in preds.columns if c.startswith("prob_")]]
    assert ((probs.sum(axis=1) - 1).abs() < 1e-5).all()
    assert set(preds["dicom_id"]) == set(pd.read_csv(work / "shards" / "index.csv").query("split == 'test'")["dicom_id"])


def test_cli_reports_config_errors_with_the_key(caplog):
    assert main(["cohort", "--set", "cohort.uncertain=maybe"]) == 2
    assert "cohort.uncertain" in caplog.text and "ignore, zeros, ones" in caplog.text


def test_cli_cohort_summary(pipeline, capsys):
    cfg = pipeline["cfg"]
    args = ["cohort", "--set", f"workdir={cfg.work}", "--set", f"archive.mimic_root={cfg.archive.mimic_root}",
            "--set", f"archive.chexmask_csv={cfg.archive.chexmask_csv}", "--set", "seed=7"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "images kept" in out and "reject:" in out and "train" in out


def test_probe_refuses_features_of_other_shards(reported, tmp_path):
    import shutil
    from radacx_cache.config import load_config
    from radacx_cache.features import FeatureCacheError
    from radacx_cache.probe import run_probes
    work = reported["cfg"].work
    for part in ("shards", "features"):
        shutil.copytree(work / part, tmp_path / part)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    manifest["fingerprint"] = "another-shard-set"  # e.g. the shards were rebuilt from another cohort
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FeatureCacheError, match="shards: cache has"):
        run_probes(load_config(None, [f"workdir={tmp_path}", "seed=7"]))
