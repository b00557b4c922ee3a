"""CROWN-style intermediate bounds (lipbound.local.crown): closed forms, soundness, regressions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lipbound
from lipbound.graph import capture, simplify
from lipbound.local import forward_boxes
from lipbound.local.crown import CrownBudget, relaxation
from lipbound.local.interval import Box
from lipbound.zoo.transformers import tiny_vit

torch.set_num_threads(1)
F64 = torch.float64
ACTS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


class Residual(nn.Module):
    """Linear -> act -> Linear + skip -> LayerNorm -> act -> Linear (an add and a norm)."""

    def __init__(self, act: str, d: int = 5) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, 10), nn.Linear(10, d), nn.Linear(d, 3)
        self.ln, self.f, self.g = nn.LayerNorm(d), ACTS[act](), ACTS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.b(self.f(self.a(x)))
        return self.c(self.g(self.ln(h)))


def _values(g, z: torch.Tensor) -> dict[str, torch.Tensor]:
    vals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for node in g:
            vals[node.name] = z if node.kind == "input" else (
                vals[node.inputs[0]] if node.kind == "output" else
                node.fn(*[vals[p] for p in node.inputs]))
    return vals


@pytest.mark.parametrize("act", sorted(ACTS))
def test_relaxation_lines_enclose_the_activation_on_a_dense_grid(act: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 40), ACTS[act]())
    node = next(n for n in simplify(capture(net, (3,))) if n.kind == "activation")
    c = torch.randn(1, 40, dtype=F64) * 3
    r = torch.rand(1, 40, dtype=F64) * 4
    a_l, b_l, a_u, b_u = relaxation(node, Box(c, r))
    t = c - r + 2 * r * torch.linspace(0, 1, 2001, dtype=F64)[:, None]
    s = node.fn(t)
    assert bool((a_l * t + b_l <= s).all()) and bool((s <= a_u * t + b_u).all())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(act=st.sampled_from(sorted(ACTS)), seed=st.integers(0, 10_000),
       log_r=st.floats(-2.0, 0.3), norm=st.sampled_from(["2", "inf"]),
       conv=st.booleans())
def test_crown_boxes_contain_sampled_values_and_are_never_looser_than_ibp(
        act: str, seed: int, log_r: float, norm: str, conv: bool) -> None:
    torch.manual_seed(seed)
    if conv:
        net: nn.Module = nn.Sequential(nn.Unflatten(1, (1, 5, 5)), nn.Conv2d(1, 3, 3),
                                       ACTS[act](), nn.Conv2d(3, 2, 2), ACTS[act](),
                                       nn.Flatten(), nn.Linear(8, 3))
        d = 25
    else:
        net, d = Residual(act), 5
    net = net.eval().double()
    x = torch.randn(2, d, dtype=F64)
    radius = 10.0 ** log_r
    g = simplify(capture(net, (d,)))
    ibp = forward_boxes(g, x, radius, norm)
    boxes = forward_boxes(g, x, radius, norm, crown=CrownBudget(1 << 13))
    u = torch.randn(2, 64, d, dtype=F64, generator=torch.Generator().manual_seed(seed))
    u = (u / u.norm(dim=-1, keepdim=True) if norm == "2" else u.sign()) * radius * (1 - 1e-9)
    vals = _values(g, (x[:, None, :] + u).reshape(-1, d))
    for node in g:
        b, v = boxes[node.name], vals[node.name].reshape(2, 64, *boxes[node.name].c.shape[1:])
        assert bool(((v - b.c[:, None]).abs() <= b.r[:, None]).all()), node.qualname
        assert bool((b.r <= ibp[node.name].r).all()), node.qualname


def test_regression_crown_proves_stable_a_relu_that_ibp_leaves_unstable() -> None:
    # z1 = W1 x + 10 is positive on the ball, so z2 = W2 relu(z1) + b2 = 2 x_1 + 3r is affine
    # there, with the exact range [r, 5r] over the l-inf ball; IBP gives [-r, 7r].
    r = 0.1
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1))
    net = net.eval().double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[0].bias.fill_(10.0)
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
        net[2].bias.fill_(-20.0 + 3 * r)
    g = simplify(capture(net, (2,)))
    z2 = next(n for n in g if n.kind == "activation" and n.qualname.startswith("3")).inputs[0]
    x = torch.zeros(1, 2, dtype=F64)
    ibp = forward_boxes(g, x, r, "inf")[z2]
    cr = forward_boxes(g, x, r, "inf", crown=CrownBudget(1 << 13))[z2]
    assert float(ibp.lo) < 0  # IBP: unstable
    assert float(cr.lo) > 0  # CROWN: stable, and the exact range up to rounding
    # (the rounding allowance is REL64 = 2^-30 times magnitudes ~20)
    assert float(cr.lo) == pytest.approx(r, abs=1e-6)
    assert float(cr.hi) == pytest.approx(5 * r, abs=1e-6)


def test_budget_leaves_ibp_boxes_with_a_note() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 30), nn.Tanh(), nn.Linear(30, 30), nn.Tanh(),
                        nn.Linear(30, 2)).eval()
    res = lipbound.local_bound(net, torch.randn(2, 4), 0.5, lower=False,
                               options=lipbound.LocalOptions(crown=8, use_global=False))
    assert any("IBP box kept" in n for n in res.notes)


def test_regression_certify_local_uses_the_telescoped_bound() -> None:
    # the 1-block TinyViT at radius 1e-4: the interval bound is several times ||grad||, the
    # telescoped one (which local_bound already used) within a few per cent of it
    vit = tiny_vit(seed=0, depth=1).eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = vit(x).argmax(dim=1)
    res = lipbound.certify(vit, x, y, 1e-4, method="local")
    m64 = vit.double()
    for i in range(2):
        j = res.runner_up[i]
        z = x[i:i + 1].double().requires_grad_(True)
        out = m64(z)
        (grad,) = torch.autograd.grad(out[0, int(y[i])] - out[0, j], z)
        assert float(grad.norm()) <= res.constant[i] <= 1.05 * float(grad.norm())
