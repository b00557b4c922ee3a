""":func:`sequential_chain`: the linear / activation chain of a sequential network."""

from __future__ import annotations

from ..errors import NotSequentialError, UnsupportedNode
from .types import Node, OpGraph

__all__ = ["sequential_chain"]


def sequential_chain(graph: OpGraph) -> list[Node]:
    """The nodes between input and output of a chain ``linear, act, linear, ..., act, linear``.

    Call it on a :func:`~lipbound.graph.simplify`-ed graph (flatten/reshape/BatchNorm/dropout
    are then merged into the linear nodes). Each returned node has one input (the previous
    node) and one user (the next); linear and activation nodes alternate, starting and ending
    with a linear node. Otherwise :class:`~lipbound.errors.NotSequentialError` lists every node
    that breaks the chain.

    >>> import torch
    >>> from torch import nn
    >>> from lipbound.graph import capture, simplify
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> [n.kind for n in sequential_chain(simplify(capture(net, (2, 2))))]
    ['linear', 'activation', 'linear']
    """
    bad: list[UnsupportedNode] = []
    out = graph.output
    chain: list[Node] = []
    expected = "linear"
    prev = graph.input.name
    order = [n for n in graph if n.kind not in ("input", "output")]
    for n in order:
        problems = []
        if n.inputs != (prev,):
            problems.append(f"takes inputs {list(n.inputs)} instead of only {prev!r}")
        users = graph.users(n.name)
        if len(users) != 1:
            problems.append(f"is used by {len(users)} nodes (a branch)")
        if n.kind != expected:
            problems.append(f"is a {n.kind} node where a {expected} node is expected")
        if problems:
            bad.append(UnsupportedNode(n.qualname, n.op, "; ".join(problems)))
        chain.append(n)
        prev = n.name
        expected = "activation" if n.kind == "linear" else "linear"
    if out.inputs != (prev,):
        bad.append(UnsupportedNode("output", "output", f"is fed by {list(out.inputs)}"))
    if chain and chain[-1].kind != "linear":
        last = chain[-1]
        bad.append(UnsupportedNode(last.qualname, last.op, "the chain must end with a linear node"))
    if not chain:
        bad.append(UnsupportedNode("output", "output", "the graph has no operations"))
    if bad:
        raise NotSequentialError(
            bad,
            what="the network is not a chain linear -> activation -> ... -> linear; offending "
            "nodes",
        )
    return chain
