"""The linear probe as a scikit-learn estimator, and the exact C search (docs/probe.md).

``LinearProbe`` has scikit-learn's objective ``mean(CE) + ||W||^2 / (2 C n)`` (intercept not
penalised) and its stopping rule (largest gradient component <= ``tol``); the solver is
``logistic_solver`` (preconditioned L-BFGS in float32 torch passes, the intercept solved exactly).

``sweep_c`` is the exact CLIP protocol: C chosen by the validation accuracy of fits on the *full*
training split, on a log grid walked from strong to weak regularisation (the walk stops once
accuracy has been below the best for ``patience`` grid points in a row), then refined by halving the
step around the best point. Each fit starts at the nearest solved C's solution, whose pass is reused
(only the penalty changed: ``Evaluation``), and tries the regularisation path's predicted solution
as its first step. ``fit_final`` refits on train + val.
"""
from __future__ import annotations

import math
import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .._lazy import LazyModule
from ..metrics import accuracy_argmax
from .logistic_solver import Evaluation, Problem, lbfgs

torch = LazyModule("torch")  # imported on first use: `import` of the estimator stays light


def soft_targets(y, n_classes: int | None = None) -> np.ndarray:
    """(N,) class indices or (N, K) multi-hot -> (N, K) rows summing to one."""
    y = np.asarray(y)
    if y.ndim == 1:
        k = n_classes or int(y.max()) + 1
        out = np.zeros((len(y), k), np.float32)
        out[np.arange(len(y)), y.astype(int)] = 1
        return out
    y = y.astype(np.float32)
    if not np.isfinite(y).all() or (y < 0).any():  # e.g. a raw label matrix with -1 for uncertain
        raise ValueError("a 2-D y is per-row class weights (multi-hot, or a distribution over the classes): its "
                         "entries must be finite and >= 0 (map uncertain -1 labels first)")
    s = y.sum(1, keepdims=True)
    if (s <= 0).any():
        raise ValueError(f"{int((s <= 0).sum())} target rows have no positive class")
    return y / s


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial L2 logistic regression on features (sklearn-style estimator).

    Parameters
    ----------
    C : float
        Inverse regularisation strength, as in scikit-learn: loss = C * sum(CE) + ||W||^2 / 2.
    preprocess : {"standardize", "l2", "none"}
        Feature scaling learnt on the training data.
    max_iter, tol : L-BFGS limits (tol: largest gradient component, scikit-learn's rule).
    warm_start : bool
        Start from the previous ``coef_`` when refitting (the regularisation path).
    random_state : None, int or RandomState
        Seeds the one random choice: the rows the preconditioner's covariance is estimated on (it
        changes the number of passes, not the optimum). ``fit`` takes ``sample_weight``.

    ``y`` is class labels (scikit-learn's contract: ``check_estimator`` passes) or an (N, K >= 2)
    matrix of per-row class weights (the probe stage's targets): each row is normalised to sum 1 and
    used as a soft target, so a multi-hot row of m positives puts 1/m on each. This is one softmax over
    K classes, not K one-vs-rest problems (multi-label); entries must be finite and >= 0.
    ``preprocess="standardize"`` (the default) standardises the features with the training mean and SD
    inside the estimator: compare it with a plain ``LogisticRegression`` on raw features only with
    ``preprocess="none"`` (or that model behind a ``StandardScaler``).

    Attributes
    ----------
    coef_, intercept_ : the weights (K, d) and intercept (K,) on the preprocessed features.
    n_iter_, n_passes_ : L-BFGS iterations and passes over the data of the last fit.
    evaluation_ : the last fit's ``logistic_solver.Evaluation`` (its pass, reusable at another C).
    """

    def __init__(self, C: float = 1.0, *, preprocess: str = "standardize", max_iter: int = 500,
                 tol: float = 1e-4, warm_start: bool = False, random_state=None):
        self.C = C
        self.preprocess = preprocess
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start
        self.random_state = random_state

    def _transform(self, X) -> torch.Tensor:
        X = torch.as_tensor(np.asarray(X, np.float32))
        if self.preprocess == "standardize":
            X = torch.sub(X, self.mean_).mul_(1 / self.scale_)  # one new array, never the caller's
        elif self.preprocess == "l2":
            X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
        elif self.preprocess != "none":
            raise ValueError(f"preprocess={self.preprocess!r}: expected standardize, l2 or none")
        return X

    def _targets(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        """(X as float32, soft targets). ``y``: class labels (N,) as scikit-learn's classifiers take
        them, or an (N, K) multi-hot / soft-target matrix (K >= 2 columns: the probe stage's targets)."""
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")
        y = None if y is None else np.asarray(y)
        multi = y is not None and y.ndim == 2 and y.shape[1] > 1
        X, y = validate_data(self, X, y, dtype=np.float32, multi_output=multi, y_numeric=multi)
        if multi:
            self.classes_ = np.arange(y.shape[1])
            return X, soft_targets(y)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"needs samples of at least 2 classes; got 1 class: {self.classes_}")
        return X, soft_targets(np.searchsorted(self.classes_, y), len(self.classes_))

    def fit(self, X, y, sample_weight=None):
        """Fit on features ``X`` (N, d) and labels ``y`` (N,) or soft targets (N, K); ``sample_weight``
        (N,) non-negative: the loss is their weighted mean (scaled to mean 1, so C means the same)."""
        X, Q = self._targets(X, y)
        weights = None
        if sample_weight is not None:
            sw = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)  # refuses all 0
            weights = torch.as_tensor(sw * len(sw) / sw.sum(), dtype=torch.float32)
        warm = self.warm_start and hasattr(self, "coef_") and self.coef_.shape == (Q.shape[1], X.shape[1])
        rows = self._transform(X) if warm and hasattr(self, "mean_") else self._learn_scaling(X)
        # the only randomness: which rows the preconditioner's covariance is estimated on (speed, not the optimum)
        seed = 0 if self.random_state is None else int(check_random_state(self.random_state).randint(2 ** 31 - 1))
        return self._fit_problem(Problem([(rows, torch.as_tensor(Q))], seed=seed, weights=weights))

    def _learn_scaling(self, X: np.ndarray) -> torch.Tensor:
        """Learn the standardisation on the training rows (kept whatever ``preprocess`` says) and
        return them preprocessed. Centred once: the centred copy gives the scale and, scaled in
        place, the standardised rows (a third of the memory traffic of mean, std and transform)."""
        self.mean_ = torch.as_tensor(X.mean(0))
        if self.preprocess != "standardize":
            self.scale_ = torch.as_tensor(X.std(0)).clamp_min(1e-6)
            return self._transform(X)
        centred = torch.sub(torch.as_tensor(X), self.mean_)
        variance = np.einsum("ij,ij->j", centred.numpy(), centred.numpy()) / len(X)
        self.scale_ = torch.as_tensor(np.sqrt(variance)).clamp_min(1e-6)
        return centred.mul_(1 / self.scale_)

    def _fit_problem(self, problem: Problem, start: Evaluation | None = None, guess=None):
        """Fit on rows already preprocessed (``problem``): what ``fit`` and the C search call.
        ``start``: an evaluation on ``problem`` to start from (else the warm or cold weights);
        ``guess``: predicted weights for the first step. Keeps the final evaluation."""
        k, d = problem.n_classes, problem.n_features
        if not hasattr(self, "classes_") or len(self.classes_) != k:
            self.classes_ = np.arange(k)
        self.n_features_in_ = d
        warm = self.warm_start and hasattr(self, "coef_") and self.coef_.shape == (k, d)
        passes = problem.passes
        with torch.no_grad():
            if start is None:
                W = torch.as_tensor(self.coef_.copy()) if warm else torch.zeros(k, d)
                start = problem.evaluate(W, torch.as_tensor(self.intercept_.copy()) if warm
                                         else problem.intercept_start(), self.tol / 10)
            self.evaluation_, self.n_iter_ = lbfgs(problem, start, 1.0 / (self.C * problem.n),
                                                   max_iter=self.max_iter, tol=self.tol, guess=guess)
        self.n_passes_ = problem.passes - passes  # over the data, by this fit
        self.coef_ = self.evaluation_.W.contiguous().numpy().copy()
        self.intercept_ = self.evaluation_.b.numpy().copy()
        return self

    def _scores(self, X) -> np.ndarray:
        """(N, K) logits, after scikit-learn's checks (fitted, finite, dense 2-D, same width)."""
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        with torch.no_grad():
            return torch.nn.functional.linear(self._transform(X), torch.as_tensor(self.coef_),
                                              torch.as_tensor(self.intercept_)).numpy()

    def decision_function(self, X) -> np.ndarray:
        """(N, K) logits; for two classes (N,), the score of ``classes_[1]`` (scikit-learn's convention,
        so that scorers such as ``roc_auc`` work)."""
        z = self._scores(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X) -> np.ndarray:
        z = self._scores(X)
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        best = self._scores(X).argmax(1)  # first: it raises NotFittedError before fit
        return self.classes_[best]


def sweep_c(X_train, Y_train, X_val, Y_val, *, c_min_log10=-6.0, c_max_log10=6.0, grid_points=7,
            refine_steps=4, patience=2, preprocess="standardize", max_iter=500, tol=1e-4, max_rows=0, seed=0,
            score=accuracy_argmax) -> dict:
    """Choose C by validation ``score`` of fits on the full training split (the CLIP protocol).

    The log grid is walked from strong to weak regularisation, each fit started at the nearest
    solved C's solution (its pass reused) with the path's prediction as the first step; the walk
    stops once the score has been below the best for ``patience`` points in a row (2: the first step
    off the constant predictor can dip before accuracy rises, as on the phantom). Then
    ``refine_steps`` halvings of the step around the best point. Ties go to the stronger penalty.
    ``max_rows`` > 0 is an explicit, inexact shortcut: fit a seeded subsample of that many rows
    with C scaled by ``n / max_rows``. Returns ``best_c``, ``val_score`` (of the selected fit),
    ``path``, ``fits``, ``passes``, ``seconds`` and ``probe``, the selected fit.
    """
    t0 = time.perf_counter()
    n_full = len(X_train)
    if max_rows and n_full > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(n_full, max_rows, replace=False))
        X_train, Y_train = X_train[keep], Y_train[keep]
    c_scale = n_full / len(X_train)
    template = LinearProbe(1.0, preprocess=preprocess, max_iter=max_iter, tol=tol)
    Xtr, Q = template._targets(X_train, Y_train)
    problem = Problem([(template._learn_scaling(Xtr), torch.as_tensor(Q))], seed=seed)
    Zva = template._transform(np.asarray(X_val, np.float32))  # standardised once for every fit
    fitted: dict[float, LinearProbe] = {}
    scores: dict[float, float] = {}
    lam = lambda lc: 1.0 / (10 ** lc * c_scale * problem.n)  # noqa: E731 (the penalty at log10 C)

    def evaluate(log_c):
        log_c = round(float(log_c), 6)
        if log_c not in scores:
            probe = LinearProbe(10 ** log_c * c_scale, preprocess=preprocess, max_iter=max_iter, tol=tol,
                                warm_start=True)
            probe.mean_, probe.scale_ = template.mean_, template.scale_
            if fitted:  # start from the nearest solution (no pass), try the path's prediction first
                near = min(fitted, key=lambda c: (abs(c - log_c), -c))  # ties: the weaker penalty's
                guess = _path_guess({c: p.evaluation_ for c, p in fitted.items()}, log_c, problem, lam)
                fitted[log_c] = probe._fit_problem(problem, fitted[near].evaluation_, guess)
            else:
                fitted[log_c] = probe._fit_problem(problem)
            logits = torch.nn.functional.linear(Zva, torch.as_tensor(probe.coef_), torch.as_tensor(probe.intercept_))
            scores[log_c] = score(torch.softmax(logits, 1).numpy(), Y_val)
        return scores[log_c]

    best_of = lambda: max(scores, key=lambda c: (scores[c], -c))  # noqa: E731 (ties: stronger penalty)
    grid = np.linspace(c_min_log10, c_max_log10, grid_points)
    worse = 0
    for log_c in grid:
        best_so_far = scores[best_of()] if scores else -math.inf
        worse = worse + 1 if evaluate(log_c) < best_so_far else 0
        if worse >= patience:
            break
    best = best_of()
    step = (grid[1] - grid[0]) / 2 if len(grid) > 1 else 1.0
    for _ in range(refine_steps):
        for cand in (best - step, best + step):
            if c_min_log10 <= cand <= c_max_log10:  # refine inside the grid, never past its ends
                evaluate(cand)
        best = best_of()
        step /= 2
    return {"best_log10_c": best, "best_c": 10 ** best, "val_score": scores[best],
            "path": {f"{k:.4f}": v for k, v in sorted(scores.items())}, "fits": len(fitted),
            "passes": problem.passes, "sweep_rows": len(Xtr), "seconds": time.perf_counter() - t0,
            "probe": fitted[best], "_train": problem, "_val": Zva}


def _path_guess(solved: dict[float, Evaluation], log_c: float, problem: Problem, lam) -> torch.Tensor:
    """Predicted weights at ``log_c``: each neighbouring solved C's solution carried along
    the regularisation path by the quadratic model (``Problem.predict_weights``); between two solved
    C, the two predictions blended linearly in log C, else the nearest one's."""
    below = [c for c in solved if c < log_c]
    above = [c for c in solved if c > log_c]
    ends = ([max(below)] if below else []) + ([min(above)] if above else [])
    if len(ends) == 1:
        e = solved[ends[0]]
        return problem.predict_weights(e.W, lam(ends[0]), lam(log_c), e.curvature)
    (lo, e_lo), (hi, e_hi) = [(c, solved[c]) for c in ends]
    t = (log_c - lo) / (hi - lo)
    return ((1 - t) * problem.predict_weights(e_lo.W, lam(lo), lam(log_c), e_lo.curvature)
            + t * problem.predict_weights(e_hi.W, lam(hi), lam(log_c), e_hi.curvature))


def fit_final(result: dict, X_train, Y_train, X_val, Y_val) -> LinearProbe:
    """The selected probe refit on train + val, warm, with the same per-sample penalty
    (C scaled by n_train / (n_train + n_val), so the larger sample does not weaken it)."""
    n_tr, n_all = len(X_train), len(X_train) + len(X_val)
    final = result["probe"]
    final.set_params(C=result["best_c"] * n_tr / n_all, warm_start=True)
    train = result["_train"]
    Q_val = torch.as_tensor(soft_targets(np.asarray(Y_val)))
    if train.n != n_tr:  # the search ran on a subsample: preprocess the training rows afresh
        blocks = [(final._transform(X_train), torch.as_tensor(soft_targets(np.asarray(Y_train))))]
    else:  # the search's preprocessed rows, reused: train + val with train's scaling, as a refit does
        blocks = list(train.blocks)
    problem = Problem(blocks + [(result["_val"], Q_val)], eig=train.eig)
    return final._fit_problem(problem)

