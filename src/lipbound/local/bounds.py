"""Helpers shared by :func:`lipbound.local_bound` and :func:`lipbound.certify`: input checks,
memory sizing, certified norms of interval matrices, and the witness search inside a ball."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._validation import check_positive
from ..errors import InvalidArgumentError, ShapeError
from ..graph import OpGraph
from ..results import Witness
from ..rules import ROUND_REL, NodeConstant
from ..spectral.certify import matrix_norm_upper, round_up
from .interval import Box, from_bounds, rel64
from .propagate import largest_value

__all__ = ["LocalOptions", "certified_linear", "check_inputs", "chunk_size", "intersect_rows",
           "interval_norms", "witness"]

_F64 = torch.float64


@dataclass(frozen=True)
class LocalOptions:
    """Options of :func:`lipbound.local_bound` and :func:`lipbound.certify`.

    ``max_memory``: bytes of adjoints per chunk (the chunk shrinks below ``batch_size`` to fit;
    an error names the numbers when one sample does not fit); ``refine``: forward tangent boxes
    and mean-value refinement when the graph's tangents have at most that many entries per
    sample (``0``: none); ``crown``: CROWN-style back-substituted bounds for the values read
    by non-linear rules that need at most that many rows per sample (``0``, the default: plain
    IBP, fast; e.g. ``1 << 13``: much tighter boxes, above all at l-inf radii, at tens of times
    the cost per image, see the CHANGELOG; the nodes above the budget keep their IBP box, with
    a note); ``use_global``: cap by AutoLip's certified bound
    when it exists; ``split``: also compose the bound ball to ball over the graph's residual
    cuts (:mod:`lipbound.local.split`; one more pass per segment and sample, only on graphs
    with residual blocks) and keep the smaller;
    ``steps`` / ``restarts`` / ``seed``: the witness search (pair ascent in the ball);
    ``progress``: called with one line per chunk.
    """

    max_memory: int = 1 << 30
    refine: int = 1 << 19
    crown: int = 0
    use_global: bool = True
    split: bool = True
    steps: int = 30
    restarts: int = 2
    seed: int = 0
    progress: Callable[[str], None] | None = None

    def check(self) -> LocalOptions:
        check_positive("max_memory", self.max_memory, integer=True)
        check_positive("refine", self.refine, integer=True, allow_zero=True)
        check_positive("crown", self.crown, integer=True, allow_zero=True)
        check_positive("steps", self.steps, integer=True, allow_zero=True)
        check_positive("restarts", self.restarts, integer=True, allow_zero=True)
        return self

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)
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
            rows = A.sum(dim=1) * (1 + 2 * rel64())
            if rho is not None:
                rows = rows + rho[b]
            out.append(round_up(float(rows.max()), ROUND_REL))
            continue
        v1 = matrix_norm_upper(A, "2")[0]
        v2 = matrix_norm_upper(Mc[b], "2")[0] + matrix_norm_upper(Mr[b], "2")[0]
        extra = 0.0 if rho is None else float(rho[b].norm()) * (1 + rel64())
        out.append(round_up(min(v1, v2) + extra, ROUND_REL))
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
    r = w.abs() @ Tr.transpose(1, 2) + rel64() * (w.abs() @ (Tc.abs() + Tr).transpose(1, 2))
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


def _jacobian_norms(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, m: int,
                    norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Realised ``||J v|| / ||v||`` per row of ``x`` with ``v`` attaining ``||J||``: the top
    right singular vector (l2) or the sign vector of the largest row (l-inf); ``J`` from ``m``
    vector-Jacobian products. The value is computed from ``v``, so it is realised whatever the
    accuracy of the SVD. Returns ``(values, v)``."""
    z = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = f(z)
        rows = [torch.autograd.grad(out[:, i].sum(), z, retain_graph=i < m - 1)[0]
                for i in range(m)]
    J = torch.stack(rows, dim=1).detach().to(_F64)  # (B, m, n)
    if norm == "2":
        v = torch.linalg.svd(J, full_matrices=False)[2][:, 0, :]
        return (J @ v[:, :, None])[:, :, 0].norm(dim=1) / v.norm(dim=1).clamp_min(1e-300), v
    row_sums = J.abs().sum(dim=2)
    i = row_sums.argmax(dim=1)
    v = torch.sign(J[torch.arange(J.shape[0]), i])
    v = torch.where(v == 0, torch.ones_like(v), v)
    return (J @ v[:, :, None])[:, :, 0].abs().amax(dim=1), v


def witness(model: nn.Module, x: torch.Tensor, radius: float, norm: str, *, steps: int = 30,
            restarts: int = 2, seed: int = 0
            ) -> tuple[torch.Tensor, list[str], list[Witness | None]]:
    """Witnessed lower bounds inside each ball (module docstring): ``(values, hows,
    witnesses)``, each :class:`~lipbound.results.Witness` (float64, shaped like one sample)
    reproducing its value: a pair ``x, y`` in the ball or a point ``x`` and a direction
    (``None`` where nothing above 0 was found)."""
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
    wit: list[Witness | None] = [None] * B
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
            loss.backward()
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
                    wit[i] = Witness(kind="pair", x=_sample(u[i], shape), y=_sample(v[i], shape))
        pts.extend([u, v])
    if m_out <= 64:
        for p in pts:
            try:
                vals, dirs = _jacobian_norms(f, p.detach(), m_out, norm)
            except RuntimeError:  # pragma: no cover - ops without a backward
                continue
            for i in range(B):
                if float(vals[i]) > float(best[i]):
                    best[i] = vals[i]
                    how[i] = "Jacobian norm in the ball"
                    wit[i] = Witness(kind="jacobian", x=_sample(p[i], shape),
                                     direction=_sample(dirs[i], shape))
    return best, how, wit


def _sample(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """One flat row as a float64 tensor shaped like a sample (detached, on the CPU)."""
    return t.detach().to(_F64).reshape(shape).cpu()


