"""Linear (affine) ops: Linear, Conv*, ConvTranspose*, AvgPool*, AdaptiveAvgPool*, eval
BatchNorm, interpolation, sum/mean, matmul by a constant, and merged chains of these.

The constant of an affine map ``x -> A x + b`` is the operator norm of ``A`` in the chosen norm.

* **l2**: :func:`lipbound.spectral.certified_upper` of the op (dense SVD, Fourier symbol of
  a convolution, Schur test for pools, products for Sequentials...) and
  :func:`lipbound.spectral.spectral_norm` for the estimate (from below, power/Lanczos through
  autodiff). The headline factor is the certified upper bound when there is one (its estimate
  is then only reported, computed to a relative tolerance ``max(tol, 1e-3)``), else the
  estimate to ``tol``, flagged as not certified.
  For a merged chain ``A = A_k ... A_1`` without a certificate, the product of the parts'
  certified bounds (``||A|| <= prod ||A_i||``, :func:`parts_product`) is used as the
  certificate, the merged estimate being reported next to it. Functional average pools
  (``F.adaptive_avg_pool2d(x, 1)``) are measured as the module making the same call
  (:func:`pool_module`), and sums / means over per-sample dims (``x.mean([2, 3])``) have an
  exact closed form (:func:`reduction_size`), so global-pool heads are certified at any size.
  Eval BatchNorm alone is diagonal: ``max_c |gamma_c| /
  sqrt(var_c + eps)``, exact.
* **l1 / l-inf**: ``||A||_inf`` is the largest row sum of ``|A|`` and ``||A||_1`` the largest
  column sum, i.e. ``max(|A| 1)`` and ``max(|A|^T 1)``. For Linear / Conv / ConvTranspose
  ``|A|`` is the same layer with ``|W|`` and no bias, for pooling, BatchNorm and reshapes it is
  the op itself (or with ``|scale|``), so one forward pass (and one vector-Jacobian product for
  ``|A|^T 1``) in float64 gives the exact norm. For merged chains ``|A_k ... A_1| <= |A_k| ...
  |A_1|`` entrywise, so the same computation on the chain of ``|A_i|`` is a certified upper
  bound (never above the product of the parts' norms). Other small linear maps are made dense
  (``Node.dense``); a large one without such a rule is reported unsupported for that norm.
  Float64 sums of non-negative terms carry a relative error below ``n * 1.2e-16``; a relative
  margin of 1e-9 covers it.

* **signs**: ``||-A|| = ||A||`` in every norm, and a sign flip of one factor of a chain flips
  the whole product, so an average pool with a negative ``divisor_override`` is measured as
  the pool with ``|divisor_override|`` (:func:`positive_pools`): its entries are then
  non-negative, as the Schur test and ``|A| = A`` assume.
* **eval BatchNorm statistics** are checked first (:func:`check_batchnorm_stats`):
  ``running_var + eps`` must be positive and every statistic finite, else the op itself is
  NaN/inf and a clear error names the module, the channel and the value.
* **zero maps**: a genuinely zero layer has constant 0 (its certificate); the reported
  estimate is 0 when the power/Lanczos estimate finds the map zero (in float32 a layer of
  weights ~1e-150 underflows to zero there, while its float64 certificate stays positive).

"""

from __future__ import annotations

import copy
import math
import operator
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import (
    InvalidArgumentError,
    NonFiniteError,
    UnsupportedModelError,
    UnsupportedNode,
)
from ..graph.modules import (
    ChannelAffine,
    EvalBatchNorm,
    FoldedBatchNorm,
    bn_scale_shift,
    materialize,
)
from ..graph.modules import as64 as _as64
from ..spectral import spectral_norm
from ..spectral.certify import best_certificate
from ._registry import NodeConstant, RuleContext
from ._util import arg, batched_dim, declare, is_tensor_arg, numel
from .structural import operand_coefficients

if TYPE_CHECKING:  # pragma: no cover
    from ..graph.types import Node

__all__ = [
    "MERGED_KEY",
    "NormUnavailable",
    "abs_operator",
    "entrywise_map",
    "check_batchnorm_stats",
    "l1_linf_available",
    "l1_linf_norm",
    "linear_constant",
    "positive_pools",
    "spectral",
]

MERGED_KEY = "__merged_linear__"
#: most inputs of a linear op whose l1 / l-inf norm is read from its dense matrix when it has
#: no cheap |A| operator (its columns are built one input at a time)
ABS_DENSE_INPUTS = 4096
#: tolerance and most Lanczos steps of the (reported only) estimate of a factor that has a
#: certificate (each step is a forward and an adjoint pass over the full-size feature map: at
#: 224 x 224 the estimates of VGG-16 took 44 s at 49 steps a layer, more than the certificates)
ESTIMATE_TOL = 1e-3
ESTIMATE_ITER = 16
_MARGIN = 1e-9

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_CONVT = {
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}
_POOL = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class NormUnavailable(Exception):
    """Internal: this node has no rule for the requested norm (collected as unsupported)."""


# ---- spectral (l2) ------------------------------------------------------------------------
def spectral(
    op: Any, in_shape: tuple[int, ...], ctx: RuleContext, *, dtype: torch.dtype | None = None
) -> Any:
    """``lipbound.spectral.spectral_norm(op, in_shape, ...)`` with the rule context's options."""
    opts: dict[str, Any] = {
        "tol": ctx.tol, "max_iter": ctx.max_iter, "certify": ctx.certify,
        "check_linear": False,  # the graph already knows these nodes are affine
    }
    if dtype is not None:
        opts["dtype"] = dtype
    return spectral_norm(op, in_shape, **opts)


def certified(op: Any, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
              ) -> tuple[float, str] | None:
    """The l2 certificate of :func:`lipbound.spectral.certified_upper` for a graph node's
    operand, without its linearity check (the graph already knows the node is affine: the
    check pushed full-size float64 maps through every layer, 11 s of VGG-16 at 224)."""
    return best_certificate(op, in_shape, out_shape, "2")


_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def positive_pools(module: nn.Module) -> nn.Module:
    """``module`` with every AvgPool's negative ``divisor_override`` replaced by its absolute
    value (copies; the model is untouched). Every operator norm is unchanged: the pool is
    ``-P`` with ``P >= 0`` entrywise, and ``A_k ... (-P) ... A_1 = -(A_k ... P ... A_1)``."""
    if isinstance(module, _AVG):
        d = getattr(module, "divisor_override", None)
        if d is not None and d < 0:
            new = copy.copy(module)
            new.divisor_override = -d
            return new
        return module
    if type(module) is nn.Sequential:
        parts = [positive_pools(m) for m in module]
        if all(a is b for a, b in zip(parts, module)):
            return module
        return nn.Sequential(*parts).eval()
    return module


def _bn_modules(node: Node) -> list[tuple[str, Any]]:
    """``(where, bn)`` for every BatchNorm the node applies (plain, eval-wrapped, folded)."""
    found: list[tuple[str, Any]] = []
    m = node.module
    if m is not None:
        for name, sub in m.named_modules():
            if isinstance(sub, _BN):
                found.append((f"{node.qualname}" + (f" ({name})" if name else ""), sub))
    return found


def check_batchnorm_stats(node: Node) -> None:
    """Refuse eval BatchNorm statistics for which ``bn(x)`` is not finite.

    ``bn(x) = gamma (x - mean) / sqrt(var + eps) + beta``: ``var + eps <= 0`` gives NaN (square
    root of a negative) or inf (division by zero); a NaN/inf statistic or affine parameter
    propagates. Raises :class:`~lipbound.errors.InvalidArgumentError` (non-positive
    ``running_var + eps``) or :class:`~lipbound.errors.NonFiniteError`, naming the module,
    the channel and the value.
    """
    items: list[tuple[str, Any, Any, float, Any, Any]] = []
    for where, bn in _bn_modules(node):
        if bn.running_var is not None:
            items.append((where, bn.running_var, bn.running_mean, float(bn.eps), bn.weight,
                          bn.bias))
    if node.call.key is F.batch_norm:
        var, mean = arg(node, 2, "running_var"), arg(node, 1, "running_mean")
        if isinstance(var, torch.Tensor):
            items.append((node.qualname, var, mean, float(arg(node, 7, "eps", 1e-5)),
                          arg(node, 3, "weight"), arg(node, 4, "bias")))
    for where, var, mean, eps, w, b in items:
        for label, t in (("running_var", var), ("running_mean", mean), ("weight", w),
                         ("bias", b)):
            if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t.detach()).all()):
                bad = torch.nonzero(~torch.isfinite(t.detach().reshape(-1)))[0, 0]
                raise NonFiniteError(
                    f"BatchNorm {where}: {label}[{int(bad)}] = "
                    f"{float(t.detach().reshape(-1)[bad])} is not finite; fix the loaded "
                    "statistics / weights"
                )
        v = var.detach().double().reshape(-1) + eps
        if v.numel() and not bool((v > 0).all()):
            c = int(torch.nonzero(~(v > 0))[0, 0])
            raw = float(var.detach().reshape(-1)[c])
            what = "negative: sqrt of it is NaN" if float(v[c]) < 0 else "zero: 1/0 is inf"
            raise InvalidArgumentError(
                f"BatchNorm {where}: running_var + eps = {raw:g} + {eps:g} at channel {c} is "
                f"{what}, so the layer is not a finite function. A variance is >= 0: fix the "
                "running statistics, and use eps > 0"
            )


_AVG_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override")
#: functional average pools and the module applying the same call: ``(module class, names of
#: the arguments after the input, in the functional's order)``
_FN_POOLS: dict[Any, tuple[type[nn.Module], tuple[str, ...]]] = {
    F.avg_pool1d: (nn.AvgPool1d, _AVG_ARGS[:5]),
    F.avg_pool2d: (nn.AvgPool2d, _AVG_ARGS),
    F.avg_pool3d: (nn.AvgPool3d, _AVG_ARGS),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool3d: (nn.AdaptiveAvgPool3d, ("output_size",)),
}


def pool_module(node: Node) -> nn.Module | None:
    """The ``nn.AvgPool*`` / ``nn.AdaptiveAvgPool*`` module computing a functional pool node.

    ``F.adaptive_avg_pool2d(x, 1)`` is ``nn.AdaptiveAvgPool2d(1)(x)``: the module's forward
    makes the same call with the same arguments, so its certificates (the Schur test of
    :mod:`lipbound.spectral.certify`) and ``|A|`` apply to the node. The module is built from
    the recorded arguments and checked on a float64 sample: it must reproduce the node's
    function exactly (``torch.equal``), else ``None`` (the node is then measured generically).
    """
    try:
        entry = _FN_POOLS.get(node.call.key)
    except TypeError:  # an unhashable key
        return None
    if entry is None or len(node.inputs) != 1 or node.call.getitem is not None:
        return None
    cls, names = entry
    args = tuple(node.call.args)
    kwargs = dict(node.call.kwargs)
    if not args or not is_tensor_arg(args[0]) or len(args) - 1 > len(names):
        return None
    params = dict(zip(names, args[1:]))
    for k, v in kwargs.items():
        if k not in names or k in params:
            return None
        params[k] = v
    if any(is_tensor_arg(v) or isinstance(v, torch.Tensor) for v in params.values()):
        return None
    try:
        mod = cls(**params).eval()
        x = torch.randn(1, *node.in_shapes[0], dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0)).to(_device(node))
        with torch.no_grad():
            same = torch.equal(mod(x), node.fn(x))
    except (TypeError, ValueError, RuntimeError):
        return None
    return mod if same else None


_MEAN_KEYS: tuple[Any, ...] = (torch.mean, "mean")
_SUM_KEYS: tuple[Any, ...] = (torch.sum, "sum")


def _reduction_dims(node: Node) -> tuple[int, ...] | None:
    """The ``dim`` argument of a one-input sum / mean call, as a tuple of ints (else ``None``)."""
    key = node.call.key
    if (key not in _MEAN_KEYS and key not in _SUM_KEYS) or len(node.inputs) != 1 \
            or node.call.getitem is not None or not is_tensor_arg(arg(node, 0, "input")):
        return None
    dim = arg(node, 1, "dim")
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (list, tuple)) else ()
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None
    return dims


def reduction_size(node: Node) -> int | None:
    """``k`` when ``node`` sums or averages groups of ``k`` entries (``x.mean([2, 3])``), or
    ``None`` when the call is not such a reduction over per-sample dims."""
    dims = _reduction_dims(node)
    if dims is None:
        return None
    in_shape = tuple(node.in_shapes[0])
    sample_dims = set()
    for d in dims:
        if not -(len(in_shape) + 1) <= d <= len(in_shape):
            return None
        sd = batched_dim(d, len(in_shape))
        if sd is None:
            return None  # the batch dimension
        sample_dims.add(sd)
    k = 1
    for sd in sample_dims:
        k *= in_shape[sd]
    if k < 1 or k * numel(node.out_shape) != numel(in_shape):
        return None
    return k


def _reduction_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    r"""Sum / mean over per-sample dims (``x.mean([2, 3])``, ``x.sum(-1, keepdim=True)``).

    Each input entry enters exactly one output entry, every output being ``w`` times the sum of
    its own group of ``k`` entries (``w = 1/k`` for the mean, ``1`` for the sum): the matrix is
    ``A = w R`` with ``R`` 0/1, one 1 per column and ``k`` per row, and disjoint row supports,
    so ``A A^T = k w^2 I`` and, exactly,

    .. math:: \|A\|_2 = \sqrt{k}\, w, \qquad \|A\|_\infty = k w, \qquad \|A\|_1 = w.

    (Evaluated in float64, a few ``u64`` of error, covered by the registry's rounding margin.)
    A call that is not recognised as such a reduction is measured as any linear node.
    """
    k = reduction_size(node)
    if k is None:
        return _linear_rule(node, ctx)
    mean = node.call.key in _MEAN_KEYS
    w = 1.0 / k if mean else 1.0
    v = {"2": math.sqrt(k) * w, "inf": k * w, "1": w}[ctx.norm]
    what = "mean" if mean else "sum"
    return NodeConstant(constants=(v,), certified=True, estimate=v,
                        how=f"{what} over groups of {k} entries (exact)")


def _spectral_operand(node: Node) -> Any:
    """What to hand to ``spectral_norm``: a plain module snapshot, or the bias-free fn."""
    m = node.module
    plain_call = (
        m is not None
        and node.call.fx_op == "call_module"
        and node.call.getitem is None
        and not node.call.kwargs
        and len(node.call.args or (None,)) == 1
    )
    if (plain_call or node.call.key == MERGED_KEY) and m is not None:
        return positive_pools(materialize(m))
    pool = pool_module(node)
    if pool is not None:
        return positive_pools(pool)
    return node.linear_fn()


def _bn_of(node: Node) -> nn.Module | None:
    m = node.module
    if isinstance(m, EvalBatchNorm):
        return m.bn
    if isinstance(m, _BN) and m.running_mean is not None:
        return m
    return None


def _is_isometry(node: Node) -> bool:
    """A bijective rearrangement of entries (flatten, view, permute...): a permutation matrix."""
    rule = node.rule
    meta = rule.meta if rule is not None else {}
    same = numel(node.in_shapes[0]) == numel(node.out_shape) if node.in_shapes else False
    return same and (bool(meta.get("bijective")) or bool(meta.get("identity")))


def core_parts(node: Node) -> list[Node]:
    """Parts of a merged node without the leading/trailing rearrangements of entries.

    For permutation matrices ``P, Q``: ``||P A Q|| = ||A||`` in l1, l2 and l-inf.
    """
    parts = list(node.part_nodes or (node,))
    while parts and _is_isometry(parts[0]):
        parts.pop(0)
    while parts and _is_isometry(parts[-1]):
        parts.pop()
    return parts


def linear_constant(node: Node, ctx: RuleContext) -> NodeConstant:
    """Constant of a linear node in ``ctx.norm`` (see the module docstring)."""
    t0 = time.perf_counter()
    check_batchnorm_stats(node)
    if len(node.part_nodes) > 1:
        core = core_parts(node)
        if not core:
            return NodeConstant(constants=(1.0,), certified=True, how="rearranges entries")
        if len(core) == 1:
            c = core[0].rule.constant(core[0], ctx)
            return replace(c, how=c.how + " (end reshapes are isometries)",
                           seconds=time.perf_counter() - t0)
    if ctx.norm != "2":
        v, how = l1_linf_norm(node, ctx.norm)
        return NodeConstant(
            constants=(v,), certified=True, how=how, seconds=time.perf_counter() - t0
        )
    bn = _bn_of(node)
    if bn is not None or isinstance(node.module, ChannelAffine):
        return _diagonal_constant(node, bn, t0)
    return _spectral_constant(node, ctx, t0)


def _diagonal_constant(node: Node, bn: nn.Module | None, t0: float) -> NodeConstant:
    """The l2 constant of an eval BatchNorm ``bn`` or of ``node``'s ChannelAffine (when ``bn``
    is None): a diagonal map, whose norm is its largest ``|scale_c|`` (exact)."""
    if bn is not None:
        with torch.no_grad():
            s, _ = bn_scale_shift(_as64(bn))
    else:
        mod: Any = node.module
        s = mod.scale.double()
    v = float(s.abs().max())  # float64: the registry's rounding margin covers it
    return NodeConstant(
        constants=(v,), certified=True, how="diagonal: max |gamma|/sqrt(var+eps)",
        estimate=v, seconds=time.perf_counter() - t0,
    )


def _spectral_constant(node: Node, ctx: RuleContext, t0: float) -> NodeConstant:
    """The l2 constant of a linear node: its certificate (or the parts' product) when there is
    one, with the spectral estimate reported next to it, else the estimate (uncertified)."""
    op = _spectral_operand(node)
    in_shape = tuple(node.in_shapes[0])
    cert = certified(op, in_shape, tuple(node.out_shape)) if ctx.certify else None
    parts = node.part_nodes
    if cert is None and ctx.certify and len(parts) > 1:
        cert = parts_product(parts, ctx)  # ||A_k ... A_1|| <= prod ||A_i||
    if cert is not None:
        # the factor is the certificate; the estimate is only reported, to a looser tolerance
        res = spectral(
            op, in_shape, replace(ctx, tol=max(ctx.tol, ESTIMATE_TOL), certify=False,
                                  max_iter=min(ctx.max_iter, ESTIMATE_ITER)),
            dtype=torch.float32,  # float32 rounding (~1e-7) is far below that tolerance
        )
    else:  # an estimate only (spectral_norm gives 0 for a map it finds zero)
        res = spectral(op, in_shape, replace(ctx, certify=False))
    est = float(res.value)
    upper: float | None = None
    if cert is not None:
        upper, how = max(float(cert[0]), est), cert[1]
    else:
        how = res.method or "estimate"
    value = upper if upper is not None else est
    return NodeConstant(
        constants=(value,), certified=upper is not None, how=how, estimate=est,
        seconds=time.perf_counter() - t0,
    )


def parts_product(parts: Any, ctx: RuleContext) -> tuple[float, str] | None:
    """``(prod_i c_i, how)`` over the parts of a merged chain when every ``c_i`` is certified.

    ``A = A_k ... A_1`` with ``||A_i|| <= c_i`` (each ``c_i`` a certified rule constant, rounded
    up by the registry) gives ``||A|| <= prod_i ||A_i|| <= prod_i c_i`` (submultiplicativity of
    operator norms, any norm). The float64 product of ``k`` non-negative factors is at most
    ``k u64`` too small, far below the registry's rounding margin applied to the merged node's
    constant. ``None`` when some part has no rule or only an estimate.
    """
    prod, names = 1.0, []
    for p in parts:
        rule = p.rule
        if rule is None or p.unsupported:
            return None
        c = rule.constant(p, ctx)
        if not c.certified:
            return None
        prod *= c.value
        names.append(c.how.split(" (")[0])
    return prod, "product of the parts' certified bounds: " + " * ".join(names)


# ---- l1 / l-inf -----------------------------------------------------------------------------
def _chain(
    fs: list[Callable[[torch.Tensor], torch.Tensor] | None],
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Composition ``fs[-1] o ... o fs[0]``, or ``None`` if any part is ``None``."""
    parts = [f for f in fs if f is not None]
    if len(parts) != len(fs):
        return None

    def seq(x: torch.Tensor) -> torch.Tensor:
        for f in parts:
            x = f(x)
        return x

    return seq


def entrywise_map(m: nn.Module, power: int = 1) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> B x`` (float64) for a weight layer, ``B`` entrywise ``|A|`` (``power=1``) or
    ``A o A`` (``power=2``, the Hadamard square), or ``None`` for other modules.

    ``Linear``, ``ChannelAffine``: the layer with ``|W|`` / ``W o W`` (exact). Zero-padded
    ``Conv*`` / ``ConvTranspose*``: every entry of ``A`` is one kernel weight or 0 (distinct
    taps read distinct inputs), so the conv with ``|K|`` / ``K o K`` is exact. Other padding
    modes (``power=1`` only): ``A = C P`` with ``P`` the 0/1 copy matrix of the padding, and
    ``|A| <= |C| P`` entrywise (taps meeting one input through the copies may cancel): the
    conv with ``|K|`` on the padded input is an entrywise UPPER bound of ``|A|``, which is
    all its users (l1 / l-inf norms, interval bounds) need; ``power=2`` gives ``None`` there.
    """
    if power not in (1, 2):
        raise InvalidArgumentError(f"entrywise_map: power must be 1 or 2, got {power!r}")

    def of(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().double()
        return w.abs() if power == 1 else w * w

    if isinstance(m, nn.Linear):
        wl = of(m.weight)
        return lambda x: F.linear(x, wl.to(x.device))
    if type(m) in _CONV and isinstance(m, nn.modules.conv._ConvNd):
        if power == 2 and m.padding_mode != "zeros":
            return None
        conv: Any = m
        wc = of(m.weight)
        return lambda x: conv._conv_forward(x, wc.to(x.device), None)
    if type(m) in _CONVT and isinstance(m, nn.modules.conv._ConvTransposeNd):
        wt, ct, convt = of(m.weight), m, _CONVT[type(m)]  # (ConvTranspose: zeros only)
        return lambda x: convt(x, wt.to(x.device), None, ct.stride,
                               ct.padding,  # type: ignore[arg-type]
                               ct.output_padding, ct.groups, ct.dilation)
    if isinstance(m, ChannelAffine):
        sc = of(m.scale)  # type: ignore[arg-type]
        return lambda x: x * sc.to(x.device).reshape(1, -1, *([1] * (x.dim() - 2)))
    return None


def _abs_module(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> |A| x`` (float64, an entrywise upper bound, see :func:`entrywise_map`) for a
    plain linear module, or ``None``."""
    m: Any = materialize(module)
    if isinstance(m, nn.Sequential):
        return _chain([_abs_module(p) for p in m])
    f = entrywise_map(m, 1)
    if f is not None:
        return f
    if isinstance(m, _POOL):
        pool = positive_pools(m)  # entries 1/|divisor| >= 0: |A| = A
        return lambda x: pool(x)
    if isinstance(m, nn.Flatten | nn.Unflatten | nn.Identity):
        return lambda x: m(x)
    return None


def abs_operator(node: Node) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> |A| x`` for a linear node (entry-wise absolute value of its matrix), in float64.

    For a merged node, the composition of the parts' ``|A_i|`` (an entry-wise upper bound).
    ``None`` when no cheap form is known.
    """
    parts = node.part_nodes
    if len(parts) > 1:
        return _chain([abs_operator(p) for p in parts])
    rule = node.rule
    meta = rule.meta if rule is not None else {}
    if meta.get("identity"):
        return lambda x: x
    if rule is not None and rule.name in ("neg", "add/sub"):
        # x -> coef * B x + c: |A| = |coef| B (B: the broadcast to the output, 0/1 entries)
        coef = 1.0 if rule.name == "neg" else _structural_coef(node)
        in_s, out_s = tuple(node.in_shapes[0]), tuple(node.out_shape)
        return lambda x: coef * _broadcast(x, in_s, out_s)
    if meta.get("structural"):  # 0/1 matrices (perm/selection/copy/pad): |A| = A
        return node.linear_fn()
    if rule is not None and rule.name in ("scalar mul", "scalar div"):
        a0, a1 = arg(node, 0, "input"), arg(node, 1, "other")
        c = a1 if is_tensor_arg(a0) else a0
        ct = c.detach().double().abs() if isinstance(c, torch.Tensor) else abs(float(c))
        # replaying the op with |c| broadcasts x exactly as the model does: diag(|c|) B
        if rule.name == "scalar mul":
            return lambda x: x * ct
        return lambda x: x / ct
    return _abs_other(node)


def _abs_other(node: Node) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """:func:`abs_operator` of a module call, a sum / mean reduction or a functional pool."""
    if node.module is not None and node.call.fx_op == "call_module":
        if node.call.getitem is None and not node.call.kwargs:
            return _abs_module(node.module)
    if reduction_size(node) is not None:  # entries w >= 0: |A| = A
        return node.linear_fn()
    pool = pool_module(node)
    return None if pool is None else _abs_module(pool)


def _structural_coef(node: Node) -> float:
    (c,) = operand_coefficients(node)
    return c


def _broadcast(x: torch.Tensor, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
               ) -> torch.Tensor:
    """``B x``: a batch ``(N, *in_shape)`` broadcast to ``(N, *out_shape)`` (per sample)."""
    if in_shape == out_shape:
        return x
    lead = len(out_shape) - len(in_shape)
    return x.reshape(x.shape[0], *([1] * lead), *in_shape).expand(x.shape[0], *out_shape)


def _device(node: Node) -> torch.device:
    m = node.module
    if m is not None:
        for t in list(m.parameters()) + list(m.buffers()):
            return t.device
    return torch.device("cpu")


def l1_linf_available(node: Node) -> str | None:
    """``None`` when :func:`l1_linf_norm` can handle ``node``, else the reason."""
    if len(node.part_nodes) > 1:
        core = core_parts(node)
        if len(core) <= 1:
            return None if not core else l1_linf_available(core[0])
    rule = node.rule
    # (the registry gates every rule's constant; __wrapped__ is the rule's own function)
    own = getattr(rule.constant, "__wrapped__", None) if rule is not None else None
    if rule is not None and own is not _linear_rule:
        return None  # structural / BatchNorm rules have closed forms
    if abs_operator(node) is None and numel(node.in_shapes[0]) > ABS_DENSE_INPUTS:
        return (
            f"no cheap l1/l-inf rule for this linear op with {numel(node.in_shapes[0])} inputs; "
            "use norm=2 or register_rule"
        )
    return None


def l1_linf_norm(node: Node, norm: str) -> tuple[float, str]:
    """Exact (or certified upper) l1 / l-inf operator norm of a linear node's matrix."""
    in_shape = tuple(node.in_shapes[0])
    f = abs_operator(node)
    how = "max row/col sum of |A| (exact)"
    if f is None or (node.part_nodes and len(node.part_nodes) > 1):
        how = "row/col sums of |A_k|...|A_1| (certified upper bound)"
    if f is None:
        if numel(in_shape) > ABS_DENSE_INPUTS:
            raise NormUnavailable(
                f"no cheap l{norm} rule for this linear op with {numel(in_shape)} inputs; "
                "use norm=2 or register_rule"
            )
        W = node.dense()[0].abs()
        v = float(W.sum(dim=1).max() if norm == "inf" else W.sum(dim=0).max()) if W.numel() else 0.0
        return v * (1 + _MARGIN), "max row/col sum of |W| (dense, exact)"
    with torch.no_grad():
        ones = torch.ones(1, *in_shape, dtype=torch.float64, device=_device(node))
        if norm == "inf":
            v = float(f(ones).max()) if numel(node.out_shape) else 0.0
            return v * (1 + _MARGIN), how
    zeros = torch.zeros(1, *in_shape, dtype=torch.float64, device=_device(node))
    out, vjp = torch.func.vjp(f, zeros)[:2]
    (col,) = vjp(torch.ones_like(out))
    v = float(col.max()) if col.numel() else 0.0
    return v * (1 + _MARGIN), how


# ---- registration -------------------------------------------------------------------------
def _linear_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    try:
        return linear_constant(node, ctx)
    except NormUnavailable as exc:
        raise UnsupportedModelError(
            [UnsupportedNode(node.qualname, node.op, str(exc))]
        ) from exc


def _single_input(node: Node) -> str | None:
    if node.call.key is F.batch_norm:
        training = arg(node, 5, "training", False)
        if training is not False or is_tensor_arg(arg(node, 3, "running_mean")):
            return "batch_norm in training mode normalises with batch statistics"
    if len(node.inputs) >= 2:
        return (
            "a linear op whose weights also depend on the input (e.g. attention scores "
            "q @ k^T, x @ x) is a product of inputs: no global Lipschitz constant"
        )
    return None


def _bn_check(node: Node) -> str | None:
    m = node.module
    if isinstance(m, _BN) and m.running_mean is None:
        return (
            "BatchNorm with track_running_stats=False normalises with batch statistics even "
            "in eval mode (not a fixed function of one sample)"
        )
    return None


LINEAR_MODULES: list[Any] = [
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, *_POOL, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    FoldedBatchNorm, ChannelAffine,
]
LINEAR_FUNCTIONS: list[Any] = [
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.interpolate, F.upsample,
    F.upsample_nearest, F.upsample_bilinear, F.batch_norm,
    torch.matmul, operator.matmul, "matmul", torch.mm, "mm",
    torch.bmm, "bmm", torch.mv, "mv", torch.einsum, torch.tensordot, MERGED_KEY,
]
declare(LINEAR_MODULES, name="linear", kind="linear", constant=_linear_rule)
declare(LINEAR_FUNCTIONS, name="linear (functional)", kind="affine", constant=_linear_rule,
        check=_single_input)
declare([*_MEAN_KEYS, *_SUM_KEYS], name="sum/mean", kind="affine", constant=_reduction_rule,
        check=_single_input)
declare([EvalBatchNorm], name="batchnorm (eval)", kind="linear", constant=_linear_rule)
