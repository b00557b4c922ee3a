"""Per-node Lipschitz constants of a captured graph: each node's rule, under one time budget.

:func:`node_constants` is the one place where rules are asked for their constants; AutoLip
composes them (:func:`lipbound.methods.autolip.compose`), SeqLip and LipSDP replace the factors
of sequential segments, and :class:`lipbound.analysis.Analysis` caches them per options.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from .._validation import check_norm
from ..errors import SolverError, UnsupportedModelError, UnsupportedNode
from ..graph import OpGraph
from ..graph.types import Node
from ..rules import NodeConstant, RuleContext
from ..rules.linear import l1_linf_available
from ..spectral import shared_casts

__all__ = ["QUICK_ITER", "QUICK_TOL", "node_constants"]

#: Power iterations / relative tolerance of the quick estimates used past a deadline.
QUICK_ITER = 10
QUICK_TOL = 1e-2


def _covered_nodes(graph: OpGraph, n: str) -> list[Node]:
    """The operation nodes of ``graph``, or ONE :class:`UnsupportedModelError` listing every node
    without an l``n`` rule."""
    bad: list[UnsupportedNode] = []
    todo = []
    for node in graph:
        if node.kind in ("input", "output"):
            continue
        reason = node.unsupported
        rule = node.rule
        if reason is None and rule is None:
            reason = "no rule attached (was the graph built by lipbound.graph.capture?)"
        if reason is None and rule is not None and n not in rule.norms:
            reason = f"its rule has no l{n} constant (only {', '.join(rule.norms)})"
        if reason is None and n != "2" and node.kind == "linear":
            reason = l1_linf_available(node)
        if reason is not None:
            bad.append(UnsupportedNode(node.qualname, node.op, reason))
        else:
            todo.append(node)
    if bad:
        raise UnsupportedModelError(bad)
    return todo


def node_constants(
    graph: OpGraph,
    *,
    norm: Any = "2",
    tol: float = 1e-6,
    max_iter: int = 1000,
    certify: bool = True,
    deadline: float | None = None,
    grace: float = 0.0,
    done: dict[str, NodeConstant] | None = None,
) -> dict[str, NodeConstant]:
    """Per-node constants (w.r.t. each input) of every operation node of ``graph``.

    Keys are node names (``input``/``output`` nodes have none). Every node without a rule for
    ``norm`` is collected over the whole graph and reported in ONE
    :class:`~lipbound.errors.UnsupportedModelError`.

    ``deadline`` (absolute ``time.perf_counter()``): the clock is checked before each node (a
    rule, once started, runs to its end; a node is predicted to take as long as the last one
    with the same op and shapes, else as the slowest linear node so far); every node that
    would end past it gets the QUICK estimate
    instead: the rule with ``certify=False``, at most :data:`QUICK_ITER` power iterations to a
    relative tolerance :data:`QUICK_TOL` (closed-form rules, BatchNorm and activations stay
    certified, they cost nothing). Such factors have ``certified=False`` and ``how`` starting
    with ``"time limit: "``; the composed value is then an estimate. A linear node still to
    do at ``deadline + grace`` raises :class:`~lipbound.errors.SolverError` naming
    ``time_limit``.

    ``done``: constants already computed for the nodes of this very graph, with these options
    (used as they are); every constant computed in full is added to it as soon as it is known,
    so a caller keeps that work when the call stops on the deadline.

    >>> import torch
    >>> from torch import nn
    >>> from lipbound.graph import capture, simplify
    >>> g = simplify(capture(nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()), (3,)))
    >>> round(node_constants(g)["_1"].constants[0], 6)  # 1/4, rounded up by the float margin
    0.25
    """
    n = check_norm(norm, method="autolip")
    ctx = RuleContext(norm=n, tol=float(tol), max_iter=int(max_iter), certify=bool(certify))
    todo = _covered_nodes(graph, n)
    bad: list[UnsupportedNode] = []
    out: dict[str, NodeConstant] = {}
    if done is None:
        done = {}
    quick = replace(ctx, certify=False, tol=max(ctx.tol, QUICK_TOL),
                    max_iter=min(ctx.max_iter, QUICK_ITER))
    seen: dict[tuple[Any, ...], float] = {}  # seconds of the last node of each signature
    slowest = 0.0  # seconds of the slowest linear node so far
    start = time.perf_counter()
    for i, node in enumerate(todo):
        if node.name in done:
            out[node.name] = done[node.name]
            continue
        t0 = time.perf_counter()
        sig = (node.op, node.in_shapes, node.out_shape)
        # a node is started only when it is predicted to end in time: as long as the last node
        # with the same op and shapes (repeated blocks), else as the slowest linear node so far
        guess = seen.get(sig, slowest if node.kind == "linear" else 0.0)
        late = deadline is not None and t0 + guess >= deadline
        if late and deadline is not None and t0 >= deadline + grace and node.kind == "linear":
            left = sum(n.name not in done for n in todo[i:])
            raise SolverError(
                f"time limit reached: {left} of {len(todo)} nodes still had no constant "
                f"{t0 - start:.3g} s into the AutoLip constants (not even quick estimates fit); "
                "raise time_limit or leave it None (the constants computed so far are kept for "
                "the next call on this model)"
            )
        try:
            with shared_casts():  # the node's parameters are cast to float64 once
                c = node.rule.constant(node, quick if late else ctx)
        except UnsupportedModelError as exc:
            bad.extend(exc.nodes)
            continue
        if not late:
            seen[sig] = time.perf_counter() - t0
            if node.kind == "linear":
                slowest = max(slowest, seen[sig])
        if late and not c.certified:
            c = replace(c, how="time limit: " + c.how)
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
        if not late:
            done[node.name] = out[node.name]
    if bad:
        raise UnsupportedModelError(bad)
    return out
