r"""Per-node local constants on the ball: the rows of a :class:`~lipbound.results.LocalResult`.

For each node ``k`` of the graph and each sample, a certified bound ``c_k`` on the Lipschitz
constant of the node's map over the box of its inputs (the boxes of
:func:`lipbound.local.propagate.forward_boxes`, which contain every value the node sees while
the model's input stays in the ball), for each of its tensor inputs:

* **linear** nodes: the global certified operator norm (``lin``, from the global rules: a
  linear map has the same constant everywhere);
* **activations** (element-wise, with per-neuron secant slope ranges ``[s_lo, s_hi]`` on the
  box): ``max_i max(|s_lo,i|, |s_hi,i|)``. The rule's adjoint applied to the all-ones row is
  the box ``[s_lo, s_hi]`` itself (``1^T diag(s) = s^T``), so that is what is read;
  ``|f(u) - f(v)| = |s_i| |u_i - v_i|`` entry by entry, with ``s_i`` in the range, gives
  ``||f(u) - f(v)|| <= max_i |s_i| ||u - v||`` in every ``l_p`` norm;
* other non-linear nodes (products, softmax, LayerNorm...): the rule's adjoint of the identity
  rows is an interval matrix ``[M_c - M_r, M_c + M_r]`` containing every secant matrix ``M``
  of the node on the box (``f(u) - f(v) = M (u - v)``), so ``|M| <= A := |M_c| + M_r``
  entry-wise. In l-inf, ``||M||_inf <= max_i sum_j A_ij``; in l2, the Schur test
  ``||M||_2 <= || |M| ||_2 <= sqrt(||A||_1 ||A||_inf)`` (a cheap bound: no factorisation per
  sample and node). Each sum of ``q`` non-negative float64 terms is at most ``q u`` relative
  too small: inflated by ``2 q u``, then rounded up. Computed while the ``(samples x outputs
  x inputs)`` matrix fits ``max_memory``, skipped otherwise (no row).

These are the local counterparts of AutoLip's per-node factors: the composition of the
``c_k`` along the graph is a valid (and looser) local bound; :func:`lipbound.local_bound`'s
own bound composes the secant matrices themselves.
"""

from __future__ import annotations

import math

import torch

from ..graph import Node, OpGraph
from ..spectral.certify import U, round_up
from .interval import Box
from .rules import LocalOp

__all__ = ["node_factors"]

_F64 = torch.float64


def node_factors(
    graph: OpGraph, ops: dict[str, LocalOp], boxes: dict[str, Box], lin: dict[str, float],
    n: str, max_memory: int,
) -> dict[str, tuple[torch.Tensor, str]]:
    """``{node: ((B,) per-sample bound, how)}`` over the nodes with a certified local constant
    (module docstring; for a node of several tensor inputs, the largest of its per-input
    constants). ``B`` is the number of samples of ``boxes``."""
    out: dict[str, tuple[torch.Tensor, str]] = {}
    B = next(iter(boxes.values())).c.shape[0] if boxes else 0
    for node in graph:
        if node.kind in ("input", "output"):
            continue
        if node.kind == "linear":
            if node.name in lin:
                out[node.name] = (torch.full((B,), lin[node.name], dtype=_F64),
                                  "certified operator norm (global rule)")
            continue
        ins = [boxes[p] for p in node.inputs]
        if node.kind == "activation":
            v = _slope_max(node, ops[node.name], ins, boxes[node.name])
            if v is not None:
                out[node.name] = (v, "max |secant slope| over the ball")
            continue
        v = _secant_norm(node, ops[node.name], ins, boxes[node.name], n, max_memory)
        if v is not None:
            out[node.name] = (v, "interval secant matrix norm over the ball")
    return out


def _slope_max(node: Node, op: LocalOp, ins: list[Box], own: Box) -> torch.Tensor | None:
    """``max_i |s_i|`` per sample from the adjoint of the all-ones row (module docstring)."""
    ones = torch.ones((own.c.shape[0], 1, *own.c.shape[1:]), dtype=_F64, device=own.c.device)
    g = op.backward(node, ins, Box(ones, torch.zeros_like(ones)))[0]
    if g is None:
        return None
    s = (g.c.abs() + g.r).reshape(g.c.shape[0], -1)
    return torch.tensor([round_up(float(v)) for v in s.amax(dim=1)], dtype=_F64)


def _secant_norm(node: Node, op: LocalOp, ins: list[Box], own: Box, n: str, max_memory: int
                 ) -> torch.Tensor | None:
    """Per-sample certified ``sup ||M_j||`` of the node's interval secant matrices, the largest
    over its inputs ``j``; ``None`` when the identity rows do not fit ``max_memory``."""
    B = own.c.shape[0]
    m = math.prod(own.c.shape[1:])
    widest = max((math.prod(b.c.shape[1:]) for b in ins), default=0)
    if B * m * max(widest, m) * 8 * 4 > max_memory:
        return None
    eye = torch.eye(m, dtype=_F64, device=own.c.device).reshape(m, *own.c.shape[1:])
    rows = eye.unsqueeze(0).expand(B, *eye.shape).contiguous()
    grads = op.backward(node, ins, Box(rows, torch.zeros_like(rows)))
    best: torch.Tensor | None = None
    for g in grads:
        if g is None:
            continue
        A = (g.c.abs() + g.r).reshape(B, m, -1)  # rows: the node's outputs
        rows = A.sum(dim=2).amax(dim=1) * (1 + 2 * A.shape[2] * U)
        if n == "2":
            cols = A.sum(dim=1).amax(dim=1) * (1 + 2 * m * U)
            rows = (rows * cols).sqrt()
        v = torch.tensor([round_up(float(r)) for r in rows], dtype=_F64)
        best = v if best is None else torch.maximum(best, v)
    return best
