"""The paper's power method on ``A^T A`` through autodiff (block version for top-k).

One iteration is one forward product ``z = A v`` and one vector-Jacobian product ``A^T z``:

    v <- A^T A v / ||A^T A v||,    sigma = ||A v||   (||v|| = 1).

``sigma = ||A v||`` with a unit ``v`` never exceeds ``||A||_2`` (up to rounding): the iterates
approach the norm from BELOW, so the value is an estimate (and a lower bound), never a
certificate. For ``k > 1`` the block is re-orthonormalised (QR) every step and rotated by the
SVD of ``A V`` (Rayleigh-Ritz), which gives the top-k singular triplets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._ops import Operator

__all__ = ["Triplets", "power_iteration", "finish"]


@dataclass
class Triplets:
    """Raw output of an iterative method (singular values descending)."""

    sigmas: torch.Tensor  # (k,) float64
    u: torch.Tensor  # (k, *out_shape)
    v: torch.Tensor  # (k, *in_shape)
    converged: bool
    steps: int  # A^T A products (per vector)


def _orth_rows(V: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the rows of a (k, n) matrix (QR with a sign fix)."""
    Q, R = torch.linalg.qr(V.T)
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1
    return (Q * s).T.contiguous()


def finish(A: Operator, V: torch.Tensor, converged: bool, steps: int) -> Triplets:
    """Turn unit right vectors ``V`` (k, n) into triplets with ``sigma_i = ||A v_i||``.

    For ``k > 1`` the block is first rotated by the SVD of ``A V`` (Rayleigh-Ritz), so the
    returned ``u_i`` are orthonormal and ``sigma_i`` are the Ritz singular values.
    """
    k = V.shape[0]
    Z = A.matvec(V.reshape(k, *A.in_shape)).reshape(k, -1)
    if k > 1:
        P, S, Rh = torch.linalg.svd(Z.T, full_matrices=False)  # Z^T = P S Rh
        V = Rh @ V  # rotate: A (Rh V)^T = P S
        Z = (P * S).T
    sig = torch.linalg.vector_norm(Z.to(torch.float64), dim=1)
    U = Z / sig.clamp_min(torch.finfo(torch.float64).tiny).to(Z.dtype)[:, None]
    return Triplets(sig, U.reshape(k, *A.out_shape), V.reshape(k, *A.in_shape), converged, steps)


def power_iteration(
    A: Operator,
    k: int,
    tol: float,
    max_iter: int,
    gen: torch.Generator,
    *,
    history: list[float] | None = None,
) -> Triplets:
    """(Block) power iteration on ``A^T A``; stops when every sigma moves by <= ``tol`` relative.

    ``tol = 0`` runs exactly ``max_iter`` iterations (the paper's fixed-count variant).
    ``history``, if given, receives the top sigma of every iteration (for benchmarks).
    """
    V = _orth_rows(A.randn(k, gen).reshape(k, -1))
    old: torch.Tensor | None = None
    converged = False
    steps = 0
    for _ in range(max_iter):
        Z = A.matvec(V.reshape(k, *A.in_shape)).reshape(k, -1)
        if k == 1:
            sig = torch.linalg.vector_norm(Z.to(torch.float64), dim=1)
        else:
            P, S, _ = torch.linalg.svd(Z.T, full_matrices=False)
            Z = (P * S).T
            sig = S.to(torch.float64)
        W = A.rmatvec(Z.reshape(k, *A.out_shape)).reshape(k, -1)
        steps += k
        if history is not None:
            history.append(float(sig[0]))
        if old is not None and tol > 0:
            if bool(((sig - old).abs() <= tol * sig).all()):
                converged = True
                break
        old = sig
        if k == 1:
            nw = torch.linalg.vector_norm(W)
            if float(nw) == 0.0:
                break
            V = W / nw
        else:
            V = _orth_rows(W)
    return finish(A, V, converged or tol == 0, steps)
