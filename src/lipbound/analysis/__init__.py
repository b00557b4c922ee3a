r"""One model analysed once: the captured graph, its per-node constants and its chains.

Data flows one way: model -> :class:`Analysis` (captured and simplified graph, typed nodes,
per-node constants cached per options, the sequential segments with the rules' slope ranges,
the dense float64 chain) -> the methods -> results -> report / CLI. Every bound method accepts
an :class:`Analysis` in place of ``model`` (its ``input_shape`` may then be omitted);
:func:`lipbound.bound` builds one and hands it to every method it runs, so the model is
captured and simplified once and AutoLip's certificates are computed once for all of them.

>>> import torch
>>> from torch import nn
>>> import lipbound
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
>>> an = lipbound.Analysis(net, (4,))
>>> [n.kind for n in an.graph if n.kind not in ("input", "output")]
['linear', 'activation', 'linear']
>>> a = lipbound.autolip(an)
>>> s = lipbound.seqlip(an)            # the same graph and AutoLip constants
>>> s.extra["reused"], s.value <= a.value * (1 + 1e-12)
(True, True)

The norm is an option of each question, not of the graph: one analysis serves l2 and l-inf
(its constants are kept per norm and per estimate options).

Staleness. An analysis remembers a fingerprint of everything its graph and constants depend
on that can change between calls (:func:`fingerprint`: parameters and buffers, modes, hooks,
module attributes, the registered rules). A method given an analysis whose model has changed
since raises :class:`~lipbound.errors.InvalidArgumentError` (build a new one); a method given
a model reuses the analysis of the previous call when the model is unchanged
(:func:`analyse`), and :func:`clear_cache` forgets it.
"""

from __future__ import annotations

import copy
import itertools
import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_input_shape, check_model, check_norm
from ..errors import InvalidArgumentError
from ..graph import OpGraph, capture, simplify
from ..rules import NodeConstant, get_rule, registered_keys
from .chains import (
    constant_segments,
    find_segments,
    linear_matrix,
    merged_chain,
    segment_slopes,
)
from .constants import QUICK_ITER, QUICK_TOL, node_constants

__all__ = [
    "QUICK_ITER", "QUICK_TOL", "Analysis", "DenseChain", "analyse", "analysis_of",
    "clear_cache", "constant_segments", "find_segments", "fingerprint", "linear_matrix",
    "node_constants", "segment_slopes",
]

#: ``(weights, biases, activations, names)`` of a sequential network in float64
#: (see :func:`lipbound.analysis.chains.merged_chain`).
DenseChain = tuple[list[np.ndarray], list[np.ndarray], list[tuple[str, Any]], list[str]]


class Analysis:
    """A model captured once at one input shape, with what every method reads from it.

    ``Analysis(model, input_shape)`` checks the model (eval mode, finite values; wrappers
    such as ``torch.compile`` are unwrapped) and the shape; everything else is computed on
    first use and kept:

    * :attr:`captured`: :func:`lipbound.graph.capture` (torch.fx, hooks and in-place ops
      resolved, every node typed and classified by the rules);
    * :attr:`graph`: :func:`lipbound.graph.simplify` of it (linear chains merged, BatchNorm
      folded), the graph every global method works on;
    * :meth:`constants`: the per-node constants of :func:`~lipbound.analysis.constants.
      node_constants`, kept per ``(norm, tol, max_iter, certify)``; a call cut by its
      deadline keeps what it finished and the next call goes on from there;
    * :meth:`segments`: the sequential segments ``linear, act, ..., linear`` with each
      activation's slope range from the rules (SeqLip and LipSDP);
    * :meth:`dense_chain`: the float64 matrices of a sequential network (exact, LipSDP).
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int] | int) -> None:
        self.model: nn.Module = check_model(model, require_eval=True)
        self.input_shape: tuple[int, ...] = check_input_shape(input_shape)
        self._fingerprint = fingerprint(self.model)
        self._captured: OpGraph | None = None
        self._graph: OpGraph | None = None
        self._constants: dict[tuple[Any, ...], dict[str, NodeConstant]] = {}
        self._chain: DenseChain | None = None

    def __repr__(self) -> str:
        n = "?" if self._graph is None else str(sum(1 for _ in self._graph))
        return (f"Analysis({type(self.model).__name__}, input_shape={self.input_shape}, "
                f"nodes={n}, constants for {len(self._constants)} option set(s))")

    @property
    def captured(self) -> OpGraph:
        """The captured graph (:func:`lipbound.graph.capture`), before simplification."""
        if self._captured is None:
            self._captured = capture(self.model, self.input_shape)
        return self._captured

    @property
    def graph(self) -> OpGraph:
        """The simplified graph (:func:`lipbound.graph.simplify` of :attr:`captured`)."""
        if self._graph is None:
            self._graph = simplify(self.captured)
        return self._graph

    def is_current(self) -> bool:
        """Whether the model is unchanged since this analysis was built (see
        :func:`fingerprint`)."""
        return fingerprint(self.model) == self._fingerprint

    def check_current(self) -> None:
        """:class:`~lipbound.errors.InvalidArgumentError` when the model has changed since."""
        if not self.is_current():
            raise InvalidArgumentError(
                f"the model ({type(self.model).__name__}) changed since this Analysis was built "
                "(parameters, buffers, modes, hooks, attributes or registered rules): its graph "
                "and constants no longer describe it; build a new one: "
                f"lipbound.Analysis(model, {self.input_shape})"
            )

    @staticmethod
    def _key(norm: Any, tol: float, max_iter: int, certify: bool) -> tuple[Any, ...]:
        return (check_norm(norm), float(tol), int(max_iter), bool(certify))

    def has_constants(self, *, norm: Any = 2, tol: float = 1e-6, max_iter: int = 1000,
                      certify: bool = True) -> bool:
        """Whether constants for these options were computed (fully or in part) before."""
        return self._key(norm, tol, max_iter, certify) in self._constants

    def constants(
        self, *, norm: Any = 2, tol: float = 1e-6, max_iter: int = 1000, certify: bool = True,
        deadline: float | None = None, grace: float = 0.0,
    ) -> dict[str, NodeConstant]:
        """The per-node constants of :attr:`graph` (:func:`~lipbound.analysis.constants.
        node_constants`, whose ``deadline`` / ``grace`` these are). Constants computed in
        full are kept for these options; a later call computes only the missing ones."""
        done = self._constants.setdefault(self._key(norm, tol, max_iter, certify), {})
        return node_constants(self.graph, norm=norm, tol=tol, max_iter=max_iter,
                              certify=certify, deadline=deadline, grace=grace, done=done)

    def segments(
        self, constants: dict[str, NodeConstant]
    ) -> tuple[dict[str, tuple[float, float] | None], list[list[Any]]]:
        """``(slopes, segments)`` of :attr:`graph` for these constants (see
        :func:`~lipbound.analysis.chains.constant_segments`)."""
        return constant_segments(self.graph, constants)

    def dense_chain(self) -> DenseChain:
        """The float64 chain of a sequential network (:func:`~lipbound.analysis.chains.
        merged_chain`), or :class:`~lipbound.errors.NotSequentialError`.

        It is read from the graph of a float64 copy of the model, captured once: BatchNorm
        folding and merged linear chains are then computed in float64, adding no float32
        rounding to the matrices that exact and LipSDP take as the network."""
        if self._chain is None:
            m64 = copy.deepcopy(self.model).to(torch.float64).eval()
            g64 = simplify(capture(m64, self.input_shape))
            self._chain = merged_chain(g64, int(math.prod(self.input_shape)))
        return self._chain


def fingerprint(model: nn.Module) -> tuple[Any, ...]:
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



# the analysis of the last model given to a method (by weak reference to the model), reused by
# the next call on the same unchanged model and shape: (model reference, analysis)
_LAST: list[tuple[Any, Analysis]] = []


def analyse(model: nn.Module, input_shape: Sequence[int] | int) -> tuple[Analysis, bool]:
    """``(analysis, reused)``: the analysis of the previous call when it is for this very model
    (same object), unchanged (:func:`fingerprint`), at this shape; else a new one (kept for
    the next call, one model at a time)."""
    model = check_model(model, require_eval=True)
    shape = check_input_shape(input_shape)
    if _LAST and _LAST[0][0]() is model:
        an = _LAST[0][1]
        if an.input_shape == shape and an.is_current():
            return an, True
    _LAST.clear()
    an = Analysis(model, shape)
    _LAST.append((weakref.ref(model), an))
    return an, False


def analysis_of(model: nn.Module | Analysis, input_shape: Any = None) -> tuple[Analysis, bool]:
    """What every method does first: ``(analysis, reused)`` of ``model`` at ``input_shape``.

    ``model`` may be an :class:`Analysis` (``input_shape`` then omitted, or equal to its
    own); it must still describe its model (:meth:`Analysis.check_current`), and counts as
    reused. A module goes through :func:`analyse`."""
    if isinstance(model, Analysis):
        model.check_current()
        if input_shape is not None and check_input_shape(input_shape) != model.input_shape:
            raise InvalidArgumentError(
                f"input_shape {tuple(check_input_shape(input_shape))} differs from the "
                f"Analysis's {model.input_shape}: omit input_shape, or build an Analysis at "
                "the new shape"
            )
        return model, True
    if input_shape is None:
        raise InvalidArgumentError(
            "input_shape is missing: pass the shape of one sample without the batch dimension, "
            "e.g. (3, 32, 32), or pass a lipbound.Analysis built with it"
        )
    return analyse(model, input_shape)


def clear_cache() -> None:
    """Forget the analysis kept by :func:`analyse` (e.g. after changing state a model's
    ``forward`` reads from outside its modules, which :func:`fingerprint` does not track)."""
    _LAST.clear()
