r"""CROWN-style intermediate bounds: linear relaxations back-substituted to the input ball.

For a target node ``t`` (a value that feeds a non-linear local rule) and rows ``w`` (here
``+e_i`` and ``-e_i`` for the entries ``i`` to bound), :func:`crown_box` proves
``w^T v_t >= low(w)`` over the ball by carrying an inequality backwards through the graph
(Zhang et al., 2018, "CROWN"; the DAG form of auto_LiRPA):

.. math:: w^T v_t \ \ge\ \sum_k \lambda_k^T v_k + C - E

over the current frontier of nodes ``k`` (coefficients ``lambda_k``, a constant ``C`` and a
rounding allowance ``E >= 0``). It starts with ``lambda_t = w``, ``C = E = 0`` and, node by
node in reverse topological order, replaces ``lambda_n^T v_n`` by an expression in ``n``'s
inputs (a node used several times has received the sum of its users' coefficients):

* **linear** ``v_n = W v_p + b`` (merged chains part by part) and **add/sub/cat**
  ``v_n = sum_i W_i v_{p_i} + b``: exactly, ``lambda_n^T v_n = (W^T lambda_n)^T v_p +
  lambda_n^T b``. ``W^T lambda_n`` and ``b`` are computed by the nodes' interval rules on
  point boxes (:mod:`lipbound.local.linear`, ``MULTI`` of :mod:`lipbound.local.rules`):
  centre ``g`` and radius ``s`` with the exact vector within ``s`` of ``g`` entry-wise, so
  ``lambda_n^T v_n >= g^T v_p - s^T |v_p| + ...`` and ``s^T mag(V_p)`` joins ``E``
  (``V_p`` the node's box, ``mag = |c| + r``).
* **element-wise activations** ``v_n = s(v_p)`` with ``v_p`` in ``[l, u]`` (its box):
  linear bounds ``a_l z + b_l <= s(z) <= a_u z + b_u`` on ``[l, u]`` (:func:`relaxation`),
  and per entry ``lambda s(z) >= lambda a_l z + lambda b_l`` if ``lambda >= 0``, ``lambda a_u
  z + lambda b_u`` otherwise.
* **any other node**, and the **input**, end the substitution: ``lambda^T v >= lambda^T c -
  |lambda|^T r`` over the node's box ``(c, r)`` (treated as a fresh input box), and
  ``lambda^T x - radius ||lambda||_*`` over the ball (Hoelder; ``||.||_*`` the dual norm).

Relaxations (:func:`relaxation`). ReLU and LeakyReLU with slope ``alpha`` in ``[0, 1]``
(convex, piecewise linear through 0): a stable entry is exact (slope 1 or ``alpha``, offset
0); an unstable one (``l < 0 < u``) has the upper chord ``a_u = (u - alpha l) / (u - l)``
with offset ``b_u = max(s(l) - a_u l, s(u) - a_u u)`` (a convex function lies below a line
that is above it at both ends of the interval; the max makes the float slope's line valid),
and the lower line ``a_l z`` with ``a_l = 1`` if ``u > -l`` else ``alpha`` (any ``a_l`` in
``[alpha, 1]`` is below ``s`` everywhere: CROWN's adaptive lower slope). Other activations
(sigmoid, tanh, GELU, ...): the chord slope ``a = (s(u) - s(l)) / (u - l)`` for both lines,
with offsets from ``g(z) = s(z) - a z`` on ``K`` sub-intervals ``[t_j, t_{j+1}]`` of
``[l, u]``: ``g' = s' - a`` lies in ``[q_lo - a, q_hi - a]`` with the proven per-interval
slope range ``[q_lo, q_hi]`` of :func:`lipbound.local.rules.slope_box`, so on the
sub-interval ``g(z) <= min(g(t_j) + (q_hi - a)^+ h_j, g(t_{j+1}) + (a - q_lo)^+ h_j)`` and
``g(z) >= max(g(t_j) - (a - q_lo)^+ h_j, g(t_{j+1}) - (q_hi - a)^+ h_j)`` (mean value
inequality, ``h_j = t_{j+1} - t_j``); ``b_u`` is the max of the upper and ``b_l`` the min of
the lower bounds over ``j``. The gap ``b_u - b_l`` is ``O(h^2 s'')`` per sub-interval.

Result: ``v_t,i <= -low(-e_i)`` and ``>= low(e_i)``; the box is intersected with the IBP box
(both contain every value over the ball), so it is never looser.

Rounding (float64, the one rule of :mod:`lipbound.local.interval`): with ``rho = rel64()``,
a computed product or dot product of ``n <= MAX_ENTRIES`` terms is within ``rho/2`` times the
sum of the terms' magnitudes of the exact one. Each step adds to ``E`` the magnitude of what
its float operations can miss: ``s^T mag(V_p)`` at linear nodes (above), ``rho |g|^T mag(V_p)``
for a coefficient ``g`` rounded at an activation or summed over users, ``rho |lambda|^T
|b|`` for the constants. The end value is ``C + T - E`` (``T`` the terminal terms) minus
``2 rho (Cabs + Tabs + E) + TINY`` with ``Cabs``, ``Tabs`` the sums of the magnitudes of the
terms of ``C`` and ``T``, which covers the rounding of these sums (at most a few hundred
partial sums of at most ``MAX_ENTRIES`` terms each). The relaxation offsets are rounded
outwards by ``rho`` times the magnitudes of the values they combine, and the function values
``s(t_j)`` of transcendental activations carry the ``REL64`` widening of
:mod:`lipbound.local.rules` (float64 error a few ulp).

Memory: a target with ``m`` entries to bound costs ``2 m`` rows of every upstream value.
ReLU-family targets bound only the entries whose box contains 0 (stable entries already
have exact slopes); a target whose rows exceed the ``rows`` budget keeps its IBP box, and
the row chunk shrinks to fit ``max_memory`` bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LipboundError
from ..graph import OpGraph
from ..graph.types import Node
from .interval import TINY, Box, from_bounds, point, rel64
from .linear import linear_backward, linear_parts
from .rules import MULTI, LocalOp, leaky_slope, slope_box

__all__ = ["CrownBudget", "CrownState", "crown_box", "relaxation", "targets", "tighten"]

_F64 = torch.float64
#: Sub-intervals of the generic (non-ReLU) relaxation.
SUBINTERVALS = 8
#: bytes per float64 entry of a row coefficient, times the tensors alive in one step.
_LIVE = 8 * 6


@dataclass
class CrownBudget:
    """How much CROWN a forward pass may do: at most ``rows`` back-substituted rows per sample
    and node, in chunks of at most ``max_memory`` bytes; ``notes`` receives a line for each
    node left at its IBP box."""

    rows: int
    max_memory: int = 1 << 30
    notes: list[str] = field(default_factory=list)


@dataclass
class CrownState:
    """What one forward pass shares between its targets: the graph, its rules, the ball, the
    budgets, the relaxations computed so far and the notes of targets left to IBP."""

    graph: OpGraph
    ops: dict[str, LocalOp]
    radius: float
    norm: str
    budget: CrownBudget
    relu_only: dict[str, bool]
    order: dict[str, int]
    relax: dict[str, tuple[torch.Tensor, ...] | None] = field(default_factory=dict)
    consts: dict[str, Box] = field(default_factory=dict)

    @classmethod
    def make(cls, graph: OpGraph, ops: dict[str, LocalOp], radius: float, norm: str,
             budget: CrownBudget | None) -> CrownState | None:
        """The state of one forward pass (``None``: no CROWN, or radius 0)."""
        if budget is None or budget.rows <= 0 or radius <= 0:
            return None
        return cls(graph, ops, float(radius), norm, budget, targets(graph, ops),
                   {n.name: i for i, n in enumerate(graph)})


def targets(graph: OpGraph, ops: dict[str, LocalOp]) -> dict[str, bool]:
    """Nodes worth tightening: linear, add/sub/cat or activation values read by a non-linear
    node (the values whose boxes the local rules read), each with whether all its
    non-linear readers are ReLU-family activations (then only entries whose box contains 0
    need a bound)."""
    out: dict[str, bool] = {}
    for node in graph:
        if node.kind in ("input", "output", "linear") or ops.get(node.name) is MULTI:
            continue
        relu = node.kind == "activation" and getattr(node.rule, "name", "") in (
            "relu", "leaky_relu")
        for p in node.inputs:
            src = graph[p]
            if src.kind == "linear" or ops.get(p) is MULTI or src.kind == "activation":
                out[p] = out.get(p, True) and relu
    return out


def _relu_lines(node: Node, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    alpha = leaky_slope(node) if getattr(node.rule, "name", "") == "leaky_relu" else 0.0
    unstable = (lo < 0) & (hi > 0)
    pos = lo >= 0
    one = torch.ones_like(lo)
    a_st = torch.where(pos, one, torch.full_like(lo, alpha))
    a_u = torch.where(unstable, (hi - alpha * lo) / (hi - lo).clamp_min(TINY), a_st)
    s_lo = torch.where(lo >= 0, lo, alpha * lo)
    s_hi = torch.where(hi >= 0, hi, alpha * hi)
    e_lo, e_hi = s_lo - a_u * lo, s_hi - a_u * hi
    b_u = torch.maximum(e_lo, e_hi)
    b_u = torch.where(unstable, b_u + rel64() * (s_lo.abs() + s_hi.abs() + (a_u * lo).abs()
                                               + (a_u * hi).abs()) + TINY, torch.zeros_like(lo))
    a_l = torch.where(unstable, torch.where(hi > -lo, one, torch.full_like(lo, alpha)), a_st)
    return a_l, torch.zeros_like(lo), a_u, b_u


def _generic_lines(node: Node, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    K = SUBINTERVALS
    w = (hi - lo).clamp_min(0)
    steps = torch.arange(K + 1, dtype=_F64, device=lo.device) / K
    t = lo.unsqueeze(0) + w.unsqueeze(0) * steps.reshape(-1, *([1] * lo.dim()))
    t[0], t[K] = lo, hi
    t = torch.minimum(torch.maximum(t, lo.unsqueeze(0)), hi.unsqueeze(0))
    s = node.fn(t.reshape(-1, *lo.shape[1:])).reshape(t.shape).to(_F64)
    q_lo, q_hi = slope_box(node, from_bounds(t[:-1], t[1:]))
    mid_q = (q_lo + q_hi).mean(dim=0) / 2
    a = torch.where(w > 0, (s[K] - s[0]) / w.clamp_min(TINY), mid_q)
    g = s - a * t
    gpad = rel64() * (s.abs() + (a * t).abs()) + TINY
    h = (t[1:] - t[:-1]) * (1 + rel64())
    up_s, dn_s = (q_hi - a).clamp_min(0), (a - q_lo).clamp_min(0)
    upper = torch.minimum(g[:-1] + up_s * h, g[1:] + dn_s * h) + gpad[:-1] + gpad[1:]
    lower = torch.maximum(g[:-1] - dn_s * h, g[1:] - up_s * h) - gpad[:-1] - gpad[1:]
    b_u = upper.amax(dim=0)
    b_l = lower.amin(dim=0)
    b_u = b_u + rel64() * b_u.abs() + TINY
    b_l = b_l - rel64() * b_l.abs() - TINY
    return a, b_l, a, b_u


def relaxation(node: Node, box: Box) -> tuple[torch.Tensor, ...]:
    """``(a_l, b_l, a_u, b_u)`` with ``a_l z + b_l <= s(z) <= a_u z + b_u`` on the box of the
    activation's input (module docstring)."""
    lo, hi = box.lo, box.hi
    with torch.no_grad():
        name = getattr(node.rule, "name", "")
        if name == "relu" or (name == "leaky_relu" and 0.0 <= leaky_slope(node) <= 1.0):
            return _relu_lines(node, lo, hi)
        return _generic_lines(node, lo, hi)


def _dot(lam: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``lambda_j^T v`` per row: ``lam`` ``(B, R, *s)``, ``v`` ``(B, *s)`` -> ``(B, R)``."""
    B, R = lam.shape[:2]
    return (lam * v.unsqueeze(1)).reshape(B, R, -1).sum(dim=-1)


@dataclass
class _Acc:
    """The running ``C``, ``Cabs``, ``T``, ``Tabs`` and ``E`` of the module docstring."""

    C: torch.Tensor
    Cabs: torch.Tensor
    T: torch.Tensor
    Tabs: torch.Tensor
    E: torch.Tensor

    def low(self) -> torch.Tensor:
        v = self.C + self.T - self.E
        return v - 2 * rel64() * (self.Cabs + self.Tabs + self.E) - TINY


def _const(st: CrownState, node: Node) -> Box:
    """Box of the node's constant term ``b`` (its value at zero inputs)."""
    b = st.consts.get(node.name)
    if b is None:
        with torch.no_grad():
            if node.kind == "linear":
                b = point(torch.zeros((1, *node.in_shapes[0]), dtype=_F64))
                for part in linear_parts(node):
                    b = part.forward(b)
            else:
                b = st.ops[node.name].forward(node, [point(torch.zeros((1, *s), dtype=_F64))
                                                     for s in node.in_shapes])
        st.consts[node.name] = b
    return b


def _terminal(st: CrownState, node: Node, g: torch.Tensor, box: Box, acc: _Acc) -> None:
    if node.kind == "input" and st.norm == "2":
        B, R = g.shape[:2]
        d = g.reshape(B, R, -1).norm(dim=-1) * st.radius
        acc.T += _dot(g, box.c) - d
        acc.Tabs += _dot(g.abs(), box.c.abs()) + d
        return
    acc.T += _dot(g, box.c) - _dot(g.abs(), box.r)
    acc.Tabs += _dot(g.abs(), box.mag)


def _relax(st: CrownState, node: Node, boxes: dict[str, Box]
           ) -> tuple[torch.Tensor, ...] | None:
    """The activation's relaxation over its input box (cached), ``None`` if not finite."""
    if node.name not in st.relax:
        rel = relaxation(node, boxes[node.inputs[0]])
        ok = all(bool(torch.isfinite(t).all()) for t in rel)
        st.relax[node.name] = rel if ok else None
    return st.relax[node.name]


def _step(st: CrownState, node: Node, g: torch.Tensor, boxes: dict[str, Box], acc: _Acc
          ) -> list[tuple[str, torch.Tensor]]:
    """Replace ``g^T v_node`` by terms in the node's inputs (module docstring)."""
    B, R = g.shape[:2]
    if node.kind == "linear" or st.ops.get(node.name) is MULTI:
        zero = Box(g, torch.zeros_like(g))
        if node.kind == "linear":
            grads: list[Box | None] = [linear_backward(node, zero)]
        else:
            grads = st.ops[node.name].backward(node, [boxes[p] for p in node.inputs], zero)
        b = _const(st, node)
        acc.C += _dot(g, b.c.expand(B, *b.c.shape[1:]))
        acc.Cabs += _dot(g.abs(), b.mag.expand(B, *b.c.shape[1:]))
        out = []
        for p, gr in zip(node.inputs, grads):
            if gr is None:
                continue
            acc.E += _dot(gr.r, boxes[p].mag)
            out.append((p, gr.c))
        return out
    (p,) = node.inputs
    rel = _relax(st, node, boxes)
    if rel is None:  # pragma: no cover - _substitute ends at such a node
        raise LipboundError(f"{node.qualname}: no finite linear relaxation")
    a_l, b_l, a_u, b_u = (t.unsqueeze(1) for t in rel)
    gp, gn = g.clamp_min(0), g.clamp_max(0)
    new = gp * a_l + gn * a_u
    acc.C += ((gp * b_l + gn * b_u).reshape(B, R, -1)).sum(dim=-1)
    acc.Cabs += ((g.abs() * torch.maximum(b_l.abs(), b_u.abs())).reshape(B, R, -1)).sum(dim=-1)
    acc.E += rel64() * _dot(new.abs(), boxes[p].mag)
    return [(p, new)]


def _substitute(st: CrownState, start: Node, w: torch.Tensor, boxes: dict[str, Box]
                ) -> torch.Tensor:
    """Certified lower bounds of ``w_j^T v_start`` over the ball, ``(B, R)``."""
    B, R = w.shape[:2]
    z = torch.zeros((B, R), dtype=_F64, device=w.device)
    acc = _Acc(z.clone(), z.clone(), z.clone(), z.clone(), z.clone())
    lam: dict[str, torch.Tensor] = {start.name: w}
    nodes = list(st.graph)[: st.order[start.name] + 1]
    for node in reversed(nodes):
        g = lam.pop(node.name, None)
        if g is None:
            continue
        box = boxes[node.name]
        acc.E += rel64() * _dot(g.abs(), box.mag)  # the sum over users of the coefficient
        substitutable = node.kind == "linear" or st.ops.get(node.name) is MULTI or (
            node.kind == "activation" and _relax(st, node, boxes) is not None)
        if node.kind == "input" or not substitutable:
            _terminal(st, node, g, box, acc)
            continue
        for p, gp in _step(st, node, g, boxes, acc):
            lam[p] = gp if p not in lam else lam[p] + gp
    return acc.low()


def _selection(st: CrownState, node: Node, box: Box) -> torch.Tensor:
    B = box.c.shape[0]
    if st.relu_only.get(node.name, False):
        lo, hi = box.lo.reshape(B, -1), box.hi.reshape(B, -1)
        return torch.nonzero(((lo < 0) & (hi > 0)).any(dim=0)).flatten()
    return torch.arange(math.prod(node.out_shape), device=box.c.device)


def tighten(st: CrownState | None, node: Node, boxes: dict[str, Box], exact: set[str]) -> Box:
    """``boxes[node.name]``, tightened by :func:`crown_box` when ``node`` is a target and its
    box is not exact already (``exact``: the affine maps of the input)."""
    if st is None or node.name not in st.relu_only or node.name in exact:
        return boxes[node.name]
    with torch.no_grad():
        return crown_box(st, node, boxes)


def crown_box(st: CrownState, node: Node, boxes: dict[str, Box]) -> Box:
    """The node's box ``boxes[node.name]`` tightened by back-substitution (module docstring),
    entry by entry never wider; unchanged (with a note) when its rows exceed the budget."""
    box = boxes[node.name]
    sel = _selection(st, node, box)
    if sel.numel() == 0:
        return box
    if 2 * sel.numel() > st.budget.rows:
        st.budget.notes.append(f"{node.qualname}: IBP box kept ({2 * sel.numel()} CROWN rows "
                               f"above the budget of {st.budget.rows})")
        return box
    B, shape = box.c.shape[0], tuple(node.out_shape)
    n = math.prod(shape)
    upstream = max(math.prod(m.out_shape) for m in list(st.graph)[: st.order[node.name] + 1])
    chunk = max(1, min(sel.numel(), st.budget.max_memory // max(1, 2 * B * upstream * _LIVE)))
    lo, hi = box.lo.reshape(B, n).clone(), box.hi.reshape(B, n).clone()
    for s in range(0, sel.numel(), chunk):
        idx = sel[s:s + chunk]
        R = idx.numel()
        w = torch.zeros((B, 2 * R, n), dtype=_F64, device=box.c.device)
        ar = torch.arange(R, device=box.c.device)
        w[:, ar, idx] = 1.0
        w[:, R + ar, idx] = -1.0
        low = _substitute(st, node, w.reshape(B, 2 * R, *shape), boxes)
        lo[:, idx] = torch.maximum(lo[:, idx], low[:, :R])
        hi[:, idx] = torch.minimum(hi[:, idx], -low[:, R:])
    cand = from_bounds(torch.minimum(lo, hi), torch.maximum(lo, hi)).reshape(B, *shape)
    better = cand.r < box.r
    return Box(torch.where(better, cand.c, box.c), torch.where(better, cand.r, box.r))
