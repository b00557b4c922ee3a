"""Modules built by :func:`lipbound.graph.simplify`: folded BatchNorm, eval BatchNorm, wrappers.

They stay *live*: weights are read from the original modules at every call (so gradients reach
them and later weight updates are seen). :func:`materialize` takes a detached snapshot made of
plain ``nn.Linear`` / ``nn.ConvNd`` / :class:`ChannelAffine` modules, for measuring norms.

Weights are always the ones the module uses in **eval mode**: :func:`eval_weight` evaluates a
``torch.nn.utils.parametrize`` parametrisation (``parametrizations.spectral_norm``,
``orthogonal``, custom ones) with its modules switched to eval, and recomputes the weight of the
old hook-based ``torch.nn.utils.spectral_norm`` / ``weight_norm`` the way their forward
pre-hooks do in eval (no power iteration, nothing written), whatever the model's current mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..errors import InvalidArgumentError

__all__ = [
    "ChannelAffine",
    "EvalBatchNorm",
    "FnModule",
    "FoldedBatchNorm",
    "as64",
    "bn_scale_shift",
    "eval_mode",
    "eval_weight",
    "materialize",
    "weight_hooks",
]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHT_HOOKS = (SpectralNorm, WeightNorm)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Switch ``module`` and its submodules to eval for the block, then restore every flag.

    Node functions and rules evaluate the eval-mode network even when the model is being
    trained: a parametrisation or a weight pre-hook in train mode runs a power iteration (it
    writes its ``u``/``v`` buffers and its output differs from call to call).
    """
    flags = [(m, m.training) for m in module.modules() if m.training]
    if not flags:
        yield
        return
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, t in flags:
            m.training = t


def weight_hooks(module: nn.Module) -> list[Any]:
    """The old-API ``spectral_norm`` / ``weight_norm`` forward pre-hooks of ``module``."""
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, WEIGHT_HOOKS)]


def eval_weight(module: nn.Module, name: str = "weight") -> Any:
    """``module.<name>`` as the module uses it in eval mode (live: gradients flow).

    * parametrised (``torch.nn.utils.parametrize``): the parametrisation evaluated in eval mode
      (e.g. ``parametrizations.spectral_norm`` divides by ``sigma`` from its stored vectors
      without iterating; nothing is written);
    * old-API ``spectral_norm`` / ``weight_norm`` hooks: the pre-hook's own ``compute_weight``
      (``do_power_iteration=False`` for spectral norm, which is what the hook does in eval), so
      a stale attribute left by the last (training) forward is never read;
    * otherwise the attribute itself.
    """
    with eval_mode(module):
        for h in weight_hooks(module):
            if h.name != name:
                continue
            if isinstance(h, SpectralNorm):
                return h.compute_weight(module, do_power_iteration=False)
            return h.compute_weight(module)
        return getattr(module, name, None)


def _needs_snapshot(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module) or bool(weight_hooks(module))


def _plain_snapshot(module: Any) -> nn.Module:
    """A plain Linear / ConvNd / ConvTransposeNd with ``module``'s eval weights (detached)."""
    cls = parametrize.type_before_parametrizations(module)
    w, b = eval_weight(module, "weight"), eval_weight(module, "bias")
    m = module
    if issubclass(cls, nn.Linear):
        new: nn.Module = nn.Linear(m.in_features, m.out_features, bias=b is not None, device="meta")
    elif issubclass(cls, _CONV):
        new = cls(
            m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
            dilation=m.dilation, groups=m.groups, bias=b is not None, padding_mode=m.padding_mode,
            device="meta",
        )
    elif issubclass(cls, _CONVT):
        new = cls(
            m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
            output_padding=m.output_padding, groups=m.groups, bias=b is not None,
            dilation=m.dilation, padding_mode=m.padding_mode, device="meta",
        )
    else:
        raise InvalidArgumentError(
            f"no plain snapshot for {cls.__name__}: expected a Linear, ConvNd or ConvTransposeNd"
        )
    with torch.no_grad():
        new.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
        new.register_parameter("bias", bias)
    return new.eval()


def bn_scale_shift(bn: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``bn(x) = s * x + t`` per channel in eval mode (running statistics)."""
    var = bn.running_var
    mean = bn.running_mean
    if var is None or mean is None:
        raise ValueError("BatchNorm without running statistics has no eval-mode affine form")
    inv = torch.rsqrt(var + bn.eps)
    w = bn.weight if bn.weight is not None else torch.ones_like(var)
    b = bn.bias if bn.bias is not None else torch.zeros_like(var)
    s = w * inv
    return s, b - mean * s


class _BN64:
    """Float64 copies of a BatchNorm's statistics and affine parameters."""

    def __init__(self, bn: Any) -> None:
        def c(t: Any) -> torch.Tensor | None:
            return None if t is None else t.detach().double()

        self.running_mean = c(bn.running_mean)
        self.running_var = c(bn.running_var)
        self.weight = c(bn.weight)
        self.bias = c(bn.bias)
        self.eps = bn.eps


def as64(bn: Any) -> _BN64:
    return _BN64(bn)


def _bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


class ChannelAffine(nn.Module):
    """``x -> scale[c] * x + shift[c]`` over channel dim 1 (a snapshot of an eval BatchNorm)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale: Any = self.scale
        shift: Any = self.shift
        return x * _bcast(scale, x.dim()).to(x.dtype) + _bcast(shift, x.dim()).to(x.dtype)


class EvalBatchNorm(nn.Module):
    """A BatchNorm module always applied in eval mode (running statistics)."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn: Any = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, t = bn_scale_shift(self.bn)
        return x * _bcast(s, x.dim()).to(x.dtype) + _bcast(t, x.dim()).to(x.dtype)


class FoldedBatchNorm(nn.Module):
    """``bn(linear(x))`` in eval mode as ONE affine layer with folded weight and bias.

    With ``bn(y) = s * y + t`` per output channel: ``W' = diag(s) W``, ``b' = s * b + t``.
    ``weight`` and ``bias`` are recomputed from the live modules on access.
    """

    def __init__(self, linear: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        if not isinstance(linear, (nn.Linear, *_CONV)):
            raise TypeError(f"cannot fold BatchNorm into {type(linear).__name__}")
        self.linear: Any = linear
        self.bn: Any = bn

    @property
    def weight(self) -> torch.Tensor:
        s, _ = bn_scale_shift(self.bn)
        w = eval_weight(self.linear, "weight")
        return w * s.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))

    @property
    def bias(self) -> torch.Tensor:
        s, t = bn_scale_shift(self.bn)
        b = eval_weight(self.linear, "bias")
        base = b if b is not None else torch.zeros_like(s)
        return (base * s + t).to(eval_weight(self.linear, "weight").dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        lin = self.linear
        if isinstance(lin, nn.Linear):
            return F.linear(x, w, b)
        conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(lin)]
        if lin.padding_mode != "zeros":
            raise ValueError("folding supports padding_mode='zeros' only")
        return conv(x, w, b, lin.stride, lin.padding, lin.dilation, lin.groups)

    def materialize(self) -> nn.Module:
        """A plain ``nn.Linear`` / ``nn.ConvNd`` with the folded weights (detached float64 copy,
        so the folding itself adds no float32 rounding to what is measured)."""
        lin = self.linear
        with torch.no_grad():
            s, t = bn_scale_shift(as64(self.bn))
            w0 = eval_weight(lin, "weight").detach().double()
            w = w0 * s.reshape(-1, *([1] * (w0.dim() - 1)))
            b1 = eval_weight(lin, "bias")
            b0 = b1.detach().double() if b1 is not None else torch.zeros_like(s)
            b = b0 * s + t
        if isinstance(lin, nn.Linear):
            new: nn.Module = nn.Linear(lin.in_features, lin.out_features, device="meta")
        else:
            new = type(lin)(
                lin.in_channels, lin.out_channels, lin.kernel_size, stride=lin.stride,
                padding=lin.padding, dilation=lin.dilation, groups=lin.groups, device="meta",
            )
        new.weight = nn.Parameter(w, requires_grad=False)
        new.bias = nn.Parameter(b, requires_grad=False)
        return new.eval()


class FnModule(nn.Module):
    """Wrap a batched callable (a captured node's ``fn``) as a parameter-free module."""

    def __init__(self, fn: Callable[..., torch.Tensor], label: str = "") -> None:
        super().__init__()
        self.fn = fn
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.label


def materialize(module: nn.Module) -> nn.Module:
    """Detached snapshot of a (merged) linear module with plain layers, in eval mode.

    BatchNorm-derived weights are computed in float64 (no extra float32 rounding). A
    parametrised Linear / Conv / ConvTranspose, or one with an old-API ``spectral_norm`` /
    ``weight_norm`` hook, becomes a plain layer holding its eval weight (:func:`eval_weight`)."""
    if isinstance(module, (nn.Linear, *_CONV, *_CONVT)) and _needs_snapshot(module):
        return _plain_snapshot(module)
    if isinstance(module, FoldedBatchNorm):
        return module.materialize()
    if isinstance(module, EvalBatchNorm) or isinstance(module, _BN):
        bn = module.bn if isinstance(module, EvalBatchNorm) else module
        with torch.no_grad():
            s, t = bn_scale_shift(as64(bn))
        return ChannelAffine(s, t).eval()
    if type(module) is nn.Sequential:
        return nn.Sequential(*[materialize(m) for m in module]).eval()
    return module
