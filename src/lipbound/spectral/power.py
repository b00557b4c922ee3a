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

__all__ = ["Triplets", "power_iteration", "finish", "norm64", "unit_rows", "vnorm"]


@dataclass
class Triplets:
    """Raw output of an iterative method (singular values descending)."""

    sigmas: torch.Tensor  # (k,) float64
    u: torch.Tensor  # (k, *out_shape)
    v: torch.Tensor  # (k, *in_shape)
    converged: bool
    steps: int  # A^T A products (per vector)


def norm64(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norm accumulated in float64 (returned in float64).

    A float32 reduction over a long vector loses accuracy with its length: for random float32
    vectors of the spectral benchmark's layer sizes, ``torch.linalg.vector_norm`` was off by
    2.6e-6 (relative) at 2e5 entries and 2.7e-5 at 1e6, and the rows of a float32 QR factor
    had norms ``1 +- 1.5e-5`` at 2e5 entries (torch 2.13, CPU). A "unit" vector normalised
    that way inflates ``||A v||`` by as much, above ``||A||_2``; every normalisation here
    accumulates in float64 (Lanczos' per-step norms use :func:`vnorm`, float64 across blocks).
    """
    return torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim, dtype=torch.float64)


def vnorm(x: torch.Tensor) -> float:
    """Euclidean norm of a vector to float32 rounding, ~3x faster than :func:`norm64`.

    Blocks of 2048 entries are reduced in the vector's dtype (a float32 sum of 2048 squares
    is accurate to about eps, ~1e-7 relative) and the block sums are combined in float64, so
    the error does not grow with the length: on random float32 vectors of 1.5e5-8e5 entries
    it was at most 1.3e-8 relative (20 draws each, against float64), where a plain float32
    reduction was off by up to 9.2e-6 (torch 2.13, CPU). float64 vectors go to
    :func:`norm64`, and so do vectors under 65536 entries, where its single reduction is
    faster (~15 us of overhead per call for the blocks). Used for the per-step norms of
    Lanczos; the final unit vectors behind returned values are still normalised with
    :func:`norm64`.
    """
    x = x.reshape(-1)
    n = x.numel()
    if x.dtype == torch.float64 or n < 65536:
        # short vectors: the one float64 reduction is cheaper than the block bookkeeping
        return float(norm64(x))
    c = 2048
    m = n - n % c
    blocks = torch.linalg.vector_norm(x[:m].reshape(-1, c), dim=1).to(torch.float64)
    s = float(blocks @ blocks)
    if m < n:
        s += float(norm64(x[m:])) ** 2
    return s**0.5


def unit_rows(V: torch.Tensor) -> torch.Tensor:
    """Rows of a (k, n) matrix scaled to unit norm (norms accumulated in float64)."""
    return V / norm64(V, dim=1, keepdim=True).clamp_min(1e-300).to(V.dtype)


def _orth_rows(V: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the rows of a (k, n) matrix (QR with a sign fix, then the row norms
    corrected in float64: a float32 QR leaves them off by up to ~1e-4, see :func:`norm64`)."""
    Q, R = torch.linalg.qr(V.T)
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1
    return unit_rows((Q * s).T.contiguous())


def finish(A: Operator, V: torch.Tensor, converged: bool, steps: int) -> Triplets:
    """Turn unit right vectors ``V`` (k, n) into triplets with ``sigma_i = ||A v_i||``.

    For ``k > 1`` the block is first rotated by the SVD of ``A V`` (Rayleigh-Ritz), so the
    returned ``u_i`` are orthonormal and ``sigma_i`` are the Ritz singular values. Each
    ``sigma_i`` is ``||A v_i||`` for the returned ``v_i``, whose norm is 1 to float64
    accumulation (see :func:`norm64`): an estimate from below up to the rounding of ``A v``.
    """
    k = V.shape[0]
    V = unit_rows(V.reshape(k, -1))
    Z = A.matvec(V.reshape(k, *A.in_shape)).reshape(k, -1)
    if k > 1:
        # Z^T = P S Rh; rotated rows Rh V map to Rh Z = S P^T. Z is rotated rather than
        # rebuilt from P and S, whose float32 factorisation misstates norms by ~1e-5
        Rh = torch.linalg.svd(Z.T, full_matrices=False)[2]
        V = Rh @ V
        Z = Rh @ Z
        s = norm64(V, dim=1, keepdim=True).to(V.dtype)
        V = V / s
        Z = Z / s
    sig = norm64(Z, dim=1)
    if k > 1:
        order = torch.argsort(sig, descending=True, stable=True)
        sig, V, Z = sig[order], V[order], Z[order]
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
            sig = norm64(Z, dim=1)
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
            nw = float(norm64(W))
            if nw == 0.0:
                break
            V = W / nw
        else:
            V = _orth_rows(W)
    return finish(A, V, converged or tol == 0, steps)
