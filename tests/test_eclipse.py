"""Tests of the ECLipsE-Fast-type closed form (``lipsdp(variant="fast")``), the barrier-Newton
optimiser behind the default ``lipsdp`` and the block-scaled Schur certificate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _helpers import mlp as _mlp
from lipbound.errors import InvalidArgumentError
from lipbound.methods import sdp
from lipbound.methods._schur import (
    _Dense,
    _pow2,
    barrier_newton,
    certify_schur,
    closed_form_multipliers,
    solve_schur,
)
from lipbound.methods.exact import exact


def _random_deep(width: int, depth: int, seed: int) -> list[np.ndarray]:
    """ECLipsE's random nets: spectral norms uniform in [0.4, 1.8], one output."""
    g = np.random.default_rng(seed)
    Ws = []
    for i in range(depth):
        W = g.standard_normal((width if i < depth - 1 else 1, width))
        Ws.append(W / np.linalg.norm(W, 2) * g.uniform(0.4, 1.8))
    return Ws


def _eclipse_fast_reference(Ws: list[np.ndarray]) -> float:
    """The ECLipsE-Fast recursion for ReLU as written in the paper (alpha=0, beta=1, m=1/2):
    ``l_i = 1 / (2 m^2 lambda_max(W_i X^{-1} W_i^T))``, ``X_i = l_i I - l_i^2 m^2 W_i X^{-1}
    W_i^T``, ``L = sqrt(lambda_max(W_K^T W_K X^{-1}))``; dense numpy, independent of _schur."""
    X = np.eye(Ws[0].shape[1])
    m2 = 0.25
    for W in Ws[:-1]:
        K = W @ np.linalg.solve(X, W.T)
        lam = float(np.linalg.eigvalsh((K + K.T) / 2).max())
        li = 1.0 / (2 * m2 * lam)
        X = li * np.eye(W.shape[0]) - li**2 * m2 * K
    WK = Ws[-1]
    F = WK @ np.linalg.solve(X, WK.T)
    return math.sqrt(float(np.linalg.eigvalsh((F + F.T) / 2).max()))


def _jac_max(net: nn.Module, n0: int, seed: int, n: int = 64) -> float:
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, n0, generator=gen, dtype=torch.float64) * 2
    jac = torch.func.vmap(torch.func.jacrev(lambda v: net(v.unsqueeze(0)).squeeze(0)))(xs)
    return float(torch.linalg.matrix_norm(jac.detach(), ord=2).max())


def _prod_norms(net: nn.Sequential) -> float:
    return math.prod(
        float(torch.linalg.matrix_norm(m.weight.detach(), ord=2))
        for m in net if isinstance(m, nn.Linear)
    )


# --- closed forms first -------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "depth", "seed"), [(6, 3, 0), (12, 5, 1), (20, 8, 2)])
def test_closed_form_equals_the_eclipse_fast_recursion(width: int, depth: int, seed: int) -> None:
    Ws = _random_deep(width, depth, seed)
    ref = _eclipse_fast_reference(Ws)
    sol = solve_schur(Ws, [(0.0, 1.0)] * (depth - 1), optimise=False)
    assert sol.closed_form is not None
    assert math.isclose(sol.closed_raw, ref, rel_tol=1e-9)
    assert ref <= sol.closed_form <= ref * (1 + 1e-6)  # certified: rounded up, never below


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_is_above_the_exact_constant_of_tiny_relu_nets(seed: int) -> None:
    net = _mlp([2, 5, 4, 2], seed=seed)
    ex = exact(net, (2,)).value
    fast = sdp.lipsdp(net, (2,), variant="fast")
    assert fast.certified and fast.method == "lipsdp-fast" and fast.solver == "closed-form"
    assert fast.value >= ex * (1 - 1e-12)
    default = sdp.lipsdp(net, (2,))
    assert ex * (1 - 1e-12) <= default.value <= fast.value  # the closed form is a floor


def test_single_layer_fast_is_the_spectral_norm() -> None:
    net = _mlp([5, 3], seed=0)
    norm = float(torch.linalg.matrix_norm(net[0].weight.detach(), ord=2))
    res = sdp.lipsdp(net, (5,), variant="fast")
    assert res.certified and norm <= res.value <= norm * (1 + 1e-8)


# --- properties -----------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n0=st.integers(1, 4),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    act=st.sampled_from([nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU]),
)
def test_fast_between_realised_jacobians_and_product_of_norms(
    seed: int, n0: int, widths: list[int], act: type[nn.Module]
) -> None:
    net = _mlp([n0, *widths, 2], seed=seed, act=act)
    fast = sdp.lipsdp(net, (n0,), variant="fast")
    assert fast.certified
    assert _jac_max(net, n0, seed) <= fast.value * (1 + 1e-9)
    beta = 0.25 if act is nn.Sigmoid else 1.0
    assert fast.value <= _prod_norms(net) * beta ** len(widths) * (1 + 1e-6) + 1e-12
    default = sdp.lipsdp(net, (n0,))
    assert default.certified and default.value <= fast.value


# --- the optimiser -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "act", "seed"),
    [([4, 10, 10, 2], nn.ReLU, 0), ([5, 12, 8, 3], nn.Tanh, 1), ([3, 8, 8, 8, 1], nn.Sigmoid, 2)],
)
def test_default_equals_lipsdp_neuron_by_cvxopt(
    sizes: list[int], act: type[nn.Module], seed: int
) -> None:
    pytest.importorskip("cvxpy")
    net = _mlp(sizes, seed=seed, act=act)
    res = sdp.lipsdp(net, (sizes[0],))
    ref = sdp.lipsdp(net, (sizes[0],), solver="CVXOPT")
    assert res.certified and ref.certified
    assert any("barrier method: converged" in n for n in res.notes)
    # certified values agree to solver accuracy (CVXOPT's raw value can be off by its margin
    # on tiny constants: 2.8602e-3 raw vs 2.8557e-3 verified); ours is never worse
    assert abs(res.value / ref.value - 1) < 1e-4
    assert res.value <= ref.value * (1 + 1e-6)
    assert res.value <= res.extra["closed_form"]


def test_barrier_gradient_and_hessian_match_finite_differences() -> None:
    g = np.random.default_rng(0)
    tau = 0.3
    Ws = [g.standard_normal((4, 3)), g.standard_normal((5, 4)), g.standard_normal((2, 5))]
    for ranges in ([(0.0, 1.0), (0.0, 1.0)], [(0.1, 1.0), (0.0, 0.25)]):
        D = _Dense(Ws, ranges)
        _, _, ts, r0 = closed_form_multipliers([torch.as_tensor(W) for W in Ws], ranges)
        x = np.concatenate([torch.cat(ts).numpy() * (1 + 0.1 * g.random(D.N)), [3 * float(r0)]])

        def f(x: np.ndarray, D: _Dense = D) -> float:
            return D.barrier(x[:-1], float(x[-1]), tau)[0]

        def grad(x: np.ndarray, D: _Dense = D) -> np.ndarray:
            _, L = D.barrier(x[:-1], float(x[-1]), tau)
            assert L is not None
            return D.newton_system(x[:-1], float(x[-1]), tau, L)[0]

        _, L = D.barrier(x[:-1], float(x[-1]), tau)
        assert L is not None
        gr, Hs = D.newton_system(x[:-1], float(x[-1]), tau, L)
        h = 1e-6 * np.abs(x)
        E = np.diag(h)
        gn = np.array([(f(x + e) - f(x - e)) / (2 * hi) for e, hi in zip(E, h)])
        Hn = np.array([(grad(x + e) - grad(x - e)) / (2 * hi) for e, hi in zip(E, h)])
        assert np.allclose(gr, gn, rtol=1e-4, atol=1e-6 * np.abs(gr).max())
        assert np.allclose(Hs, Hn, rtol=1e-4, atol=1e-5 * np.abs(Hs).max())


def test_barrier_point_is_feasible_and_certified() -> None:
    net = _mlp([3, 8, 6, 2], seed=7, act=nn.Tanh)
    Ws, rng = sdp.slope_ranges_of(net, (3,))
    Wt = [torch.as_tensor(W) for W in Ws]
    _, _, ts, r0 = closed_form_multipliers(Wt, rng)
    t, r, steps, status = barrier_newton(Ws, rng, torch.cat(ts).numpy(), float(r0))
    assert status == "converged" and steps > 0 and r < float(r0)
    assert np.all(t > 0)
    assert np.linalg.eigvalsh(_Dense(Ws, rng).matrix(t, r)).min() > 0  # strictly inside
    split = [torch.as_tensor(x) for x in np.split(t, np.cumsum([8, 6])[:-1])]
    cert = certify_schur(Wt, rng, split)
    assert cert.rho is not None and cert.rho <= r * (1 + 1e-9)


# --- the certificate -------------------------------------------------------------------------


def test_certificate_fails_for_multipliers_perturbed_to_infeasibility() -> None:
    Ws = [torch.as_tensor(W) for W in _random_deep(10, 4, 3)]
    rng = [(0.0, 1.0)] * 3
    _, _, ts, _ = closed_form_multipliers(Ws, rng)
    assert certify_schur(Ws, rng, ts).rho is not None
    for i in range(3):
        bad = [t.clone() for t in ts]
        bad[i] = bad[i] * 1e3  # s > 2 / ((b - a)^2 g_max): the Schur complement turns indefinite
        assert certify_schur(Ws, rng, bad).rho is None
        bad[i] = ts[i].clone()
        bad[i][0] = -bad[i][0]  # one negative multiplier: the S-procedure needs T >= 0
        assert certify_schur(Ws, rng, bad).rho is None


@pytest.mark.parametrize("depth", [40, 80])
def test_deep_closed_form_is_certified_by_the_scaled_blocks(depth: int) -> None:
    # regression: without the power-of-two block congruence the last 2x2 block mixed scales
    # 1e10 apart and every r was refused ("no output bound r passed the check")
    Ws = _random_deep(12, depth, depth)
    ref = _eclipse_fast_reference(Ws)
    sol = solve_schur(Ws, [(0.0, 1.0)] * (depth - 1), optimise=False)
    assert sol.closed_form is not None
    assert ref * (1 - 1e-6) <= sol.closed_form <= ref * (1 + 1e-5)
    cs = [_pow2(torch.as_tensor(W)) for W in Ws]
    assert math.prod(cs) > 0


def test_fast_rejects_a_cvxpy_solver() -> None:
    with pytest.raises(InvalidArgumentError, match="variant='fast'"):
        sdp.lipsdp(_mlp([2, 3, 1], seed=0), (2,), variant="fast", solver="CVXOPT")
