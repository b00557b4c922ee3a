"""Power iteration on the TRUE operator of a Linear/Conv layer, and certified norms of it.

A ``Linear`` or ``Conv{1,2,3}d`` layer called on per-sample inputs of shape ``in_shape`` is the
affine map ``x -> A_W x + b``; ``A_W`` is the bias-free functional (``F.linear(x, W)`` or the
convolution with the layer's stride, padding, dilation, groups and padding mode) applied to
``x`` of shape ``(1, *in_shape)``. Nothing here reshapes the kernel into a matrix: a strided,
padded convolution is treated as the linear map it really is.

Power iteration through autodiff (one forward and one backward pass per iteration)::

    u = A v,   g = A^T u = grad_v (1/2)||A v||^2,   v <- g / ||g||,

converges to the top right-singular vector of ``A`` and ``||A v||`` (with ``||v|| = 1``) to
``||A||_2`` FROM BELOW: ``||A v|| <= ||A||_2`` for every unit ``v``, so it is an estimate (and a
valid lower bound), never a certificate.

Certified upper bounds (:func:`certified_layer_norm`) come, in this order, from

1. for Linear layers: the float64 SVD of ``W`` (the operator on ``(..., in_features)`` inputs is
   ``I (x) W``, whose norm is ``||W||_2``), times ``1 + 1e-9`` for rounding;
2. an exact dense float64 SVD of a convolution's matrix when it is small (``<= dense_limit``
   entries, or any size for non-zero padding modes), times ``1 + 1e-9``;
3. for larger zero-padded convolutions: a Fourier bound on the polyphase (space-to-depth)
   form. Proof: pad the (zero-padded) input further with zeros to a grid whose length ``n'``
   is a multiple of the stride ``s`` and large enough (an isometric embedding ``P``); a stride-``s``
   cross-correlation on that grid equals a stride-1 multi-channel cross-correlation of the
   space-to-depth rearrangement (a permutation, isometric) with a rearranged kernel ``K'``
   (``c_in s^d`` input channels); on a grid of ``m >= n'/s + k' - 1`` points it coincides, at
   every output we keep, with the circular one ``C``, whose norm is
   ``max_w ||K'^(w)||_2`` over the DFT frequencies of the grid (block-diagonalisation by the
   DFT). So ``A = S C T P`` with ``S`` a row selection (norm <= 1) and ``T, P`` isometries:
   ``||A||_2 <= max_w ||K'^(w)||_2``. Computed in float64, times ``1 + 1e-9`` for rounding.
   Groups: the kernel is block-diagonal over groups; the bound is the max over groups.

The library's :func:`lipbound.spectral.certified_upper` is used instead when it is installed and
succeeds (``prefer_library=True``); these fallbacks keep lipbound.train independent of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError, LipboundError, UnsupportedModelError, UnsupportedNode
from ..spectral import certified_upper

__all__ = [
    "LAYER_TYPES",
    "certified_layer_norm",
    "dense_operator",
    "fourier_conv_bound",
    "is_layer",
    "layer_map",
    "normalize",
    "power_update",
    "random_unit",
    "sigma_of",
]

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ROUND = 1e-9  # relative safety margin for float64 rounding in certified values
DENSE_LIMIT = 2_000_000  # entries of the dense operator matrix built for an exact SVD
_CONV_FNS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def is_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a layer handled here (Linear or Conv1d/2d/3d)."""
    return isinstance(m, LAYER_TYPES)


@dataclass(frozen=True)
class LayerSpec:
    """Everything but the weight that defines a layer's linear map (picklable, copyable).

    ``kind`` is ``"linear"`` or ``"conv"``; for convolutions ``d`` is the number of spatial
    dimensions and the other fields are the module's (``rev_pad`` is torch's
    ``_reversed_padding_repeated_twice``, used for non-zero padding modes).
    """

    kind: str
    d: int = 0
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    rev_pad: tuple[int, ...] = ()

    def apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``A_w x`` for a batch ``x`` (no bias)."""
        if self.kind == "linear":
            return F.linear(x, w)
        conv = _CONV_FNS[self.d]
        if self.padding_mode != "zeros":
            x = F.pad(x, list(self.rev_pad), mode=self.padding_mode)
            return conv(x, w, None, self.stride, 0, self.dilation, self.groups)
        return conv(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def map(self, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The batched map ``x -> A_w x``."""
        return lambda x: self.apply(x, w)


def spec_of(module: nn.Module) -> LayerSpec:
    """The :class:`LayerSpec` of a Linear / Conv1d/2d/3d module (raise otherwise)."""
    if isinstance(module, nn.Linear):
        return LayerSpec("linear")
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        pad = module.padding
        return LayerSpec(
            "conv",
            d=len(module.kernel_size),
            stride=tuple(int(s) for s in module.stride),
            padding=pad if isinstance(pad, str) else tuple(int(p) for p in pad),
            dilation=tuple(int(s) for s in module.dilation),
            groups=int(module.groups),
            padding_mode=str(module.padding_mode),
            rev_pad=tuple(int(p) for p in module._reversed_padding_repeated_twice),
        )
    raise UnsupportedModelError(
        [UnsupportedNode(type(module).__name__, type(module).__name__,
                         "only Linear and Conv1d/2d/3d layers are supported")],
        what="lipbound.train handles Linear and Conv1d/2d/3d layers only",
    )


def layer_map(
    module: nn.Module, weight: torch.Tensor | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batched bias-free linear map ``x -> A_W x`` of ``module`` with weight ``weight``.

    ``weight`` defaults to ``module.weight`` (the parametrised weight if any). The convolution
    keeps its stride, padding (including ``padding_mode``), dilation and groups.
    """
    w = module.weight if weight is None else weight
    return spec_of(module).map(w)  # type: ignore[arg-type]


def normalize(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``v / max(||v||, eps)``."""
    return v / v.norm().clamp_min(eps)


def random_unit(
    shape: Sequence[int], *, dtype: torch.dtype, device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random unit vector of ``shape`` (Gaussian direction, drawn on CPU then moved)."""
    v = torch.randn(*shape, generator=generator, dtype=dtype)
    return normalize(v, 1e-30).to(device)


def power_update(
    fn: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, n: int, eps: float
) -> torch.Tensor:
    """``n`` power iterations ``v <- A^T A v / ||A^T A v||`` (no graph kept; ``fn`` = ``A``).

    ``v`` is one sample (no batch dimension). ``A^T`` is the vector-Jacobian product of ``fn``.
    If ``A^T A v`` vanishes (``v`` in the kernel, or ``A = 0``), ``v`` is kept as it is.
    """
    v = v.detach()
    for _ in range(n):
        with torch.enable_grad():
            x = v.unsqueeze(0).requires_grad_(True)
            y = fn(x)
            (g,) = torch.autograd.grad(y, x, grad_outputs=y.detach())
        g = g.squeeze(0).detach()
        gn = g.norm()
        if not bool(torch.isfinite(gn)) or float(gn) <= eps:
            break
        v = g / gn
    return v


def sigma_of(fn: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """``||A v|| / ||v||`` with ``v`` detached: differentiable in the weights used by ``fn``.

    Its gradient w.r.t. ``W`` is ``u^T (dA/dW) v`` with ``u = A v / ||A v||``, the same as torch's
    ``u^T W v`` form of ``spectral_norm``. The value never exceeds ``||A||_2`` (an estimate).
    """
    v = v.detach()
    return fn(v.unsqueeze(0)).norm() / v.norm()


# ---------------------------------------------------------------------------------------------
# certified upper bounds
# ---------------------------------------------------------------------------------------------
def dense_operator(
    fn: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int], *,
    dtype: torch.dtype = torch.float64, device: torch.device | None = None,
) -> torch.Tensor:
    """The matrix of the linear map ``fn`` (batched) on inputs of ``in_shape`` (column per basis
    vector), shape ``(numel(out), numel(in))``. ``fn`` must already use ``dtype`` weights."""
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=dtype, device=device).reshape(n, *in_shape)
    with torch.no_grad():
        cols = fn(eye).reshape(n, -1)
    return cols.T


def _total_padding(spec: LayerSpec, ks: Sequence[int]) -> list[int]:
    """Per-dim total zero padding the convolution applies to its input."""
    if isinstance(spec.padding, str):
        if spec.padding == "valid":
            return [0] * spec.d
        # "same": torch pads dilation * (k - 1) in total per dim (stride must be 1)
        return [spec.dilation[i] * (int(ks[i]) - 1) for i in range(spec.d)]
    return [2 * int(p) for p in spec.padding]


def fourier_conv_bound(
    module: nn.Module | LayerSpec, in_shape: Sequence[int], weight: torch.Tensor | None = None
) -> float:
    """Certified upper bound on the operator norm of a zero-padded convolution (see module doc).

    >>> conv = nn.Conv2d(1, 1, 2, stride=2, bias=False)
    >>> with torch.no_grad():
    ...     _ = conv.weight.fill_(1.0)
    >>> round(fourier_conv_bound(conv, (1, 4, 4)), 6)  # exact norm: 2 (disjoint 2x2 sums)
    2.0
    """
    if isinstance(module, LayerSpec):
        spec = module
        if weight is None:
            raise InvalidArgumentError("fourier_conv_bound(spec, ...) needs the weight")
    else:
        spec = spec_of(module)
        weight = module.weight if weight is None else weight  # type: ignore[assignment]
    if spec.kind != "conv":
        raise InvalidArgumentError("fourier_conv_bound needs a convolution")
    if spec.padding_mode != "zeros":
        raise UnsupportedModelError(
            [UnsupportedNode("conv", "Conv", f"padding_mode={spec.padding_mode!r}")],
            what="the Fourier certificate covers zero padding only",
        )
    if weight is None:  # pragma: no cover - narrowed above
        raise InvalidArgumentError("no weight")
    w = weight.detach().to(torch.float64)
    d = spec.d
    spatial = [int(s) for s in in_shape[1:]]
    if len(spatial) != d:
        raise InvalidArgumentError(
            f"input shape {tuple(in_shape)} does not fit a {d}-d convolution"
        )
    stride, dil, groups = list(spec.stride), list(spec.dilation), spec.groups
    cout, cin_g = int(w.shape[0]), int(w.shape[1])
    ks = [int(k) for k in w.shape[2:]]
    tot_pad = _total_padding(spec, ks)
    # dilate the kernel: taps at multiples of the dilation
    span = [dil[i] * (ks[i] - 1) + 1 for i in range(d)]
    wd = w.new_zeros(cout, cin_g, *span)
    idx = (slice(None), slice(None), *[slice(None, None, dil[i]) for i in range(d)])
    wd[idx] = w
    # polyphase: kernel span padded to a multiple of the stride, then space-to-depth
    kq = [-(-span[i] // stride[i]) for i in range(d)]  # k' per dim
    wp = F.pad(wd, [p for i in reversed(range(d)) for p in (0, kq[i] * stride[i] - span[i])])
    # wp[o, c, a_1 s_1 + r_1, ...] -> w'[o, (c, r_1, ..., r_d), a_1, ..., a_d]
    shape = [cout, cin_g]
    for i in range(d):
        shape += [kq[i], stride[i]]
    wp = wp.reshape(shape)
    perm = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    wp = wp.permute(perm).reshape(cout, cin_g * math.prod(stride), *kq)
    # grid large enough that the circular correlation equals the linear one at kept outputs
    grid = [-(-(spatial[i] + tot_pad[i]) // stride[i]) + kq[i] - 1 for i in range(d)]
    kf = torch.fft.fftn(wp, s=grid, dim=list(range(2, 2 + d)))  # (cout, cin', *grid)
    kf = kf.reshape(cout, kf.shape[1], -1).permute(2, 0, 1)  # (freqs, cout, cin')
    out_g = cout // groups
    best = 0.0
    for g in range(groups):
        blk = kf[:, g * out_g : (g + 1) * out_g, :]
        best = max(best, float(torch.linalg.matrix_norm(blk, ord=2).max()))
    return best * (1.0 + _ROUND)


def _library_certified(module: nn.Module, in_shape: tuple[int, ...]) -> float | None:
    try:
        res = certified_upper(module, in_shape)
    except LipboundError:
        return None
    if res is None:
        return None
    val = float(res[0])
    return val if math.isfinite(val) else None


def certified_layer_norm(
    module: nn.Module | LayerSpec,
    in_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    *,
    dense_limit: int = DENSE_LIMIT,
    prefer_library: bool = False,
) -> tuple[float, str]:
    """A certified upper bound on ``||A_W||_2`` (the true operator on ``in_shape``) and how.

    ``weight`` defaults to the module's current (parametrised) weight. Methods, in order: the
    library's certificate (if ``prefer_library``, a module is given and ``weight`` is None),
    float64 SVD of ``W`` (Linear), dense float64 SVD (small convolutions), Fourier polyphase
    bound (larger zero-padded convolutions). Each value is multiplied by ``1 + 1e-9`` for
    float64 rounding.

    >>> lin = nn.Linear(3, 2)
    >>> val, how = certified_layer_norm(lin, (3,))
    >>> abs(val - float(torch.linalg.matrix_norm(lin.weight.detach().double(), 2))) < 1e-6, how
    (True, 'svd(W)')
    """
    in_shape = tuple(int(s) for s in in_shape)
    if isinstance(module, LayerSpec):
        spec = module
        if weight is None:
            raise InvalidArgumentError("certified_layer_norm(spec, ...) needs the weight")
    else:
        spec = spec_of(module)
        if prefer_library and weight is None:
            lib = _library_certified(module, in_shape)
            if lib is not None:
                return lib, "lipbound.spectral.certified_upper"
        weight = module.weight if weight is None else weight  # type: ignore[assignment]
    if weight is None:  # pragma: no cover - narrowed above
        raise InvalidArgumentError("no weight")
    w = weight.detach().to(torch.float64)
    if spec.kind == "linear":
        return float(torch.linalg.matrix_norm(w, ord=2)) * (1.0 + _ROUND), "svd(W)"
    fn = spec.map(w)
    with torch.no_grad():
        out_numel = fn(torch.zeros(1, *in_shape, dtype=torch.float64, device=w.device)).numel()
    if math.prod(in_shape) * out_numel <= dense_limit or spec.padding_mode != "zeros":
        m = dense_operator(fn, in_shape, device=w.device)
        return float(torch.linalg.matrix_norm(m, ord=2)) * (1.0 + _ROUND), "dense-svd"
    return fourier_conv_bound(spec, in_shape, w), "fourier-polyphase"
