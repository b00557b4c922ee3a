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
temporarily switched to eval and the BatchNorm / Dropout nodes' ``fn`` are eval-mode functions;
module calls in node functions run with the module switched to eval
(:func:`~lipbound.graph.modules.eval_mode`: parametrisations and ``spectral_norm`` hooks do not
iterate). The model's training flags are restored afterwards and nothing else is modified.

What the graph cannot see is refused rather than silently mis-described:

* **In-place writes** (``y.mul_(100)``, ``x += y``, ``x[i] = v``, ``F.relu(x, inplace=True)``,
  ``nn.ReLU(inplace=True)``, aten ``*_`` ops) are *functionalised*: the write becomes a node
  whose ``fn`` works on a copy, and every later read of the written tensor reads that node. The
  written memory is tracked by storage during a first shape-propagation run; if a *different*
  tensor sharing that memory (a view such as ``y.view(-1)``, ``y[0]``, or the base of a view)
  is read after the write, the write cannot be followed through the view and the model is
  refused (:class:`~lipbound.errors.UnsupportedModelError` naming the op and its source line).
  ``out=`` arguments are refused too.
* **Model state written by forward** (``self.count += 1``, ``self.buf.mul_(2)``, a buffer
  reassigned): refused, naming the buffer; buffers are restored to their values before capture.
* **Forward hooks / pre-hooks** that torch.fx does not trace (on the model itself, on leaf
  modules such as ``nn.Linear`` or ``nn.ReLU``, and global ones from
  ``register_module_forward_hook``) are refused, naming the module and hook function. Hooks on
  non-leaf submodules run inside the traced ``__call__`` and are captured. The forward
  pre-hooks of the old-API ``torch.nn.utils.spectral_norm`` / ``weight_norm`` only recompute the
  weight; they are allowed and the eval-mode weight they compute is the one analysed
  (:func:`~lipbound.graph.modules.eval_weight`), as for ``torch.nn.utils.parametrize``.
"""

from __future__ import annotations

import builtins
import inspect
import io
import linecache
import logging
import operator
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .._validation import check_input_shape, check_model
from ..errors import (
    InvalidArgumentError,
    LipboundError,
    ShapeError,
    UnsupportedModelError,
    UnsupportedNode,
)
from ..spectral import cast_detached
from .modules import WEIGHT_HOOKS, eval_mode
from .types import Call, Node, OpGraph

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
    """Placeholder for a tensor argument in ``Node.call.args`` (``name`` = parent node)."""

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

    The cast goes through :func:`torch.func.functional_call`, so nothing is copied into the
    module; the cast parameters are constants (:func:`lipbound.spectral.cast_detached`: cast
    once per :func:`~lipbound.spectral.shared_casts` block): gradients reach the inputs, not
    the parameters, on this path (a call in the parameters' own dtype is the module's own
    call, parameters' gradients included). The call runs with ``module`` switched to eval
    (:func:`~lipbound.graph.modules.eval_mode`, flags restored afterwards).
    """
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    mdt = _float_dtype(module)
    with eval_mode(module):
        if x is None or mdt is None or not x.is_floating_point() or x.dtype == mdt:
            return module(*args, **kwargs)
        state = {
            k: cast_detached(v, x.dtype)
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
        elif n.op in ("call_function", "call_method", "call_module"):
            v = _run_op(n, self.gm, tuple(args), dict(kwargs), eval_module_call)
        else:
            raise InvalidArgumentError(f"cannot replay fx node {n.name} ({n.op})")
        env[n.name] = v
        return v


# ---- in-place writes -------------------------------------------------------------------------
_INPLACE_KEY = "lipbound_inplace"  # fx node meta: where the node writes, ("arg", i) / ("kw", k)
_INPLACE_FUNCS: set[Any] = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.setitem,
}


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _target_name(target: Any) -> str:
    s = str(target)
    if s.startswith("aten."):
        return s.split(".")[1]
    return str(getattr(target, "__name__", ""))


def _first_param(target: Any) -> str | None:
    if not callable(target):
        return None
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return params[0] if params else None


def _inplace_slot(n: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple[str, Any] | None:
    """Where node ``n`` writes in place: ``("arg", 0)`` or ``("kw", name)``; ``None`` if nowhere.

    In-place are: tensor methods and torch / aten functions whose name ends in one ``_``
    (``mul_``, ``F.relu_``, ``aten.add_.Tensor``, ``copy_``), augmented assignment
    (``operator.iadd``...), ``operator.setitem`` (``x[i] = v``), calls with ``inplace=True``
    (keyword or positional) and modules whose ``inplace`` attribute is True.
    """
    if n.op == "call_method":
        return ("arg", 0) if _is_inplace_name(str(n.target)) and n.args else None
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        return ("arg", 0) if getattr(mod, "inplace", False) is True and n.args else None
    if n.op != "call_function":
        return None
    t = n.target
    try:
        hit = t in _INPLACE_FUNCS
    except TypeError:
        hit = False
    hit = hit or _is_inplace_name(_target_name(t)) or n.kwargs.get("inplace") is True
    first = None
    if not hit or not n.args:
        first = _first_param(t)
        if not hit and first is not None and callable(t):
            try:
                bound = inspect.signature(t).bind_partial(*n.args, **n.kwargs)
                hit = bound.arguments.get("inplace") is True
            except (TypeError, ValueError):
                hit = False
    if not hit:
        return None
    if n.args:
        return ("arg", 0)
    if first is not None and first in n.kwargs:
        return ("kw", first)
    return None


def _written(n: torch.fx.Node, slot: tuple[str, Any]) -> Any:
    return n.args[slot[1]] if slot[0] == "arg" else n.kwargs[slot[1]]


def _run_op(
    n: torch.fx.Node,
    gm: torch.fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call_module: Callable[..., Any],
) -> Any:
    """Run one fx call node; a functionalised in-place node writes into a copy and returns it.

    The copy is exactly what the original op leaves in the written tensor (every in-place torch
    op returns, or leaves in, its first argument), and the parents' tensors are never modified.
    """
    slot = n.meta.get(_INPLACE_KEY)
    copy: torch.Tensor | None = None
    if slot is not None:
        if slot[0] == "arg" and isinstance(args[slot[1]], torch.Tensor):
            copy = args[slot[1]].clone()
            args = (*args[: slot[1]], copy, *args[slot[1] + 1:])
        elif slot[0] == "kw" and isinstance(kwargs.get(slot[1]), torch.Tensor):
            copy = kwargs[slot[1]].clone()
            kwargs = {**kwargs, slot[1]: copy}
    if n.op == "call_function":
        v = n.target(*args, **kwargs)  # type: ignore[operator]
    elif n.op == "call_method":
        self_obj, *rest = args
        name = str(n.target)
        if name == "view" and not any(isinstance(a, torch.dtype) for a in rest) \
                and "dtype" not in kwargs:
            # a shape view is a reshape here (the graph is functional: nothing aliases). When
            # simplify drops a ``.contiguous()`` (an identity), the merged node replays
            # ``transpose -> view``, which torch refuses on the non-contiguous tensor
            name = "reshape"
        v = getattr(self_obj, name)(*rest, **kwargs)
    else:
        v = call_module(gm.get_submodule(str(n.target)), *args, **kwargs)
    return copy if copy is not None else v


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Proxy(torch.fx.Proxy):
    """A proxy that records augmented assignment as the in-place op it is on tensors.

    ``torch.fx.Proxy`` has no ``__iadd__``, so ``z += y`` is traced as ``z = z + y``: right for
    ``z`` but wrong for every other name of the same tensor (``z = y; z += y; return y``
    returns ``2 y`` eagerly). Recording ``operator.iadd`` lets :func:`_functionalize` rewire
    those reads (on Python numbers ``operator.iadd`` is just ``+``, and nothing is marked).
    """


def _augmented(op: Callable[[Any, Any], Any]) -> Callable[[torch.fx.Proxy, Any], Any]:
    def method(self: torch.fx.Proxy, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
              "iand", "ior", "ixor", "ilshift", "irshift"):
    setattr(_Proxy, f"__{_name}__", _augmented(getattr(operator, _name)))


class _Tracer(torch.fx.Tracer):
    """Default fx leaves (``torch.nn`` modules except containers) plus modules with a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True  # source lines for the messages of refusals

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from ..rules import has_module_rule
        from ..rules.structural import is_eval_identity

        if has_module_rule(m) or is_eval_identity(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


_Span = tuple[int, int, int]  # (storage address, first byte, last byte) a tensor can touch


def _spans(v: Any) -> list[_Span]:
    """Memory a value (tensor, or tuple / list of tensors) can read or write."""
    out: list[_Span] = []
    items = v if isinstance(v, (tuple, list)) else (v,)
    for t in items:
        if isinstance(t, (tuple, list)):
            out.extend(_spans(t))
            continue
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.layout != torch.strided:
            continue
        try:
            base = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            continue
        size = t.element_size()
        lo = int(t.storage_offset()) * size
        reach = sum((int(d) - 1) * abs(int(st)) for d, st in zip(t.shape, t.stride()))
        out.append((base, lo, lo + reach * size + size - 1))
    return out


def _overlap(a: list[_Span], b: list[_Span]) -> bool:
    return any(p == q and lo1 <= hi2 and lo2 <= hi1 for p, lo1, hi1 in a for q, lo2, hi2 in b)


class _Prop(ShapeProp):
    """Shape propagation that also keeps every node's value (public Interpreter API).

    ``functional=False`` (the first run, on the graph as traced): records the memory each value
    can touch (:func:`_spans`), marks in-place nodes (``meta[_INPLACE_KEY]``), and refuses an
    in-place write into the model's parameters / buffers *before* it happens.
    ``functional=True`` (after :func:`_functionalize`): marked nodes write into copies.
    """

    def __init__(
        self, gm: torch.fx.GraphModule, *, functional: bool, model_name: str = ""
    ) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}
        self.spans: dict[str, list[_Span]] = {}
        self.functional = functional
        self.model_name = model_name
        self.state: list[tuple[str, list[_Span]]] = []
        if not functional:
            named = list(gm.named_parameters()) + list(gm.named_buffers())
            for nd in gm.graph.nodes:
                if nd.op == "get_attr":
                    v = _fetch_attr(gm, str(nd.target))
                    if isinstance(v, torch.Tensor):
                        named.append((str(nd.target), v))
            for name, t in named:
                self.state.append((name, _spans(t)))

    def run_node(self, n: torch.fx.Node) -> Any:
        if self.functional and n.meta.get(_INPLACE_KEY) is not None:
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                result = _run_op(n, self.module, args, kwargs, _plain_call)  # type: ignore[arg-type]
        else:
            if not self.functional:
                self._mark_inplace(n)
            result = super().run_node(n)
        self.values[n.name] = result
        if not self.functional:
            self.spans[n.name] = _spans(result)
        return result

    def _mark_inplace(self, n: torch.fx.Node) -> None:
        if n.op == "call_function" and isinstance(n.kwargs.get("out"), torch.fx.Node):
            raise _inplace_error(
                n, self.model_name,
                "writes its result into the tensor given as out=, which lipbound cannot follow",
            )
        slot = _inplace_slot(n, self.module)  # type: ignore[arg-type]
        if slot is None:
            return
        target = _written(n, slot)
        if not isinstance(target, torch.fx.Node):
            return
        value = self.env.get(target)
        if not isinstance(value, torch.Tensor):
            return  # ``k += 1`` on a Python number
        span = _spans(value)
        for name, st in self.state:
            if _overlap(span, st):
                raise UnsupportedModelError(
                    [UnsupportedNode(name, "buffer/parameter", _state_hint(n))],
                    what=f"{self.model_name} writes into its own state in forward",
                )
        n.meta[_INPLACE_KEY] = slot


def _plain_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module(*args, **kwargs)


def _internal(frame_line: str) -> bool:
    """A ``File "...", line ...`` line of torch's or lipbound's own code."""
    parts = frame_line.split('"')
    path = parts[1] if len(parts) > 1 else ""
    return path.startswith((_TORCH_DIR, _LIPBOUND_DIR))


_TORCH_DIR = os.path.dirname(torch.__file__)
_LIPBOUND_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _where(n: torch.fx.Node) -> str:
    """``"file.py:12 (code)"`` of a traced node's source line, or ``""``."""
    trace = n.meta.get("stack_trace") or getattr(n, "stack_trace", None) or ""
    lines = [ln.strip() for ln in str(trace).splitlines() if ln.strip()]
    files = [i for i, ln in enumerate(lines) if ln.startswith("File ") and not _internal(ln)]
    if not files:
        return ""
    i = files[-1]
    head = lines[i]
    try:
        path = head.split('"')[1]
        line = head.split(", line ")[1].split(",")[0]
    except IndexError:
        return ""
    code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
    return f"{os.path.basename(path)}:{line}" + (f" ({code})" if code else "")


def _op_label(n: torch.fx.Node) -> str:
    if n.op == "call_module":
        return f"{n.target} (inplace=True)"
    if n.op == "call_method":
        return str(n.target)
    return _pretty_target(n)


def _out_of_place_hint(n: torch.fx.Node) -> str:
    name = _op_label(n)
    if n.op == "call_method" and _is_inplace_name(name):
        return f"write y = y.{name[:-1]}(...) instead of y.{name}(...)"
    if n.op == "call_function" and n.target in (operator.iadd, operator.isub, operator.imul,
                                                operator.itruediv):
        return "write y = y + ... (a new tensor) instead of y += ..."
    return "compute a new tensor out of place (inplace=False) and use it"


def _inplace_error(n: torch.fx.Node, model: str, why: str) -> UnsupportedModelError:
    at = _where(n)
    label = f"{n.name}" + (f" at {at}" if at else "")
    return UnsupportedModelError(
        [UnsupportedNode(label, _op_label(n), f"{why}; {_out_of_place_hint(n)}")],
        what=f"{model} writes a tensor in place in a way the graph cannot follow",
    )


def _state_hint(n: torch.fx.Node) -> str:
    at = _where(n)
    return (
        f"{_op_label(n)}{' at ' + at if at else ''} modifies it in forward, so the model is not "
        "a fixed function of its input. Update it outside forward, or only under "
        "`if self.training:` (lipbound analyses eval mode)"
    )


def _functionalize(gm: torch.fx.GraphModule, spans: dict[str, list[_Span]], model: str) -> None:
    """Rewrite ``gm.graph`` so that reads after an in-place write read the write's node.

    For a marked node ``n`` writing tensor ``t``: every later user of ``t`` is rewired to ``n``
    (whose replay returns the written copy, see :func:`_run_op`), so the graph computes what the
    eager code computes. This is exact only if no *other* earlier tensor sharing ``t``'s memory
    (a view of ``t``, the base ``t`` is a view of, a sibling slice: detected from the memory
    spans recorded in the first run) is read after ``n``, and only if ``n`` itself reads no such
    other tensor (``h += h[..., :1]``: eager torch reads entries it has already updated, which
    no out-of-place op reproduces): such models are refused.
    """
    nodes = list(gm.graph.nodes)
    pos = {nd: i for i, nd in enumerate(nodes)}
    for n in nodes:
        slot = n.meta.get(_INPLACE_KEY)
        if slot is None:
            continue
        t = _written(n, slot)
        if not isinstance(t, torch.fx.Node):
            continue
        here = spans.get(t.name, [])
        for a in n.all_input_nodes:
            if a is not t and a.op != "get_attr" and _overlap(here, spans.get(a.name, [])):
                raise _inplace_error(
                    n, model,
                    f"writes into {t.name} in place while reading {a.name}, which shares its "
                    "memory (a view of it): eager torch then reads partly updated values",
                )
        spans[n.name] = here  # n's functional value is the written tensor (setitem returns None)
        for m in nodes[: pos[n]]:
            if m is t or m.op == "get_attr" or not _overlap(here, spans.get(m.name, [])):
                continue
            late = [u for u in m.users if pos[u] > pos[n] and not _is_shape_query(u)]
            if late:
                raise _inplace_error(
                    n, model,
                    f"writes into {t.name} in place, but {m.name} shares its memory (a view "
                    f"or the base of one) and is read afterwards by {late[0].name}",
                )
        for u in list(t.users):
            if pos[u] > pos[n]:
                u.replace_input_with(t, n)
    gm.graph.lint()
    gm.recompile()


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


_OUT_OF_PLACE: dict[Any, Any] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def _key(n: torch.fx.Node, gm: torch.fx.GraphModule) -> Any:
    """The rule key; a functionalised in-place op without a rule of its own takes the rule of
    its out-of-place form (``"tanh_"`` -> ``"tanh"``, ``torch.relu_`` -> ``torch.relu``): the
    node computes exactly that function of its inputs (see :func:`_run_op`)."""
    from ..rules import get_rule
    from ..rules.structural import is_eval_identity

    if n.op == "call_module":
        called = gm.get_submodule(str(n.target))
        if get_rule(type(called)) is None and is_eval_identity(called):
            return nn.Identity  # declared the identity in eval (checked in _build)
        return type(called)
    key: Any = str(n.target) if n.op == "call_method" else _aten_key(n.target)
    if n.meta.get(_INPLACE_KEY) is None or get_rule(key) is not None:
        return key
    if isinstance(key, str):
        alt: Any = key[:-1] if _is_inplace_name(key) else key
    else:
        try:
            alt = _OUT_OF_PLACE.get(key)
        except TypeError:
            alt = None
        name = _target_name(key)
        if alt is None and _is_inplace_name(name):
            mod = torch.nn.functional if "functional" in str(getattr(key, "__module__", "")) \
                else torch
            alt = getattr(mod, name[:-1], None)
            if alt is None and str(key).startswith("aten."):
                alt = name[:-1]  # the tensor-method name of the same op
    return alt if alt is not None and get_rule(alt) is not None else key


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
        with _quiet_torch_logs():  # torch logs a graph dump on failure; our message is enough
            ep = torch.export.export(
                model, (sample,), dynamic_shapes=({0: batch},), strict=False
            )
        return ep.module()
    except Exception as exc:
        raise InvalidArgumentError(
            f"{fx_error} (torch.export failed as well: {_first_line(exc, 120)})"
        ) from exc


@contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silence torch's warnings and the partial graph it prints to stderr when export fails."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


class _Root(nn.Module):
    """Wrapper so that a model which is itself a leaf (``nn.Conv2d``...) becomes one node."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x)


class _SignatureError(InvalidArgumentError):
    """forward needs more than one input: torch.export would fail the same way (not tried)."""


def _forward_defaults(model: nn.Module) -> dict[str, Any]:
    """The default of every forward argument after the first (``attn_mask=None``, ``*,
    foo=1``): the model is bounded as the function of its first input with the others at
    their defaults. A required extra argument is refused, naming it."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    concrete: dict[str, Any] = {}
    required = []
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        else:
            concrete[p.name] = p.default
    if not params or params[0].kind in (params[0].VAR_POSITIONAL, params[0].VAR_KEYWORD):
        return concrete
    if required:
        names = ", ".join(repr(n) for n in required)
        raise _SignatureError(
            f"{type(model).__name__}.forward({', '.join(p.name for p in params)}) needs "
            f"{len(required) + 1} inputs ({names} without a default); lipbound bounds functions "
            f"of ONE input tensor ({params[0].name!r}). Fix the others: give them defaults, or "
            "wrap the model in an nn.Module whose forward takes one tensor and calls it with "
            "fixed values for them."
        )
    return concrete


def _drop_defaulted_inputs(graph: torch.fx.Graph) -> None:
    """Remove the placeholders torch.fx makes for defaulted arguments (``concrete_args``).

    fx specialises the traced code to the default (``if attn_mask is not None`` takes the
    default's branch) and keeps the argument as a placeholder read only by its checks
    (``_assert_is_none``, ``torch._assert(foo == 1)``). When nothing the output depends on
    reads it, the placeholder and those checks are erased; otherwise it is left (and the model
    is then refused as having several inputs).
    """
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    order = {n: i for i, n in enumerate(graph.nodes)}
    for ph in phs[1:]:
        seen: set[torch.fx.Node] = set()
        stack = [ph]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(n.users)
        if any(n.op == "output" for n in seen):
            continue
        for n in sorted(seen, key=lambda n: -order[n]):
            graph.erase_node(n)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    tracer = _Tracer()
    if tracer.is_leaf_module(model, ""):
        model = _Root(model)
    concrete = _forward_defaults(model)
    before = set(vars(model))
    try:
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
        except Exception as exc:  # torch.fx raises many types (TraceError, TypeError...)
            raise InvalidArgumentError(_trace_failure(model, exc)) from exc
        if concrete:
            _drop_defaulted_inputs(graph)
        return torch.fx.GraphModule(tracer.root, graph)  # copies the attributes it reads
    finally:
        # torch.fx stores the tensor constants it meets on the root module: the user's model
        # would leave capture with new attributes (and a changed fingerprint)
        for k in [k for k in vars(model) if k not in before and k.startswith("_tensor_const")]:
            del vars(model)[k]


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _user_line(exc: BaseException) -> str:
    """``"file.py:12: if x.sum() > 0:"`` for the innermost frame outside torch and lipbound."""
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename
        if not f.startswith((_TORCH_DIR, _LIPBOUND_DIR, "<")):
            code = linecache.getline(f, tb.tb_lineno).strip()
            found = f"{os.path.basename(f)}:{tb.tb_lineno}" + (f": {code}" if code else "")
        tb = tb.tb_next
    return found


def _trace_failure(model: nn.Module, exc: BaseException) -> str:
    """A short message (no graph dump) for a model torch.fx cannot trace."""
    where = _user_line(exc)
    control = "control flow" in str(exc) or type(exc).__name__ == "TraceError"
    cause = (
        "data-dependent control flow (an if / for / while on tensor values)"
        if control else _first_line(exc)
    )
    return (
        f"torch.fx could not trace {type(model).__name__}: {cause}"
        + (f" at {where}" if where else "") + ". Fix: rewrite it with tensor ops (torch.where, "
        "clamp, masks), or move it into a submodule and give that module a rule with "
        "lipbound.register_rule(...)."
    )


def _hooked(model: nn.Module) -> list[UnsupportedNode]:
    """Forward hooks / pre-hooks that the traced graph would not contain.

    torch.fx calls non-leaf submodules through ``Module.__call__``, so their hooks are traced;
    the model's own hooks (``forward`` is traced directly), a leaf module's hooks (the leaf is
    one node, its rule reads its weights) and global module hooks are not. The old-API
    ``spectral_norm`` / ``weight_norm`` pre-hooks only recompute the weight (eval semantics are
    handled by :func:`~lipbound.graph.modules.eval_weight`) and are allowed.
    """
    from torch.nn.modules import module as mm

    def label(h: Any) -> str:
        fn = getattr(h, "__func__", h)
        name = getattr(fn, "__qualname__", None) or type(h).__name__
        return str(name)

    bad: list[UnsupportedNode] = []
    tracer = _Tracer()
    for kind, table in (("forward hook", mm._global_forward_hooks),
                        ("forward pre-hook", mm._global_forward_pre_hooks)):
        for h in table.values():
            bad.append(UnsupportedNode(
                "<every module>", "global " + kind,
                f"{label(h)} (register_module_{kind.replace(' ', '_').replace('-', '_')}) "
                "changes what every module computes; remove it (handle.remove()) first",
            ))
    for name, m in model.named_modules():
        traced = bool(name) and not tracer.is_leaf_module(m, name)
        if traced:
            continue
        where = name or f"{type(model).__name__} (the model itself)"
        hooks = [("forward hook", h) for h in m._forward_hooks.values()]
        hooks += [("forward pre-hook", h) for h in m._forward_pre_hooks.values()
                  if not isinstance(h, WEIGHT_HOOKS)]
        for kind, h in hooks:
            bad.append(UnsupportedNode(
                where, type(m).__name__,
                f"{kind} {label(h)} can change what it computes and is not part of the traced "
                "graph; put its computation into forward, or remove it (handle.remove())",
            ))
    return bad


class _State:
    """Parameters and buffers before capture: detect (and undo, for buffers) writes by forward.

    Writes are seen through the tensors' version counters (bumped by every in-place op, also
    under ``no_grad``, also through views) and object identity (a reassigned buffer).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.items: list[tuple[str, nn.Module, str, torch.Tensor, int, torch.Tensor | None]] = []
        for mname, m in model.named_modules():
            for pname, p in m._parameters.items():
                if p is not None:
                    self.items.append((mname, m, pname, p, p._version, None))
            for bname, b in m._buffers.items():
                if b is not None:
                    self.items.append((mname, m, bname, b, b._version, b.detach().clone()))

    def restore(self) -> None:
        """Put every buffer back as it was (after a failed capture); no error."""
        self._scan()

    def check(self) -> None:
        """Restore written buffers, then refuse the model, naming what forward wrote."""
        bad = self._scan()
        if bad:
            raise UnsupportedModelError(
                bad, what=f"{type(self.model).__name__} writes into its own state in forward"
            )

    def _scan(self) -> list[UnsupportedNode]:
        bad: list[UnsupportedNode] = []
        for mname, m, name, t, version, copy in self.items:
            now = m._parameters.get(name) if copy is None else m._buffers.get(name)
            if now is t and t._version == version:
                continue
            qual = f"{mname}.{name}" if mname else name
            what = "parameter" if copy is None else "buffer"
            if copy is not None:  # put the buffer back as it was
                if now is not t:
                    m._buffers[name] = t
                if t._version != version:
                    with torch.no_grad():
                        t.copy_(copy)
            bad.append(UnsupportedNode(
                qual, what,
                "forward modifies it (self.x += ..., .mul_(), assignment), so the model is not "
                "a fixed function of its input. Update it outside forward, or only under "
                "`if self.training:` (lipbound analyses eval mode)",
            ))
        return bad


def capture(model: nn.Module, input_shape: Any, *, batch_size: int = 2) -> OpGraph:
    """Capture ``model`` as an :class:`OpGraph` of the ops that act on the input values.

    Node order is topological; node names are torch.fx names; every node has a batched ``fn``
    reproducing it from its parents' tensors, ``in_shapes``/``out_shape`` without the batch
    dimension, ``call.key`` (module class, function or method name used to find its rule),
    ``call.args``/``call.kwargs`` (the call's arguments with tensors replaced by
    :class:`TensorArg`), ``rule`` (the rule or ``None``) and ``unsupported``
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
    mname = type(model).__name__
    hooked = _hooked(model)
    if hooked:
        raise UnsupportedModelError(
            hooked, what=f"{mname} has forward hooks that the captured graph would not contain"
        )
    flags = {m: m.training for m in model.modules()}
    state = _State(model)
    ok = False
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
        except _SignatureError:
            raise
        except InvalidArgumentError as fx_error:
            gm = _export(model, sample.clone(), fx_error)
        state.check()  # eager writes while tracing (``self.count += 1`` on a real buffer)
        sample = sample[:batch_size]
        first = _Prop(gm, functional=False, model_name=mname)
        _propagate(first, model, sample, shape)
        state.check()
        _functionalize(gm, first.spans, mname)
        prop = _Prop(gm, functional=True, model_name=mname)
        _propagate(prop, model, sample, shape)
        state.check()
        ok = True
    finally:
        for m, t in flags.items():
            m.train(t)
        if not ok:
            state.restore()
    return _build(model, gm, prop.values, shape, batch_size)


def _propagate(prop: _Prop, model: nn.Module, sample: torch.Tensor, shape: tuple[int, ...]) -> None:
    try:
        with torch.no_grad():
            prop.propagate(sample.clone())  # a copy: the model may write into its input
    except LipboundError:
        raise
    except Exception as exc:
        _raise_if_integer_inputs(model, exc)
        raise ShapeError(
            f"running {type(model).__name__} on a batch of shape "
            f"{tuple(sample.shape)} failed: {type(exc).__name__}: {exc}. Check input_shape "
            "(one sample's shape, without the batch dimension)."
        ) from exc


class _Trace:
    """The value-dependent tensor nodes of a traced graph and the wiring between them: a
    node's inputs are the value-dependent tensors it reads, through non-tensor
    intermediaries (tuples, getitem, shape arithmetic on values), which :meth:`parents`
    also returns (``via``)."""

    def __init__(self, fx_nodes: list[torch.fx.Node], values: dict[str, Any]) -> None:
        self.value_dep: set[str] = set()
        for n in fx_nodes:
            if n.op == "placeholder":
                self.value_dep.add(n.name)
            elif n.op in ("call_function", "call_method", "call_module"):
                if not _is_shape_query(n) and any(a.name in self.value_dep
                                                  for a in n.all_input_nodes):
                    self.value_dep.add(n.name)
        self.is_tensor = {n.name: isinstance(values.get(n.name), torch.Tensor) for n in fx_nodes}
        self.values = values

    def graph_node(self, n: torch.fx.Node) -> bool:
        return n.name in self.value_dep and self.is_tensor[n.name]

    def _collect(self, n: torch.fx.Node, out: list[str], via: list[torch.fx.Node]) -> None:
        for a in _flat_nodes((n.args, n.kwargs)):
            if a.name not in self.value_dep:
                continue
            if self.graph_node(a):
                out.append(a.name)
            elif not _is_shape_query(a):
                via.append(a)
                self._collect(a, out, via)

    def parents(self, n: torch.fx.Node) -> tuple[tuple[str, ...], list[torch.fx.Node]]:
        """``(inputs, via)``: the value-dependent tensor nodes feeding ``n``, and the
        non-tensor nodes in between."""
        found: list[str] = []
        through: list[torch.fx.Node] = []
        self._collect(n, found, through)
        return tuple(found), through

    def conv(self, a: torch.fx.Node) -> Any:
        """An fx argument as a node's call argument: a graph tensor by name, else its value."""
        return TensorArg(a.name) if self.graph_node(a) else self.values.get(a.name)


def _io_nodes(fx_nodes: list[torch.fx.Node], tr: _Trace) -> tuple[torch.fx.Node, torch.fx.Node]:
    """``(input placeholder, output value)`` of a traced graph, or the error that says why the
    model is not a function of one tensor to one tensor."""
    placeholders = [n for n in fx_nodes if n.op == "placeholder"]
    placeholders = placeholders[:1] + [p for p in placeholders[1:] if p.users]
    if len(placeholders) != 1:
        raise InvalidArgumentError(
            f"expected a model with one input tensor; the traced graph has {len(placeholders)}"
        )
    out_fx = next(n for n in fx_nodes if n.op == "output")
    result = out_fx.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:  # torch.export's flat outputs
        result = result[0]
    if not isinstance(result, torch.fx.Node) or not tr.graph_node(result):
        raise InvalidArgumentError(
            "the model must return one tensor that depends on its input; got "
            f"{type(tr.values.get(getattr(result, 'name', ''), result)).__name__}. Wrap it so "
            "that forward returns a single tensor."
        )
    return placeholders[0], result


def _live(
    fx_nodes: list[torch.fx.Node], tr: _Trace, result: torch.fx.Node
) -> tuple[set[str], dict[str, tuple[tuple[str, ...], list[torch.fx.Node]]]]:
    """``(live, parents)``: the nodes the output depends on, and every node's parents."""
    parents_of = {n.name: tr.parents(n) for n in fx_nodes
                  if tr.graph_node(n) and n.op != "placeholder"}
    live: set[str] = set()
    stack = [result.name]
    while stack:
        k = stack.pop()
        if k in live:
            continue
        live.add(k)
        if k in parents_of:
            stack.extend(parents_of[k][0])
    return live, parents_of


def _op_node(
    gm: torch.fx.GraphModule, n: torch.fx.Node,
    parents: tuple[tuple[str, ...], list[torch.fx.Node]], tr: _Trace, *,
    shapes: dict[str, tuple[int, ...]], qual: str, batch: int,
) -> Node:
    """The :class:`Node` of one live fx node (a getitem on a tuple-valued producer becomes
    the producer's op with its index)."""
    from ..rules.structural import is_eval_identity

    ins, via = parents
    op_node, getitem = n, None
    if n.op == "call_function" and n.target is operator.getitem and via:
        op_node = via[0]  # a getitem on a tuple-valued producer (chunk, split, max(dim)...)
        getitem = n.args[1]
    module = gm.get_submodule(str(op_node.target)) if op_node.op == "call_module" else None
    op = _op_name(op_node, gm) + ("" if getitem is None else f"[{getitem}]")
    if n.op != "call_module" and op_node.op == "call_module":
        qual = f"{op_node.target}[{getitem}]"
    elif n.op != "call_module":
        path = _module_path(op_node)
        qual = f"{path + '.' if path else ''}{n.name} ({_pretty_target(op_node)})"
    key = _key(op_node, gm)
    checked: bool | None = None
    if module is not None and key is nn.Identity and is_eval_identity(module):
        # a module declared the identity in eval: its output must be its input here
        checked = len(ins) == 1 and torch.equal(tr.values[n.name], tr.values[ins[0]])
    call = Call(
        key=key, target=op_node.target, fx_op=op_node.op,
        args=tuple(torch.fx.node.map_arg(op_node.args, tr.conv)),
        kwargs=dict(torch.fx.node.map_arg(op_node.kwargs, tr.conv)),
        getitem=getitem, module_path=_module_path(op_node),
        batch_mixing=_mixes_batch(tr.values[n.name], batch), identity_checked=checked,
    )
    return Node(
        name=n.name, qualname=qual, op=op, kind="op", inputs=ins,
        in_shapes=tuple(shapes[i] for i in ins), out_shape=shapes[n.name],
        fn=_Replay(gm, n, ins, tr.value_dep, shapes), module=module, call=call,
    )


def _build(
    model: nn.Module,
    gm: torch.fx.GraphModule,
    values: dict[str, Any],
    shape: tuple[int, ...],
    batch: int,
) -> OpGraph:
    """The :class:`OpGraph` of a traced model: validate (one input, one tensor output) ->
    keep the nodes the output depends on -> one typed, classified node each."""
    from ..rules import classify

    fx_nodes = list(gm.graph.nodes)
    tr = _Trace(fx_nodes, values)
    inp, result = _io_nodes(fx_nodes, tr)
    live, parents_of = _live(fx_nodes, tr, result)
    shapes = {k: _strip(v.shape) for k, v in values.items() if isinstance(v, torch.Tensor)}
    calls: dict[str, int] = {}
    for n in fx_nodes:
        if n.op == "call_module" and n.name in live:
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    seen: dict[str, int] = {}
    nodes: dict[str, Node] = {inp.name: Node(
        name=inp.name, qualname="input", op="input", kind="input", inputs=(),
        in_shapes=(), out_shape=shape, fn=_identity, call=Call(),
    )}
    for n in fx_nodes:
        if n.name not in live or n.op == "placeholder":
            continue
        qual = ""
        if n.op == "call_module":  # a module called several times: one node per call
            t = str(n.target)
            seen[t] = seen.get(t, 0) + 1
            qual = t if calls[t] == 1 else f"{t} (call {seen[t]})"
        nodes[n.name] = _op_node(gm, n, parents_of[n.name], tr, shapes=shapes, qual=qual,
                                 batch=batch)
    nodes["output"] = Node(
        name="output", qualname="output", op="output", kind="output", inputs=(result.name,),
        in_shapes=(shapes[result.name],), out_shape=shapes[result.name], fn=_identity,
        call=Call(),
    )
    for node in nodes.values():
        if node.kind not in ("input", "output"):
            classify(node)
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
