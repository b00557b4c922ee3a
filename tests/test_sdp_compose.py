"""lipsdp composed with AutoLip on graphs that are not one dense chain (residual blocks,
max-pooling, branches): every bound is checked against exact / realised constants, AutoLip,
SeqLip, and the whole-chain path (which must not change on MLPs)."""

from __future__ import annotations

import copy
import math
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import ResMLP as _ResMLP
from _helpers import mlp as _mlp
from lipbound.errors import LipboundError
from lipbound.methods import sdp as sdp_mod
from lipbound.methods._schur import solve_schur
from lipbound.methods.autolip import autolip
from lipbound.methods.exact import exact
from lipbound.methods.lower import lower_bound
from lipbound.methods.sdp import lipsdp, slope_ranges_of
from lipbound.testing import generate, generators, realised_lipschitz

UP = 1 + 1e-9  # float slack of a comparison between two certified values


class _Branches(nn.Module):
    """``cat(f_1(x), f_2(x))`` of two ReLU chains: its constant is at least each chain's."""

    def __init__(self) -> None:
        super().__init__()
        self.f1 = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(),
                                nn.Linear(4, 2))
        self.f2 = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.f1(x), self.f2(x)], 1)


def _cnn(seed: int, pool: nn.Module | None = None) -> nn.Module:
    """Tiny CNN 1x6x6: conv, BN, ReLU, conv, ReLU, pool, flatten, linear, ReLU, linear."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), bn, nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
        pool if pool is not None else nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 6),
        nn.LeakyReLU(0.1), nn.Linear(6, 2),
    ).eval()


def _checked(model: nn.Module, shape: tuple[int, ...], **kw: object) -> float:
    """``lipsdp(model)``, checked: composed, certified, between the witnessed lower bounds
    (lower_bound and the adversarial realised search) and AutoLip."""
    r = lipsdp(model, shape, **kw)  # type: ignore[arg-type]
    assert r.certified and r.solver_status == "composed" and r.upper == r.value
    lo = lower_bound(model, shape, restarts=2, steps=20).value
    real = realised_lipschitz(model, shape, norms=("2",), points=16, pair_chains=4)["2"].value
    assert r.value >= lo and r.value >= real, (r.value, lo, real)
    assert r.value <= autolip(model, shape).value * UP
    return r.value


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_residual_mlp_is_certified_between_realised_and_autolip(act: type) -> None:
    torch.manual_seed(1)
    net = _ResMLP(act=act).double().eval()
    v = _checked(net, (3,))
    r = lipsdp(net, (3,))
    # every segment (the two blocks' inner chains, the head) got an SDP certificate
    assert len(r.extra["sdp_chains"]) == 3
    assert sum(row.op == "sdp-chain" and row.certified for row in r.layers) == 3
    assert v < autolip(net, (3,)).value


@pytest.mark.parametrize("pool", [None, nn.AvgPool2d(2)])
def test_tiny_cnn_dense_convolutions_beat_autolip(pool: nn.Module | None) -> None:
    net = _cnn(0, pool)
    if pool is not None:  # average pooling is linear: a single chain, today's path
        r = lipsdp(net, (1, 6, 6))
        assert r.certified and r.solver_status != "composed"
        assert r.value <= autolip(net, (1, 6, 6)).value * UP
        real = realised_lipschitz(net, (1, 6, 6), norms=("2",), points=16)["2"].value
        assert r.value >= real
        return
    v = _checked(net, (1, 6, 6))
    r = lipsdp(net, (1, 6, 6))
    # the conv / BatchNorm chain before the max-pool is lowered to dense matrices
    assert r.extra["sdp_chains"] == ["0+1..3", "6+7..9"], r.extra["sdp_chains"]
    assert v < autolip(net, (1, 6, 6)).value


def test_branches_are_above_the_exact_constant_of_each_branch() -> None:
    torch.manual_seed(3)
    net = _Branches().double().eval()
    v = _checked(net, (2,))
    for f in (net.f1, net.f2):
        ex = exact(f, (2,))
        assert ex.certified and v >= ex.value * (1 - 1e-9), (v, ex.value)
    # sqrt(L1^2 + L2^2) bounds the concatenation: with each chain's own LipSDP bound
    l1, l2 = lipsdp(net.f1, (2,)).value, lipsdp(net.f2, (2,)).value
    composed = lipsdp(net, (2,)).value
    assert composed <= math.hypot(l1, l2) * (1 + 1e-6)


@pytest.mark.parametrize("sizes,act", [([4, 16, 16, 3], nn.ReLU), ([3, 12, 8, 2], nn.Tanh),
                                       ([5, 10, 10, 10, 1], nn.LeakyReLU)])
def test_mlp_keeps_todays_whole_chain_value(sizes: list[int], act: type) -> None:
    net = _mlp(sizes, seed=2, act=act).double().eval()
    Ws, ranges = slope_ranges_of(net, (sizes[0],))
    for variant in ("neuron", "fast"):
        r = lipsdp(net, (sizes[0],), variant=variant)
        sol = solve_schur(Ws, ranges, time_limit=60.0, optimise=variant == "neuron")
        want = min(v for v in (sol.value, sol.closed_form) if v is not None)
        assert r.solver_status != "composed" and r.value == want


def test_every_fuzz_model_autolip_accepts_gets_a_bound_no_looser_than_autolip() -> None:
    ran = composed = 0
    for gen in generators()[::4]:
        prog = generate(0, focus=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = prog.build()
            try:
                a = autolip(model, prog.input_shape)
            except LipboundError:  # autolip refuses it: so may lipsdp
                continue
            r = lipsdp(model, prog.input_shape, time_limit=5.0)
        ran += 1
        composed += r.solver_status == "composed"
        assert r.certified == a.certified, gen.name
        assert r.value <= a.value * UP, (gen.name, r.value, a.value)
    assert ran >= 60 and composed >= 45, (ran, composed)


def test_one_time_limit_for_the_whole_call() -> None:
    torch.manual_seed(0)
    net = _ResMLP(d=8, width=700, blocks=2).double().eval()
    with torch.no_grad():
        net.head[2].weight.mul_(10.0)  # a chain left to AutoLip must keep ALL its factors
    lipsdp(_ResMLP().double().eval(), (3,))  # warm-up (torch.fx, LAPACK)
    for budget in (1.5,):
        t0 = time.perf_counter()
        r = lipsdp(net, (8,), time_limit=budget)
        took = time.perf_counter() - t0
        assert took <= 1.1 * budget + 0.5, (budget, took)  # 0.5 s: test_budgets' SLACK
        assert r.value <= autolip(net, (8,)).value * UP
        lo = lower_bound(net, (8,), restarts=1, steps=10).value
        assert r.value >= lo, (r.value, lo)


def test_float32_model_and_linear_matrices_of_segments() -> None:
    torch.manual_seed(4)
    net = _ResMLP().eval()  # float32: the node functions cast to the float64 inputs
    r = lipsdp(net, (3,))
    r64 = lipsdp(copy.deepcopy(net).double(), (3,))
    assert r.certified and r.value == r64.value
    stem = next(n for n in r.extra["graph"] if n.qualname == "stem")
    W = sdp_mod.linear_matrix(stem)
    assert W.dtype.name == "float64" and (W == net.stem.weight.detach().double().numpy()).all()


def test_non_slope_restricted_activation_splits_the_segments() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 8)
            self.c, self.d = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(F.relu(self.a(x)))
            h = F.softmax(h, dim=-1)  # an op, not an activation: the chain is cut here
            return self.d(F.relu(self.c(h)))

    torch.manual_seed(5)
    net = Net().double().eval()
    _checked(net, (3,))
    assert lipsdp(net, (3,)).extra["sdp_chains"] == ["a..b", "c..d"]


def test_chains_predicted_too_slow_keep_every_autolip_factor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(6)
    net = _ResMLP().double().eval()
    with torch.no_grad():
        net.head[2].weight.mul_(10.0)  # the factors after a chain's first node matter
    monkeypatch.setattr(sdp_mod, "_CERT_FLOPS", 1e300)  # no chain fits any time limit
    monkeypatch.setattr(sdp_mod, "segment_upper", lambda *a, **k: math.inf)  # no SeqLip floor
    r = lipsdp(net, (3,), time_limit=30.0)
    assert r.certified and r.extra["sdp_chains"] and not any(
        row.op == "sdp-chain" for row in r.layers)
    assert r.value == autolip(net, (3,)).value
    assert any("time limit: 3 chain(s)" in n for n in r.notes), r.notes


@pytest.mark.parametrize("seed", range(4))
def test_composed_lipsdp_never_looser_than_seqlip(seed: int) -> None:
    """Each segment of the composed lipsdp keeps SeqLip's certified factor as a floor
    (``methods._segment.segment_upper``) beside its residual-block LMIs: never above certified
    SeqLip on the same graph (it was, 0.988 against 0.981, before both)."""
    from lipbound.methods.seqlip import seqlip

    torch.manual_seed(seed)
    net = _ResMLP(d=3, width=6, blocks=2, act=nn.ReLU if seed % 2 else nn.Tanh).eval()
    sq = seqlip(net, (3,))
    sd = lipsdp(net, (3,))
    assert sq.upper is not None and sd.upper is not None
    assert sd.upper <= sq.upper * (1 + 1e-9), (sd.upper, sq.upper)
