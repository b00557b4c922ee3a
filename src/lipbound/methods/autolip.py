r"""AutoLip: compose per-node Lipschitz constants over the real computation graph.

Scaman & Virmaux (2018), Algorithm 1. The model is captured as a DAG
(:func:`lipbound.graph.capture`, then :func:`lipbound.graph.simplify`, which merges chains of
linear ops and folds BatchNorm). With ``theta_0 = x`` and ``theta_k = g_k(theta_{i_1}, ...,
theta_{i_m})``, if ``g_k`` is ``c_{k,j}``-Lipschitz in its ``j``-th argument (the others fixed)
then, by the triangle inequality over the arguments changed one at a time,

.. math::  L_k = \sum_j c_{k,j} L_{i_j}, \qquad L_0 = 1,

bounds the Lipschitz constant of ``x -> theta_k``; ``L`` at the output bounds the model's. When
the arguments occupy disjoint blocks of the output (concatenation) the exact rule is tighter:
``||cat(a, b)||_2^2 = ||a||^2 + ||b||^2`` gives ``L_k = sqrt(sum_j (c_{k,j} L_{i_j})^2)`` in l2
and ``max_j`` in l-inf (the rule says which via ``NodeConstant.combine``). For a chain this is the
product of the per-layer constants.

The headline uses, for every factor, the certified upper bound when the rule has one (dense
SVD, Fourier certificate, closed forms...) and otherwise the estimate (power/Lanczos, from
below), in which case the factor and the result are flagged as not certified:
``certified`` is True only when every factor is.

The functional core is public for other methods: :func:`node_constants` computes the factors
and :func:`compose` composes any (possibly overridden) set of them; SeqLip replaces the
factors of a sequential segment (first linear node: the segment's bound, the others 1).
"""

from __future__ import annotations

import itertools
import math
import time
import weakref
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .._validation import check_input_shape, check_model, check_norm, check_positive
from ..errors import SolverError, UnsupportedModelError, UnsupportedNode
from ..graph import OpGraph, capture, simplify
from ..graph.types import Node
from ..results import LayerBound, LipschitzResult
from ..rules import NodeConstant, RuleContext, get_rule, registered_keys
from ..rules.linear import l1_linf_available
from ..spectral import shared_casts

__all__ = [
    "NodeConstant", "autolip", "clear_cache", "compose", "elasticities", "graph_constants",
    "node_bounds", "node_constants",
]

#: Power iterations / relative tolerance of the quick estimates used past a deadline.
QUICK_ITER = 10
QUICK_TOL = 1e-2
#: Share of a time limit the quick estimates may run past it before the call gives up.
GRACE = 0.05


def _covered_nodes(graph: OpGraph, n: str) -> list[Node]:
    """The operation nodes of ``graph``, or ONE :class:`UnsupportedModelError` listing every node
    without an l``n`` rule."""
    bad: list[UnsupportedNode] = []
    todo = []
    for node in graph:
        if node.kind in ("input", "output"):
            continue
        reason = node.unsupported
        rule = node.rule
        if reason is None and rule is None:
            reason = "no rule attached (was the graph built by lipbound.graph.capture?)"
        if reason is None and rule is not None and n not in rule.norms:
            reason = f"its rule has no l{n} constant (only {', '.join(rule.norms)})"
        if reason is None and n != "2" and node.kind == "linear":
            reason = l1_linf_available(node)
        if reason is not None:
            bad.append(UnsupportedNode(node.qualname, node.op, reason))
        else:
            todo.append(node)
    if bad:
        raise UnsupportedModelError(bad)
    return todo


def node_constants(
    graph: OpGraph,
    *,
    norm: Any = "2",
    tol: float = 1e-6,
    max_iter: int = 1000,
    certify: bool = True,
    deadline: float | None = None,
    grace: float = 0.0,
    done: dict[str, NodeConstant] | None = None,
) -> dict[str, NodeConstant]:
    """Per-node constants (w.r.t. each input) of every operation node of ``graph``.

    Keys are node names (``input``/``output`` nodes have none). Every node without a rule for
    ``norm`` is collected over the whole graph and reported in ONE
    :class:`~lipbound.errors.UnsupportedModelError`.

    ``deadline`` (absolute ``time.perf_counter()``): the clock is checked before each node (a
    rule, once started, runs to its end; a node is predicted to take as long as the last one
    with the same op and shapes, else as the slowest linear node so far); every node that
    would end past it gets the QUICK estimate
    instead: the rule with ``certify=False``, at most :data:`QUICK_ITER` power iterations to a
    relative tolerance :data:`QUICK_TOL` (closed-form rules, BatchNorm and activations stay
    certified, they cost nothing). Such factors have ``certified=False`` and ``how`` starting
    with ``"time limit: "``; the composed value is then an estimate. A linear node still to
    do at ``deadline + grace`` raises :class:`~lipbound.errors.SolverError` naming
    ``time_limit``.

    ``done``: constants already computed for the nodes of this very graph, with these options
    (used as they are); every constant computed in full is added to it as soon as it is known,
    so a caller keeps that work when the call stops on the deadline.

    >>> import torch
    >>> from torch import nn
    >>> from lipbound.graph import capture, simplify
    >>> g = simplify(capture(nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()), (3,)))
    >>> round(node_constants(g)["_1"].constants[0], 6)  # 1/4, rounded up by the float margin
    0.25
    """
    n = check_norm(norm, method="autolip")
    ctx = RuleContext(norm=n, tol=float(tol), max_iter=int(max_iter), certify=bool(certify))
    todo = _covered_nodes(graph, n)
    bad: list[UnsupportedNode] = []
    out: dict[str, NodeConstant] = {}
    if done is None:
        done = {}
    quick = replace(ctx, certify=False, tol=max(ctx.tol, QUICK_TOL),
                    max_iter=min(ctx.max_iter, QUICK_ITER))
    seen: dict[tuple[Any, ...], float] = {}  # seconds of the last node of each signature
    slowest = 0.0  # seconds of the slowest linear node so far
    start = time.perf_counter()
    for i, node in enumerate(todo):
        if node.name in done:
            out[node.name] = done[node.name]
            continue
        t0 = time.perf_counter()
        sig = (node.op, node.in_shapes, node.out_shape)
        # a node is started only when it is predicted to end in time: as long as the last node
        # with the same op and shapes (repeated blocks), else as the slowest linear node so far
        guess = seen.get(sig, slowest if node.kind == "linear" else 0.0)
        late = deadline is not None and t0 + guess >= deadline
        if late and deadline is not None and t0 >= deadline + grace and node.kind == "linear":
            left = sum(n.name not in done for n in todo[i:])
            raise SolverError(
                f"time limit reached: {left} of {len(todo)} nodes still had no constant "
                f"{t0 - start:.3g} s into the AutoLip constants (not even quick estimates fit); "
                "raise time_limit or leave it None (the constants computed so far are kept for "
                "the next call on this model)"
            )
        try:
            with shared_casts():  # the node's parameters are cast to float64 once
                c = node.rule.constant(node, quick if late else ctx)
        except UnsupportedModelError as exc:
            bad.extend(exc.nodes)
            continue
        if not late:
            seen[sig] = time.perf_counter() - t0
            if node.kind == "linear":
                slowest = max(slowest, seen[sig])
        if late and not c.certified:
            c = replace(c, how="time limit: " + c.how)
        if len(c.constants) != len(node.inputs):
            c = replace(c, constants=(c.value,) * len(node.inputs))
        out[node.name] = replace(
            c,
            name=node.name,
            qualname=node.qualname,
            op=node.op,
            seconds=time.perf_counter() - t0,
            slope_range=c.slope_range if c.slope_range is not None else node.slope_range,
        )
        if not late:
            done[node.name] = out[node.name]
    if bad:
        raise UnsupportedModelError(bad)
    return out


# the last (graph, constants) computed, reused by the next call on the same unchanged model
# with the same options (estimate() runs autolip then seqlip: one capture, one set of
# certificates): (model weak reference, (options, fingerprint), graph, constants computed in
# full so far: all of them unless a deadline cut the call)
_LAST: list[tuple[Any, tuple[Any, ...], OpGraph, dict[str, NodeConstant]]] = []


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """Everything the captured graph and its constants depend on that can change between
    calls: the module structure and hyper-parameters (``repr``), every parameter / buffer
    (identity, storage, in-place version counter, shape, dtype, device), each module's mode,
    hooks and instance attributes (see :func:`_attr_state`), and the registered rules.
    Not tracked: state outside the modules (globals) that ``forward`` reads."""
    tensors = tuple(
        (name, id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)
        for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                       model.named_buffers(remove_duplicate=False))
        if t is not None
    )
    mods = tuple(
        (id(m), type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
         tuple(_attr_state(v) for v in m.__dict__.items()))
        for m in model.modules()
    )
    rules = tuple((repr(k), id(get_rule(k))) for k in registered_keys())
    return repr(model), tensors, mods, rules


def _attr_state(item: tuple[str, Any]) -> tuple[str, Any]:
    """A comparable snapshot of one instance attribute of a module (``forward`` overrides,
    scalars a custom ``forward`` may read, plain tensor attributes, lists...)."""
    k, v = item
    if k in ("_parameters", "_buffers", "_modules") or k.endswith("_hooks"):
        return k, None  # tracked above
    if isinstance(v, torch.Tensor):
        return k, (id(v), v.data_ptr(), v._version, tuple(v.shape), v.dtype)
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return k, v
    if isinstance(v, (tuple, list, dict, set, frozenset)):
        return k, (type(v), repr(v))
    return k, (type(v), id(v))


def clear_cache() -> None:
    """Forget the graph and constants kept by :func:`graph_constants` (e.g. after changing
    state a model's ``forward`` reads from outside its modules, which is not tracked)."""
    _LAST.clear()


def graph_constants(
    model: nn.Module, shape: tuple[int, ...], *, norm: str, tol: float, max_iter: int,
    certify: bool = True, deadline: float | None = None, grace: float = 0.0,
) -> tuple[OpGraph, dict[str, NodeConstant], bool]:
    """``(graph, node_constants(graph), reused)`` for ``simplify(capture(model, shape))``.

    The graph and every constant computed in full are kept (one model, by weak reference) and
    used again (``reused=True``) when the model, its parameters and buffers (storage and
    in-place version counters), modes, hooks, the registered rules, ``shape`` and the options
    are all unchanged; anything else recomputes (:func:`clear_cache` forgets it). After a
    call cut by its deadline (quick estimates, or the :class:`~lipbound.errors.SolverError` of
    :func:`node_constants`) the next call computes only the constants still missing.
    ``deadline`` and ``grace`` are passed to :func:`node_constants`.
    """
    key = (shape, norm, float(tol), int(max_iter), bool(certify))
    fp = _fingerprint(model)
    if _LAST and _LAST[0][0]() is model and _LAST[0][1] == (key, fp):
        _, _, graph, done = _LAST[0]
        reused = True
    else:
        _LAST.clear()
        graph, done, reused = simplify(capture(model, shape)), {}, False
        _LAST.append((weakref.ref(model), (key, fp), graph, done))
    consts = node_constants(graph, norm=norm, tol=tol, max_iter=max_iter, certify=certify,
                            deadline=deadline, grace=grace, done=done)
    return graph, consts, reused


def node_bounds(graph: OpGraph, constants: Mapping[str, NodeConstant]) -> dict[str, float]:
    """``L_k`` at every node: the Lipschitz bound of ``x -> theta_k`` (input: 1)."""
    L: dict[str, float] = {}
    for node in graph:
        if node.kind == "input":
            L[node.name] = 1.0
            continue
        if node.kind == "output":
            L[node.name] = L[node.inputs[0]]
            continue
        c = constants[node.name]
        terms = [ci * L[p] if ci != 0 else 0.0 for ci, p in zip(c.constants, node.inputs)]
        if not terms:
            L[node.name] = 0.0
        elif c.combine == "rss":
            L[node.name] = math.sqrt(sum(t * t for t in terms))
        elif c.combine == "max":
            L[node.name] = max(terms)
        else:
            L[node.name] = math.fsum(terms)
    return L


def compose(graph: OpGraph, constants: Mapping[str, NodeConstant]) -> float:
    """The AutoLip bound at the output: ``L_k = sum_j c_{k,j} L_{parent_j}`` in order.

    >>> import torch
    >>> from torch import nn
    >>> from lipbound.graph import capture, simplify
    >>> g = simplify(capture(nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()), (3,)))
    >>> cs = node_constants(g)
    >>> abs(compose(g, cs) / (0.25 * cs["_0"].constants[0]) - 1) < 1e-6
    True
    """
    return node_bounds(graph, constants)[graph.output.name]


def elasticities(graph: OpGraph, constants: Mapping[str, NodeConstant]) -> dict[str, float]:
    """``(c_k / L) dL/dc_k`` for every node: the share of the bound each factor controls.

    Scaling node ``k``'s constants by ``(1 + h)`` scales the bound by about ``(1 + e_k h)``.
    In a chain every ``e_k`` is 1; a layer in a residual branch has ``e_k < 1``. Then
    ``e_k * log(c_k)`` is node ``k``'s contribution to ``log L`` (for a chain they sum to it),
    which is how :func:`autolip` ranks the dominant layers. Computed by a relative
    perturbation ``h = 1e-6`` of each node (one composition per node).
    """
    base = compose(graph, constants)
    out: dict[str, float] = {}
    h = 1e-6
    for k, c in constants.items():
        if base == 0 or not any(c.constants):
            out[k] = 0.0
            continue
        bumped = dict(constants)
        bumped[k] = replace(c, constants=tuple(ci * (1 + h) for ci in c.constants))
        # a ratio, not (bumped - base) / (base h): base * h underflows for tiny bounds
        out[k] = (compose(graph, bumped) / base - 1.0) / h
    return out


def autolip(
    model: nn.Module,
    input_shape: Any,
    *,
    norm: Any = 2,
    tol: float = 1e-6,
    max_iter: int = 1000,
    certify: bool = True,
    time_limit: float | None = None,
) -> LipschitzResult:
    """Upper bound on the Lipschitz constant of ``model`` by AutoLip over its captured graph.

    ``value`` is the composed bound; ``certified`` is True when every factor is certified
    (otherwise the uncertified factors, power/Lanczos estimates, are named in ``notes``);
    ``layers`` has one row per node (qualified name, op, factor, certified, seconds, how);
    ``extra["node_bounds"]`` the bound at every node, ``extra["estimate"]`` the composition of
    the estimates alone (what the paper's AutoLip computes; not a certificate),
    ``extra["elasticity"]`` / ``extra["log_contribution"]`` (by qualname) how much of
    ``log(value)`` each factor controls (see :func:`elasticities`); the last note names the
    dominant layers.

    ``tol`` / ``max_iter`` drive the power/Lanczos estimates used as factors when no
    certificate exists; a certified factor's estimate is only reported and computed to
    ``max(tol, 1e-3)`` in at most 16 Lanczos steps (a lower estimate either way).
    ``certify=False`` skips certificates (faster; estimates only).

    ``time_limit`` (seconds, default none): the clock is checked before each node (the capture
    and a node's certificate, once started, are not interrupted); the nodes started after it
    get quick power-iteration estimates (see :func:`node_constants`), so the call ends about on
    time with ``certified=False`` and a note naming the limit and how many nodes it cut; when
    even those do not fit in 5% more, :class:`~lipbound.errors.SolverError` names
    ``time_limit`` (the constants computed are kept: the next call on the same model goes on
    from there).
    ``extra["reused"]`` says whether the graph and constants of the previous call on the same
    unchanged model were reused (:func:`graph_constants`).

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) is not None
    True
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> r = autolip(net, (4,))
    >>> r.certified, len(r.layers)
    (True, 3)
    >>> w1 = torch.linalg.matrix_norm(net[0].weight.detach().double(), 2)
    >>> w2 = torch.linalg.matrix_norm(net[2].weight.detach().double(), 2)
    >>> abs(r.value - float(w1 * w2)) < 1e-5 * r.value
    True
    """
    t0 = time.perf_counter()
    model = check_model(model, require_eval=True)
    shape = check_input_shape(input_shape)
    n = check_norm(norm, method="autolip")
    check_positive("tol", tol)
    check_positive("max_iter", max_iter, integer=True)
    if time_limit is not None:
        check_positive("time_limit", time_limit)
    deadline = None if time_limit is None else t0 + float(time_limit)
    graph, constants, reused = graph_constants(
        model, shape, norm=n, tol=tol, max_iter=max_iter, certify=certify, deadline=deadline,
        grace=0.0 if time_limit is None else GRACE * float(time_limit),
    )
    bounds = node_bounds(graph, constants)
    value = bounds[graph.output.name]
    certified = all(c.certified for c in constants.values())
    est_constants = {
        k: replace(c, constants=tuple(c.estimate if c.estimate is not None else ci
                                      for ci in c.constants))
        for k, c in constants.items()
    }
    estimate = compose(graph, est_constants)
    rows = tuple(
        LayerBound(
            name=c.qualname,
            op=c.op,
            value=c.value,
            certified=c.certified,
            seconds=c.seconds,
            estimate=c.estimate,
            how=c.how + ("" if c.combine == "sum" else f" [{c.combine}]"),
        )
        for c in constants.values()
    )
    notes = []
    cut = [c for c in constants.values() if c.how.startswith("time limit: ")]
    if cut:
        notes.append(
            f"time_limit={time_limit:g} s reached: {len(cut)} of {len(constants)} node(s) got a "
            f"quick estimate instead of a certificate (first: {cut[0].qualname}); raise "
            "time_limit (or leave it None) for a certified bound"
        )
    unc = [c.qualname for c in constants.values() if not c.certified]
    if unc:
        notes.append(
            "not certified: these factors are estimates (from below), so the value is an "
            "estimate: " + ", ".join(unc)
        )
    el = elasticities(graph, constants)
    share = {
        k: el[k] * math.log(c.value) if c.value > 0 else -math.inf for k, c in constants.items()
    }
    dominant = sorted(constants.values(), key=lambda c: -share[c.name])[:5]
    notes.append(
        "largest factors: "
        + ", ".join(f"{c.qualname}={c.value:.4g} (e={el[c.name]:.2f})" for c in dominant)
    )
    return LipschitzResult(
        value=float(value),
        certified=certified,
        method="autolip",
        norm=n,
        bound="upper",
        upper=float(value) if certified else None,
        layers=rows,
        seconds=time.perf_counter() - t0,
        notes=tuple(notes),
        extra={
            "node_bounds": bounds,
            "estimate": estimate,
            "elasticity": {constants[k].qualname: v for k, v in el.items()},
            "log_contribution": {constants[k].qualname: v for k, v in share.items()},
            "graph": graph,
            "reused": reused,
        },
    )
