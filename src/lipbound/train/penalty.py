"""Differentiable Lipschitz penalties with warm-started power iteration.

:class:`LipschitzPenalty` keeps one power-iteration vector per Linear/Conv CALL (input-shaped:
the true operator with its stride and padding, see :mod:`lipbound.train._power`) as persistent
buffers, warm-started from step to step and updated only in training mode, the way
``torch.nn.utils.parametrizations.spectral_norm`` keeps its ``u``/``v``. Each training-mode call
costs ``n_power_iterations`` forward + backward passes per layer (no graph kept) plus one
differentiable forward per layer.

With an exact structure (graph or Sequential), a call is first merged with the linear ops that
follow it in a chain, as :func:`lipbound.graph.simplify` does for AutoLip: an eval-mode
BatchNorm, a flatten, an average pooling, a second Linear without activation in between. The
vector then iterates on that composite map (``conv -> BatchNorm`` is one operator, whose norm can
be far below ``||conv|| * max|gamma / sigma|``). Gradients reach the BatchNorm's affine weight
too. Linear groups without any Linear/Conv layer keep their rules' constants.

What the value is
-----------------
Let ``s_i(W) = ||A_i v_i|| / ||v_i||`` with the stored vector ``v_i`` (detached): an ESTIMATE of
the operator norm ``||A_i||_2`` of call ``i``, from below (``s_i <= ||A_i||_2`` always).

``kind="autolip"``
    ``log L_hat`` where ``L_hat`` is AutoLip's bound (Scaman & Virmaux, Alg. 1) evaluated on the
    plan of the model with ``s_i`` in place of each (merged) layer's norm: ``L_input = 1``,
    ``L_k = combine_i(c_{k,i} L_{parent i})`` in topological order, ``c`` = ``s_i`` for a layer
    call, the rule's constant for every other node (ReLU 1, sigmoid 1/4, max-pooling its
    constant, add 1 per branch, cat root-sum-of-squares in l2), held constant (no gradient). For
    a chain this is ``sum_i log s_i + sum log c`` = the log of AutoLip's product of layer norms;
    for a DAG (residual blocks) it is the log of AutoLip's sum-over-paths recursion, computed
    in the log domain (``logsumexp``). With ``structure="hooks"`` (no graph, not a plain
    Sequential) it is ``sum_i log s_i`` over the calls, i.e. every other op is ASSUMED to be
    1-Lipschitz and the wiring to be a chain: only an estimate of a product of norms.
``kind="seqlip"``
    A SeqLip-style pair bound, for chains ``B_K D_{K-1} ... D_1 B_1`` where ``B_j`` are the
    maximal runs of linear nodes (a layer plus flatten/pooling...) and ``D_j`` diagonal with
    entries in the activation's slope range ``[a, b]`` (composed when several). Writing
    ``D = m I + r E`` with ``m = (a+b)/2``, ``r = (b-a)/2``, ``|E_jj| <= 1``:
    ``||B_{j+1} D B_j|| <= |m| ||B_{j+1} B_j|| + r ||B_{j+1}|| ||B_j||`` (the "1/2 rule" for ReLU:
    ``(||B_{j+1} B_j|| + ||B_{j+1}|| ||B_j||) / 2``). Any partition of the chain into disjoint
    pairs and single blocks gives a valid bound (product of pair bounds, single norms and the
    constants ``max(|a|, |b|)`` of the activations left between groups); the value is the log of
    the smallest one over all partitions (dynamic programming), with every norm replaced by its
    power-iteration estimate (one vector per block and per adjacent pair, composite power
    iteration through both blocks). Non-element-wise ops inside the chain (max-pooling...) are
    not paired over; their constant multiplies.

The value is an ESTIMATE of the log of that bound (power iteration converges from below, so it
can be below the certified bound). With ``certified=True`` the value equals the log of the same
bound computed with CERTIFIED layer norms (float64 SVD / dense SVD / Fourier bound, see
:func:`lipbound.train._power.certified_layer_norm`; a merged group's norm is the product of
certified factors, eval BatchNorms folded exactly into the preceding layer's weight first, or
the dense SVD of the whole group when smaller and affordable; composite pair norms by dense SVD
when small, else the product of the two certified block norms, which is an upper bound of it;
sub-multiplicativity ``||AB|| <= ||A|| ||B||`` makes every product valid) and rule constants
that are certified, so ``exp(value)`` is a certified upper bound on the Lipschitz
constant (l2). Its gradient is the gradient of the estimate (the two differ by a constant
shift in log space, i.e. a constant factor). Certification costs an SVD / FFT per layer per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._validation import check_choice, check_input_shape, check_model, check_positive
from ..errors import InvalidArgumentError, NotSequentialError, UnsupportedNode
from ..spectral.certify import bn_scale, dense_matrix, jacobian_upper
from ._power import (
    SVD_ENTRIES,
    certified_layer_norm,
    power_update,
    random_unit,
    sigma_of,
    spec_of,
)
from ._structure import Plan, PlanNode, build_plan, linear_groups

__all__ = ["LipschitzPenalty", "penalty"]

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class _Block:
    """A maximal run of linear plan nodes in a chain (SeqLip kind)."""

    nodes: list[PlanNode]
    in_shape: tuple[int, ...]


@dataclass(eq=False)
class _Gap:
    """What lies between two blocks: activations (pairable) and/or other ops."""

    log_const: float  # log of the product of the constants of the ops in the gap
    slope: tuple[float, float] | None  # composed slope range when only activations
    certified: bool


def _compose_slopes(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    prods = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return (min(prods), max(prods))


def _log(c: float) -> float:
    return math.log(c) if c > 0 else -math.inf


class LipschitzPenalty(nn.Module):
    """A differentiable (log) Lipschitz bound of ``model`` to add to the training loss.

    See the module docstring for what the value is. ``forward()`` takes no argument (any
    arguments are ignored, so ``regularizer=pen`` works with callbacks that pass the model).

    Parameters
    ----------
    model:  the network; it is NOT registered as a sub-module (the penalty's ``state_dict``
            holds only the power-iteration vectors).
    input_shape: one sample's shape, without the batch dimension.
    kind:   ``"autolip"`` or ``"seqlip"``.
    n_power_iterations: power iterations per training-mode call (warm-started).
    init_iterations: iterations run at construction from a random start.
    eps:    floor of norms (division and ``log``).
    certified: return the certified value (see module doc), gradient of the estimate.
    structure: ``"auto"`` (graph if available, else Sequential parser, else hooks),
            ``"graph"``, ``"sequential"`` or ``"hooks"``.

    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> pen = LipschitzPenalty(net, (2,))
    >>> loss = pen()            # log of the product of the two layer norms (estimate)
    >>> loss.backward()
    >>> net[0].weight.grad.shape
    torch.Size([8, 2])
    >>> w0 = torch.linalg.matrix_norm(net[0].weight, 2) * torch.linalg.matrix_norm(net[2].weight, 2)
    >>> bool(abs(loss.exp() - w0) < 1e-3 * w0)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Any,
        *,
        kind: str = "autolip",
        n_power_iterations: int = 1,
        init_iterations: int = 20,
        eps: float = 1e-12,
        certified: bool = False,
        structure: str = "auto",
    ) -> None:
        super().__init__()
        check_model(model)
        shape = check_input_shape(input_shape)
        check_choice("kind", kind, ("autolip", "seqlip"))
        check_positive("n_power_iterations", n_power_iterations, integer=True, allow_zero=True)
        check_positive("init_iterations", init_iterations, integer=True, allow_zero=True)
        check_positive("eps", eps)
        check_choice("certified", certified, (True, False))
        object.__setattr__(self, "_model", model)
        self.input_shape = shape
        self.kind = kind
        self.n_power_iterations = int(n_power_iterations)
        self.eps = float(eps)
        self.certified = bool(certified)
        self.plan: Plan = build_plan(model, shape, structure)
        self._layers: list[nn.Module] = [model.get_submodule(c.path) for c in self.plan.calls]
        if kind == "seqlip" and not self.plan.exact:
            raise InvalidArgumentError(
                "kind='seqlip' needs the model's exact structure (lipbound.graph.capture, or a "
                "plain nn.Sequential of supported modules): the activations between the layers "
                "must be known. This model was only seen through forward hooks."
            )
        if certified:
            self._check_certifiable()
        ref = self._ref_tensor()
        self._vec_names: list[str] = []
        self._groups, self._group_of = linear_groups(self.plan)
        if kind == "autolip":
            for g, nodes in enumerate(self._groups):
                if any(n.kind == "layer" for n in nodes):
                    self._add_vec(f"v{g}", nodes[0].in_shape, ref)
        else:
            self._blocks, self._gaps, self._pre, self._post = self._chain()
            for j, b in enumerate(self._blocks):
                self._add_vec(f"b{j}", b.in_shape, ref)
            for j in range(len(self._blocks) - 1):
                if self._gaps[j].slope is not None:
                    self._add_vec(f"p{j}", self._blocks[j].in_shape, ref)
        if init_iterations:
            self._update(int(init_iterations))

    # ---- setup helpers -----------------------------------------------------------------------
    def _check_certifiable(self) -> None:
        if not self.plan.exact:
            raise InvalidArgumentError(
                "a certified value needs the model's exact structure (lipbound.graph.capture, "
                "or a plain nn.Sequential of supported modules); this model was only seen "
                "through hooks. Use certified=False (an estimate)."
            )
        unc = [n.qualname for n in self.plan.nodes if n.constants and not n.certified]
        if unc:
            raise InvalidArgumentError(
                "no certified value: the Lipschitz constants of these nodes are not certified: "
                + ", ".join(unc)
            )

    def _ref_tensor(self) -> torch.Tensor:
        return self._layers[0].weight  # type: ignore[return-value]

    def _add_vec(self, name: str, shape: tuple[int, ...], ref: torch.Tensor) -> None:
        self.register_buffer(name, random_unit(shape, dtype=ref.dtype, device=ref.device))
        self._vec_names.append(name)

    def _chain(self) -> tuple[list[_Block], list[_Gap], float, float]:
        plan = self.plan
        if not plan.is_chain():
            bad = [UnsupportedNode(n.qualname or n.name, n.kind, "several inputs or users")
                   for n in plan.nodes if len(n.inputs) > 1]
            raise NotSequentialError(
                bad or [UnsupportedNode("model", "graph", "not a chain")],
                what="kind='seqlip' needs a chain (linear -> activation -> linear ...)",
            )
        blocks: list[_Block] = []
        gaps: list[_Gap] = []
        pre = 0.0
        cur: list[PlanNode] = []
        gap_log, gap_slope, gap_cert, gap_ok = 0.0, (1.0, 1.0), True, True
        for n in plan.nodes:
            if n.kind in ("input", "output"):
                continue
            if n.kind in ("layer", "linear"):
                if not cur and blocks:
                    gaps.append(_Gap(gap_log, gap_slope if gap_ok else None, gap_cert))
                elif not cur and not blocks:
                    pre = gap_log
                if not cur:
                    gap_log, gap_slope, gap_cert, gap_ok = 0.0, (1.0, 1.0), True, True
                cur.append(n)
                continue
            if cur:
                blocks.append(_Block(cur, cur[0].in_shape))
                cur = []
            c = max(n.constants) if n.constants else 1.0
            gap_log += _log(c)
            gap_cert = gap_cert and n.certified
            if n.kind == "activation" and n.slope is not None:
                gap_slope = _compose_slopes(gap_slope, n.slope)
            else:
                gap_ok = False
        if cur:
            blocks.append(_Block(cur, cur[0].in_shape))
            post = 0.0
        else:
            post = gap_log
        return blocks, gaps, pre, post

    # ---- maps ----------------------------------------------------------------------------------
    def _layer_fn(self, call: int, detach: bool, dtype: torch.dtype | None = None) -> Fn:
        m = self._layers[call]
        w: torch.Tensor = m.weight  # type: ignore[assignment]
        if detach:
            w = w.detach()
        if dtype is not None:
            w = w.to(dtype)
        return spec_of(m).map(w)

    def _block_fn(self, block: _Block, detach: bool, dtype: torch.dtype | None = None) -> Fn:
        fns: list[Fn] = []
        for n in block.nodes:
            if n.kind == "layer":
                fns.append(self._layer_fn(int(n.call), detach, dtype))  # type: ignore[arg-type]
            elif n.fn is not None:
                fns.append(n.fn)
            else:
                raise InvalidArgumentError(f"linear node {n.qualname} has no map")

        def f(x: torch.Tensor) -> torch.Tensor:
            for g in fns:
                x = g(x)
            return x

        return f

    def _pair_fn(self, j: int, detach: bool, dtype: torch.dtype | None = None) -> Fn:
        f1 = self._block_fn(self._blocks[j], detach, dtype)
        f2 = self._block_fn(self._blocks[j + 1], detach, dtype)
        return lambda x: f2(f1(x))

    def _maps(self, detach: bool) -> dict[str, Fn]:
        if self.kind == "autolip":
            return {
                name: self._block_fn(_Block(self._groups[int(name[1:])], ()), detach)
                for name in self._vec_names
            }
        out = {f"b{j}": self._block_fn(b, detach) for j, b in enumerate(self._blocks)}
        for name in self._vec_names:
            if name.startswith("p"):
                out[name] = self._pair_fn(int(name[1:]), detach)
        return out

    def _vec(self, name: str) -> torch.Tensor:
        v = self._buffers[name]
        ref = self._ref_tensor()
        if v is None:  # pragma: no cover - registered in __init__
            raise InvalidArgumentError(f"missing buffer {name}")
        if v.device != ref.device or v.dtype != ref.dtype:
            v = v.to(device=ref.device, dtype=ref.dtype)
            self._buffers[name] = v
        return v

    @torch.no_grad()
    def _update(self, n: int) -> None:
        for name, fn in self._maps(detach=True).items():
            v = self._vec(name)
            v.copy_(power_update(fn, v, n, self.eps))

    # ---- values ----------------------------------------------------------------------------------
    def sigmas(self) -> dict[str, torch.Tensor]:
        """Differentiable norm estimates ``||A v|| / ||v||``, by buffer name (no update)."""
        return {name: sigma_of(fn, self._vec(name)) for name, fn in self._maps(False).items()}

    def _log_autolip(self, logs: dict[int, Any]) -> Any:
        """AutoLip recursion in the log domain; ``logs[g]`` the log-norm of linear group ``g``
        (groups without a layer use the product of their rules' constants)."""
        plan = self.plan
        L: dict[str, Any] = {}
        ref = self._ref_tensor()
        for n in plan.nodes:
            if n.kind == "input":
                L[n.name] = torch.zeros((), dtype=ref.dtype, device=ref.device)
            elif n.kind == "output":
                L[n.name] = L[n.inputs[0]]
            elif n.kind in ("layer", "linear"):
                g = self._group_of[n.name]
                nodes = self._groups[g]
                if nodes[-1] is not n:
                    continue  # inside a group: only the group's output is used
                lg = logs[g] if g in logs else sum(
                    _log(max(m.constants) if m.constants else 1.0) for m in nodes
                )
                L[n.name] = lg + L[nodes[0].inputs[0]]
            else:
                consts = n.constants if n.constants else (1.0,) * len(n.inputs)
                terms = [L[p] + _log(c) for p, c in zip(n.inputs, consts) if c > 0]
                if not terms:
                    L[n.name] = torch.full((), -math.inf, dtype=ref.dtype, device=ref.device)
                elif len(terms) == 1:
                    L[n.name] = terms[0]
                elif n.combine == "max":
                    L[n.name] = torch.stack(terms).max()
                elif n.combine == "rss":
                    L[n.name] = 0.5 * torch.logsumexp(2 * torch.stack(terms), 0)
                else:
                    L[n.name] = torch.logsumexp(torch.stack(terms), 0)
        return L[plan.nodes[-1].name]

    def _log_seqlip(self, blk: list[Any], pair: dict[int, Any]) -> Any:
        """Best partition into pairs / singles (dynamic programming), in the log domain."""
        K = len(self._blocks)
        gaps = self._gaps
        best: list[Any] = [None] * (K + 1)
        best[0] = 0.0
        best[1] = blk[0]
        for i in range(2, K + 1):  # blocks 1..i (0-based i-1 is the newest)
            single = best[i - 1] + gaps[i - 2].log_const + blk[i - 1]
            cand = [single]
            if (i - 2) in pair:
                before = gaps[i - 3].log_const if i >= 3 else 0.0
                cand.append(best[i - 2] + before + pair[i - 2])
            best[i] = cand[0] if len(cand) == 1 else _minimum(cand[0], cand[1])
        return self._pre + best[K] + self._post

    def _pair_log(self, j: int, n2n1: Any, n1: Any, n2: Any) -> Any:
        a, b = self._gaps[j].slope  # type: ignore[misc]
        m, r = abs(a + b) / 2.0, (b - a) / 2.0
        return torch.log(m * n2n1 + r * n1 * n2) if isinstance(n2n1, torch.Tensor) else _log(
            m * n2n1 + r * n1 * n2
        )

    def _estimate_log(self) -> torch.Tensor:
        sig = self.sigmas()
        lg = {k: torch.log(s.clamp_min(self.eps)) for k, s in sig.items()}
        if self.kind == "autolip":
            return self._log_autolip({int(k[1:]): v for k, v in lg.items()})
        blk = [lg[f"b{j}"] for j in range(len(self._blocks))]
        pair = {
            j: self._pair_log(j, sig[f"p{j}"], sig[f"b{j}"], sig[f"b{j + 1}"])
            for j in range(len(self._blocks) - 1)
            if f"p{j}" in sig
        }
        return self._log_seqlip(blk, pair)

    @torch.no_grad()
    def _certified_block(self, block: _Block) -> float:
        """Certified norm of a chain of linear nodes: product of certified factors (a layer
        with the eval-mode BatchNorms right after it folded into its weight, exact algebra),
        or the dense float64 SVD of the whole chain when that is smaller and affordable."""
        nodes = block.nodes
        total = 1.0
        i = 0
        while i < len(nodes):
            n = nodes[i]
            if n.kind != "layer":
                total *= max(n.constants) if n.constants else 1.0
                i += 1
                continue
            m = self._layers[int(n.call)]  # type: ignore[arg-type]
            w0: torch.Tensor = m.weight  # type: ignore[assignment]
            w = w0.detach().to(torch.float64)
            j = i + 1
            while j < len(nodes) and bn_scale(nodes[j].module, running=True) is not None:
                scale = bn_scale(nodes[j].module, running=True)
                if scale is None:  # pragma: no cover - checked by the loop condition
                    break
                w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
                j += 1
            total *= certified_layer_norm(spec_of(m), n.in_shape, w)[0]
            i = j
        if len(nodes) > 1:
            ish = nodes[0].in_shape
            f = self._block_fn(block, detach=True, dtype=torch.float64)
            x0 = torch.zeros(1, *ish, dtype=torch.float64, device=self._ref_tensor().device)
            if math.prod(ish) * f(x0).numel() <= SVD_ENTRIES:
                mat, off = dense_matrix(f, ish, dtype=torch.float64, device=x0.device)
                total = min(total, jacobian_upper(mat, off)[0])
        return total

    @torch.no_grad()
    def certified_log(self) -> float:
        """Log of the bound with CERTIFIED layer norms (no gradient); needs an exact plan."""
        self._check_certifiable()
        if self.kind == "autolip":
            logs = {
                int(name[1:]): _log(self._certified_block(_Block(self._groups[int(name[1:])], ())))
                for name in self._vec_names
            }
            return float(self._log_autolip(logs))
        bn = [self._certified_block(b) for b in self._blocks]
        pair: dict[int, Any] = {}
        for j in range(len(self._blocks) - 1):
            if self._gaps[j].slope is None:
                continue
            cand = bn[j] * bn[j + 1]  # >= ||B_{j+1} B_j||
            ish = self._blocks[j].in_shape
            n_in = math.prod(ish)
            f = self._pair_fn(j, detach=True, dtype=torch.float64)
            x0 = torch.zeros(1, *ish, dtype=torch.float64, device=self._ref_tensor().device)
            n_out = f(x0).numel()
            if n_in * n_out <= SVD_ENTRIES:
                # the dense pair matrix with its proven margins (a bare SVD times 1 + 1e-9
                # was below the backward-error bound 8 m n u ||J||_F for large pairs)
                mat, off = dense_matrix(f, ish, dtype=torch.float64, device=x0.device)
                cand = min(cand, jacobian_upper(mat, off)[0])
            pair[j] = self._pair_log(j, cand, bn[j], bn[j + 1])
        return float(self._log_seqlip([_log(b) for b in bn], pair))

    def certified_bound(self) -> float:
        """``exp(certified_log())``: a certified upper bound on the model's l2 Lipschitz
        constant (see the module doc; AutoLip or the SeqLip-style pair bound by ``kind``)."""
        return math.exp(self.certified_log())

    def forward(self, *_: Any) -> torch.Tensor:
        """Update the vectors (training mode only), return the log-bound (see module doc)."""
        if self.training and self.n_power_iterations > 0:
            self._update(self.n_power_iterations)
        est = self._estimate_log()
        if self.certified:
            return est + (self.certified_log() - est).detach()
        return est

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, calls={len(self.plan.calls)}, structure={self.plan.source!r}, "
            f"n_power_iterations={self.n_power_iterations}, certified={self.certified}"
        )


def _minimum(a: Any, b: Any) -> Any:
    """``min(a, b)`` for floats and/or tensors (a float is cast to the tensor's device)."""
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return min(a, b)
    ref = a if isinstance(a, torch.Tensor) else b
    a = torch.as_tensor(a, dtype=ref.dtype, device=ref.device)
    b = torch.as_tensor(b, dtype=ref.dtype, device=ref.device)
    return torch.minimum(a, b)


def penalty(
    model: nn.Module,
    input_shape: Any,
    *,
    kind: str = "autolip",
    n_power_iterations: int = 20,
    certified: bool = False,
    structure: str = "auto",
) -> torch.Tensor:
    """One-shot functional form of :class:`LipschitzPenalty` (not warm-started).

    Builds the penalty, runs ``n_power_iterations`` power iterations from a random start and
    returns the differentiable scalar (an estimate of the log-bound, or the certified value
    with ``certified=True``). In a training loop prefer the module, which keeps its vectors.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> p = penalty(net, (2,), certified=True)
    >>> p.requires_grad
    True
    """
    pen = LipschitzPenalty(
        model, input_shape, kind=kind, n_power_iterations=0, init_iterations=n_power_iterations,
        certified=certified, structure=structure,
    )
    pen.eval()
    return pen()
