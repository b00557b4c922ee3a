r"""LipSDP-Neuron for feed-forward chains by per-layer Schur complements (no SDP solver).

The LMI
-------
Chain ``x -> W_1 -> phi_1 -> ... -> W_H -> phi_H -> W_K`` (``K = H + 1``), activation ``i`` slope
restricted in ``[a_i, b_i]``, ``c_i = (a_i + b_i)^2``, diagonal multipliers ``T_i >= 0``. Input
normalised to ``rho = 1`` (the LMI of :mod:`lipbound.methods.sdp` divided by ``rho``, multipliers
``T/rho``) and the output term moved into an extra block by a Schur complement, ``-M`` becomes
the block tri-diagonal matrix with diagonal blocks ``A_0..A_H, A_{H+1}`` and off-diagonal blocks
``C_1..C_{H+1}``::

    A_0 = I + 2 a_1 b_1 W_1^T T_1 W_1,   A_i = 2 T_i + 2 a_{i+1} b_{i+1} W_{i+1}^T T_{i+1} W_{i+1},
    A_H = 2 T_H,   A_{H+1} = r I,   C_i = -(a_i + b_i) W_i^T T_i (i <= H),   C_{H+1} = W_K^T.

If this matrix is PSD then (Schur complement on ``r I``) the LipSDP-neuron LMI holds with
``rho = r``, so ``L_2(f) <= sqrt(r)``: the sector terms are non-negative for every pair of
inputs (S-procedure, see :mod:`lipbound.methods.sdp`).

Schur recursion (exact for given ``T``). Eliminating blocks in order, ``-M > 0`` iff every
``X_i > 0`` with ``X_0 = A_0``, ``X_i = A_i - C_i^T X_{i-1}^{-1} C_i``, and the smallest ``r`` is
``lambda_max(W_K X_H^{-1} W_K^T)``. With ``P_i = X_i`` minus its ``2ab`` term (``P_0 = I``),
``B = D^{1/2} W_i``, ``T_i = s D``, ``G = B P_{i-1}^{-1} B^T`` and ``tau = 2 a_i b_i s`` the push-
through identity ``B (P + tau B^T B)^{-1} B^T = G (I + tau G)^{-1}`` gives

    P_i = s D^{1/2} [2 I - c_i s G (I + tau G)^{-1}] D^{1/2},

whose eigen-condition ``c s g / (1 + tau g) < 2`` for every eigenvalue ``g`` of ``G`` reads
``s g (c - 4ab) < 2``, and ``c - 4ab = (b - a)^2``: for fixed ``D`` the feasible multipliers are
EXACTLY ``0 < s < 2 / ((b - a)^2 g_max)`` (this also gives ``1 + tau g > 0``). The optimiser
parametrises ``D = exp(u)`` and ``s = sigmoid(v) s_max`` with ``s_max`` computed from a smooth
upper bound of ``g_max`` (log-sum-exp of the eigenvalues), so every parameter value is feasible
and the objective is smooth; ``r`` is smoothed the same way, with continuation.

Closed form (ECLipsE-Fast type; our derivation). ``D = I``, ``k_i = lambda_max(W_i P_{i-1}^{-1}
W_i^T)`` and ``s_i = 1 / ((c_i + 4 max(0, -a_i b_i)) k_i)``. Then ``s_i <= 2 / ((b-a)^2 k_i) /
2`` (as ``(b-a)^2 <= c + 4 max(0, -ab)``), i.e. half way to the feasibility boundary, and for
``ab = 0``: ``P_i = s(2I - c s K) >= s I``, the maximiser of that lower bound. The result is
``L <= sqrt(lambda_max(W_K P_H^{-1} W_K^T))``; it is the warm start and is certified on its own.

Certificate (proof in float64, whatever the optimiser returned). Write ``-M_ext = sum_i S_i``
with ``S_i`` supported on blocks ``(i-1, i)``:
``S_i = [[Z_{i-1}, C_i], [C_i^T, A_i - Z_i]]`` with ``Z_0 = A_0``, ``Z_{H+1} = 0`` and floating-
point matrices ``Z_i`` of our choice (``Z_i = fl(A_i - C_i^T Z_{i-1}^{-1} C_i) - eta_i I``; their
values need no accuracy since they cancel exactly in the sum). If every exact ``S_i`` is PSD, so
is ``-M_ext``. Each ``S_i`` (order ``m``) is checked by a Cholesky factorisation: let ``S~`` be its
float64 formation with ``||S - S~||_2 <= eps`` (entrywise ``|fl(x) - x| <= gamma_k |.|``
bounds for the ``k``-term products, ``gamma_k = k u / (1 - k u)``, summed with absolute values
and bounded in norm by the largest row sum of the non-negative bound matrix), and
``A~ = fl(S~ - delta I)``. If Cholesky of ``A~`` runs to completion then ``R^T R = A~ + dA`` with
``|dA| <= gamma_{m+1} |R^T||R|`` (Higham, *Accuracy and Stability*, Thm 10.3; it holds for any
order of the inner products, so for blocked LAPACK / cuSOLVER factorisations), and
``(|R^T||R|)_jk <= ||r_j|| ||r_k||`` with ``||r_j||^2 <= a~_jj / (1 - gamma_{m+1})``, so
``||dA||_2 <= gamma' tr(A~)``, ``gamma' = gamma_{m+1} / (1 - gamma_{m+1})``. Hence
``S >= (delta - gamma' tr(A~) - u max|s~_jj - delta| - eps) I``, PSD when
``delta >= gamma' tr(A~) + u max|s~_jj - delta| + eps``; this inequality is checked after the
factorisation with 1% slack for the rounding of these few scalar operations. The last block has
``A_{H+1} = r I``; ``r`` is raised until ``S_{H+1}`` passes. The bound is ``sqrt(r) C_K``
(``C_K`` the exact power-of-two rescaling of the weights), rounded up.

Block scaling. Before the splitting, the float blocks are multiplied by powers of two:
``A_i <- d_i^2 A_i``, ``C_i <- d_{i-1} d_i C_i``, ``C_{H+1} <- d_H d_out W_K^T`` with ``d_i =
2^k`` such that ``d_i^2 max diag(A_i)`` is near 1 and ``d_out^2 r`` near 1. This is the
congruence ``D (-M_ext) D`` with ``D = blockdiag(d_0 I, ..., d_H I, d_out I)`` invertible, so it
is PSD iff ``-M_ext`` is, and the output block becomes ``(d_out^2 r) I``: a verified ``r'`` there
gives ``r = r' / d_out^2``. Multiplying a float by a power of two is exact unless the result is
subnormal, where the error is at most ``2^-1075``; the smallest subnormal ``2^-1074`` is added to
every entrywise error bound of a scaled block, which covers it (an overflow gives ``inf`` and the
check fails). Without it, deep chains whose multipliers span ``1e10`` (ECLipsE's random nets,
depth 50) mixed scales beyond the float64 margins and every ``r`` was refused.

Optimiser. :func:`barrier_newton` minimises ``r`` over the same LMI by a barrier method on the
dense extended matrix (exact gradient and Hessian of ``-log det`` through the rank-2 neuron
terms; in power-of-two balanced coordinates), started at the closed form; it is used up to
``ipm_max_rows`` rows and gives up when a centring does not converge; then LBFGS (below) over the
smooth parametrisation. Whatever either returns is only an estimate until :func:`certify_schur`
proves it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.linalg import cho_solve, lapack, qr
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from ..errors import InvalidArgumentError, NonFiniteError
from ..spectral.certify import U as _U

__all__ = [
    "SchurCertificate",
    "SchurSolution",
    "certify_schur",
    "closed_form_multipliers",
    "schur_rho",
    "solve_schur",
]

_F64 = torch.float64


_TINY = float(np.finfo(np.float64).smallest_subnormal)  # |fl(d x) - d x| for d = 2^k


_TAU0 = 1.0  # the first tau is _TAU0 nu / r (0.1: 20% more Newton steps on 4 of 6 tabular nets)
_MAX_CENTRING = 150  # Newton steps per centring before the barrier method gives up (digits
# 256x2 needed 60 after a tau update: the damped steps move far-off multipliers slowly)


class _OutOfTime(Exception):
    """Internal: the LBFGS closure ran past ``time_limit`` (caught in :func:`_lbfgs_beta`)."""


def _pow2_inv_sqrt(x: float) -> float:
    """A power of two ``d`` with ``d^2 x`` near 1 (1 for non-positive or non-finite ``x``)."""
    if not (math.isfinite(x) and x > 0):
        return 1.0
    return float(2.0 ** (-round(math.log2(x) / 2)))


def _gamma(k: int) -> float:
    return k * _U / (1.0 - k * _U)


@dataclass(frozen=True)
class SchurCertificate:
    """``rho``: the verified ``r`` (normalised units) or ``None``; ``why``: the reason if not."""

    rho: float | None
    why: str
    etas: tuple[float, ...] = ()


@dataclass(frozen=True)
class SchurSolution:
    """Output of :func:`solve_schur` (normalised units: multiply ``sqrt(rho)`` by ``scale``)."""

    value: float | None  # certified optimised bound (None if its certificate failed)
    closed_form: float | None  # certified closed-form bound
    raw: float  # the optimiser's float value sqrt(rho) * scale (estimate)
    closed_raw: float  # the closed form's float value (estimate)
    multipliers: list[torch.Tensor]  # T_i of the optimised solution (normalised units)
    scale: float
    iterations: int
    why: str
    seconds_opt: float = 0.0
    seconds_verify: float = 0.0
    notes: list[str] = field(default_factory=list)


def _pow2(W: torch.Tensor) -> float:
    s = float(torch.linalg.matrix_norm(W, ord=2)) if W.numel() else 0.0
    if not math.isfinite(s) or s <= 0:
        return 1.0
    return float(2.0 ** round(math.log2(s)))


def _lse_max(ev: torch.Tensor, beta: float) -> torch.Tensor:
    """Smooth upper bound of ``max(ev)``: ``m + log(sum exp(beta (ev - m) / m)) m / beta``."""
    m = ev.max().detach().clamp_min(1e-300)
    return m + torch.logsumexp(beta * (ev - m) / m, 0) * m / beta



def _h_matrix(G: torch.Tensor, s: float | torch.Tensor, a: float, b: float,
              eye: torch.Tensor) -> torch.Tensor:
    """``(I + 2ab s G)^{-1} G``, symmetrised (``G`` itself when ``ab = 0``): the term of the
    layer's Schur complement that both the closed form and the optimiser use."""
    if a * b == 0:
        return G
    Hm = torch.linalg.solve(eye + (2 * a * b) * s * G, G)
    return (Hm + Hm.T) / 2

def _layer(
    P: torch.Tensor,
    W: torch.Tensor,
    a: float,
    b: float,
    u: torch.Tensor,
    v: torch.Tensor | None,
    *,
    beta: float | None,
    s_fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Schur step ``P_{i-1} -> P_i``; returns ``(P_i, T_i, g_max)`` (see the docstring)."""
    n = W.shape[0]
    L = torch.linalg.cholesky(P)
    d = torch.exp(u - u.mean()) if n else u
    sq = d.sqrt()
    B = W * sq[:, None]
    Y = torch.linalg.solve_triangular(L, B.T, upper=False)
    G = Y.T @ Y
    G = (G + G.T) / 2
    eye = torch.eye(n, dtype=P.dtype, device=P.device)
    if s_fixed is not None:
        s = s_fixed
        g = torch.linalg.eigvalsh(G).max().clamp_min(1e-300)
    else:
        ev = torch.linalg.eigvalsh(G)
        g = (_lse_max(ev, beta) if beta else ev.max()).clamp_min(1e-300)
        if v is None:
            raise InvalidArgumentError("_layer: give either v or s_fixed")
        if b > a:
            s = torch.sigmoid(v) * 2.0 / ((b - a) ** 2 * g)
        else:
            s = torch.exp(v) / g
    c = (a + b) ** 2
    Hm = _h_matrix(G, s, a, b, eye)
    Q = 2 * eye - c * s * Hm
    Pn = s * (sq[:, None] * Q * sq[None, :])
    return (Pn + Pn.T) / 2, s * d, g


def schur_rho(
    Ws: Sequence[torch.Tensor],
    ranges: Sequence[tuple[float, float]],
    us: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    beta: float | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(r, [T_i])``: smallest output ``r`` of the normalised LMI at the parametrised ``T``."""
    P = torch.eye(Ws[0].shape[1], dtype=_F64, device=Ws[0].device)
    ts = []
    for i, (a, b) in enumerate(ranges):
        P, t, _ = _layer(P, Ws[i], a, b, us[i], vs[i], beta=beta)
        ts.append(t)
    L = torch.linalg.cholesky(P)
    Y = torch.linalg.solve_triangular(L, Ws[-1].T, upper=False)
    ev = torch.linalg.eigvalsh((Y.T @ Y + (Y.T @ Y).T) / 2)
    r = _lse_max(ev, beta) if beta else ev.max()
    return r, ts


def _top_eig(G: torch.Tensor) -> torch.Tensor:
    """``lambda_max`` of a symmetric ``G``: ``eigvalsh`` up to order 400, Lanczos (ARPACK,
    relative tolerance 1e-12) beyond. Only used to CHOOSE multipliers (an estimate; the
    certificate checks whatever comes out), so its accuracy only affects tightness."""
    n = G.shape[0]
    if n <= 400:
        return torch.linalg.eigvalsh(G).max()
    Gn = G.detach().cpu().numpy()
    try:
        val = float(eigsh(Gn, k=1, which="LA", tol=1e-12, v0=np.ones(n), ncv=24)[0][0])
    except ArpackNoConvergence:
        val = float(np.linalg.eigvalsh(Gn).max())
    return torch.tensor(val, dtype=G.dtype, device=G.device)


def closed_form_multipliers(
    Ws: Sequence[torch.Tensor], ranges: Sequence[tuple[float, float]]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Closed-form ``T_i = s_i I`` (docstring) as parameters ``(us, vs)``, the ``T_i`` and ``r``.

    One Cholesky, one triangular solve, one Gram matrix and one top eigenvalue per layer.
    """
    dev = Ws[0].device
    P = torch.eye(Ws[0].shape[1], dtype=_F64, device=dev)
    us, vs, ts = [], [], []
    for i, (a, b) in enumerate(ranges):
        W = Ws[i]
        n = W.shape[0]
        eye = torch.eye(n, dtype=_F64, device=dev)
        u = torch.zeros(n, dtype=_F64, device=dev)
        L = torch.linalg.cholesky(P)
        Y = torch.linalg.solve_triangular(L, W.T, upper=False)
        G = Y.T @ Y
        G = (G + G.T) / 2
        k = _top_eig(G).clamp_min(1e-300)
        den = (a + b) ** 2 + 4 * max(0.0, -a * b)
        s = 1.0 / (den * k) if den > 0 else 1.0 / k
        c = (a + b) ** 2
        Hm = _h_matrix(G, s, a, b, eye)
        P = s * (2 * eye - c * s * Hm)
        P = (P + P.T) / 2
        # the same point in the optimiser's parametrisation (g_max = k)
        if b > a:
            ratio = (s * (b - a) ** 2 * k / 2).clamp(1e-12, 1 - 1e-12)
            v = torch.log(ratio) - torch.log1p(-ratio)
        else:
            v = torch.log(s * k)
        us.append(u)
        vs.append(v.reshape(()))
        ts.append(s * torch.ones(n, dtype=_F64, device=dev))
    L = torch.linalg.cholesky(P)
    Y = torch.linalg.solve_triangular(L, Ws[-1].T, upper=False)
    K = Y.T @ Y
    r = _top_eig((K + K.T) / 2)
    return us, vs, ts, r


# ----------------------------------------------------------------------------------------------
# certificate


def _blocks(
    Ws: Sequence[torch.Tensor], ranges: Sequence[tuple[float, float]], ts: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Float ``A_i`` (i <= H), entrywise error bounds of them, ``C_i`` and their error bounds."""
    H = len(ranges)
    dev = Ws[0].device
    A: list[torch.Tensor] = []
    Aerr: list[torch.Tensor] = []
    for i in range(H + 1):
        n = Ws[i].shape[1]
        base = torch.eye(n, dtype=_F64, device=dev) if i == 0 else torch.diag(2 * ts[i - 1])
        Ai, Ei = base, torch.zeros_like(base)
        if i < H:
            a, b = ranges[i]
            if a * b != 0:
                W, t = Ws[i], ts[i]
                ab2 = 2 * a * b
                Ai = base + ab2 * ((W.T * t) @ W)
                absterm = abs(ab2) * ((W.abs().T * t) @ W.abs())
                Ei = _gamma(W.shape[0] + 8) * (base.abs() + absterm)
        A.append((Ai + Ai.T) / 2 if i < H else Ai)
        Aerr.append(Ei)
    C: list[torch.Tensor] = []
    Cerr: list[torch.Tensor] = []
    for i in range(H):
        a, b = ranges[i]
        Ci = -(a + b) * (Ws[i].T * ts[i])
        C.append(Ci)
        Cerr.append(_gamma(4) * Ci.abs())
    C.append(Ws[-1].T.contiguous())
    Cerr.append(torch.zeros_like(C[-1]))
    return A, Aerr, C, Cerr


def _psd_check(
    top: torch.Tensor,
    C: torch.Tensor,
    bot: torch.Tensor,
    err_top: torch.Tensor | None,
    err_c: torch.Tensor,
    err_bot: torch.Tensor | None,
) -> bool:
    """Proves ``[[top, C], [C^T, bot]]`` (exact, within the given entrywise errors) is PSD."""
    S = torch.cat([torch.cat([top, C], 1), torch.cat([C.T, bot], 1)], 0)
    m = S.shape[0]
    n1 = top.shape[0]
    # eps: the largest row sum of the non-negative entrywise error bound (>= its 2-norm)
    rows = torch.zeros(m, dtype=_F64, device=S.device)
    if err_top is not None:
        rows[:n1] += err_top.sum(1)
    rows[:n1] += err_c.sum(1)
    rows[n1:] += err_c.sum(0)
    if err_bot is not None:
        rows[n1:] += err_bot.sum(1)
    eps = rows.max()
    dg = torch.diagonal(S)
    gp = _gamma(m + 1) / (1 - _gamma(m + 1))
    delta = 1.02 * (gp * dg.abs().sum() + 2 * _U * dg.abs().max() + eps) + 1e-300
    At = S - delta * torch.eye(m, dtype=_F64, device=S.device)
    _, info = torch.linalg.cholesky_ex(At)
    need = 1.01 * (gp * torch.diagonal(At).abs().sum() + _U * (dg - delta).abs().max() + eps)
    ok = (info == 0) & (delta >= need) & torch.isfinite(S).all()
    return bool(ok)


def certify_schur(
    Ws: Sequence[torch.Tensor],
    ranges: Sequence[tuple[float, float]],
    ts: Sequence[torch.Tensor],
    *,
    max_tries: int = 12,
) -> SchurCertificate:
    """Proof (module docstring) that ``-M_ext(r, T) >= 0``; returns the smallest ``r`` found.

    ``Ws`` are the (scaled) float64 weights, ``ts`` the multipliers in normalised units.
    """
    H = len(ranges)
    if len(ts) != H or any(t.shape[0] != Ws[i].shape[0] for i, t in enumerate(ts)):
        raise InvalidArgumentError("certify_schur: one multiplier vector per hidden layer needed")
    ts = [t.to(_F64) for t in ts]
    if any(bool((t < 0).any()) or not bool(torch.isfinite(t).all()) for t in ts):
        return SchurCertificate(None, "certificate failed: negative or non-finite multipliers")
    A, Aerr, C, Cerr = _blocks(Ws, ranges, ts)
    # exact congruence D S D with D = blockdiag(d_i I), d_i powers of two (docstring)
    ds = [_pow2_inv_sqrt(float(torch.diagonal(Ai).abs().max()) if Ai.numel() else 1.0) for Ai in A]
    for i in range(H + 1):
        A[i], Aerr[i] = A[i] * ds[i] ** 2, Aerr[i] * ds[i] ** 2 + _TINY
    for i in range(H):
        C[i], Cerr[i] = C[i] * (ds[i] * ds[i + 1]), Cerr[i] * (ds[i] * ds[i + 1]) + _TINY
    C[H], Cerr[H] = C[H] * ds[H], Cerr[H] * ds[H] + _TINY
    top = A[0]
    err_top: torch.Tensor | None = Aerr[0]
    etas: list[float] = []
    for i in range(1, H + 1):
        # Z_i = fl(A_i - C_i^T top^{-1} C_i) - eta I
        L, info = torch.linalg.cholesky_ex(top)
        if int(info) != 0:
            return SchurCertificate(
                None, f"certificate failed: Schur complement {i - 1} is not positive definite"
            )
        Y = torch.linalg.solve_triangular(L, C[i - 1], upper=False)
        Sch = A[i] - Y.T @ Y
        Sch = (Sch + Sch.T) / 2
        n = Sch.shape[0]
        eye = torch.eye(n, dtype=_F64, device=Sch.device)
        scale = float(torch.diagonal(Sch).abs().max()) if n else 1.0
        m = top.shape[0] + n
        eta = 4 * _gamma(m + 1) * (float(torch.diagonal(top).abs().sum()) + scale * n) + 1e-300
        ok = False
        for _ in range(max_tries):
            Z = Sch - eta * eye
            bot = A[i] - Z
            # exact A_i - Z: the error of A_i plus the rounding of the subtraction
            err_bot = Aerr[i] + _U * bot.abs()
            if _psd_check(top, C[i - 1], bot, err_top, Cerr[i - 1], err_bot):
                ok = True
                break
            eta *= 16
        if not ok:
            return SchurCertificate(
                None,
                f"certificate failed at hidden layer {i}: no shift eta made the 2x2 block PSD "
                "provably (the multipliers are infeasible or too close to the boundary)",
            )
        etas.append(eta)
        top, err_top = Z, None
    # last block: [[Z_H, W_K^T], [W_K, r I]]
    L, info = torch.linalg.cholesky_ex(top)
    if int(info) != 0:
        return SchurCertificate(None, "certificate failed: the last Schur complement is not PD")
    Y = torch.linalg.solve_triangular(L, C[H], upper=False)
    K = Y.T @ Y
    r0 = float(torch.linalg.eigvalsh((K + K.T) / 2).max())
    r0 = max(r0, 1e-300)
    # the output block scaled by d_out^2 too: r = r' / d_out^2 (both exact powers of two)
    dout = _pow2_inv_sqrt(r0)
    cH, eH = C[H] * dout, Cerr[H] * dout + _TINY
    r0 = r0 * dout**2
    nout = K.shape[0]
    bump = 1e-12
    for _ in range(max_tries + 8):
        r = r0 * (1 + bump) + 1e-300
        bot = torch.full((nout,), r, dtype=_F64, device=K.device).diag()
        if _psd_check(top, cH, bot, err_top, eH, None):
            rho = r / dout**2
            if rho * dout**2 < r:  # subnormal quotient: round up
                rho = float(np.nextafter(rho, math.inf))
            return SchurCertificate(rho, "verified", tuple(etas))
        bump *= 8
    return SchurCertificate(None, "certificate failed: no output bound r passed the check")


# ----------------------------------------------------------------------------------------------
# optimisation: interior point (barrier + Newton) on the dense extended LMI


class _Dense:
    """The extended LMI ``S(T, r) = E_0 + sum_j T_j A_j + [[0, W_K^T], [W_K, r I]]`` as a dense
    float64 matrix (numpy), with ``A_j = [w_j e_j] C_j [w_j e_j]^T`` for neuron ``j`` of hidden
    layer ``i`` (``w_j`` = row ``j`` of ``W_i`` on block ``i - 1``, ``e_j`` its unit vector on
    block ``i``, ``C_j = [[2 a b, -(a + b)], [-(a + b), 2]]``): the matrix of the module
    docstring written as a sum over neurons."""

    def __init__(self, Ws: Sequence[np.ndarray], ranges: Sequence[tuple[float, float]],
                 shortcut: np.ndarray | None = None) -> None:
        self.Ws = [np.ascontiguousarray(W, dtype=np.float64) for W in Ws]
        # a residual block's linear shortcut: the output couples to block 0 as well
        self.shortcut = None if shortcut is None else np.asarray(shortcut, dtype=np.float64)
        self.H = len(ranges)
        dims = [self.Ws[0].shape[1]] + [W.shape[0] for W in self.Ws]
        self.offs = np.concatenate([[0], np.cumsum(dims)]).astype(int)
        self.m = int(self.offs[-1])
        self.n0 = dims[0]
        self.N = int(sum(dims[1:-1]))
        self.ranges = list(ranges)
        c11, c12 = [], []
        for i, (a, b) in enumerate(ranges):
            n = self.Ws[i].shape[0]
            c11.append(np.full(n, 2 * a * b))
            c12.append(np.full(n, -(a + b)))
        self.c11 = np.concatenate(c11) if c11 else np.zeros(0)
        self.c12 = np.concatenate(c12) if c12 else np.zeros(0)
        self.c22 = np.full(self.N, 2.0)

    def blk(self, i: int) -> slice:
        return slice(int(self.offs[i]), int(self.offs[i + 1]))

    def split(self, t: np.ndarray) -> list[np.ndarray]:
        return [t[self.offs[i + 1] - self.n0 : self.offs[i + 2] - self.n0] for i in range(self.H)]

    def matrix(self, t: np.ndarray, r: float) -> np.ndarray:
        S = np.zeros((self.m, self.m))
        b0 = self.blk(0)
        S[b0, b0] = np.eye(self.n0)
        for i, ((a, b), ti) in enumerate(zip(self.ranges, self.split(t))):
            W = self.Ws[i]
            p, q = self.blk(i), self.blk(i + 1)
            if a * b != 0:
                S[p, p] += (2 * a * b) * ((W.T * ti) @ W)
            X = -(a + b) * (W.T * ti)
            S[p, q] += X
            S[q, p] += X.T
            S[q, q] += np.diag(2 * ti)
        p, q = self.blk(self.H), self.blk(self.H + 1)
        S[p, q] = self.Ws[-1].T
        S[q, p] = self.Ws[-1]
        if self.shortcut is not None:
            b0 = self.blk(0)
            S[b0, q] += self.shortcut.T
            S[q, b0] += self.shortcut
        S[q, q] += r * np.eye(S[q, q].shape[0])
        return S

    def barrier(self, t: np.ndarray, r: float, tau: float) -> tuple[float, np.ndarray | None]:
        """``tau r - log det S - sum log T`` (``inf`` outside the domain) and ``chol(S)``."""
        if not (np.all(t > 0) and r > 0):
            return math.inf, None
        L, info = _lapack_potrf(self.matrix(t, r))
        if info != 0:
            return math.inf, None
        return tau * r - 2 * float(np.log(np.diag(L)).sum()) - float(np.log(t).sum()), L

    def newton_system(
        self, t: np.ndarray, r: float, tau: float, L: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gradient and Hessian of :meth:`barrier` in ``(T, r)`` (``d/dT_j -log det S =
        -tr(R A_j)``, ``d^2 = tr(R A_j R A_l)``, ``R = S^{-1}``)."""
        R = _lapack_potri(L)
        n0, N, H = self.n0, self.N, self.H
        Fe = R[:, n0 : n0 + N]
        Fw = np.empty((self.m, N))
        for i in range(H):
            cols = slice(int(self.offs[i + 1]) - n0, int(self.offs[i + 2]) - n0)
            Fw[:, cols] = R[:, self.blk(i)] @ self.Ws[i].T
        Qww = np.empty((N, N))
        Qwe = np.empty((N, N))
        for i in range(H):
            rows = slice(int(self.offs[i + 1]) - n0, int(self.offs[i + 2]) - n0)
            Qww[rows] = self.Ws[i] @ Fw[self.blk(i)]
            Qwe[rows] = self.Ws[i] @ Fe[self.blk(i)]
        Qee = Fe[n0 : n0 + N]
        Qew = Qwe.T
        a1, a2, a3 = self.c11[:, None], self.c12[:, None], self.c22[:, None]
        b1, b2, b3 = self.c11[None, :], self.c12[None, :], self.c22[None, :]
        x11 = a1 * Qww + a2 * Qew
        x12 = a1 * Qwe + a2 * Qee
        x21 = a2 * Qww + a3 * Qew
        x22 = a2 * Qwe + a3 * Qee
        Hm = (x11 * b1 + x12 * b2) * Qww + (x11 * b2 + x12 * b3) * Qwe
        Hm += (x21 * b1 + x22 * b2) * Qew + (x21 * b2 + x22 * b3) * Qee
        g = -(self.c11 * np.diag(Qww) + 2 * self.c12 * np.diag(Qwe) + self.c22 * np.diag(Qee))
        g -= 1.0 / t
        Hm[np.diag_indices(N)] += 1.0 / t**2
        o = self.blk(H + 1)
        Roo = R[o, o]
        Gw, Ge = Fw[o], Fe[o]
        hjr = (
            self.c11 * (Gw * Gw).sum(0) + 2 * self.c12 * (Gw * Ge).sum(0)
            + self.c22 * (Ge * Ge).sum(0)
        )
        Hf = np.empty((N + 1, N + 1))
        Hf[:N, :N] = (Hm + Hm.T) / 2
        Hf[:N, N] = hjr
        Hf[N, :N] = hjr
        Hf[N, N] = float((Roo * Roo).sum())
        gf = np.concatenate([g, [tau - float(np.trace(Roo))]])
        return gf, Hf


def _lapack_potrf(S: np.ndarray) -> tuple[np.ndarray, int]:
    c, info = lapack.dpotrf(S, lower=1, clean=1, overwrite_a=1)
    return c, int(info)


def _lapack_potri(L: np.ndarray) -> np.ndarray:
    inv, info = lapack.dpotri(L, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError("dpotri failed")
    inv = np.tril(inv)
    return inv + np.tril(inv, -1).T


@dataclass(frozen=True)
class _NewtonOptions:
    """The stopping rules of :func:`_barrier_newton` (see :func:`barrier_newton`)."""

    deadline: float
    rel_gap: float
    mu: float
    max_newton: int


def barrier_newton(  # noqa: PLR0913 - its API (_residual, the tests): one keyword option per knob
    Ws: Sequence[np.ndarray],
    ranges: Sequence[tuple[float, float]],
    t0: np.ndarray,
    r0: float,
    *,
    deadline: float = math.inf,
    rel_gap: float = 1e-6,
    mu: float = 4.0,
    max_newton: int = 400,
    shortcut: np.ndarray | None = None,
) -> tuple[np.ndarray, float, int, str]:
    """Minimise ``r`` over ``S(T, r) >= 0, T >= 0`` by a barrier method (an estimate).

    ``shortcut``: the matrix ``S`` of a residual block ``y = S x + W_K phi(...)`` (its output
    block couples to the input block too: :mod:`lipbound.methods._residual`); the gradient and
    Hessian are unchanged, as the coupling does not depend on ``(T, r)``.

    Central path of ``tau r - log det S(T, r) - sum_j log T_j`` (self-concordant, convex in
    ``(T, r)``; its minimiser is ``nu / tau`` from optimal with ``nu = m + N``), each centring
    by damped Newton steps with backtracking (every trial point checked for positive definiteness
    by Cholesky), ``tau`` multiplied by ``mu`` until ``nu / tau <= rel_gap r``. Starts at
    ``(t0, 2 r0)``, ``t0`` strictly feasible with output bound ``r0``. Returns the last
    strictly feasible ``T``, its ``r``, the Newton steps and a status line. Nothing here is
    certified: :func:`certify_schur` proves whatever ``T`` comes out.
    """
    # the same LMI in balanced coordinates (congruence by blockdiag(d_i I), d_0 = 1):
    # W_i' = (d_{i-1} / d_i) W_i, T_i' = d_i^2 T_i, W_K' = d_H d_out W_K, r' = d_out^2 r, with
    # d_i^2 ~ 1 / T_i(start) and d_out^2 ~ 1 / r0, so every block of S is of order one
    t_in = np.asarray(t0, dtype=np.float64)
    sizes = [W.shape[0] for W in Ws[:-1]]
    parts = np.split(t_in, np.cumsum(sizes)[:-1]) if sizes else []
    d = [1.0] + [_pow2_inv_sqrt(float(np.exp(np.log(p).mean()))) for p in parts]
    dout = _pow2_inv_sqrt(r0)
    Wb = [np.asarray(W) * (d[i] / d[i + 1]) for i, W in enumerate(Ws[:-1])]
    Wb.append(np.asarray(Ws[-1]) * (d[-1] * dout))
    Sb = None if shortcut is None else np.asarray(shortcut) * dout  # d_0 = 1
    if Sb is None and Wb[0].shape[1] > Wb[0].shape[0]:
        # a wide first layer W_1 = R^T Q^T (thin QR of W_1^T, Q^T Q = I): S depends on W_1
        # only through W_1^T T_1 W_1 and W_1^T T_1, so the congruence by blockdiag([Q, Q_perp],
        # I, ...) splits S(W_1) into S(R^T) and an identity block. The barrier, its gradient
        # and its Hessian in (T, r) are those of the smaller LMI S(R^T) (n_1 input rows
        # instead of n_0; MNIST 784-256-10: 522 rows instead of 1050). Only the search
        # changes: certify_schur proves the returned T on the original weights.
        Wb[0] = np.ascontiguousarray(qr(Wb[0].T, mode="r")[0][: Wb[0].shape[0]].T)
    sc = np.concatenate([np.full(n, d[i + 1] ** 2) for i, n in enumerate(sizes)]) if sizes else t_in
    # overflow / 0 * inf in the Newton system (a zero weight matrix) is detected and ends the
    # search (_Centring.centre): numpy need not warn about it
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        t_b, r_b, steps, status = _barrier_newton(
            _Dense(Wb, ranges, Sb), t_in * sc, r0 * dout**2,
            _NewtonOptions(deadline=deadline, rel_gap=rel_gap, mu=mu, max_newton=max_newton),
        )
    return t_b / sc, r_b / dout**2, steps, status


def _barrier_newton(
    D: _Dense, t0: np.ndarray, r0: float, opts: _NewtonOptions
) -> tuple[np.ndarray, float, int, str]:
    """:func:`barrier_newton`'s barrier method on the balanced LMI ``D``, from ``(t0, 2 r0)``.

    The centrings before the last stop at a Newton decrement ``lambda^2 < 1e-2`` (the next
    ``tau`` moves the centre anyway); once ``nu / tau <= rel_gap r``, the point is centred to
    ``lambda^2 < 1e-6`` and returned."""
    nu = D.m + D.N
    c = _Centring(D, np.asarray(t0, dtype=np.float64).copy(), 2.0 * r0 + 1e-300, 0.0, opts)
    c.tau = _TAU0 * nu / c.r
    c.f, c.L = D.barrier(c.t, c.r, c.tau)
    if c.L is None:
        return c.t, r0, 0, "start point not strictly feasible"
    cap = 4 * _MAX_CENTRING  # the start is far off centre
    while True:
        why = c.centre(1e-2, cap)
        cap = _MAX_CENTRING
        if why is None and nu / c.tau <= opts.rel_gap * c.r:
            why = c.centre(1e-6, cap)
            if why is None:
                return c.t, c.r, c.steps, "converged"
        if why is not None:
            return c.t, c.r, c.steps, why
        c.tau *= opts.mu
        c.f, c.L = D.barrier(c.t, c.r, c.tau)


@dataclass
class _Centring:
    """The barrier method's state: the point ``(t, r)``, ``tau``, the barrier value ``f`` and
    ``chol(S)`` ``L`` there (``None`` outside the domain), the Newton steps so far."""

    D: _Dense
    t: np.ndarray
    r: float
    tau: float
    opts: _NewtonOptions
    f: float = math.inf
    L: np.ndarray | None = None
    steps: int = 0

    def centre(self, tol: float, cap: int) -> str | None:
        """Damped Newton steps with backtracking (every trial point checked by Cholesky) on
        the barrier at ``tau`` until ``lambda^2 < tol``; ``None``, or why it stopped."""
        D, o = self.D, self.opts
        for _ in range(cap):
            if self.steps >= o.max_newton or time.perf_counter() > o.deadline:
                return "stopped (Newton steps or time)"
            if self.L is None:
                return "left the domain"
            g, Hm = D.newton_system(self.t, self.r, self.tau, self.L)
            dg = np.diag(Hm)
            if not (np.isfinite(Hm).all() and np.isfinite(g).all() and (dg > 0).all()):
                # a zero weight matrix gives zero or non-finite rows in the system
                return "Newton system singular or not finite"
            dsc = 1.0 / np.sqrt(dg)
            Lh, info = _lapack_potrf(Hm * dsc[:, None] * dsc[None, :])
            if info != 0:
                return "Newton system not positive definite"
            dx = dsc * cho_solve((Lh, True), -g * dsc)
            lam2 = float(-g @ dx)
            self.steps += 1
            if lam2 < 1e-9:
                return None
            alpha = 1.0 if lam2 < 0.25 else 1.0 / (1.0 + math.sqrt(lam2))
            for _ in range(30):
                tn, rn = self.t + alpha * dx[:-1], self.r + alpha * float(dx[-1])
                fn, Ln = D.barrier(tn, rn, self.tau)
                if fn <= self.f - 0.25 * alpha * lam2:
                    break
                alpha *= 0.5
            else:
                return "line search failed"
            self.t, self.r, self.f, self.L = tn, rn, fn, Ln
            if lam2 < tol:
                return None
        return f"stalled (no centring in {cap} Newton steps)"


# ----------------------------------------------------------------------------------------------
# optimisation


def solve_schur(  # noqa: PLR0913 - the public entry point: one keyword option per knob
    weights: Sequence[np.ndarray | torch.Tensor],
    ranges: Sequence[tuple[float, float]],
    *,
    device: str | torch.device | None = None,
    max_iter: int = 300,
    time_limit: float | None = 60.0,
    betas: Sequence[float] = (1e2, 1e3, 1e4, 1e5, 1e6),
    optimise: bool = True,
    ipm_max_rows: int = 1500,
    ipm_max_steps: int = 400,
) -> SchurSolution:
    """Certified LipSDP-neuron bound of a chain by Schur complements (module docstring).

    Closed form first (certified); then, when the extended LMI has at most ``ipm_max_rows``
    rows, the dense barrier method :func:`barrier_newton` from there (at most
    ``ipm_max_steps`` Newton steps); if it did not converge, or the LMI is larger, LBFGS over
    the log-parametrised diagonal multipliers, warm-started at the closed form, with
    continuation on the smoothing ``betas``. Every candidate goes through
    :func:`certify_schur`; ``value`` is the smallest certified optimised bound (``None`` if
    none passed), ``closed_form`` the closed form's.
    """
    t0 = time.perf_counter()
    dev, Wt = _checked_weights(weights, ranges, device)
    cs = [_pow2(W) for W in Wt]
    Wp = [W / c for W, c in zip(Wt, cs)]
    CK = math.prod(cs)
    notes: list[str] = []
    rng = [(float(a), float(b)) for a, b in ranges]
    with torch.no_grad():
        us, vs, ts_c, r_c = closed_form_multipliers(Wp, rng)
    closed_raw = math.sqrt(max(float(r_c), 0.0)) * CK
    tsv = time.perf_counter()
    cert_c = certify_schur(Wp, rng, ts_c)
    seconds_verify = time.perf_counter() - tsv
    closed = _to_bound(cert_c.rho, CK)
    if cert_c.rho is None:
        notes.append(f"closed form: {cert_c.why}")
    st = _SchurRun(Wp=Wp, rng=rng, CK=CK, dev=dev, t0=t0, time_limit=time_limit, notes=notes,
                   raw=closed_raw, seconds_verify=seconds_verify)
    t_opt = time.perf_counter()
    verify_before = seconds_verify
    H = len(rng)
    m_rows = Wp[0].shape[1] + sum(W.shape[0] for W in Wp)
    run_lbfgs = optimise and H > 0
    if optimise and H > 0 and m_rows <= ipm_max_rows:
        run_lbfgs = _barrier_stage(st, ts_c, float(r_c), ipm_max_steps)
    if run_lbfgs:
        _lbfgs_stage(st, [*us, *vs], float(r_c), betas, max_iter)
    seconds_opt = time.perf_counter() - t_opt - (st.seconds_verify - verify_before)
    cands = st.cands
    if (not optimise or H == 0) and cert_c.rho is not None:
        cands.append((cert_c.rho, ts_c, cert_c))
    best_c = min(cands, key=lambda c: c[0]) if cands else None
    value = _to_bound(best_c[0], CK) if best_c else None
    why = best_c[2].why if best_c else "certificate failed for every optimised candidate"
    ts_best = best_c[1] if best_c else ts_c
    return SchurSolution(
        value=value,
        closed_form=closed,
        raw=st.raw,
        closed_raw=closed_raw,
        multipliers=[t.detach() for t in ts_best],
        scale=CK,
        iterations=st.it,
        why=why,
        seconds_opt=seconds_opt,
        seconds_verify=st.seconds_verify,
        notes=notes,
    )


@dataclass
class _SchurRun:
    """One :func:`solve_schur` call: the scaled chain and its time limit, and what the
    optimisers found (certified candidates, iterations, the raw value, verification seconds)."""

    Wp: list[torch.Tensor]
    rng: list[tuple[float, float]]
    CK: float
    dev: torch.device
    t0: float
    time_limit: float | None
    notes: list[str]
    raw: float
    seconds_verify: float
    it: int = 0
    cands: list[tuple[float, list[torch.Tensor], SchurCertificate]] = field(default_factory=list)


@dataclass
class _LbfgsPoint:
    """LBFGS's parameters ``[*us, *vs]`` and the best point seen (``best``: its float ``r``)."""

    params: list[torch.Tensor]
    best: float
    best_params: list[torch.Tensor]


def _checked_weights(
    weights: Sequence[np.ndarray | torch.Tensor],
    ranges: Sequence[tuple[float, float]],
    device: str | torch.device | None,
) -> tuple[torch.device, list[torch.Tensor]]:
    """The device and the weights as float64 tensors on it, checked: one slope range per hidden
    layer, finite entries, consecutive shapes."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    Wt = [torch.as_tensor(np.asarray(W) if not isinstance(W, torch.Tensor) else W) for W in weights]
    Wt = [W.detach().to(device=dev, dtype=_F64) for W in Wt]
    if len(Wt) != len(ranges) + 1:
        raise InvalidArgumentError(
            f"solve_schur: {len(Wt)} weight matrices need {len(Wt) - 1} slope ranges, "
            f"got {len(ranges)}"
        )
    for i, W in enumerate(Wt):
        if not bool(torch.isfinite(W).all()):
            raise NonFiniteError(f"solve_schur: weight matrix {i} has NaN or infinite entries")
        if i and W.shape[1] != Wt[i - 1].shape[0]:
            raise InvalidArgumentError(
                f"solve_schur: weight {i} has {W.shape[1]} columns, layer {i - 1} has "
                f"{Wt[i - 1].shape[0]} outputs"
            )
    return dev, Wt


def _barrier_stage(st: _SchurRun, ts_c: list[torch.Tensor], r_c: float, max_steps: int) -> bool:
    """The barrier method from the closed form ``(ts_c, r_c)``, its point certified (a
    candidate if it passes); returns whether LBFGS should run (no convergence, or no proof)."""
    # at most half the time: LBFGS gets the rest if the barrier method stalls
    deadline = math.inf if st.time_limit is None else st.t0 + 0.5 * st.time_limit
    t_n, _, steps, status = barrier_newton(
        [W.cpu().numpy() for W in st.Wp], st.rng, torch.cat(ts_c).cpu().numpy(), r_c,
        deadline=deadline, max_newton=max_steps,
    )
    st.it += steps
    sizes = [W.shape[0] for W in st.Wp[:-1]]
    ts_n = [torch.as_tensor(x, device=st.dev) for x in np.split(t_n, np.cumsum(sizes)[:-1])]
    tsv = time.perf_counter()
    cert_n = certify_schur(st.Wp, st.rng, ts_n)
    st.seconds_verify += time.perf_counter() - tsv
    if cert_n.rho is not None:
        st.cands.append((cert_n.rho, ts_n, cert_n))
        st.raw = math.sqrt(cert_n.rho) * st.CK  # the float r(T) of the certificate's recursion
    else:
        st.notes.append(f"barrier method: {cert_n.why}")
    st.notes.append(f"barrier method: {status} after {steps} Newton steps")
    return status != "converged" or cert_n.rho is None


def _lbfgs_stage(
    st: _SchurRun, start: list[torch.Tensor], r_c: float, betas: Sequence[float], max_iter: int
) -> None:
    """LBFGS from the closed form's parameters ``start = [*us, *vs]`` with continuation on the
    smoothing ``betas``; the best point found is certified (a candidate if it passes)."""
    H = len(st.rng)
    params = [p.clone().requires_grad_(True) for p in start]
    lb = _LbfgsPoint(params=params, best=r_c, best_params=[p.detach().clone() for p in params])
    for beta in betas:
        if st.time_limit is not None and time.perf_counter() - st.t0 > st.time_limit:
            st.notes.append(f"optimisation stopped by time_limit={st.time_limit:g} s")
            break
        if _lbfgs_beta(st, lb, beta, max(1, max_iter // len(betas))):
            break
    with torch.no_grad():
        r_o, ts_o = schur_rho(st.Wp, st.rng, lb.best_params[:H], lb.best_params[H:], None)
    raw_l = math.sqrt(max(float(r_o), 0.0)) * st.CK
    tsv = time.perf_counter()
    ts_o = [t.detach() for t in ts_o]
    cert_o = certify_schur(st.Wp, st.rng, ts_o)
    st.seconds_verify += time.perf_counter() - tsv
    if cert_o.rho is not None:
        if not st.cands or cert_o.rho < st.cands[0][0]:
            st.raw = raw_l
        st.cands.append((cert_o.rho, ts_o, cert_o))
    else:
        st.notes.append(f"LBFGS multipliers: {cert_o.why}")


def _lbfgs_beta(st: _SchurRun, lb: _LbfgsPoint, beta: float, max_iter: int) -> bool:
    """One LBFGS stage at smoothing ``beta`` (at most ``max_iter`` iterations); keeps the best
    point in ``lb`` (else restores it); returns whether to stop (left the feasible set, or
    ran past ``time_limit``)."""
    H = len(st.rng)
    params = lb.params
    time_limit, t0 = st.time_limit, st.t0
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            raise _OutOfTime
        opt.zero_grad()
        r, _ = schur_rho(st.Wp, st.rng, params[:H], params[H:], beta)
        loss = torch.log(r)
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except torch.linalg.LinAlgError:
        st.notes.append(f"LBFGS stage beta={beta:g} left the feasible set; kept the best")
        return True
    except _OutOfTime:
        st.notes.append(f"LBFGS stopped by time_limit={time_limit:g} s; kept the best")
        with torch.no_grad():
            r_now, _ = schur_rho(st.Wp, st.rng, params[:H], params[H:], None)
        if torch.isfinite(r_now) and float(r_now) < lb.best:
            lb.best_params = [p.detach().clone() for p in params]
        return True
    state = opt.state[opt._params[0]]
    st.it += int(state.get("n_iter", 0))
    with torch.no_grad():
        r_now, _ = schur_rho(st.Wp, st.rng, params[:H], params[H:], None)
    if torch.isfinite(r_now) and float(r_now) < lb.best:
        lb.best = float(r_now)
        lb.best_params = [p.detach().clone() for p in params]
    else:
        with torch.no_grad():
            for p, q in zip(params, lb.best_params):
                p.copy_(q)
    return False


def _to_bound(rho: float | None, CK: float) -> float | None:
    """``sqrt(rho) * CK`` rounded up (sqrt is correctly rounded; the product by 2^k is exact)."""
    if rho is None:
        return None
    v = float(np.nextafter(math.sqrt(rho) * CK, math.inf))
    return float(np.nextafter(v, math.inf))
