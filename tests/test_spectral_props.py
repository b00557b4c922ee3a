"""Hypothesis property tests of lipbound.spectral over random layer configurations.

For every generated layer: the estimate matches the dense Jacobian's top singular value, and
every certificate (the best one, the structural one alone, l1 and l-inf) is an upper bound on
the matching exact norm (``SLACK`` only absorbs the reference SVD's own rounding).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lipbound.errors import ZeroOperatorError
from lipbound.spectral import certified_upper, spectral_norm, top_singular
from lipbound.spectral import certify as C
from lipbound.spectral.certify import dense_jacobian

SLACK = 1e-12


def _exact(J: torch.Tensor) -> dict[str, float]:
    return {
        "2": float(torch.linalg.svdvals(J)[0]),
        "1": float(J.abs().sum(0).max()),
        "inf": float(J.abs().sum(1).max()),
    }


@st.composite
def conv_layers(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kmax = 3 if dims == 3 else 4
    k = tuple(draw(st.integers(1, kmax)) for _ in range(dims))
    s = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    d = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    p = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    hmax = 4 if dims == 3 else 9
    torch.manual_seed(draw(st.integers(0, 10_000)))
    if transposed:
        cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        op = tuple(draw(st.integers(0, max(si, di) - 1)) for si, di in zip(s, d))
        H = tuple(draw(st.integers(1, hmax)) for _ in range(dims))
        # output size must be positive
        for i in range(dims):
            if (H[i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + op[i] + 1 < 1:
                p = tuple(0 if j == i else p[j] for j in range(dims))
        layer = cls(cin, cout, k, stride=s, padding=p, output_padding=op, dilation=d,
                    groups=groups, bias=draw(st.booleans()))
        return layer, (cin, *H)
    mode = draw(st.sampled_from(["zeros", "circular", "reflect", "replicate"]))
    H = []
    for i in range(dims):
        lo = max(1, d[i] * (k[i] - 1) + 1 - 2 * p[i], p[i] + 1)
        H.append(draw(st.integers(lo, max(lo, hmax))))
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    layer = cls(cin, cout, k, stride=s, padding=p, dilation=d, groups=groups,
                bias=draw(st.booleans()), padding_mode=mode)
    return layer, (cin, *H)


@given(conv_layers())
def test_conv_estimate_and_certificates(layer_shape):
    layer, shape = layer_shape
    J = dense_jacobian(layer, shape)
    assert J is not None
    ex = _exact(J)
    if ex["2"] == 0.0:  # e.g. every tap reads padding: the zero map has norm 0
        r0 = spectral_norm(layer, shape)
        assert r0.value == 0.0 and r0.upper is not None and r0.upper >= 0.0
        with pytest.raises(ZeroOperatorError):
            top_singular(layer, shape, 1)
        return
    r = spectral_norm(layer, shape, tol=1e-10)
    assert r.value == pytest.approx(ex["2"], rel=1e-7)
    assert r.certified and r.upper >= ex["2"] * (1 - SLACK)
    out_shape = tuple(r.u.shape[1:])
    for p in ("2", "1", "inf"):
        c = C._single(layer, shape, out_shape, p)
        assert c is not None
        assert c[0] >= ex[p] * (1 - SLACK), (p, c, ex[p])


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 1000))
def test_linear_estimate_and_certificates(n_in, n_out, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    W = lin.weight.detach().double()
    ex = _exact(W)
    r = spectral_norm(lin, (n_in,), tol=1e-10)
    assert r.value == pytest.approx(ex["2"], rel=1e-7)
    for p in ("2", "1", "inf"):
        b, _ = certified_upper(lin, (n_in,), norm=p)
        assert ex[p] * (1 - SLACK) <= b <= ex[p] * (1 + 1e-9)


@given(st.integers(2, 5), st.sampled_from(["lanczos", "arpack"]), st.integers(0, 1000))
def test_top_k_singular_values(k, method, seed):
    torch.manual_seed(seed)
    conv = nn.Conv1d(2, 2, 3, padding=1)
    shape = (2, 8)
    S = torch.linalg.svdvals(dense_jacobian(conv, shape))
    r = top_singular(conv, shape, k, tol=1e-10, method=method, max_iter=5_000)
    got = torch.tensor(r.singular_values, dtype=torch.float64)
    assert torch.allclose(got, S[:k], rtol=1e-7, atol=1e-9)
    assert bool((got[:-1] >= got[1:] - 1e-12).all())
