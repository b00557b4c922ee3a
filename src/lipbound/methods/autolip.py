r"""AutoLip: compose per-node Lipschitz constants over the real computation graph.

Scaman & Virmaux (2018), Algorithm 1. The model is captured as a DAG
(:func:`lipbound.graph.capture`, then :func:`lipbound.graph.simplify`, which merges chains of
linear ops and folds BatchNorm). With ``theta_0 = x`` and ``theta_k = g_k(theta_{i_1}, ...,
theta_{i_m})``, if ``g_k`` is ``c_{k,j}``-Lipschitz in its ``j``-th argument (the others fixed)
then, by the triangle inequality over the arguments changed one at a time,

.. math::  L_k = \sum_j c_{k,j} L_{i_j}, \qquad L_0 = 1,

bounds the Lipschitz constant of ``x -> theta_k``; ``L`` at the output bounds the model's. When
the arguments occupy disjoint blocks of the output (concatenation) the exact rule is tighter:
``||cat(a, b)||_2^2 = ||a||^2 + ||b||^2`` gives ``L_k = sqrt(sum_j (c_{k,j} L_{i_j})^2)`` in l2
and ``max_j`` in l-inf (the rule says which via ``NodeConstant.combine``). For a chain this is the
product of the per-layer constants.

The headline uses, for every factor, the certified upper bound when the rule has one (dense
SVD, Fourier certificate, closed forms...) and otherwise the estimate (power/Lanczos, from
below), in which case the factor and the result are flagged as not certified:
``certified`` is True only when every factor is.

The functional core is public for other methods: :func:`node_constants` computes the factors
and :func:`compose` composes any (possibly overridden) set of them; SeqLip replaces the
factors of a sequential segment (first linear node: the segment's bound, the others 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import nn

from .._validation import check_norm, check_positive
from ..analysis import Analysis, analysis_of, clear_cache, node_constants
from ..graph import OpGraph
from ..results import LayerBound, LipschitzResult
from ..rules import NodeConstant

__all__ = [
    "NodeConstant", "autolip", "clear_cache", "compose", "elasticities", "graph_constants",
    "node_bounds", "node_constants",
]

#: Share of a time limit the quick estimates may run past it before the call gives up.
GRACE = 0.05


def graph_constants(
    model: nn.Module | Analysis, shape: Any, *, norm: str, tol: float, max_iter: int,
    certify: bool = True, deadline: float | None = None, grace: float = 0.0,
) -> tuple[OpGraph, dict[str, NodeConstant], bool]:
    """``(graph, constants, reused)``: the simplified graph of ``model`` at ``shape`` and its
    per-node constants, through its :class:`~lipbound.analysis.Analysis`
    (:func:`~lipbound.analysis.analysis_of`: an analysis given as ``model``, or the one of the
    previous call on the same unchanged model). ``reused`` is True when that analysis already
    had constants for these options (all of them, or those a deadline left: the rest are
    computed now). ``deadline`` and ``grace`` are :func:`~lipbound.analysis.node_constants`'.
    """
    an, _ = analysis_of(model, shape)
    reused = an.has_constants(norm=norm, tol=tol, max_iter=max_iter, certify=certify)
    consts = an.constants(norm=norm, tol=tol, max_iter=max_iter, certify=certify,
                          deadline=deadline, grace=grace)
    return an.graph, consts, reused


def node_bounds(graph: OpGraph, constants: Mapping[str, NodeConstant]) -> dict[str, float]:
    """``L_k`` at every node: the Lipschitz bound of ``x -> theta_k`` (input: 1)."""
    L: dict[str, float] = {}
    for node in graph:
        if node.kind == "input":
            L[node.name] = 1.0
            continue
        if node.kind == "output":
            L[node.name] = L[node.inputs[0]]
            continue
        c = constants[node.name]
        terms = [ci * L[p] if ci != 0 else 0.0 for ci, p in zip(c.constants, node.inputs)]
        if not terms:
            L[node.name] = 0.0
        elif c.combine == "rss":
            L[node.name] = math.sqrt(sum(t * t for t in terms))
        elif c.combine == "max":
            L[node.name] = max(terms)
        else:
            L[node.name] = math.fsum(terms)
    return L


def compose(graph: OpGraph, constants: Mapping[str, NodeConstant]) -> float:
    """The AutoLip bound at the output: ``L_k = sum_j c_{k,j} L_{parent_j}`` in order.

    >>> import torch
    >>> from torch import nn
    >>> from lipbound.graph import capture, simplify
    >>> g = simplify(capture(nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()), (3,)))
    >>> cs = node_constants(g)
    >>> abs(compose(g, cs) / (0.25 * cs["_0"].constants[0]) - 1) < 1e-6
    True
    """
    return node_bounds(graph, constants)[graph.output.name]


def elasticities(graph: OpGraph, constants: Mapping[str, NodeConstant]) -> dict[str, float]:
    """``(c_k / L) dL/dc_k`` for every node: the share of the bound each factor controls.

    Scaling node ``k``'s constants by ``(1 + h)`` scales the bound by about ``(1 + e_k h)``.
    In a chain every ``e_k`` is 1; a layer in a residual branch has ``e_k < 1``. Then
    ``e_k * log(c_k)`` is node ``k``'s contribution to ``log L`` (for a chain they sum to it),
    which is how :func:`autolip` ranks the dominant layers. Computed by a relative
    perturbation ``h = 1e-6`` of each node (one composition per node).
    """
    base = compose(graph, constants)
    out: dict[str, float] = {}
    h = 1e-6
    for k, c in constants.items():
        if base == 0 or not any(c.constants):
            out[k] = 0.0
            continue
        bumped = dict(constants)
        bumped[k] = replace(c, constants=tuple(ci * (1 + h) for ci in c.constants))
        # a ratio, not (bumped - base) / (base h): base * h underflows for tiny bounds
        out[k] = (compose(graph, bumped) / base - 1.0) / h
    return out


def autolip(
    model: nn.Module | Analysis,
    input_shape: Any = None,
    *,
    norm: Any = 2,
    tol: float = 1e-6,
    max_iter: int = 1000,
    certify: bool = True,
    time_limit: float | None = None,
) -> LipschitzResult:
    """Upper bound on the Lipschitz constant of ``model`` by AutoLip over its captured graph.

    ``value`` is the composed bound; ``certified`` is True when every factor is certified
    (otherwise the uncertified factors, power/Lanczos estimates, are named in ``notes``);
    ``layers`` has one row per node (qualified name, op, factor, certified, seconds, how);
    ``extra["node_bounds"]`` the bound at every node, ``extra["estimate"]`` the composition of
    the estimates alone (what the paper's AutoLip computes; not a certificate),
    ``extra["elasticity"]`` / ``extra["log_contribution"]`` (by qualname) how much of
    ``log(value)`` each factor controls (see :func:`elasticities`); the last note names the
    dominant layers.

    ``tol`` / ``max_iter`` drive the power/Lanczos estimates used as factors when no
    certificate exists; a certified factor's estimate is only reported and computed to
    ``max(tol, 1e-3)`` in at most 16 Lanczos steps (a lower estimate either way).
    ``certify=False`` skips certificates (faster; estimates only).

    ``time_limit`` (seconds, default none): the clock is checked before each node (the capture
    and a node's certificate, once started, are not interrupted); the nodes started after it
    get quick power-iteration estimates (see :func:`node_constants`), so the call ends about on
    time with ``certified=False`` and a note naming the limit and how many nodes it cut; when
    even those do not fit in 5% more, :class:`~lipbound.errors.SolverError` names
    ``time_limit`` (the constants computed are kept: the next call on the same model goes on
    from there).
    ``extra["reused"]`` says whether the constants were already in the model's
    :class:`~lipbound.analysis.Analysis` (given as ``model``, or the previous call's on the same
    unchanged model; :func:`graph_constants`). ``model`` may be an
    :class:`~lipbound.analysis.Analysis` (``input_shape`` then omitted).

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) is not None
    True
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> r = autolip(net, (4,))
    >>> r.certified, len(r.layers)
    (True, 3)
    >>> w1 = torch.linalg.matrix_norm(net[0].weight.detach().double(), 2)
    >>> w2 = torch.linalg.matrix_norm(net[2].weight.detach().double(), 2)
    >>> abs(r.value - float(w1 * w2)) < 1e-5 * r.value
    True
    """
    t0 = time.perf_counter()
    an, _ = analysis_of(model, input_shape)
    n = check_norm(norm, method="autolip")
    check_positive("tol", tol)
    check_positive("max_iter", max_iter, integer=True)
    if time_limit is not None:
        check_positive("time_limit", time_limit)
    deadline = None if time_limit is None else t0 + float(time_limit)
    graph, constants, reused = graph_constants(
        an, None, norm=n, tol=tol, max_iter=max_iter, certify=certify, deadline=deadline,
        grace=0.0 if time_limit is None else GRACE * float(time_limit),
    )
    bounds = node_bounds(graph, constants)
    value = bounds[graph.output.name]
    certified = all(c.certified for c in constants.values())
    est_constants = {
        k: replace(c, constants=tuple(c.estimate if c.estimate is not None else ci
                                      for ci in c.constants))
        for k, c in constants.items()
    }
    estimate = compose(graph, est_constants)
    rows = tuple(
        LayerBound(
            name=c.qualname,
            op=c.op,
            value=c.value,
            certified=c.certified,
            seconds=c.seconds,
            estimate=c.estimate,
            how=c.how + ("" if c.combine == "sum" else f" [{c.combine}]"),
        )
        for c in constants.values()
    )
    notes = []
    cut = [c for c in constants.values() if c.how.startswith("time limit: ")]
    if cut:
        notes.append(
            f"time_limit={time_limit:g} s reached: {len(cut)} of {len(constants)} node(s) got a "
            f"quick estimate instead of a certificate (first: {cut[0].qualname}); raise "
            "time_limit (or leave it None) for a certified bound"
        )
    unc = [c.qualname for c in constants.values() if not c.certified]
    if unc:
        notes.append(
            "not certified: these factors are estimates (from below), so the value is an "
            "estimate: " + ", ".join(unc)
        )
    el = elasticities(graph, constants)
    share = {
        k: el[k] * math.log(c.value) if c.value > 0 else -math.inf for k, c in constants.items()
    }
    dominant = sorted(constants.values(), key=lambda c: -share[c.name])[:5]
    notes.append(
        "largest factors: "
        + ", ".join(f"{c.qualname}={c.value:.4g} (e={el[c.name]:.2f})" for c in dominant)
    )
    return LipschitzResult(
        value=float(value),
        certified=certified,
        method="autolip",
        norm=n,
        bound="upper",
        upper=float(value) if certified else None,
        layers=rows,
        seconds=time.perf_counter() - t0,
        notes=tuple(notes),
        extra={
            "node_bounds": bounds,
            "estimate": estimate,
            "elasticity": {constants[k].qualname: v for k, v in el.items()},
            "log_contribution": {constants[k].qualname: v for k, v in share.items()},
            "graph": graph,
            "reused": reused,
        },
    )
