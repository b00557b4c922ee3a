"""Dense certificates written without pushing basis vectors through the op (issue #16): the
matrix of a zero-padded conv from its kernel, and wide / tall matrices by their Gram matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipbound.spectral.certify import (
    _conv_matrix,
    _dense_jacobian,
    _f64_fn,
    conv_spec,
    dense_matrix,
    matrix_norm_upper,
)

CONVS = [
    (nn.Conv2d(4, 6, 3, padding=1), (4, 5, 5)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=(1, 2), dilation=(1, 2), groups=2), (4, 7, 8)),
    (nn.Conv1d(3, 4, 5, padding=3, stride=2), (3, 11)),
    (nn.Conv3d(2, 4, (2, 3, 1), padding=(1, 0, 0), groups=2), (2, 3, 4, 2)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (4, 3, 3)),
    (nn.Conv2d(2, 2, 4, padding=(3, 0), bias=False), (2, 2, 6)),
]


@pytest.mark.parametrize("i", range(len(CONVS)))
def test_conv_matrix_equals_the_basis_jacobian(i: int) -> None:
    torch.manual_seed(i)
    conv, shape = CONVS[i]
    with torch.no_grad():
        out = tuple(conv(torch.zeros(1, *shape)).shape[1:])
    spec = conv_spec(conv, shape, out)
    assert spec is not None
    ref, _ = dense_matrix(_f64_fn(conv), shape)
    J = _conv_matrix(spec)
    assert torch.equal(J.T if spec.adjoint else J, ref)  # every entry one weight: exact
    jb = _dense_jacobian(conv, shape)
    assert jb is not None and torch.equal(jb[0], ref)


@pytest.mark.parametrize("shape", [(2000, 64), (48, 1500), (700, 300)])
def test_wide_or_tall_matrix_by_gram_eigvalsh(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    W = torch.randn(*shape, dtype=torch.float64)
    W[0] *= 30.0  # a dominant row
    b, how = matrix_norm_upper(W)
    s = float(torch.linalg.svdvals(W)[0])
    assert s <= b <= s * (1 + 1e-8)
    assert how == "dense Gram (float64), eigvalsh + margin"


def test_near_square_small_matrix_keeps_the_svd() -> None:
    W = torch.randn(300, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b, how = matrix_norm_upper(W)
    assert how == "dense SVD (float64) + margin"
    assert float(torch.linalg.svdvals(W)[0]) <= b
