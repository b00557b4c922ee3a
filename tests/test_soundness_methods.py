"""Soundness of the bound methods on bad inputs: train mode, memory, extreme weights, zero
operators, wrappers and odd input shapes (through the public API)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import lipbound
from lipbound import InvalidArgumentError, ShapeError, TrainingModeError, ZeroOperatorError
from lipbound.spectral import certify as C

NORMS = ("1", "2", "inf")
_ORD = {"1": 1, "2": 2, "inf": math.inf}


def _jac_norm(f, x: torch.Tensor, norm: str) -> float:
    J = torch.autograd.functional.jacobian(lambda z: f(z.unsqueeze(0))[0].reshape(-1), x)
    J = J.reshape(J.shape[0], -1).double()
    return float(torch.linalg.matrix_norm(J, _ORD[norm]))


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).to(dtype).eval()


def _scaled(net: nn.Module, s: float) -> nn.Module:
    net = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(s)
    return net


def _truth(net: nn.Module, norm: str, n: int = 6, draws: int = 20) -> float:
    """Largest realised Jacobian norm at random points (float64): a lower bound of L."""
    net64 = copy.deepcopy(net).double()
    gen = torch.Generator().manual_seed(1)
    return max(_jac_norm(net64, torch.randn(n, generator=gen, dtype=torch.float64), norm)
               for _ in range(draws))


# ---- 1. train mode --------------------------------------------------------------------------
def test_regression_train_mode_is_refused_by_every_bound_method() -> None:
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.5), nn.Linear(10, 3))
    net.train()
    calls = [
        lambda: lipbound.autolip(net, (6,)),
        lambda: lipbound.seqlip(net, (6,)),
        lambda: lipbound.lower_bound(net, (6,), restarts=2, steps=5),
        lambda: lipbound.bound(net, (6,)),
        lambda: lipbound.spectral_norm(nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.3)), (6,)),
    ]
    for call in calls:
        with pytest.raises(TrainingModeError, match=r"\d \(Dropout\).*eval\(\)"):
            call()
    bn = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    with pytest.raises(TrainingModeError, match="BatchNorm1d"):  # not a shape error
        lipbound.lower_bound(bn, (6,))
    # eval mode: the certified upper bound dominates the realised Jacobian norm in each norm
    net.eval()
    for norm in NORMS:
        up = lipbound.autolip(net, (6,), norm=norm).value
        assert up >= _truth(net, norm) * (1 - 1e-9)
    # a freshly built net (training flag set, but no mode-dependent layer) is accepted
    assert lipbound.autolip(_mlp().train(), (6,)).certified


def test_train_mode_penalty_still_accepts_training_models() -> None:
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.5), nn.Linear(10, 3)).train()
    pen = lipbound.LipschitzPenalty(net, (6,))
    assert torch.isfinite(torch.as_tensor(pen())).all()


# ---- 2. memory ------------------------------------------------------------------------------
def test_regression_dense_jacobian_chunk_sized_by_input_width(monkeypatch) -> None:
    seen: list[int] = []
    real = C.module_call

    def spy(module, dtype):  # record the size of every batch pushed through the op
        call = real(module, dtype)

        def wrapped(x: torch.Tensor) -> torch.Tensor:
            seen.append(x.numel() * x.element_size())
            return call(x)

        return wrapped

    monkeypatch.setattr(C, "module_call", spy)
    lin = nn.Linear(49152, 10).eval()
    J = C.dense_jacobian(lin, (49152,))
    assert J is not None and J.shape == (10, 49152)
    assert max(seen) <= C.DENSE_CHUNK_BYTES  # was 19 GB for one chunk
    W = lin.weight.detach().double()
    assert torch.allclose(J, W, rtol=0, atol=1e-12)
    for norm in NORMS:
        b, _ = C.dense_upper(lin, (49152,), norm)
        assert b >= float(torch.linalg.matrix_norm(W, _ORD[norm])) * (1 - 1e-12)


def test_regression_absurd_input_shape_fails_before_allocating() -> None:
    with pytest.raises(ShapeError, match="MAX_INPUT_ENTRIES"):
        lipbound.autolip(nn.Linear(4, 2), (10**9,))
    with pytest.raises(ShapeError, match="MAX_INPUT_ENTRIES"):
        lipbound.spectral_norm(nn.Linear(4, 2), (1000, 1000, 1000))


# ---- 3. extreme weights, zero operators, meta ----------------------------------------------
def test_regression_meta_device_model_is_refused_clearly() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    for call in (lipbound.autolip, lipbound.lower_bound, lipbound.seqlip):
        with pytest.raises(InvalidArgumentError, match="meta device have no values"):
            call(net, (6,))


@pytest.mark.parametrize("s", [1e30, 2.0**100])
def test_regression_huge_weights_no_linalg_error(s: float) -> None:
    net = _scaled(_mlp(), s)
    truth = {norm: _truth(net, norm) for norm in NORMS}
    for norm in NORMS:
        up = lipbound.autolip(net, (6,), norm=norm)
        assert up.certified and up.value >= truth[norm] * (1 - 1e-9)
    sq = lipbound.seqlip(net, (6,))
    assert sq.upper >= truth["2"] * (1 - 1e-9)
    lo = lipbound.lower_bound(net, (6,), restarts=4, steps=20)
    assert 0 < lo.value <= sq.upper * (1 + 1e-6)
    r = lipbound.spectral_norm(net[0], (6,), tol=1e-3)
    W = net[0].weight.detach().double()
    assert r.value == pytest.approx(float(torch.linalg.matrix_norm(W, 2)), rel=1e-3)
    assert r.upper >= float(torch.linalg.matrix_norm(W, 2))


def test_regression_float32_overflow_lower_bound_in_float64() -> None:
    net = _mlp()
    with torch.no_grad():  # W2 relu(b1) ~ 3e38 * 3e38 overflows float32 at x = 0
        net[0].weight.mul_(1e36)
        net[0].bias.fill_(1e36)
        net[2].weight.mul_(3e30)
    up = lipbound.autolip(net, (6,))
    lo = lipbound.lower_bound(net, (6,), restarts=4, steps=20)
    assert math.isfinite(lo.value) and lo.value > 0
    assert lo.value <= up.value * (1 + 1e-6)
    assert "float64" in " ".join(lo.notes)
    x, y = lo.x, lo.y
    net64 = copy.deepcopy(net).double()
    if y is not None:
        ratio = float((net64(x[None]) - net64(y[None])).norm() / (x - y).norm())
        assert ratio >= lo.value * (1 - 1e-9)


def test_regression_tiny_weights_are_not_a_zero_operator() -> None:
    net = _scaled(_mlp(dtype=torch.float64), 1e-150)
    truth = {norm: _truth(net, norm) for norm in NORMS}
    assert truth["2"] > 0
    for norm in NORMS:
        up = lipbound.autolip(net, (6,), norm=norm)
        assert up.value >= truth[norm] * (1 - 1e-9)
        assert up.value <= truth[norm] * 1e3  # its true tiny constant, not 0 and not huge
    sq = lipbound.seqlip(net, (6,))
    assert truth["2"] * (1 - 1e-9) <= sq.upper <= up.value * 2
    r = lipbound.spectral_norm(net[0], (6,))
    W = net[0].weight.detach()
    assert r.value == pytest.approx(float(torch.linalg.matrix_norm(W, 2)), rel=1e-6)
    assert r.upper >= float(torch.linalg.matrix_norm(W, 2))


def test_regression_zero_layer_has_constant_zero() -> None:
    lin = nn.Linear(6, 3).eval()
    with torch.no_grad():
        lin.weight.zero_()
    r = lipbound.spectral_norm(lin, (6,))
    assert r.value == 0.0 and r.upper == 0.0 and r.certified
    with pytest.raises(ZeroOperatorError, match="no singular vectors"):
        lipbound.top_singular(lin, (6,), 2)
    lin2 = nn.Linear(10, 3).eval()
    with torch.no_grad():
        lin2.weight.zero_()
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), lin2).eval()
    for norm in NORMS:
        assert lipbound.autolip(net, (6,), norm=norm).value == 0.0
    assert lipbound.seqlip(net, (6,)).upper == 0.0


class _Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        with torch.no_grad():
            self.b.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(torch.relu(x))


def test_regression_zero_residual_branch_is_constant_zero() -> None:
    net = _Res().eval()
    for norm in NORMS:
        W = net.a.weight.detach().double()
        up = lipbound.autolip(net, (6,), norm=norm)
        assert up.value >= float(torch.linalg.matrix_norm(W, _ORD[norm])) * (1 - 1e-12)
        assert up.value == pytest.approx(float(torch.linalg.matrix_norm(W, _ORD[norm])),
                                         rel=1e-6)
    sq = lipbound.seqlip(net, (6,))
    assert sq.upper >= float(torch.linalg.matrix_norm(net.a.weight.detach().double(), 2))


# ---- 4. wrappers and input shapes -----------------------------------------------------------
def test_regression_wrapped_models_are_unwrapped() -> None:
    net = _mlp()
    ref = lipbound.autolip(net, (6,)).value
    assert lipbound.autolip(nn.DataParallel(net), (6,)).value == ref
    assert lipbound.seqlip(nn.DataParallel(net), (6,)).upper >= _truth(net, "2") * (1 - 1e-9)

    class OptimizedModule(nn.Module):  # what torch.compile returns (without compiling here)
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self._orig_mod = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._orig_mod(x)

    for norm in NORMS:
        v = lipbound.autolip(OptimizedModule(net), (6,), norm=norm).value
        assert v >= _truth(net, norm) * (1 - 1e-9)
    lo = lipbound.lower_bound(OptimizedModule(net), (6,), restarts=2, steps=5)
    assert lo.value <= ref * (1 + 1e-6)


def test_regression_numpy_ints_in_input_shape() -> None:
    net = _mlp()
    ref = lipbound.autolip(net, (6,)).value
    assert lipbound.autolip(net, (np.int64(6),)).value == ref
    assert lipbound.autolip(net, np.int64(6)).value == ref
    assert lipbound.autolip(net, np.array([6])).value == ref
    for bad, why in [((True,), "bool"), ((3.5,), "not an int"), ((-6,), "not positive"),
                     ((0,), "not positive"), ((np.bool_(True),), "bool")]:
        with pytest.raises(ShapeError, match=why):
            lipbound.autolip(net, bad)
