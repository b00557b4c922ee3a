r"""SeqLip: the paper's improvement over AutoLip on sequential segments of a network.

For a chain ``f = M_K o s_{K-1} o ... o s_1 o M_1`` (linear ``M_i``, activations ``s_i`` with
derivative in ``[a_i, b_i]``) the Jacobian is ``M_K D_{K-1} M_{K-1} ... D_1 M_1`` with
``D_i = diag(g_i)``, ``g_i in [a_i, b_i]^{n_i}``. With SVDs ``M_i = U_i S_i V_i^T``,

.. math::  L(f) \le \prod_{i=1}^{K-1} \max_{g \in [a_i, b_i]^{n_i}}
           \| \tilde S_{i+1} V_{i+1}^T \,\mathrm{diag}(g)\, U_i \tilde S_i \|_2

with ``S~ = S`` on the first and last layers and ``S^{1/2}`` in between: inserting
``S_i = S_i^{1/2} S_i^{1/2}`` splits the Jacobian into a product of the pair matrices (the outer
``U_K`` and ``V_1^T`` have norm 1), and the norm is sub-multiplicative. NOTE ``V^T``, not ``V``:
``M_{i+1} = U_{i+1} S_{i+1} V_{i+1}^T``, so the factor that meets ``D_i`` is ``V_{i+1}^T``.
Each pair factor is a convex function of ``g`` maximised at a vertex; it is computed by
:mod:`lipbound.methods._pairs` (exact enumeration / branch and bound, greedy heuristics,
certified relaxations).

Modes
-----
* ``"exact"``: every pair exactly (enumeration or branch and bound; raises when a layer is wider
  than ``max_exact_width``). Certified.
* ``"greedy"``: every pair by heuristics (the paper's Greedy SeqLip, plus alternating
  maximisation with restarts) on the top-``k`` singular triplets: ``value`` is this ESTIMATE
  (not certified); ``upper`` carries a certified bound next to it.
* ``"auto"`` (default): exact (branch and bound with ``time_limit`` per pair) up to
  ``max_exact_width`` neurons, greedy + certified bounds beyond; ``value`` is the certified bound.

Certified bound of a segment (minimum of valid bounds, each times ``1 + 1e-9`` for rounding):

1. the SVD-chain product above with each pair's certified upper bound (exact, branch-and-bound
   bound, or the relaxations of :func:`lipbound.methods._pairs.pair_certified`);
2. a dynamic programme that cuts the chain into blocks of one layer (its certified AutoLip
   norm) or two consecutive layers ``max_D ||M_{i+1} D M_i||`` (pair bound on the raw
   matrices, or, for stride-1 zero-padded convolutions, the circular-embedding bound below),
   the activations between blocks contributing their AutoLip constant ``max(|a|, |b|)``;
3. AutoLip's product for the segment (so the result is never above AutoLip).

Circular embedding (stride-1, zero-padded, undilated, ungrouped Conv2d pairs ``B`` then ``A``,
eval BatchNorm folded into the kernels allowed):
on a common grid ``N >= max(H + 2 p_B, H_1 + 2 p_A)`` per spatial dim, ``B = R_B C_B E_B`` and
``A = R_A C_A E_A`` with ``E`` zero-extensions (isometries), ``R`` restrictions (norm 1) and
``C`` circular correlations. ``E_A D R_B`` is a circular shift ``T`` times a diagonal ``D'``
with entries in ``{0} U [a, b]``, so ``||A D B|| <= ||C_A T D' C_B||`` with ``D'`` in
``[a', b'] = [min(a, 0), max(b, 0)]``, and ``C_A T`` is a circular correlation with the same
per-frequency symbol up to a unimodular scalar. By the 1/2 rule
``||C_A T D' C_B|| <= |a'+b'|/2 ||C_A C_B|| + (b'-a')/2 min(||C_A|| ||C_B||, || |C_A| |C_B| ||)``
where ``||C_A C_B|| = max_w ||Â(w) B̂(w)||`` (block circulant matrices are block-diagonalised by
the 2-D DFT), ``|C_A| = C_{|A|}`` (the kernel does not wrap), all computed exactly by FFT.

Non-sequential parts (residual adds, max-pooling, activations without a slope range) split the
network: SeqLip runs on each maximal segment ``linear, act, linear, ..., linear`` whose inner
links have a single user, and AutoLip (:func:`lipbound.methods.autolip.compose`) composes the
segments with the remaining nodes (first linear node of a segment gets the segment bound, the
others 1).

Activation scaling rule: with ``g = a + (b - a) sigma``, ``sigma in [0, 1]^n`` (valid for any
``a <= b``, e.g. LeakyReLU ``[s, 1]``, sigmoid ``[0, 1/4]``, GELU ``[-0.17, 1.13]``), every pair
problem becomes a vertex problem over ``{0, 1}^n`` (see :mod:`lipbound.methods._pairs`).

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) is not None
True
>>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
>>> r = seqlip(net, (2,))
>>> r.certified, r.value <= r.autolip * (1 + 1e-9)
(True, True)
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from torch import nn

from .._progress import ProgressArg, make_progress
from .._validation import check_choice, check_norm, check_positive
from ..analysis import Analysis, analysis_of, find_segments
from ..errors import InvalidArgumentError
from ..results import LayerBound, SeqLipResult
from ._pairs import pair_certified, pair_exact, pair_greedy
from ._segment import (
    CONV_PAIR_BYTES,
    DEFAULTS,
    _Clock,
    _numel,
    _Options,
    _Segment,
    _segment,
    conv_pair_bound,
    conv_pair_cost,
)
from .autolip import GRACE, compose, graph_constants

__all__ = [
    "SeqLipResult", "seqlip", "find_segments", "conv_pair_bound", "conv_pair_cost",
    "pair_certified", "pair_exact", "pair_greedy",  # the pair maths, public through seqlip
]

_DEFAULT_CAP = 60.0


def _default_limit(segments: list[list[Any]]) -> float:
    """Default overall budget: 5 s plus 0.5 s per pair and two-layer block, at most 60 s."""
    n_units = sum(2 * (len(seg[0::2]) - 1) for seg in segments)
    return min(_DEFAULT_CAP, 5.0 + 0.5 * n_units)


def seqlip(  # noqa: PLR0913 - the public entry point: one keyword option per knob
    model: nn.Module | Analysis,
    input_shape: Any = None,
    *,
    mode: str = "auto",
    norm: Any = 2,
    k: int = DEFAULTS.k,
    max_exact_width: int = DEFAULTS.max_exact_width,
    time_limit: float | None = None,
    dense_limit: int = DEFAULTS.dense_limit,
    restarts: int = DEFAULTS.restarts,
    seed: int = 0,
    tol: float = DEFAULTS.tol,
    max_iter: int = DEFAULTS.max_iter,
    progress: ProgressArg = False,
) -> SeqLipResult:
    """SeqLip bound of ``model`` (l2), with AutoLip on everything that is not a sequential segment.

    Options: ``mode`` (``"auto"``, ``"exact"``, ``"greedy"``, see the module docstring); ``k``
    the number of singular directions kept for greedy on wide pairs and for operator
    (non-dense) layers; ``max_exact_width`` the widest activation layer solved exactly in
    ``"auto"`` (and the widest accepted in ``"exact"``); ``dense_limit`` the largest
    ``rows * cols`` for which a linear node is turned into a dense matrix (full SVDs); larger
    layers use operator bounds.

    ``time_limit``: ONE overall budget in seconds for the whole call, measured from its start.
    The AutoLip constants come first (checked before each node: the nodes started past the
    limit get quick estimates, the result is then NOT certified and a note says so; when even
    those overrun by 5%, :class:`~lipbound.errors.SolverError` names ``time_limit``); what is
    left is split over the pairs and two-layer blocks still to do (time a pair leaves unused
    goes to the next ones); every pair, greedy search and relaxation checks the clock in its
    loops and returns what it has (a pair past the deadline falls back to AutoLip's factor,
    still certified). Not interruptible: the graph capture, one node's certificate, one dense
    matrix / eigendecomposition (those are started only when predicted to fit). Default
    (``None``): ``5 + 0.5`` s per pair and block of the segments, at most 60 s, for the pairs;
    the AutoLip constants may then use up to 60 s (a certified floor by default). The graph
    and constants of the previous :func:`~lipbound.autolip` / :func:`seqlip` call on the same
    unchanged model with the same options are reused (``extra["reused"]``). ``"exact"`` mode
    ignores the limit for the pairs (exact means exact; raise ``max_exact_width`` knowingly).
    ``progress``: ``True`` or a callback ``(stage, fraction)`` (see
    :func:`lipbound.report.make_progress`).

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) is not None
    True
    >>> net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> r = seqlip(net, (3,), mode="exact")
    >>> W1, W2 = net[0].weight.detach().double(), net[2].weight.detach().double()
    >>> import itertools
    >>> def val(s):
    ...     D = torch.diag(torch.tensor(s).double())
    ...     return float(torch.linalg.matrix_norm(W2 @ D @ W1, 2))
    >>> brute = max(val(s) for s in itertools.product((0.0, 1.0), repeat=6))
    >>> abs(r.value - brute) < 1e-6 * brute
    True
    """
    t_start = time.perf_counter()
    an, _ = analysis_of(model, input_shape)
    nrm = check_norm(norm, allowed=("2",), method="seqlip")
    check_choice("mode", mode, ("auto", "exact", "greedy"))
    check_positive("k", k, integer=True)
    check_positive("max_exact_width", max_exact_width, integer=True)
    if time_limit is not None:
        check_positive("time_limit", time_limit)
    check_positive("dense_limit", dense_limit, integer=True)
    check_positive("restarts", restarts, integer=True, allow_zero=True)
    report = make_progress(progress)
    try:
        opts = _Options(mode=mode, k=k, max_exact_width=max_exact_width, dense_limit=dense_limit,
                        restarts=restarts, seed=seed, tol=tol, max_iter=max_iter)
        return _seqlip(an, nrm, time_limit, opts, report, t_start)
    finally:
        report.close()


def _seqlip(
    an: Analysis, nrm: str, time_limit: float | None, o: _Options, report: Any, t_start: float,
) -> SeqLipResult:
    """validate (widths for ``mode="exact"``) -> build (AutoLip's constants, the segments) ->
    solve (each segment, :func:`_segment`) -> assemble (:func:`_assemble`)."""
    report("capture + autolip constants", 0.0)
    # a given time_limit is shared with the AutoLip constants; the default one (sized from the
    # segments) is for the pairs: the constants, SeqLip's certified floor, get up to its cap
    deadline0 = t_start + (_DEFAULT_CAP if time_limit is None else float(time_limit))
    graph, consts, reused = graph_constants(
        an, None, norm=nrm, tol=o.tol, max_iter=o.max_iter, deadline=deadline0,
        grace=GRACE * (deadline0 - t_start),
    )
    slopes, segments = an.segments(consts)
    if o.mode == "exact":
        _check_exact_widths(segments, o.max_exact_width)
    n_units = sum(2 * (len(seg[0::2]) - 1) for seg in segments)  # pairs + two-layer blocks
    limit = _default_limit(segments) if time_limit is None else float(time_limit)
    clock = _Clock(t_start + limit, n_units, report)
    done = [(seg, _segment(seg, consts, slopes, clock, o)) for seg in segments]
    late = [c.qualname for c in consts.values() if c.how.startswith("time limit: ")]
    notes = _notes(done, clock, limit=limit, late=late, const_limit=deadline0 - t_start,
                   reused=reused, consts=consts)
    cut = bool(clock.late_units or any(s.work.skipped or s.work.too_big for _, s in done))
    if o.mode == "greedy":
        notes.append("value is the greedy SeqLip ESTIMATE; upper is the certificate")
    elif cut or not all(s.exact for _, s in done):
        notes.append("some pairs were not solved exactly: their certified relaxation is used")
    return _assemble(graph, consts, done, notes, mode=o.mode, nrm=nrm, reused=reused,
                     t_start=t_start)


def _check_exact_widths(segments: list[list[Any]], max_exact_width: int) -> None:
    wide = [(act.qualname, _numel(act.out_shape)) for seg in segments for act in seg[1::2]
            if _numel(act.out_shape) > max_exact_width]
    if wide:
        raise InvalidArgumentError(
            "mode='exact' enumerates 2^n activation patterns per layer; these layers are "
            f"wider than max_exact_width={max_exact_width}: "
            + ", ".join(f"{q} ({n})" for q, n in wide)
            + ". Use mode='auto' (exact where feasible, certified bounds elsewhere) or "
            "raise max_exact_width."
        )


def _notes(
    done: list[tuple[list[Any], _Segment]], clock: _Clock, *, limit: float, late: list[str],
    const_limit: float, reused: bool, consts: dict[str, Any],
) -> list[str]:
    """The notes of a :func:`seqlip` result (time limits, skipped blocks, reuse)."""
    notes: list[str] = []
    if not done:
        notes.append("no sequential segment (linear, act, linear) found: SeqLip = AutoLip")
    skipped = sum(s.work.skipped for _, s in done)
    if skipped or clock.late_units:
        notes.append(
            f"time limit of {limit:g} s reached: {skipped} pair(s) and "
            f"{clock.late_blocks} two-layer block(s) skipped (AutoLip's factors used "
            "there, still certified); raise time_limit for a tighter bound"
        )
    too_big = sum(s.work.too_big for _, s in done)
    if too_big:
        notes.append(
            f"{too_big} conv two-layer block(s) kept AutoLip's factors: their Fourier symbols "
            f"need more than CONV_PAIR_BYTES={CONV_PAIR_BYTES} bytes (still certified)"
        )
    if late:
        notes.append(
            f"time limit of {const_limit:g} s reached while computing the AutoLip constants: "
            f"{len(late)} node(s) got a quick estimate (first: {late[0]}) and every "
            "pair was skipped; raise time_limit for a certified bound"
        )
    if reused:
        notes.append("graph and AutoLip constants reused from the previous call on this model")
    if not all(c.certified for c in consts.values()):
        notes.append("some AutoLip factors are estimates, so the bound is not certified")
    return notes


def _assemble(
    graph: Any, consts: dict[str, Any], done: list[tuple[list[Any], _Segment]],
    notes: list[str], *, mode: str, nrm: str, reused: bool, t_start: float,
) -> SeqLipResult:
    """The :class:`SeqLipResult`: each segment's factor becomes the constant of its first
    linear node (the others 1) and AutoLip composes the graph (see the module docstring)."""
    est = {name: replace(c, constants=tuple(c.estimate if c.estimate is not None else ci
                                            for ci in c.constants))
           for name, c in consts.items()}
    tables = {"cert": dict(consts), "est": dict(est), "raw": dict(est), "trunc": dict(est)}
    rows: list[LayerBound] = []
    for seg, s in done:
        rows.extend(s.rows)
        first = seg[0].name
        for key, base, v in (("cert", consts, s.upper), ("est", est, s.estimate),
                             ("raw", est, s.raw), ("trunc", est, s.truncated)):
            tables[key][first] = replace(base[first], constants=(v,), how="seqlip")
        for n in seg[1:]:
            tables["cert"][n.name] = replace(consts[n.name], constants=(1.0,), how="in segment")
            one = replace(est[n.name], constants=(1.0,), how="in segment")
            tables["est"][n.name] = tables["raw"][n.name] = tables["trunc"][n.name] = one
    in_segment = {n.name for seg, _ in done for n in seg}
    rows.extend(LayerBound(name=c.qualname, op=c.op, value=c.value, certified=c.certified,
                           seconds=c.seconds, estimate=c.estimate, how=f"autolip: {c.how}")
                for name, c in consts.items() if name not in in_segment)
    autolip_value = compose(graph, consts)
    auto_certified = all(c.certified for c in consts.values())
    upper = min(compose(graph, tables["cert"]), autolip_value)
    estimate = compose(graph, tables["est"])
    value, certified = (estimate, False) if mode == "greedy" else (upper, auto_certified)
    return SeqLipResult(
        value=float(value), certified=bool(certified), method=f"seqlip[{mode}]", norm=nrm,
        bound="estimate" if mode == "greedy" else "upper",
        upper=float(upper) if auto_certified else None, layers=tuple(rows),
        seconds=time.perf_counter() - t_start, notes=tuple(notes),
        extra={
            "graph": graph,
            "segments": [[n.qualname for n in s] for s, _ in done],
            "segment_pair_products": [s.raw for _, s in done],
            "estimate_uncapped": compose(graph, tables["raw"]),
            "estimate_truncated": compose(graph, tables["trunc"]),
            "reused": reused,
        },
        how=f"SeqLip ({mode})", estimate=float(estimate), autolip=float(autolip_value),
        segments=len(done),
    )
