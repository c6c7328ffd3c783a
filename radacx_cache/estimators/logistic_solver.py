"""The probe's solver: L2 multinomial logistic regression, full-batch, exact (docs/probe.md).

scikit-learn's objective ``mean(CE) + lam ||W||^2 / 2`` (intercept not penalised) and its stopping
rule (largest gradient component <= ``tol``), solved in float32 torch passes over row blocks:
- ``Problem`` holds the preprocessed rows; ``Problem.evaluate`` is one pass, returning the data part
  of the objective (``Evaluation``) at the intercept that is optimal for the weights (solved by
  Newton on the logits): the penalty is added in closed form, so one evaluation serves every C;
- ``lbfgs`` runs L-BFGS on the weights in preconditioned coordinates (``_Coordinates``: a
  Kronecker-factored model of the Hessian, class curvature x feature covariance) and stops at
  float32's floor rather than loop when no decrease is left;
- ``Problem.predict_weights`` carries a solution along the regularisation path to another C.
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np

from .._lazy import LazyModule

torch = LazyModule("torch")  # imported on first use: `import` of the estimator stays light

log = logging.getLogger(__name__)

_CHUNK = 4096  # rows per block of a pass
_PRECONDITION_RANGE = 1e-6  # smallest / largest curvature the preconditioner scales by (float32-safe)
_EIG_ROWS = 16384  # rows of the covariance estimate behind the preconditioner (it need not be exact)
_INTERCEPT_STEPS = 50  # Newton steps at most for the intercept (a class without positives needs ~10)
_INTERCEPT_MAX_STEP = 4.0  # the largest change of a log-odds per Newton step


class Evaluation(NamedTuple):
    """The data part of the objective at (W, b), as one pass computes it: reusable at any penalty."""
    W: torch.Tensor
    b: torch.Tensor
    loss: float  # mean cross-entropy
    gW: torch.Tensor  # its gradients
    gb: torch.Tensor
    curvature: torch.Tensor  # the softmax curvature between classes, mean diag(p) - p p^T (K, K)

    def objective(self, lam: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Loss and gradients with the penalty ``lam ||W||^2 / 2`` added."""
        return self.loss + 0.5 * lam * float((self.W * self.W).sum()), self.gW + lam * self.W, self.gb


class Problem:
    """Preprocessed row blocks (features, soft targets) as torch tensors, for many fits at different C.

    ``blocks`` is a list of (X, Q) pairs read in turn (train, or train then val: no concatenated
    copy). The eigendecomposition ``U diag(s) U^T`` of the features' covariance drives the
    preconditioner. ``weights``: one per row (all blocks, in order), mean 1, or None (all 1): the loss
    is then ``sum_i w_i CE_i / n`` and its gradients and curvatures weighted alike.
    """

    def __init__(self, blocks: list[tuple[torch.Tensor, torch.Tensor]], eig: tuple | None = None, seed: int = 0,
                 weights: torch.Tensor | None = None):
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
        self.Q = torch.cat([Q for _, Q in blocks])
        self.w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32).reshape(-1, 1)
        if self.w is not None:
            self.Q = self.Q * self.w  # w_i q_i: the loss's target term; P is weighted where it appears
        self.q_mean = self.Q.sum(0, dtype=torch.float64) / self.n
        self.passes = 0

    def evaluate(self, W: torch.Tensor, b: torch.Tensor, intercept_tol: float = 1e-6) -> Evaluation:
        """Cross-entropy, its gradients and the class curvature at (W, b*(W)), b*(W) the optimal
        intercept for W (found from ``b``): one pass for the logits ``X W^T``, a few Newton steps on
        the (n, K) logits alone for the intercept, one pass for the gradient ``(P - Q)^T X``."""
        Z = torch.cat([torch.nn.functional.linear(X[s:s + _CHUNK], W) for X, _ in self.blocks
                       for s in range(0, len(X), _CHUNK)])
        b, logp = self._solve_intercept(Z, b, intercept_tol)
        loss = -torch.sum(self.Q * logp, dtype=torch.float64)  # float64: a float32 sum's rounding
        # (~1e-7) would be as large as the last iterations' decrease and stall the line search
        p = logp.exp_()
        wp = p if self.w is None else p * self.w
        curvature = torch.diag(wp.sum(0, dtype=torch.float64)) - (wp.T @ p).double()
        G = wp.sub_(self.Q) if self.w is None else wp - self.Q
        gW, row = torch.zeros_like(W), 0
        for X, _ in self.blocks:
            for s in range(0, len(X), _CHUNK):
                xc = X[s:s + _CHUNK]
                gW.addmm_(G[row:row + len(xc)].T.contiguous(), xc)  # a contiguous (K, rows) left factor
                row += len(xc)
        self.passes += 1
        gb = G.sum(0, dtype=torch.float64) / self.n
        return Evaluation(W, b, float(loss) / self.n, gW.div_(self.n), gb.float(), (curvature / self.n).float())

    def _solve_intercept(self, Z: torch.Tensor, b: torch.Tensor, tol: float):
        """Newton's method for the intercept given the logits (the objective is convex in b; its
        Hessian ``diag(p) - p^T p / n`` is singular only along b + const, which softmax ignores)."""
        n, k = Z.shape
        # + 1 1^T / k: fixes b's free constant; + 1e-12 I: a class whose probability underflowed
        regulariser = torch.ones(k, k, dtype=torch.float64) / k + 1e-12 * torch.eye(k, dtype=torch.float64)
        for _ in range(_INTERCEPT_STEPS):
            logp = torch.log_softmax(Z + b, 1)
            # float64: float32's rounding of p^T p (~1e-8) can flip the sign of the Hessian's smallest
            # curvatures (a class whose probability underflowed), and with it the step's
            p = logp.exp().double()
            wp = p if self.w is None else p * self.w.double()
            p_mean = wp.sum(0) / n
            g = p_mean - self.q_mean
            if float(g.abs().max()) <= tol:
                break
            H = torch.diag(p_mean) - wp.T @ p / n
            step = torch.linalg.solve(H + regulariser, -g)
            # a bounded step in Newton's direction: far from the optimum (a class whose probability
            # underflowed, or one without positives, heading to -inf) the quadratic model overshoots
            b = b + (step * min(1.0, _INTERCEPT_MAX_STEP / float(step.abs().max()))).float()
        return b, logp

    def intercept_start(self) -> torch.Tensor:
        """The intercept's optimum at W = 0: the log class frequencies (centred)."""
        b = self.q_mean.clamp_min(1e-12).log()
        return (b - b.mean()).float()

    def model_curvature(self, curvature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss's curvature under the Kronecker model ``curvature (x) covariance``, in their joint
        eigenbasis: ``h[m, j] = a_m s_j`` (K, d), with the class eigenvectors V and feature ones U."""
        a, V = torch.linalg.eigh(curvature.double())
        s, U = self.eig
        return a.clamp_min(0).float()[:, None] * s, V.float(), U

    def predict_weights(self, W: torch.Tensor, lam_from: float, lam_to: float, curvature: torch.Tensor):
        """A solution at ``lam_from`` carried to ``lam_to`` under the quadratic model of the loss,
        ``curvature (x) covariance`` (``_Coordinates``): in the joint eigenbasis (class eigenvalue
        a_m, feature eigenvalue s_j), ``w <- w (a_m s_j + lam_from) / (a_m s_j + lam_to)``. The factor
        lies between 1 and lam_from / lam_to: weights scale with C where the penalty dominates and
        stay put where the data do."""
        h, V, U = self.model_curvature(curvature)
        ratio = (h + lam_from) / (h + lam_to)
        # directions the loss does not see (collinear features; the sum over classes, which softmax
        # ignores): a solution's component there is float noise, which a weaker penalty must not amplify
        null = h <= _PRECONDITION_RANGE * float(h.max())
        ratio[null] = ratio[null].clamp_max(1.0)
        return V @ ((V.T @ W @ U) * ratio) @ U.T


class _Coordinates:
    """The variables L-BFGS works in. The loss's Hessian in W is approximated by a Kronecker product,
    ``A (x) S``: A the (K, K) softmax curvature between classes measured at the start point
    (``mean diag(p) - p p^T``: imbalance, sharpening predictions and the coupling of the classes),
    S the features' covariance. In their joint eigenbasis (R = V^T W U) that Hessian plus the
    penalty is diagonal, ``a_m s_j + lam``, and each coordinate is scaled by its square root: the
    Hessian L-BFGS sees is then close to the identity and the unit step is nearly always accepted.
    (The intercept is not among the variables: every evaluation solves it exactly.) Each map between
    the spaces is a diagonal scaling and two small products."""

    def __init__(self, problem: Problem, lam: float, curvature: torch.Tensor):
        h, self.V, self.U = problem.model_curvature(curvature)
        h = h + lam
        # directions the loss does not see (collinear features, the sum over classes) under a vanishing
        # penalty would make the scale ~ lam^-1/2 and overflow float32; any positive definite
        # preconditioner gives the same optimum
        self.scale = h.clamp_min(_PRECONDITION_RANGE * float(h.max())).rsqrt().reshape(-1)
        self.lam, self.k = lam, problem.n_classes

    def weights(self, x):  # x -> W
        return self.V @ (x * self.scale).view(self.k, -1) @ self.U.T

    def point(self, W):  # W -> x
        return (self.V.T @ W @ self.U).reshape(-1) / self.scale

    def gradient(self, gW):  # dW -> dx
        return (self.V.T @ gW @ self.U).reshape(-1) * self.scale


def lbfgs(problem: Problem, start: Evaluation, lam: float, *, max_iter: int, tol: float, history: int = 10,
          guess: torch.Tensor | None = None) -> tuple[Evaluation, int]:
    """Minimise the penalised loss from ``start``; stops when every gradient component <= ``tol``.

    L-BFGS (two-loop recursion, Armijo backtracking) in the preconditioned variables
    (``_Coordinates``): an iteration costs one pass over the data. ``start`` is an evaluation
    already made (a neighbouring C's solution costs no pass here: only the penalty changed).
    ``guess``, predicted weights, is tried as the first step when it points downhill. Returns the
    last accepted evaluation and the number of iterations.
    """
    space = _Coordinates(problem, lam, start.curvature)

    def at(e: Evaluation):
        loss, gW, gb = e.objective(lam)
        return loss, space.gradient(gW), max(float(gW.abs().max()), float(gb.abs().max())) <= tol

    last = start
    x = space.point(start.W)
    fx, g, converged = at(start)
    hist = []
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
            predicted = space.point(guess) - x
            if float(g @ predicted) < 0:
                direction, slope = predicted, float(g @ predicted)
            guess = None
        if slope >= 0:  # not a descent direction: restart from the (preconditioned) gradient
            hist, direction, slope = [], -g, -float(g @ g)
        step = 1.0
        while True:
            x_new = x + step * direction
            e = problem.evaluate(space.weights(x_new), last.b, tol / 10)
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
    return last, it
