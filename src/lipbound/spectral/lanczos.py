"""Thick-restart Lanczos on ``A^T A`` through autodiff, and ARPACK through scipy.

Each step applies ``B = A^T A`` to one vector (one forward product and one vector-Jacobian
product) and orthogonalises the result against the whole basis (full re-orthogonalisation:
classical Gram-Schmidt, repeated when the DGKS criterion detects cancellation). The
Rayleigh-Ritz matrix ``H = Q B Q^T`` is formed column by column from the products
``Q (B q_j)`` (so it stays exact after restarts, and only ``Q`` is stored), and its top
eigenpairs ``(theta_i, s_i)`` give Ritz pairs ``y_i = Q^T s_i``. When the basis is full, the
top Ritz vectors are kept (thick restart, Wu & Simon 2000) and the Krylov process continues
from the last residual, which is orthogonal to all of them.

Stopping rules, per wanted pair (either suffices).
(1) With the *exact* residual ``r_i = ||B y_i - theta_i y_i||``, there is an eigenvalue of
``B`` within ``r_i`` of ``theta_i`` (Weyl), and within ``r_i^2 / gap_i`` (Kato-Temple) if no
other eigenvalue is within ``gap_i``, estimated from the Ritz values; the latter is used only
once the Ritz vector is accurate (``r_i / gap_i <= sqrt(tol)``), since when two top singular
values nearly coincide the Ritz vector mixes both and the estimated gap is wrong. We stop when
that distance is ``<= 2 tol theta_i``, i.e. the singular value ``sqrt(theta_i)`` is within
about ``tol`` relative of a singular value.
(2) The Ritz values increase monotonically; when their increments shrink geometrically (ratio
``rho < 0.95`` over the last six steps), the remaining distance is about
``d rho / (1 - rho)`` (``d`` the last increment) and we stop when that is
``<= tol sigma / 2`` for the wanted values AND one guard value (the ``k+1``-th), at two
consecutive checks. The guard and the persistence are there for plateaus: when the top two
singular values are nearly equal, the top Ritz value first converges geometrically to a point
between them and then creeps on while the second direction is resolved; the guard value is
still moving then, and a single check would be fooled. This makes Lanczos stop near the
accuracy asked for (rule (1) alone overshoots by orders of magnitude when the top of the
spectrum is clustered, as in random conv layers).

Like the power method, the final value ``||A y_1||`` (``||y_1|| = 1``) never exceeds
``||A||_2`` up to rounding: it is an estimate from below, not a certificate.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import SolverError
from ._ops import Operator
from .power import Triplets, _orth_rows, finish

__all__ = ["lanczos", "arpack"]


def lanczos(
    A: Operator,
    k: int,
    tol: float,
    max_iter: int,
    gen: torch.Generator,
    *,
    basis: int | None = None,
    keep: int | None = None,
    v0: torch.Tensor | None = None,
) -> Triplets:
    """Top-``k`` right singular vectors of ``A`` by thick-restart Lanczos on ``A^T A``.

    ``basis`` is the largest basis size (default ``max(2k + 10, 24)``), ``keep`` the number of
    Ritz vectors kept at a restart (default ``max(k + 4, basis // 3)``); ``max_iter`` bounds
    the number of ``A^T A`` products; ``v0`` an optional start vector (default random).
    """
    n = A.n_in
    m = min(basis or max(2 * k + 10, 24), n)
    p = min(keep or max(k + 4, m // 3), m - 1) if m > 1 else 0
    dt = A.dtype
    eps = torch.finfo(dt).eps
    # rows >= j are never read, so the buffers need no zero fill
    Q = torch.empty((m, n), dtype=dt, device=A.device)
    Hm = torch.zeros((m, m), dtype=torch.float64)
    q = A.randn(1, gen).reshape(-1) if v0 is None else v0.to(dt).reshape(-1).clone()
    q = q / torch.linalg.vector_norm(q)
    j = 0
    steps = 0
    converged = False
    theta = torch.zeros(0, dtype=torch.float64)
    S = torch.zeros((0, 0), dtype=dt)
    hist: list[list[float]] = []  # top-k Ritz singular values after each check
    # Rayleigh-Ritz (an eigh of the j x j matrix) every step for small k, every k // 10 steps
    # for large k (where it would dominate the cost), and always before a restart
    every = 1 if k <= 10 else k // 10
    since = 0
    top = 0.0
    kg = k + 1  # one guard Ritz value: stops only once the next one has settled too
    while steps < max_iter:
        Q[j] = q
        Bq = A.gram(q.reshape(1, *A.in_shape)).reshape(-1)
        steps += 1
        j += 1
        # new column h = Q B q_j of the Rayleigh-Ritz matrix H = Q B Q^T (symmetric, exact
        # entries, also after restarts). Local Lanczos step first (against q_j and q_{j-1}:
        # in exact arithmetic the only non-zero entries, apart from the kept Ritz vectors
        # right after a restart), then one full classical Gram-Schmidt pass, which removes
        # what rounding (or the restart) left; its coefficients complete h. A second full
        # pass only when that one cancelled (DGKS criterion).
        lo = max(0, j - 2)
        hl = Q[lo:j] @ Bq
        r = torch.addmv(Bq, Q[lo:j].T, hl, alpha=-1.0)
        before = float(torch.linalg.vector_norm(r))
        h = Q[:j] @ r
        r = torch.addmv(r, Q[:j].T, h, alpha=-1.0)
        h[lo:j] += hl
        beta = float(torch.linalg.vector_norm(r))
        if beta < 0.7 * before:
            c = Q[:j] @ r
            r = torch.addmv(r, Q[:j].T, c, alpha=-1.0)
            h += c
            beta = float(torch.linalg.vector_norm(r))
        Hm[:j, j - 1] = h.to(torch.float64)
        Hm[j - 1, :j] = h.to(torch.float64)
        since += 1
        must = j == m or j == n or steps >= max_iter or beta <= 32 * eps * max(top, 1e-300)
        if not (must or (j >= k and since >= every)):
            q = r / beta
            continue
        since = 0
        th, Sv = torch.linalg.eigh(Hm[:j, :j])
        theta = th.flip(0)
        S64 = Sv.flip(1)
        S = S64.to(dt)
        top = float(theta[0])
        if j >= kg:
            hist.append(theta[:kg].clamp_min(0).sqrt().tolist())
            if j > kg and _extrapolated_small(hist, kg, tol):
                converged = True
                break
            # cheap residuals from the Krylov relation B Q^T = Q^T H + r e_j^T, confirmed by
            # the exact residuals before stopping
            cheap = (beta * S64[j - 1, :k].abs()).tolist()
            if _small(cheap, theta, k, tol, eps, top):
                Y = S[:, :k].T @ Q[:j]
                BY = A.gram(Y.reshape(k, *A.in_shape)).reshape(k, -1)
                steps += k
                res = torch.linalg.vector_norm(
                    (BY - theta[:k, None].to(dt) * Y).to(torch.float64), dim=1
                ).tolist()
                if _small(res, theta, k, tol, eps, top):
                    converged = True
                    break
        if j == n:  # the basis spans the whole space: Ritz pairs are exact
            converged = True
            break
        if beta <= 32 * eps * max(top, 1e-300):
            # invariant subspace: continue with a fresh random direction
            z = A.randn(1, gen).reshape(-1)
            z = z - Q[:j].T @ (Q[:j] @ z)
            z = z - Q[:j].T @ (Q[:j] @ z)
            r = z
            beta = float(torch.linalg.vector_norm(r))
            if beta == 0.0:
                converged = True
                break
        q = r / beta
        if j == m:  # thick restart: keep the top p Ritz vectors
            Sp = S[:, :p]
            Q[:p] = Sp.T @ Q[:j]
            Hp = S64[:, :p].T @ Hm[:j, :j] @ S64[:, :p]
            Hm.zero_()
            Hm[:p, :p] = 0.5 * (Hp + Hp.T)
            j = p
            # the kept basis IS the top-p Ritz vectors: in case the loop ends before the next
            # Rayleigh-Ritz step, the Ritz coordinates are the identity
            theta = theta[:p]
            S64 = torch.eye(p, dtype=torch.float64)
            S = S64.to(dt)
    V = S[:, :k].T @ Q[:j]
    V = _orth_rows(V) if k > 1 else V / torch.linalg.vector_norm(V)
    return finish(A, V, converged, steps)


def _extrapolated_small(hist: list[list[float]], k: int, tol: float, *, factor: float = 0.5,
                        persist: int = 2) -> bool:
    """Geometric extrapolation of the Ritz values' increase (they grow monotonically).

    With increments ``d_j = sigma_j - sigma_{j-1} > 0`` shrinking by at most ``rho < 1`` per
    step over a window of six steps, the remaining distance to the limit is about
    ``d_j rho / (1 - rho)``; we stop when that is ``<= factor * tol * sigma_j`` at each of the
    last ``persist`` checks. The persistence guards against a plateau: when two singular
    values are nearly equal, the Ritz value first converges geometrically towards the pair's
    lower one and then creeps on; the first plateau step looks converged, the next ones do
    not (their increments stop shrinking). An estimate, like the value itself; the residual
    test in :func:`_small` is the other way to stop.
    """
    w = 6
    if len(hist) < w + persist:
        return False
    for back in range(persist):
        window = hist[len(hist) - back - w - 1 : len(hist) - back]
        for i in range(k):
            s = [h[i] for h in window]
            d = [s[t + 1] - s[t] for t in range(w)]
            if d[-1] < 0 or any(x <= 0 for x in d[:-1]):
                return False
            rho = max(d[t + 1] / d[t] for t in range(w - 1))
            if not rho < 0.95:
                return False
            if not d[-1] * rho / (1 - rho) <= factor * tol * s[-1]:
                return False
    return True


def _small(res: list[float], theta: torch.Tensor, k: int, tol: float, eps: float,
           top: float) -> bool:
    """Every wanted Ritz value is within ``tol`` (relative, as a singular value) of an
    eigenvalue (see the module docstring, rule (1))."""
    for i in range(k):
        ti = float(theta[i])
        ri = res[i]
        others = torch.cat([theta[:i], theta[i + 1 :]])
        gap = float((others - ti).abs().min()) if others.numel() else 0.0
        # Kato-Temple only once the Ritz vector is accurate (r / gap <= sqrt(tol))
        err = ri * ri / gap if gap > 0 and ri <= math.sqrt(tol) * gap else ri
        if not (err <= 2 * tol * ti or ri <= 32 * eps * top):
            return False
    return True


def arpack(A: Operator, k: int, tol: float, max_iter: int, gen: torch.Generator) -> Triplets:
    """Top-``k`` eigenpairs of ``A^T A`` with ARPACK (``scipy.sparse.linalg.eigsh``).

    Works in float64 NumPy; every ``A^T A`` product goes through the autodiff operator.
    ARPACK's ``tol`` is a relative residual tolerance on the Ritz values.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    n = A.n_in
    if k >= n:
        return lanczos(A, k, tol, max_iter, gen)
    steps = 0

    def mv(x: np.ndarray) -> np.ndarray:
        nonlocal steps
        steps += 1
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        t = t.to(device=A.device, dtype=A.dtype).reshape(1, *A.in_shape)
        return A.gram(t).reshape(-1).to("cpu", torch.float64).numpy()

    v0 = A.randn(1, gen).reshape(-1).to("cpu", torch.float64).numpy()
    lo = LinearOperator((n, n), matvec=mv, dtype=np.float64)
    converged = True
    try:
        _, vecs = eigsh(lo, k=k, which="LA", tol=tol, v0=v0, maxiter=max(1, max_iter))
    except ArpackNoConvergence as e:
        converged = False
        vecs = e.eigenvectors
        if vecs is None or vecs.shape[1] < k:
            raise SolverError(
                f"ARPACK did not converge in {max_iter} iterations; raise max_iter or use "
                "method='lanczos'"
            ) from e
    V = torch.from_numpy(np.ascontiguousarray(vecs.T)).to(device=A.device, dtype=A.dtype)
    V = _orth_rows(V)
    return finish(A, V, converged, steps)
