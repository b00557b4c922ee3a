r"""Local rules: sound interval images and interval secant adjoints of the non-linear nodes.

Every rule serves one captured node ``g`` with inputs ``x_1 .. x_k`` whose values range over
boxes ``X_1 .. X_k`` (the forward enclosures over the input ball). It provides

``forward(node, boxes) -> Box``
    a box containing ``g(x_1, .., x_k)`` for every ``x_i`` in ``X_i``;
``backward(node, boxes, adj) -> [Box | None]``
    for a box ``adj`` of row vectors ``a`` (shape ``(B, R, *out)``), boxes ``A_i`` such that,
    for every pair of arguments ``x, x'`` in the boxes, there are *secant matrices* ``M_i``
    with ``g(x) - g(x') = sum_i M_i (x_i - x_i')`` and ``a^T M_i`` in ``A_i`` for every ``a``
    in ``adj``.

Composing the secant matrices along the graph (chain rule for differences; a node used twice
gets the sum of its users' adjoints) gives ``f(u) - f(v) = M (u - v)`` for every pair
``u, v`` of the ball, with every row of ``M`` inside the propagated input adjoint: this is what
:mod:`lipbound.local.propagate` computes. The secant matrices and their proofs:

* **element-wise activations** ``s``: ``s(u) - s(v) = q (u - v)`` with ``q`` the secant slope,
  which lies in ``[min s', max s']`` over ``[lo, hi]`` (``s`` is absolutely continuous and
  ``s(u) - s(v) = int_v^u s'``). Per-neuron slope ranges over the box: ReLU ``{1}`` when
  ``lo >= 0`` and ``{0}`` when ``hi <= 0`` (a stable neuron is exact), else ``[0, 1]``;
  LeakyReLU likewise with ``{slope}``; ReLU6 / Hardtanh / clamp with their two kinks;
  sigmoid and tanh (``s'`` unimodal, peak at 0): ``[min(s'(lo), s'(hi)),
  s'(clip(0, lo, hi))]``; GELU (exact, erf): ``s'' = phi(t)(2 - t^2)``, so ``s'`` is
  monotone between its critical points ``+-sqrt 2``: the extremes over ``[lo, hi]`` are at
  the ends and at ``+-sqrt 2`` when inside; ELU ``alpha e^t`` on ``t < 0``, 1 on ``t > 0``;
  Softplus ``sigmoid(beta t)`` (and 1 past the threshold). Any other registered activation
  uses its global range ``[a, b]``. Every local range is intersected with the global one, so a
  local slope is never above the global constant. Computed slope ends of transcendental
  functions are widened by ``REL64`` relative (float64 error a few ulp; the float32
  rounding of the model's constants is covered by ``ROUND_REL`` on the final constant).
  Images: ``[s(lo), s(hi)]`` for the monotone ones, else ``s(c) +- max(|q_lo|, |q_hi|) r``
  (the Lipschitz enclosure with the local slopes).
* **products** ``x y`` (broadcasting): ``xy - x'y' = y (x - x') + x' (y - y')``:
  ``M_x = diag(y)``, ``M_y = diag(x')`` with ``y`` in ``Y`` and ``x'`` in ``X``; adjoints
  ``sum_to(a * Y)`` and ``sum_to(a * X)`` in interval arithmetic. Hence
  ``|d(xy)| <= |y| |dx| + |x| |dy|`` with the boxes' sup norms.
* **matmul of two inputs** ``X Y`` (attention ``q k^T``, ``p v``): the same identity,
  ``XY - X'Y' = (X - X') Y + X' (Y - Y')``: adjoints ``a Y^T`` and ``X^T a`` (interval
  matrix products).
* **division** ``x / y`` with ``Y`` away from 0: ``x/y - x'/y' = (x - x')/y - x' (y - y') /
  (y y')``; ``1 / y`` in ``[1/hi, 1/lo]``.
* **exp, log, sqrt, rsqrt, reciprocal, square, pow (constant exponent)**: mean value theorem
  ``g(u) - g(v) = g'(xi)(u - v)`` with ``xi`` in the box; ``g'`` is monotone on the allowed
  domain, so its range over ``[lo, hi]`` is spanned by the end values. ``log``, ``sqrt``,
  ``rsqrt`` and non-integer powers need ``lo > 0``, ``reciprocal`` a box without 0: otherwise
  the node is refused with its range (no local constant: the derivative is unbounded).
* **softmax** over ``n`` entries: ``J = diag(p) - p p^T``; the secant matrix is the average
  ``int_0^1 J(z_t) dt`` over the segment (inside the box, which is convex), and
  ``a^T J = p * (a - <a, p>)`` evaluated in interval arithmetic over the box of ``p`` encloses
  ``a^T J(z)`` for every ``z`` in the box, hence the average. The box of ``p``:
  ``p_i = 1 / (1 + sum_{j != i} e^{x_j - x_i})`` is increasing in ``x_i`` and decreasing in
  the others, so ``p_i in [e^{lo_i} / (e^{lo_i} + sum_{j != i} e^{hi_j}), e^{hi_i} /
  (e^{hi_i} + sum_{j != i} e^{lo_j})]`` (leave-one-out log-sum-exp by prefix and suffix
  ``logcumsumexp``, no cancellation). The global constant 1/2 bounds ``||J||`` anyway; these
  boxes are tighter.
* **LayerNorm** over ``n`` entries (``y = gamma * (x - mu) / sigma + beta``,
  ``sigma = sqrt(var + eps)``): ``d xhat / dx = (I - 1 1^T / n - xhat xhat^T / n) / sigma``,
  ``a^T J = (g - mean(g) - xhat mean(g * xhat)) / sigma`` with ``g = a * gamma``, in interval
  arithmetic over the boxes of ``xhat`` and ``1 / sigma`` (average over the segment as for
  softmax). The variance is bounded away from zero over the box: with ``P`` the centring
  projection and ``x = c + d``, ``|d| <= r``, ``| ||P x|| - ||P c|| | <= ||P d|| <= ||r||_2``,
  so ``var in [max(0, ||P c|| - ||r||)^2 / n, (||P c|| + ||r||)^2 / n]``; ``(P x)_i`` lies
  within ``r_i (1 - 2/n) + sum(r) / n`` of ``(P c)_i`` (the absolute row sums of ``P``);
  ``|xhat_i| <= sqrt(n)``. RMSNorm is the same without centring (``P = I``).
* **scaled_dot_product_attention** (no mask, no dropout, not causal) is the composition
  ``S = s q k^T``, ``P = softmax(S)``, ``P v``: the rules above chained inside one node
  (secant of a composition = product of the parts' secants).

Rounding: every box goes through :func:`lipbound.local.interval.pad` (see there).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError, UnsupportedNode
from ..graph.types import Node
from ..rules import arg, batched_dim, is_tensor_arg
from ..rules.activation import softplus_jump
from .interval import (
    TINY,
    Box,
    from_bounds,
    iadd,
    imatmul,
    imul,
    isum,
    pad,
    point,
    rel64,
    sum_to,
)

__all__ = ["MULTI", "LocalOp", "ball_factor", "leaky_slope", "local_op", "op_name",
           "slope_box"]

_F64 = torch.float64
_R2 = math.sqrt(2.0)

Forward = Callable[[Node, Sequence[Box]], Box]
Backward = Callable[[Node, Sequence[Box], Box], list[Box | None]]
Tangent = Callable[[Node, Sequence[Box], Sequence[Box | None]], Box | None]


@dataclass(frozen=True)
class LocalOp:
    """A local rule: interval image, interval secant adjoint (rows ``a^T M``) and interval
    secant tangent (columns ``M t``, the same matrices applied forward; module docstring)."""

    name: str
    forward: Forward
    backward: Backward
    tangent: Tangent


class LocalDomainError(UnsupportedModelError):
    """An op's input box leaves the domain where it has a bounded derivative."""


def op_name(node: Node) -> str:
    """The op's canonical name: a method name, a function's ``__name__`` or a class name."""
    key = node.call.key
    if isinstance(key, str):
        return key.rstrip("_") if key.endswith("_") and not key.startswith("_") else key
    if isinstance(key, type):
        return key.__name__
    return str(getattr(key, "__name__", key))


def _widen(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lo - rel64() * lo.abs() - TINY, hi + rel64() * hi.abs() + TINY


def _refuse(node: Node, why: str) -> LocalDomainError:
    return LocalDomainError([UnsupportedNode(node.qualname, node.op, why)],
                            what="no local Lipschitz bound over this ball")


# ---------------------------------------------------------------------------------------------
# element-wise activations
# ---------------------------------------------------------------------------------------------
def _p(node: Node, attr: str, pos: int, default: Any) -> Any:
    if node.module is not None:
        return getattr(node.module, attr, default)
    return arg(node, pos, attr, default)


def leaky_slope(node: Node) -> float:
    """The negative slope of a LeakyReLU node (module attribute or call argument)."""
    return float(_p(node, "negative_slope", 1, 0.01))


def _kinks(lo: torch.Tensor, hi: torch.Tensor, a: float, b: float,
           inner: float, outer: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Slope range of a piecewise-linear map with slope ``inner`` on ``[a, b]``, ``outer``
    outside."""
    inside = (lo >= a) & (hi <= b)
    touches = (hi > a) & (lo < b)
    outside = (hi <= a) | (lo >= b)
    lo_s = torch.full_like(lo, min(inner, outer))
    hi_s = torch.full_like(lo, max(inner, outer))
    lo_s = torch.where(inside, torch.full_like(lo, inner), lo_s)
    hi_s = torch.where(inside, torch.full_like(lo, inner), hi_s)
    lo_s = torch.where(outside, torch.full_like(lo, outer), lo_s)
    hi_s = torch.where(outside, torch.full_like(lo, outer), hi_s)
    del touches
    return lo_s, hi_s


def _unimodal(d: Callable[[torch.Tensor], torch.Tensor], lo: torch.Tensor, hi: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of ``d`` (even, peak at 0, decreasing in ``|t|``) over ``[lo, hi]``."""
    top = d(torch.clamp(torch.zeros_like(lo), lo, hi))
    bot = torch.minimum(d(lo), d(hi))
    return _widen(bot, top)


def _dsig(t: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(t)
    return s * (1 - s)


def _dtanh(t: torch.Tensor) -> torch.Tensor:
    return 1 - torch.tanh(t) ** 2


def _dgelu(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(t / _R2)) + t * torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _gelu_slopes(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _dgelu(lo), _dgelu(hi)
    top = torch.maximum(a, b)
    bot = torch.minimum(a, b)
    top = torch.where((lo < _R2) & (hi > _R2), torch.full_like(lo, float(_dgelu(
        torch.tensor(_R2, dtype=_F64)))), top)
    bot = torch.where((lo < -_R2) & (hi > -_R2), torch.full_like(lo, float(_dgelu(
        torch.tensor(-_R2, dtype=_F64)))), bot)
    return _widen(bot, top)


def _elu_slopes(node: Node, lo: torch.Tensor, hi: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    al = float(_p(node, "alpha", 1, 1.0))
    if al < 0:
        return None
    neg_lo = al * torch.exp(torch.clamp(lo, max=0.0))
    neg_hi = al * torch.exp(torch.clamp(hi, max=0.0))
    one = torch.ones_like(lo)
    bot = torch.where(lo >= 0, one, torch.where(hi <= 0, neg_lo, torch.minimum(neg_lo, one)))
    top = torch.where(lo >= 0, one, torch.where(hi <= 0, neg_hi, torch.maximum(neg_hi, one)))
    return _widen(bot, top)


def _softplus_slopes(node: Node, lo: torch.Tensor, hi: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    beta = float(_p(node, "beta", 1, 1.0))
    thr = float(_p(node, "threshold", 2, 20.0))
    if beta <= 0:
        return None
    bot = torch.sigmoid(beta * lo)
    top = torch.where(beta * hi > thr, torch.ones_like(hi), torch.sigmoid(beta * hi))
    return _widen(bot, top)


def _clamp_bounds(node: Node) -> tuple[float, float] | None:
    name = getattr(node.rule, "name", "")
    if name == "relu6":
        return 0.0, 6.0
    if name == "hardtanh":
        return float(_p(node, "min_val", 1, -1.0)), float(_p(node, "max_val", 2, 1.0))
    lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        return None
    return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))


_MONOTONE = {"relu", "relu6", "hardtanh", "clamp", "sigmoid", "tanh", "softsign",
             "logsigmoid", "hardsigmoid", "selu", "celu"}


def slope_box(node: Node, box: Box) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry slope range ``[q_lo, q_hi]`` of an activation node over ``box``."""
    lo, hi = box.lo, box.hi
    name = getattr(node.rule, "name", "")
    g = node.slope_range or (-math.inf, math.inf)
    out: tuple[torch.Tensor, torch.Tensor] | None = None
    if name == "relu":
        out = _kinks(lo, hi, 0.0, math.inf, 1.0, 0.0)
    elif name in ("relu6", "hardtanh", "clamp"):
        kb = _clamp_bounds(node)
        if kb is not None and kb[0] < kb[1]:
            out = _kinks(lo, hi, kb[0], kb[1], 1.0, 0.0)
    elif name == "leaky_relu":
        out = _kinks(lo, hi, 0.0, math.inf, 1.0, leaky_slope(node))
    elif name == "sigmoid":
        out = _unimodal(_dsig, lo, hi)
    elif name == "tanh":
        out = _unimodal(_dtanh, lo, hi)
    elif name == "gelu" and _p(node, "approximate", 1, "none") == "none":
        out = _gelu_slopes(lo, hi)
    elif name == "elu":
        out = _elu_slopes(node, lo, hi)
    elif name == "softplus":
        out = _softplus_slopes(node, lo, hi)
    if out is None:
        return torch.full_like(lo, g[0]), torch.full_like(lo, g[1])
    return out[0].clamp(min=g[0], max=g[1]), out[1].clamp(min=g[0], max=g[1])


def _act_forward(node: Node, boxes: Sequence[Box]) -> Box:
    (b,) = boxes
    name = getattr(node.rule, "name", "")
    with torch.no_grad():
        if name in _MONOTONE or (name == "leaky_relu" and leaky_slope(node) >= 0) or (
                name == "elu" and float(_p(node, "alpha", 1, 1.0)) >= 0) or (
                name == "softplus" and float(_p(node, "beta", 1, 1.0)) > 0):
            lo, hi = node.fn(b.lo), node.fn(b.hi)
            if name == "softplus":  # the switch to x at beta x = threshold jumps down by J
                hi = hi + softplus_jump(float(_p(node, "beta", 1, 1.0)),
                                        float(_p(node, "threshold", 2, 20.0)))
            return from_bounds(lo, hi)
        qlo, qhi = slope_box(node, b)
        k = torch.maximum(qlo.abs(), qhi.abs())
        c = node.fn(b.c)
        return pad(c, k * b.r)


def _act_backward(node: Node, boxes: Sequence[Box], adj: Box) -> list[Box | None]:
    qlo, qhi = slope_box(node, boxes[0])
    q = from_bounds(qlo, qhi).unsqueeze(1)
    return [imul(adj, q)]


def _act_tangent(node: Node, boxes: Sequence[Box], tans: Sequence[Box | None]) -> Box | None:
    if tans[0] is None:
        return None
    return _act_backward(node, boxes, tans[0])[0]


ACTIVATION = LocalOp("activation (local slopes)", _act_forward, _act_backward, _act_tangent)


# ---------------------------------------------------------------------------------------------
# products, matmul, division
# ---------------------------------------------------------------------------------------------
def _operands(node: Node, boxes: Sequence[Box], n: int) -> list[tuple[Box, int | None]]:
    """The first ``n`` call arguments as boxes, with the index of the input they come from
    (``None`` for constants)."""
    args = list(node.call.args)
    kwargs = node.call.kwargs
    names = ["input", "other"]
    vals = [args[i] if i < len(args) else kwargs.get(names[i]) for i in range(n)]
    out: list[tuple[Box, int | None]] = []
    k = 0
    dev = boxes[0].c.device
    for v in vals:
        if is_tensor_arg(v):
            out.append((boxes[k], k))
            k += 1
        elif isinstance(v, torch.Tensor):
            out.append((point(v.to(dev)), None))
        elif isinstance(v, (int, float)):
            out.append((point(torch.tensor(float(v), device=dev)), None))
        else:
            raise _refuse(node, f"operand {v!r} is neither a tensor nor a number")
    return out


def _batch_shape(node: Node, i: int, lead: int) -> tuple[int, ...]:
    return (lead, *node.in_shapes[i])


def _adjoint_to(node: Node, i: int, box: Box, adj: Box) -> Box:
    b, r = adj.c.shape[:2]
    shape = (b, r, *node.in_shapes[i])
    return sum_to(box, shape)


def _mul_forward(node: Node, boxes: Sequence[Box]) -> Box:
    (x, _), (y, _) = _operands(node, boxes, 2)
    return imul(x, y)


def _mul_backward(node: Node, boxes: Sequence[Box], adj: Box) -> list[Box | None]:
    (x, ix), (y, iy) = _operands(node, boxes, 2)
    out: list[Box | None] = [None] * len(node.inputs)
    if ix is not None:
        out[ix] = _adjoint_to(node, ix, imul(adj, y.unsqueeze(1)), adj)
    if iy is not None:
        g = _adjoint_to(node, iy, imul(adj, x.unsqueeze(1)), adj)
        out[iy] = g if out[iy] is None else iadd(out[iy], g)  # type: ignore[arg-type]
    return out


def _recip_box(node: Node, y: Box) -> Box:
    lo, hi = y.lo, y.hi
    if not bool(((lo > 0) | (hi < 0)).all()):
        raise _refuse(node, f"its divisor ranges over [{float(lo.min()):.4g}, "
                      f"{float(hi.max()):.4g}] over the ball, which reaches 0: no local "
                      "constant. Use a smaller radius")
    return from_bounds(1.0 / hi, 1.0 / lo)


def _div_forward(node: Node, boxes: Sequence[Box]) -> Box:
    (x, _), (y, _) = _operands(node, boxes, 2)
    return imul(x, _recip_box(node, y))


def _div_backward(node: Node, boxes: Sequence[Box], adj: Box) -> list[Box | None]:
    (x, ix), (y, iy) = _operands(node, boxes, 2)
    inv = _recip_box(node, y)
    out: list[Box | None] = [None] * len(node.inputs)
    if ix is not None:
        out[ix] = _adjoint_to(node, ix, imul(adj, inv.unsqueeze(1)), adj)
    if iy is not None:
        inv2 = imul(inv, inv)
        s = imul(x, inv2)
        g = _adjoint_to(node, iy, imul(adj, Box(-s.c, s.r).unsqueeze(1)), adj)
        out[iy] = g if out[iy] is None else iadd(out[iy], g)  # type: ignore[arg-type]
    return out


def _mT(b: Box) -> Box:
    return Box(b.c.transpose(-1, -2), b.r.transpose(-1, -2))


def _matmul_check(node: Node) -> None:
    if len(node.in_shapes) != 2 or any(len(s) < 2 for s in node.in_shapes):
        raise _refuse(node, "local matmul rule needs two inputs with >= 2 dims per sample")


def _matmul_forward(node: Node, boxes: Sequence[Box]) -> Box:
    _matmul_check(node)
    return imatmul(boxes[0], boxes[1])


def _matmul_backward(node: Node, boxes: Sequence[Box], adj: Box) -> list[Box | None]:
    _matmul_check(node)
    x, y = boxes[0].unsqueeze(1), boxes[1].unsqueeze(1)
    gx = _adjoint_to(node, 0, imatmul(adj, _mT(y)), adj)
    gy = _adjoint_to(node, 1, imatmul(_mT(x), adj), adj)
    return [gx, gy]


def _acc(a: Box | None, b: Box | None) -> Box | None:
    if a is None:
        return b
    return a if b is None else iadd(a, b)


def _tan_of(tans: Sequence[Box | None], i: int | None) -> Box | None:
    return None if i is None else tans[i]


def _mul_tangent(node: Node, boxes: Sequence[Box], tans: Sequence[Box | None]) -> Box | None:
    (x, ix), (y, iy) = _operands(node, boxes, 2)
    tx, ty = _tan_of(tans, ix), _tan_of(tans, iy)
    out = None if tx is None else imul(tx, y.unsqueeze(1))
    return _acc(out, None if ty is None else imul(ty, x.unsqueeze(1)))


def _div_tangent(node: Node, boxes: Sequence[Box], tans: Sequence[Box | None]) -> Box | None:
    (x, ix), (y, iy) = _operands(node, boxes, 2)
    inv = _recip_box(node, y)
    tx, ty = _tan_of(tans, ix), _tan_of(tans, iy)
    out = None if tx is None else imul(tx, inv.unsqueeze(1))
    if ty is not None:
        s = imul(x, imul(inv, inv))
        out = _acc(out, imul(ty, Box(-s.c, s.r).unsqueeze(1)))
    return out


def _matmul_tangent(node: Node, boxes: Sequence[Box], tans: Sequence[Box | None]
                    ) -> Box | None:
    _matmul_check(node)
    tx, ty = tans[0], tans[1]
    out = None if tx is None else imatmul(tx, boxes[1].unsqueeze(1))
    return _acc(out, None if ty is None else imatmul(boxes[0].unsqueeze(1), ty))


# ---------------------------------------------------------------------------------------------
# smooth unary functions
# ---------------------------------------------------------------------------------------------
def _pow_exponent(node: Node) -> float:
    e = arg(node, 1, "exponent")
    if not isinstance(e, (int, float)) or isinstance(e, bool):
        raise _refuse(node, "pow with an exponent that is not a constant number")
    return float(e)


_UNARY_FNS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor],
                            Callable[[torch.Tensor], torch.Tensor], str]] = {
    "exp": (torch.exp, torch.exp, "all"),
    "log": (torch.log, lambda t: 1.0 / t, "pos"),
    "sqrt": (torch.sqrt, lambda t: 0.5 / torch.sqrt(t), "pos"),
    "rsqrt": (torch.rsqrt, lambda t: -0.5 * t ** -1.5, "pos"),
    "reciprocal": (torch.reciprocal, lambda t: -1.0 / (t * t), "nonzero"),
    "square": (torch.square, lambda t: 2 * t, "all"),
}


def _unary(node: Node) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                Callable[[torch.Tensor], torch.Tensor], str]:
    """``(g, g', domain)``: domain ``"all"``, ``"pos"`` (lo > 0) or ``"nonzero"``."""
    name = op_name(node)
    if name != "pow" and node.call.key is not operator.pow:
        return _UNARY_FNS[name]
    p = _pow_exponent(node)
    if p == 2:
        return _UNARY_FNS["square"]
    if p == 1:
        return (lambda t: t), torch.ones_like, "all"
    return (lambda t: t ** p), (lambda t: p * t ** (p - 1)), "pos"


def _unary_check(node: Node, b: Box, domain: str) -> None:
    lo, hi = b.lo, b.hi
    ok = True
    if domain == "pos":
        ok = bool((lo > 0).all())
    elif domain == "nonzero":
        ok = bool(((lo > 0) | (hi < 0)).all())
    if not ok:
        raise _refuse(node, f"its input ranges over [{float(lo.min()):.4g}, "
                      f"{float(hi.max()):.4g}] over the ball, outside the domain where "
                      f"{op_name(node)} has a bounded derivative; use a smaller radius")


def _unary_forward(node: Node, boxes: Sequence[Box]) -> Box:
    g, _, dom = _unary(node)
    b = boxes[0]
    _unary_check(node, b, dom)
    with torch.no_grad():
        a, c = g(b.lo), g(b.hi)
        lo, hi = torch.minimum(a, c), torch.maximum(a, c)
        if op_name(node) in ("square",) or (op_name(node) == "pow" and
                                            _pow_exponent(node) == 2):
            cross = (b.lo < 0) & (b.hi > 0)
            lo = torch.where(cross, torch.zeros_like(lo), lo)
        lo, hi = _widen(lo, hi)
        return from_bounds(lo, hi)


def _unary_backward(node: Node, boxes: Sequence[Box], adj: Box) -> list[Box | None]:
    _, dg, dom = _unary(node)
    b = boxes[0]
    _unary_check(node, b, dom)
    a, c = dg(b.lo), dg(b.hi)
    lo, hi = _widen(torch.minimum(a, c), torch.maximum(a, c))
    return [imul(adj, from_bounds(lo, hi).unsqueeze(1))]


def _unary_tangent(node: Node, boxes: Sequence[Box], tans: Sequence[Box | None]
                   ) -> Box | None:
    return None if tans[0] is None else _unary_backward(node, boxes, tans[0])[0]


# ---------------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------------
def _softmax_dim(node: Node) -> int:
    shape = node.in_shapes[0]
    if node.module is not None:
        dim = -3 if isinstance(node.module, nn.Softmax2d) else getattr(node.module, "dim", None)
    else:
        dim = arg(node, 1, "dim")
    if dim is None:
        nd = len(shape) + 1
        dim = 0 if nd in (0, 1, 3) else 1
    d = batched_dim(int(dim), len(shape))
    if d is None:
        raise _refuse(node, "softmax over the batch dimension mixes samples")
    return d + 1  # in the batched tensor


def _loo_lse(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum_{j != i} exp(v_j)`` along ``dim`` (prefix / suffix logcumsumexp)."""
    n = v.shape[dim]
    ninf = torch.full_like(v.narrow(dim, 0, 1), -math.inf)
    pre = torch.logcumsumexp(v, dim)
    suf = torch.logcumsumexp(v.flip(dim), dim).flip(dim)
    pre_ex = torch.cat([ninf, pre.narrow(dim, 0, n - 1)], dim) if n > 1 else ninf
    suf_ex = torch.cat([suf.narrow(dim, 1, n - 1), ninf], dim) if n > 1 else ninf
    return torch.logaddexp(pre_ex, suf_ex)


def _softmax_box(node: Node, b: Box, dim: int | None = None) -> Box:
    d = _softmax_dim(node) if dim is None else dim
    lo, hi = b.lo, b.hi
    plo = torch.exp(lo - torch.logaddexp(lo, _loo_lse(hi, d)))
    phi = torch.exp(hi - torch.logaddexp(hi, _loo_lse(lo, d)))
    plo, phi = _widen(plo, phi)
    return from_bounds(plo.clamp(0.0, 1.0), phi.clamp(0.0, 1.0))


def _softmax_forward(node: Node, boxes: Sequence[Box]) -> Box:
    return _softmax_box(node, boxes[0])


def _softmax_backward(node: Node, boxes: Sequence[Box], adj: Box) -> list[Box | None]:
    d = _softmax_dim(node) + 1  # adjoints carry the row dimension too
    p = _softmax_box(node, boxes[0]).unsqueeze(1)
    s = isum(imul(adj, p), d, keepdim=True)
    diff = pad(adj.c - s.c, adj.r + s.r)
    return [imul(diff, p)]


def _softmax_tangent(node: Node, boxes: Sequence[Box], tans: Sequence[Box | None]
                     ) -> Box | None:
    # J = diag(p) - p p^T is symmetric: J t has the form of a^T J
    return None if tans[0] is None else _softmax_backward(node, boxes, tans[0])[0]


def _softmax_vjp(p: Box, a: Box, dim: int) -> Box:
    """``p * (a - <a, p>)`` along ``dim`` in interval arithmetic (softmax's ``a^T J`` and, by
    symmetry of ``J``, ``J t``)."""
    s = isum(imul(a, p), dim, keepdim=True)
    return imul(pad(a.c - s.c, a.r + s.r), p)


# ---------------------------------------------------------------------------------------------
# scaled dot-product attention: softmax(q k^T * scale) v, composed of the rules above
# ---------------------------------------------------------------------------------------------
def _sdpa_scale(node: Node) -> float:
    for pos, name, ok in ((3, "attn_mask", None), (4, "dropout_p", 0.0), (5, "is_causal", False),
                          (7, "enable_gqa", False)):
        v = arg(node, pos, name, ok)
        if v != ok and not (ok is not None and isinstance(v, (int, float)) and v == ok):
            raise _refuse(node, f"scaled_dot_product_attention with {name}={v!r} (only the "
                          "plain form: no mask, no dropout, not causal)")
    sc = arg(node, 6, "scale", None)
    e = node.in_shapes[0][-1]
    if sc is not None and not isinstance(sc, (int, float)):
        raise _refuse(node, "scaled_dot_product_attention with a non-constant scale")
    return 1.0 / math.sqrt(e) if sc is None else float(sc)


def _sdpa_parts(node: Node, boxes: Sequence[Box], lead: int = 0) -> tuple[Box, Box, Box, Box,
                                                                            float]:
    """``(q, k, v, p)`` (``p`` the attention weights' box) with ``lead`` extra dims at 1."""
    if len(node.inputs) != 3 or any(len(sh) < 2 for sh in node.in_shapes):
        raise _refuse(node, "scaled_dot_product_attention needs q, k, v that all depend on "
                      "the input, with >= 2 dims per sample")
    sc = _sdpa_scale(node)
    q, k, v = boxes
    s = imatmul(q, _mT(k))
    s = pad(s.c * sc, s.r * abs(sc))
    p = _softmax_box(node, s, dim=s.c.dim() - 1)
    if lead:
        q, k, v, p = (b.unsqueeze(1) for b in (q, k, v, p))
    return q, k, v, p, sc


def _sdpa_forward(node: Node, boxes: Sequence[Box]) -> Box:
    _, _, v, p, _ = _sdpa_parts(node, boxes)
    return imatmul(p, v)


def _sdpa_backward(node: Node, boxes: Sequence[Box], adj: Box) -> list[Box | None]:
    q, k, v, p, sc = _sdpa_parts(node, boxes, lead=1)
    d_v = imatmul(_mT(p), adj)
    d_p = imatmul(adj, _mT(v))
    d_s = _softmax_vjp(p, d_p, d_p.c.dim() - 1)
    d_s = pad(d_s.c * sc, d_s.r * abs(sc))
    d_q = imatmul(d_s, k)
    d_k = imatmul(_mT(d_s), q)
    return [_adjoint_to(node, i, g, adj) for i, g in enumerate((d_q, d_k, d_v))]


def _sdpa_tangent(node: Node, boxes: Sequence[Box], tans: Sequence[Box | None]) -> Box | None:
    if all(t is None for t in tans):
        return None
    q, k, v, p, sc = _sdpa_parts(node, boxes, lead=1)
    tq, tk, tv = tans
    ts = None if tq is None else imatmul(tq, _mT(k))
    ts = _acc(ts, None if tk is None else imatmul(q, _mT(tk)))
    out = None
    if ts is not None:
        ts = pad(ts.c * sc, ts.r * abs(sc))
        out = imatmul(_softmax_vjp(p, ts, ts.c.dim() - 1), v)
    return _acc(out, None if tv is None else imatmul(p, tv))


# ---------------------------------------------------------------------------------------------
# LayerNorm / RMSNorm
# ---------------------------------------------------------------------------------------------
@dataclass
class _NormStats:
    xhat: Box  # (B, G, n)
    inv_sigma: Box  # (B, G, 1)
    gamma: torch.Tensor | None  # (n,)
    beta: torch.Tensor | None
    n: int


def _norm_params(node: Node) -> tuple[int, Any, Any, float, bool]:
    """``(k, weight, bias, eps, centre)``: normalise over the last ``k`` dims."""
    m = node.module
    name = op_name(node)
    if m is not None:
        shape = tuple(getattr(m, "normalized_shape", ()))
        eps = getattr(m, "eps", None)
        if eps is None:
            eps = torch.finfo(torch.float32).eps
        return len(shape), getattr(m, "weight", None), getattr(m, "bias", None), float(eps), (
            name == "LayerNorm")
    shape_arg = arg(node, 1, "normalized_shape")
    k = len(shape_arg) if isinstance(shape_arg, (tuple, list)) else 1
    w = arg(node, 2, "weight")
    if name == "layer_norm":
        b = arg(node, 3, "bias")
        eps = arg(node, 4, "eps", 1e-5)
    else:
        b = None
        eps = arg(node, 3, "eps", None)
    if is_tensor_arg(w) or is_tensor_arg(b):
        raise _refuse(node, "a normalisation whose weight/bias depend on the input")
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    return k, w, b, float(eps), name == "layer_norm"


def _norm_stats(node: Node, box: Box) -> _NormStats:
    k, w, bias, eps, centre = _norm_params(node)
    shape = tuple(node.in_shapes[0])
    n = math.prod(shape[len(shape) - k:]) if k else 1
    B = box.c.shape[0]
    c = box.c.reshape(B, -1, n)
    r = box.r.reshape(B, -1, n)
    if centre:
        mc = c.mean(-1, keepdim=True)
        pc = c - mc
        rad = (r * (1 - 2.0 / n) + r.sum(-1, keepdim=True) / n).clamp_min(0.0)
        pz = pad(pc, rad, c.abs() + c.abs().mean(-1, keepdim=True) + rad)
    else:
        pc = c
        pz = Box(c, r)
    nc = pc.norm(dim=-1, keepdim=True)
    nr = r.norm(dim=-1, keepdim=True)
    lo_n = (nc - nr).clamp_min(0.0) * (1 - rel64())
    hi_n = (nc + nr) * (1 + rel64())
    s_lo = torch.sqrt(lo_n * lo_n / n + eps) * (1 - rel64())
    s_hi = torch.sqrt(hi_n * hi_n / n + eps) * (1 + rel64())
    if not bool((s_lo > 0).all()):
        raise _refuse(node, "its variance can reach 0 over the ball (and eps = 0): no local "
                      "constant. Use a smaller radius")
    inv = from_bounds(1.0 / s_hi, 1.0 / s_lo)
    a, bb = pz.lo / s_lo, pz.lo / s_hi
    cc, dd = pz.hi / s_lo, pz.hi / s_hi
    lim = math.sqrt(n)
    xlo = torch.minimum(a, bb).clamp(-lim, lim)
    xhi = torch.maximum(cc, dd).clamp(-lim, lim)
    xlo, xhi = _widen(xlo, xhi)
    xhat = from_bounds(xlo, xhi)

    def vec(t: Any) -> torch.Tensor | None:
        if t is None:
            return None
        return t.detach().to(device=box.c.device, dtype=_F64).reshape(n)

    return _NormStats(xhat, inv, vec(w), vec(bias), n)


def _norm_forward(node: Node, boxes: Sequence[Box]) -> Box:
    st = _norm_stats(node, boxes[0])
    y = st.xhat
    if st.gamma is not None:
        y = imul(y, point(st.gamma))
    if st.beta is not None:
        y = iadd(y, point(st.beta))
    return y.reshape(boxes[0].c.shape[0], *node.out_shape)


def _norm_backward(node: Node, boxes: Sequence[Box], adj: Box) -> list[Box | None]:
    _, _, _, _, centre = _norm_params(node)
    st = _norm_stats(node, boxes[0])
    B, R = adj.c.shape[:2]
    n = st.n
    g = adj.reshape(B, R, -1, n)
    if st.gamma is not None:
        g = imul(g, point(st.gamma))
    out = _norm_projection(g, st, n, centre)
    return [out.reshape(B, R, *node.in_shapes[0])]


def _norm_projection(v: Box, st: _NormStats, n: int, centre: bool) -> Box:
    """``(v - mean(v) - xhat mean(xhat * v)) / sigma`` over the last axis (no centring:
    RMSNorm), in interval arithmetic with the rounding of both means: the symmetric factor
    that the normalisation's Jacobian and its transpose share."""
    xh = st.xhat.unsqueeze(1)
    m2 = isum(imul(v, xh), -1, keepdim=True)
    m2 = Box(m2.c / n, m2.r / n + rel64() * m2.mag / n)
    u = imul(xh, m2)
    h = pad(v.c - u.c, v.r + u.r)
    if centre:
        m1 = isum(v, -1, keepdim=True)
        h = pad(h.c - m1.c / n, h.r + m1.r / n + rel64() * m1.mag / n)
    return imul(h, st.inv_sigma.unsqueeze(1))


def _norm_tangent(node: Node, boxes: Sequence[Box], tans: Sequence[Box | None]) -> Box | None:
    """``J t = gamma * (t - mean(t) - xhat mean(xhat * t)) / sigma`` (no centring: RMSNorm)."""
    t0 = tans[0]
    if t0 is None:
        return None
    _, _, _, _, centre = _norm_params(node)
    st = _norm_stats(node, boxes[0])
    B, R = t0.c.shape[:2]
    n = st.n
    t = t0.reshape(B, R, -1, n)
    out = _norm_projection(t, st, n, centre)
    if st.gamma is not None:
        out = imul(out, point(st.gamma))
    return out.reshape(B, R, *node.out_shape)


# ---------------------------------------------------------------------------------------------
# ops linear in each input jointly (add / sub / cat of several inputs)
# ---------------------------------------------------------------------------------------------
def _slot_fn(node: Node, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def g(x: torch.Tensor) -> torch.Tensor:
        args = [x if j == i else torch.zeros((x.shape[0], *s), dtype=x.dtype, device=x.device)
                for j, s in enumerate(node.in_shapes)]
        zeros = [torch.zeros_like(a) for a in args]
        return node.fn(*args) - node.fn(*zeros)

    return g


def _signs(node: Node, i: int, device: torch.device) -> torch.Tensor:
    key = f"_local_sign_{i}"
    s = node.cache.get(key)
    if s is None or s.device != device:
        with torch.no_grad():
            s = torch.sign(_slot_fn(node, i)(
                torch.ones((1, *node.in_shapes[i]), dtype=_F64, device=device)))
        node.cache[key] = s
    return s


def _vjp_slot(node: Node, i: int, y: torch.Tensor) -> torch.Tensor:
    x0 = torch.zeros((y.shape[0], *node.in_shapes[i]), dtype=_F64, device=y.device,
                     requires_grad=True)
    with torch.enable_grad():
        out = _slot_fn(node, i)(x0)
        (gr,) = torch.autograd.grad(out, x0, y, allow_unused=True)
    return torch.zeros_like(x0) if gr is None else gr.detach()


def _multi_forward(node: Node, boxes: Sequence[Box]) -> Box:
    with torch.no_grad():
        c = node.fn(*[b.c for b in boxes])
        r = torch.zeros_like(c)
        mag = torch.zeros_like(c)
        for i, b in enumerate(boxes):
            sg = _signs(node, i, b.c.device)
            g = _slot_fn(node, i)
            r = r + g(b.r) * sg
            mag = mag + g(b.mag) * sg
    return pad(c, r, mag)


def _multi_backward(node: Node, boxes: Sequence[Box], adj: Box) -> list[Box | None]:
    B, R = adj.c.shape[:2]
    flat_c = adj.c.reshape(B * R, *node.out_shape)
    flat_r = adj.r.reshape(B * R, *node.out_shape)
    out: list[Box | None] = []
    for i, b in enumerate(boxes):
        sg = _signs(node, i, b.c.device)
        c = _vjp_slot(node, i, flat_c)
        r = _vjp_slot(node, i, flat_r * sg)
        m = _vjp_slot(node, i, (flat_c.abs() + flat_r) * sg)
        box = pad(c, r, m)
        out.append(box.reshape(B, R, *node.in_shapes[i]))
    return out


def _multi_tangent(node: Node, boxes: Sequence[Box], tans: Sequence[Box | None]
                   ) -> Box | None:
    out: Box | None = None
    for i, t in enumerate(tans):
        if t is None:
            continue
        B, R = t.c.shape[:2]
        dev = t.c.device
        sg = _signs(node, i, dev)
        g = _slot_fn(node, i)
        with torch.no_grad():
            fc = t.c.reshape(B * R, *node.in_shapes[i])
            fr = t.r.reshape(B * R, *node.in_shapes[i])
            c = g(fc)
            r = g(fr) * sg
            m = g(fc.abs() + fr) * sg
        box = pad(c, r, m).reshape(B, R, *node.out_shape)
        out = _acc(out, box)
    return out


MULTI = LocalOp("linear in each input (exact)", _multi_forward, _multi_backward, _multi_tangent)

_UNARY = {"exp", "log", "sqrt", "rsqrt", "reciprocal", "square", "pow"}
_MATMUL = {"matmul", "bmm"}
_TABLE: dict[str, LocalOp] = {
    **{k: LocalOp("product |y||dx| + |x||dy|", _mul_forward, _mul_backward, _mul_tangent)
       for k in ("mul", "multiply")},
    **{k: LocalOp("division x/y, y away from 0", _div_forward, _div_backward, _div_tangent)
       for k in ("truediv", "div", "divide", "true_divide")},
    **{k: LocalOp("softmax p * (a - <a, p>)", _softmax_forward, _softmax_backward,
                  _softmax_tangent) for k in ("softmax", "Softmax")},
    **{k: LocalOp("layer norm, variance bounded below", _norm_forward, _norm_backward,
                  _norm_tangent) for k in ("LayerNorm", "layer_norm")},
    **{k: LocalOp("rms norm, rms bounded below", _norm_forward, _norm_backward, _norm_tangent)
       for k in ("RMSNorm", "rms_norm")},
    **{k: LocalOp("bilinear X Y", _matmul_forward, _matmul_backward, _matmul_tangent)
       for k in _MATMUL},
    "scaled_dot_product_attention": LocalOp(
        "softmax(q k^T s) v: bilinear, softmax, bilinear", _sdpa_forward, _sdpa_backward,
        _sdpa_tangent),
    **{k: LocalOp(f"{k} on a bounded range (mean value)", _unary_forward, _unary_backward,
                  _unary_tangent) for k in _UNARY},
}
_MULTI_RULES = {"add/sub", "cat"}


def ball_factor(node: Node, boxes: Sequence[Box], norm: str) -> torch.Tensor | None:
    r"""Per sample, a bound ``k`` with ``||d M||_* <= k ||d||_*`` for every secant matrix
    ``M`` of a one-input node over its box (``None``: no such rule, the caller converts the
    ball to a box). Secant matrices are averages of Jacobians over segments in the box, so a
    bound on ``sup ||J||`` over the box suffices (``||d M|| = ||M^T d^T||``):

    * softmax: ``J = diag(p) - p p^T`` is symmetric, Gershgorin row ``i``:
      ``2 p_i (1 - p_i)``, so ``||J||_2 = ||J||_1 = ||J||_inf <= min(1/2, 2 max_i p_i^hi)``;
    * LayerNorm (l2 only): ``J = diag(gamma) (P - xhat xhat^T / n) / sigma`` per normalised
      group (block-diagonal), with ``P - xhat xhat^T / n`` symmetric with eigenvalues in
      ``[0, 1]`` (``xhat`` lies in ``1^perp`` with ``|xhat|^2 <= n``), hence
      ``||J||_2 <= max |gamma| / sigma_lo``; RMSNorm likewise (``I - xhat xhat^T / n``).
    """
    if len(node.inputs) != 1 or node.kind != "op":
        return None
    name = op_name(node)
    B = boxes[0].c.shape[0]
    if name in ("softmax", "Softmax"):
        p = _softmax_box(node, boxes[0])
        top = (2 * p.hi.reshape(B, -1).amax(dim=1)).clamp(max=0.5)
        return top * (1 + rel64())
    if name in ("LayerNorm", "layer_norm", "RMSNorm", "rms_norm") and norm == "2":
        st = _norm_stats(node, boxes[0])
        inv = st.inv_sigma.hi.reshape(B, -1).amax(dim=1)
        g = 1.0 if st.gamma is None else float(st.gamma.abs().max())
        return inv * g * (1 + rel64())
    return None


_NO_RULE = ("no local rule (local rules cover activations, add/sub/cat, products, matmul, "
            "division, exp/log/sqrt/rsqrt/reciprocal/pow, softmax, LayerNorm, RMSNorm, "
            "scaled_dot_product_attention)")


def _why_not(node: Node, name: str) -> str | None:
    """Why a node whose op has a local rule is still not covered (``None``: it is)."""
    if name in ("mul", "multiply") and len(node.inputs) != 2:
        return _NO_RULE
    if name in ("truediv", "div", "divide", "true_divide") and arg(
            node, 2, "rounding_mode") is not None:
        return "rounded division is discontinuous"
    if name in _UNARY and len(node.inputs) != 1:
        return f"{name} of several input-dependent tensors"
    if name in _UNARY and not is_tensor_arg(arg(node, 0, "input")):
        return f"{name} with an input-dependent exponent"
    return None


def local_op(node: Node) -> LocalOp | str:
    """The local rule of a non-linear node, or the reason there is none."""
    if node.kind == "activation":
        return ACTIVATION
    rname = getattr(node.rule, "name", "")
    if rname in _MULTI_RULES and node.unsupported is None:
        return MULTI
    name = "pow" if node.call.key is operator.pow else op_name(node)
    if name not in _TABLE:
        return _NO_RULE
    return _why_not(node, name) or _TABLE[name]
