"""Small helpers shared by the rule families (argument access, declared constants)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._registry import NodeConstant, Rule, RuleContext, add_rule

if TYPE_CHECKING:  # pragma: no cover
    from ..graph.types import Node

__all__ = ["arg", "const_rule", "declare", "is_tensor_arg", "numel", "batched_dim"]


def is_tensor_arg(a: Any) -> bool:
    return type(a).__name__ == "TensorArg"


def arg(node: Node, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` (or positional ``pos``) of the call that produced ``node``.

    Positions follow the functional form: ``pos=0`` is the input tensor for functions and
    methods alike (``x.view(...)`` is recorded as ``view(x, ...)``).
    """
    kw = node.meta.get("kwargs") or {}
    if name in kw:
        return kw[name]
    args = node.meta.get("args") or ()
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
