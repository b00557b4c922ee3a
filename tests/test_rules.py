"""Per-operator rules: activation ranges, max-pool counts, softmax, l1/l-inf norms, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lipbound.errors import InvalidArgumentError, UnsupportedModelError
from lipbound.graph import capture, simplify
from lipbound.methods.autolip import autolip, node_constants
from lipbound.rules import _registry, get_rule, register_rule
from lipbound.rules.activation import GELU_RANGE
from lipbound.rules.pooling import adaptive_window_count, window_count
from lipbound.rules.structural import log_softmax_constant


def _nodes(model: nn.Module, shape: tuple[int, ...]):
    g = simplify(capture(model, shape))
    return g, [n for n in g if n.kind not in ("input", "output")]


ACTIVATIONS = [
    nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.2), nn.LeakyReLU(1.7), nn.LeakyReLU(-0.3),
    nn.ELU(), nn.ELU(2.5), nn.CELU(0.7), nn.SELU(), nn.GELU(), nn.GELU(approximate="tanh"),
    nn.SiLU(), nn.Mish(), nn.Softplus(beta=3.0), nn.Sigmoid(), nn.Tanh(), nn.Hardtanh(-2, 3),
    nn.Hardsigmoid(), nn.Hardswish(), nn.Softsign(), nn.LogSigmoid(), nn.Tanhshrink(),
    nn.Softshrink(), nn.PReLU(3, init=0.4),
]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: repr(m))
def test_activation_slope_range_contains_and_is_tight(act: nn.Module) -> None:
    shape = (3,)
    _, (node,) = _nodes(act, shape)
    assert node.kind == "activation"
    a, b = node.slope_range
    t = torch.linspace(-60, 60, 240001, dtype=torch.float64).reshape(-1, 1).expand(-1, 3)
    t = t.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(act.double()(t).sum(), t)
    lo, hi = float(g.min()), float(g.max())
    assert a <= lo + 1e-7 and hi <= b + 1e-7  # (autograd rounding, e.g. CELU gives 1 + 2e-8)
    assert abs(lo - a) < 2e-3 and abs(hi - b) < 2e-3  # tight (sup may be approached at +-inf)
    c = node_constants(simplify(capture(act.float(), shape)))
    assert next(iter(c.values())).constants[0] == pytest.approx(max(abs(a), abs(b)))


def test_gelu_closed_form() -> None:
    r = math.sqrt(2)
    phi = math.exp(-1) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(1))
    assert GELU_RANGE[1] == pytest.approx(cdf + r * phi, abs=2e-9)
    assert GELU_RANGE[1] == pytest.approx(1.12890, abs=1e-5)
    assert GELU_RANGE[0] == pytest.approx(-0.12890, abs=1e-5)


def test_functional_activations_read_their_arguments() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.elu(F.leaky_relu(x, 0.3), alpha=2.0) + F.softplus(x, beta=2.0)

    _, nodes = _nodes(M(), (2,))
    ranges = {n.op: n.slope_range for n in nodes if n.kind == "activation"}
    # ranges are widened outwards by the registry's rounding margin (relative 2^-22)
    assert ranges["leaky_relu"] == pytest.approx((0.3, 1.0), rel=1e-6)
    assert ranges["leaky_relu"][0] <= 0.3 and ranges["leaky_relu"][1] >= 1.0
    assert ranges["elu"] == pytest.approx((0.0, 2.0), rel=1e-6)
    assert ranges["elu"][0] <= 0.0 and ranges["elu"][1] >= 2.0
    assert ranges["softplus"] == pytest.approx((0.0, 1.0), rel=1e-6)
    assert ranges["softplus"][0] <= 0.0 and ranges["softplus"][1] >= 1.0


# ---- max pooling --------------------------------------------------------------------------
def _brute_count(L: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """Max windows per input, by pooling an index map with torch itself."""
    x = torch.arange(L, dtype=torch.float64).reshape(1, 1, L) + 1
    counts = torch.zeros(L)
    for j in range(L):
        e = torch.zeros(1, 1, L, dtype=torch.float64)
        e[..., j] = 1e6
        _y, idx = F.max_pool1d(x + e, k, s, p, d, ceil, return_indices=True)
        counts[j] = int((idx == j).sum())
    return int(counts.max())


@given(
    L=st.integers(1, 12), k=st.integers(1, 4), s=st.integers(1, 4), d=st.integers(1, 2),
    p=st.integers(0, 2), ceil=st.booleans(),
)
def test_window_count_matches_torch(L: int, k: int, s: int, d: int, p: int, ceil: bool) -> None:
    if p > k // 2 or d * (k - 1) + 1 > L + 2 * p:
        return  # torch rejects these configurations
    assert window_count(L, k, s, p, d, ceil) == _brute_count(L, k, s, p, d, ceil)


def test_window_count_closed_form_and_adaptive() -> None:
    for k in range(1, 6):
        for s in range(1, 6):
            assert window_count(40, k, s) == math.ceil(k / s)
    for L, o in [(7, 6), (6, 6), (5, 3), (13, 4), (4, 7)]:
        x = torch.arange(L, dtype=torch.float64).reshape(1, 1, L)
        best = 0
        for j in range(L):
            e = x.clone()
            e[..., j] = 1e6
            _, idx = F.adaptive_max_pool1d(e, o, return_indices=True)
            best = max(best, int((idx == j).sum()))
        assert adaptive_window_count(L, o) == best


@pytest.mark.parametrize(
    ("pool", "shape"),
    [
        (nn.MaxPool2d(3, 2), (2, 9, 9)),
        (nn.MaxPool2d(2, 2), (1, 8, 8)),
        (nn.MaxPool2d(3, 1, padding=1), (1, 6, 6)),
        (nn.MaxPool2d((3, 2), (1, 2), dilation=(2, 1), ceil_mode=True), (1, 9, 7)),
        (nn.MaxPool1d(4, 3, ceil_mode=True), (2, 11)),
        (nn.MaxPool3d(3, 2), (1, 5, 5, 5)),
        (nn.AdaptiveMaxPool2d((4, 3)), (1, 7, 5)),
    ],
    ids=str,
)
def test_maxpool_constant_is_attained(pool: nn.Module, shape: tuple[int, ...]) -> None:
    """The rule's constant equals ||J|| at an input built to hit the bound (every norm)."""
    g, (_node,) = _nodes(pool, shape)
    consts = {n: next(iter(node_constants(g, norm=n).values())).constants[0]
              for n in ("1", "2", "inf")}
    f = pool.double()
    best = {"1": 0.0, "2": 0.0, "inf": 0.0}
    n_in = math.prod(shape)
    base = torch.randn(1, *shape, dtype=torch.float64) * 0.01
    for j in range(n_in):  # a spike at j: j is the argmax of all its windows
        x = base.clone().flatten()
        x[j] = 10.0
        J = torch.autograd.functional.jacobian(f, x.reshape(1, *shape)).reshape(-1, n_in)
        best["2"] = max(best["2"], float(torch.linalg.matrix_norm(J, 2)))
        best["1"] = max(best["1"], float(J.abs().sum(0).max()))
        best["inf"] = max(best["inf"], float(J.abs().sum(1).max()))
    for n in ("1", "2", "inf"):
        assert best[n] <= consts[n] <= best[n] * (1 + 1e-6), n  # attained, + rounding margin
    if isinstance(pool, nn.MaxPool2d) and pool.kernel_size == 3 and pool.stride == 2:
        assert consts["2"] == pytest.approx(2.0)  # sqrt(2 * 2) for k3 s2 in 2-D


def test_functional_maxpool_and_indices() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(x, 3, stride=2)

    g, (node,) = _nodes(M(), (1, 9, 9))
    (c,) = node_constants(g)[node.name].constants
    assert 2.0 <= c <= 2.0 * (1 + 1e-6)

    class Idx(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, i = F.max_pool2d(x, 2, return_indices=True)
            return y + i.float()

    with pytest.raises(UnsupportedModelError, match="indices"):
        autolip(Idx(), (1, 4, 4))


# ---- softmax / log-softmax ----------------------------------------------------------------
def _jac(f, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.jacobian(f, x)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_softmax_and_log_softmax_constants(n: int) -> None:
    sm = lambda v: torch.softmax(v, 0)  # noqa: E731
    lsm = lambda v: torch.log_softmax(v, 0)  # noqa: E731
    v = torch.randn(300, n, dtype=torch.float64) * 4
    Js = torch.func.vmap(torch.func.jacrev(sm))(v)
    Jl = torch.func.vmap(torch.func.jacrev(lsm))(v)
    worst = {
        "sm": float(torch.linalg.matrix_norm(Js, 2).max()),
        "lsm2": float(torch.linalg.matrix_norm(Jl, 2).max()),
        "lsm1": float(Jl.abs().sum(1).max()),
        "lsminf": float(Jl.abs().sum(2).max()),
    }
    assert worst["sm"] <= 0.5 + 1e-12
    assert worst["lsm2"] <= log_softmax_constant(n, "2") + 1e-12
    assert worst["lsm1"] <= log_softmax_constant(n, "1") + 1e-12
    assert worst["lsminf"] <= log_softmax_constant(n, "inf") + 1e-12
    # the suprema are approached: softmax at (t, -t, -inf...), log-softmax near one-hot
    v = torch.full((n,), -40.0, dtype=torch.float64)
    v[:2] = 0.0
    assert float(torch.linalg.matrix_norm(_jac(sm, v), 2)) == pytest.approx(0.5, rel=1e-9)
    v = torch.zeros(n, dtype=torch.float64)
    v[0] = 40.0
    J = _jac(lsm, v)
    assert float(torch.linalg.matrix_norm(J, 2)) == pytest.approx(math.sqrt(n), rel=1e-9)
    assert float(J.abs().sum(0).max()) == pytest.approx(n - 1, rel=1e-9)
    v[0] = -40.0
    assert float(_jac(lsm, v).abs().sum(1).max()) == pytest.approx(2.0, rel=1e-9)


def test_softmax_node_reads_dim() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.log_softmax(x, dim=-1)

    g, (node,) = _nodes(M(), (3, 5))
    assert node_constants(g)[node.name].constants == (pytest.approx(math.sqrt(5)),)

    class Batch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x, dim=0)

    with pytest.raises(UnsupportedModelError, match="batch"):
        autolip(Batch(), (3,))


# ---- linear l1 / l-inf --------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(6, 4),
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Conv2d(2, 4, 2, dilation=2, groups=2),
        nn.ConvTranspose2d(2, 2, 3, stride=2),
        nn.AvgPool2d(3, 2, padding=1),
        nn.Conv1d(2, 2, 3, padding=2),
    ],
    ids=lambda m: type(m).__name__,
)
def test_l1_linf_are_exact(layer: nn.Module) -> None:
    shape = (6,) if isinstance(layer, nn.Linear) else (2, 7) if isinstance(
        layer, nn.Conv1d) else (2, 5, 5)
    g, (node,) = _nodes(layer, shape)
    W, _ = node.dense()
    for norm, exact in (("1", W.abs().sum(0).max()), ("inf", W.abs().sum(1).max())):
        c = node_constants(g, norm=norm)[node.name]
        assert c.certified
        assert c.constants[0] == pytest.approx(float(exact), rel=1e-6)  # + rounding margin
        assert c.constants[0] >= float(exact)


def test_merged_l1_linf_between_exact_and_product() -> None:
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 2))
    g, (node,) = _nodes(net, (1, 6, 6))
    assert len(node.parts) == 4
    W, _ = node.dense()
    for norm, exact in (("1", W.abs().sum(0).max()), ("inf", W.abs().sum(1).max())):
        merged = node_constants(g, norm=norm)[node.name].constants[0]
        prod = 1.0
        for part in (net[0], net[1], net[3]):
            shape = {0: (1, 6, 6), 1: (3, 4, 4), 3: (12,)}[list(net).index(part)]
            gp, (np_,) = _nodes(part, shape)
            prod *= node_constants(gp, norm=norm)[np_.name].constants[0]
        assert float(exact) * (1 - 1e-12) <= merged <= prod * (1 + 1e-9)


def test_batchnorm_rule_is_diagonal_max() -> None:
    bn = nn.BatchNorm1d(4).eval()
    bn.running_var.copy_(torch.tensor([0.25, 1.0, 4.0, 9.0]))
    bn.weight.data = torch.tensor([1.0, -3.0, 1.0, 1.0])
    g, (node,) = _nodes(bn, (4,))
    for norm in ("1", "2", "inf"):
        c = node_constants(g, norm=norm)[node.name]
        exact = 3.0 / math.sqrt(1 + 1e-5)
        assert exact <= c.constants[0] <= exact * (1 + 1e-6)  # + rounding margin


# ---- structural ---------------------------------------------------------------------------
def test_scalar_ops_and_copies() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = -(x * -3.0) / 2.0 + 1.0
            return y.repeat(1, 4)

    g, nodes = _nodes(M(), (3,))
    (node,) = nodes  # all linear: merged into one
    for norm, expect in (("2", 1.5 * 2.0), ("1", 1.5 * 4.0), ("inf", 1.5)):
        c = node_constants(g, norm=norm)[node.name].constants[0]
        assert c == pytest.approx(expect, rel=1e-6), norm


# ---- registry ------------------------------------------------------------------------------
def test_register_rule_for_custom_module_and_function() -> None:
    """(The rules it registers are removed at the end: a registry left with these local
    classes made test_every_registered_rule_has_a_generator fail when run after it.)"""
    try:
        _register_rule_for_custom_module_and_function()
    finally:
        for d in (_registry._MODULES, _registry._FUNCTIONS):
            for k in [k for k in d if "test_register_rule" in getattr(k, "__qualname__", "")
                      or "_register_rule_for" in getattr(k, "__qualname__", "")]:
                d.pop(k)


def _register_rule_for_custom_module_and_function() -> None:
    class Swish2(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(2 * x)  # a product: unsupported unless a rule is given

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.act = Swish2()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(x))

    with pytest.raises(UnsupportedModelError):
        autolip(Net(), (3,))

    @register_rule(Swish2, kind="activation", slope_range=(-0.2, 1.2))
    def swish2_rule(node, ctx):
        return 1.2

    _g, nodes = _nodes(Net(), (3,))
    assert [n.kind for n in nodes] == ["linear", "activation"]  # the module became a leaf
    r = autolip(Net(), (3,))
    assert r.certified
    assert any(lb.how.startswith("user rule") for lb in r.layers)

    def my_fn(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2

    assert get_rule(my_fn) is None
    register_rule(my_fn, 2.0, kind="activation", slope_range=(-2.0, 2.0))
    assert get_rule(my_fn) is not None


def test_register_rule_validation() -> None:
    with pytest.raises(InvalidArgumentError):
        register_rule(nn.Tanh, 1.0, kind="activation")  # no slope range
    with pytest.raises(InvalidArgumentError):
        register_rule(nn.Tanh, -1.0)
    with pytest.raises(InvalidArgumentError):
        register_rule(42, 1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        register_rule(nn.Tanh, 1.0, kind="weird")


@pytest.mark.parametrize("bad", [(math.nan, 1.0), (0.0, math.nan), (1.0, 0.0),
                                 (-math.inf, 1.0)])
def test_regression_nan_slope_end_was_widened_to_zero(bad: tuple[float, float]) -> None:
    """A user rule's slope range with a NaN end was widened to 0 (every comparison with NaN is
    false): ``(nan, 1)`` became ``[0, 1]`` and LipSDP/SeqLip certified with it. Every range is
    now checked where it is widened, naming the node and the range."""

    class Act(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x)

    register_rule(Act, 1.0, kind="activation", slope_range=lambda n: bad)
    net = nn.Sequential(nn.Linear(2, 3), Act(), nn.Linear(3, 1)).eval()
    with pytest.raises(InvalidArgumentError, match=r"gave the slope range .*finite a <= b"):
        capture(net, (2,))


def test_subclass_overriding_forward_does_not_inherit_rule() -> None:
    class Weird(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) ** 2

    class Plain(nn.Linear):
        pass

    assert get_rule(Weird) is None
    assert get_rule(Plain) is get_rule(nn.Linear)


def test_l1_on_a_large_black_box_linear_op_is_reported_with_the_others() -> None:
    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("W", torch.randn(5000, 3) / 100)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x @ self.W) * x[:, :3]  # black-box matmul + a product

    with pytest.raises(UnsupportedModelError) as info:
        autolip(Big(), (5000,), norm=1)
    ops = sorted(n.op for n in info.value.nodes)
    assert ops == ["matmul", "mul"]
