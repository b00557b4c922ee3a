r"""Affine nodes in interval form: ``W c + b +- |W| r`` forward, ``W^T a +- |W|^T s`` backward.

A captured ``"linear"`` node (possibly a merged chain, :func:`lipbound.graph.simplify`) is
applied part by part (``part_nodes``; one part for an unmerged node). Each part ``P``
(matrix ``W``, bias ``b``) needs four batched maps: ``P`` itself (the node's ``fn``, float64),
its transpose ``W^T`` (autograd through ``fn``: the gradient of an affine map is ``W^T``),
``|W|`` and ``|W|^T``, and, for the l2 row norms of the first layers, ``W o W`` (entry-wise
square; optional). ``|W|`` comes from the part's kind:

* weight layers (``nn.Linear``, ``nn.ConvNd``, ``nn.ConvTransposeNd``, BatchNorm as a channel
  affine, folded BatchNorm), through :func:`lipbound.graph._modules.materialize` (eval
  weights of parametrised layers): the same op with ``|weight|`` and no bias;
* ops whose matrix has at most one non-zero per row (reshapes, selections, zero padding,
  copies and broadcasts, negation, multiplication / division by a constant, adding a
  constant): ``|W| x = sign(W 1) * (W x)`` and ``|W|^T y = W^T (sign(W 1) * y)``, since row
  ``i`` of ``W`` is ``s_i e_{pi(i)}^T`` and ``(W 1)_i = s_i``;
* averaging ops with non-negative weights (average pooling, sums, means, linear/nearest
  upsampling): ``|W| = W``;
* anything else with at most :data:`DENSE_ENTRIES` matrix entries: the dense ``W``
  (:meth:`lipbound.graph.Node.dense`) and ``|W|``; larger ones are refused with the node named.

Soundness: for ``|x - c| <= r``, ``|W x - W c| <= |W| r`` entry-wise (triangle inequality),
and the composition of the parts' boxes encloses the chain (each part's box encloses its
exact image). Rounding: ``fl(W c + b)`` is within ``gamma_n (|W| |c| + |b|)`` of ``W c + b``,
so the radius is ``|W| (r + rho (|c| + r)) + rho |b| + TINY`` with ``rho = REL64``
(:mod:`lipbound.local.interval`), one ``|W|`` product thanks to linearity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError, UnsupportedNode
from ..graph.modules import FoldedBatchNorm, materialize
from ..graph.types import Node
from ..rules.linear import entrywise_map
from .interval import TINY, Box, rel64

__all__ = ["DENSE_ENTRIES", "LinearPart", "linear_backward", "linear_parts"]

#: Largest dense matrix (entries) built for a linear op without a structured ``|W|``.
DENSE_ENTRIES = 1 << 22
_F64 = torch.float64
Map = Callable[[torch.Tensor], torch.Tensor]

_ONE_PER_ROW = {"reshape", "selection", "identity (eval)", "copy", "add/sub", "neg",
                "scalar mul", "scalar div"}
_NONNEG_MODULES = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_NONNEG_FUNCTIONS = {
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, torch.sum, torch.mean, "sum", "mean",
}


def _vjp(fn: Map, y: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """``W^T y`` for the affine ``fn`` (batched ``y`` of shape ``(N, *out)``)."""
    x0 = torch.zeros((y.shape[0], *in_shape), dtype=_F64, device=y.device, requires_grad=True)
    with torch.enable_grad():
        out = fn(x0)
        (g,) = torch.autograd.grad(out, x0, y.to(out.dtype), allow_unused=True)
    return torch.zeros_like(x0) if g is None else g.detach()


@dataclass
class LinearPart:
    """One affine part with its interval maps (see the module docstring)."""

    node: Node
    fn: Map
    abs_fwd: Map
    abs_t: Map
    sq_fwd: Map | None
    one_per_row: bool
    copies: bool
    bias_abs: torch.Tensor | None = None

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.node.in_shapes[0])

    def bias(self, like: torch.Tensor) -> torch.Tensor:
        if self.bias_abs is None or self.bias_abs.device != like.device:
            with torch.no_grad():
                z = torch.zeros((1, *self.in_shape), dtype=_F64, device=like.device)
                self.bias_abs = self.fn(z).abs()
        return self.bias_abs

    def forward(self, box: Box) -> Box:
        with torch.no_grad():
            c = self.fn(box.c)
            r = self.abs_fwd(box.r + rel64() * (box.c.abs() + box.r))
            return Box(c, r + rel64() * self.bias(c) + TINY)

    def tangent(self, t: Box) -> Box:
        """Box of ``W t`` for columns ``t`` in ``t`` (shape ``(N, *in)``; no bias)."""
        with torch.no_grad():
            c = self.fn(t.c) - self.fn(torch.zeros_like(t.c[:1]))
            r = self.abs_fwd(t.r + rel64() * (t.c.abs() + t.r))
            return Box(c, r + 2 * rel64() * self.bias(c) + TINY)

    def lin_t(self, y: torch.Tensor) -> torch.Tensor:
        return _vjp(self.fn, y, self.in_shape)

    def backward(self, adj: Box) -> Box:
        """Adjoint box ``W^T a`` for rows ``a`` in ``adj`` (shape ``(N, *out)``)."""
        c = self.lin_t(adj.c)
        with torch.no_grad():
            r = self.abs_t(adj.r + rel64() * (adj.c.abs() + adj.r))
        return Box(c, r + TINY)


def _weight_maps(m: nn.Module) -> tuple[Map, Map | None] | None:
    """``(|W| x, (W o W) x)`` for a plain weight layer (:func:`entrywise_map`), else ``None``."""
    af = entrywise_map(m, 1)
    return None if af is None else (af, entrywise_map(m, 2))


def _part(node: Node) -> LinearPart:
    fn = node.fn
    in_shape = tuple(node.in_shapes[0])
    n_in, n_out = math.prod(in_shape), math.prod(node.out_shape)
    rule = node.rule
    rname = getattr(rule, "name", "")
    key = node.call.key
    mod = node.module
    if mod is not None and not isinstance(mod, nn.Sequential):
        m = materialize(mod.materialize() if isinstance(mod, FoldedBatchNorm) else mod)
        maps = _weight_maps(m)
        if maps is not None:
            af, sf = maps

            def at(y: torch.Tensor, _af: Map = af) -> torch.Tensor:
                return _vjp(_af, y, in_shape)

            return LinearPart(node, fn, af, at, sf, one_per_row=False, copies=True)
    if rname in _ONE_PER_ROW:
        with torch.no_grad():
            ones = torch.ones((1, *in_shape), dtype=_F64)
            sgn = torch.sign(fn(ones) - fn(torch.zeros_like(ones)))

        def lin(x: torch.Tensor) -> torch.Tensor:
            return fn(x) - fn(torch.zeros_like(x[:1]))

        def af1(x: torch.Tensor) -> torch.Tensor:
            return lin(x) * sgn.to(x.device)

        def at1(y: torch.Tensor) -> torch.Tensor:
            return _vjp(fn, y * sgn.to(y.device), in_shape)

        return LinearPart(node, fn, af1, at1, af1, one_per_row=True, copies=n_out > n_in)
    if isinstance(mod, _NONNEG_MODULES) or _in(key, _NONNEG_FUNCTIONS) or (
        isinstance(mod, nn.Upsample) and mod.mode in ("nearest", "linear", "bilinear",
                                                      "trilinear")
    ):
        def lin2(x: torch.Tensor) -> torch.Tensor:
            return fn(x) - fn(torch.zeros_like(x[:1]))

        def at2(y: torch.Tensor) -> torch.Tensor:
            return _vjp(fn, y, in_shape)

        return LinearPart(node, fn, lin2, at2, None, one_per_row=False, copies=True)
    if n_in * n_out <= DENSE_ENTRIES:
        W, _ = node.dense(_F64)
        Wa = W.abs()

        def af3(x: torch.Tensor) -> torch.Tensor:
            return (x.reshape(x.shape[0], -1) @ Wa.T.to(x.device)).reshape(
                x.shape[0], *node.out_shape)

        def at3(y: torch.Tensor) -> torch.Tensor:
            return (y.reshape(y.shape[0], -1) @ Wa.to(y.device)).reshape(y.shape[0], *in_shape)

        def sf3(x: torch.Tensor) -> torch.Tensor:
            return (x.reshape(x.shape[0], -1) @ (W * W).T.to(x.device)).reshape(
                x.shape[0], *node.out_shape)

        return LinearPart(node, fn, af3, at3, sf3, one_per_row=False, copies=True)
    raise UnsupportedModelError(
        [UnsupportedNode(node.qualname, node.op,
                         f"local bounds need |W| of this linear op; it has no structured form "
                         f"and its dense matrix ({n_out} x {n_in}) exceeds "
                         f"lipbound.local.linear.DENSE_ENTRIES = {DENSE_ENTRIES}")],
        what="local bounds cannot handle some linear op(s)",
    )


def _in(key: object, table: set[object]) -> bool:
    try:
        return key in table
    except TypeError:
        return False


def linear_parts(node: Node) -> list[LinearPart]:
    """The parts of a (merged) linear node, in application order, with their interval maps."""
    cached = node.cache.get("local_parts")
    if cached is not None:
        return list(cached)
    parts = node.part_nodes or (node,)
    out = [_part(p) for p in parts]
    node.cache["local_parts"] = tuple(out)
    return out


def linear_backward(node: Node, adj: Box) -> Box:
    """Adjoint box ``W^T a`` of a (merged) linear node for rows ``a`` in ``adj``
    (``(B, R, *out)``), part by part from the last."""
    B, R = adj.c.shape[:2]
    box = Box(adj.c.reshape(B * R, *adj.c.shape[2:]), adj.r.reshape(B * R, *adj.c.shape[2:]))
    for part in reversed(linear_parts(node)):
        box = part.backward(box)
    return Box(box.c.reshape(B, R, *box.c.shape[1:]), box.r.reshape(B, R, *box.c.shape[1:]))
