import numpy as np

from radacx_cache.metrics import accuracy, bootstrap_ci, evaluate, paired_bootstrap, per_class_auroc


def test_evaluate_with_an_absent_class_reports_nan_auroc():
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 1, 0]], float)
    proba = np.array([[.7, .2, .1], [.2, .7, .1], [.1, .8, .1], [.6, .3, .1]])
    m = evaluate(proba, targets)
    assert m["accuracy"] == 0.75 and m["n_single"] == 3
    assert np.isnan(m["auroc"][2]) and np.isfinite(m["macro_auroc"])
    assert np.array(m["confusion_single"]).sum() == 3
    assert np.isnan(per_class_auroc(proba, np.zeros_like(targets))).all()


def test_patient_bootstrap_ci_and_paired_difference():
    rng = np.random.default_rng(0)
    n = 400
    patients = np.repeat(np.arange(100), 4)
    y = rng.integers(0, 3, n)
    targets = np.eye(3)[y]
    good = np.eye(3)[np.where(rng.random(n) < 0.8, y, (y + 1) % 3)]
    bad = np.eye(3)[np.where(rng.random(n) < 0.5, y, (y + 1) % 3)]
    point, low, high = bootstrap_ci(good, targets, patients, n_boot=300)
    assert low < point < high and high - low < 0.2
    assert point == accuracy(good, targets)
    diff = paired_bootstrap(bad, good, targets, patients, n_boot=300)
    assert diff["diff"] > 0.2 and diff["p_value"] < 0.01 and diff["low"] > 0
    same = paired_bootstrap(good, good, targets, patients, n_boot=100)
    assert same["diff"] == 0 and same["p_value"] == 1.0


def test_bootstrap_resamples_whole_patients():
    # one patient holds every error: resampling by patient gives a much wider interval than by image
    patients = np.repeat(np.arange(10), 10)
    targets = np.eye(2)[np.zeros(100, int)]
    proba = targets.copy()
    proba[:10] = np.eye(2)[np.ones(10, int)]
    _, low, high = bootstrap_ci(proba, targets, patients, n_boot=500)
    assert low <= 0.75 and high == 1.0
