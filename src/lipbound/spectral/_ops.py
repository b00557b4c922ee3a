"""Wrapping a linear/affine callable as an operator ``A`` with forward and adjoint products.

Given an ``op`` (``nn.Module`` or plain function) acting on a batch ``(B, *input_shape)``, the
linear part is ``A x = op(x) - op(0)``. Forward products are plain calls; adjoint products
``A^T y`` are vector-Jacobian products (``torch.func.vjp`` of ``A`` at ``0``, reused for every
``y``): no explicit matrix is ever formed.

Modules are called through ``torch.func.functional_call`` with *detached copies* of their
parameters and buffers (cast to the working dtype), so the user's parameters keep their
``requires_grad`` and their ``.grad`` is never touched. Plain functions are called as they are;
a VJP w.r.t. the input only does not accumulate into any ``.grad`` either.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import (
    InvalidArgumentError,
    NonFiniteError,
    NonLinearOperatorError,
    ShapeError,
)

__all__ = ["Operator", "cast_detached", "make_operator", "module_call", "op_device",
           "shared_casts"]

# coefficients of the superposition check (arbitrary, not "nice" numbers)
_ALPHA, _BETA = 0.7316, -1.2409


def op_device(op: Any) -> torch.device:
    """Device of the first parameter/buffer of ``op`` (CPU for functions / empty modules)."""
    if isinstance(op, nn.Module):
        for t in list(op.parameters()) + list(op.buffers()):
            return t.device
    return torch.device("cpu")


# stack of active cast caches (see shared_casts): key (id, data_ptr, version, dtype)
_CASTS: list[dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]]] = []


@contextlib.contextmanager
def shared_casts() -> Iterator[None]:
    """Within this block, :func:`module_call` and :func:`lipbound.graph.capture.call_module_as`
    cast each parameter / buffer to a dtype once (:func:`cast_detached`).

    One node's certificate reads its layer several times (linearity check, structural and
    dense certificates, estimate); a ``Linear(25088, 4096)`` cast to float64 is 800 MB, and
    its four casts took longer than its certificate. The cache lives only for the block (a
    cast is keyed by the tensor's identity, storage and in-place version counter, so a tensor
    changed inside the block is cast again) and is dropped at its end.
    """
    _CASTS.append({})
    try:
        yield
    finally:
        _CASTS.pop()


def output_shape(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``module``'s output shape (without the batch) on ``(1, *in_shape)`` inputs, from a
    forward pass on the meta device (no arithmetic, no cast); in the module's own dtype
    where an op has no meta kernel."""
    dev, dt = torch.device("cpu"), torch.get_default_dtype()
    for t in list(module.parameters()) + list(module.buffers()):
        dev, dt = t.device, (t.dtype if t.is_floating_point() else dt)
        break
    try:
        state = {name: t.detach().to("meta")
                 for name, t in list(module.named_parameters()) + list(module.named_buffers())}
        with torch.no_grad():
            y = torch.func.functional_call(module, state, (torch.zeros((1, *in_shape),
                                                                      dtype=dt, device="meta"),),
                                           strict=False)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        with torch.no_grad():
            y = module_call(module, dt)(torch.zeros((1, *in_shape), dtype=dt, device=dev))
    return tuple(y.shape[1:])


def cast_detached(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``p`` detached, in ``dtype`` when it is a floating tensor of another dtype; inside
    :func:`shared_casts` each parameter / buffer is cast once (keyed by the tensor's identity,
    storage and in-place version counter)."""
    t = p.detach()
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    cache = _CASTS[-1] if _CASTS else None
    if cache is None:
        return t.to(dtype)
    key = (id(p), p.data_ptr(), p._version, dtype)  # the module's own tensor, not a view
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = (p, t.to(dtype))  # p kept alive: its id is not reused
    return hit[1]


def module_call(module: nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> module(x)`` with detached parameters/buffers cast to ``dtype``.

    The module itself is left untouched (no cast, no ``.grad``, no ``requires_grad`` change).
    """
    state = {name: cast_detached(p, dtype)
             for name, p in list(module.named_parameters()) + list(module.named_buffers())}

    def call(x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, state, (x,), strict=False)

    return call


def _training_nonlinear(op: Any) -> str | None:
    """Name the first sub-module whose training mode makes the op non-linear per sample."""
    if not isinstance(op, nn.Module):
        return None
    for name, m in op.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return f"{name or type(op).__name__} ({type(m).__name__} in training mode)"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name or type(op).__name__} ({type(m).__name__} in training mode)"
    return None


class Operator:
    """The linear part ``A x = op(x) - op(0)`` of an affine ``op``, with counted products.

    ``matvec(x)`` maps ``(B, *in_shape) -> (B, *out_shape)``; ``rmatvec(y)`` the adjoint.
    ``count`` counts single-vector products (a batch of ``B`` counts ``B``), forward and adjoint
    separately.

    ``scale`` is a power of two (exact in binary floating point, so it changes no rounding)
    chosen by :func:`make_operator` so that ``scale * ||A||`` is of order 1: the products are
    those of ``scale * A`` (``matvec``: ``scale (op(x) - op(0))``, ``rmatvec``: its VJP
    ``scale A^T y``), and a norm computed from them is divided by ``scale``. Without it, the
    Gram products ``A^T A v`` of a layer with weights ~1e30 overflow float32 (1e60) and those of
    weights ~1e-150 underflow float64. ``zero`` is True when ``A`` vanished on the random probe
    inputs in float64 (the zero map, to rounding): its norm estimate is 0.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        bias: torch.Tensor,
        *,
        dtype: torch.dtype,
        device: torch.device,
        source: Any,
    ) -> None:
        self.fn = fn
        self.in_shape = in_shape
        self.out_shape = out_shape
        self.bias = bias
        self.dtype = dtype
        self.device = device
        self.source = source
        self.n_in = math.prod(in_shape)
        self.n_out = math.prod(out_shape)
        self.count = 0
        self.scale = 1.0
        self.zero = False
        self._vjps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def lin(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x) - self.bias
        return y if self.scale == 1.0 else y * self.scale

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for a batch ``x`` of shape ``(B, *in_shape)``."""
        self.count += x.shape[0]
        with torch.no_grad():
            return self.lin(x)

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` for a batch ``y`` of shape ``(B, *out_shape)`` (a vector-Jacobian product)."""
        b = y.shape[0]
        self.count += b
        graph = self._vjps.get(b)
        if graph is None:
            x0 = torch.zeros((b, *self.in_shape), dtype=self.dtype, device=self.device)
            x0.requires_grad_(True)
            with torch.enable_grad():
                graph = (x0, self.lin(x0))
            self._vjps[b] = graph
        x0, out0 = graph
        (g,) = torch.autograd.grad(out0, x0, y, retain_graph=True)
        return g.detach()

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """``A^T A x`` (one forward and one adjoint product per vector)."""
        return self.rmatvec(self.matvec(x))

    def randn(self, k: int, gen: torch.Generator) -> torch.Tensor:
        """``k`` standard normal input-shaped vectors (drawn on CPU for reproducibility)."""
        z = torch.randn((k, *self.in_shape), generator=gen, dtype=torch.float64)
        return z.to(device=self.device, dtype=self.dtype)

    def adjoint(self) -> Operator:
        """``A^T`` as an operator: the same two products with their roles swapped.

        Its ``matvec`` is this operator's ``rmatvec`` and vice versa, so every product is
        still counted in ``self.count``. ``A A^T`` and ``A^T A`` have the same non-zero
        eigenvalues, and an iteration on the smaller of the two spaces moves shorter vectors.
        """
        return _Adjoint(self)


class _Adjoint(Operator):
    """The adjoint of an :class:`Operator` (see :meth:`Operator.adjoint`).

    It holds no function, bias or VJP graph of its own (``Operator.__init__`` is not called):
    its products are the base's, and ``count`` reads and writes the base's counter, so
    ``A.adjoint().count == A.count`` always.
    """

    def __init__(self, base: Operator) -> None:
        self.base = base
        self.in_shape, self.out_shape = base.out_shape, base.in_shape
        self.n_in, self.n_out = base.n_out, base.n_in
        self.dtype, self.device, self.source = base.dtype, base.device, base.source
        self.scale, self.zero = base.scale, base.zero

    @property
    def count(self) -> int:
        return self.base.count

    @count.setter
    def count(self, value: int) -> None:
        self.base.count = value

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.rmatvec(x)

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        return self.base.matvec(y)

    def adjoint(self) -> Operator:
        return self.base


def _call(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    try:
        out = fn(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise ShapeError(
            f"op cannot be applied to a batch of shape {tuple(x.shape)} built from "
            f"input_shape={shape}: {type(e).__name__}: {e}. "
            "Give input_shape as the shape of ONE sample without the batch dimension "
            "(e.g. (3, 32, 32) for a Conv2d with 3 input channels)."
        ) from e
    if not isinstance(out, torch.Tensor):
        raise InvalidArgumentError(
            f"op must return a tensor; got {type(out).__name__}. Wrap it so that it maps a "
            "batch (B, *input_shape) to a batch (B, *output_shape)."
        )
    if out.dim() == 0 or out.shape[0] != x.shape[0]:
        raise ShapeError(
            f"op maps a batch of {x.shape[0]} inputs of shape {shape} to a tensor of shape "
            f"{tuple(out.shape)}; the first (batch) dimension must be kept. Check input_shape "
            "(one sample, without the batch dimension)."
        )
    if not out.is_floating_point():
        raise InvalidArgumentError(f"op must return a floating-point tensor; got {out.dtype}")
    return out


def _can_widen(op: Any, dtype: torch.dtype) -> bool:
    """Whether ``op`` can be re-evaluated in float64 (a module working in a narrower dtype)."""
    return isinstance(op, nn.Module) and dtype != torch.float64 and dtype.is_floating_point


def _tol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


def make_operator(
    op: Any,
    input_shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    check_linear: bool = True,
    seed: int = 0,
) -> Operator:
    """Validate ``op`` on ``input_shape`` and wrap its linear part.

    Raises :class:`ShapeError` (op fails on the shape or drops the batch dim),
    :class:`NonFiniteError` (NaN/inf weights or outputs) and :class:`NonLinearOperatorError`
    (superposition check fails, or a training-mode BatchNorm/Dropout).

    A module whose float32 (or lower) evaluation overflows on the probe inputs, or vanishes
    on them to rounding, is re-wrapped in float64 (its parameters are cast, finite float32
    values are exact in float64). The returned operator is scaled by a power of two to norm
    ~1 (:attr:`Operator.scale`); one that is zero on the probe inputs in float64 (or for a
    plain function) is returned with ``zero = True`` (norm estimate 0, a valid estimate from
    below; the certificates, computed separately from the weights, bound the true norm).
    """
    _check_op(op)
    device = op_device(op)
    fn: Callable[[torch.Tensor], torch.Tensor]
    if isinstance(op, nn.Module):
        fn = module_call(op, dtype)
    else:
        fn = op
    dtype, bias = _bias(op, fn, input_shape, dtype, device)
    out_shape = tuple(bias.shape[1:])
    if not bool(torch.isfinite(bias).all()):
        _widen_or_raise(
            op, dtype,
            "op(0) contains NaN or inf: the op's weights or bias are not finite. "
            "Check the weights you loaded.",
        )
        return _widened(op, input_shape, check_linear, seed)
    A = Operator(fn, input_shape, out_shape, bias, dtype=dtype, device=device, source=op)
    if len(out_shape) == 0 or A.n_out == 0:
        raise ShapeError(f"op maps input_shape={input_shape} to an empty output {out_shape}")

    with torch.no_grad():
        probe = _probe(A, seed)
        if probe is None:  # not finite on the probe inputs, in a dtype that can be widened
            return _widened(op, input_shape, check_linear, seed)
    eps = torch.finfo(dtype).eps
    if max(probe.n1, probe.n2) <= 64 * eps * probe.nb:
        if _can_widen(op, dtype):
            return _widened(op, input_shape, check_linear, seed)
        A.zero = True
        return A
    A.scale = _power_of_two_scale(probe)
    if check_linear:
        _check_per_sample(A, probe)
        _check_superposition(probe, dtype)
    return A


def _check_op(op: Any) -> None:
    """Refuse a non-callable ``op``, a module with non-finite weights, and one whose training
    mode (BatchNorm, Dropout) makes it non-linear per sample."""
    if not callable(op):
        raise InvalidArgumentError(
            f"op must be a callable (an nn.Module or a function on a batched tensor); got "
            f"{type(op).__name__}"
        )
    if isinstance(op, nn.Module):
        from .._validation import check_finite_module

        check_finite_module(op, name="op")
        bad = _training_nonlinear(op)
        if bad is not None:
            raise NonLinearOperatorError(
                f"op is not a fixed linear map: {bad} uses batch statistics or randomness. "
                "Call op.eval() first."
            )


def _bias(
    op: Any,
    fn: Callable[[torch.Tensor], torch.Tensor],
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.dtype, torch.Tensor]:
    """``(dtype, op(0))``: the working dtype (``dtype``, or the one the op computes in) and the
    op's (detached) output at ``0`` in it."""
    zero = torch.zeros((1, *input_shape), dtype=dtype, device=device)
    try:
        bias = _call(fn, zero, input_shape)
    except ShapeError:
        if dtype == torch.float32 or isinstance(op, nn.Module):
            raise
        # a plain function with float32 internals: fall back to float32
        dtype = torch.float32
        zero = zero.to(dtype)
        bias = _call(fn, zero, input_shape)
    bias = bias.detach()
    if bias.dtype != dtype:
        # the op computes in its own dtype (e.g. a function casting to float32): follow it
        dtype = bias.dtype
        bias = _call(fn, torch.zeros((1, *input_shape), dtype=dtype, device=device), input_shape)
        bias = bias.detach()
        if bias.dtype != dtype:
            raise InvalidArgumentError(
                f"op returned {bias.dtype} for a {dtype} input; it must compute in one dtype"
            )
    return dtype, bias


def _widen_or_raise(op: Any, dtype: torch.dtype, message: str) -> None:
    """Return when ``op`` can be re-evaluated in float64 (see :func:`_can_widen`), else raise
    :class:`NonFiniteError` with ``message``."""
    if not _can_widen(op, dtype):
        raise NonFiniteError(message)


def _widened(op: Any, input_shape: tuple[int, ...], check_linear: bool, seed: int) -> Operator:
    """:func:`make_operator` of ``op`` re-evaluated in float64."""
    return make_operator(op, input_shape, dtype=torch.float64, check_linear=check_linear,
                         seed=seed)


@dataclass(frozen=True)
class _Probe:
    """The probe of :func:`make_operator`: two random inputs ``x``, the outputs ``out`` on
    ``x[0], x[1], a x[0] + b x[1]``, their linear parts ``ax = out - op(0)`` in float64, and
    the norms ``nb = ||op(0)||``, ``n1, n2 = ||A x[0]||, ||A x[1]||``."""

    x: torch.Tensor
    out: torch.Tensor
    ax: torch.Tensor
    nb: float
    n1: float
    n2: float


def _probe(A: Operator, seed: int) -> _Probe | None:
    """Evaluate ``A``'s op on the probe inputs (called under ``torch.no_grad``); ``None`` when
    an output is not finite and the op can be re-evaluated in float64 (else
    :class:`NonFiniteError`); :class:`ShapeError` when the output shape follows the batch."""
    input_shape, dtype, bias = A.in_shape, A.dtype, A.bias
    gen = torch.Generator().manual_seed(seed + 7919)
    # the check's inputs are drawn in the working dtype (half the cost of A.randn's float64
    # draw for float32; they only feed the checks, never an estimate)
    draw = torch.float32 if dtype == torch.float32 else torch.float64
    x = torch.randn((2, *input_shape), generator=gen, dtype=draw).to(device=A.device, dtype=dtype)
    xy = torch.cat([x, (_ALPHA * x[0] + _BETA * x[1]).unsqueeze(0)])
    out = _call(A.fn, xy, input_shape)
    if out.shape[1:] != bias.shape[1:]:
        raise ShapeError(
            f"op's output shape depends on the batch size ({tuple(out.shape)} vs "
            f"{tuple(bias.shape)}); it must map (B, *input_shape) to (B, *output_shape)"
        )
    if not bool(torch.isfinite(out).all()):
        _widen_or_raise(
            A.source, dtype,
            "op returned NaN or inf on random inputs: its weights are not finite or it "
            "overflows. Check the weights.",
        )
        return None
    ax = (out - bias).reshape(3, -1).to(torch.float64)
    nb = float(bias.to(torch.float64).norm())
    n1, n2 = _scaled_norm(ax[0]), _scaled_norm(ax[1])
    return _Probe(x, out, ax, nb, n1, n2)


def _scaled_norm(t: torch.Tensor) -> float:
    """``||t||_2`` of a finite float64 vector without overflow (it may still be inf when the
    norm itself exceeds the float64 range): ``m ||t / m||`` with ``m = max |t|``. A plain
    ``norm`` of entries near 1e155 overflows in its sum of squares, which left the probe's gain
    infinite, the operator unscaled and Lanczos's Gram products overflowing."""
    m = float(t.abs().max()) if t.numel() else 0.0
    if m == 0.0 or not math.isfinite(m):
        return m
    return m * float((t / m).norm())


def _power_of_two_scale(p: _Probe) -> float:
    """A power of two bringing the probe's gain ``||A x|| / ||x||`` to ``[1/2, 2)`` when it is
    outside ``[2^-16, 2^16]`` (exact scaling), else 1."""
    xn = float(p.x.to(torch.float64).reshape(2, -1).norm(dim=1).min())
    gain = max(p.n1, p.n2) / xn if xn > 0 else 1.0
    if math.isfinite(gain) and gain > 0 and not 2.0**-16 <= gain <= 2.0**16:
        return math.ldexp(1.0, max(-1000, min(1000, -round(math.log2(gain)))))
    return 1.0


def _check_per_sample(A: Operator, p: _Probe) -> None:
    """Per-sample: the op must not mix the samples of a batch (its output on ``x[0]`` alone
    is its output on ``x[0]`` in the probe's batch)."""
    with torch.no_grad():
        single = _call(A.fn, p.x[:1], A.in_shape)
    d = float((single - p.out[:1]).to(torch.float64).norm())
    if not d <= _tol(A.dtype) * (float(single.to(torch.float64).norm()) + p.nb + 1e-300):
        raise NonLinearOperatorError(
            "op mixes the samples of a batch (its output for a sample depends on the other "
            "samples): it is not a per-sample linear map. Call op.eval() (BatchNorm) or "
            "make it act on each sample independently."
        )


def _check_superposition(p: _Probe, dtype: torch.dtype) -> None:
    """The superposition check ``A (a x + b y) = a A x + b A y`` on the probe."""
    lhs = p.ax[2]
    rhs = _ALPHA * p.ax[0] + _BETA * p.ax[1]
    scale = float(lhs.norm()) + abs(_ALPHA) * p.n1 + abs(_BETA) * p.n2 + 4 * p.nb
    err = float((lhs - rhs).norm())
    if not err <= _tol(dtype) * scale:
        raise NonLinearOperatorError(
            f"op is not affine: the superposition check op(a x + b y) - op(0) = "
            f"a (op(x) - op(0)) + b (op(y) - op(0)) fails with relative error "
            f"{err / max(scale, 1e-300):.3g} (tolerance {_tol(dtype):g}). spectral_norm "
            "needs a linear or affine op (Linear, Conv, AvgPool, eval BatchNorm...); for a "
            "network with activations use lipbound.autolip / lipbound.lower_bound."
        )
