"""Multinomial L2 logistic regression on cached features, exact and fast (docs/probe.md).

``LinearProbe`` is a scikit-learn estimator with scikit-learn's objective
``mean(CE) + ||W||^2 / (2 C n)`` (intercept not penalised) and its stopping rule (largest gradient
component <= ``tol``), solved full-batch in float32 torch passes with a preconditioned L-BFGS:
the weights are reparametrised as ``W = V P`` with ``P = U diag(1 / sqrt(c s + lambda)) U^T`` from
the eigendecomposition ``U diag(s) U^T`` of the standardised features' covariance, so the
problem L-BFGS sees has a Hessian close to the identity at every C (c = 1/K, the softmax curvature
at the start). The optimum is the same; only the number of passes over the data changes.

``sweep_c`` is the exact CLIP protocol: C chosen by the validation accuracy of fits on the *full*
training split, on a log grid walked from strong to weak regularisation (each fit warm-started
from the last; the walk stops once accuracy has been below the best for ``patience`` grid points in a row), then
refined by halving the step around the best point.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from .metrics import accuracy_argmax

_CHUNK = 4096  # rows per fused loss/gradient block: stays in cache between the two products
_PRECONDITION_RANGE = 1e-6  # smallest / largest curvature the preconditioner scales by (float32-safe)
_EIG_ROWS = 16384  # rows of the covariance estimate behind the preconditioner (it need not be exact)


def soft_targets(y, n_classes: int | None = None) -> np.ndarray:
    """(N,) class indices or (N, K) multi-hot -> (N, K) rows summing to one."""
    y = np.asarray(y)
    if y.ndim == 1:
        k = n_classes or int(y.max()) + 1
        out = np.zeros((len(y), k), np.float32)
        out[np.arange(len(y)), y.astype(int)] = 1
        return out
    y = y.astype(np.float32)
    s = y.sum(1, keepdims=True)
    if (s <= 0).any():
        raise ValueError(f"{int((s <= 0).sum())} target rows have no positive class")
    return y / s


class Problem:
    """Preprocessed features and soft targets as torch tensors, for many fits at different C."""

    def __init__(self, X: torch.Tensor, Q: torch.Tensor, eig: tuple | None = None, seed: int = 0):
        self.X, self.Q, self.n = X, Q, len(X)
        if eig is None:
            rows = X if self.n <= _EIG_ROWS else X[np.sort(np.random.default_rng(seed).choice(
                self.n, _EIG_ROWS, replace=False))]
            cov = (rows.T @ rows).double() / len(rows)
            s, U = torch.linalg.eigh(cov)
            eig = (s.clamp_min(0).float(), U.float())
        self.eig = eig
        self.passes = 0

    def loss_grad(self, W: torch.Tensor, b: torch.Tensor, lam: float):
        """Objective and gradients in one fused pass over row chunks."""
        loss = torch.zeros((), dtype=torch.float64)
        gW, gb = torch.zeros_like(W), torch.zeros_like(b)
        for s in range(0, self.n, _CHUNK):
            xc, qc = self.X[s:s + _CHUNK], self.Q[s:s + _CHUNK]
            logp = torch.log_softmax(torch.nn.functional.linear(xc, W, b), 1)
            loss -= (qc * logp).sum().double()
            g = logp.exp_().sub_(qc)
            gW.addmm_(g.T.contiguous(), xc)  # a contiguous (K, rows) left factor: ~1.5x faster
            gb += g.sum(0)
        self.passes += 1
        gW.div_(self.n).add_(W, alpha=lam)
        return float(loss) / self.n + 0.5 * lam * float((W * W).sum()), gW, gb.div_(self.n)

    @property
    def curvature(self) -> float:
        """The softmax loss's curvature per class at W = 0 (uniform probabilities)."""
        return 1.0 / max(2, self.Q.shape[1])

    def preconditioner(self, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, P^-1) for the penalty ``lam``: P ~ H^-1/2 of the objective at W = 0."""
        s, U = self.eig
        curvature = self.curvature * s + lam
        # collinear features (zero eigenvalues) under a vanishing penalty would make P ~ lam^-1/2:
        # float32 then overflows; any positive definite P gives the same optimum, so bound its range
        d = 1.0 / torch.sqrt(curvature.clamp_min(_PRECONDITION_RANGE * float(curvature.max())))
        return (U * d) @ U.T, (U / d) @ U.T


def lbfgs(problem: Problem, W: torch.Tensor, b: torch.Tensor, lam: float, *, max_iter: int, tol: float,
          history: int = 10) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise the penalised loss from (W, b); stops when every gradient component <= ``tol``.

    L-BFGS (two-loop recursion, Armijo backtracking) in the preconditioned variables (V, b): the
    unit step is nearly always accepted, so an iteration costs one pass over the data.
    """
    P, P_inv = problem.preconditioner(lam)
    pb = problem.curvature ** -0.5  # the intercept, unpenalised: scaled by its curvature alone
    k, d = W.shape
    x = torch.cat([(W @ P_inv).reshape(-1), b / pb])

    def f(x):
        Wx = x[:k * d].view(k, d) @ P
        loss, gW, gb = problem.loss_grad(Wx, x[k * d:] * pb, lam)
        converged = max(float(gW.abs().max()), float(gb.abs().max())) <= tol
        return loss, torch.cat([(gW @ P).reshape(-1), gb * pb]), converged

    fx, g, converged = f(x)
    hist: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    it = 0
    while not converged and it < max_iter:
        it += 1
        q, alphas = g.clone(), []
        for s, y, rho in reversed(hist):
            a = rho * float(s @ q)
            q.sub_(y, alpha=a)
            alphas.append(a)
        if hist:
            s, y, _ = hist[-1]
            q.mul_(float(s @ y) / float(y @ y))
        for (s, y, rho), a in zip(hist, reversed(alphas)):
            q.add_(s, alpha=a - rho * float(y @ q))
        direction, slope = -q, -float(g @ q)
        if slope >= 0:  # not a descent direction: restart from the (preconditioned) gradient
            hist, direction, slope = [], -g, -float(g @ g)
        step = 1.0
        while True:
            x_new = x + step * direction
            f_new, g_new, converged = f(x_new)
            if (math.isfinite(f_new) and f_new <= fx + 1e-4 * step * slope) or step < 1e-8:
                break
            step *= 0.5
        s, y = x_new - x, g_new - g
        sy = float(s @ y)
        if sy > 1e-12:
            hist = (hist + [(s, y, 1.0 / sy)])[-history:]
        if not f_new <= fx:  # no decrease even at a tiny step (the float32 floor), or not finite
            break
        x, fx, g = x_new, f_new, g_new
    return (x[:k * d].view(k, d) @ P).contiguous(), x[k * d:] * pb, it


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
            X = (X - self.mean_) / self.scale_
        elif self.preprocess == "l2":
            X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
        elif self.preprocess != "none":
            raise ValueError(f"preprocess={self.preprocess!r}: expected standardize, l2 or none")
        return X

    def _targets(self, X: np.ndarray, y) -> np.ndarray:
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("X holds NaN or inf values (a bad feature cache?)")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")
        y = np.asarray(y)
        if y.ndim == 1:
            self.classes_ = np.unique(y)
            if len(self.classes_) < 2:
                raise ValueError(f"needs samples of at least 2 classes; got only {self.classes_}")
            Q = soft_targets(np.searchsorted(self.classes_, y), len(self.classes_))
        else:
            self.classes_ = np.arange(y.shape[1])
            Q = soft_targets(y)
        if len(Q) != len(X):
            raise ValueError(f"X has {len(X)} rows but y has {len(Q)}")
        return Q

    def fit(self, X, y):
        X = np.asarray(X, np.float32)
        Q = self._targets(X, y)
        warm = self.warm_start and hasattr(self, "coef_") and self.coef_.shape == (Q.shape[1], X.shape[1])
        if not warm or not hasattr(self, "mean_"):
            self._learn_scaling(X)
        return self._fit_problem(Problem(self._transform(X), torch.as_tensor(Q), seed=0))

    def _learn_scaling(self, X: np.ndarray) -> None:
        """The standardisation learnt on the training rows (used whatever ``preprocess`` says)."""
        self.mean_ = torch.as_tensor(X.mean(0))
        self.scale_ = torch.as_tensor(X.std(0)).clamp_min(1e-6)

    def _fit_problem(self, problem: Problem):
        """Fit on rows already preprocessed (``problem``): what ``fit`` and the C search call."""
        k, d = problem.Q.shape[1], problem.X.shape[1]
        if not hasattr(self, "classes_") or len(self.classes_) != k:
            self.classes_ = np.arange(k)
        self.n_features_in_ = d
        warm = self.warm_start and hasattr(self, "coef_") and self.coef_.shape == (k, d)
        W = torch.as_tensor(self.coef_.copy()) if warm else torch.zeros(k, d)
        b = torch.as_tensor(self.intercept_.copy()) if warm else torch.zeros(k)
        with torch.no_grad():
            W, b, self.n_iter_ = lbfgs(problem, W, b, 1.0 / (self.C * problem.n), max_iter=self.max_iter,
                                       tol=self.tol)
        self.coef_, self.intercept_ = W.numpy().copy(), b.numpy().copy()
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = np.asarray(X, np.float32)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features; the probe was fitted on {self.n_features_in_}")
        with torch.no_grad():
            return torch.nn.functional.linear(self._transform(X), torch.as_tensor(self.coef_),
                                              torch.as_tensor(self.intercept_)).numpy()

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X)
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(1)]


def sweep_c(X_train, Y_train, X_val, Y_val, *, c_min_log10=-6.0, c_max_log10=6.0, grid_points=7,
            refine_steps=4, patience=2, preprocess="standardize", max_iter=500, tol=1e-4, max_rows=0, seed=0,
            score=accuracy_argmax) -> dict:
    """Choose C by validation ``score`` of fits on the full training split (the CLIP protocol).

    The log grid is walked from strong to weak regularisation, each fit warm-started from the last;
    the walk stops once the score has been below the best for ``patience`` points in a row (2: the
    first step off the constant predictor can dip before accuracy rises, as on the phantom). Then
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
    Xtr = np.asarray(X_train, np.float32)
    Q = template._targets(Xtr, Y_train)
    template._learn_scaling(Xtr)
    problem = Problem(template._transform(Xtr), torch.as_tensor(Q), seed=seed)
    Zva = template._transform(np.asarray(X_val, np.float32))  # standardised once for every fit
    fitted: dict[float, LinearProbe] = {}
    scores: dict[float, float] = {}

    def evaluate(log_c):
        log_c = round(float(log_c), 6)
        if log_c not in scores:
            probe = LinearProbe(10 ** log_c * c_scale, preprocess=preprocess, max_iter=max_iter, tol=tol,
                                warm_start=True)
            probe.mean_, probe.scale_ = template.mean_, template.scale_
            if fitted:
                probe.coef_, probe.intercept_ = _path_guess(fitted, log_c)
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


def _path_guess(fitted: dict, log_c: float) -> tuple[np.ndarray, np.ndarray]:
    """A starting point for the fit at ``log_c``: the solutions at the two nearest solved C
    interpolated (or extrapolated) linearly in log C; the regularisation path is smooth there."""
    near = sorted(fitted, key=lambda c: abs(c - log_c))[:2]
    a = fitted[near[0]]
    if len(near) < 2 or abs(near[1] - near[0]) < 1e-9:
        return a.coef_.copy(), a.intercept_.copy()
    b = fitted[near[1]]
    t = (log_c - near[0]) / (near[1] - near[0])
    t = min(t, 1.0) if t > 0 else max(t, -0.5)  # extrapolate at most half a step
    return (1 - t) * a.coef_ + t * b.coef_, (1 - t) * a.intercept_ + t * b.intercept_


def fit_final(result: dict, X_train, Y_train, X_val, Y_val) -> LinearProbe:
    """The selected probe refit on train + val, warm, with the same per-sample penalty
    (C scaled by n_train / (n_train + n_val), so the larger sample does not weaken it)."""
    n_tr, n_all = len(X_train), len(X_train) + len(X_val)
    final = result["probe"]
    final.set_params(C=result["best_c"] * n_tr / n_all, warm_start=True)
    train = result["_train"]
    if train.n != n_tr:  # the search ran on a subsample: preprocess train + val afresh
        rows = final._transform(np.vstack([X_train, X_val]))
        targets = torch.as_tensor(soft_targets(np.vstack([Y_train, Y_val])))
        return final._fit_problem(Problem(rows, targets, eig=train.eig))
    # the search's preprocessed rows, reused: train + val with train's scaling, as a refit does
    Q_val = torch.as_tensor(soft_targets(np.asarray(Y_val)))
    return final._fit_problem(Problem(torch.cat([train.X, result["_val"]]), torch.cat([train.Q, Q_val]),
                                      eig=train.eig))

