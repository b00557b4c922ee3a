"""The rule registry: which Lipschitz rule applies to which captured node.

A *rule* tells, for one op family and one norm, the constant of the op with respect to each of
its tensor inputs (``|f(..., x_i, ...) - f(..., y_i, ...)| <= c_i |x_i - y_i|``), whether that
constant is certified (proven) or an estimate, how the per-input terms combine (a sum for
``add``; the root of the sum of squares for ``cat`` in l2), and, for element-wise activations,
the range ``[a, b]`` of the derivative that SeqLip needs.

Rules are keyed by

* a module class (``nn.Linear``); a subclass matches only if it does not override ``forward``;
* a function object (``torch.nn.functional.relu``, ``torch.cat``, ``operator.add``);
* a tensor-method name (``"relu"``, ``"view"``), as torch.fx records ``x.relu()``.

Nothing is treated as 1-Lipschitz unless a rule says so; the trivial 1-Lipschitz ops (reshape,
permute, slicing, dropout in eval...) are *declared* in one table in
:mod:`lipbound.rules.structural`.

Every rule's output goes through ONE gate, :func:`checked_constant` (each :class:`Rule` wraps
its ``constant`` with it when it is built): a NaN, infinite or negative constant is an error
naming the node, never a number, and every certified constant is rounded up by the relative
margin :data:`ROUND_REL` with :func:`lipbound.spectral.certify.round_up` (the package's one
rounding helper); activation slope ranges are widened by the same margin
(:func:`widen_range`). Why that margin suffices is in :data:`ROUND_REL`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from ..errors import InvalidArgumentError, NonFiniteError
from ..spectral.certify import round_up as _up

if TYPE_CHECKING:  # pragma: no cover
    from ..graph.types import Node

__all__ = [
    "ROUND_REL",
    "Combine",
    "NodeConstant",
    "Rule",
    "RuleContext",
    "RuleKey",
    "get_rule",
    "lookup",
    "register_rule",
    "registered_keys",
    "checked_constant",
    "widen_range",
]

Combine = Literal["sum", "rss", "max"]
RuleKey = type | Callable[..., Any] | str

#: Relative rounding margin of every certified rule constant and slope range: ``2^-22``, four
#: float32 unit roundoffs (``u32 = 2^-24``). Each rule proves its constant for the op in real
#: arithmetic, with the parameters as stored, and evaluates it in float64 (relative error a few
#: ``u64 = 2^-53``, below ``1e-12`` in every rule). Torch runs the op in the model's dtype with
#: its constants rounded to it: float32 ``1/6`` (Hardsigmoid) is ``(1/6)(1 + 2^-25)``, a
#: LeakyReLU slope ``1.7`` becomes ``1.7 (1 + 2.8e-8)``, SELU's slope ``scale * alpha * e^t``
#: carries two rounded constants and one rounded product, BatchNorm's ``rsqrt(var + eps)`` two
#: roundings: at most three roundings of ``u32`` each, ``(1 + u32)^3 < 1 + 4 u32`` once the
#: float64 error is added. The margin also covers AutoLip's float64 composition
#: (``sum c_i L_i``: at most 2 ``u64`` per node, ``< 2^-30`` for any graph of under ``2^20``
#: nodes). Not covered: models run in float16 / bfloat16 (``u = 2^-11`` / ``2^-8``).
ROUND_REL = 2.0**-22


@dataclass(frozen=True)
class RuleContext:
    """Options a rule may use: the norm (``"1"``, ``"2"``, ``"inf"``) and spectral settings."""

    norm: str = "2"
    tol: float = 1e-6
    max_iter: int = 1000
    certify: bool = True


@dataclass(frozen=True, kw_only=True)
class NodeConstant:
    """Constants of one node w.r.t. each of its tensor inputs.

    ``constants[i]`` is the factor used in the bound (a certified upper bound where one is
    available, else the estimate); ``certified`` is True only when every entry is proven;
    ``estimate`` an optional uncertified companion (e.g. the power-iteration value next to a
    certified bound); ``combine`` how ``c_i * L_i`` over inputs are combined: ``"sum"``
    (general case, add), ``"rss"`` (root of the sum of squares: cat in l2), ``"max"`` (cat in
    l-inf). ``slope_range`` is set for activations.
    """

    constants: tuple[float, ...]
    certified: bool
    how: str
    estimate: float | None = None
    combine: Combine = "sum"
    seconds: float = 0.0
    slope_range: tuple[float, float] | None = None
    name: str = ""
    qualname: str = ""
    op: str = ""

    @property
    def value(self) -> float:
        """The largest per-input constant (the node's factor in a chain)."""
        return max(self.constants) if self.constants else 0.0


RuleFn = Callable[["Node", RuleContext], Any]
SlopeFn = Callable[["Node"], tuple[float, float]]
CheckFn = Callable[["Node"], str | None]
KindFn = Callable[["Node"], str]


@dataclass(frozen=True)
class Rule:
    """One registered rule.

    ``kind`` is ``"linear"``, ``"activation"`` or ``"op"``, or ``"affine"`` meaning "linear when
    the node has one tensor input, else op" (add, mul, matmul...), or ``"elementwise"``
    meaning "activation when the node has one tensor input, else op" (``torch.maximum``).
    ``check(node)`` returns a reason when this particular node is not covered (e.g. a
    product of two inputs).
    """

    name: str
    kind: str
    constant: RuleFn
    slope_range: SlopeFn | None = None
    check: CheckFn | None = None
    norms: tuple[str, ...] = ("1", "2", "inf")
    certified: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not getattr(self.constant, "_checked", False):
            object.__setattr__(self, "constant", _gated(self.constant, self.name))

    def kind_for(self, node: Node) -> str:
        if self.kind == "affine":
            return "linear" if len(node.inputs) == 1 else "op"
        if self.kind == "elementwise":
            return "activation" if len(node.inputs) == 1 else "op"
        return self.kind


def _round_up(v: float) -> float:
    """``v`` rounded up by :data:`ROUND_REL` (an exact 0 stays 0: a zero map is exact)."""
    return _up(v, ROUND_REL) if v > 0 else 0.0


def _round_down(v: float) -> float:
    """``v`` rounded towards ``-inf`` by :data:`ROUND_REL` (for lower slope ends)."""
    if v > 0:
        return v * (1.0 - ROUND_REL)  # the product's own rounding (u64) is far below ROUND_REL
    return -_up(-v, ROUND_REL) if v < 0 else 0.0


def widen_range(r: tuple[float, float], where: str = "a rule") -> tuple[float, float]:
    """A slope range ``[a, b]`` widened outwards by :data:`ROUND_REL` (see the module doc).

    Raises :class:`~lipbound.errors.InvalidArgumentError` unless ``a <= b`` are finite (a NaN
    end compared false everywhere and was widened to 0: ``(nan, 1)`` became ``[0, 1]``)."""
    a, b = float(r[0]), float(r[1])
    if not (math.isfinite(a) and math.isfinite(b) and a <= b):
        raise InvalidArgumentError(
            f"{where} gave the slope range {tuple(r)}: it needs finite a <= b (the range of "
            "the activation's derivative, e.g. (0.0, 1.0) for ReLU)"
        )
    return _round_down(a), -_round_down(-b)


def checked_constant(c: NodeConstant, node: Node, rule: str = "") -> NodeConstant:
    """The gate every rule output goes through (see the module docstring).

    Raises :class:`~lipbound.errors.NonFiniteError` for a NaN or infinite constant and
    :class:`~lipbound.errors.InvalidArgumentError` for a negative one (a Lipschitz constant
    is a norm: ``>= 0``). Certified constants are rounded up by :data:`ROUND_REL`; an
    activation's slope range is the (already widened) ``node.slope_range`` when set.
    """
    where = f"node {node.qualname!r} ({node.op})" + (f", rule {rule!r}" if rule else "")
    for v in c.constants:
        if not math.isfinite(v):
            raise NonFiniteError(
                f"{where} gave the constant {v}: a Lipschitz constant must be finite. Check the "
                "op's parameters and buffers for NaN/inf (or zeros it divides by), or give the "
                "op a rule with lipbound.register_rule(...)"
            )
        if v < 0:
            raise InvalidArgumentError(
                f"{where} gave the constant {v} < 0: a Lipschitz constant is a norm, never "
                "negative. Fix the rule (return the norm of the op, e.g. with |entries|)"
            )
    out = c
    if c.certified:
        out = replace(out, constants=tuple(_round_up(v) for v in c.constants))
    if c.slope_range is not None:
        checked = widen_range(c.slope_range, where)
        sr = node.slope_range if node.slope_range is not None else checked
        out = replace(out, slope_range=sr)
    return out


def _gated(fn: RuleFn, name: str) -> RuleFn:
    def constant(node: Node, ctx: RuleContext) -> NodeConstant:
        out = fn(node, ctx)
        if not isinstance(out, NodeConstant):
            raise InvalidArgumentError(
                f"rule {name!r} for {node.qualname} must return a NodeConstant; got {out!r}"
            )
        return checked_constant(out, node, name)

    constant._checked = True  # type: ignore[attr-defined]
    constant.__name__ = getattr(fn, "__name__", "constant")
    constant.__wrapped__ = fn  # type: ignore[attr-defined]
    return constant


_MODULES: dict[type, Rule] = {}
_FUNCTIONS: dict[Any, Rule] = {}
_METHODS: dict[str, Rule] = {}


def _store(key: RuleKey, rule: Rule) -> None:
    if isinstance(key, str):
        _METHODS[key] = rule
    elif isinstance(key, type):
        if not issubclass(key, nn.Module):
            raise InvalidArgumentError(
                f"register_rule: a class key must be an nn.Module subclass; got {key!r}"
            )
        _MODULES[key] = rule
    elif callable(key):
        _FUNCTIONS[key] = rule
    else:
        raise InvalidArgumentError(
            "register_rule: op_type must be an nn.Module subclass, a function (e.g. "
            f"torch.nn.functional.relu) or a tensor-method name (e.g. 'relu'); got {key!r}"
        )


def _as_constant(out: Any, node: Node, certified: bool, how: str) -> NodeConstant:
    """Normalise what a user rule returns (float, sequence of floats or NodeConstant)."""
    if isinstance(out, NodeConstant):
        return out
    n = max(1, len(node.inputs))
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        cs: tuple[float, ...] = (float(out),) * n
    elif isinstance(out, Sequence) and all(isinstance(c, (int, float)) for c in out):
        cs = tuple(float(c) for c in out)
        if len(cs) != n:
            raise InvalidArgumentError(
                f"rule for {node.qualname} returned {len(cs)} constants for {n} inputs"
            )
    else:
        raise InvalidArgumentError(
            f"rule for {node.qualname} must return a float, a list of floats (one per input) "
            f"or a NodeConstant; got {out!r}"
        )
    for c in cs:
        if not math.isfinite(c) or c < 0:
            raise InvalidArgumentError(
                f"rule for {node.qualname} returned a constant that is not finite and >= 0: {c}"
            )
    return NodeConstant(constants=cs, certified=certified, how=how)


def register_rule(
    op_type: RuleKey | Sequence[RuleKey],
    rule: RuleFn | float | None = None,
    *,
    kind: str = "op",
    slope_range: tuple[float, float] | SlopeFn | None = None,
    check: CheckFn | None = None,
    norms: Sequence[str] = ("1", "2", "inf"),
    certified: bool = True,
    name: str = "",
) -> Any:
    """Register the Lipschitz rule of an op; usable as a decorator.

    ``op_type`` is an ``nn.Module`` subclass, a function (``torch.nn.functional.gelu``) or a
    tensor-method name (``"gelu"``), or a list of those. ``rule`` is either a number (the
    constant w.r.t. every input, in every norm of ``norms``) or a callable
    ``rule(node, ctx) -> float | list[float] | NodeConstant`` where ``node`` is the captured
    :class:`lipbound.graph.Node` (``node.module`` is the module called, ``node.call.args``
    the call's arguments) and ``ctx`` a :class:`RuleContext` (``ctx.norm`` in ``"1"``, ``"2"``,
    ``"inf"``). ``kind="activation"`` needs ``slope_range=(a, b)`` with ``a <= f' <= b``.
    ``certified`` says whether you vouch for the constant (it is reported as certified).
    Modules with a registered rule become leaves of the captured graph.

    >>> import torch
    >>> from torch import nn
    >>> class Double(nn.Module):
    ...     def forward(self, x):
    ...         return 2 * torch.sin(x)
    >>> _ = register_rule(Double, 2.0, kind="activation", slope_range=(-2.0, 2.0))
    >>> get_rule(Double).name
    'Double'
    >>> del _MODULES[Double]  # (the example leaves the registry as it found it)
    """
    kinds = ("linear", "activation", "op", "affine")
    if kind not in kinds:
        raise InvalidArgumentError(f"kind must be one of {kinds}; got {kind!r}")
    for n in norms:
        if n not in ("1", "2", "inf"):
            raise InvalidArgumentError(f"norms must be among '1', '2', 'inf'; got {n!r}")
    if kind == "activation" and slope_range is None:
        raise InvalidArgumentError("an activation rule needs slope_range=(a, b)")
    keys: list[Any] = list(op_type) if isinstance(op_type, (list, tuple)) else [op_type]

    def decorate(fn: RuleFn | float) -> Any:
        core, label = _core_rule(fn)
        sr = _slope_fn(slope_range)

        def wrapped(node: Node, ctx: RuleContext) -> NodeConstant:
            out = _as_constant(core(node, ctx), node, certified, label)
            if out.slope_range is None and sr is not None:
                out = _with_slope(out, sr(node))
            return out

        for key in keys:
            label_name = name or getattr(key, "__name__", str(key))
            _store(
                key,
                Rule(
                    name=label_name,
                    kind=kind,
                    constant=wrapped,
                    slope_range=sr,
                    check=check,
                    norms=tuple(norms),
                    certified=certified,
                ),
            )
        return fn

    if rule is None:
        return decorate
    return decorate(rule)


def _core_rule(fn: RuleFn | float) -> tuple[RuleFn, str]:
    """A user rule as a callable, and its label: a number is the constant of every node."""
    if isinstance(fn, (int, float)) and not isinstance(fn, bool):
        value = float(fn)
        if not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"constant must be finite and >= 0; got {value}")

        def const_rule(node: Node, ctx: RuleContext, _v: float = value) -> float:
            return _v

        return const_rule, f"user constant {value:g}"
    if callable(fn):
        return fn, f"user rule {getattr(fn, '__name__', 'rule')}"
    raise InvalidArgumentError(f"rule must be a number or a callable; got {fn!r}")


def _slope_fn(slope_range: tuple[float, float] | SlopeFn | None) -> SlopeFn | None:
    """A user's slope range as a function of the node (a fixed ``(a, b)`` checked)."""
    if slope_range is None or callable(slope_range):
        return slope_range
    a, b = (float(slope_range[0]), float(slope_range[1]))
    if a > b:
        raise InvalidArgumentError(f"slope_range must have a <= b; got {slope_range}")

    def sr(node: Node, _r: tuple[float, float] = (a, b)) -> tuple[float, float]:
        return _r

    return sr


def _with_slope(c: NodeConstant, sr: tuple[float, float]) -> NodeConstant:
    return replace(c, slope_range=sr)


def add_rule(keys: Sequence[RuleKey], rule: Rule) -> None:
    """Internal: register a fully built :class:`Rule` under several keys."""
    for key in keys:
        _store(key, rule)


def get_rule(key: RuleKey) -> Rule | None:
    """The rule registered for a module class, function or method name (``None`` if none).

    A module subclass inherits its base's rule only when it does not override ``forward``.
    """
    if isinstance(key, str):
        return _METHODS.get(key)
    if isinstance(key, type):
        if key in _MODULES:
            return _MODULES[key]
        fwd = getattr(key, "forward", None)
        for base in key.__mro__[1:]:
            if base in _MODULES and getattr(base, "forward", None) is fwd:
                return _MODULES[base]
        return None
    try:
        return _FUNCTIONS.get(key)
    except TypeError:  # unhashable
        return None


def lookup(node: Node) -> Rule | None:
    """The rule for a captured node (by module type, function or method name)."""
    key = node.call.key
    if key is None:
        return None
    return get_rule(key)


def registered_keys() -> list[RuleKey]:
    """Every registered key (module classes, functions, method names)."""
    return [*_MODULES, *_FUNCTIONS, *_METHODS]


def has_module_rule(module: nn.Module) -> bool:
    """Whether ``module``'s class has a rule (such modules are leaves of the captured graph)."""
    return get_rule(type(module)) is not None


_HINTS: dict[Any, str] = {}


def add_hint(key: Any, hint: str) -> None:
    """Internal: why an op has no rule (shown in :class:`UnsupportedModelError`)."""
    _HINTS[key] = hint


def hint_for(key: Any) -> str | None:
    try:
        if key in _HINTS:
            return _HINTS[key]
    except TypeError:
        return None
    if isinstance(key, type):
        for base in key.__mro__[1:]:
            if base in _HINTS:
                return _HINTS[base]
    return None
