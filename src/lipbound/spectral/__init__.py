r"""Operator norms of linear layers: estimates through autodiff, certified upper bounds.

``spectral_norm(op, input_shape)`` estimates ``||A||_2`` for the linear part
``A x = op(x) - op(0)`` of any affine ``op`` acting on a batch ``(B, *input_shape)``: an
``nn.Linear``, ``Conv1d/2d/3d`` (any stride, padding mode, dilation, groups),
``ConvTranspose*``, ``AvgPool*``, ``AdaptiveAvgPool*``, eval-mode ``BatchNorm*``, an
``nn.Sequential`` of these, or a plain function.

* The **estimate** (``value``) uses forward products and vector-Jacobian products only
  (``||A||_2^2 = lambda_max(A^T A)`` and ``A^T A v = grad_v (1/2)||A v||^2``): thick-restart
  Lanczos (default), ARPACK, or the paper's power method. It approaches the norm from below
  (``value = ||A v||`` with ``||v|| = 1``, or ``||A^T u||`` with ``||u|| = 1`` when Lanczos or
  ARPACK run on ``A A^T`` because the output space is the smaller one) and stops on a
  relative tolerance.
* The **certificate** (``upper``) is a proven upper bound (see :mod:`lipbound.spectral.certify`
  for every proof): dense SVD with a rounding margin for matrices, the Fourier symbol of a
  containing circular convolution for convolutions of any padding/stride, the Schur test for
  pools, products for Sequentials, the dense Jacobian for any small op. ``upper`` is ``None``
  (and ``certified`` False) when no certificate applies.

>>> import torch
>>> from torch import nn
>>> conv = nn.Conv2d(2, 3, 3, padding=1)
>>> r = spectral_norm(conv, (2, 8, 8))
>>> r.certified and r.value <= r.upper
True
>>> r.u.shape, r.v.shape
(torch.Size([1, 3, 8, 8]), torch.Size([1, 2, 8, 8]))
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch

from .._validation import (
    check_choice,
    check_input_shape,
    check_model,
    check_norm,
    check_positive,
)
from ..errors import InvalidArgumentError, NonFiniteError, ZeroOperatorError
from ..results import SpectralResult
from ._ops import Operator, cast_detached, make_operator, shared_casts
from .certify import best_certificate
from .lanczos import arpack as _arpack
from .lanczos import lanczos as _lanczos
from .power import Triplets, _orth_rows
from .power import power_iteration as _power

__all__ = ["spectral_norm", "top_singular", "certified_upper", "cast_detached", "shared_casts",
           "METHODS"]

METHODS = ("auto", "lanczos", "arpack", "power")

#: Memory budget (bytes) of the Krylov basis of Lanczos (``basis`` vectors of the smaller of
#: the input / output sizes, in the working dtype; default basis ``max(2k + 10, 24)``). A
#: larger operator gets a smaller basis (more restarts, same answer); one for which even
#: ``k + 4`` vectors do not fit is refused with the memory it needs.
KRYLOV_BYTES = 1 << 32


def _basis_size(A: Operator, k: int) -> int | None:
    """The Lanczos basis size that fits :data:`KRYLOV_BYTES` (``None``: the default fits)."""
    n = min(A.n_in, A.n_out)
    item = torch.finfo(A.dtype).bits // 8
    default = max(2 * k + 10, 24)
    cap = KRYLOV_BYTES // max(1, n * item)
    if cap >= default:
        return None
    if cap < k + 4:
        need = (k + 4) * n * item
        raise InvalidArgumentError(
            f"the Lanczos basis for k={k} on an operator with {n} entries per vector needs at "
            f"least {need / 2**30:.3g} GiB (k + 4 vectors of {n * item / 2**20:.3g} MiB), above "
            f"lipbound.spectral.KRYLOV_BYTES = {KRYLOV_BYTES / 2**30:.3g} GiB; ask for fewer "
            "triplets (k), use method='power' (k vectors only), or raise KRYLOV_BYTES."
        )
    return int(cap)


def _check_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(
            f"dtype must be None or a floating torch.dtype (torch.float64, torch.float32); "
            f"got {dtype!r}"
        )
    return dtype


def _default_dtype(op: Any, tol: float) -> torch.dtype:
    """float64 below ``tol = 1e-5``; otherwise the op's own floating dtype (float32 usually)."""
    if tol < 1e-5:
        return torch.float64
    if isinstance(op, torch.nn.Module):
        for t in list(op.parameters()) + list(op.buffers()):
            if t.is_floating_point():
                return t.dtype
    return torch.float64


def spectral_norm(  # noqa: PLR0913 - the public entry point: one keyword option per knob
    op: Any,
    input_shape: Any,
    *,
    k: int = 1,
    tol: float = 1e-6,
    max_iter: int = 1000,
    method: str = "auto",
    certify: bool = True,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    check_linear: bool = True,
) -> SpectralResult:
    r"""Estimate (and certify from above) the operator l2 norm of a linear/affine ``op``.

    Parameters
    ----------
    op:           the layer or function; called on a batch ``(B, *input_shape)``. For an affine
                  op the bias is removed (``A x = op(x) - op(0)``). Parameters are never
                  modified and their ``.grad`` is never touched.
    input_shape:  the shape of ONE input, without the batch dimension.
    k:            number of top singular triplets to compute.
    tol:          relative tolerance on the singular values (stopping rule, not a count).
    max_iter:     largest number of ``A^T A`` products (per vector) before giving up
                  (``converged=False``, the result is still a valid estimate from below).
    method:       ``"auto"`` (= ``"lanczos"``, faster than the power method on every layer of
                  the benchmark, see benchmarks/results/spectral.md), ``"lanczos"``
                  (thick-restart Lanczos on ``A^T A``, or on ``A A^T`` when the output
                  space is smaller, in torch), ``"arpack"`` (``scipy.sparse.linalg.eigsh``,
                  same choice of side), ``"power"`` (the paper's power method, on
                  ``A^T A``).
    certify:      also compute a certified upper bound (``upper``), when one applies.
    dtype:        working dtype of the estimate. ``None``: float64 when ``tol < 1e-5``, else the
                  op's own parameter dtype (float32 for most nets; 2-4x faster convolutions
                  on CPU, and float32 rounding, ~1e-7 relative, stays far below such a
                  tolerance). Certificates are always computed in float64.
    seed:         seed of the random start vectors (results are reproducible).
    check_linear: run the superposition check (two random inputs) before iterating.

    Returns a :class:`~lipbound.results.SpectralResult`: ``value`` (estimate of ``||A||_2``
    from below), ``upper`` / ``certified`` / ``certificate``, the top-k ``singular_values``,
    ``u`` of shape ``(k, *out_shape)`` and ``v`` of shape ``(k, *input_shape)`` with
    ``A v_i ~= sigma_i u_i``, ``iterations`` (operator applications: forward and adjoint
    products, per vector), ``seconds`` and ``converged``.

    The zero map (e.g. an all-zero weight) has norm 0: ``value`` 0, ``upper`` its certificate
    (0 up to a rounding margin), ``u`` zero and ``v`` any orthonormal vectors (all are right
    singular vectors); :func:`top_singular`, which asks for the vectors, raises
    :class:`~lipbound.ZeroOperatorError` instead. A module is unwrapped (``torch.compile``,
    ``DataParallel``) and refused in training mode (:class:`~lipbound.TrainingModeError`).

    Raises :class:`~lipbound.ShapeError` (op fails on ``input_shape``, or the shape is empty),
    :class:`~lipbound.NonLinearOperatorError`, :class:`~lipbound.NonFiniteError`,
    :class:`~lipbound.TrainingModeError`, :class:`~lipbound.InvalidArgumentError`.

    >>> import torch
    >>> W = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    >>> r = spectral_norm(lambda x: x @ W.T, (3,), k=2)
    >>> [round(s, 6) for s in r.singular_values]
    [3.0, 2.0]
    >>> r.certified   # a small op: certified through its dense Jacobian
    True
    """
    t0 = time.perf_counter()
    shape = check_input_shape(input_shape)
    check_positive("k", k, integer=True)
    check_positive("tol", tol)
    check_positive("max_iter", max_iter, integer=True)
    check_choice("method", method, METHODS)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InvalidArgumentError(f"seed must be an int; got {seed!r}")
    if isinstance(op, torch.nn.Module):
        op = check_model(op, name="op", require_eval=True)
    dt = _check_dtype(dtype) or _default_dtype(op, tol)
    A = make_operator(op, shape, dtype=dt, check_linear=check_linear, seed=seed)
    dt = A.dtype  # float64 when the op's own dtype overflowed or vanished
    if k > min(A.n_in, A.n_out):
        raise InvalidArgumentError(
            f"k={k} exceeds the rank limit min(n_in, n_out) = {min(A.n_in, A.n_out)} of this "
            f"operator ({shape} -> {A.out_shape}); ask for fewer singular triplets"
        )
    A.count = 0
    gen = torch.Generator().manual_seed(seed)
    name = "lanczos" if method == "auto" else method
    trip: Triplets
    if A.zero:  # the zero map: norm 0, every unit vector is a right singular vector
        v0 = _orth_rows(A.randn(k, gen).reshape(k, -1)).reshape(k, *A.in_shape)
        trip = Triplets(torch.zeros(k, dtype=torch.float64),
                        torch.zeros((k, *A.out_shape), dtype=A.dtype, device=A.device), v0,
                        True, 0)
    elif name == "power":
        trip = _power(A, k, tol, max_iter, gen)
    elif name == "arpack":
        trip = _on_smaller_side(_arpack, A, k, tol, max_iter, gen)
    else:
        m = _basis_size(A, k)
        solver = _lanczos if m is None else functools.partial(_lanczos, basis=m)
        trip = _on_smaller_side(solver, A, k, tol, max_iter, gen)
    # the products were those of scale * A (a power of two): exact to undo
    sig = [float(s) / A.scale for s in trip.sigmas]
    if not all(math.isfinite(s) for s in sig):
        raise NonFiniteError(
            "the iteration produced a non-finite singular value: the op overflows even in "
            "float64. Check the weights' magnitude."
        )
    iterations = A.count
    upper: float | None = None
    how = ""
    notes: list[str] = []
    if certify:
        c = certify_op(op, shape, A.out_shape)
        if c is not None:
            upper, how = c
            if sig[0] > upper * (1 + 1e-6 if dt == torch.float64 else 1e-4):
                notes.append(
                    f"estimate {sig[0]:.9g} exceeds the certificate {upper:.9g} beyond rounding"
                )
    if not trip.converged:
        notes.append(f"not converged to tol={tol:g} in max_iter={max_iter}; estimate from below")
    if A.zero:
        notes.append("zero operator (op(x) - op(0) = 0 on random inputs in float64): norm 0; "
                     "u is 0 and v any orthonormal vectors")
    return SpectralResult(
        value=sig[0],
        upper=upper,
        certified=upper is not None,
        certificate=how,
        method=name,
        singular_values=tuple(sig),
        u=trip.u,
        v=trip.v,
        iterations=iterations,
        seconds=time.perf_counter() - t0,
        converged=trip.converged,
        notes=tuple(notes),
    )


def _on_smaller_side(solver: Any, A: Operator, k: int, tol: float, max_iter: int,
                     gen: torch.Generator) -> Triplets:
    """Run a Krylov ``solver`` on ``A^T A`` or, when the output is smaller, on ``A A^T``.

    Both have the same non-zero eigenvalues ``sigma_i^2``, and each step costs one forward
    and one adjoint product either way, but the orthogonalisation works on vectors of the
    space the iteration runs in: on a stride-2 convolution that doubles its channels (input
    64x56x56, output 128x28x28) the output side halves that work. On ``A A^T`` the solver
    returns unit left vectors ``u_i`` and ``sigma_i = ||A^T u_i||``, again an estimate from
    below (``||A^T|| = ||A||``), and ``v_i = A^T u_i / sigma_i``: the triplets are swapped back.
    """
    if A.n_out >= A.n_in:
        return solver(A, k, tol, max_iter, gen)
    t: Triplets = solver(A.adjoint(), k, tol, max_iter, gen)
    return Triplets(t.sigmas, t.v, t.u, t.converged, t.steps)


def top_singular(op: Any, input_shape: Any, k: int, **options: Any) -> SpectralResult:
    """Top-``k`` singular triplets of a linear/affine ``op`` (see :func:`spectral_norm`).

    ``u`` has shape ``(k, *out_shape)``, ``v`` shape ``(k, *input_shape)``, and
    ``singular_values`` is descending. Options are those of :func:`spectral_norm`.

    >>> import torch
    >>> r = top_singular(torch.nn.Linear(4, 3), (4,), 2)
    >>> r.u.shape, r.v.shape, len(r.singular_values)
    (torch.Size([2, 3]), torch.Size([2, 4]), 2)

    Raises :class:`~lipbound.ZeroOperatorError` for the zero map, whose singular vectors are
    not defined (every unit vector is one): its norm is ``spectral_norm(...).value == 0``.
    """
    r = spectral_norm(op, input_shape, k=k, **options)
    if r.singular_values[0] == 0.0:
        raise ZeroOperatorError(
            "op is the zero map (op(x) - op(0) = 0 on random inputs): its norm is 0 and it has "
            "no singular vectors to return (every unit vector is one). Check the weights (all "
            "zero?); spectral_norm(op, input_shape).value gives the norm, 0."
        )
    return r


def certify_op(op: Any, shape: tuple[int, ...], out_shape: tuple[int, ...], norm: str = "2"
               ) -> tuple[float, str] | None:
    """Internal: the certificate for an already validated op (see :func:`certified_upper`)."""
    return best_certificate(op, shape, out_shape, norm)


def certified_upper(op: Any, input_shape: Any, *, norm: Any = "2") -> tuple[float, str] | None:
    """A certified upper bound on the operator norm of ``op``'s linear part, or ``None``.

    Returns ``(bound, how)``: ``how`` names the certificate (its proof is in
    :mod:`lipbound.spectral.certify`). ``norm`` is ``2`` (default), ``1`` or ``inf``
    (operator norms induced by the l1 / l-inf vector norms; available for dense, conv,
    pooling, BatchNorm, padding layers, their Sequentials and small ops). ``None`` when no
    certificate applies (e.g. a large black-box function).

    >>> import torch
    >>> conv = torch.nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular", bias=False)
    >>> with torch.no_grad():
    ...     _ = conv.weight.fill_(1.0)
    >>> bound, how = certified_upper(conv, (1, 16))  # the all-ones circular kernel: norm 3
    >>> 3.0 <= bound < 3.0 + 1e-9, how.split(",")[0]
    (True, 'dense Jacobian')
    """
    shape = check_input_shape(input_shape)
    n = check_norm(norm, method="certified_upper")
    if isinstance(op, torch.nn.Module):
        op = check_model(op, name="op")
    A: Operator = make_operator(op, shape, dtype=torch.float64, check_linear=True)
    return best_certificate(op, shape, A.out_shape, n)
