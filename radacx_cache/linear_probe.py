"""Multinomial L2 logistic regression on cached features, exact and fast (docs/probe.md).

``LinearProbe`` is a scikit-learn estimator with scikit-learn's objective
``mean(CE) + ||W||^2 / (2 C n)`` (intercept not penalised) and its stopping rule (largest gradient
component <= ``tol``), solved full-batch in float32 torch passes with a preconditioned L-BFGS
(``_Coordinates``): the weights are rotated into the eigenbasis ``U`` of the standardised features'
covariance (eigenvalues ``s``) and scaled by the curvature there, ``c_k s + lambda`` with ``c_k`` the
softmax curvature of class k at the start, so the Hessian L-BFGS sees is close to the identity at
every C. The optimum is the same; only the number of passes over the data changes.

``sweep_c`` is the exact CLIP protocol: C chosen by the validation accuracy of fits on the *full*
training split, on a log grid walked from strong to weak regularisation (the walk stops once
accuracy has been below the best for ``patience`` grid points in a row), then refined by halving the
step around the best point. Each fit starts at the nearest solved C's solution, whose pass is reused
(only the penalty changed: ``Evaluation``), with that fit's L-BFGS curvature pairs, and tries the
regularisation path's predicted solution as its first step.
"""
from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from .metrics import accuracy_argmax

log = logging.getLogger(__name__)

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


class Evaluation(NamedTuple):
    """The data part of the objective at (W, b), as one pass computes it: reusable at any penalty."""
    W: torch.Tensor
    b: torch.Tensor
    loss: float  # mean cross-entropy
    gW: torch.Tensor  # its gradients
    gb: torch.Tensor
    curvature: torch.Tensor  # the softmax curvature per class, mean p (1 - p)

    def objective(self, lam: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Loss and gradients with the penalty ``lam ||W||^2 / 2`` added."""
        return self.loss + 0.5 * lam * float((self.W * self.W).sum()), self.gW + lam * self.W, self.gb


class Problem:
    """Preprocessed row blocks (features, soft targets) as torch tensors, for many fits at different C.

    ``blocks`` is a list of (X, Q) pairs read in turn (train, or train then val: no concatenated
    copy). The eigendecomposition ``U diag(s) U^T`` of the features' covariance drives the
    preconditioner; the last fit's curvature pairs (``memory``) start the next fit's L-BFGS.
    """

    def __init__(self, blocks: list[tuple[torch.Tensor, torch.Tensor]], eig: tuple | None = None, seed: int = 0):
        self.blocks = blocks
        self.n = sum(len(X) for X, _ in blocks)
        self.n_classes, self.n_features = blocks[0][1].shape[1], blocks[0][0].shape[1]
        if eig is None:
            X = blocks[0][0]
            rows = X if len(X) <= _EIG_ROWS else X[np.sort(np.random.default_rng(seed).choice(
                len(X), _EIG_ROWS, replace=False))]
            cov = (rows.T @ rows).double() / len(rows)
            s, U = torch.linalg.eigh(cov)
            eig = (s.clamp_min(0).float(), U.float())
        self.eig = eig
        self.memory: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.passes = 0

    def evaluate(self, W: torch.Tensor, b: torch.Tensor) -> Evaluation:
        """Cross-entropy, its gradients and the per-class curvature in one fused pass over row chunks."""
        loss = torch.zeros((), dtype=torch.float64)
        gW, gb, curvature = torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b)
        for X, Q in self.blocks:
            for s in range(0, len(X), _CHUNK):
                xc, qc = X[s:s + _CHUNK], Q[s:s + _CHUNK]
                logp = torch.log_softmax(torch.nn.functional.linear(xc, W, b), 1)
                loss -= torch.sum(qc * logp, dtype=torch.float64)  # a float32 sum's rounding (~1e-7)
                # would be as large as the last iterations' decrease and stall the line search
                p = logp.exp_()
                curvature += (p - p * p).sum(0)
                g = p.sub_(qc)
                gW.addmm_(g.T.contiguous(), xc)  # a contiguous (K, rows) left factor: ~1.5x faster
                gb += g.sum(0)
        self.passes += 1
        return Evaluation(W, b, float(loss) / self.n, gW.div_(self.n), gb.div_(self.n), curvature.div_(self.n))

    def intercept_start(self) -> torch.Tensor:
        """The intercept's optimum at W = 0: the log class frequencies (centred)."""
        prior = sum(Q.double().sum(0) for _, Q in self.blocks) / self.n
        b = prior.clamp_min(1e-12).log()
        return (b - b.mean()).float()

    def predict_weights(self, W: torch.Tensor, lam_from: float, lam_to: float, curvature: torch.Tensor):
        """A solution at ``lam_from`` carried to ``lam_to`` under the quadratic model of the loss
        (curvature ``c_k s_j`` along eigenvector j for class k): ``w <- w (c_k s_j + lam_from) /
        (c_k s_j + lam_to)`` in the eigenbasis. The factor lies between 1 and lam_from / lam_to:
        weights scale with C where the penalty dominates and stay put where the data do."""
        s, U = self.eig
        h = curvature[:, None] * s
        ratio = (h + lam_from) / (h + lam_to)
        # directions the data do not span (collinear features): a solution's component there is
        # float noise, which weakening the penalty must not amplify
        null = s <= _PRECONDITION_RANGE * float(s.max())
        ratio[:, null] = ratio[:, null].clamp_max(1.0)
        return ((W @ U) * ratio) @ U.T


class _Coordinates:
    """The variables L-BFGS works in: weights rotated into the covariance's eigenbasis (R = W U) and
    scaled by the square root of the objective's curvature there, ``c_k s_j + lam``, with ``c_k``
    the softmax curvature of class k measured at the start point; the intercept by ``sqrt(c_k)``.
    The Hessian L-BFGS sees is then close to the identity: the unit step is nearly always accepted.
    Every map between the spaces is a diagonal scaling; only W <-> R needs a (K, d) x (d, d) product."""

    def __init__(self, problem: Problem, lam: float, curvature: torch.Tensor):
        s, self.U = problem.eig
        c = curvature.clamp_min(_PRECONDITION_RANGE * float(curvature.max()))
        h = c[:, None] * s + lam
        # collinear features (zero eigenvalues) under a vanishing penalty would make the scale ~ lam^-1/2
        # and overflow float32; any positive definite preconditioner gives the same optimum
        self.scale = torch.cat([h.clamp_min(_PRECONDITION_RANGE * float(h.max())).rsqrt().reshape(-1),
                                c.rsqrt()])
        self.lam, self.k = lam, problem.n_classes

    def weights(self, x):  # x -> (W, b)
        z = x * self.scale
        return z[:-self.k].view(self.k, -1) @ self.U.T, z[-self.k:]

    def point(self, W, b):  # (W, b) -> x
        return torch.cat([(W @ self.U).reshape(-1), b]) / self.scale

    def gradient(self, gW, gb):  # (dW, db) -> dx
        return torch.cat([(gW @ self.U).reshape(-1), gb]) * self.scale

    def penalty(self, s):  # the penalty's share of a gradient difference in rotated space
        z = s * self.lam
        z[-self.k:] = 0
        return z

    def to_memory(self, s, y):
        """An L-BFGS pair in x to rotated space, with the penalty's share of y removed."""
        s = s * self.scale
        return s, y / self.scale - self.penalty(s)

    def from_memory(self, s, y):
        """A rotated-space pair (loss part of y) to x, with this fit's penalty added."""
        return s / self.scale, (y + self.penalty(s)) * self.scale


def lbfgs(problem: Problem, start: Evaluation, lam: float, *, max_iter: int, tol: float, history: int = 10,
          guess: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[Evaluation, int]:
    """Minimise the penalised loss from ``start``; stops when every gradient component <= ``tol``.

    L-BFGS (two-loop recursion, Armijo backtracking) in the preconditioned variables
    (``_Coordinates``): an iteration costs one pass over the data. ``start`` is an evaluation
    already made (a neighbouring C's solution costs no pass here: only the penalty changed). The
    curvature pairs of the previous fit on ``problem`` seed the history (the loss is the same; the
    penalty's curvature is known exactly), and this fit's pairs are left for the next. ``guess``, a
    predicted solution, is tried as the first step when it points downhill. Returns the last
    accepted evaluation and the number of iterations.
    """
    space = _Coordinates(problem, lam, start.curvature)

    def at(e: Evaluation):
        loss, gW, gb = e.objective(lam)
        return loss, space.gradient(gW, gb), max(float(gW.abs().max()), float(gb.abs().max())) <= tol

    last = start
    x = space.point(start.W, start.b)
    fx, g, converged = at(start)
    hist = []
    for s, y in problem.memory:
        s, y = space.from_memory(s, y)
        sy = float(s @ y)
        if sy > 1e-12:
            hist.append((s, y, 1.0 / sy))
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
        if guess is not None:
            predicted = space.point(*guess) - x
            if float(g @ predicted) < 0:
                direction, slope = predicted, float(g @ predicted)
            guess = None
        if slope >= 0:  # not a descent direction: restart from the (preconditioned) gradient
            hist, direction, slope = [], -g, -float(g @ g)
        step = 1.0
        while True:
            x_new = x + step * direction
            e = problem.evaluate(*space.weights(x_new))
            f_new, g_new, converged = at(e)
            # a point meeting the stopping rule is taken even where rounding hides the decrease
            accepted = math.isfinite(f_new) and (converged or f_new < fx and f_new <= fx + 1e-4 * step * slope)
            if accepted or step < 1e-8:
                break
            step *= 0.5
        if not accepted:  # no decrease along a descent direction: float32's floor, stop here
            log.debug("L-BFGS stopped at the float32 floor after %d iterations (tol %g not met)", it, tol)
            break
        s, y = x_new - x, g_new - g
        sy = float(s @ y)
        if sy > 1e-12:
            hist = (hist + [(s, y, 1.0 / sy)])[-history:]
        x, fx, g, last = x_new, f_new, g_new, e
    problem.memory = [space.to_memory(s, y) for s, y, _ in hist]
    return last, it


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
            X = torch.sub(X, self.mean_).mul_(1 / self.scale_)  # one new array, never the caller's
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
        rows = self._transform(X) if warm and hasattr(self, "mean_") else self._learn_scaling(X)
        return self._fit_problem(Problem([(rows, torch.as_tensor(Q))], seed=0))

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
        ``guess``: a predicted solution (W, b) for the first step. Keeps the final evaluation."""
        k, d = problem.n_classes, problem.n_features
        if not hasattr(self, "classes_") or len(self.classes_) != k:
            self.classes_ = np.arange(k)
        self.n_features_in_ = d
        warm = self.warm_start and hasattr(self, "coef_") and self.coef_.shape == (k, d)
        with torch.no_grad():
            if start is None:
                W = torch.as_tensor(self.coef_.copy()) if warm else torch.zeros(k, d)
                start = problem.evaluate(W, torch.as_tensor(self.intercept_.copy()) if warm
                                         else problem.intercept_start())
            self.evaluation_, self.n_iter_ = lbfgs(problem, start, 1.0 / (self.C * problem.n),
                                                   max_iter=self.max_iter, tol=self.tol, guess=guess)
        self.coef_ = self.evaluation_.W.contiguous().numpy().copy()
        self.intercept_ = self.evaluation_.b.numpy().copy()
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


def _path_guess(solved: dict[float, Evaluation], log_c: float, problem: Problem, lam) -> tuple:
    """A predicted solution (W, b) at ``log_c``: each neighbouring solved C's solution carried along
    the regularisation path by the quadratic model (``Problem.predict_weights``); between two solved
    C, the two predictions blended linearly in log C, else the nearest one's."""
    below = [c for c in solved if c < log_c]
    above = [c for c in solved if c > log_c]
    ends = ([max(below)] if below else []) + ([min(above)] if above else [])
    if len(ends) == 1:
        e = solved[ends[0]]
        return problem.predict_weights(e.W, lam(ends[0]), lam(log_c), e.curvature), e.b
    (lo, e_lo), (hi, e_hi) = [(c, solved[c]) for c in ends]
    t = (log_c - lo) / (hi - lo)
    W = ((1 - t) * problem.predict_weights(e_lo.W, lam(lo), lam(log_c), e_lo.curvature)
         + t * problem.predict_weights(e_hi.W, lam(hi), lam(log_c), e_hi.curvature))
    return W, (1 - t) * e_lo.b + t * e_hi.b


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
    problem.memory = train.memory  # the same loss on a few more rows: its curvature pairs still fit
    return final._fit_problem(problem)

