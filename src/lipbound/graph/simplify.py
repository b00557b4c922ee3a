"""Simplify a captured graph: drop identities, fold BatchNorm, merge chains of linear ops.

1. Identities in eval mode (``nn.Identity``, dropout, ``.contiguous()``, adaptive pooling to
   the input's own size...) are removed.
2. An eval BatchNorm whose single parent is a Linear / Conv (zero padding) used only by it is
   folded into it (:class:`~lipbound.graph.modules.FoldedBatchNorm`, ``W' = diag(s) W``,
   ``b' = s b + t``). Any other BatchNorm stays a linear (diagonal) node, applied in eval mode.
3. A linear node whose single parent is a linear node used by nobody else is merged with it:
   the merged node's ``module`` is an ``nn.Sequential`` of the parts (a reshape/flatten or other
   function part is wrapped in :class:`~lipbound.graph.modules.FnModule`), ``parts`` lists the
   qualnames and ``part_nodes`` the original nodes. Since ``||A B|| <= ||A|| ||B||``,
   measuring the product is never looser than multiplying the parts' norms.

The result is a new :class:`OpGraph`; the input graph is not modified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .capture import call_module_as
from .modules import EvalBatchNorm, FnModule, FoldedBatchNorm
from .types import Call, Node, OpGraph

__all__ = ["simplify"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _plain_module_call(node: Node) -> bool:
    return (
        node.module is not None
        and node.call.fx_op == "call_module"
        and node.call.getitem is None
        and not node.call.kwargs
        and len(node.call.args) == 1
    )


_ADAPTIVE = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)


def _is_identity(node: Node) -> bool:
    rule = node.rule
    if (
        isinstance(node.module, _ADAPTIVE)
        and _plain_module_call(node)
        and not node.unsupported
        and len(node.inputs) == 1
        and tuple(node.in_shapes[0]) == tuple(node.out_shape)
    ):
        return True  # adaptive pooling to the input's own size is the identity
    return (
        node.kind == "linear"
        and rule is not None
        and bool(rule.meta.get("identity"))
        and len(node.inputs) == 1
        and tuple(node.in_shapes[0]) == tuple(node.out_shape)
    )


def _is_bn(node: Node) -> bool:
    return (
        node.kind == "linear"
        and isinstance(node.module, _BN)
        and node.module.running_mean is not None
        and _plain_module_call(node)
    )


def _part_module(node: Node) -> nn.Module:
    """The module applying ``node`` alone (eval semantics), for a merged ``nn.Sequential``."""
    if isinstance(node.module, (FoldedBatchNorm, EvalBatchNorm, nn.Sequential)):
        return node.module
    if _is_bn(node):
        return EvalBatchNorm(node.module)  # type: ignore[arg-type]
    if _plain_module_call(node) and node.module is not None:
        return node.module
    return FnModule(node.fn, node.qualname)


def _module_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return call_module_as(module, x)

    return fn


def _parts(node: Node) -> list[Node]:
    return list(node.part_nodes or (node,))


def _merged(first: Node, second: Node, name: str) -> Node:
    from ..rules import classify
    from ..rules.linear import MERGED_KEY

    parts = _parts(first) + _parts(second)
    mods: list[nn.Module] = []
    for p in (first, second):
        m = _part_module(p)
        if type(m) is nn.Sequential:
            mods.extend(list(m))
        else:
            mods.append(m)
    seq = nn.Sequential(*mods)
    node = Node(
        name=name,
        qualname="+".join(p.qualname for p in parts),
        op="merged(" + ", ".join(p.op for p in parts) + ")",
        kind="linear",
        inputs=first.inputs,
        in_shapes=first.in_shapes,
        out_shape=second.out_shape,
        fn=_module_fn(seq),
        module=seq,
        parts=tuple(p.qualname for p in parts),
        call=Call(key=MERGED_KEY, fx_op="merged"),
        part_nodes=tuple(parts),
    )
    classify(node)
    return node


def _folded(lin: Node, bn: Node) -> Node:
    from ..rules import classify

    mod = FoldedBatchNorm(lin.module, bn.module)  # type: ignore[arg-type]
    node = Node(
        name=bn.name,
        qualname=f"{lin.qualname}+{bn.qualname}",
        op=f"{lin.op}+{bn.op}",
        kind="linear",
        inputs=lin.inputs,
        in_shapes=lin.in_shapes,
        out_shape=bn.out_shape,
        fn=_module_fn(mod),
        module=mod,
        parts=(lin.qualname, bn.qualname),
        call=Call(key=FoldedBatchNorm, fx_op="call_module", args=(None,)),
        folded=(lin, bn),
    )
    classify(node)
    node.part_nodes = (node,)
    return node


def simplify(graph: OpGraph, *, merge: bool = True, fold_batchnorm: bool = True) -> OpGraph:
    """Return a simplified copy of ``graph`` (see the module docstring).

    >>> import torch
    >>> from torch import nn
    >>> from lipbound.graph import capture
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.AvgPool2d(2),
    ...                     nn.Flatten(), nn.Linear(8, 3), nn.Dropout(), nn.ReLU(),
    ...                     nn.Linear(3, 1))
    >>> g = simplify(capture(net, (1, 6, 6)))
    >>> [(n.qualname, n.kind) for n in g]  # doctest: +NORMALIZE_WHITESPACE
    [('input', 'input'), ('0+1+2+3+4', 'linear'), ('6', 'activation'), ('7', 'linear'),
     ('output', 'output')]
    """
    nodes: dict[str, Node] = {
        k: dataclasses.replace(n, cache={}) for k, n in graph.nodes.items()
    }
    nodes = _drop_identities(nodes)
    if fold_batchnorm:
        nodes = _fold_batchnorms(nodes)
    if merge:
        nodes = _merge_linear_chains(nodes)
    return OpGraph(nodes=nodes, input_shape=graph.input_shape, model=graph.model)


def _drop_identities(nodes: dict[str, Node]) -> dict[str, Node]:
    """1. identities: every user of an identity node reads its input instead."""
    for name in list(nodes):
        n = nodes[name]
        if _is_identity(n):
            for m in nodes.values():
                if name in m.inputs:
                    m.inputs = tuple(n.inputs[0] if i == name else i for i in m.inputs)
            del nodes[name]
    return nodes


def _fold_batchnorms(nodes: dict[str, Node]) -> dict[str, Node]:
    """2. fold BatchNorm into a preceding Linear/Conv used only by it."""
    for name in list(nodes):
        n = nodes.get(name)
        if n is None or not _is_bn(n):
            continue
        parent = nodes[n.inputs[0]]
        if (
            parent.kind == "linear"
            and isinstance(parent.module, _FOLDABLE)
            and _plain_module_call(parent)
            and getattr(parent.module, "padding_mode", "zeros") == "zeros"
            and sum(parent.name in m.inputs for m in nodes.values()) == 1
            and _channels_match(parent.module, n.module, tuple(parent.out_shape))
        ):
            nodes = _replace_pair(nodes, parent.name, name, _folded(parent, n))
    return nodes


def _merge_linear_chains(nodes: dict[str, Node]) -> dict[str, Node]:
    """3. merge chains of linear nodes: one pass in topological order (a parent is already
    merged with its own chain)."""
    n_users: dict[str, int] = dict.fromkeys(nodes, 0)
    for n in nodes.values():
        for i in n.inputs:
            n_users[i] += 1
    for name in list(nodes):
        n = nodes[name]
        if n.kind != "linear" or len(n.inputs) != 1:
            continue
        parent = nodes[n.inputs[0]]
        if parent.kind != "linear" or n_users[parent.name] != 1:
            continue
        nodes = _replace_pair(nodes, parent.name, name, _merged(parent, n, name))
    return nodes


def _channels_match(lin: Any, bn: Any, out_shape: tuple[int, ...] = ()) -> bool:
    if isinstance(lin, nn.Linear) and len(out_shape) != 1:
        return False  # BatchNorm1d on (N, L, C) would normalise L, not the features
    out = lin.out_features if isinstance(lin, nn.Linear) else lin.out_channels
    return int(out) == int(bn.num_features)


def _replace_pair(nodes: dict[str, Node], first: str, second: str, new: Node) -> dict[str, Node]:
    """Drop ``first`` and put ``new`` (named ``second``) where ``second`` was."""
    out: dict[str, Node] = {}
    for k, v in nodes.items():
        if k == first:
            continue
        out[k] = new if k == second else v
    return out
