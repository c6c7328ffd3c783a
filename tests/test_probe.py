import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

from radacx_cache.metrics import accuracy as policy_accuracy
from radacx_cache.probe import LinearProbe, soft_targets, sweep_c


def blobs(n=600, d=20, k=4, seed=0, sep=1.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, sep, (k, d))
    y = rng.integers(0, k, n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_matches_scikit_learn_multinomial_logistic_regression():
    X, y = blobs()
    ours = LinearProbe(C=0.5, preprocess="none", max_iter=500, tol=1e-7).fit(X, y)
    ref = LogisticRegression(C=0.5, max_iter=2000, tol=1e-8).fit(X, y)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=2e-3)
    assert (ours.predict(X) == ref.predict(X)).mean() > 0.99


def test_estimator_contract():
    X, y = blobs()
    probe = LinearProbe(C=2.0, preprocess="l2")
    assert clone(probe).get_params() == probe.get_params()
    with pytest.raises(NotFittedError):
        probe.predict_proba(X)
    assert probe.fit(X, y) is probe
    assert probe.coef_.shape == (4, 20) and probe.n_features_in_ == 20
    np.testing.assert_allclose(probe.predict_proba(X).sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        probe.predict(X[:, :5])


@pytest.mark.parametrize("X,y,message", [
    (np.full((4, 2), np.nan), np.array([0, 1, 0, 1]), "NaN"),
    (np.ones((4, 2)), np.array([1, 1, 1, 1]), "at least 2 classes"),
    (np.ones((4, 2)), np.zeros((4, 3)), "no positive class"),
])
def test_bad_inputs(X, y, message):
    with pytest.raises(ValueError, match=message):
        LinearProbe().fit(X, y)


def test_soft_multi_hot_targets_and_policy_accuracy():
    y = np.array([[1, 1, 0], [0, 0, 1]], np.float32)
    np.testing.assert_allclose(soft_targets(y), [[0.5, 0.5, 0], [0, 0, 1]])
    proba = np.array([[0.1, 0.8, 0.1], [0.6, 0.2, 0.2]])
    assert policy_accuracy(proba, y) == 0.5  # the second class counts for the first image


def test_sweep_picks_a_c_that_beats_extremes_and_is_warm_started():
    X, y = blobs(n=900, d=40, sep=0.35, seed=1)
    Y = np.eye(4, dtype=np.float32)[y]
    result = sweep_c(X[:600], Y[:600], X[600:], Y[600:], refine_steps=3)
    path = {float(k): v for k, v in result["path"].items()}
    assert result["fits"] == len(path) >= 9  # 7 grid points + refinements, each C fitted once
    assert result["val_score"] >= max(path[-6.0], path[6.0])
    assert result["val_score"] > 0.5  # 4 classes: chance is 0.25
