"""The typed DAG every method reads: :class:`OpGraph` of :class:`Node`.

Produced by :func:`lipbound.graph.capture` (torch.fx symbolic trace + shape propagation) and
:func:`lipbound.graph.simplify` (merging chains of linear ops, folding eval-mode BatchNorm,
dropping identities). Consumers (AutoLip, SeqLip, exact, LipSDP, penalties) never walk
``model.modules()`` themselves.

Node kinds
----------
``"input"``       the model input (exactly one).
``"linear"``      an affine map of ONE parent: Linear, Conv*, ConvTranspose*, AvgPool*,
                  AdaptiveAvgPool*, eval BatchNorm, flatten/reshape, scalar mul, or a merged
                  chain of these. ``fn`` applies the affine map; ``linear_fn`` the bias-free part.
``"activation"``  an element-wise map of ONE parent whose derivative lies in ``slope_range``
                  (ReLU, LeakyReLU, tanh, sigmoid...).
``"op"``          anything else with a rule (add, cat, max-pool, softmax...), any number of
                  parents.
``"output"``      the model output (exactly one; ``inputs`` has its single producer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..spectral.certify import conv_matrix_of, dense_matrix
from .modules import FoldedBatchNorm

__all__ = ["Call", "Node", "NodeKind", "OpGraph"]

_CONVS = nn.modules.conv._ConvNd

NodeKind = Literal["input", "linear", "activation", "op", "output"]


@dataclass(frozen=True)
class Call:
    """How a captured node was called, read from the torch.fx graph (what rules look at).

    Attributes
    ----------
    key:       what its rule is registered under: the module class, the function, or the
               method name (``"view"``); ``"__merged_linear__"`` / ``FoldedBatchNorm`` for
               nodes made by :func:`lipbound.graph.simplify`; ``None`` for input and output.
    target:    the fx target (module path, function or method name).
    fx_op:     the fx opcode (``"call_module"``, ``"call_function"``, ``"call_method"``;
               ``"merged"`` for merged linear nodes).
    args / kwargs: the call's arguments, tensors replaced by ``TensorArg`` placeholders.
    getitem:   the index when the node is an item of a multi-output call, else ``None``.
    module_path: the path of the module the call sits in (``"layer1.0"``).
    batch_mixing: the output of one sample depends on other samples (checked on the trace).
    identity_checked: for modules that declare themselves the identity in eval mode, whether
               the traced output equalled the input (``None``: not such a module).
    """

    key: Any = None
    target: Any = None
    fx_op: str = "call_module"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    getitem: Any = None
    module_path: str = ""
    batch_mixing: bool = False
    identity_checked: bool | None = None


@dataclass(eq=False)
class Node:
    """One operation of the captured computation.

    Attributes
    ----------
    name:      unique id in the graph (the torch.fx node name).
    qualname:  what users recognise: module path (``"features.0"``), or ``"relu_1 (F.relu)"``;
               for merged linear nodes ``"features.0+features.1"``.
    op:        the op type in words: ``"Conv2d"``, ``"relu"``, ``"add"``, ``"cat"``...
    kind:      see the module docstring.
    inputs:    names of the parent nodes whose tensors feed this node, in argument order.
    in_shapes: per-sample shapes of those tensors (no batch dimension).
    out_shape: per-sample shape of the output.
    fn:        batched callable ``fn(*parent_tensors) -> tensor`` reproducing the node.
    module:    the ``nn.Module`` called (``None`` for functions / methods); for merged linear
               nodes an ``nn.Sequential`` of the parts (BatchNorm already folded).
    parts:     qualnames of the original nodes merged into this one.
    slope_range: for activations, ``(a, b)`` with ``a <= f'(t) <= b`` everywhere.
    call:      how it was called (:class:`Call`).
    rule:      the rule that covers it (set by :func:`lipbound.rules.classify`), or ``None``.
    unsupported: ``None`` when a rule covers it, else the reason (and what to do).
    part_nodes: for merged linear nodes the original nodes, in order (a folded BatchNorm node:
               itself); empty for others.
    folded:    for a Linear/Conv with its BatchNorm folded in, the two original nodes.
    cache:     memo of values derived from the node by a consumer (keyed by that consumer;
               never a fact about the node that another module reads).
    """

    name: str
    qualname: str
    op: str
    kind: NodeKind
    inputs: tuple[str, ...]
    in_shapes: tuple[tuple[int, ...], ...]
    out_shape: tuple[int, ...]
    fn: Callable[..., torch.Tensor]
    module: nn.Module | None = None
    parts: tuple[str, ...] = ()
    slope_range: tuple[float, float] | None = None
    call: Call = field(default_factory=Call)
    rule: Any = None
    unsupported: str | None = None
    part_nodes: tuple[Node, ...] = ()
    folded: tuple[Node, Node] | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    # ---- helpers for linear nodes -------------------------------------------------------
    def linear_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Bias-free linear part ``x -> fn(x) - fn(0)`` of a linear node (batched)."""
        if self.kind != "linear":
            raise TypeError(f"{self.qualname} is not a linear node")
        f = self.fn

        def lin(x: torch.Tensor) -> torch.Tensor:
            return f(x) - f(torch.zeros_like(x[:1]))

        return lin

    def dense(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, b)`` with ``fn(x).flatten() == W @ x.flatten() + b``, by
        :func:`lipbound.spectral.certify.dense_matrix` (the package's one dense builder), or,
        for a zero-padded conv node (with a folded BatchNorm or not), written from its kernel
        by :func:`lipbound.spectral.certify.conv_matrix_of` (VGG-11's 512-channel convs on
        2 x 2 maps: 7 s of basis-vector convolutions in lipsdp, 0.05 s from the kernel).

        Computed in ``dtype`` (float64 by default): node functions built by
        :func:`lipbound.graph.capture` / :func:`lipbound.graph.simplify` cast the parameters
        they use to the input's dtype on the fly (the modules themselves are not modified).
        Only for small layers (``W`` has ``prod(out_shape) x prod(in_shape)`` entries).
        """
        if self.kind != "linear":
            raise TypeError(f"{self.qualname} is not a linear node")
        (in_shape,) = self.in_shapes
        ref = next(iter(_tensors(self.module)), None) if self.module is not None else None
        device = ref.device if ref is not None else torch.device("cpu")
        plain = (self.module is not None and self.call.getitem is None
                 and not self.call.kwargs and len(self.call.args or (None,)) == 1
                 and self.call.fx_op in ("call_module", "merged"))
        mod = self.module
        if plain and isinstance(mod, FoldedBatchNorm) and isinstance(mod.linear, _CONVS):
            mod = mod.materialize()  # the folded conv in float64, as the certificates see it
        W = conv_matrix_of(mod, tuple(in_shape)) if plain else None
        if W is not None:  # a zero-padded conv (+ BatchNorm): written from its kernel
            with torch.no_grad():
                b = self.fn(torch.zeros((1, *in_shape), dtype=dtype, device=device))
            return W.to(dtype=dtype, device=device), b.reshape(-1)
        return dense_matrix(self.fn, tuple(in_shape), dtype=dtype, device=device)


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


@dataclass(eq=False)
class OpGraph:
    """A DAG of :class:`Node` in topological order, one input, one output."""

    nodes: dict[str, Node]
    input_shape: tuple[int, ...]
    model: nn.Module

    @property
    def input(self) -> Node:
        return next(n for n in self.nodes.values() if n.kind == "input")

    @property
    def output(self) -> Node:
        return next(n for n in self.nodes.values() if n.kind == "output")

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def users(self, name: str) -> list[Node]:
        """Nodes that consume ``name``'s output."""
        return [n for n in self.nodes.values() if name in n.inputs]
