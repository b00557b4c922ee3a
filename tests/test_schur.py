"""Tests of lipbound.methods._schur (LipSDP-neuron by Schur complements, certified)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import mlp as _mlp
from lipbound.methods import sdp
from lipbound.methods._schur import certify_schur, closed_form_multipliers, solve_schur
from lipbound.methods.exact import exact


def _jac_max(net: nn.Module, n0: int, seed: int, n: int = 64) -> float:
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(n):
        x = torch.randn(n0, generator=gen, dtype=torch.float64) * 2
        J = torch.autograd.functional.jacobian(lambda v: net(v.unsqueeze(0)).squeeze(0), x)
        best = max(best, float(torch.linalg.matrix_norm(J, ord=2)))
    return best


@pytest.mark.parametrize(
    ("sizes", "act", "seed"),
    [([3, 10, 10, 2], nn.ReLU, 0), ([4, 12, 8, 3], nn.Tanh, 1), ([3, 10, 1], nn.LeakyReLU, 2),
     # wider input than first layer: the barrier method searches on the QR-reduced LMI
     ([30, 6, 5, 2], nn.ReLU, 3), ([25, 8, 3], nn.Tanh, 4), ([40, 7, 7, 1], nn.LeakyReLU, 5)],
)
def test_schur_equals_lipsdp_neuron_by_clarabel(
    sizes: list[int], act: type[nn.Module], seed: int
) -> None:
    pytest.importorskip("cvxpy")
    net = _mlp(sizes, seed=seed, act=act)
    res = sdp.lipsdp(net, (sizes[0],))
    ref = sdp.lipsdp(net, (sizes[0],), solver="CLARABEL")
    assert res.solver == "schur" and res.certified and ref.certified
    assert abs(res.value / ref.raw - 1) < 1e-4
    assert res.value >= _jac_max(net, sizes[0], seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_schur_above_exact_constant(seed: int) -> None:
    net = _mlp([2, 6, 5, 2], seed=seed)
    ex = exact(net, (2,)).value
    res = sdp.lipsdp(net, (2,), solver="schur")
    assert res.certified and res.value >= ex * (1 - 1e-12)


def test_certificate_fails_for_perturbed_multipliers() -> None:
    net = _mlp([3, 8, 8, 2], seed=3)
    Ws, rng = sdp.slope_ranges_of(net, (3,))
    sol = solve_schur(Ws, rng)
    # rebuild the power-of-two scaled problem the solver certified
    cs = [float(2.0 ** round(math.log2(float(np.linalg.norm(W, 2))))) for W in Ws]
    Wt = [torch.as_tensor(W) / c for W, c in zip(Ws, cs)]
    good = certify_schur(Wt, rng, sol.multipliers)
    assert good.rho is not None
    assert math.isclose(math.sqrt(good.rho) * math.prod(cs), sol.value, rel_tol=1e-12)
    bad = [t.clone() for t in sol.multipliers]
    bad[0] = bad[0] * 1e3  # far beyond the feasibility boundary s < 2 / ((b - a)^2 g_max)
    assert certify_schur(Wt, rng, bad).rho is None
    zero = [torch.zeros_like(t) for t in sol.multipliers]
    assert certify_schur(Wt, rng, zero).rho is None
    neg = [-t for t in sol.multipliers]
    assert certify_schur(Wt, rng, neg).rho is None


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU])
def test_closed_form_is_certified_and_above_optimised(act: type[nn.Module]) -> None:
    net = _mlp([4, 12, 12, 12, 3], seed=5, act=act)
    Ws, rng = sdp.slope_ranges_of(net, (4,))
    sol = solve_schur(Ws, rng)
    assert sol.closed_form is not None and sol.value is not None
    assert sol.closed_form >= sol.value
    assert sol.closed_form >= sol.closed_raw and sol.value >= sol.raw * (1 - 1e-12)
    assert sol.value >= _jac_max(net, 4, 5)
    # closed form with D = I: T_i is a multiple of the identity
    Wt = [torch.as_tensor(W) for W in Ws]
    _, _, ts, _ = closed_form_multipliers(Wt, rng)
    assert all(bool(torch.all(t == t[0])) for t in ts)


def test_single_layer_is_spectral_norm() -> None:
    net = _mlp([5, 3], seed=0)
    W = net[0].weight.detach().numpy()
    res = sdp.lipsdp(net, (5,))
    norm = float(np.linalg.norm(W, 2))
    assert res.certified and norm <= res.value <= norm * (1 + 1e-8)


def test_regression_zero_output_layer_crashed_the_barrier_method() -> None:
    """The fuzzer's finding (seed 13): ``0 * mish(x)`` has a zero last weight matrix; the
    barrier method's Newton system got zero / non-finite rows and scipy's ``cho_solve``
    raised ``ValueError: array must not contain infs or NaNs``. The search now stops there
    and the certified bound (of a map whose constant is 0) comes back."""
    net = nn.Sequential(nn.Linear(12, 12), nn.Mish(), nn.Linear(12, 12)).double().eval()
    with torch.no_grad():
        net[2].weight.zero_()
    res = sdp.lipsdp(net, (12,))
    assert res.certified and res.upper is not None
    assert 0.0 <= res.upper <= 1e-100
