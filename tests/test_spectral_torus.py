"""The image-size-independent convolution certificate (:func:`conv_torus_upper`) and the
Schur test on pools with a negative divisor.

Every bound is checked against a realised truth: the dense float64 Jacobian's norm (SVD for
l2, abs row / column sums for l1 / l-inf).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipbound.spectral import certify as C


def _jac(op: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.zeros(shape, dtype=torch.float64)
    f = C.module_call(op, torch.float64)
    J = torch.autograd.functional.jacobian(lambda z: f(z.unsqueeze(0))[0], x)
    n_out = J[(Ellipsis,) + (0,) * len(shape)].numel()
    return J.reshape(n_out, -1)


def _truth(J: torch.Tensor, norm: str) -> float:
    if norm == "2":
        return float(torch.linalg.matrix_norm(J, 2))
    return float(J.abs().sum(0 if norm == "1" else 1).max())


def _out_shape(op: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(op.double()(torch.zeros((1, *shape), dtype=torch.float64)).shape[1:])


# ---------------------------------------------------------------------------------------------
# _schur_nonneg with a negative divisor
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["1", "2", "inf"])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (2, 2), (3, 2)])
def test_regression_schur_negative_divisor(norm: str, kernel: int, stride: int) -> None:
    pool = nn.AvgPool2d(kernel, stride=stride, divisor_override=-1).eval()
    shape = (2, 7, 7)
    truth = _truth(_jac(pool, shape), norm)
    b, how = C._schur_nonneg(pool, shape, norm)
    assert b >= truth * (1 - 1e-12), (b, truth, how)
    best = C.best_certificate(pool, shape, _out_shape(pool, shape), norm)
    assert best is not None and best[0] >= truth * (1 - 1e-12), (best, truth)


# ---------------------------------------------------------------------------------------------
# the torus certificate
# ---------------------------------------------------------------------------------------------
def _spec(op: nn.Module, shape: tuple[int, ...]) -> C.ConvSpec:
    spec = C.conv_spec(op, shape, _out_shape(op, shape))
    assert spec is not None
    return spec


def _conv_cases() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    cases: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    for mode in ["zeros", "circular", "reflect", "replicate"]:
        for pad in [0, 1, 2]:
            if mode != "zeros" and pad == 0:
                continue
            for stride in [1, 2, 3]:
                cases.append((f"2d-{mode}-p{pad}-s{stride}",
                              nn.Conv2d(3, 4, 3, stride=stride, padding=pad, padding_mode=mode,
                                        bias=False), (3, 7, 6)))
    cases += [
        ("2d-dil2", nn.Conv2d(3, 4, 3, dilation=2, padding=2, bias=False), (3, 8, 8)),
        ("2d-dil2-s2", nn.Conv2d(3, 4, 3, dilation=2, stride=2, padding=1, bias=False),
         (3, 9, 9)),
        ("2d-dil3-s2", nn.Conv2d(2, 3, 3, dilation=3, stride=2, padding=3, bias=False),
         (2, 9, 8)),
        ("2d-groups", nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=False), (4, 6, 6)),
        ("2d-depthwise", nn.Conv2d(4, 4, 3, groups=4, padding=1, stride=2, bias=False),
         (4, 8, 8)),
        ("2d-rect-k", nn.Conv2d(2, 3, (1, 5), padding=(0, 2), bias=False), (2, 5, 9)),
        ("2d-1x1", nn.Conv2d(5, 3, 1, bias=False), (5, 4, 4)),
        ("2d-k5", nn.Conv2d(2, 3, 5, padding=2, bias=False), (2, 8, 8)),
        ("1d", nn.Conv1d(3, 2, 5, padding=2, bias=False), (3, 20)),
        ("1d-s2-dil2", nn.Conv1d(3, 2, 3, stride=2, dilation=2, padding=1, bias=False), (3, 17)),
        ("1d-circular-s3", nn.Conv1d(2, 2, 4, stride=3, padding=2, padding_mode="circular",
                                     bias=False), (2, 10)),
        ("3d", nn.Conv3d(2, 2, 3, padding=1, bias=False), (2, 4, 4, 3)),
        ("3d-s2", nn.Conv3d(2, 3, 3, stride=2, padding=1, bias=False), (2, 5, 4, 5)),
        ("T2d", nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, bias=False), (3, 5, 5)),
        ("T2d-outpad", nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1,
                                          bias=False), (2, 4, 4)),
        ("T1d-groups", nn.ConvTranspose1d(4, 4, 4, stride=2, groups=2, bias=False), (4, 9)),
        ("T3d", nn.ConvTranspose3d(2, 2, 2, stride=2, bias=False), (2, 3, 3, 3)),
    ]
    return cases


CASES = _conv_cases()


@pytest.mark.parametrize("name,op,shape", CASES, ids=[c[0] for c in CASES])
def test_torus_bound_above_dense_norm(name: str, op: nn.Module, shape: tuple[int, ...]) -> None:
    op = op.double().eval()
    truth = _truth(_jac(op, shape), "2")
    spec = _spec(op, shape)
    b, how = C.conv_torus_upper(spec)
    assert b >= truth * (1 - 1e-12), (name, b, truth, how)
    grid, _ = C.conv_fourier_upper(spec)
    # the grid samples the polynomial whose sup the torus bounds
    assert grid <= b * (1 + 1e-9), (name, grid, b)
    l2, _ = C.conv_l2_upper(spec)
    assert l2 >= truth * (1 - 1e-12)


def test_torus_gram_path_above_dense_norm() -> None:
    torch.manual_seed(1)
    for op, shape in [(nn.Conv2d(6, 8, 3, padding=1, bias=False), (6, 6, 6)),
                      (nn.Conv2d(8, 5, 3, stride=2, padding=1, bias=False), (8, 7, 7)),
                      (nn.Conv2d(6, 6, 3, groups=2, padding=1, bias=False), (6, 5, 5))]:
        op = op.double().eval()
        truth = _truth(_jac(op, shape), "2")
        spec = _spec(op, shape)
        b, _ = C.conv_torus_upper(spec, _gram_min=2)
        svd, _ = C.conv_torus_upper(spec)
        assert b >= truth * (1 - 1e-12)
        assert abs(b - svd) <= 3 * C.TORUS_TOL * svd  # both within tol of the same sup


def _fine_sup(K: torch.Tensor, N: int) -> float:
    """max over an N x N grid of ||K_hat(w)||_2 for a stride-1 undilated 2d kernel."""
    k1, k2 = K.shape[2:]
    w = torch.arange(N, dtype=torch.float64) * (2 * math.pi / N)
    e1 = torch.exp(-1j * torch.outer(w, torch.arange(k1, dtype=torch.float64)))
    e2 = torch.exp(-1j * torch.outer(w, torch.arange(k2, dtype=torch.float64)))
    Kh = torch.einsum("ia,jb,omab->ijom", e1, e2, K.to(torch.complex128))
    return float(torch.linalg.matrix_norm(Kh, ord=2).max())


@pytest.mark.parametrize("dilation", [1, 2])
def test_torus_within_factor_of_fine_sup(dilation: int) -> None:
    torch.manual_seed(2)
    for k in (3, 5):
        op = nn.Conv2d(3, 4, k, padding=dilation * (k // 2), dilation=dilation,
                       bias=False).double()
        b, _ = C.conv_torus_upper(_spec(op, (3, 16, 16)))
        fine = _fine_sup(op.weight.detach(), 400)
        # fine <= sup <= b; b <= (1 + tol) (largest sample) <= (1 + tol) sup
        # and sup <= fine / cos(X) with X = (k - 1) pi / 400 (step 3 of the proof)
        assert fine <= b * (1 + 1e-12)
        assert b <= fine * (1 + C.TORUS_TOL) / math.cos((k - 1) * math.pi / 400) * (1 + 1e-9)


def test_torus_independent_of_image_size() -> None:
    torch.manual_seed(3)
    op = nn.Conv2d(4, 5, 3, padding=1, bias=False).double()
    b8, how8 = C.conv_torus_upper(_spec(op, (4, 8, 8)))
    b64, how64 = C.conv_torus_upper(_spec(op, (4, 64, 64)))
    b224, how224 = C.conv_torus_upper(_spec(op, (4, 224, 224)))
    assert b8 == b64 == b224 and how8 == how64 == how224  # same symbols, same value
    assert b8 >= _truth(_jac(op, (4, 8, 8)), "2")
    _, how = C.conv_l2_upper(_spec(op, (4, 64, 64)))
    assert how.startswith("torus")  # 66 x 34 grid frequencies > GRID_LIMIT
    _, how = C.conv_l2_upper(_spec(op, (4, 8, 8)))
    assert how.startswith("fourier")


def test_torus_exact_cases() -> None:
    # 1x1 conv: a matrix, the symbol is constant
    torch.manual_seed(4)
    op = nn.Conv2d(5, 3, 1, bias=False).double()
    b, _ = C.conv_torus_upper(_spec(op, (5, 30, 30)))
    s = float(torch.linalg.matrix_norm(op.weight.detach()[:, :, 0, 0], 2))
    assert s <= b <= s * (1 + 1e-12)
    # all-ones kernel: sup at w = 0 equals the kernel sum
    op = nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    with torch.no_grad():
        op.weight.fill_(1.0)
    b, _ = C.conv_torus_upper(_spec(op, (1, 40, 40)))
    assert 9.0 <= b <= 9.0 * (1 + C.TORUS_TOL)
    # zero kernel
    with torch.no_grad():
        op.weight.zero_()
    assert C.conv_torus_upper(_spec(op, (1, 40, 40)))[0] == 0.0


def test_torus_scaled_weights() -> None:
    torch.manual_seed(5)
    op = nn.Conv2d(2, 2, 3, padding=1, bias=False).double()
    b, _ = C.conv_torus_upper(_spec(op, (2, 6, 6)))
    with torch.no_grad():
        op.weight.mul_(2.0**200)
    b2, _ = C.conv_torus_upper(_spec(op, (2, 6, 6)))
    assert b2 == b * 2.0**200


# ---------------------------------------------------------------------------------------------
# the sampling lemma (step 2 / 3 of the proof of conv_torus_upper)
# ---------------------------------------------------------------------------------------------
def _vec_poly(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """||sum_j a_j e^{-i j w}|| for a (n+1, m) complex, at the points w."""
    E = torch.exp(-1j * torch.outer(w, torch.arange(a.shape[0], dtype=torch.float64)))
    return torch.linalg.vector_norm(E @ a, dim=1)


def test_grid_factor_inequality_random_polys() -> None:
    gen = torch.Generator().manual_seed(6)
    fine = torch.arange(1 << 16, dtype=torch.float64) * (2 * math.pi / (1 << 16))
    for trial in range(60):
        n = 1 + trial % 6
        a = torch.randn((n + 1, 3), dtype=torch.complex128, generator=gen)
        if trial % 5 == 0:  # near-extremal: (1 + e^{-i n w}) / 2 plus noise
            a = torch.zeros((n + 1, 3), dtype=torch.complex128)
            a[0, 0] = a[n, 0] = 0.5
            a = a + 1e-3 * torch.randn((n + 1, 3), dtype=torch.complex128, generator=gen)
        M = float(_vec_poly(a, fine).max())  # <= the true sup
        for N in (n + 1, 2 * n + 1, 3 * n, 10 * n):
            off = float(torch.rand((), generator=gen, dtype=torch.float64)) * 2 * math.pi
            grid = off + torch.arange(N, dtype=torch.float64) * (2 * math.pi / N)
            sampled = float(_vec_poly(a, grid).max())
            assert sampled >= M * math.cos(math.pi * n / (2 * N)) * (1 - 1e-12), (n, N)


def test_grid_factor_is_sharp() -> None:
    # v = (1 + e^{-i n w}) / 2: sup 1 at w = 0; a grid half a cell off reads cos(pi n / (2N))
    for n, N in [(2, 8), (4, 32), (3, 99)]:  # N multiple of n: every peak half a cell off
        a = torch.zeros((n + 1, 1), dtype=torch.complex128)
        a[0, 0] = a[n, 0] = 0.5
        grid = math.pi / N + torch.arange(N, dtype=torch.float64) * (2 * math.pi / N)
        sampled = float(_vec_poly(a, grid).max())
        assert abs(sampled - math.cos(math.pi * n / (2 * N))) < 1e-12


def test_grid_factor_inequality_2d_sum_form() -> None:
    # step 3: ||K_hat(c)|| >= M cos(sum_t n_t h_t / 2) for the cell of the maximiser
    gen = torch.Generator().manual_seed(7)
    for _ in range(6):
        K = torch.randn((2, 3, 3, 3), dtype=torch.float64, generator=gen)
        M = _fine_sup(K, 400)
        for N in (5, 9, 20):
            off = torch.rand(2, generator=gen, dtype=torch.float64) * 2 * math.pi / N
            w = torch.arange(N, dtype=torch.float64) * (2 * math.pi / N)
            e1 = torch.exp(-1j * torch.outer(w + off[0], torch.arange(3, dtype=torch.float64)))
            e2 = torch.exp(-1j * torch.outer(w + off[1], torch.arange(3, dtype=torch.float64)))
            Kh = torch.einsum("ia,jb,omab->ijom", e1, e2, K.to(torch.complex128))
            sampled = float(torch.linalg.matrix_norm(Kh, ord=2).max())
            assert sampled >= M * math.cos(2 * 2 * math.pi / (2 * N)) * (1 - 1e-12)
