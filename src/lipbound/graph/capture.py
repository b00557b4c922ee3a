"""Capture a model's real computation graph with torch.fx.

:func:`capture` traces ``model`` symbolically (:class:`torch.fx.Tracer`; modules that have a
registered rule, and ``torch.nn`` modules, are leaves), runs shape propagation
(:class:`torch.fx.passes.shape_prop.ShapeProp`) on a random batch of two samples, and returns an
:class:`OpGraph` whose nodes are the tensor operations that depend on the input *values*:
``F.relu``, ``x + f(x)``, ``torch.cat``, ``x.view(x.size(0), -1)``, every call of a reused module
(one node per call), functions inside nested modules. Shape queries (``x.size(0)``), constants
(buffers read with ``self.w``) and tuple plumbing (``torch.chunk`` followed by ``[i]``) are folded
into the consuming node's ``fn``, which replays the fx sub-graph for any batch size and any
floating dtype (parameters are cast on the fly with :func:`torch.func.functional_call`).

If symbolic tracing fails, :func:`torch.export.export` (dynamic batch size) is tried and its
aten ops are matched to the rules of the torch functions of the same name.

The graph always describes the model in **eval mode** (BatchNorm with running statistics,
dropout as identity), whatever the model's current mode: tracing is done with the model
temporarily switched to eval and the BatchNorm / Dropout nodes' ``fn`` are eval-mode functions.
The model's training flags are restored afterwards and nothing else is modified.
"""

from __future__ import annotations

import builtins
import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .._validation import check_input_shape, check_model
from ..errors import InvalidArgumentError, ShapeError
from .types import Node, OpGraph

__all__ = ["capture", "TensorArg", "call_module_as", "eval_module_call"]

# ops whose result depends only on the shape / dtype / device of their tensor argument
_SHAPE_METHODS = {
    "size", "dim", "ndimension", "numel", "nelement", "get_device", "is_contiguous",
    "new_zeros", "new_ones", "new_empty", "new_full", "is_floating_point", "element_size",
}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
_SHAPE_FUNCS: set[Any] = {
    builtins.len, torch.numel, torch.zeros_like, torch.ones_like, torch.empty_like,
    torch.full_like, torch.is_floating_point,
}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DROPOUT_TYPES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)


class TensorArg:
    """Placeholder for a tensor argument in ``Node.meta["args"]`` (``name`` = parent node)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<tensor {self.name}>"


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def call_module_as(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module(*args)``, casting its parameters to the inputs' floating dtype when they differ.

    The cast goes through :func:`torch.func.functional_call`, so gradients still reach the
    original parameters and nothing is copied into the module.
    """
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    mdt = _float_dtype(module)
    if x is None or mdt is None or not x.is_floating_point() or x.dtype == mdt:
        return module(*args, **kwargs)
    state = {
        k: (v.to(x.dtype) if v.is_floating_point() else v)
        for k, v in list(module.named_parameters()) + list(module.named_buffers())
    }
    return torch.func.functional_call(module, state, args, kwargs)


def eval_module_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Call ``module`` with eval-mode semantics for BatchNorm (running stats) and Dropout."""
    if isinstance(module, _DROPOUT_TYPES):
        return args[0]
    if isinstance(module, _BN_TYPES) and module.running_mean is not None:
        x = args[0]
        dt = x.dtype

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dt)

        return torch.nn.functional.batch_norm(
            x, cast(module.running_mean), cast(module.running_var), cast(module.weight),
            cast(module.bias), False, 0.0, module.eps,
        )
    return call_module_as(module, *args, **kwargs)


class _Replay:
    """Batched callable replaying one fx node from its parents' tensors (see module doc)."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        target: torch.fx.Node,
        parents: tuple[str, ...],
        value_dep: set[str],
        shapes: dict[str, tuple[int, ...]],
    ) -> None:
        self.gm = gm
        self.target = target
        self.parents = parents
        self.value_dep = value_dep
        self.shapes = shapes

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        if len(xs) != len(self.parents):
            raise InvalidArgumentError(
                f"node {self.target.name} takes {len(self.parents)} tensor(s); got {len(xs)}"
            )
        given: dict[str, torch.Tensor] = {}
        for name, x in zip(self.parents, xs):
            given.setdefault(name, x)
        ref = xs[0] if xs else None
        batch = int(ref.shape[0]) if ref is not None and ref.dim() > 0 else 1
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
        env: dict[str, Any] = {}
        out = self._ev(self.target, given, env, batch, dtype)
        return out

    def _ev(
        self,
        n: torch.fx.Node,
        given: dict[str, torch.Tensor],
        env: dict[str, Any],
        batch: int,
        dtype: torch.dtype | None,
    ) -> Any:
        if n.name in env:
            return env[n.name]
        if n.name in given:
            return given[n.name]
        if n.name in self.value_dep and n.name in self.shapes and n is not self.target:
            # a value-dependent tensor reached only through shape queries
            # (a zero-memory expanded tensor: its values are never read)
            dev = next(iter(given.values())).device if given else torch.device("cpu")
            v: Any = torch.empty((), device=dev, dtype=dtype or torch.float32).expand(
                batch, *self.shapes[n.name]
            )
            env[n.name] = v
            return v

        def sub(a: torch.fx.Node) -> Any:
            return self._ev(a, given, env, batch, dtype)

        args = torch.fx.node.map_arg(n.args, sub)
        kwargs = torch.fx.node.map_arg(n.kwargs, sub)
        if n.op == "get_attr":
            v = _fetch_attr(self.gm, str(n.target))
            if isinstance(v, torch.Tensor) and dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        elif n.op == "call_function":
            if "inplace" in kwargs:
                kwargs = {**kwargs, "inplace": False}
            v = _out_of_place(n.target)(*args, **kwargs)  # type: ignore[operator]
        elif n.op == "call_method":
            self_obj, *rest = args
            v = getattr(self_obj, _out_of_place_method(str(n.target)))(*rest, **kwargs)
        elif n.op == "call_module":
            mod = self.gm.get_submodule(str(n.target))
            if getattr(mod, "inplace", False) is True and args and isinstance(
                args[0], torch.Tensor
            ):
                args = (args[0].clone(), *args[1:])
            v = eval_module_call(mod, *args, **kwargs)
        else:
            raise InvalidArgumentError(f"cannot replay fx node {n.name} ({n.op})")
        env[n.name] = v
        return v


_OUT_OF_PLACE: dict[Any, Any] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, torch.relu_: torch.relu,
    torch.nn.functional.relu_: torch.nn.functional.relu,
    torch.nn.functional.leaky_relu_: torch.nn.functional.leaky_relu,
    torch.nn.functional.elu_: torch.nn.functional.elu,
    torch.nn.functional.hardtanh_: torch.nn.functional.hardtanh,
}


def _out_of_place(target: Any) -> Any:
    """Node functions never modify their inputs: in-place ops are replayed out of place."""
    try:
        return _OUT_OF_PLACE.get(target, target)
    except TypeError:
        return target


def _out_of_place_method(name: str) -> str:
    if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
        return name[:-1]
    return name


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Tracer(torch.fx.Tracer):
    """Default fx leaves (``torch.nn`` modules except containers) plus modules with a rule."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from ..rules import has_module_rule

        if has_module_rule(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _Prop(ShapeProp):
    """Shape propagation that also keeps every node's value (public Interpreter API)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n.name] = result
        return result


def _is_shape_query(n: torch.fx.Node) -> bool:
    if n.op == "call_method":
        return str(n.target) in _SHAPE_METHODS
    if n.op == "call_function":
        if str(n.target).startswith(("aten.sym_size", "aten.sym_numel", "aten.sym_stride")):
            return True
        if n.target is builtins.getattr and len(n.args) >= 2:
            return n.args[1] in _SHAPE_ATTRS
        try:
            return n.target in _SHAPE_FUNCS
        except TypeError:
            return False
    return False


def _pretty_target(n: torch.fx.Node) -> str:
    if n.op == "call_method":
        return f".{n.target}()"
    if _aten_name(n.target) is not None:
        return f"aten.{_aten_name(n.target)}"
    t = n.target
    names = {
        operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
        operator.neg: "neg", operator.getitem: "[]", operator.matmul: "@",
        operator.iadd: "+=", operator.imul: "*=", operator.isub: "-=",
    }
    try:
        if t in names:
            return names[t]
    except TypeError:
        pass
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod.startswith("torch") or getattr(torch, name, None) is t:
        return f"torch.{name}"
    return name


def _aten_name(target: Any) -> str | None:
    """``"conv2d"`` for ``torch.ops.aten.conv2d.default`` (graphs from torch.export)."""
    s = str(target)
    if s.startswith("aten."):
        name = s.split(".")[1]
        return _ATEN_ALIASES.get(name, name)
    return None


_ATEN_ALIASES = {
    "_softmax": "softmax",
    "_log_softmax": "log_softmax",
    "_native_batch_norm_legit_no_training": "batch_norm",
}


def _aten_key(target: Any) -> Any:
    """The rule key of an aten op: the torch function / method of the same name with a rule."""
    from ..rules import get_rule

    name = _aten_name(target)
    if name is None:
        return target
    for cand in (getattr(torch.nn.functional, name, None), getattr(torch, name, None)):
        if cand is not None and get_rule(cand) is not None:
            return cand
    if get_rule(name) is not None:
        return name
    return target


def _op_name(n: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if n.op == "call_function" and _aten_name(n.target) is not None:
        return str(_aten_name(n.target))
    if n.op == "call_module":
        return type(gm.get_submodule(str(n.target))).__name__
    if n.op == "call_method":
        return str(n.target)
    return getattr(n.target, "__name__", str(n.target))


def _key(n: torch.fx.Node, gm: torch.fx.GraphModule) -> Any:
    if n.op == "call_module":
        return type(gm.get_submodule(str(n.target)))
    if n.op == "call_method":
        return str(n.target)
    return _aten_key(n.target)


def _module_path(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return str(path)


def _strip(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in tuple(shape)[1:])


def _export(model: nn.Module, sample: torch.Tensor, fx_error: Exception) -> torch.fx.GraphModule:
    """Fallback when torch.fx fails: :func:`torch.export.export` with a dynamic batch size.

    Shape-dependent Python (``if x.dim() == 4``, ``torch.zeros(x.size(0), ...)``) is fine
    there; nodes are aten ops, matched to the rules of the torch functions of the same name.
    Modules are not leaves in this graph, so BatchNorm is not folded.
    """
    try:
        batch = torch.export.Dim("batch", min=2)
        ep = torch.export.export(
            model, (sample,), dynamic_shapes=({0: batch},), strict=False
        )
        return ep.module()  # type: ignore[return-value]
    except Exception as exc:
        raise InvalidArgumentError(
            f"{fx_error} torch.export failed as well: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


class _Root(nn.Module):
    """Wrapper so that a model which is itself a leaf (``nn.Conv2d``...) becomes one node."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    tracer = _Tracer()
    if tracer.is_leaf_module(model, ""):
        model = _Root(model)
    concrete: dict[str, Any] = {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise InvalidArgumentError(
                f"{type(model).__name__}.forward takes several inputs ({p.name!r} has no "
                "default); lipbound bounds functions of ONE input tensor. Wrap the model in an "
                "nn.Module whose forward takes one tensor."
            )
        concrete[p.name] = p.default
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError...)
        raise InvalidArgumentError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Data-dependent control flow (if/for on tensor values) cannot be captured; rewrite "
            "it with tensor ops, or move it into a submodule and give that module a rule with "
            "lipbound.register_rule(...)."
        ) from exc
    return torch.fx.GraphModule(tracer.root, graph)


def capture(model: nn.Module, input_shape: Any, *, batch_size: int = 2) -> OpGraph:
    """Capture ``model`` as an :class:`OpGraph` of the ops that act on the input values.

    Node order is topological; node names are torch.fx names; every node has a batched ``fn``
    reproducing it from its parents' tensors, ``in_shapes``/``out_shape`` without the batch
    dimension, ``meta["key"]`` (module class, function or method name used to find its rule),
    ``meta["args"]``/``meta["kwargs"]`` (the call's arguments with tensors replaced by
    :class:`TensorArg`), ``meta["rule"]`` (the rule or ``None``) and ``meta["unsupported"]``
    (why no rule covers it, or ``None``). ``kind`` comes from the rule (``"op"`` if none).

    >>> import torch
    >>> from torch import nn
    >>> import torch.nn.functional as F
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return self.fc(F.relu(self.fc(x))) + x
    >>> g = capture(Net(), (4,))
    >>> [(n.qualname, n.kind) for n in g]  # doctest: +NORMALIZE_WHITESPACE
    [('input', 'input'), ('fc (call 1)', 'linear'), ('relu (F.relu)', 'activation'),
     ('fc (call 2)', 'linear'), ('add (+)', 'op'), ('output', 'output')]
    """
    model = check_model(model)
    shape = check_input_shape(input_shape)
    if batch_size not in (1, 2):
        raise InvalidArgumentError(f"batch_size must be 1 or 2; got {batch_size!r}")
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        ref = next((t for t in list(model.parameters()) + list(model.buffers())
                    if t.is_floating_point()), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else torch.device("cpu")
        gen = torch.Generator(device="cpu").manual_seed(0)
        sample = torch.randn(2, *shape, generator=gen, dtype=dtype).to(device)
        try:
            gm = _trace(model)
        except InvalidArgumentError as fx_error:
            gm = _export(model, sample, fx_error)
        sample = sample[:batch_size]
        prop = _Prop(gm)
        try:
            with torch.no_grad():
                prop.propagate(sample)
        except Exception as exc:
            _raise_if_integer_inputs(model, exc)
            raise ShapeError(
                f"running {type(model).__name__} on a batch of shape "
                f"{(batch_size, *shape)} failed: {type(exc).__name__}: {exc}. Check input_shape "
                "(one sample's shape, without the batch dimension)."
            ) from exc
    finally:
        for m, t in flags.items():
            m.train(t)
    return _build(model, gm, prop.values, shape, batch_size)


def _build(
    model: nn.Module,
    gm: torch.fx.GraphModule,
    values: dict[str, Any],
    shape: tuple[int, ...],
    batch: int,
) -> OpGraph:
    from ..rules import classify

    fx_nodes = list(gm.graph.nodes)
    placeholders = [n for n in fx_nodes if n.op == "placeholder"]
    placeholders = placeholders[:1] + [p for p in placeholders[1:] if p.users]
    if len(placeholders) != 1:
        raise InvalidArgumentError(
            f"expected a model with one input tensor; the traced graph has {len(placeholders)}"
        )
    value_dep: set[str] = set()
    for n in fx_nodes:
        if n.op == "placeholder":
            value_dep.add(n.name)
        elif n.op in ("call_function", "call_method", "call_module"):
            if not _is_shape_query(n) and any(a.name in value_dep for a in n.all_input_nodes):
                value_dep.add(n.name)
    is_tensor = {n.name: isinstance(values.get(n.name), torch.Tensor) for n in fx_nodes}
    shapes = {k: _strip(v.shape) for k, v in values.items() if isinstance(v, torch.Tensor)}
    by_name = {n.name: n for n in fx_nodes}

    def graph_node(n: torch.fx.Node) -> bool:
        return n.name in value_dep and is_tensor[n.name]

    def collect(n: torch.fx.Node, out: list[str], via: list[torch.fx.Node]) -> None:
        """Value-dependent tensor nodes feeding ``n`` (through non-tensor intermediaries)."""
        for a in _flat_nodes((n.args, n.kwargs)):
            if a.name not in value_dep:
                continue
            if graph_node(a):
                out.append(a.name)
            elif not _is_shape_query(a):
                via.append(a)
                collect(a, out, via)

    out_fx = next(n for n in fx_nodes if n.op == "output")
    result = out_fx.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:  # torch.export's flat outputs
        result = result[0]
    if not isinstance(result, torch.fx.Node) or not graph_node(result):
        raise InvalidArgumentError(
            "the model must return one tensor that depends on its input; got "
            f"{type(values.get(getattr(result, 'name', ''), result)).__name__}. Wrap it so that "
            "forward returns a single tensor."
        )

    # keep only nodes the output depends on
    parents_of: dict[str, tuple[tuple[str, ...], list[torch.fx.Node]]] = {}
    for n in fx_nodes:
        if graph_node(n) and n.op != "placeholder":
            found: list[str] = []
            through: list[torch.fx.Node] = []
            collect(n, found, through)
            parents_of[n.name] = (tuple(found), through)
    live: set[str] = set()
    stack = [result.name]
    while stack:
        k = stack.pop()
        if k in live:
            continue
        live.add(k)
        if k in parents_of:
            stack.extend(parents_of[k][0])

    calls: dict[str, int] = {}
    for n in fx_nodes:
        if n.op == "call_module" and n.name in live:
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    seen: dict[str, int] = {}

    nodes: dict[str, Node] = {}
    inp = placeholders[0]
    nodes[inp.name] = Node(
        name=inp.name, qualname="input", op="input", kind="input", inputs=(),
        in_shapes=(), out_shape=shape, fn=_identity, meta={"key": None},
    )
    for n in fx_nodes:
        if n.name not in live or n.op == "placeholder":
            continue
        ins, via_ = parents_of[n.name]
        via = list(via_)
        module: nn.Module | None = None
        op_node = n
        getitem: Any = None
        if n.op == "call_function" and n.target is operator.getitem and via:
            op_node = via[0]  # a getitem on a tuple-valued producer (chunk, split, max(dim)...)
            getitem = n.args[1]
        if op_node.op == "call_module":
            module = gm.get_submodule(str(op_node.target))
        op = _op_name(op_node, gm)
        if getitem is not None:
            op = f"{op}[{getitem}]"
        if n.op == "call_module":
            t = str(n.target)
            seen[t] = seen.get(t, 0) + 1
            qual = t if calls[t] == 1 else f"{t} (call {seen[t]})"
        elif op_node.op == "call_module":
            qual = f"{op_node.target}[{getitem}]"
        else:
            path = _module_path(op_node)
            qual = f"{path + '.' if path else ''}{n.name} ({_pretty_target(op_node)})"

        def conv(a: torch.fx.Node) -> Any:
            return TensorArg(a.name) if graph_node(a) else values.get(a.name)

        meta: dict[str, Any] = {
            "key": _key(op_node, gm),
            "target": op_node.target,
            "fx_op": op_node.op,
            "args": torch.fx.node.map_arg(op_node.args, conv),
            "kwargs": torch.fx.node.map_arg(op_node.kwargs, conv),
            "getitem": getitem,
            "module_path": _module_path(op_node),
            "batch_mixing": _mixes_batch(values[n.name], batch),
        }
        nodes[n.name] = Node(
            name=n.name,
            qualname=qual,
            op=op,
            kind="op",
            inputs=ins,
            in_shapes=tuple(shapes[i] for i in ins),
            out_shape=shapes[n.name],
            fn=_Replay(gm, n, ins, value_dep, shapes),
            module=module,
            meta=meta,
        )
    nodes["output"] = Node(
        name="output", qualname="output", op="output", kind="output", inputs=(result.name,),
        in_shapes=(shapes[result.name],), out_shape=shapes[result.name], fn=_identity,
        meta={"key": None},
    )
    for node in nodes.values():
        if node.kind not in ("input", "output"):
            classify(node)
    del by_name
    return OpGraph(nodes=nodes, input_shape=shape, model=model)


def _raise_if_integer_inputs(model: nn.Module, exc: Exception) -> None:
    """A model that looks up embeddings needs integer inputs: not a Lipschitz question."""
    from ..errors import UnsupportedModelError, UnsupportedNode

    emb = [
        UnsupportedNode(
            name, type(m).__name__,
            "an embedding looks up integer indices: the network is not a function of a "
            "continuous input there. Bound the network from the embedding output on instead",
        )
        for name, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    ]
    if emb:
        raise UnsupportedModelError(emb) from exc


def _mixes_batch(v: torch.Tensor, batch: int) -> bool:
    return v.dim() == 0 or int(v.shape[0]) != batch


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _flat_nodes(obj: Any) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []

    def visit(a: torch.fx.Node) -> torch.fx.Node:
        out.append(a)
        return a

    torch.fx.node.map_arg(obj, visit)
    return out


Replay = _Replay
FnType = Callable[..., torch.Tensor]
