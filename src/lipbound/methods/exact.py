r"""Exact Lipschitz constant of small ReLU / leaky-ReLU networks by branch and bound.

The maths
---------
Let ``f(x) = W_K s(W_{K-1} ... s(W_1 x + b_1) ... ) + b_K`` with a positively homogeneous,
piecewise-linear activation ``s(z) = p z`` for ``z > 0`` and ``s(z) = q z`` for ``z < 0``
(ReLU: ``q = 0, p = 1``; leaky ReLU: ``q = negative_slope, p = 1``). An *activation pattern*
``d = (d_1, ..., d_{K-1})``, ``d_i in {0, 1}^{n_i}``, fixes ``D_i = diag(q + (p - q) d_i)``; on
its region

    R(d) = { x : (2 d_i - 1) * z_i(x) >= 0 for every hidden layer i },
    z_1 = W_1 x + b_1,   z_{i+1} = W_{i+1} D_i z_i + b_{i+1},

``f`` is affine with Jacobian ``J(d) = W_K D_{K-1} W_{K-1} ... D_1 W_1``. The full-dimensional
regions cover ``R^n`` up to a null set, ``f`` is continuous and piecewise affine, hence for any
pair of operator norms

    L(f) = sup_x ||J_f(x)|| = max over FULL-DIMENSIONAL regions R(d) of ||J(d)||.

(Lower-dimensional regions are skipped: their patterns can carry Jacobians that no open set
realises, e.g. ``relu(x) - relu(-x) = x`` has the pattern "both on" at ``x = 0`` only, with
Jacobian 2 while ``L = 1``.)

Branch and bound. A node of the search tree fixes the pattern of hidden layers ``1..l-1`` and
of the first ``m`` neurons of layer ``l``. Its region is a polyhedron ``{x : G x + g >= 0}``
(rows normalised to unit length); it is *full-dimensional* iff the Chebyshev LP

    maximise t  subject to  G x + g >= t,  t <= 1

has optimum ``t* > region_tol`` (``t*`` is the radius of the largest ball inside the region).
Feasibility is *witnessed*: every region kept carries a point ``x`` whose constraint slacks are
recomputed in float64 and exceed ``region_tol``; LPs are solved only when no known point (the
parent's witness or one of the random samples that fall in the node) shows a side is non-empty.

Bounds on a sub-tree (every one is an upper bound of ``||J(d)||`` over ALL completions of the
node's partial pattern, feasible or not, hence of the sub-tree's maximum). Write
``J = H_l D_l A_l`` with ``A_l`` the (fixed) Jacobian of ``z_l`` on the node's region,
``D_l = diag(sigma)`` with ``sigma_k`` fixed for the first ``m`` neurons and free in
``{q, p}`` for the others, and ``H_l = W_K D_{K-1} ... D_{l+1} W_{l+1}`` (all free).

* (interval) ``J`` is propagated backwards in interval arithmetic (centre/radius form):
  ``W_K``, times ``D_{K-1}`` with ``sigma`` in its range, times ``W_{K-1}``, ..., times the
  fixed ``A_l``; every ``J`` of the sub-tree lies in ``[C - R, C + R]`` entrywise, hence
  ``|J| <= |C| + R`` and ``||J|| <= || |C| + R ||`` (the induced l1, l2 and l-inf norms are
  monotone on non-negative matrices and ``||J|| <= || |J| ||``). The ranges of ``sigma`` are
  narrowed with the region's bounding box (2 n LPs, computed at layer boundaries and every
  few neurons when the input dimension is small): interval propagation of the pre-activations
  over the box proves that some neurons cannot change sign on the region, which fixes their
  slope in the bound and also decides their branch without an LP.
* (split, l2) with the SVD ``W_{l+1} = U S V^T``,
  ``||J|| <= ||H_l' U S^{1/2}|| * ||S^{1/2} V^T D_l A_l||`` (``H_l = H_l' U S V^T``). The first
  factor is bounded over all free ``D``\ s once per network by SeqLip's pair product
  (Scaman & Virmaux 2018, Thm. 3: ``||M_K D ... D M_1|| <= prod_i max_sigma
  ||S~_{i+1} V_{i+1}^T diag(sigma) U_i S~_i||``; each pair maximum is a convex function of
  ``sigma`` maximised over a box, so it is attained at a vertex and computed exactly by
  enumeration for widths up to ``pair_enum_limit``; wider pairs use the certified bounds below).
  The second factor is maximised exactly over the vertices of the free ``sigma`` when at most
  ``enum_limit`` neurons are free; otherwise it is bounded by
  ``||B D X||_2^2 <= ||B D X||_F^2 = sigma^T ((B^T B) o (X X^T)) sigma
  <= sum_{k,l} max_{sigma_k, sigma_l} Q_kl sigma_k sigma_l``.
  For the last hidden layer ``H_l = W_K`` is fixed and the second factor alone (with
  ``B = W_K``, any of the three norms) is used.
* (scalar output, last hidden layer) ``max_sigma ||w^T D A||`` is computed exactly (for l1 and
  l-inf in any dimension, for l2 with a 2-D input) by maximising over the extreme points of
  the dual-norm ball, see ``_scalar_output_max``.

A node is pruned when its bound is ``<=`` the best realised value; nodes are explored best
first, so when the time runs out the largest open bound is a certified upper bound and the best
realised region a certified (witnessed) lower bound.

What is and is not proven. The lower bound is a witness: a point ``x*`` strictly inside the
region, with ``||J_f(x*)||`` recomputed by autograd on the model itself. The upper bound (and
"exact") additionally relies on the LP solver's claims that the skipped regions have no inscribed
ball of radius ``> region_tol`` (HiGHS works to about ``1e-7`` feasibility tolerance), and on the
float64 evaluation of the bounds (inflated by a relative ``1e-9``).

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1))
>>> res = exact(net, (2,), time_limit=20.0)
>>> res.bound, res.finished, res.lower == res.value
('exact', True, True)
"""

from __future__ import annotations

import copy
import heapq
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_norm, check_positive
from ..analysis import Analysis, analysis_of
from ..errors import NonFiniteError, UnsupportedModelError, UnsupportedNode
from ..results import ExactResult, Witness

__all__ = [
    "ExactResult",
    "PiecewiseLinearChain",
    "exact",
    "normalise_chain",
    "piecewise_linear_chain",
]

_INFLATE = 1.0 + 1e-9  # relative inflation of float64 bounds before pruning
_BOX_EVERY = 8  # recompute a region's bounding box every this many fixed neurons of a layer


def _intersect(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(a[0], b[0]), np.minimum(a[1], b[1])


# --------------------------------------------------------------------------------------------
# The network as a chain of dense affine maps and piecewise-linear activations
# --------------------------------------------------------------------------------------------
@dataclass
class PiecewiseLinearChain:
    """``f(x) = W_K s_{K-1}(... s_1(W_1 x + b_1) ...) + b_K`` in float64 numpy.

    ``slopes[i] = (q, p)``: hidden layer ``i``'s activation is ``p z`` for ``z > 0`` and ``q z``
    for ``z < 0``. ``names`` holds one readable label per linear layer.
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    slopes: list[tuple[float, float]]
    names: list[str] = field(default_factory=list)

    @property
    def in_dim(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def widths(self) -> list[int]:
        return [int(W.shape[0]) for W in self.weights[:-1]]

    def forward_patterns(self, X: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Pre-activations (list, one ``(N, n_i)`` per hidden layer) and Jacobians ``(N, m, n)``."""
        pre: list[np.ndarray] = []
        a = X
        Jac = np.broadcast_to(np.eye(self.in_dim), (X.shape[0], self.in_dim, self.in_dim))
        for i, (W, b) in enumerate(zip(self.weights, self.biases)):
            z = a @ W.T + b
            Jac = np.einsum("ij,njk->nik", W, Jac)
            if i == len(self.weights) - 1:
                break
            q, p = self.slopes[i]
            sig = np.where(z > 0, p, q)
            pre.append(z)
            a = sig * z
            Jac = sig[:, :, None] * Jac
        return pre, Jac


def _activation_slopes(fn: Any, where: str) -> tuple[float, float]:
    """``(q, p)`` when ``fn`` is ``t -> p t (t > 0), q t (t < 0)``; else raise."""
    t = torch.tensor([-3.0, -1.0, -0.25, 0.0, 0.25, 1.0, 3.0], dtype=torch.float64)
    try:
        with torch.no_grad():
            y = fn(t.reshape(1, -1)).reshape(-1).to(torch.float64)
    except (RuntimeError, ValueError, TypeError):
        # an element-wise op whose other operand is a shaped constant (x.maximum(c)): it
        # cannot act on a probe vector, and is no fixed t -> p t / q t map anyway
        y = None
    ok = y is not None and y.numel() == t.numel()
    q, p = (-float(y[1]), float(y[5])) if ok and y is not None else (0.0, 0.0)
    if not ok or not torch.allclose(y, torch.where(t > 0, p * t, q * t), rtol=1e-6, atol=1e-9):
        raise UnsupportedModelError(
            [
                UnsupportedNode(
                    where,
                    "activation",
                    "exact() needs ReLU or leaky ReLU activations "
                    "(piecewise linear with one kink at 0); use lipsdp/seqlip instead",
                )
            ],
            what="exact() supports piecewise-linear activations only",
        )
    return q, p


def piecewise_linear_chain(
    model: nn.Module | Analysis, input_shape: Sequence[int] | int | None = None
) -> PiecewiseLinearChain:
    """Dense float64 chain of ``model`` (ReLU / leaky-ReLU activations only).

    Read from the model's :class:`~lipbound.analysis.Analysis` (its float64
    :meth:`~lipbound.analysis.Analysis.dense_chain`: ``capture`` -> ``simplify`` ->
    ``sequential_chain``), so ``F.relu`` models, convolutions (as dense matrices) and merged
    layers work. Raises
    :class:`NotSequentialError` for other graphs and :class:`UnsupportedModelError` for
    non-piecewise-linear activations.
    """
    an, _ = analysis_of(model, input_shape)
    Ws, bs, acts, names = an.dense_chain()
    slopes: list[tuple[float, float]] = []
    for name, a in acts:
        fn = a.fn if hasattr(a, "fn") and not isinstance(a, nn.Module) else a
        slopes.append(_activation_slopes(fn, name))
    return PiecewiseLinearChain(Ws, bs, slopes, names)


def normalise_chain(ch: PiecewiseLinearChain) -> tuple[PiecewiseLinearChain, int]:
    """``(ch', E)``: the same network with every layer scaled by a power of two, ``L(ch) =
    2^E L(ch')`` exactly.

    With ``W_i' = 2^{-e_i} W_i`` (``e_i`` the binary exponent of ``max |W_i|``, so
    ``max |W_i'|`` lies in ``[1/2, 1)``) and ``b_i' = 2^{-(e_1 + ... + e_i)} b_i``, positive
    homogeneity of the activations (``s(a z) = a s(z)`` for ``a > 0``) gives by induction
    ``z_i' = 2^{-(e_1 + ... + e_i)} z_i``: every pre-activation keeps its sign (the regions are
    the same sets), and ``J' = 2^{-E} J`` with ``E = e_1 + ... + e_K``. Multiplying by a power
    of two is exact in float64 (barring overflow, checked, and subnormal results, entries below
    ``2^{-1022}`` times the layer's largest one). So every tolerance of the search acts on a
    problem of unit scale, and the result is scaled back exactly.

    Raises :class:`NonFiniteError` when the chain, or a normalised bias, is not finite.
    """
    for W, b, name in zip(ch.weights, ch.biases, ch.names or [""] * len(ch.weights)):
        if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
            raise NonFiniteError(
                f"exact(): the dense float64 matrix of layer {name or '?'} has NaN or infinite "
                "entries (the product of merged layers overflows float64); rescale the weights"
            )
    Ws: list[np.ndarray] = []
    bs: list[np.ndarray] = []
    cum = 0
    for i, (W, b) in enumerate(zip(ch.weights, ch.biases)):
        m = float(np.max(np.abs(W))) if W.size else 0.0
        e = math.frexp(m)[1] if m > 0 else 0
        cum += e
        Ws.append(np.ldexp(W, -e))
        bn = np.ldexp(b, -cum)
        if not np.all(np.isfinite(bn)):
            name = ch.names[i] if i < len(ch.names) else str(i)
            raise NonFiniteError(
                f"exact(): the biases of layer {name} are more than 2^1023 times the scale of "
                f"the weights before them (2^{cum}), beyond float64; rescale the network"
            )
        bs.append(bn)
    return PiecewiseLinearChain(Ws, bs, list(ch.slopes), list(ch.names)), cum


def _ldexp_checked(v: float, e: int, *, up: bool, what: str) -> float:
    """``v 2^e`` in float64; rounded up (``up``) or down when not exact; overflow raises."""
    if v == 0.0:
        return 0.0
    top = e + math.frexp(v)[1]  # |v 2^e| lies in [2^(top-1), 2^top)
    if top > 1024:
        raise NonFiniteError(
            f"exact(): the {what} Lipschitz constant is about 2^{top}, beyond "
            "the float64 range (max ~2^1024); rescale the network's weights"
        )
    r = math.ldexp(v, e) if top > -1100 else 0.0
    if r == 0.0 or math.ldexp(r, -e) != v:  # subnormal result: rounded
        r = math.nextafter(r, math.inf if up else 0.0)
    return r


# --------------------------------------------------------------------------------------------
# Norms and bounds
# --------------------------------------------------------------------------------------------
def _mat_norm(J: np.ndarray, norm: str) -> float:
    if norm == "2":
        return float(np.linalg.norm(J, 2)) if J.size else 0.0
    if norm == "inf":
        return float(np.abs(J).sum(axis=1).max()) if J.size else 0.0
    return float(np.abs(J).sum(axis=0).max()) if J.size else 0.0


def _batch_norm(Js: np.ndarray, norm: str) -> np.ndarray:
    """Norms of a stack ``(N, a, b)``."""
    if Js.shape[1] == 0 or Js.shape[2] == 0:
        return np.zeros(Js.shape[0])
    if norm == "2":
        if Js.shape[1] == 1 or Js.shape[2] == 1:
            return np.sqrt((Js * Js).sum(axis=(1, 2)))
        return np.linalg.svd(Js, compute_uv=False)[:, 0]
    if norm == "inf":
        return np.abs(Js).sum(axis=2).max(axis=1)
    return np.abs(Js).sum(axis=1).max(axis=1)


def _vertex_max(
    B: np.ndarray, X: np.ndarray, lo: np.ndarray, hi: np.ndarray, norm: str, chunk: int = 4096
) -> float:
    """Exact ``max ||B diag(sigma) X||`` over sigma_k in {lo_k, hi_k} (a convex function's max)."""
    free = np.flatnonzero(lo != hi)
    base = (B * lo) @ X
    if free.size == 0:
        return _mat_norm(base, norm)
    R = np.einsum("ik,kj->kij", B[:, free] * (hi - lo)[free], X[free])  # (f, a, b)
    f = free.size
    best = 0.0
    total = 1 << f
    Rf = R.reshape(f, -1)
    for start in range(0, total, chunk):
        idx = np.arange(start, min(total, start + chunk))
        bits = ((idx[:, None] >> np.arange(f)) & 1).astype(np.float64)
        Js = (bits @ Rf).reshape(-1, *base.shape) + base
        best = max(best, float(_batch_norm(Js, norm).max()))
    return best


def _termwise_fro(B: np.ndarray, X: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """``sqrt(sum_kl max_{s_k, s_l} Q_kl s_k s_l) >= max_sigma ||B diag(sigma) X||_F >= ..._2``."""
    Q = (B.T @ B) * (X @ X.T)
    c = [np.outer(u, v) for u in (lo, hi) for v in (lo, hi)]
    tot = np.max(np.stack([Q * ci for ci in c]), axis=0).sum()
    return float(math.sqrt(max(tot, 0.0)))


def _scalar_output_max(
    w: np.ndarray, A: np.ndarray, lo: np.ndarray, hi: np.ndarray, norm: str
) -> float | None:
    """Exact ``max ||w^T diag(sigma) A||`` over ``sigma in [lo, hi]`` (a row vector), or None.

    With ``v_k = w_k A_k``, ``||sum_k sigma_k v_k|| = max_{y in Y} <y, sum_k sigma_k v_k>`` for
    the dual-norm ball's extreme points ``Y``, so the maximum over ``sigma`` is
    ``max_{y in Y} g(y)``, ``g(y) = sum_k max(lo_k <y, v_k>, hi_k <y, v_k>)``. For the induced
    l-inf norm of a row (its l1 norm) ``Y = {-1, 1}^n``; for l1 (its l-inf norm)
    ``Y = {+-e_i}``; for l2 in the plane ``Y`` is the circle, on which ``g`` is
    ``<y, u_j>`` on each arc between the angles where some ``<y, v_k> = 0``: its maximum is
    either at such an angle or at ``u_j / ||u_j||``, and all these candidates are values of
    ``g``, so their maximum is exact.
    """
    V = w[:, None] * A  # (n, d)
    d = V.shape[1]

    def g(Y: np.ndarray) -> np.ndarray:
        S = Y @ V.T
        return np.maximum(S * lo, S * hi).sum(axis=1)

    if norm == "inf":
        if d > 12:
            return None
        Y = 1.0 - 2.0 * ((np.arange(1 << d)[:, None] >> np.arange(d)) & 1)
        return float(g(Y.astype(np.float64)).max())
    if norm == "1":
        Y = np.vstack([np.eye(d), -np.eye(d)])
        return float(g(Y).max())
    if d == 1:
        return float(g(np.array([[1.0], [-1.0]])).max())
    if d != 2:
        return None
    nz = np.linalg.norm(V, axis=1) > 0
    if not np.any(nz):
        return 0.0
    ang = np.arctan2(V[nz, 1], V[nz, 0])
    crit = np.concatenate([ang + np.pi / 2, ang - np.pi / 2])
    Yc = np.stack([np.cos(crit), np.sin(crit)], axis=1)
    # slopes on each arc: evaluate the pattern at arc midpoints
    srt = np.sort(np.mod(crit, 2 * np.pi))
    mids = (srt + np.roll(srt, -1) + np.r_[np.zeros(srt.size - 1), 2 * np.pi]) / 2
    Ym = np.stack([np.cos(mids), np.sin(mids)], axis=1)
    Sm = Ym @ V.T
    U = np.where(Sm > 0, hi, lo) @ V  # (arcs, 2): g = <y, u_j> on arc j
    un = np.linalg.norm(U, axis=1)
    Yu = U[un > 0] / un[un > 0, None]
    best = float(g(np.vstack([Yc, Ym, Yu])).max())
    return best


def _svd(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    return U, S, Vt


def _pair_factor(
    Sn_Vt: np.ndarray, U_Sp: np.ndarray, lo: np.ndarray, hi: np.ndarray, enum_limit: int
) -> float:
    """Certified ``max_sigma ||Sn_Vt diag(sigma) U_Sp||_2``."""
    cands = [
        float(np.linalg.norm(Sn_Vt, 2) * np.linalg.norm(U_Sp, 2))
        * float(np.abs(np.r_[lo, hi]).max())
    ]
    cands.append(_termwise_fro(Sn_Vt, U_Sp, lo, hi))
    if int((lo != hi).sum()) <= enum_limit:
        cands.append(_vertex_max(Sn_Vt, U_Sp, lo, hi, "2"))
    return min(cands)


def _seqlip_chain(
    mats: list[np.ndarray], ranges: list[tuple[np.ndarray, np.ndarray]], enum_limit: int
) -> float:
    """SeqLip bound on ``sup ||M_r D_{r-1} ... D_1 M_1||_2`` over free diagonal ``D_i``."""
    if len(mats) == 1:
        return float(np.linalg.norm(mats[0], 2))
    svds = [_svd(M) for M in mats]
    r = len(mats)
    total = 1.0
    for i in range(r - 1):
        Up, Sp, _ = svds[i]
        _, Sn, Vtn = svds[i + 1]
        sp = Sp if i == 0 else np.sqrt(Sp)
        sn = Sn if i + 1 == r - 1 else np.sqrt(Sn)
        total *= _pair_factor(sn[:, None] * Vtn, Up * sp, ranges[i][0], ranges[i][1], enum_limit)
    return total


class _Bounds:
    """Per-network precomputation of the tail bounds used at every node."""

    def __init__(
        self, ch: PiecewiseLinearChain, norm: str, pair_enum_limit: int, enum_limit: int
    ) -> None:
        self.norm = norm
        self.enum_limit = enum_limit
        W = ch.weights
        H = len(W) - 1
        self.H = H
        self.cmax = [max(abs(q), abs(p)) for q, p in ch.slopes]
        self.ranges = [(min(q, p), max(q, p)) for q, p in ch.slopes]
        # split bound (l2): g[h] = sup ||W_K D ... D_{h+1} U_{h+1} S_{h+1}^{1/2}||,
        # B[h] = S^{1/2} V^T
        self.g: list[float | None] = [None] * H
        self.B: list[np.ndarray] = [np.zeros((0, 0))] * H
        if H == 0:
            return
        for h in range(H):
            if h == H - 1:
                self.B[h] = W[-1]
                self.g[h] = 1.0
                continue
            if norm != "2":
                continue
            U, S, Vt = _svd(W[h + 1])
            s = np.sqrt(S)
            self.B[h] = s[:, None] * Vt
            mats = [U * s, *W[h + 2 :]]
            rng = [
                (
                    np.full(W[i].shape[0], self.ranges[i][0]),
                    np.full(W[i].shape[0], self.ranges[i][1]),
                )
                for i in range(h + 1, H)
            ]
            g_seq = _seqlip_chain(mats, rng, pair_enum_limit)
            g_prod = float(np.linalg.norm(U * s, 2)) * math.prod(
                self.cmax[i] * float(np.linalg.norm(W[i + 1], 2)) for i in range(h + 1, H)
            )
            self.g[h] = min(g_seq, g_prod)


# --------------------------------------------------------------------------------------------
# LP feasibility
# --------------------------------------------------------------------------------------------
class _LP:
    """Small LPs over a region ``{x : G x + g >= 0}`` with HiGHS.

    Uses the HiGHS binding that ships with scipy (``scipy.optimize._highspy``; much less
    per-call overhead than ``linprog``) when present, else ``scipy.optimize.linprog(method=
    "highs")``. Same solver, same tolerances either way.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self._core: Any = None
        try:
            from scipy.optimize._highspy import _core

            h = _core._Highs()
            h.setOptionValue("output_flag", False)
            self._core, self._h = _core, h
            self._inf = float(_core.kHighsInf)
        except Exception:  # pragma: no cover - older scipy
            from scipy.optimize import linprog

            self._linprog = linprog
            self._inf = math.inf

    def _solve(
        self,
        cost: np.ndarray,
        col_lo: np.ndarray,
        col_up: np.ndarray,
        M: np.ndarray,
        row_lo: np.ndarray,
    ) -> tuple[str, np.ndarray | None, float]:
        """min cost.y s.t. M y >= row_lo, col_lo <= y <= col_up; ('ok'|'unbounded'|'fail', y, f)."""
        self.count += 1
        m, nc = M.shape
        if self._core is not None:
            hc = self._core
            lp = hc.HighsLp()
            lp.num_col_ = nc
            lp.num_row_ = m
            lp.col_cost_ = cost
            lp.col_lower_ = col_lo
            lp.col_upper_ = col_up
            lp.row_lower_ = row_lo
            lp.row_upper_ = np.full(m, self._inf)
            lp.a_matrix_.format_ = hc.MatrixFormat.kColwise
            lp.a_matrix_.start_ = (
                np.arange(0, m * nc + 1, max(m, 1), dtype=np.int32)[: nc + 1]
                if m
                else np.zeros(nc + 1, dtype=np.int32)
            )
            lp.a_matrix_.index_ = np.tile(np.arange(m, dtype=np.int32), nc)
            lp.a_matrix_.value_ = np.ascontiguousarray(M.T).ravel()
            self._h.passModel(lp)
            self._h.run()
            st = self._h.getModelStatus()
            if st == hc.HighsModelStatus.kOptimal:
                y = np.array(self._h.getSolution().col_value, dtype=np.float64)
                return "ok", y, float(cost @ y)
            if st in (hc.HighsModelStatus.kUnbounded, hc.HighsModelStatus.kUnboundedOrInfeasible):
                return "unbounded", None, -math.inf
            return "fail", None, math.nan
        bounds = [
            (None if not math.isfinite(a) else a, None if not math.isfinite(b) else b)
            for a, b in zip(col_lo, col_up)
        ]
        res = self._linprog(cost, A_ub=-M, b_ub=-row_lo, bounds=bounds, method="highs")
        if res.status == 0:
            return "ok", np.asarray(res.x, dtype=np.float64), float(res.fun)
        if res.status == 3:
            return "unbounded", None, -math.inf
        return "fail", None, math.nan

    @staticmethod
    def _unit(g: np.ndarray) -> float:
        """A power of two ``S`` with ``max |g| / S`` in ``[1/2, 1)`` (``1`` when ``g = 0``).

        The LPs are solved in ``x = S y``: ``G x + g >= t`` iff ``G y + g / S >= t / S`` (rows
        of ``G`` have unit length), exact in float64, so HiGHS's absolute tolerances act on
        data of unit scale whatever the scale of the network's geometry.
        """
        m = float(np.max(np.abs(g))) if g.size else 0.0
        return math.ldexp(1.0, math.frexp(m)[1]) if m > 0 and math.isfinite(m) else 1.0

    def chebyshev(self, G: np.ndarray, g: np.ndarray) -> tuple[str, np.ndarray | None, float]:
        """``(status, centre, radius)`` of the largest ball in the region (radius capped).

        ``status`` is ``"ok"`` (then ``radius`` is HiGHS's optimum ``t*``, in input units) or
        ``"fail"`` (no claim about the region).
        """
        n = self.n
        S = self._unit(g)
        cost = np.zeros(n + 1)
        cost[-1] = -1.0
        lo = np.full(n + 1, -self._inf)
        up = np.full(n + 1, self._inf)
        up[-1] = 1.0
        M = np.hstack([G, -np.ones((G.shape[0], 1))])
        st, y, _ = self._solve(cost, lo, up, M, -g / S)
        if st != "ok" or y is None or not np.all(np.isfinite(y)):
            return "fail", None, math.nan
        return "ok", y[:n] * S, float(y[-1]) * S

    def box(self, G: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Bounding box of the region (``None`` when unbounded or on solver trouble).

        Padded by ``1e-6`` relative to the region's scale ``S`` and to the box's own extent
        (HiGHS's feasibility tolerance is ``1e-7`` on the unit-scale data).
        """
        n = self.n
        S = self._unit(g)
        lo = np.empty(n)
        hi = np.empty(n)
        clo = np.full(n, -self._inf)
        cup = np.full(n, self._inf)
        for j in range(n):
            for sgn in (1.0, -1.0):
                c = np.zeros(n)
                c[j] = sgn
                st, _, f = self._solve(c, clo, cup, G, -g / S)
                if st != "ok" or not math.isfinite(f):
                    return None
                if sgn > 0:
                    lo[j] = f * S
                else:
                    hi[j] = -f * S
        pad = 1e-6 * (S + np.maximum(np.abs(lo), np.abs(hi)) + (hi - lo))
        return lo - pad, hi + pad


@dataclass
class _Node:
    h: int  # hidden layer being split
    m: int  # neurons [0, m) of layer h are fixed
    A: np.ndarray  # Jacobian of z_h on the region (n_h, n0)
    c: np.ndarray  # offset of z_h (n_h,)
    sig: np.ndarray  # slopes of the fixed neurons of layer h (m,)
    G: np.ndarray  # constraint rows (unit norm)
    g: np.ndarray
    x: np.ndarray  # witness point
    r: float  # its min slack (> tol)
    samples: np.ndarray  # indices of samples inside the region
    sslack: np.ndarray  # their min slacks
    box: tuple[np.ndarray, np.ndarray] | None
    bound: float
    depth: int
    pattern: tuple[np.ndarray, ...] = ()
    ok: bool = True  # the witness x is verified inside the region (slacks > region_tol)
    Aabs: np.ndarray | None = None  # |W_h| |D| |A_{h-1}|: scale of A's rounding errors


def _interval_mul(
    c: np.ndarray, r: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Centre/radius of ``[c - r, c + r] * [lo, hi]`` (column-wise, lo/hi per column)."""
    a, b = c - r, c + r
    prods = np.stack([a * lo, a * hi, b * lo, b * hi])
    mn, mx = prods.min(axis=0), prods.max(axis=0)
    return (mn + mx) / 2, (mx - mn) / 2


class _NodeBound:
    """Certified bound of a node's sub-tree (see the module docstring), with box-based IBP."""

    def __init__(self, ch: PiecewiseLinearChain, bnd: _Bounds, region_tol: float) -> None:
        self.ch = ch
        self.bnd = bnd
        self.tol = region_tol
        self.H = len(ch.weights) - 1

    def ranges(
        self,
        h: int,
        A: np.ndarray,
        c: np.ndarray,
        sig: np.ndarray,
        box: tuple[np.ndarray, np.ndarray] | None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Slope ranges of hidden layers ``h..H-1`` valid on the node's region."""
        ch = self.ch
        out: list[tuple[np.ndarray, np.ndarray]] = []
        n = A.shape[0]
        lo, hi = _ranges_for(self.bnd, h, sig, n)
        if box is None:
            out.append((lo, hi))
            for i in range(h + 1, self.H):
                ni = ch.weights[i].shape[0]
                out.append((np.full(ni, self.bnd.ranges[i][0]), np.full(ni, self.bnd.ranges[i][1])))
            return out
        xc = (box[0] + box[1]) / 2
        xr = (box[1] - box[0]) / 2
        zc = A @ xc + c
        zr = np.abs(A) @ xr
        fixed = sig.size
        for i in range(h, self.H):
            q, p = ch.slopes[i]
            zl, zu = zc - zr, zc + zr
            if i > h:
                ni = zc.size
                lo = np.full(ni, self.bnd.ranges[i][0])
                hi = np.full(ni, self.bnd.ranges[i][1])
                fixed = 0
            act = zl > 0
            ina = zu < 0
            act[:fixed] = False
            ina[:fixed] = False
            lo = np.where(act, p, np.where(ina, q, lo))
            hi = np.where(act, p, np.where(ina, q, hi))
            out.append((lo, hi))
            if i == self.H - 1:
                break
            # post-activation interval
            is_p = (lo == hi) & (lo == p)
            is_q = (lo == hi) & (lo == q) & ~is_p
            if i == h:
                is_p[:fixed] = sig == p
                is_q[:fixed] = sig != p
            zpl, zpu = np.maximum(zl, 0), np.maximum(zu, 0)
            znl, znu = np.minimum(zl, 0), np.minimum(zu, 0)
            cand_p = np.stack([p * zpl, p * zpu])
            cand_q = np.stack([q * znl, q * znu])
            free_c = np.concatenate([cand_p, cand_q, np.zeros((1, zc.size))])
            al = np.where(is_p, cand_p.min(0), np.where(is_q, cand_q.min(0), free_c.min(0)))
            au = np.where(is_p, cand_p.max(0), np.where(is_q, cand_q.max(0), free_c.max(0)))
            W, b = ch.weights[i + 1], ch.biases[i + 1]
            ac, ar = (al + au) / 2, (au - al) / 2
            zc = W @ ac + b
            zr = np.abs(W) @ ar
        return out

    def __call__(
        self,
        h: int,
        A: np.ndarray,
        c: np.ndarray,
        sig: np.ndarray,
        box: tuple[np.ndarray, np.ndarray] | None,
    ) -> float:
        ch, bnd = self.ch, self.bnd
        rngs = self.ranges(h, A, c, sig, box)
        # backward interval propagation of J = W_K D_{H-1} ... W_{h+1} D_h A
        C = ch.weights[-1].copy()
        R = np.zeros_like(C)
        for i in range(self.H - 1, h - 1, -1):
            lo, hi = rngs[i - h]
            C, R = _interval_mul(C, R, lo[None, :], hi[None, :])
            if i > h:
                W = ch.weights[i]
                C, R = C @ W, R @ np.abs(W)
        C, R = C @ A, R @ np.abs(A)
        cands = [_mat_norm(np.abs(C) + R, bnd.norm)]
        lo, hi = rngs[0]
        g = bnd.g[h]
        nfree = int((lo != hi).sum())
        if h == self.H - 1:
            if bnd.B[h].shape[0] == 1:
                ex = _scalar_output_max(bnd.B[h][0], A, lo, hi, bnd.norm)
                if ex is not None:
                    cands.append(ex)
            if nfree <= bnd.enum_limit:
                cands.append(_vertex_max(bnd.B[h], A, lo, hi, bnd.norm))
            elif bnd.norm == "2":
                cands.append(_termwise_fro(bnd.B[h], A, lo, hi))
        elif g is not None:
            if nfree <= bnd.enum_limit:
                cands.append(g * _vertex_max(bnd.B[h], A, lo, hi, bnd.norm))
            elif bnd.norm == "2":
                cands.append(g * _termwise_fro(bnd.B[h], A, lo, hi))
        return min(cands) * _INFLATE


def _child_layer_state(
    ch: PiecewiseLinearChain, node: _Node, sig_full: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A, c, |W| |D| |A_prev|)`` of the next layer's pre-activations on the node's region."""
    W, b = ch.weights[node.h + 1], ch.biases[node.h + 1]
    A = W @ (sig_full[:, None] * node.A)
    c = W @ (sig_full * node.c) + b
    prev = np.abs(node.A) if node.Aabs is None else node.Aabs
    Aabs = np.abs(W) @ (np.abs(sig_full)[:, None] * prev)
    return A, c, Aabs


def _ranges_for(bnd: _Bounds, h: int, sig: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    lo = np.full(n, bnd.ranges[h][0])
    hi = np.full(n, bnd.ranges[h][1])
    lo[: sig.size] = sig
    hi[: sig.size] = sig
    return lo, hi


#: one child of a split: (slope, constraint row, its offset, witness x, its slack, samples
#: inside, their slacks, witness verified)
_Child = tuple[float, Any, float, np.ndarray, float, np.ndarray, np.ndarray, bool]


@dataclass(frozen=True)
class _BnbOptions:
    """The search options of one :func:`exact` call (see its parameters)."""

    time_limit: float
    region_tol: float
    n_samples: int
    enum_limit: int
    pair_enum_limit: int
    seed: int
    use_box: bool | None


class _Search:
    """The branch and bound of :func:`_branch_and_bound` (see the module docstring): a heap of
    :class:`_Node` sub-trees, largest certified bound first; each step fixes the sign of one
    neuron (:meth:`_split`) and pushes the children whose bound beats the incumbent
    (:meth:`_expand`), or scores a full region's Jacobian."""

    def __init__(self, ch: PiecewiseLinearChain, norm: str, o: _BnbOptions, t0: float) -> None:
        self.ch, self.norm, self.H = ch, norm, len(ch.weights) - 1
        self.time_limit, self.tol, self.t0 = o.time_limit, o.region_tol, t0
        self.use_box = 2 * ch.in_dim <= max(ch.widths) if o.use_box is None else o.use_box
        self.nb = _NodeBound(ch, _Bounds(ch, norm, o.pair_enum_limit, o.enum_limit),
                             o.region_tol)
        self.lp = _LP(ch.in_dim)
        # rounding of a slack G x + g (unit rows, n0 terms): at most (n0 + 2) eps (|G||x| + |g|)
        self.gam = (ch.in_dim + 2) * 2.0**-52
        # rounding of A_h = W_h D A_{h-1} ... (every inner dimension once): below
        # gam_A |W||D|...|W|
        self.gam_A = (ch.in_dim + sum(ch.widths) + 2) * 2.0**-52
        self.heap: list[tuple[float, int, int, _Node]] = []
        self.counter = itertools.count()
        self.incumbent = 0.0
        self.best_x = np.zeros(ch.in_dim)
        self.best_pattern: tuple[np.ndarray, ...] = ()
        self.regions = self.nodes = 0
        self.unverified = 0  # leaves kept only because no LP proved them thin
        self.unverified_max = 0.0  # the largest ||J|| among them: part of the upper bound only
        self.timed_out = False
        self.X = np.zeros((0, ch.in_dim))
        self.Xabs = self.X

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.t0 > self.time_limit

    def push(self, child: _Node) -> None:
        # largest bound first; ties broken deepest first
        heapq.heappush(self.heap, (-child.bound, -child.depth, next(self.counter), child))

    def start(self, X: np.ndarray, incumbent: float, best_x: np.ndarray) -> None:
        """The root region (every input) with the samples ``X`` as feasibility witnesses."""
        self.X, self.Xabs = X, np.abs(X)
        self.incumbent, self.best_x = incumbent, best_x
        A0, c0 = self.ch.weights[0], self.ch.biases[0]
        n0 = self.ch.in_dim
        root = _Node(0, 0, A0, c0, np.zeros(0), np.zeros((0, n0)), np.zeros(0), np.zeros(n0),
                     math.inf, np.arange(X.shape[0]), np.full(X.shape[0], np.inf), None,
                     self.nb(0, A0, c0, np.zeros(0), None), 0, ok=True, Aabs=np.abs(A0))
        self.heap = [(-root.bound, 0, next(self.counter), root)]

    def run(self) -> None:
        while self.heap:
            negb, _, _, node = heapq.heappop(self.heap)
            if -negb <= self.incumbent:
                self.heap.clear()
                return
            if self.out_of_time():
                heapq.heappush(self.heap, (negb, 0, next(self.counter), node))
                self.timed_out = True
                return
            self.nodes += 1
            children, implied = self._split(node)
            if self.timed_out:
                heapq.heappush(self.heap, (negb, 0, next(self.counter), node))
                return
            for child in children:
                self._expand(node, child, implied)

    def _split(self, node: _Node) -> tuple[list[_Child], bool]:
        """The children of fixing neuron ``node.m`` of layer ``node.h``, and whether the
        single child's constraint holds on the whole region (a zero row, or the box)."""
        k = node.m
        a = node.A[k]
        off = float(node.c[k])
        an = float(np.linalg.norm(a))
        q, p = self.ch.slopes[node.h]
        # a row within its own rounding error of 0 is 0: z_k = off on the whole region (the
        # error of each entry of A = W D A_prev is below (n + 2) eps (|W||D||A_prev|)_kj)
        aabs = np.abs(a) if node.Aabs is None else node.Aabs[k]
        if an <= self.gam_A * float(np.linalg.norm(aabs)):
            return [(p if off >= 0 else q, None, 0.0, node.x, node.r, node.samples,
                     node.sslack, node.ok)], True
        nrow, noff = a / an, off / an
        sides = [(1.0, p), (-1.0, q)]
        implied = False
        if node.box is not None:
            bc = (node.box[0] + node.box[1]) / 2
            br = (node.box[1] - node.box[0]) / 2
            zc = float(nrow @ bc + noff)
            zr = float(np.abs(nrow) @ br)
            zr += self.gam * (float(np.abs(nrow) @ np.abs(bc)) + abs(noff) + zr)
            if zc - zr > self.tol:
                sides, implied = [(1.0, p)], True
            elif zc + zr < -self.tol:
                sides, implied = [(-1.0, q)], True
        gam = self.gam
        proj = (self.X[node.samples] @ nrow + noff,  # the samples' and the witness's slacks
                gam * (self.Xabs[node.samples] @ np.abs(nrow) + abs(noff)),
                float(node.x @ nrow + noff),
                gam * (float(np.abs(node.x) @ np.abs(nrow)) + abs(noff)))
        children: list[_Child] = []
        for s, slope in sides:
            child = self._side(node, nrow, noff, s, slope, proj=proj, single=len(sides) == 1)
            if self.timed_out:
                break
            if child is not None:
                children.append(child)
        return children, implied

    def _side(self, node: _Node, nrow: np.ndarray, noff: float, s: float, slope: float, *,
              proj: tuple[np.ndarray, np.ndarray, float, float], single: bool) -> _Child | None:
        """One side ``s (nrow . x + noff) > 0`` of a split with a witness inside it (the
        parent's, a sample, or the Chebyshev centre of an LP), or ``None`` when it is empty
        (no ball of radius > region_tol inside) or the time is up (``timed_out`` set)."""
        gam, tol = self.gam, self.tol
        sv, serr, wv, werr = proj
        sl = np.minimum(node.sslack, s * sv - serr)
        keep = sl > tol
        sidx, sslk = node.samples[keep], sl[keep]
        row = (slope, s * nrow, s * noff)
        if node.ok and s * wv - werr > tol:
            return (*row, node.x, min(node.r, s * wv - werr), sidx, sslk, True)
        if sidx.size:
            j = int(np.argmax(sslk))
            return (*row, self.X[sidx[j]], float(sslk[j]), sidx, sslk, True)
        if single:
            # the box proves this side holds on the whole region: the region is the parent's,
            # with the parent's witness (verified or not)
            return (*row, node.x, node.r, sidx, sslk, node.ok)
        if self.out_of_time():
            self.timed_out = True
            return None
        G = np.vstack([node.G, s * nrow])
        g = np.append(node.g, s * noff)
        st, xl, t_lp = self.lp.chebyshev(G, g)
        if st == "ok" and xl is not None and t_lp <= tol:
            return None  # HiGHS: no ball of radius > region_tol inside; skipped
        if st == "ok" and xl is not None:
            sla = G @ xl + g - gam * (np.abs(G) @ np.abs(xl) + np.abs(g))
            rr = float(np.min(sla))
            if rr > tol:
                return (*row, xl, rr, sidx, sslk, True)
            # the LP says non-empty, its centre does not verify: keep
            return (*row, xl, -math.inf, sidx, sslk, False)
        # no claim from the solver: the side may be non-empty, keep it
        return (*row, node.x, -math.inf, sidx, sslk, False)

    def _box(self, box: Any, G: np.ndarray, g: np.ndarray) -> Any:
        nbx = self.lp.box(G, g)
        if nbx is None:
            return box
        return nbx if box is None else _intersect(box, nbx)

    def _expand(self, node: _Node, child: _Child, implied: bool) -> None:
        """Push a child's sub-tree (next neuron, or the next layer's first), or score a full
        region: its Jacobian norm is the new incumbent when its witness is verified."""
        slope, row, roff, wx, wr, sidx, sslk, wok = child
        k = node.m
        sig = np.append(node.sig, slope)
        if implied:
            # the box (or a zero row) proves the sign on the whole region: no new constraint
            G, g = node.G, node.g
        else:
            G, g = np.vstack([node.G, row]), np.append(node.g, roff)
        if k + 1 < node.A.shape[0]:
            box = node.box
            if (self.use_box and not implied and (k + 1) % _BOX_EVERY == 0 and G.shape[0] > 0
                    and not self.out_of_time()):
                box = self._box(box, G, g)
            bd = self.nb(node.h, node.A, node.c, sig, box)
            if bd > self.incumbent:
                self.push(_Node(node.h, k + 1, node.A, node.c, sig, G, g, wx, wr, sidx, sslk,
                                box, bd, node.depth + 1, node.pattern, wok, node.Aabs))
            return
        pattern = (*node.pattern, sig)
        if node.h == self.H - 1:
            self.regions += 1
            v = _mat_norm(self.ch.weights[-1] @ (sig[:, None] * node.A), self.norm)
            if not wok:
                self.unverified += 1
                self.unverified_max = max(self.unverified_max, v)
            elif v > self.incumbent:
                self.incumbent = v
                self.best_x = np.array(wx, dtype=np.float64)
                self.best_pattern = pattern
            return
        A2, c2, Aabs2 = _child_layer_state(self.ch, node, sig)
        box = node.box
        if self.use_box and G.shape[0] > 0 and not self.out_of_time():
            box = self._box(box, G, g)
        bd = self.nb(node.h + 1, A2, c2, np.zeros(0), box)
        if bd > self.incumbent:
            self.push(_Node(node.h + 1, 0, A2, c2, np.zeros(0), G, g, wx, wr, sidx, sslk, box,
                            bd, node.depth + 1, pattern, wok, Aabs2))


def _samples(
    ch: PiecewiseLinearChain, norm: str, n_samples: int, seed: int
) -> tuple[np.ndarray, float, np.ndarray]:
    """``(X, incumbent, best_x)``: random samples, a first incumbent and its point.

    The samples are cheap feasibility witnesses, drawn at the scales where neurons can change
    sign: a neuron of layer i with |z_i(0)| = rho keeps its sign on the ball
    ||x|| < rho / prod_{j<=i} ||W_j|| (z_i is that Lipschitz), so those distances (relative,
    like everything here) are the natural radii; 1 when every bias is 0."""
    n0 = ch.in_dim
    rng = np.random.default_rng(seed)
    X0 = np.zeros((1, n0))
    pre0, _ = ch.forward_patterns(X0)
    radii: list[float] = []
    lip = 1.0
    for i, z in enumerate(pre0):
        lip *= max(float(np.linalg.norm(ch.weights[i], 2)), 1e-300)
        az = np.abs(z[0])
        if np.any(az > 0):
            radii.append(float(np.max(az)) / lip)
    Rs_all = sorted({math.ldexp(1.0, math.frexp(r)[1]) for r in radii if 0 < r < math.inf})
    Rs_all = Rs_all[:1] + Rs_all[-1:] if len(Rs_all) > 2 else Rs_all
    if not Rs_all:
        Rs_all = [1.0]
    scales = np.concatenate(
        [R * np.array([0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 100.0]) for R in Rs_all]
    )
    X = rng.standard_normal((n_samples, n0)) / math.sqrt(n0)
    X = X * np.repeat(scales, -(-n_samples // len(scales)))[:n_samples, None]
    X = np.vstack([X0, X])
    pre, Jac = ch.forward_patterns(X)
    sample_vals = _batch_norm(Jac, norm)
    # a sample with every pre-activation non-zero lies in the interior of a full-dimensional
    # region, where f is differentiable: its Jacobian norm is a realised (certified) lower
    # bound. "Non-zero" is relative: |z| above 1e-9 times the layer's largest |z| at that sample.
    inside = np.ones(X.shape[0], dtype=bool)
    for z in pre:
        az = np.abs(z)
        inside &= np.all(az > 1e-9 * az.max(axis=1, keepdims=True), axis=1)
    vals = np.where(inside, sample_vals, -np.inf)
    best_i = int(np.argmax(vals))
    incumbent = float(vals[best_i]) if inside[best_i] else 0.0
    return X, incumbent, X[best_i].copy()


def _branch_and_bound(
    ch: PiecewiseLinearChain, norm: str, o: _BnbOptions, *, t0: float
) -> dict[str, Any]:
    """validate (an affine net is one region) -> sample (first incumbent) -> search
    (:class:`_Search`) -> assemble the certified interval."""
    n0 = ch.in_dim
    if len(ch.weights) == 1:
        J = ch.weights[0]
        return dict(lower=_mat_norm(J, norm), upper=_mat_norm(J, norm), finished=True,
                    x=np.zeros(n0), regions=1, lps=0, nodes=0,
                    notes=["the network is affine: one region"])
    search = _Search(ch, norm, o, t0)
    X, incumbent, best_x = _samples(ch, norm, o.n_samples, o.seed)
    search.start(X, incumbent, best_x)
    search.run()
    open_bound = max((-e[0] for e in search.heap), default=0.0)
    upper = max(search.incumbent, open_bound, search.unverified_max * _INFLATE)
    # finished: every sub-tree was explored or pruned, and no region that the LPs could not
    # decide carries a larger norm than the best verified one
    finished = not search.timed_out and search.unverified_max <= search.incumbent
    return dict(
        lower=search.incumbent,
        upper=upper if not finished else search.incumbent,
        finished=finished,
        timed_out=search.timed_out,
        x=search.best_x,
        regions=search.regions,
        lps=search.lp.count,
        nodes=search.nodes,
        pattern=search.best_pattern,
        notes=[],
        sample_best=incumbent,
        unverified=search.unverified,
        unverified_max=search.unverified_max,
    )


def _autograd_norm(
    model: nn.Module, input_shape: tuple[int, ...], x: np.ndarray, norm: str
) -> float:
    m64 = copy.deepcopy(model).to(torch.float64).eval()
    xt = torch.tensor(x, dtype=torch.float64).reshape(1, *input_shape)

    def f(v: torch.Tensor) -> torch.Tensor:
        # a clone: the model may write its input in place (autograd refuses that on a leaf)
        return m64(v.reshape(1, *input_shape).clone()).reshape(-1)

    J = torch.autograd.functional.jacobian(f, xt.reshape(-1))
    return _mat_norm(J.detach().numpy(), norm)


def exact(  # noqa: PLR0913 - the public entry point: one keyword option per knob
    model: nn.Module | Analysis,
    input_shape: Sequence[int] | int | None = None,
    *,
    norm: int | float | str = 2,
    time_limit: float = 60.0,
    region_tol: float = 1e-6,
    n_samples: int = 2000,
    enum_limit: int = 8,
    pair_enum_limit: int = 14,
    seed: int = 0,
    use_box: bool | None = None,
) -> ExactResult:
    """Exact Lipschitz constant of a ReLU / leaky-ReLU network (branch and bound over regions).

    ``L(f) = max`` over the full-dimensional linear regions of ``||J||`` (see the module
    docstring for the algorithm and the proofs). Supports norms 2, 1 and inf (the induced matrix
    norms: spectral, max abs column sum, max abs row sum).

    Parameters
    ----------
    time_limit:  seconds; on time-out the result has ``bound="lower"``, ``value`` = the best
                 realised region's norm (a witnessed, certified LOWER bound) and ``upper`` = the
                 best certified upper bound found so far.
    region_tol:  regions whose largest inscribed ball has radius ``<= region_tol`` (input units)
                 count as empty.
    n_samples:   random points used as cheap feasibility witnesses.
    enum_limit:  free neurons up to which a node's factor is maximised by vertex enumeration.
    pair_enum_limit: widths up to which SeqLip pair factors of the tail are enumerated exactly.

    Returns an :class:`ExactResult` (``finished``, ``lower``, ``upper``, ``regions_visited``,
    ``lps_solved``, ``witness``).
    """
    t0 = time.perf_counter()
    an, _ = analysis_of(model, input_shape)
    model, shape = an.model, an.input_shape
    nrm = check_norm(norm, method="exact")
    check_positive("time_limit", time_limit)
    check_positive("region_tol", region_tol)
    check_positive("n_samples", n_samples, integer=True)
    check_positive("enum_limit", enum_limit, integer=True, allow_zero=True)
    check_positive("pair_enum_limit", pair_enum_limit, integer=True, allow_zero=True)
    ch, scale_exp = normalise_chain(piecewise_linear_chain(an))
    opts = _BnbOptions(time_limit=float(time_limit), region_tol=float(region_tol),
                       n_samples=n_samples, enum_limit=enum_limit,
                       pair_enum_limit=pair_enum_limit, seed=seed, use_box=use_box)
    out = _branch_and_bound(ch, nrm, opts, t0=t0)
    notes: list[str] = list(out["notes"])
    # back to the model's scale: times 2^E, exact unless the result is subnormal (then the
    # upper bound is rounded up, the lower one down); beyond float64 -> NonFiniteError
    value_n = float(out["lower"])
    lower = _ldexp_checked(value_n, scale_exp, up=False, what="realised")
    upper = _ldexp_checked(float(out["upper"]), scale_exp, up=True, what="certified upper")
    value_up = _ldexp_checked(value_n, scale_exp, up=True, what="exact")
    certified = True
    if lower > 0:
        ag = _autograd_norm(model, shape, out["x"], nrm)
        if not abs(ag - lower) <= 1e-6 * lower:  # relative: the check holds at every scale
            certified = False
            notes.append(
                f"autograd check at the witness gives {ag:.10g}, not {lower:.10g}: the dense chain "
                "extracted from the model disagrees with the model; result NOT certified"
            )
        else:
            lower = min(lower, ag)
    finished = bool(out["finished"])
    n_unv = int(out.get("unverified", 0))
    if n_unv:
        unv = _ldexp_checked(float(out["unverified_max"]), scale_exp, up=True, what="upper")
        notes.append(
            f"{n_unv} region(s) were neither proven thin by HiGHS nor witnessed by a verified "
            f"interior point (LP failure or an unverifiable centre); their largest norm "
            f"{unv:.6g} counts in the upper bound only"
        )
    if finished:
        notes.append(
            "exact: max over full-dimensional regions of ||J||; relies on HiGHS's claims that "
            f"skipped regions contain no ball of radius > {region_tol:g} (input units)"
        )
        value, bound = value_up, "exact"  # = the realised value unless rounded (subnormal)
        upper = value_up
    else:
        why = (
            f"time limit {time_limit:g}s reached"
            if out.get("timed_out", True)
            else "undecided regions (see above)"
        )
        notes.append(
            f"{why}: value is a certified LOWER bound (a realised region, witness x in "
            f"`witness`); upper={upper:.6g} is a certified UPPER bound (largest bound among "
            "unexplored sub-trees and undecided regions)"
        )
        value, bound = lower, "lower"
    if not certified:
        bound = "estimate"
    return ExactResult(
        value=value,
        certified=certified,
        method="exact",
        norm=nrm,
        bound=bound,  # type: ignore[arg-type]
        upper=upper if certified else None,
        iterations=int(out["nodes"]),
        seconds=time.perf_counter() - t0,
        notes=tuple(notes),
        lower=lower,
        how="branch and bound over activation regions (HiGHS LPs)",
        finished=finished,
        regions_visited=int(out["regions"]),
        lps_solved=int(out["lps"]),
        nodes_explored=int(out["nodes"]),
        witness=Witness(
            kind="region",
            x=torch.tensor(np.asarray(out["x"], dtype=np.float64)).reshape(shape),
        ),
        extra={
            "sample_best": _ldexp_checked(
                float(out.get("sample_best", 0.0)), scale_exp, up=False, what="sample"
            ),
            "scale_exponent": scale_exp,
        },
    )
