r"""Interval bounds over a ball and interval secant Jacobians on a captured graph.

Two passes over the :class:`~lipbound.graph.OpGraph` of :func:`lipbound.graph.capture` +
:func:`lipbound.graph.simplify`:

:func:`forward_boxes`
    interval bound propagation (IBP) of the ball ``{z : ||z - x|| <= radius}``: the input box
    is ``x +- radius`` (the l2 ball lies inside it), linear nodes use the centre/radius form
    ``W c + b +- |W| r`` (:mod:`lipbound.local.linear`), other nodes their local rule's image
    (:mod:`lipbound.local.rules`). For the l2 ball, the nodes that are affine functions of the
    input alone (the first layers, up to the first non-linear node) also get the exact
    per-coordinate range ``|(M (z - x))_i| <= radius ||M_i||_2`` (``M_i`` the row of the map
    from the input), with row norms propagated part by part: ``sqrt((W o W)(rho^2))`` while
    the rows of the map so far have disjoint supports (the input and its permutations /
    selections), ``|W| rho`` afterwards (triangle inequality), and the entry-wise minimum of
    both enclosures is kept. With a ``crown`` budget, the values read by non-linear rules
    are then tightened by back-substituted linear relaxations (:mod:`lipbound.local.crown`,
    never looser than IBP); otherwise the bounds loosen quickly with depth and radius.

:func:`backward_rows`
    for rows ``w`` (e.g. the identity of the output, or class differences ``e_y - e_j``),
    boxes enclosing ``w^T M`` for every secant matrix ``M`` with ``f(u) - f(v) = M (u - v)``,
    ``u, v`` in the ball (the proof is in :mod:`lipbound.local.rules`): the adjoint of the
    output is the point box ``w``, each node maps its adjoint box to its inputs' (a linear
    node exactly, ``W^T a +- |W|^T s``; a non-linear node by its local rule), and a node
    used several times sums its users' boxes. For a ReLU network at a point where every
    neuron is stable over the ball, all boxes have radius zero (up to rounding) and the centre
    is ``w^T J(x)``, the exact local Jacobian.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import LipboundError, UnsupportedModelError, UnsupportedNode
from ..graph import OpGraph
from ..graph.types import Node
from ..rules import RuleContext
from ..rules.linear import l1_linf_available
from .crown import CrownBudget, CrownState, tighten
from .interval import MAX_ENTRIES, TINY, Box, from_bounds, iadd, pad, rel64
from .linear import linear_backward, linear_parts
from .rules import LocalOp, ball_factor, local_op, slope_box

__all__ = ["backward_rows", "backward_rows_ball", "check_graph", "forward_boxes", "largest_value",
           "linear_norms", "tangent_entries"]

_F64 = torch.float64


def check_graph(graph: OpGraph) -> dict[str, LocalOp]:
    """The local rule of every non-linear node, or ONE error listing the nodes without one."""
    bad: list[UnsupportedNode] = []
    ops: dict[str, LocalOp] = {}
    for node in graph:
        if math.prod(node.out_shape) >= MAX_ENTRIES:
            bad.append(UnsupportedNode(node.qualname, node.op, (
                f"its value has {math.prod(node.out_shape)} entries per sample, beyond the "
                f"{MAX_ENTRIES} up to which the interval rounding pad REL64 is proven")))
            continue
        if node.kind in ("input", "output"):
            continue
        if node.kind == "linear":
            try:
                linear_parts(node)
            except UnsupportedModelError as exc:
                bad.extend(exc.nodes)
            continue
        op = local_op(node)
        if isinstance(op, str):
            bad.append(UnsupportedNode(node.qualname, node.op, op))
        else:
            ops[node.name] = op
    if bad:
        raise UnsupportedModelError(bad, what=f"{len(bad)} operation(s) have no local rule")
    return ops


def largest_value(graph: OpGraph) -> int:
    """Entries of the largest per-sample tensor of the graph (for memory sizing)."""
    return max(math.prod(n.out_shape) for n in graph)


def _linear_forward(node: Node, box: Box, state: tuple[torch.Tensor, bool] | None,
                    radius: float) -> tuple[Box, tuple[torch.Tensor, bool] | None]:
    for part in linear_parts(node):
        with torch.no_grad():
            c = part.fn(box.c)
            rad = part.abs_fwd(box.r)
            err = rel64() * (part.abs_fwd(box.mag) + part.bias(c)) + TINY
            if state is not None:
                rn, disjoint = state
                if part.one_per_row:
                    rn = part.abs_fwd(rn)
                    disjoint = disjoint and not part.copies
                elif disjoint and part.sq_fwd is not None:
                    rn = torch.sqrt(part.sq_fwd(rn * rn).clamp_min(0.0))
                    disjoint = False
                else:
                    rn = part.abs_fwd(rn)
                    disjoint = False
                state = (rn, disjoint)
                rad = torch.minimum(rad, radius * rn * (1 + rel64()))
            box = Box(c, rad * (1 + rel64()) + err)
    return box, state


def _row_dual_norms(J: Box, norm: str) -> torch.Tensor:
    """``sup ||m_i||_*`` of the interval rows ``(B, R, *in)``: l2 for the l2 ball, l1 for the
    l-inf ball (Hoelder), rounded up."""
    a = (J.c.abs() + J.r).reshape(J.c.shape[0], J.c.shape[1], -1)
    v = a.norm(dim=-1) if norm == "2" else a.sum(dim=-1)
    return v * (1 + rel64()) + TINY


def _linear_tangent(node: Node, t: Box) -> Box:
    B, R = t.c.shape[:2]
    box = Box(t.c.reshape(B * R, *t.c.shape[2:]), t.r.reshape(B * R, *t.c.shape[2:]))
    for part in linear_parts(node):
        box = part.tangent(box)
    return Box(box.c.reshape(B, R, *box.c.shape[1:]), box.r.reshape(B, R, *box.c.shape[1:]))


def _refine(ibp: Box, point: Box, tan: Box, radius: float, norm: str) -> Box:
    """``ibp`` intersected with the mean-value box ``v(x) +- radius sup ||m_i||_*``: ``m_i``
    the secant rows of the node w.r.t. the input (columns of ``tan``, ``(B, n_in, *shape)``),
    ``v(x)`` enclosed by ``point``; ``||.||_*`` the dual norm of the ball's."""
    a = tan.c.abs() + tan.r
    dual = a.norm(dim=1) if norm == "2" else a.sum(dim=1)
    rad = radius * dual * (1 + rel64()) + point.r + TINY
    lo = torch.maximum(ibp.lo, point.c - rad)
    hi = torch.minimum(ibp.hi, point.c + rad)
    return from_bounds(torch.minimum(lo, hi), torch.maximum(lo, hi))


def tangent_entries(graph: OpGraph) -> int:
    """Entries per sample of the largest tangent box (``numel(node) x numel(input)``)."""
    return largest_value(graph) * math.prod(graph.input_shape)


def forward_boxes(graph: OpGraph, x: torch.Tensor, radius: float, norm: str,
                  ops: dict[str, LocalOp] | None = None, *, refine: int = 0,
                  tangents: dict[str, Box | None] | None = None,
                  crown: CrownBudget | None = None) -> dict[str, Box]:
    """Boxes of every node's value over the ball of ``radius`` around each row of ``x``
    (``x``: ``(B, *input_shape)``); see the module docstring.

    ``refine >= tangent_entries(graph)`` (> 0): the secant matrices are also propagated
    FORWARD, as interval columns ``M t`` (tangent boxes of shape ``(B, n_in, *shape)``: the
    same local rules applied to the input's identity), and every node's box is intersected
    with its mean-value box ``v(x) +- radius sup ||m_i||_*`` (:func:`_refine`; ``v(x)`` from a
    point pass), which is O(radius) where IBP's wrapping grows geometrically with depth (a
    2-block ViT at radius 1e-6: output box radius 9.7 by IBP). Both boxes contain every value
    over the ball, hence their intersection. ``tangents``, if given, receives the tangent
    boxes (``None`` for nodes that do not depend on the input).

    ``crown``: the values read by non-linear rules are also tightened by back-substituted
    linear relaxations (:mod:`lipbound.local.crown`) within the budget; its ``notes`` receive
    the nodes left at their IBP boxes."""
    ops = check_graph(graph) if ops is None else ops
    point: dict[str, Box] | None = None
    tan: dict[str, Box | None] = {} if tangents is None else tangents
    use_tan = refine > 0 and tangent_entries(graph) <= refine
    cst = CrownState.make(graph, ops, float(radius), norm, crown)
    if use_tan and radius > 0:
        point = forward_boxes(graph, x, 0.0, norm, ops)
    n_in = math.prod(graph.input_shape)
    c0 = x.detach().to(_F64)
    affine = {graph.input.name}
    boxes: dict[str, Box] = {}
    states: dict[str, tuple[torch.Tensor, bool] | None] = {}
    for node in graph:
        if node.kind == "input":
            boxes[node.name] = Box(c0, torch.full_like(c0, float(radius)))
            if use_tan:
                eye = torch.eye(n_in, dtype=_F64, device=c0.device).reshape(n_in, *c0.shape[1:])
                eye = eye.unsqueeze(0).expand(c0.shape[0], *eye.shape)
                tan[node.name] = Box(eye, torch.zeros_like(eye))
            states[node.name] = (
                (torch.ones((1, *c0.shape[1:]), dtype=_F64, device=c0.device), True)
                if norm == "2" else None)
            continue
        if node.kind == "output":
            boxes[node.name] = boxes[node.inputs[0]]
            if use_tan:
                tan[node.name] = tan[node.inputs[0]]
            continue
        ins = [boxes[p] for p in node.inputs]
        if node.kind == "linear":
            boxes[node.name], states[node.name] = _linear_forward(
                node, ins[0], states.get(node.inputs[0]), float(radius))
        else:
            states[node.name] = None
            with torch.no_grad():
                boxes[node.name] = ops[node.name].forward(node, ins)
        if use_tan:
            tin = [tan[p] for p in node.inputs]
            if node.kind == "linear":
                tan[node.name] = None if tin[0] is None else _linear_tangent(node, tin[0])
            else:
                tan[node.name] = ops[node.name].tangent(node, ins, tin)
        t_node = tan.get(node.name)
        if node.kind == "linear" and node.inputs[0] in affine:
            affine.add(node.name)  # an affine map of the input: its box is exact already
        elif point is not None and t_node is not None:
            boxes[node.name] = _refine(boxes[node.name], point[node.name], t_node,
                                       float(radius), norm)
        boxes[node.name] = tighten(cst, node, boxes, affine)
        if node.kind == "linear":
            continue
        if not bool(torch.isfinite(boxes[node.name].r).all()):
            raise UnsupportedModelError(
                [UnsupportedNode(node.qualname, node.op, "its interval bound over the ball is "
                                 "not finite (overflow); use a smaller radius")],
                what="no local Lipschitz bound over this ball")
    return boxes


def backward_rows(graph: OpGraph, boxes: dict[str, Box], rows: torch.Tensor,
                  ops: dict[str, LocalOp] | None = None,
                  check: Callable[[], None] | None = None, *, start: str | None = None,
                  record: dict[str, Box] | None = None) -> Box:
    """Box of ``w^T M`` (shape ``(B, R, *input_shape)``) for rows ``w`` of shape
    ``(B, R, *output_shape)`` over the secant matrices ``M`` of the ball (of the model's
    output, or of node ``start``'s value). ``record``, if given, receives every node's
    complete adjoint box (rows ``w^T M_{out <- node}`` of the secant from that node's value to
    the output, the sum over all its users), keyed by node name."""
    ops = check_graph(graph) if ops is None else ops
    nodes = list(graph)
    out = graph.output
    r0 = rows.detach().to(_F64)
    first = out.inputs[0] if start is None else start
    adj: dict[str, Box] = {first: Box(r0, torch.zeros_like(r0))}
    inp = graph.input
    B, R = r0.shape[:2]
    for node in reversed(nodes):
        if node.kind in ("output", "input") or node.name not in adj:
            continue
        if check is not None:
            check()
        a = adj.pop(node.name)
        if record is not None:
            record[node.name] = a
        if node.kind == "linear":
            grads: list[Box | None] = [linear_backward(node, a)]
        else:
            grads = ops[node.name].backward(node, [boxes[p] for p in node.inputs], a)
        for p, g in zip(node.inputs, grads):
            if g is None:
                continue
            adj[p] = g if p not in adj else iadd(adj[p], g)
    if inp.name in adj:
        return adj[inp.name]
    z = torch.zeros((B, R, *graph.input_shape), dtype=_F64, device=r0.device)
    return Box(z, torch.zeros_like(z))


def linear_norms(graph: OpGraph, norm: str) -> dict[str, float]:
    """Certified operator norms of the linear nodes (``||W||_2``, or ``||W||_inf`` for the
    l-inf ball: the factor of ``||delta W||_1`` for a row ``delta``), by their global rules;
    nodes without a certified constant are left out."""
    ctx = RuleContext(norm=norm)
    out: dict[str, float] = {}
    for node in graph:
        if node.kind != "linear" or node.rule is None:
            continue
        if norm != "2" and l1_linf_available(node) is not None:
            continue
        try:
            c = node.rule.constant(node, ctx)
        except LipboundError:
            continue
        if c.certified and c.constants:
            out[node.name] = float(c.constants[0])
    return out


def _dual(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Dual norm of each row ``(B, R, ...)``: l2 for the l2 ball, l1 for the l-inf ball."""
    a = t.reshape(t.shape[0], t.shape[1], -1)
    return a.norm(dim=-1) if norm == "2" else a.abs().sum(dim=-1)


def _to_box(a: Box, rho: torch.Tensor) -> Box:
    """The box containing ``a + d`` for every row ``d`` with ``||d||_* <= rho``: each entry of
    such a ``d`` is at most ``rho`` in absolute value (l2 and l1 alike)."""
    shape = rho.shape + (1,) * (a.c.dim() - 2)
    return Box(a.c, a.r + rho.reshape(shape))


def backward_rows_ball(graph: OpGraph, boxes: dict[str, Box], rows: torch.Tensor,
                       ops: dict[str, LocalOp], norm: str, lin: dict[str, float]
                       ) -> tuple[Box, torch.Tensor]:
    r"""Like :func:`backward_rows`, but the rows are ``c + b + d`` with ``|b| <= r`` entry-wise
    (the box) and ``||d||_* <= rho`` (a ball of the dual norm, one radius per row).

    Interval wrapping: an entry-wise box pushed through a linear node grows like ``|W|^T``,
    whose norm can exceed ``||W||`` by ``sqrt(n)``; the ball grows by the operator norm
    only: ``||d W||_* <= ||W|| ||d||_*`` (``lin``, the nodes' certified global constants:
    ``||W||_2``, or ``||W||_inf = ||W^T||_1`` for the l1 rows of the l-inf ball). At an
    activation with slopes ``q`` in ``[q_c +- q_r]``: ``(c + b + d) diag(q) = c q_c +
    b diag(q) + d diag(q) + c diag(q - q_c)``: the centre is ``c q_c``, the box
    ``|b| (|q_c| + q_r)``, and the ball ``rho max|q| + || |c| q_r ||_*`` (Hoelder per row). A
    node without a ball rule (other ops, or a linear node without a certified norm) first turns
    the ball into its box (every entry of ``d`` is at most ``rho``), then applies its interval
    rule. Sums over a node's users add centres, boxes and radii (triangle inequality). The
    result contains every ``w^T M`` as :func:`backward_rows` does."""
    nodes = list(graph)
    r0 = rows.detach().to(_F64)
    B, R = r0.shape[:2]
    adj: dict[str, tuple[Box, torch.Tensor]] = {
        graph.output.inputs[0]: (Box(r0, torch.zeros_like(r0)),
                                 torch.zeros((B, R), dtype=_F64, device=r0.device))}
    up = 1 + rel64()
    for node in reversed(nodes):
        if node.kind in ("output", "input") or node.name not in adj:
            continue
        a, rho = adj.pop(node.name)
        grads: list[tuple[Box, torch.Tensor] | None]
        if node.kind == "linear" and node.name in lin:
            grads = [(linear_backward(node, a), rho * lin[node.name] * up)]
        elif node.kind == "activation":
            qlo, qhi = slope_box(node, boxes[node.inputs[0]])
            q = from_bounds(qlo, qhi).unsqueeze(1)
            qmax = torch.maximum(qlo.abs(), qhi.abs()).reshape(B, -1).amax(dim=1)
            c = a.c * q.c
            box = pad(c, a.r * (q.c.abs() + q.r), a.mag * (q.c.abs() + q.r))
            new = _dual(a.c.abs() * q.r, norm) * up + TINY
            grads = [(box, (rho * qmax[:, None] + new) * up)]
        elif (k := ball_factor(node, [boxes[p] for p in node.inputs], norm)) is not None:
            # the box part through the interval rule, the ball part by the operator norm
            gl0 = ops[node.name].backward(node, [boxes[p] for p in node.inputs], a)
            grads = [None if g is None else (g, rho * k[:, None] * up) for g in gl0]
        else:
            full = _to_box(a, rho)
            if node.kind == "linear":
                gl: list[Box | None] = [linear_backward(node, full)]
            else:
                gl = ops[node.name].backward(node, [boxes[p] for p in node.inputs], full)
            grads = [None if g is None else (g, torch.zeros_like(rho)) for g in gl]
        for p, g in zip(node.inputs, grads):
            if g is None:
                continue
            if p in adj:
                b0, r0_ = adj[p]
                adj[p] = (iadd(b0, g[0]), (r0_ + g[1]) * up)
            else:
                adj[p] = g
    inp = graph.input
    if inp.name in adj:
        return adj[inp.name]
    z = torch.zeros((B, R, *graph.input_shape), dtype=_F64, device=r0.device)
    return Box(z, torch.zeros_like(z)), torch.zeros((B, R), dtype=_F64, device=r0.device)
