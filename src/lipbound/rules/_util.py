r"""Small helpers shared by the rule families (argument access, declared constants, broadcasting).

Broadcasting (:func:`copy_factor`, :func:`copy_norm`, :func:`broadcast_constants`): an
element-wise op whose input ``x`` (``n`` entries) is broadcast to the output shape (``m = k n``
entries) sees ``B x``, where ``B`` copies every entry of ``x`` exactly ``k = m / n`` times
(broadcasting repeats the whole input along the new or size-1 dims). ``B`` has one 1 per row
and ``k`` ones per column, with disjoint column supports, so ``B^T B = k I`` and

.. math:: \|B\|_\infty = 1, \qquad \|B\|_1 = k, \qquad \|B\|_2 = \sqrt{k}.

If the op is ``c``-Lipschitz in that argument on the output shape, it is ``c \|B\|``-Lipschitz
in ``x``. Every rule whose inputs may have another shape than ``node.out_shape`` (add, sub,
rsub, maximum/minimum, mul/div by a constant, clamp/activations with a constant operand)
multiplies its per-input constants by these factors here, in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._registry import NodeConstant, Rule, RuleContext, add_rule

if TYPE_CHECKING:  # pragma: no cover
    from ..graph.types import Node

__all__ = [
    "arg",
    "batched_dim",
    "broadcast_constants",
    "const_rule",
    "copy_factor",
    "copy_norm",
    "declare",
    "is_tensor_arg",
    "numel",
]


def is_tensor_arg(a: Any) -> bool:
    return type(a).__name__ == "TensorArg"


def arg(node: Node, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` (or positional ``pos``) of the call that produced ``node``.

    Positions follow the functional form: ``pos=0`` is the input tensor for functions and
    methods alike (``x.view(...)`` is recorded as ``view(x, ...)``).
    """
    kw = node.call.kwargs
    if name in kw:
        return kw[name]
    args = node.call.args
    if pos < len(args):
        return args[pos]
    return default


def numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def batched_dim(dim: int, ndim_no_batch: int) -> int | None:
    """Map a dim of the batched tensor to a dim of one sample (``None`` for the batch dim)."""
    nd = ndim_no_batch + 1
    d = dim + nd if dim < 0 else dim
    if d == 0:
        return None
    return d - 1


def copy_factor(in_shape: Sequence[int], out_shape: Sequence[int], norm: str) -> float:
    """``||B||`` of the broadcast from ``in_shape`` to ``out_shape`` (module docstring).

    >>> [copy_factor((2, 1), (2, 4), n) for n in ("2", "1", "inf")]
    [2.0, 4.0, 1.0]
    """
    n, m = numel(in_shape), numel(out_shape)
    if n == 0 or m <= n:
        return 1.0
    k = m / n
    return {"2": math.sqrt(k), "1": k, "inf": 1.0}[norm]


def copy_norm(
    w: torch.Tensor | float, in_shape: Sequence[int], out_shape: Sequence[int], norm: str
) -> float:
    """Norm of ``x -> w * (B x)``: a diagonal weight ``|w|`` (broadcastable to ``out_shape``)
    after the broadcast ``B`` from ``in_shape``.

    ``D = diag(|w|) B`` has one entry per row, so ``||D||_inf = max |w|``; column ``j`` holds
    the weights of the copies of ``x_j`` (disjoint supports), so ``||D||_1 = max_j sum_{i ~ j}
    |w_i|`` and ``D^T D`` is diagonal with ``sum_{i ~ j} w_i^2``: ``||D||_2 = sqrt(max_j ...)``.
    The sums over copies are ``sum_to_size`` (the adjoint of broadcasting), in float64.
    Exact (up to float64 rounding, covered by the registry's margin); without broadcasting
    it is ``max |w|`` in every norm.
    """
    if not isinstance(w, torch.Tensor):
        return abs(float(w)) * copy_factor(in_shape, out_shape, norm)
    a = w.detach().to(torch.float64).abs()
    if a.numel() == 0 or numel(out_shape) == 0:
        return 0.0
    if norm == "inf":
        return float(a.max())
    try:
        full = torch.broadcast_to(a, tuple(out_shape))
        p = full if norm == "1" else full * full
        s = p.sum_to_size(tuple(in_shape)) if tuple(in_shape) != tuple(out_shape) else p
    except RuntimeError:  # not a per-sample broadcast we can follow: bound each part apart
        return float(a.max()) * copy_factor(in_shape, out_shape, norm)
    return float(s.max()) if norm == "1" else math.sqrt(float(s.max()))


def broadcast_constants(node: Node, constants: Sequence[float], norm: str) -> tuple[float, ...]:
    """``constants[i] * ||B_i||``: per-input constants of an element-wise op measured on its
    output shape, turned into constants w.r.t. the (possibly broadcast) inputs themselves."""
    shapes = node.in_shapes or ((),) * len(constants)
    return tuple(
        float(c) * copy_factor(s, node.out_shape, norm) for c, s in zip(constants, shapes)
    )


def const_rule(
    values: dict[str, float] | float, how: str, *, combine: dict[str, str] | None = None
) -> Callable[[Node, RuleContext], NodeConstant]:
    """A rule returning a fixed constant per norm (the same for every input)."""

    def rule(node: Node, ctx: RuleContext) -> NodeConstant:
        v = values if isinstance(values, float) else values[ctx.norm]
        comb = (combine or {}).get(ctx.norm, "sum")
        return NodeConstant(
            constants=(float(v),) * max(1, len(node.inputs)),
            certified=True,
            how=how,
            combine=comb,  # type: ignore[arg-type]
        )

    return rule


def declare(
    keys: Sequence[Any],
    *,
    name: str,
    kind: str,
    constant: Callable[[Node, RuleContext], NodeConstant],
    check: Callable[[Node], str | None] | None = None,
    slope_range: Callable[[Node], tuple[float, float]] | None = None,
    norms: tuple[str, ...] = ("1", "2", "inf"),
    **meta: Any,
) -> Rule:
    """Register one rule under several keys (used by the family tables)."""
    rule = Rule(
        name=name,
        kind=kind,
        constant=constant,
        slope_range=slope_range,
        check=check,
        norms=norms,
        meta=dict(meta),
    )
    add_rule(list(keys), rule)
    return rule
