"""Power iteration on true layer operators and the certified layer norms of lipbound.train."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lipbound.spectral import certified_upper
from lipbound.train._power import (
    certified_layer_norm,
    dense_operator,
    layer_map,
    power_update,
    random_unit,
    sigma_of,
)


def exact_norm(module: nn.Module, in_shape: tuple[int, ...]) -> float:
    fn = layer_map(module, module.weight.detach().double())
    return float(torch.linalg.matrix_norm(dense_operator(fn, in_shape), ord=2))


def test_closed_form_disjoint_patches() -> None:
    # all-ones 2x2 kernel, stride 2: sums of disjoint patches, norm exactly 2 (the reshaped
    # kernel's norm is 2 as well, but the stride-1 version has norm 4)
    conv = nn.Conv2d(1, 1, 2, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    assert abs(exact_norm(conv, (1, 6, 6)) - 2.0) < 1e-12
    assert abs(certified_layer_norm(conv, (1, 6, 6), dense_limit=0)[0] - 2.0) < 1e-6
    v = random_unit((1, 6, 6), dtype=torch.float64, device=torch.device("cpu"))
    fn = layer_map(conv, conv.weight.detach().double())
    v = power_update(fn, v, 30, 1e-12)
    assert abs(float(sigma_of(fn, v).detach()) - 2.0) < 1e-9


def test_power_iteration_reaches_strided_padded_conv_norm() -> None:
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    shape = (3, 9, 9)
    exact = exact_norm(conv, shape)
    v = random_unit(shape, dtype=torch.float64, device=torch.device("cpu"))
    fn = layer_map(conv)
    prev = 0.0
    for _ in range(8):
        v = power_update(fn, v, 25, 1e-12)
        s = float(sigma_of(fn, v).detach())
        assert s <= exact * (1 + 1e-12)  # from below, always
        assert s >= prev - 1e-12  # monotone
        prev = s
    assert abs(prev - exact) < 1e-6 * exact


conv_cases = st.tuples(
    st.integers(1, 3),  # cin
    st.integers(1, 3),  # cout
    st.integers(1, 4),  # kernel
    st.integers(1, 3),  # stride
    st.integers(0, 2),  # padding
    st.integers(1, 2),  # dilation
    st.integers(4, 9),  # size
    st.sampled_from([1, 2, 3]),  # spatial dims
)


@given(conv_cases)
def test_certified_conv_norm_is_above_exact(case: tuple[int, ...]) -> None:
    cin, cout, k, s, p, d, n, dims = case
    if d * (k - 1) + 1 > n + 2 * p:
        return
    if dims == 3:
        n = min(n, 5)
        if d * (k - 1) + 1 > n + 2 * p:
            return
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    conv = cls(cin, cout, k, stride=s, padding=p, dilation=d)
    shape = (cin, *([n] * dims))
    exact = exact_norm(conv, shape)
    cert, _how = certified_layer_norm(conv, shape, dense_limit=0)  # force the Fourier path
    assert cert >= exact
    dense, _how = certified_layer_norm(conv, shape)
    assert exact <= dense <= exact * (1 + 1e-6)


def test_groups_and_linear_on_sequences() -> None:
    conv = nn.Conv1d(4, 6, 3, groups=2, padding=1)
    shape = (4, 11)
    cert = certified_layer_norm(conv, shape, dense_limit=0)[0]
    assert cert >= exact_norm(conv, shape) * (1 - 1e-12)
    lin = nn.Linear(5, 3)
    # Linear on (seq, features) samples: operator I (x) W, same norm as W
    exact = exact_norm(lin, (4, 5))
    cert, how = certified_layer_norm(lin, (4, 5))
    assert how == "dense SVD (float64) + margin"
    assert exact <= cert <= exact * (1 + 1e-8)


def test_agrees_with_library_certificate_when_available() -> None:
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
    shape = (2, 10, 10)
    exact = exact_norm(conv, shape)
    lib = certified_upper(conv, shape)
    mine = certified_layer_norm(conv, shape, dense_limit=0)[0]
    assert lib is not None and lib[0] >= exact * (1 - 1e-12)
    assert mine >= exact * (1 - 1e-12)
