r"""Local bounds composed over residual cuts: ball to ball, one segment at a time.

Why. The interval secant Jacobians of :mod:`lipbound.local.propagate` wrap: every width is
multiplied by absolute-value matrices, so through several transformer blocks a width ``r``
grows geometrically with depth (the regression test of a 2-block TinyViT in
``tests/test_local.py``). Cutting the graph where everything passes through one tensor and
chaining balls stops the wrapping at each cut.

Cuts. A node ``v`` (not the input nor the output) is a *cut* when every path from the input
to the output goes through it: in the graph's topological order, no node before ``v`` has a
user after ``v``. :func:`residual_cuts` keeps the cuts that are residual joins (an ``add`` or
``sub`` of two values that both depend on the input: the end of a block ``x + g(x)``), so a
plain chain (a CNN) is not cut; the graph between two consecutive cuts is a
:func:`segment` (its own :class:`~lipbound.graph.OpGraph`, whose input is the first cut's
value).

Claim. Let ``f = f_K o ... o f_1`` be the segments, ``v_k = f_k o ... o f_1`` the value at
cut ``k`` and ``c_k`` its computed value at the centre ``x``, with ``|c_k - v_k(x)| <= e_k``
entry-wise (the radius of the radius-0 interval pass, which encloses the exact value). Put
``rho_1 = r`` and ``rho_{k+1} = (U_1 ... U_k) r + ||e_k||`` (in the bound's norm), where
``U_k`` is a certified local bound of ``f_k`` on the ball ``B_k`` of radius ``rho_k`` around
``c_{k-1}`` (``c_0 = x``). Then ``U_1 ... U_K`` bounds the local constant of ``f`` on the
ball of radius ``r`` around ``x``.

Proof. By induction, ``v_k`` maps the ball ``B(x, r)`` into ``B_{k+1}``: for ``z`` in it,
``||v_k(z) - c_k|| <= ||v_k(z) - v_k(x)|| + ||v_k(x) - c_k|| <= (U_1 ... U_k) r + ||e_k||``,
since ``v_k(z)`` and ``v_k(x)`` stay in the balls where the ``U_j`` hold (induction
hypothesis) and the segment bounds compose. Then for ``u, z`` in ``B(x, r)``, ``||f(u) -
f(z)|| <= U_K ||v_{K-1}(u) - v_{K-1}(z)|| <= ... <= U_K ... U_1 ||u - z||``. The products
and sums are rounded up (:func:`~lipbound.spectral.certify.round_up`). Each ``U_k`` is the
package's certified local bound (:func:`lipbound.local_bound`'s steps 1-4) on a graph whose
input is the cut tensor; the caller keeps the smaller of this product and the uncut bound.
"""

from __future__ import annotations

from dataclasses import replace

from ..graph import OpGraph
from ..graph.types import Node

__all__ = ["residual_cuts", "segment"]


def _depends_on_input(graph: OpGraph) -> set[str]:
    dep = {graph.input.name}
    for node in graph:
        if any(i in dep for i in node.inputs):
            dep.add(node.name)
    return dep


def residual_cuts(graph: OpGraph) -> list[str]:
    """The residual joins that every input-to-output path goes through, in order (module
    docstring)."""
    order = list(graph)
    pos = {n.name: i for i, n in enumerate(order)}
    last = {n.name: pos[n.name] for n in order}
    for n in order:
        for name in n.inputs:
            last[name] = max(last[name], pos[n.name])
    dep = _depends_on_input(graph)
    cuts: list[str] = []
    reach = 0  # the last position read by a node before the current one
    for i, n in enumerate(order):
        joins = n.op in ("add", "sub") and sum(1 for j in n.inputs if j in dep) >= 2
        if i and n.kind not in ("input", "output") and reach <= i and joins:
            cuts.append(n.name)
        reach = max(reach, last[n.name])
    return cuts


def segment(graph: OpGraph, start: str | None, end: str | None) -> OpGraph:
    """The part of ``graph`` after node ``start`` up to node ``end`` (inclusive), as a graph
    whose input is ``start``'s value (``None``: the graph's input / output)."""
    order = list(graph)
    pos = {n.name: i for i, n in enumerate(order)}
    lo = 0 if start is None else pos[start]
    hi = pos[graph.output.name] if end is None else pos[end]
    nodes: dict[str, Node] = {}
    if start is None:
        inp = graph.input
        nodes[inp.name] = inp
        shape = tuple(graph.input_shape)
    else:
        src = graph[start]
        shape = tuple(src.out_shape)
        nodes[start] = Node(name=start, qualname=f"{src.qualname} (cut)", op="input",
                            kind="input", inputs=(), in_shapes=(), out_shape=shape,
                            fn=graph.input.fn)
    for n in order[lo + 1: hi + 1]:
        if n.kind == "output":
            break
        nodes[n.name] = n
    if end is None:
        nodes[graph.output.name] = graph.output
    else:
        last = graph[end]
        nodes["output"] = replace(graph.output, inputs=(end,), in_shapes=(last.out_shape,),
                                  out_shape=last.out_shape)
    missing = {i for n in nodes.values() for i in n.inputs} - set(nodes)
    if missing:  # pragma: no cover - a cut is crossed by no edge (residual_cuts)
        raise ValueError(f"segment {start}..{end} reads {sorted(missing)} from before the cut")
    return OpGraph(nodes=nodes, input_shape=shape, model=graph.model)

