"""LipSDP-neuron for residual blocks ``y = S x + W_k phi(... W_1 x)`` (methods/_residual.py)
and its use inside the composed lipsdp: closed forms (an interior-point solution of the same
LMI, vertex enumeration of the Jacobians), properties, failing certificates, regressions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _helpers import ResMLP
from lipbound.methods import _residual
from lipbound.methods import sdp as sdp_mod
from lipbound.methods._residual import certify_residual, scaled_block, solve_residual
from lipbound.methods.autolip import autolip
from lipbound.methods.sdp import lipsdp
from lipbound.testing import realised_lipschitz

UP = 1 + 1e-9


def _block(seed: int, n: int = 3, h: int = 5, k: int = 2, shortcut: bool = False,
           scale: float = 0.7) -> tuple[np.ndarray, list[np.ndarray]]:
    rs = np.random.default_rng(seed)
    dims = [n] + [h] * (k - 1) + [n]
    Ws = [rs.normal(size=(dims[i + 1], dims[i])) * scale for i in range(k)]
    S = rs.normal(size=(n, n)) if shortcut else np.eye(n)
    return S, Ws


def _clarabel(S: np.ndarray, Ws: list[np.ndarray], ranges: list[tuple[float, float]]) -> float:
    """The block's LipSDP-neuron LMI (module docstring of _residual) by cvxpy + Clarabel."""
    cp = pytest.importorskip("cvxpy")
    if "CLARABEL" not in cp.installed_solvers():
        pytest.skip("Clarabel is not installed")
    dims = [Ws[0].shape[1]] + [W.shape[0] for W in Ws[:-1]]
    offs = np.concatenate([[0], np.cumsum(dims)])
    eye = np.eye(int(offs[-1]))
    E = [eye[offs[i]:offs[i + 1]] for i in range(len(dims))]
    rho = cp.Variable()
    ts = [cp.Variable(d, nonneg=True) for d in dims[1:]]
    F = S @ E[0] + Ws[-1] @ E[-1]
    M = F.T @ F - rho * (E[0].T @ E[0])
    for i, ((a, b), t) in enumerate(zip(ranges, ts)):
        Hm, G, T = Ws[i] @ E[i], E[i + 1], cp.diag(t)
        M = M - 2 * a * b * (Hm.T @ T @ Hm) + (a + b) * (Hm.T @ T @ G + G.T @ T @ Hm)
        M = M - 2 * (G.T @ T @ G)
    cp.Problem(cp.Minimize(rho), [(M + M.T) / 2 << 0]).solve(solver="CLARABEL")
    return math.sqrt(float(rho.value))


def _vertex_max(S: np.ndarray, W1: np.ndarray, W2: np.ndarray, a: float, b: float) -> float:
    """``max ||S + W2 D W1||`` over diagonal ``D`` with entries in ``[a, b]`` (a convex function
    of ``D``: attained at a vertex), the Lipschitz bound every slope-[a, b] branch obeys."""
    return max(float(np.linalg.norm(S + W2 @ np.diag(d) @ W1, 2))
               for d in itertools.product((a, b), repeat=W1.shape[0]))


@pytest.mark.parametrize("seed,k,shortcut,rng", [
    (0, 2, False, (0.0, 1.0)), (1, 2, True, (0.0, 1.0)), (2, 2, False, (0.1, 1.0)),
    (3, 3, False, (0.0, 1.0)), (4, 3, True, (0.0, 0.25)), (5, 2, True, (-0.5, 1.0)),
])
def test_block_bound_equals_the_interior_point_solution(
    seed: int, k: int, shortcut: bool, rng: tuple[float, float]
) -> None:
    S, Ws = _block(seed, k=k, shortcut=shortcut)
    sol = solve_residual(S, Ws, [rng] * (k - 1))
    ref = _clarabel(S, Ws, [rng] * (k - 1))
    assert sol.value is not None and sol.closed_form is not None
    assert sol.value <= sol.closed_form
    assert abs(sol.value / ref - 1) < 1e-5, (sol.value, ref)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shortcut=st.booleans(),
       rng=st.sampled_from([(0.0, 1.0), (0.01, 1.0), (0.0, 0.25), (-0.3, 1.0)]),
       scale=st.sampled_from([1e-3, 0.5, 3.0]))
def test_block_bound_is_above_every_vertex_jacobian(
    seed: int, shortcut: bool, rng: tuple[float, float], scale: float
) -> None:
    S, Ws = _block(seed, n=3, h=4, shortcut=shortcut, scale=scale)
    sol = solve_residual(S, Ws, [rng])
    assert sol.value is not None
    assert sol.value >= _vertex_max(S, Ws[0], Ws[1], *rng), (sol.value,)


def test_block_bound_is_above_the_sampled_constant_of_a_tiny_block() -> None:
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.b(torch.tanh(self.a(x)))

    net = Block().double().eval()
    W1, W2 = net.a.weight.detach().numpy(), net.b.weight.detach().numpy()
    sol = solve_residual(np.eye(3), [W1, W2], [(0.0, 1.0)])
    real = realised_lipschitz(net, (3,), norms=("2",), points=32, pair_chains=8)["2"].value
    assert sol.value is not None and sol.value >= real
    # and it is what the composed lipsdp uses for the model
    r = lipsdp(net, (3,))
    assert r.certified and any(row.op == "sdp-residual" for row in r.layers)
    assert real <= r.value <= sol.value * (1 + 1e-6)


def test_certificate_fails_on_multipliers_perturbed_to_infeasibility() -> None:
    S, Ws = _block(7, shortcut=True)
    sol = solve_residual(S, Ws, [(0.0, 1.0)])
    Sp, Wp, _ = scaled_block(S, Ws, [(0.0, 1.0)])
    ok = certify_residual(Sp, Wp, [(0.0, 1.0)], sol.multipliers)
    assert ok.rho is not None
    # A(T) = [[I, -W^T T], [-T W, 2T]] has Schur complement I - W^T T W / 2: not PSD for T large
    big = certify_residual(Sp, Wp, [(0.0, 1.0)], [t * 1e6 for t in sol.multipliers])
    assert big.rho is None and "not positive definite" in big.why
    neg = certify_residual(Sp, Wp, [(0.0, 1.0)], [-t for t in sol.multipliers])
    assert neg.rho is None


def test_residual_mlp_lipsdp_is_below_the_segment_composition() -> None:
    """Regression: the composed lipsdp multiplied (1 + bound of the branch) over the blocks
    (1.0867 on test_sdp_compose's net, above SeqLip's 1.0866); each block now has its LMI."""
    torch.manual_seed(1)
    net = ResMLP(blocks=3).double().eval()
    r = lipsdp(net, (3,))
    assert r.certified
    branch = [lipsdp(nn.Sequential(net.inner[i], nn.ReLU(), net.inner[i + 1]), (6,)).value
              for i in range(0, 6, 2)]
    old = (float(np.linalg.norm(net.stem.weight.detach().numpy(), 2))
           * math.prod(1 + b for b in branch) * lipsdp(net.head, (6,)).value)
    assert r.value < 0.9 * old, (r.value, old)
    real = realised_lipschitz(net, (3,), norms=("2",), points=16, pair_chains=4)["2"].value
    assert r.value >= real
    assert r.value <= autolip(net, (3,)).value * UP


def test_failed_block_certificates_fall_back_to_the_composition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(2)
    net = ResMLP(blocks=3).double().eval()
    with monkeypatch.context() as m:
        m.setattr(sdp_mod, "_residual_blocks", lambda graph, segments: [])
        base = lipsdp(net, (3,)).value
    monkeypatch.setattr(_residual, "certify_residual",
                        lambda *a, **k: _residual.SchurCertificate(None, "forced failure"))
    r = lipsdp(net, (3,))
    rows = [row for row in r.layers if row.op == "sdp-residual"]
    assert len(rows) == 3 and not any(row.certified for row in rows)
    assert r.certified and r.value == base


def test_blocks_above_max_dense_entries_are_skipped_with_a_note() -> None:
    torch.manual_seed(3)
    net = ResMLP(blocks=3).double().eval()
    r = lipsdp(net, (3,), max_dense_entries=100)  # the blocks' LMIs have 18^2 = 324 entries
    assert not any(row.op == "sdp-residual" for row in r.layers)
    assert any("3 skipped" in n for n in r.notes), r.notes
