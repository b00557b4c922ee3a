"""Chains of a captured graph: the dense float64 chain of a sequential network, and the
sequential segments of any graph (:func:`find_segments`, shared by SeqLip and LipSDP).

The dense chain serves :func:`lipbound.exact` (branch and bound on the chain) and
:func:`lipbound.lipsdp` (the LMIs are written on the chain's matrices): the simplified graph is
read as a chain by :func:`lipbound.graph.sequential_chain` and each linear node becomes
``(W, b)`` in float64 (:meth:`lipbound.analysis.Analysis.dense_chain` caches it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InvalidArgumentError, NotSequentialError, UnsupportedNode
from ..graph import OpGraph, sequential_chain
from ..spectral.certify import dense_matrix

__all__ = ["chain_items", "constant_segments", "find_segments", "linear_matrix", "merged_chain",
           "segment_slopes"]


def _affine_parts(
    fn: Any, in_shape: tuple[int, ...], where: str
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(W, b, out_shape)`` of an affine map in float64: ``b = fn(0)``, ``W`` its Jacobian, by
    :func:`lipbound.spectral.certify.dense_matrix` with ``exact_offset=True`` (no difference
    ``fn(e_j) - fn(0)``, which cancels the bias: a chain whose biases dwarf its weights, any
    depth-``d`` net with biases scaled by ``c^k`` and weights by ``c`` for ``c`` large, came
    out wrong)."""
    with torch.no_grad():
        out_shape = tuple(fn(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:])
    J, b = dense_matrix(fn, in_shape, dtype=torch.float64, exact_offset=True)
    W = J.numpy().copy()
    bb = b.detach().cpu().numpy().copy()
    if W.shape[0] != bb.size:  # pragma: no cover - an affine map has one Jacobian row per output
        raise NotSequentialError(
            [UnsupportedNode(where, "linear", "its Jacobian does not match its output size")]
        )
    return W, bb, out_shape


def linear_matrix(node: Any) -> np.ndarray:
    """The float64 matrix of a captured linear node's linear part (Linear, Conv*, BatchNorm,
    average pooling, reshape, or a merged chain of these), by :func:`_affine_parts`: used by
    :func:`lipbound.lipsdp` on the segments of non-sequential graphs (a float32 model's node
    functions cast their parameters to the float64 input)."""
    (in_shape,) = node.in_shapes
    return _affine_parts(node.fn, tuple(in_shape), node.qualname)[0]


def chain_items(graph: OpGraph) -> list[tuple[str, Any]]:
    """The chain's items ``("lin", (name, W, b))`` / ``("act", (name, node))`` of a simplified
    graph, through :func:`~lipbound.graph.sequential_chain` (raises
    :class:`NotSequentialError` for other graphs)."""
    items: list[tuple[str, Any]] = []
    for node in sequential_chain(graph):
        if node.kind == "linear":
            # exact offsets (no difference fn(e_j) - fn(0)), see _affine_parts
            (in_shape,) = node.in_shapes
            W, b, _ = _affine_parts(node.fn, tuple(in_shape), node.qualname)
            items.append(("lin", (node.qualname, W, b)))
        elif node.kind == "activation":
            items.append(("act", (node.qualname, node)))
        else:  # pragma: no cover - sequential_chain promises linear/activation only
            raise NotSequentialError(
                [UnsupportedNode(node.qualname, node.op, "not linear or activation")]
            )
    return items


def _merge_items(
    items: list[tuple[str, Any]], in_dim: int
) -> tuple[list[Any], list[Any], list[Any], list[str]]:
    """Merge consecutive linear maps; insert identities so the chain alternates and ends linear."""
    Ws: list[np.ndarray] = []
    bs: list[np.ndarray] = []
    acts: list[tuple[str, Any]] = []
    names: list[str] = []
    pending: tuple[np.ndarray, np.ndarray, str] | None = None
    last_dim = in_dim
    for kind, payload in items:
        if kind == "lin":
            name, W, b = payload
            if pending is None:
                pending = (W, b, name)
            else:
                W0, b0, n0 = pending
                pending = (W @ W0, W @ b0 + b, f"{n0}+{name}")
            last_dim = W.shape[0]
        else:
            if pending is None:
                pending = (np.eye(last_dim), np.zeros(last_dim), "identity")
            Ws.append(pending[0])
            bs.append(pending[1])
            names.append(pending[2])
            acts.append(payload)
            pending = None
    if pending is None:
        pending = (np.eye(last_dim), np.zeros(last_dim), "identity")
    Ws.append(pending[0])
    bs.append(pending[1])
    names.append(pending[2])
    return Ws, bs, acts, names


def merged_chain(
    graph: OpGraph, in_dim: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[str, Any]], list[str]]:
    """``(weights, biases, activations, names)`` of a sequential graph in float64.

    ``activations[i] = (name, obj)`` with ``obj`` the activation's graph ``Node``; consecutive
    linear maps are merged, and identity maps inserted so that the chain alternates linear /
    activation and ends with a linear map. Call it on the graph of a float64 copy of the model
    (:meth:`lipbound.analysis.Analysis.dense_chain` does): BatchNorm folding then adds no
    float32 rounding to the matrices.
    """
    return _merge_items(chain_items(graph), in_dim)


def find_segments(graph: Any, slopes: dict[str, tuple[float, float] | None]) -> list[list[Any]]:
    """Maximal chains ``[linear, act, linear, ..., linear]`` (at least two linear nodes) in which
    every node but the last has exactly one user (the next node), every node but the first has
    exactly one input (the previous node) and every activation has a known slope range.

    >>> from torch import nn
    >>> from lipbound.graph import capture, simplify
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> g = simplify(capture(net, (3,)))
    >>> [[n.kind for n in s] for s in find_segments(g, {n.name: n.slope_range for n in g})]
    [['linear', 'activation', 'linear']]
    """
    used: set[str] = set()
    segs: list[list[Any]] = []
    for node in graph:
        if node.kind != "linear" or node.name in used:
            continue
        seg = [node]
        cur = node
        while True:
            users = graph.users(cur.name)
            if len(users) != 1 or users[0].kind != "activation":
                break
            act = users[0]
            if act.inputs != (cur.name,) or slopes.get(act.name) is None:
                break
            nxt = graph.users(act.name)
            if len(nxt) != 1 or nxt[0].kind != "linear" or nxt[0].inputs != (act.name,):
                break
            seg.extend([act, nxt[0]])
            cur = nxt[0]
        if len(seg) >= 3:
            used.update(n.name for n in seg)
            segs.append(seg)
    return segs


def constant_segments(
    graph: Any, consts: dict[str, Any]
) -> tuple[dict[str, tuple[float, float] | None], list[list[Any]]]:
    """``(slopes, segments)``: each node's slope range (its AutoLip constant's, else the
    node's own) and :func:`find_segments` on them, as SeqLip and LipSDP both read them."""
    slopes: dict[str, tuple[float, float] | None] = {
        name: (c.slope_range if c.slope_range is not None else graph[name].slope_range)
        for name, c in consts.items()
    }
    return slopes, find_segments(graph, slopes)


def segment_slopes(
    seg: list[Any], slopes: dict[str, tuple[float, float] | None]
) -> list[tuple[float, float]]:
    """The slope ranges ``[(a_i, b_i)]`` of a segment's activations (``seg[1::2]``), as
    floats. :func:`find_segments` keeps only activations with a range; another one is an
    :class:`~lipbound.errors.InvalidArgumentError` naming it."""
    out: list[tuple[float, float]] = []
    for a_node in seg[1::2]:
        sr = slopes.get(a_node.name)
        if sr is None:
            raise InvalidArgumentError(f"no slope range for {a_node.qualname}")
        out.append((float(sr[0]), float(sr[1])))
    return out
