r"""Telescoped (second-order) local bounds: the point Jacobian plus one deviation per node.

Why. The interval secant Jacobians of :mod:`lipbound.local.propagate` compose every node's
uncertainty entry-wise: a width ``w`` goes through a later linear node as ``|W| w`` and
through a later non-linear node as ``|D| w``, so the width of the final interval Jacobian is
``r`` times a product of *absolute-value* matrices, whose norms exceed the norms of the signed
products by a factor that grows geometrically with depth. On the 1-block TinyViT of the
benchmark the output tangent's width is 1e4 times the realised variation of the Jacobian over
the ball, and ``upper / ||J(x)|| - 1`` is ``2.5e4 r``: 1.03 at ``r = 1e-6``, 3.5 at ``1e-4``.

Identity. Number the nodes of the graph in topological order ``1 .. N``. For a pair ``u, v``
of the ball, each node ``j`` has a secant matrix ``M_j`` (the local rules' proofs,
:mod:`lipbound.local.rules`; for a node of several inputs ``M_j = [M_{j,1} .. M_{j,k}]``
acting on the stacked input differences; exact ``W`` for linear and add/sub/cat nodes), and
the model's secant is ``M = Phi(M_1, .., M_N)``, ``Phi`` the sum over the graph's paths of
the products of the nodes' matrices along each path. ``Phi`` is affine in each slot (a path
meets a node at most once). Let ``D_j`` be node ``j``'s Jacobian at the centre ``x`` and
``Delta_j = M_j - D_j``. Replacing the slots one at a time (telescoping),

.. math::
   M - J(x) = \sum_j \Phi(D_1..D_{j-1}, \Delta_j, M_{j+1}..M_N)
            = \sum_j A_j \Delta_j U_j            \quad\text{(order "point upstream")}

with ``A_j`` the secant from node ``j``'s value to the output (nodes after ``j``: the
backward pass's adjoint box at ``j``, which contains it, :func:`backward_rows` with
``record``) and ``U_j`` the *point* Jacobian from the input to ``j``'s inputs (the forward
tangent boxes at radius 0, which contain it). Replacing the slots from the input side instead,

.. math::
   M - J(x) = \sum_j P_j \Delta_j V_j              \quad\text{(order "point downstream")}

with ``P_j`` the *point* Jacobian from node ``j`` to the output (the backward adjoints of the
radius-0 pass) and ``V_j`` the secant from the input to ``j``'s inputs (the forward tangent
boxes of the ball). Both are exact identities for every pair ``u, v``.

Boxes of ``A_j Delta_j`` and ``Delta_j V_j``. For every row ``a`` in the box ``A_j``,
node ``j``'s interval rule gives a box ``G`` containing ``a^T M_j`` (its boxes over the ball)
and a box ``H`` containing ``a^T D_j`` (the same rule on the radius-0 boxes, which contain the
centre's values: its secant over that box is ``D_j``), so ``a^T Delta_j = a^T M_j - a^T D_j``
lies in ``G - H`` (centre difference, radii added). Likewise with the tangent rule for the
columns ``Delta_j t``, ``t`` in ``V_j``. Linear and add/sub/cat nodes have ``Delta_j = 0``
(their rule does not depend on the boxes) and are skipped.

Bound. With ``Y_j`` the interval product of the ``G - H`` box and the point matrix (or the
point rows and the ``G - H`` box), ``||M|| <= ||J(x)|| + sum_j sup ||Y_j||`` (triangle
inequality), each term by :func:`lipbound.local.bounds.interval_norms` (``min(|| |Y_c| + Y_r
||, ||Y_c|| + ||Y_r||)`` in l2, the largest row sum of ``|Y_c| + Y_r`` in l-inf). Each
deviation ``Delta_j`` is ``O(r)`` and multiplies a point matrix on one side, so the bound is
``||J(x)|| + O(r)`` with a constant made of signed (not absolute) products on the point side:
the wrapping is confined to one factor. Each order's sum is a bound; the smaller is kept.

Rounding: every box is padded (:mod:`lipbound.local.interval`); each norm is rounded up by
``ROUND_REL`` in :func:`~lipbound.local.bounds.interval_norms` and the sum once more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graph import OpGraph
from ..graph.types import Node
from ..rules import ROUND_REL
from ..spectral.certify import round_up
from .bounds import intersect_rows, interval_norms
from .interval import Box, iadd, imatmul, pad
from .propagate import backward_rows, forward_boxes
from .rules import MULTI, LocalOp

__all__ = ["Pass", "point_pass", "telescoped_norms", "telescoped_rows"]


def _sub(a: Box, b: Box) -> Box:
    """A box containing ``s - t`` for every ``s`` in ``a`` and ``t`` in ``b``."""
    return pad(a.c - b.c, a.r + b.r, a.mag + b.mag)


def _rows_times_cols(rows: Box, cols: Box) -> Box:
    """``rows`` ``(B, R, *s)`` times the columns ``cols`` ``(B, n, *s)``: ``(B, R, n)``."""
    B, R = rows.c.shape[:2]
    n = cols.c.shape[1]
    a = Box(rows.c.reshape(B, R, -1), rows.r.reshape(B, R, -1))
    b = Box(cols.c.reshape(B, n, -1).transpose(1, 2), cols.r.reshape(B, n, -1).transpose(1, 2))
    return imatmul(a, b)


def _as_rows(cols: Box) -> Box:
    """Columns ``(B, n, *s)`` as the rows of the ``(B, prod(s), n)`` matrix they form."""
    B, n = cols.c.shape[:2]
    return Box(cols.c.reshape(B, n, -1).transpose(1, 2), cols.r.reshape(B, n, -1).transpose(1, 2))


def _flat(rows: Box) -> Box:
    B, R = rows.c.shape[:2]
    return Box(rows.c.reshape(B, R, -1), rows.r.reshape(B, R, -1))


def _radius_norm(b: Box, norm: str) -> torch.Tensor:
    """Certified ``||E||`` over every matrix ``E`` with ``|E| <= b.r`` entry-wise (rows
    ``(B, R, n)``): ``||E|| <= || |E| || <= ||b.r||`` (l2), row sums (l-inf)."""
    return interval_norms(Box(torch.zeros_like(b.r), b.r), norm)


def _point_part(b: Box) -> Box:
    return Box(b.c, torch.zeros_like(b.r))


def _up_term(node: Node, op: LocalOp, norm: str, ins: tuple[list[Box], list[Box]], a: Box,
             us: list[Box | None]) -> torch.Tensor:
    """``sup ||A Delta U||`` <= ``sup ||A_c Delta U|| + ||A_r|| sup ||Delta U||`` (``ins``: the
    node's input boxes over the ball and at radius 0)."""
    ins_r, ins_0 = ins
    ac = _point_part(a)
    y: Box | None = None
    for g, h, u in zip(op.backward(node, ins_r, ac), op.backward(node, ins_0, ac), us):
        if g is None or h is None or u is None:  # u None: a constant input, no difference
            continue
        y = _acc(y, _rows_times_cols(_sub(g, h), u))
    out = torch.zeros(a.c.shape[0], dtype=a.c.dtype, device=a.c.device)
    if y is None:
        return out
    out = out + interval_norms(y, norm)
    tg, th = op.tangent(node, ins_r, us), op.tangent(node, ins_0, us)
    if tg is None or th is None:
        return out + torch.inf
    return out + _radius_norm(_flat(a), norm) * interval_norms(_as_rows(_sub(tg, th)), norm)


def _down_term(node: Node, op: LocalOp, norm: str, ins: tuple[list[Box], list[Box]], p: Box,
               vs: list[Box | None]) -> torch.Tensor:
    """``sup ||P Delta V||`` <= ``sup ||P Delta V_c|| + sum_i sup ||P Delta_i|| ||V_r,i||``."""
    ins_r, ins_0 = ins
    vc = [None if v is None else _point_part(v) for v in vs]
    tg, th = op.tangent(node, ins_r, vc), op.tangent(node, ins_0, vc)
    out = torch.zeros(p.c.shape[0], dtype=p.c.dtype, device=p.c.device)
    if tg is None or th is None:
        return out
    out = out + interval_norms(_rows_times_cols(p, _sub(tg, th)), norm)
    for g, h, v in zip(op.backward(node, ins_r, p), op.backward(node, ins_0, p), vs):
        if v is None:
            continue
        if g is None or h is None:
            return out + torch.inf
        out = out + interval_norms(_flat(_sub(g, h)), norm) * _radius_norm(_as_rows(v), norm)
    return out


def _acc(s: Box | None, y: Box) -> Box:
    return y if s is None else iadd(s, y)


@dataclass(frozen=True)
class Pass:
    """One pass over the graph: forward boxes, forward tangent boxes, and the backward
    adjoints recorded by :func:`~lipbound.local.propagate.backward_rows` (``record``)."""

    boxes: dict[str, Box]
    tans: dict[str, Box | None]
    adj: dict[str, Box]


def telescoped_norms(graph: OpGraph, ops: dict[str, LocalOp], norm: str, ball: Pass,
                     point: Pass, point_rows: Box) -> torch.Tensor:
    """Per sample, the smaller of the two telescoped bounds of the module docstring.

    ``ball``: the passes over the ball; ``point``: the same at radius 0; ``point_rows``: a box
    of the rows ``w^T J(x)`` (``(B, R, *input_shape)``)."""
    base = interval_norms(point_rows, norm)
    up = torch.zeros_like(base)  # order "point upstream": sum_j A_j Delta_j U_j
    down = torch.zeros_like(base)  # order "point downstream": sum_j P_j Delta_j V_j
    for node in graph:
        if node.kind in ("input", "output", "linear") or ops[node.name] is MULTI:
            continue
        op = ops[node.name]
        ins = ([ball.boxes[p] for p in node.inputs], [point.boxes[p] for p in node.inputs])
        if node.name in ball.adj:
            up = up + _up_term(node, op, norm, ins, ball.adj[node.name],
                               [point.tans.get(p) for p in node.inputs])
        if node.name in point.adj:
            down = down + _down_term(node, op, norm, ins, point.adj[node.name],
                                     [ball.tans.get(p) for p in node.inputs])
    best = base + torch.minimum(up, down)
    return torch.tensor([round_up(float(v), ROUND_REL) for v in best], dtype=base.dtype)


def point_pass(graph: OpGraph, ops: dict[str, LocalOp], x: torch.Tensor, norm: str,
               rows: torch.Tensor, refine: int) -> tuple[Pass, Box]:
    """The radius-0 pass (boxes, tangents, recorded adjoints) and the box of the rows
    ``w^T J(x)`` that :func:`telescoped_norms` needs beside the ball's pass."""
    tans0: dict[str, Box | None] = {}
    boxes0 = forward_boxes(graph, x, 0.0, norm, ops, refine=refine, tangents=tans0)
    adj0: dict[str, Box] = {}
    rows0 = intersect_rows(backward_rows(graph, boxes0, rows, ops, record=adj0),
                           tans0.get(graph.output.name), rows)
    return Pass(boxes0, tans0, adj0), rows0


def _row(p: Pass, j: int) -> Pass:
    return Pass(p.boxes, p.tans, {k: Box(a.c[:, j:j + 1], a.r[:, j:j + 1])
                                  for k, a in p.adj.items()})


def telescoped_rows(graph: OpGraph, ops: dict[str, LocalOp], norm: str, ball: Pass,
                    point: Pass, point_rows: Box) -> torch.Tensor:
    """``(B, R)``: the telescoped bound of each row ``w_j`` alone, i.e. of ``sup
    ||w_j^T M||_*`` (a one-row matrix's norm is its row's dual norm: l2, or the l1 row sum
    in l-inf), from the passes of all rows (the adjoints are per row)."""
    R = point_rows.c.shape[1]
    cols = [telescoped_norms(graph, ops, norm, _row(ball, j), _row(point, j),
                             Box(point_rows.c[:, j:j + 1], point_rows.r[:, j:j + 1]))
            for j in range(R)]
    return torch.stack(cols, dim=1)
