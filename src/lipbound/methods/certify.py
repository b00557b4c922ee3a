r"""Certified robustness from Lipschitz bounds on the logit differences.

A sample ``x`` with label ``y`` is certified at radius ``eps`` when every ``z`` with
``||z - x|| <= eps`` is classified ``y``: for every ``j != y``, ``g_j(z) = f_y(z) - f_j(z)``
stays ``> 0``. With ``L_j`` a Lipschitz constant of ``g_j`` on the ball (input norm ``||.||``,
output ``|.|``), ``g_j(z) >= g_j(x) - L_j ||z - x|| >= g_j(x) - eps L_j``, so

.. math:: g_j(x) > \varepsilon L_j \ \text{for all}\ j \ne y

certifies ``x``. ``L_j`` is the constant of ``x -> w^T f(x)`` with the difference row
``w = e_y - e_j``, which is tighter than ``sqrt(2) L(f)``:

* for a row vector ``m = w^T M`` (``M`` a secant matrix, ``g(u) - g(v) = m (u - v)``),
  Hoelder gives ``|m (u - v)| <= ||m||_2 ||u - v||_2`` for the l2 ball and
  ``<= ||m||_1 ||u - v||_inf`` for the l-inf ball: the norm pairs are (2 -> |.|) = l2 norm of
  the row and (inf -> |.|) = l1 norm of the row (``||grad||_1``);
* ``method="local"``: ``m`` ranges over the interval row ``[m_c +- m_r]`` propagated backward
  from ``w`` over the ball (:func:`lipbound.local.propagate.backward_rows`), so
  ``L_j = || |m_c| + m_r ||_2`` (l2) or ``sum |m_c| + m_r`` (l-inf); with the ball variant
  (:func:`~lipbound.local.propagate.backward_rows_ball`, rows ``c + b + d``,
  ``||d||_* <= rho``) ``L_j = || |c| + r ||_* + rho``; and, when the forward tangents fit
  ``options.refine``, the telescoped bound of :mod:`lipbound.local.telescope` for the one-row
  matrix ``w^T M`` (a one-row matrix's l2 / l-inf operator norm is its row's l2 / l1 norm);
  the smallest, capped by the global one below when it exists (each is valid, hence their
  minimum). The boxes are those of :func:`lipbound.local_bound` (CROWN within
  ``options.crown``); on graphs with residual cuts (``options.split``), also the row bound
  composed ball to ball over the best chain of cuts (:func:`lipbound.local.compose.
  composed_rows`, its proof: the last segment's row bound times the certified bound up to
  its cut);
* ``method="global"``: AutoLip's per-node certified constants (:func:`~lipbound.methods.
  autolip.node_constants`) composed up to the input of the last affine node ``W`` (bound
  ``L_h``), times the exact ``||W^T w||_2`` (l2) or ``||W^T w||_1`` (l-inf) of that node's
  difference row: ``|w^T W (h(u) - h(v))| <= ||W^T w||_* ||h(u) - h(v)||``. When the model
  does not end with an affine node, ``L_j = ||w||_* L(f)`` (``sqrt 2`` in l2, ``2 = ||w||_1``
  against the l-inf output norm).

The margins ``g_j(x)`` are proven lower bounds: the float64 interval evaluation of the graph
at the point ``x`` (radius 0), ``(f_y - r_y) - (f_j + r_j)``. A tie (margin 0) or a
misclassified point is never certified; the comparison ``g_j - eps L_j`` must exceed
``ROUND_REL (|g_j| + eps L_j)`` to cover its own rounding.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._validation import check_choice, check_norm, check_positive
from ..analysis import Analysis, analysis_of
from ..errors import InvalidArgumentError, ShapeError, UnsupportedModelError
from ..graph import OpGraph
from ..local.bounds import (
    LocalOptions,
    certified_linear,
    check_inputs,
    chunk_size,
)
from ..local.compose import composed_rows, row_bounds, row_norms
from ..local.interval import Box, precision
from ..local.linear import linear_parts
from ..local.propagate import (
    check_graph,
    forward_boxes,
    largest_value,
    linear_norms,
)
from ..local.rules import LocalOp
from ..results import CertifyResult
from ..rules import ROUND_REL, NodeConstant
from ..spectral.certify import round_up
from .autolip import node_bounds, node_constants

__all__ = ["certify", "pair_constants_global", "row_norms"]

_F64 = torch.float64


def _labels(labels: Any, n: int, k: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidArgumentError(
                f"labels must be a 1-D integer tensor; got {type(labels).__name__}") from exc
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ShapeError(f"labels must have shape ({n},) (one per input); got "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise InvalidArgumentError(f"labels must be integers; got dtype {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise InvalidArgumentError(
            f"labels must lie in [0, {k - 1}] (the model has {k} outputs); got values in "
            f"[{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def _diff_rows(k: int, y: torch.Tensor) -> torch.Tensor:
    """``(B, k - 1, k)``: rows ``e_y - e_j`` for ``j != y`` (in increasing ``j``)."""
    eye = torch.eye(k, dtype=_F64)
    rows = eye[y][:, None, :] - eye[None, :, :]  # (B, k, k): row j is e_y - e_j
    keep = torch.ones(y.shape[0], k, dtype=torch.bool)
    keep[torch.arange(y.shape[0]), y] = False
    return rows[keep].reshape(y.shape[0], k - 1, k)


def _others(k: int, y: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(k).expand(y.shape[0], k)
    keep = idx != y[:, None]
    return idx[keep].reshape(y.shape[0], k - 1)


def pair_constants_global(graph: OpGraph, norm: str, cs: dict[str, NodeConstant] | None = None
                          ) -> tuple[torch.Tensor | None, str]:
    """``(K, K)`` certified global constants of ``x -> f_y(x) - f_j(x)`` (module docstring),
    or ``None`` with the reason (``cs``: AutoLip's node constants, computed when ``None``)."""
    if cs is None:
        try:
            cs = node_constants(graph, norm=norm)
        except UnsupportedModelError as exc:
            return None, f"no global constants (autolip refuses: {str(exc).splitlines()[0]})"
    unc = [c.qualname for c in cs.values() if not c.certified]
    if unc:
        return None, "no certified global constants (estimates for " + ", ".join(unc) + ")"
    bounds = node_bounds(graph, cs)
    last = graph[graph.output.inputs[0]]
    k = math.prod(last.out_shape)
    eye = torch.eye(k, dtype=_F64)
    rows = (eye[:, None, :] - eye[None, :, :]).reshape(k * k, *last.out_shape)
    if last.kind == "linear":
        try:
            parts = linear_parts(last)
        except UnsupportedModelError:
            parts = []
        if parts:
            box = Box(rows, torch.zeros_like(rows))
            for p in reversed(parts):
                box = p.backward(box)
            a = (box.c.abs() + box.r).reshape(k * k, -1)
            wn = a.norm(dim=1) if norm == "2" else a.sum(dim=1)
            L_h = bounds[last.inputs[0]]
            vals = [round_up(float(v) * (1 + ROUND_REL) * L_h, ROUND_REL) for v in wn]
            return torch.tensor(vals, dtype=_F64).reshape(k, k), (
                "global: AutoLip up to the last affine node x ||W^T (e_y - e_j)||")
    L = bounds[last.name]
    factor = math.sqrt(2.0) if norm == "2" else 2.0
    return torch.full((k, k), round_up(factor * L, ROUND_REL), dtype=_F64), (
        "global: ||e_y - e_j||_* x AutoLip bound")


def _margins(out: Box, y: torch.Tensor, k: int) -> torch.Tensor:
    """Proven lower bounds ``(B, k - 1)`` on ``f_y - f_j`` from the output box."""
    c = out.c.reshape(out.c.shape[0], -1)
    r = out.r.reshape(c.shape)
    b = torch.arange(c.shape[0])
    lo_y = (c[b, y] - r[b, y])[:, None]
    hi = c + r
    oth = _others(k, y)
    return lo_y - hi.gather(1, oth)


@dataclass
class _Plan:
    """What :func:`certify` computes once per call: the graph, its local rules (``None`` when
    some node has none), the global pair constants, the linear nodes' norms, notes."""

    graph: OpGraph
    ops: dict[str, LocalOp] | None
    G: torch.Tensor | None
    lin: dict[str, float]
    notes: list[str]
    k: int
    out_shape: tuple[int, ...]


def _plan(model: nn.Module | Analysis, x: torch.Tensor, n: str, method: str) -> _Plan:
    an, _ = analysis_of(model, tuple(x.shape[1:]))
    graph = an.graph
    out_shape = tuple(graph[graph.output.inputs[0]].out_shape)
    k = math.prod(out_shape)
    if k < 2:
        raise ShapeError(f"certify needs a classifier with >= 2 outputs; the model has {k}")
    try:
        cs: dict[str, NodeConstant] | None = an.constants(norm=n)
    except UnsupportedModelError as exc:
        cs = None
        G, note = None, f"no global constants (autolip refuses: {str(exc).splitlines()[0]})"
    if cs is not None:
        G, note = pair_constants_global(graph, n, cs)
    notes = [note]
    ops: dict[str, LocalOp] | None
    try:
        ops = check_graph(graph)
    except UnsupportedModelError:
        if method == "local":
            raise
        ops = None
        notes.append("margins from a float64 evaluation (some nodes have no local rule for an "
                     "interval evaluation), shrunk by the relative margin ROUND_REL")
    if method == "global" and G is None:
        raise UnsupportedModelError([], what=f"certify(method='global'): {note}")
    lin: dict[str, float] = {}
    if method == "local":
        lin = certified_linear(graph, cs) if cs is not None else linear_norms(graph, n)
    return _Plan(graph, ops, G, lin, notes, k, out_shape)


def _chunk(plan: _Plan, xb: torch.Tensor, yb: torch.Tensor, *, radius: float, n: str,
           method: str, opts: LocalOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Proven margins and pair constants ``(B, k - 1)`` of one chunk."""
    graph, ops, k = plan.graph, plan.ops, plan.k
    if ops is not None:
        m = _margins(forward_boxes(graph, xb, 0.0, n, ops)[graph.output.name], yb, k)
    else:  # float64 evaluation, margins shrunk by the relative rounding margin
        with torch.no_grad():
            out = _eval64(graph, xb)
        m = _margins(Box(out, ROUND_REL * out.abs() + 1e-300), yb, k)
    L_g = plan.G[yb[:, None], _others(k, yb)] if plan.G is not None else None
    if method == "local" and ops is not None:
        L = _local_rows(plan, ops, xb, yb, radius=radius, n=n, opts=opts)
        return m, (L if L_g is None else torch.minimum(L, L_g))
    if L_g is None:  # pragma: no cover - refused by _plan
        raise UnsupportedModelError([], what="certify(method='global'): no global constants")
    return m, L_g


def _local_rows(plan: _Plan, ops: dict[str, LocalOp], xb: torch.Tensor, yb: torch.Tensor, *,
                radius: float, n: str, opts: LocalOptions) -> torch.Tensor:
    """Local pair constants ``(B, k - 1)``: per row the bound of
    :func:`lipbound.local.compose.row_bounds` on the ball, and, on graphs with residual cuts,
    the smaller one composed ball to ball over them (:func:`~lipbound.local.compose.
    composed_rows`, its proof; ``opts.split``)."""
    rows = _diff_rows(plan.k, yb).reshape(xb.shape[0], plan.k - 1, *plan.out_shape)
    L = row_bounds(plan.graph, ops, xb, rows, radius=radius, n=n, lin=plan.lin, opts=opts,
                   notes=plan.notes)
    comp = composed_rows(plan.graph, ops, xb, rows, radius=radius, n=n, lin=plan.lin,
                         chunk=xb.shape[0], opts=opts)
    if comp is not None:
        if bool((comp < L).any()):
            plan.notes.append("pair constants composed over the residual cuts where smaller "
                              "(lipbound.local.split)")
        L = torch.minimum(L, comp)
    return L


def certify(
    model: nn.Module | Analysis,
    inputs: torch.Tensor,
    labels: Any,
    radius: float,
    *,
    norm: Any = 2,
    method: str = "local",
    batch_size: int = 32,
    options: LocalOptions | None = None,
) -> CertifyResult:
    """Which samples are certified robust at ``radius`` (l2 or l-inf ball), and how.

    ``method="local"``: local constants of the logit differences over each ball (interval
    secant Jacobians, capped by the global constants when AutoLip has them); ``"global"``:
    AutoLip's certified constants of the logit differences. See the module docstring for the
    proof. ``batch_size`` samples at once (fewer if ``options.max_memory`` requires);
    ``options`` (:class:`~lipbound.local.bounds.LocalOptions`): refinement, memory, progress.
    Returns a :class:`~lipbound.results.CertifyResult` (per-sample certified, margin, the
    constant that decided, and the certified accuracy). ``model`` may be a
    :class:`~lipbound.analysis.Analysis` built at the shape of one sample (graph and AutoLip
    constants reused, as in :func:`lipbound.local_bound`).

    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    >>> r = certify(lin, torch.tensor([[1.0, 0.0]]), torch.tensor([0]), 0.75, method="global")
    >>> r.robust, round(r.margin[0], 6), round(r.constant[0], 5)  # 1 < 0.75 sqrt 2
    ((False,), 1.0, 1.41421)
    """
    t0, c0 = time.perf_counter(), time.process_time()
    opts = (options or LocalOptions()).check()
    n = check_norm(norm, allowed=("2", "inf"), method="certify")
    check_choice("method", method, ("local", "global"))
    x = check_inputs(inputs)
    check_positive("radius", radius, allow_zero=True)
    check_positive("batch_size", batch_size, integer=True)
    plan = _plan(model, x, n, method)
    y = _labels(labels, x.shape[0], plan.k)
    chunk = chunk_size(plan.graph, plan.k - 1, batch_size, opts.max_memory)
    margins, bounds = [], []
    with precision(largest_value(plan.graph)):  # the graph's own rounding pad
        for s in range(0, x.shape[0], chunk):
            m, L = _chunk(plan, x[s:s + chunk], y[s:s + chunk], radius=float(radius), n=n,
                          method=method, opts=opts)
            margins.append(m)
            bounds.append(L)
            opts.say(f"certify: {min(s + chunk, x.shape[0])}/{x.shape[0]} samples")
    return _result(torch.cat(margins), torch.cat(bounds), y, plan, radius=float(radius), n=n,
                   method=method, times=(time.perf_counter() - t0, time.process_time() - c0))


def _result(M: torch.Tensor, L: torch.Tensor, y: torch.Tensor, plan: _Plan, *, radius: float,
            n: str, method: str, times: tuple[float, float]) -> CertifyResult:
    slack = M - radius * L
    ok = slack > ROUND_REL * (M.abs() + radius * L)
    correct = M.min(dim=1).values > 0
    certified = ok.all(dim=1) & correct
    worst = slack.argmin(dim=1)
    oth = _others(plan.k, y)
    rows_i = torch.arange(M.shape[0])
    N = M.shape[0]
    return CertifyResult(
        robust=tuple(bool(v) for v in certified),
        correct=tuple(bool(v) for v in correct),
        margin=tuple(float(v) for v in M.min(dim=1).values),
        constant=tuple(float(v) for v in L[rows_i, worst]),
        runner_up=tuple(int(v) for v in oth[rows_i, worst]),
        certified_accuracy=float(certified.sum()) / N,
        accuracy=float(correct.sum()) / N,
        method=method,
        how=("local constants of the logit differences over each ball (interval secant rows)"
             if method == "local" else
             "global constants of the logit differences (AutoLip's certified node constants)"),
        norm=n,
        radius=radius,
        seconds=times[0],
        cpu_seconds=times[1],
        notes=tuple(dict.fromkeys(plan.notes)),
        extra={"margins": M, "constants": L},
    )


def _eval64(graph: OpGraph, x: torch.Tensor) -> torch.Tensor:
    """The graph evaluated in float64 at ``x`` (node functions cast their parameters)."""
    vals: dict[str, torch.Tensor] = {}
    for node in graph:
        if node.kind == "input":
            vals[node.name] = x.detach().to(_F64)
        elif node.kind == "output":
            vals[node.name] = vals[node.inputs[0]]
        else:
            vals[node.name] = node.fn(*[vals[p] for p in node.inputs])
    return vals[graph.output.name].reshape(x.shape[0], -1)
