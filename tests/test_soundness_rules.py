"""Soundness of the per-op rules: every certified constant must bound the realised truth.

Each test compares ``lipbound.autolip(...).value`` (and ``lipbound.seqlip`` where it applies)
with a realised lower bound of the true constant: the float64 (or, for rounding margins, the
float32) Jacobian norm at random and adversarial points, in every norm the rule claims.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipbound
from lipbound.errors import (
    InvalidArgumentError,
    LipboundError,
    NonFiniteError,
    UnsupportedModelError,
)
from lipbound.rules import NodeConstant, register_rule

NORMS = ("1", "2", "inf")


class Lam(nn.Module):
    """A module applying ``fn(self, x)`` (constants live in buffers)."""

    def __init__(self, fn: Callable[..., torch.Tensor], **buffers: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for k, v in buffers.items():
            self.register_buffer(k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def _opnorm(J: torch.Tensor, norm: str) -> float:
    if norm == "2":
        return float(torch.linalg.matrix_norm(J, 2))
    if norm == "1":
        return float(J.abs().sum(0).max())
    return float(J.abs().sum(1).max())


def _jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    J = torch.autograd.functional.jacobian(lambda z: model(z).reshape(-1), x)
    return J.reshape(-1, x.numel())


def realised(
    model: nn.Module, shape: tuple[int, ...], *, points: int = 6, scale: float = 3.0,
    dtype: torch.dtype = torch.float64, extra: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Largest Jacobian norm (per norm) over random points: a lower bound of the constant."""
    gen = torch.Generator().manual_seed(0)
    m = model.to(dtype)
    xs = [scale * torch.randn(1, *shape, generator=gen, dtype=dtype) for _ in range(points)]
    xs += [e.to(dtype) for e in extra or []]
    best = dict.fromkeys(NORMS, 0.0)
    for x in xs:
        J = _jacobian(m, x)
        for n in NORMS:
            best[n] = max(best[n], _opnorm(J.double(), n))
    return best


def check_sound(
    model: nn.Module, shape: tuple[int, ...], truth: dict[str, float] | None = None, *,
    seq: bool = False, **kw: object,
) -> dict[str, float]:
    """Assert ``autolip`` (and ``seqlip`` in l2) >= the realised truth in every norm."""
    truth = truth or realised(model, shape, **kw)  # type: ignore[arg-type]
    got = {}
    for n in NORMS:
        v = lipbound.autolip(model.float(), shape, norm=n).value
        got[n] = v
        assert v >= truth[n], (n, v, truth[n])
        assert v >= 0.0
    if seq:
        s = lipbound.seqlip(model.float(), shape)
        assert s.upper >= truth["2"], (s.upper, truth["2"])
    return got


# ---- 1. broadcasting ------------------------------------------------------------------------
def test_regression_broadcast_add_constant_copies_input() -> None:
    m = Lam(lambda s, x: x + s.c, c=torch.zeros(5))
    truth = realised(m, (1,))
    assert truth == pytest.approx({"1": 5.0, "2": math.sqrt(5.0), "inf": 1.0})
    got = check_sound(m, (1,), truth, seq=True)
    assert got["2"] == pytest.approx(math.sqrt(5.0), rel=1e-5)  # measured as the copy it is


@pytest.mark.parametrize("op", ["add", "sub", "rsub", "maximum", "minimum", "max2", "radd"])
def test_regression_broadcast_two_branches(op: str) -> None:
    def f(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        a = s.lin(x)  # (4,)
        b = x[..., :1] * 2.0  # (1,) broadcast to (4,)
        if op == "add":
            return a + b
        if op == "radd":
            return b + a
        if op == "sub":
            return torch.sub(a, b, alpha=3.0)
        if op == "rsub":
            return torch.rsub(b, a, alpha=0.5)
        if op == "maximum":
            return torch.maximum(b, a)
        if op == "minimum":
            return torch.minimum(a, b)
        return torch.max(b, a)

    m = Lam(f)
    m.lin = nn.Linear(4, 4)
    with torch.no_grad():
        m.lin.weight.mul_(0.1)
    check_sound(m, (4,), extra=[torch.tensor([[5.0, 0.0, 0.0, 0.0]])])


@pytest.mark.parametrize("op", ["mul", "rmul", "div", "maximum", "clamp", "sub_const"])
def test_regression_broadcast_single_input_with_constant(op: str) -> None:
    def f(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        c = s.c  # (3, 4) against x of shape (1, 4): each entry copied 3 times
        if op == "mul":
            return x * c
        if op == "rmul":
            return c * x
        if op == "div":
            return x / c
        if op == "maximum":
            return torch.maximum(x, c)
        if op == "clamp":
            return torch.clamp(x, min=c)
        return c - x

    c = torch.tensor([[0.5, -2.0, 1.0, 1.5], [1.0, 3.0, -0.7, 0.2], [2.0, 0.1, 0.4, -1.0]])
    m = Lam(f, c=c)
    check_sound(m, (1, 4), extra=[torch.full((1, 1, 4), 9.0)])


def test_regression_broadcast_activation_after_linear_is_not_diagonal() -> None:
    m = Lam(lambda s, x: torch.relu(torch.maximum(s.lin(x).unsqueeze(-2), s.c)),
            c=torch.zeros(6, 2))
    m.lin = nn.Linear(3, 2)
    check_sound(m, (3,), seq=True, extra=[torch.full((1, 3), 4.0)])


# ---- 2. alpha of add / sub / rsub ------------------------------------------------------------
ALPHA_CASES = {
    "rsub_scalar": lambda s, x: torch.rsub(x, 5.0, alpha=3.0),
    "rsub_tensor_const": lambda s, x: torch.rsub(x, s.c, alpha=3.0),
    "rsub_br_a": lambda s, x: torch.rsub(2 * x, x, alpha=10.0),
    "rsub_br_b": lambda s, x: torch.rsub(x, 2 * x, alpha=10.0),
    "sub_br_a": lambda s, x: torch.sub(2 * x, x, alpha=10.0),
    "sub_br_b": lambda s, x: torch.sub(x, 2 * x, alpha=-10.0),
    "add_br_a": lambda s, x: torch.add(2 * x, x, alpha=10.0),
    "add_br_b": lambda s, x: torch.add(x, 2 * x, alpha=-10.0),
    "add_same": lambda s, x: torch.add(x, x, alpha=3.0),
    "sub_same": lambda s, x: torch.sub(x, x, alpha=-4.0),
    "rsub_same": lambda s, x: torch.rsub(x, x, alpha=-4.0),
    "add_const_first": lambda s, x: torch.add(s.c, x, alpha=-7.0),
    "sub_const_first": lambda s, x: torch.sub(s.c, x, alpha=6.0),
    "method_sub": lambda s, x: x.sub(s.c, alpha=6.0) + x.add(x, alpha=2.0),
    "kw_only": lambda s, x: torch.sub(input=s.c, other=x, alpha=-5.0),
}


@pytest.mark.parametrize("case", list(ALPHA_CASES))
def test_regression_alpha_applies_to_the_right_operand(case: str) -> None:
    m = Lam(ALPHA_CASES[case], c=torch.ones(3))
    got = check_sound(m, (3,))
    truth = realised(m, (3,))
    if case in ("rsub_scalar", "rsub_tensor_const", "add_const_first", "sub_const_first"):
        assert got["2"] == pytest.approx(truth["2"], rel=1e-5)  # exact for one branch


# ---- 3. average pooling with divisor_override -----------------------------------------------
@pytest.mark.parametrize("div", [-1, -3, 2])
def test_regression_avgpool_divisor_override_uses_abs_entries(div: int) -> None:
    pool = nn.AvgPool2d(2, stride=1, divisor_override=div)
    check_sound(pool, (1, 4, 4))
    check_sound(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), pool), (1, 4, 4))
    check_sound(Lam(lambda s, x: F.avg_pool2d(x, 3, 1, 1, divisor_override=div)), (1, 4, 4))


def test_regression_negative_or_nan_rule_constant_is_an_error() -> None:
    class NegOp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -x

    class NanOp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -x

    register_rule(NegOp, lambda n, c: NodeConstant(constants=(-2.0,), certified=True, how="x"))
    register_rule(NanOp, lambda n, c: NodeConstant(constants=(math.nan,), certified=True,
                                                    how="x"))
    with pytest.raises(InvalidArgumentError, match="-2"):
        lipbound.autolip(NegOp(), (3,))
    with pytest.raises(NonFiniteError, match="nan"):
        lipbound.autolip(NanOp(), (3,))


# ---- 4. parametrised activations ------------------------------------------------------------
SUPPORTED_ACTS: list[nn.Module] = [
    nn.CELU(0.3), nn.CELU(2.0), nn.ELU(-2.0), nn.ELU(0.0), nn.ELU(3.0),
    nn.LeakyReLU(-2.0), nn.LeakyReLU(3.0), nn.LeakyReLU(0.0),
    nn.RReLU(0.1, 0.3).eval(), nn.RReLU(0.5, 4.0).eval(), nn.RReLU(-3.0, 0.5).eval(),
    nn.Softplus(beta=-1.0), nn.Softplus(beta=0.5), nn.Softplus(beta=4.0, threshold=30.0),
    nn.Threshold(0.5, 0.5), nn.Softshrink(0.0), nn.Softshrink(2.0), nn.Hardtanh(-3.0, -1.0),
    nn.SELU(), nn.Hardswish(), nn.Mish(), nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"),
    nn.Softsign(), nn.Tanhshrink(), nn.LogSigmoid(), nn.Hardsigmoid(), nn.ReLU6(),
]
_prelu = nn.PReLU(3)
with torch.no_grad():
    _prelu.weight.copy_(torch.tensor([-3.0, 0.5, 2.5]))
SUPPORTED_ACTS.append(_prelu)


def _act_truth(act: nn.Module) -> float:
    t = torch.linspace(-50, 50, 200001, dtype=torch.float64).reshape(-1, 1).expand(-1, 3)
    t = t.clone().requires_grad_(True)
    y = act.double()(t)
    (g,) = torch.autograd.grad(y.sum(), t)
    return float(g.abs().max())


@pytest.mark.parametrize("act", SUPPORTED_ACTS, ids=repr)
def test_regression_parametrised_activation_ranges(act: nn.Module) -> None:
    truth = _act_truth(act)
    for n in NORMS:
        v = lipbound.autolip(act.float(), (3,), norm=n).value
        assert truth <= v <= truth * (1 + 1e-3) + 1e-9, (n, v, truth)  # grid step 5e-4


REFUSED_ACTS: list[nn.Module] = [
    nn.CELU(-0.5), nn.Softplus(beta=1.0, threshold=-5.0), nn.Softplus(beta=2.0, threshold=1.0),
    nn.Softplus(beta=0.0), nn.Threshold(1.0, 2.0), nn.Hardshrink(0.5),
]


@pytest.mark.parametrize("act", REFUSED_ACTS, ids=repr)
def test_regression_activation_without_global_constant_is_refused(act: nn.Module) -> None:
    for n in NORMS:
        with pytest.raises(UnsupportedModelError):
            lipbound.autolip(act, (3,), norm=n)


def test_regression_celu_negative_alpha_is_not_lipschitz() -> None:
    act = nn.CELU(-0.5)
    assert _act_truth(act) > 1e10  # the slope e^{x/alpha} grows without bound as x -> -inf
    with pytest.raises(UnsupportedModelError, match="alpha"):
        lipbound.autolip(act, (3,))
    fn = Lam(lambda s, x: F.celu(x, alpha=-0.5))
    with pytest.raises(UnsupportedModelError, match="alpha"):
        lipbound.autolip(fn, (3,))


# ---- 5. max pooling -------------------------------------------------------------------------
def _pool_truth(pool: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> dict:
    """Jacobian norms at random points and at spikes on every input (attains max count)."""
    n = math.prod(shape)
    gen = torch.Generator().manual_seed(0)
    spikes = 0.01 * torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    spikes = spikes + 10.0 * torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    pts = torch.cat([torch.randn(4, *shape, generator=gen, dtype=torch.float64), spikes])
    Js = torch.func.vmap(torch.func.jacrev(lambda z: pool(z[None]).reshape(-1)))(pts)
    Js = Js.reshape(len(pts), -1, n)
    return {
        "2": float(torch.linalg.matrix_norm(Js, 2).max()),
        "1": float(Js.abs().sum(1).max()),
        "inf": float(Js.abs().sum(2).max()),
    }


def _maxpool_configs(dims: int) -> list[tuple]:
    out = []
    sizes = [1, 2, 3, 5] if dims == 1 else [(1, 3), (2, 2), (3, 5)]
    for L, k, s, p, d, c in itertools.product(sizes, [1, 2, 3], [1, 2, 3], [0, 1], [1, 2],
                                              [False, True]):
        out.append((L, k, s, p, d, c))
    return out


@pytest.mark.parametrize("dims,ceil", [(1, False), (1, True), (2, False), (2, True)])
def test_regression_maxpool_grid_against_jacobians(dims: int, ceil: bool) -> None:
    tried = refused = 0
    for L, k, s, p, d, c in _maxpool_configs(dims):
        if c != ceil:
            continue
        shape = (1, L) if dims == 1 else (1, *L)
        mod: nn.Module = (nn.MaxPool1d if dims == 1 else nn.MaxPool2d)(
            k, stride=s, padding=p, dilation=d, ceil_mode=c
        )
        try:
            y = mod(torch.randn(1, *shape, dtype=torch.float64))
        except RuntimeError:
            continue  # torch refuses this configuration
        if not torch.isfinite(y).all():  # a window over padding only: output -inf
            refused += 1
            with pytest.raises(UnsupportedModelError, match="padding"):
                lipbound.autolip(mod, shape)
            continue
        tried += 1
        truth = _pool_truth(mod, shape)
        for n in NORMS:
            v = lipbound.autolip(mod, shape, norm=n).value
            assert truth[n] <= v <= truth[n] * (1 + 1e-5), ((L, k, s, p, d, c), n, v, truth)
    assert tried > 10
    if ceil:
        assert refused > 0


def test_regression_maxpool_ceil_mode_kernel_longer_than_input() -> None:
    mod = nn.MaxPool1d(3, stride=2, ceil_mode=True)  # one window over [x0, x1, pad]
    truth = _pool_truth(mod, (1, 2))
    assert truth["2"] == 1.0
    check_sound(mod, (1, 2), truth)
    fn = Lam(lambda s, x: F.max_pool2d(x, 3, 2, 0, 1, True))
    check_sound(fn, (1, 2, 2))


# ---- 6. rounding margin -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "act", [nn.Hardsigmoid(), nn.LeakyReLU(1.7), nn.SELU(), nn.ELU(1.3), nn.Hardswish()],
    ids=repr,
)
def test_regression_elementwise_constant_covers_float32_execution(act: nn.Module) -> None:
    t = torch.linspace(-6, 6, 120001, dtype=torch.float32).reshape(-1, 1)
    t = torch.cat([t, -torch.logspace(-30, 0, 3001).reshape(-1, 1)]).requires_grad_(True)
    (g,) = torch.autograd.grad(act.float()(t).sum(), t)
    truth32 = float(g.double().abs().max())
    for n in NORMS:
        assert lipbound.autolip(act.float(), (1,), norm=n).value >= truth32
    net = nn.Sequential(nn.Linear(1, 1, bias=False), act)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    assert lipbound.seqlip(net, (1,)).upper >= truth32


# ---- 7. BatchNorm with bad statistics --------------------------------------------------------
def _bn(var: list[float], eps: float) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(len(var), eps=eps).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor(var))
    return bn


@pytest.mark.parametrize("var,eps", [([-1.0, 1.0], 1e-5), ([0.0, 1.0], 0.0)])
@pytest.mark.parametrize("where", ["alone", "folded", "after_relu"])
def test_regression_batchnorm_bad_running_var_is_a_clear_error(
    var: list[float], eps: float, where: str
) -> None:
    bn = _bn(var, eps)
    model = {"alone": bn, "folded": nn.Sequential(nn.Linear(2, 2), bn),
             "after_relu": nn.Sequential(nn.ReLU(), bn)}[where]
    with torch.no_grad():
        y = model(torch.randn(3, 2))
    assert not torch.isfinite(y).all()  # torch itself computes NaN / inf here
    for n in NORMS:
        with pytest.raises((InvalidArgumentError, NonFiniteError), match="running_var") as e:
            lipbound.autolip(model, (2,), norm=n)
        assert "eps" in str(e.value)


# ---- zero and tiny layers --------------------------------------------------------------------
def test_regression_zero_linear_is_zero_and_tiny_linear_is_not() -> None:
    zero = nn.Linear(3, 2)
    with torch.no_grad():
        zero.weight.zero_()
    for n in NORMS:
        v = lipbound.autolip(zero, (3,), norm=n).value
        assert v == pytest.approx(0.0, abs=1e-280)
    tiny = nn.Linear(3, 2).double()
    with torch.no_grad():
        tiny.weight.mul_(1e-150)
    truth = realised(tiny, (3,))
    assert truth["2"] > 1e-152
    for n in NORMS:
        v = lipbound.autolip(tiny, (3,), norm=n).value
        assert truth[n] <= v <= truth[n] * (1 + 1e-5), (n, v, truth[n])


def test_errors_are_lipbound_errors() -> None:
    assert issubclass(NonFiniteError, LipboundError)
