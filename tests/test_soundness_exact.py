"""Soundness of lipbound.methods.exact at every weight scale (regressions of the scale bug).

References that do not use exact()'s code:

* 1-D inputs: the closed form. ``f`` is piecewise affine on the real line; the pieces are
  enumerated exactly (every pre-activation is affine on a piece, its zero splits the piece),
  and ``L = max`` over pieces of the slope's norm.
* 2-D inputs: realised Jacobians (dense float64 ``torch.autograd.functional.jacobian`` / vmap
  over a fine grid) from below; certified products of layer norms, AutoLip and SeqLip from above.
* realised pair ratios ``||f(x) - f(y)|| / ||x - y||`` in float64.

Scaling: with positively homogeneous activations, multiplying every weight of a depth-``d``
net by ``c > 0`` and the bias of layer ``k`` by ``c^k`` (or zeroing the biases) gives
``f_c(x) = c^d f(x)``, so ``L(f_c) = c^d L(f)``; a negative ``c`` is ``-1`` then ``|c|``.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import linear_params as _params
from _helpers import mlp
from _helpers import opnorm as _opnorm
from lipbound.errors import LipboundError, UnsupportedModelError
from lipbound.methods import exact as exact_mod
from lipbound.methods.exact import exact

NORMS = ("2", "1", "inf")
SCALES = (1e-30, 1e-12, 1e-4, 1e-2, 1.0, 1e2, 1e4)
REL = 1e-6  # stated relative tolerance of the scaling property (float64 nets)
# float32 nets: c * W is rounded to float32 (relative 2^-24 per entry), which moves the true
# constant by at most about depth * sqrt(width) * 2^-24 (~1e-6 here); exact itself is checked
# to 1e-9 against the closed form of the rounded net
REL32 = 4e-6


def _rel(dtype: torch.dtype) -> float:
    return REL if dtype == torch.float64 else REL32


def _mlp(sizes: list[int], seed: int, dtype: torch.dtype, leaky: float | None = None) -> nn.Module:
    return mlp(sizes, seed=seed, dtype=dtype, leaky=leaky)


def _depth(net: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in net.modules())


def _scaled(net: nn.Module, c: float, biases: str) -> nn.Module:
    """Weights times ``c``; biases of layer ``k`` times ``c^k`` ("pow"), ``c`` ("all") or 0."""
    out = copy.deepcopy(net)
    k = 0
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, nn.Linear):
                k += 1
                m.weight.mul_(c)
                if biases == "pow":
                    m.bias.mul_(c**k)
                elif biases == "all":
                    m.bias.mul_(c)
                else:
                    m.bias.zero_()
    return out


def _bias_mode(c: float, depth: int, dtype: torch.dtype) -> str:
    """"pow" when ``|c|^depth`` is a normal number of ``dtype``, else zero biases."""
    fi = torch.finfo(dtype)
    return "pow" if fi.tiny * 1e3 < abs(c) ** depth < fi.max / 1e3 else "zero"


def _vnorm(v: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "2":
        return v.norm(dim=-1)
    if norm == "1":
        return v.abs().sum(dim=-1)
    return v.abs().amax(dim=-1)


def closed_form_1d(net: nn.Module, norm: str) -> float:
    """Exact ``L`` of a 1-D-input ReLU net: enumerate its affine pieces on the real line."""
    Ws, bs, negs = _params(net)
    # a piece: (lo, hi, A, c) with the current pre-activation z = A t + c on (lo, hi)
    pieces = [(-math.inf, math.inf, Ws[0][:, 0].copy(), bs[0].copy())]

    def inner(lo: float, hi: float) -> float:
        if math.isinf(lo) and math.isinf(hi):
            return 0.0
        if math.isinf(lo):
            return hi - max(1.0, abs(hi))
        if math.isinf(hi):
            return lo + max(1.0, abs(lo))
        return (lo + hi) / 2

    for i in range(len(Ws) - 1):
        nxt = []
        for lo, hi, A, c in pieces:
            cuts = sorted({-cj / aj for aj, cj in zip(A, c) if aj != 0 and lo < -cj / aj < hi})
            ends = [lo, *cuts, hi]
            for a, b in itertools.pairwise(ends):
                if not a < b:
                    continue
                t = inner(a, b)
                sig = np.where(A * t + c > 0, 1.0, negs[i])
                nxt.append((a, b, Ws[i + 1] @ (sig * A), Ws[i + 1] @ (sig * c) + bs[i + 1]))
        pieces = nxt
    return max(_opnorm(A[:, None], norm) for _, _, A, _ in pieces)


def realised_grid_max(
    net: nn.Module, n0: int, norm: str, *, r: float, n: int, decades: int = 0, cloud: int = 2000
) -> float:
    """Largest dense float64 Jacobian norm over a grid of ``[-r, r]^n0`` and random clouds of
    radius ``r``, ``10 r``, ..., ``10^decades r``."""
    m64 = copy.deepcopy(net).double()
    axes = [torch.linspace(-r, r, n, dtype=torch.float64)] * n0
    X = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, n0)
    gen = torch.Generator().manual_seed(0)
    clouds = [torch.randn(cloud, n0, generator=gen, dtype=torch.float64) * 3 * r * 10.0**k
              for k in range(decades + 1)]
    X = torch.cat([X, *clouds])
    jac = torch.func.vmap(torch.func.jacrev(lambda v: m64(v.unsqueeze(0)).squeeze(0)))(X)
    return max(_opnorm(J, norm) for J in jac.detach().numpy())


def pair_ratio_max(net: nn.Module, n0: int, norm: str, *, r: float = 3.0) -> float:
    """Largest realised ``||f(x) - f(y)|| / ||x - y||`` over random float64 pairs.

    Only pairs whose output difference is far above the rounding of the outputs count
    (``> 1e-8 (|f(x)| + |f(y)|)``): at tiny weight scales ``f`` is a large constant plus tiny
    variations, and a difference at the rounding level is noise, not a realised ratio.
    """
    m64 = copy.deepcopy(net).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5000, n0, generator=gen, dtype=torch.float64) * r
    d = torch.randn(5000, n0, generator=gen, dtype=torch.float64)
    d = d * torch.logspace(-3, 0, 5000, dtype=torch.float64)[:, None] * r
    with torch.no_grad():
        fx, fy = m64(x), m64(x + d)
    num = _vnorm(fy - fx, norm)
    ok = num > 1e-8 * (_vnorm(fx, norm) + _vnorm(fy, norm))
    return float((num / _vnorm(d, norm))[ok].max()) if bool(ok.any()) else 0.0


def certified_uppers(net: nn.Module, shape: tuple[int, ...], norm: str) -> list[float]:
    """Product of the layers' induced norms times the activations' slope bound; AutoLip."""
    from lipbound.methods.autolip import autolip

    Ws, _, negs = _params(net)
    slope = max([1.0, *[abs(q) for q in negs]])
    ups = [math.prod(_opnorm(W, norm) for W in Ws) * slope ** len(negs) * (1 + 1e-12)]
    r = autolip(net, shape, norm=norm)
    if r.upper is not None:
        ups.append(float(r.upper))
    return ups


_BASE: dict[tuple[str, str, str], float] = {}


def _base_value(key: tuple[str, str, str], net: nn.Module, shape: tuple[int, ...]) -> float:
    if key not in _BASE:
        res = exact(net, shape, norm=key[2], time_limit=30)
        assert res.finished and res.bound == "exact"
        _BASE[key] = res.value
    return _BASE[key]


# ------------------------------------------------------------------------------------------
# the property: exact(c * theta) = |c|^d exact(theta), between realised and certified
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("c", SCALES)
def test_regression_weight_scale_changes_exact_value(c: float, dtype: torch.dtype) -> None:
    """1-D input, depth 4: exact at every scale equals the closed form, which scales by c^4."""
    net = _mlp([1, 6, 6, 5, 2], seed=3, dtype=dtype)
    d = _depth(net)
    mode = _bias_mode(c, d, dtype)
    base = net if mode == "pow" else _scaled(net, 1.0, "zero")
    sn = _scaled(base, c, mode)
    for norm in NORMS:
        ref = closed_form_1d(sn, norm)
        res = exact(sn, (1,), norm=norm, time_limit=30)
        assert res.finished and res.bound == "exact" and res.certified, (norm, res.notes)
        assert math.isclose(res.value, ref, rel_tol=1e-9), (norm, res.value, ref)
        key = (str(dtype), mode, norm)
        b = _base_value(key, base, (1,))
        assert math.isclose(res.value, b * c**d, rel_tol=_rel(dtype)), (norm, res.value, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("c", SCALES)
def test_regression_weight_scale_2d_sandwich(c: float, dtype: torch.dtype) -> None:
    """2-D input, depth 4: realised grid Jacobians <= exact <= certified, and c^4 scaling."""
    net = _mlp([2, 6, 6, 6, 1], seed=0, dtype=dtype)
    d = _depth(net)
    mode = _bias_mode(c, d, dtype)
    base = net if mode == "pow" else _scaled(net, 1.0, "zero")
    sn = _scaled(base, c, mode)
    for norm in NORMS:
        res = exact(sn, (2,), norm=norm, time_limit=30)
        assert res.finished and res.bound == "exact" and res.certified, (norm, res.notes)
        b = _base_value((str(dtype) + "2d", mode, norm), base, (2,))
        assert math.isclose(res.value, b * c**d, rel_tol=_rel(dtype)), (norm, res.value, b)
        low = realised_grid_max(sn, 2, norm, r=3.0, n=41)
        assert low <= res.value * (1 + 1e-9), (norm, low, res.value)
        for up in certified_uppers(sn, (2,), norm):
            assert res.value <= up * (1 + 1e-9), (norm, res.value, up)


@pytest.mark.parametrize("c", [-1e-12, -1e-4, -1.0, -1e4])
def test_regression_negative_scale(c: float) -> None:
    """c < 0 is -1 (a different network, checked against its closed form) then |c|."""
    net = _mlp([1, 5, 5, 2], seed=7, dtype=torch.float64, leaky=0.1)
    d = _depth(net)
    flipped = _scaled(net, -1.0, "pow")
    sn = _scaled(net, c, "pow")
    for norm in NORMS:
        ref = closed_form_1d(flipped, norm)
        assert math.isclose(exact(flipped, (1,), norm=norm).value, ref, rel_tol=1e-9)
        res = exact(sn, (1,), norm=norm)
        assert res.bound == "exact"
        assert math.isclose(res.value, ref * abs(c) ** d, rel_tol=REL), (norm, res.value, ref)


# ------------------------------------------------------------------------------------------
# the example: every parameter (biases too) times 1e-4
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("c", [1e-4, 1e-2, 1e2])
def test_regression_all_parameters_scaled_below_realised(c: float, dtype: torch.dtype) -> None:
    """Biases times c too (not a symmetry: the geometry spreads over scales 1 .. c^-3)."""
    net = _scaled(_mlp([2, 8, 8, 8, 1], seed=0, dtype=dtype), c, "all")
    for norm in NORMS:
        res = exact(net, (2,), norm=norm, time_limit=20)
        assert res.certified and res.upper is not None
        low = max(
            pair_ratio_max(net, 2, norm),
            realised_grid_max(net, 2, norm, r=3.0, n=21, decades=14, cloud=200),
        )
        assert low <= res.upper * (1 + 1e-9), (norm, low, res.value, res.bound)
        if res.bound == "exact":
            assert low <= res.value * (1 + 1e-9), (norm, low, res.value)
        assert res.lower <= res.upper


# ------------------------------------------------------------------------------------------
# huge weights: a correct value or one clear lipbound error, never a raw numpy error
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_regression_huge_weights_no_raw_linalg_error(dtype: torch.dtype) -> None:
    deep = _scaled(_mlp([2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 2], seed=0, dtype=dtype), 1e30, "zero")
    for norm in NORMS:
        with pytest.raises(LipboundError, match="float64"):
            exact(deep, (2,), norm=norm, time_limit=10)
    net = _mlp([1, 6, 6, 2], seed=2, dtype=dtype)
    sn = _scaled(net, 1e30, "zero")
    for norm in NORMS:
        res = exact(sn, (1,), norm=norm)
        assert res.bound == "exact"
        assert math.isclose(res.value, closed_form_1d(sn, norm), rel_tol=1e-9)


# ------------------------------------------------------------------------------------------
# never "exact" when something was left undecided
# ------------------------------------------------------------------------------------------


def test_regression_lp_failure_drops_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed LP is no proof of emptiness: the result must be an interval containing L."""
    net = _mlp([1, 6, 6, 2], seed=4, dtype=torch.float64)

    def failing(self: object, *args: object, **kwargs: object) -> tuple[str, None, float]:
        return "fail", None, math.nan

    monkeypatch.setattr(exact_mod._LP, "_solve", failing)
    for norm in NORMS:
        ref = closed_form_1d(net, norm)
        res = exact(net, (1,), norm=norm, n_samples=4, use_box=False)
        assert res.upper is not None and res.upper >= ref * (1 - 1e-12), (norm, res.upper, ref)
        assert res.lower <= ref * (1 + 1e-9)
        if res.bound == "exact":
            assert math.isclose(res.value, ref, rel_tol=1e-9)
        else:
            assert not res.finished


@pytest.mark.parametrize("c", [1e-12, 1.0, 1e4])
def test_time_out_is_an_interval_at_every_scale(c: float) -> None:
    net = _scaled(_mlp([1, 10, 10, 2], seed=5, dtype=torch.float64), c, "pow")
    for norm in NORMS:
        ref = closed_form_1d(net, norm)
        res = exact(net, (1,), norm=norm, time_limit=1e-4, n_samples=4)
        assert not res.finished and res.bound != "exact"
        assert res.upper is not None and res.lower <= ref * (1 + 1e-9)
        assert ref <= res.upper * (1 + 1e-9), (norm, ref, res.upper)


class _ScalesInputInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m0 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m0(x).mul_(-0.25)


@pytest.mark.parametrize("norm", NORMS)
def test_regression_exact_on_a_model_writing_its_input_in_place(norm: str) -> None:
    """The fuzz campaign's crash class: the witness check differentiated the model at a leaf
    that the model then wrote in place (raw RuntimeError); the model is x -> -x/4."""
    res = exact(_ScalesInputInPlace().eval(), (1, 6), norm=norm, time_limit=5)
    assert res.bound == "exact" and res.certified
    assert math.isclose(res.value, 0.25, rel_tol=1e-6)


class _MaxWithShapedConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9331)
        self.register_buffer("c", 3.0 * torch.randn(1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(2, 2)[0].maximum(self.c).view(-1, 4)


def test_regression_exact_activation_probe_with_a_shaped_constant() -> None:
    """Fuzz campaign crash class: exact probed ``x.maximum(c)`` (c of shape (1, 2, 2)) on a
    flat probe vector and died with torch's broadcast RuntimeError; it is refused instead."""
    with pytest.raises(UnsupportedModelError, match="maximum"):
        exact(_MaxWithShapedConstant().eval(), (1, 3, 2), norm="1", time_limit=2)
