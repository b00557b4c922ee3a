r"""LipSDP-neuron for one residual block ``y = S x + W_k phi_{k-1}(W_{k-1} ... phi_1(W_1 x))``.

The LMI
-------
Activation ``i`` is slope restricted in ``[a_i, b_i]``; for two inputs write ``dx`` their
difference, ``dh_i = W_i dw_{i-1}`` (``dw_0 = dx``) and ``dw_i = phi_i(h_i) - phi_i(h_i')``, so
that every neuron satisfies ``(dw_i - a_i dh_i)(b_i dh_i - dw_i) >= 0`` and the output difference
is ``dy = F v`` with ``v = (dx, dw_1, ..., dw_{k-1})`` and ``F = [S, 0, ..., 0, W_k]``. Let
``Sigma(T) = sum_i sum_j T_ij (dw_ij - a_i dh_ij)(b_i dh_ij - dw_ij)`` (diagonal ``T_i >= 0``),
a quadratic form ``v^T Q(T) v`` that is ``>= 0`` on every realisable ``v``. With

    A(T) = E_0 - Q(T)        (``E_0`` the identity on the ``dx`` block, 0 elsewhere)

the block tri-diagonal matrix of :mod:`lipbound.methods._schur` (the same ``A_i`` and ``C_i`` as
for the chain ``W_1, ..., W_{k-1}``), if the extended matrix

    X(T, r) = [[A(T), F^T], [F, r I]]

is positive semidefinite then (Schur complement on ``r I``, ``r > 0``) ``r A(T) - F^T F >= 0``,
so for every pair of inputs ``||dy||^2 = v^T F^T F v <= r ||dx||^2 - r Sigma(T) <= r ||dx||^2``:
the block is ``sqrt(r)``-Lipschitz in l2. This is LipSDP-neuron for the block (as in the
LipSDP extensions to residual networks): the chain's LMI with the output term ``F^T F``
coupling the input block to the last hidden block.

Scaling (exact). ``W_i <- W_i / c_i`` (``i < k``, ``c_i`` powers of two) with ``dw_i <- dw_i /
C_i`` (``C_i = c_1 ... c_i``) is a congruence of the LMI: the sector terms are homogeneous, and
the output becomes ``F = [S, 0, ..., C_{k-1} W_k]``; then ``F <- F / c_out`` gives ``r <- r /
c_out^2``. All factors are powers of two, so the scaled matrices are exact.

Certificate (float64, whatever produced ``T``). The float blocks of ``A(T)`` and their entrywise
error bounds come from :func:`lipbound.methods._schur._blocks`, the block balancing by powers of
two is the one of :func:`lipbound.methods._schur.certify_schur` (an exact congruence, subnormal
rounding covered by ``2^-1074`` per entry), and the PSD proof of ``X`` as a 2x2 block matrix
``[[A, F^T], [F, r I]]`` is :func:`lipbound.methods._schur._psd_check` (a Cholesky factorisation
of ``X`` shifted by Higham's backward error bound plus the formation error, checked after the
factorisation). ``r`` starts at the float ``lambda_max(F A^{-1} F^T)`` and is raised until the
check passes. The bound is ``sqrt(r) c_out`` rounded up. If ``A(T)`` is not positive definite,
or no ``r`` passes, there is no bound (``None``): the caller keeps its other bounds.

Optimiser: the closed-form multipliers of the chain (:func:`~lipbound.methods._schur.
closed_form_multipliers`, which make ``A(T)`` positive definite) as the start, then the dense
barrier method of :func:`~lipbound.methods._schur.barrier_newton` on ``X`` (the shortcut enters
its output coupling only); both candidates are certified and the smaller bound kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidArgumentError, NonFiniteError
from ._schur import (
    _F64,
    _TINY,
    SchurCertificate,
    _blocks,
    _pow2,
    _pow2_inv_sqrt,
    _psd_check,
    _to_bound,
    barrier_newton,
    closed_form_multipliers,
)

__all__ = ["ResidualSolution", "certify_residual", "scaled_block", "solve_residual"]


@dataclass(frozen=True)
class ResidualSolution:
    """Output of :func:`solve_residual`: ``value`` the certified bound of the block (``None``
    if no candidate passed), ``closed_form`` the closed-form multipliers' certified bound,
    ``raw`` the optimiser's float value (an estimate), ``multipliers`` the best ``T`` (scaled,
    normalised units, as :func:`certify_residual` takes them), ``scale`` ``c_out``."""

    value: float | None
    closed_form: float | None
    raw: float
    multipliers: list[torch.Tensor]
    scale: float
    steps: int
    why: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def scaled_block(
    shortcut: np.ndarray | torch.Tensor,
    weights: Sequence[np.ndarray | torch.Tensor],
    ranges: Sequence[tuple[float, float]],
) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Validated, exactly rescaled ``(S', [W_1', ..., W_{k-1}', W_k'], c_out)`` (docstring):
    the block's LMI on them, with ``r' = r / c_out^2``, is a congruence of the original."""
    Ws = [torch.as_tensor(np.asarray(W) if not isinstance(W, torch.Tensor) else W)
          .detach().to(dtype=_F64, device="cpu") for W in weights]
    S = torch.as_tensor(np.asarray(shortcut) if not isinstance(shortcut, torch.Tensor)
                        else shortcut).detach().to(dtype=_F64, device="cpu")
    if len(Ws) < 2 or len(Ws) != len(ranges) + 1:
        raise InvalidArgumentError(
            f"residual block: {len(Ws)} weight matrices and {len(ranges)} slope ranges; give "
            "k >= 2 matrices and k - 1 ranges"
        )
    for i, W in enumerate(Ws[1:], 1):
        if W.shape[1] != Ws[i - 1].shape[0]:
            raise InvalidArgumentError(f"residual block: weight {i} has {W.shape[1]} columns, "
                                       f"weight {i - 1} has {Ws[i - 1].shape[0]} rows")
    if tuple(S.shape) != (Ws[-1].shape[0], Ws[0].shape[1]):
        raise InvalidArgumentError(
            f"residual block: the shortcut is {tuple(S.shape)}, the branch maps "
            f"{Ws[0].shape[1]} -> {Ws[-1].shape[0]}; give a matrix of that shape"
        )
    if not all(bool(torch.isfinite(W).all()) for W in [S, *Ws]):
        raise NonFiniteError("residual block: a weight or the shortcut has NaN/inf entries")
    cs = [_pow2(W) for W in Ws[:-1]]
    Wp = [W / c for W, c in zip(Ws[:-1], cs)]
    last = Ws[-1] * math.prod(cs)
    c_out = max(_pow2(S), _pow2(last))
    return S / c_out, [*Wp, last / c_out], c_out


def _dense_lmi(
    S: torch.Tensor, Ws: Sequence[torch.Tensor], ranges: Sequence[tuple[float, float]],
    ts: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced float ``A(T)``, its entrywise error bound, ``F^T`` and its error bound."""
    A, Aerr, C, Cerr = _blocks(Ws, ranges, ts)
    ds = [_pow2_inv_sqrt(float(torch.diagonal(Ai).abs().max()) if Ai.numel() else 1.0)
          for Ai in A]
    offs = np.concatenate([[0], np.cumsum([Ai.shape[0] for Ai in A])]).astype(int)
    m = int(offs[-1])
    Ad = torch.zeros((m, m), dtype=_F64)
    Ed = torch.zeros((m, m), dtype=_F64)
    for i, Ai in enumerate(A):
        b = slice(offs[i], offs[i + 1])
        Ad[b, b], Ed[b, b] = Ai * ds[i] ** 2, Aerr[i] * ds[i] ** 2 + _TINY
    for i in range(len(A) - 1):
        p, q = slice(offs[i], offs[i + 1]), slice(offs[i + 1], offs[i + 2])
        f = ds[i] * ds[i + 1]
        Ad[p, q], Ed[p, q] = C[i] * f, Cerr[i] * f + _TINY
        Ad[q, p], Ed[q, p] = Ad[p, q].T, Ed[p, q].T
    Ft = torch.zeros((m, S.shape[0]), dtype=_F64)
    Ft[offs[0]:offs[1]] = S.T * ds[0]
    Ft[offs[-2]:offs[-1]] = C[-1] * ds[-1]  # C[-1] = W_k^T (k >= 2: a different block)
    return Ad, Ed, Ft, torch.full_like(Ft, _TINY)


def certify_residual(
    S: torch.Tensor, Ws: Sequence[torch.Tensor], ranges: Sequence[tuple[float, float]],
    ts: Sequence[torch.Tensor], *, max_tries: int = 20,
) -> SchurCertificate:
    """Proof (module docstring) that ``X(T, r) >= 0`` for the smallest ``r`` found, on the
    scaled block of :func:`scaled_block`; ``rho = r`` (``None`` and the reason if none)."""
    if len(ts) != len(ranges) or any(t.shape[0] != Ws[i].shape[0] for i, t in enumerate(ts)):
        raise InvalidArgumentError("certify_residual: one multiplier vector per hidden layer")
    ts = [t.to(_F64) for t in ts]
    if any(bool((t < 0).any()) or not bool(torch.isfinite(t).all()) for t in ts):
        return SchurCertificate(None, "certificate failed: negative or non-finite multipliers")
    Ad, Ed, Ft, Fe = _dense_lmi(S, Ws, ranges, ts)
    L, info = torch.linalg.cholesky_ex(Ad)
    if int(info) != 0:
        return SchurCertificate(None, "certificate failed: A(T) is not positive definite")
    Y = torch.linalg.solve_triangular(L, Ft, upper=False)
    K = Y.T @ Y
    r0 = max(float(torch.linalg.eigvalsh((K + K.T) / 2).max()), 1e-300)
    dout = _pow2_inv_sqrt(r0)  # the output block balanced too: r = r' / dout^2 (exact)
    Fs, Fse = Ft * dout, Fe * dout + _TINY
    r0 *= dout**2
    bump = 1e-12
    for _ in range(max_tries):
        r = r0 * (1 + bump) + 1e-300
        bot = torch.full((Ft.shape[1],), r, dtype=_F64).diag()
        if _psd_check(Ad, Fs, bot, Ed, Fse, None):
            rho = r / dout**2
            if rho * dout**2 < r:  # subnormal quotient: round up
                rho = float(np.nextafter(rho, math.inf))
            return SchurCertificate(rho, "verified")
        bump *= 8
    return SchurCertificate(None, "certificate failed: no output bound r passed the check")


def solve_residual(
    shortcut: np.ndarray | torch.Tensor,
    weights: Sequence[np.ndarray | torch.Tensor],
    ranges: Sequence[tuple[float, float]],
    *,
    time_limit: float | None = 60.0,
    optimise: bool = True,
    max_steps: int = 400,
) -> ResidualSolution:
    """Certified LipSDP-neuron bound of the block ``y = S x + W_k phi(... W_1 x)``: closed-form
    multipliers, then the barrier method (``optimise``; at most ``max_steps`` Newton steps and
    ``time_limit`` seconds), each certified by :func:`certify_residual` (module docstring)."""
    t0 = time.perf_counter()
    S, Ws, c_out = scaled_block(shortcut, weights, ranges)
    rng = [(float(a), float(b)) for a, b in ranges]
    with torch.no_grad():
        _, _, ts_c, _ = closed_form_multipliers(Ws, rng)
    cert_c = certify_residual(S, Ws, rng, ts_c)
    notes: list[str] = [] if cert_c.rho is not None else [f"closed form: {cert_c.why}"]
    best, ts_best, raw, steps = cert_c.rho, ts_c, math.nan, 0
    if optimise and cert_c.rho is not None:
        deadline = math.inf if time_limit is None else t0 + time_limit
        t_n, r_n, steps, status = barrier_newton(
            [W.numpy() for W in Ws], rng, torch.cat(ts_c).numpy(), float(cert_c.rho),
            deadline=deadline, max_newton=max_steps, shortcut=S.numpy(),
        )
        raw = math.sqrt(max(r_n, 0.0)) * c_out
        sizes = [W.shape[0] for W in Ws[:-1]]
        ts_n = [torch.as_tensor(x) for x in np.split(t_n, np.cumsum(sizes)[:-1])]
        cert_n = certify_residual(S, Ws, rng, ts_n)
        notes.append(f"barrier method: {status} after {steps} Newton steps"
                     + ("" if cert_n.rho is not None else f"; {cert_n.why}"))
        if cert_n.rho is not None and cert_n.rho < cert_c.rho:
            best, ts_best = cert_n.rho, ts_n
    return ResidualSolution(
        value=_to_bound(best, c_out), closed_form=_to_bound(cert_c.rho, c_out),
        raw=raw, multipliers=ts_best, scale=c_out, steps=steps,
        why="verified" if best is not None else cert_c.why,
        seconds=time.perf_counter() - t0, notes=notes,
    )
