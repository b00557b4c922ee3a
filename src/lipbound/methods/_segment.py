"""SeqLip on one sequential segment: the pair and two-layer-block certificates of
:func:`lipbound.seqlip` (the proofs are in :mod:`lipbound.methods.seqlip` and
:mod:`lipbound.methods._pairs`), shared with :func:`lipbound.lipsdp`, whose composition keeps
the smaller of its own and SeqLip's certified factor on every segment.

:func:`_segment` takes a segment (``linear, act, ..., linear`` nodes of an analysed graph),
AutoLip's constants, the activations' slope ranges, a :class:`_Clock` (the time left, shared
over the work units) and the :class:`_Options`; it returns a :class:`_Segment`: the certified
factor (never above AutoLip's product), the estimates and the table rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .._progress import flop_rate
from ..analysis import segment_slopes
from ..errors import InvalidArgumentError, ZeroOperatorError
from ..graph.modules import eval_weight
from ..results import LayerBound
from ..spectral import shared_casts, top_singular
from ..spectral.certify import pow2_split
from ._pairs import (
    ROUNDING_MARGIN,
    pair_certified,
    pair_exact,
    pair_greedy,
    pair_value,
)

__all__ = ["CONV_PAIR_BYTES", "DEFAULTS", "conv_pair_bound", "conv_pair_cost", "segment_upper"]

_F64 = torch.float64
_UP = 1.0 + ROUNDING_MARGIN


# --------------------------------------------------------------------------------------------
# segments
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# circular-embedding certificate for stride-1 conv pairs
# --------------------------------------------------------------------------------------------
def _plain_conv2d(node: Any) -> tuple[nn.Conv2d, torch.Tensor] | None:
    """``(conv, weight)`` for a linear node that is a stride-1, undilated, ungrouped,
    zero-padded ``Conv2d``, possibly with an eval BatchNorm folded in (``weight`` is then the
    folded kernel ``diag(s) W``: the linear part of ``bn(conv(x))``); else ``None``."""
    m = node.module
    if isinstance(m, nn.Sequential) and len(m) == 1:
        m = m[0]
    weight = None
    inner = getattr(m, "linear", None)
    if isinstance(inner, nn.Conv2d) and hasattr(m, "bn"):  # FoldedBatchNorm(conv, bn)
        weight = m.weight
        m = inner
    if (
        isinstance(m, nn.Conv2d)
        and tuple(m.stride) == (1, 1)
        and tuple(m.dilation) == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    ):
        w = m.weight if weight is None else weight
        return m, w.detach()
    return None


def _max_norm_c(X: torch.Tensor) -> float:
    """``max`` over the batch of the spectral norms of complex matrices ``X`` (..., m, p), via
    the top eigenvalue of the Hermitian Gram matrix of the smaller side."""
    G = X.mH @ X if X.shape[-1] <= X.shape[-2] else X @ X.mH
    return float(torch.linalg.eigvalsh(G)[..., -1].clamp_min(0).max().sqrt())


#: most bytes the symbols of one :func:`conv_pair_bound` may take (VGG-11's 256-channel pair at
#: 56x56 needed 3 x 3.5 GB and 200 s: past it the pair keeps AutoLip's factors)
CONV_PAIR_BYTES = 1 << 30


def _pair_grid(first: nn.Conv2d, second: nn.Conv2d, in_hw: tuple[int, int]) -> tuple[int, int]:
    """The circular grid ``(N0, N1)`` on which :func:`conv_pair_bound` embeds the pair: large
    enough for the padded input of ``first`` and the padded output of ``first`` read by
    ``second`` (proof in the module docstring)."""
    H, W = in_hw
    kB = [int(v) for v in first.kernel_size]
    pB = [int(v) for v in first.padding]
    kA = [int(v) for v in second.kernel_size]
    pA = [int(v) for v in second.padding]
    H1 = H + 2 * pB[0] - kB[0] + 1
    W1 = W + 2 * pB[1] - kB[1] + 1
    return (max(H + 2 * pB[0], H1 + 2 * pA[0], kA[0], kB[0]),
            max(W + 2 * pB[1], W1 + 2 * pA[1], kA[1], kB[1]))


def conv_pair_cost(first: nn.Conv2d, second: nn.Conv2d, in_hw: tuple[int, int]
                   ) -> tuple[float, float]:
    """``(flops, bytes)`` predicted for :func:`conv_pair_bound`: the three symbols and the
    Gram matrices on the ``N0 x N1`` grid (complex128), their product (8 real flops per
    complex multiply-add) and the batched Hermitian eigensolves of the Gram matrices."""
    N0, N1 = _pair_grid(first, second, in_hw)
    N = N0 * N1
    co, cm, ci = second.out_channels, first.out_channels, first.in_channels
    grams = [(co, ci), (co, cm), (cm, ci)]
    flops = 8.0 * N * co * cm * ci + sum(
        8.0 * N * min(a, b) ** 2 * max(a, b) + 4 * _EIGH_FLOPS * N * min(a, b) ** 3
        for a, b in grams)
    nbytes = 16.0 * N * (co * cm + cm * ci + co * ci + max(min(a, b) ** 2 for a, b in grams))
    return flops, nbytes


def conv_pair_bound(
    first: nn.Conv2d, second: nn.Conv2d, in_hw: tuple[int, int],
    slopes: tuple[float, float] = (0.0, 1.0), *,
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[float, dict[str, float]]:
    """Certified bound on ``max_D ||second o D o first||`` (linear parts) for stride-1
    zero-padded Conv2d layers via the circular embedding (proof in the module docstring).

    Returns ``(bound, parts)`` with ``parts`` the circular norms used. ``weights`` optionally
    replaces the kernels ``(first, second)`` (e.g. with BatchNorm folded in), the geometry
    (kernel size, padding) still being read from the modules.

    >>> torch.manual_seed(0) is not None
    True
    >>> c1, c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
    >>> b, parts = conv_pair_bound(c1, c2, (6, 6))
    >>> b <= parts["prod"] * (1 + 1e-9)
    True
    """
    a, b = float(slopes[0]), float(slopes[1])
    a2, b2 = min(a, 0.0), max(b, 0.0)
    N0, N1 = _pair_grid(first, second, in_hw)
    with torch.no_grad():
        wB0, wA0 = (first.weight, second.weight) if weights is None else weights
        wA = wA0.detach().to(_F64)  # (cout, cmid, kh, kw)
        wB = wB0.detach().to(_F64)  # (cmid, cin, kh, kw)

        def symbol(w: torch.Tensor) -> torch.Tensor:
            return torch.fft.fft2(w, s=(N0, N1)).permute(2, 3, 0, 1)  # (N0, N1, out, in)

        SA, SB = symbol(wA), symbol(wB)
        nAB = _max_norm_c(SA @ SB)
        nA = _max_norm_c(SA)
        nB = _max_norm_c(SB)
        # the entrywise rule only pays off for few channels; skip it for wide layers (cost)
        nabs = _max_norm_c(symbol(wA.abs()) @ symbol(wB.abs())) if wA.shape[1] <= 64 else math.inf
    inner = min(nA * nB, nabs)
    bound = abs(a2 + b2) / 2 * nAB + (b2 - a2) / 2 * inner
    c = max(abs(a2), abs(b2))
    bound = min(bound, c * nA * nB, c * nabs)
    return bound, {"AB": nAB, "A": nA, "B": nB, "abs": nabs, "prod": c * nA * nB}


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------
@dataclass
class _Pair:
    name: str
    lower: float
    upper: float | None
    exact: bool
    how: str
    seconds: float
    truncated: float | None = None  # greedy value on the top-k truncated pair (paper's number)


def _rescale_pair(p: _Pair, f: float) -> _Pair:
    return replace(p, lower=p.lower * f, upper=None if p.upper is None else p.upper * f,
                   truncated=None if p.truncated is None else p.truncated * f)


class _Clock:
    """Splits what is left of the overall budget over the remaining work units (pairs and
    two-layer blocks, weight 1 each): :meth:`next` returns the absolute deadline of the next
    unit, or ``None`` once the overall deadline has passed (the unit is then skipped)."""

    def __init__(self, deadline: float, units: int, report: Any) -> None:
        self.deadline, self.left, self.total = deadline, max(units, 0), max(units, 1)
        self.report = report
        self.late_units = 0
        self.late_blocks = 0  # two-layer blocks past the deadline (skipped)

    _rate: float | None = None  # float64 flop/s (wall clock) measured by this call

    def rate(self) -> float:
        """float64 matmul flop/s per WALL second, measured once per call (on a shared
        machine the wall-clock rate changes from call to call)."""
        if self._rate is None:
            self._rate = flop_rate()
        return self._rate

    def fits(self, m: int, n: int, p: int) -> bool:
        """Whether a pair on ``(m x n) (n x p)`` matrices (a few dense products and the norm
        of the ``m x p`` product through the Gram matrix of its smaller side: work that no
        clock check can interrupt) is predicted to end before the overall deadline."""
        return self.affords(6.0 * m * n * p + _EIGH_FLOPS * min(m, p) ** 3)

    def affords(self, flops: float) -> bool:
        """Whether ``flops`` float64 operations are predicted to end before the deadline."""
        return time.perf_counter() + flops / self.rate() < self.deadline

    def next(self, stage: str) -> float | None:
        now = time.perf_counter()
        self.report(stage, 1.0 - self.left / self.total)
        share = max(self.deadline - now, 0.0) / max(self.left, 1)
        self.left = max(self.left - 1, 0)
        if now >= self.deadline:
            self.late_units += 1
            self.late_blocks += stage == "blocks"
            return None
        return now + share


#: float64 eigh of an s x s symmetric matrix costs about this many s^3 matmul flops (measured:
#: 10-13 for s = 512..1536 on one core)
_EIGH_FLOPS = 12.0
#: above this many rows, _top_rows finds the top singular subspace by randomized subspace
#: iteration instead of a full eigendecomposition
_TOP_ROWS_EIGH = 768


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _certified_pair(
    L: torch.Tensor, R: torch.Tensor, slopes: tuple[float, float], *,
    norms: tuple[float, float] | None = None, sigma: torch.Tensor | None = None,
    deadline: float | None = None,
) -> float:
    size = min(L.shape[0], L.shape[1]) + min(R.shape[0], R.shape[1])
    steps = 60 if size <= 300 else (15 if size <= 700 else 0)
    return pair_certified(
        L, R, slopes=slopes, scaled_steps=20 if size <= 300 else -1, dual_steps=steps,
        norms=norms, sigma=sigma if steps == 0 else None, deadline=deadline,
    ).value


def _solve_pair(
    name: str, L: torch.Tensor, R: torch.Tensor, slopes: tuple[float, float], *, o: _Options,
    deadline: float | None, L_sorted: bool = False, R_sorted: bool = False,
) -> _Pair:
    """One pair within ``deadline`` (absolute ``time.perf_counter()``; ``None`` in ``"exact"``
    mode: exact means exact). Every part stops at its share of the time, and what it returns
    stays valid: branch and bound gives its certified interval, greedy its best realised
    pattern, the relaxations their smallest evaluated bound."""
    t0 = time.perf_counter()
    mode, k = o.mode, o.k
    n = L.shape[1]
    norms = None
    span = 0.0 if deadline is None else max(deadline - t0, 0.0)
    if mode == "exact" or (mode == "auto" and n <= o.max_exact_width):
        pb = pair_exact(L, R, slopes=slopes,
                        deadline=None if mode == "exact" or deadline is None
                        else t0 + 0.8 * span)
        if pb.exact:
            return _Pair(name, pb.lower, pb.upper, True, pb.how, time.perf_counter() - t0)
        up = min(pb.upper, _certified_pair(L, R, slopes, norms=norms, deadline=deadline))
        return _Pair(name, pb.lower, up, False, "bnb-partial", time.perf_counter() - t0)
    # greedy on the top-k singular directions (rows of L, columns of R are sorted by singular
    # value); the pattern found is then evaluated on the full pair (a realised value)
    Lk = L[:k] if L_sorted else _top_rows(L, k)
    Rk = R[:, :k] if R_sorted else _top_rows(R.T, k).T
    g = pair_greedy(Lk, Rk, slopes=slopes, restarts=o.restarts, seed=o.seed,
                    deadline=None if deadline is None else t0 + 0.4 * span)
    lower = pair_value(L, R, g.pattern, slopes=slopes)
    up = _certified_pair(L, R, slopes, norms=norms, deadline=deadline)
    trunc = " top-k" if (L.shape[0] > k or R.shape[1] > k) else ""
    return _Pair(
        name, lower, up, False, f"greedy{trunc} ({g.how})", time.perf_counter() - t0, g.value
    )


def _dense_matrix(node: Any) -> torch.Tensor:
    """The matrix of a linear node's linear part (float64): the weight of a plain ``nn.Linear``
    (fast path), else ``node.dense()`` (column by column through the node's function)."""
    m = node.module
    if isinstance(m, nn.Sequential) and len(m) == 1:
        m = m[0]
    if isinstance(m, nn.Linear) and node.in_shapes[0] == (m.in_features,):
        # eval_weight: a parametrised / spectral-normed weight as eval computes it, no state write
        return eval_weight(m).detach().to(device="cpu", dtype=_F64)
    return node.dense(_F64)[0].cpu()


def _split_sqrt(W: torch.Tensor, floor: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with ``P Q = W`` up to rounding, ``P = U S^{1/2}``, ``Q = S^{1/2} V^T``, rows of
    ``Q`` / columns of ``P`` sorted by decreasing singular value.

    Computed from the eigendecomposition of the smaller Gram matrix (much faster than an SVD):
    for ``m <= n``, ``W W^T = U diag(lam) U^T``, ``s = lam^{1/4}`` (floored at
    ``(floor lam_max)^{1/4}``), ``P = U diag(s)``, ``Q = diag(1/s) U^T W``; then
    ``P Q = U U^T W = W`` for ANY positive ``s`` (``U`` orthogonal), so the factorization is exact
    up to rounding whatever the accuracy of the small eigenvalues; ``s`` only affects tightness.
    Symmetrically for ``m > n`` with ``W^T W = V diag(lam) V^T``, ``Q = diag(s) V^T``,
    ``P = W V diag(1/s)``.
    """
    m, n = W.shape
    if m <= n:
        lam, U = torch.linalg.eigh(W @ W.T)
        lam, U = lam.flip(0), U.flip(1)
        s = lam.clamp_min(floor * max(float(lam[0]), 1e-300)).pow(0.25)
        return U * s[None, :], (U.T @ W) / s[:, None]
    lam, V = torch.linalg.eigh(W.T @ W)
    lam, V = lam.flip(0), V.flip(1)
    s = lam.clamp_min(floor * max(float(lam[0]), 1e-300)).pow(0.25)
    return (W @ V) / s[None, :], s[:, None] * V.T


def _top_rows(L: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` rows of ``O L`` along the top left singular directions of ``L`` (``O``
    orthogonal from the eigendecomposition of ``L L^T``, or for large ``L`` from randomized
    subspace iteration); ``L`` itself when it has ``<= k`` rows. Dropping rows can only
    decrease ``||L D R||``, so values realised with the result are still lower bounds of the
    pair factor (whatever the accuracy of the subspace)."""
    if L.shape[0] <= k:
        return L
    if min(L.shape) > _TOP_ROWS_EIGH and k + 10 < min(L.shape):
        # randomized subspace iteration (2 power steps): Q (m x (k+10)) orthonormal spans
        # about the top left singular subspace; rows of U_B^T Q^T L with B = Q^T L = U_B S V^T
        # are again k rows of an orthogonal transform of L (U_B^T Q^T has orthonormal rows)
        gen = torch.Generator().manual_seed(0)
        om = torch.randn(L.shape[1], k + 10, dtype=L.dtype, generator=gen).to(L.device)
        Q = torch.linalg.qr(L @ om).Q
        for _ in range(2):
            Q = torch.linalg.qr(L @ (L.T @ Q)).Q
        B = Q.T @ L
        Ub = torch.linalg.svd(B, full_matrices=False).U
        return (Ub.T @ B)[:k]
    if L.shape[0] > L.shape[1]:
        lam, V = torch.linalg.eigh(L.T @ L)
        Lr = lam.clamp_min(0).sqrt().flip(0)[:, None] * V.flip(1).T
        return Lr[:k]
    _, U = torch.linalg.eigh(L @ L.T)
    return (U.flip(1).T @ L)[:k]


def _dp_blocks(
    norms: list[float], acts: list[float], pair_bounds: list[float | None]
) -> tuple[float, str]:
    """Best cut of a chain into blocks of 1 or 2 layers: ``best[j]`` bounds layers ``0..j-1``.
    ``acts[i]`` is the constant of the activation after layer ``i``; ``pair_bounds[i]`` a bound
    for layers ``i, i+1`` with the activation between them (``None``: unavailable)."""
    K = len(norms)
    best: list[float] = [1.0] + [math.inf] * K
    how: list[str] = [""] + [""] * K
    for j in range(1, K + 1):
        c = acts[j - 2] if j >= 2 else 1.0
        v1 = best[j - 1] * c * norms[j - 1]
        best[j], how[j] = v1, how[j - 1] + "1"
        if j >= 2 and pair_bounds[j - 2] is not None:
            c2 = acts[j - 3] if j >= 3 else 1.0
            v2 = best[j - 2] * c2 * float(pair_bounds[j - 2])  # type: ignore[arg-type]
            if v2 < best[j]:
                best[j], how[j] = v2, how[j - 2] + "2"
    return best[K], how[K]


@dataclass(frozen=True)
class _Options:
    """The pair options of one :func:`seqlip` call."""

    mode: str
    k: int
    max_exact_width: int
    dense_limit: int
    restarts: int
    seed: int
    tol: float
    max_iter: int


#: :func:`lipbound.seqlip`'s default pair options (its signature reads them from here).
DEFAULTS = _Options(mode="auto", k=200, max_exact_width=32, dense_limit=30_000_000, restarts=8,
                    seed=0, tol=1e-6, max_iter=1000)


@dataclass
class _Work:
    """What a segment's pairs and two-layer blocks produced (see :func:`_segment`)."""

    pairs: list[_Pair]
    blocks: list[float | None]
    estimate: float  # the product of the pair values (the paper's SeqLip estimate)
    skipped: int = 0  # pairs left to AutoLip's factors by the time limit
    too_big: int = 0  # conv blocks whose symbols exceed CONV_PAIR_BYTES
    svd_chain: float | None = None  # product of the certified pair factors, when all exist


@dataclass
class _Segment:
    """One segment's outcome: its certified factor and estimates, and its table rows."""

    upper: float
    estimate: float  # min(estimate of the pairs, upper)
    raw: float  # estimate of the pairs, uncapped
    truncated: float  # greedy values of the top-k truncated pairs (the paper's number)
    exact: bool
    work: _Work
    rows: list[LayerBound]


def _segment(
    seg: list[Any], consts: dict[str, Any], slopes: dict[str, tuple[float, float] | None],
    clock: _Clock, o: _Options,
) -> _Segment:
    """The certified factor of one segment: the smallest of AutoLip's product, the product
    of certified pair factors (``"svd-chain"``) and the dynamic programme over two-layer
    blocks; dense segments get the exact / greedy pairs, operator ones the top-``k`` pair
    estimate and the Fourier two-layer blocks."""
    ts = time.perf_counter()
    lins, acts = seg[0::2], seg[1::2]
    act_slopes = segment_slopes(seg, slopes)
    act_c = [consts[a.name].value for a in acts]
    norms = [consts[n.name].value for n in lins]
    autolip_seg = math.prod(norms) * math.prod(act_c)
    if all(_numel(n.in_shapes[0]) * _numel(n.out_shape) <= o.dense_limit for n in lins):
        work = _dense_work(lins, act_slopes, norms, autolip_seg, clock, o)
    else:
        # the operator estimates apply the layers hundreds of times in float64: each float32
        # parameter is cast once (VGG-11's 25088 x 4096 head: 1378 casts, 10 s, without)
        with shared_casts():
            work = _operator_work(lins, act_slopes, norms, autolip_seg,
                                  seconds=[consts[n.name].seconds for n in lins], clock=clock,
                                  o=o)
    cands: dict[str, float] = {"autolip": autolip_seg}
    if work.svd_chain is not None:
        cands["svd-chain"] = work.svd_chain
    if any(b is not None for b in work.blocks):
        dp, cut = _dp_blocks(norms, act_c, work.blocks)
        cands[f"blocks[{cut}]"] = dp
    how = min(cands, key=lambda key: cands[key])
    upper = min(cands[how] if how == "autolip" else cands[how] * _UP, autolip_seg)
    pairs = work.pairs
    truncated = (math.prod(p.truncated if p.truncated is not None else p.lower for p in pairs)
                 if len(pairs) == len(lins) - 1 else autolip_seg)
    estimate = min(work.estimate, upper)
    rows = [LayerBound(name=p.name, op="pair", value=p.upper if p.upper is not None else p.lower,
                       certified=p.upper is not None, seconds=p.seconds, estimate=p.lower,
                       how=p.how) for p in pairs]
    rows.append(LayerBound(
        name=f"{lins[0].qualname}..{lins[-1].qualname}", op="segment", value=upper,
        certified=how == "svd-chain" or all(consts[n.name].certified for n in seg),
        seconds=time.perf_counter() - ts, estimate=estimate,
        how=f"{how} (autolip {autolip_seg:.4g})",
    ))
    return _Segment(upper=upper, estimate=estimate, raw=work.estimate, truncated=truncated,
                    exact=all(p.exact for p in pairs), work=work, rows=rows)


def _dense_work(
    lins: list[Any], act_slopes: list[tuple[float, float]], norms: list[float],
    autolip_seg: float, clock: _Clock, o: _Options,
) -> _Work:
    """Pairs and two-layer blocks of a segment small enough for dense matrices."""
    K = len(lins)
    blocks: list[float | None] = [None] * (K - 1)
    acc: list[tuple[torch.Tensor, float]] = []
    for n_lin in lins:  # column by column through the layer: check the clock between
        if o.mode != "exact" and time.perf_counter() >= clock.deadline:
            break
        # scaled by an even power of two (exact): every pair factor is homogeneous of degree
        # 1 in L and in R, and the middle split W = P Q puts the square root of the scale,
        # again a power of two, on each side. It keeps L D R in range: weights ~1e-150
        # underflowed to a "certified" 0, ~1e30 overflow float32
        acc.append(pow2_split(_dense_matrix(n_lin), even=True))
    if len(acc) < K:  # no time left for the dense matrices: AutoLip for this segment
        for stage in ("blocks", "pairs") * (K - 1):
            clock.next(stage)
        return _Work([], blocks, autolip_seg, skipped=K - 1)
    Ws, fs = zip(*acc)
    # middle layers: W = P Q with P = U S^{1/2}, Q = S^{1/2} V^T; the first and last layers
    # enter as W_1 (= U_1 S_1 up to the orthogonal V_1^T, which drops out) and W_K
    # (= S_K V_K^T up to U_K). Two-layer blocks first: the cheapest strong certificate.
    for i in range(K - 1):
        end = clock.next("blocks")
        if K >= 3 and end is not None and clock.fits(
                Ws[i + 1].shape[0], Ws[i].shape[0], Ws[i].shape[1]):
            blocks[i] = fs[i + 1] * fs[i] * _certified_pair(
                Ws[i + 1], Ws[i], act_slopes[i],
                norms=(norms[i + 1] / fs[i + 1], norms[i] / fs[i]), deadline=end,
            )
    # eigendecompositions of the middle layers' Gram matrices (~12 s^3 flops each)
    eig_flops = sum(_EIGH_FLOPS * min(Ws[i].shape) ** 3
                    + 2.0 * Ws[i].numel() * min(Ws[i].shape) for i in range(1, K - 1))
    split = ({i: _split_sqrt(Ws[i]) for i in range(1, K - 1)}
             if o.mode == "exact" or clock.affords(eig_flops) else {})
    pairs: list[_Pair] = []
    skipped = 0
    for i in range(K - 1):
        end = clock.next("pairs")
        if (end is None or len(split) < K - 2) and o.mode != "exact":
            skipped += 1
            continue
        R = Ws[0] if i == 0 else split[i][0]
        L = Ws[K - 1] if i + 1 == K - 1 else split[i + 1][1]
        if o.mode != "exact" and not clock.fits(L.shape[0], L.shape[1], R.shape[1]):
            skipped += 1  # its dense products would end past the deadline
            continue
        fR = fs[0] if i == 0 else math.sqrt(fs[i])
        fL = fs[K - 1] if i + 1 == K - 1 else math.sqrt(fs[i + 1])
        pairs.append(_rescale_pair(_solve_pair(
            f"{lins[i].qualname}->{lins[i + 1].qualname}", L, R, act_slopes[i],
            o=o, deadline=None if o.mode == "exact" else end,
            L_sorted=i + 1 < K - 1, R_sorted=i > 0,
        ), fL * fR))
    complete = len(pairs) == K - 1
    svd = (math.prod(float(p.upper) for p in pairs if p.upper is not None)
           if complete and all(p.upper is not None for p in pairs) else None)
    estimate = math.prod(p.lower for p in pairs) if complete else autolip_seg
    return _Work(pairs, blocks, estimate, skipped=skipped, svd_chain=svd)


def _operator_work(
    lins: list[Any], act_slopes: list[tuple[float, float]], norms: list[float],
    autolip_seg: float, *, seconds: list[float], clock: _Clock, o: _Options,
) -> _Work:
    """A segment too large for dense matrices: the top-``k`` pair estimate, and certified
    two-layer blocks (Fourier for plain convolutions, dense for small layers)."""
    estimate, pairs = _operator_estimate(lins, act_slopes, o=o, clock=clock, seconds=seconds)
    work = _Work(pairs, [None] * (len(lins) - 1), estimate)
    if len(pairs) < len(lins) - 1:
        work.skipped = len(lins) - 1 - len(pairs)
        work.estimate = autolip_seg
    last_block = 0.0  # the previous block's seconds: the prediction for the next
    for i in range(len(lins) - 1):
        t_block = time.perf_counter()
        end = clock.next("blocks")
        if end is None:
            continue
        if t_block + last_block >= clock.deadline:  # predicted to end past the deadline
            clock.late_units += 1
            clock.late_blocks += 1
            continue
        blk, ran = _operator_block(lins[i], lins[i + 1], act_slopes[i],
                                   (norms[i], norms[i + 1]), end=end, clock=clock, o=o,
                                   work=work)
        work.blocks[i] = blk
        if ran:  # a block refused before it started predicts nothing
            last_block = time.perf_counter() - t_block
    return work


def _operator_block(
    first: Any, second: Any, slope: tuple[float, float], norms: tuple[float, float], *,
    end: float, clock: _Clock, o: _Options, work: _Work,
) -> tuple[float | None, bool]:
    """``(factor, ran)``: the certified factor of one two-layer block of an operator segment,
    or ``None``; ``ran`` is False when it was refused before starting (too big, or predicted
    past the deadline: counted on ``work`` / ``clock``)."""
    c1, c2 = _plain_conv2d(first), _plain_conv2d(second)
    if c1 is not None and c2 is not None and len(first.in_shapes[0]) == 3:
        hw = first.in_shapes[0][1:]
        flops, nbytes = conv_pair_cost(c1[0], c2[0], (hw[0], hw[1]))
        if nbytes > CONV_PAIR_BYTES:
            work.too_big += 1
            return None, False
        if not clock.affords(flops):  # not interruptible once started
            clock.late_units += 1
            clock.late_blocks += 1
            return None, False
        return conv_pair_bound(c1[0], c2[0], (hw[0], hw[1]), slope,
                               weights=(c1[1], c2[1]))[0], True
    if max(_numel(n.in_shapes[0]) * _numel(n.out_shape) for n in (first, second)) \
            <= o.dense_limit:
        W1, f1 = pow2_split(_dense_matrix(first), even=True)
        W2, f2 = pow2_split(_dense_matrix(second), even=True)
        return f1 * f2 * _certified_pair(W2, W1, slope, norms=(norms[1] / f2, norms[0] / f1),
                                         deadline=end), True
    return None, True


def _operator_estimate(
    lins: list[Any], act_slopes: list[tuple[float, float]], *, o: _Options, clock: _Clock,
    seconds: Sequence[float],
) -> tuple[float, list[_Pair]]:
    """Greedy SeqLip on the top-``k`` singular triplets of each operator (the paper's truncated
    Greedy SeqLip for convolutions): an ESTIMATE, not a certificate (the truncation and the
    iterative singular triplets are both approximations)."""
    k = min(o.k, 8)
    trip: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    # predicted seconds of a layer's triplets: those of the previous layer, and at least the
    # time of the layer's AutoLip constant (a power/Lanczos estimate on the same operator)
    last = 0.0
    for n, sec in zip(lins, seconds):
        t_layer = time.perf_counter()
        if t_layer + max(last, sec) >= clock.deadline:  # no time for the triplets: no estimate
            for _ in range(len(lins) - 1):
                clock.next("pairs")
            return 1.0, []
        kk = min(k, _numel(n.in_shapes[0]), _numel(n.out_shape))
        # iterations that fit this layer's share of the time left: one forward + adjoint pass
        # of the layer each, timed here (Lanczos is not interruptible; a block of 8 triplets
        # of a 256-channel conv at 56x56 ran 360 iterations, 61 s of a 30 s budget)
        lin = n.linear_fn()
        dev = next((t.device for t in (n.module.parameters() if n.module is not None else ())),
                   torch.device("cpu"))
        probe = torch.randn((1, *n.in_shapes[0]),
                            generator=torch.Generator().manual_seed(0)).to(dev)
        t_mv = time.perf_counter()
        with torch.no_grad():
            lin(probe)
        t_mv = 2.5 * (time.perf_counter() - t_mv) + 1e-6
        share = (clock.deadline - time.perf_counter()) / (len(lins) - len(trip))
        iters = int(min(o.max_iter, max(kk + 2, share / t_mv)))
        try:
            r = top_singular(
                lin, n.in_shapes[0], kk, tol=max(o.tol, 1e-4), certify=False,
                check_linear=False, max_iter=iters,
            )
        except ZeroOperatorError:
            # a zero layer (a zero-initialised residual branch): the segment through it is
            # constant, so its estimate is 0 (AutoLip's certified product is 0 as well)
            for _ in range(len(lins) - 1):
                clock.next("pairs")
            return 0.0, [
                _Pair(f"{lins[i].qualname}->{lins[i + 1].qualname}", 0.0, None, False,
                      f"{n.qualname} is the zero map: the segment is constant", 0.0)
                for i in range(len(lins) - 1)
            ]
        S = torch.tensor(r.singular_values, dtype=_F64)
        if r.u is None or r.v is None:
            raise InvalidArgumentError(f"no singular vectors returned for {n.qualname}")
        U = r.u.reshape(len(S), -1).to(_F64).T  # (out, k)
        V = r.v.reshape(len(S), -1).to(_F64).T  # (in, k)
        trip.append((U, S, V))
        last = time.perf_counter() - t_layer
    K = len(lins)
    pairs: list[_Pair] = []
    est = 1.0
    for i in range(K - 1):
        end = clock.next("pairs")
        if end is None:
            continue
        t0 = time.perf_counter()
        U_i, S_i, _ = trip[i]
        _, S_j, V_j = trip[i + 1]
        St_i = S_i if i == 0 else S_i.sqrt()
        St_j = S_j if i + 1 == K - 1 else S_j.sqrt()
        L = St_j[:, None] * V_j.T
        R = U_i * St_i[None, :]
        g = pair_greedy(L, R, slopes=act_slopes[i], restarts=o.restarts, seed=o.seed,
                        deadline=end)
        est *= g.value
        pairs.append(_Pair(
            f"{lins[i].qualname}->{lins[i + 1].qualname}", g.value, None, False,
            f"greedy top-{len(S_i)} (truncated estimate, {g.how})", time.perf_counter() - t0,
        ))
    return est, pairs


def segment_upper(
    seg: list[Any], consts: dict[str, Any], slopes: dict[str, tuple[float, float] | None], *,
    deadline: float, mode: str = "auto", dense_limit: int = DEFAULTS.dense_limit,
) -> float:
    """SeqLip's certified factor of one segment (:func:`_segment` with the default options of
    :func:`lipbound.seqlip`), within ``deadline``: what the work started before it finds
    (AutoLip's product when nothing fits). A valid Lipschitz bound of the segment's map, as
    every candidate of :func:`_segment` is. No dense matrix of more than ``dense_limit``
    entries is built."""
    units = 2 * (len(seg[0::2]) - 1)
    clock = _Clock(deadline, units, lambda stage, fraction: None)
    o = replace(DEFAULTS, mode=mode, dense_limit=int(dense_limit))
    return _segment(seg, consts, slopes, clock, o).upper
