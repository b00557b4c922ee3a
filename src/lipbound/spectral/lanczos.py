"""Thick-restart Lanczos on ``A^T A`` through autodiff, and ARPACK through scipy.

Each step applies ``B = A^T A`` to one vector (one forward product and one vector-Jacobian
product) and orthogonalises the result locally, in one classical Gram-Schmidt pass, against the
last two basis vectors and the kept Ritz vectors of the last restart: in exact arithmetic the
only non-zero coefficients (the kept vectors are included on every step because their Krylov
relation holds only to the basis' orthogonality level; without them that level grew ~10x per
restart in long runs). After that pass the new vector's inner products with these are at
Paige's local level ``eps ||B|| / beta``, which seeds the estimates below. Rounding makes the
basis lose orthogonality as Ritz vectors converge (Paige); *partial re-orthogonalisation*
(Simon 1984) tracks estimates ``omega_ik`` of the inner products ``q_i . q_k`` with the
omega-recurrence and re-orthogonalises against the whole basis (classical Gram-Schmidt, a
second pass when the DGKS criterion detects cancellation) only when one exceeds ``eps^(3/4)``,
and then on the next step too. The basis thereby stays orthogonal to ``eps^(3/4)``, which keeps
the Rayleigh-Ritz values accurate to working precision while skipping most full passes (a full
pass ran on 34% of the steps on the spectral benchmark's layers, 45% with 200 wanted triplets
on alexnet.features.10). ``full_reorth=True`` runs one on every step. The Rayleigh-Ritz matrix
``H = Q B Q^T`` is formed column by column from the local coefficients (the rounding-level
coefficients of a full pass are left out, as in Simon's scheme; only ``Q`` is stored), and its
top eigenpairs ``(theta_i, s_i)`` give Ritz pairs ``y_i = Q^T s_i``. When the basis is full,
the top Ritz vectors are kept (thick restart, Wu & Simon 2000; their own orthogonality is
measured and restored by one Loewdin step) and the Krylov process continues from the last
residual, which is orthogonal to all of them.

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
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SolverError
from ._ops import Operator
from .power import Triplets, _orth_rows, finish, norm64, vnorm

__all__ = ["lanczos", "arpack"]


def lanczos(  # noqa: PLR0913 - the module's entry point: one keyword option per knob
    A: Operator,
    k: int,
    tol: float,
    max_iter: int,
    gen: torch.Generator,
    *,
    basis: int | None = None,
    keep: int | None = None,
    v0: torch.Tensor | None = None,
    full_reorth: bool = False,
) -> Triplets:
    """Top-``k`` right singular vectors of ``A`` by thick-restart Lanczos on ``A^T A``.

    ``basis`` is the largest basis size (default ``max(2k + 10, 24)``), ``keep`` the number of
    Ritz vectors kept at a restart (default ``max(k + 3, basis // 6)``: every kept vector is
    part of every local step, so each costs two basis-length passes per step; on the spectral
    benchmark's layers (k = 1) keeping 4 instead of 8 took 0.3% fewer products and 4% less
    time); ``max_iter`` bounds
    the number of ``A^T A`` products; ``v0`` an optional start vector (default random);
    ``full_reorth`` re-orthogonalises every new vector against the whole basis (default:
    partial re-orthogonalisation, see the module docstring).
    """
    s = _start(A, k, gen, basis, keep, v0)
    converged = False
    while s.steps < max_iter:
        r, beta = _extend(s, full_reorth)
        s.since += 1
        j = s.j
        must = j == s.m or j == s.n or s.steps >= max_iter
        must = must or beta <= 32 * s.eps * max(s.top, 1e-300)
        if not (must or (j >= k and s.since >= s.every)):
            s.q, s.placed = _next_vector(r, beta, s.Q, j)
            continue
        s.since = 0
        _rayleigh_ritz(s)
        if _stop(s, tol, beta):
            converged = True
            break
        if j == s.n:  # the basis spans the whole space: Ritz pairs are exact
            converged = True
            break
        if beta <= 32 * s.eps * max(s.top, 1e-300):
            # invariant subspace: continue with a fresh random direction
            r, beta = _fresh_direction(s, gen)
            if beta == 0.0:
                converged = True
                break
        s.q, s.placed = _next_vector(r, beta, s.Q, j)
        if j == s.m:  # thick restart: keep the top p Ritz vectors
            _thick_restart(s)
    V = _t(s.S64[:, :k], s.Q).T @ s.Q[: s.j]
    if k > 1:
        V = _orth_rows(V)
    return finish(A, V, converged, s.steps)  # finish scales the rows to unit norm


@dataclass
class _Krylov:
    """The state of one :func:`lanczos` run: sizes, the basis ``Q`` (rows ``0..j-1``), the
    Rayleigh-Ritz matrix, the orthogonality estimates and the stopping rules' memory."""

    A: Operator
    k: int
    n: int  # the operator's input size
    m: int  # the largest basis size
    p: int  # Ritz vectors kept at a thick restart
    eps: float
    # rows >= j are never read, so the buffer needs no zero fill. The small matrices (H, the
    # orthogonality estimates, the Ritz coordinates) live in float64 NumPy: per-step torch
    # calls on them would cost more than the arithmetic.
    Q: torch.Tensor
    Hm: np.ndarray
    # partial re-orthogonalisation (Simon 1984): Om holds estimates of the inner products
    # q_i . q_k, propagated by the omega-recurrence; a full pass runs only when one exceeds
    # delta = eps^(3/4), on the step after, on the step before a restart, and on every step
    # with full_reorth=True
    Om: np.ndarray
    delta: float
    # Rayleigh-Ritz (an eigh of the j x j matrix) every step for small k, every k // 10 steps
    # for large k (where it would dominate the cost), and always before a restart
    every: int
    q: torch.Tensor  # the next basis vector
    placed: bool = False  # whether q already sits in row j of Q
    j: int = 0
    steps: int = 0
    theta: np.ndarray = field(default_factory=lambda: np.zeros(0))
    S64: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    hist: list[list[float]] = field(default_factory=list)  # top k + 1 Ritz singular values
    since: int = 0
    top: float = 0.0
    kappa: float = 1.0
    again: bool = False  # a full pass is due on this step (the one after an omega-triggered pass)
    pk: int = 0  # kept Ritz vectors (rows 0..pk-1 of Q), part of every local step


def _start(A: Operator, k: int, gen: torch.Generator, basis: int | None, keep: int | None,
           v0: torch.Tensor | None) -> _Krylov:
    """The state before the first step: sizes, empty matrices, the unit start vector."""
    n = A.n_in
    m = min(basis or max(2 * k + 10, 24), n)
    p = min(keep or max(k + 3, m // 6), m - 1) if m > 1 else 0
    dt = A.dtype
    eps = torch.finfo(dt).eps
    Q = torch.empty((m, n), dtype=dt, device=A.device)
    Hm = np.zeros((m, m))
    q = A.randn(1, gen).reshape(-1) if v0 is None else v0.to(dt).reshape(-1).clone()
    q = q / vnorm(q)
    return _Krylov(A=A, k=k, n=n, m=m, p=p, eps=eps, Q=Q, Hm=Hm, Om=np.zeros((m + 1, m + 1)),
                   delta=eps**0.75, every=1 if k <= 10 else k // 10, q=q)


def _extend(s: _Krylov, full_reorth: bool) -> tuple[torch.Tensor, float]:
    """One Lanczos step: ``B q_j`` orthogonalised locally (and against the whole basis when
    due), the new column of ``H`` and row of the omega estimates; returns the residual ``r``
    and its norm ``beta``."""
    Q = s.Q
    if not s.placed:
        Q[s.j] = s.q
    s.Om[s.j, s.j] = 1.0
    Bq = s.A.gram(s.q.reshape(1, *s.A.in_shape)).reshape(-1)
    s.steps += 1
    s.j += 1
    j = s.j
    # new column h = Q B q_j of the Rayleigh-Ritz matrix H = Q B Q^T. Local Lanczos step
    # against q_j, q_{j-1} and the kept Ritz vectors (in exact arithmetic the only
    # non-zero entries; the kept vectors are included on every step since their Krylov
    # relation only holds to the basis' orthogonality level), in one pass (a second one
    # cost 6% of the benchmark's time for no change in accuracy or in the number of full
    # passes); the new vector's inner products with these are then at Paige's level
    # eps ||B|| / beta. H keeps these entries only: the coefficients of a full pass are
    # rounding-level and are left out, as in Simon's scheme. (Leaving the kept vectors
    # out after the first post-restart step, to the omega estimates alone, saved 4% on the
    # benchmark but ran away in the benchmark's float64 reference run on resnet18.conv1:
    # after ~700 steps the Ritz values grew far above ||B||. Do not.)
    lo = max(0, j - 2)
    r, h = _local_step(Q, Bq, j, s.pk, lo)
    beta = vnorm(r)
    s.Hm[:j, j - 1] = h
    s.Hm[j - 1, :j] = h
    w = _omega(s, h, beta, lo)
    by_omega = float(np.abs(w).max()) > s.delta
    if full_reorth or s.again or j == s.m or by_omega:
        # full classical Gram-Schmidt pass, a second one only when the first cancelled
        # (DGKS); one asked for by the estimates is repeated on the next step
        s.again = by_omega and not s.again and j < s.m
        r, beta = _full_pass(r, Q[:j], beta)
        w = np.full(j, s.eps)
    s.Om[j, :j] = w
    s.Om[:j, j] = w
    return r, beta


def _local_step(Q: torch.Tensor, Bq: torch.Tensor, j: int, pk: int, lo: int
                ) -> tuple[torch.Tensor, np.ndarray]:
    """``(r, h)``: ``Bq`` minus its components on rows ``0..pk-1`` and ``lo..j-1`` of ``Q``
    (one classical Gram-Schmidt pass), and those components (zero elsewhere)."""
    blocks = [(0, j)] if lo <= pk else [(0, pk), (lo, j)]
    h = np.zeros(j)
    # r is updated in place (an out-of-place addmv costs one more pass over the vector,
    # +35% per update at n = 2e5); Bq is a fresh product, copied only if it shares Q's
    # storage
    r = Bq if Bq.untyped_storage().data_ptr() != Q.untyped_storage().data_ptr() else Bq.clone()
    for a, b in blocks:
        Qb = Q[a:b]
        cb = Qb @ r
        r.addmv_(Qb.T, cb, alpha=-1.0)
        h[a:b] = cb.tolist()
    return r, h


def _omega(s: _Krylov, h: np.ndarray, beta: float, lo: int) -> np.ndarray:
    """Estimates of the inner products of the new vector ``r / beta`` with rows ``0..j-1`` of
    the basis, by the omega-recurrence."""
    j, pk, eps = s.j, s.pk, s.eps
    # omega-recurrence: from B q_i = sum_l H_li q_l + (rounding) for i < j and
    # beta q_new = B q_j - sum_l H_lj q_l, q_i . q_new ~= (H Om - Om H)[i, j] / beta, plus
    # a rounding term of size eps ||B|| / beta (||B|| ~ max(top, ||B q_j||))
    if beta > 0:
        nb = max(s.top, math.sqrt(float(h @ h) + beta * beta))
        w = (s.Hm[:j, :j] @ s.Om[:j, j - 1] - s.Om[:j, :j] @ h) / beta
        w += np.where(w >= 0, 1.0, -1.0) * (2 * eps * nb / beta)
        w[:pk] = eps * nb / beta
        w[lo:j] = eps * nb / beta
    else:
        w = np.full(j, eps)
    return w


def _full_pass(r: torch.Tensor, Qj: torch.Tensor, beta: float) -> tuple[torch.Tensor, float]:
    """``r`` (of norm ``beta``) orthogonalised against every row of ``Qj`` by classical
    Gram-Schmidt, with a second pass when the first cancelled (DGKS); and its norm."""
    before = beta
    r = _project_out(r, Qj)
    beta = vnorm(r)
    if beta < 0.7 * before:
        r = _project_out(r, Qj)
        beta = vnorm(r)
    return r, beta


def _rayleigh_ritz(s: _Krylov) -> None:
    """The Ritz values ``theta`` (descending) and coordinates ``S64`` of ``H``, and ``top``."""
    th, Sv = np.linalg.eigh(s.Hm[: s.j, : s.j])
    s.theta = th[::-1].copy()
    s.S64 = Sv[:, ::-1].copy()
    s.top = float(s.theta[0])


def _stop(s: _Krylov, tol: float, beta: float) -> bool:
    """Whether the wanted Ritz pairs have converged (rules (2) and (1) of the module
    docstring); ``beta`` is the last residual's norm."""
    k, j = s.k, s.j
    kg = k + 1  # one guard Ritz value: stops only once the next one has settled too
    if j < kg:
        return False
    s.hist.append(np.sqrt(np.clip(s.theta[:kg], 0, None)).tolist())
    if j > kg and _extrapolated_small(s.hist, kg, tol):
        return True
    # cheap residuals from the Krylov relation B Q^T = Q^T H + r e_j^T, confirmed by
    # the exact residuals (one product per pair) before stopping. Rounding makes the
    # exact residual larger than the cheap one; after a failed confirmation the cheap
    # ones are scaled by the ratio seen (kappa), so that products are not spent on
    # checks bound to fail
    cheap = (s.kappa * beta * np.abs(s.S64[j - 1, :k])).tolist()
    if not _small(cheap, s.theta, k, tol, s.eps, s.top):
        return False
    Q = s.Q
    Y = _t(s.S64[:, :k], Q).T @ Q[:j]
    BY = s.A.gram(Y.reshape(k, *s.A.in_shape)).reshape(k, -1)
    s.steps += k
    res = norm64(BY - _t(s.theta[:k, None], Q) * Y, dim=1).tolist()
    if _small(res, s.theta, k, tol, s.eps, s.top):
        return True
    s.kappa = max([s.kappa] + [s.kappa * e / max(c, 1e-300) for e, c in zip(res, cheap)])
    return False


def _fresh_direction(s: _Krylov, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """A random vector orthogonalised (twice) against the basis, and its norm, to continue
    from an invariant subspace."""
    j, Qj = s.j, s.Q[: s.j]
    r = _project_out(_project_out(s.A.randn(1, gen).reshape(-1), Qj), Qj)
    beta = vnorm(r)
    s.Om[j, :j] = s.eps
    s.Om[:j, j] = s.eps
    return r, beta


def _thick_restart(s: _Krylov) -> None:
    """Keep the top ``p`` Ritz vectors as the new basis (Wu & Simon 2000), re-orthonormalised
    by one Loewdin step, with their projected matrix and orthogonality estimates."""
    p, j, eps, Q = s.p, s.j, s.eps, s.Q
    Q[:p] = _t(s.S64[:, :p], Q).T @ Q[:j]
    Hp = s.S64[:, :p].T @ s.Hm[:j, :j] @ s.S64[:, :p]
    Hp = 0.5 * (Hp + Hp.T)
    # the kept vectors are orthonormal up to the basis' loss of orthogonality: measure
    # it (p x p Gram matrix, E = G - I) and apply one Loewdin step Y <- (I - E/2) Y,
    # which leaves O(|E|^2); the projected matrix follows: Hp <- (I - E/2) Hp (I - E/2)
    E = (Q[:p] @ Q[:p].T).double().cpu().numpy() - np.eye(p)
    if float(np.abs(E).max()) > 10 * eps:
        T = np.eye(p) - 0.5 * E
        Q[:p] = _t(T, Q) @ Q[:p]
        Hp = T @ Hp @ T.T
        Hp = 0.5 * (Hp + Hp.T)
        E = (Q[:p] @ Q[:p].T).double().cpu().numpy() - np.eye(p)
    s.Hm[:] = 0.0
    s.Hm[:p, :p] = Hp
    s.Om[:] = 0.0
    s.Om[:p, :p] = E + np.eye(p)
    # q was fully re-orthogonalised against the whole basis (j == m forces it)
    s.Om[p, :p] = eps
    s.Om[:p, p] = eps
    s.pk = p
    s.j = p
    # the kept basis IS the top-p Ritz vectors: in case the loop ends before the next
    # Rayleigh-Ritz step, the Ritz coordinates are the identity
    s.theta = s.theta[:p]
    s.S64 = np.eye(p)


def _next_vector(r: torch.Tensor, beta: float, Q: torch.Tensor, j: int
                 ) -> tuple[torch.Tensor, bool]:
    """``r / beta``, written straight into basis row ``j`` when there is one (saves a copy of
    a basis-sized vector per step); returns the vector and whether it is already in place."""
    if j < Q.shape[0]:
        torch.div(r, beta, out=Q[j])
        return Q[j], True
    return r / beta, False


def _project_out(r: torch.Tensor, Qj: torch.Tensor) -> torch.Tensor:
    """``r <- r - Qj^T (Qj r)`` in place: one classical Gram-Schmidt pass against the rows of
    ``Qj`` (``r`` is a working vector of the iteration, never a row of the basis)."""
    return r.addmv_(Qj.T, Qj @ r, alpha=-1.0)


def _t(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A float64 NumPy array as a tensor with ``like``'s dtype and device."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype=like.dtype, device=like.device)


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


def _small(res: list[float], theta: np.ndarray, k: int, tol: float, eps: float,
           top: float) -> bool:
    """Every wanted Ritz value is within ``tol`` (relative, as a singular value) of an
    eigenvalue (see the module docstring, rule (1))."""
    for i in range(k):
        ti = float(theta[i])
        ri = res[i]
        # theta is sorted (descending): the nearest other Ritz value is a neighbour
        near = [float(theta[i - 1]) - ti] if i > 0 else []
        if i + 1 < theta.size:
            near.append(ti - float(theta[i + 1]))
        gap = min(near) if near else 0.0
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
