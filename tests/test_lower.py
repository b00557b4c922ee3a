"""Tests of lipbound.methods.lower: witnessed lower bounds.

The exact Lipschitz constant of tiny ReLU MLPs is computed here INDEPENDENTLY of the library:
enumerate the activation regions (depth-first over neurons, each new side checked for a
non-empty interior by a Chebyshev-ball LP solved with HiGHS) and take the max spectral norm of
the region Jacobians (a continuous piecewise-linear map has L = max over full-dimensional
regions of ||J||).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linprog
from torch import nn

from lipbound.errors import InvalidArgumentError, NonFiniteError, ShapeError
from lipbound.methods.lower import jacobian_ratio, lower_bound, pair_ratio
from lipbound.results import LowerBoundResult


# ------------------------------------------------------------------------------------------
# independent exact constant of a ReLU MLP
# ------------------------------------------------------------------------------------------
def _weights(net: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
        for m in net
        if isinstance(m, nn.Linear)
    ]


def _interior_point(rows: list[tuple[np.ndarray, float]], n: int) -> np.ndarray | None:
    """A point with s (a.x + c) >= t > 0 for every row (a normalised), or None."""
    # variables (x, t); maximise t  <=>  minimise -t;  -(a.x) + t <= c  for rows a.x + c >= t
    a_ub = np.array([np.concatenate([-a, [1.0]]) for a, _ in rows])
    b_ub = np.array([c for _, c in rows])
    res = linprog(
        np.concatenate([np.zeros(n), [-1.0]]),
        A_ub=a_ub,
        b_ub=b_ub,
        bounds=[(None, None)] * n + [(None, 1.0)],
        method="highs",
    )
    if res.status != 0 or -res.fun <= 1e-9:
        return None
    return res.x[:n]


def exact_relu_lipschitz(net: nn.Sequential) -> tuple[float, int]:
    """(L_2 of the ReLU MLP, number of regions) by region enumeration."""
    layers = _weights(net)
    n = layers[0][0].shape[1]
    best = [0.0]
    count = [0]

    def dfs(k: int, A: np.ndarray, c: np.ndarray, j: int, pattern: list[float],
            rows: list[tuple[np.ndarray, float]], x: np.ndarray) -> None:
        # A, c: pre-activations of hidden layer k as affine maps of the input
        if j == A.shape[0]:
            D = np.array(pattern)
            A_post, c_post = D[:, None] * A, D * c
            W, b = layers[k + 1]
            A2, c2 = W @ A_post, W @ c_post + b
            if k + 1 == len(layers) - 1:
                count[0] += 1
                best[0] = max(best[0], float(np.linalg.norm(A2, 2)))
                return
            dfs(k + 1, A2, c2, 0, [], rows, x)
            return
        a, cj = A[j], c[j]
        na = np.linalg.norm(a)
        if na < 1e-12:  # constant neuron
            dfs(k, A, c, j + 1, [*pattern, 1.0 if cj > 0 else 0.0], rows, x)
            return
        a_n, c_n = a / na, cj / na
        z = float(a_n @ x + c_n)
        for s in (1.0, -1.0):
            new_rows = [*rows, (s * a_n, s * c_n)]
            if s * z > 1e-9:
                xs: np.ndarray | None = x
            else:
                xs = _interior_point(new_rows, n)
            if xs is not None:
                dfs(k, A, c, j + 1, [*pattern, 1.0 if s > 0 else 0.0], new_rows, xs)

    W1, b1 = layers[0]
    dfs(0, W1, b1, 0, [], [], np.zeros(n))
    return best[0], count[0]


def _mlp(widths: list[int], seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(len(widths) - 1):
        lin = nn.Linear(widths[i], widths[i + 1])
        with torch.no_grad():
            w = torch.randn(widths[i + 1], widths[i], generator=g) / math.sqrt(widths[i])
            lin.weight.copy_(w)
            lin.bias.copy_(0.5 * torch.randn(widths[i + 1], generator=g))
        mods.append(lin)
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval()


def _independent_value(net: nn.Module, res: LowerBoundResult) -> float:
    """Recompute the witness's value without the library (float64, autograd Jacobian)."""
    net64 = _clone64(net)
    x = res.witness.x.double()
    if res.witness.y is not None:
        y = res.witness.y.double()
        with torch.no_grad():
            return float((net64(x[None]) - net64(y[None])).norm() / (x - y).norm())
    v = res.witness.direction.double()
    jac = torch.autograd.functional.jacobian(lambda z: net64(z[None])[0], x)
    jac = jac.reshape(-1, x.numel())
    return float((jac @ v.flatten()).norm() / v.norm())


def _clone64(net: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(net).double()


# ------------------------------------------------------------------------------------------
# the independent reference itself
# ------------------------------------------------------------------------------------------
def test_reference_exact_on_known_function() -> None:
    # f(x) = relu(x1) + 3 relu(-x1) + 2 x2 (through two ReLUs): regions have J = (1, 2), (-3, 2)
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 3.0, 2.0, -2.0]]))
        net[2].bias.zero_()
    value, regions = exact_relu_lipschitz(net)
    assert regions == 4
    assert value == pytest.approx(math.sqrt(13), rel=1e-12)
    res = lower_bound(net, (2,), restarts=4, steps=40)
    assert res.value <= math.sqrt(13) * (1 + 1e-9)
    assert res.value >= 0.999 * math.sqrt(13)


# ------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", [2, 1, float("inf")])
def test_linear_map_reaches_operator_norm(norm: float) -> None:
    lin = nn.Linear(5, 3)
    A = lin.weight.detach().double()
    expected = {
        2: float(torch.linalg.matrix_norm(A, 2)),
        1: float(A.abs().sum(0).max()),
        float("inf"): float(A.abs().sum(1).max()),
    }[norm]
    res = lower_bound(lin, (5,), norm=norm, restarts=4, steps=30)
    assert res.certified and res.bound == "lower"
    assert res.value <= expected * (1 + 1e-9)
    assert res.value >= expected * (1 - 1e-6)


def test_tanh_layer_reaches_weight_norm_at_zero() -> None:
    # f(x) = tanh(W x): J = diag(1 - tanh^2(Wx)) W, so L = ||W||, attained at x = 0
    lin = nn.Linear(4, 4, bias=False)
    net = nn.Sequential(lin, nn.Tanh())
    expected = float(torch.linalg.matrix_norm(lin.weight.detach().double(), 2))
    res = lower_bound(net, (4,), restarts=8, steps=100, scale=0.3)
    assert res.value <= expected * (1 + 1e-9)
    assert res.value >= 0.97 * expected


# ------------------------------------------------------------------------------------------
# against the exact constant of tiny ReLU MLPs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("widths", "seed"),
    [([2, 8, 1], 0), ([2, 6, 6, 1], 1), ([2, 6, 6, 2], 2), ([3, 6, 5, 1], 3)],
)
def test_below_and_near_exact_constant(widths: list[int], seed: int) -> None:
    net = _mlp(widths, seed)
    exact, regions = exact_relu_lipschitz(net)
    assert regions >= 2
    res = lower_bound(net, (widths[0],), restarts=16, steps=150, seed=seed)
    assert res.value <= exact * (1 + 1e-9), (res.value, exact)
    assert res.value >= 0.9 * exact, (res.value, exact, res.extra["per_method"])
    # the witness reproduces the value (independent float64 recomputation)
    assert _independent_value(net, res) == pytest.approx(res.value, rel=1e-7)


@pytest.mark.parametrize("method", ["pairs", "annealing"])
def test_each_search_alone_is_valid_and_useful(method: str) -> None:
    net = _mlp([2, 6, 6, 1], 1)
    exact, _ = exact_relu_lipschitz(net)
    res = lower_bound(net, (2,), methods=(method,), restarts=8, steps=100)
    assert res.how.startswith(method)
    assert res.value <= exact * (1 + 1e-9)
    assert res.value >= 0.5 * exact
    assert _independent_value(net, res) == pytest.approx(res.value, rel=1e-7)


def test_pair_witness_reproduces_with_public_helper() -> None:
    net = _mlp([2, 6, 1], 5)
    res = lower_bound(net, (2,), methods=("pairs",), restarts=4, steps=50)
    if res.witness.y is not None:
        assert pair_ratio(net, res.witness.x, res.witness.y) == pytest.approx(res.value, rel=1e-12)
    else:
        assert jacobian_ratio(net, res.witness.x, res.witness.direction) == pytest.approx(
            res.value, rel=1e-12
        )


# ------------------------------------------------------------------------------------------
# data seeding
# ------------------------------------------------------------------------------------------
def _needle() -> nn.Sequential:
    """1-D ReLU net, slope 100 on [10, 10.01] and 0 elsewhere (L = 100)."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        net[0].bias.copy_(torch.tensor([-10.0, -10.01]))
        net[2].weight.copy_(torch.tensor([[100.0, -100.0]]))
        net[2].bias.zero_()
    return net.eval()


def test_data_seeding_finds_a_needle() -> None:
    net = _needle()
    data = torch.tensor([[0.0], [3.0], [10.004], [-2.0]])
    res = lower_bound(net, (1,), data=data, restarts=4, steps=20, scale=1.0)
    assert res.value <= 100 * (1 + 1e-9)
    assert res.value >= 100 * (1 - 1e-6)
    # the data bound is the max Jacobian norm over the data: 100 at 10.004, 0 elsewhere
    assert res.extra["per_method"]["data"] == pytest.approx(100.0, rel=1e-6)
    # without the data the (scale-1) ascent alone, starting near 0, sees a flat function
    blind = lower_bound(net, (1,), methods=("pairs",), restarts=4, steps=20, scale=1.0)
    assert blind.value < 1.0
    # the default search samples Jacobian norms at 4096 points first and finds the needle
    sampled = lower_bound(net, (1,), restarts=4, steps=20, scale=1.0)
    assert 100 * (1 - 1e-6) <= sampled.value <= 100 * (1 + 1e-9)


def test_data_bound_equals_max_jacobian_norm_over_data() -> None:
    net = _mlp([2, 6, 6, 1], 4)
    data = torch.randn(50, 2, generator=torch.Generator().manual_seed(1))
    res = lower_bound(net, (2,), data=data, methods=("data",))
    net64 = _clone64(net)
    norms = [
        float(torch.autograd.functional.jacobian(lambda z: net64(z[None])[0], x.double()).norm())
        for x in data
    ]
    assert res.value == pytest.approx(max(norms), rel=1e-7)
    assert res.how.startswith("data")


# ------------------------------------------------------------------------------------------
# invariants
# ------------------------------------------------------------------------------------------
@given(
    seed=st.integers(0, 10_000),
    width=st.integers(1, 6),
    act=st.sampled_from(["relu", "tanh", "leaky"]),
    norm=st.sampled_from([2, 1, float("inf")]),
)
def test_never_above_product_of_layer_norms(seed: int, width: int, act: str, norm: float) -> None:
    g = torch.Generator().manual_seed(seed)
    a = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "leaky": nn.LeakyReLU(0.1)}[act]
    net = nn.Sequential(nn.Linear(3, width), a, nn.Linear(width, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    ord_ = {2: 2, 1: 1, float("inf"): float("inf")}[norm]
    upper = math.prod(
        float(torch.linalg.matrix_norm(m.weight.detach().double(), ord_))
        for m in net
        if isinstance(m, nn.Linear)
    )
    res = lower_bound(net, (3,), norm=norm, restarts=3, steps=10, power_iterations=5, seed=seed)
    assert 0 <= res.value <= upper * (1 + 1e-9)


def test_batch_size_and_seed() -> None:
    net = _mlp([2, 6, 1], 7)
    a = lower_bound(net, (2,), restarts=6, steps=20, batch_size=4, seed=3)
    b = lower_bound(net, (2,), restarts=6, steps=20, batch_size=4, seed=3)
    assert a.value == b.value  # seeded: reproducible
    assert torch.equal(a.x, b.x)
    assert a.x.shape == (2,) and a.x.dtype == torch.float64


def test_time_limit_returns_valid_bound_with_note() -> None:
    net = _mlp([2, 6, 1], 8)
    exact, _ = exact_relu_lipschitz(net)
    res = lower_bound(net, (2,), restarts=4, steps=100_000, time_limit=0.3)
    assert any("time limit" in n for n in res.notes)
    assert res.value <= exact * (1 + 1e-9)


def test_conv_model_shapes() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    res = lower_bound(net, (1, 6, 6), restarts=2, steps=10)
    assert res.witness.x.shape == (1, 6, 6)
    assert _independent_value(net, res) == pytest.approx(res.value, rel=1e-7)


def test_to_dict_is_json_ready() -> None:
    import json

    res = lower_bound(nn.Linear(2, 1), (2,), restarts=2, steps=5)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["bound"] == "lower" and d["certified"] is True
    assert len(d["witness"]["x"]) == 2


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
def test_errors() -> None:
    net = nn.Linear(2, 1)
    with pytest.raises(ShapeError):
        lower_bound(net, (3,))
    with pytest.raises(ShapeError):
        lower_bound(net, ())
    with pytest.raises(InvalidArgumentError):
        lower_bound(net, (2,), norm=3)
    with pytest.raises(InvalidArgumentError, match="pairs"):
        lower_bound(net, (2,), methods=("grid",))
    with pytest.raises(InvalidArgumentError):
        lower_bound(net, (2,), restarts=0)
    with pytest.raises(ShapeError):
        lower_bound(net, (2,), data=torch.zeros(4, 3))
    with pytest.raises(InvalidArgumentError):
        lower_bound(net, (2,), methods=("data",))
    with pytest.raises(InvalidArgumentError):
        lower_bound(lambda x: x, (2,))  # type: ignore[arg-type]
    class Squeezed(nn.Module):  # drops the batch dimension of a batch of one
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).squeeze()

    with pytest.raises(ShapeError, match="batch dimension"):
        lower_bound(Squeezed(), (2,))
    bad = nn.Linear(2, 1)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        lower_bound(bad, (2,))


class _DivByHardsigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 7.5 / self.m(x)


def test_regression_no_witness_where_the_output_is_infinite() -> None:
    """Fuzz campaign witness class: a Jacobian witness at a point where hardsigmoid is 0 (the
    output 7.5 / 0 is inf, the Jacobian 0 / 0): the value (9.2e7) was not reproducible (NaN).
    A witness now needs finite outputs, and reproduces."""
    r = lower_bound(_DivByHardsigmoid().eval(), (2, 4, 3), norm="2", restarts=4, steps=12,
                    power_iterations=8, seed=3544)
    w = r.witness
    assert w is not None
    assert bool(torch.isfinite(_DivByHardsigmoid()(w.x[None].float())).all())
    if w.y is None:
        assert w.direction is not None
        got = jacobian_ratio(_DivByHardsigmoid().double(), w.x, w.direction)
    else:
        got = pair_ratio(_DivByHardsigmoid().double(), w.x, w.y)
    assert math.isfinite(got) and got == pytest.approx(r.value, rel=1e-9)


class _SelfRatio(nn.Module):
    """``h / h`` after a BatchNorm: 1 wherever ``h != 0``, so the true constant is 0 (the
    fuzz campaign's minimised reproducer, seed 8691)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8691)
        self.bn = nn.BatchNorm2d(3, eps=0.001)
        self.bn.running_mean.copy_(torch.randn(3))
        self.bn.running_var.copy_(0.1 * torch.rand(3) + 1e-4)
        self.bn.weight.data.copy_(3.0 * torch.randn(3))
        self.bn.bias.data.copy_(torch.randn(3))
        self.register_buffer("c", torch.randn(2, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(x)
        return torch.divide(torch.true_divide(h, h).unsqueeze(1), self.c)


@pytest.mark.parametrize("norm", ["1", "2", "inf"])
def test_regression_jacobian_witness_of_rounding_noise(norm: str) -> None:
    """Fuzz campaign witness class (87549c2): the float64 reverse-mode derivative of ``h / h``
    is ``1/h - h/h^2``, rounding noise of ``1e-16 / h``; lower_bound l1 printed 1.2e-10 as a
    Jacobian witness of a function whose true constant is 0. A Jacobian value must now be
    confirmed by its secants (every secant of ``h / h`` is exactly 0)."""
    r = lower_bound(_SelfRatio().eval(), (3, 3, 3), norm=norm, restarts=4, steps=12,
                    power_iterations=8, seed=8691)
    assert r.value == 0.0
