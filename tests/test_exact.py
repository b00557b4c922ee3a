"""Tests of lipbound.methods.exact: closed forms, brute force, sandwich invariants, time-out."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linprog
from torch import nn

from _helpers import linear_params as _params
from _helpers import mlp
from _helpers import opnorm as _opnorm
from lipbound.errors import InvalidArgumentError, NotSequentialError, UnsupportedModelError
from lipbound.methods.autolip import autolip
from lipbound.methods.exact import ExactResult, exact
from lipbound.methods.seqlip import seqlip

# ------------------------------------------------------------------------------------------
# independent brute force: every pattern of every hidden neuron, strict-feasibility LP each
# ------------------------------------------------------------------------------------------


def brute_force(net: nn.Sequential, norm: str = "2") -> float:
    """max over all activation patterns whose region contains a ball of radius > 1e-7."""
    Ws, bs, negs = _params(net)
    n0 = Ws[0].shape[1]
    widths = [W.shape[0] for W in Ws[:-1]]
    best = 0.0
    for bits in itertools.product((0, 1), repeat=sum(widths)):
        A, c = Ws[0], bs[0]
        G_parts, g_parts, n_parts = [], [], []
        pos = 0
        for i, n in enumerate(widths):
            d = np.array(bits[pos : pos + n], dtype=float)
            pos += n
            s = 2 * d - 1
            # s * (A x + c) >= t * ||A_k||
            G_parts.append(s[:, None] * A)
            g_parts.append(s * c)
            n_parts.append(np.linalg.norm(A, axis=1))
            sig = d + (1 - d) * negs[i]
            A, c = Ws[i + 1] @ (sig[:, None] * A), Ws[i + 1] @ (sig * c) + bs[i + 1]
        G, g, nr = np.vstack(G_parts), np.concatenate(g_parts), np.concatenate(n_parts)
        # maximise t s.t. G x + g >= t * nr, t <= 1
        A_ub = np.hstack([-G, nr[:, None]])
        res = linprog(
            np.r_[np.zeros(n0), -1.0],
            A_ub=A_ub,
            b_ub=g,
            bounds=[(None, None)] * n0 + [(None, 1.0)],
            method="highs",
        )
        if res.status == 0 and -res.fun > 1e-7:
            best = max(best, _opnorm(A, norm))
    return best


def _jac_norm(net: nn.Module, x: torch.Tensor, norm: str = "2") -> float:
    J = torch.autograd.functional.jacobian(lambda v: net(v.reshape(1, -1)).reshape(-1), x)
    return _opnorm(J.detach().double().numpy(), norm)


# ------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------


def test_affine_network_is_its_matrix_norm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    W = (net[1].weight @ net[0].weight).detach().numpy()
    for norm in ("2", "1", "inf"):
        res = exact(net, (3,), norm=norm)
        assert res.bound == "exact" and res.finished
        assert math.isclose(res.value, _opnorm(W, norm), rel_tol=1e-9)


def test_abs_function_closed_form() -> None:
    # f(x) = relu(x) + relu(-x) = |x| has L = 1
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
        net[2].bias.zero_()
    res = exact(net, (1,))
    assert math.isclose(res.value, 1.0, rel_tol=1e-12)
    # x -> relu(x) - relu(x - 1): slope 1 on (0, 1), else 0  ->  L = 1
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -1.0]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
    assert math.isclose(exact(net, (1,)).value, 1.0, rel_tol=1e-12)
    # relu(x) - relu(-x) = x: the degenerate pattern "both on" (only at x = 0) has J = 2
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
    assert math.isclose(exact(net, (1,)).value, 1.0, rel_tol=1e-12)
    assert math.isclose(brute_force(net), 1.0, rel_tol=1e-12)


def test_parallel_hyperplanes_never_both_off() -> None:
    # z1 = x, z2 = x - 5 with output weights (1, 10): regions x<0 (0), 0<x<5 (1), x>5 (11).
    # The pattern (off, on) is infeasible and would give 10.
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -5.0]))
        net[2].weight.copy_(torch.tensor([[-1.0, 10.0]]))
        net[2].bias.zero_()
    # slopes: x<0: 0; 0<x<5: -1; x>5: 9 -> L = 9 (pattern (off, on) would give 10)
    assert math.isclose(exact(net, (1,)).value, 9.0, rel_tol=1e-12)


def test_one_dimensional_input_matches_finite_differences() -> None:
    # one hidden layer, 1-D input: f is affine between the sorted breakpoints -b_k / w_k
    net = mlp([1, 7, 1], seed=3)
    w = net[0].weight.detach().numpy().ravel()
    b = net[0].bias.detach().numpy()
    br = np.sort(-b / w)
    pts = np.r_[br[0] - 1.0, (br[:-1] + br[1:]) / 2, br[-1] + 1.0]
    slopes = []
    with torch.no_grad():
        for p in pts:
            h = 1e-6 * min(1.0, float(np.min(np.abs(br - p))))
            f = net(torch.tensor([[p - h], [p + h]], dtype=torch.float64)).ravel()
            slopes.append(abs(float(f[1] - f[0])) / (2 * h))
    assert math.isclose(exact(net, (1,)).value, max(slopes), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------
# brute force
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("norm", ["2", "1", "inf"])
def test_one_hidden_layer_equals_brute_force(seed: int, norm: str) -> None:
    net = mlp([2, 6, 2], seed=seed)
    res = exact(net, (2,), norm=norm, time_limit=30)
    assert res.finished and res.bound == "exact" and res.certified
    assert math.isclose(res.value, brute_force(net, norm), rel_tol=1e-9)
    assert res.upper == res.value == res.lower


@pytest.mark.parametrize("seed", [0, 1])
def test_leaky_and_three_input_one_hidden_layer_brute_force(seed: int) -> None:
    net = mlp([3, 7, 1], seed=seed, leaky=0.2)
    assert math.isclose(exact(net, (3,)).value, brute_force(net), rel_tol=1e-9)


@pytest.mark.parametrize(("seed", "norm"), [(0, "2"), (1, "2"), (2, "1"), (3, "inf")])
def test_two_hidden_layers_brute_force(seed: int, norm: str) -> None:
    net = mlp([2, 3, 4, 2], seed=seed)
    assert math.isclose(exact(net, (2,), norm=norm).value, brute_force(net, norm), rel_tol=1e-9)


@pytest.mark.parametrize(("n0", "norm"), [(2, "2"), (3, "1"), (3, "inf")])
def test_scalar_output_brute_force(n0: int, norm: str) -> None:
    # exercises the exact last-layer maximisation for scalar outputs
    net = mlp([n0, 4, 5, 1], seed=11)
    assert math.isclose(exact(net, (n0,), norm=norm).value, brute_force(net, norm), rel_tol=1e-9)


def test_witness_realises_value() -> None:
    net = mlp([2, 8, 8, 1], seed=5)
    res = exact(net, (2,))
    x = res.witness.x.detach().double().reshape(-1)
    assert math.isclose(_jac_norm(net, x), res.value, rel_tol=1e-9)


# ------------------------------------------------------------------------------------------
# invariants: every realised Jacobian <= exact <= every certified upper bound
# ------------------------------------------------------------------------------------------


def _certified_uppers(net: nn.Module, shape: tuple[int, ...], *, seq: bool) -> list[float]:
    Ws, _, _ = _params(net)  # type: ignore[arg-type]
    ups = [math.prod(float(np.linalg.norm(W, 2)) for W in Ws)]
    r = autolip(net, shape)
    if r.upper is not None:
        ups.append(float(r.upper))
    if seq:
        r = seqlip(net, shape)
        if r.upper is not None:
            ups.append(float(r.upper))
    return ups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_below_seqlip_certificate(seed: int) -> None:
    net = mlp([2, 5, 4, 3], seed=seed)
    res = exact(net, (2,))
    ups = _certified_uppers(net, (2,), seq=True)
    assert all(res.value <= u * (1 + 1e-6) for u in ups)


@given(
    seed=st.integers(0, 10_000),
    n0=st.integers(1, 3),
    widths=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    leaky=st.sampled_from([None, 0.1]),
)
def test_exact_between_realised_and_certified(
    seed: int, n0: int, widths: list[int], leaky: float | None
) -> None:
    net = mlp([n0, *widths, 2], seed=seed, leaky=leaky)
    res = exact(net, (n0,), time_limit=30, n_samples=256)
    assert res.finished
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(64, n0, generator=gen, dtype=torch.float64) * 3
    jac = torch.func.vmap(torch.func.jacrev(lambda v: net(v.unsqueeze(0)).squeeze(0)))(xs)
    realised = torch.linalg.matrix_norm(jac, ord=2)
    assert float(realised.detach().max()) <= res.value * (1 + 1e-9) + 1e-12
    for up in _certified_uppers(net, (n0,), seq=False):
        assert res.value <= up * (1 + 1e-6) + 1e-12


# ------------------------------------------------------------------------------------------
# time-out, graph integration, errors
# ------------------------------------------------------------------------------------------


def test_time_out_returns_labelled_bounds() -> None:
    net = mlp([2, 10, 10, 1], seed=7)
    res = exact(net, (2,), time_limit=0.02)
    assert isinstance(res, ExactResult)
    assert not res.finished and res.bound == "lower" and res.certified
    assert res.value == res.lower and res.upper is not None and res.value <= res.upper
    assert "LOWER" in " ".join(res.notes) and "UPPER" in " ".join(res.notes)
    full = exact(net, (2,), time_limit=60)
    assert full.finished
    assert res.lower <= full.value * (1 + 1e-9) and full.value <= res.upper * (1 + 1e-9)


def test_functional_relu_and_conv_through_graph() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 6)
            self.b = nn.Linear(6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.a(x)))

    torch.manual_seed(0)
    net = Net().double()
    seq = nn.Sequential(net.a, nn.ReLU(), net.b)
    assert math.isclose(exact(net, (2,)).value, brute_force(seq), rel_tol=1e-9)

    cnn = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 1)).double()
    res = exact(cnn, (1, 3, 3))
    x = res.witness.x.detach().double().reshape(1, 1, 3, 3)
    J = torch.autograd.functional.jacobian(lambda v: cnn(v).reshape(-1), x).reshape(1, -1)
    assert math.isclose(float(J.norm()), res.value, rel_tol=1e-9)
    gen = torch.Generator().manual_seed(1)
    for v in torch.randn(30, 1, 1, 3, 3, generator=gen, dtype=torch.float64):
        Jv = torch.autograd.functional.jacobian(lambda u: cnn(u).reshape(-1), v).reshape(1, -1)
        assert float(Jv.norm()) <= res.value * (1 + 1e-9)


def test_residual_model_is_rejected(residual_net: nn.Module) -> None:
    with pytest.raises(NotSequentialError):
        exact(residual_net, (2,))


def test_smooth_activation_is_rejected() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    with pytest.raises(UnsupportedModelError):
        exact(net, (2,))


def test_bad_arguments() -> None:
    net = mlp([2, 3, 1], seed=0)
    with pytest.raises(InvalidArgumentError):
        exact(net, (2,), norm=3)
    with pytest.raises(InvalidArgumentError):
        exact(net, (2,), time_limit=0)
