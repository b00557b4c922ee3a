"""Per-operator Lipschitz rules, one file per family, and the public :func:`register_rule`.

Families: :mod:`~lipbound.rules.linear` (Linear, Conv*, ConvTranspose*, AvgPool*, BatchNorm,
merged chains), :mod:`~lipbound.rules.activation`, :mod:`~lipbound.rules.pooling` (max-pool),
:mod:`~lipbound.rules.normalization`, :mod:`~lipbound.rules.structural` (reshapes, add, cat,
softmax...). :func:`classify` attaches a rule, a kind and (for activations) a slope range to a
captured node, or the reason why no rule covers it.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import activation, linear, normalization, pooling, structural  # noqa: F401
from ._registry import (
    ROUND_REL,
    NodeConstant,
    Rule,
    RuleContext,
    add_hint,
    get_rule,
    has_module_rule,
    hint_for,
    lookup,
    register_rule,
    registered_keys,
    widen_range,
)
from ._util import arg, batched_dim, is_tensor_arg, numel

if TYPE_CHECKING:  # pragma: no cover
    from ..graph.types import Node

__all__ = [
    "ROUND_REL",
    "NodeConstant",
    "Rule",
    "RuleContext",
    "arg",
    "batched_dim",
    "classify",
    "get_rule",
    "has_module_rule",
    "is_tensor_arg",
    "lookup",
    "register_rule",
    "registered_keys",
    "widen_range",
]

_NO_RULE = (
    "no Lipschitz rule is registered for it; give it one with lipbound.register_rule(...) or "
    "use lipbound.lower_bound(...), which needs no rules"
)
_ATTN = (
    "attention multiplies two functions of the input (q k^T, then by v): no global Lipschitz "
    "constant. Use lower_bound, or register_rule with a constant valid on your input domain"
)
_EMB = (
    "an embedding looks up integer indices: the network is not a function of a continuous "
    "input there. Bound the network from the embedding output on instead"
)
for _k in [nn.MultiheadAttention, F.scaled_dot_product_attention, F.multi_head_attention_forward]:
    add_hint(_k, _ATTN)
for _k in [nn.Embedding, nn.EmbeddingBag, F.embedding, F.embedding_bag]:
    add_hint(_k, _EMB)
for _k in [torch.exp, "exp", torch.log, "log", torch.pow, "pow", operator.pow, torch.sqrt,
           "sqrt", torch.rsqrt, "rsqrt", torch.reciprocal, "reciprocal"]:
    add_hint(_k, "not globally Lipschitz (unbounded derivative); " + _NO_RULE)
for _k in [nn.Hardshrink, F.hardshrink, nn.Threshold, F.threshold, torch.sign, "sign",
           torch.round, "round", torch.floor, "floor", torch.ceil, "ceil"]:
    add_hint(_k, "discontinuous: no Lipschitz constant")


def classify(node: Node) -> None:
    """Attach ``rule``, ``kind``, ``slope_range`` and ``unsupported`` to a node.

    ``unsupported`` is ``None`` when a rule covers the node, else the reason and what
    to do. Linear and activation nodes must have exactly one tensor input. An element-wise op
    whose constant operand broadcasts its input to more entries (``torch.maximum(x, c)`` with
    ``c`` larger than ``x``) copies entries, so its Jacobian is not diagonal: it is an ``"op"``
    (its rule multiplies the constant by the copy factor), not an activation. The slope range
    is widened by the registry's rounding margin (:func:`~lipbound.rules._registry.widen_range`).
    """
    rule = lookup(node)
    node.rule = rule
    node.slope_range = None
    if rule is None:
        node.kind = "op"
        node.unsupported = hint_for(node.call.key) or _NO_RULE
        return
    kind = rule.kind_for(node)
    reason = rule.check(node) if rule.check is not None else None
    if reason is None and kind in ("linear", "activation") and len(node.inputs) != 1:
        reason = f"a {kind} op must have one input that depends on the model input"
    if reason is None and node.call.batch_mixing:
        reason = "mixes the samples of a batch (acts on the batch dimension)"
    if kind == "activation" and node.in_shapes and numel(node.in_shapes[0]) != numel(
        node.out_shape
    ):
        kind = "op"  # broadcast by a constant operand: copies entries, not diagonal
    node.unsupported = reason
    node.kind = kind if reason is None else "op"  # type: ignore[assignment]
    if reason is None and kind == "activation" and rule.slope_range is not None:
        node.slope_range = widen_range(rule.slope_range(node),
                                       f"node {node.qualname!r} ({node.op})")
