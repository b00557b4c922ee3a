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

Certified upper bounds (:func:`certified_layer_norm`) are the library's own, one certificate
per operator kind, each proved in :mod:`lipbound.spectral.certify`: a Linear layer's
:func:`~lipbound.spectral.certify.matrix_norm_upper` of ``W`` (the operator on
``(..., in_features)`` inputs is ``I (x) W``, whose norm is ``||W||_2``); a small
convolution's dense float64 matrix (:func:`~lipbound.spectral.certify.dense_upper`); a larger
one's Fourier / torus certificate (:func:`~lipbound.spectral.certify.conv_l2_upper`, strides,
dilation, groups and every padding mode), all with their float64 rounding margins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedModelError, UnsupportedNode
from ..spectral.certify import (
    ConvSpec,
    conv_l2_upper,
    dense_matrix,
    dense_upper,
    matrix_norm_upper,
)

__all__ = [
    "LAYER_TYPES",
    "certified_layer_norm",
    "dense_operator",
    "is_layer",
    "layer_map",
    "normalize",
    "power_update",
    "random_unit",
    "sigma_of",
]

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: most entries of the dense operator matrix a penalty builds for an exact SVD
SVD_ENTRIES = 2_000_000
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
    """The matrix of the linear map ``fn`` (batched) on inputs of ``in_shape``, shape
    ``(numel(out), numel(in))``, by :func:`lipbound.spectral.certify.dense_matrix` (on the CPU).
    ``fn`` must already use ``dtype`` weights."""
    return dense_matrix(fn, in_shape, dtype=dtype, device=device)[0]


def certified_layer_norm(
    module: nn.Module | LayerSpec,
    in_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    *,
    dense_limit: int = SVD_ENTRIES,
) -> tuple[float, str]:
    """A certified upper bound on ``||A_W||_2`` (the true operator on ``in_shape``) and how.

    ``weight`` defaults to the module's current (parametrised) weight. A Linear layer:
    :func:`~lipbound.spectral.certify.matrix_norm_upper` of ``W``; a convolution whose matrix
    has at most ``dense_limit`` entries: :func:`~lipbound.spectral.certify.dense_upper`; a
    larger one: :func:`~lipbound.spectral.certify.conv_l2_upper` (see the module doc).

    >>> lin = nn.Linear(3, 2)
    >>> val, how = certified_layer_norm(lin, (3,))
    >>> w = float(torch.linalg.matrix_norm(lin.weight.detach().double(), 2))
    >>> w <= val <= w * (1 + 1e-12), how
    (True, 'dense SVD (float64) + margin')
    """
    in_shape = tuple(int(s) for s in in_shape)
    if isinstance(module, LayerSpec):
        spec = module
        if weight is None:
            raise InvalidArgumentError("certified_layer_norm(spec, ...) needs the weight")
    else:
        spec = spec_of(module)
        weight = module.weight if weight is None else weight  # type: ignore[assignment]
    if weight is None:  # pragma: no cover - narrowed above
        raise InvalidArgumentError("no weight")
    w = weight.detach().to(torch.float64)
    if spec.kind == "linear":
        return matrix_norm_upper(w)
    fn = spec.map(w)
    with torch.no_grad():
        out = tuple(spec.apply(torch.zeros(1, *in_shape, dtype=w.dtype, device="meta"),
                               w.to("meta")).shape[1:])
    if math.prod(in_shape) * math.prod(out) <= dense_limit:
        c = dense_upper(fn, in_shape)
        if c is not None:
            return c
    return conv_l2_upper(_conv_spec(spec, w, in_shape, out))


def _conv_spec(spec: LayerSpec, w: torch.Tensor, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...]) -> ConvSpec:
    """The :class:`~lipbound.spectral.certify.ConvSpec` of a conv layer with weight ``w``
    (padding read from torch's reversed padding, as :func:`~lipbound.spectral.certify.conv_spec`
    does for a module)."""
    d = spec.d
    rp = list(spec.rev_pad)
    return ConvSpec(
        weight=w.cpu(),
        in_spatial=tuple(in_shape[1:]),
        out_spatial=tuple(out_shape[1:]),
        stride=tuple(spec.stride),
        dilation=tuple(spec.dilation),
        pad_lo=tuple(int(rp[2 * (d - 1 - i)]) for i in range(d)),
        pad_hi=tuple(int(rp[2 * (d - 1 - i) + 1]) for i in range(d)),
        groups=spec.groups,
        mode=spec.padding_mode,
    )


