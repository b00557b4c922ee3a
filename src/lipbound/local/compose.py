r"""The chunked local bounds of :func:`lipbound.local_bound` and :func:`lipbound.certify`, and
their composition ball to ball over residual cuts (:mod:`lipbound.local.split`, its proof).

:func:`uppers`: the interval / ball / telescoped bounds of the whole output, sample by sample
(the smallest); :func:`row_bounds`: the same three bounds for given rows ``w`` (``sup
||w^T M||_*`` per row, the logit differences of :func:`lipbound.certify`); :func:`composed`
and :func:`composed_rows`: those bounds composed over the best chain of residual segments.
The proofs are in :mod:`lipbound.methods.local` (the bounds) and :mod:`lipbound.local.split`
(the composition).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..graph import OpGraph
from ..rules import ROUND_REL
from ..spectral.certify import round_up
from .bounds import LocalOptions, intersect_rows, interval_norms
from .crown import CrownBudget
from .factors import node_factors
from .interval import Box
from .propagate import backward_rows, backward_rows_ball, forward_boxes
from .rules import LocalOp
from .split import residual_cuts, segment
from .telescope import Pass, point_pass, telescoped_norms, telescoped_rows

__all__ = ["Chain", "MAX_CUTS", "composed", "composed_rows", "row_bounds", "row_norms",
           "telescoped", "uppers"]

_F64 = torch.float64

#: residual cuts tried by the ball-to-ball composition (the best chain of segments is searched
#: over all pairs of cuts: quadratic cost)
MAX_CUTS = 8


def uppers(  # noqa: PLR0913 - the chunk loop of local_bound and of each residual segment
    graph: OpGraph, ops: dict[str, LocalOp], x: torch.Tensor, *, radius: float, n: str,
    lin: dict[str, float], chunk: int, opts: LocalOptions, telescope: bool = True,
    factors: dict[str, tuple[list[torch.Tensor], str]] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """The interval / ball / telescoped bounds of every sample (the smallest; ``telescope``:
    whether to try the telescoped one), chunk by chunk, and the notes of the nodes left at
    their IBP boxes; ``factors``, if given, receives each node's per-sample local constants
    (:func:`lipbound.local.factors.node_factors`), one tensor per chunk."""
    budget = CrownBudget(opts.crown, opts.max_memory)
    out_shape = tuple(graph[graph.output.inputs[0]].out_shape)
    K = math.prod(out_shape)
    outs: list[torch.Tensor] = []
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        tans: dict[str, Box | None] = {}
        boxes = forward_boxes(graph, xb, radius, n, ops, refine=opts.refine, tangents=tans,
                              crown=budget)
        if factors is not None:
            for name, (v, how) in node_factors(graph, ops, boxes, lin, n,
                                               opts.max_memory).items():
                factors.setdefault(name, ([], how))[0].append(v)
        rows = torch.eye(K, dtype=_F64, device=xb.device).reshape(K, *out_shape)
        rows = rows.unsqueeze(0).expand(xb.shape[0], *rows.shape)
        sec = _secant_rows(graph, ops, boxes, tans, rows, n=n, lin=lin)
        up = torch.minimum(interval_norms(sec.J, n), interval_norms(sec.Jb, n, sec.rho))
        if sec.ball is not None and telescope:
            up = torch.minimum(up, telescoped(graph, ops, xb, n, rows, opts, ball=sec.ball))
        outs.append(up)
        opts.say(f"local_bound: {min(s + chunk, x.shape[0])}/{x.shape[0]} samples")
    return torch.cat(outs), budget.notes


def _search(graph: OpGraph, ops: dict[str, LocalOp], x: torch.Tensor, *, radius: float,
            n: str, lin: dict[str, float], chunk: int, opts: LocalOptions
            ) -> tuple[Chain, list[str | None], list[int], list[list[float]]] | None:
    """The best chain of residual segments: ``(chain context, ends, chain, best)`` with
    ``ends`` the cut list framed by ``None`` (input, output), ``chain`` the indices of the
    chosen ends from 0 to the last, ``best[j][b]`` the smallest certified bound found from the
    input to ``ends[j]`` for sample ``b``; ``None`` without cuts or with ``opts.split`` off."""
    cuts = residual_cuts(graph) if opts.split else []
    if not cuts:
        return None
    if len(cuts) > MAX_CUTS:  # evenly spread: the search below is quadratic in the cuts
        cuts = [cuts[round(i * (len(cuts) - 1) / (MAX_CUTS - 1))] for i in range(MAX_CUTS)]
    ctx = Chain(graph, ops, x, forward_boxes(graph, x, 0.0, n, ops), radius=radius, n=n,
                lin=lin, chunk=chunk, opts=replace(opts, progress=None))
    ends: list[str | None] = [None, *cuts, None]
    B, m = x.shape[0], len(ends)
    # best[j][b] over chains of segments without the telescoped bound (cheap); prev[j]: the
    # cut before j on the chain that is best over the samples (sum of log bounds)
    best = [[1.0] * B] + [[math.inf] * B for _ in range(m - 1)]
    prev = [0] * m
    for j in range(1, m):
        score = math.inf
        for i in range(j):
            if i == 0 and j == m - 1:
                continue  # the uncut bound: the caller's
            us = ctx.segment_uppers(ends[i], ends[j], best[i])
            via = [round_up(p * u) for p, u in zip(best[i], us)]
            best[j] = [min(o, v) for o, v in zip(best[j], via)]
            s = sum(math.log(max(v, 1e-300)) for v in via)
            if s < score:
                score, prev[j] = s, i
        opts.say(f"local: residual cut {j}/{m - 1}")
    chain = [m - 1]
    while chain[-1] != 0:
        chain.append(prev[chain[-1]])
    chain.reverse()
    return ctx, ends, chain, best


def _telescoped_prefix(ctx: Chain, ends: list[str | None], chain: list[int],
                       best: list[list[float]], stop: int) -> list[float]:
    """Per sample, the bound from the input to ``ends[chain[stop]]`` along ``chain`` with the
    telescoped bound on every segment, each ball's radius from the smaller of the two
    certified bounds up to its cut."""
    tele = [1.0] * ctx.x.shape[0]
    for i, j in itertools.pairwise(chain[:stop + 1]):
        before = [min(a, b) for a, b in zip(tele, best[i])] if i else tele
        us = ctx.segment_uppers(ends[i], ends[j], before, telescope=True)
        tele = [round_up(p * u) for p, u in zip(before, us)]
    return tele


def composed(graph: OpGraph, ops: dict[str, LocalOp], x: torch.Tensor, *, radius: float,
             n: str, lin: dict[str, float], chunk: int, opts: LocalOptions
             ) -> tuple[torch.Tensor, int] | None:
    """The bound composed ball to ball over the graph's residual cuts and the number of cuts
    used (:mod:`lipbound.local.split`, its proof; ``None`` without cuts or with
    ``opts.split`` off): the first segment on the ball of ``radius``, each later one on the
    ball around its cut's computed centre of radius ``(product so far) radius + ||e||``
    (:meth:`Chain.segment_uppers`), ``e`` the centre's rounding radius; the best chain
    (:func:`_search`), then that chain again with the telescoped bounds."""
    found = _search(graph, ops, x, radius=radius, n=n, lin=lin, chunk=chunk, opts=opts)
    if found is None:
        return None
    ctx, ends, chain, best = found
    tele = _telescoped_prefix(ctx, ends, chain, best, len(chain) - 1)
    return torch.tensor([min(a, b) for a, b in zip(best[-1], tele)], dtype=_F64,
                        device=x.device), len(ends) - 2


def composed_rows(  # noqa: PLR0913 - the chunk context of composed, plus the rows
    graph: OpGraph, ops: dict[str, LocalOp], x: torch.Tensor, rows: torch.Tensor, *,
    radius: float, n: str, lin: dict[str, float], chunk: int, opts: LocalOptions,
) -> torch.Tensor | None:
    r"""Per-row bounds ``(B, R)`` on ``sup ||w^T M||_*`` composed over the best chain of
    residual segments (``rows`` ``(B, R, *output)``; ``None`` without cuts or with
    ``opts.split`` off).

    **Proof.** Let the chain end with the cut ``h`` and the last segment ``g`` (``f = g o
    h`` on the ball). For ``u, v`` in the ball of ``radius`` around ``x``, :func:`composed`'s
    argument puts ``h(u), h(v)`` in the ball ``B_h`` around ``h``'s computed centre of radius
    ``P radius + ||e||`` with ``||h(u) - h(v)|| <= P ||u - v||``, ``P`` the certified bound
    up to ``h`` (the smaller of the chain's two, as in :func:`_telescoped_prefix`). On
    ``B_h``, :func:`row_bounds` gives ``|w^T (g(a) - g(b))| <= c_w ||a - b||``. Hence
    ``|w^T (f(u) - f(v))| <= c_w P ||u - v||``: the row's constant is ``c_w P`` (rounded up).
    """
    found = _search(graph, ops, x, radius=radius, n=n, lin=lin, chunk=chunk, opts=opts)
    if found is None:
        return None
    ctx, ends, chain, best = found
    last = chain[-2]  # the chain's last cut (index 0 only if the search kept no cut)
    start = ends[last]
    if start is None:
        return None
    tele = _telescoped_prefix(ctx, ends, chain, best, len(chain) - 2)
    before = [min(a, b) for a, b in zip(tele, best[last])]
    c = ctx.segment_rows(start, before, rows)
    P = torch.tensor(before, dtype=_F64, device=c.device).unsqueeze(1)
    return c * P * (1 + 4 * ROUND_REL) + 1e-300


def row_norms(box: Box, norm: str) -> torch.Tensor:
    """Certified ``sup ||m||_*`` of each interval row of ``box`` (last dims flattened):
    the l2 norm for ``norm="2"``, the l1 norm (the (inf -> |.|) operator norm) for ``"inf"``."""
    a = (box.c.abs() + box.r).reshape(*box.c.shape[:2], -1)
    v = a.norm(dim=-1) if norm == "2" else a.sum(dim=-1)
    return v * (1 + ROUND_REL) + 1e-300


def row_bounds(  # noqa: PLR0913 - the options of uppers, plus the rows and the notes
    graph: OpGraph, ops: dict[str, LocalOp], x: torch.Tensor, rows: torch.Tensor, *,
    radius: float, n: str, lin: dict[str, float], opts: LocalOptions,
    notes: list[str] | None = None,
) -> torch.Tensor:
    """Per-row bounds ``(B, R)`` on ``sup ||w^T M||_*`` over the secant matrices ``M`` of the
    ball of ``radius`` around each sample of ``x`` (``rows`` ``(B, R, *output)``): per row the
    smallest of the interval, ball and (when the tangents fit ``opts.refine``) telescoped
    bounds, as in :func:`lipbound.local_bound` (each is a bound on ``sup ||w^T M||_*``);
    ``notes`` receives the CROWN budget's notes."""
    tans: dict[str, Box | None] = {}
    budget = CrownBudget(opts.crown, opts.max_memory, [] if notes is None else notes)
    boxes = forward_boxes(graph, x, radius, n, ops, refine=opts.refine, tangents=tans,
                          crown=budget)
    sec = _secant_rows(graph, ops, boxes, tans, rows, n=n, lin=lin)
    L = torch.minimum(row_norms(sec.J, n), row_norms(sec.Jb, n) + sec.rho * (1 + ROUND_REL))
    if sec.ball is not None:
        point, rows0 = point_pass(graph, ops, x, n, rows, opts.refine)
        L = torch.minimum(L, telescoped_rows(graph, ops, n, sec.ball, point, rows0))
    return L


@dataclass(frozen=True)
class _Rows:
    """The backward passes of :func:`uppers` and :func:`row_bounds` for rows ``w``: the
    interval rows ``J`` of ``w^T M`` (intersected with the forward tangents' rows when there
    are), the ball variant's rows ``Jb`` and dual-norm radii ``rho``, and what the telescoped
    bound needs (``None`` without forward tangents)."""

    J: Box
    Jb: Box
    rho: torch.Tensor
    ball: Pass | None


def _secant_rows(graph: OpGraph, ops: dict[str, LocalOp], boxes: dict[str, Box],
                 tans: dict[str, Box | None], rows: torch.Tensor, *, n: str,
                 lin: dict[str, float]) -> _Rows:
    out_tan = tans.get(graph.output.name)
    adj: dict[str, Box] | None = None if out_tan is None else {}
    J = intersect_rows(backward_rows(graph, boxes, rows, ops, record=adj), out_tan, rows)
    Jb, rho = backward_rows_ball(graph, boxes, rows, ops, n, lin)
    return _Rows(J, Jb, rho, None if adj is None else Pass(boxes, tans, adj))


@dataclass(frozen=True)
class Chain:
    """What :func:`composed` evaluates segments with: the graph, its rules, the samples and
    the radius-0 boxes of every node (the cuts' computed centres and rounding radii)."""

    graph: OpGraph
    ops: dict[str, LocalOp]
    x: torch.Tensor
    point: dict[str, Box]
    radius: float
    n: str
    lin: dict[str, float]
    chunk: int
    opts: LocalOptions

    def segment_uppers(self, start: str | None, end: str | None, before: list[float], *,
                       telescope: bool = False) -> list[float]:
        """Certified local bounds of the segment ``start..end`` for every sample: on the
        ball of ``radius`` around ``x`` for the first, else on the ball around the start
        cut's computed centre of radius ``max_b (before[b] radius + ||e_b||)`` (``before``:
        the bound up to the cut, ``e`` the centre's rounding radius; one radius for all the
        samples, so that they go through the segment together)."""
        sub = segment(self.graph, start, end)
        sops = {name: op for name, op in self.ops.items() if name in sub.nodes}
        kw: dict[str, Any] = {"n": self.n, "lin": self.lin, "opts": self.opts,
                              "telescope": telescope}
        if start is None:
            return uppers(sub, sops, self.x, radius=self.radius, chunk=self.chunk,
                           **kw)[0].tolist()
        c = self.point[start]
        flat = c.r.reshape(c.r.shape[0], -1)
        err = (flat.norm(dim=1) if self.n == "2" else flat.amax(dim=1)).tolist()
        # one ball radius for the chunk (the largest: a larger ball contains the smaller)
        rho = max(round_up(round_up(p * self.radius) + round_up(e)) for p, e in zip(before, err))
        if not math.isfinite(rho):
            return [math.inf] * len(before)
        return uppers(sub, sops, c.c, radius=rho, chunk=self.chunk, **kw)[0].tolist()

    def segment_rows(self, start: str, before: list[float], rows: torch.Tensor
                     ) -> torch.Tensor:
        """Per-row bounds ``(B, R)`` of the segment from cut ``start`` to the output
        (:func:`row_bounds`) on the ball around the cut's computed centre of radius ``max_b
        (before[b] radius + ||e_b||)`` (as :meth:`segment_uppers`), for the rows ``w``."""
        sub = segment(self.graph, start, None)
        sops = {name: op for name, op in self.ops.items() if name in sub.nodes}
        c = self.point[start]
        flat = c.r.reshape(c.r.shape[0], -1)
        err = (flat.norm(dim=1) if self.n == "2" else flat.amax(dim=1)).tolist()
        rho = max(round_up(round_up(p * self.radius) + round_up(e)) for p, e in zip(before, err))
        if not math.isfinite(rho):
            return torch.full(rows.shape[:2], math.inf, dtype=_F64, device=rows.device)
        return row_bounds(sub, sops, c.c, rows, radius=rho, n=self.n, lin=self.lin,
                          opts=self.opts)


def telescoped(graph: OpGraph, ops: dict[str, LocalOp], xb: torch.Tensor, n: str,
                rows: torch.Tensor, opts: LocalOptions, *, ball: Pass) -> torch.Tensor:
    """The telescoped bound (:mod:`lipbound.local.telescope`): the radius-0 pass beside the
    ball's."""
    point, rows0 = point_pass(graph, ops, xb, n, rows, opts.refine)
    return telescoped_norms(graph, ops, n, ball, point, rows0)


