"""Element-wise activations: derivative ranges ``[a, b]`` and Lipschitz constants.

An element-wise ``f`` has a diagonal Jacobian ``diag(f'(x_i))``, so its constant is
``sup |f'| = max(|a|, |b|)`` in l1, l2 and l-inf alike, where ``a <= f'(t) <= b`` for every
``t``. SeqLip needs the range itself.

=============  =====================================  ===================  ====================
activation     derivative range [a, b]                constant             how
=============  =====================================  ===================  ====================
ReLU           [0, 1]                                 1                    closed form
ReLU6          [0, 1]                                 1                    closed form
Hardtanh       [0, 1] ([0, 0] if min_val == max_val)  1                    closed form
LeakyReLU(s)   [min(s, 1), max(s, 1)], any real s     max(|s|, 1)          f' in {s, 1}
PReLU(a)       [min(min a, 1), max(max a, 1)]         max(|a|, 1)          closed form (current
                                                                           weights)
RReLU          eval: s = (lower + upper) / 2;         max(|s|, 1)          slopes drawn in
               train: [min(l, u, 1), max(l, u, 1)]                         [lower, upper]
ELU(alpha)     [min(0, alpha), max(1, alpha)]         max(1, |alpha|)      ``alpha e^t`` on t<0
CELU(alpha>0)  [0, 1]                                 1                    ``e^{t/alpha}``, t<0
CELU(alpha<0)  not Lipschitz: refused                 -                    ``e^{t/alpha}`` -> inf
SELU           [0, scale*alpha] = [0, 1.7581]         1.7581               closed form
GELU (erf)     [Phi(-r) - r phi(r), Phi(r) + r phi(r)]  1.12890            f'' = phi(t)(2 - t^2)
               with r = sqrt(2): [-0.12890, 1.12890]                       vanishes at +-sqrt 2
GELU (tanh)    [-0.12899, 1.12899]                    1.12899              critical points of f'
SiLU           [1 - m, m], m = 1.09984                1.09984              f'(t)+f'(-t) = 1;
                                                                           f''=0 at t=2.39936
Mish           [-0.11253, 1.08850]                    1.08850              critical points of f'
Softplus(b,t)  [0, 1], any beta != 0                  1                    f' = sigmoid(beta t)
               (refused: beta = 0, or a visible jump                       or 1 (see below)
               at the threshold)
Sigmoid        [0, 1/4]                               1/4                  s(1-s) <= 1/4
Tanh           [0, 1]                                 1                    1 - tanh^2
Hardsigmoid    [0, 1/6]                               1/6                  closed form
Hardswish      [-1/2, 3/2]                            3/2                  (2t + 3)/6 on [-3,3]
Softsign       [0, 1]                                 1                    1/(1+|t|)^2
LogSigmoid     [0, 1]                                 1                    sigmoid(-t)
Tanhshrink     [0, 1]                                 1                    tanh^2
Softshrink(l)  [0, 1] (torch requires l >= 0)         1                    closed form
Threshold(t,v) [0, 1] if v == t, else refused         1                    x or t: continuous
                                                                           only when v == t
abs, sin, cos  [-1, 1]                                1                    closed form
clamp          [0, 1] (constant if min > max)         1                    closed form
=============  =====================================  ===================  ====================

"Critical points of f'": the extrema of a smooth ``f'`` are at its limits at +-infinity or
where ``f'' = 0``. :func:`derivative_range` brackets every sign change of ``f''`` (computed in
float64 by double autograd) on a grid of step 1e-3 over [-40, 40], refines each root with
Brent's method to 1e-14, evaluates ``f'`` there and at the ends, and widens the range by
1e-9 (far above the float64 error of these evaluations). Outside [-40, 40] these ``f'`` are
within 1e-15 of their limits (0 or 1), which lie inside the range. These are reported as
certified: the only assumption is that ``f''`` has no pair of roots closer than the grid step,
which holds for these functions (their ``f''`` have two or three well-separated roots).
Discontinuous activations (Hardshrink, Threshold with ``value != threshold``) and CELU with
``alpha < 0`` (its slope ``e^{t/alpha}`` on ``t < 0`` is unbounded) have no Lipschitz constant
and are refused with the reason. Parameters torch rejects itself (CELU ``alpha = 0``,
Softshrink ``lambda < 0``, Hardtanh ``min_val > max_val``, RReLU ``lower > upper``) are refused
too. Non-finite parameters are refused.

Softplus switches to the identity where ``beta t > threshold``; at ``beta t = threshold`` the two
branches differ by ``J = log(1 + e^{-threshold}) / |beta|``, a jump, so in exact arithmetic no
Lipschitz constant exists when ``J > 0``. It is accepted (slope range ``[0, 1]``) only when the
jump is below the float32 resolution at the switch point, ``J <= 2^-24 max(1, |threshold /
beta|)`` (the default threshold 20 with ``beta = 1`` gives ``J = 2.1e-9`` at ``t = 20``): there
the float32 evaluation of both branches rounds to the same values, and the bound holds for
pairs in float32. A smaller threshold (a visible jump) or ``beta = 0`` (``log 2 / 0``) is
refused.

An element-wise op whose constant operand broadcasts its input (``clamp(x, min=c)``,
``torch.maximum(x, c)`` with ``c`` larger than ``x``) copies entries: its constant is
multiplied by the copy factor (:func:`lipbound.rules._util.broadcast_constants`) and it is
not treated as an activation (diagonal Jacobian) by SeqLip.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ._registry import NodeConstant, RuleContext
from ._util import arg, broadcast_constants, declare

if TYPE_CHECKING:  # pragma: no cover
    from ..graph.types import Node

__all__ = [
    "GELU_RANGE",
    "derivative_range",
    "softplus_jump",
    "gelu_tanh_range",
    "mish_range",
    "silu_range",
    "slope_constant",
]

_MARGIN = 1e-9
_R2 = math.sqrt(2.0)
_PHI_R2 = math.exp(-1.0) / math.sqrt(2.0 * math.pi)  # phi(sqrt 2)
_CDF_R2 = 0.5 * (1.0 + math.erf(1.0))  # Phi(sqrt 2) = (1 + erf(1)) / 2
#: exact GELU (erf) derivative range: f'(t) = Phi(t) + t phi(t), extrema at t = +-sqrt(2)
GELU_RANGE = (
    (1.0 - _CDF_R2) - _R2 * _PHI_R2 - _MARGIN,
    _CDF_R2 + _R2 * _PHI_R2 + _MARGIN,
)
SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717


def derivative_range(
    f: Callable[[torch.Tensor], torch.Tensor], lo: float = -40.0, hi: float = 40.0
) -> tuple[float, float]:
    """``[min f', max f']`` of a smooth scalar function, by the critical points of ``f'``.

    See the module docstring for the method and its margin.

    >>> a, b = derivative_range(torch.tanh)
    >>> round(a, 6), round(b, 6)
    (-0.0, 1.0)
    """
    from scipy.optimize import brentq

    def d1d2(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(t).sum(), t, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), t)
        return g.detach(), h.detach()

    grid = torch.arange(lo, hi + 1e-3, 1e-3, dtype=torch.float64)
    g, h = d1d2(grid)
    cands = [float(g[0]), float(g[-1])]
    sign = torch.sign(h)
    idx = torch.nonzero(sign[:-1] * sign[1:] < 0).flatten().tolist()
    # exact zeros of f'' on the grid that separate opposite signs (not underflowed tails)
    zero = (sign[1:-1] == 0) & (sign[:-2] * sign[2:] < 0)
    for i in torch.nonzero(zero).flatten().tolist():
        cands.append(float(g[i + 1]))

    def h_at(x: float) -> float:
        return float(d1d2(torch.tensor([x], dtype=torch.float64))[1][0])

    for i in idx:
        a, b = float(grid[i]), float(grid[i + 1])
        r = brentq(h_at, a, b, xtol=1e-14)
        cands.append(float(d1d2(torch.tensor([r], dtype=torch.float64))[0][0]))
    return min(cands) - _MARGIN, max(cands) + _MARGIN


@functools.cache
def gelu_tanh_range() -> tuple[float, float]:
    """Derivative range of ``GELU(approximate="tanh")`` (about [-0.12899, 1.12899])."""
    return derivative_range(lambda t: F.gelu(t, approximate="tanh"))


@functools.cache
def silu_range() -> tuple[float, float]:
    """Derivative range of SiLU ``t sigmoid(t)`` (about [-0.09984, 1.09984])."""
    return derivative_range(F.silu)


@functools.cache
def mish_range() -> tuple[float, float]:
    """Derivative range of Mish ``t tanh(softplus(t))`` (about [-0.11253, 1.08850])."""
    return derivative_range(lambda t: t * torch.tanh(F.softplus(t)))


def slope_constant(r: tuple[float, float]) -> float:
    """Lipschitz constant ``max(|a|, |b|)`` of an element-wise map with ``f'`` in ``[a, b]``."""
    return max(abs(r[0]), abs(r[1]))


def _p(node: Node, attr: str, pos: int, default: Any) -> Any:
    if node.module is not None:
        return getattr(node.module, attr, default)
    return arg(node, pos, attr, default)


def _leaky(node: Node) -> tuple[float, float]:
    s = float(_p(node, "negative_slope", 1, 0.01))
    return min(s, 1.0), max(s, 1.0)


def _prelu(node: Node) -> tuple[float, float]:
    m: Any = node.module
    w = m.weight if m is not None else arg(node, 1, "weight")
    if not isinstance(w, torch.Tensor):
        w = torch.tensor(float(w))
    lo, hi = float(w.detach().min()), float(w.detach().max())
    return min(lo, 1.0), max(hi, 1.0)


def _rrelu(node: Node) -> tuple[float, float]:
    lo = float(_p(node, "lower", 1, 1.0 / 8))
    hi = float(_p(node, "upper", 2, 1.0 / 3))
    m = node.module
    if m is not None and m.training:  # slopes drawn uniformly in [lower, upper] at each call
        return min(lo, hi, 1.0), max(lo, hi, 1.0)
    s = (lo + hi) / 2
    return min(s, 1.0), max(s, 1.0)


def _elu(node: Node) -> tuple[float, float]:
    a = float(_p(node, "alpha", 1, 1.0))
    return min(0.0, a), max(1.0, a)


def _hardtanh(node: Node) -> tuple[float, float]:
    lo = float(_p(node, "min_val", 1, -1.0))
    hi = float(_p(node, "max_val", 2, 1.0))
    return (0.0, 0.0) if lo == hi else (0.0, 1.0)  # min == max: a constant map


def _gelu(node: Node) -> tuple[float, float]:
    approx = _p(node, "approximate", 1, "none")
    return gelu_tanh_range() if approx == "tanh" else GELU_RANGE


def _fixed(a: float, b: float) -> Callable[[Node], tuple[float, float]]:
    def f(node: Node) -> tuple[float, float]:
        return (a, b)

    return f


def _activation_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    rule = node.rule
    r = node.slope_range
    if r is None and rule is not None and rule.slope_range is not None:
        r = rule.slope_range(node)
    if r is None:  # pragma: no cover - classify always sets it
        raise InvalidArgumentError(f"{node.qualname}: activation rule without a slope range")
    diagonal = node.kind == "activation"
    return NodeConstant(
        constants=broadcast_constants(node, (slope_constant(r),), ctx.norm), certified=True,
        how=f"sup|f'| with f' in [{r[0]:.6g}, {r[1]:.6g}]"
        + ("" if diagonal else ", times the broadcast copy factor"),
        slope_range=r if diagonal else None,
    )


def _finite_params(node: Node, names: list[tuple[str, int, Any]]) -> str | None:
    for name, pos, default in names:
        v = _p(node, name, pos, default)
        if isinstance(v, torch.Tensor):
            if not bool(torch.isfinite(v.detach()).all()):
                return f"its {name} has NaN/inf entries; fix the weights"
        elif isinstance(v, (int, float)) and not math.isfinite(float(v)):
            return f"its {name} is {v}; use a finite value"
    return None


def _hardtanh_check(node: Node) -> str | None:
    lo = float(_p(node, "min_val", 1, -1.0))
    hi = float(_p(node, "max_val", 2, 1.0))
    bad = _finite_params(node, [("min_val", 1, -1.0), ("max_val", 2, 1.0)])
    if bad:
        return bad
    return None if lo <= hi else f"Hardtanh with min_val={lo} > max_val={hi} (torch refuses it)"


def _celu_check(node: Node) -> str | None:
    a = float(_p(node, "alpha", 1, 1.0))
    if not math.isfinite(a):
        return f"CELU with alpha={a}; use a finite alpha > 0"
    if a < 0:
        return (
            f"CELU with alpha={a} < 0 is not Lipschitz: on t < 0 its slope e^(t/alpha) grows "
            "without bound. Use alpha > 0"
        )
    if a == 0:
        return "CELU with alpha=0 divides by zero (torch refuses it); use alpha > 0"
    return None


def softplus_jump(beta: float, threshold: float) -> float:
    """``log(1 + e^{-threshold}) / |beta|``: Softplus's jump where it switches to the identity."""
    t = float(threshold)
    return (max(-t, 0.0) + math.log1p(math.exp(-abs(t)))) / abs(beta)


def _softplus_check(node: Node) -> str | None:
    beta = float(_p(node, "beta", 1, 1.0))
    thr = float(_p(node, "threshold", 2, 20.0))
    if not (math.isfinite(beta) and math.isfinite(thr)):
        return f"Softplus with beta={beta}, threshold={thr}; use finite values"
    if beta == 0:
        return "Softplus with beta=0 computes log(2)/0 (inf): no Lipschitz constant; use beta != 0"
    jump = softplus_jump(beta, thr)
    if jump > 2.0**-24 * max(1.0, abs(thr / beta)):
        return (
            f"Softplus(beta={beta}, threshold={thr}) jumps by {jump:.3g} where beta*x = "
            "threshold (it switches to x there): discontinuous, no Lipschitz constant. Use a "
            "larger threshold (the default 20 has a jump below float32 resolution)"
        )
    return None


def _softshrink_check(node: Node) -> str | None:
    lam = float(_p(node, "lambd", 1, 0.5))
    if not (math.isfinite(lam) and lam >= 0):
        return f"Softshrink with lambd={lam}: torch needs a finite lambd >= 0"
    return None


def _threshold_check(node: Node) -> str | None:
    t = _p(node, "threshold", 1, None)
    v = _p(node, "value", 2, None)
    if not (isinstance(t, (int, float)) and isinstance(v, (int, float))):
        return "Threshold whose threshold/value are not plain numbers"
    if float(t) != float(v):
        return (
            f"Threshold(threshold={t}, value={v}) jumps by |threshold - value| = "
            f"{abs(float(t) - float(v)):g} at x = threshold: discontinuous, no Lipschitz "
            "constant (only value == threshold is continuous)"
        )
    return None


def _rrelu_check(node: Node) -> str | None:
    lo = float(_p(node, "lower", 1, 1.0 / 8))
    hi = float(_p(node, "upper", 2, 1.0 / 3))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"RReLU with lower={lo}, upper={hi}; use finite bounds"
    if lo > hi:
        return f"RReLU with lower={lo} > upper={hi} (torch refuses it)"
    return None


def _param_check(*names: tuple[str, int, Any]) -> Callable[[Node], str | None]:
    def check(node: Node) -> str | None:
        return _finite_params(node, list(names))

    return check


def _clamp_check(node: Node) -> str | None:
    for pos, name in ((1, "min"), (2, "max")):
        v = arg(node, pos, name)
        if type(v).__name__ == "TensorArg":
            return "clamp with bounds that depend on the input"
    return None


_TABLE: list[tuple[list[Any], str, Callable[[Node], tuple[float, float]], Any]] = [
    ([nn.ReLU, F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_"], "relu",
     _fixed(0.0, 1.0), None),
    ([nn.ReLU6, F.relu6], "relu6", _fixed(0.0, 1.0), None),
    ([nn.LeakyReLU, F.leaky_relu, F.leaky_relu_], "leaky_relu", _leaky,
     _param_check(("negative_slope", 1, 0.01))),
    ([nn.PReLU, F.prelu, torch.prelu], "prelu", _prelu, _param_check(("weight", 1, 0.25))),
    ([nn.RReLU], "rrelu", _rrelu, _rrelu_check),
    ([nn.ELU, F.elu, F.elu_], "elu", _elu, _param_check(("alpha", 1, 1.0))),
    ([nn.CELU, F.celu], "celu", _fixed(0.0, 1.0), _celu_check),
    ([nn.SELU, F.selu, torch.selu], "selu", _fixed(0.0, SELU_SCALE * SELU_ALPHA + _MARGIN),
     None),
    ([nn.GELU, F.gelu], "gelu", _gelu, None),
    ([nn.SiLU, F.silu], "silu", lambda node: silu_range(), None),
    ([nn.Mish, F.mish], "mish", lambda node: mish_range(), None),
    ([nn.Softplus, F.softplus], "softplus", _fixed(0.0, 1.0), _softplus_check),
    ([nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid"], "sigmoid", _fixed(0.0, 0.25), None),
    ([nn.Tanh, torch.tanh, F.tanh, "tanh"], "tanh", _fixed(0.0, 1.0), None),
    ([nn.Hardsigmoid, F.hardsigmoid], "hardsigmoid", _fixed(0.0, 1.0 / 6.0), None),
    ([nn.Hardswish, F.hardswish], "hardswish", _fixed(-0.5, 1.5), None),
    ([nn.Softsign, F.softsign], "softsign", _fixed(0.0, 1.0), None),
    ([nn.LogSigmoid, F.logsigmoid], "logsigmoid", _fixed(0.0, 1.0), None),
    ([nn.Tanhshrink, F.tanhshrink], "tanhshrink", _fixed(0.0, 1.0), None),
    ([nn.Softshrink, F.softshrink], "softshrink", _fixed(0.0, 1.0), _softshrink_check),
    ([nn.Threshold, F.threshold], "threshold (value == threshold)", _fixed(0.0, 1.0),
     _threshold_check),
    ([torch.abs, torch.absolute, "abs", torch.sin, "sin", torch.cos, "cos"], "abs/sin/cos",
     _fixed(-1.0, 1.0), None),
]

for _keys, _name, _sr, _chk in _TABLE:
    declare(_keys, name=_name, kind="activation", constant=_activation_rule, slope_range=_sr,
            check=_chk)
declare([nn.Hardtanh, F.hardtanh, F.hardtanh_], name="hardtanh", kind="activation",
        constant=_activation_rule, slope_range=_hardtanh, check=_hardtanh_check)
declare([torch.clamp, torch.clip, "clamp", "clip", "clamp_"], name="clamp",
        kind="activation", constant=_activation_rule, slope_range=_fixed(0.0, 1.0),
        check=_clamp_check)
