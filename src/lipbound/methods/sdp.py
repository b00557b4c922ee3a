r"""LipSDP (Fazlyab et al., NeurIPS 2019) with an a-posteriori rigorous verification.

The maths
---------
For ``f(x) = W_K phi(W_{K-1} ... phi(W_1 x + b_1) ...) + b_K`` whose activations have slopes in
``[a_i, b_i]`` (ReLU, tanh: ``[0, 1]``; sigmoid ``[0, 1/4]``; leaky ReLU ``[s, 1]``), every
neuron satisfies, for two inputs and ``dz = W_i dx_{i-1}``, ``dx_i = phi(z) - phi(z')``,

    (dx_i - a_i dz)(b_i dz - dx_i) >= 0      (slope restriction, per neuron).

With ``v = (dx_0, dx_1, ..., dx_{K-1})`` and non-negative diagonal multipliers ``T_i``, if

    M(rho, T) = -rho E_0 + E_{K-1}^T W_K^T W_K E_{K-1}
                + sum_i [W_i E_{i-1}; E_i]^T [[-2 a_i b_i T_i, (a_i + b_i) T_i],
                                              [(a_i + b_i) T_i, -2 T_i]] [W_i E_{i-1}; E_i]
             <= 0       (negative semidefinite)

then ``||W_K dx_{K-1}||^2 - rho ||dx_0||^2 <= -(sum of the non-negative sector terms) <= 0``
for every pair of inputs (S-procedure), i.e. ``L_2(f) <= sqrt(rho)`` for the l2 gain of the
whole map (multi-output included). ``variant="neuron"``: one multiplier per neuron (LipSDP-
Neuron); ``variant="layer"``: ``T_i = lambda_i I`` (LipSDP-Layer, cheaper, looser). (The
"LipSDP-Network" coupling of the original paper is not valid in general and is not offered.)

Scaling. Each ``W_i`` is divided by a power of two ``c_i`` close to its spectral norm (an exact
operation in floating point). With ``C_i = c_1 ... c_i`` the change of variables
``dx_i = C_i dx_i'`` is a congruence: ``M(rho, T)`` is ``C_K^2`` times the LMI of the scaled
weights with ``rho' = rho / C_K^2`` and ``T_i' = T_i C_i^2 / C_K^2``; the SDP is solved and
verified in the scaled coordinates and the bound multiplied back by ``C_K`` (exactly).

Verification (why the bound is certified although the SDP solver is not exact). From the
solver's multipliers, ``T' <- max(T', 0)``; then ``N = M'(0, T')`` is formed in float64 and
``rho_v`` is chosen by the Schur complement ``lambda_max(P - Q R^{-1} Q^T)`` of its blocks,
inflated until the float64 largest eigenvalue of ``N - rho_v E_0`` is ``<= -err``, where
``err`` bounds (i) the rounding in forming ``N`` (``|fl(AB) - AB| <= gamma_k |A||B|``
entrywise, bounded in norm by the Frobenius norm of the same products of absolute values) and
(ii) the eigen-solver's backward error (``n u ||N||_F``). By Weyl's inequality the exact
``M'(rho_v, T')`` is then negative semidefinite, hence ``L <= sqrt(rho_v) C_K`` (the square
root rounded up). If no ``rho_v`` passes (``R`` not negative definite with margin), the result
is NOT certified and says so. The solver's own value is kept in ``raw`` (an estimate).

Default solver (``solver="auto"`` with ``variant="neuron"``): :mod:`lipbound.methods._schur`,
LipSDP-neuron by per-layer Schur complements (a dense barrier-Newton interior point for LMIs up
to 1500 rows, else or if it stalls LBFGS over the multipliers, both started at a certified
ECLipsE-Fast-type closed form, then a Cholesky-based float64 proof; no cvxpy needed). The
result is ``min(closed form, optimised)``, both certified, so never looser than the closed
form, which is also offered alone as ``variant="fast"`` (ECLipsE-Fast, Xu & Sivaranjani,
NeurIPS 2024, in our derivation: see :mod:`lipbound.methods._schur`). The cvxpy solvers
remain available by name.

Graphs that are not one dense chain (residual adds, concatenations, max-pooling, activations
without a slope range, a layer above ``max_dense_entries``, a chain whose certificate cannot fit
``time_limit``): with the Schur solver or ``variant="fast"``, LipSDP runs on SeqLip's sequential
segments (:func:`lipbound.analysis.find_segments`) and AutoLip's composition
(:func:`lipbound.methods.autolip.compose`) covers the rest, each segment taking the smaller of
its LipSDP and AutoLip certified bounds (proof in :func:`_lipsdp_composed`); so the result is
never above AutoLip's. It is not compared with SeqLip's segment bounds (a method module may not
import a sibling: :func:`lipbound.bound` takes the minimum over the methods it runs). The
cvxpy solvers and
``variant="layer"`` still need one chain (:class:`~lipbound.errors.NotSequentialError`).

cvxpy is an optional dependency for ``solver="SCS" / "CLARABEL" / "CVXOPT"`` and
``variant="layer"``: ``pip install 'lipbound[sdp]'``.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
>>> res = lipsdp(net, (2,))  # needs the optional cvxpy
>>> res.certified, res.bound, abs(res.value / res.raw - 1) < 1e-4
(True, 'upper', True)
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from .._progress import flop_rate
from .._validation import check_choice, check_positive
from ..analysis import Analysis, analysis_of, constant_segments, linear_matrix, segment_slopes
from ..errors import (
    InvalidArgumentError,
    MissingDependencyError,
    NotSequentialError,
    SolverError,
    UnsupportedModelError,
    UnsupportedNode,
)
from ..graph import sequential_chain
from ..results import LayerBound, SDPResult
from ..spectral.certify import U as _U
from ..spectral.certify import round_up
from ._residual import solve_residual
from ._schur import solve_schur
from ._segment import segment_upper
from .autolip import GRACE, compose, graph_constants

__all__ = ["SDPResult", "analytic_multipliers", "lipsdp", "slope_ranges_of", "verify_lipsdp"]



def _slope_range(name: str, act: Any) -> tuple[float, float]:
    """The checked slope range of a chain's activation (its graph node's, from the rules)."""
    sr = getattr(act, "slope_range", None)
    if sr is None:
        raise UnsupportedModelError(
            [UnsupportedNode(name, type(act).__name__, "no known slope range [a, b] for LipSDP")],
            what="lipsdp() needs slope-restricted activations",
        )
    a, b = float(sr[0]), float(sr[1])
    if not (math.isfinite(a) and math.isfinite(b) and a <= b):
        raise UnsupportedModelError(
            [UnsupportedNode(name, type(act).__name__, f"bad slope range {sr!r}")],
            what="lipsdp() needs slope-restricted activations",
        )
    return a, b


def slope_ranges_of(
    model: nn.Module | Analysis, input_shape: Sequence[int] | int | None = None
) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
    """Dense float64 weights ``[W_1..W_K]`` and slope ranges ``[(a_i, b_i)]`` of an MLP
    (:meth:`lipbound.analysis.Analysis.dense_chain`)."""
    an, _ = analysis_of(model, input_shape)
    Ws, _, acts, _ = an.dense_chain()
    return Ws, [_slope_range(name, a) for name, a in acts]


def _pow2_scale(W: np.ndarray) -> float:
    s = float(np.linalg.norm(W, 2)) if W.size else 0.0
    if not math.isfinite(s) or s <= 0:
        return 1.0
    return float(2.0 ** round(math.log2(s)))


def _assemble(
    Ws: list[np.ndarray],
    ranges: list[tuple[float, float]],
    ts: list[np.ndarray],
    *,
    absolute: bool = False,
) -> np.ndarray:
    """``N = M(0, T)`` in float64 (``absolute``: the same formulas with |.|, for error bounds)."""
    dims = [Ws[0].shape[1]] + [W.shape[0] for W in Ws[:-1]]
    offs = np.concatenate([[0], np.cumsum(dims)])
    n = int(offs[-1])
    N = np.zeros((n, n))
    ab = (lambda x: np.abs(x)) if absolute else (lambda x: x)
    for i, ((a, b), t) in enumerate(zip(ranges, ts)):
        W = ab(Ws[i])
        s0, s1 = slice(offs[i], offs[i + 1]), slice(offs[i + 1], offs[i + 2])
        if a * b != 0:
            N[s0, s0] += ab(-2 * a * b) * ((W.T * t) @ W)
        cross = ab(a + b) * (W.T * t)
        N[s0, s1] += cross
        N[s1, s0] += cross.T
        N[s1, s1] += np.diag(ab(-2.0) * t)
    WK = ab(Ws[-1])
    sl = slice(offs[-2], offs[-1])
    N[sl, sl] += WK.T @ WK
    return N


def verify_lipsdp(
    Ws: list[np.ndarray],
    ranges: list[tuple[float, float]],
    ts: list[np.ndarray],
    rho_hint: float = 0.0,
) -> tuple[float | None, str]:
    """Smallest float ``rho`` (found by search) with ``M(rho, T)`` provably NSD, or ``None``.

    Works on the given (already scaled) weights; ``ts`` are clipped at 0. See the module
    docstring for the error analysis.
    """
    ts = [np.maximum(np.asarray(t, dtype=np.float64), 0.0) for t in ts]
    n0 = Ws[0].shape[1]
    N = _assemble(Ws, ranges, ts)
    Nabs = _assemble(Ws, ranges, ts, absolute=True)
    n = N.shape[0]
    kmax = max([W.shape[0] for W in Ws] + [W.shape[1] for W in Ws] + [1])
    gamma = 2.0 * (kmax + 6) * _U / (1 - (kmax + 6) * _U)
    form_err = gamma * float(np.linalg.norm(Nabs, "fro"))
    if n == n0:  # no hidden layer: M = W^T W - rho I
        lam = float(np.linalg.eigvalsh(N).max())
        rho = lam + form_err + n * _U * float(np.linalg.norm(N, "fro")) * 4
        rho = rho * (1 + 4 * _U) + 1e-300
        return rho, "verified"
    R = N[n0:, n0:]
    lamR = float(np.linalg.eigvalsh(R).max())
    eigR_err = (n - n0) * _U * float(np.linalg.norm(R, "fro"))
    if lamR + form_err + eigR_err >= 0:
        return None, (
            f"verification failed: the hidden block of the LMI is not negative definite with "
            f"margin (lambda_max = {lamR:.3g}, error bound {form_err + eigR_err:.3g})"
        )
    P, Q = N[:n0, :n0], N[:n0, n0:]
    S = P - Q @ np.linalg.solve(R, Q.T)
    rho = max(float(np.linalg.eigvalsh((S + S.T) / 2).max()), rho_hint * 0.0, 0.0)
    bump = max(1e-12 * max(rho, 1.0), 0.0)
    for _ in range(80):
        rho_v = rho + bump
        Mv = N.copy()
        Mv[np.arange(n0), np.arange(n0)] -= rho_v
        lam = float(np.linalg.eigvalsh(Mv).max())
        err = (
            form_err
            + n * _U * float(np.linalg.norm(Mv, "fro"))
            + 2 * _U * (float(np.abs(np.diag(N)[:n0]).max()) + rho_v)
        )
        if lam + err <= 0:
            return rho_v, "verified"
        bump = max(2 * bump, 2 * (lam + err))
    return None, "verification failed: no rho passed the eigenvalue test"


def analytic_multipliers(
    Ws: list[np.ndarray], ranges: list[tuple[float, float]]
) -> list[np.ndarray] | None:
    """A strictly feasible LipSDP-layer certificate in closed form (``None`` if not covered).

    For ``a_i b_i >= 0`` and ``a_i + b_i > 0``: with ``-M``'s block Schur complements
    ``S_0 = rho I``, ``S_i = 2 T_i - (a_i + b_i)^2 T_i W_i S_{i-1}^{-1} W_i^T T_i`` (the
    ``2 a b W^T T W`` terms are PSD and only help), ``T_i = lambda_i I`` with
    ``lambda_i = 1 / ((a_i + b_i)^2 lambda_max(W_i S_{i-1}^{-1} W_i^T))`` gives
    ``S_i >= lambda_i I``; everything scales with ``rho``, so choosing the scale with
    ``lambda_H > ||W_K||^2`` makes the hidden block of ``M`` negative definite. Used to repair
    a solver's slightly infeasible multipliers by a small convex combination.
    """
    H = len(Ws) - 1
    if H == 0 or any(a * b < 0 or a + b <= 0 for a, b in ranges):
        return None
    S = np.eye(Ws[0].shape[1])
    lams = []
    for i in range(H):
        W = Ws[i]
        a, b = ranges[i]
        K = W @ np.linalg.solve(S, W.T)
        top = float(np.linalg.eigvalsh((K + K.T) / 2).max())
        if not math.isfinite(top) or top <= 0:
            return None
        lam = 1.0 / ((a + b) ** 2 * top)
        lams.append(lam)
        S = 2 * lam * np.eye(W.shape[0]) - (a + b) ** 2 * lam**2 * K
    wk = float(np.linalg.norm(Ws[-1], 2)) ** 2
    c = 2.0 * max(wk, 1e-300) / lams[-1]
    return [np.full(Ws[i].shape[0], c * lams[i]) for i in range(H)]


def _repair(
    Ws: list[np.ndarray], ranges: list[tuple[float, float]], tv: list[np.ndarray]
) -> tuple[float | None, float]:
    """Verify ``(1 - lam) T + lam T_a`` for growing ``lam``; ``(rho, lam)`` or ``(None, nan)``."""
    ta = analytic_multipliers(Ws, ranges)
    if ta is None:
        return None, math.nan
    tv = [np.maximum(t, 0.0) for t in tv]
    for lam in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0):
        mix = [(1 - lam) * t + lam * t2 for t, t2 in zip(tv, ta)]
        rho, _ = verify_lipsdp(Ws, ranges, mix)
        if rho is not None:
            return rho, lam
    return None, math.nan


def _auto_solver(n: int, installed: list[str], variant: str = "neuron") -> str:
    """CVXOPT (interior point) for small and medium LMIs, SCS (first order) beyond.

    Measured on this project's CPU machine: for an 82 x 82 LipSDP-neuron LMI CVXOPT took 5 s,
    SCS 17 s, Clarabel 139 s; Clarabel is kept for tiny problems when CVXOPT is missing.
    """
    limit = 400 if variant == "layer" else 250
    if n <= limit and "CVXOPT" in installed:
        return "CVXOPT"
    if n <= 40 and "CLARABEL" in installed:
        return "CLARABEL"
    if "SCS" in installed:
        return "SCS"
    if "CLARABEL" in installed:
        return "CLARABEL"
    raise SolverError(
        f"no SDP solver for cvxpy is installed (found {installed}); pip install 'lipbound[sdp]'"
    )


def _solve(  # noqa: PLR0917 - tests/test_sdp.py replaces it by fakes taking these 7 positionals
    cp: Any,
    Ws: list[np.ndarray],
    ranges: list[tuple[float, float]],
    variant: str,
    solver: str,
    margin: float,
    solver_options: dict[str, Any],
) -> tuple[float, list[np.ndarray] | None, str]:
    dims = [Ws[0].shape[1]] + [W.shape[0] for W in Ws[:-1]]
    H = len(Ws) - 1
    rho = cp.Variable(nonneg=True)
    tvars: list[Any] = []
    ts: list[Any] = []
    for i in range(H):
        if variant == "neuron":
            v = cp.Variable(dims[i + 1], nonneg=True)
            ts.append(v)
        else:
            v = cp.Variable(nonneg=True)
            ts.append(v * np.ones(dims[i + 1]))
        tvars.append(v)
    nb = H + 1
    blocks: list[list[Any]] = [[np.zeros((dims[r], dims[c])) for c in range(nb)] for r in range(nb)]
    diag: list[Any] = [0] * nb
    diag[0] = -rho * np.eye(dims[0])
    for i in range(H):
        a, b = ranges[i]
        W = Ws[i]
        T = cp.diag(ts[i])
        if a * b != 0:
            diag[i] = diag[i] + (-2 * a * b) * (W.T @ T @ W)
        cross = (a + b) * (W.T @ T)
        blocks[i][i + 1] = cross
        blocks[i + 1][i] = cross.T
        diag[i + 1] = diag[i + 1] + (-2.0) * T
    diag[H] = diag[H] + Ws[-1].T @ Ws[-1]
    for i in range(nb):
        blocks[i][i] = diag[i]
    M = cp.bmat(blocks)
    Msym = (M + M.T) / 2
    n = int(sum(dims))
    cons = [Msym << -margin * np.eye(n)]
    prob = cp.Problem(cp.Minimize(rho), cons)
    import warnings

    with warnings.catch_warnings():
        # "solution may be inaccurate": reported through the status and the verification
        warnings.simplefilter("ignore")
        prob.solve(solver=solver, **solver_options)
    if rho.value is None or any(v.value is None for v in tvars):
        return math.nan, None, str(prob.status)
    tv = []
    for i in range(H):
        val = np.asarray(tvars[i].value, dtype=np.float64)
        tv.append(val if variant == "neuron" else np.full(dims[i + 1], float(val)))
    return float(rho.value), tv, str(prob.status)


def lipsdp(
    model: nn.Module | Analysis,
    input_shape: Sequence[int] | int | None = None,
    *,
    variant: str = "neuron",
    solver: str = "auto",
    margin: float = 1e-7,
    time_limit: float | None = None,
    solver_options: dict[str, Any] | None = None,
    max_dense_entries: int = 10_000_000,
) -> SDPResult:
    """LipSDP upper bound on the l2 Lipschitz constant, with verified certificate: of a whole
    dense chain (an MLP, a CNN whose dense matrices fit), or composed with AutoLip over the
    non-sequential parts of any graph AutoLip accepts (module docstring).

    Parameters
    ----------
    variant:  ``"neuron"`` (one multiplier per neuron), ``"layer"`` (one per layer) or
              ``"fast"``: the ECLipsE-Fast-type closed form of :mod:`lipbound.methods._schur`
              (one multiplier per layer chosen in closed form, layer by layer; no solver, no
              iteration; certified by the same Cholesky proof; never below ``"neuron"``).
    solver:   ``"auto"``: ``"schur"`` for the neuron variant (no cvxpy; ``solver_options``
              may set ``device``, ``max_iter``, ``betas``, ``optimise``, ``ipm_max_rows``,
              ``ipm_max_steps``; ``time_limit`` bounds
              the optimisation, ``CHAIN_LIMIT`` (20 s) when ``None``; the certificate always
              runs); for the layer
              variant the cvxpy choice below. cvxpy choice: CVXOPT up to 250 rows for
              the neuron variant, 400 for the layer variant; SCS beyond; Clarabel only
              for tiny LMIs without CVXOPT; or by name:
              ``"SCS"``, ``"CLARABEL"``, ``"CVXOPT"``.
    margin:   the SDP is solved with ``M <= -margin I`` (in scaled units) so that the
              certificate survives the verification; retried with 100x margin if it fails
              and time is left.
    time_limit: seconds for the solver (passed to SCS / Clarabel; CVXOPT has no limit);
              ``None``: no limit. On a composed graph ONE overall budget for the call: the
              AutoLip constants, then the chains (each started only when its closed form and
              certificate are predicted to fit its share, else AutoLip's product is kept,
              with a note).
    solver_options: passed to ``cvxpy.Problem.solve`` (e.g. ``{"eps": 1e-6}`` for SCS).
    max_dense_entries: LipSDP works on the dense weight matrices of the chain (convolutions,
              BatchNorm, average pooling included: a convolution is as large as its dense
              matrix, 3x32x32 -> 16x32x32 has 5e7 entries; mnist_cnn5's largest has 7.4e6; an
              MLP layer 1000 x 1000 has 1e6). A larger layer is never built: the cvxpy solvers
              refuse the chain with :class:`~lipbound.errors.UnsupportedModelError`; the Schur
              path cuts the chain there and keeps AutoLip's constant on that layer (composed,
              with a note). With the Schur solver and a ``time_limit``, a whole chain whose
              closed form and certificate (about ``14 sum n_i^3`` flops, not interruptible)
              are predicted to take longer goes to the composed path as well.

    Returns an :class:`SDPResult`: ``value``/``upper`` the verified bound (``certified``), ``raw``
    the solver's value; on a composed graph ``solver_status="composed"``, ``layers`` one row per
    LipSDP chain (``op="sdp-chain"``) and per segment, ``extra["segments"]`` /
    ``extra["sdp_chains"]``. Raises :class:`~lipbound.errors.MissingDependencyError` without
    cvxpy, :class:`~lipbound.errors.NotSequentialError` for non-chain models with the cvxpy
    solvers or ``variant="layer"``.
    """
    t0 = time.perf_counter()
    model, _ = analysis_of(model, input_shape)
    call = _Call(model=model, shape=model.input_shape, variant=variant, solver=solver,
                 margin=margin, time_limit=time_limit, solver_options=solver_options,
                 max_entries=max_dense_entries, t0=t0)
    _check_call(call)
    try:
        widths = _chain_sizes(model, call.shape, max_dense_entries)
    except (NotSequentialError, UnsupportedModelError) as exc:
        if not call.schur:  # the cvxpy solvers and the layer variant: whole chains only
            raise
        return _lipsdp_composed(call, _first_line(exc))
    if call.schur:
        return _lipsdp_chain(call, widths)
    return _lipsdp_cvxpy(call)


@dataclass(frozen=True)
class _Call:
    """One :func:`lipsdp` call: the analysed model and its shape, the options as given and the
    start time."""

    model: Analysis
    shape: tuple[int, ...]
    variant: str
    solver: str
    margin: float
    time_limit: float | None
    solver_options: dict[str, Any] | None
    max_entries: int
    t0: float

    @property
    def options(self) -> dict[str, Any]:
        """A fresh copy of ``solver_options`` (``{}`` for ``None``)."""
        return dict(self.solver_options or {})

    @property
    def schur(self) -> bool:
        """Whether the Schur-complement solver runs (else a cvxpy solver)."""
        return self.variant == "fast" or (self.solver in ("auto", "schur")
                                          and self.variant == "neuron")


def _check_call(call: _Call) -> None:
    """The argument checks of :func:`lipsdp` (:class:`~lipbound.errors.InvalidArgumentError`)."""
    variant, solver = call.variant, call.solver
    check_choice("variant", variant, ("neuron", "layer", "fast"))
    check_choice("solver", solver, ("auto", "schur", "SCS", "CLARABEL", "CVXOPT"))
    check_positive("margin", call.margin, allow_zero=True)
    if call.time_limit is not None:
        check_positive("time_limit", call.time_limit)
    check_positive("max_dense_entries", call.max_entries)
    if variant == "fast" and solver not in ("auto", "schur"):
        raise InvalidArgumentError(
            f"lipsdp(variant='fast') is the closed form (no SDP solver), got solver="
            f"{solver!r}; use solver='auto'"
        )
    if solver == "schur" and variant != "neuron":
        raise InvalidArgumentError(
            f"lipsdp(solver='schur') solves variant='neuron' only, got variant={variant!r}; "
            "use variant='neuron' or a cvxpy solver ('CVXOPT', 'SCS', 'CLARABEL')"
        )
    allowed = {"device", "max_iter", "betas", "optimise", "ipm_max_rows", "ipm_max_steps"}
    bad = sorted(set(call.solver_options or {}) - allowed) if call.schur else []
    if bad:
        raise InvalidArgumentError(
            f"lipsdp(solver='schur'): unknown solver_options {bad}; allowed: {sorted(allowed)}"
        )


def _lipsdp_chain(call: _Call, widths: list[int]) -> SDPResult:
    """The Schur path on one dense chain of layer ``widths``: composed instead when its closed
    form and certificate are predicted past ``time_limit``; the optimiser gets what they
    leave of it."""
    cube = sum(float(n) ** 3 for n in widths)
    time_limit = call.time_limit
    # the time model needs the machine's rate only where the chain's cubic work can matter
    # (measuring it costs about 1e8 flops)
    rate = flop_rate() if time_limit is not None and 24.0 * cube > 1e8 else math.inf
    if time_limit is not None:
        flops = 14.0 * cube
        need = flops / rate
        if need > time_limit:
            return _lipsdp_composed(
                call,
                f"the closed form and its certificate on the whole chain need about {need:.3g} "
                f"s on this machine ({flops:.3g} flops), more than time_limit={time_limit:g}",
            )
    if call.variant == "fast":
        return _lipsdp_schur(call.model, call.shape, time_limit, {"optimise": False}, call.t0,
                             method="fast")
    opts = call.options
    if time_limit is not None:
        # the closed form, its certificate and the optimised point's (~10 sum n^3 more)
        # are not interruptible: the optimiser gets what they leave
        time_limit = time_limit - 24.0 * cube / rate
        if time_limit <= 0:
            opts["optimise"] = False
            time_limit = None
    return _lipsdp_schur(call.model, call.shape, time_limit, opts, call.t0)


@dataclass
class _CvxpyRun:
    """The cvxpy path of one call: the scaled chain (``CK`` the exact scale), the solver and
    its options, and what the attempts found so far."""

    cp: Any
    Wp: list[np.ndarray]
    ranges: list[tuple[float, float]]
    CK: float
    variant: str
    name: str
    opts: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    rho_v: float | None = None
    raw: float = math.nan
    status: str = ""
    why: str = ""
    solve_s: float = 0.0
    verify_s: float = 0.0


def _lipsdp_cvxpy(call: _Call) -> SDPResult:
    """The cvxpy path (one dense chain): solve, verify (up to three attempts, the margin
    multiplied by 100 after a failed one while time is left), then the result."""
    try:
        import cvxpy as cp
    except ImportError as exc:
        raise MissingDependencyError("cvxpy", "sdp", "lipsdp") from exc
    Ws, ranges = slope_ranges_of(call.model, call.shape)
    # exact power-of-two rescaling (see the module docstring)
    cs = [_pow2_scale(W) for W in Ws]
    Wp = [W / c for W, c in zip(Ws, cs)]
    CK = math.prod(cs)
    n = sum([Ws[0].shape[1]] + [W.shape[0] for W in Ws[:-1]])
    installed = list(cp.installed_solvers())
    name = _auto_solver(n, installed, call.variant) if call.solver == "auto" else call.solver
    if name not in installed:
        raise MissingDependencyError(name.lower(), "sdp", f"lipsdp(solver={name!r})")
    run = _CvxpyRun(cp=cp, Wp=Wp, ranges=ranges, CK=CK, variant=call.variant, name=name,
                    opts=call.options)
    time_limit = call.time_limit
    m = float(call.margin)
    for _attempt in range(3):
        if time_limit is not None:
            left = float(time_limit) - (time.perf_counter() - call.t0)
            if _attempt > 0 and left < 0.2 * float(time_limit):
                break
            if name == "SCS":
                run.opts["time_limit_secs"] = max(left, 1.0)
            elif name == "CLARABEL":
                run.opts["time_limit"] = max(left, 1.0)
        _attempt_once(run, m, _attempt)
        if run.rho_v is not None:
            break
        m = max(m, 1e-9) * 100
    return _cvxpy_result(run, call, m)


def _attempt_once(run: _CvxpyRun, m: float, attempt: int) -> None:
    """One solve with margin ``m`` and the verification of its multipliers (repaired by the
    closed form if they fail; the closed form alone if the solver returned none)."""
    ts0 = time.perf_counter()
    try:
        rho_raw, tv, run.status = _solve(run.cp, run.Wp, run.ranges, run.variant, run.name, m,
                                         run.opts)
    except run.cp.error.SolverError as exc:
        raise SolverError(f"LipSDP: solver {run.name} failed: {exc}") from exc
    run.solve_s += time.perf_counter() - ts0
    tv0 = time.perf_counter()
    if tv is None:
        # no multipliers at all: fall back on the closed-form certificate alone
        run.raw = math.nan
        ta = analytic_multipliers(run.Wp, run.ranges)
        run.why = f"the solver returned no solution (status {run.status!r})"
        run.rho_v = None
        if ta is not None:
            run.rho_v, _ = verify_lipsdp(run.Wp, run.ranges, ta)
        if run.rho_v is not None:
            run.notes.append(run.why + "; bound from the closed-form multipliers only (loose)")
        run.verify_s += time.perf_counter() - tv0
        return
    run.raw = math.sqrt(max(rho_raw, 0.0)) * run.CK
    run.rho_v, run.why = verify_lipsdp(run.Wp, run.ranges, tv, rho_raw)
    if run.rho_v is None:
        run.rho_v, lam = _repair(run.Wp, run.ranges, tv)
        if run.rho_v is not None:
            run.notes.append(
                f"the solver's multipliers failed the verification ({run.why}); repaired by the "
                f"convex combination (1 - {lam:g}) T + {lam:g} T_a with a closed-form "
                "strictly feasible T_a"
            )
    run.verify_s += time.perf_counter() - tv0
    if run.status != "optimal":
        run.notes.append(f"solver status {run.status!r} (attempt {attempt + 1})")


def _cvxpy_result(run: _CvxpyRun, call: _Call, m: float) -> SDPResult:
    """The :class:`SDPResult` of the cvxpy path (``m`` the last margin used)."""
    notes = run.notes
    if run.rho_v is not None:
        value = float(np.nextafter(math.sqrt(run.rho_v) * run.CK, math.inf))
        value = float(np.nextafter(value, math.inf))  # the product by CK is exact; sqrt rounded
        notes.append(
            f"verified: M(rho, T) is provably negative semidefinite in exact arithmetic at the "
            f"multipliers used (float64 eigenvalues + rounding bounds, Weyl); certified "
            f"bound {value:.8g} vs the solver's raw {run.raw:.8g} (certified only up to the "
            f"solver's tolerance)"
        )
        certified = True
        upper: float | None = value
        bound = "upper"
    else:
        value = run.raw
        certified = False
        upper = None
        bound = "estimate"
        notes.append(run.why + "; value is the solver's raw answer, NOT certified")
    return SDPResult(
        value=value,
        certified=certified,
        method=f"lipsdp-{call.variant}",
        norm="2",
        bound=bound,  # type: ignore[arg-type]
        upper=upper,
        seconds=time.perf_counter() - call.t0,
        notes=tuple(notes),
        raw=run.raw,
        variant=call.variant,
        solver=run.name,
        solver_status=run.status,
        solve_seconds=run.solve_s,
        verify_seconds=run.verify_s,
        extra={"rho_scale": run.CK, "margin": m},
    )


def _chain_sizes(model: Analysis, shape: tuple[int, ...], max_entries: int) -> list[int]:
    """Widths of the chain's layers (input, hidden..., output) from the captured graph, without
    building a dense matrix; refuses chains whose dense weights exceed ``max_entries``."""
    chain = sequential_chain(analysis_of(model, shape)[0].graph)
    lin = [nd for nd in chain if nd.kind == "linear"]
    if not lin:
        return []
    sizes = [math.prod(lin[0].in_shapes[0])] + [math.prod(nd.out_shape) for nd in lin]
    entries = [a * b for a, b in itertools.pairwise(sizes)]
    big = max(range(len(entries)), key=entries.__getitem__)
    if entries[big] > max_entries:
        raise UnsupportedModelError(
            [UnsupportedNode(lin[big].qualname, lin[big].op,
                             f"dense weight matrix of {entries[big]} entries > "
                             f"max_dense_entries={max_entries}")],
            what="lipsdp() forms the dense weight matrices; raise max_dense_entries or use "
            "autolip/seqlip for large (convolutional) models",
        )
    return sizes


def _lipsdp_schur(
    model: nn.Module | Analysis,
    shape: tuple[int, ...],
    time_limit: float | None,
    options: dict[str, Any],
    t0: float,
    method: str = "neuron",
) -> SDPResult:
    """``lipsdp`` with the Schur-complement solver (``options`` go to ``solve_schur``)."""
    Ws, ranges = slope_ranges_of(model, shape)
    sol = solve_schur(Ws, ranges, time_limit=CHAIN_LIMIT if time_limit is None else time_limit,
                      **options)
    cands = [v for v in (sol.value, sol.closed_form) if v is not None]
    notes = list(sol.notes)
    if cands:
        value = min(cands)
        which = "optimised" if sol.value is not None and value == sol.value else "closed form"
        notes.append(
            f"verified ({which}): every 2x2 block of the Schur splitting of the LipSDP-neuron "
            f"LMI passed a shifted float64 Cholesky test (Higham's backward error bound); "
            f"closed form {sol.closed_form}, optimised {sol.value}, raw {sol.raw:.8g}"
        )
        certified, upper, bound = True, value, "upper"
    else:
        value, certified, upper, bound = sol.raw, False, None, "estimate"
        notes.append(f"{sol.why}; value is the optimiser's raw answer, NOT certified")
    return SDPResult(
        value=value,
        certified=certified,
        method=f"lipsdp-{method}",
        norm="2",
        bound=bound,  # type: ignore[arg-type]
        upper=upper,
        iterations=sol.iterations,
        seconds=time.perf_counter() - t0,
        notes=tuple(notes),
        raw=sol.raw,
        variant=method,
        solver="closed-form" if method == "fast" else "schur",
        solver_status=("closed_form" if method == "fast" else
                       "optimal" if sol.value is not None else "closed_form_only"),
        solve_seconds=sol.seconds_opt,
        verify_seconds=sol.seconds_verify,
        extra={
            "rho_scale": sol.scale,
            "closed_form": sol.closed_form,
            "closed_raw": sol.closed_raw,
        },
    )


# ----------------------------------------------------------------------------------------------
# composition with AutoLip (graphs that are not one dense chain)

#: default seconds for the SDP chains of a composed call without ``time_limit`` (the Schur
#: path's default optimisation time)
_COMPOSED_LIMIT = 60.0
#: the optimisation time of the Schur default on a whole chain when time_limit is None (was
#: 60 s; the one-call report, lipsdp included, is meant to answer within a minute, and on
#: ECLipsE's random MLPs the bound after 15 s is already far below ECLipsE-Fast's: see
#: benchmarks/results/bound_mlps.md)
CHAIN_LIMIT = 20.0
#: float64 flops of the closed form and its certificate (not interruptible) per
#: ``sum_i (n_{i-1} + n_i)^3`` over a chain's consecutive widths (the certificate factors the
#: 2x2 blocks of that order, retrying with larger shifts): measured 6-7 on random MLPs of widths
#: 400-1500 on one core, wall clock against :func:`~lipbound._progress.flop_rate`. The
#: optimised point's certificate and one optimiser step cost about ``_OPT_FLOPS`` more.
_CERT_FLOPS = 8.0
_OPT_FLOPS = 12.0


def _first_line(exc: Exception) -> str:
    """A short reason: the first offending node of an :class:`UnsupportedModelError`, else the
    first line of the message."""
    if isinstance(exc, UnsupportedModelError) and exc.nodes:
        n = exc.nodes[0]
        more = f" and {len(exc.nodes) - 1} more" if len(exc.nodes) > 1 else ""
        return f"{n.qualname} ({n.op}) {n.hint}{more}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _runs(seg: list[Any], max_entries: int) -> list[list[Any]]:
    """The maximal sub-chains ``[linear, act, ..., linear]`` (two linear nodes at least) of a
    SeqLip segment whose linear nodes all have dense matrices of at most ``max_entries``
    entries (a larger one is cut out: AutoLip's constants stay on it)."""
    out: list[list[Any]] = []
    cur: list[Any] = []
    for i, node in enumerate(seg[0::2]):
        if math.prod(node.in_shapes[0]) * math.prod(node.out_shape) <= max_entries:
            cur = [*cur, seg[2 * i - 1], node] if cur else [node]
        else:
            if len(cur) >= 3:
                out.append(cur)
            cur = []
    if len(cur) >= 3:
        out.append(cur)
    return out


def _cost_cube(run: list[Any]) -> float:
    """``sum_i (n_{i-1} + n_i)^3`` over the run's consecutive widths (see ``_CERT_FLOPS``)."""
    lins = run[0::2]
    w = [math.prod(lins[0].in_shapes[0])] + [math.prod(n.out_shape) for n in lins]
    return float(sum((float(a) + float(b)) ** 3 for a, b in itertools.pairwise(w)))


#: the dense barrier method runs on residual-block LMIs of at most this many rows (as the
#: Schur solver's ``ipm_max_rows``); larger blocks get the closed form's certificate only
_BLOCK_IPM_ROWS = 1500
#: a certified residual block: (add node, index of its skip input, branch segment, linear
#: shortcut node or None, the block's certified bound)
_Block = tuple[Any, int, list[Any], Any, float]


def _residual_blocks(graph: Any, segments: list[list[Any]]) -> list[tuple[Any, int, list[Any],
                                                                          Any | None]]:
    """``(add, skip, segment, shortcut)`` for every plain ``add`` node ``y = u + v`` (two
    inputs of its output's shape, no ``alpha``) of which one input is the last node of a
    segment whose first node reads only ``p``, and the other (index ``skip``) is ``p`` itself
    (``shortcut=None``) or a linear node reading only ``p`` whose only user is the add.
    (Inside a segment every node but the first has one input, so the branch is a function of
    ``p`` alone.)"""
    ends = {seg[-1].name: seg for seg in segments}
    out = []
    for node in graph:
        if (node.op != "add" or len(node.inputs) != 2 or node.call.kwargs
                or len(node.call.args) != 2
                or any(tuple(s) != tuple(node.out_shape) for s in node.in_shapes)):
            continue
        for j in (0, 1):
            seg = ends.get(node.inputs[1 - j])
            if seg is None or len(seg[0].inputs) != 1:
                continue
            p, q = seg[0].inputs[0], node.inputs[j]
            if q == p:
                out.append((node, j, seg, None))
                break
            qn = graph[q]
            if (qn.kind == "linear" and qn.inputs == (p,)
                    and [u.name for u in graph.users(q)] == [node.name]):
                out.append((node, j, seg, qn))
                break
    return out


def _block_bounds(
    graph: Any, slopes: dict[str, tuple[float, float] | None], segments: list[list[Any]],
    max_entries: int, end: float,
) -> tuple[list[_Block], list[LayerBound], list[str]]:
    r"""Certified LipSDP bounds of the residual blocks ``y = S p + g(p)`` of the graph
    (:func:`_residual_blocks`, :mod:`lipbound.methods._residual`): ``(add, skip, shortcut,
    bound)`` per certified block, the table rows and the names of the blocks skipped (dense
    LMI above ``max_entries`` entries, or predicted past ``end``)."""
    found: list[_Block] = []
    rows: list[LayerBound] = []
    skipped: list[str] = []
    rate = flop_rate()
    for add, skip, seg, sc in _residual_blocks(graph, segments):
        tr = time.perf_counter()
        lins = seg[0::2]
        m = (math.prod(lins[0].in_shapes[0]) + sum(math.prod(n.out_shape) for n in lins[:-1])
             + math.prod(add.out_shape))
        name = f"{add.qualname} ({lins[0].qualname}..{lins[-1].qualname})"
        big = any(math.prod(n.in_shapes[0]) * math.prod(n.out_shape) > max_entries
                  for n in [*lins, *([sc] if sc is not None else [])])
        if big or m * m > max_entries or _CERT_FLOPS * float(m) ** 3 / rate > end - tr:
            skipped.append(name)
            continue
        optimise = (m <= _BLOCK_IPM_ROWS
                    and (_CERT_FLOPS + _OPT_FLOPS) * float(m) ** 3 / rate < end - tr)
        Ws = [linear_matrix(n) for n in lins]
        S = np.eye(Ws[0].shape[1]) if sc is None else linear_matrix(sc)
        sol = solve_residual(S, Ws, segment_slopes(seg, slopes),
                             time_limit=max(end - tr, 1e-3), optimise=optimise)
        if sol.value is not None:
            found.append((add, skip, seg, sc, sol.value))
        rows.append(LayerBound(
            name=name, op="sdp-residual", value=sol.value if sol.value is not None else sol.raw,
            certified=sol.value is not None, seconds=time.perf_counter() - tr, estimate=sol.raw,
            how=(f"lipsdp-neuron on the residual block, {m} LMI rows (closed form "
                 f"{sol.closed_form}, optimised {sol.value}); " + "; ".join(sol.notes)),
        ))
    return found, rows, skipped


def _use_blocks(
    consts: dict[str, Any], blocks: list[_Block], *tables: dict[str, Any],
) -> int:
    r"""Put each residual block's bound into the node constants ``tables`` (in place) where it
    is below the composition's local factor there; returns how many were used.

    Proof. At the add node ``y = theta_q + theta_e`` AutoLip's recursion reads ``L_add =
    c_q L_q + c_e L_e`` (``c`` the add's constants: 1 and its rounding margin). Here the branch
    ``theta_e = g(theta_p)`` is a function of ``theta_p`` alone (its segment's first node
    reads only ``p``, the inner nodes have one input), and ``theta_q = S theta_p`` (``q = p``:
    ``S = I``; else the linear node ``q`` reading only ``p``, whose only user is the add), so
    ``theta_add = h(theta_p)`` with ``h(x) = S x + g(x)``, and ``||h(x) - h(x')|| <= B ||x -
    x'||`` with the block's certified LipSDP bound ``B`` (:mod:`lipbound.methods._residual`).
    Hence ``L_add = c B L_p`` with ``c = max(c_q, c_e)`` (the rule's margin for the float sum)
    bounds ``x -> theta_add``. Written as node constants: ``c_e <- 0`` at the add; for ``q =
    p``, ``c_q <- fl(c B)`` rounded up (:func:`~lipbound.spectral.certify.round_up`, relative
    ``4 u``); for a linear ``q``, its constant ``<- B`` and ``c_q <- c`` (then ``L_q = B L_p``
    is read by the add only). The branch's nodes keep their constants, so any other user of
    them is composed as before. Every constant is non-negative, so the composition is monotone
    in each of them: using the block only where ``c B`` is below the local factor it replaces
    (``c_q c'_q + c_e P``, ``c'_q`` the shortcut's constant or 1 and ``P`` the branch's factor
    in the table) can only lower the output bound, which stays valid.
    """
    used = 0
    for add, skip, seg, sc, bound in blocks:
        c = max(consts[add.name].constants)
        new = round_up(c * bound, rel=4 * _U)
        for tab in tables:
            cq = tab[add.name].constants[skip] * (tab[sc.name].value if sc is not None else 1.0)
            branch = tab[add.name].constants[1 - skip] * math.prod(tab[n.name].value for n in seg)
            if new >= cq + branch:
                continue
            cs = [0.0, 0.0]
            cs[skip] = new if sc is None else c
            tab[add.name] = replace(tab[add.name], constants=tuple(cs), how="residual block")
            if sc is not None:
                tab[sc.name] = replace(tab[sc.name], constants=(bound,), how="residual block")
            used += tab is tables[0]
    return used


def _lipsdp_composed(call: _Call, why: str) -> SDPResult:
    r"""LipSDP-neuron on the sequential segments of the graph, AutoLip's composition elsewhere.

    The graph and AutoLip's per-node constants are :func:`~lipbound.methods.autolip.
    graph_constants`' and the segments SeqLip's (:func:`~lipbound.analysis.find_segments`:
    maximal chains ``linear, act, ..., linear`` whose inner nodes have one input and one user and
    whose activations have a slope range from the rules). A segment is cut at linear nodes with
    more than ``max_entries`` dense entries; each remaining run of two linear nodes or more gets
    the certified Schur bound (:func:`~lipbound.methods._schur.solve_schur`: closed form,
    optimised where ``variant="neuron"``) when its predicted cost fits the time left, else
    keeps AutoLip's product.

    Why it is an upper bound. A run is the map ``f_r = M_k o s_{k-1} o ... o s_1 o M_1`` of
    affine ``M_i`` (biases included: they cancel in differences) and element-wise ``s_i`` with
    derivative in ``[a_i, b_i]``, so the LipSDP certificate proves ``||f_r(x) - f_r(y)|| <= B_r
    ||x - y||`` (see :mod:`lipbound.methods._schur`). Within a segment the runs and the cut-out
    nodes are composed in sequence, so the segment is ``P``-Lipschitz with ``P`` the product of
    the runs' ``B_r`` and the cut-out nodes' AutoLip constants; it is computed in float64 by at
    most ``k`` multiplications of positive numbers (relative error below ``(k + 1) u``) and
    rounded up by :func:`~lipbound.spectral.certify.round_up` with a relative margin
    ``(2 k + 8) u``. The segment's bound is the smaller of ``P`` and AutoLip's product: both
    are valid Lipschitz bounds of the same map. As in SeqLip, it is then the constant of the
    segment's first linear node and every other node of the segment gets 1: the inner nodes
    have a single input and a single user, so AutoLip's recursion
    ``L_k = sum_j c_{k,j} L_{parent_j}`` gives at the segment's last node
    ``L = bound * L_parent``, a valid bound of ``x ->`` that node's output, and the
    composition over the rest of the graph is AutoLip's (valid for any valid node constants).
    Finally the minimum with AutoLip's whole-graph value is taken.
    """
    time_limit, max_entries = call.time_limit, call.max_entries
    budget = _COMPOSED_LIMIT if time_limit is None else float(time_limit)
    deadline = call.t0 + budget
    graph, consts, reused = graph_constants(
        call.model, call.shape, norm="2", tol=1e-6, max_iter=1000, deadline=deadline,
        grace=GRACE * budget,
    )
    autolip_value = compose(graph, consts)
    auto_certified = all(c.certified for c in consts.values())
    slopes, segments = constant_segments(graph, consts)
    notes = [f"not one dense chain ({why}): LipSDP on the sequential segments, composed with "
             "AutoLip's constants elsewhere"]
    cut = sum(math.prod(n.in_shapes[0]) * math.prod(n.out_shape) > max_entries
              for seg in segments for n in seg[0::2])
    if cut:
        notes.append(f"{cut} linear node(s) of the segments have dense matrices of more than "
                     f"max_dense_entries={max_entries} entries: AutoLip's constants kept there; "
                     "raise max_dense_entries to include them")
    runs = [(k, run) for k, seg in enumerate(segments) for run in _runs(seg, max_entries)]
    cubes = [_cost_cube(run) for _, run in runs]
    rate = flop_rate()
    now = time.perf_counter()
    if time_limit is None:
        sdp_end = now + _COMPOSED_LIMIT
    else:
        sdp_end = deadline
    st = _Composed(call=call, graph=graph, consts=consts, slopes=slopes, segments=segments,
                   sdp_end=sdp_end, notes=notes)
    # the residual blocks first, in at most half of the SDP time when chains follow
    blocks, block_rows, block_skipped = _block_bounds(
        graph, slopes, segments, max_entries, now + (sdp_end - now) * (0.5 if runs else 1.0))
    skipped: list[str] = []
    for j, (_, run) in enumerate(runs):
        name = _chain_bound(st, run, cubes[j], sum(cubes[j:]), rate)
        if name is not None:
            skipped.append(name)
    if skipped:
        notes.append(
            f"time limit: {len(skipped)} chain(s) predicted not to end in the time left "
            f"(first: {skipped[0]}) keep AutoLip's product; raise time_limit for a tighter bound"
        )
    cert_consts = dict(consts)
    est_consts = dict(consts)
    for i_seg in range(len(segments)):
        _segment_bound(st, i_seg, cert_consts, est_consts)
    st.rows.extend(block_rows)
    used = _use_blocks(consts, blocks, cert_consts, est_consts)
    if block_rows or block_skipped:
        notes.append(f"residual blocks: {len(block_rows)} got a LipSDP-neuron LMI of their own "
                     f"({len(blocks)} certified, {used} below the composition and used)"
                     + (f"; {len(block_skipped)} skipped (dense LMI above max_dense_entries="
                        f"{max_entries} entries or predicted past the time left; first: "
                        f"{block_skipped[0]}): composed there" if block_skipped else ""))
    in_seg = {n.name for seg in segments for n in seg}
    for c in consts.values():
        if c.name not in in_seg:
            st.rows.append(LayerBound(name=c.qualname, op=c.op, value=c.value,
                                      certified=c.certified, seconds=c.seconds,
                                      estimate=c.estimate, how=f"autolip: {c.how}"))
    value = min(compose(graph, cert_consts), autolip_value)
    raw_value = min(compose(graph, est_consts), value)
    if not segments:
        notes.append("no sequential segment (linear, act, linear) found: the bound is AutoLip's")
    if reused:
        notes.append("graph and AutoLip constants reused from the previous call on this model")
    if not auto_certified:
        notes.append("some AutoLip factors are estimates (time limit), so the bound is NOT "
                     "certified; raise time_limit")
    return SDPResult(
        value=float(value),
        certified=auto_certified,
        method=f"lipsdp-{call.variant}",
        norm="2",
        bound="upper" if auto_certified else "estimate",
        upper=float(value) if auto_certified else None,
        how="LipSDP-neuron on the sequential segments, AutoLip elsewhere",
        layers=tuple(st.rows),
        iterations=st.iterations,
        seconds=time.perf_counter() - call.t0,
        notes=tuple(notes),
        raw=float(raw_value),
        variant=call.variant,
        solver="closed-form" if call.variant == "fast" else "schur",
        solver_status="composed",
        solve_seconds=st.solve_s,
        verify_seconds=st.verify_s,
        extra={
            "graph": graph,
            "composed": True,
            "reason": why,
            "segments": [[n.qualname for n in s] for s in segments],
            "sdp_chains": [f"{r[0].qualname}..{r[-1].qualname}" for _, r in runs],
            "autolip": autolip_value,
        },
    )


@dataclass
class _Composed:
    """A composed call: the graph, AutoLip's constants, the slope ranges and segments, the end
    of the SDP time, the notes, and what the chains found (rows, certified bounds and solver
    estimates by a run's first node, seconds, iterations)."""

    call: _Call
    graph: Any
    consts: dict[str, Any]
    slopes: dict[str, tuple[float, float] | None]
    segments: list[list[Any]]
    sdp_end: float
    notes: list[str]
    rows: list[LayerBound] = field(default_factory=list)
    run_bound: dict[str, float] = field(default_factory=dict)  # first node of a run -> bound
    run_raw: dict[str, float] = field(default_factory=dict)
    solve_s: float = 0.0
    verify_s: float = 0.0
    iterations: int = 0


def _chain_bound(
    st: _Composed, run: list[Any], cube: float, cubes_left: float, rate: float
) -> str | None:
    """The certified Schur bound of one run (cost ``cube``; ``cubes_left`` the costs of this
    run and those after it): kept in ``st`` where below AutoLip's product, with its row;
    returns the run's name if it was skipped (its closed form and certificate predicted past
    the SDP time left), else ``None``. The closed forms of this run and of those after it come
    first; the optimisation of this run gets its share (``cube / cubes_left``) of what their
    predicted cost leaves, so that the default is not looser than ``variant="fast"`` for want
    of time that the closed forms alone would have had."""
    tr = time.perf_counter()
    lins = run[0::2]
    name = f"{lins[0].qualname}..{lins[-1].qualname}"
    left = max(st.sdp_end - tr, 0.0)
    if st.call.time_limit is not None and _CERT_FLOPS * cube / rate > left:
        return name
    variant, options = st.call.variant, st.call.options
    optimise = variant == "neuron" and bool(options.get("optimise", True))
    spare = left - _CERT_FLOPS * cubes_left / rate
    opt_time = spare * cube / max(cubes_left, 1.0) - _OPT_FLOPS * cube / rate
    if opt_time <= 0:
        optimise = False
    Ws = [linear_matrix(n) for n in lins]
    ranges = segment_slopes(run, st.slopes)
    sol = solve_schur(Ws, ranges, time_limit=max(opt_time, 1e-3),
                      **{**options, "optimise": optimise})
    st.solve_s += sol.seconds_opt
    st.verify_s += sol.seconds_verify
    st.iterations += sol.iterations
    cands = [v for v in (sol.value, sol.closed_form) if v is not None]
    auto_run = math.prod(st.consts[n.name].value for n in run)
    if cands:
        b = min(cands)
        st.run_raw[lins[0].name] = sol.raw
        if b < auto_run:
            st.run_bound[lins[0].name] = b
    st.rows.append(LayerBound(
        name=name, op="sdp-chain", value=min(cands) if cands else sol.raw,
        certified=bool(cands), seconds=time.perf_counter() - tr, estimate=sol.raw,
        how=(f"lipsdp-{variant} on {len(lins)} layers (closed form {sol.closed_form}, "
             f"optimised {sol.value}; autolip {auto_run:.6g})"
             + ("" if cands else f"; {sol.why}: AutoLip kept")),
    ))
    return None


def _segment_bound(
    st: _Composed, i_seg: int, cert_consts: dict[str, Any], est_consts: dict[str, Any]
) -> None:
    """Segment ``i_seg``'s bound, the smallest of its runs' product (:func:`_lipsdp_composed`),
    AutoLip's product and SeqLip's: put on its first node in ``cert_consts`` (the estimates'
    product in ``est_consts``), the other nodes 1, and its row in ``st``."""
    seg, consts = st.segments[i_seg], st.consts
    factors: list[float] = []
    raw: list[float] = []
    inner: set[str] = set()
    whole: dict[str, float] = {}  # first node of a run -> AutoLip's product over the run
    for run in _runs(seg, st.call.max_entries):
        inner.update(n.name for n in run[1:])
        whole[run[0].name] = math.prod(consts[n.name].value for n in run)
    for n in seg:
        if n.name in inner:
            continue
        # a run without a certificate (skipped, or failed) keeps AutoLip's product
        auto_n = whole.get(n.name, consts[n.name].value)
        factors.append(st.run_bound.get(n.name, auto_n))
        raw.append(st.run_raw.get(n.name, auto_n))
    sdp_seg = round_up(math.prod(factors), rel=(2 * len(factors) + 8) * _U)
    auto_seg = math.prod(consts[n.name].value for n in seg)
    seg_c = {"lipsdp": sdp_seg, "autolip": auto_seg}
    # SeqLip's certified factor as a floor (methods._segment.segment_upper), in this
    # segment's share of the time left: the composition is never looser than SeqLip's
    # where it finishes
    t_seg = time.perf_counter()
    if st.sdp_end > t_seg:
        seg_c["seqlip"] = segment_upper(
            seg, consts, st.slopes, dense_limit=st.call.max_entries,
            deadline=t_seg + (st.sdp_end - t_seg) / (len(st.segments) - i_seg))
    how = min(seg_c, key=lambda key: seg_c[key])
    first = seg[0].name
    if how != "autolip":
        cert_consts[first] = replace(consts[first], constants=(seg_c[how],), how=how)
        est_consts[first] = replace(consts[first],
                                    constants=(min(math.prod(raw), seg_c[how]),), how=how)
        for n in seg[1:]:
            cert_consts[n.name] = replace(consts[n.name], constants=(1.0,), how="in segment")
            est_consts[n.name] = cert_consts[n.name]
    st.rows.append(LayerBound(
        name=f"{seg[0].qualname}..{seg[-1].qualname}", op="segment", value=seg_c[how],
        certified=all(consts[n.name].certified for n in seg), estimate=math.prod(raw),
        how=f"{how} (" + ", ".join(f"{key} {v:.6g}" for key, v in seg_c.items()) + ")",
    ))
