"""Tests of lipbound.methods.sdp (LipSDP with verified certificates)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("cvxpy")

from _helpers import mlp as _mlp
from lipbound.errors import (
    InvalidArgumentError,
    MissingDependencyError,
    NotSequentialError,
)
from lipbound.methods import sdp as sdp_mod
from lipbound.methods.exact import exact
from lipbound.methods.sdp import SDPResult, lipsdp, verify_lipsdp


def _weights(net: nn.Sequential) -> list[np.ndarray]:
    return [m.weight.detach().double().numpy() for m in net if isinstance(m, nn.Linear)]


def _realised_max(net: nn.Module, n0: int, seed: int, n: int = 64) -> float:
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, n0, generator=gen, dtype=torch.float64) * 2
    jac = torch.func.vmap(torch.func.jacrev(lambda v: net(v.unsqueeze(0)).squeeze(0)))(xs)
    return float(torch.linalg.matrix_norm(jac.detach(), ord=2).max())


@pytest.mark.parametrize("solver", ["CLARABEL", "SCS", "CVXOPT"])
def test_single_linear_layer_is_spectral_norm(solver: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3)).double()
    norm = float(np.linalg.norm(_weights(net)[0], 2))
    res = lipsdp(net, (5,), solver=solver)
    assert isinstance(res, SDPResult) and res.certified and res.upper == res.value
    assert res.value >= norm  # certified: never below the true constant
    assert res.value <= norm * (1 + 1e-6)
    assert math.isclose(res.raw, norm, rel_tol=1e-4)
    assert res.upper == res.value and res.bound == "upper"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lipsdp_above_exact_and_neuron_tighter_than_layer(seed: int) -> None:
    net = _mlp([2, 6, 6, 2], seed=seed)
    ex = exact(net, (2,)).value
    neuron = lipsdp(net, (2,), variant="neuron")
    layer = lipsdp(net, (2,), variant="layer")
    assert neuron.certified and layer.certified
    assert ex <= neuron.value * (1 + 1e-9)
    assert neuron.value <= layer.value * (1 + 1e-5)
    prod = math.prod(float(np.linalg.norm(W, 2)) for W in _weights(net))
    assert layer.value <= prod * (1 + 1e-5)


@given(
    seed=st.integers(0, 10_000),
    n0=st.integers(1, 3),
    widths=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    act=st.sampled_from([nn.ReLU, nn.Tanh, nn.Sigmoid]),
)
def test_verified_bound_dominates_realised_jacobians(
    seed: int, n0: int, widths: list[int], act: type[nn.Module]
) -> None:
    net = _mlp([n0, *widths, 2], seed=seed, act=act)
    res = lipsdp(net, (n0,))
    assert res.certified
    assert _realised_max(net, n0, seed) <= res.value * (1 + 1e-9)
    # slope-restricted activations: LipSDP <= beta^(K-1) * product of norms
    beta = 0.25 if act is nn.Sigmoid else 1.0
    prod = math.prod(float(np.linalg.norm(W, 2)) for W in _weights(net)) * beta ** len(widths)
    assert res.value <= prod * (1 + 1e-5) + 1e-9


def test_sigmoid_one_hidden_closed_form_scalar_chain() -> None:
    # 1 -> 1 -> 1 chain: f(x) = w2 * sigmoid(w1 x), L = |w1 w2| / 4 exactly, and LipSDP is tight
    net = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        net[0].weight.fill_(3.0)
        net[2].weight.fill_(-2.0)
    res = lipsdp(net, (1,))
    assert res.value >= 1.5 and math.isclose(res.value, 1.5, rel_tol=1e-5)


def test_verification_rejects_bad_multipliers_and_accepts_good_ones() -> None:
    net = _mlp([2, 4, 3], seed=3)
    Ws = _weights(net)
    ranges = [(0.0, 1.0)]
    rho, why = verify_lipsdp(Ws, ranges, [np.zeros(4)])
    assert rho is None and "failed" in why
    res = lipsdp(net, (2,), solver="CVXOPT")
    # rebuild a certificate by hand: large multipliers work for a large enough rho
    rho2, _ = verify_lipsdp(Ws, ranges, [np.full(4, 10.0)])
    assert rho2 is not None
    # the verified rho really makes M negative semidefinite
    N = sdp_mod._assemble(Ws, ranges, [np.full(4, 10.0)])
    N[:2, :2] -= rho2 * np.eye(2)
    assert float(np.linalg.eigvalsh(N).max()) <= 0
    assert math.sqrt(rho2) >= res.raw * (1 - 1e-6)  # a feasible point is never below the optimum


def test_bad_multipliers_are_repaired_or_labelled_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _mlp([2, 4, 3, 1], seed=0)

    def fake_solve(cp, Ws, ranges, variant, solver, margin, opts):  # type: ignore[no-untyped-def]
        return 1e-3, [np.zeros(W.shape[0]) for W in Ws[:-1]], "optimal_inaccurate"

    monkeypatch.setattr(sdp_mod, "_solve", fake_solve)
    res = lipsdp(net, (2,), solver="CVXOPT")
    # zero multipliers never verify; the closed-form certificate repairs them
    assert res.certified and "repaired" in " ".join(res.notes)
    assert res.value >= _realised_max(net, 2, 0)
    monkeypatch.setattr(sdp_mod, "_repair", lambda Ws, ranges, tv: (None, math.nan))
    res = lipsdp(net, (2,), solver="CVXOPT")
    assert not res.certified and res.upper is None and res.bound == "estimate"
    assert "NOT certified" in " ".join(res.notes)


def test_solver_without_solution_falls_back_to_closed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _mlp([2, 5, 4, 1], seed=2)
    good = lipsdp(net, (2,), solver="CVXOPT")
    monkeypatch.setattr(sdp_mod, "_solve", lambda *a: (math.nan, None, "infeasible_inaccurate"))
    res = lipsdp(net, (2,), solver="CVXOPT")
    assert res.certified and "closed-form" in " ".join(res.notes)
    assert res.value >= good.value * (1 - 1e-9)
    assert res.value >= _realised_max(net, 2, 2)


def test_analytic_multipliers_certify_a_bound() -> None:
    net = _mlp([3, 6, 5, 4, 2], seed=4, act=nn.Tanh)
    Ws = _weights(net)
    ranges = [(0.0, 1.0)] * 3
    ta = sdp_mod.analytic_multipliers(Ws, ranges)
    assert ta is not None
    rho, why = verify_lipsdp(Ws, ranges, ta)
    assert rho is not None, why
    assert math.sqrt(rho) >= lipsdp(net, (3,)).raw * (1 - 1e-6)
    assert math.sqrt(rho) >= _realised_max(net, 3, 1)


def test_functional_relu_model() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 5)
            self.b = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.a(x)))

    torch.manual_seed(0)
    net = Net().double()
    seq = nn.Sequential(net.a, nn.ReLU(), net.b)
    a, b = lipsdp(net, (3,)), lipsdp(seq, (3,))
    assert math.isclose(a.value, b.value, rel_tol=1e-6)


def test_missing_cvxpy_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cvxpy", None)
    with pytest.raises(MissingDependencyError, match="lipbound\\[sdp\\]"):
        lipsdp(_mlp([2, 3, 1], seed=0), (2,), solver="CVXOPT")


def test_residual_model_is_composed_by_the_schur_path_only(residual_net: nn.Module) -> None:
    # the Schur / closed-form path composes with AutoLip (tests/test_sdp_compose.py); the cvxpy
    # solvers and the layer variant still need one chain
    r = lipsdp(residual_net, (2,))
    assert r.certified and r.solver_status == "composed"
    with pytest.raises(NotSequentialError):
        lipsdp(residual_net, (2,), solver="CVXOPT")
    with pytest.raises(NotSequentialError):
        lipsdp(residual_net, (2,), variant="layer")


def test_bad_arguments() -> None:
    net = _mlp([2, 3, 1], seed=0)
    with pytest.raises(InvalidArgumentError):
        lipsdp(net, (2,), variant="network")
    with pytest.raises(InvalidArgumentError):
        lipsdp(net, (2,), solver="MOSEK")


def test_large_dense_layer_keeps_autolip_and_is_never_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lipbound.errors import UnsupportedModelError
    from lipbound.methods.autolip import autolip

    net = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 3)).double().eval()
    with pytest.raises(UnsupportedModelError, match="max_dense_entries=1000"):
        lipsdp(net, (50,), max_dense_entries=1000, solver="CVXOPT")  # cvxpy: one dense chain

    built: list[int] = []
    real = sdp_mod.linear_matrix
    monkeypatch.setattr(sdp_mod, "linear_matrix", lambda n: built.append(1) or real(n))
    r = lipsdp(net, (50,), max_dense_entries=1000)
    assert not built and r.certified and r.value == autolip(net, (50,)).value
    assert any("max_dense_entries=1000" in n for n in r.notes), r.notes
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 16 * 16, 2)).eval()
    r = lipsdp(conv, (3, 16, 16), max_dense_entries=100_000)
    assert not built and r.certified and r.extra["sdp_chains"] == []


def test_certificate_that_cannot_fit_the_time_limit_falls_back() -> None:
    from lipbound.errors import SolverError

    # 14 * 3000^3 = 3.8e11 flops: longer than 1 ms on any machine
    net = nn.Sequential(nn.Linear(8, 3000), nn.ReLU(), nn.Linear(3000, 2)).eval()
    # the whole-chain certificate cannot fit: the composed path keeps AutoLip's product, whose
    # constants cannot fit 1 ms either
    with pytest.raises(SolverError, match="raise time_limit"):
        lipsdp(net, (8,), time_limit=1e-3)
    with pytest.raises(SolverError, match="time_limit"):
        lipsdp(net, (8,), variant="fast", time_limit=1e-3)
    r = lipsdp(net, (8,), time_limit=2.0)
    assert r.certified and r.solver_status == "composed"
    assert any("time_limit=2" in n for n in r.notes), r.notes


ALL = ("lower", "autolip", "seqlip", "lipsdp")


def test_bound_runs_lipsdp_on_chains_and_composed_on_others(
    residual_net: nn.Module,
) -> None:
    from lipbound.report import bound

    net = _mlp([3, 8, 8, 2], seed=1).eval()
    rep = bound(net, (3,), methods=ALL, lower={"restarts": 2, "steps": 10},
                seqlip={"mode": "greedy"})
    run = {r.name: r for r in rep.runs}
    assert "lipsdp" in run and run["lipsdp"].ok and run["lipsdp"].result is not None
    assert run["lipsdp"].result.certified
    assert rep.upper is not None and rep.upper <= run["autolip"].result.value  # type: ignore[union-attr]
    rep2 = bound(residual_net, (2,), methods=ALL, lower={"restarts": 2, "steps": 10})
    run2 = {r.name: r for r in rep2.runs}
    # composed with AutoLip on non-chains (it ran before as a refusal)
    assert run2["lipsdp"].ok and rep2.upper is not None
    assert run2["lipsdp"].result.upper >= rep2.lower  # type: ignore[union-attr,operator]
