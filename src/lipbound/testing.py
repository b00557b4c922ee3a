"""Soundness testing: a differential fuzzer and checkers for certified Lipschitz bounds.

Every certified number lipbound returns must be a TRUE upper bound. This module tries to prove
the opposite: it generates small random networks, asks every method for its certified bounds
and compares them with Lipschitz ratios that are *realised* by the same network in float64.
A certified bound below a realised ratio is a bug (a *finding*), reported with the program
that produced it as runnable source text.

Programs
    :func:`generate` writes a random ``nn.Module`` class as Python source (:class:`Program`):
    one *focus* op (drawn from the generator of a registered rule key) with random parameters
    of the kinds torch accepts (broadcast operands, odd strides / padding / dilation,
    ``ceil_mode``, ``divisor_override``, negative / zero / large activation parameters,
    in-place ops, aliasing views, forward hooks and pre-hooks, residual adds, ``cat``,
    BatchNorm with random statistics, models left in train mode...), plus a few random extra
    ops. Inputs have a few to ~30 entries (1-D or small ``C x H x W`` shapes). The same seed
    always gives the same source and the same weights.
Coverage
    Generators are keyed by the registered rule keys (:func:`lipbound.rules.registered_keys`):
    :func:`uncovered_keys` lists the keys no generator can exercise, so a new rule without a
    generator is noticed. Users who register their own rules add theirs with
    :func:`register_generator` (a zero-argument module class or an element-wise function /
    method is exercised automatically).
Truth
    :func:`realised_lipschitz` searches ADVERSARIALLY for large ratios of a float64 copy of
    the model: float64 Jacobian operator norms at random, large-scale and "spiky" points,
    gradient ascent of ``||J(x)||_p`` over ``x`` (smooth networks), and gradient ascent of the
    pair ratio ``||f(x) - f(y)||_p / ||x - y||_p`` over ``(x, y)`` with distances spread over
    four decades (piecewise-linear networks), then a bisection of the best pairs (a jump
    doubles the ratio at every halving; it stops at 2e-5 relative length, where float64
    cancellation is below 1e-11). Every returned value is a ratio
    recomputed at a concrete witness, so it is a true lower bound of ``L(f)`` (up to float64
    rounding, hence the relative tolerance ``rtol = 1e-6`` of the comparisons).
Checks
    :func:`check_model` runs AutoLip (norms 1, 2, inf), SeqLip (2), ``exact`` (small inputs),
    LipSDP (optional) and ``lower_bound`` on one model and returns a :class:`CheckReport`:
    a method may refuse with a :class:`~lipbound.errors.LipboundError` (a *refusal*, counted);
    any other exception is a finding; a certified bound ``U`` with ``T > U (1 + rtol)`` for a
    realised ratio ``T`` is a finding (``"unsound"``; ``"rounding"`` when ``T`` exceeds ``U``
    by more than ``RTOL_ROUNDING = 1e-9`` only: the certificate misses float rounding); a lower
    bound whose value is not reproduced by its own witness is a finding (absolute tolerance
    ``ATOL = 1e-14`` everywhere, the float64 noise of a constant function). :func:`fuzz` runs
    many programs and returns a :class:`FuzzReport`
    (:meth:`FuzzReport.to_markdown`: tries per op family and parameter class, checks per
    method and norm, refusals, findings with minimal reproducers).

>>> prog = generate(3, focus="torch.nn.modules.activation.ReLU")
>>> "class Net(nn.Module)" in prog.source() and prog.focus.endswith("ReLU")
True
>>> rep = check_model(prog.build(), prog.input_shape, methods=("autolip",), norms=("2",))
>>> rep.findings
[]
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import random
import re
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lipbound

from .errors import InvalidArgumentError, LipboundError
from .graph import modules as _gm
from .rules import registered_keys
from .rules.linear import MERGED_KEY

__all__ = [
    "CheckReport",
    "Finding",
    "FuzzReport",
    "GenerationError",
    "OpGen",
    "Program",
    "Truth",
    "check_model",
    "check_program",
    "fuzz",
    "generate",
    "generators",
    "generators_for",
    "key_name",
    "minimise",
    "realised_lipschitz",
    "register_generator",
    "uncovered_keys",
]

NORMS: tuple[str, ...] = ("1", "2", "inf")
METHODS: tuple[str, ...] = ("autolip", "seqlip", "exact", "lipsdp", "lower_bound")
#: relative tolerance of "certified >= realised" for float64 truth
RTOL = 1e-6
#: relative tolerance when the program rounds to float32 on purpose (``x.float()``)
RTOL_LOSSY = 1e-4
#: float64 truth above a certified bound by more than this (but within ``rtol``) is reported
#: as a ``"rounding"`` finding: the certificate misses float rounding (e.g. a 1/6 slope that
#: torch evaluates with a float32 constant)
RTOL_ROUNDING = 1e-9
#: absolute tolerance of the same comparisons (float64 noise of a constant function)
ATOL = 1e-14
MAX_NUMEL = 64

PRELUDE = """import operator

import torch
import torch.nn.functional as F
from torch import nn

from lipbound.graph.modules import ChannelAffine, EvalBatchNorm, FoldedBatchNorm
"""


class GenerationError(InvalidArgumentError):
    """No valid program could be generated for the requested focus op."""


_REV: dict[int, str] = {}


def _reverse_names() -> dict[int, str]:
    """id(object) -> public dotted name, for torch.nn.functional, torch and operator."""
    if not _REV:
        for ns, prefix in ((F, "torch.nn.functional"), (torch, "torch"), (operator, "operator")):
            for name in sorted(dir(ns)):
                if name.startswith("_"):
                    continue
                try:
                    obj = getattr(ns, name)
                except Exception:
                    continue
                if callable(obj) and not isinstance(obj, type):
                    _REV.setdefault(id(obj), f"{prefix}.{name}")
    return _REV


def key_name(key: Any) -> str:
    """A stable, readable name of a rule key (``torch.nn.modules.activation.ReLU``, ``'view'``,
    ``torch.nn.functional.relu``)."""
    if isinstance(key, str):
        return repr(key)
    if isinstance(key, type):
        return f"{key.__module__}.{key.__qualname__}"
    name = _reverse_names().get(id(key))
    if name is not None:
        return name
    mod = getattr(key, "__module__", None) or ""
    qn = getattr(key, "__qualname__", None) or getattr(key, "__name__", None) or repr(key)
    return f"{mod}.{qn}" if mod else str(qn)


# ---------------------------------------------------------------------------------------------
# generation context and emitted code
# ---------------------------------------------------------------------------------------------
@dataclass
class Emit:
    """What one generator step adds to a program: ``fwd`` lines assign the output variable."""

    fwd: list[str]
    init: list[str] = field(default_factory=list)
    helpers: list[str] = field(default_factory=list)
    pclass: str = "default"
    lossy: bool = False
    train: bool = False


class Ctx:
    """Generation context handed to a generator: the input variable ``v`` (never mutate the
    model input ``x`` in place), its per-sample ``shape``, the output name ``o``, a unique
    attribute prefix ``a`` and the earlier variables ``pool`` (name -> shape)."""

    def __init__(self, r: random.Random, v: str, shape: tuple[int, ...], o: str, a: str,
                 pool: dict[str, tuple[int, ...]]) -> None:
        self.r = r
        self.v = v
        self.shape = shape
        self.o = o
        self.a = a
        self.pool = pool

    @property
    def nd(self) -> int:
        return len(self.shape)

    @property
    def n(self) -> int:
        return math.prod(self.shape)

    def choice(self, xs: Sequence[Any]) -> Any:
        return xs[self.r.randrange(len(xs))]

    def dim(self) -> int:
        """A per-sample dim of the batched tensor (1..nd), sometimes written negatively."""
        d = self.r.randint(1, self.nd)
        return d - self.nd - 1 if self.r.random() < 0.3 else d

    def same(self) -> str:
        """An expression of the same shape that depends on the input (an earlier variable)."""
        cands = [k for k, s in self.pool.items() if s == self.shape and k != "x"]
        if cands and self.r.random() < 0.7:
            return str(self.choice(cands))
        return self.choice([self.v, f"torch.tanh({self.v})", f"{self.v}.flip(-1)"])

    def bcast(self) -> str:
        """An input-dependent operand that broadcasts to ``shape`` (a size-1 dim, or same)."""
        opts = [self.same()]
        if self.shape[-1] > 1:
            opts += [f"{self.v}[..., :1]", f"{self.v}.mean(-1, keepdim=True)"]
        if self.nd >= 2 and self.shape[0] > 1:
            opts += [f"{self.v}[:, :1]", f"{self.v}.amax(1, keepdim=True)"]
        return str(self.choice(opts))

    def const(self, kind: str = "any") -> tuple[str, list[str], str]:
        """A constant operand: a Python scalar or a buffer (same shape / broadcast / bigger)."""
        r = self.r
        s = self.choice([-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 2.0, 7.5])
        opts = ["scalar", "same", "bcast"] if kind == "any" else [kind]
        what = self.choice(opts)
        if what == "scalar":
            return repr(s), [], "scalar"
        if what == "same":
            shape: tuple[int, ...] = self.shape
        else:
            shape = tuple(1 if r.random() < 0.6 else k for k in self.shape)
        name = f"self.{self.a}_c"
        scale = self.choice([0.1, 1.0, 3.0])
        lines = [f"self.register_buffer({self.a + '_c'!r}, {scale} * torch.randn{shape})"]
        if what == "same" and self.r.random() < 0.3:  # a divisor-friendly buffer (no zeros)
            lines = [f"self.register_buffer({self.a + '_c'!r}, "
                     f"(0.2 + torch.rand{shape}) * torch.randn{shape}.sign())"]
        return name, lines, "buffer " + ("same shape" if what == "same" else "broadcast")


GenFn = Callable[[Ctx], "Emit | None"]


@dataclass(frozen=True)
class OpGen:
    """One generator: the rule keys it exercises, its family and the per-sample ndims it takes.

    ``fn(ctx)`` returns an :class:`Emit` (or ``None`` when it does not apply to ``ctx``);
    ``inplace`` generators are never applied to the model input ``x`` itself.
    """

    name: str
    family: str
    keys: tuple[Any, ...]
    fn: GenFn
    ndims: tuple[int, ...] = (1, 2, 3)
    inplace: bool = False


_GENS: list[OpGen] = []


def register_generator(
    keys: Any | Sequence[Any], fn: GenFn, *, family: str = "user", name: str = "",
    ndims: Sequence[int] = (1, 2, 3), inplace: bool = False,
) -> OpGen:
    """Add a program generator for one or more rule keys (e.g. the key of your own rule).

    ``fn(ctx)`` gets a :class:`Ctx` and returns an :class:`Emit` whose ``fwd`` lines assign
    ``ctx.o`` from ``ctx.v`` (``init`` lines run in ``__init__`` with ``self``), or ``None``.
    """
    ks = tuple(keys) if isinstance(keys, (list, tuple)) else (keys,)
    g = OpGen(name or key_name(ks[0]), family, ks, fn, tuple(ndims), inplace)
    _GENS.append(g)
    return g


def generators() -> list[OpGen]:
    """Every generator (built-in and registered), in a fixed order."""
    return list(_GENS)


def _auto_generator(key: Any) -> OpGen | None:
    """A generator for a key without one: ``Key()`` modules, element-wise functions/methods."""
    if isinstance(key, type) and issubclass(key, nn.Module):
        try:
            key()
        except Exception:
            return None
        path = f"{key.__module__}.{key.__qualname__}"

        def fmod(c: Ctx) -> Emit:
            mod = path.rsplit(".", 1)
            return Emit([f"{c.o} = self.{c.a}({c.v})"],
                        [f"import {mod[0]}", f"self.{c.a} = {path}()"], pclass="auto: Key()")

        return OpGen(key_name(key), "auto", (key,), fmod)
    if isinstance(key, str):
        return OpGen(key_name(key), "auto", (key,),
                     lambda c: Emit([f"{c.o} = {c.v}.{key}()"], pclass="auto: x.m()"))
    name = key_name(key)
    if callable(key) and name.startswith(("torch.", "torch.nn.functional.")):
        return OpGen(name, "auto", (key,),
                     lambda c: Emit([f"{c.o} = {name}({c.v})"], pclass="auto: f(x)"))
    return None


def generators_for(key: Any) -> list[OpGen]:
    """The generators that exercise ``key`` (an automatic one if none was registered)."""
    out = [g for g in _GENS if any(_same_key(key, k) for k in g.keys)]
    if not out:
        a = _auto_generator(key)
        if a is not None:
            out = [a]
    return out


def _same_key(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    return a is b


def uncovered_keys(keys: Iterable[Any] | None = None) -> list[Any]:
    """Registered rule keys for which no generator can produce a valid program."""
    out = []
    for k in registered_keys() if keys is None else keys:
        gens = generators_for(k)
        if not gens:
            out.append(k)
            continue
        try:
            generate(0, focus=gens[0], minimal=True)
        except GenerationError:
            out.append(k)
    return out


# ---------------------------------------------------------------------------------------------
# the built-in generators
# ---------------------------------------------------------------------------------------------
def _g(keys: Sequence[Any], family: str, ndims: Sequence[int] = (1, 2, 3),
       inplace: bool = False, name: str = ""
       ) -> Callable[[Callable[..., Emit | None]], Callable[..., Emit | None]]:
    def deco(fn: Callable[..., Emit | None]) -> Callable[..., Emit | None]:
        for k in keys:
            ip = inplace or (isinstance(k, str) and k.endswith("_"))
            _GENS.append(OpGen(name or key_name(k), family, (k,), _bind(fn, k), tuple(ndims), ip))
        return fn

    return deco


def _bind(fn: Callable[..., Emit | None], key: Any) -> GenFn:
    def g(c: Ctx) -> Emit | None:
        return fn(c, key)

    return g


def _src(key: Any) -> str:
    """Source text calling ``key`` (``torch.nn.functional.relu`` -> ``F.relu``)."""
    n = key_name(key)
    n = n.replace("torch.nn.functional.", "F.").replace("torch.nn.modules.", "nn.")
    if n.startswith("nn."):
        n = "nn." + n.rsplit(".", 1)[1]
    if n.startswith("lipbound.graph.modules."):
        n = n.rsplit(".", 1)[1]
    return n


_SLOPES = [-2.0, -0.5, 0.0, 0.01, 0.3, 1.0, 1.7, 3.0]


def _leaky_params(c: Ctx) -> tuple[str, str]:
    """LeakyReLU's negative slope."""
    s = c.choice(_SLOPES)
    return f"{s!r}", f"negative_slope={'<0' if s < 0 else '0' if s == 0 else '>1' if s > 1 else 'in (0,1]'}"  # noqa: E501


def _elu_params(c: Ctx) -> tuple[str, str]:
    """ELU's alpha."""
    a = c.choice([-1.5, -0.3, 0.0, 0.5, 1.0, 2.5])
    return f"{a!r}", f"alpha={'<0' if a < 0 else '0' if a == 0 else '>1' if a > 1 else '(0,1]'}"


def _celu_params(c: Ctx) -> tuple[str, str]:
    """CELU's alpha."""
    a = c.choice([-2.0, -0.5, 0.3, 1.0, 2.5])
    return f"{a!r}", f"alpha={'<0' if a < 0 else '>1' if a > 1 else '(0,1]'}"


def _softplus_params(c: Ctx) -> tuple[str, str]:
    """Softplus's beta and threshold."""
    b = c.choice([0.5, 1.0, 3.0, -1.0])
    t = c.choice([20.0, 20.0, 1.0, 0.5])
    return f"{b!r}, {t!r}", f"beta={'<0' if b < 0 else b}, threshold={t:g}"


def _softshrink_params(c: Ctx) -> tuple[str, str]:
    """Softshrink's lambda."""
    lam = c.choice([0.0, 0.5, 2.0])
    return f"{lam!r}", f"lambd={lam:g}"


def _hardtanh_params(c: Ctx) -> tuple[str, str]:
    """Hardtanh's bounds."""
    lo, hi = c.choice([(-1.0, 1.0), (-0.5, 2.0), (0.0, 6.0), (2.0, 3.0), (-3.0, -2.0)])
    return f"{lo!r}, {hi!r}", "bounds " + ("default" if (lo, hi) == (-1.0, 1.0) else "other")


def _rrelu_params(c: Ctx) -> tuple[str, str]:
    """RReLU's slope range."""
    lo, hi = c.choice([(0.125, 1 / 3), (-1.0, 2.0), (1.5, 3.0), (0.0, 0.0)])
    return f"{lo!r}, {hi!r}", f"mean slope={(lo + hi) / 2:g}"


def _threshold_params(c: Ctx) -> tuple[str, str]:
    """Threshold's threshold and value."""
    t = c.choice([-1.0, 0.0, 0.5])
    v = c.choice([t, t, t + 1.0])
    return f"{t!r}, {v!r}", "value == threshold" if v == t else "value != threshold"


def _gelu_params(c: Ctx) -> tuple[str, str]:
    """GELU's approximation."""
    ap = c.choice(["none", "tanh"])
    return f"approximate={ap!r}", f"approximate={ap}"


def _clamp_params(c: Ctx) -> tuple[str, str]:
    """clamp / clip's bounds: both, one of them, or inverted (min > max)."""
    r = c.r
    kind = c.choice(["both", "min", "max", "inverted"])
    lo = round(r.uniform(-2, 0.5), 3)
    hi = round(lo + r.uniform(0.1, 3), 3)
    if kind == "min":
        return f"min={lo!r}", "min only"
    if kind == "max":
        return f"max={hi!r}", "max only"
    if kind == "inverted":
        return f"{hi!r}, {lo!r}", "min > max"
    return f"{lo!r}, {hi!r}", "min and max"


#: the parameter draws of the parametrised activations, by name prefix (first match wins)
_ACT_PARAM_DRAWS: tuple[tuple[str | tuple[str, ...], Callable[[Ctx], tuple[str, str]]], ...] = (
    ("leaky", _leaky_params), ("elu", _elu_params), ("celu", _celu_params),
    ("softplus", _softplus_params), ("softshrink", _softshrink_params),
    ("hardtanh", _hardtanh_params), ("rrelu", _rrelu_params), ("threshold", _threshold_params),
    ("gelu", _gelu_params), (("clamp", "clip"), _clamp_params),
)


def _act_params(c: Ctx, key: Any) -> tuple[str, str]:
    """(argument text, parameter class) of a parametrised activation."""
    n = key_name(key).rsplit(".", 1)[-1].lower().strip("'_")
    for prefix, draw in _ACT_PARAM_DRAWS:
        if n.startswith(prefix):
            return draw(c)
    return "", "default"


_ACT_PARAMS = ("leaky", "elu", "celu", "softplus", "softshrink", "hardtanh", "rrelu", "gelu",
               "clamp", "clip", "threshold")


def _act_has_params(key: Any) -> bool:
    n = key_name(key).rsplit(".", 1)[-1].lower().strip("'_")
    return n.startswith(_ACT_PARAMS)


_ACT_MODULES = [nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU,
                nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid,
                nn.Hardswish, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink,
                nn.Hardtanh, nn.Threshold]


@_g(_ACT_MODULES, "activation (module)")
def _act_module(c: Ctx, key: Any) -> Emit:
    name = _src(key)
    if key is nn.PReLU:
        nump = c.shape[0] if c.nd >= 2 and c.r.random() < 0.5 else 1
        vals = [c.choice(_SLOPES) for _ in range(nump)]
        return Emit([f"{c.o} = self.{c.a}({c.v})"],
                    [f"self.{c.a} = nn.PReLU({nump})",
                     f"self.{c.a}.weight.data.copy_(torch.tensor({vals!r}))"],
                    pclass=f"{nump} weight(s), min {min(vals):g}, max {max(vals):g}")
    args, pc = _act_params(c, key)
    inplace = key in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Hardtanh,
                      nn.RReLU, nn.Hardsigmoid, nn.Hardswish, nn.SiLU, nn.Mish)
    if key in (nn.Softplus,) and args:
        b, t = args.split(", ")
        args = f"beta={b}, threshold={t}"
    if inplace and c.v != "x" and c.r.random() < 0.3:
        args = (args + ", " if args else "") + "inplace=True"
        pc += ", inplace"
    return Emit([f"{c.o} = self.{c.a}({c.v})"], [f"self.{c.a} = {name}({args})"], pclass=pc)


_ACT_FUNCS = [F.relu, torch.relu, F.relu6, F.leaky_relu, torch.prelu, F.elu, F.celu, F.selu,
              torch.selu, F.gelu, F.silu, F.mish, F.softplus, torch.sigmoid, F.sigmoid,
              torch.tanh, F.tanh, F.hardsigmoid, F.hardswish, F.softsign, F.logsigmoid,
              F.tanhshrink, F.softshrink, torch.abs, torch.absolute, torch.sin, torch.cos,
              F.hardtanh, torch.clamp, torch.clip, F.threshold]
_ACT_INPLACE = [F.relu_, torch.relu_, F.leaky_relu_, F.elu_, F.hardtanh_]


@_g(_ACT_FUNCS, "activation (functional)")
def _act_func(c: Ctx, key: Any) -> Emit:
    name = _src(key)
    if key is torch.prelu:
        w = [c.choice(_SLOPES)]
        return Emit([f"{c.o} = torch.prelu({c.v}, self.{c.a}_w)"],
                    [f"self.{c.a}_w = nn.Parameter(torch.tensor({w!r}))"],
                    pclass=f"weight {w[0]:g}")
    args, pc = _act_params(c, key)
    extra = ""
    if key in (F.relu, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.hardtanh,
               F.hardsigmoid, F.hardswish, F.silu, F.mish) and c.v != "x" and c.r.random() < 0.25:
        extra = ", inplace=True"
        pc += ", inplace=True"
    return Emit([f"{c.o} = {name}({c.v}{', ' + args if args else ''}{extra})"], pclass=pc)


@_g(_ACT_INPLACE, "activation (in-place)", inplace=True)
def _act_inplace(c: Ctx, key: Any) -> Emit:
    args, pc = _act_params(c, key)
    name = _src(key)
    use_alias = c.r.random() < 0.5
    lines = [f"{c.o} = {name}({c.v}{', ' + args if args else ''})"]
    if use_alias:  # the mutated input is used again: both names see the new values
        lines.append(f"{c.o} = {c.o} + {c.v}")
        pc += ", mutated input reused"
    return Emit(lines, pclass=pc)


_ACT_METHODS = ["relu", "relu_", "sigmoid", "tanh", "abs", "sin", "cos", "clamp", "clip",
                "clamp_"]


@_g(_ACT_METHODS, "activation (method)")
def _act_method(c: Ctx, key: Any) -> Emit | None:
    inplace = key.endswith("_")
    if inplace and c.v == "x":
        return None
    args, pc = _act_params(c, key) if key.startswith(("clamp", "clip")) else ("", "default")
    lines = [f"{c.o} = {c.v}.{key}({args})"]
    if inplace and c.r.random() < 0.5:
        lines.append(f"{c.o} = {c.o} + {c.v}")
        pc += ", mutated input reused"
    return Emit(lines, pclass=pc)


@_g([nn.Threshold, F.threshold], "activation (module)")
def _threshold(c: Ctx, key: Any) -> Emit:
    t = c.choice([-1.0, 0.0, 0.5, 2.0])
    v = t if c.r.random() < 0.6 else c.choice([0.0, -3.0, 1.0])
    pc = "value == threshold (continuous)" if v == t else "value != threshold (a jump)"
    if key is nn.Threshold:
        return Emit([f"{c.o} = self.{c.a}({c.v})"], [f"self.{c.a} = nn.Threshold({t!r}, {v!r})"],
                    pclass=pc)
    return Emit([f"{c.o} = F.threshold({c.v}, {t!r}, {v!r})"], pclass=pc)


# ---- linear family -----------------------------------------------------------------------
def _scale_weights(c: Ctx, attr: str) -> tuple[list[str], str]:
    s = c.choice([1.0, 1.0, 1.0, 0.05, 3.0, 1e-5, 1e4])
    if s == 1.0:
        return [], ""
    return [f"self.{attr}.weight.data.mul_({s!r})"], f", weights x{s:g}"


@_g([nn.Linear], "linear")
def _linear(c: Ctx, key: Any) -> Emit:
    n_in, m = c.shape[-1], c.r.randint(1, 6)
    bias = c.r.random() < 0.7
    extra, pc = _scale_weights(c, c.a)
    return Emit([f"{c.o} = self.{c.a}({c.v})"],
                [f"self.{c.a} = nn.Linear({n_in}, {m}, bias={bias})", *extra],
                pclass=f"{'last dim of ' + str(c.nd) + '-D' if c.nd > 1 else '1-D'}{pc}")


@_g([MERGED_KEY], "linear chain (merged)")
def _merged(c: Ctx, key: Any) -> Emit:
    n_in, m, k = c.shape[-1], c.r.randint(1, 6), c.r.randint(1, 6)
    return Emit([f"{c.o} = self.{c.a}_2(self.{c.a}_1({c.v}))"],
                [f"self.{c.a}_1 = nn.Linear({n_in}, {m})", f"self.{c.a}_2 = nn.Linear({m}, {k})"],
                pclass="Linear o Linear")


@_g([F.linear], "linear (functional)")
def _flinear(c: Ctx, key: Any) -> Emit:
    n_in, m = c.shape[-1], c.r.randint(1, 5)
    return Emit([f"{c.o} = F.linear({c.v}, self.{c.a}_w, self.{c.a}_b)"],
                [f"self.{c.a}_w = nn.Parameter(torch.randn({m}, {n_in}))",
                 f"self.{c.a}_b = nn.Parameter(torch.randn({m}))"], pclass="weight + bias")


@_g([torch.matmul, operator.matmul, "matmul", torch.mm, "mm", torch.mv, "mv", torch.einsum,
     torch.tensordot], "matmul by a constant", ndims=(1,))
def _matmul(c: Ctx, key: Any) -> Emit:
    n, m = c.shape[-1], c.r.randint(1, 5)
    init = [f"self.register_buffer({c.a + '_w'!r}, torch.randn({n}, {m}))"]
    w = f"self.{c.a}_w"
    e = {
        "matmul": f"{c.v}.matmul({w})", "mm": f"{c.v}.mm({w})",
        "mv": f"{c.v}.mv({w}[:, 0]).unsqueeze(1)",
    }.get(key) if isinstance(key, str) else None
    if key is torch.matmul:
        e = f"torch.matmul({c.v}, {w})"
    elif key is operator.matmul:
        e = f"{c.v} @ {w}"
    elif key is torch.mm:
        e = f"torch.mm({c.v}, {w})"
    elif key is torch.mv:
        e = f"torch.mv({c.v}, {w}[:, 0]).unsqueeze(1)"
    elif key is torch.einsum:
        e = f"torch.einsum('bi,ij->bj', {c.v}, {w})"
    elif key is torch.tensordot:
        e = f"torch.tensordot({c.v}, {w}, dims=([1], [0]))"
    return Emit([f"{c.o} = {e}"], init, pclass="x @ W")


@_g([torch.bmm, "bmm"], "matmul by a constant", ndims=(2,))
def _bmm(c: Ctx, key: Any) -> Emit:
    n, m = c.shape[-1], c.r.randint(1, 4)
    w = f"self.{c.a}_w.expand({c.v}.shape[0], -1, -1)"
    e = f"torch.bmm({c.v}, {w})" if key is torch.bmm else f"{c.v}.bmm({w})"
    return Emit([f"{c.o} = {e}"], [f"self.register_buffer({c.a + '_w'!r}, torch.randn(1, {n}, {m}))"],  # noqa: E501
                pclass="bmm with an expanded constant")


_PAD_MODES = ["zeros", "zeros", "zeros", "circular", "reflect", "replicate"]


def _conv_params(c: Ctx, sd: int, transpose: bool = False) -> dict[str, Any]:
    r = c.r
    cin = c.shape[0]
    spatial = c.shape[1:]
    groups = c.choice([g for g in (1, 2, 3) if cin % g == 0])
    cout = groups * r.randint(1, max(1, 3 // groups))
    kmax, smax = (2, 2) if sd == 3 else (3, 3)
    if sd == 3:
        cout = groups
    k = tuple(r.randint(1, kmax) for _ in range(sd))
    s = tuple(r.choice([1, 1, 2, smax]) for _ in range(sd))
    p = tuple(r.randint(0, 2) for _ in range(sd))
    d = tuple(r.choice([1, 1, 2]) for _ in range(sd))
    out = {"cin": cin, "cout": cout, "k": k, "s": s, "p": p, "d": d, "groups": groups,
           "bias": r.random() < 0.6, "spatial": spatial}
    if transpose:
        out["op"] = tuple(r.randint(0, max(si, di) - 1) for si, di in zip(s, d))
    else:
        out["mode"] = c.choice(_PAD_MODES)
        if r.random() < 0.15 and all(si == 1 for si in s):
            out["p"] = "'same'"
    return out


def _pclass_conv(q: dict[str, Any]) -> str:
    odd = []
    if any(si > 1 for si in q["s"]):
        odd.append("stride>1")
    if q["p"] == "'same'":
        odd.append("padding='same'")
    elif any(pi > 0 for pi in q["p"]):
        odd.append("padding")
    if any(di > 1 for di in q["d"]):
        odd.append("dilation")
    if q["groups"] > 1:
        odd.append("groups")
    if q.get("mode", "zeros") != "zeros":
        odd.append(f"padding_mode={q['mode']}")
    if any(o > 0 for o in q.get("op", ())):
        odd.append("output_padding")
    return ", ".join(odd) or "plain"


_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONVTS = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


@_g(list(_CONVS) + list(_CONVTS), "convolution", ndims=(2, 3, 4))
def _conv(c: Ctx, key: Any) -> Emit | None:
    sd = _CONVS.get(key) or _CONVTS[key]
    if c.nd != sd + 1:
        return None
    tr = key in _CONVTS
    q = _conv_params(c, sd, tr)
    name = _src(key)
    if tr:
        init = (f"self.{c.a} = {name}({q['cin']}, {q['cout']}, {q['k']}, stride={q['s']}, "
                f"padding={q['p']}, output_padding={q['op']}, groups={q['groups']}, "
                f"bias={q['bias']}, dilation={q['d']})")
    else:
        init = (f"self.{c.a} = {name}({q['cin']}, {q['cout']}, {q['k']}, stride={q['s']}, "
                f"padding={q['p']}, dilation={q['d']}, groups={q['groups']}, bias={q['bias']}, "
                f"padding_mode={q['mode']!r})")
    extra, pc = _scale_weights(c, c.a)
    return Emit([f"{c.o} = self.{c.a}({c.v})"], [init, *extra], pclass=_pclass_conv(q) + pc)


_FCONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_FCONVTS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}


@_g(list(_FCONVS) + list(_FCONVTS), "convolution (functional)", ndims=(2, 3, 4))
def _fconv(c: Ctx, key: Any) -> Emit | None:
    sd = _FCONVS.get(key) or _FCONVTS[key]
    if c.nd != sd + 1:
        return None
    tr = key in _FCONVTS
    q = _conv_params(c, sd, tr)
    g = q["groups"]
    wshape = ((q["cin"], q["cout"] // g, *q["k"]) if tr else (q["cout"], q["cin"] // g, *q["k"]))
    init = [f"self.{c.a}_w = nn.Parameter(0.5 * torch.randn{wshape})"]
    b = "None"
    if q["bias"]:
        init.append(f"self.{c.a}_b = nn.Parameter(torch.randn({q['cout']}))")
        b = f"self.{c.a}_b"
    name = _src(key)
    if tr:
        e = (f"{name}({c.v}, self.{c.a}_w, {b}, {q['s']}, {q['p']}, {q['op']}, {g}, {q['d']})")
    else:
        q["mode"] = "zeros"
        e = f"{name}({c.v}, self.{c.a}_w, {b}, {q['s']}, {q['p']}, {q['d']}, {g})"
    return Emit([f"{c.o} = {e}"], init, pclass=_pclass_conv(q))


def _pool_window(r: random.Random, sd: int) -> tuple[tuple[int, ...], ...]:
    """Random kernel, stride and padding (torch's limit: padding <= kernel // 2) of a pool."""
    k = tuple(r.randint(1, 3) for _ in range(sd))
    s = tuple(r.randint(1, 3) for _ in range(sd))
    p = tuple(r.randint(0, ki // 2) for ki in k)
    return k, s, p


_AVG = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
        F.avg_pool3d: 3}


@_g(list(_AVG), "average pooling", ndims=(2, 3, 4))
def _avgpool(c: Ctx, key: Any) -> Emit | None:
    sd = _AVG[key]
    if c.nd != sd + 1:
        return None
    r = c.r
    k, s, p = _pool_window(r, sd)
    ceil = r.random() < 0.4
    cip = r.random() < 0.6
    div = r.choice([None, None, 1, 2, 5]) if sd > 1 else None
    odd = [x for x, on in (("ceil_mode", ceil), ("padding", any(p)), ("stride>1", any(
        si > 1 for si in s)), ("count_include_pad=False", not cip),
        (f"divisor_override={div}", div is not None)) if on]
    pc = ", ".join(odd) or "plain"
    extra = f", divisor_override={div}" if div is not None else ""
    if isinstance(key, type):
        return Emit([f"{c.o} = self.{c.a}({c.v})"],
                    [f"self.{c.a} = {_src(key)}({k}, stride={s}, padding={p}, ceil_mode={ceil}, "
                     f"count_include_pad={cip}{extra})"], pclass=pc)
    return Emit([f"{c.o} = {_src(key)}({c.v}, {k}, {s}, {p}, {ceil}, {cip}{extra})"], pclass=pc)


_AAVG = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
         F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
_AMAX = {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
         F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
         F.adaptive_max_pool1d_with_indices: 1, F.adaptive_max_pool2d_with_indices: 2,
         F.adaptive_max_pool3d_with_indices: 3}


@_g(list(_AAVG) + list(_AMAX), "adaptive pooling", ndims=(2, 3, 4))
def _adaptive(c: Ctx, key: Any) -> Emit | None:
    sd = _AAVG.get(key) or _AMAX[key]
    if c.nd != sd + 1:
        return None
    sizes: list[Any] = [c.r.randint(1, L + 2) for L in c.shape[1:]]
    if sd > 1 and c.r.random() < 0.3:
        sizes[0] = None
    size: Any = sizes[0] if sd == 1 else tuple(sizes)
    grow = any(s is not None and s > L for s, L in zip(sizes, c.shape[1:]))
    pc = "output larger than input (overlapping windows)" if grow else "output <= input"
    idx = key_name(key).endswith("with_indices")
    if isinstance(key, type):
        ri = key in _AMAX and c.r.random() < 0.3
        return Emit([f"{c.o} = self.{c.a}({c.v}){'[0]' if ri else ''}"],
                    [f"self.{c.a} = {_src(key)}({size!r}{', return_indices=True' if ri else ''})"],
                    pclass=pc + (", return_indices" if ri else ""))
    return Emit([f"{c.o} = {_src(key)}({c.v}, {size!r}){'[0]' if idx else ''}"], pclass=pc)


_MAXP = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, F.max_pool1d: 1, F.max_pool2d: 2,
         F.max_pool3d: 3, F.max_pool1d_with_indices: 1, F.max_pool2d_with_indices: 2,
         F.max_pool3d_with_indices: 3}


@_g(list(_MAXP), "max pooling", ndims=(2, 3, 4))
def _maxpool(c: Ctx, key: Any) -> Emit | None:
    sd = _MAXP[key]
    if c.nd != sd + 1:
        return None
    r = c.r
    k, s, p = _pool_window(r, sd)
    d = tuple(r.choice([1, 1, 2]) for _ in range(sd))
    ceil = r.random() < 0.5
    odd = [x for x, on in (("ceil_mode", ceil), ("padding", any(p)), ("dilation", any(
        di > 1 for di in d)), ("overlapping (k>s)", any(ki > si for ki, si in zip(k, s))))
        if on]
    pc = ", ".join(odd) or "plain"
    idx = key_name(key).endswith("with_indices")
    if isinstance(key, type):
        ri = r.random() < 0.2
        return Emit([f"{c.o} = self.{c.a}({c.v}){'[0]' if ri else ''}"],
                    [f"self.{c.a} = {_src(key)}({k}, stride={s}, padding={p}, dilation={d}, "
                     f"ceil_mode={ceil}{', return_indices=True' if ri else ''})"], pclass=pc)
    return Emit([f"{c.o} = {_src(key)}({c.v}, {k}, {s}, {p}, {d}, ceil_mode={ceil})"
                 f"{'[0]' if idx else ''}"], pclass=pc)


@_g([nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample,
     F.upsample_nearest, F.upsample_bilinear], "interpolation", ndims=(2, 3, 4))
def _upsample(c: Ctx, key: Any) -> Emit | None:
    sd = c.nd - 1
    modes = {1: ["nearest", "linear", "nearest-exact"], 2: ["nearest", "bilinear", "bicubic"],
             3: ["nearest", "trilinear"]}[sd]
    if key in (nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.upsample_bilinear) and sd != 2:
        return None
    sf = c.choice([2, 2, 3, 1.5, 0.5])
    mode = c.choice(modes)
    ac = mode in ("linear", "bilinear", "bicubic", "trilinear") and c.r.random() < 0.5
    acs = f", align_corners={ac}" if mode in ("linear", "bilinear", "bicubic", "trilinear") else ""
    pc = f"scale {sf}, {mode}{', align_corners' if ac else ''}"
    if key is nn.Upsample:
        return Emit([f"{c.o} = self.{c.a}({c.v})"],
                    [f"self.{c.a} = nn.Upsample(scale_factor={sf}, mode={mode!r}{acs})"], pclass=pc)
    if key in (nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
        return Emit([f"{c.o} = self.{c.a}({c.v})"],
                    [f"self.{c.a} = {_src(key)}(scale_factor=2)"], pclass="scale 2")
    if key in (F.upsample_nearest, F.upsample_bilinear):
        return Emit([f"{c.o} = {_src(key)}({c.v}, scale_factor=2)"], pclass="scale 2")
    return Emit([f"{c.o} = {_src(key)}({c.v}, scale_factor={sf}, mode={mode!r}{acs})"], pclass=pc)


@_g([torch.sum, torch.mean, "sum", "mean"], "sum / mean")
def _sum(c: Ctx, key: Any) -> Emit:
    dims = sorted({c.r.randint(1, c.nd) for _ in range(c.r.randint(1, c.nd))})
    keep = c.r.random() < 0.4
    dimarg = str(dims[0]) if len(dims) == 1 else str(tuple(dims))
    name = key if isinstance(key, str) else None
    if name:
        e = f"{c.v}.{name}({dimarg}, keepdim={keep})"
    else:
        e = f"{_src(key)}({c.v}, {dimarg}, keepdim={keep})"
    if dims == list(range(1, c.nd + 1)) and not keep:
        e += ".unsqueeze(1)"
    return Emit([f"{c.o} = {e}"], pclass=f"{len(dims)} dim(s){', keepdim' if keep else ''}")


def _bn_init(c: Ctx, attr: str, ch: int, cls: str) -> list[str]:
    return [
        f"self.{attr} = nn.{cls}({ch}, eps={c.choice([1e-5, 1e-3, 0.1])!r})",
        f"self.{attr}.running_mean.copy_(torch.randn({ch}))",
        f"self.{attr}.running_var.copy_({c.choice([0.001, 0.1, 1.0, 4.0])!r} * torch.rand({ch}) "
        "+ 1e-4)",
        f"self.{attr}.weight.data.copy_({c.choice([1.0, 3.0])!r} * torch.randn({ch}))",
        f"self.{attr}.bias.data.copy_(torch.randn({ch}))",
    ]


_BNS = {nn.BatchNorm1d: (1, 2), nn.BatchNorm2d: (3,), nn.BatchNorm3d: (4,)}


@_g(list(_BNS), "batchnorm", ndims=(1, 2, 3, 4))
def _bn(c: Ctx, key: Any) -> Emit | None:
    if c.nd not in _BNS[key]:
        return None
    ch = c.shape[0]
    cls = key.__name__
    r = c.r.random()
    if r < 0.1:
        return Emit([f"{c.o} = self.{c.a}({c.v})"],
                    [f"self.{c.a} = nn.{cls}({ch}, track_running_stats=False)"],
                    pclass="track_running_stats=False")
    init = _bn_init(c, c.a, ch, cls)
    train = r > 0.85
    pc = "eval, random stats" + (", model left in train mode" if train else "")
    return Emit([f"{c.o} = self.{c.a}({c.v})"], init, pclass=pc, train=train)


@_g([F.batch_norm], "batchnorm", ndims=(1, 2, 3))
def _fbn(c: Ctx, key: Any) -> Emit:
    ch = c.shape[0]
    init = [f"self.register_buffer({c.a + '_m'!r}, torch.randn({ch}))",
            f"self.register_buffer({c.a + '_v'!r}, 0.5 * torch.rand({ch}) + 0.01)",
            f"self.{c.a}_w = nn.Parameter(torch.randn({ch}))"]
    tr = c.r.random() < 0.1
    return Emit([f"{c.o} = F.batch_norm({c.v}, self.{c.a}_m, self.{c.a}_v, self.{c.a}_w, None, "
                 f"{'True' if tr else 'False'}, 0.1, 1e-5)"], init,
                pclass="training=True (batch statistics)" if tr else "running stats")


@_g([_gm.EvalBatchNorm, _gm.ChannelAffine, _gm.FoldedBatchNorm], "batchnorm (internal modules)",
    ndims=(1, 2, 3))
def _bn_internal(c: Ctx, key: Any) -> Emit | None:
    ch = c.shape[0]
    cls = {1: "BatchNorm1d", 2: "BatchNorm1d", 3: "BatchNorm2d"}[c.nd]
    if key is _gm.ChannelAffine:
        return Emit([f"{c.o} = self.{c.a}({c.v})"],
                    [f"self.{c.a} = ChannelAffine(3 * torch.randn({ch}), torch.randn({ch}))"],
                    pclass="random scale and shift")
    if key is _gm.EvalBatchNorm:
        init = _bn_init(c, c.a + "_bn", ch, cls)
        return Emit([f"{c.o} = self.{c.a}({c.v})"],
                    [*init, f"self.{c.a} = EvalBatchNorm(self.{c.a}_bn)"], pclass="random stats")
    if c.nd == 1:
        m = c.r.randint(1, 5)
        lin = f"nn.Linear({ch}, {m})"
    elif c.nd == 3:
        m = c.r.randint(1, 3)
        lin = f"nn.Conv2d({ch}, {m}, 3, padding=1)"
    else:
        return None
    init = _bn_init(c, c.a + "_bn", m, "BatchNorm1d" if c.nd == 1 else "BatchNorm2d")
    return Emit([f"{c.o} = self.{c.a}({c.v})"],
                [*init, f"self.{c.a}_lin = {lin}",
                 f"self.{c.a} = FoldedBatchNorm(self.{c.a}_lin, self.{c.a}_bn)"],
                pclass="Linear" if c.nd == 1 else "Conv2d")


# ---- identity / dtype / dropout ----------------------------------------------------------
_DROP_MODS = {nn.Identity: (1, 2, 3, 4), nn.Dropout: (1, 2, 3, 4), nn.Dropout1d: (2,),
              nn.Dropout2d: (3,), nn.Dropout3d: (4,), nn.AlphaDropout: (1, 2, 3, 4),
              nn.FeatureAlphaDropout: (2, 3, 4)}
_DROP_FUNCS = {F.dropout: (1, 2, 3, 4), F.dropout1d: (2,), F.dropout2d: (3,), F.dropout3d: (4,),
               F.alpha_dropout: (1, 2, 3, 4), F.feature_alpha_dropout: (2, 3, 4)}


@_g(list(_DROP_MODS) + list(_DROP_FUNCS), "identity / dropout (eval)", ndims=(1, 2, 3, 4))
def _dropout(c: Ctx, key: Any) -> Emit | None:
    ok = _DROP_MODS.get(key) or _DROP_FUNCS[key]
    if c.nd not in ok:
        return None
    if key is nn.Identity:
        return Emit([f"{c.o} = self.{c.a}({c.v})"], [f"self.{c.a} = nn.Identity()"])
    p = c.choice([0.1, 0.5])
    if isinstance(key, type):
        return Emit([f"{c.o} = self.{c.a}({c.v})"], [f"self.{c.a} = {_src(key)}({p})"],
                    pclass="eval")
    return Emit([f"{c.o} = {_src(key)}({c.v}, {p}, self.training)"], pclass="training=self.training")  # noqa: E501


@_g([torch.clone, "clone", "contiguous", "detach", torch.detach, "float", "double", "to",
     "type_as"], "identity / dtype", ndims=(1, 2, 3, 4))
def _ident(c: Ctx, key: Any) -> Emit:
    v = c.v
    if key is torch.clone:
        return Emit([f"{c.o} = torch.clone({v})"])
    if key is torch.detach:
        return Emit([f"{c.o} = torch.detach({v})"], pclass="gradient stopped")
    e = {"clone": f"{v}.clone()", "contiguous": f"{v}.transpose(-1, -1).contiguous()",
         "detach": f"{v}.detach()", "float": f"{v}.float().to({v}.dtype)",
         "double": f"{v}.double().to({v}.dtype)", "to": f"{v}.to(x.dtype)",
         "type_as": f"{v}.type_as(x)"}[key]
    return Emit([f"{c.o} = {e}"], lossy=key == "float",
                pclass="rounds to float32" if key == "float" else "default")


# ---- reshapes ----------------------------------------------------------------------------
def _factor(n: int, r: random.Random) -> tuple[int, int] | None:
    fs = [(a, n // a) for a in range(2, n) if n % a == 0]
    return fs[r.randrange(len(fs))] if fs else None


def _perm(c: Ctx) -> tuple[int, ...]:
    p = list(range(1, c.nd + 1))
    c.r.shuffle(p)
    return (0, *p)


def _reshape_flatten(c: Ctx, key: Any) -> Emit:
    """``nn.Flatten`` / ``torch.flatten`` / ``x.flatten`` from a random start dim."""
    v = c.v
    start = c.r.randint(1, c.nd)
    if key is nn.Flatten:
        return Emit([f"{c.o} = self.{c.a}({v})"], [f"self.{c.a} = nn.Flatten({start})"])
    if key is torch.flatten:
        return Emit([f"{c.o} = torch.flatten({v}, {start})"])
    return Emit([f"{c.o} = {v}.flatten({start})"])


def _reshape_unflatten(c: Ctx, key: Any) -> Emit | None:
    """``nn.Unflatten`` / ``torch.unflatten`` / ``x.unflatten`` of a dim into two factors."""
    v = c.v
    d = c.r.randint(1, c.nd)
    f = _factor(c.shape[d - 1], c.r)
    if f is None:
        return None
    if key is nn.Unflatten:
        return Emit([f"{c.o} = self.{c.a}({v})"], [f"self.{c.a} = nn.Unflatten({d}, {f})"])
    if key is torch.unflatten:
        return Emit([f"{c.o} = torch.unflatten({v}, {d}, {f})"])
    return Emit([f"{c.o} = {v}.unflatten({d}, {f})"])


def _reshape_view(c: Ctx, key: Any) -> Emit:
    """``view`` / ``reshape`` (method or ``torch.reshape``) to the flat or a two-factor shape,
    the batch dim written as ``-1`` or read from the input; ``view_as`` / ``reshape_as``."""
    v = c.v
    f = _factor(c.n, c.r)
    tgt = (c.n,) if f is None or c.r.random() < 0.4 else f
    if key in ("view_as", "reshape_as"):
        return Emit([f"{c.o} = {v}.flatten(1).{key}({v})"], pclass="flatten then back")
    lead = c.choice(["-1", f"{v}.shape[0]", f"{v}.size(0)"])
    args = ", ".join(str(t) for t in tgt)
    if key is torch.reshape:
        return Emit([f"{c.o} = torch.reshape({v}, ({lead}, {args}))"])
    return Emit([f"{c.o} = {v}.{key}({lead}, {args})"], pclass=f"batch as {lead}")


@_g([nn.Flatten, torch.flatten, "flatten", nn.Unflatten, torch.unflatten, "unflatten", "view",
     "reshape", torch.reshape, "view_as", "reshape_as"], "reshape", ndims=(1, 2, 3, 4))
def _reshape(c: Ctx, key: Any) -> Emit | None:
    if key in (nn.Flatten, torch.flatten, "flatten"):
        return _reshape_flatten(c, key)
    if key in (nn.Unflatten, torch.unflatten, "unflatten"):
        return _reshape_unflatten(c, key)
    return _reshape_view(c, key)


@_g([torch.permute, "permute", torch.transpose, "transpose", torch.swapaxes, "swapaxes",
     torch.swapdims, "swapdims", torch.movedim, "movedim", torch.moveaxis, "moveaxis",
     torch.t, "t"], "permutation", ndims=(1, 2, 3, 4))
def _permute(c: Ctx, key: Any) -> Emit | None:
    v = c.v
    if key in (torch.t, "t"):
        if c.nd != 1:
            return None
        e = f"torch.t(torch.t({v}))" if key is torch.t else f"{v}.t().t()"
        return Emit([f"{c.o} = {e}"], pclass="twice (acts on the batch dim)")
    if key in (torch.permute, "permute"):
        p = _perm(c)
        return Emit([f"{c.o} = torch.permute({v}, {p})" if key is torch.permute
                     else f"{c.o} = {v}.permute{p}"])
    i, j = c.dim(), c.dim()
    name = key if isinstance(key, str) else None
    if name:
        return Emit([f"{c.o} = {v}.{name}({i}, {j})"])
    return Emit([f"{c.o} = {_src(key)}({v}, {i}, {j})"])


@_g([torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze"], "reshape", ndims=(1, 2, 3, 4))
def _squeeze(c: Ctx, key: Any) -> Emit:
    v = c.v
    d = c.r.randint(1, c.nd + 1)
    if key in (torch.unsqueeze, "unsqueeze"):
        return Emit([f"{c.o} = torch.unsqueeze({v}, {d})" if key is torch.unsqueeze
                     else f"{c.o} = {v}.unsqueeze({d})"])
    ones = [i + 1 for i, s in enumerate(c.shape) if s == 1]
    src = v if ones else f"{v}.unsqueeze({d})"
    dd = ones[0] if ones else d
    return Emit([f"{c.o} = torch.squeeze({src}, {dd})" if key is torch.squeeze
                 else f"{c.o} = {src}.squeeze({dd})"])


@_g([nn.PixelShuffle, nn.PixelUnshuffle, F.pixel_shuffle, F.pixel_unshuffle, nn.ChannelShuffle],
    "permutation", ndims=(3,))
def _pixel(c: Ctx, key: Any) -> Emit | None:
    C, H, W = c.shape
    if key in (nn.PixelShuffle, F.pixel_shuffle):
        if C % 4:
            return None
        r = 2
    elif key in (nn.PixelUnshuffle, F.pixel_unshuffle):
        if H % 2 or W % 2:
            return None
        r = 2
    else:
        g = [k for k in (2, 3) if C % k == 0]
        if not g:
            return None
        return Emit([f"{c.o} = self.{c.a}({c.v})"], [f"self.{c.a} = nn.ChannelShuffle({g[0]})"])
    if isinstance(key, type):
        return Emit([f"{c.o} = self.{c.a}({c.v})"], [f"self.{c.a} = {_src(key)}({r})"])
    return Emit([f"{c.o} = {_src(key)}({c.v}, {r})"])


_PADS = {nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3, nn.ConstantPad1d: 1,
         nn.ConstantPad2d: 2, nn.ConstantPad3d: 3}


@_g([*_PADS, F.pad], "padding", ndims=(1, 2, 3, 4))
def _pad(c: Ctx, key: Any) -> Emit | None:
    sd = _PADS.get(key, c.r.randint(1, min(3, c.nd)))
    if c.nd < sd:
        return None
    pads = []
    for i in range(sd):
        L = c.shape[-1 - i]
        pads += [c.r.randint(-(L - 1) // 2, 2), c.r.randint(-(L - 1) // 2, 2)]
    pc = "negative (crop)" if min(pads) < 0 else "positive"
    if key is F.pad:
        mode = c.choice(["constant", "constant", "reflect", "replicate", "circular"])
        if mode != "constant":
            pads = [max(0, p) for p in pads]
        val = f", value={c.choice([0.0, 1.5])}" if mode == "constant" else ""
        return Emit([f"{c.o} = F.pad({c.v}, {tuple(pads)}, mode={mode!r}{val})"],
                    pclass=f"{pc}, mode={mode}")
    if key in (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d):
        return Emit([f"{c.o} = self.{c.a}({c.v})"],
                    [f"self.{c.a} = {_src(key)}({tuple(pads)}, {c.choice([0.0, -2.0])})"], pclass=pc)  # noqa: E501
    return Emit([f"{c.o} = self.{c.a}({c.v})"], [f"self.{c.a} = {_src(key)}({tuple(pads)})"],
                pclass=pc)


def _index_slice(c: Ctx, d: int, L: int) -> Emit:
    """``x[:, ..., a:b]`` on dim ``d`` (of size ``L``)."""
    a = c.r.randint(0, L - 1)
    return Emit([f"{c.o} = {c.v}[{':, ' * d}{a}:{c.r.randint(a + 1, L)}]"], pclass="slice")


def _index_step(c: Ctx, d: int, L: int) -> Emit:
    """``x[:, ..., ::k]`` on dim ``d``."""
    return Emit([f"{c.o} = {c.v}[{':, ' * d}::{c.r.randint(2, 3)}]"], pclass="slice with step")


def _index_int(c: Ctx, d: int, L: int) -> Emit:
    """An integer index on dim ``d`` (a slice and a new axis on 1-D inputs)."""
    if c.nd == 1:
        return Emit([f"{c.o} = {c.v}[:, {c.r.randint(0, L - 1)}:][:, None]"], pclass="slice")
    return Emit([f"{c.o} = {c.v}[{':, ' * d}{c.r.randint(-L, L - 1)}]"], pclass="integer index")


def _index_none(c: Ctx, d: int, L: int) -> Emit:
    """``x[:, None]``."""
    return Emit([f"{c.o} = {c.v}[:, None]"], pclass="None index")


def _index_ellipsis(c: Ctx, d: int, L: int) -> Emit:
    """``x[..., a:]``."""
    return Emit([f"{c.o} = {c.v}[..., {c.r.randint(0, c.shape[-1] - 1)}:]"], pclass="Ellipsis")


def _index_alias(c: Ctx, d: int, L: int) -> Emit | None:
    """An in-place update through a view changes the base tensor too (never of ``x``)."""
    v = c.v
    if v == "x":
        return None
    s = c.choice([2.0, -3.0, 0.5])
    return Emit([f"{c.a}_view = {v}[{':, ' * d}:1]", f"{c.a}_view.mul_({s})",
                 f"{c.o} = {v} + 0.0"], pclass="in-place through a view (aliasing)")


def _index_advanced(c: Ctx, d: int, L: int) -> Emit:
    """An advanced (list) index on dim ``d``."""
    idx = [c.r.randint(0, L - 1) for _ in range(c.r.randint(1, 3))]
    return Emit([f"{c.o} = {c.v}[{':, ' * d}{idx!r}]"], pclass="advanced (list) index")


#: the index kinds of ``x[...]`` (:func:`_select` draws the kind)
_INDEX_KINDS: dict[str, Callable[[Ctx, int, int], Emit | None]] = {
    "slice": _index_slice, "step": _index_step, "int": _index_int, "none": _index_none,
    "ellipsis": _index_ellipsis, "advanced": _index_advanced, "alias": _index_alias,
}


@_g([torch.narrow, "narrow", operator.getitem], "selection", ndims=(1, 2, 3, 4))
def _select(c: Ctx, key: Any) -> Emit | None:
    v = c.v
    d = c.r.randint(1, c.nd)
    L = c.shape[d - 1]
    if key in (torch.narrow, "narrow"):
        start = c.r.randint(0, L - 1)
        ln = c.r.randint(1, L - start)
        return Emit([f"{c.o} = torch.narrow({v}, {d}, {start}, {ln})" if key is torch.narrow
                     else f"{c.o} = {v}.narrow({d}, {start}, {ln})"])
    kind = c.choice(["slice", "step", "int", "none", "ellipsis", "advanced", "alias"])
    return _INDEX_KINDS[kind](c, d, L)


@_g([torch.chunk, "chunk", torch.split, "split", torch.unbind, "unbind", torch.tensor_split,
     "tensor_split"], "selection", ndims=(1, 2, 3, 4))
def _split(c: Ctx, key: Any) -> Emit | None:
    v = c.v
    d = c.r.randint(1, c.nd)
    L = c.shape[d - 1]
    if L < 2:
        return None
    name = key if isinstance(key, str) else key.__name__
    k = c.r.randint(2, min(3, L))
    arg = {"chunk": k, "split": c.r.randint(1, L - 1), "tensor_split": k}.get(name)
    call = (f"{v}.{name}({arg}, {d})" if arg is not None else f"{v}.{name}({d})") \
        if isinstance(key, str) else (
        f"torch.{name}({v}, {arg}, {d})" if arg is not None else f"torch.{name}({v}, {d})")
    if c.r.random() < 0.4:  # use two pieces (tuple unpacking), then combine them
        return Emit([f"{c.a}_parts = {call}",
                     f"{c.o} = torch.cat([{c.a}_parts[-1], {c.a}_parts[0]], {d})"],
                    pclass="two pieces re-joined")
    i = c.r.randint(0, 1)
    return Emit([f"{c.o} = {call}[{i}]"], pclass="[i]")


@_g(["expand", "expand_as", "repeat", "tile", torch.tile], "copies", ndims=(1, 2, 3))
def _copies(c: Ctx, key: Any) -> Emit | None:
    v = c.v
    k = c.r.randint(2, 3)
    if key == "expand":
        return Emit([f"{c.o} = {v}.unsqueeze(1).expand(-1, {k}{', -1' * c.nd})"])
    if key == "expand_as":
        if c.shape[-1] < 2:
            return None
        return Emit([f"{c.o} = {v}[..., :1].expand_as({v})"], pclass="size-1 dim expanded")
    reps = (1, *[c.r.randint(1, 2) for _ in range(c.nd)])
    if key == "repeat":
        return Emit([f"{c.o} = {v}.repeat{reps}"])
    if key == "tile":
        return Emit([f"{c.o} = {v}.tile({reps})"])
    return Emit([f"{c.o} = torch.tile({v}, {reps})"])


# ---- arithmetic --------------------------------------------------------------------------
_ADD = [operator.add, operator.iadd, torch.add, "add", "add_"]
_SUB = [operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_", torch.rsub]


@_g(_ADD + _SUB, "add / sub")
def _addsub(c: Ctx, key: Any) -> Emit | None:
    v, r = c.v, c.r
    mode = c.choice(["same", "bcast", "const"])
    init: list[str] = []
    if mode == "same":
        p, pc = c.same(), "two inputs, same shape"
    elif mode == "bcast":
        p = c.bcast()
        pc = "two inputs, broadcast"
    else:
        p, init, pc = c.const()
        pc = "constant " + pc
    alpha = c.choice([1, -2.0, 0.5, 3.0])
    op = "+" if key in _ADD else "-"
    if key is operator.add:
        return Emit([f"{c.o} = {v} + {p}" if r.random() < 0.7 else f"{c.o} = {p} + {v}"], init,
                    pclass=pc)
    if key is operator.sub:
        return Emit([f"{c.o} = {v} - {p}" if r.random() < 0.7 else f"{c.o} = {p} - {v}"], init,
                    pclass=pc)
    if key in (operator.iadd, operator.isub):
        if v == "x":
            return Emit([f"{c.o} = {v} + 0.0", f"{c.o} {op}= {p}"], init, pclass=pc + ", x op= y")
        return Emit([f"{c.o} = {v}", f"{c.o} {op}= {p}"], init,
                    pclass=pc + ", x op= y on a live variable (aliasing)")
    al = f", alpha={alpha}" if alpha != 1 else ""
    pc += f", alpha={alpha}" if alpha != 1 else ""
    if key is torch.rsub:
        return Emit([f"{c.o} = torch.rsub({v}, {p}{al})"], init, pclass=pc)
    if isinstance(key, str):
        if key.endswith("_") and v == "x":
            return None
        if mode == "bcast" and key.endswith("_"):
            p = c.same()
        return Emit([f"{c.o} = {v}.{key}({p}{al})"], init, pclass=pc)
    return Emit([f"{c.o} = {_src(key)}({v}, {p}{al})"], init, pclass=pc)


@_g([operator.neg, torch.neg, "neg", torch.negative], "neg")
def _neg(c: Ctx, key: Any) -> Emit:
    e = {operator.neg: f"-{c.v}", torch.neg: f"torch.neg({c.v})",
         torch.negative: f"torch.negative({c.v})"}.get(key, f"{c.v}.neg()")
    return Emit([f"{c.o} = {e}"])


_MUL = [operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_"]
_DIV = [operator.truediv, operator.itruediv, torch.div, torch.divide, "div", "div_",
        torch.true_divide]


@_g(_MUL + _DIV, "scalar mul / div")
def _muldiv(c: Ctx, key: Any) -> Emit | None:
    v = c.v
    is_div = key in _DIV
    mode = c.choice(["scalar", "same", "bcast", "up", "two inputs"] + (["rounded", "rdiv"]
                                                                        if is_div else []))
    init: list[str] = []
    if mode == "two inputs":
        p, pc = c.same(), "product of two inputs"
    elif mode == "up":  # a constant with more dims than the input: broadcast up (copies)
        k = c.r.randint(2, 3)
        init = [f"self.register_buffer({c.a + '_c'!r}, torch.randn({k}, {', '.join(map(str, c.shape))}))"]  # noqa: E501
        v = f"{v}.unsqueeze(1)"
        p, pc = f"self.{c.a}_c", "constant broadcast up (more dims)"
    elif mode in ("rounded", "rdiv"):
        p, init, pc = c.const("scalar")
        p = "2.5" if p == "0.0" else p
        pc = mode
    else:
        kind = "scalar" if mode == "scalar" else ("same" if mode == "same" else "bcast")
        p, init, pc = c.const(kind)
        pc = "constant " + pc
    if is_div and p == "0.0":
        p = "0.3"
    sym = "/" if is_div else "*"
    if mode == "rdiv":
        return Emit([f"{c.o} = {p} {sym} {v}"], init, pclass="constant / input")
    if mode == "rounded":
        return Emit([f"{c.o} = torch.div({v}, {p}, rounding_mode='floor')"], init, pclass=pc)
    if key in (operator.mul, operator.truediv):
        return Emit([f"{c.o} = {v} {sym} {p}" if is_div or c.r.random() < 0.6
                     else f"{c.o} = {p} * {v}"], init, pclass=pc)
    if key in (operator.imul, operator.itruediv):
        base = f"{v} + 0.0" if v == "x" or mode == "up" else v
        return Emit([f"{c.o} = {base}", f"{c.o} {sym}= {p}"], init,
                    pclass=pc + (", x op= c" if base != v else ", x op= c on a live variable"))
    if isinstance(key, str):
        if key.endswith("_"):
            if v == "x" or mode == "up":
                return None
        return Emit([f"{c.o} = {v}.{key}({p})"], init, pclass=pc)
    return Emit([f"{c.o} = {_src(key)}({v}, {p})"], init, pclass=pc)


_CAT = [torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack,
        torch.dstack, torch.column_stack]


@_g(_CAT, "cat / stack")
def _cat(c: Ctx, key: Any) -> Emit | None:
    v = c.v
    other = c.same()
    pc = "same input twice" if other == v else "two branches"
    if c.r.random() < 0.3:
        other = f"3.0 * {other}"
        pc += ", one scaled x3"
    name = key.__name__
    if name in ("cat", "concat", "concatenate"):
        d = c.dim()
        return Emit([f"{c.o} = torch.{name}([{v}, {other}], {d})"], pclass=pc)
    if name == "stack":
        d = c.r.randint(1, c.nd + 1)
        return Emit([f"{c.o} = torch.stack([{v}, {other}], {d})"], pclass=pc)
    if name == "vstack":  # cats along dim 0: move the batch dim out of the way first
        return Emit([f"{c.o} = torch.vstack([{v}.transpose(0, 1), {other}.transpose(0, 1)])"
                     ".transpose(0, 1)"], pclass=pc + ", around transposes of the batch dim")
    if name == "dstack" and c.nd > 2:
        return None
    return Emit([f"{c.o} = torch.{name}([{v}, {other}])"], pclass=pc)


@_g([torch.maximum, torch.minimum, torch.fmax, torch.fmin, "maximum", "minimum"],
    "maximum / minimum")
def _max2(c: Ctx, key: Any) -> Emit:
    v = c.v
    mode = c.choice(["same", "bcast", "const"])
    init: list[str] = []
    if mode == "same":
        p, pc = c.same(), "two inputs"
    elif mode == "bcast":
        p, pc = c.bcast(), "two inputs, broadcast"
    else:
        p, init, pc = c.const("same" if c.r.random() < 0.5 else "bcast")
        pc = "constant " + pc
    if isinstance(key, str):
        return Emit([f"{c.o} = {v}.{key}({p})"], init, pclass=pc)
    return Emit([f"{c.o} = {_src(key)}({v}, {p})"], init, pclass=pc)


@_g([torch.max, torch.min, torch.amax, torch.amin, "max", "min", "amax", "amin"],
    "max / min over a dim")
def _reduce_max(c: Ctx, key: Any) -> Emit:
    v = c.v
    d = c.dim()
    keep = c.r.random() < 0.4
    name = key if isinstance(key, str) else key.__name__
    if name in ("max", "min") and c.r.random() < 0.25:
        p = c.same()
        e = f"{v}.{name}({p})" if isinstance(key, str) else f"torch.{name}({v}, {p})"
        return Emit([f"{c.o} = {e}"], pclass="binary (element-wise)")
    if name in ("max", "min"):
        sel = c.choice(["[0]", ".values"])
        e = (f"{v}.{name}({d}, keepdim={keep}){sel}" if isinstance(key, str)
             else f"torch.{name}({v}, {d}, keepdim={keep}){sel}")
        pc = f"over a dim, {sel}"
    else:
        e = (f"{v}.{name}({d}, keepdim={keep})" if isinstance(key, str)
             else f"torch.{name}({v}, {d}, keepdim={keep})")
        pc = "over a dim"
    if c.nd == 1 and not keep:
        e += ".unsqueeze(1)"
    return Emit([f"{c.o} = {e}"], pclass=pc + (", keepdim" if keep else ""))


@_g([nn.Softmax, nn.Softmax2d, F.softmax, torch.softmax, "softmax", nn.LogSoftmax,
     F.log_softmax, torch.log_softmax, "log_softmax"], "softmax", ndims=(1, 2, 3))
def _softmax(c: Ctx, key: Any) -> Emit | None:
    v = c.v
    d = c.dim()
    name = key if isinstance(key, str) else getattr(key, "__name__", "")
    if key is nn.Softmax2d:
        if c.nd != 3:
            return None
        return Emit([f"{c.o} = self.{c.a}({v})"], [f"self.{c.a} = nn.Softmax2d()"])
    if isinstance(key, type):
        return Emit([f"{c.o} = self.{c.a}({v})"], [f"self.{c.a} = {_src(key)}(dim={d})"],
                    pclass=f"dim size {c.shape[d - 1 if d > 0 else d]}")
    if isinstance(key, str):
        return Emit([f"{c.o} = {v}.{name}({d})"])
    return Emit([f"{c.o} = {_src(key)}({v}, {d})"])


# ---- hooks and residual structure (exercise keys that already have a generator) ----------
def _hooked(c: Ctx) -> Emit:
    """A Linear / activation module with a forward hook or a forward pre-hook."""
    k = c.choice([2.0, -3.0, 0.25])
    kind = c.choice(["forward hook", "forward pre-hook", "pre-hook with kwargs"])
    mod = (f"nn.Linear({c.shape[-1]}, {c.shape[-1]})" if c.r.random() < 0.5
           else c.choice(["nn.ReLU()", "nn.Tanh()", "nn.Identity()"]))
    h = f"_hook_{c.a}"
    if kind == "forward hook":
        helper = [f"def {h}(module, inputs, output):", f"    return output * {k}"]
        reg = f"self.{c.a}.register_forward_hook({h})"
    elif kind == "forward pre-hook":
        helper = [f"def {h}(module, inputs):", f"    return (inputs[0] * {k},)"]
        reg = f"self.{c.a}.register_forward_pre_hook({h})"
    else:
        helper = [f"def {h}(module, args, kwargs):", f"    return (args[0] * {k},), kwargs"]
        reg = f"self.{c.a}.register_forward_pre_hook({h}, with_kwargs=True)"
    return Emit([f"{c.o} = self.{c.a}({c.v})"], [f"self.{c.a} = {mod}", reg], helper,
                pclass=f"{kind} x{k:g} on {mod.split('(')[0]}")


def _residual(c: Ctx) -> Emit | None:
    cands = [k for k, s in c.pool.items() if s == c.shape and k != c.v]
    if not cands:
        return None
    p = c.choice(cands)
    return Emit([f"{c.o} = {c.v} + {p}"], pclass="skip connection")


_GENS.append(OpGen("hooked module", "hooks", (), _hooked, (1, 2, 3)))
_GENS.append(OpGen("residual add", "residual", (), _residual, (1, 2, 3, 4)))


# ---------------------------------------------------------------------------------------------
# programs
# ---------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One op of a program: generator ``name``, ``v`` -> ``o`` and the lines it adds."""

    name: str
    family: str
    pclass: str
    v: str
    o: str
    fwd: list[str]
    init: list[str] = field(default_factory=list)
    helpers: list[str] = field(default_factory=list)
    lossy: bool = False
    train: bool = False
    inplace: bool = False


@dataclass
class Program:
    """A generated model: its source text (:meth:`source`) and how it was drawn."""

    seed: int
    input_shape: tuple[int, ...]
    steps: list[Step] = field(default_factory=list)
    out: str = "x"
    focus: str = ""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def fwd(self) -> list[str]:
        return [ln for s in self.steps for ln in s.fwd]

    @property
    def init(self) -> list[str]:
        return [ln for s in self.steps for ln in s.init]

    @property
    def helpers(self) -> list[str]:
        return [ln for s in self.steps for ln in s.helpers]

    @property
    def ops(self) -> list[tuple[str, str, str]]:
        """(generator, family, parameter class) of every step."""
        return [(s.name, s.family, s.pclass) for s in self.steps]

    @property
    def lossy(self) -> bool:
        return any(s.lossy for s in self.steps)

    @property
    def train(self) -> bool:
        return any(s.train for s in self.steps)

    def source(self, *, footer: str = "", out: str | None = None) -> str:
        """Self-contained Python source: ``make()`` returns the model, ``INPUT_SHAPE`` its
        per-sample input shape."""
        init = self.init or ["pass"]
        lines = [PRELUDE, *self.helpers, "", "",
                 "class Net(nn.Module):",
                 "    def __init__(self):",
                 "        super().__init__()",
                 *[f"        {ln}" for ln in init],
                 "",
                 "    def forward(self, x):",
                 *[f"        {ln}" for ln in self.fwd],
                 f"        return {self.out if out is None else out}",
                 "", "",
                 f"INPUT_SHAPE = {self.input_shape!r}",
                 "", "",
                 "def make():",
                 f"    torch.manual_seed({self.seed})",
                 f"    return Net().{'train' if self.train else 'eval'}()",
                 ""]
        src = "\n".join(lines)
        return src + ("\n" + footer if footer else "")

    def build(self, *, out: str | None = None) -> nn.Module:
        """Execute the source; the model (same weights for the same program)."""
        ns: dict[str, Any] = {"__name__": "lipbound_fuzz_program"}
        with torch.random.fork_rng(devices=[]):
            exec(compile(self.source(out=out), f"<fuzz program {self.seed}>", "exec"), ns)
            model: nn.Module = ns["make"]()
        return model

    def without(self, j: int) -> Program:
        """The program with step ``j`` removed (its output renamed to its input)."""
        gone = self.steps[j]
        pat = re.compile(rf"\b{re.escape(gone.o)}\b")
        steps = []
        for i, s in enumerate(self.steps):
            if i == j:
                continue
            steps.append(replace(s, fwd=[pat.sub(gone.v, ln) for ln in s.fwd],
                                 v=gone.v if s.v == gone.o else s.v) if i > j else s)
        out = gone.v if self.out == gone.o else self.out
        return Program(self.seed, self.input_shape, steps, out, self.focus)


def _var_names(prog: Program) -> list[str]:
    names = {"x"}
    for ln in prog.fwd:
        lhs = ln.split(" = ")[0].strip() if " = " in ln else ""
        if lhs.isidentifier():
            names.add(lhs)
    return sorted(names)


def _step_out_shapes(prog: Program, batch: int = 2) -> dict[str, tuple[int, ...]] | None:
    """Run the program (float32 and float64, batch ``batch`` and 1, with a backward pass);
    the per-sample shape of every variable, or ``None`` when torch rejects it."""
    ret = "{" + ", ".join(f"{n!r}: {n}" for n in _var_names(prog)) + "}"
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(prog.seed + 1)
            model = prog.build(out=ret).eval()
            gen = torch.Generator().manual_seed(prog.seed)
            x = torch.randn(batch, *prog.input_shape, generator=gen)
            x64 = x.double().requires_grad_(True)
            m64 = copy.deepcopy(model).double()
            outs = m64(x64 * 1.0)
            y = outs[prog.out]
            if not isinstance(y, torch.Tensor) or y.dim() < 2 or y.shape[0] != batch:
                return None
            if not torch.isfinite(y).all():
                return None
            if y.requires_grad:
                torch.autograd.grad(y.sum(), x64, allow_unused=True)
            y32 = model(x.clone())[prog.out]
            y1 = model(x[:1].clone())[prog.out]
            if y32.shape != y.shape or y1.shape[1:] != y.shape[1:]:
                return None
            if not torch.allclose(y1[0], y32[0], rtol=1e-4, atol=1e-5):  # batch-independent
                return None
            shapes = {}
            for k, t in outs.items():
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch:
                    shapes[k] = tuple(t.shape[1:])
    except Exception:
        return None
    return shapes


def _valid(prog: Program) -> Program | None:
    got = _step_out_shapes(prog)
    if got is None or prog.out not in got:
        return None
    n = math.prod(got[prog.out])
    if n == 0 or n > MAX_NUMEL:
        return None
    prog.shapes = got
    return prog


_SHAPES = {
    1: lambda r: (r.randint(2, 12),),
    2: lambda r: (r.randint(1, 3), r.randint(3, 8)),
    3: lambda r: (r.randint(1, 4), r.randint(2, 5), r.randint(2, 4)),
    4: lambda r: (r.randint(1, 2), r.randint(2, 3), r.randint(2, 3), r.randint(2, 3)),
}


def _find_gen(focus: OpGen | str | Any) -> OpGen:
    if isinstance(focus, OpGen):
        return focus
    if isinstance(focus, str):
        for g in [*_GENS, *_GENS_BY_NAME.values()]:
            if g.name == focus:
                return g
    gens = generators_for(focus)
    if gens:
        return gens[0]
    raise GenerationError(f"no generator for {focus!r}; add one with register_generator(...)")


def _try_step(prog: Program, gen: OpGen, r: random.Random, var: str, idx: int) -> Program | None:
    shapes = prog.shapes
    shape = shapes[var]
    if len(shape) not in gen.ndims or (gen.inplace and var == "x"):
        return None
    o, a = f"h{idx}", f"m{idx}"
    c = Ctx(r, var, shape, o, a, dict(shapes))
    em = gen.fn(c)
    if em is None:
        return None
    st = Step(gen.name, gen.family, em.pclass, var, o, em.fwd, em.init, em.helpers, em.lossy,
              em.train, gen.inplace)
    return _valid(Program(prog.seed, prog.input_shape, [*prog.steps, st], o, prog.focus))


def generate(seed: int, *, focus: OpGen | str | Any = None, max_extra: int = 3,
             minimal: bool = False, attempts: int = 40) -> Program:
    """A random program around one focus op (a generator, its name or a rule key).

    ``minimal=True`` keeps only the focus op (and the neutral ``clone`` an in-place op needs).
    Deterministic: the same arguments give the same source.
    """
    if focus is None:
        focus = _GENS[seed % len(_GENS)]
    g = _find_gen(focus)
    rf = random.Random(f"focus:{seed}")
    rs = random.Random(f"struct:{seed}")
    for _ in range(attempts):
        shape = _SHAPES[rf.choice(list(g.ndims))](rf)
        if math.prod(shape) > 30:
            continue
        prog = Program(seed, shape, [], "x", g.name, {"x": shape})
        idx = 0
        if g.inplace or (not minimal and rs.random() < 0.35):
            pre = _GENS_BY_NAME["clone"] if (g.inplace and minimal) else rs.choice(_PREFIX)
            stepped = _try_step(prog, pre, rs, "x", idx) or _try_step(
                prog, _GENS_BY_NAME["clone"], rs, "x", idx)
            if stepped is None:
                continue
            prog, idx = stepped, idx + 1
        stepped = _try_step(prog, g, rf, prog.out, idx)
        if stepped is None:
            continue
        prog, idx = stepped, idx + 1
        if not minimal:
            for _ in range(rs.randint(0, max_extra)):
                for _try in range(6):
                    stepped = _try_step(prog, rs.choice(_EXTRA), rs, prog.out, idx)
                    if stepped is not None:
                        prog, idx = stepped, idx + 1
                        break
        return prog
    raise GenerationError(
        f"could not generate a valid program for {g.name} in {attempts} attempts (seed {seed})"
    )


_GENS_BY_NAME = {"clone": OpGen("clone", "identity / dtype", ("clone",),
                                lambda c: Emit([f"{c.o} = {c.v}.clone()"]), (1, 2, 3, 4))}
_PREFIX_NAMES = ("torch.nn.modules.activation.Tanh",
                 "torch.nn.modules.activation.LeakyReLU", "torch.nn.modules.activation.ReLU",
                 "torch.nn.modules.batchnorm.BatchNorm1d", "torch.nn.modules.activation.ELU")
_PREFIX = [g for g in _GENS if g.name in _PREFIX_NAMES] + [_GENS_BY_NAME["clone"]]
_EXTRA = [g for g in _GENS if g.family in (
    "activation (module)", "activation (functional)", "linear", "add / sub", "convolution",
    "max pooling", "average pooling", "reshape", "batchnorm", "hooks", "residual", "cat / stack",
    "linear chain (merged)", "scalar mul / div", "maximum / minimum", "activation (in-place)")]


# ---------------------------------------------------------------------------------------------
# truth: adversarial search for realised ratios (float64)
# ---------------------------------------------------------------------------------------------
@dataclass
class Truth:
    """The largest ratio realised in one norm and its witness (``y is None``: a Jacobian
    witness at ``x``; else a pair)."""

    norm: str
    value: float
    x: list[float]
    y: list[float] | None
    how: str


#: float64 evaluations per output entry whose rounding the pair noise bound allows for
NOISE_EVALS = 16


def _pair_noise(f: _F64, t: Truth) -> float:
    """How much float64 evaluation alone can add to a realised PAIR ratio: each output entry of
    ``f(x)`` and ``f(y)`` carries a rounding error of a few ``u64 |f|`` (more where large terms
    cancel), so ``||f(x) - f(y)|| / ||x - y||`` is known only to about
    ``NOISE_EVALS u64 (||f(x)|| + ||f(y)||) / ||x - y||``. A pair bisected down to a small
    ``||x - y||`` on a function with a large offset (a bias of 0.5 next to weights of 1e-5)
    exceeded exact certificates by 5e-7 relative in the 10,000-graph campaign: that is this
    noise, not the certificate. Jacobian witnesses (``y is None``) get 0."""
    if t.y is None:
        return 0.0
    x = torch.tensor([t.x], dtype=torch.float64)
    y = torch.tensor([t.y], dtype=torch.float64)
    d = float(_vnorm(x - y, t.norm)[0])
    if not d > 0:
        return 0.0
    with torch.no_grad():
        mag = float(_vnorm(f(x), t.norm)[0] + _vnorm(f(y), t.norm)[0])
    eps = float(torch.finfo(torch.float64).eps)
    noise = NOISE_EVALS * eps * mag / d
    return noise if math.isfinite(noise) else 0.0


def _opnorm(J: torch.Tensor, p: str) -> torch.Tensor:
    """Operator norms of a batch of Jacobians ``(k, m, n)``."""
    if p == "2":
        return torch.linalg.matrix_norm(J, 2)
    if p == "1":
        return J.abs().sum(-2).amax(-1)
    return J.abs().sum(-1).amax(-1)


def _vnorm(v: torch.Tensor, p: str) -> torch.Tensor:
    return torch.linalg.vector_norm(v, {"1": 1.0, "2": 2.0, "inf": math.inf}[p], dim=-1)


class _F64:
    """A float64 eval copy of a model as a batched function ``(k, n) -> (k, m)``."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...]) -> None:
        m = copy.deepcopy(model).double().eval()
        for p in m.parameters():
            p.requires_grad_(False)
        self.m, self.shape = m, shape
        self.n = math.prod(shape)

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        y = self.m(X.reshape(X.shape[0], *self.shape) * 1.0)
        return y.reshape(X.shape[0], -1)

    def jac(self, X: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """Per-sample Jacobians ``(k, m, n)`` (samples are independent)."""
        if not create_graph:
            X = X.detach()
        J = torch.autograd.functional.jacobian(lambda Z: self(Z).sum(0), X,
                                               create_graph=create_graph)
        return J.permute(1, 0, 2)


def _starts(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random points at scales 0.1..100, plus "spiky" points (one large entry)."""
    scales = torch.tensor([0.1, 1.0, 1.0, 3.0, 10.0, 100.0], dtype=torch.float64)
    s = scales[torch.randint(0, len(scales), (k, 1), generator=gen)]
    X = s * torch.randn(k, n, generator=gen, dtype=torch.float64)
    spikes = k // 3
    if spikes:
        j = torch.randint(0, n, (spikes,), generator=gen)
        amp = (2.0 + 30 * torch.rand(spikes, generator=gen, dtype=torch.float64)) * torch.where(
            torch.rand(spikes, generator=gen) < 0.5, -1.0, 1.0).double()
        X[:spikes] = 0.3 * torch.randn(spikes, n, generator=gen, dtype=torch.float64)
        X[torch.arange(spikes), j] += amp
    return X


def _finite_rows(*ts: torch.Tensor) -> torch.Tensor:
    ok = torch.ones(ts[0].shape[0], dtype=torch.bool)
    for t in ts:
        ok &= torch.isfinite(t.reshape(t.shape[0], -1)).all(-1)
    return ok


@dataclass
class _TruthSearch:
    """The state of one adversarial search: the float64 model, the random generator, the best
    ratio so far per norm and the pairs each norm's bisection starts from."""

    f: _F64
    norms: Sequence[str]
    gen: torch.Generator
    best: dict[str, Truth]
    cands: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]

    def offer(self, p: str, vals: torch.Tensor, X: torch.Tensor, Y: torch.Tensor | None,
              how: str) -> None:
        """Keep the largest finite ``vals`` (at ``X``, or at the pairs ``X``, ``Y``) if it beats
        the best ratio in norm ``p``."""
        vals = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
        if vals.numel() == 0:
            return
        i = int(torch.argmax(vals))
        v = float(vals[i])
        if v > self.best[p].value:
            self.best[p] = Truth(p, v, X[i].tolist(), None if Y is None else Y[i].tolist(), how)


def _jacobians_at(s: _TruthSearch, X: torch.Tensor) -> torch.Tensor | None:
    """Jacobian operator norms at the start points ``X``; their Jacobians (``None`` when the
    model has none there)."""
    try:
        J = s.f.jac(X)
        _offer_jacobians(s, X, J, "jacobian at a random point")
    except Exception:
        return None
    return J


def _offer_jacobians(s: _TruthSearch, X: torch.Tensor, J: torch.Tensor, how: str) -> None:
    """Offer the operator norms of the Jacobians ``J`` at ``X`` in every norm (rows that are
    not finite offer 0)."""
    ok = _finite_rows(J)
    for p in s.norms:
        s.offer(p, torch.where(ok, _opnorm(J.nan_to_num(0.0), p), 0.0), X, None, how)


def _jacobian_ascent(s: _TruthSearch, X: torch.Tensor, J: torch.Tensor, k: int, steps: int
                     ) -> torch.Tensor | None:
    """Gradient ascent of ``||J(x)||_2`` from the ``k`` best points (smooth networks); the
    points reached (``None`` when the search failed)."""
    f = s.f
    try:
        top = torch.argsort(torch.where(_finite_rows(J), _opnorm(J.nan_to_num(0.0), "2"),
                                        -1.0), descending=True)[:k]
        Z = X[top].clone().requires_grad_(True)
        opt = torch.optim.Adam([Z], lr=0.1)
        for _ in range(steps):
            Jz = f.jac(Z, create_graph=True)
            obj = _opnorm(Jz, "2")
            if not obj.requires_grad:
                break
            (g,) = torch.autograd.grad(obj.sum(), Z, allow_unused=True)
            if g is None or not torch.isfinite(g).all() or float(g.abs().max()) == 0.0:
                break
            opt.zero_grad()
            Z.grad = -g * (1.0 + Z.detach().abs())
            opt.step()
        Zd = Z.detach()
        _offer_jacobians(s, Zd, f.jac(Zd), "jacobian ascent")
    except Exception:
        return None
    return Zd


def _random_pairs(s: _TruthSearch, X: torch.Tensor, points: int) -> None:
    """Random pairs around ``X`` (no gradient needed): offered, and kept for the bisection."""
    f, n = s.f, s.f.n
    with torch.no_grad():
        try:
            dd = torch.pow(10.0, -3.0 + 3.5 * torch.rand(points, 1, generator=s.gen,
                                                         dtype=torch.float64))
            Y = X + dd * (1.0 + X.abs().amax(-1, keepdim=True)) * torch.randn(
                points, n, generator=s.gen, dtype=torch.float64)
            diff = f(X) - f(Y)
            for p in s.norms:
                s.offer(p, _vnorm(diff, p) / _vnorm(X - Y, p), X, Y, "random pair")
                s.cands[p].append((X, Y))
        except Exception:
            pass


def _pair_ratio(f: _F64, Zx: torch.Tensor, Uv: torch.Tensor, sc: torch.Tensor, p: str,
                d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The pair ratios of the chains ``Xa = Zx sc``, ``Xb = Xa + d Uv / ||Uv||_p``; ``(ratios,
    Xa, Xb)``."""
    Xa = Zx * sc
    un = Uv / _vnorm(Uv, p).clamp_min(1e-300).unsqueeze(-1)
    Xb = Xa + d * un
    diff = f(Xa) - f(Xb)
    return _vnorm(diff, p) / _vnorm(Xa - Xb, p), Xa, Xb


def _pair_ascent(s: _TruthSearch, p: str, allX: torch.Tensor, svd_start: bool, k: int, steps: int
                 ) -> None:
    """Gradient ascent of the pair ratio in norm ``p`` over ``k`` chains started at points of
    ``allX`` (along the top right singular vectors where ``svd_start`` and ``p == "2"``);
    the last pairs are kept for the bisection."""
    f, n, gen = s.f, s.f.n, s.gen
    try:
        idx = torch.randint(0, allX.shape[0], (k,), generator=gen)
        X0 = allX[idx].clone()
        sc = 1.0 + X0.abs().amax(-1, keepdim=True)
        d = sc * torch.pow(10.0, -3.0 + 3.5 * torch.rand(k, 1, generator=gen,
                                                        dtype=torch.float64))
        U = torch.randn(k, n, generator=gen, dtype=torch.float64)
        if svd_start and p == "2":  # start along top right singular vectors
            try:
                Jx = f.jac(X0).nan_to_num(0.0)
                U = torch.linalg.svd(Jx, full_matrices=False).Vh[:, 0, :].clone()
            except Exception:
                pass
        Zx = (X0 / sc).clone().requires_grad_(True)
        Uv = U.clone().requires_grad_(True)
        opt = torch.optim.Adam([Zx, Uv], lr=0.05)
        for _ in range(steps):
            r, Xa, Xb = _pair_ratio(f, Zx, Uv, sc, p, d)
            ok = torch.isfinite(r)
            s.offer(p, torch.where(ok, r, 0.0).detach(), Xa.detach(), Xb.detach(),
                    "pair ascent")
            if not r.requires_grad:
                break
            loss = -torch.log(torch.where(ok, r, 1.0).clamp_min(1e-300)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            r, Xa, Xb = _pair_ratio(f, Zx, Uv, sc, p, d)
            s.offer(p, r, Xa, Xb, "pair ascent")
            s.cands[p].append((Xa.detach(), Xb.detach()))
    except Exception:
        return


def _bisect(s: _TruthSearch, p: str, pairs: int, steps: int) -> None:
    """Bisection of the ``pairs`` best candidate pairs in norm ``p``: keep the half segment
    with the larger ratio. For a Lipschitz f the ratio stays bounded; across a jump it doubles
    at every step."""
    f = s.f
    try:
        A = torch.cat([a for a, _ in s.cands[p]])
        B = torch.cat([b for _, b in s.cands[p]])
        r = _vnorm(f(A) - f(B), p) / _vnorm(A - B, p)
        top = torch.argsort(torch.where(torch.isfinite(r), r, -1.0),
                            descending=True)[:pairs]
        A, B = A[top], B[top]
        for _ in range(steps):
            # stop at 1e-5 relative length: float64 cancellation stays below 1e-11
            rel = (A - B).abs().amax(-1) / (1.0 + A.abs().amax(-1))
            keep = rel > 2e-5
            if not bool(keep.any()):
                break
            A, B = A[keep], B[keep]
            M = 0.5 * (A + B)
            fA, fM, fB = f(A), f(M), f(B)
            r1 = _vnorm(fA - fM, p) / _vnorm(A - M, p)
            r2 = _vnorm(fM - fB, p) / _vnorm(M - B, p)
            left = (r1 >= r2).unsqueeze(-1)
            A, B = torch.where(left, A, M), torch.where(left, M, B)
            s.offer(p, torch.maximum(r1, r2), A, B, "pair bisection")
    except Exception:
        return


def _recomputed(f: _F64, best: dict[str, Truth]) -> dict[str, Truth]:
    """Each witness recomputed exactly as reported (a pair from its two points)."""
    for p, t in best.items():
        if t.y is not None:
            xa = torch.tensor([t.x], dtype=torch.float64)
            xb = torch.tensor([t.y], dtype=torch.float64)
            with torch.no_grad():
                v = float(_vnorm(f(xa) - f(xb), p)[0] / _vnorm(xa - xb, p)[0])
            best[p] = Truth(p, v if math.isfinite(v) else 0.0, t.x, t.y, t.how)
    return best


def realised_lipschitz(  # noqa: PLR0913 - the public entry point: one keyword option per knob
    model: nn.Module, input_shape: Sequence[int], *, norms: Sequence[str] = NORMS,
    seed: int = 0, points: int = 24, ascent_steps: int = 6, pair_chains: int = 12,
    pair_steps: int = 15, bisect_pairs: int = 48, bisect_steps: int = 14,
) -> dict[str, Truth]:
    """Adversarial search for the largest realised ratio of ``model`` in each norm (float64).

    Jacobian norms at random / large-scale / spiky points, gradient ascent of ``||J(x)||_2``
    (skipped where the gradient vanishes: piecewise-linear networks), then per norm a
    gradient ascent of ``||f(x) - f(y)||_p / ||x - y||_p`` over pairs whose distances span
    ``1e-3..3`` times the chain's scale, and a bisection of the best pairs (the half segment
    of larger ratio is kept: a jump doubles the ratio at every step). Every value is
    recomputed at its witness.
    """
    shape = tuple(int(s) for s in input_shape)
    f = _F64(model, shape)
    n = f.n
    gen = torch.Generator().manual_seed(seed)
    st = _TruthSearch(f, norms, gen, {p: Truth(p, 0.0, [0.0] * n, None, "none") for p in norms},
                      {p: [] for p in norms})
    X = _starts(n, points, gen)
    pool = [X]
    J = _jacobians_at(st, X)
    # gradient ascent of ||J(x)||_2 from the best points (smooth networks)
    if J is not None and ascent_steps > 0:
        Zd = _jacobian_ascent(st, X, J, min(6, points), ascent_steps)
        if Zd is not None:
            pool.append(Zd)
    # random pairs (no gradient needed), then pair-ratio ascent, per norm
    allX = torch.cat(pool)
    _random_pairs(st, X, points)
    for p in norms:
        _pair_ascent(st, p, allX, J is not None, pair_chains, pair_steps)
    # bisection of the best pairs: keep the half segment with the larger ratio
    with torch.no_grad():
        for p in norms:
            if st.cands[p]:
                _bisect(st, p, bisect_pairs, bisect_steps)
    # recompute each witness exactly as reported (a pair from its two points)
    return _recomputed(f, st.best)


# ---------------------------------------------------------------------------------------------
# checking one model
# ---------------------------------------------------------------------------------------------
@dataclass
class Finding:
    """A soundness bug: ``kind`` is ``"unsound"`` (certified < realised beyond ``rtol``),
    ``"rounding"`` (certified < realised by more than ``RTOL_ROUNDING``), ``"crash"`` (an
    exception outside the LipboundError family), ``"witness"`` (a lower bound not reproduced
    by its witness) or ``"nonfinite"`` (a NaN certified value)."""

    kind: str
    method: str
    norm: str
    certified: float | None
    realised: float | None
    message: str
    witness: Truth | None = None
    source: str = ""
    focus: str = ""
    pclass: str = ""
    ops: tuple[str, ...] = ()

    def key(self) -> tuple[str, ...]:
        """The finding's class: crashes by message, the others by method, norm and the ops
        of the (minimised) program."""
        if self.kind == "crash":
            return (self.kind, self.method, self.message.split(" at ")[0][:90])
        return (self.kind, self.method, self.norm, " -> ".join(self.ops))

    def summary(self) -> str:
        if self.kind in ("unsound", "rounding"):
            return (f"{self.method} l{self.norm}: certified {self.certified:.9g} < realised "
                    f"{self.realised:.9g} ({self.message})")
        return f"{self.method} l{self.norm}: {self.kind}: {self.message}"


@dataclass
class CheckReport:
    """What :func:`check_model` did: ``checked`` (method, norm) pairs compared with the truth,
    ``refusals`` (method, norm, error type, first line), ``findings``, ``truth`` per norm."""

    checked: list[tuple[str, str]] = field(default_factory=list)
    refusals: list[tuple[str, str, str, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    truth: dict[str, Truth] = field(default_factory=dict)
    uppers: dict[tuple[str, str], float] = field(default_factory=dict)
    harness_errors: list[str] = field(default_factory=list)


def _autolip_at(model: nn.Module, shape: tuple[int, ...], p: str) -> Any:
    return lipbound.autolip(model, shape, norm=_norm_of(p))


def _exact_at(model: nn.Module, shape: tuple[int, ...], p: str, seed: int) -> Any:
    return lipbound.exact(model, shape, norm=_norm_of(p), time_limit=1.0, n_samples=200,
                          seed=seed)


def _lower_at(model: nn.Module, shape: tuple[int, ...], p: str, seed: int) -> Any:
    return lipbound.lower_bound(model, shape, norm=_norm_of(p), restarts=4, steps=12,
                                power_iterations=8, seed=seed)


def _norm_of(p: str) -> Any:
    return {"1": 1, "2": 2, "inf": "inf"}[p]


def _lower_witness_ratio(f: _F64, res: Any, p: str) -> float:
    """Recompute a LowerBoundResult's value from its witness (float64)."""
    w = res.witness
    x = w.x.detach().double().reshape(1, -1)
    if w.y is not None:
        y = w.y.detach().double().reshape(1, -1)
        with torch.no_grad():
            return float(_vnorm(f(x) - f(y), p)[0] / _vnorm(x - y, p)[0])
    v = w.direction
    if v is None:
        return 0.0
    v = v.detach().double().reshape(1, -1)
    jv = torch.func.jvp(f, (x,), (v,))[1]
    return float(_vnorm(jv, p)[0] / _vnorm(v, p)[0])


@dataclass
class _Check:
    """One :func:`check_model` run: the model, its float64 copy, the seed every method runs
    with, the tolerance and the report filled in."""

    model: nn.Module
    shape: tuple[int, ...]
    f64: _F64
    seed: int
    rtol: float
    rep: CheckReport

    def run(self, method: str, p: str, call: Callable[[], Any]) -> Any:
        """``call()`` under the fixed seed; ``None`` after a refusal (a LipboundError, counted)
        or a crash (any other exception, a finding)."""
        rep = self.rep
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            try:
                return call()
            except LipboundError as exc:
                rep.refusals.append((method, p, type(exc).__name__,
                                     str(exc).strip().split("\n")[0][:160]))
            except Exception as exc:
                tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
                rep.findings.append(Finding(
                    "crash", method, p, None, None,
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"  # noqa: E501
                    f" at {tb[-2].strip().splitlines()[0][:160] if len(tb) > 1 else '?'}"))
        return None


def _check_options(methods: Sequence[str], norms: Sequence[str]) -> None:
    """Refuse an unknown method or norm."""
    for m in methods:
        if m not in METHODS:
            raise InvalidArgumentError(f"unknown method {m!r}; choose among {METHODS}")
    for p in norms:
        if p not in NORMS:
            raise InvalidArgumentError(f"norm must be among {NORMS}; got {p!r}")


def _certified_runs(ck: _Check, methods: Sequence[str], norms: Sequence[str],
                    exact_max_inputs: int) -> list[tuple[str, str, float | None, Any]]:
    """Run the upper-bound methods: (method, norm, certified upper or None, result) of every
    run that did not refuse or crash, in the order AutoLip, SeqLip, exact, LipSDP."""
    model, shape, seed = ck.model, ck.shape, ck.seed
    results: list[tuple[str, str, float | None, Any]] = []  # method, norm, certified upper
    for p in norms:
        if "autolip" in methods:
            r = ck.run("autolip", p, functools.partial(_autolip_at, model, shape, p))
            if r is not None:
                results.append(("autolip", p, r.upper if r.certified else None, r))
    if "seqlip" in methods and "2" in norms:
        r = ck.run("seqlip", "2", lambda: lipbound.seqlip(model, shape, time_limit=0.5,
                                                          restarts=2, seed=seed))
        if r is not None:
            results.append(("seqlip", "2", r.upper, r))
    small = math.prod(shape) <= exact_max_inputs
    if "exact" in methods and small:
        for p in norms:
            r = ck.run("exact", p, functools.partial(_exact_at, model, shape, p, seed))
            if r is not None:
                results.append(("exact", p, r.upper if r.certified else None, r))
    if "lipsdp" in methods and "2" in norms:  # any graph: composed with AutoLip off chains
        r = ck.run("lipsdp", "2", lambda: lipbound.lipsdp(model, shape, time_limit=5.0))
        if r is not None:
            results.append(("lipsdp", "2", r.upper if r.certified else None, r))
    return results


def _lower_runs(ck: _Check, lower_norms: Sequence[str]) -> list[tuple[str, Any]]:
    """Run ``lower_bound`` in each of ``lower_norms``: (norm, result) of the runs that did not
    refuse or crash."""
    lowers: list[tuple[str, Any]] = []
    for p in lower_norms:
        r = ck.run("lower_bound", p, functools.partial(_lower_at, ck.model, ck.shape, p,
                                                       ck.seed))
        if r is not None:
            lowers.append((p, r))
    return lowers


def _check_truth(ck: _Check, norms: Sequence[str], truth: dict[str, Truth] | None,
                 effort: float, bisect: bool) -> None:
    """The truth of the report: ``truth`` if given, else the adversarial search (float64) at
    ``effort``; a failed search is a harness error (an empty truth)."""
    rep = ck.rep
    try:
        if truth is None:
            k = max(1, round(effort * 12))
            truth = realised_lipschitz(ck.model, ck.shape, norms=norms, seed=ck.seed,
                                       points=max(6, int(24 * effort)), pair_chains=k,
                                       pair_steps=max(4, int(15 * effort)),
                                       bisect_steps=14 if bisect else 0)
        rep.truth = dict(truth)
    except Exception as exc:
        rep.harness_errors.append(f"truth search: {type(exc).__name__}: {exc}"[:200])
        rep.truth = {}


def _check_lowers(ck: _Check, lowers: list[tuple[str, Any]]) -> None:
    """Each lower bound against its own witness (recomputed in float64: a value it does not
    reproduce is a finding); a witness above the truth becomes the truth."""
    rep, rtol = ck.rep, ck.rtol
    for p, r in lowers:
        try:
            w = _lower_witness_ratio(ck.f64, r, p)
        except Exception as exc:
            rep.harness_errors.append(f"witness recheck: {type(exc).__name__}: {exc}"[:200])
            continue
        rep.checked.append(("lower_bound", p))
        if not (r.value <= w * (1 + rtol) + ATOL):
            rep.findings.append(Finding(
                "witness", "lower_bound", p, None, w,
                f"value {r.value:.9g} but its witness gives {w:.9g} ({r.how})"))
        t = rep.truth.get(p)
        if math.isfinite(w) and (t is None or w > t.value):
            xs = r.witness.x.detach().double().reshape(-1).tolist()
            ys = None if r.witness.y is None else r.witness.y.detach().double().reshape(-1).tolist()
            rep.truth[p] = Truth(p, w, xs, ys, f"lower_bound witness ({r.how})")


def _check_upper(ck: _Check, method: str, p: str, upper: float) -> bool:
    """One certified upper bound against the truth in its norm: NaN is a finding (and
    ``False`` is returned: nothing else of the run is checked), a truth above
    ``upper (1 + rtol)`` (plus ATOL and the pair's float64 noise) is ``"unsound"``, one above
    ``upper (1 + RTOL_ROUNDING)`` only is ``"rounding"`` (at the default rtol)."""
    rep, rtol = ck.rep, ck.rtol
    rep.uppers[(method, p)] = float(upper)
    if math.isnan(upper):
        rep.findings.append(Finding("nonfinite", method, p, upper, None,
                                    "certified value is NaN"))
        return False
    t = rep.truth.get(p)
    tol = ATOL + (0.0 if t is None else _pair_noise(ck.f64, t))
    if t is not None and t.value > upper * (1 + rtol) + tol:
        rep.findings.append(Finding("unsound", method, p, float(upper), t.value, t.how,
                                    witness=t))
    elif (t is not None and rtol <= RTOL and t.value > upper * (1 + RTOL_ROUNDING) + tol):
        rep.findings.append(Finding("rounding", method, p, float(upper), t.value,
                                    t.how + "; above the certificate by "
                                    f"{t.value / upper - 1:.2e} relative", witness=t))
    return True


def _check_exact_lower(ck: _Check, p: str, r: Any) -> None:
    """exact's certified lower: ``||J||`` at its witness point must reach it."""
    rep, f64 = ck.rep, ck.f64
    try:
        xw = r.witness.x.detach().double().reshape(1, -1)
        if xw.numel() == f64.n and r.lower > 0:
            jn = float(_opnorm(f64.jac(xw), p)[0])
            if r.lower > jn * (1 + 1e-5) + 1e-12:
                rep.findings.append(Finding(
                    "witness", "exact", p, None, jn,
                    f"certified lower {r.lower:.9g} but ||J|| at its witness is {jn:.9g}"))
    except Exception as exc:
        rep.harness_errors.append(f"exact witness: {type(exc).__name__}: {exc}"[:200])


def check_model(  # noqa: PLR0913 - the public entry point: one keyword option per knob
    model: nn.Module, input_shape: Sequence[int], *, methods: Sequence[str] = (
        "autolip", "seqlip", "exact", "lower_bound"), norms: Sequence[str] = NORMS,
    seed: int = 0, rtol: float = RTOL, truth: dict[str, Truth] | None = None,
    exact_max_inputs: int = 8, lower_norms: Sequence[str] | None = None, effort: float = 1.0,
    bisect: bool = True,
) -> CheckReport:
    """Check every certified bound of ``methods`` on ``model`` against realised ratios.

    ``lower_norms`` restricts the norms ``lower_bound`` runs in (default: ``norms``);
    ``exact`` only runs on inputs of at most ``exact_max_inputs`` entries; ``effort`` scales
    the adversarial search; ``bisect=False`` skips the pair bisection (for models that round
    on purpose, whose float32 staircase it would find). Returns a :class:`CheckReport`.
    """
    _check_options(methods, norms)
    shape = tuple(int(s) for s in input_shape)
    ck = _Check(model, shape, _F64(model, shape), seed, rtol, CheckReport())
    results = _certified_runs(ck, methods, norms, exact_max_inputs)
    lowers: list[tuple[str, Any]] = []
    if "lower_bound" in methods:
        lowers = _lower_runs(ck, lower_norms if lower_norms is not None else norms)

    # the truth (adversarial, float64) and the lower bounds' own witnesses
    _check_truth(ck, norms, truth, effort, bisect)
    _check_lowers(ck, lowers)
    for method, p, upper, r in results:
        ck.rep.checked.append((method, p))
        if upper is None:
            continue
        if _check_upper(ck, method, p, upper) and method == "exact":
            _check_exact_lower(ck, p, r)  # exact's certified lower: ||J|| at its witness point
    return ck.rep


def check_program(prog: Program, **kw: Any) -> CheckReport:
    """:func:`check_model` on a generated program (its source is attached to every finding;
    rtol is relaxed to ``RTOL_LOSSY`` when the program rounds to float32 on purpose)."""
    kw.setdefault("rtol", RTOL_LOSSY if prog.lossy else RTOL)
    kw.setdefault("seed", prog.seed)
    kw.setdefault("bisect", not prog.lossy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = check_model(prog.build(), prog.input_shape, **kw)
    for fd in rep.findings:
        fd.source = prog.source(footer=_footer(fd, prog))
        fd.focus = prog.focus
        fd.pclass = next((pc for name, _, pc in prog.ops if name == prog.focus), "")
        fd.ops = tuple(f"{name} [{pc}]" for name, _, pc in prog.ops if name != "clone")
    return rep


def _footer(fd: Finding, prog: Program) -> str:
    call = {
        "autolip": f'lipbound.autolip(model, INPUT_SHAPE, norm="{fd.norm}").upper',
        "seqlip": "lipbound.seqlip(model, INPUT_SHAPE).upper",
        "exact": f'lipbound.exact(model, INPUT_SHAPE, norm="{fd.norm}", time_limit=1.0).upper',
        "lipsdp": "lipbound.lipsdp(model, INPUT_SHAPE).upper",
        "lower_bound": f'lipbound.lower_bound(model, INPUT_SHAPE, norm="{fd.norm}", '
                       'restarts=4, steps=12, power_iterations=8, seed=' + str(prog.seed) + ")",
    }[fd.method]
    lines = ["if __name__ == '__main__':", "    import lipbound", "    model = make()",
             f"    print('{fd.method} says:', {call})"]
    w = fd.witness
    if w is not None:
        nv = {"1": "1", "2": "2", "inf": "float('inf')"}[fd.norm]
        lines += ["    m = make().double().eval()",
                  f"    x = torch.tensor([{', '.join(repr(v) for v in w.x)}]).double()"]
        if w.y is not None:
            lines += [f"    y = torch.tensor([{', '.join(repr(v) for v in w.y)}]).double()",
                      "    f = lambda t: m(t.reshape(1, *INPUT_SHAPE)).reshape(-1)",
                      f"    print('realised pair ratio:', float(torch.linalg.vector_norm("
                      f"f(x) - f(y), {nv}) / torch.linalg.vector_norm(x - y, {nv})))"]
        else:
            lines += ["    f = lambda t: m(t.reshape(1, *INPUT_SHAPE)).reshape(-1)",
                      "    J = torch.autograd.functional.jacobian(f, x)",
                      f"    print('realised Jacobian norm:', float(torch.linalg.matrix_norm("
                      f"J, {nv if fd.norm != '2' else '2'})))"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the campaign
# ---------------------------------------------------------------------------------------------
@dataclass
class FuzzReport:
    """Counts and findings of :func:`fuzz` (see :meth:`to_markdown`)."""

    graphs: int = 0
    seconds: float = 0.0
    tried: Counter[tuple[str, str]] = field(default_factory=Counter)  # (family, pclass)
    focus_tried: Counter[str] = field(default_factory=Counter)
    checked: Counter[tuple[str, str]] = field(default_factory=Counter)
    refusals: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    refusal_reasons: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    generation_failures: Counter[str] = field(default_factory=Counter)
    harness_errors: Counter[str] = field(default_factory=Counter)
    uncovered: list[str] = field(default_factory=list)
    command: str = ""

    def finding_classes(self) -> dict[tuple[str, ...], list[Finding]]:
        """Findings grouped by :meth:`Finding.key`."""
        out: dict[tuple[str, ...], list[Finding]] = {}
        for fd in self.findings:
            out.setdefault(fd.key(), []).append(fd)
        return out

    def to_markdown(self) -> str:
        rate = self.graphs / self.seconds if self.seconds > 0 else 0.0
        L = ["# Soundness fuzzing", ""]
        if self.command:
            L += [f"Command: `{self.command}`", ""]
        L += [f"{self.graphs} graphs in {self.seconds:.1f} s ({rate:.2f} graphs/s), "
              f"{len(self.findings)} findings in {len(self.finding_classes())} classes, "
              f"{sum(self.refusals.values())} refusals.", ""]
        L += ["## Registered rule keys without a generator", ""]
        L += [", ".join(f"`{u}`" for u in self.uncovered) if self.uncovered else "none", ""]
        L += self._md_checked()
        L += ["", "## Findings", ""]
        L += self._md_findings()
        L += ["## Refusals (LipboundError)", "", "| method | norm | error | count |",
              "|---|---|---|---|"]
        for (m, p, e), c in sorted(self.refusals.items()):
            L.append(f"| {m} | {p} | {e} | {c} |")
        L += ["", "Most frequent refusal reasons:", ""]
        for why, c in self.refusal_reasons.most_common(12):
            L.append(f"- {c} x {why.replace('|', '/')}")
        L += ["", "## Graphs tried per op family and parameter class", "",
              "| family | parameter class | steps |", "|---|---|---|"]
        for (fam, pc), c in sorted(self.tried.items()):
            L.append(f"| {fam} | {pc.replace('|', '/')} | {c} |")
        if self.generation_failures:
            L += ["", "## Generation failures (focus op could not be instantiated)", ""]
            for g, c in self.generation_failures.most_common():
                L.append(f"- {g}: {c}")
        if self.harness_errors:
            L += ["", "## Harness errors (the checker's own search failed; not findings)", ""]
            for g, c in self.harness_errors.most_common(10):
                L.append(f"- {c} x {g}")
        return "\n".join(L) + "\n"

    def _md_checked(self) -> list[str]:
        """The markdown table of checks and refusals per method and norm."""
        L = ["## Methods x norms checked", "", "| method | norm | checked | refused |",
             "|---|---|---|---|"]
        ref: Counter[tuple[str, str]] = Counter()
        for (m, p, _), c in self.refusals.items():
            ref[(m, p)] += c
        for m in METHODS:
            for p in NORMS:
                if self.checked[(m, p)] or ref[(m, p)]:
                    L.append(f"| {m} | {p} | {self.checked[(m, p)]} | {ref[(m, p)]} |")
        return L

    def _md_findings(self) -> list[str]:
        """The markdown of the findings: one table row and one minimal reproducer per class."""
        classes = self.finding_classes()
        if not classes:
            return ["none"]
        L = ["| # | kind | method | norms | ops of the minimal program | count | example |",
             "|---|---|---|---|---|---|---|"]
        items = sorted(classes.items())
        for i, (key, fds) in enumerate(items):
            fd = min(fds, key=lambda d: len(d.source))
            norms = ",".join(sorted({d.norm for d in fds}))
            ops = "; ".join(fd.ops) if key[0] != "crash" else key[2]
            L.append(f"| {i + 1} | {key[0]} | {key[1]} | {norms} | "
                     f"{ops.replace('|', '/')} | {len(fds)} | "
                     f"{fd.summary().replace('|', '/')} |")
        L += ["", "### Reproducers (one per class, minimised)", ""]
        for i, (_key, fds) in enumerate(items):
            fd = min(fds, key=lambda d: len(d.source))
            L += [f"#### {i + 1}. {fd.kind}: {fd.method} l{fd.norm}, focus `{fd.focus}` "
                  f"({fd.pclass})", "", fd.summary(), "",
                  "```python", fd.source.rstrip(), "```", ""]
        return L


_INPLACE_RE = re.compile(r"(\+=|-=|\*=|/=|\w_\(|inplace=True)")


def _same_finding(a: Finding, b: Finding) -> bool:
    if a.kind != b.kind or a.method != b.method or a.norm != b.norm:
        return False
    return a.kind != "crash" or a.message.split(" at ")[0] == b.message.split(" at ")[0]


def minimise(prog: Program, fd: Finding, **kw: Any) -> Finding:
    """Greedily remove steps of ``prog`` while the same finding (kind, method, norm) stays;
    the finding of the smallest program (its ``source`` is the minimal reproducer)."""
    kw = {**kw, "methods": (fd.method,), "norms": (fd.norm,), "lower_norms": (fd.norm,)}
    cur, best = prog, fd
    changed = True
    while changed and len(cur.steps) > 1:
        changed = False
        for j in reversed(range(len(cur.steps))):
            gone = cur.steps[j]
            if gone.v == "x" and any(_INPLACE_RE.search(ln) for s in cur.steps[j + 1:]
                                     for ln in s.fwd):
                continue  # would mutate the model input in place
            cand = _valid(cur.without(j))
            if cand is None or not cand.steps:
                continue
            try:
                rep = check_program(cand, **kw)
            except Exception:
                continue
            match = [f for f in rep.findings if _same_finding(f, fd)]
            if match:
                cur, best, changed = cand, match[0], True
                break
    return best


def fuzz(  # noqa: PLR0913 - the public entry point: one keyword option per knob
    graphs: int, *, seed: int = 0, methods: Sequence[str] = ("autolip", "seqlip", "exact",
                                                            "lower_bound"),
    lipsdp_every: int = 0, effort: float = 1.0, progress: Callable[[str], None] | None = None,
    time_limit: float | None = None, shrink: bool = True, focus: Sequence[Any] | None = None,
    coverage: bool = True,
) -> FuzzReport:
    """Generate and check ``graphs`` programs (focus ops round-robin over every generator;
    seeds ``seed * 1_000_003 + i`` for attempts ``i = 0, 1, ...``, a failed generation is
    counted and replaced by the next attempt).

    ``lower_bound`` runs in one norm per graph (rotating); ``lipsdp`` every ``lipsdp_every``
    graphs (0: never), on any graph (LipSDP on the segments and residual blocks, AutoLip
    elsewhere). ``focus`` restricts
    the focus ops (generators, their names or rule keys); ``coverage=False`` skips listing the
    registered keys without a generator; ``shrink`` minimises one reproducer per class.
    """
    rep = FuzzReport()
    rep.uncovered = [key_name(k) for k in uncovered_keys()] if coverage else []
    gens = [_find_gen(f) for f in focus] if focus else _GENS
    shrunk: Counter[tuple[str, ...]] = Counter()
    t0 = time.perf_counter()
    # ``graphs`` programs are checked: a seed whose generation fails is replaced by the next
    # one (at most ``graphs`` replacements, so a broken generator cannot loop forever)
    for i in range(2 * graphs):
        if rep.graphs >= graphs:
            break
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            break
        g = gens[(i + seed) % len(gens)]
        s = seed * 1_000_003 + i
        try:
            prog = generate(s, focus=g)
        except GenerationError:
            rep.generation_failures[g.name] += 1
            continue
        rep.graphs += 1
        rep.focus_tried[g.name] += 1
        for _, fam, pc in prog.ops:
            rep.tried[(fam, pc)] += 1
        ms = list(methods)
        if lipsdp_every and i % lipsdp_every == 0:
            ms.append("lipsdp")
        kw: dict[str, Any] = {"methods": tuple(ms), "lower_norms": (NORMS[i % 3],),
                              "effort": effort}
        try:
            cr = check_program(prog, **kw)
        except Exception as exc:
            rep.harness_errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            continue
        for mp in cr.checked:
            rep.checked[mp] += 1
        for m, p, e, why in cr.refusals:
            rep.refusals[(m, p, e)] += 1
            rep.refusal_reasons[f"{m}: {e}: {why[:110]}"] += 1
        for h in cr.harness_errors:
            rep.harness_errors[h[:140]] += 1
        for fd in cr.findings:
            pre = (fd.kind, fd.method, fd.norm, fd.focus,
                   fd.message.split(" at ")[0] if fd.kind == "crash" else "")
            shrunk[pre] += 1
            if shrink and shrunk[pre] <= 1:
                fd = minimise(prog, fd, **kw)
            rep.findings.append(fd)
        if progress is not None and (i + 1) % 25 == 0:
            el = time.perf_counter() - t0
            progress(f"[fuzz] {i + 1}/{graphs} graphs, {el:.0f} s, {(i + 1) / el:.2f} graphs/s, "
                     f"{len(rep.findings)} findings, {sum(rep.refusals.values())} refusals")
    rep.seconds = time.perf_counter() - t0
    return rep
