"""The Gram + Cholesky path of ``conv_fourier_upper`` (forced on for 64-channel convs).

Each certificate is checked against the dense Jacobian's SVD: ``upper >= exact`` always, and
``upper <= exact (1 + 1e-4)`` where the Fourier certificate is exact (circular padding).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipbound.spectral.certify import (
    _gram_lambda_upper,
    conv_fourier_upper,
    conv_spec,
    dense_jacobian,
)

SLACK = 1e-12


def _exact(conv: nn.Module, shape: tuple[int, ...]) -> float:
    J = dense_jacobian(conv, shape)
    assert J is not None
    return float(torch.linalg.svdvals(J)[0])


def _spec(conv: nn.Module, shape: tuple[int, ...]):
    with torch.no_grad():
        out = conv(torch.zeros((1, *shape), dtype=conv.weight.dtype))
    spec = conv_spec(conv, shape, tuple(out.shape[1:]))
    assert spec is not None
    return spec


CASES = [
    ("circular", lambda: nn.Conv2d(64, 64, 3, padding=1, padding_mode="circular", bias=False),
     (64, 4, 4), True),
    ("zeros", lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (64, 4, 4), False),
    ("strided", lambda: nn.Conv2d(64, 80, 3, stride=2, padding=1, bias=False), (64, 6, 6), False),
    ("strided-circular",
     lambda: nn.Conv2d(64, 72, 3, stride=2, padding=1, padding_mode="circular", bias=False),
     (64, 4, 4), True),
]


@pytest.mark.parametrize("name,factory,shape,exact", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("scale", [None, 0.5, 0.999])
def test_gram_path_is_valid_and_tight(name, factory, shape, exact, scale):
    torch.manual_seed(3)
    conv = factory().double()
    spec = _spec(conv, shape)
    ref = _exact(conv, shape)
    up, how = conv_fourier_upper(spec, _gram_min=64, _candidate_scale=scale)
    svd, _ = conv_fourier_upper(spec, _gram_min=10**9)  # the SVD path, for comparison
    assert up >= ref * (1 - SLACK), (up, ref)
    assert up >= svd * (1 - 1e-5)
    assert abs(up - svd) <= 1e-5 * svd
    if exact:
        assert "exact" in how
        assert up <= ref * (1 + 1e-4)


def test_gram_path_fallback_runs_and_is_rigorous():
    """A candidate far too small makes every Cholesky fail: eigvalsh decides the bound."""
    torch.manual_seed(0)
    A = torch.randn(5, 64, 96, dtype=torch.complex128)
    fro = float(torch.linalg.matrix_norm(A, "fro").max()) * 1.001
    true = float(torch.linalg.matrix_norm(A, ord=2).max()) ** 2
    low = _gram_lambda_upper(A, fro, 0.0, scale=0.1)
    normal = _gram_lambda_upper(A, fro, 0.0)
    assert low >= true and normal >= true
    assert low <= true * (1 + 1e-9)
    assert normal <= true * (1 + 1e-5)
    # tall matrices use A^* A
    low_t = _gram_lambda_upper(A.mT.contiguous(), fro, 0.0, scale=0.1)
    assert true <= low_t <= true * (1 + 1e-9)


def test_gram_path_rank_deficient_and_zero():
    """Rank-deficient symbols (Lanczos breakdown) and a zero kernel stay valid."""
    conv = nn.Conv2d(64, 64, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    spec = _spec(conv, (64, 3, 3))
    ref = _exact(conv, (64, 3, 3))
    up, _ = conv_fourier_upper(spec, _gram_min=64)
    assert ref * (1 - SLACK) <= up <= ref * (1 + 1e-5)
    with torch.no_grad():
        conv.weight.zero_()
    up0, _ = conv_fourier_upper(_spec(conv, (64, 3, 3)), _gram_min=64)
    assert 0.0 <= up0 < 1e-100


def test_gram_path_is_default_for_wide_convs():
    """>= 192 channels per side take the Gram path by default (same bound as the SVD's)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(192, 200, 3, padding=1, bias=False).double()
    spec = _spec(conv, (192, 3, 3))
    gram, _ = conv_fourier_upper(spec)
    svd, _ = conv_fourier_upper(spec, _gram_min=10**9)
    assert svd < gram <= svd * (1 + 1e-5)  # the Gram path adds its ~2e-6 candidate slack


def test_gram_path_non_finite_gives_inf():
    A = torch.ones(2, 64, 64, dtype=torch.complex128)
    A[1, 3, 5] = float("nan")
    assert _gram_lambda_upper(A, 100.0, 0.0) == float("inf")


def test_regression_a_rejected_candidate_was_recomputed_from_the_same_steps(monkeypatch):
    """A single Gram matrix whose first (64-step) candidate is rejected got the same 64 steps
    again, hence the same candidate and a second failing Cholesky (4096 x 4096 dense layers:
    1.6 s wasted each); the retry now starts at the next step count."""
    import lipbound.spectral.certify as cert

    torch.manual_seed(0)
    A = torch.randn(1, 96, 160, dtype=torch.float64)
    G = A @ A.mT
    fro = float(torch.linalg.matrix_norm(A, "fro")) * 1.001
    true = float(torch.linalg.eigvalsh(G[0])[-1])
    calls: list[int] = []
    real = cert._lanczos_ritz_max

    def spy(M, k=24):
        calls.append(k)
        return real(M, k)

    monkeypatch.setattr(cert, "_lanczos_ritz_max", spy)
    # scale < 1: every candidate is below lambda_max, so every Cholesky test fails
    up = cert._lambda_max_upper(G.clone(), fro * fro, 1e-12, scale=0.999)
    assert calls == [64, 160]  # was [64, 64, 160]
    assert true <= up <= true * (1 + 1e-9)  # the eigvalsh fallback decides, still rigorous


def test_regression_small_map_convs_take_their_exact_matrix():
    """A 512-channel 3x3 conv on a 2x2 map (VGG at 32x32) got the Fourier grid's circulant
    on 4x4, 1.5x its norm; 2048 x 2048 is within DENSE_LIMIT now: the dense certificate."""
    from lipbound.spectral.certify import best_certificate

    torch.manual_seed(0)
    conv = nn.Conv2d(512, 512, 3, padding=1)
    up, how = best_certificate(conv, (512, 2, 2), (512, 2, 2))
    ref = _exact(conv, (512, 2, 2))
    assert how.startswith("dense Jacobian")
    assert ref <= up <= ref * (1 + 1e-5)
