"""Pair-factor maths of SeqLip (lipbound.methods._pairs) on explicit matrices.

Reference values are computed here independently, by brute force over all vertices with
``torch.linalg.matrix_norm`` (no code shared with the module under test).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lipbound.errors import InvalidArgumentError
from lipbound.methods._pairs import (
    dual_bound,
    pair_certified,
    pair_exact,
    pair_greedy,
    pair_value,
    scaled_product_bound,
)

F64 = torch.float64
TOL = 1e-9


def brute(L: torch.Tensor, R: torch.Tensor, a: float = 0.0, b: float = 1.0) -> float:
    n = L.shape[1]
    best = 0.0
    for bits in itertools.product((a, b), repeat=n):
        g = torch.tensor(bits, dtype=F64)
        best = max(best, float(torch.linalg.matrix_norm(L @ torch.diag(g) @ R, ord=2)))
    return best


def opnorm(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M, ord=2))


# ---------------------------------------------------------------- closed forms
def test_diagonal_pair_is_max_entry() -> None:
    l = torch.tensor([1.0, -3.0, 2.0], dtype=F64)
    r = torch.tensor([2.0, 1.0, -0.5], dtype=F64)
    res = pair_exact(torch.diag(l), torch.diag(r))
    assert res.exact
    assert res.value == pytest.approx(3.0, rel=TOL)


def test_row_times_column_keeps_one_sign() -> None:
    # ||l^T D r|| = |sum_k sigma_k l_k r_k|: best is all positive products or all negative ones
    l = torch.tensor([[1.0, 2.0, -1.0, 3.0, -2.0]], dtype=F64)
    r = torch.tensor([[1.0], [1.0], [4.0], [-1.0], [1.0]], dtype=F64)
    prods = (l[0] * r[:, 0]).tolist()
    expected = max(sum(x for x in prods if x > 0), -sum(x for x in prods if x < 0))
    assert pair_exact(l, r).value == pytest.approx(expected, rel=TOL)
    assert pair_exact(l, r, max_enumerate=0).value == pytest.approx(expected, rel=TOL)
    assert pair_greedy(l, r).value == pytest.approx(expected, rel=TOL)


def test_pair_value_and_pattern_realise_the_value() -> None:
    L = torch.randn(4, 7, dtype=F64)
    R = torch.randn(7, 3, dtype=F64)
    res = pair_exact(L, R)
    assert res.pattern is not None
    assert pair_value(L, R, res.pattern) == pytest.approx(res.value, rel=TOL)
    assert res.value == pytest.approx(brute(L, R), rel=TOL)


def test_scaled_product_bound_undoes_bad_scaling() -> None:
    L = torch.randn(3, 4, dtype=F64)
    R = torch.randn(4, 3, dtype=F64)
    w = torch.tensor([1e3, 1e-3, 1.0, 10.0], dtype=F64)
    Lw, Rw = L * w, R / w[:, None]  # same products L D R for every diagonal D
    assert scaled_product_bound(Lw, Rw) <= 1.5 * opnorm(L) * opnorm(R)
    assert scaled_product_bound(Lw, Rw) >= brute(L, R) * (1 - TOL)


def test_dual_bound_exact_on_identity() -> None:
    eye = torch.eye(3, dtype=F64)
    assert dual_bound(torch.zeros(3, 3, dtype=F64), eye, eye) == pytest.approx(1.0, rel=1e-6)


def test_bad_arguments_raise_library_errors() -> None:
    with pytest.raises(InvalidArgumentError):
        pair_exact(torch.ones(2, 3), torch.ones(2, 2))
    with pytest.raises(InvalidArgumentError):
        pair_greedy(torch.ones(2, 3), torch.ones(3, 2), method="nope")
    with pytest.raises(InvalidArgumentError):
        pair_certified(torch.ones(2, 3), torch.ones(3, 2), slopes=(1.0, 0.0))


# ---------------------------------------------------------------- exact = brute force
@pytest.mark.parametrize("n", [1, 5, 9])
def test_enumeration_and_branch_and_bound_match_brute_force(n: int) -> None:
    L = torch.randn(4, n, dtype=F64)
    R = torch.randn(n, 3, dtype=F64)
    ref = brute(L, R)
    enum = pair_exact(L, R)
    bnb = pair_exact(L, R, max_enumerate=0)
    assert enum.exact and bnb.exact
    assert enum.value == pytest.approx(ref, rel=TOL)
    assert bnb.value == pytest.approx(ref, rel=TOL)
    assert bnb.upper == pytest.approx(ref, rel=TOL)


def test_branch_and_bound_matches_enumeration_at_16() -> None:
    torch.manual_seed(3)
    L = torch.randn(8, 16, dtype=F64)
    R = torch.randn(16, 8, dtype=F64)
    enum = pair_exact(L, R, max_enumerate=16)
    bnb = pair_exact(L, R, max_enumerate=0)
    assert enum.how == "exact-enum" and bnb.how in ("exact-bnb", "exact-enum")
    assert bnb.value == pytest.approx(enum.value, rel=TOL)


def test_branch_and_bound_with_time_limit_gives_certified_interval() -> None:
    torch.manual_seed(1)
    L = torch.randn(14, 14, dtype=F64)
    R = torch.randn(14, 14, dtype=F64)
    ref = pair_exact(L, R, max_enumerate=14).value
    part = pair_exact(L, R, max_enumerate=0, time_limit=0.0)
    assert part.lower <= ref * (1 + TOL)
    assert part.upper >= ref * (1 - TOL)
    assert part.upper <= opnorm(L) * opnorm(R) * (1 + TOL)


def test_branch_and_bound_beyond_twenty_neurons() -> None:
    # n = 24 > 20: branch and bound must close the gap; compare with an independent check that
    # no single flip of the returned pattern improves and that the value beats random vertices.
    torch.manual_seed(2)
    L = torch.randn(6, 24, dtype=F64)
    R = torch.randn(24, 5, dtype=F64)
    res = pair_exact(L, R, time_limit=20)
    assert res.exact
    assert res.pattern is not None
    base = pair_value(L, R, res.pattern)
    assert base == pytest.approx(res.value, rel=TOL)
    for k in range(24):
        s = res.pattern.clone()
        s[k] = 1 - s[k]
        assert pair_value(L, R, s) <= base * (1 + TOL)
    sig = (torch.rand(4000, 24) < 0.5).to(F64)
    vals = torch.linalg.matrix_norm(L[None] @ (sig[:, :, None] * R[None]), ord=2)
    assert float(vals.max()) <= base * (1 + TOL)
    assert pair_certified(L, R).value >= base * (1 - TOL)


# ---------------------------------------------------------------- slopes [a, b]
@pytest.mark.parametrize("slopes", [(0.1, 1.0), (-0.2, 1.1), (0.0, 0.25), (-1.0, -0.5)])
def test_general_slope_ranges(slopes: tuple[float, float]) -> None:
    L = torch.randn(3, 6, dtype=F64)
    R = torch.randn(6, 4, dtype=F64)
    ref = brute(L, R, *slopes)
    ex = pair_exact(L, R, slopes=slopes)
    assert ex.value == pytest.approx(ref, rel=TOL)
    assert pair_exact(L, R, slopes=slopes, max_enumerate=0).value == pytest.approx(ref, rel=TOL)
    assert pair_greedy(L, R, slopes=slopes).value <= ref * (1 + TOL)
    cert = pair_certified(L, R, slopes=slopes)
    assert cert.value >= ref * (1 - TOL)
    c = max(abs(slopes[0]), abs(slopes[1]))
    assert cert.value <= c * opnorm(L) * opnorm(R) * (1 + TOL)


# ---------------------------------------------------------------- invariants (hypothesis)
@st.composite
def pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    m = draw(st.integers(1, 4))
    n = draw(st.integers(1, 7))
    p = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(m, n, generator=g, dtype=F64)
    R = torch.randn(n, p, generator=g, dtype=F64)
    if draw(st.booleans()):  # sparse / rank-deficient cases
        L = L * (torch.rand(m, n, generator=g) < 0.5)
    return L, R


@given(pairs())
def test_lower_le_exact_le_certified_le_product(lr: tuple[torch.Tensor, torch.Tensor]) -> None:
    L, R = lr
    ref = brute(L, R)
    greedy = pair_greedy(L, R, restarts=2)
    flip = pair_greedy(L, R, method="flip")
    ex = pair_exact(L, R)
    bnb = pair_exact(L, R, max_enumerate=0)
    cert = pair_certified(L, R, dual_steps=20)
    prod = opnorm(L) * opnorm(R)
    slack = TOL * (1 + prod)
    assert greedy.value <= ref + slack and flip.value <= ref + slack
    assert abs(ex.value - ref) <= slack and abs(bnb.value - ref) <= slack
    for name, v in cert.parts.items():
        assert v >= ref - slack, name
    assert cert.value <= prod + slack
    assert cert.parts["half"] <= (opnorm(L @ R) + prod) / 2 + slack


def test_regression_incumbent_with_inactive_coordinates_crashed() -> None:
    """``pair_exact(..., incumbent=...)`` handed the incumbent's full pattern to the search
    on the active coordinates only: a pair with a zero column of L (or zero row of R) raised
    a raw size-mismatch RuntimeError. The incumbent is now restricted to the active
    coordinates, and one of another pair is refused by name."""
    g = torch.Generator().manual_seed(0)
    L = torch.cat([torch.randn(4, 6, dtype=torch.float64, generator=g),
                   torch.zeros(4, 3, dtype=torch.float64)], 1)
    R = torch.randn(9, 4, dtype=torch.float64, generator=g)
    with_inc = pair_exact(L, R, max_enumerate=0, incumbent=pair_greedy(L, R))
    enum = pair_exact(L, R)
    assert with_inc.exact and with_inc.value == pytest.approx(enum.value, rel=1e-9)
    assert with_inc.pattern is not None and with_inc.pattern.shape == (9,)
    with pytest.raises(InvalidArgumentError, match="incumbent pattern has 2 entries"):
        pair_exact(L, R, max_enumerate=0, incumbent=pair_greedy(L[:, :2], R[:2]))
