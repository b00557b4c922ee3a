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

from .._validation import check_input_shape, check_model, check_norm, check_positive
from ..errors import UnsupportedModelError, UnsupportedNode
from ..graph import OpGraph, capture, simplify
from ..results import LayerBound, LipschitzResult
from ..rules import NodeConstant, RuleContext

__all__ = ["NodeConstant", "autolip", "compose", "elasticities", "node_bounds", "node_constants"]


def node_constants(
    graph: OpGraph,
    *,
    norm: Any = "2",
    tol: float = 1e-6,
    max_iter: int = 1000,
    certify: bool = True,
) -> dict[str, NodeConstant]:
    """Per-node constants (w.r.t. each input) of every operation node of ``graph``.

    Keys are node names (``input``/``output`` nodes have none). Every node without a rule for
    ``norm`` is collected over the whole graph and reported in ONE
    :class:`~lipbound.errors.UnsupportedModelError`.

    >>> import torch
    >>> from torch import nn
    >>> from lipbound.graph import capture, simplify
    >>> g = simplify(capture(nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()), (3,)))
    >>> round(node_constants(g)["_1"].constants[0], 6)  # 1/4, rounded up by the float margin
    0.25
    """
    n = check_norm(norm, method="autolip")
    ctx = RuleContext(norm=n, tol=float(tol), max_iter=int(max_iter), certify=bool(certify))
    bad: list[UnsupportedNode] = []
    todo = []
    for node in graph:
        if node.kind in ("input", "output"):
            continue
        reason = node.meta.get("unsupported")
        rule = node.meta.get("rule")
        if reason is None and rule is None:
            reason = "no rule attached (was the graph built by lipbound.graph.capture?)"
        if reason is None and rule is not None and n not in rule.norms:
            reason = f"its rule has no l{n} constant (only {', '.join(rule.norms)})"
        if reason is None and n != "2" and node.kind == "linear":
            from ..rules.linear import l1_linf_available

            reason = l1_linf_available(node)
        if reason is not None:
            bad.append(UnsupportedNode(node.qualname, node.op, reason))
        else:
            todo.append(node)
    if bad:
        raise UnsupportedModelError(bad)
    out: dict[str, NodeConstant] = {}
    for node in todo:
        t0 = time.perf_counter()
        try:
            c = node.meta["rule"].constant(node, ctx)
        except UnsupportedModelError as exc:
            bad.extend(exc.nodes)
            continue
        if len(c.constants) != len(node.inputs):
            c = replace(c, constants=(c.value,) * len(node.inputs))
        out[node.name] = replace(
            c,
            name=node.name,
            qualname=node.qualname,
            op=node.op,
            seconds=time.perf_counter() - t0,
            slope_range=c.slope_range if c.slope_range is not None else node.slope_range,
        )
    if bad:
        raise UnsupportedModelError(bad)
    return out


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
    model: nn.Module,
    input_shape: Any,
    *,
    norm: Any = 2,
    tol: float = 1e-6,
    max_iter: int = 1000,
    certify: bool = True,
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
    ``max(tol, 1e-3)``. ``certify=False`` skips certificates (faster; estimates only).

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
    model = check_model(model, require_eval=True)
    shape = check_input_shape(input_shape)
    n = check_norm(norm, method="autolip")
    check_positive("tol", tol)
    check_positive("max_iter", max_iter, integer=True)
    graph = simplify(capture(model, shape))
    constants = node_constants(graph, norm=n, tol=tol, max_iter=max_iter, certify=certify)
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
        },
    )
