import numpy as np
import pytest

from radacx_cache.metrics import (accuracy, bootstrap_ci, evaluate, first_positive, format_p, paired_bootstrap,
                                  paired_difference, per_class_auroc, per_class_f1, reference_correctness)

# 4 images, 3 classes: a multi-positive row, single-positive rows, and a tie in the probabilities
POSITIVES = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]], float)
PROBA = np.array([[.2, .7, .1],    # predicts 1: among the positives, but not the first positive (0)
                  [.2, .7, .1],    # predicts 1: correct under every reading
                  [.4, .4, .2],    # a tie between 0 and 1: argmax takes 0 (the first), wrong everywhere
                  [.1, .1, .8]])   # predicts 2: among the positives, not the first (0)


def test_the_three_accuracy_readings_on_hand_made_targets():
    assert list(first_positive(POSITIVES)) == [0, 1, 2, 0]
    assert accuracy(PROBA, POSITIVES) == 0.25  # argmax reading: only image 1
    assert accuracy(PROBA, POSITIVES, "any") == 0.75  # images 0, 1 and 3
    assert accuracy(PROBA, POSITIVES, "single") == 0.5  # images 1 and 2 are single-positive; 1 is right
    with pytest.raises(ValueError, match="reading"):
        accuracy(PROBA, POSITIVES, "top5")


def test_uncertain_labels_are_left_out_under_ignore_and_negative_under_zeros():
    rng = np.random.default_rng(0)
    n = 200
    positives = np.zeros((n, 2))
    positives[:, 0] = rng.random(n) < 0.4
    positives[:, 1] = 1 - positives[:, 0]
    uncertain = np.zeros((n, 2))
    uncertain[:40, 0] = 1  # uncertain for class 0: not positive (ignore / zeros) ...
    positives[:40, 0] = 0
    positives[:40, 1] = 1
    proba = np.column_stack([positives[:, 0] * 0.6 + 0.2, 1 - (positives[:, 0] * 0.6 + 0.2)])
    proba[:40] = [[0.9, 0.1]]  # ... but the model is confident they are class 0
    ignore = per_class_auroc(proba, positives, uncertain, "ignore")
    zeros = per_class_auroc(proba, positives, uncertain, "zeros")
    assert ignore[0] == 1.0 and zeros[0] < 0.9  # ignore leaves the 40 out; zeros counts them as negatives
    assert per_class_f1(proba, positives, uncertain, "ignore")[0] > per_class_f1(proba, positives, uncertain, "zeros")[0]
    m_ignore, m_zeros = evaluate(proba, positives, uncertain, "ignore"), evaluate(proba, positives, uncertain, "zeros")
    assert m_ignore["macro_auroc"] > m_zeros["macro_auroc"] and m_ignore["accuracy_argmax"] == m_zeros["accuracy_argmax"]


def test_auroc_of_an_absent_class_is_nan():
    m = evaluate(PROBA, POSITIVES)
    assert np.isfinite(m["macro_auroc"]) and np.array(m["confusion"]).sum() == 4
    assert np.isnan(per_class_auroc(PROBA, np.zeros_like(POSITIVES))).all()


def test_reference_rows():
    train = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1]], float)
    ref = reference_correctness(train, POSITIVES, "argmax")
    # train first positives: 0, 1, 1, 1, 2 -> majority class 1, prior (0.2, 0.6, 0.2)
    assert ref["majority_class"] == 1
    np.testing.assert_allclose(ref["chance"][0], 1 / 3)
    np.testing.assert_allclose(ref["majority"][0], [0, 1, 0, 0])
    np.testing.assert_allclose(ref["prior"][0], [0.2, 0.6, 0.2, 0.2])
    any_ref = reference_correctness(train, POSITIVES, "any")
    # class 1 is positive most often in train; it is among the positives of test images 0 and 1
    assert any_ref["majority_class"] == 1
    np.testing.assert_allclose(any_ref["majority"][0], [1, 1, 0, 0])
    np.testing.assert_allclose(any_ref["chance"][0], [2 / 3, 1 / 3, 1 / 3, 2 / 3])


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
    assert diff["diff"] > 0.2 and diff["p_below"] and diff["low"] > 0
    assert diff["p_value"] == 2 / diff["n_boot"]  # the bound, never 0 in a file
    assert format_p(diff, 300) == "< 2/300" and format_p(0.0, 300) == "< 2/300"
    same = paired_bootstrap(good, good, targets, patients, n_boot=100)
    assert same["diff"] == 0 and same["p_value"] == 1.0


def test_paired_p_is_two_sided():
    from radacx_cache.metrics import _replicates
    rng = np.random.default_rng(3)
    patients = np.arange(300)
    a = (rng.random(300) < 0.5).astype(float)
    b = np.where(rng.random(300) < 0.08, 1 - a, a)  # a few flips: a small, noisy difference
    mask = np.ones(300, bool)
    d = paired_difference(a, b, mask, patients, n_boot=2000, seed=1)
    reps = _replicates(b - a, mask, patients, 2000, 1)
    tail = min(np.mean(reps <= 0), np.mean(reps >= 0))
    assert 0.01 < tail < 0.4  # a small, noisy difference: some replicates on the other side of 0
    assert d["p_value"] == pytest.approx(2 * tail)  # both tails, not one
    flipped = paired_difference(b, a, mask, patients, n_boot=2000, seed=1)
    assert flipped["p_value"] == pytest.approx(d["p_value"]) and flipped["diff"] == pytest.approx(-d["diff"])


def test_bootstrap_resamples_whole_patients():
    # one patient holds every error: resampling by patient gives a much wider interval than by image
    patients = np.repeat(np.arange(10), 10)
    targets = np.eye(2)[np.zeros(100, int)]
    proba = targets.copy()
    proba[:10] = np.eye(2)[np.ones(10, int)]
    _, low, high = bootstrap_ci(proba, targets, patients, n_boot=500)
    assert low <= 0.75 and high == 1.0
    d = paired_bootstrap(targets, proba, targets, patients, n_boot=500)
    # by patient, 1 patient in 10 is drawn 0 times about 35% of the time: the difference often hits 0
    assert d["high"] == 0.0 and d["low"] <= -0.2


def test_bootstrap_interval_is_95_percent():
    """Against the binomial interval fixed in advance (not the code's own helper): 2,000 patients,
    one image each, 30% correct: 95% half-width 1.96 * sqrt(0.21 / 2000) = 0.0201 (90%: 0.0169)."""
    from radacx_cache.metrics import bootstrap_mean
    values = np.zeros(2000)
    values[:600] = 1
    point, low, high = bootstrap_mean(values, np.ones(2000, bool), np.arange(2000), n_boot=4000, seed=1)
    assert point == pytest.approx(0.3)
    assert (high - low) / 2 == pytest.approx(0.0201, rel=0.07)


def test_alternative_readings_on_a_hand_worked_example():
    """Three images: {A}, {A, B}, {B, C}; predictions A, B, C. Worked out by hand:
    headline (first positive in class order): A, A, B -> 1/3; random positive: 1 + 1/2 + 1/2 = 2/3;
    one sample per positive: 3 hits of 5 pairs; any: 3/3; single-positive images: 1/1."""
    from radacx_cache.metrics import best_constant, reading_values
    positives = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]])
    got = reading_values(np.array([0, 1, 2]), positives)
    assert got == pytest.approx({"argmax": 1 / 3, "random_positive": 2 / 3, "per_positive": 3 / 5, "any": 1.0,
                                 "single": 1.0})
    reverse = reading_values(np.array([0, 1, 2]), positives, order=[2, 1, 0])  # targets A, B, C
    assert reverse["argmax"] == pytest.approx(1.0)
    const = best_constant(positives)
    assert const["any"] == (pytest.approx(2 / 3), 0) and const["argmax"] == (pytest.approx(2 / 3), 0)


def test_the_weighted_auroc_of_a_bootstrap_replicate_is_scikit_learns_on_the_repeated_images():
    """``weighted_auroc`` scores every replicate from one sort: each must equal ``roc_auc_score`` on the
    images repeated by their draw counts (ties at rounded scores included), and unit weights the plain AUROC."""
    from sklearn.metrics import roc_auc_score

    from radacx_cache.metrics import weighted_auroc
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(100):
        n = int(rng.integers(5, 60))
        scores, y = np.round(rng.random(n), 1), rng.random(n) < 0.4
        if y.all() or not y.any():
            continue
        draws = rng.integers(0, 4, (3, n))
        got = weighted_auroc(scores, y, np.vstack([np.ones(n), draws]))
        assert got[0] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
        for b in range(3):
            rep = np.repeat(np.arange(n), draws[b])
            if y[rep].all() or not y[rep].any():
                assert not np.isfinite(got[b + 1])
                continue
            assert got[b + 1] == pytest.approx(roc_auc_score(y[rep], scores[rep]), abs=1e-12)
            checked += 1
    assert checked > 200


def test_per_class_auroc_cis_cover_the_point_and_separate_a_good_score_from_chance():
    from radacx_cache.metrics import per_class_auroc, per_class_auroc_ci
    rng = np.random.default_rng(1)
    n = 300
    positives = np.zeros((n, 2))
    positives[np.arange(n), rng.integers(0, 2, n)] = 1
    proba = np.column_stack([positives[:, 0] + rng.normal(0, 0.7, n), rng.random(n)])  # class 0 informative
    patients = np.arange(n) // 2
    point = per_class_auroc(proba, positives)
    ci = per_class_auroc_ci(proba, positives, None, "ignore", patients, n_boot=400, seed=0)
    for k in range(2):
        assert ci[k][0] <= point[k] <= ci[k][1]
    assert ci[0][0] > 0.6 and ci[1][0] < 0.5 < ci[1][1]
