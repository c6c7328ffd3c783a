"""Checks near their boundaries, with numbers fixed in advance (issue 27: a mutation check of the
saliency checks found these planted bugs uncaught: a control beaten by a one-sided 90% CI or by its
point difference, a paired CI resampled by image, "beats 3 of 4 controls", anatomy mass over the
heart only, VinDr boxes kept for findings the readers did not agree on, ``min_readers`` 0, and the
DICOM window dividing by ``width``). Each case below sits where the right rule and the planted one
disagree; its precondition is asserted too, so a case that drifts off the boundary fails loudly."""
import numpy as np
import pandas as pd
import pytest

from radacx_cache.config import ConfigError, load_config
from radacx_cache.metrics import paired_difference
from radacx_cache.saliency_metrics import CONTROLS, control_checks, image_metrics, regions
from radacx_cache.sources.dicom import linear_window
from radacx_cache.stages.cohort import cohort_boxes

N_BOOT = 2000


def rows_for(model_values, control_values: dict, patients) -> pd.DataFrame:
    rows = []
    for i, (v, p) in enumerate(zip(model_values, patients)):
        base = {"arm": "V1", "tested_on": "original", "method": "integrated_gradients", "dicom_id": f"d{i}",
                "subject_id": int(p)}
        rows.append({**base, "source": "model", "truth": float(v)})
        for control in CONTROLS:
            rows.append({**base, "source": control, "truth": float(control_values[control][i])})
    return pd.DataFrame(rows)


def one_check(df) -> dict:
    checks = control_checks(df, "integrated_gradients", N_BOOT, 0, metrics=("truth",))
    assert len(checks) == 1
    return checks[0]


def far_below(n):
    return np.full(n, 0.05)


def test_a_control_is_beaten_only_by_a_two_sided_95_ci_not_a_one_sided_90_or_the_point_difference():
    # the arm beats the random head by 1.8 standard errors: the two-sided 95% CI reaches below 0,
    # while a one-sided 90% bound (the 10% quantile) and the point difference are above it
    n = 30
    z = np.random.default_rng(11).normal(0, 1, n)
    delta = (z - z.mean()) / z.std() * 0.06 + 1.8 * 0.06 / np.sqrt(n)
    model = 0.3 + delta
    d95 = paired_difference(model - delta, model, np.ones(n, bool), np.arange(n), n_boot=N_BOOT, seed=0)
    d80 = paired_difference(model - delta, model, np.ones(n, bool), np.arange(n), n_boot=N_BOOT, seed=0, alpha=0.2)
    assert d95["diff"] > 0 and d95["low"] < 0 < d80["low"], (d95, d80)  # the boundary case, checked
    controls = {c: far_below(n) for c in CONTROLS}
    controls["random_head"] = model - delta
    check = one_check(rows_for(model, controls, np.arange(n)))
    assert check["controls"]["random_head"]["beaten"] is False
    assert check["passed"] is False
    assert all(check["controls"][c]["beaten"] for c in CONTROLS if c != "random_head")


def test_the_paired_ci_is_resampled_by_patient_not_by_image():
    # six patients with five images each; the difference is shared within a patient, so resampled by
    # image the CI excludes 0, by patient it does not
    effects = np.array([0.30, 0.25, 0.20, 0.28, -0.20, -0.15])
    patients = np.repeat(np.arange(6), 5)
    delta = effects[patients] + np.random.default_rng(2).normal(0, 0.01, 30)
    model = 0.4 + delta
    by_image = paired_difference(model - delta, model, np.ones(30, bool), np.arange(30), n_boot=N_BOOT, seed=0)
    by_patient = paired_difference(model - delta, model, np.ones(30, bool), patients, n_boot=N_BOOT, seed=0)
    assert by_image["low"] > 0 and by_patient["low"] < 0, (by_image, by_patient)
    controls = {c: far_below(30) for c in CONTROLS}
    controls["shuffled_maps"] = model - delta
    check = one_check(rows_for(model, controls, patients))
    assert check["controls"]["shuffled_maps"]["beaten"] is False and check["passed"] is False
    assert check["controls"]["shuffled_maps"]["diff"]["low"] == pytest.approx(by_patient["low"])


def test_an_arm_passes_only_when_it_beats_every_control():
    n = 24
    model = np.random.default_rng(3).uniform(0.4, 0.6, n)
    every = {c: far_below(n) for c in CONTROLS}
    assert one_check(rows_for(model, every, np.arange(n)))["passed"] is True
    for spared in CONTROLS:  # beats all but one: not passed, whichever one it is
        controls = {**every, spared: model.copy()}
        check = one_check(rows_for(model, controls, np.arange(n)))
        assert sum(c["beaten"] for c in check["controls"].values()) == len(CONTROLS) - 1
        assert check["passed"] is False, spared


def test_anatomy_mass_counts_lungs_and_heart():
    masks = np.zeros((3, 20, 20), np.uint8)
    masks[0, 2:18, 2:8] = 1  # right lung
    masks[1, 2:18, 12:18] = 1  # left lung
    masks[2, 12:18, 8:12] = 1  # heart
    reg = regions(masks, 1)
    assert (reg["anatomy"] == masks.astype(bool).any(0)).all()
    lungs_only = (masks[0] | masks[1]).astype(float)
    m = image_metrics(lungs_only, reg, "Edema")
    assert m["anatomy"] == pytest.approx(1.0) and m["anatomy_area"] == pytest.approx(masks.any(0).mean())
    heart_only = masks[2].astype(float)
    assert image_metrics(heart_only, reg, "Edema")["anatomy"] == pytest.approx(1.0)
    assert image_metrics(heart_only, reg, "Cardiomegaly")["organ"] == pytest.approx(1.0)
    assert image_metrics(lungs_only, reg, "Cardiomegaly")["organ"] == pytest.approx(0.0)


def test_boxes_are_kept_only_for_findings_the_readers_agreed_on():
    classes = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    cohort = pd.DataFrame({"dicom_id": ["a", "b"], "Rows": [100, 100], "Columns": [100, 100],
                           **{f"positive_{k}": [0, 0] for k in classes}})
    cohort.loc[0, "positive_Cardiomegaly"] = 1  # two of three readers: agreed
    cohort.loc[1, "positive_Cardiomegaly"] = -1  # one of three: uncertain under the rule, not truth
    boxes = pd.DataFrame({"dicom_id": ["a", "b", "a"], "finding": ["Cardiomegaly", "Cardiomegaly", "Edema"],
                          "x0": [10, 10, 5], "y0": [10, 10, 5], "x1": [50, 50, 9], "y1": [50, 50, 9], "reader": [1, 1, 2]})
    kept, rejects = cohort_boxes(boxes, cohort, classes, in_pixels=True)
    assert list(zip(kept["dicom_id"], kept["finding"])) == [("a", "Cardiomegaly")] and not rejects
    assert kept["x1"].iloc[0] == pytest.approx(0.5)


def test_min_readers_is_at_least_one():
    with pytest.raises(ConfigError, match="min_readers"):
        load_config(None, ["cohort.min_readers=0"])
    assert load_config(None, ["cohort.min_readers=1"]).cohort.min_readers == 1


def test_the_dicom_window_is_the_standards_linear_function():
    # DICOM PS3.3 C.11.2.1.2.1: y = ((x − (c − 0.5)) / (w − 1) + 0.5) clipped to [0, 1]; c = 100, w = 11
    x = np.array([94.0, 94.5, 95.0, 100.0, 102.0, 104.5, 105.0])
    expected = np.array([0.0, 0.0, 0.05, 0.55, 0.75, 1.0, 1.0])
    assert linear_window(x, 100.0, 11.0) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_boot", [40, 200, 500, 999, 1000])
def test_a_ci_and_its_p_come_from_the_same_replicates_and_agree(n_boot):
    """The CI excludes 0 exactly when p < 0.05, on hundreds of data sets near the boundary (an
    interpolated quantile printed [+0.003, +0.179] beside p = 0.052)."""
    disagree = []
    for trial in range(150):
        rng = np.random.default_rng(trial)
        n = int(rng.integers(6, 40))
        a = rng.random(n)
        b = a + rng.normal(0, 0.1, n) + 2.0 * 0.1 / np.sqrt(n) * rng.choice([-1, 1])  # ~2 standard errors
        d = paired_difference(a, b, np.ones(n, bool), rng.integers(0, max(2, n // 2), n), n_boot=n_boot, seed=trial)
        if (d["low"] > 0 or d["high"] < 0) != (d["p_below"] or d["p_value"] < 0.05):
            disagree.append((trial, d))
    assert not disagree, disagree[:3]


def test_an_archive_without_a_test_split_gets_a_seeded_patient_disjoint_one():
    from radacx_cache.stages.cohort import patient_split
    subjects = np.repeat(np.arange(300), 2)
    official = np.full(len(subjects), "train", object)  # VinDr-CXR's Kaggle copy: train.csv only
    split = patient_split(subjects, official, "paper", 1 / 6, seed=4)
    share = {s: float(np.mean(split == s)) for s in ("train", "val", "test")}
    assert 0.12 < share["test"] < 0.2 and 0.1 < share["val"] < 0.2, share
    by_patient = pd.Series(split).groupby(subjects).nunique()
    assert (by_patient == 1).all()  # no patient in two splits
    assert (patient_split(subjects, official, "paper", 1 / 6, seed=4) == split).all()  # seeded
    assert not (patient_split(subjects, official, "paper", 1 / 6, seed=5) == split).all()
    with_test = official.copy()
    with_test[:60] = "test"  # an archive with its own test split keeps it
    assert (patient_split(subjects, with_test, "paper", 1 / 6, seed=4)[:60] == "test").all()
    assert (patient_split(subjects, with_test, "paper", 1 / 6, seed=4) == "test").sum() == 60


def test_the_ablation_table_marks_a_collapsed_row_and_carries_the_reference_rows():
    from types import SimpleNamespace

    from radacx_cache.tables.ablation import ablation_reference, ablation_results, ablation_sections
    classes = ["A", "B", "C"]
    positives = np.zeros((40, 3))
    positives[np.arange(40), np.arange(40) % 3] = 1
    one_hot = np.eye(3)
    spread = one_hot[np.arange(40) % 3]  # right every time, three classes
    constant = one_hot[np.r_[np.zeros(37, int), [1, 2, 2]]]  # 37 of 40 = 92.5% one class: collapsed
    near = one_hot[np.r_[np.zeros(36, int), [1, 1, 2, 2]]]  # 90.0%: not above the line
    preds = {"original": spread, "masked": constant, "crop": near}

    def load(arm, variant):
        return SimpleNamespace(proba=preds[variant]) if arm == "Baseline" else None
    rows = ablation_results(load, list(preds), positives, np.arange(40), None, 200, 0)
    by = {r["variant"]: r["predictions"] for r in rows}
    assert by["masked"]["collapsed"] and by["masked"]["top_share"] == pytest.approx(0.925)
    assert not by["crop"]["collapsed"] and by["original"]["distinct"] == 3
    reference = ablation_reference(positives, None)
    assert reference["majority"] == pytest.approx(14 / 40) and reference["chance"] == pytest.approx(1 / 3)
    table = ablation_sections(rows, classes, 200, reference)[0]
    text = "\n".join(" | ".join(map(str, r)) for r in table.rows)
    assert "reference: always the most frequent test target" in text and "chance" in text
    marked = [r for r in table.rows if "COLLAPSED" in str(r[-1])]
    assert [r[1] for r in marked] == ["any", "masked"]
