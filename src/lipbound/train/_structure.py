"""Which Linear/Conv layers a model CALLS, with which per-sample input shapes, and how the calls
are wired (the "plan" the penalties evaluate).

Three sources, best first:

``"graph"``       :func:`lipbound.graph.capture` (torch.fx): every call of every layer, reused
                  modules once per call, ``F.relu`` and other functional ops as nodes, each
                  non-layer node with the constant of its Lipschitz rule (certified or not, as the
                  rule says) and, for activations, its slope range. This is how AutoLip sees the
                  model.
``"sequential"``  an ``nn.Sequential`` (nested allowed) of Linear/Conv layers, Flatten/Identity/
                  Dropout and element-wise activations whose rules give a slope range (the
                  same ranges as AutoLip's, read from the captured graph): a chain whose
                  structure is known exactly.
``"hooks"``       forward hooks on a dummy batch: the layer calls in call order (reused modules
                  included), but NOT the ops between them; the plan is then the chain of the
                  calls with every other op assumed 1-Lipschitz (``exact=False``).

Shapes are found by running the model in eval mode on a zero batch of two samples under
``torch.no_grad()``; training flags are restored afterwards and nothing else changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedModelError, UnsupportedNode
from ..graph import capture
from ..rules import RuleContext
from ._power import is_layer

__all__ = ["LayerCall", "Plan", "PlanNode", "build_plan", "find_calls_hooks", "linear_groups"]

_SOURCES = ("auto", "graph", "sequential", "hooks")

_IDENTITY_TYPES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@dataclass(frozen=True)
class LayerCall:
    """One call of a Linear/Conv layer: where it lives and the per-sample shapes it sees."""

    index: int
    qualname: str
    path: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass(eq=False)
class PlanNode:
    """A node of the plan.

    ``kind``: ``"input"``, ``"output"``, ``"layer"`` (Linear/Conv call number ``call``),
    ``"linear"`` (another linear node: flatten, pooling...; ``fn`` its batched bias-free map),
    ``"activation"`` (element-wise, ``slope`` its derivative range) or ``"op"``.
    ``constants``/``combine``: the rule's constant w.r.t. each input and how the terms combine
    (``"sum"``, ``"rss"``, ``"max"``); ``certified`` whether those constants are proven.
    """

    name: str
    kind: str
    inputs: tuple[str, ...]
    qualname: str = ""
    call: int | None = None
    constants: tuple[float, ...] = ()
    combine: str = "sum"
    certified: bool = True
    slope: tuple[float, float] | None = None
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    module: nn.Module | None = None


@dataclass(eq=False)
class Plan:
    """Layer calls plus their wiring; ``exact`` is False for the hooks fallback."""

    calls: list[LayerCall]
    nodes: list[PlanNode]
    source: str
    exact: bool
    notes: list[str] = field(default_factory=list)

    def is_chain(self) -> bool:
        """Whether every node has one input: the previous node."""
        prev = None
        for n in self.nodes:
            if n.kind == "input":
                prev = n.name
                continue
            if len(n.inputs) != 1 or n.inputs[0] != prev:
                return False
            prev = n.name
        return True


def linear_groups(plan: Plan) -> tuple[list[list[PlanNode]], dict[str, int]]:
    """Maximal chains of linear nodes (``"layer"``/``"linear"``) of an exact plan.

    A node joins its parent's group when its only input is that parent, the parent is linear
    and has no other user: e.g. conv -> BatchNorm(eval) -> flatten -> Linear become one group,
    as :func:`lipbound.graph.simplify` merges them for AutoLip. Returns the groups (in
    topological order) and the group index of every linear node. For an inexact (hooks) plan
    every layer is its own group (the ops between calls are unknown).
    """
    users: dict[str, int] = {}
    for n in plan.nodes:
        for p in n.inputs:
            users[p] = users.get(p, 0) + 1
    by_name = {n.name: n for n in plan.nodes}
    groups: list[list[PlanNode]] = []
    group_of: dict[str, int] = {}
    for n in plan.nodes:
        if n.kind not in ("layer", "linear"):
            continue
        par = n.inputs[0] if len(n.inputs) == 1 else None
        if (
            plan.exact
            and par is not None
            and par in group_of
            and users.get(par, 0) == 1
            and by_name[par].kind in ("layer", "linear")
        ):
            g = group_of[par]
            groups[g].append(n)
        else:
            groups.append([n])
            g = len(groups) - 1
        group_of[n.name] = g
    return groups, group_of


def _module_paths(model: nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), name)
    return out


def _dummy_run(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    ref = next(
        (t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()),
        None,
    )
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else torch.device("cpu")
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, dtype=dtype, device=device))
    except Exception as exc:  # any failure of the user's forward: report the shape
        from ..errors import ShapeError

        raise ShapeError(
            f"running {type(model).__name__} on a batch of shape {(2, *input_shape)} failed: "
            f"{type(exc).__name__}: {exc}. Check input_shape (one sample, no batch dimension)."
        ) from exc
    finally:
        for m, t in flags.items():
            m.train(t)


def find_calls_hooks(
    model: nn.Module, input_shape: tuple[int, ...]
) -> list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]]:
    """``(module, in_shape, out_shape)`` of every Linear/Conv call, in call order (hooks)."""
    found: list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = []

    def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        x = args[0]
        found.append((m, tuple(int(s) for s in x.shape[1:]), tuple(int(s) for s in out.shape[1:])))

    handles = [m.register_forward_hook(hook) for m in model.modules() if is_layer(m)]
    try:
        _dummy_run(model, input_shape)
    finally:
        for h in handles:
            h.remove()
    return found


def _calls_from(
    model: nn.Module, found: list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]]
) -> list[LayerCall]:
    paths = _module_paths(model)
    counts: dict[int, int] = {}
    for m, _, _ in found:
        counts[id(m)] = counts.get(id(m), 0) + 1
    seen: dict[int, int] = {}
    calls = []
    for i, (m, ish, osh) in enumerate(found):
        seen[id(m)] = seen.get(id(m), 0) + 1
        path = paths.get(id(m), type(m).__name__)
        qual = path if counts[id(m)] == 1 else f"{path} (call {seen[id(m)]})"
        calls.append(LayerCall(i, qual, path, ish, osh))
    return calls


def _hooks_plan(model: nn.Module, input_shape: tuple[int, ...]) -> Plan:
    calls = _calls_from(model, find_calls_hooks(model, input_shape))
    if not calls:
        raise UnsupportedModelError(
            [UnsupportedNode(type(model).__name__, "model", "no Linear/Conv layer is called")],
            what="the model calls no Linear/Conv layer, so there is nothing to regularise",
        )
    nodes = [PlanNode("input", "input", ())]
    prev = "input"
    for c in calls:
        name = f"layer{c.index}"
        nodes.append(PlanNode(name, "layer", (prev,), c.qualname, call=c.index,
                              in_shape=c.in_shape, out_shape=c.out_shape))
        prev = name
    nodes.append(PlanNode("output", "output", (prev,)))
    return Plan(calls, nodes, "hooks", exact=False, notes=[
        "structure from forward hooks: the chain of layer calls, every other op assumed "
        "1-Lipschitz (not verified)"
    ])


def _flatten_sequential(model: nn.Module) -> list[nn.Module] | None:
    if not isinstance(model, nn.Sequential):
        return None
    out: list[nn.Module] = []
    for m in model:
        if isinstance(m, nn.Sequential):
            sub = _flatten_sequential(m)
            if sub is None:
                return None
            out.extend(sub)
        else:
            out.append(m)
    return out


def _activation_slopes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[int, Any]:
    """``id(module) -> slope range`` of the activation modules the model calls, as the rules
    give them (:func:`lipbound.graph.capture` classifies every node: one slope table)."""
    return {id(n.module): n.slope_range for n in capture(model, input_shape)
            if n.kind == "activation" and n.module is not None and n.slope_range is not None}


def _sequential_plan(model: nn.Module, input_shape: tuple[int, ...]) -> Plan | None:
    mods = _flatten_sequential(model)
    if mods is None:
        return None
    slopes = _activation_slopes(model, input_shape)
    for m in mods:
        if not (is_layer(m) or isinstance(m, (nn.Flatten, *_IDENTITY_TYPES))
                or id(m) in slopes):
            return None
    # shapes of every module's input/output via hooks
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        shapes.append((tuple(args[0].shape[1:]), tuple(out.shape[1:])))

    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        _dummy_run(model, input_shape)
    finally:
        for h in handles:
            h.remove()
    if len(shapes) != len(mods):  # a module used elsewhere too: let the hooks plan handle it
        return None
    found = [(m, s[0], s[1]) for m, s in zip(mods, shapes) if is_layer(m)]
    calls = _calls_from(model, found)
    if not calls:
        return None
    nodes = [PlanNode("input", "input", ())]
    prev = "input"
    k = 0
    for i, (m, (ish, osh)) in enumerate(zip(mods, shapes)):
        if isinstance(m, _IDENTITY_TYPES):
            continue
        name = f"n{i}"
        if is_layer(m):
            c = calls[k]
            k += 1
            node = PlanNode(name, "layer", (prev,), c.qualname, call=c.index,
                            in_shape=ish, out_shape=osh)
        elif isinstance(m, nn.Flatten):
            node = PlanNode(name, "linear", (prev,), f"{i} (Flatten)", constants=(1.0,),
                            fn=m, in_shape=ish, out_shape=osh, module=m)
        else:
            slope = slopes[id(m)]
            c0 = max(abs(slope[0]), abs(slope[1]))
            node = PlanNode(name, "activation", (prev,), f"{i} ({type(m).__name__})",
                            constants=(c0,), slope=slope, in_shape=ish, out_shape=osh)
        nodes.append(node)
        prev = name
    nodes.append(PlanNode("output", "output", (prev,)))
    return Plan(calls, nodes, "sequential", exact=True)


def _graph_plan(model: nn.Module, input_shape: tuple[int, ...]) -> Plan:
    g = capture(model, input_shape)
    paths = _module_paths(model)
    found: list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    bad: list[UnsupportedNode] = []
    nodes: list[PlanNode] = []
    layer_nodes: list[tuple[int, Any]] = []
    ctx = RuleContext(norm="2")
    for node in g:
        if node.kind == "input":
            nodes.append(PlanNode(node.name, "input", (), node.qualname,
                                  out_shape=tuple(node.out_shape)))
            continue
        if node.kind == "output":
            nodes.append(PlanNode(node.name, "output", tuple(node.inputs), node.qualname))
            continue
        if node.module is not None and is_layer(node.module) and len(node.inputs) == 1:
            found.append((node.module, tuple(node.in_shapes[0]), tuple(node.out_shape)))
            layer_nodes.append((len(nodes), node))
            nodes.append(PlanNode(node.name, "layer", tuple(node.inputs), node.qualname,
                                  call=len(found) - 1, in_shape=tuple(node.in_shapes[0]),
                                  out_shape=tuple(node.out_shape)))
            continue
        why = node.unsupported
        rule = node.rule
        if why or rule is None:
            bad.append(UnsupportedNode(node.qualname, node.op, str(why or "no Lipschitz rule")))
            continue
        nc = rule.constant(node, ctx)
        if not hasattr(nc, "constants"):  # a plain number from a user rule
            nc_consts = (float(nc),) * max(1, len(node.inputs))
            combine, certified, slope = "sum", bool(rule.certified), node.slope_range
        else:
            nc_consts = tuple(float(c) for c in nc.constants)
            combine, certified = str(nc.combine), bool(nc.certified)
            slope = node.slope_range or nc.slope_range
        fn = node.linear_fn() if node.kind == "linear" else None
        nodes.append(PlanNode(
            node.name, str(node.kind), tuple(node.inputs), node.qualname, constants=nc_consts,
            combine=combine, certified=certified, slope=slope, fn=fn,
            in_shape=tuple(node.in_shapes[0]) if node.in_shapes else (),
            out_shape=tuple(node.out_shape), module=node.module,
        ))
    if bad:
        raise UnsupportedModelError(bad)
    del paths
    calls = _calls_from(model, found)
    # keep the graph's own names for the calls (they match AutoLip's tables)
    calls = [
        LayerCall(c.index, layer_nodes[c.index][1].qualname, c.path, c.in_shape, c.out_shape)
        for c in calls
    ]
    if not calls:
        raise UnsupportedModelError(
            [UnsupportedNode(type(model).__name__, "model", "no Linear/Conv layer is called")],
            what="the model calls no Linear/Conv layer, so there is nothing to regularise",
        )
    return Plan(calls, nodes, "graph", exact=True)


def build_plan(model: nn.Module, input_shape: tuple[int, ...], source: str = "auto") -> Plan:
    """The plan of ``model`` from ``source`` (``"auto"`` is ``"graph"``; ``"sequential"``
    and ``"hooks"`` are the other readers, chosen explicitly)."""
    if source not in _SOURCES:
        raise InvalidArgumentError(f"structure must be one of {_SOURCES}; got {source!r}")
    if source in ("auto", "graph"):
        return _graph_plan(model, input_shape)
    if source == "sequential":
        plan = _sequential_plan(model, input_shape)
        if plan is not None:
            return plan
        raise InvalidArgumentError(
            "structure='sequential' needs an nn.Sequential of Linear/Conv layers, Flatten, "
            "Identity/Dropout and activations whose rule has a slope range (ReLU, LeakyReLU, "
            "Tanh, Sigmoid, GELU...); use structure='graph' for other models"
        )
    return _hooks_plan(model, input_shape)


def numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))
