"""Element-wise activations: derivative ranges ``[a, b]`` and Lipschitz constants.

An element-wise ``f`` has a diagonal Jacobian ``diag(f'(x_i))``, so its constant is
``sup |f'| = max(|a|, |b|)`` in l1, l2 and l-inf alike, where ``a <= f'(t) <= b`` for every
``t``. SeqLip needs the range itself.

=============  =====================================  ===================  ====================
activation     derivative range [a, b]                constant             how
=============  =====================================  ===================  ====================
ReLU           [0, 1]                                 1                    closed form
ReLU6          [0, 1]                                 1                    closed form
Hardtanh       [0, 1]                                 1                    closed form
LeakyReLU(s)   [min(s, 1), max(s, 1)]                 max(|s|, 1)          closed form
PReLU(a)       [min(min a, 1), max(max a, 1)]         max(|a|, 1)          closed form (current
                                                                           weights)
RReLU (eval)   slope s = (lower + upper) / 2          max(|s|, 1)          closed form
ELU(alpha)     [min(0, alpha), max(1, alpha)]         max(1, |alpha|)      ``alpha e^t`` on t<0
CELU(alpha)    [0, 1]                                 1                    ``e^{t/alpha}``, t<0
SELU           [0, scale*alpha] = [0, 1.7581]         1.7581               closed form
GELU (erf)     [Phi(-r) - r phi(r), Phi(r) + r phi(r)]  1.12890            f'' = phi(t)(2 - t^2)
               with r = sqrt(2): [-0.12890, 1.12890]                       vanishes at +-sqrt 2
GELU (tanh)    [-0.12899, 1.12899]                    1.12899              critical points of f'
SiLU           [1 - m, m], m = 1.09984                1.09984              f'(t)+f'(-t) = 1;
                                                                           f''=0 at t=2.39936
Mish           [-0.11253, 1.08850]                    1.08850              critical points of f'
Softplus       [0, 1]                                 1                    f' = sigmoid(beta t)
Sigmoid        [0, 1/4]                               1/4                  s(1-s) <= 1/4
Tanh           [0, 1]                                 1                    1 - tanh^2
Hardsigmoid    [0, 1/6]                               1/6                  closed form
Hardswish      [-1/2, 3/2]                            3/2                  (2t + 3)/6 on [-3,3]
Softsign       [0, 1]                                 1                    1/(1+|t|)^2
LogSigmoid     [0, 1]                                 1                    sigmoid(-t)
Tanhshrink     [0, 1]                                 1                    tanh^2
Softshrink     [0, 1]                                 1                    closed form
abs, sin, cos  [-1, 1]                                1                    closed form
clamp          [0, 1]                                 1                    closed form
=============  =====================================  ===================  ====================

"Critical points of f'": the extrema of a smooth ``f'`` are at its limits at +-infinity or
where ``f'' = 0``. :func:`derivative_range` brackets every sign change of ``f''`` (computed in
float64 by double autograd) on a grid of step 1e-3 over [-40, 40], refines each root with
Brent's method to 1e-14, evaluates ``f'`` there and at the ends, and widens the range by
1e-9 (far above the float64 error of these evaluations). Outside [-40, 40] these ``f'`` are
within 1e-15 of their limits (0 or 1), which lie inside the range. These are reported as
certified: the only assumption is that ``f''`` has no pair of roots closer than the grid step,
which holds for these functions (their ``f''`` have two or three well-separated roots).
Discontinuous activations (Hardshrink, Threshold) have no Lipschitz constant and no rule.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import NodeConstant, RuleContext
from ._util import arg, declare

if TYPE_CHECKING:  # pragma: no cover
    from ..graph.types import Node

__all__ = [
    "GELU_RANGE",
    "derivative_range",
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
    s = (lo + hi) / 2
    return min(s, 1.0), max(s, 1.0)


def _elu(node: Node) -> tuple[float, float]:
    a = float(_p(node, "alpha", 1, 1.0))
    return min(0.0, a), max(1.0, a)


def _gelu(node: Node) -> tuple[float, float]:
    approx = _p(node, "approximate", 1, "none")
    return gelu_tanh_range() if approx == "tanh" else GELU_RANGE


def _fixed(a: float, b: float) -> Callable[[Node], tuple[float, float]]:
    def f(node: Node) -> tuple[float, float]:
        return (a, b)

    return f


def _activation_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    rule = node.meta.get("rule")
    r = node.slope_range
    if r is None and rule is not None and rule.slope_range is not None:
        r = rule.slope_range(node)
    if r is None:  # pragma: no cover - classify always sets it
        raise RuntimeError(f"{node.qualname}: activation without slope range")
    return NodeConstant(
        constants=(slope_constant(r),), certified=True,
        how=f"sup|f'| with f' in [{r[0]:.6g}, {r[1]:.6g}]", slope_range=r,
    )


def _hardtanh_check(node: Node) -> str | None:
    lo = float(_p(node, "min_val", 1, -1.0))
    hi = float(_p(node, "max_val", 2, 1.0))
    return None if lo < hi else "Hardtanh with min_val >= max_val"


def _clamp_check(node: Node) -> str | None:
    for pos, name in ((1, "min"), (2, "max")):
        v = arg(node, pos, name)
        if type(v).__name__ == "TensorArg":
            return "clamp with bounds that depend on the input"
    return None


_TABLE: list[tuple[list[Any], str, Callable[[Node], tuple[float, float]]]] = [
    ([nn.ReLU, F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_"], "relu",
     _fixed(0.0, 1.0)),
    ([nn.ReLU6, F.relu6], "relu6", _fixed(0.0, 1.0)),
    ([nn.LeakyReLU, F.leaky_relu, F.leaky_relu_], "leaky_relu", _leaky),
    ([nn.PReLU, F.prelu, torch.prelu], "prelu", _prelu),
    ([nn.RReLU], "rrelu (eval)", _rrelu),
    ([nn.ELU, F.elu, F.elu_], "elu", _elu),
    ([nn.CELU, F.celu], "celu", _fixed(0.0, 1.0)),
    ([nn.SELU, F.selu, torch.selu], "selu", _fixed(0.0, SELU_SCALE * SELU_ALPHA + _MARGIN)),
    ([nn.GELU, F.gelu], "gelu", _gelu),
    ([nn.SiLU, F.silu], "silu", lambda node: silu_range()),
    ([nn.Mish, F.mish], "mish", lambda node: mish_range()),
    ([nn.Softplus, F.softplus], "softplus", _fixed(0.0, 1.0)),
    ([nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid"], "sigmoid", _fixed(0.0, 0.25)),
    ([nn.Tanh, torch.tanh, F.tanh, "tanh"], "tanh", _fixed(0.0, 1.0)),
    ([nn.Hardsigmoid, F.hardsigmoid], "hardsigmoid", _fixed(0.0, 1.0 / 6.0)),
    ([nn.Hardswish, F.hardswish], "hardswish", _fixed(-0.5, 1.5)),
    ([nn.Softsign, F.softsign], "softsign", _fixed(0.0, 1.0)),
    ([nn.LogSigmoid, F.logsigmoid], "logsigmoid", _fixed(0.0, 1.0)),
    ([nn.Tanhshrink, F.tanhshrink], "tanhshrink", _fixed(0.0, 1.0)),
    ([nn.Softshrink, F.softshrink], "softshrink", _fixed(0.0, 1.0)),
    ([torch.abs, torch.absolute, "abs", torch.sin, "sin", torch.cos, "cos"], "abs/sin/cos",
     _fixed(-1.0, 1.0)),
]

for _keys, _name, _sr in _TABLE:
    declare(_keys, name=_name, kind="activation", constant=_activation_rule, slope_range=_sr)
declare([nn.Hardtanh, F.hardtanh, F.hardtanh_], name="hardtanh", kind="activation",
        constant=_activation_rule, slope_range=_fixed(0.0, 1.0), check=_hardtanh_check)
declare([torch.clamp, torch.clip, "clamp", "clip", "clamp_"], name="clamp",
        kind="activation", constant=_activation_rule, slope_range=_fixed(0.0, 1.0),
        check=_clamp_check)
