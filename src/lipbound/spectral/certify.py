r"""Certified upper bounds on operator norms of linear layers (l2, and l1 / l-inf).

Every number returned here is an upper bound on the norm of the *exact-arithmetic* linear map
defined by the stored weights (float32 weights are converted to float64 exactly). All
computations run in float64 and every bound is inflated by an explicit rounding margin.
Notation: ``u = 2^-53`` (float64 unit roundoff).

Certificates (l2), each proved in the docstring of the function that computes it:

* **dense matrices** (``nn.Linear``; any small op via its Jacobian): SVD with a backward-error
  margin, or ``eigvalsh`` / a Cholesky-verified Lanczos candidate of the Gram matrix,
  :func:`matrix_norm_upper`. A small zero-padded conv's matrix is written from its kernel
  (exact, :func:`_conv_matrix`) rather than from float64 convolutions of basis vectors.
* **convolutions** (``Conv1d/2d/3d``, any stride, dilation, groups, padding mode;
  ``ConvTranspose*`` as adjoints; ``AvgPool*`` as constant-kernel convs): the largest singular
  value of the Fourier symbol of a circular convolution that contains the layer,
  :func:`conv_fourier_upper`. Exact (up to rounding) for circular padding with stride 1 (and
  stride ``s`` dividing the input size when the output covers the grid). For large images
  (more than :data:`GRID_LIMIT` grid frequencies) the sup of the same symbol over the whole
  torus, certified from a refined cover by cells whose cost does not depend on the image size,
  :func:`conv_torus_upper`; :func:`conv_l2_upper` picks one.
* **average pools** (``AvgPool*``, ``AdaptiveAvgPool*``, entries of one sign, a negative
  ``divisor_override`` included): the Schur test ``||A||_2 <= sqrt(||A||_1 ||A||_inf)``, with
  the row and column sums of ``|A|`` computed as ``|A 1|`` and ``|A^T 1|``.
* **eval BatchNorm** (diagonal), **Flatten / Identity / Dropout(eval) / zero padding**
  (norm 1), **reflect / replicate / circular padding** (``sqrt`` of the largest copy count),
  **Sequential** (product of the parts, after folding BatchNorm into adjacent convs/linears).

The smallest of the applicable certificates is returned.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from scipy.linalg import blas
from torch import nn

from ..errors import InvalidArgumentError
from ._ops import module_call, op_device, output_shape

__all__ = [
    "ConvSpec",
    "DENSE_LIMIT",
    "conv_matrix_of",
    "jacobian_upper",
    "best_certificate",
    "bn_scale",
    "conv_fourier_upper",
    "conv_l2_upper",
    "conv_spec",
    "conv_torus_upper",
    "dense_upper",
    "dense_matrix",
    "matrix_norm_upper",
    "pow2_split",
    "round_up",
    "U",
]

U = 2.0**-53  # float64 unit roundoff
#: Largest ``n_in * n_out`` for which a Jacobian is built densely: ``2048^2``, so that a
#: 512-channel convolution on a 2 x 2 map (VGG at 32 x 32) gets its exact matrix (the Fourier
#: grid's circulant on 4 x 4 was 1.5x its norm there, and dearer).
DENSE_LIMIT = 1 << 22
#: :func:`matrix_norm_upper` takes an SVD (or, for a wide / tall matrix, ``eigvalsh`` of its
#: Gram matrix) while the smaller side has at most this many entries, Lanczos + Cholesky beyond
SVD_MAX = 512
#: Memory budget (bytes) of one chunk of basis vectors pushed through the op by
#: :func:`dense_jacobian`: the chunk holds ``c`` inputs and outputs (float64), with a factor 4
#: for the op's intermediate values. A Linear(49152, 10) asked for 19 GB when the chunk size
#: ignored the input width.
DENSE_CHUNK_BYTES = 1 << 28
_F64 = torch.float64


def pow2_split(T: torch.Tensor, *, even: bool = False) -> tuple[torch.Tensor, float]:
    r"""``(T / 2^e, 2^e)`` with ``2^e`` near ``max |T|`` (``(T, 1)`` for a zero tensor or when
    ``|e| <= 8``); ``even=True`` makes ``e`` even, so ``2^(e/2)`` (the scale of each factor of a
    square-root split ``W = P Q``) is a power of two as well.

    Scaling by a power of two is exact in binary floating point (barring entries pushed below
    ``2^-1022 max|T|``, whose absolute change ``<= 2^-1075`` is far below the ``u ||T||_F``
    margins of every certificate here), and every norm is homogeneous, so a bound ``b`` of the
    scaled tensor gives the bound ``2^e b`` of ``T``. It keeps squares and Gram matrices in
    range: weights ~1e30 (~1e60 squared) and ~1e-150 (~1e-300, subnormal territory in float64,
    where relative rounding margins no longer hold) alike.
    """
    mx = float(T.detach().abs().max()) if T.numel() else 0.0
    if not mx > 0 or not math.isfinite(mx):
        return T, 1.0
    e = math.frexp(mx)[1]
    if even:
        e = 2 * (e // 2)
    if -8 <= e <= 8:
        return T, 1.0
    return T * math.ldexp(1.0, -e), math.ldexp(1.0, e)


def round_up(x: float, rel: float = 8 * U) -> float:
    """Round a computed non-negative float64 up by a relative margin (covers its own rounding)."""
    return float(x) * (1.0 + rel) + 1e-300


# ---------------------------------------------------------------------------------------------
# dense matrices
# ---------------------------------------------------------------------------------------------
def matrix_norm_upper(W: torch.Tensor, norm: str = "2") -> tuple[float, str]:
    r"""Certified upper bound on ``||W||`` for a dense matrix ``W`` (any shape ``m x n``).

    l2, small matrices (``min(m, n) <= 512``): ``s = max(svdvals(W))`` in float64. The SVD
    (Householder bidiagonalisation + QR iteration, LAPACK) is backward stable: the computed
    singular values are the exact ones of ``W + E`` with ``||E||_2 <= c m n u ||W||_F`` for a
    small constant ``c`` (Golub & Van Loan, Matrix Computations, sec. 8.6; Higham, Accuracy
    and Stability, ch. 19), and Weyl's inequality gives ``|s - sigma_max(W)| <= ||E||_2``.
    We take ``c = 8``:

        ||W||_2 <= s + 8 m n u ||W||_F.

    l2, other matrices: ``||W||_2^2 = lambda_max(G)`` with ``G = W W^T`` (the smaller side,
    ``p x p``, inner dimension ``q``) computed in float64, and ``lambda_max`` certified as in
    :func:`_gram_lambda_upper` (whose proof, written for complex matrices, holds verbatim for
    real ones, with ``fro_up`` the computed ``||W||_F`` rounded up by ``(m n + 8) u``). For
    ``p > 512``: a Lanczos candidate ``c`` (64 steps, then 160) is proved by a successful
    Cholesky factorisation of ``c I - G_hat``, giving ``lambda_max(G) <= c + e_D + 2 e_C +
    e_G``; if both fail, the backward-stable ``eigvalsh`` bound (:func:`_lambda_max_upper`).
    One Cholesky costs a quarter of a symmetric eigensolve. For ``p <= 512`` and ``q >= 2 p``
    (a wide or tall matrix, whose SVD costs ``~4 q p^2`` against the ``q p^2`` of the Gram
    matrix): that ``eigvalsh`` bound directly, ``lambda_hat + 8.08 p^2 u f2 + e_G`` (margins
    of the same order as the SVD's, ~1e-9 relative). A non-finite ``G_hat`` gives ``inf``.

    l1 / l-inf: the largest column / row sum of ``|W|``; a float64 sum of ``q`` non-negative
    terms is at most ``(1 + q u)`` times too small, so it is inflated by ``(1 + 2 q u)``.
    The margins are far below 1e-6 relative for every layer of practical size.

    >>> b, how = matrix_norm_upper(torch.diag(torch.tensor([3.0, -4.0])))
    >>> 4.0 <= b < 4.0 + 1e-12, how
    (True, 'dense SVD (float64) + margin')
    """
    W = W.detach().to(_F64).reshape(W.shape[0], -1)
    if not bool(W.any()):
        return 0.0, "zero matrix (exact)"
    W, f = pow2_split(W)
    if f != 1.0:
        b, how = matrix_norm_upper(W, norm)
        return b * f, how
    m, n = W.shape
    if norm in ("1", "inf"):
        sums = W.abs().sum(dim=0 if norm == "1" else 1)
        q = m if norm == "1" else n
        return round_up(float(sums.max()), 2 * q * U + 8 * U), f"dense l{norm} (abs sums)"
    fro = float(torch.linalg.matrix_norm(W, "fro"))
    p, q = min(m, n), max(m, n)
    if p <= SVD_MAX and q < 2 * p:
        s = float(torch.linalg.svdvals(W)[0])
        return round_up(s + 8 * m * n * U * fro * 1.01), "dense SVD (float64) + margin"
    # fro rounded up: >= ||W||_F (a sum of m n squares, then a square root)
    direct = p <= SVD_MAX  # small Gram matrix: eigvalsh, no Lanczos / Cholesky candidate
    lam_up = _gram_lambda_upper(W[None], round_up(fro, (m * n + 8) * U), 0.0, direct=direct)
    return (round_up(math.sqrt(lam_up)),
            "dense Gram (float64), " + ("eigvalsh" if direct
                                        else "Lanczos candidate verified by Cholesky")
            + " + margin")


# ---------------------------------------------------------------------------------------------
# convolutions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvSpec:
    """A convolution (cross-correlation, as in torch) in a form the certificates read.

    ``weight``: ``(C_out, C_in / groups, *k)`` float64; ``in_spatial``: input sizes;
    ``pad_lo`` / ``pad_hi``: padding before / after per dim; ``mode``: torch padding mode;
    ``out_spatial``: output sizes; ``adjoint``: the layer is the adjoint of this conv
    (ConvTranspose), which matters for l1 / l-inf only.
    """

    weight: torch.Tensor
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_lo: tuple[int, ...]
    pad_hi: tuple[int, ...]
    groups: int
    mode: str = "zeros"
    adjoint: bool = False

    @property
    def dims(self) -> int:
        return len(self.in_spatial)


def _tuple(v: Any, d: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * d
    t = tuple(int(x) for x in v)
    return t * d if len(t) == 1 else t


def conv_spec(
    module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> ConvSpec | None:
    """Describe a Conv / ConvTranspose / AvgPool module as a :class:`ConvSpec`, or ``None``.

    AvgPool becomes a single-channel conv with the constant kernel ``1 / divisor`` (all
    channels are equal blocks of a block-diagonal operator, so they share its norm) when
    ``count_include_pad`` holds (or padding is 0) and no window is truncated by ``ceil_mode``.
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return _transpose_spec(module, in_shape, out_shape)
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv_nd_spec(module, in_shape, out_shape)
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return _avgpool_spec(module, in_shape, out_shape)
    return None


def _transpose_spec(
    module: nn.modules.conv._ConvTransposeNd, in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
) -> ConvSpec | None:
    """A ConvTranspose as the adjoint of the conv from its output shape to its input's."""
    d = module.weight.dim() - 2
    if len(in_shape) != d + 1 or len(out_shape) != d + 1 or module.padding_mode != "zeros":
        return None
    pad = _tuple(module.padding, d)
    return ConvSpec(
        weight=module.weight.detach().to(_F64),
        in_spatial=tuple(out_shape[1:]),
        out_spatial=tuple(in_shape[1:]),
        stride=_tuple(module.stride, d),
        dilation=_tuple(module.dilation, d),
        pad_lo=pad,
        pad_hi=pad,
        groups=module.groups,
        mode="zeros",
        adjoint=True,
    )


def _conv_nd_spec(
    module: nn.modules.conv._ConvNd, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> ConvSpec | None:
    """A Conv1d/2d/3d with its padding (per side, from torch's reversed padding)."""
    d = module.weight.dim() - 2
    if len(in_shape) != d + 1 or len(out_shape) != d + 1:
        return None
    rp = list(module._reversed_padding_repeated_twice)
    lo = tuple(int(rp[2 * (d - 1 - i)]) for i in range(d))
    hi = tuple(int(rp[2 * (d - 1 - i) + 1]) for i in range(d))
    return ConvSpec(
        weight=module.weight.detach().to(_F64),
        in_spatial=tuple(in_shape[1:]),
        out_spatial=tuple(out_shape[1:]),
        stride=_tuple(module.stride, d),
        dilation=_tuple(module.dilation, d),
        pad_lo=lo,
        pad_hi=hi,
        groups=module.groups,
        mode=module.padding_mode,
    )


def _avgpool_spec(
    module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> ConvSpec | None:
    """An AvgPool as a one-channel conv with the constant kernel ``1 / divisor`` (see
    :func:`conv_spec` for when)."""
    d = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(module)]
    if len(in_shape) != d + 1 or len(out_shape) != d + 1:
        return None
    k = _tuple(module.kernel_size, d)
    s = _tuple(module.stride if module.stride is not None else module.kernel_size, d)
    p = _tuple(module.padding, d)
    if any(pi > 0 for pi in p) and not module.count_include_pad:
        return None
    # the windows must all lie within the zero-padded input (no ceil_mode truncation)
    for i in range(d):
        full = (in_shape[1 + i] + 2 * p[i] - k[i]) // s[i] + 1
        if out_shape[1 + i] != full:
            return None
    div = getattr(module, "divisor_override", None) or math.prod(k)
    w = torch.full((1, 1, *k), 1.0 / div, dtype=_F64)
    return ConvSpec(
        weight=w,
        in_spatial=tuple(in_shape[1:]),
        out_spatial=tuple(out_shape[1:]),
        stride=s,
        dilation=(1,) * d,
        pad_lo=p,
        pad_hi=p,
        groups=1,
        mode="zeros",
    )


def _pad_copy_counts(spatial: tuple[int, ...], pads: list[int], mode: str) -> torch.Tensor:
    """How many times ``F.pad(x, pads, mode)`` copies each input entry: ``P^T 1``.

    ``P`` (the padding as a matrix) has exactly one 1 per row, so ``P^T P`` is the diagonal
    matrix of these counts and ``||P||_2 = sqrt(max count)`` exactly (``||P||_1`` = max count,
    ``||P||_inf = 1``).
    """
    x = torch.zeros((1, 1, *spatial), dtype=_F64, requires_grad=True)
    y = F.pad(x, pads, mode=mode) if mode != "constant" else F.pad(x, pads)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return g.reshape(spatial)


@dataclass(frozen=True)
class _DimPlan:
    grid: int  # circulant grid size G along this dim
    phases: int  # polyphase factor P along this dim
    phase: tuple[int, ...]  # per tap
    pos: tuple[int, ...]  # per tap, in [0, G)
    rep: int  # largest number of outputs reading the same circulant output (1 = a selection)
    exact: bool


def _dim_plan(
    mode: str, H: int, k: int, s: int, d: int, lo: int, *, hi: int, Ho: int
) -> _DimPlan:
    """The circulant plan of one dim (grid, phases, tap positions, output repetition)."""
    if mode == "circular":
        ms = [(t * d - lo) % H for t in range(k)]
        if H % s == 0:
            G = H // s
            rep = -(-Ho // G)
            return _DimPlan(G, s, tuple(m % s for m in ms), tuple((m // s) % G for m in ms),
                            rep, Ho == G)
        counts: dict[int, int] = {}
        for i in range(Ho):
            counts[(i * s) % H] = counts.get((i * s) % H, 0) + 1
        rep = max(counts.values())
        return _DimPlan(H, 1, (0,) * k, tuple(ms), rep, s == 1 and Ho == H)
    # zero padding (reflect / replicate are reduced to it on the padded input)
    L = H + lo + hi
    G = -(-L // s)
    ms = [t * d for t in range(k)]
    return _DimPlan(G, s, tuple(m % s for m in ms), tuple(m // s for m in ms), 1, False)


def _padding_reduction(
    spec: ConvSpec,
) -> tuple[float, tuple[int, ...], tuple[int, ...], tuple[int, ...], str]:
    """``(pad_norm, spatial, lo, hi, mode)``: reflect / replicate padding as a copy matrix.

    ``xpad = P x`` with ``||P||_2 = sqrt(max copy count)`` (:func:`_pad_copy_counts`); the
    conv then reads ``xpad`` without padding (``mode`` becomes ``"zeros"`` with zero pads).
    Other modes are returned unchanged with ``pad_norm = 1``.
    """
    D = spec.dims
    lo, hi, spatial, mode = spec.pad_lo, spec.pad_hi, spec.in_spatial, spec.mode
    if mode not in ("reflect", "replicate"):
        return 1.0, spatial, lo, hi, mode
    pads: list[int] = []
    for i in reversed(range(D)):
        pads += [lo[i], hi[i]]
    counts = _pad_copy_counts(spatial, pads, mode)
    pad_norm = round_up(math.sqrt(float(counts.max())))
    spatial = tuple(spatial[i] + lo[i] + hi[i] for i in range(D))
    return pad_norm, spatial, (0,) * D, (0,) * D, "zeros"


def _fourier_plans(spec: ConvSpec) -> tuple[list[_DimPlan], float]:
    """Per-dim circulant plans of :func:`conv_fourier_upper` and the padding's copy norm."""
    pad_norm, spatial, lo, hi, mode = _padding_reduction(spec)
    ks = tuple(spec.weight.shape[2:])
    plans = [
        _dim_plan(mode, spatial[i], ks[i], spec.stride[i], spec.dilation[i], lo[i], hi=hi[i],
                  Ho=spec.out_spatial[i])
        for i in range(spec.dims)
    ]
    return plans, pad_norm


def _effective_kernel(
    K: torch.Tensor,
    groups: int,
    phases: list[int],
    phase: list[tuple[int, ...]],
    pos: list[tuple[int, ...]],
) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Polyphase kernel: ``(Keff, positions)``, ``Keff`` of shape ``(T, g, C_out/g, C_eff)``.

    Tap ``t`` (a multi-index) reads phase ``phase[i][t_i]`` at position ``pos[i][t_i]`` per dim
    ``i``; taps at one position add up. Columns are ``(C_in/g) x`` the phases some tap reads
    (phases no tap reads are zero columns of the symbol, dropped: same singular values).
    """
    D = K.dim() - 2
    ks = tuple(K.shape[2:])
    cout, cin_g = K.shape[0], K.shape[1]
    cout_g = cout // groups
    positions: dict[tuple[int, ...], int] = {}
    entries: list[tuple[int, int, tuple[int, ...]]] = []  # (pos_idx, phase_flat, tap)
    for tap in itertools.product(*[range(k) for k in ks]):
        p = tuple(pos[i][tap[i]] for i in range(D))
        ph = 0
        for i in range(D):
            ph = ph * phases[i] + phase[i][tap[i]]
        if p not in positions:
            positions[p] = len(positions)
        entries.append((positions[p], ph, tap))
    used = {ph: i for i, ph in enumerate(sorted({e[1] for e in entries}))}
    Keff = torch.zeros((len(positions), groups, cout_g, cin_g, len(used)), dtype=_F64,
                       device=K.device)
    Kg = K.reshape(groups, cout_g, cin_g, *ks)
    for pi, ph, tap in entries:
        Keff[pi, :, :, :, used[ph]] += Kg[(slice(None),) * 3 + tap]
    return Keff.reshape(len(positions), groups, cout_g, cin_g * len(used)), list(positions)


def _lanczos_ritz_max(G: torch.Tensor, k: int = 24) -> torch.Tensor:
    """Largest Ritz value of each Hermitian ``G[b]`` from ``k`` batched Lanczos steps.

    A heuristic *estimate* (a lower estimate of ``lambda_max`` when the basis is orthonormal)
    used only to choose the candidate that :func:`_lambda_max_upper` then *verifies*: nothing
    here needs to be accurate for the certificate to be valid.
    """
    b, p, _ = G.shape
    k = max(1, min(k, p))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn((b, p), dtype=_F64, generator=gen).to(device=G.device, dtype=G.dtype)
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    Q = torch.zeros((b, k, p), dtype=G.dtype, device=G.device)
    GQ = torch.zeros((b, k, p), dtype=G.dtype, device=G.device)
    for j in range(k):
        Q[:, j] = q
        w = (G @ q.unsqueeze(-1)).squeeze(-1)
        GQ[:, j] = w
        if j + 1 == k:
            break
        Qj = Q[:, : j + 1]
        for _ in range(2):  # full reorthogonalisation, twice
            w = w - (Qj.mT @ (Qj.conj() @ w.unsqueeze(-1))).squeeze(-1)
        nrm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
        scale = torch.linalg.vector_norm(GQ[:, j], dim=1, keepdim=True)
        # breakdown (an invariant subspace was found): continue with zero vectors
        q = torch.where(nrm > 1e-10 * scale, w / nrm.clamp_min(1e-300), torch.zeros_like(w))
    H = Q.conj() @ GQ.mT  # Rayleigh-Ritz: H = Q^* G Q
    H = (H + H.mH) / 2
    ritz = torch.linalg.eigvalsh(H)[:, -1]
    return torch.nan_to_num(ritz, nan=0.0, posinf=0.0)


def _gram_lambda_upper(
    A: torch.Tensor, fro_up: float, floor: float, scale: float | None = None, *,
    direct: bool = False,
) -> float:
    r"""Certified ``L >= max_b lambda_max(A[b]^* A[b])`` for computed complex matrices ``A[b]``.

    ``A`` is ``(B, m, n)`` complex128 with ``||A[b]||_F <= fro_up``; ``floor`` is a value the
    caller already certifies (it only helps pick the candidate). Let ``p = min(m, n)``,
    ``q = max(m, n)`` and ``G_b`` the ``p x p`` Gram matrix on the smaller side
    (``A A^*`` or ``A^* A``, same non-zero eigenvalues, ``lambda_max(G_b) = ||A[b]||_2^2``).

    **Forming G.** ``G_hat = fl(G)`` (complex products, inner dimension ``q``):
    ``|G_hat - G| <= gamma_{q+2}' |A| |A|^*`` entrywise (complex products cost a factor
    ``sqrt 2``, a factor 4 covers that and any summation order or 3M variant's normwise
    bound), so ``||G_hat - G||_2 <= ||G_hat - G||_F <= e_G := 4.04 (q + 4) u fro_up^2``. The
    LAPACK routines below read only the lower triangle (and the real part of the diagonal):
    the Hermitian matrix ``H_G`` they see satisfies the same entrywise bound, hence
    ``lambda_max(G) <= lambda_max(H_G) + e_G``.

    The bound is then :func:`_lambda_max_upper` of ``G_hat`` with ``f2 = fro_up^2`` and that
    ``e_G`` (``direct``: its ``eigvalsh`` bound alone).
    """
    m, n = A.shape[-2:]
    G = _gram(A)
    q = max(m, n)
    f2 = fro_up * fro_up  # (a non-finite G gets inf there: never a silently wrong bound)
    return _lambda_max_upper(G, f2, 4.04 * (q + 4) * U * f2, floor, scale, direct=direct)


def _gram(A: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of ``A`` (``(B, m, n)``) on its smaller side: ``A A^*`` or ``A^* A``.

    A single real float64 matrix on the CPU goes through BLAS ``dsyrk`` (the lower triangle
    only, mirrored as ``L + L^T`` with the doubled diagonal halved, both exact in binary
    (an overflow there gives ``inf``, which every caller turns into an infinite bound): half
    the flops of a product, the same dot products, hence the same entrywise error bound);
    anything else through a batched product.
    """
    m, n = A.shape[-2:]
    if A.shape[0] == 1 and A.dtype == _F64 and A.device.type == "cpu":
        a = A[0].contiguous().numpy().T  # Fortran-ordered view of A: no copy
        # trans=1: a^T a = A A^T (m x m); trans=0: a a^T = A^T A (n x n)
        low = torch.from_numpy(blas.dsyrk(1.0, a, trans=1 if m <= n else 0, lower=1)).tril_()
        G = low + low.mT  # the diagonal doubled, then halved: both exact in binary
        G.diagonal().mul_(0.5)
        return G[None]
    return A @ A.mH if m <= n else A.mH @ A


def _candidate(est: float, scale: float | None = None) -> float:
    """A Cholesky candidate from a Lanczos estimate ``est`` of ``lambda_max``: ``est (1 + 4e-6)``
    rounded up (``scale`` replaces the factor, for tests only). Only a guess: the Cholesky
    test of :func:`_lambda_max_upper` proves or rejects it."""
    return round_up(est * ((1.0 + 4e-6) if scale is None else scale))


def _lambda_max_upper(
    G: torch.Tensor, f2: float, e_G: float, floor: float = 0.0, scale: float | None = None,
    steps: tuple[int, ...] = (64, 160), *, direct: bool = False,
) -> float:
    r"""Certified ``L >= max_b lambda_max(G[b])`` for ``(B, p, p)`` computed Gram matrices.

    ``G_hat[b]`` is within ``e_G`` (in ``||.||_2``) of an exact Gram matrix ``G[b]`` (positive
    semidefinite, ``G_ii >= 0``) with ``|G_hat_ii|, ||G_hat||_F <= 1.01 f2`` (the caller proves
    both, e.g. :func:`_gram_lambda_upper`); the LAPACK routines below read only the lower
    triangle (and the real part of the diagonal), and the Hermitian matrix ``H_G`` they see
    satisfies the same bound, so ``lambda_max(G) <= lambda_max(H_G) + e_G``. ``floor > 0``
    is the caller's candidate (a bound it already certified, or an estimate of the max): it
    only replaces the first candidate below, the proof does not depend on it.

    **Candidate.** ``c = floor`` if given, else ``(1 + 4e-6) max_b ritz_b`` with ``ritz_b`` a
    Lanczos estimate of ``lambda_max(G_b)`` (:func:`_lanczos_ritz_max`; ``scale`` replaces
    the factor, for tests only): with more than 4 matrices, 8 steps on each rank them and
    ``steps[0]`` steps on the 4 largest give the estimate (each step reads every matrix once,
    and only the largest matters), else ``steps[0]`` steps on each. It is only a guess: the
    next step
    proves or rejects it for each ``b``; the ``b`` rejected get a new candidate from
    ``steps[0]``, then ``steps[1]``... steps on themselves (at least the previous one; a round
    that would repeat the first candidate's steps on the same matrices is skipped, and after
    a round of estimates the next candidate adds the growth of the estimate since that
    round, as Ritz values approach ``lambda_max`` from below).

    **Verification by Cholesky.** ``M_hat = fl(c I - H_G) = c I - H_G + D`` with ``D``
    diagonal, ``|D_ii| <= u |c - G_hat_ii|``, so ``||D||_2 <= e_D := u (c + 2 f2)``
    (``|G_hat_ii| <= 1.01 f2``). If the floating-point Cholesky factorisation
    of ``M_hat`` runs to completion (``cholesky_ex`` ``info == 0``), the computed factor
    satisfies ``R^* R = M_hat + dM`` with ``|dM| <= gamma_{p+1} |R^*| |R|`` (Higham, Accuracy
    and Stability, Thm 10.3; a factor 2 covers the blocked LAPACK variant), so
    ``||dM||_2 <= ||dM||_F <= 2 gamma_{p+1} ||R||_F^2`` and ``||R||_F^2 = tr(M_hat + dM) <=
    tr(M_hat) / (1 - 2 gamma_{p+1})``; ``tr(M_hat) <= p (c + e_D + e_G)`` (``G_ii >= 0``). Hence
    ``e_C := 2.03 (p + 1) u p (c + e_D + e_G)`` (doubled below for slack) bounds ``||dM||_2``. As
    ``R^* R`` is positive semidefinite, ``c I - H_G + D + dM >= 0``, i.e.

        lambda_max(G_b) <= c + e_D + 2 e_C + e_G.

    **Fallback.** For each ``b`` whose Cholesky fails, ``lambda_hat = max(eigvalsh(H_G))``
    (backward stable: ``||E||_2 <= 8 p^2 u ||G_hat||_F <= 8.08 p^2 u f2``), so
    ``lambda_max(G_b) <= lambda_hat + 8.08 p^2 u f2 + e_G``. The result is the maximum of the
    applicable bounds, rounded up (``inf`` if ``G_hat`` is not finite). ``direct=True`` skips
    the candidates: the fallback bound for every ``b`` (cheaper for small ``p``).
    """
    if not math.isfinite(float(G.sum().abs())):  # an inf or NaN entry makes the sum one
        return math.inf  # non-finite Gram matrix: no certificate (never a silently wrong one)
    if direct:
        return round_up(float(_eig_fallback(G, f2, e_G).max()))
    prev: float | None = None  # the last Lanczos estimate (None: not one of every matrix)
    rounds = steps
    if floor > 0:  # the caller's candidate (matrices above it are retried below)
        c = floor
    elif G.shape[0] > 4:
        rough = _lanczos_ritz_max(G, 8)
        top = torch.topk(rough, 4).indices
        c = _candidate(max(float(rough.max()),
                           float(_lanczos_ritz_max(G[top], steps[0]).max())), scale)
    else:
        prev = float(_lanczos_ritz_max(G, steps[0]).max())
        c = _candidate(prev, scale)
        rounds = steps[1:]  # the same steps again would give the same rejected candidate
    bounds = _chol_verify(G, torch.full((G.shape[0],), c, dtype=_F64, device=G.device),
                          f2, e_G)
    for k in rounds:
        bad = torch.nonzero(~torch.isfinite(bounds)).flatten()
        if not bad.numel():
            break
        est = float(_lanczos_ritz_max(G[bad], k).max())
        # Ritz values grow towards lambda_max with the steps: the last gain is added again
        guess = est + max(0.0, est - prev) if prev is not None else est
        prev = est
        c = max(c, _candidate(guess, scale))
        bounds[bad] = _chol_verify(G[bad], torch.full((bad.numel(),), c, dtype=_F64,
                                                      device=G.device), f2, e_G)
    fin = torch.isfinite(bounds)
    bound = float(bounds[fin].max()) if bool(fin.any()) else 0.0
    bad = torch.nonzero(~fin).flatten()
    if bad.numel():
        bound = max(bound, float(_eig_fallback(G[bad], f2, e_G).max()))
    return round_up(bound)


def _chol_verify(G: torch.Tensor, c: torch.Tensor, f2: float, e_G: float) -> torch.Tensor:
    r"""Per-matrix verification step of :func:`_lambda_max_upper` (its proof).

    ``G`` is ``(B, p, p)`` (the computed Gram matrices, within ``e_G`` of the exact ones in
    ``||.||_2``, with ``|G_ii|, ||G||_F <= f2``), ``c`` the ``(B,)`` candidate shifts. Returns
    ``c + e_D + 2 e_C + e_G`` (a certified ``lambda_max`` bound, before the final rounding up)
    where the Cholesky factorisation of ``c I - G`` succeeds, and ``inf`` where it fails.
    """
    p = G.shape[-1]
    e_D = U * (c + 2 * f2)
    e_C = 2.03 * (p + 1) * U * p * (c + e_D + e_G)
    M = -G
    M.diagonal(dim1=-2, dim2=-1).add_(c.to(G.dtype).unsqueeze(-1))
    _, info = torch.linalg.cholesky_ex(M)
    del M
    bound = c + e_D + 2 * e_C + e_G
    return torch.where((info == 0) & (c > 0), bound, torch.full_like(bound, math.inf))


def _eig_fallback(G: torch.Tensor, f2: float, e_G: float) -> torch.Tensor:
    """``(B,)`` bounds ``lambda_hat + 8.08 p^2 u f2 + e_G`` (the fallback of
    :func:`_lambda_max_upper`, backward-stable ``eigvalsh``)."""
    p = G.shape[-1]
    lam = torch.linalg.eigvalsh(G)[:, -1]
    return lam.clamp_min(0.0) + 8.08 * p * p * U * f2 + e_G


def conv_fourier_upper(
    spec: ConvSpec,
    *,
    max_bytes: int = 1 << 28,
    _gram_min: int = 192,
    _candidate_scale: float | None = None,
) -> tuple[float, str]:
    r"""Certified upper bound on the l2 norm of a convolution, via its Fourier symbol.

    **Claim.** Let the conv map ``x`` (``C_in x H_1 x ... x H_D``) to
    ``y[o, i] = sum_{c, t} K[o, c, t] xpad[c, i s + t d]`` (``xpad`` the padded input, ``s``
    stride, ``d`` dilation). Then ``||A||_2 <= ||P||_2 max_w ||K_hat(w)||_2`` where ``K_hat`` is
    defined below and ``P`` is the padding (``||P||_2 = 1`` for zero padding).

    **Proof (zero padding, per dim).** ``xpad`` (length ``L = H + lo + hi``) is an isometric
    embedding of ``x``. Split it into ``s`` phases ``x_phi[j] = xpad[j s + phi]`` of length
    ``G = ceil(L / s)`` (missing entries zero): an isometry again (a permutation plus zero
    fill). With ``t d = s q_t + phi_t``, ``y[i] = sum_t K_t x_{phi_t}[i + q_t]``, a stride-1
    "valid" convolution from ``C_in s^D`` channels to ``C_out``. All indices ``i + q_t`` lie in
    ``[0, G)`` (since ``(H_out - 1) s + (k - 1) d <= L - 1``), so this equals the *circular*
    convolution on the grid ``G`` read at the outputs ``i < H_out``: ``A = S C E`` with ``E``
    an isometry and ``S`` a coordinate selection, hence ``||A|| <= ||C||``. The multichannel
    circulant ``C`` is block-diagonalised by the unitary DFT on the grid:
    ``||C||_2 = max_w ||K_hat(w)||_2`` with
    ``K_hat(w) = sum_t K_eff[:, :, q_t] exp(-2 pi i <w, q_t / G>)`` over the ``prod(G)`` grid
    frequencies (half of the last axis suffices: ``K_hat(-w) = conj(K_hat(w))`` has the same
    singular values). Groups make ``C`` block-diagonal: the max is also over groups.

    *Circular padding*: ``y[i] = sum_t K_t x[(i s + t d - lo) mod H]``. If ``s`` divides ``H``
    the phases of ``x`` (a permutation) give a circular stride-1 conv on the grid ``H / s``
    read at ``i < H_out``; otherwise the stride-1 circular conv on the grid ``H`` read at
    positions ``i s``. Either way ``||A|| <= ||C||``, with equality when every grid output is
    read (e.g. stride 1 and ``H_out = H``): then the certificate is tight. When the output is
    longer than the grid (padding beyond a period), outputs repeat circulant outputs: ``A = R C
    Pi`` with ``R`` a 0/1 row-repetition, ``||R||_2 = sqrt(max repetition)`` (``R^T R`` is the
    diagonal of repetition counts), and that factor multiplies the bound.

    *Reflect / replicate padding*: ``xpad = P x`` with ``P`` a 0/1 copy matrix, and ``A`` is
    the zero-padding-free conv of ``xpad``: ``||A|| <= ||conv|| ||P||`` with
    ``||P||_2 = sqrt(max copy count)`` (:func:`_pad_copy_counts`), a valid but not tight bound.

    **Rounding.** ``K_hat(w)`` is evaluated as a sum of ``T`` complex products in float64: the
    error is at most ``(2 T + 16) u S`` in Frobenius norm, ``S = sum_t ||K_t||_F``; the SVD of
    each ``m x n`` symbol adds at most ``8 m n u ||K_hat(w)||_F <= 8 m n u S``. Both are added.
    When ``min(m, n) >= 192`` the batched SVD is replaced by a cheaper certificate of
    ``max_w ||K_hat(w)||_2^2`` that never forms the symbol: ``G(w) = K_hat(w) K_hat(w)^*``
    (or ``K_hat^* K_hat``, the smaller side, ``p x p``) is the trigonometric polynomial
    ``sum_j C_j e^{-i <j, w>}`` of :func:`_gram_coefficients` (``J`` offsets ``j``, each
    ``C_j`` a sum of products ``K_a K_b^T``), formed once (``T^2`` products of ``p x q``
    blocks) and then evaluated at every frequency with ``J p^2`` operations instead of the
    ``p^2 q`` of a product. *Rounding*: the angle ``theta = <j, w>``, ``w_t = 2 pi k_t / G_t``
    computed as ``fl(fl(k_t / G_t) fl(2 pi))`` (within ``3.01 u |w_t| <= 18.92 u``) and a
    ``D``-term dot product (``<= 1.01 D u 2 pi sum_t |j_t|``), is within ``(18.92 + 6.35 D)
    u sum_t |j_t|`` of the exact one; ``cos`` / ``sin`` add ``2 u``: each exponential is within
    ``eta u``, ``eta = (19 + 6.4 D) max_j sum_t |j_t| + 2``. Every entry of ``G`` is a sum of
    products bounded entrywise by ``sum_{a, b} |K_a| |K_b|^T`` (Frobenius norm ``<= S^2``);
    forming ``C_j`` (inner dimension ``q``, ``<= T`` pairs), the exponentials and the
    ``J``-term sum give ``||G_hat - G||_F <= e_G := 2.02 (q + T + J + eta + 4) u S^2``
    (complex entries: a factor ``sqrt 2``), as in :func:`conv_torus_upper`. Then
    ``max_w lambda_max(G(w))`` is certified by :func:`_lambda_max_upper` (Lanczos candidate
    proved by one Cholesky factorisation per frequency, ``f2 = 1.01 S^2``) and the bound is
    its square root (rounded up).

    >>> conv = nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular", bias=False)
    >>> with torch.no_grad():
    ...     _ = conv.weight.fill_(1.0)
    >>> b, how = conv_fourier_upper(conv_spec(conv, (1, 8), (1, 8)))
    >>> round(b, 9), how   # the all-ones circular kernel has norm 3 (the constant signal)
    (3.0, 'fourier (circular padding, grid 8, exact)')
    """
    if not bool(spec.weight.any()):
        return 0.0, "zero kernel (exact)"
    Ks, f = pow2_split(spec.weight.to(_F64))
    if f != 1.0:
        b, how = conv_fourier_upper(replace(spec, weight=Ks), max_bytes=max_bytes,
                                    _gram_min=_gram_min, _candidate_scale=_candidate_scale)
        return b * f, how
    D = spec.dims
    K = spec.weight.to(_F64).cpu()
    g = spec.groups
    cout = K.shape[0]
    ks = tuple(K.shape[2:])
    plans, pad_norm = _fourier_plans(spec)
    grid = tuple(p.grid for p in plans)
    nph = math.prod(p.phases for p in plans)
    cout_g = cout // g
    Keff4, pos_list = _effective_kernel(
        K, g, [p.phases for p in plans], [p.phase for p in plans], [p.pos for p in plans]
    )
    T = len(pos_list)
    cin_eff = Keff4.shape[-1]
    Keff = Keff4.reshape(T, -1)
    positions = {pos: i for i, pos in enumerate(pos_list)}
    S_norm = float(sum(float(torch.linalg.vector_norm(K[(slice(None),) * 2 + tap]))
                       for tap in itertools.product(*[range(k) for k in ks])))
    # frequencies: full range on all but the last axis, half on the last
    fr = [torch.arange(n, dtype=_F64) for n in grid[:-1]] + [
        torch.arange(grid[-1] // 2 + 1, dtype=_F64)
    ]
    mesh = torch.meshgrid(*fr, indexing="ij")
    W = torch.stack([m.reshape(-1) / grid[i] for i, m in enumerate(mesh)], dim=1)  # (F, D)
    if T == 1:  # a single tap position: the symbol is the same matrix at every frequency
        W = W[:1]
    P = torch.tensor(list(positions.keys()), dtype=_F64).reshape(T, D)
    nF = W.shape[0]
    m_, n_ = cout_g, cin_eff
    use_gram = min(m_, n_) >= _gram_min
    best = 0.0  # SVD path: max sigma_hat; Gram path: certified bound on max lambda_max(G)
    if use_gram:
        left = m_ <= n_
        p_, q_ = (m_, n_) if left else (n_, m_)
        Cf, Of = _gram_coefficients(Keff4, P.to(torch.int64), left)
        eta = (19.0 + 6.4 * D) * float(Of.abs().sum(dim=1).max()) + 2.0
        e_G = 2.02 * (q_ + T + Cf.shape[0] + eta + 4) * U * S_norm * S_norm
        per = max(1, max_bytes // (16 * g * p_ * p_ * 4 + 16 * Cf.shape[0]))

        def gram_at(Wf: torch.Tensor) -> torch.Tensor:
            return _gram_symbol(Cf, Of, Wf * (2 * math.pi), p_)

        # first candidate: Lanczos at the 8 frequencies of largest tr G(w) (a cheap ranking:
        # sum_j tr(C_j) cos <j, w>); every frequency is then verified against it, and those
        # above it get their own candidates (_lambda_max_upper)
        trC = Cf.reshape(-1, g, p_, p_).diagonal(dim1=-2, dim2=-1).sum(-1)  # (J, g)
        trw = (torch.cos((W * (2 * math.pi)) @ Of.T) @ trC).amax(1)
        top = torch.topk(trw, min(8, nF)).indices
        best = _candidate(float(_lanczos_ritz_max(gram_at(W[top]), 64).max()),
                          _candidate_scale)
        for a in range(0, nF, per):
            best = max(best, _lambda_max_upper(gram_at(W[a : a + per]),
                                               1.01 * S_norm * S_norm, e_G, best,
                                               _candidate_scale))
        best = round_up(math.sqrt(max(best, 0.0)))
        margin = 0.0
    else:
        per = max(1, max_bytes // max(1, 16 * Keff.shape[1] * 3))
        Kc = Keff.to(torch.complex128)
        for a in range(0, nF, per):
            ang = -2 * math.pi * (W[a : a + per] @ P.T)  # (f, T)
            E = torch.polar(torch.ones_like(ang), ang)
            s = torch.linalg.matrix_norm((E @ Kc).reshape(-1, g, cout_g, cin_eff), ord=2)
            best = max(best, float(s.max()))
        margin = (2 * T + 16 + 8 * m_ * n_) * U * S_norm
    rep = math.prod(p.rep for p in plans)
    if rep > 1:
        pad_norm = round_up(pad_norm * math.sqrt(rep))
    bound = round_up((best + margin) * pad_norm)
    exact = all(p.exact for p in plans) and pad_norm == 1.0 and spec.mode == "circular"
    how = (
        f"fourier ({spec.mode} padding, grid {'x'.join(map(str, grid))}"
        + (f", polyphase {nph}" if nph > 1 else "")
        + (f", x copy norm {pad_norm:.4g}" if pad_norm != 1.0 else "")
        + (", exact)" if exact else ")")
    )
    return bound, how


#: Relative slack of :func:`conv_torus_upper` over the largest sampled symbol norm: cells are
#: refined until each one's certified bound is within ``1 + TORUS_TOL`` of that value.
TORUS_TOL = 4e-3
#: Most symbol evaluations of one :func:`conv_torus_upper` (past it the cells left are bounded
#: as they are: the result stays certified, only looser).
TORUS_MAX_POINTS = 1 << 14
#: :func:`conv_l2_upper` uses the grid certificate :func:`conv_fourier_upper` when its grid has
#: at most this many frequencies (it is then cheaper than the torus, and never larger).
GRID_LIMIT = 1024
_TORUS_X0 = 0.5  # initial cell radius, sum_t n_t h_t / 2 (cos 0.5 = 0.88)
_TORUS_MAX_LEVEL = 20  # bisections of one initial cell at most


def _torus_layout(
    spec: ConvSpec,
) -> tuple[list[int], list[tuple[int, ...]], list[tuple[int, ...]], int, float]:
    """Per dim ``(phase count, phase per tap, position per tap)``, the row repetition and the
    copy norm of the padding, for :func:`conv_torus_upper` (see its proof)."""
    pad_norm, spatial, lo, hi, mode = _padding_reduction(spec)
    ks = tuple(spec.weight.shape[2:])
    phases: list[int] = []
    phase: list[tuple[int, ...]] = []
    pos: list[tuple[int, ...]] = []
    rep = 1
    for i in range(spec.dims):
        k, s, d = ks[i], spec.stride[i], spec.dilation[i]
        if mode == "circular":
            H = spatial[i]
            rep *= _dim_plan(mode, H, k, s, d, lo[i], hi=hi[i], Ho=spec.out_spatial[i]).rep
            m = [t * d - lo[i] for t in range(k)]
            if H % s:  # the stride-1 circulant on the grid H, read at i s
                phases.append(1)
                phase.append((0,) * k)
                pos.append(tuple(m))
                continue
        else:
            m = [t * d for t in range(k)]
        phases.append(s)
        phase.append(tuple(x % s for x in m))
        pos.append(tuple(x // s for x in m))
    return phases, phase, pos, rep, pad_norm


def _gram_coefficients(
    Keff: torch.Tensor, P: torch.Tensor, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Coefficients of the Gram symbol ``G(w) = sum_j C_j e^{-i <j, w>}``.

    ``Keff`` is ``(T, g, m, n)`` (real), ``P`` the ``(T, D)`` integer positions. ``left``:
    ``G = K_hat K_hat^*`` (``m x m``), ``C_j = sum_{a - b = j} K_a K_b^T``; otherwise
    ``G = K_hat^* K_hat`` (``n x n``), ``C_j = sum_{b - a = j} K_a^T K_b``. Returns ``C``
    flattened to ``(J, g p p)`` float64 and the offsets ``j`` as ``(J, D)`` float64.
    """
    T = Keff.shape[0]
    offs: dict[tuple[int, ...], int] = {}
    Pl = [tuple(int(v) for v in row) for row in P]
    for a in range(T):
        for b in range(T):
            j = tuple((x - y) if left else (y - x) for x, y in zip(Pl[a], Pl[b]))
            offs.setdefault(j, len(offs))
    g, m, n = Keff.shape[1:]
    p = m if left else n
    C = torch.zeros((len(offs), g, p, p), dtype=_F64, device=Keff.device)
    # the pair (b, a) gives the transpose of the pair (a, b), entry by entry the same dot
    # products: only b >= a is multiplied (half the flops)
    for a in range(T):
        if left:
            prods = torch.einsum("gmn,bgkn->bgmk", Keff[a], Keff[a:])
        else:
            prods = torch.einsum("gmn,bgmk->bgnk", Keff[a], Keff[a:])
        for b in range(a, T):
            j = tuple((x - y) if left else (y - x) for x, y in zip(Pl[a], Pl[b]))
            C[offs[j]] += prods[b - a]
            if b != a:
                jt = tuple((y - x) if left else (x - y) for x, y in zip(Pl[a], Pl[b]))
                C[offs[jt]] += prods[b - a].mT
    O = torch.tensor(list(offs), dtype=_F64, device=Keff.device).reshape(len(offs), -1)
    return C.reshape(len(offs), -1), O


def _gram_symbol(Cf: torch.Tensor, Of: torch.Tensor, w: torch.Tensor, p: int) -> torch.Tensor:
    """``G(w) = sum_j C_j e^{-i <j, w>}`` at the ``(F, D)`` frequencies ``w``: ``(F g, p, p)``
    complex (``Cf``, ``Of`` from :func:`_gram_coefficients`; its rounding is bounded where it
    is used, :func:`conv_fourier_upper` and :func:`conv_torus_upper`)."""
    ang = -(w @ Of.T)  # (F, J)
    return torch.complex(torch.cos(ang) @ Cf, torch.sin(ang) @ Cf).reshape(-1, p, p)


def conv_torus_upper(
    spec: ConvSpec,
    *,
    tol: float = TORUS_TOL,
    max_points: int = TORUS_MAX_POINTS,
    max_bytes: int = 1 << 28,
    _gram_min: int = 192,
) -> tuple[float, str]:
    r"""Certified l2 bound of a convolution whose cost does not depend on the image size.

    **Claim.** ``||A||_2 <= ||P||_2 sqrt(rep) sup_{w in T^D} ||K_hat(w)||_2`` with ``K_hat``
    the polyphase symbol below (a trigonometric polynomial of degree ``n_t`` in ``w_t``), and
    the returned value bounds the right side, computed from finitely many samples.

    **Step 1 (the operator on Z^D).** *Zero padding*: extend ``x`` by zeros to ``Z^D`` (an
    isometry). Every output ``y[i] = sum_t K_t x_pad[i s + t d]`` is an output of the
    convolution ``C`` on ``l2(Z^D)`` with the same formula, so ``A = S C E`` with ``E`` the
    extension (shifted by ``lo``) and ``S`` a coordinate restriction: ``||A|| <= ||C||``. The
    polyphase split ``x_phi[j] = x[j s + phi]`` is unitary on ``l2(Z^D)`` and turns ``C`` into
    a stride-1 convolution with taps ``K_t`` at positions ``q_t = floor(t d / s)`` reading
    phase ``t d mod s`` (:func:`_effective_kernel`). The Fourier transform ``l2(Z^D) ->
    L2(T^D)`` is unitary and makes it the multiplication by ``K_hat(w) = sum_q K_q
    e^{-i <q, w>}`` (``C_out/g x C_in s^D / g`` per group), so ``||C|| = sup_w ||K_hat(w)||``
    (max over groups: block diagonal). *Reflect / replicate*: ``x_pad = P x``, then a
    padding-free conv, ``||P||_2 = sqrt(max copy count)``. *Circular*: the conv is a
    circulant on the grid ``H / s`` (when ``s`` divides ``H``; phases as above with offsets
    ``t d - lo``) or ``H`` (read at ``i s``), read at the outputs (``sqrt(rep)`` when outputs
    repeat), and a circulant's norm is the max of the same polynomial over grid frequencies,
    ``<= sup_w``. *ConvTranspose* is the adjoint (same norm). *Reductions* (same sup):
    ``K_hat(w) e^{i <q_min, w>}`` (a unimodular factor) has positions ``q - q_min``; if all
    positions along dim ``t`` are multiples of ``r_t`` (dilation ``r`` at stride 1, say), ``w_t
    -> r_t w_t`` maps the torus onto itself, so the positions are divided by ``r_t``. Then
    ``n_t = max_q q_t``. As ``K`` is real, ``K_hat(-w) = conj(K_hat(w))``: the half torus
    ``w_last in [0, pi]`` (last coordinate with ``n_t > 0``) carries the sup.

    **Step 2 (the sampling lemma).** Let ``v(w) = sum_{j=0}^n a_j e^{-i j w}`` (``a_j in
    C^m``) with ``||v(w)|| <= R`` on ``R``, and ``||v(w_0)|| = R cos psi_0``, ``psi_0 in [0,
    pi/2]``. Then ``||v(w)|| >= R cos(psi_0 + n |w - w_0| / 2)`` while the argument is
    ``<= pi/2``. *Proof*: with ``e = v(w_0) / ||v(w_0)||``, ``T(w) = Re(e^{i n (w - w_0) / 2}
    e^* v(w))`` is a real trigonometric polynomial of degree ``<= n`` in ``theta = w / 2``
    (frequencies ``n - 2 j``), ``|T| <= R`` and ``T(w_0) = R cos psi_0``. Szegő's inequality
    (``T'(theta)^2 + n^2 T(theta)^2 <= n^2 R^2``; Szegő 1928, van der Corput & Schaake 1935)
    makes ``psi = arccos(T / R')`` ``n``-Lipschitz in ``theta`` for every ``R' > R`` (then
    ``R' -> R``), so ``T(w) >= R cos(psi_0 + n |w - w_0| / 2)``, and ``||v(w)|| >= |e^* v(w)|
    >= T(w)``.

    **Step 3 (cells).** Let ``M = sup_w ||K_hat(w)||`` be attained at ``w*`` with a unit top
    right singular vector ``u*``, ``v(w) = K_hat(w) u*`` (``||v|| <= M`` everywhere,
    ``||v(w*)|| = M``). Cover the half torus by boxes (cells) of centre ``c`` and half widths
    ``h_t``; ``w*`` (or ``-w*``) lies in one. Moving one coordinate at a time from ``w*`` to
    ``c`` (each slice is a ``v`` as in step 2, of degree ``n_t``, bounded by ``M``) gives
    ``||K_hat(c)|| >= ||v(c)|| >= M cos(X)``, ``X = sum_t n_t h_t / 2 < pi/2``. Hence

        M <= max over cells of  sigma_up(c) / cos(X_c),

    for any ``sigma_up(c) >= ||K_hat(c)||``: a certified bound for every image size. (The
    factor is sharp: ``v = (1 + e^{-i n w}) / 2`` sampled half a cell off its peak.)

    **Algorithm.** Initial cells: ``N_t = ceil(pi n_t D_a / (2 X_0))`` centres ``2 pi k /
    N_t`` per active coordinate (``X <= X_0 = 0.5``), half of them on the last. Let ``L`` be
    the largest sampled estimate and the target ``(1 + tol) L``; a cell whose bound exceeds
    the target is split into its ``2^{D_a}`` half-width cells (``X`` halves), until none does,
    ``max_points`` is reached or a cell has been split 20 times; the cells left unrefined keep
    their own (valid) bounds. ``L`` only steers the refinement: the result is the max of the
    cells' certified bounds whatever ``L`` is (Lanczos estimates, sharpened at the 4 best
    cells of each round). The cost depends on the kernel, never on the image size.

    **Rounding.** ``sigma_up(c)``: with ``theta = <q, c>`` computed in float64 (``|c_t| <= 8``:
    ``|theta_hat - theta| <= 8.08 D sum_t n_t u =: (eta - 2) u``), each ``e^{i theta}`` is
    within ``eta u`` of the exact one, so the computed symbol is within ``(2 T + 16 + eta) u
    S`` of ``K_hat(c)`` in Frobenius norm (``S = sum_t ||K_t||_F``, as in
    :func:`conv_fourier_upper`). *Small channels* (``min(m, n) < 192``): the SVD adds ``8 m n
    u (1.01 S)``. *Large*: ``G(c) = sum_j C_j e^{-i <j, c>}`` from the precomputed real
    coefficients (:func:`_gram_coefficients`, ``J`` offsets): each entry is a sum of products
    bounded entrywise by ``sum_{a, b} |K_a| |K_b|^T`` (Frobenius norm ``<= S^2``), and forming
    ``C_j`` (inner dimension ``q``, ``<= T`` pairs), the exponentials and the ``J``-term sum
    give ``||G_hat - G||_F <= e_G := 2.02 (q + T + J + eta + 4) u S^2`` (complex entries: a
    factor ``sqrt 2``); then each cell is verified by the Cholesky factorisation of ``c_b I -
    G_hat`` at the shift its target needs (:func:`_chol_verify`, proof in
    :func:`_lambda_max_upper`, ``f2 = 1.01 S^2``), or by ``eigvalsh``
    (:func:`_eig_fallback`) for a cell left unrefined. ``cos X`` is evaluated from ``X (1 +
    1e-9) + 1e-12 sum n_t`` (centres computed in float64 still cover the half torus) and
    lowered by ``1e-15``; the final max (about 10 float operations on non-negative numbers per
    cell) is rounded up by ``64 u``.

    >>> conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    >>> with torch.no_grad():
    ...     _ = conv.weight.fill_(1.0)
    >>> b, how = conv_torus_upper(conv_spec(conv, (1, 224, 224), (1, 224, 224)))
    >>> 9.0 <= b <= 9.0 * (1 + TORUS_TOL)    # sup at w = 0: the sum of the kernel
    True
    """
    if not bool(spec.weight.any()):
        return 0.0, "zero kernel (exact)"
    Ks, f = pow2_split(spec.weight.to(_F64))
    if f != 1.0:
        b, how = conv_torus_upper(replace(spec, weight=Ks), tol=tol, max_points=max_points,
                                  max_bytes=max_bytes, _gram_min=_gram_min)
        return b * f, how
    tor = _Torus.build(spec, tol=tol, max_bytes=max_bytes, gram_min=_gram_min)
    best, L, n_pts = tor.refine(max_points)
    return tor.assemble(best, L, n_pts)


_EMPTY = torch.zeros(0, dtype=_F64)


@dataclass
class _Torus:
    """The state of one :func:`conv_torus_upper` run (its proof and rounding are there):
    the reduced polyphase symbol, the degrees and initial cell counts, and the per-cell
    evaluators of the SVD path (small channels) or the Gram path (large)."""

    spec: ConvSpec
    tol: float
    g: int
    D: int
    m: int
    n: int
    T: int
    deg: list[int]
    act: list[int]
    N: list[int]
    phases: list[int]
    rep: int
    pad_norm: float
    cos_tab: torch.Tensor
    use_gram: bool
    per: int
    Pf: torch.Tensor
    Kc: torch.Tensor
    svd_mar: float = 0.0
    Cf: torch.Tensor = _EMPTY  # Gram coefficients and offsets (the Gram path only)
    Of: torch.Tensor = _EMPTY
    p_: int = 0
    e_G: float = 0.0
    f2: float = 0.0

    @property
    def dev(self) -> torch.device:
        return self.Pf.device

    @property
    def da(self) -> int:
        return len(self.act)

    @classmethod
    def build(cls, spec: ConvSpec, *, tol: float, max_bytes: int, gram_min: int) -> _Torus:
        """Layout, reductions (positions shifted to 0 and divided by their gcd), degrees,
        initial cell counts ``N_t``, the ``cos X`` table per level and the rounding margins."""
        K = spec.weight.to(_F64)
        dev = K.device
        g, D = spec.groups, spec.dims
        phases, phase, pos, rep, pad_norm = _torus_layout(spec)
        Keff, pos_list = _effective_kernel(K, g, phases, phase, pos)
        T, _, m, n = Keff.shape
        P = torch.tensor(pos_list, dtype=torch.int64).reshape(T, D)
        P = P - P.min(dim=0).values
        for i in range(D):
            r = math.gcd(*[int(v) for v in P[:, i]])
            if r > 1:
                P[:, i] //= r
        deg = [int(v) for v in P.max(dim=0).values]
        act = [i for i in range(D) if deg[i] > 0]
        da = len(act)
        S = float(sum(float(torch.linalg.vector_norm(K[(slice(None),) * 2 + tap]))
                      for tap in itertools.product(*[range(k) for k in K.shape[2:]])))
        sum_n = sum(deg)
        eta = 8.08 * D * sum_n + 2
        N = [max(2, math.ceil(math.pi * deg[i] * da / (2 * _TORUS_X0))) for i in act]

        def cos_level(level: int) -> float:
            X = sum(math.pi * deg[i] / (2 * N[a] * 2.0**level) for a, i in enumerate(act))
            return math.cos(X * (1 + 1e-9) + 1e-12 * sum_n) * (1 - 1e-15)

        cos_tab = torch.tensor([cos_level(lv) for lv in range(_TORUS_MAX_LEVEL + 1)],
                               dtype=_F64, device=dev)
        use_gram = min(m, n) >= gram_min
        Pf = P.to(device=dev, dtype=_F64)
        Kc = Keff.reshape(T, -1).to(torch.complex128)
        tor = cls(spec=spec, tol=tol, g=g, D=D, m=m, n=n, T=T, deg=deg, act=act, N=N,
                  phases=phases, rep=rep, pad_norm=pad_norm, cos_tab=cos_tab,
                  use_gram=use_gram, per=1, Pf=Pf, Kc=Kc)
        if use_gram:
            left = m <= n
            p_, q_ = (m, n) if left else (n, m)
            Cf, Of = _gram_coefficients(Keff, P.to(dev), left)
            tor.Cf, tor.Of, tor.p_ = Cf, Of, p_
            tor.e_G = 2.02 * (q_ + T + Cf.shape[0] + eta + 4) * U * S * S
            tor.f2 = 1.01 * S * S
            tor.per = max(1, max_bytes // (16 * g * p_ * p_ * 4 + 16 * Cf.shape[0]))
        else:
            tor.svd_mar = (8 * m * n * 1.01 + 2 * T + 16 + eta) * U * S
            tor.per = max(1, max_bytes // (16 * Kc.shape[1] * 3))
        return tor

    def full_w(self, cent: torch.Tensor) -> torch.Tensor:
        w = torch.zeros((cent.shape[0], self.D), dtype=_F64, device=self.dev)
        if self.da:
            w[:, self.act] = cent
        return w

    def chunks(self, cent: torch.Tensor) -> list[torch.Tensor]:
        return [cent[a : a + self.per] for a in range(0, cent.shape[0], self.per)]

    def gram(self, cent: torch.Tensor) -> torch.Tensor:
        return _gram_symbol(self.Cf, self.Of, self.full_w(cent), self.p_)

    def lanczos_est(self, G: torch.Tensor, k: int) -> torch.Tensor:
        return _lanczos_ritz_max(G, k).reshape(-1, self.g).amax(1).clamp_min(0.0).sqrt()

    def improve(self, cent: torch.Tensor, est: torch.Tensor, L: float) -> float:
        """A sharper estimate of the max (48 Lanczos steps at the 4 best cells)."""
        idx = torch.topk(est, min(4, est.numel())).indices
        return max(L, float(self.lanczos_est(self.gram(cent[idx]), 48).max()))

    def _gram_bounds(self, G: torch.Tensor, cs: torch.Tensor, L: float) -> torch.Tensor:
        """Certified cell bounds from the Cholesky test at the targets ``(1 + tol) L cos X``
        (``inf`` where it fails)."""
        p_, f2, e_G = self.p_, self.f2, self.e_G
        c0 = (L * (1 + self.tol) * cs) ** 2
        e0 = U * (c0 + 2 * f2) * (1 + 4.06 * (p_ + 1) * p_) \
            + 4.07 * (p_ + 1) * U * p_ * (c0 + e_G) + e_G
        lam = _chol_verify(G, (c0 - e0).repeat_interleave(self.g), f2, e_G)
        return lam.reshape(-1, self.g).amax(1).sqrt() / cs

    def _svd_norms(self, c: torch.Tensor) -> torch.Tensor:
        """``||K_hat(c)||_2`` per cell centre (the SVD path)."""
        ang = -(self.full_w(c) @ self.Pf.T)
        E = torch.polar(torch.ones_like(ang), ang)
        return torch.linalg.matrix_norm((E @ self.Kc).reshape(-1, self.g, self.m, self.n),
                                        ord=2).amax(1)

    def evaluate(self, cent: torch.Tensor, lev: torch.Tensor, L: float, two_pass: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(bounds, estimates, L)`` of the cells: each bound is certified; on the Gram path
        it is ``inf`` where the Cholesky test at the cell's target ``(1 + tol) L cos X``
        failed. ``two_pass``: estimate every cell (and sharpen ``L``) before testing any."""
        if self.use_gram and two_pass:
            est = torch.cat([self.lanczos_est(self.gram(c), 12) for c in self.chunks(cent)])
            L = self.improve(cent, est, max(L, float(est.max())))
        bs, ests = [], []
        for a in range(0, cent.shape[0], self.per):
            c, cs = cent[a : a + self.per], self.cos_tab[lev[a : a + self.per]]
            if self.use_gram:
                G = self.gram(c)
                if not two_pass:
                    ests.append(self.lanczos_est(G, 12))
                    L = max(L, float(ests[-1].max()))
                bs.append(self._gram_bounds(G, cs, L))
            else:
                sv = self._svd_norms(c)
                ests.append(sv)
                L = max(L, float(sv.max()))
                bs.append((sv + self.svd_mar) / cs)
        if self.use_gram and not two_pass:
            est = torch.cat(ests)
            L = self.improve(cent, est, L)
        elif not self.use_gram:
            est = torch.cat(ests)
        return torch.cat(bs), est, L

    def fallback(self, cent: torch.Tensor, lev: torch.Tensor) -> float:
        """Certified bound of cells left unrefined (Gram path: eigvalsh)."""
        out = 0.0
        for a in range(0, cent.shape[0], self.per):
            lam = _eig_fallback(self.gram(cent[a : a + self.per]), self.f2,
                                self.e_G).reshape(-1, self.g).amax(1)
            out = max(out, float((lam.sqrt() / self.cos_tab[lev[a : a + self.per]]).max()))
        return out

    def initial_cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full circle on active coordinates but the last, half circle on the last."""
        da, N, dev = self.da, self.N, self.dev
        axes = [torch.arange(N[a] if a + 1 < da else N[a] // 2 + 1, dtype=_F64, device=dev)
                * (2 * math.pi / N[a]) for a in range(da)]
        cent = (torch.cartesian_prod(*axes).reshape(-1, da) if da
                else torch.zeros((1, 0), dtype=_F64, device=dev))
        return cent, torch.zeros(cent.shape[0], dtype=torch.int64, device=dev)

    def refine(self, max_points: int) -> tuple[float, float, int]:
        """``(best, L, symbols)``: split the cells whose bound exceeds ``(1 + tol) L`` until
        none does, ``max_points`` is reached or a cell is at the last level; ``best`` is the
        max of every final cell's certified bound."""
        da, dev = self.da, self.dev
        cent, lev = self.initial_cells()
        n_pts = cent.shape[0]
        cb, est, L = self.evaluate(cent, lev, 0.0, True)
        best = 0.0
        # children of a cell: the 2^da quarter (octant) cells, centres c +- h_t / 2
        signs = torch.zeros((1, da), dtype=_F64, device=dev)
        if da:
            signs = torch.cartesian_prod(
                *[torch.tensor([-1.0, 1.0], dtype=_F64, device=dev)] * da).reshape(-1, da)
        Nt = torch.tensor(self.N, dtype=_F64, device=dev)
        while True:
            ok = cb <= L * (1 + self.tol) * (1 + 1e-9)
            if bool(ok.any()):
                best = max(best, float(cb[ok].max()))
            bad = torch.nonzero(~ok).flatten()
            if not bad.numel():
                break
            room = (max_points - n_pts) // signs.shape[0] if da else 0
            order = bad[torch.argsort(est[bad], descending=True)]
            can = order[lev[order] < _TORUS_MAX_LEVEL][: max(0, room)]
            keep = torch.ones(cent.shape[0], dtype=torch.bool, device=dev)
            keep[can] = False
            rest = torch.nonzero(~ok & keep).flatten()
            if rest.numel():  # left as they are: their own certified bounds
                best = max(best, self.fallback(cent[rest], lev[rest]) if self.use_gram
                           else float(cb[rest].max()))
            if not can.numel():
                break
            pl = lev[can] + 1
            half = math.pi / (Nt * 2.0 ** pl.to(_F64).unsqueeze(1))  # (r, da): children's h_t
            cent = (cent[can].unsqueeze(1)
                    + signs.unsqueeze(0) * half.unsqueeze(1)).reshape(-1, da)
            lev = pl.repeat_interleave(signs.shape[0])
            n_pts += cent.shape[0]
            cb, est, L = self.evaluate(cent, lev, L, False)
        return best, L, n_pts

    def assemble(self, best: float, L: float, n_pts: int) -> tuple[float, str]:
        """The bound (times the padding's copy norm, rounded up) and its description."""
        pad_norm, rep, phases = self.pad_norm, self.rep, self.phases
        bound = round_up(best * pad_norm * math.sqrt(rep), 64 * U)
        how = (
            f"torus sup (degree {'x'.join(map(str, self.deg))}, {n_pts} symbols, "
            f"{bound / max(L * pad_norm * math.sqrt(rep), 1e-300):.6f} x the largest sample"
            + (f", polyphase {math.prod(phases)}" if math.prod(phases) > 1 else "")
            + (f", x copy norm {pad_norm * math.sqrt(rep):.4g}" if pad_norm * rep != 1.0
               else "")
            + ")"
        )
        return bound, how


def conv_l2_upper(spec: ConvSpec) -> tuple[float, str]:
    """The l2 certificate of a convolution: grid (small grids) or torus (any size).

    Both are certified. The grid symbol of :func:`conv_fourier_upper` samples the very
    polynomial whose torus sup :func:`conv_torus_upper` bounds (same polyphase positions, same
    padding factors), so on a grid the grid bound is never larger (up to margins ~1e-13); it is
    used while its grid has at most :data:`GRID_LIMIT` frequencies (cheaper there), the torus
    bound beyond, whose cost does not grow with the image size.
    """
    plans, _ = _fourier_plans(spec)
    grid = [p.grid for p in plans]
    n_freq = math.prod(grid[:-1]) * (grid[-1] // 2 + 1)
    if n_freq <= GRID_LIMIT:
        return conv_fourier_upper(spec)
    return conv_torus_upper(spec)


def conv_l1_linf_upper(spec: ConvSpec, norm: str) -> tuple[float, str]:
    r"""Certified l1 / l-inf operator norms of a convolution (``norm`` is ``"1"`` or ``"inf"``).

    l-inf (max row sum of ``|A|``): each output ``(o, i)`` is a combination of at most the
    taps of ``K[o]``, several taps possibly hitting the same input (padding copies, circular
    wrap), so its row sum is ``<= sum_{c, t} |K[o, c, t]|`` (triangle inequality).
    l1 (max column sum): for a fixed input ``(c, j)``, out channel ``o`` and tap ``t``, the
    outputs ``i`` with ``i s + t d = j'`` (``j'`` a padded position holding a copy of ``j``)
    number at most one per copy; so the column sum is ``<= m * sum_{o, t} |K[o, c, t]|`` with
    ``m`` the largest copy count of the padding (1 for zeros; for circular padding, the
    number of times the output window can wrap, ``ceil(((H_out - 1) s + 1) / H)`` per dim).
    For the adjoint of a conv (ConvTranspose) l1 and l-inf swap. Sums of non-negative float64
    terms are inflated by ``(1 + 2 q u)``.
    """
    if not bool(spec.weight.any()):
        return 0.0, "zero kernel (exact)"
    Ks, f = pow2_split(spec.weight.to(_F64))
    if f != 1.0:
        b, how = conv_l1_linf_upper(replace(spec, weight=Ks), norm)
        return b * f, how
    if spec.adjoint:
        norm = "inf" if norm == "1" else "1"
    K = spec.weight.to(_F64).abs()
    g = spec.groups
    cout, cin_g = K.shape[0], K.shape[1]
    q = K[0].numel() * max(1, cout)
    if norm == "inf":
        v = float(K.reshape(cout, -1).sum(1).max())
        return round_up(v, 2 * q * U + 8 * U), "conv l-inf (abs sums)"
    per_in = K.reshape(g, cout // g, cin_g, -1).sum(dim=(1, 3))
    mult = 1.0
    D = spec.dims
    if spec.mode in ("reflect", "replicate"):
        pads: list[int] = []
        for i in reversed(range(D)):
            pads += [spec.pad_lo[i], spec.pad_hi[i]]
        mult = float(_pad_copy_counts(spec.in_spatial, pads, spec.mode).max())
    elif spec.mode == "circular":
        for i in range(D):
            span = (spec.out_spatial[i] - 1) * spec.stride[i] + 1
            mult *= -(-span // spec.in_spatial[i])
    return round_up(float(per_in.max()) * mult, 2 * q * U + 8 * U), "conv l1 (abs sums)"


# ---------------------------------------------------------------------------------------------
# generic machinery
# ---------------------------------------------------------------------------------------------
def _f64_fn(op: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    return module_call(op, _F64) if isinstance(op, nn.Module) else op


def dense_jacobian(op: Any, in_shape: tuple[int, ...]) -> torch.Tensor | None:
    """The matrix ``J`` of :func:`_dense_jacobian` (its first item), or ``None``."""
    jb = _dense_jacobian(op, in_shape)
    return None if jb is None else jb[0]


def _dense_jacobian(op: Any, in_shape: tuple[int, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(J, op(0))`` of :func:`dense_matrix` for ``op`` run in float64 on its own device;
    ``None`` when ``op`` cannot run in float64 or ``J`` would exceed :data:`DENSE_LIMIT`
    entries."""
    fn = _f64_fn(op)
    dev = op_device(op)
    try:
        with torch.no_grad():
            b = fn(torch.zeros((1, *in_shape), dtype=_F64, device=dev))
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None
    if not isinstance(b, torch.Tensor) or b.dtype != _F64:
        return None
    if math.prod(in_shape) * b[0].numel() > DENSE_LIMIT:
        return None
    J = conv_matrix_of(op, in_shape)
    if J is not None:
        return J, b.reshape(-1).cpu()
    return dense_matrix(fn, in_shape, dtype=_F64, device=dev)


def conv_matrix_of(op: Any, in_shape: tuple[int, ...]) -> torch.Tensor | None:
    """The matrix of ``op`` written from its kernel (:func:`_conv_matrix`) when ``op`` is a
    zero-padded convolution, alone or followed or preceded by an eval BatchNorm (an
    ``nn.Sequential`` of the two: the BatchNorm folded into the kernel, :func:`_fold_bn`,
    in float64: each entry within ``u`` of the exact product, inside the entry-error model of
    :func:`dense_upper`); ``None`` for any other op (the caller builds it by
    :func:`dense_matrix`)."""
    spec = _single_conv(op, tuple(in_shape))
    if spec is None or spec.mode != "zeros":
        return None
    J = _conv_matrix(spec)
    return J.T.contiguous() if spec.adjoint else J


def _conv_matrix(spec: ConvSpec) -> torch.Tensor:
    r"""The matrix (``n_out x n_in``, float64, CPU) of a zero-padded convolution, written
    directly from its kernel: entry ``(o, i; c, i s + t d - lo)`` is ``K[o, c, t]`` for every
    tap ``t`` whose read position lies in the input (groups: block diagonal). Distinct taps
    read distinct positions of one output (``d >= 1``), so every entry is one kernel weight
    (float32 weights are exact in float64) or zero: the matrix is exact, without the
    ``n_in`` float64 convolutions of the basis vectors that :func:`dense_matrix` would run
    (ResNet-50's 3x3 convs at 2x2 maps: 0.9 s each). For a ConvTranspose (``adjoint``) it is
    the matrix of the conv whose adjoint the layer is.
    """
    K = spec.weight.detach().to(_F64).cpu()
    g, D = spec.groups, spec.dims
    cout, cin_g = K.shape[0], K.shape[1]
    cout_g = cout // g
    n_o, n_i = math.prod(spec.out_spatial), math.prod(spec.in_spatial)
    J = torch.zeros((cout, n_o, cin_g * g, n_i), dtype=_F64)
    rows = torch.arange(cout).reshape(g, cout_g, 1, 1)
    cols = (torch.arange(cin_g).reshape(1, 1, cin_g, 1)
            + cin_g * torch.arange(g).reshape(g, 1, 1, 1))
    grids = [torch.arange(h) for h in spec.out_spatial]
    for tap in itertools.product(*[range(k) for k in K.shape[2:]]):
        # per dim: the read position of every output, and whether it lies in the input
        pos = [grids[i] * spec.stride[i] + tap[i] * spec.dilation[i] - spec.pad_lo[i]
               for i in range(D)]
        o_flat = torch.zeros(1, dtype=torch.int64)
        i_flat = torch.zeros(1, dtype=torch.int64)
        ok = torch.ones(1, dtype=torch.bool)
        for i in range(D):
            o_flat = (o_flat[:, None] * spec.out_spatial[i] + grids[i][None]).reshape(-1)
            i_flat = (i_flat[:, None] * spec.in_spatial[i] + pos[i][None]).reshape(-1)
            ok = (ok[:, None] & ((pos[i] >= 0) & (pos[i] < spec.in_spatial[i]))[None]
                  ).reshape(-1)
        o_v, i_v = o_flat[ok].reshape(1, 1, 1, -1), i_flat[ok].reshape(1, 1, 1, -1)
        vals = K[(slice(None),) * 2 + tap].reshape(g, cout_g, cin_g, 1)
        J[rows, o_v, cols, i_v] = vals.expand(-1, -1, -1, o_v.shape[-1])
    return J.reshape(cout * n_o, -1)


def dense_matrix(
    fn: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int], *,
    dtype: torch.dtype = _F64, device: torch.device | None = None, exact_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J, fn(0))``: the matrix ``J`` (``n_out x n_in``) of the affine map ``fn`` (batched,
    its parameters already in ``dtype``) minus its offset, on inputs of ``in_shape``, in
    ``dtype``. The one dense-Jacobian builder of the package (graph nodes, certificates,
    training-time checks).

    Built from forward calls on the standard basis in chunks of ``c`` vectors, ``c`` sized so
    that a chunk (``c`` inputs of ``n_in`` and outputs of ``n_out`` entries, times 4 for the
    op's intermediates) fits :data:`DENSE_CHUNK_BYTES`: columns ``fn(e_j) - fn(0)`` or, when
    the output is the smaller side, rows by vector-Jacobian products with the output basis
    (the transposed linear layers, no bias subtracted), ``n_in n_out`` work either way.

    ``exact_offset=True``: no column is a difference either (``fn(e_j) - fn(0)`` cancels the
    bias and loses ``log2(|b| / |W|)`` bits of every entry: ``|b| = 1e16, |W| = 1e4`` left 4
    correct digits): columns by forward-mode products ``J e_j`` (``torch.func.jvp``), or rows
    by vector-Jacobian products where an op has no forward-mode formula. (The certificates
    keep the cheaper differences and bound their cancellation, :func:`dense_upper`.)
    """
    n_in = math.prod(in_shape)
    shp = tuple(in_shape)
    with torch.no_grad():
        b = fn(torch.zeros((1, *shp), dtype=dtype, device=device))
    n_out = b[0].numel()
    size = torch.finfo(dtype).bits // 8
    chunk = max(1, DENSE_CHUNK_BYTES // (4 * size * (n_in + n_out)))
    if exact_offset and n_out >= n_in:
        try:
            return _jvp_columns(fn, shp, n_in, chunk, dtype, device), b.reshape(-1)
        except (RuntimeError, NotImplementedError):
            pass  # no forward-mode formula for some op: rows by vector-Jacobian products
    if n_out < n_in or exact_offset:
        rows = []
        for a in range(0, n_out, chunk):
            c = min(chunk, n_out - a)
            x0 = torch.zeros((c, *shp), dtype=dtype, device=device, requires_grad=True)
            with torch.enable_grad():
                y = fn(x0).reshape(c, -1)
            (g,) = torch.autograd.grad(y, x0, _basis(a, c, n_out, dtype, device))
            rows.append(g.reshape(c, -1).cpu())
        return torch.cat(rows).contiguous(), b.reshape(-1)
    cols = []
    with torch.no_grad():
        for a in range(0, n_in, chunk):
            c = min(chunk, n_in - a)
            y = fn(_basis(a, c, n_in, dtype, device).reshape(c, *shp)) - b
            cols.append(y.reshape(c, -1).cpu())
    return torch.cat(cols).T.contiguous(), b.reshape(-1)


def _basis(a: int, c: int, n: int, dtype: torch.dtype, device: torch.device | None
           ) -> torch.Tensor:
    """The standard basis vectors ``e_a, ..., e_{a+c-1}`` of length ``n``, as ``(c, n)``."""
    e = torch.zeros((c, n), dtype=dtype, device=device)
    e[torch.arange(c), torch.arange(a, a + c)] = 1.0
    return e


def _jvp_columns(fn: Callable[[torch.Tensor], torch.Tensor], shp: tuple[int, ...], n_in: int,
                 chunk: int, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """The columns ``J e_j`` of :func:`dense_matrix` by forward-mode products, chunked."""
    cols = []
    for a in range(0, n_in, chunk):
        c = min(chunk, n_in - a)
        e = _basis(a, c, n_in, dtype, device).reshape(c, *shp)
        y = torch.func.jvp(fn, (torch.zeros_like(e),), (e,))[1]
        cols.append(y.detach().reshape(c, -1).cpu())
    return torch.cat(cols).T.contiguous()


#: the sparse route of :func:`_pooled_linear_jacobian` is taken while the prefix's Jacobian has
#: at most this many non-zero entries (and at most 1/8 of its entries are non-zero)
SPARSE_PREFIX_NNZ = 8_000_000


def _pooled_linear_jacobian(op: Any, in_shape: tuple[int, ...]
                            ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    r"""``(J, op(0), err)`` for ``op = Sequential(prefix..., Linear)`` whose prefix is sparse.

    The classifier heads of VGG / AlexNet at small inputs: ``AdaptiveAvgPool2d(7)`` replicates
    a ``512 x 1 x 1`` map 49 times, ``Flatten``, then ``Linear(25088, 4096)``. The dense route
    pushes every basis vector through the ``4096 x 25088`` product (``n_in`` times the layer's
    flops); here the prefix's Jacobian ``P`` (``k x n_in``, a few non-zeros per column) is
    built column by column in float64 and kept sparse, and ``J = W P`` is a sparse product
    (``nnz(P) n_out`` flops), the float32 weight cast to float64 (exactly) in row blocks.

    Taken only when the prefix maps ``0`` to exactly ``0`` (pools, reshapes, zero pads: no
    bias to subtract), its output is the Linear's flat input, and ``P`` is sparse
    (:data:`SPARSE_PREFIX_NNZ`); else ``None`` (the caller takes the dense route).

    **Error.** ``P_hat`` is within ``16 (n_in + 1) u |P_hat|`` entrywise of the prefix's
    matrix (the model :func:`dense_upper` assumes for compositions of linear layers), and each
    entry of ``fl(W P_hat)`` is a sum of at most ``s`` products (``s`` the most non-zeros of a
    column of ``P_hat``), within ``gamma_s (|W| |P_hat|)`` of ``W P_hat`` in any summation
    order (Higham, Thm 3.1). Hence ``||J_hat - W P||_F <= err := 1.01 (16 (n_in + 1) + s + 1)
    u || |W| |P_hat| ||_F``, the last norm computed by the same sparse product of absolute
    values and rounded up; the bias ``op(0) = b`` of the Linear is not subtracted anywhere.
    """
    if not (isinstance(op, nn.Sequential) and len(op) > 1 and isinstance(op[-1], nn.Linear)):
        return None
    lin = op[-1]
    pre = _f64_fn(op[:-1])
    dev = op_device(op)
    n_in = math.prod(in_shape)
    try:
        with torch.no_grad():
            z = pre(torch.zeros((1, *in_shape), dtype=_F64, device=dev))
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None
    k = lin.in_features
    if z.dtype != _F64 or z.shape != (1, k) or bool(z.any()):
        return None
    chunk = max(1, DENSE_CHUNK_BYTES // (4 * 8 * (n_in + k)))
    idx, val = [], []
    nnz = 0
    with torch.no_grad():
        for a in range(0, n_in, chunk):
            c = min(chunk, n_in - a)
            e = _basis(a, c, n_in, _F64, dev).reshape(c, *in_shape)
            y = pre(e).reshape(c, k)  # rows: columns of P
            nz = torch.nonzero(y)
            nnz += nz.shape[0]
            if nnz > min(SPARSE_PREFIX_NNZ, n_in * k // 8):
                return None
            idx.append(nz + torch.tensor([a, 0], device=dev))
            val.append(y[nz[:, 0], nz[:, 1]])
    ij = torch.cat(idx).T
    PT = torch.sparse_coo_tensor(ij, torch.cat(val), (n_in, k),
                                 check_invariants=False).coalesce()  # P^T, valid by construction
    s = int(torch.bincount(ij[0], minlength=n_in).max()) if nnz else 0
    aPT = torch.sparse_coo_tensor(PT.indices(), PT.values().abs(), (n_in, k),
                                  check_invariants=False)
    w = lin.weight.detach()
    n_out = int(w.shape[0])
    rows = max(1, (1 << 26) // (8 * k))  # float64 row blocks of 64 MB
    JT = torch.empty((n_in, n_out), dtype=_F64, device=dev)
    mag2 = 0.0
    with torch.no_grad():
        for r in range(0, n_out, rows):
            wb = w[r:r + rows].to(_F64)
            JT[:, r:r + rows] = torch.sparse.mm(PT, wb.T)
            mag2 += float(torch.sparse.mm(aPT, wb.abs().T).square().sum())
    # op(0) = W 0 + bias, exactly
    b = lin.bias.detach().to(_F64) if lin.bias is not None else z.new_zeros(n_out)
    mag = round_up(math.sqrt(mag2), (n_in * n_out + 8) * U)
    err = 1.01 * (16 * (n_in + 1) + s + 1) * U * mag
    return JT.T.contiguous(), b, err


def dense_upper(op: Any, in_shape: tuple[int, ...], norm: str = "2") -> tuple[float, str] | None:
    r"""Certificate from the dense Jacobian of a small op (``n_in n_out <= DENSE_LIMIT``).

    ``J_hat`` is built by evaluating ``op`` in float64 on the basis vectors (minus ``op(0)``),
    or, when the output is smaller, by its vector-Jacobian products with the output basis
    vectors (the transposed linear layers, same per-entry accuracy). Assumption (holds for the
    linear layers of torch: matmul, conv, pooling, BatchNorm, and
    their compositions without catastrophic cancellation): each computed entry is within
    ``16 n_in u`` times the matching entry of ``|J|`` (plus ``u |op(0)|`` for the bias
    subtraction), so ``||J_hat - J||_F <= 16 (n_in + 1) u ||J_hat||_F + 2 u sqrt(n_in)
    ||op(0)||``, added to :func:`matrix_norm_upper` of ``J_hat`` (l1 / l-inf likewise, with the
    matching ``sqrt(n)`` factor from ``||E||_1 <= sqrt(m) ||E||_F``). A sparse prefix followed
    by a Linear (a pooled classifier head) takes :func:`_pooled_linear_jacobian`'s route and
    its error bound instead.
    """
    sp = _pooled_linear_jacobian(op, in_shape)
    if sp is not None:
        J, _, err = sp
        return _with_entry_error(J, err, norm)
    jb = _dense_jacobian(op, in_shape)
    if jb is None:
        return None
    return jacobian_upper(*jb, norm)


def jacobian_upper(J: torch.Tensor, b: torch.Tensor, norm: str = "2") -> tuple[float, str]:
    r"""Certified ``||J_true||`` from a computed dense Jacobian ``J`` (``n_out x n_in``) of a
    composition of linear layers and its computed offset ``b = op(0)``, as built by
    :func:`dense_matrix` (columns ``op(e_j) - op(0)`` or vector-Jacobian rows): the error
    model and margins of :func:`dense_upper`, ``||J - J_true||_F <= 16 (n_in + 1) u ||J||_F +
    2 u sqrt(n_in) ||b||``, added to :func:`matrix_norm_upper` of ``J``."""
    n_in = J.shape[1]
    fro = float(torch.linalg.matrix_norm(J.to(_F64), "fro"))
    err = 16 * (n_in + 1) * U * fro + 2 * U * math.sqrt(n_in) * float(b.to(_F64).norm())
    return _with_entry_error(J, err, norm)


def _with_entry_error(J: torch.Tensor, err: float, norm: str) -> tuple[float, str]:
    """:func:`matrix_norm_upper` of ``J`` plus the entry error ``err`` (a Frobenius bound on
    ``J - J_true``; times ``sqrt(max side)`` for l1 / l-inf, ``||E||_1 <= sqrt(m) ||E||_F``)."""
    n_out, n_in = J.shape
    if norm != "2":
        err *= math.sqrt(max(n_in, n_out))
    v, how = matrix_norm_upper(J, norm)
    return round_up(v + err), "dense Jacobian, " + how


def bn_scale(m: nn.Module | None, *, running: bool = False) -> torch.Tensor | None:
    """Per-channel factor ``gamma / sqrt(running_var + eps)`` (float64) of a BatchNorm in eval
    mode, ``None`` for anything else or one without running statistics; ``running=True``
    reads the running statistics in training mode too (the eval-mode network a training
    penalty certifies)."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or (m.training and not running):
        return None
    if m.running_var is None:
        return None
    var = m.running_var.detach().to(_F64)
    s = 1.0 / torch.sqrt(var + m.eps)
    if m.weight is not None:
        s = s * m.weight.detach().to(_F64)
    return s


_ISOMETRIES = (nn.Identity, nn.Flatten, nn.Unflatten)
_ZERO_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
              nn.ConstantPad3d)
_COPY_PADS: dict[type, str] = {
    nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
    nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate",
    nn.ReplicationPad3d: "replicate", nn.CircularPad1d: "circular",
    nn.CircularPad2d: "circular", nn.CircularPad3d: "circular",
}
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
              nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _schur_nonneg(op: nn.Module, in_shape: tuple[int, ...], norm: str) -> tuple[float, str]:
    r"""Schur test for an average pool (``AvgPool*``, ``AdaptiveAvgPool*``).

    For any matrix ``||A||_2 <= sqrt(||A||_1 ||A||_inf)`` (Riesz-Thorin / Schur test), with
    ``||A||_inf = max(|A| 1)`` and ``||A||_1 = max(|A|^T 1)``. Every entry of a pool's matrix
    is ``c / w`` with ``c >= 0`` a count (window membership, padding included or not) and ``w``
    the one divisor of the layer (``divisor_override`` when set, which may be negative; the
    window size otherwise): all entries share one sign, so ``|A| 1 = |A 1|`` and
    ``|A|^T 1 = |A^T 1|`` entrywise. These are computed with one forward and one adjoint
    product in float64; sums of same-sign terms are at most ``(1 + n_in u)`` off, so each is
    inflated by ``(1 + 2 n_in u)``. (Before, ``max(A 1)`` was used: for a negative divisor
    that is the *smallest* magnitude, and l1 / l-inf bounds came out negative.) Any other op
    is refused: mixed signs would make ``|A 1|`` an underestimate.
    """
    if not isinstance(op, _AVG_POOLS):
        raise InvalidArgumentError(
            f"the Schur test here needs an operator whose entries share one sign (an average "
            f"pool); got {type(op).__name__}. Use dense_upper or conv certificates instead."
        )
    fn = module_call(op, _F64)
    dev = op_device(op)
    x = torch.ones((1, *in_shape), dtype=_F64, device=dev, requires_grad=True)
    y = fn(x)
    (col,) = torch.autograd.grad(y, x, torch.ones_like(y))
    n = math.prod(in_shape)
    r_inf = round_up(float(y.detach().abs().max()), 2 * n * U + 8 * U)
    r_one = round_up(float(col.abs().max()), 2 * n * U + 8 * U)
    if norm == "inf":
        return r_inf, "average pool, abs row sums"
    if norm == "1":
        return r_one, "average pool, abs column sums"
    return round_up(math.sqrt(r_inf * r_one)), "Schur test sqrt(||A||_1 ||A||_inf) (average pool)"


def _flatten_seq(m: nn.Module) -> list[nn.Module]:
    if isinstance(m, nn.Sequential):
        out: list[nn.Module] = []
        for c in m:
            out.extend(_flatten_seq(c))
        return out
    return [m]


def _single(
    m: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], norm: str
) -> tuple[float, str] | None:
    """Structural certificate of one known layer (without the dense fallback)."""
    cands: list[tuple[float, str]] = []
    if isinstance(m, nn.Linear):
        return matrix_norm_upper(m.weight, norm)
    if isinstance(m, _ISOMETRIES) or (
        isinstance(m, nn.modules.dropout._DropoutNd) and not m.training
    ):
        return 1.0, "isometry (norm 1)"
    if isinstance(m, _ZERO_PADS):
        return 1.0, "zero padding (norm 1)"
    if type(m) in _COPY_PADS:
        mode = _COPY_PADS[type(m)]
        padding = tuple(int(x) for x in m.padding)  # type: ignore[union-attr]
        spatial = in_shape[-(len(padding) // 2):]
        c = float(_pad_copy_counts(tuple(spatial), list(padding), mode).max())
        v = {"2": math.sqrt(c), "1": c, "inf": 1.0}[norm]
        return round_up(v), f"{mode} padding, max copy count {int(c)}"
    s = bn_scale(m)
    if s is not None:
        return round_up(float(s.abs().max()), 16 * U), "eval BatchNorm (diagonal)"
    spec = conv_spec(m, in_shape, out_shape)
    if spec is not None:
        if norm == "2":
            cands.append(conv_l2_upper(spec))
        else:
            cands.append(conv_l1_linf_upper(spec, norm))
    if isinstance(m, _AVG_POOLS):
        cands.append(_schur_nonneg(m, in_shape, norm))
    return min(cands, key=lambda c: c[0]) if cands else None


_Part = tuple[Any, tuple[int, ...], tuple[int, ...]]


def _fold_bn(parts: list[_Part]) -> list[_Part]:
    """Fold eval BatchNorm into the neighbouring conv / linear (a per-channel rescaling).

    ``BN(conv(x)) - BN(conv(0))`` is the conv with kernel rows scaled by the BN factors, and
    ``conv(BN(x)) - conv(BN(0))`` the conv with kernel columns scaled: both exact identities
    of linear maps (channel scaling commutes with any padding mode).
    """
    out: list[_Part] = []
    i = 0
    while i < len(parts):
        m, ins, outs = parts[i]
        spec = conv_spec(m, ins, outs) if isinstance(m, nn.Module) else m
        if isinstance(spec, ConvSpec) and not spec.adjoint and i + 1 < len(parts):
            nxt = parts[i + 1][0]
            s = bn_scale(nxt) if isinstance(nxt, nn.Module) else None
            if s is not None and s.numel() == spec.weight.shape[0]:
                w = spec.weight * s.reshape(-1, *([1] * (spec.weight.dim() - 1)))
                out.append((replace(spec, weight=w), ins, parts[i + 1][2]))
                i += 2
                continue
        if isinstance(m, nn.Module):
            s = bn_scale(m)
            if s is not None and i + 1 < len(parts):
                nm, nins, nouts = parts[i + 1]
                nspec = conv_spec(nm, nins, nouts) if isinstance(nm, nn.Module) else nm
                if (isinstance(nspec, ConvSpec) and not nspec.adjoint and nspec.groups == 1
                        and s.numel() == nspec.weight.shape[1]):
                    w = nspec.weight * s.reshape(1, -1, *([1] * (nspec.weight.dim() - 2)))
                    out.append((replace(nspec, weight=w), ins, nouts))
                    i += 2
                    continue
        out.append((spec if isinstance(spec, ConvSpec) else m, ins, outs))
        i += 1
    return out


def _folded_parts(mods: list[nn.Module], in_shape: tuple[int, ...]) -> list[_Part]:
    """``mods`` applied in order from ``in_shape``, each with its in/out shapes, BatchNorm
    folded into its neighbouring conv (:func:`_fold_bn`)."""
    parts: list[_Part] = []
    shape = in_shape
    for m in mods:
        out = output_shape(m, shape)
        parts.append((m, shape, out))
        shape = out
    return _fold_bn(parts)


def _sequential(seq: nn.Module, in_shape: tuple[int, ...], norm: str) -> tuple[float, str] | None:
    """Product of certified parts (``||A_n ... A_1|| <= prod ||A_i||``, submultiplicativity)."""
    parts = _folded_parts(_flatten_seq(seq), in_shape)
    total = 1.0
    hows = []
    for p, ins, outs in parts:
        c: tuple[float, str] | None
        if isinstance(p, ConvSpec):
            c = conv_l2_upper(p) if norm == "2" else conv_l1_linf_upper(p, norm)
        else:
            c = _single(p, ins, outs, norm)
        if c is None:
            return None
        total *= c[0]
        hows.append(c[1].split(" (")[0])
    # a zero part makes the product exactly 0 (the composition is the zero map)
    return (round_up(total) if total > 0 else 0.0), "product of parts: " + " * ".join(hows)


def _pointwise_conv(op: Any, in_shape: tuple[int, ...]) -> ConvSpec | None:
    """``op`` as one convolution with a ``1 x ... x 1`` kernel (a Conv alone, or with the
    BatchNorm folded into it by :func:`_fold_bn`), else ``None``.

    Such a conv applies its channel matrix ``M`` at every read position: the operator is a
    coordinate selection of ``I kron M``, with norm ``||M||_2`` whenever an output exists, and
    :func:`conv_l2_upper` certifies it from ``M`` alone (one frequency), where the dense route
    would build and factor the whole ``I kron M`` (DenseNet's 1x1 bottlenecks at small maps:
    93 SVDs, most of its time at 32x32).
    """
    spec = _single_conv(op, in_shape)
    if spec is None or spec.adjoint or any(k != 1 for k in spec.weight.shape[2:]):
        return None
    return spec


def _single_conv(op: Any, in_shape: tuple[int, ...]) -> ConvSpec | None:
    """``op`` as ONE convolution: a Conv alone, or with the eval BatchNorm before or after it
    folded into its kernel (:func:`_fold_bn`); else ``None``."""
    if not isinstance(op, nn.Module):
        return None
    mods = _flatten_seq(op)
    if len(mods) > 2 or not any(isinstance(m, nn.modules.conv._ConvNd) for m in mods):
        return None
    folded = _folded_parts(mods, in_shape)
    if len(folded) != 1 or not isinstance(folded[0][0], ConvSpec):
        return None
    return folded[0][0]


def best_certificate(
    op: Any, in_shape: tuple[int, ...], out_shape: tuple[int, ...], norm: str = "2"
) -> tuple[float, str] | None:
    """Best (smallest) applicable certificate for ``op`` on ``in_shape``, or ``None``."""
    if norm == "2":
        pw = _pointwise_conv(op, in_shape)
        if pw is not None and math.prod(out_shape) > 0:
            return conv_l2_upper(pw)  # ||M||, the norm itself (see _pointwise_conv)
    cands: list[tuple[float, str]] = []
    dense = (math.prod(in_shape) * math.prod(out_shape) <= DENSE_LIMIT
             and not isinstance(op, nn.Linear))  # a Linear's weight IS its dense matrix
    if dense:
        c = dense_upper(op, in_shape, norm)
        if c is not None:
            cands.append(c)
    if isinstance(op, nn.Sequential):
        # the product of the parts' norms is never below the norm of the composition, which
        # the dense certificate bounds within its margin: only without it is it worth forming
        if not cands:
            c = _sequential(op, in_shape, norm)
            if c is not None:
                cands.append(c)
    elif isinstance(op, nn.Module):
        # likewise a conv's structural certificates (Fourier, torus, abs sums) bound the
        # very operator the dense certificate bounds within its margin (but a zero kernel
        # is exactly 0 there, where the dense bound keeps its margin)
        if not (cands and cands[0][0] > 1e-290
                and conv_spec(op, in_shape, out_shape) is not None):
            c = _single(op, in_shape, out_shape, norm)
            if c is not None:
                cands.append(c)
    if not cands:
        return None
    return min(cands, key=lambda c: c[0])
