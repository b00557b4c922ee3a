"""Scale equivariance of every bound on bias-free ReLU networks.

``f_c`` = the network with every weight multiplied by ``c``. For a bias-free ReLU net with
``depth`` linear layers and ``c > 0``, ``f_c = c^depth f`` (ReLU is positively homogeneous), so
``L(f_c) = |c|^depth L(f)``. For ``c < 0`` and depth 2, ``f_c(x) = -c^2 f(-x)``: again
``L(f_c) = |c|^2 L(f)`` (for depth >= 3 a negative ``c`` changes the function, so only
depth 2 is used there). Stated margins, relative to ``|c|^depth * bound(f)``:

* AutoLip, SeqLip: 1e-5 (the weights are float32: ``c * W`` is rounded to 6e-8 relative per
  entry; the bounds are computed in float64 with 1e-9 margins);
* exact: 1e-5 on ``value`` and on the certified ``upper`` (the regions are the same sets);
* lower_bound: a true lower bound of ``|c|^depth L(f)`` (at most ``exact * (1 + 1e-6)``) and
  at least half of ``|c|^depth lower(f)`` (the search must not collapse at extreme scales).

``c`` spans 1e-6..1e6 in magnitude, both signs.
"""

from __future__ import annotations

import math

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import lipbound

SHAPE = (3,)
_REF: dict[tuple[str, int, str], float] = {}


def _net(c: float, depth: int) -> nn.Module:
    torch.manual_seed(depth)
    widths = [3, 5, 2] if depth == 2 else [3, 4, 4, 2]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=False))
        if i < depth - 1:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(c)
    return net.eval()


def _value(method: str, net: nn.Module, norm: str) -> float:
    if method == "autolip":
        r = lipbound.autolip(net, SHAPE, norm=norm)
        assert r.certified and r.upper is not None
        return float(r.upper)
    if method == "seqlip":
        r2 = lipbound.seqlip(net, SHAPE)
        assert r2.upper is not None
        return float(r2.upper)
    if method == "exact":
        r3 = lipbound.exact(net, SHAPE, norm=norm, time_limit=5.0)
        assert r3.finished and r3.certified and r3.upper is not None
        assert abs(r3.upper - r3.value) <= 1e-9 * r3.value
        return float(r3.value)
    r4 = lipbound.lower_bound(net, SHAPE, norm=norm, restarts=8, steps=30)
    return float(r4.value)


def _ref(method: str, depth: int, norm: str) -> float:
    key = (method, depth, norm)
    if key not in _REF:
        _REF[key] = _value(method, _net(1.0, depth), norm)
    return _REF[key]


scales = st.tuples(st.sampled_from([1.0, -1.0]), st.floats(-6.0, 6.0)).map(
    lambda t: t[0] * 10.0 ** t[1])


def _depth(c: float, d: int) -> int:
    return 2 if c < 0 else d


@settings(max_examples=12)
@given(c=scales, d=st.sampled_from([2, 3]), norm=st.sampled_from(["1", "2", "inf"]))
@example(c=1e-6, d=3, norm="2")
@example(c=-1e6, d=2, norm="1")
@example(c=1e6, d=3, norm="inf")
def test_autolip_scales_by_c_to_the_depth(c: float, d: int, norm: str) -> None:
    d = _depth(c, d)
    got = _value("autolip", _net(c, d), norm)
    want = abs(c) ** d * _ref("autolip", d, norm)
    assert math.isclose(got, want, rel_tol=1e-5), (c, d, norm, got, want)


@settings(max_examples=8)
@given(c=scales, d=st.sampled_from([2, 3]))
@example(c=1e-6, d=3)
@example(c=-1e6, d=2)
def test_seqlip_scales_by_c_to_the_depth(c: float, d: int) -> None:
    d = _depth(c, d)
    got = _value("seqlip", _net(c, d), "2")
    want = abs(c) ** d * _ref("seqlip", d, "2")
    assert math.isclose(got, want, rel_tol=1e-5), (c, d, got, want)


@settings(max_examples=6)
@given(c=scales, d=st.sampled_from([2, 3]), norm=st.sampled_from(["1", "2", "inf"]))
@example(c=1e-6, d=3, norm="2")
@example(c=-1e-6, d=2, norm="inf")
@example(c=1e6, d=2, norm="1")
def test_exact_scales_by_c_to_the_depth(c: float, d: int, norm: str) -> None:
    d = _depth(c, d)
    got = _value("exact", _net(c, d), norm)
    want = abs(c) ** d * _ref("exact", d, norm)
    assert math.isclose(got, want, rel_tol=1e-5), (c, d, norm, got, want)


@settings(max_examples=5)
@given(c=scales, d=st.sampled_from([2, 3]))
@example(c=1e-6, d=3)
@example(c=1e6, d=2)
def test_lower_bound_scales_by_c_to_the_depth(c: float, d: int) -> None:
    d = _depth(c, d)
    got = _value("lower", _net(c, d), "2")
    scale = abs(c) ** d
    assert got <= scale * _ref("exact", d, "2") * (1 + 1e-6), (c, d, got)
    assert got >= 0.5 * scale * _ref("lower", d, "2"), (c, d, got, scale * _ref("lower", d, "2"))


def _net64(c: float, depth: int) -> nn.Module:
    net = _net(1.0, depth).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(c)
    return net


@settings(max_examples=6, deadline=None)
@given(e=st.floats(-100.0, 100.0))
@example(e=-100.0)
@example(e=-60.0)
def test_regression_float64_scales_far_below_float32_range(e: float) -> None:
    """float64 nets at c = 10^e, |e| <= 100 (the constant c^3 L stays a normal float64): the
    lower bound underflowed to 0 (torch's ``norm`` squares entries: (1e-200)^2 = 0). Every
    method scales by |c|^3 again, the lower bound's search included."""
    c = 10.0**e
    net, ref64 = _net64(c, 3), _net64(1.0, 3)
    up, up1 = lipbound.autolip(net, SHAPE).upper, lipbound.autolip(ref64, SHAPE).upper
    seq = lipbound.seqlip(net, SHAPE).upper
    seq1 = lipbound.seqlip(ref64, SHAPE).upper
    torch.manual_seed(0)  # the same search at both scales (global RNG included)
    # no wall-clock limit: a loaded machine cut the two searches at different points
    lo = lipbound.lower_bound(net, SHAPE, restarts=8, steps=30, time_limit=None).value
    torch.manual_seed(0)
    lo1 = lipbound.lower_bound(ref64, SHAPE, restarts=8, steps=30, time_limit=None).value
    assert up is not None and seq is not None and up1 is not None and seq1 is not None
    assert math.isclose(up, c**3 * up1, rel_tol=1e-6), (up, up1)
    assert math.isclose(seq, c**3 * seq1, rel_tol=1e-6), (seq, seq1)
    assert lo > 0 and math.isclose(lo, c**3 * lo1, rel_tol=1e-6), (lo, lo1)  # same search
    assert lo <= seq, (lo, seq)


def test_regression_autolip_subnormal_bound_no_zero_division() -> None:
    """A bound in float64's subnormal range (c = 1e-107, depth 3: about 1e-321): AutoLip's
    layer ranking computed ``(bumped - base) / (base * h)`` with ``base * h = 0``
    (ZeroDivisionError); the bound itself must still come back, certified."""
    r = lipbound.autolip(_net64(1e-107, 3), SHAPE)
    assert r.certified and r.upper is not None and 0 < r.upper < 1e-300
