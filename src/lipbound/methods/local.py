r"""Local Lipschitz bounds: certified on a ball around each input, witnessed inside it.

For each sample ``x`` of ``inputs``, :func:`local_bound` bounds

.. math:: L_r(f, x) = \sup_{u \ne v,\ \|u - x\| \le r,\ \|v - x\| \le r}
          \frac{\|f(u) - f(v)\|}{\|u - v\|}

(the same norm, l2 or l-inf, on input and output, as the global methods).

Upper bound (certified). On lipbound's own graph (:func:`lipbound.graph.capture` +
:func:`lipbound.graph.simplify`):

1. interval bounds of every intermediate value over the ball
   (:func:`lipbound.local.propagate.forward_boxes`: IBP with the centre/radius form
   ``W c +- |W| r`` for linear nodes and exact l2 row norms for the first affine layers,
   and, for the values read by non-linear rules, CROWN-style back-substituted linear
   relaxations within ``options.crown`` rows (:mod:`lipbound.local.crown`), intersected
   with IBP);
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
4. when the forward tangent boxes fit ``options.refine``, also the telescoped bound
   (:mod:`lipbound.local.telescope`): ``||J(x)||`` plus one term per non-linear node ``j``,
   ``sup ||A_j Delta_j U_j||`` (or ``sup ||P_j Delta_j V_j||``), ``Delta_j`` the deviation of
   the node's secant from its Jacobian at ``x`` and one of the two other factors a point
   Jacobian, so the interval wrapping enters at one factor only and the bound tends to
   ``||J(x)||`` as the radius shrinks (1.02 ``||J(x)||`` at ``r = 1e-4`` on the 1-block
   TinyViT of ``benchmarks/local.py``, where step 3 gave 3.5); the rounding pads are those of
   the graph's largest tensor (:func:`lipbound.local.interval.precision`). The smallest of
   the bounds is kept;
5. on graphs with residual blocks, also the bound composed ball to ball over the residual
   cuts (:mod:`lipbound.local.split`, its proof: each segment between two cuts bounded on a
   ball around its input's computed centre whose radius is the certified bound so far times
   ``radius``, plus the centre's rounding; the best chain of segments over all pairs of
   cuts, then that chain once more with the telescoped bound). The wrapping of steps 3-4
   restarts at every cut (a random 2-block TinyViT at ``r = 1e-3``: from more than ``1e4``
   to less than ``20`` times the witness, pinned by ``tests/test_local.py``;
   ``options.split=False`` turns it off; it runs only for the samples whose bound is above
   :data:`SPLIT_GAP` times their witness, when the witnesses are searched);
6. the result is capped by the global certified AutoLip bound when one exists (a local
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

Limits: the CROWN back-substitution stops at products, softmax, LayerNorm and the other
non-activation rules (their own boxes are its inputs), so transformers still wrap at large
radii, and a ReLU CNN's bound still falls back to the global one once most neurons are
unstable. Within one residual segment the value boxes themselves wrap (an attention block
sees boxes far wider than the values' motion), so the composition of step 5 is tight only
while each segment's ball is small. Max-pool and ``nn.MultiheadAttention`` have no local rule
yet.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from .._validation import check_norm, check_positive
from ..analysis import Analysis, analysis_of
from ..errors import LipboundError, UnsupportedModelError
from ..local.bounds import (
    LocalOptions,
    certified_linear,
    check_inputs,
    chunk_size,
    witness,
)
from ..local.compose import composed, uppers
from ..local.interval import precision
from ..local.propagate import check_graph, largest_value, linear_norms
from ..local.rules import LocalOp
from ..results import LayerBound, LocalResult, Witness
from .autolip import compose

__all__ = ["SPLIT_GAP", "local_bound", "prepare"]

#: the composition over residual cuts runs for the samples whose bound exceeds their witness
#: by more than this factor (it can only lower a bound, never below the witness)
SPLIT_GAP = 1.05

_F64 = torch.float64


def prepare(model: nn.Module | Analysis, inputs: torch.Tensor
            ) -> tuple[Analysis, dict[str, LocalOp]]:
    """The analysis of ``model`` at the shape of one sample of ``inputs`` (an
    :class:`~lipbound.analysis.Analysis` given as ``model`` is checked and used; a module
    reuses the previous call's analysis when unchanged) and the local rules of its graph."""
    an, _ = analysis_of(model, tuple(inputs.shape[1:]))
    return an, check_graph(an.graph)


def _global(an: Analysis, norm: str) -> tuple[float | None, str, dict[str, float]]:
    """AutoLip's certified bound of the graph (``None`` if refused or estimated), a note, and
    the certified linear-node constants (for the ball variant); the constants are the
    analysis's (computed once per norm, shared with autolip and certify)."""
    graph = an.graph
    try:
        cs = an.constants(norm=norm)
    except UnsupportedModelError as exc:
        first = str(exc).splitlines()[0]
        return None, f"no global bound to cap with (autolip refuses: {first})", linear_norms(
            graph, norm)
    lin = certified_linear(graph, cs)
    if not all(c.certified for c in cs.values()):
        return None, "no global certified bound to cap with (autolip gave an estimate)", lin
    g = compose(graph, cs)
    return g, f"capped by the global certified AutoLip bound {g:.6g}", lin


def _witnesses(model: nn.Module, x: torch.Tensor, *, radius: float, n: str, chunk: int,
               opts: LocalOptions) -> tuple[tuple[float, ...], list[str], list[Witness | None]]:
    vals, hows, wits = [], [], []
    for s in range(0, x.shape[0], chunk):
        v, h, w = witness(model, x[s:s + chunk], radius, n, steps=opts.steps,
                          restarts=opts.restarts, seed=opts.seed)
        vals.append(v)
        hows.extend(h)
        wits.extend(w)
    return tuple(float(v) for v in torch.cat(vals)), hows, wits


def local_bound(
    model: nn.Module | Analysis,
    inputs: torch.Tensor,
    radius: float,
    *,
    norm: Any = 2,
    batch_size: int = 32,
    lower: bool = True,
    options: LocalOptions | None = None,
) -> LocalResult:
    """Certified upper and witnessed lower bounds of the local Lipschitz constant.

    ``model`` is a module in eval mode or a :class:`~lipbound.analysis.Analysis` built at the
    shape of one sample (its graph and AutoLip constants are then reused; a module reuses the
    previous call's analysis when unchanged). ``inputs`` is a batch ``(N, *input_shape)``;
    ``radius`` the ball radius in ``norm``
    (2 or ``"inf"``; the same norm on the output). Returns a :class:`LocalResult` with one
    ``upper`` (certified) and ``lower`` (witness, when ``lower=True``) per sample; see the
    module docstring for the method and its proof. ``batch_size`` samples are bounded at
    once, fewer if their adjoints (output size x largest tensor x 64 bytes each) would exceed
    ``options.max_memory`` bytes; the other knobs are in
    :class:`~lipbound.local.bounds.LocalOptions` (refinement, global cap, witness search,
    progress).

    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(3, 2)
    >>> r = local_bound(lin, torch.randn(2, 3), 0.1, lower=False)
    >>> w = float(torch.linalg.matrix_norm(lin.weight.detach().double(), 2))
    >>> all(w <= u <= w * (1 + 1e-5) for u in r.upper)
    True
    """
    t0, c0 = time.perf_counter(), time.process_time()
    opts = (options or LocalOptions()).check()
    n = check_norm(norm, allowed=("2", "inf"), method="local_bound")
    x = check_inputs(inputs)
    check_positive("radius", radius)
    check_positive("batch_size", batch_size, integer=True)
    an, ops = prepare(model, x)
    graph = an.graph
    K = math.prod(graph[graph.output.inputs[0]].out_shape)
    glob, note, lin = _global(an, n)
    if not opts.use_global:
        glob, note = None, "global cap not used"
    chunk = chunk_size(graph, K, batch_size, opts.max_memory)
    factors: dict[str, tuple[list[torch.Tensor], str]] = {}
    low: tuple[float, ...] | None = None
    hows: list[str] = []
    wits: tuple[Witness | None, ...] | None = None
    if lower:  # first: the witnesses say where the composition below cannot help
        low, hows, wl = _witnesses(an.model, x, radius=float(radius), n=n, chunk=chunk, opts=opts)
        wits = tuple(wl)
    with precision(largest_value(graph)):
        interval, ibp_notes = uppers(graph, ops, x, radius=float(radius), n=n, lin=lin,
                                     chunk=chunk, opts=opts, factors=factors)
        capped = interval if glob is None else torch.clamp(interval, max=glob)
        # the composition over residual cuts only where the bound is not already within
        # SPLIT_GAP of the witness (a 1-block TinyViT at small radii: 8x the time for the same
        # bound); every sample without a witness is tried
        todo = torch.arange(x.shape[0]) if low is None else torch.nonzero(
            capped > SPLIT_GAP * torch.tensor(low, dtype=capped.dtype)).flatten()
        comp = composed(graph, ops, x[todo], radius=float(radius), n=n, lin=lin,
                        chunk=chunk, opts=opts) if todo.numel() else None
        if comp is not None:
            bounds, used = comp
            if bool((bounds < interval[todo]).any()):
                ibp_notes.append(f"composed over {used} residual cut(s) where smaller "
                                 "(lipbound.local.split)")
            interval = interval.clone()
            interval[todo] = torch.minimum(interval[todo], bounds)
    upper = interval if glob is None else torch.clamp(interval, max=glob)
    if low is not None:
        if any(lo > up for lo, up in zip(low, upper.tolist())):  # pragma: no cover - a bug
            raise LipboundError(
                "a witnessed lower bound exceeds the certified upper bound: please report "
                "this model (it is a soundness bug)")
    ups = tuple(float(u) for u in upper)
    per_node = {k: torch.cat(v) for k, (v, _) in factors.items()}
    layers = tuple(
        LayerBound(name=node.qualname, op=node.op, value=float(per_node[node.name].max()),
                   certified=True, how=factors[node.name][1])
        for node in graph if node.name in per_node)
    return LocalResult(
        upper=ups,
        lower=low,
        witness=wits,
        value=ups,
        certified=True,
        method="local (interval secant Jacobian)",
        how="interval secant Jacobian on the ball" + ("" if glob is None else
                                                       ", capped by the global certified bound"),
        norm=n,
        radius=float(radius),
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - c0,
        layers=layers,
        notes=(note, *dict.fromkeys(ibp_notes)),
        extra={"interval": tuple(float(v) for v in interval), "global": glob,
               "lower_how": tuple(hows), "graph": graph,
               "node_factors": {node.qualname: tuple(per_node[node.name].tolist())
                                for node in graph if node.name in per_node}},
    )
