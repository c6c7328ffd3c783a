import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

from radacx_cache.estimators.linear_probe import LinearProbe, fit_final, soft_targets, sweep_c
from radacx_cache.metrics import accuracy as policy_accuracy


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
    assert policy_accuracy(proba, y, "any") == 0.5  # the second class counts for the first image
    assert policy_accuracy(proba, y) == 0.0  # headline: the first positive (class 0) was the target


def test_sweep_walks_strong_to_weak_and_stops_once_accuracy_falls():
    X, y = blobs(n=900, d=40, sep=0.35, seed=1)
    Y = np.eye(4, dtype=np.float32)[y]
    result = sweep_c(X[:600], Y[:600], X[600:], Y[600:], refine_steps=3)
    path = {float(k): v for k, v in result["path"].items()}
    assert result["fits"] == len(path)  # each C fitted once
    coarse = [c for c in np.linspace(-6, 6, 7) if c in path]
    assert coarse == list(np.linspace(-6, 6, 7))[:len(coarse)]  # walked in order from the strong end
    if len(coarse) < 7:  # it stopped: the last coarse point was below the best
        assert path[coarse[-1]] < result["val_score"]
    assert result["val_score"] == max(path.values()) and result["val_score"] >= path[-6.0]
    assert result["val_score"] > 0.5  # 4 classes: chance is 0.25


def c_sensitive(n=3000, seed=0):
    from sklearn.datasets import make_classification
    X, y = make_classification(n_samples=n, n_features=60, n_informative=4, n_redundant=4, n_classes=4,
                               n_clusters_per_class=1, class_sep=0.45, flip_y=0.1,
                               weights=[0.4, 0.3, 0.2, 0.1], random_state=seed)
    return X.astype(np.float32), np.eye(4, dtype=np.float32)[y]


def test_selected_c_matches_scikit_learns_exact_protocol_on_c_sensitive_data():
    from sklearn.preprocessing import StandardScaler
    X, Y = c_sensitive(seed=1)
    tr, va = slice(0, 2000), slice(2000, 2600)
    result = sweep_c(X[tr], Y[tr], X[va], Y[va], tol=1e-6)  # both solvers converged tightly
    path = {float(k): v for k, v in result["path"].items()}
    assert len(set(path.values())) > 3  # accuracy really depends on C here
    sc = StandardScaler().fit(X[tr])
    ref = {}
    for log_c in path:  # cold scikit-learn fits on the same grid, scored the same way
        m = LogisticRegression(C=10 ** log_c, max_iter=5000, tol=1e-6).fit(sc.transform(X[tr]), Y[tr].argmax(1))
        ref[log_c] = policy_accuracy(m.predict_proba(sc.transform(X[va])), Y[va])
    best = max(ref, key=lambda c: (ref[c], -c))
    assert result["best_log10_c"] == best, (path, ref)
    assert result["val_score"] == ref[best]
    default = sweep_c(X[tr], Y[tr], X[va], Y[va])  # scikit-learn's tol: a near-tie may flip by one image
    assert ref.get(default["best_log10_c"], 0) >= ref[best] - 1 / 600


def test_final_fit_uses_train_and_val_at_the_chosen_c():
    X, Y = c_sensitive()
    Xtr, Ytr, Xva, Yva = X[:2000], Y[:2000], X[2000:2600], Y[2000:2600]
    result = sweep_c(Xtr, Ytr, Xva, Yva)
    chosen = result["best_c"]
    final = fit_final(result, Xtr, Ytr, Xva, Yva)
    assert final.C == pytest.approx(chosen * 2000 / 2600)  # the same per-sample penalty on more rows
    # equal to a cold fit on the 2,600 rows with train's standardisation, at that C
    cold = LinearProbe(chosen * 2000 / 2600, tol=1e-7, max_iter=2000)
    cold.mean_, cold.scale_ = final.mean_, final.scale_
    cold.warm_start = True
    cold.coef_, cold.intercept_ = np.zeros_like(final.coef_), np.zeros_like(final.intercept_)
    cold.fit(np.vstack([Xtr, Xva]), np.vstack([Ytr, Yva]))
    np.testing.assert_allclose(final.predict_proba(X[2600:]), cold.predict_proba(X[2600:]), atol=2e-3)
    train_only = LinearProbe(chosen, tol=1e-7, max_iter=2000).fit(Xtr, Ytr)
    assert np.abs(final.predict_proba(X[2600:]) - train_only.predict_proba(X[2600:])).max() > 5e-3


def test_collinear_features_under_a_vanishing_penalty_stay_finite_and_fast():
    """make_classification's redundant features are exact linear combinations: the covariance has
    zero eigenvalues, and at C = 1e6 an unbounded preconditioner overflowed float32 and the search
    crawled through NaN line searches (found on a second data seed of the probe benchmark)."""
    from sklearn.datasets import make_classification
    X, y = make_classification(n_samples=3000, n_features=40, n_informative=4, n_redundant=6, n_classes=3,
                               n_clusters_per_class=1, class_sep=0.6, random_state=1)
    X = X.astype(np.float32)
    probe = LinearProbe(C=1e6, max_iter=200).fit(X, y)
    assert np.isfinite(probe.coef_).all() and probe.n_iter_ < 200
    ref = LogisticRegression(C=1e6, max_iter=5000).fit((X - X.mean(0)) / X.std(0), y)
    assert abs((probe.predict(X) == y).mean() - ref.score((X - X.mean(0)) / X.std(0), y)) < 0.01
    Y = np.eye(3, dtype=np.float32)[y]
    result = sweep_c(X[:2000], Y[:2000], X[2000:], Y[2000:], max_iter=200)
    assert all(np.isfinite(p.coef_).all() for p in [result["probe"]]) and result["passes"] < 400


def _standardised_problem(X, Y):
    import torch

    from radacx_cache.estimators.logistic_solver import Problem
    Z = (X - X.mean(0)) / X.std(0)
    return Z, Problem([(torch.as_tensor(Z), torch.as_tensor(soft_targets(Y)))])


def _gradient(Z, Y, W, b, lam):
    """The objective's gradient written out in numpy, independently of the solver."""
    logits = Z @ W.T + b
    P = np.exp(logits - logits.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    G = P - soft_targets(Y)
    return G.T @ Z / len(Z) + lam * W, G.mean(0)


def test_a_fit_started_at_another_cs_solution_costs_no_pass_and_is_exact():
    """The C search starts each fit at a neighbouring C's solution and reuses its pass: only the
    penalty changed. The result must still be the optimum at the new C (a cold fit's)."""
    import torch

    from radacx_cache.estimators.logistic_solver import lbfgs
    X, Y = c_sensitive()
    Z, problem = _standardised_problem(X[:2000], Y[:2000])
    lam = lambda c: 1.0 / (c * 2000)  # noqa: E731
    k, d = Y.shape[1], X.shape[1]
    start = problem.evaluate(torch.zeros(k, d), problem.intercept_start())
    at_weak_penalty, _ = lbfgs(problem, start, lam(10.0), max_iter=500, tol=1e-5)
    evaluated = []
    evaluate = problem.evaluate
    problem.evaluate = lambda W, *args: evaluated.append(W.clone()) or evaluate(W, *args)
    warm, iterations = lbfgs(problem, at_weak_penalty, lam(0.01), max_iter=500, tol=1e-5)
    assert iterations > 0 and len(evaluated) >= iterations
    assert not any(torch.equal(W, at_weak_penalty.W) for W in evaluated)  # the start cost no pass
    gW, gb = _gradient(Z, Y[:2000], warm.W.numpy(), warm.b.numpy(), lam(0.01))
    assert max(np.abs(gW).max(), np.abs(gb).max()) <= 1e-5  # scikit-learn's stopping rule, at the new C
    _, cold_problem = _standardised_problem(X[:2000], Y[:2000])
    cold, _ = lbfgs(cold_problem, cold_problem.evaluate(torch.zeros(k, d), cold_problem.intercept_start()),
                    lam(0.01), max_iter=500, tol=1e-5)
    np.testing.assert_allclose(warm.W.numpy(), cold.W.numpy(), atol=2e-3)
    evaluated.clear()
    again, iterations = lbfgs(problem, warm, lam(0.01), max_iter=500, tol=1e-5)
    assert iterations == 0 and evaluated == [] and again is warm  # a start meeting the rule costs nothing


def test_path_prediction_scales_with_c_where_the_penalty_dominates_and_leaves_null_directions():
    import torch
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 3)).astype(np.float32)
    X = np.hstack([X, X[:, :1] + X[:, 1:2]])  # a collinear column: the covariance has a null direction
    _, problem = _standardised_problem(X, np.eye(3, dtype=np.float32)[rng.integers(0, 3, 500)])
    s, U = problem.eig
    p = torch.tensor([0.5, 0.3, 0.2])
    curvature = torch.diag(p) - torch.outer(p, p)  # softmax ignores the sum over classes: a null direction
    h, V, _ = problem.model_curvature(curvature)
    W = torch.as_tensor(rng.normal(size=(3, 4)).astype(np.float32))
    before, after = V.T @ W @ U, V.T @ problem.predict_weights(W, 1e3, 1e2, curvature) @ U
    seen = h > 1e-6 * float(h.max())
    assert seen.sum() == 6 and (~seen).sum() == 6  # 2 class x 3 feature directions the loss sees
    np.testing.assert_allclose(after[seen], 10 * before[seen], rtol=1e-2)  # C x10, penalty dominant
    np.testing.assert_allclose(after[~seen], before[~seen], rtol=1e-4, atol=1e-6)  # never amplified


def test_fits_stop_at_float32s_floor_instead_of_running_to_max_iter():
    X, y = blobs()
    probe = LinearProbe(C=1.0, tol=1e-12, max_iter=300).fit(X, y)  # below what float32 can reach
    assert probe.n_iter_ < 300
    ref = LogisticRegression(C=1.0, max_iter=2000, tol=1e-8).fit((X - X.mean(0)) / X.std(0), y)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba((X - X.mean(0)) / X.std(0)), atol=1e-3)


def test_a_class_without_training_positives_gets_a_vanishing_probability():
    X, y = blobs()
    Y = np.eye(5, dtype=np.float32)[y]  # four classes present, the fifth never positive
    probe = LinearProbe(C=1.0, max_iter=200).fit(X, Y)
    assert np.isfinite(probe.coef_).all() and probe.n_iter_ < 200
    assert probe.predict_proba(X)[:, 4].max() < 1e-3
    assert (probe.predict(X) == y).mean() > 0.9


def test_the_intercept_is_solved_from_a_far_start():
    """Every evaluation solves the intercept for the weights (Newton on the logits); a start whose
    class probability underflowed once sent the float32 Hessian's sign, and the step, the wrong way."""
    import torch
    X, Y = c_sensitive()
    _, problem = _standardised_problem(X[:2000], Y[:2000])
    far = problem.evaluate(torch.zeros(4, 60), torch.tensor([-30.0, 0.0, 0.0, 0.0]), 1e-6)
    assert np.abs(far.gb.numpy()).max() <= 1e-6
    prior = Y[:2000].mean(0)  # at W = 0 the optimal intercept reproduces the class frequencies
    np.testing.assert_allclose(torch.softmax(far.b, 0).numpy(), prior, atol=1e-5)


def test_linear_probe_passes_scikit_learns_estimator_checks():
    """All of ``check_estimator`` (55 checks in scikit-learn 1.9): fitted-state errors, input
    validation, binary decision_function, label types, pickling, cloning."""
    import warnings

    from sklearn.utils.estimator_checks import check_estimator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(LinearProbe(), on_fail=None, expected_failed_checks=DELIBERATELY_SKIPPED)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert failed == [] and len(results) >= 60


# the one check left out, and why (docs/probe.md)
DELIBERATELY_SKIPPED = {
    "check_sample_weight_equivalence_on_dense_data":
        "the solver works in float32 and stops at scikit-learn's rule (largest gradient component <= tol, "
        "1e-4 by default): weighted and repeated rows agree to that tolerance, not to rtol=1e-7 "
        "(test_sample_weight_matches_scikit_learn checks the weighted optimum itself)"}


def test_sample_weight_matches_scikit_learn():
    """Weights (scaled to mean 1) give scikit-learn's weighted optimum; all-ones weights change nothing."""
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5)).astype(np.float32)
    y = rng.integers(0, 3, 400)
    X[:, 0] += y
    w = rng.uniform(0.1, 3, 400)
    ours = LinearProbe(C=0.5, preprocess="none", tol=1e-7, max_iter=2000).fit(X, y, sample_weight=w)
    ref = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(X, y, sample_weight=w * len(w) / w.sum())
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-4)
    unweighted = LinearProbe(C=0.5, preprocess="none", tol=1e-7).fit(X, y)
    assert not np.allclose(ours.coef_, unweighted.coef_, atol=1e-3)  # the weights do change the fit
    ones = LinearProbe(C=0.5, preprocess="none", tol=1e-7).fit(X, y, sample_weight=np.ones(400))
    np.testing.assert_array_equal(ones.coef_, unweighted.coef_)
    with pytest.raises(ValueError, match="non-zero"):
        LinearProbe().fit(X, y, sample_weight=np.zeros(400))


def test_cross_validation_with_any_scorer_and_a_seed():
    """``cross_val_score(LinearProbe(), X, y, scoring="roc_auc")`` gave [nan nan nan] (a binary
    decision_function of shape (n, 2)); now the scores of a separable problem, reproducibly."""
    from sklearn.model_selection import cross_val_score
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6)).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.normal(size=300) > 0).astype(int)
    scores = cross_val_score(LinearProbe(C=1.0), X, y, scoring="roc_auc", cv=3)
    assert np.isfinite(scores).all() and scores.min() > 0.9
    a = LinearProbe(random_state=3).fit(X, y).coef_
    b = LinearProbe(random_state=3).fit(X, y).coef_
    np.testing.assert_array_equal(a, b)


def test_importing_the_probe_does_not_import_torch():
    """``from radacx_cache.estimators.linear_probe import LinearProbe`` costs no torch import (~5 s);
    torch loads on the first fit."""
    import subprocess
    import sys
    code = ("import sys\nfrom radacx_cache.estimators.linear_probe import LinearProbe\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
