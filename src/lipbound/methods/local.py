r"""Local Lipschitz bounds: certified on a ball around each input, witnessed inside it.

For each sample ``x`` of ``inputs``, :func:`local_bound` bounds

.. math:: L_r(f, x) = \sup_{u \ne v,\ \|u - x\| \le r,\ \|v - x\| \le r}
          \frac{\|f(u) - f(v)\|}{\|u - v\|}

(the same norm, l2 or l-inf, on input and output, as the global methods).

Upper bound (certified). On lipbound's own graph (:func:`lipbound.graph.capture` +
:func:`lipbound.graph.simplify`):

1. interval bounds of every intermediate value over the ball
   (:func:`lipbound.local.propagate.forward_boxes`: IBP with the centre/radius form
   ``W c +- |W| r`` for linear nodes and exact l2 row norms for the first affine layers;
   no CROWN-style tightening);
2. from them, each node's local *secant* matrices: per-neuron slope ranges of activations (a
   stable ReLU has slope exactly 0 or 1), and the local rules for products, matmul of two
   inputs, division, exp/log/sqrt/pow, softmax, LayerNorm/RMSNorm
   (:mod:`lipbound.local.rules`, each with its proof);
3. composed backwards from the output rows (:func:`lipbound.local.propagate.backward_rows`,
   and the wrapping-free variant :func:`~lipbound.local.propagate.backward_rows_ball` whose
   new uncertainty at each activation is a dual-norm ball that grows by the layers' certified
   operator norms instead of ``|W|``; the smaller final bound is kept):
   an interval matrix ``[M_c +- M_r]`` containing every secant matrix ``M`` with
   ``f(u) - f(v) = M (u - v)`` for ``u, v`` in the ball. This is the interval-Jacobian
   composition of Fast-Lip (Weng et al., 2018) on an arbitrary DAG: it replaces AutoLip's
   product of scalar constants by the product of the diagonal slope matrices themselves.
   Then ``||f(u) - f(v)|| <= sup_M ||M|| ||u - v||`` with, in l2,
   ``sup ||M||_2 <= min(||M_c||_2 + ||M_r||_2, || |M_c| + M_r ||_2)`` (each a dense certified
   norm, :func:`lipbound.spectral.certify.matrix_norm_upper`: ``|M| <= |M_c| + M_r``
   entry-wise and ``||A||_2 <= || |A| ||_2 <= ||B||_2`` for ``0 <= |A| <= B``), and in l-inf
   ``max_i sum_j (|M_c| + M_r)_{ij}``. For a ReLU net at a point whose neurons are all stable
   over the ball, ``M_r = 0`` and the bound is the exact local Jacobian norm.
4. the result is capped by the global certified AutoLip bound when one exists (a local
   constant is never above the global one).

A remark on the diagonal-slope composition ``|| W2 diag(s) W1 ||`` (``s`` the per-neuron max
``|slope|``): it is NOT a bound in general, because the slopes of a ReLU vary in ``[0, s]``
independently: ``W2 = [1, 1]``, ``W1 = [1, -1]^T``, ``s = (1, 1)`` give
``W2 diag(s) W1 = 0`` while the slopes ``(1, 0)`` give 1. A valid split is
``||W2 diag(sqrt s)|| ||diag(sqrt s) W1||`` (``D = diag(sqrt s) E diag(sqrt s)`` with
``||E|| <= 1``); the interval composition above is tighter still at small radii and is what is
used here.

Lower bound (witnessed). Inside each ball, projected gradient ascent of the pair ratio
``||f(u) - f(v)|| / ||u - v||`` over ``u, v`` (Adam, projection onto the ball) from random
starts, plus the exact Jacobian norms (``||J v|| / ||v||`` with ``v`` the top singular vector,
or the attaining sign vector in l-inf) at ``x`` and at the ascent's end points, all evaluated on
a float64 copy of the model; the best realised value is returned. A Jacobian witness is a lower
bound because its point lies in the open ball.

Limits: CROWN-style backward relaxations of the intermediate bounds are not implemented (so
large radii give loose intervals, hence bounds that fall back to the global one); max-pool,
``scaled_dot_product_attention`` and ``nn.MultiheadAttention`` have no local rule yet.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._validation import check_model, check_norm, check_positive
from ..errors import InvalidArgumentError, LipboundError, ShapeError, UnsupportedModelError
from ..graph import OpGraph, capture, simplify
from ..local.interval import REL64, Box, from_bounds
from ..local.propagate import (
    backward_rows,
    backward_rows_ball,
    check_graph,
    forward_boxes,
    largest_value,
    linear_norms,
)
from ..local.rules import LocalOp
from ..results import LocalResult
from ..rules import NodeConstant
from ..rules._registry import ROUND_REL
from ..spectral.certify import _up, matrix_norm_upper
from .autolip import compose, node_constants
from .lower import _full_jacobian, _norm_of_jac

__all__ = ["certified_linear", "check_inputs", "chunk_size", "local_bound", "prepare"]

_F64 = torch.float64
#: bytes per float64 entry of the per-row adjoints, times the tensors alive in one node's
#: backward step (centre, radius, magnitude, products): the memory model of ``batch_size``.
_LIVE = 8 * 8


def check_inputs(inputs: Any, name: str = "inputs") -> torch.Tensor:
    """``inputs`` as a floating tensor ``(N, *shape)`` with ``N >= 1``, or an error."""
    if not isinstance(inputs, torch.Tensor):
        raise InvalidArgumentError(
            f"{name} must be a torch.Tensor of shape (N, *input_shape); got "
            f"{type(inputs).__name__}")
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        raise ShapeError(
            f"{name} must have shape (N, *input_shape) with N >= 1 (a batch); got "
            f"{tuple(inputs.shape)}. For one sample use inputs[None]")
    if not inputs.is_floating_point():
        raise InvalidArgumentError(f"{name} must be floating point; got {inputs.dtype}")
    if not bool(torch.isfinite(inputs).all()):
        raise InvalidArgumentError(f"{name} contains NaN or infinite entries")
    return inputs


def prepare(model: nn.Module, inputs: torch.Tensor) -> tuple[OpGraph, dict[str, LocalOp]]:
    """The simplified graph of ``model`` on one sample of ``inputs`` and its local rules."""
    graph = simplify(capture(model, tuple(inputs.shape[1:])))
    return graph, check_graph(graph)


def chunk_size(graph: OpGraph, rows: int, batch_size: int, max_memory: int) -> int:
    """Samples per chunk so that ``rows`` adjoints of the largest tensor fit ``max_memory``."""
    per = rows * largest_value(graph) * _LIVE
    fit = max_memory // max(per, 1)
    if fit < 1:
        raise InvalidArgumentError(
            f"one sample needs about {per / 2**20:.1f} MiB of adjoints ({rows} rows x "
            f"{largest_value(graph)} entries of the largest tensor x {_LIVE} bytes), above "
            f"max_memory={max_memory} bytes; raise max_memory (or bound fewer outputs)")
    return max(1, min(int(batch_size), int(fit)))


def certified_linear(graph: OpGraph, cs: dict[str, NodeConstant]) -> dict[str, float]:
    """The certified constants of the linear nodes among AutoLip's node constants ``cs``."""
    return {k: float(c.constants[0]) for k, c in cs.items()
            if graph[k].kind == "linear" and c.certified and c.constants}


def _global(graph: OpGraph, norm: str) -> tuple[float | None, str, dict[str, float]]:
    """AutoLip's certified bound of the graph (``None`` if refused or estimated), a note, and
    the certified linear-node constants (for the ball variant)."""
    try:
        cs = node_constants(graph, norm=norm)
    except UnsupportedModelError as exc:
        first = str(exc).splitlines()[0]
        return None, f"no global bound to cap with (autolip refuses: {first})", linear_norms(
            graph, norm)
    lin = certified_linear(graph, cs)
    if not all(c.certified for c in cs.values()):
        return None, "no global certified bound to cap with (autolip gave an estimate)", lin
    g = compose(graph, cs)
    return g, f"capped by the global certified AutoLip bound {g:.6g}", lin


def interval_norms(J: Box, norm: str, rho: torch.Tensor | None = None) -> torch.Tensor:
    """Certified ``sup ||M||`` over the matrices ``M = C + D`` with ``C`` in the interval
    matrix ``J`` (``(B, R, n)`` boxes) and rows ``d_j`` of ``D`` with ``||d_j||_* <= rho_j``
    (``rho`` ``(B, R)``, zero when ``None``): in l2, ``min(|| |M_c| + M_r ||, ||M_c|| +
    ||M_r||) + ||D||_F`` with ``||D||_2 <= ||D||_F <= sqrt(sum rho_j^2)``; in l-inf (max row
    l1 norm) ``max_j (sum_i (|M_c| + M_r)_{ji} + rho_j)``."""
    out = []
    Mc = J.c.reshape(J.c.shape[0], J.c.shape[1], -1)
    Mr = J.r.reshape(Mc.shape)
    for b in range(Mc.shape[0]):
        A = Mc[b].abs() + Mr[b]
        if norm == "inf":
            rows = A.sum(dim=1) * (1 + 2 * REL64)
            if rho is not None:
                rows = rows + rho[b]
            out.append(_up(float(rows.max()), ROUND_REL))
            continue
        v1 = matrix_norm_upper(A, "2")[0]
        v2 = matrix_norm_upper(Mc[b], "2")[0] + matrix_norm_upper(Mr[b], "2")[0]
        extra = 0.0 if rho is None else float(rho[b].norm()) * (1 + REL64)
        out.append(_up(min(v1, v2) + extra, ROUND_REL))
    return torch.tensor(out, dtype=_F64)


def intersect_rows(J: Box, tangent: Box | None, rows: torch.Tensor) -> Box:
    """``J`` (rows ``w^T M``, ``(B, R, *in)``) intersected with ``w^T T`` from the forward
    tangent box ``T`` (``(B, n_in, *out)``) of the same secant matrices, when there is one:
    both contain ``w^T M`` for every secant matrix ``M``, hence so does the intersection."""
    if tangent is None:
        return J
    B, R = rows.shape[:2]
    w = rows.reshape(B, R, -1).to(_F64)
    Tc = tangent.c.reshape(B, tangent.c.shape[1], -1)  # (B, n_in, K)
    Tr = tangent.r.reshape(Tc.shape)
    c = w @ Tc.transpose(1, 2)
    r = w.abs() @ Tr.transpose(1, 2) + REL64 * (w.abs() @ (Tc.abs() + Tr).transpose(1, 2))
    lo = torch.maximum(J.lo, (c - r).reshape(J.c.shape))
    hi = torch.minimum(J.hi, (c + r).reshape(J.c.shape))
    return from_bounds(torch.minimum(lo, hi), torch.maximum(lo, hi))


def _project(d: torch.Tensor, radius: float, norm: str) -> torch.Tensor:
    """``d`` moved into the open ball of ``radius`` (rows of a ``(B, n)`` tensor)."""
    lim = radius * (1 - 1e-9)
    if norm == "inf":
        return d.clamp(-lim, lim)
    n = d.norm(dim=1, keepdim=True)
    return d * torch.clamp(lim / n.clamp_min(1e-300), max=1.0)


def _model64(model: nn.Module) -> tuple[nn.Module, torch.dtype]:
    try:
        m = copy.deepcopy(model).double().eval()
        return m, _F64
    except (RuntimeError, TypeError, ValueError, copy.Error):  # pragma: no cover - exotic
        dt = next((t.dtype for t in model.parameters() if t.is_floating_point()), _F64)
        return model, dt


def _pnorm(t: torch.Tensor, norm: str) -> torch.Tensor:
    return t.norm(dim=1) if norm == "2" else t.abs().amax(dim=1)


def witness(model: nn.Module, x: torch.Tensor, radius: float, norm: str, *, steps: int = 30,
            restarts: int = 2, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Witnessed lower bounds inside each ball (module docstring): ``(values, hows)``."""
    m64, dt = _model64(model)
    shape = tuple(x.shape[1:])
    B = x.shape[0]
    xf = x.detach().to(dt).reshape(B, -1)

    def f(z: torch.Tensor) -> torch.Tensor:
        out = m64(z.reshape(z.shape[0], *shape).clone())
        return out.reshape(out.shape[0], -1)

    with torch.no_grad():
        m_out = f(xf[:1]).shape[1]
    best = torch.zeros(B, dtype=_F64)
    how = ["none"] * B
    pts = [xf]
    g = torch.Generator().manual_seed(seed)
    for _ in range(max(0, restarts)):
        d1 = _project(torch.randn(B, xf.shape[1], generator=g, dtype=dt) * radius, radius, norm)
        d2 = _project(torch.randn(B, xf.shape[1], generator=g, dtype=dt) * radius, radius, norm)
        d1.requires_grad_(True)
        d2.requires_grad_(True)
        opt = torch.optim.Adam([d1, d2], lr=0.1 * radius)
        for _ in range(max(0, steps)):
            opt.zero_grad(set_to_none=True)
            u, v = xf + d1, xf + d2
            num = _pnorm(f(u) - f(v), norm)
            den = _pnorm(u - v, norm).clamp_min(1e-300)
            loss = -torch.log(num.clamp_min(1e-300) / den).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            with torch.no_grad():
                d1.copy_(_project(d1, radius, norm))
                d2.copy_(_project(d2, radius, norm))
        with torch.no_grad():
            u, v = xf + d1.detach(), xf + d2.detach()
            den = _pnorm(u - v, norm)
            ok = den > 1e-6 * radius  # a ratio of near-equal points is rounding noise
            ratio = torch.where(ok, _pnorm(f(u) - f(v), norm) / den.clamp_min(1e-300),
                                torch.zeros_like(den)).to(_F64)
            for i in range(B):
                if float(ratio[i]) > float(best[i]):
                    best[i] = ratio[i]
                    how[i] = "pair ratio in the ball"
        pts.extend([u, v])
    if m_out <= 64:
        for p in pts:
            try:
                vals, _ = _norm_of_jac(_full_jacobian(f, p.detach(), m_out), norm if norm ==
                                       "inf" else "2")
            except RuntimeError:  # pragma: no cover - ops without a backward
                continue
            vals = vals.detach().to(_F64)
            for i in range(B):
                if float(vals[i]) > float(best[i]):
                    best[i] = vals[i]
                    how[i] = "Jacobian norm in the ball"
    return best, how


def local_bound(
    model: nn.Module,
    inputs: torch.Tensor,
    radius: float,
    *,
    norm: Any = 2,
    batch_size: int = 32,
    lower: bool = True,
    steps: int = 30,
    restarts: int = 2,
    use_global: bool = True,
    max_memory: int = 1 << 30,
    refine: int = 1 << 19,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> LocalResult:
    """Certified upper and witnessed lower bounds of the local Lipschitz constant.

    ``inputs`` is a batch ``(N, *input_shape)``; ``radius`` the ball radius in ``norm``
    (2 or ``"inf"``; the same norm on the output). Returns a :class:`LocalResult` with one
    ``upper`` (certified) and ``lower`` (witness, when ``lower=True``) per sample; see the
    module docstring for the method and its proof. ``batch_size`` samples are bounded at
    once, fewer if their adjoints (output size x largest tensor x 64 bytes each) would exceed
    ``max_memory`` bytes; ``use_global=False`` skips the cap by the global AutoLip bound.
    ``progress`` receives one line per chunk.

    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(3, 2)
    >>> r = local_bound(lin, torch.randn(2, 3), 0.1, lower=False)
    >>> w = float(torch.linalg.matrix_norm(lin.weight.detach().double(), 2))
    >>> all(w <= u <= w * (1 + 1e-5) for u in r.upper)
    True
    """
    t0, c0 = time.perf_counter(), time.process_time()
    model = check_model(model, require_eval=True)
    n = check_norm(norm, allowed=("2", "inf"), method="local_bound")
    x = check_inputs(inputs)
    check_positive("radius", radius)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("max_memory", max_memory, integer=True)
    graph, ops = prepare(model, x)
    out_shape = tuple(graph[graph.output.inputs[0]].out_shape)
    K = math.prod(out_shape)
    notes: list[str] = []
    glob, note, lin = _global(graph, n)
    if not use_global:
        glob, note = None, "global cap not used"
    notes.append(note)
    chunk = chunk_size(graph, K, batch_size, max_memory)
    uppers: list[torch.Tensor] = []
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        tans: dict[str, Box | None] = {}
        boxes = forward_boxes(graph, xb, float(radius), n, ops, refine=refine, tangents=tans)
        rows = torch.eye(K, dtype=_F64, device=xb.device).reshape(K, *out_shape)
        rows = rows.unsqueeze(0).expand(xb.shape[0], *rows.shape)
        J = intersect_rows(backward_rows(graph, boxes, rows, ops),
                           tans.get(graph.output.name), rows)
        Jb, rho = backward_rows_ball(graph, boxes, rows, ops, n, lin)
        uppers.append(torch.minimum(interval_norms(J, n), interval_norms(Jb, n, rho)))
        if progress is not None:
            progress(f"local_bound: {min(s + chunk, x.shape[0])}/{x.shape[0]} samples")
    interval = torch.cat(uppers)
    upper = interval if glob is None else torch.clamp(interval, max=glob)
    low: tuple[float, ...] | None = None
    hows: list[str] = []
    if lower:
        vals = []
        for s in range(0, x.shape[0], chunk):
            v, h = witness(model, x[s:s + chunk], float(radius), n, steps=steps,
                           restarts=restarts, seed=seed)
            vals.append(v)
            hows.extend(h)
        low = tuple(float(v) for v in torch.cat(vals))
        if any(lo > up for lo, up in zip(low, upper.tolist())):  # pragma: no cover - a bug
            raise LipboundError(
                "a witnessed lower bound exceeds the certified upper bound: please report "
                "this model (it is a soundness bug)")
    ups = tuple(float(u) for u in upper)
    return LocalResult(
        upper=ups,
        lower=low,
        value=ups,
        certified=True,
        method="local (interval secant Jacobian)",
        norm=n,
        radius=float(radius),
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - c0,
        notes=tuple(notes),
        extra={"interval": tuple(float(v) for v in interval), "global": glob,
               "lower_how": tuple(hows), "graph": graph},
    )
