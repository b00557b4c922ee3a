r"""Pair factors of SeqLip on explicit matrices (pure functions, float64).

For ``L`` (m x n), ``R`` (n x p) and a slope range ``[a, b]`` (the range of the activation's
derivative, ``[0, 1]`` for ReLU) the *pair factor* is

.. math::  P(L, R) = \max_{g \in [a, b]^n} \| L \,\mathrm{diag}(g)\, R \|_2 .

Writing ``g = a + (b - a) sigma`` with ``sigma`` in ``[0, 1]^n`` (valid for ANY ``a <= b``,
negative ``a`` included: GELU, SiLU) gives ``L diag(g) R = C0 + L' diag(sigma) R`` with
``C0 = a L R`` and ``L' = (b - a) L``. The map ``sigma -> ||C0 + L' diag(sigma) R||`` is convex
(a norm of an affine function), so its maximum over the cube is attained at a vertex
``sigma in {0, 1}^n``; every function below works on that vertex problem.

* :func:`pair_value`      the value at one vertex (a realised value: a valid LOWER bound).
* :func:`pair_exact`      exact maximum: vectorised enumeration for small ``n``, branch and bound
  with valid relaxations beyond (anytime: with a time limit it returns a certified interval).
* :func:`pair_greedy`     heuristics (the paper's coordinate-flip greedy, alternating
  maximisation with restarts): the best realised vertex value, an estimate from below.
* :func:`pair_certified`  cheap certified upper bounds, never below the exact maximum and never
  above AutoLip's ``max(|a|, |b|) ||L|| ||R||``.

Certified upper bounds (proofs; ``||.||`` is the spectral norm, ``|M|`` the entrywise absolute
value, ``E`` ranges over diagonal matrices with entries in ``[-1, 1]``, ``D`` over diagonal
matrices with entries in ``[0, 1]``):

(P) *product* ``||L D R|| <= ||L|| ||D|| ||R|| <= ||L|| ||R||`` (AutoLip's factor).

(A) *absolute values* ``|L D R| <= |L| D |R| <= |L| |R|`` entrywise (``D >= 0``), and for any
    matrix ``||M|| = max_{|u|=|v|=1} u^T M v <= max |u|^T |M| |v| = || |M| ||``, while on
    non-negative matrices the spectral norm is monotone (``0 <= M <= N`` entrywise implies
    ``u^T M v <= |u|^T N |v|``). Hence ``||L D R|| <= || |L| |R| ||``; the same holds with ``E``
    (``|L E R| <= |L| |E| |R| <= |L| |R|``).

(W) *diagonal rescaling* for any positive diagonal ``W``: ``L D R = (L W) D (W^{-1} R)`` because
    diagonal matrices commute, so ``||L D R|| <= ||L W|| ||W^{-1} R||``; also with ``E``. The
    minimum over ``W`` is a convex problem in ``log w`` (``log ||L diag(e^t)||`` is a max over
    unit ``u`` of a log-sum-exp of ``t``); any ``W`` gives a valid bound, so the optimiser's
    accuracy only affects tightness, never validity. ``W = I`` recovers (P).

(H) *the 1/2 rule* ``D = (I + E)/2`` with ``E = 2D - I`` in ``[-1, 1]``, hence
    ``||C0 + L D R|| = ||C0 + L R / 2 + L E R / 2|| <= ||C0 + L R / 2|| + (1/2) max_E ||L E R||``
    and ``max_E ||L E R||`` is bounded by the minimum of (P), (A), (W) applied to ``E``. With
    ``C0 = 0`` this is ``(||L R|| + ||L|| ||R||) / 2 <= ||L|| ||R||``.

(D) *Lagrangian eigenvalue bound* (SDP-free): the pair max EQUALS
    ``max_{|u|=|v|=1} u^T (C0 + L R / 2) v + (1/2) sum_k |l_k^T u| |r_k^T v|`` (maximise over
    each ``sigma_k`` for fixed ``u, v``); AM-GM with weights ``t_k > 0`` and a multiplier ``mu``
    for ``|u| = |v|`` give ``<= 2 lambda_max(Q(t, mu))`` for an explicit symmetric ``Q`` (see
    :func:`dual_bound_batch`), valid for every ``t, mu``; optimised by a few gradient steps.
    Typically within a few percent of the exact maximum on random pairs.

(B) *branch and bound*: fixing the coordinates of a subset ``F`` (``sigma_F = s``) and leaving
    the rest free gives ``C0 + L_F diag(s) R_F + L_free D R_free``, bounded by (H) with
    ``C0 := C0 + L_F diag(s) R_F``; the maximum is the max over all sub-problems, so the largest
    bound over the leaves of any partial search tree is a valid upper bound, and a sub-tree whose
    bound does not exceed a realised value (the incumbent) cannot contain a larger vertex.

All bounds are computed in float64; the only error is floating-point rounding (relative
``~1e-15``), which callers that need rounding-safe certificates cover with a ``1e-9`` relative
margin (see :data:`ROUNDING_MARGIN`).

>>> import torch
>>> L = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
>>> R = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
>>> round(pair_exact(L, R).value, 6)   # best sigma keeps one of the two paths
1.0
>>> round(pair_certified(L, R).value, 6) >= 1.0
True
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import InvalidArgumentError

__all__ = [
    "ROUNDING_MARGIN",
    "StepClock",
    "PairBound",
    "GreedyResult",
    "CertifiedBound",
    "batched_spectral_norm",
    "pair_value",
    "pair_exact",
    "pair_greedy",
    "pair_certified",
    "inner_bound",
    "scaled_product_bound",
    "reduce_pair",
]

#: relative margin that certified callers multiply upper bounds by, to cover float64 rounding.
ROUNDING_MARGIN = 1e-9

_F64 = torch.float64


# --------------------------------------------------------------------------------------------
# result types
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairBound:
    """An interval ``lower <= P(L, R) <= upper`` for one pair.

    ``lower`` is realised at the vertex ``pattern`` (so it is a true lower bound), ``upper`` is
    certified (proof in the module docstring), ``exact`` says whether the search closed the gap
    (then ``lower == value == upper`` up to ``rtol``). ``value`` is the best estimate
    (``lower``). ``nodes`` counts evaluated vertices/sub-problems.
    """

    lower: float
    upper: float
    pattern: torch.Tensor | None
    exact: bool
    how: str
    nodes: int = 0
    seconds: float = 0.0

    @property
    def value(self) -> float:
        return self.lower


@dataclass(frozen=True)
class GreedyResult:
    """Best vertex found by a heuristic: ``value = ||L diag(g(pattern)) R||`` (realised, hence a
    lower bound of the pair factor and an ESTIMATE of it, never a certificate)."""

    value: float
    pattern: torch.Tensor
    how: str
    seconds: float = 0.0
    evaluations: int = 0


@dataclass(frozen=True)
class CertifiedBound:
    """A certified upper bound ``value >= P(L, R)``, the rule that gave it (``how``) and every
    candidate that was computed (``parts``, all valid; ``value`` is their minimum)."""

    value: float
    how: str
    parts: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _as64(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise InvalidArgumentError(f"{name} must be a matrix; got shape {tuple(t.shape)}")
    return t.detach().to(dtype=_F64, device="cpu")


def batched_spectral_norm(X: torch.Tensor) -> torch.Tensor:
    """Spectral norms of a batch ``X`` (..., m, p), float64.

    Uses the Gram matrix of the smaller side and its top eigenvalue (relative accuracy of the
    top eigenvalue ``~eps``, so ``~eps/2`` on the norm), closed forms for rank-1 shapes.

    >>> X = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
    >>> batched_spectral_norm(X).tolist()
    [4.0]
    """
    m, p = X.shape[-2], X.shape[-1]
    if m == 0 or p == 0:
        return torch.zeros(X.shape[:-2], dtype=X.dtype)
    if m == 1 or p == 1:
        return X.flatten(-2).norm(dim=-1)
    G = X.mT @ X if p <= m else X @ X.mT
    if G.shape[-1] == 2:
        a, b, c = G[..., 0, 0], G[..., 1, 1], G[..., 0, 1]
        lam = (a + b) / 2 + torch.sqrt(((a - b) / 2) ** 2 + c * c)
        return lam.clamp_min(0).sqrt()
    return torch.linalg.eigvalsh(G)[..., -1].clamp_min(0).sqrt()


def _norm(X: torch.Tensor) -> float:
    """Spectral norm; for large matrices via the top eigenvalue of the Gram matrix of the
    smaller side (relative accuracy ~eps on the eigenvalue, a fraction of the rounding margin)."""
    if X.numel() == 0:
        return 0.0
    if min(X.shape) > 256:
        G = X.T @ X if X.shape[1] <= X.shape[0] else X @ X.T
        return float(torch.linalg.eigvalsh(G)[-1].clamp_min(0).sqrt())
    return float(torch.linalg.matrix_norm(X, ord=2))


def reduce_pair(L: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``L`` (m x n) by ``S V^T`` (n rows) when ``m > n`` and ``R`` (n x p) by ``U S``
    (n columns) when ``p > n``, from the symmetric eigendecomposition of ``L^T L`` / ``R R^T``
    (backward stable: the new Gram matrix equals the old one up to rounding).

    ``||L X R||`` depends on ``L`` only through ``L^T L`` and on ``R`` only through ``R R^T``
    (orthogonal factors drop out), so every pair quantity is unchanged (including ``||L R||``
    and the offset ``C0 = a L R``); entrywise-absolute bounds (A) are NOT invariant, so they
    are computed on the original matrices."""
    n = L.shape[1]
    if L.shape[0] > n:
        lam, V = torch.linalg.eigh(L.T @ L)  # L^T L = V diag(lam) V^T (backward stable)
        L = lam.clamp_min(0).sqrt().flip(0)[:, None] * V.flip(1).T
    if R.shape[1] > n:
        lam, U = torch.linalg.eigh(R @ R.T)
        R = U.flip(1) * lam.clamp_min(0).sqrt().flip(0)[None, :]
    return L, R


class _Adam:
    """Minimal Adam (avoids importing torch.optim, whose first import is slow)."""

    def __init__(self, params: list[torch.Tensor], lr: float) -> None:
        self.params, self.lr, self.t = params, lr, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.t += 1
        b1, b2 = 0.9, 0.999
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is None:
                    continue
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                mh = m / (1 - b1**self.t)
                vh = v / (1 - b2**self.t)
                p.sub_(self.lr * mh / (vh.sqrt() + 1e-12))


class StepClock:
    """Wall-clock costs of the steps of a loop, to decide whether the next one fits.

    The prediction for a kind of step is the largest of its last :attr:`KEEP` measured costs
    (a loaded machine slows steps down: the slowest recent one is the safe guess), or
    ``guess`` when none was measured yet; :meth:`fits` says whether a step started now would
    end by ``end``. A step that does not fit is not started, so a time limit is overshot by
    at most the error of the prediction, not by a whole step.
    """

    KEEP = 3

    def __init__(self) -> None:
        self.costs: dict[str, list[float]] = {}
        self.t0: dict[str, float] = {}

    def start(self, kind: str) -> None:
        self.t0[kind] = time.perf_counter()

    def stop(self, kind: str) -> float:
        """Records the cost of the step of ``kind`` started last; returns it."""
        cost = time.perf_counter() - self.t0.pop(kind)
        self.record(kind, cost)
        return cost

    def record(self, kind: str, cost: float) -> None:
        self.costs[kind] = [*self.costs.get(kind, []), max(cost, 0.0)][-self.KEEP:]

    def predict(self, kind: str, guess: float = 0.0) -> float:
        c = self.costs.get(kind)
        return max(c) if c else guess

    def fits(self, kind: str, end: float, factor: float = 1.0, guess: float = 0.0) -> bool:
        return time.perf_counter() + factor * self.predict(kind, guess) <= end


def _late(deadline: float | None) -> bool:
    """Whether the absolute ``time.perf_counter()`` deadline has passed (``None``: never).

    Every loop of this module checks it: each iterate of the optimised bounds is itself a valid
    bound and each greedy value a realised one, so stopping early only costs tightness."""
    return deadline is not None and time.perf_counter() > deadline


def _fits(deadline: float | None, cost: float) -> bool:
    """Whether a step predicted to take ``cost`` seconds, started now, ends by ``deadline``
    (``None``: always): a step that would not is skipped, each part being optional."""
    return deadline is None or time.perf_counter() + cost <= deadline


def _check_slopes(slopes: tuple[float, float]) -> tuple[float, float]:
    a, b = float(slopes[0]), float(slopes[1])
    if not (math.isfinite(a) and math.isfinite(b)) or a > b:
        raise InvalidArgumentError(f"slopes must be a finite pair a <= b; got {slopes!r}")
    return a, b


def _as_pair(L: Any, R: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``L`` and ``R`` as float64 matrices whose inner dimensions agree (else a named error)."""
    L = _as64(L, "L")
    R = _as64(R, "R")
    if L.shape[1] != R.shape[0]:
        raise InvalidArgumentError(
            f"inner dimensions differ: L is {tuple(L.shape)}, R is {tuple(R.shape)}"
        )
    return L, R


def _problem(
    L: Any, R: Any, slopes: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C0, L', R)`` with ``L diag(a + (b-a) sigma) R = C0 + L' diag(sigma) R``."""
    L, R = _as_pair(L, R)
    a, b = _check_slopes(slopes)
    L, R = reduce_pair(L, R)
    return a * (L @ R), (b - a) * L, R


def pair_value(
    L: Any, R: Any, sigma: Any, *, slopes: tuple[float, float] = (0.0, 1.0)
) -> float:
    """``||L diag(a + (b - a) sigma) R||_2`` at one pattern ``sigma`` (entries in [0, 1]).

    >>> L = torch.eye(2, dtype=torch.float64); R = torch.ones(2, 1, dtype=torch.float64)
    >>> pair_value(L, R, [1, 0])
    1.0
    """
    L = _as64(L, "L")
    R = _as64(R, "R")
    a, b = _check_slopes(slopes)
    s = torch.as_tensor(sigma, dtype=_F64).reshape(-1)
    g = a + (b - a) * s
    return _norm(L @ (g[:, None] * R))


# --------------------------------------------------------------------------------------------
# certified bounds
# --------------------------------------------------------------------------------------------
def scaled_product_bound(L: torch.Tensor, R: torch.Tensor, *, steps: int = 30,
                         deadline: float | None = None, step_guess: float = 0.0) -> float:
    """``min_w ||L diag(w)|| ||diag(w)^{-1} R||`` approximately minimised over ``w > 0``
    (rule (W)); the returned number is evaluated exactly at the final ``w``, so it is a valid
    bound on ``max ||L E R||`` over diagonal ``E`` with ``|E| <= I`` whatever the optimiser did.
    A step predicted (its slowest measured one, ``step_guess`` before the first) to end past
    ``deadline`` is not started.

    >>> L = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    >>> R = torch.tensor([[1.0], [100.0]], dtype=torch.float64)
    >>> round(scaled_product_bound(L, R), 6)   # the product bound would give ~100
    1.0
    """
    L = L.to(_F64)
    R = R.to(_F64)
    n = L.shape[1]
    if n == 0:
        return 0.0
    ln = L.norm(dim=0)
    rn = R.norm(dim=1)
    keep = (ln > 0) & (rn > 0)
    if not bool(keep.any()):
        return 0.0
    L = L[:, keep]
    R = R[keep]
    ln = ln[keep]
    rn = rn[keep]
    # start from column/row balancing: w_k = sqrt(||r_k|| / ||l_k||)
    t0 = 0.5 * (rn.log() - ln.log())
    best = _norm(L) * _norm(R)

    def value(t: torch.Tensor) -> float:
        w = t.exp()
        return _norm(L * w[None, :]) * _norm(R / w[:, None])

    best = min(best, value(t0))
    if steps > 0 and L.shape[1] > 1:
        t = t0.clone().requires_grad_(True)
        opt = _Adam([t], lr=0.1)
        clock = StepClock()
        for _ in range(steps):
            if not _fits(deadline, clock.predict("step", step_guess)):
                break
            clock.start("step")
            opt.zero_grad()
            w = t.exp()
            obj = torch.log(torch.linalg.matrix_norm(L * w[None, :], ord=2)) + torch.log(
                torch.linalg.matrix_norm(R / w[:, None], ord=2)
            )
            obj.backward()
            opt.step()
            clock.stop("step")
        with torch.no_grad():
            best = min(best, value(t.detach()))
    return best


def inner_bound(
    L: torch.Tensor, R: torch.Tensor, *, L_abs: torch.Tensor | None = None,
    R_abs: torch.Tensor | None = None, scaled_steps: int = 30,
) -> tuple[float, str]:
    """A certified bound on ``max_{|E| <= I diagonal} ||L E R||``: the minimum of (P), (A), (W).

    ``L_abs``/``R_abs`` are the ORIGINAL (unreduced) matrices for rule (A), when ``L``/``R``
    were reduced by :func:`reduce_pair` (rule (A) is not invariant under the reduction; the
    original matrices give a valid bound for the same quantity).
    """
    cands = {"product": _norm(L) * _norm(R)}
    La = L if L_abs is None else L_abs
    Ra = R if R_abs is None else R_abs
    cands["abs"] = _norm(La.abs() @ Ra.abs())
    if scaled_steps >= 0:
        cands["scaled"] = scaled_product_bound(L, R, steps=scaled_steps)
    how = min(cands, key=lambda k: cands[k])
    return cands[how], how


def _dual_matrix(
    H: torch.Tensor, QA: torch.Tensor, QB: torch.Tensor, mu: torch.Tensor
) -> torch.Tensor:
    """Batched ``Q = [[QA + mu I, H/2], [H^T/2, QB - mu I]]`` for ``H`` (B, m, p)."""
    B, m, p = H.shape
    Q = torch.empty(B, m + p, m + p, dtype=H.dtype)
    Q[:, :m, :m] = QA[None] + mu[:, None, None] * torch.eye(m, dtype=H.dtype)[None]
    Q[:, m:, m:] = QB[None] - mu[:, None, None] * torch.eye(p, dtype=H.dtype)[None]
    Q[:, :m, m:] = H / 2
    Q[:, m:, :m] = H.mT / 2
    return Q


def dual_bound_batch(
    H: torch.Tensor, LF: torch.Tensor, RF: torch.Tensor, t: torch.Tensor,
    mu: torch.Tensor, *, iters: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Rule (D): certified bounds on ``max_{D} ||H + L_F (D - I/2) R_F||`` for a batch of ``H``
    (i.e. on ``max_sigma ||C + L_F diag(sigma) R_F||`` with ``H = C + L_F R_F / 2``).

    Proof. ``||M|| = max_{|u|=|v|=1} u^T M v`` and ``u^T (C + L_F diag(sigma) R_F) v =
    u^T C v + sum_k sigma_k a_k b_k`` with ``a = L_F^T u``, ``b = R_F v``; maximising over
    ``sigma_k in [0, 1]`` gives ``(a_k b_k)_+ = (a_k b_k + |a_k b_k|)/2``, so the pair max EQUALS
    ``max_{u,v} u^T H v + (1/2) sum_k |a_k| |b_k|``. For any ``t_k > 0``,
    ``|a_k||b_k| <= (t_k a_k^2 + b_k^2 / t_k)/2`` (AM-GM), and on the feasible set
    ``mu (|u|^2 - 1) - mu (|v|^2 - 1) = 0`` for any real ``mu``. With ``z = (u, v)``,
    ``|z|^2 = 2``, the objective is at most ``z^T Q z <= 2 lambda_max(Q)`` where
    ``Q = [[L_F T L_F^T / 4 + mu I, H/2], [H^T/2, R_F^T T^{-1} R_F / 4 - mu I]]``. Valid for
    EVERY ``t > 0`` and ``mu``; ``mu`` is improved here by a few steps driven by
    ``d lambda / d mu = |u*|^2 - |v*|^2`` and the minimum over the iterates is returned.
    """
    QA = (LF * t[None, :]) @ LF.T / 4
    QB = RF.T @ (RF / t[:, None]) / 4
    mu = mu.clone()
    best = torch.full((H.shape[0],), math.inf, dtype=H.dtype)
    step = (batched_spectral_norm(H) / 4 + 1e-300).clone()
    prev_g = torch.zeros_like(mu)
    m = H.shape[1]
    best_mu = mu.clone()
    for _ in range(max(iters, 1)):
        w, V = torch.linalg.eigh(_dual_matrix(H, QA, QB, mu))
        lam = 2 * w[:, -1]
        better = lam < best
        best = torch.where(better, lam, best)
        best_mu = torch.where(better, mu, best_mu)
        z = V[:, :, -1]
        g = (z[:, :m] ** 2).sum(1) - (z[:, m:] ** 2).sum(1)
        flipped = (g * prev_g) < 0
        step = torch.where(flipped, step / 2, step)
        mu = mu - torch.sign(g) * step
        prev_g = g
    return best, best_mu


def _dual_lam(
    L: torch.Tensor, R: torch.Tensor, H: torch.Tensor, t: torch.Tensor, mu: torch.Tensor
) -> torch.Tensor:
    """Rule (D)'s value ``2 lambda_max(Q(t, mu))`` at explicit ``(t, mu)`` (differentiable)."""
    m, p = H.shape
    Q = torch.cat(
        [
            torch.cat([(L * t) @ L.T / 4 + mu * torch.eye(m, dtype=_F64), H / 2], 1),
            torch.cat([H.T / 2, R.T @ (R / t[:, None]) / 4 - mu * torch.eye(p, dtype=_F64)], 1),
        ],
        0,
    )
    return 2 * torch.linalg.eigvalsh(Q)[-1]


def dual_bound_at(
    C: torch.Tensor, L: torch.Tensor, R: torch.Tensor, sigma: torch.Tensor
) -> float:
    """Rule (D) evaluated ONCE, with parameters read off a good vertex ``sigma`` (for problems
    too large for the optimised version): ``(u, v)`` the top singular pair of
    ``C + L diag(sigma) R``, ``t_k = |b_k| / |a_k|`` (``a = L^T u``, ``b = R v``; the AM-GM step
    is tight at ``(u, v)``) and ``mu = 0`` (which then balances the two diagonal blocks at
    ``(u, v)``). One dense symmetric eigenvalue problem of size ``m + p``; valid for any
    parameters, so a poor ``sigma`` only costs tightness.

    >>> L = torch.eye(2, dtype=torch.float64); R = torch.eye(2, dtype=torch.float64)
    >>> round(dual_bound_at(torch.zeros(2, 2, dtype=torch.float64), L, R,
    ...                     torch.ones(2, dtype=torch.float64)), 6)
    1.0
    """
    M = C + L @ (sigma[:, None] * R)
    if min(M.shape) > 256:
        G = M.T @ M
        _, V = torch.linalg.eigh(G)
        v = V[:, -1]
        u = M @ v
        u = u / u.norm().clamp_min(1e-300)
    else:
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        u, v = U[:, 0], Vh[0]
    a = (L.T @ u).abs()
    b = (R @ v).abs()
    scale = float(a.max() + b.max()) * 1e-8 + 1e-300
    t = (b + scale) / (a + scale)
    return float(_dual_lam(L, R, C + L @ R / 2, t, torch.zeros((), dtype=_F64)))


def dual_bound(
    C: torch.Tensor, L: torch.Tensor, R: torch.Tensor, *, steps: int = 100,
    deadline: float | None = None, step_guess: float = 0.0,
) -> float:
    """Rule (D) for one problem ``max_sigma ||C + L diag(sigma) R||``, with ``t`` and ``mu``
    optimised by Adam on ``log t`` and ``mu`` (any iterate is a valid bound; the smallest
    evaluated one is returned). See :func:`dual_bound_batch` for the proof. After the first
    step, a step predicted (its slowest measured one) to end past ``deadline`` is not started
    (the first one neither when ``step_guess`` says so: then the result is ``inf``).

    >>> L = torch.eye(3, dtype=torch.float64); R = torch.eye(3, dtype=torch.float64)
    >>> round(dual_bound(torch.zeros(3, 3, dtype=torch.float64), L, R), 4)   # exact: 1
    1.0
    """
    C = C.to(_F64)
    ln = L.norm(dim=0)
    rn = R.norm(dim=1)
    keep = (ln > 0) & (rn > 0)
    L, R, ln, rn = L[:, keep], R[keep], ln[keep], rn[keep]
    if L.shape[1] == 0:
        return _norm(C)
    H = C + L @ R / 2
    s = torch.log(rn / ln).clone().requires_grad_(True)
    mu = torch.zeros((), dtype=_F64, requires_grad=True)
    opt = _Adam([s, mu], lr=0.05)
    best = math.inf
    clock = StepClock()
    for _ in range(max(steps, 1)):
        if not _fits(deadline, clock.predict("step", step_guess)):
            break
        clock.start("step")
        lam = _dual_lam(L, R, H, s.exp(), mu)
        best = min(best, float(lam.detach()))
        opt.zero_grad()
        lam.backward()
        opt.step()
        clock.stop("step")
    # re-evaluate the best parameters without autograd is unnecessary: each evaluated lam is a
    # valid bound computed from explicit (t, mu); return the smallest.
    return best


def _dual_params(
    C: torch.Tensor, L: torch.Tensor, R: torch.Tensor, *, steps: int
) -> tuple[torch.Tensor, float, float]:
    """Optimised ``(t, mu)`` of rule (D) for the root problem (used to seed branch and bound)."""
    H = C + L @ R / 2
    ln = L.norm(dim=0).clamp_min(1e-300)
    rn = R.norm(dim=1).clamp_min(1e-300)
    s = torch.log(rn / ln).clone().requires_grad_(True)
    mu = torch.zeros((), dtype=_F64, requires_grad=True)
    opt = _Adam([s, mu], lr=0.05)
    best, best_s, best_mu = math.inf, s.detach().clone(), 0.0
    for _ in range(max(steps, 1)):
        lam = _dual_lam(L, R, H, s.exp(), mu)
        lv = float(lam.detach())
        if lv < best:
            best, best_s, best_mu = lv, s.detach().clone(), float(mu.detach())
        opt.zero_grad()
        lam.backward()
        opt.step()
    return best_s.exp(), best_mu, best


def _abs_norm_lower(La: torch.Tensor, Ra: torch.Tensor, iters: int = 6) -> float:
    """A lower estimate of ``||La Ra||`` (``La, Ra >= 0``) by power iteration through
    matrix-vector products (``||M v||`` for a unit ``v`` never exceeds ``||M||``); it only
    decides whether rule (A) is worth its dense product ``La @ Ra``."""
    p = Ra.shape[1]
    if p == 0 or La.shape[0] == 0:
        return 0.0
    v = torch.full((p,), 1.0 / math.sqrt(p), dtype=La.dtype)
    est = 0.0
    for _ in range(iters):
        w = La @ (Ra @ v)
        est = max(est, float(w.norm()))
        z = Ra.T @ (La.T @ w)
        nz = float(z.norm())
        if not nz > 0:
            break
        v = z / nz
    return est


def pair_certified(  # noqa: PLR0913 - the public entry point: one keyword option per knob
    L: Any,
    R: Any,
    *,
    slopes: tuple[float, float] = (0.0, 1.0),
    bnb_seconds: float = 0.0,
    scaled_steps: int = 30,
    dual_steps: int = 60,
    dual_max_size: int = 1200,
    norms: tuple[float, float] | None = None,
    sigma: torch.Tensor | None = None,
    dual_at_max_size: int = 4000,
    deadline: float | None = None,
) -> CertifiedBound:
    """Certified upper bound on the pair factor ``max_{g in [a,b]^n} ||L diag(g) R||``.

    Candidates (each valid, proofs (P), (A), (W), (H), (B) in the module docstring), with
    ``c = max(|a|, |b|)`` and ``C = ((a + b)/2) L R``:

    * ``product``  ``c ||L|| ||R||``  (AutoLip's factor; the result never exceeds it);
    * ``abs``      ``c || |L| |R| ||``;
    * ``scaled``   ``c min_w ||L W|| ||W^{-1} R||``;
    * ``half``     ``||C|| + ((b - a)/2) * min(product, abs, scaled)`` (rule (H) after
      ``g = (a+b)/2 + ((b-a)/2) e`` with ``e`` in ``[-1, 1]``);
    * ``dual``     rule (D) with optimised parameters (when ``m + p <= dual_max_size``);
    * ``bnb``      branch and bound's own upper bound after ``bnb_seconds`` (when > 0).

    * ``dual@greedy`` rule (D) evaluated once with parameters from a given vertex ``sigma``
      (e.g. the greedy pattern; :func:`dual_bound_at`), when ``m + p <= dual_at_max_size``.

    ``norms`` may pass known upper bounds of ``(||L||, ||R||)`` (e.g. from SVDs) to skip their
    computation. ``deadline`` (absolute ``time.perf_counter()``) stops the optional parts
    (scaled, dual, bnb) early or skips them: each one (and each step of the optimised ones)
    starts only if its predicted cost ends by the deadline, the prediction scaling the measured
    time of the reduction and norms (:func:`_dense_rate`, seconds per cubed size) to the
    part's dense eigensolves. The minimum of what was computed is returned.

    >>> L = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    >>> R = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    >>> cb = pair_certified(L, R)
    >>> cb.how, round(cb.value, 6)
    ('half', 1.0)
    """
    t0 = time.perf_counter()
    L0, R0 = _as_pair(L, R)
    a, b = _check_slopes(slopes)
    c = max(abs(a), abs(b))
    t_dense = time.perf_counter()
    Lr, Rr = reduce_pair(L0, R0)
    nL, nR = (_norm(Lr), _norm(Rr)) if norms is None else (float(norms[0]), float(norms[1]))
    rate = _dense_rate(time.perf_counter() - t_dense, L0, R0, Lr, Rr, norms is None)
    parts: dict[str, float] = {"product": c * nL * nR}
    La, Ra = L0.abs(), R0.abs()
    if _abs_norm_lower(La, Ra) < nL * nR:  # else (A) cannot beat (P): skip its big product
        parts["abs"] = c * _norm(La @ Ra)
    sides = min(Lr.shape) ** 3 + min(Rr.shape) ** 3  # the sizes of the norms of a scaled step
    if scaled_steps >= 0 and _fits(deadline, rate * sides):
        parts["scaled"] = c * scaled_product_bound(Lr, Rr, steps=scaled_steps, deadline=deadline,
                                                   step_guess=2 * rate * sides)
    inner = min(parts.values()) / c if c > 0 else 0.0
    parts["half"] = abs(a + b) / 2 * _norm(Lr @ Rr) + (b - a) / 2 * inner
    mp3 = (Lr.shape[0] + Rr.shape[1]) ** 3  # one eigensolve of rule (D)'s matrix
    if dual_steps > 0 and Lr.shape[0] + Rr.shape[1] <= dual_max_size \
            and _fits(deadline, 2 * rate * mp3):
        parts["dual"] = dual_bound(a * (Lr @ Rr), (b - a) * Lr, Rr, steps=dual_steps,
                                   deadline=deadline, step_guess=2 * rate * mp3)
    if sigma is not None and Lr.shape[0] + Rr.shape[1] <= dual_at_max_size \
            and _fits(deadline, rate * (mp3 + min(Lr.shape[0], Rr.shape[1]) ** 3)):
        sig = torch.as_tensor(sigma, dtype=_F64).reshape(-1)
        parts["dual@greedy"] = dual_bound_at(a * (Lr @ Rr), (b - a) * Lr, Rr, sig)
    if bnb_seconds > 0 and not _late(deadline):
        pb = pair_exact(L0, R0, slopes=slopes, time_limit=bnb_seconds, deadline=deadline)
        parts["bnb"] = pb.upper
    how = min(parts, key=lambda k: parts[k])
    return CertifiedBound(
        value=parts[how], how=how, parts=parts, seconds=time.perf_counter() - t0
    )


def _dense_rate(seconds: float, L0: torch.Tensor, R0: torch.Tensor, Lr: torch.Tensor,
                Rr: torch.Tensor, norms: bool) -> float:
    """Measured seconds per cubed size of the dense eigensolves of :func:`reduce_pair` (``n^3``
    for each side it reduced) and, when ``norms``, of the two norms (``min(shape)^3`` each);
    ``0`` (nothing predicted) when there were none."""
    n = L0.shape[1]
    work = n**3 * ((L0.shape[0] > n) + (R0.shape[1] > n))
    if norms:
        work += min(Lr.shape) ** 3 + min(Rr.shape) ** 3
    return seconds / work if work > 0 else 0.0


# --------------------------------------------------------------------------------------------
# heuristics (lower bounds / estimates)
# --------------------------------------------------------------------------------------------
def _top_pair(M: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return float(S[0]), U[:, 0], Vh[0]


def _flip_values(
    M: torch.Tensor, L: torch.Tensor, R: torch.Tensor, sigma: torch.Tensor,
    v: torch.Tensor, *, exact_budget: int, iters: int,
) -> torch.Tensor:
    """Norms (exact, or power-iteration lower estimates) of ``M + s_k l_k r_k^T`` for every k,
    ``s_k = 1 - 2 sigma_k`` (flipping coordinate k)."""
    m, n = L.shape
    p = R.shape[1]
    s = 1.0 - 2.0 * sigma
    if n * m * p <= exact_budget:
        X = M[None] + s[:, None, None] * (L.T[:, :, None] * R[:, None, :])
        return batched_spectral_norm(X)
    # batched power iteration warm-started at the current top right singular vector; every
    # iterate's ||M_k x|| with ||x|| = 1 is <= ||M_k|| (a lower estimate)
    X = v[None, :].expand(n, p).clone()
    est = torch.zeros(n, dtype=_F64)
    LT = L.T  # (n, m): row k is l_k
    for _ in range(iters):
        Y = X @ M.T + (s * (R * X).sum(1))[:, None] * LT  # (n, m): M_k x_k
        est = Y.norm(dim=1)
        Z = Y @ M + (s * (LT * Y).sum(1))[:, None] * R  # (n, p): M_k^T y_k
        zn = Z.norm(dim=1, keepdim=True).clamp_min(1e-300)
        X = Z / zn
    return est


@dataclass(frozen=True)
class _FlipOptions:
    """The options of :func:`_local_flips` (see there)."""

    max_iter: int
    exact_budget: int
    iters: int
    screen: bool = True
    deadline: float | None = None


def _local_flips(
    C0: torch.Tensor, L: torch.Tensor, R: torch.Tensor, sigma: torch.Tensor, opts: _FlipOptions,
) -> tuple[float, torch.Tensor, int]:
    """Single-coordinate flips until no flip improves (the paper's greedy when started from
    sigma = 1). Returns (value, sigma, evaluations).

    Each pass first tries the flip with the largest first-order gain
    ``g_k = (1 - 2 sigma_k) (L^T u)_k (R v)_k`` for the top singular pair ``(u, v)``: when
    ``g_k > 0`` the flip is a guaranteed improvement (``||M'|| >= u^T M' v = ||M|| + g_k``).
    Otherwise every flip is screened (exact batched norms, or warm-started power iteration for
    large problems) and the best is taken if it improves; the search stops when none does, or
    after ``max_iter`` passes (``screen=False``: first-order flips only, for large problems)."""
    sigma = sigma.clone()
    M = C0 + L @ (sigma[:, None] * R)
    val, u, v = _top_pair(M)
    evals = 1
    for _ in range(opts.max_iter):
        if _late(opts.deadline):
            break
        gain = (1.0 - 2.0 * sigma) * (L.T @ u) * (R @ v)
        k = int(torch.argmax(gain))
        if float(gain[k]) > 1e-12 * max(val, 1e-300):
            M = M + (1.0 - 2.0 * sigma[k]) * torch.outer(L[:, k], R[k])
            sigma[k] = 1.0 - sigma[k]
            val, u, v = _top_pair(M)
            evals += 1
            continue
        if not opts.screen:
            break
        vals = _flip_values(M, L, R, sigma, v, exact_budget=opts.exact_budget, iters=opts.iters)
        evals += int(vals.numel())
        k = int(torch.argmax(vals))
        if not float(vals[k]) > val * (1 + 1e-12):
            break
        sigma[k] = 1.0 - sigma[k]
        M = C0 + L @ (sigma[:, None] * R)
        new, u2, v2 = _top_pair(M)
        evals += 1
        if not new > val:
            sigma[k] = 1.0 - sigma[k]
            break
        val, u, v = new, u2, v2
    return val, sigma, evals


def _alternate(
    C0: torch.Tensor, L: torch.Tensor, R: torch.Tensor, sigma: torch.Tensor, *, max_iter: int,
    deadline: float | None = None,
) -> tuple[float, torch.Tensor, int]:
    """Alternating maximisation: for the top singular pair (u, v) of ``M(sigma)``,
    ``u^T M(sigma') v = u^T C0 v + sum_k sigma'_k (L^T u)_k (R v)_k`` is maximised by
    ``sigma'_k = 1[(L^T u)_k (R v)_k > 0]``, and ``||M(sigma')|| >= u^T M(sigma') v >=
    u^T M(sigma) v = ||M(sigma)||``: the value never decreases."""
    sigma = sigma.clone()
    val, u, v = _top_pair(C0 + L @ (sigma[:, None] * R))
    evals = 1
    for _ in range(max_iter):
        if _late(deadline):
            break
        new_sigma = ((L.T @ u) * (R @ v) > 0).to(_F64)
        if torch.equal(new_sigma, sigma):
            break
        new, u2, v2 = _top_pair(C0 + L @ (new_sigma[:, None] * R))
        evals += 1
        if not new > val * (1 + 1e-14):
            if new >= val:
                sigma, val = new_sigma, new
            break
        sigma, val, u, v = new_sigma, new, u2, v2
    return val, sigma, evals


def pair_greedy(  # noqa: PLR0913 - the public entry point: one keyword option per knob
    L: Any,
    R: Any,
    *,
    slopes: tuple[float, float] = (0.0, 1.0),
    restarts: int = 8,
    method: str = "both",
    seed: int = 0,
    max_iter: int = 200,
    exact_budget: int = 2_000_000,
    power_iters: int = 20,
    deadline: float | None = None,
) -> GreedyResult:
    """Best vertex value found by heuristics: an ESTIMATE of the pair factor from below.

    ``method``: ``"flip"`` the paper's greedy (start at sigma = 1, flip the coordinate that
    increases ``||.||`` most, until none does); ``"alternating"`` alternating maximisation
    (sign rule on ``(L^T u)_k (R v)_k`` for the current top singular pair; the value is
    non-decreasing) from sigma = 1, from the sign patterns of the top singular vectors and from
    ``restarts`` random patterns, each polished by flips; ``"both"`` runs both and keeps the best.
    Flip screening uses exact batched norms when ``n m p <= exact_budget`` and warm-started power
    iteration otherwise; the returned value is always recomputed exactly at the returned pattern,
    so it is realised (a valid lower bound of the pair factor). For large problems
    (``n m p > 2e7``) the expensive parts are skipped unless asked for explicitly: ``"both"``
    runs alternating maximisation only, with at most 2 random restarts and first-order flips.
    ``deadline`` (absolute ``time.perf_counter()``) stops the search; the best pattern so far
    is returned (at least the all-ones one is evaluated).

    >>> torch.manual_seed(0) is not None
    True
    >>> L = torch.randn(3, 6, dtype=torch.float64); R = torch.randn(6, 3, dtype=torch.float64)
    >>> g = pair_greedy(L, R)
    >>> g.value <= pair_exact(L, R).value + 1e-12
    True
    """
    t0 = time.perf_counter()
    if method not in ("flip", "alternating", "both"):
        raise InvalidArgumentError(
            f"method must be 'flip', 'alternating' or 'both'; got {method!r}"
        )
    C0, Lp, Rr = _problem(L, R, slopes)
    return _greedy_core(
        C0, Lp, Rr,
        _GreedyOptions(restarts=restarts, method=method, seed=seed, max_iter=max_iter,
                       exact_budget=exact_budget, power_iters=power_iters, deadline=deadline),
        t0=t0,
    )


@dataclass(frozen=True)
class _GreedyOptions:
    """The options of :func:`_greedy_core` (those of :func:`pair_greedy`)."""

    restarts: int
    method: str
    seed: int
    max_iter: int
    exact_budget: int
    power_iters: int
    deadline: float | None = None


def _greedy_core(
    C0: torch.Tensor, Lp: torch.Tensor, Rr: torch.Tensor, opts: _GreedyOptions, t0: float,
) -> GreedyResult:
    """:func:`pair_greedy` on the vertex problem ``(C0, L', R)`` of :func:`_problem`."""
    n = Lp.shape[1]
    method, deadline, max_iter = opts.method, opts.deadline, opts.max_iter
    if n == 0:
        return GreedyResult(_norm(C0), torch.zeros(0, dtype=_F64), "empty", 0.0, 1)
    best_val, best_sigma, how = -1.0, torch.ones(n, dtype=_F64), method
    evals = 0
    big = n * Lp.shape[0] * Rr.shape[1] > 2e7
    flips = _FlipOptions(max_iter=max_iter, exact_budget=opts.exact_budget,
                         iters=opts.power_iters, screen=not big, deadline=deadline)
    restarts = min(opts.restarts, 2) if big else opts.restarts

    def consider(val: float, sig: torch.Tensor, name: str) -> None:
        nonlocal best_val, best_sigma, how
        if val > best_val:
            best_val, best_sigma, how = val, sig.clone(), name

    ones = torch.ones(n, dtype=_F64)
    if method == "flip" or (method == "both" and not big):
        v, s, e = _local_flips(C0, Lp, Rr, ones, flips)
        evals += e
        consider(v, s, "greedy-flip")
    if method in ("alternating", "both"):
        gen = torch.Generator().manual_seed(opts.seed)
        starts = [ones]
        # sign patterns from the top singular vectors of L and R separately and of M(1)
        _, u, vv = _top_pair(C0 + Lp @ Rr)
        starts.append(((Lp.T @ u) * (Rr @ vv) > 0).to(_F64))
        UL = torch.linalg.svd(Lp, full_matrices=False)[2][0]
        UR = torch.linalg.svd(Rr, full_matrices=False)[0][:, 0]
        starts.append((UL * UR > 0).to(_F64))
        starts.append((UL * UR < 0).to(_F64))
        for _ in range(restarts):
            starts.append((torch.rand(n, generator=gen, dtype=_F64) < 0.5).to(_F64))
        found: list[tuple[float, torch.Tensor]] = []
        for st in starts:
            if found and _late(deadline):
                break
            v, s, e = _alternate(C0, Lp, Rr, st, max_iter=max_iter, deadline=deadline)
            evals += e
            found.append((v, s))
        # polish the two best distinct alternating results by single flips
        found.sort(key=lambda vs: -vs[0])
        polished: list[torch.Tensor] = []
        for v, s in found:
            if len(polished) >= 2 or (polished and _late(deadline)):
                break
            if any(torch.equal(s, q) for q in polished):
                continue
            polished.append(s)
            v, s, e2 = _local_flips(C0, Lp, Rr, s, flips)
            evals += e2
            consider(v, s, "alternating")
    # recompute exactly at the returned pattern
    val = _norm(C0 + Lp @ (best_sigma[:, None] * Rr))
    return GreedyResult(val, best_sigma, how, time.perf_counter() - t0, evals)


# --------------------------------------------------------------------------------------------
# exact: enumeration and branch and bound
# --------------------------------------------------------------------------------------------
def _enumerate(
    C0: torch.Tensor, L: torch.Tensor, R: torch.Tensor, *, chunk_bits: int = 12
) -> tuple[float, torch.Tensor, int]:
    """Max over all ``2^n`` vertices, batched by chunks of ``2^chunk_bits`` patterns."""
    n = L.shape[1]
    P = L.T[:, :, None] * R[:, None, :]  # (n, m, p) rank-one terms l_k r_k^T
    best, best_idx = -1.0, 0
    total = 1 << n
    step = 1 << min(chunk_bits, n)
    bits = 1 << torch.arange(n)
    for start in range(0, total, step):
        idx = torch.arange(start, min(start + step, total))
        sig = ((idx[:, None] & bits[None, :]) > 0).to(_F64)  # (B, n)
        M = C0[None] + torch.einsum("bk,kmp->bmp", sig, P)
        vals = batched_spectral_norm(M)
        j = int(torch.argmax(vals))
        if float(vals[j]) > best:
            best, best_idx = float(vals[j]), start + j
    sigma = ((best_idx & bits) > 0).to(_F64)
    return best, sigma, total


def pair_exact(  # noqa: PLR0913 - the public entry point: one keyword option per knob
    L: Any,
    R: Any,
    *,
    slopes: tuple[float, float] = (0.0, 1.0),
    time_limit: float | None = None,
    max_enumerate: int = 12,
    rtol: float = 0.0,
    chunk: int = 2048,
    incumbent: GreedyResult | None = None,
    deadline: float | None = None,
) -> PairBound:
    """Exact pair factor ``max_{sigma in {0,1}^n} ||C0 + L' diag(sigma) R||`` (see module doc).

    ``n <= max_enumerate``: full enumeration, vectorised over chunks of patterns. Beyond: branch
    and bound (depth-first over coordinates sorted by ``||l_k|| ||r_k||``, batches of up to
    ``chunk`` sub-problems evaluated together), the incumbent seeded by :func:`pair_greedy`, the
    bound of a node with fixed part ``A`` and free coordinates ``F``
    ``min(||C0 + A + L_F R_F / 2|| + inner_F / 2, || |C0 + A| + |L_F| |R_F| ||, dual)``
    (rules (H), (A), (D); ``inner_F`` from (P), (A); the dual parameters ``t`` are optimised at
    the root and reused, ``mu`` is refined per node). Nodes whose bound is
    ``<= incumbent * (1 + rtol)`` are pruned.

    Returns a :class:`PairBound`; when ``time_limit`` (seconds) stops the search early,
    ``exact`` is False, ``lower`` is the best vertex found and ``upper`` the largest bound of the
    open nodes (still certified). ``deadline`` (absolute ``time.perf_counter()``) stops it the
    same way (whichever comes first).

    >>> L = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> pair_exact(L, torch.eye(2, dtype=torch.float64)).value
    2.0
    """
    t0 = time.perf_counter()
    C0, Lp, Rr = _problem(L, R, slopes)
    n = Lp.shape[1]
    if n == 0:
        v = _norm(C0)
        return PairBound(v, v, torch.zeros(0, dtype=_F64), True, "exact", 1, 0.0)
    # coordinates with l_k = 0 or r_k = 0 do not matter: drop them (pattern entry 1)
    active = (Lp.norm(dim=0) > 0) & (Rr.norm(dim=1) > 0)
    idx_active = torch.nonzero(active).flatten()
    full_sigma = torch.ones(n, dtype=_F64)
    La, Ra = Lp[:, idx_active], Rr[idx_active]
    na = La.shape[1]
    if na <= max_enumerate:
        val, sig, cnt = _enumerate(C0, La, Ra)
        full_sigma[idx_active] = sig
        return PairBound(val, val, full_sigma, True, "exact-enum", cnt, time.perf_counter() - t0)
    if deadline is not None:
        left = max(deadline - time.perf_counter(), 0.0) + (time.perf_counter() - t0)
        time_limit = left if time_limit is None else min(time_limit, left)
    res = _branch_and_bound(
        C0, La, Ra, _BnbOptions(time_limit=time_limit, rtol=rtol, chunk=chunk,
                                incumbent=_active_incumbent(incumbent, n, idx_active)), t0=t0,
    )
    lower, upper, sig, exact, nodes = res
    full_sigma[idx_active] = sig
    if not exact:
        upper = min(upper, pair_certified(L, R, slopes=slopes, deadline=deadline).value)
    return PairBound(
        lower, upper, full_sigma, exact, "exact-bnb" if exact else "bnb-partial", nodes,
        time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class _BnbOptions:
    """The options of :func:`_branch_and_bound` (those of :func:`pair_exact`; ``dual_iters``
    steps of ``mu`` per node for rule (D), ``root_steps`` Adam steps of its root parameters)."""

    time_limit: float | None
    rtol: float
    chunk: int
    incumbent: GreedyResult | None
    dual_iters: int = 3
    root_steps: int = 60


# stack entries: (depth, patterns (B, d) of ordered coordinates, A (B, m, p), ub, mu)
_Node = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class _BnbTree:
    """The problem of branch and bound with its coordinates ordered (``Lo = L[:, order]``,
    ``Ro = R[order]``, ``P[k] = l_k r_k^T``), the per-depth suffix data of the free part
    (depth ``d``: coordinates ``d..n-1`` free) and the incumbent (``best_val`` realised at the
    vertex ``best_sig``, in the original coordinate order)."""

    C0: torch.Tensor
    Lo: torch.Tensor
    Ro: torch.Tensor
    P: torch.Tensor
    order: torch.Tensor
    t_root: torch.Tensor
    half: list[torch.Tensor]  # C0 + L_F R_F / 2
    absF: list[torch.Tensor]  # |L_F| |R_F|
    slack: list[float]  # inner_F / 2
    rtol: float
    dual_iters: int
    best_val: float
    best_sig: torch.Tensor

    def branch(self, d: int, pats: torch.Tensor, A: torch.Tensor, mus: torch.Tensor
               ) -> _Node | None:
        """Both children (coordinate ``d`` at 0 and at 1) of the nodes ``pats``: a leaf updates
        the incumbent; else the children whose bounds (H), (A), (D) beat the incumbent (which
        each completion with all free coordinates at 1 may raise), or ``None``."""
        n = self.Lo.shape[1]
        C0, rtol = self.C0, self.rtol
        B = pats.shape[0]
        cA = torch.cat([A, A + self.P[d]])
        cmu = torch.cat([mus, mus])
        cp = torch.cat(
            [torch.cat([pats, torch.zeros(B, 1, dtype=_F64)], 1),
             torch.cat([pats, torch.ones(B, 1, dtype=_F64)], 1)]
        )
        d1 = d + 1
        if d1 == n:
            vals = batched_spectral_norm(C0[None] + cA)
            j = int(torch.argmax(vals))
            if float(vals[j]) > self.best_val:
                self.best_val = float(vals[j])
                self.best_sig = torch.empty(n, dtype=_F64)
                self.best_sig[self.order] = cp[j]
            return None
        half_d = self.half[d1]
        thr = self.best_val * (1 + rtol)
        # (H) with the cheap inner bound
        b = batched_spectral_norm(cA + half_d[None]) + self.slack[d1]
        alive = b > thr
        if not bool(alive.any()):
            return None
        cA, cp, cmu, b = cA[alive], cp[alive], cmu[alive], b[alive]
        # incumbent update: complete with all free coordinates = 1
        full = batched_spectral_norm(C0[None] + cA + (half_d - C0)[None] * 2)
        j = int(torch.argmax(full))
        if float(full[j]) > self.best_val:
            self.best_val = float(full[j])
            self.best_sig = torch.empty(n, dtype=_F64)
            self.best_sig[self.order] = torch.cat([cp[j], torch.ones(n - d1, dtype=_F64)])
            thr = self.best_val * (1 + rtol)
        # (A)
        b = torch.minimum(b, batched_spectral_norm((C0[None] + cA).abs() + self.absF[d1][None]))
        alive = b > thr
        if not bool(alive.any()):
            return None
        cA, cp, cmu, b = cA[alive], cp[alive], cmu[alive], b[alive]
        # (D)
        if self.dual_iters > 0:
            bd, cmu = dual_bound_batch(
                cA + half_d[None], self.Lo[:, d1:], self.Ro[d1:], self.t_root[d1:], cmu,
                iters=self.dual_iters,
            )
            b = torch.minimum(b, bd)
            alive = b > thr
            if not bool(alive.any()):
                return None
            cA, cp, cmu, b = cA[alive], cp[alive], cmu[alive], b[alive]
        return (d1, cp, cA, b, cmu)


def _bnb_incumbent(C0: torch.Tensor, L: torch.Tensor, R: torch.Tensor, opts: _BnbOptions,
                   t0: float) -> tuple[float, torch.Tensor]:
    """The first incumbent ``(value, pattern)``: the given one re-evaluated, else the greedy's
    (given 30% of the time limit)."""
    if opts.incumbent is None:
        time_limit = opts.time_limit
        g = _greedy_core(
            C0, L, R,
            _GreedyOptions(restarts=4, method="both", seed=0, max_iter=100,
                           exact_budget=2_000_000, power_iters=20,
                           deadline=None if time_limit is None else t0 + 0.3 * time_limit),
            t0=t0,
        )
        return g.value, g.pattern.clone()
    best_sig = opts.incumbent.pattern.clone().to(_F64)
    return _norm(C0 + L @ (best_sig[:, None] * R)), best_sig


def _suffix_data(C0: torch.Tensor, Lo: torch.Tensor, Ro: torch.Tensor
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """Per depth ``d`` (coordinates ``d..n-1`` free): ``C0 + L_F R_F / 2``, ``|L_F| |R_F|``
    and ``inner_F / 2`` (rules (H), (A))."""
    n = Lo.shape[1]
    half = []  # C0 + L_F R_F / 2
    absF = []  # |L_F| |R_F|
    slack = []  # inner_F / 2
    for d in range(n + 1):
        LF, RF = Lo[:, d:], Ro[d:]
        half.append(C0 + LF @ RF / 2)
        absF.append(LF.abs() @ RF.abs())
        if d < n:
            slack.append(inner_bound(LF, RF, scaled_steps=-1)[0] / 2)
        else:
            slack.append(0.0)
    return half, absF, slack


def _active_incumbent(inc: GreedyResult | None, n: int, idx: torch.Tensor
                      ) -> GreedyResult | None:
    """A caller's incumbent restricted to the active coordinates the search sees (its pattern
    has one entry per coordinate of the pair, ``n``)."""
    if inc is None:
        return None
    if inc.pattern.numel() != n:
        got = inc.pattern.numel()
        raise InvalidArgumentError(
            f"incumbent pattern has {got} entries; the pair has {n} coordinates (pass a "
            "pair_greedy result of this very pair, e.g. pair_greedy(L, R))"
        )
    return replace(inc, pattern=inc.pattern.reshape(-1)[idx])


def _branch_and_bound(
    C0: torch.Tensor, L: torch.Tensor, R: torch.Tensor, opts: _BnbOptions, *, t0: float,
) -> tuple[float, float, torch.Tensor, bool, int]:
    """Branch and bound of :func:`pair_exact` on the active coordinates: ``(lower, upper,
    pattern, exact, nodes)``, rule (B) of the module docstring."""
    time_limit, rtol = opts.time_limit, opts.rtol
    size = C0.shape[0] + C0.shape[1]
    chunk = max(8, min(opts.chunk, 400_000 // (size * size)))
    best_val, best_sig = _bnb_incumbent(C0, L, R, opts, t0)
    score = L.norm(dim=0) * R.norm(dim=1)
    order = torch.argsort(score, descending=True)
    Lo, Ro = L[:, order], R[order]
    P = Lo.T[:, :, None] * Ro[:, None, :]  # (n, m, p)
    t_root, mu_root, root_ub = _dual_params(C0, Lo, Ro, steps=opts.root_steps)
    if root_ub <= best_val * (1 + rtol):
        return best_val, best_val * (1 + rtol), best_sig, True, 1
    # suffix data for depth d (coordinates d..n-1 free)
    half, absF, slack = _suffix_data(C0, Lo, Ro)
    tree = _BnbTree(C0, Lo, Ro, P, order, t_root, half, absF, slack, rtol, opts.dual_iters,
                    best_val, best_sig)
    stack: list[_Node] = [
        (0, torch.zeros(1, 0, dtype=_F64), torch.zeros(1, *C0.shape, dtype=_F64),
         torch.full((1,), root_ub, dtype=_F64), torch.full((1,), mu_root, dtype=_F64))
    ]
    nodes = 1
    stopped = False
    while stack:
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            stopped = True
            break
        d, pats, A, ub, mus = stack.pop()
        keep = ub > tree.best_val * (1 + rtol)
        if not bool(keep.all()):
            pats, A, ub, mus = pats[keep], A[keep], ub[keep], mus[keep]
        if pats.shape[0] == 0:
            continue
        if pats.shape[0] > chunk:
            stack.append((d, pats[chunk:], A[chunk:], ub[chunk:], mus[chunk:]))
            pats, A, mus = pats[:chunk], A[:chunk], mus[:chunk]
        nodes += 2 * pats.shape[0]
        child = tree.branch(d, pats, A, mus)
        if child is not None:
            stack.append(child)
    best_val, best_sig = tree.best_val, tree.best_sig
    if stopped:
        open_ub = max([float(e[3].max()) for e in stack if e[3].numel()] + [best_val])
        return best_val, max(open_ub, best_val), best_sig, False, nodes
    return best_val, best_val * (1 + rtol), best_sig, True, nodes
