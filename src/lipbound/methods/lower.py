r"""Witnessed lower bounds on the Lipschitz constant: pair ascent, Jacobian norms, annealing.

Every number returned here is a TRUE lower bound on

.. math:: L(f) = \sup_{x \ne y} \frac{\|f(x) - f(y)\|_p}{\|x - y\|_p},

backed by a witness that reproduces it (up to float64 rounding):

* a **pair witness** ``(x, y)``: ``value = ||f(x) - f(y)||_p / ||x - y||_p``, which is ``<= L(f)``
  by the very definition of ``L(f)``, with no condition on ``f``;
* a **Jacobian witness** ``(x, v)`` (``y`` is ``None``, ``v`` is ``result.witness.direction``):
  ``value = ||J_f(x) v||_p / ||v||_p <= ||J_f(x)||_{p->p} <= L(f)`` wherever ``f`` is
  differentiable at ``x`` (``f(x + t v) - f(x) = t J v + o(t)``; for ReLU networks that is every
  point off a null set of kinks, and the search points are continuous random perturbations).
  For ``p = 2``, ``v`` is the last iterate of the power method on ``J^T J`` (jvp/vjp from
  :mod:`torch.func`): every iterate gives a value ``<= ||J||_2``, converging from below.
  A derivative computed in floating point can be pure rounding (``h / h`` has derivative 0,
  its computed one is ``1/h - h/h^2``, about ``1e-16 / h``), so a Jacobian value is returned
  only if a secant pair along ``v`` reproduces it to ``1e-3``; else that pair is the witness.

The search (all of it batched over ``batch_size`` chains, seeded by ``seed``; ``time_limit`` is
ONE budget for all of it, split over the stages, the clock checked inside every loop):

``"data"``
    the paper's *data* bound: ``max_i ||J_f(x_i)||`` over the given data points.
``"sample"``
    Jacobian norms at many random points ``s N(0, I)`` (scales as for the random starts below;
    exact norms from the full Jacobian, so only for outputs of at most 64 entries); the best
    points start the pair ascent.
``"pairs"``
    multi-start gradient ascent on the pair ratio
    ``r(x, u) = ||f(x + d u/2) - f(x - d u/2)|| / d`` (``||u|| = 1``) with a distance ``d``
    shrinking geometrically from ``s`` to ``1e-3 s`` (``s`` the chain's scale). For ReLU
    networks the Jacobian
    norm is piecewise constant (zero gradient), but the ratio of a pair that straddles regions
    averages the Jacobian along the segment, so its gradient in ``x`` points to regions of
    larger slope; as ``d`` shrinks the pair settles in one region and ``u`` turns to its top
    singular direction. Starts: with data, the data points of largest Jacobian norm; then
    the best sampled points; then random ``s N(0, I)`` with chain scales ``s`` spread
    log-uniformly over
    ``[scale / 10, 100 scale]`` (a quarter at ``scale``), since ReLU regions of large slope can
    lie far from the origin.
``"annealing"`` (opt-in)
    the paper's simulated annealing over ``x`` on the energy ``||J_f(x)||`` (Gaussian proposals
    of shrinking size, Metropolis acceptance at a decreasing temperature).

When an op lacks a derivative a stage needs (no double backward: ``J v`` then comes from
forward-mode AD, else a finite difference that is only a search direction), the Jacobian
witnesses become pair witnesses and a failing stage is dropped with a note: what the other
stages found is kept. When no gradient reaches the input at all (``x.detach()`` in forward:
autograd sees a constant, the function is not), the pair ascent goes on derivative-free: it
starts along the top direction of a central-difference Jacobian (inputs of at most 1024
entries) and keeps random proposals that raise each chain's pair ratio.

Every point the search visits that beats the current best is finally re-evaluated in float64
(a float64 copy of the model when it can be cast) on a batch of ONE sample, so batch effects
(e.g. train-mode BatchNorm) cannot inflate the value; the best witness is returned.

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
>>> res = lower_bound(net, (2,), restarts=4, steps=30)
>>> res.certified and res.value > 0
True
>>> x, y = res.witness.x.double(), res.witness.y
>>> y is None or abs(
...     float((net.double()(x[None]) - net.double()(y[None])).norm() / (x - y).norm())
...     - res.value) < 1e-6 * res.value
True
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._progress import ProgressArg, make_progress
from .._validation import (
    check_choice,
    check_norm,
    check_positive,
)
from ..analysis import Analysis, analysis_of
from ..errors import InvalidArgumentError, LipboundError, NonFiniteError, ShapeError
from ..results import LowerBoundResult, Witness
from ._pairs import StepClock

__all__ = [
    "DEFAULT_METHODS", "LOWER_METHODS", "lower_bound", "pair_ratio", "jacobian_ratio",
    "probe_widening",
]

LOWER_METHODS: tuple[str, ...] = ("data", "sample", "pairs", "annealing")
#: the searches run by default: annealing is opt-in (on the digits MLPs of
#: ``benchmarks/lower_strength.py`` it never won and cost half the time)
DEFAULT_METHODS: tuple[str, ...] = ("data", "sample", "pairs")

_Fn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _pnorm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row p-norm of a (B, n) tensor.

    l2 is computed on the row scaled by a power of two (exact) so that its largest entry is in
    ``[1/2, 1)``: torch's plain ``norm`` squares the entries and underflows to 0 for rows of
    about ``1e-160`` in float64 (``1e-20`` in float32), which made witnesses of small-weight
    models worth 0.
    """
    if norm == "2":
        a = t.abs().amax(dim=1, keepdim=True)
        e = torch.frexp(a)[1].clamp(-1000, 1000)  # a < 2^e; 2^-e stays finite
        s = torch.ldexp(torch.ones_like(a), -e)
        return (t * s).norm(dim=1) / s[:, 0]
    if norm == "1":
        return t.abs().sum(dim=1)
    return t.abs().amax(dim=1)


def _model_ref(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _batched(model: nn.Module, shape: tuple[int, ...]) -> _Fn:
    """``(B, n) -> (B, m)``: reshape to the input shape, call, flatten the output."""

    def f(z: torch.Tensor) -> torch.Tensor:
        # a copy: a model that writes its input in place must not change the witness points
        out = model(z.reshape(z.shape[0], *shape).clone())
        if not isinstance(out, torch.Tensor):
            raise InvalidArgumentError(
                f"the model must return one tensor; it returned {type(out).__name__}"
            )
        return out.reshape(out.shape[0], -1)

    return f


def _probe(
    model: nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> int:
    """Run the model on a zero sample; return the output size or raise ShapeError."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape, device=device, dtype=dtype))
    except LipboundError:
        raise
    except Exception as e:  # any failure here means the shape does not fit the model
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShapeError(
            f"the model cannot be applied to an input of shape {shape} (one sample, batch "
            f"dimension excluded): {msg}"
        ) from e
    if not isinstance(out, torch.Tensor):
        raise InvalidArgumentError(
            f"the model must return one tensor; it returned {type(out).__name__}"
        )
    if out.ndim == 0:
        raise ShapeError(
            "the model returns a 0-d tensor for a batch of one sample; it must keep the batch "
            "dimension (e.g. use .squeeze(-1) rather than .squeeze())"
        )
    if out.shape[0] != 1:
        raise ShapeError(
            f"the model's output for a batch of one sample of shape {shape} has batch size "
            f"{out.shape[0]}; input_shape must exclude the batch dimension"
        )
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(
            f"the model's output at x = 0 is NaN or infinite in {str(dtype).removeprefix('torch.')}"
            " (its weights are finite: the forward pass overflows). Rescale the weights, or "
            "check the weights you loaded."
        )
    return int(out[0].numel())


def probe_widening(
    model: nn.Module, shape: tuple[int, ...]
) -> tuple[nn.Module, torch.device, torch.dtype, int, str | None]:
    """:func:`_probe` in the model's dtype, or on a float64 copy when that overflows.

    Finite float32 weights are exact in float64, so the copy computes the same function
    without the overflow (weights ~1e30 squared overflow float32 in a two-layer net). Returns
    ``(model, device, dtype, output size, note)``; the note says when the copy is used. Raises
    :class:`NonFiniteError` when even float64 overflows.
    """
    device, dtype = _model_ref(model)
    try:
        return model, device, dtype, _probe(model, shape, device, dtype), None
    except NonFiniteError:
        if dtype == torch.float64:
            raise
    try:
        with warnings.catch_warnings():  # deepcopy of exported graphs warns in torch
            warnings.simplefilter("ignore")
            m64 = copy.deepcopy(model).to(torch.float64)
    except Exception as e:
        raise NonFiniteError(
            f"the model's output at x = 0 overflows {dtype} and the model cannot be copied to "
            f"float64 ({type(e).__name__}: {e}); rescale its weights"
        ) from e
    m = _probe(m64, shape, device, torch.float64)
    note = (f"the model overflows {str(dtype).removeprefix('torch.')} at x = 0: the search ran "
            "on a float64 copy")
    return m64, device, torch.float64, m, note


def _as_data(
    data: Any, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    try:
        t = torch.as_tensor(data)
    except Exception as e:
        raise InvalidArgumentError(
            f"data must be a tensor or array; got {type(data).__name__}"
        ) from e
    if not t.is_floating_point():
        t = t.to(dtype)
    if tuple(t.shape) == shape:
        t = t.unsqueeze(0)
    if tuple(t.shape[1:]) != shape or t.shape[0] == 0:
        raise ShapeError(
            f"data must have shape (N, *input_shape) = (N, {', '.join(map(str, shape))}); "
            f"got {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError("data contains NaN or infinite values")
    return t.to(device=device, dtype=dtype).reshape(t.shape[0], -1)


# --------------------------------------------------------------------------------------------
# Jacobian products
# --------------------------------------------------------------------------------------------
class _JacAt:
    """Per-sample Jacobian products at a fixed batch ``x`` sharing one forward pass.

    ``jtu(u) = J^T u`` by one backward pass (samples assumed independent, as in eval mode);
    ``jv(v) = J v`` by the double-backward trick (``J v = d/dw <J^T w, v>``), else by
    forward-mode AD (both exact up to rounding), else, for ops with neither (e.g.
    ``scaled_dot_product_attention`` on CPU has no double backward), by a central difference:
    then ``fd_used`` is set, and the value is only a search direction, never a witness (the
    checker turns such a witness into a pair, whose ratio needs no derivative at all).
    """

    def __init__(self, f: _Fn, x: torch.Tensor) -> None:
        self.f = f
        self.g: torch.Tensor | None = None
        self.fd_used = False
        self.forward_ad = True
        with torch.enable_grad():
            self.x = x.detach().requires_grad_(True)
            self.out = f(self.x)
            self.const = not self.out.requires_grad  # the output does not depend on x
            self.w = torch.zeros_like(self.out, requires_grad=True)
            if not self.const:
                try:
                    (self.g,) = torch.autograd.grad(self.out, self.x, self.w, create_graph=True)
                except RuntimeError:  # an op without a differentiable backward
                    self.g = None

    def jv(self, v: torch.Tensor) -> torch.Tensor:
        if self.const:
            return torch.zeros_like(self.out)
        if self.g is not None:
            try:
                with torch.enable_grad():
                    (r,) = torch.autograd.grad(self.g, self.w, v, retain_graph=True,
                                               allow_unused=True)
                if r is not None:
                    return r.detach()
                # J^T w does not depend on w in the graph: a once-differentiable backward
                # (J itself need not be 0), so the trick is unavailable for this op
                self.g = None
            except RuntimeError:  # double backward missing for some op (e.g. attention)
                self.g = None
        return self._jv_fallback(v)

    def _jv_fallback(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` by forward-mode AD, else by a central difference (see the class)."""
        x = self.x.detach()
        if self.forward_ad:
            try:
                with torch.autograd.forward_ad.dual_level():
                    out = self.f(torch.autograd.forward_ad.make_dual(x, v))
                    t = torch.autograd.forward_ad.unpack_dual(out).tangent
                if t is not None:
                    return t.detach()
            except (RuntimeError, NotImplementedError):
                self.forward_ad = False
        self.fd_used = True
        with torch.no_grad():
            h = _fd_step(x, v)
            return (self.f(x + h * v) - self.f(x - h * v)) / (2 * h)

    def jtu(self, u: torch.Tensor) -> torch.Tensor:
        if self.const:
            return torch.zeros_like(self.x)
        with torch.enable_grad():
            (r,) = torch.autograd.grad(self.out, self.x, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.x) if r is None else r.detach()


def _fd_step(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-row step ``h`` (B, 1) of a central difference along ``v``: ``h ||v||_inf`` is
    ``eps^(1/3) max(1, ||x||_inf)`` (the usual balance of truncation and rounding)."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1.0) * torch.finfo(x.dtype).eps ** (1 / 3)
    return scale / v.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


@torch.no_grad()
def _power(f: _Fn, x: torch.Tensor, v: torch.Tensor, iters: int, tol: float = 0.0,
           deadline: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched power iteration on ``J^T J``: returns ``(sigma, v)`` with ``sigma = ||J v||``.

    Every ``sigma`` is ``||J v|| / ||v|| <= ||J||_2`` (a lower estimate, converging from below);
    it stops early when the next iteration, predicted to cost as much as the slowest one so
    far, would end past ``deadline`` (``time.perf_counter()`` clock), every iterate being
    valid. Products through plain autograd (``torch.func`` imports ``torch._dynamo``: seconds).
    """
    op = _JacAt(f, x)
    v = v / _pnorm(v, "2")[:, None].clamp_min(1e-300)
    sigma = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    clock = StepClock()
    for _ in range(max(iters, 1)):
        clock.start("iteration")
        jv = op.jv(v)
        prev, sigma = sigma, _pnorm(jv, "2")
        if tol > 0 and bool(((sigma - prev).abs() <= tol * sigma).all()):
            break
        w = op.jtu(jv)
        nw = _pnorm(w, "2")[:, None]
        v = torch.where(nw > 0, w / nw.clamp_min(1e-300), v)
        clock.stop("iteration")
        # the last product below costs about half an iteration
        if not clock.fits("iteration", deadline, 1.5):
            break
    # sigma must belong to the returned v: one last product
    return _pnorm(op.jv(v), "2"), v


@torch.no_grad()
def _full_jacobian(f: _Fn, x: torch.Tensor, m: int) -> torch.Tensor:
    """Per-sample Jacobians ``(B, m, n)`` through ``m`` batched vjps (small outputs only; first
    derivatives only, so it works for every op with a backward)."""
    op = _JacAt(f, x)
    rows = []
    for i in range(m):
        e = torch.zeros(x.shape[0], m, dtype=x.dtype, device=x.device)
        e[:, i] = 1
        rows.append(op.jtu(e))
    return torch.stack(rows, dim=1)


_FULL_M = 64  # outputs up to which the full Jacobian (m vjps) is used
_FD_MAX_N = 1024  # inputs up to which a derivative-free ascent starts from a difference Jacobian


def _norm_of_jac(jac: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||J v||_p / ||v||_p, v)`` per sample of ``jac`` (B, m, n) with ``v`` attaining (up to
    rounding) ``||J||_{p->p}``: the top right singular vector for ``2``, ``e_j`` of the largest
    column sum for ``1``, ``sign`` of the largest row for ``inf``. The value is computed from
    ``v`` (``||J v||``), so it is a realised value whatever the accuracy of the SVD."""
    B, n = jac.shape[0], jac.shape[2]
    if norm == "2":
        _, _, vh = torch.linalg.svd(jac, full_matrices=False)
        v = vh[:, 0, :]
        return _pnorm((jac @ v[:, :, None])[:, :, 0], "2") / _pnorm(v, "2").clamp_min(1e-300), v
    if norm == "1":  # ||J||_{1->1} = max column sum, attained at v = e_j
        cols = jac.abs().sum(dim=1)
        j = cols.argmax(dim=1)
        v = torch.nn.functional.one_hot(j, n).to(jac.dtype)
        return cols.gather(1, j[:, None])[:, 0], v
    rows = jac.abs().sum(dim=2)  # ||J||_{inf->inf} = max row sum, attained at v = sign(row)
    i = rows.argmax(dim=1)
    v = torch.sign(jac[torch.arange(B), i])
    v = torch.where(v == 0, torch.ones_like(v), v)
    return rows.gather(1, i[:, None])[:, 0], v


def _jac_norm(
    f: _Fn, x: torch.Tensor, v: torch.Tensor | None, norm: str, m: int, iters: int,
    *, deadline: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value, v)`` per sample with ``value = ||J v||_p / ||v||_p`` (a lower bound on ||J||).

    Up to ``_FULL_M`` outputs: the full Jacobian (``m`` vjps) and its exact norm (SVD for l2);
    beyond (l2 only): the power method from ``v`` (random when ``None``)."""
    if m <= _FULL_M:
        return _norm_of_jac(_full_jacobian(f, x, m), norm)
    if v is None:
        v = torch.randn_like(x)
    return _power(f, x, v, iters, deadline=deadline)


# --------------------------------------------------------------------------------------------
# exact re-evaluation of witnesses (float64, one sample at a time)
# --------------------------------------------------------------------------------------------
class _Checker:
    """Re-evaluates witnesses on a float64 copy of the model (or the model itself if it cannot
    be cast), one sample per call."""

    def __init__(
        self, model: nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
        m: int | None = None,
    ) -> None:
        self.shape = shape
        self.device = device
        self.dtype = dtype
        self.model = model
        self.nonfinite = 0  # witnesses whose ratio overflowed (counted, then skipped)
        try:
            with warnings.catch_warnings():  # deepcopy of exported graphs warns in torch
                warnings.simplefilter("ignore")
                m64 = copy.deepcopy(model).to(torch.float64)
            with torch.no_grad():
                m64(torch.zeros(1, *shape, device=device, dtype=torch.float64))
            self.model, self.dtype = m64, torch.float64
        except Exception:
            pass
        self.f = _batched(self.model, shape)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.f(torch.zeros(1, math.prod(shape), device=device, dtype=self.dtype))
        #: wall seconds of one forward pass of one sample (the unit of the check's costs)
        self.forward_seconds = time.perf_counter() - t0
        self.m = int(out.shape[1]) if m is None else m

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=self.device, dtype=self.dtype).reshape(1, -1)

    def _ratio(self, r: float) -> float:
        if not math.isfinite(r):
            self.nonfinite += 1
            return 0.0
        return r

    @torch.no_grad()
    def pair(self, x: torch.Tensor, y: torch.Tensor, norm: str) -> float:
        x, y = self.cast(x), self.cast(y)
        den = float(_pnorm(x - y, norm)[0])
        if not den > 0:
            return 0.0
        fx, fy = self.f(x), self.f(y)
        if not (bool(torch.isfinite(fx).all()) and bool(torch.isfinite(fy).all())):
            return self._ratio(math.inf)  # f is not a real function there: no witness
        num = float(_pnorm(fx - fy, norm)[0])
        return self._ratio(num / den)

    @torch.no_grad()
    def jac(self, x: torch.Tensor, v: torch.Tensor, norm: str
            ) -> tuple[float, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(||J(x) v|| / ||v||, None)`` computed exactly (full Jacobian by vjps for small
        outputs, else a double-backward or forward-mode jvp); when only a finite difference is
        available, ``(ratio, (a, b))`` with the PAIR ``a, b = x -+ h v`` and its exact ratio."""
        x, v = self.cast(x), self.cast(v)
        den = float(_pnorm(v, norm)[0])
        if not den > 0:
            return 0.0, None
        if not bool(torch.isfinite(self.f(x)).all()):
            # an output is inf / NaN at x (7.5 / hardsigmoid(x) where it is 0): f is not
            # differentiable there and the Jacobian's 0 / 0 entries are no witness
            return self._ratio(math.inf), None
        if self.m <= _FULL_M:
            jac = _full_jacobian(self.f, x, self.m)
            return self._ratio(float(_pnorm((jac @ v[:, :, None])[:, :, 0], norm)[0]) / den), None
        op = _JacAt(self.f, x)
        jv = op.jv(v)
        if not op.fd_used:
            return self._ratio(float(_pnorm(jv, norm)[0]) / den), None
        h = _fd_step(x, v)
        a, b = (x - h * v)[0], (x + h * v)[0]
        return self.pair(a, b, norm), (a, b)

    @torch.no_grad()
    def confirm(self, x: torch.Tensor, v: torch.Tensor, val: float, norm: str,
                more: Callable[[], bool] | None = None,
                ) -> tuple[float, tuple[torch.Tensor, torch.Tensor] | None]:
        """Checks a Jacobian witness's ``val`` against the secants ``x -+ h v`` it predicts.

        A derivative computed in floating point can be pure cancellation: ``h / h`` has the
        true derivative 0, but ``1/h - h/h^2`` rounds to about ``1e-16 / h`` (``1e-10`` next
        to ``h = 1e-6``), while every secant of the computed ``f`` is exactly 0. So a Jacobian
        value is kept only if some secant ratio (a pair witness, true with no condition on
        ``f``) at one of the steps ``h0 * (1e2, 1, 1e-2, 1e-4)`` (``h0`` from
        :func:`_fd_step`) reaches ``(1 - 1e-3) val``; otherwise the witness becomes the best
        such pair and its own ratio is the value. Returns ``(val, None)`` or
        ``(ratio, (a, b))``. ``more()`` (when given) is asked before every secant but the
        first: ``False`` stops there, the value unconfirmed (so demoted to its best pair)."""
        xs, vs = self.cast(x), self.cast(v)
        if not val > 0:
            return val, None
        h0 = _fd_step(xs, vs)
        best: tuple[float, tuple[torch.Tensor, torch.Tensor] | None] = (0.0, None)
        for c in (1e2, 1.0, 1e-2, 1e-4):
            if best[1] is not None and more is not None and not more():
                break
            a, b = (xs - c * h0 * vs)[0], (xs + c * h0 * vs)[0]
            r = self.pair(a, b, norm)
            if r >= (1 - 1e-3) * val:
                return val, None
            if r > best[0] or best[1] is None:
                best = (r, (a, b))
        return best

    @torch.no_grad()
    def polish(self, x: torch.Tensor, v: torch.Tensor, norm: str, iters: int, deadline: float
               ) -> torch.Tensor:
        """A better direction ``v`` at the witness ``x`` in float64: exact (full Jacobian) for
        small outputs, else more power iterations (l2; each iterate is valid)."""
        xs = self.cast(x)
        if self.m <= _FULL_M:
            return _norm_of_jac(_full_jacobian(self.f, xs, self.m), norm)[1][0]
        if norm != "2":
            return v
        return _power(self.f, xs, self.cast(v), iters, tol=1e-10, deadline=deadline)[1][0]


def pair_ratio(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: Any = 2) -> float:
    """``||f(x) - f(y)||_p / ||x - y||_p`` in float64 for ONE pair (no batch dimension).

    >>> from torch import nn
    >>> pair_ratio(nn.Linear(1, 1, bias=False).requires_grad_(False).apply(
    ...     lambda m: m.weight.fill_(3.0) if isinstance(m, nn.Linear) else None),
    ...     torch.tensor([1.0]), torch.tensor([0.0]))
    3.0
    """
    n = check_norm(norm, method="pair_ratio")
    shape = tuple(x.shape)
    device, dtype = _model_ref(model)
    return _Checker(model, shape, device, dtype).pair(x, y, n)


def jacobian_ratio(model: nn.Module, x: torch.Tensor, v: torch.Tensor, *, norm: Any = 2) -> float:
    """``||J_f(x) v||_p / ||v||_p`` in float64 for ONE point (a Jacobian witness's value).

    >>> from torch import nn
    >>> lin = nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
    >>> jacobian_ratio(lin, torch.zeros(2), torch.tensor([3.0, 4.0]))
    5.0
    """
    n = check_norm(norm, method="jacobian_ratio")
    device, dtype = _model_ref(model)
    return _Checker(model, tuple(x.shape), device, dtype).jac(x, v, n)[0]


# --------------------------------------------------------------------------------------------
# the search
# --------------------------------------------------------------------------------------------
@dataclass
class _Cand:
    value: float  # float32/64 search value (before re-evaluation)
    how: str
    x: torch.Tensor
    y: torch.Tensor | None = None
    v: torch.Tensor | None = None


@dataclass(frozen=True)
class _Target:
    """The function searched: ``f`` maps a batch (B, n) of flattened inputs to the flattened
    outputs (B, m), on ``device`` in ``dtype``."""

    f: _Fn
    n: int
    m: int
    device: torch.device
    dtype: torch.dtype


class _Search:
    """The batched searches; every stage runs until its work is done or its own deadline
    (``stage_end``) passes, whichever comes first: the step schedules (pair distance, step
    size, temperature) follow ``max(step / steps, elapsed / stage time)`` so that a stage cut
    short by its budget still completes its schedule."""

    def __init__(
        self,
        target: _Target,
        norm: str,
        gen: torch.Generator,
        deadline: float,
        report: Any,
        *,
        keep: int,
        power_iterations: int,
    ) -> None:
        self.f, self.n, self.m, self.norm = target.f, target.n, target.m, norm
        self.device, self.dtype, self.gen = target.device, target.dtype, gen
        self.deadline, self.report = deadline, report
        self.keep = keep
        self.iters = power_iterations
        self.cands: list[_Cand] = []
        self.best: dict[str, float] = {}
        self.evaluations = 0
        self.timed_out = False  # the whole search's time is up
        self.cut = False  # some stage stopped before its work was done (its time share)
        self.stage = "search"
        self.stage_end = deadline
        self.stage_start = time.perf_counter()
        self.clock = StepClock()  # the measured cost of a step of each stage
        self._last: float | None = None  # when the current stage's last step started
        self._guess = 0.0  # predicted cost of the current stage's first step
        # Jacobian norms are cheap only for l2 (power method) or a small output (full J)
        self.jac_ok = norm == "2" or self.m <= _FULL_M

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=self.dtype).to(self.device)

    def begin(self, stage: str, end: float, guess: float = 0.0) -> None:
        """Start ``stage``, to end by ``end``; ``guess``: the predicted cost of its first step
        (later steps are predicted from the measured ones)."""
        self.stage, self._guess = stage, guess
        self.window(end)
        self.report(stage, 0.0)

    def window(self, end: float) -> None:
        """The current stage's steps run from now until ``end``."""
        self.stage_start, self.stage_end, self._last = time.perf_counter(), end, None

    def frac(self, done: float) -> float:
        """The schedule position: the larger of the work done and the stage time spent."""
        now = time.perf_counter()
        span = self.stage_end - self.stage_start
        tf = (now - self.stage_start) / span if span > 0 and math.isfinite(span) else 0.0
        f = min(max(done, tf), 1.0)
        if tf >= 1.0 > done:
            self.cut = True  # the stage's time share ended its work early
        self.report(self.stage, f)
        return f

    def out_of_time(self) -> bool:
        """Called before each step of a stage: whether the step should not start (the time
        is up, or the step, predicted to cost as much as the slowest of the stage's last
        measured steps (:class:`StepClock`; the first one as the stage's ``guess``: VGG-16-BN
        at 224 started a 21 s step of 8 pair chains 2.5 s before its stage's end, 29.6 s for
        a 15 s limit), would end past the stage's end)."""
        now = time.perf_counter()
        if self._last is not None:  # the previous step of this stage ended now
            self.clock.record(self.stage, now - self._last)
        self._last = now
        if now > self.deadline:
            self.timed_out = True
        if self.timed_out or now + self.clock.predict(self.stage, self._guess) > self.stage_end:
            self.cut = True
            return True
        return False

    def add(self, vals: torch.Tensor, how: str, x: torch.Tensor, y: torch.Tensor | None = None,
            v: torch.Tensor | None = None) -> None:
        vals = torch.nan_to_num(vals.detach(), nan=0.0, posinf=0.0)
        k = min(self.keep, vals.shape[0])
        top = torch.topk(vals, k).indices
        for i in top.tolist():
            self.cands.append(
                _Cand(
                    float(vals[i]), how, x[i].detach().clone(),
                    None if y is None else y[i].detach().clone(),
                    None if v is None else v[i].detach().clone(),
                )
            )
        self.cands.sort(key=lambda c: -c.value)
        # the best overall, plus the best of every search (its per_method column)
        kept, seen = self.cands[: 4 * self.keep], {c.how for c in self.cands[: 4 * self.keep]}
        for c in self.cands[4 * self.keep :]:
            if c.how not in seen:
                kept.append(c)
                seen.add(c.how)
        self.cands = kept
        self.best[how] = max(self.best.get(how, 0.0), float(vals.max()))

    def jac(self, x: torch.Tensor, v: torch.Tensor | None = None, iters: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        self.evaluations += x.shape[0]
        return _jac_norm(self.f, x, v, self.norm, self.m, self.iters if iters is None else iters,
                         deadline=self.stage_end)

    def scales(self, k: int, scale: float) -> torch.Tensor:
        """``k`` chain scales (k, 1): a quarter at ``scale``, the others log-uniform in
        ``[scale / 10, 100 scale]`` (ReLU regions of large slope can lie far from the
        origin)."""
        expo = -1.0 + 3.0 * torch.rand(k, 1, generator=self.gen, dtype=self.dtype).to(self.device)
        sc = scale * torch.pow(10.0, expo)
        sc[: max(1, k // 4)] = scale
        return sc

    # ---- data ------------------------------------------------------------------------------
    def data(self, data: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Jacobian norm at the data points (until the stage's time is up); returns the values
        of those evaluated (their count may be below N)."""
        vals = []
        for i in range(0, data.shape[0], batch_size):
            if self.out_of_time():
                break
            xb = data[i : i + batch_size]
            s, v = self.jac(xb)
            self.add(s, "data", xb, v=v)
            vals.append(s)
            self.frac((i + xb.shape[0]) / data.shape[0])
        return torch.cat(vals) if vals else torch.zeros(0, dtype=self.dtype)

    # ---- sample ----------------------------------------------------------------------------
    def sample(self, total: int, scale: float, batch: int, keep: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobian norms at ``total`` random points ``s N(0, I)`` (scales as :meth:`scales`),
        in batches of ``batch``; returns the ``keep`` best points and their scales (best
        first), the starts of the ascents."""
        bx = torch.zeros(0, self.n, dtype=self.dtype, device=self.device)
        bs = torch.zeros(0, 1, dtype=self.dtype, device=self.device)
        bv = torch.zeros(0, dtype=self.dtype, device=self.device)
        done = 0
        k = min(8, batch)  # first batch small: it measures the cost of one sample
        while done < total and not self.out_of_time():
            k = min(k, total - done)
            t0 = time.perf_counter()
            sc = self.scales(k, scale)
            x = sc * self.randn(k, self.n)
            s, v = self.jac(x)
            self.add(s, "sample", x, v=v)
            s = torch.nan_to_num(s.detach(), nan=0.0, posinf=0.0)
            bx, bs, bv = torch.cat([bx, x]), torch.cat([bs, sc]), torch.cat([bv, s])
            top = torch.topk(bv, min(keep, bv.shape[0])).indices
            bx, bs, bv = bx[top], bs[top], bv[top]
            done += k
            self.frac(done / total)
            # next batch: about a tenth of the stage time left (never over ``batch``)
            per = max(time.perf_counter() - t0, 1e-6) / k
            left = self.stage_end - time.perf_counter()
            k = int(min(batch, max(1, 0.1 * left / per if math.isfinite(left) else batch)))
        return bx, bs

    # ---- pairs -----------------------------------------------------------------------------
    def pairs(self, x0: torch.Tensor, s: torch.Tensor, u0: torch.Tensor, steps: int, lr: float
              ) -> None:
        """Pair ascent; ``s`` (B, 1) is each chain's scale: ``x = s z`` and the distance is
        ``s d`` with ``d`` shrinking from 1 to 1e-3 (``lr`` is relative to ``s``)."""
        z = (x0 / s).clone().requires_grad_(True)
        u = u0.clone()
        u = (u / _pnorm(u, self.norm)[:, None].clamp_min(1e-30)).requires_grad_(True)
        opt = _Adam([z, u])
        d_hi, d_lo = 1.0, 1e-3
        fr = 0.0
        free = False  # no gradient reaches the input (x.detach()): derivative-free ascent
        unkept: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        for t in range(steps):
            if self.out_of_time():
                if unkept is not None:  # cut between two every-10-steps records: keep them
                    self.add(unkept[0], "pairs", unkept[1], y=unkept[2])
                break
            d = d_hi * (d_lo / d_hi) ** fr
            lr_t = lr * (0.05 + 0.95 * (1 - fr))
            if free:
                r, a, b = self._free_step(z, u, s, d, lr_z=lr_t, lr_u=0.05 + 0.45 * (1 - fr))
            else:
                r, a, b = self._ratio(z, u, s, d)
                if not r.requires_grad:  # f does not depend on its input here: nothing to ascend
                    self.add(r.detach(), "pairs", a.detach(), y=b.detach())
                    break
                free = self._grad_step(opt, z, u, s, r, lr_t)
            fr = self.frac((t + 1) / max(steps - 1, 1))
            last = t == steps - 1 or fr >= 1.0
            unkept = (r.detach(), a.detach(), b.detach())
            if t % 10 == 9 or last or (free and t % 10 == 0):
                self.add(unkept[0], "pairs", unkept[1], y=unkept[2])
                unkept = None
            if last:
                break
        # Jacobian norm at the end points of the ascent (the pairs localise a high-slope region)
        self._end_jacobian(s, z, u)

    def _ratio(self, zz: torch.Tensor, uu: torch.Tensor, s: torch.Tensor, d: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each chain's pair ratio ``||f(a) - f(b)|| / (d s)`` and its pair
        ``a, b = s zz -+ d s un / 2`` (``un = uu / ||uu||``)."""
        un = uu / _pnorm(uu, self.norm)[:, None].clamp_min(1e-30)
        x = s * zz
        a, b = x + 0.5 * d * s * un, x - 0.5 * d * s * un
        self.evaluations += 2 * x.shape[0]
        return _pnorm(self.f(a) - self.f(b), self.norm) / (d * s[:, 0]), a, b

    def _free_step(self, z: torch.Tensor, u: torch.Tensor, s: torch.Tensor, d: float, *,
                   lr_z: float, lr_u: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One derivative-free step: the proposals ``z + lr_z N(0, I)``, ``u + lr_u N(0, I)``
        replace (in place) the chains they improve; returns each chain's ratio and pair."""
        with torch.no_grad():
            r, a, b = self._ratio(z, u, s, d)
            zp = z + lr_z * self.randn(*z.shape)
            up = u + lr_u * self.randn(*u.shape)
            rp, ap, bp = self._ratio(zp, up, s, d)
            better = torch.nan_to_num(rp, nan=-1.0) > torch.nan_to_num(r, nan=-1.0)
            z.copy_(torch.where(better[:, None], zp, z))
            u.copy_(torch.where(better[:, None], up, u))
            u /= _pnorm(u, self.norm)[:, None].clamp_min(1e-30)
            r = torch.where(better, rp, r)
            a = torch.where(better[:, None], ap, a)
            b = torch.where(better[:, None], bp, b)
        return r, a, b

    def _grad_step(self, opt: _Adam, z: torch.Tensor, u: torch.Tensor, s: torch.Tensor,
                   r: torch.Tensor, lr_t: float) -> bool:
        """One Adam ascent step of the ratios ``r`` in ``(z, u)`` (in place); ``True`` when no
        gradient reaches the input: the ascent turns derivative-free from here."""
        gz, gu = torch.autograd.grad(r.sum(), [z, u], allow_unused=True)
        if gz is None and gu is None:
            # the output depends on the parameters only through autograd (the input
            # is detached): pairs are still witnesses, found by random proposals
            # from the top direction of a finite-difference Jacobian
            with torch.no_grad():
                v = self.fd_direction((s * z).detach())
                if v is not None:
                    u.copy_(v / _pnorm(v, self.norm)[:, None].clamp_min(1e-30))
            return True
        opt.ascend([torch.zeros_like(z) if gz is None else gz,
                    torch.zeros_like(u) if gu is None else gu], lr_t)
        with torch.no_grad():
            u /= _pnorm(u, self.norm)[:, None].clamp_min(1e-30)
        return False

    def _end_jacobian(self, s: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> None:
        """Jacobian norm at the end points of the ascent (the pairs localise a high-slope
        region), when it fits before the search's deadline."""
        self._last = None
        if self.jac_ok and self.clock.fits("end jac", self.deadline,
                                           guess=self.clock.predict("pairs", self._guess)):
            with torch.no_grad():
                xe = (s * z).detach()
                ve = u.detach() if self.norm == "2" else None
            self.clock.start("end jac")
            sv, v = self.jac(xe, ve)
            self.clock.stop("end jac")
            self.add(sv, "pairs", xe, v=v)

    def fd_direction(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per chain, the direction attaining the norm of the central-difference Jacobian at
        ``x`` (``2 n`` batched forward passes; inputs of at most :data:`_FD_MAX_N` entries,
        else ``None``): only a search direction, the witnesses are the pairs along it."""
        B, n = x.shape
        if n > _FD_MAX_N:
            return None
        h = _fd_step(x, torch.ones_like(x))  # (B, 1)
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        chunk = max(1, 4096 // B)
        cols = []
        for j in range(0, n, chunk):
            E = eye[j : j + chunk]  # (c, n)
            c = E.shape[0]
            step = h[:, :, None] * E[None]  # (B, c, n)
            xp = (x[:, None, :] + step).reshape(B * c, n)
            xm = (x[:, None, :] - step).reshape(B * c, n)
            self.evaluations += 2 * B * c
            d = (self.f(xp) - self.f(xm)).reshape(B, c, -1) / (2 * h[:, :, None])
            cols.append(d)
        jac = torch.cat(cols, dim=1).transpose(1, 2)  # (B, m, n)
        return _norm_of_jac(torch.nan_to_num(jac), self.norm)[1]

    # ---- annealing -------------------------------------------------------------------------
    def annealing(self, x0: torch.Tensor, s: torch.Tensor, steps: int) -> None:
        """Simulated annealing; ``s`` (B, 1) is each chain's proposal scale."""
        x = x0.clone()
        e, v = self.jac(x)
        self.add(e, "annealing", x, v=v)
        t0 = 0.1 * float(e.mean()) + 1e-12
        fr = 0.0
        for t in range(steps):
            if self.out_of_time():
                break
            sigma = s * (0.5 * (0.01 / 0.5) ** fr)
            temp = t0 * (1.0 - fr) + 1e-12
            xp = x + sigma * self.randn(*x.shape)
            ep, vp = self.jac(xp, v, iters=max(3, self.iters // 4))
            u = torch.rand(x.shape[0], generator=self.gen, dtype=self.dtype).to(self.device)
            accept = (ep >= e) | (u < torch.exp(((ep - e) / temp).clamp(max=0.0)))
            x = torch.where(accept[:, None], xp, x)
            v = torch.where(accept[:, None], vp, v)
            e = torch.where(accept, ep, e)
            fr = self.frac((t + 1) / max(steps - 1, 1))
            last = t == steps - 1 or fr >= 1.0
            if t % 10 == 9 or last:
                self.add(e, "annealing", x, v=v)
            if last:
                break


class _Adam:
    """Minimal Adam ascent (torch.optim imports torch._dynamo, seconds of start-up)."""

    def __init__(self, params: list[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = params
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def ascend(self, grads: list[torch.Tensor], lr: float) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            g = torch.nan_to_num(g)
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.add_(lr * (m / c1) / ((v / c2).sqrt() + self.eps))


#: default time budget of :func:`lower_bound` (seconds); small models finish long before
DEFAULT_TIME_LIMIT = 60.0
#: fraction of the budget kept for the float64 re-evaluation of the witnesses
_CHECK_SHARE = 0.12
#: float64 forward passes of one sample the check reserves at least (the best witness, its
#: secant, one more): a slow model gets a larger reserve than its share
_CHECK_PASSES = 6
#: relative time shares of the search stages (renormalised over the stages that run)
_STAGE_WEIGHT = {"data": 0.15, "sample": 0.25, "pairs": 0.35, "annealing": 0.25}
_TORCH_FAILURES = (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError)


@dataclass(frozen=True)
class _Options:
    """The validated options of :func:`lower_bound` (``p``: the norm's name)."""

    p: str
    methods: tuple[str, ...]
    restarts: int | None
    steps: int
    samples: int | None
    batch_size: int
    scale: float | None
    lr: float | None
    power_iterations: int
    seed: int
    time_limit: float | None


def lower_bound(  # noqa: PLR0913 - the public entry point: one keyword option per knob
    model: nn.Module | Analysis,
    input_shape: Sequence[int] | int | None = None,
    *,
    data: Any = None,
    norm: Any = 2,
    methods: Iterable[str] = DEFAULT_METHODS,
    restarts: int | None = None,
    steps: int = 200,
    samples: int | None = None,
    batch_size: int = 64,
    scale: float | None = None,
    lr: float | None = None,
    power_iterations: int = 20,
    seed: int = 0,
    progress: ProgressArg = False,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> LowerBoundResult:
    r"""A witnessed lower bound on the Lipschitz constant of ``model`` (see the module docstring).

    Parameters
    ----------
    model, input_shape:
        the network and the shape of ONE input sample (no batch dimension). Samples of a batch
        must be processed independently (eval mode); the final value is re-checked on a batch
        of one sample anyway.
    data:
        optional points ``(N, *input_shape)``: the ``"data"`` bound (max Jacobian norm over
        them) and starting points of the pair ascent; their spread sets the default ``scale``.
    norm:
        ``2`` (default), ``1`` or ``inf``: the same p-norm on inputs and outputs. Jacobian
        norms are exact from the full Jacobian (``m`` vjps) for outputs of at most 64 entries;
        beyond, the power method for ``2``, and only pair witnesses for ``1`` / ``inf``.
    methods:
        any of ``"data"``, ``"sample"``, ``"pairs"``, ``"annealing"`` (``"data"`` is skipped
        without data, ``"sample"`` when the Jacobian has more than 64 rows); default
        :data:`DEFAULT_METHODS` (all but ``"annealing"``).
    restarts, steps:
        number of independent chains of the ascent and of the annealing, and their number of
        steps; default restarts: 64 for inputs of at most 4096 entries, 8 above. ``steps`` is a
        maximum: a stage cut by its time share compresses its schedule instead.
    samples:
        random points of the ``"sample"`` stage (Jacobian norms, in batches of
        ``16 batch_size``, the first ones smaller to time them); the best ones start the
        ascents. Default 4096.
    batch_size:
        chains (or data points) evaluated in one batched forward pass; lower it to save memory.
    scale:
        typical input scale: spread of random starts, initial pair distance and annealing
        step; default: the data's standard deviation, else 1.
    lr:
        Adam step of the pair ascent (default ``0.05 * scale``).
    power_iterations:
        power-method iterations per Jacobian-norm evaluation (large outputs only; the best
        witnesses are polished in float64).
    seed:
        seeds every random draw (the global RNG is not touched).
    progress:
        ``True``: progress on stderr (tqdm on a terminal, one line per stage otherwise); or a
        callback ``(stage, fraction)`` (see :class:`lipbound.report.Progress`).
    time_limit:
        ONE overall budget in seconds (default 60; ``None``: none), split over the stages
        (data, sample, pairs, annealing, then the float64 re-check); time a stage leaves unused
        goes to the next. The clock is checked inside every loop, so the call returns within
        about 10% of it (plus one batched step); the best witness so far is returned.

    Returns
    -------
    LowerBoundResult
        ``value`` (``certified=True``: a true lower bound, reproduced in float64 from the
        witness; ``lower`` is the same number), ``witness`` (kind ``"pair"``: ``x`` and ``y``;
        ``"jacobian"``: ``x`` and ``direction``), ``how`` (which search found it),
        ``extra["per_method"]`` (best re-checked value of each search: the paper's data /
        annealing columns). When a stage fails (an op without the derivatives it needs), the
        others go on and a note says so.
    """
    t_start = time.perf_counter()
    an, _ = analysis_of(model, input_shape)  # no capture: the search needs only the model
    model, shape = an.model, an.input_shape
    p = check_norm(norm, method="lower_bound")
    methods = tuple(methods)
    if not methods:
        raise InvalidArgumentError(f"methods must name at least one of {', '.join(LOWER_METHODS)}")
    for name in methods:
        check_choice("method", name, LOWER_METHODS)
    if restarts is not None:
        check_positive("restarts", restarts, integer=True)
    if samples is not None:
        check_positive("samples", samples, integer=True, allow_zero=True)
    check_positive("steps", steps, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("power_iterations", power_iterations, integer=True)
    if scale is not None:
        check_positive("scale", scale)
    if lr is not None:
        check_positive("lr", lr)
    if time_limit is not None:
        check_positive("time_limit", time_limit)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(f"seed must be an int; got {seed!r}")
    opts = _Options(
        p=p, methods=methods, restarts=restarts, steps=steps, samples=samples,
        batch_size=batch_size, scale=scale, lr=lr, power_iterations=power_iterations, seed=seed,
        time_limit=time_limit,
    )
    report = make_progress(progress)
    try:
        return _lower_bound(model, shape, data, opts, report, t_start)
    finally:
        report.close()


@dataclass
class _Run:
    """The state of one :func:`lower_bound` call that its phases share: the input size ``n``
    and output size ``m``, the resolved defaults (``restarts``, ``scale``, ``lr`` relative to
    ``scale``), the data points ``xdata`` (flattened), the clock (``deadline`` of the call,
    ``search_end = deadline - reserve``, ``reserve`` kept for the float64 check), the checker,
    the search and its stages, what the stages found for the starts of the chains
    (``data_vals``: Jacobian norms at the data; ``sx``, ``ss``: the best sampled points and
    their scales) and the notes."""

    n: int
    m: int
    restarts: int
    xdata: torch.Tensor | None
    scale: float
    lr: float
    deadline: float
    reserve: float
    search_end: float
    check: _Checker
    gen: torch.Generator
    search: _Search
    report: Any
    notes: list[str]
    sx: torch.Tensor
    ss: torch.Tensor
    data_vals: torch.Tensor | None = None
    stages: list[str] = field(default_factory=list)

    def stage_end(self, stage: str) -> float:
        """Now plus this stage's share of the search time left."""
        now = time.perf_counter()
        stages = self.stages
        todo = stages[stages.index(stage):]
        w = _STAGE_WEIGHT[stage] / sum(_STAGE_WEIGHT[s] for s in todo)
        return now + max(self.search_end - now, 0.0) * w

    def starts(self, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k starting points and their scales: the best data points first (at ``scale``), then
        the best sampled points, then random ones ``s N(0, I)`` (scales as in
        :meth:`_Search.scales`)."""
        search, xdata, data_vals, sx = self.search, self.xdata, self.data_vals, self.sx
        device = search.device
        sc = search.scales(k, self.scale)
        xs = sc * search.randn(k, self.n)
        pos = 0
        if xdata is not None:
            order = (
                torch.argsort(data_vals, descending=True)
                if data_vals is not None and data_vals.numel() > 0
                else torch.randperm(xdata.shape[0], generator=self.gen).to(device)
            )
            take = order[offset : offset + (k + 1) // 2]
            xs[: take.numel()] = xdata[take]
            sc[: take.numel()] = self.scale
            pos = take.numel()
        if sx.shape[0] > 0:
            want = max(k - pos - max(1, k // 8), 0)  # keep a few random starts
            take_s = torch.arange(offset, min(offset + want, sx.shape[0]), device=device)
            xs[pos : pos + take_s.numel()] = sx[take_s]
            sc[pos : pos + take_s.numel()] = self.ss[take_s]
        return xs, sc


def _setup(model: nn.Module, shape: tuple[int, ...], data: Any, opts: _Options, report: Any,
           t_start: float) -> _Run:
    """Probe the model (widened to float64 if it overflows), resolve the defaults, build the
    float64 checker (whose forward pass prices the check's reserve) and the search."""
    report("setup", 0.0)
    model, device, dtype, m, widened = probe_widening(model, shape)
    n = math.prod(shape)
    restarts = opts.restarts
    if restarts is None:  # starts are cheap for small inputs (one batched pass serves them all)
        restarts = 64 if n <= 4096 else 8
    xdata = None if data is None else _as_data(data, shape, device, dtype)
    scale = opts.scale
    if scale is None:
        scale = float(xdata.std()) if xdata is not None and xdata.shape[0] > 1 else 1.0
        if not scale > 0 or not math.isfinite(scale):
            scale = 1.0
    lr_ = 0.05 if opts.lr is None else float(opts.lr) / scale
    time_limit = opts.time_limit
    deadline = math.inf if time_limit is None else t_start + float(time_limit)
    # the float64 checker first: its forward pass prices the check, whose reserve is the
    # larger of its share and a few such passes (the best witness and its secant), capped
    check = _Checker(model, shape, device, dtype, m)
    reserve = 0.0 if time_limit is None else min(
        max(_CHECK_SHARE * time_limit, _CHECK_PASSES * check.forward_seconds),
        0.5 * time_limit)
    search_end = deadline - reserve

    f = _batched(model, shape)
    gen = torch.Generator().manual_seed(opts.seed)
    notes: list[str] = [] if widened is None else [widened]
    search = _Search(
        _Target(f, n, m, device, dtype), opts.p, gen, search_end, report, keep=4,
        power_iterations=opts.power_iterations,
    )
    return _Run(
        n=n, m=m, restarts=restarts, xdata=xdata, scale=scale, lr=lr_, deadline=deadline,
        reserve=reserve, search_end=search_end, check=check, gen=gen, search=search,
        report=report, notes=notes,
        # best sampled points and their scales
        sx=torch.zeros(0, n, dtype=dtype, device=device),
        ss=torch.zeros(0, 1, dtype=dtype, device=device),
    )


def _plan_stages(run: _Run, opts: _Options) -> list[str]:
    """The stages that run, in their order: ``"data"`` needs data (an error when it is the only
    method), ``"data"`` and ``"annealing"`` cheap Jacobian norms (else skipped with a note),
    ``"sample"`` at most :data:`_FULL_M` outputs and ``samples != 0``."""
    methods, xdata, search, notes = opts.methods, run.xdata, run.search, run.notes
    if "data" in methods and xdata is None and len(methods) == 1:
        raise InvalidArgumentError("method 'data' needs data points (pass data=...)")
    stages: list[str] = [s for s in ("data", "sample", "pairs", "annealing") if s in methods]
    if "data" in stages and (xdata is None or not search.jac_ok):
        stages.remove("data")
        if xdata is not None:
            notes.append("data bound skipped: Jacobian norm for this norm needs <= 64 outputs")
    if "sample" in stages and (run.m > _FULL_M or opts.samples == 0):
        stages.remove("sample")
    if "annealing" in stages and not search.jac_ok:
        stages.remove("annealing")
        notes.append("annealing skipped: Jacobian norm for this norm needs <= 64 outputs")
    return stages


def _run_stages(run: _Run, opts: _Options) -> None:
    """The stages in order, until the search's time is up; a stage that fails (an op lacks a
    derivative) is dropped with a note, what it found is kept."""
    search, notes = run.search, run.notes
    for stage in run.stages:
        if search.timed_out or time.perf_counter() > run.search_end:
            search.timed_out = True
            break
        try:
            _run_stage(run, opts, stage)
        except _TORCH_FAILURES as e:  # an op lacks a derivative: keep what was found
            if isinstance(e, LipboundError):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            notes.append(f"{stage} stopped ({type(e).__name__}: {msg[:160]}); the other "
                         "searches went on")
    if search.timed_out or search.cut:
        notes.append(f"time limit of {opts.time_limit} s reached (the stages were shortened); "
                     "best witness so far returned")


def _run_stage(run: _Run, opts: _Options, stage: str) -> None:
    """One stage within its share of the time: the data bound, the sampled Jacobian norms,
    or the batches of chains of the pair ascent / the annealing."""
    search, xdata, batch_size = run.search, run.xdata, opts.batch_size
    if stage == "data" and xdata is not None:
        search.begin("data", run.stage_end("data"))
        run.data_vals = search.data(xdata, batch_size)
    elif stage == "sample":
        search.begin("sample", run.stage_end("sample"))
        n_samples = 4096 if opts.samples is None else opts.samples
        run.sx, run.ss = search.sample(n_samples, run.scale, 16 * batch_size, run.restarts)
    else:
        end = run.stage_end(stage)
        k0 = min(batch_size, run.restarts)
        # a step of k chains evaluates 2 k points forward and backward (float32): guessed as
        # 2 k float64 forward passes of one sample (the checker's measured unit)
        search.begin(stage, end, guess=2 * k0 * run.check.forward_seconds)
        n_batches = math.ceil(run.restarts / batch_size)
        for b in range(n_batches):
            # each batch of chains gets its share of the stage's time left
            now = time.perf_counter()
            search.window(now + max(end - now, 0.0) / (n_batches - b))
            k = min(batch_size, run.restarts - b * batch_size)
            x0, s0 = run.starts(k, b * batch_size)
            if stage == "pairs":
                search.pairs(x0, s0, search.randn(k, run.n), opts.steps, run.lr)
            else:
                search.annealing(x0, s0, opts.steps)
            if search.timed_out:
                break


def _recheck(cands: list[_Cand], check: _Checker, p: str, clock: StepClock, deadline: float,
             *, notes: list[str], report: Any) -> list[tuple[float, _Cand]]:
    """``(exact value, candidate)`` of the candidates re-checked in float64, best first: the
    first always, each next one only if its step (predicted by ``clock``: a pair costs two
    forward passes, a Jacobian about three, until measured) ends by ``deadline``."""
    evaluated: list[tuple[float, _Cand]] = []
    skipped = 0
    fwd = check.forward_seconds
    for i, c in enumerate(cands):
        kind = "pair" if c.y is not None else "jac"
        if evaluated and not clock.fits(kind, deadline, guess=(2 if c.y is not None else 3) * fwd):
            skipped += 1
            continue
        report("check", i / max(len(cands), 1))
        clock.start(kind)
        if c.y is not None:
            val = check.pair(c.x, c.y, p)
        elif c.v is not None:
            val, as_pair = check.jac(c.x, c.v, p)
            if as_pair is not None:  # no exact jvp here: the witness is the pair itself
                c = _Cand(c.value, c.how, as_pair[0], as_pair[1], None)
        else:
            val = 0.0
        clock.stop(kind)
        evaluated.append((val, c))
    if skipped:
        notes.append(f"{skipped} candidate witness(es) not re-checked (time limit)")
    return evaluated


def _polish(run: _Run, opts: _Options) -> None:
    """Polish the best Jacobian witnesses (still realised values) in float64, while half of
    the check's reserve is left."""
    check, deadline, reserve, p = run.check, run.deadline, run.reserve, opts.p
    jac_cands = [c for c in run.search.cands if c.y is None and c.v is not None][:2]
    for c in jac_cands:  # polish the best Jacobian witnesses (still realised values)
        if time.perf_counter() > deadline - 0.5 * reserve:
            break
        if c.v is not None:
            try:
                c.v = check.polish(c.x, c.v, p, 3 * opts.power_iterations,
                                   deadline - 0.5 * reserve)
            except _TORCH_FAILURES:
                break


def _confirm(evaluated: list[tuple[float, _Cand]], check: _Checker, clock: StepClock,
             deadline: float, p: str
             ) -> tuple[tuple[float, _Cand] | None, list[tuple[float, _Cand]], list[float]]:
    """The best of the re-checked candidates, ``(best or None, candidates, demoted values)``.

    A Jacobian value must be confirmed by its secants (see :meth:`_Checker.confirm`): the best
    is checked, and a demoted one competes again as the pair it became, until the best is a
    pair or a confirmed Jacobian value (each round is 8 float64 forward passes)."""
    best: tuple[float, _Cand] | None = max(evaluated, key=lambda t: t[0]) if evaluated else None
    demoted: list[float] = []
    fwd = check.forward_seconds

    def more() -> bool:  # another secant (a pair: two passes) fits before the deadline
        return clock.fits("pair", deadline, guess=2 * fwd)

    while best is not None and best[1].y is None and best[1].v is not None:
        if demoted and not more():  # no time to confirm more: the pairs only compete
            evaluated = [(v_, c_) for v_, c_ in evaluated if c_.y is not None]
            best = max(evaluated, key=lambda t: t[0])
            break
        cand = best[1]
        if cand.v is None:
            break
        val_c, as_pair = check.confirm(cand.x, cand.v, best[0], p, more)
        if as_pair is None:  # confirmed
            break
        demoted.append(best[0])
        pair_c = _Cand(val_c, best[1].how, as_pair[0], as_pair[1], None)
        evaluated = [(v_, c_) for v_, c_ in evaluated if c_ is not best[1]] + [(val_c, pair_c)]
        best = max(evaluated, key=lambda t: t[0])
    return best, evaluated, demoted


def _at_zero(check: _Checker, n: int, p: str) -> tuple[float, _Cand]:
    """The witness when nothing was evaluated (time limit hit before any step): the ratio at
    0 along 1 (a pair when only a finite difference is available)."""
    x0 = torch.zeros(n, dtype=check.dtype)
    v0 = torch.ones(n, dtype=check.dtype)
    val0, as_pair0 = check.jac(x0, v0, p)
    c0 = _Cand(0.0, "jacobian at 0", x0, None, v0)
    if as_pair0 is not None:
        c0 = _Cand(0.0, "pair at 0", as_pair0[0], as_pair0[1], None)
    return val0, c0


def _check(run: _Run, opts: _Options) -> tuple[float, _Cand, dict[str, float]]:
    """Re-evaluate the candidates exactly (float64, one sample) and pick the best:
    ``(value, witness, per-method values)``."""
    check, notes, report = run.check, run.notes, run.report
    report("check", 0.0)
    clock = StepClock()  # costs of the check's steps ("pair": 2 passes, "jac": about 3)
    _polish(run, opts)
    evaluated = _recheck(run.search.cands, check, opts.p, clock, run.deadline, notes=notes,
                         report=report)
    best, evaluated, demoted = _confirm(evaluated, check, clock, run.deadline, opts.p)
    if demoted:
        notes.append(f"{len(demoted)} Jacobian value(s) (largest {max(demoted):.6g}) not "
                     "confirmed by their secants (rounding in the derivative): replaced by "
                     "their best secant pairs")
    per_method: dict[str, float] = {}
    for v_, c_ in evaluated:
        per_method[c_.how] = max(per_method.get(c_.how, 0.0), v_)
    if best is None:  # nothing evaluated (time limit hit before any step)
        best = _at_zero(check, run.n, opts.p)
        notes.append("no search step ran; value is the ratio at 0 along 1")
    value, c = best
    if check.nonfinite and not value > 0:
        raise NonFiniteError(
            f"every one of the {check.nonfinite} witness(es) overflowed when re-evaluated in "
            f"{str(check.dtype).removeprefix('torch.')}: the model's outputs are not finite "
            "away from x = 0. Rescale the weights (or the input scale=...)."
        )
    if check.nonfinite:
        notes.append(f"{check.nonfinite} witness(es) overflowed on re-evaluation and were skipped")
    report("check", 1.0)
    return value, c, per_method


def _lower_bound(
    model: nn.Module, shape: tuple[int, ...], data: Any, opts: _Options, report: Any,
    t_start: float,
) -> LowerBoundResult:
    """:func:`lower_bound` after validation: set up, run the stages, check, assemble."""
    run = _setup(model, shape, data, opts, report, t_start)
    run.stages = _plan_stages(run, opts)
    _run_stages(run, opts)
    value, c, per_method = _check(run, opts)
    kind = "pair" if c.y is not None else "jacobian"
    x_w = c.x.detach().to(torch.float64).reshape(shape).cpu()
    y_w = None if c.y is None else c.y.detach().to(torch.float64).reshape(shape).cpu()
    extra: dict[str, Any] = {
        "per_method": per_method,
        "witness": kind,
        "evaluations": run.search.evaluations,
        "scale": run.scale,
        "recheck_dtype": str(run.check.dtype).removeprefix("torch."),
        "stages": ",".join(run.stages),
    }
    direction = None
    if c.y is None and c.v is not None:
        direction = c.v.detach().to(torch.float64).reshape(shape).cpu()
    return LowerBoundResult(
        value=float(value),
        certified=True,
        method="lower",
        norm=opts.p,
        bound="lower",
        upper=None,
        lower=float(value),
        witness=Witness(kind=kind, x=x_w, y=y_w, direction=direction),
        how=f"{c.how} ({kind} witness)",
        iterations=opts.steps,
        seconds=time.perf_counter() - t_start,
        notes=tuple(run.notes),
        extra=extra,
    )
