"""Structural ops: reshapes, selections, sums of branches, concatenation, softmax.

Declared constants (every one certified by the argument next to it):

=====================  ============  ============  ============  ===============================
op                     l2            l1            l-inf         why
=====================  ============  ============  ============  ===============================
view/reshape/flatten,  1             1             1             a permutation (or selection) of
permute/transpose,                                               entries: ``J`` has at most one
squeeze, slicing,                                                1 per row and per column
narrow, pad (zeros),
dropout/identity (eval)
expand/repeat/tile     sqrt(m)       m             1             each entry copied ``m`` times
                                                                 (m = out numel / in numel)
add / sub / rsub       c_i ||B_i||   c_i ||B_i||   c_i ||B_i||   triangle inequality, ``sum_i``:
(branches, alpha)                                                ``c = 1`` for ``input`` and
                                                                 ``|alpha|`` for ``other``
                                                                 (``add``/``sub``); ``rsub(input,
                                                                 other, alpha) = other - alpha
                                                                 input``: ``|alpha|`` on input
x + c, c - x, -x       ||B||         ||B||         1             translation / sign flip, then
                                                                 the broadcast ``B`` (below)
x * s, x / s (s const) sqrt(max_j     max_j sum     max|s|        ``diag(|s|) B``: one entry per
                       sum s_i^2)    |s_i|                       row; column ``j`` = the copies
                                                                 ``i ~ j`` of ``x_j``
cat / stack,           1 per input,  1 per input,  1 per input,  ``||cat(a,b)||_2^2 = ||a||^2 +
maximum/minimum        root-sum-sq   sum           max           ||b||^2``; for max:
(times ||B_i||)                                                  ``|max(a,b)-max(a',b')| <=
                                                                 max(|a-a'|, |b-b'|)``
max/min over a dim     1             1             1             each output is the max of its
                                                                 own disjoint set of entries
softmax (dim of n)     1/2           1/2           1/2           ``J = diag(p) - p p^T`` is
                                                                 symmetric; Gershgorin row i:
                                                                 ``2 p_i (1 - p_i) <= 1/2``;
                                                                 attained as ``p -> (1/2,1/2,0..)``
log_softmax (n >= 2)   sqrt(n)       n - 1         2             ``J = I - 1 p^T`` has ``J 1 = 0``
                                                                 and ``||J||_F^2 = n - 2 + n|p|^2``
                                                                 with ``n - 2`` singular values 1,
                                                                 so ``||J||_2^2 = n |p|^2 < n``
                                                                 (sup as p -> one-hot); rows of
                                                                 ``|J|`` sum to ``2(1 - p_i)``,
                                                                 columns to ``1 + (n-2) p_j``
=====================  ============  ============  ============  ===============================

``B_i`` is the broadcast of input ``i`` to the output shape (each entry copied ``k_i`` times):
``||B||_2 = sqrt(k)``, ``||B||_1 = k``, ``||B||_inf = 1`` (:mod:`lipbound.rules._util`).
Without broadcasting ``||B|| = 1``. When a tensor operand of add/sub cannot be matched to its
argument (it reaches the op through a non-tensor intermediary), every input gets
``max(1, |alpha|)``, which bounds both roles.

Products of two inputs (``x * y``), division by an input or by a constant with a zero entry,
and attention-style ``matmul`` of two inputs have no global constant and are reported as
unsupported.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import NodeConstant, RuleContext
from ._util import (
    arg,
    batched_dim,
    broadcast_constants,
    const_rule,
    copy_norm,
    declare,
    is_tensor_arg,
    numel,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..graph.types import Node

__all__ = [
    "EVAL_IDENTITY_MODULES",
    "IDENTITY_OPS",
    "PERMUTATION_OPS",
    "RESHAPE_OPS",
    "SELECTION_OPS",
    "is_eval_identity",
    "log_softmax_constant",
    "softmax_constant",
]

ONE = {"1": 1.0, "2": 1.0, "inf": 1.0}
CAT_COMBINE = {"1": "sum", "2": "rss", "inf": "max"}

# ---- declared tables ------------------------------------------------------------------------
#: ops that are the identity on values in eval mode (dropped by ``simplify``)
IDENTITY_OPS: list[Any] = [
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout, torch.clone, "clone", "contiguous", "detach", torch.detach,
    "float", "double", "to", "type_as",
]
#: modules that are the identity in eval mode, recognised by class name and the package that
#: defines them, ``(package prefix, class name)``: their packages need not be importable here
#: (torchvision's wheel may not load against the installed torch; timm is optional). Each is
#: ``return x`` when ``not self.training``, which is what lipbound analyses; torchvision wraps
#: ``stochastic_depth`` with ``torch.fx.wrap``, so without this table the traced graph holds
#: an op without a rule. Captured as leaves with the rule key ``nn.Identity`` (the op they
#: equal), and checked on the capture sample (output == input), else refused.
EVAL_IDENTITY_MODULES: list[tuple[str, str]] = [
    ("torchvision.ops", "StochasticDepth"),
    ("torchvision.ops", "DropBlock2d"),
    ("torchvision.ops", "DropBlock3d"),
    ("timm.layers", "DropPath"),
    ("timm.layers", "DropBlock2d"),
    ("timm.models.layers", "DropPath"),
    ("timm.models.layers", "DropBlock2d"),
]


def is_eval_identity(module: nn.Module) -> bool:
    """Whether ``module``'s class is declared in :data:`EVAL_IDENTITY_MODULES` (by the name and
    the defining package of the class itself, not of a subclass)."""
    cls = type(module)
    where = getattr(cls, "__module__", "") or ""
    return any(
        cls.__name__ == name and (where == pkg or where.startswith(pkg + "."))
        for pkg, name in EVAL_IDENTITY_MODULES
    )


def _eval_identity_check(node: Node) -> str | None:
    if node.call.identity_checked is False:  # set by capture for the modules above
        return (
            "declared the identity in eval mode (lipbound.rules.structural."
            "EVAL_IDENTITY_MODULES), but its output differed from its input on the capture "
            "sample; register a rule for it with lipbound.register_rule(...)"
        )
    return None


#: ops that only rearrange entries (bijective, same numel): constant 1 in every norm, and
#: isometries in l1, l2 and l-inf (so they are stripped from the ends of merged linear chains)
RESHAPE_OPS: list[Any] = [
    nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
    F.pixel_shuffle, F.pixel_unshuffle,
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.swapdims,
    torch.movedim, torch.moveaxis, torch.squeeze, torch.unsqueeze, torch.t, torch.unflatten,
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "swapdims",
    "movedim", "moveaxis", "squeeze", "unsqueeze", "t", "view_as", "reshape_as",
]
#: ops that select or zero-pad entries: constant 1 in every norm
SELECTION_OPS: list[Any] = [
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, F.pad, torch.narrow, operator.getitem,
    torch.chunk, torch.split, torch.unbind, torch.tensor_split,
    "narrow", "chunk", "split", "unbind", "tensor_split",
]
PERMUTATION_OPS = RESHAPE_OPS + SELECTION_OPS
COPY_OPS: list[Any] = ["expand", "expand_as", "repeat", "tile", torch.tile]
ADD_OPS: list[Any] = [operator.add, operator.iadd, torch.add, "add", "add_"]
SUB_OPS: list[Any] = [operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_",
                      torch.rsub]
NEG_OPS: list[Any] = [operator.neg, torch.neg, "neg", torch.negative]
MUL_OPS: list[Any] = [operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_"]
DIV_OPS: list[Any] = [operator.truediv, operator.itruediv, torch.div, torch.divide, "div",
                      "div_", torch.true_divide]
CAT_OPS: list[Any] = [torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack,
                      torch.vstack, torch.dstack, torch.column_stack]
MAX2_OPS: list[Any] = [torch.maximum, torch.minimum, torch.fmax, torch.fmin, "maximum",
                       "minimum"]
REDUCE_MAX_OPS: list[Any] = [torch.max, torch.min, torch.amax, torch.amin, "max", "min", "amax",
                             "amin"]
SOFTMAX_OPS: list[Any] = [nn.Softmax, nn.Softmax2d, F.softmax, torch.softmax, "softmax"]
LOG_SOFTMAX_OPS: list[Any] = [nn.LogSoftmax, F.log_softmax, torch.log_softmax, "log_softmax"]


# ---- checks -------------------------------------------------------------------------------
def _getitem_check(node: Node) -> str | None:
    """Basic indexing (ints, slices, None, Ellipsis) only; tuple producers via ``[i]``."""
    if node.call.key is operator.getitem:
        idx = arg(node, 1, "idx")
        items = idx if isinstance(idx, tuple) else (idx,)
        for it in items:
            if it is None or it is Ellipsis or isinstance(it, (int, slice)):
                if isinstance(it, slice) and it.step not in (None, 1) and not (
                    isinstance(it.step, int) and it.step > 0
                ):
                    return "slicing with a negative/non-int step"
                continue
            return (
                "advanced indexing (with a list or tensor index) may repeat entries, so it "
                "is not 1-Lipschitz in general"
            )
        return None
    if node.call.getitem is None and node.call.key in (
        torch.chunk, torch.split, torch.unbind, torch.tensor_split,
        "chunk", "split", "unbind", "tensor_split",
    ):
        return "a tuple-valued op used without [i]"
    return None


def _pad_check(node: Node) -> str | None:
    if node.call.key is F.pad:
        mode = arg(node, 2, "mode", "constant")
        if mode != "constant":
            return (
                f"F.pad(mode={mode!r}) copies border entries several times (not 1-Lipschitz); "
                "register a rule with the copy count"
            )
    return None


def _perm_check(node: Node) -> str | None:
    return _getitem_check(node) or _pad_check(node)


def _binary_value_check(what: str) -> Any:
    def check(node: Node) -> str | None:
        if len(node.inputs) >= 2:
            return (
                f"{what} of two tensors that both depend on the input has no global Lipschitz "
                "constant (it grows with the inputs)"
            )
        return None

    return check


def _div_check(node: Node) -> str | None:
    if len(node.inputs) >= 2:
        return "division by a tensor that depends on the input has no global constant"
    num = arg(node, 0, "input")
    if not is_tensor_arg(num):
        return "division by a tensor that depends on the input has no global constant"
    if arg(node, 2, "rounding_mode") is not None:
        return "rounded division (floor/trunc) is discontinuous"
    d = arg(node, 1, "other")
    zero = bool((d == 0).any()) if isinstance(d, torch.Tensor) else float(d) == 0.0
    if zero:
        return "division by a constant with a zero entry (x / 0 is not finite)"
    return None


def _other_operand(node: Node) -> Any:
    a0, a1 = arg(node, 0, "input"), arg(node, 1, "other")
    return a1 if is_tensor_arg(a0) else a0


# ---- constants ----------------------------------------------------------------------------
def operand_coefficients(node: Node) -> tuple[float, ...]:
    """``|coefficient|`` of each tensor input of an add / sub / rsub node (before broadcasting).

    ``add(input, other, alpha) = input + alpha other``, ``sub(...) = input - alpha other``,
    ``rsub(input, other, alpha) = other - alpha input`` (operators ``+``/``-`` have no alpha).
    Tensor arguments are matched to ``node.inputs`` in call order (positional, then keyword:
    the order in which the graph lists them); if they cannot be matched, every input gets
    ``max(1, |alpha|)``.
    """
    a = abs(float(arg(node, 2, "alpha", 1)))
    c_in, c_other = (a, 1.0) if node.call.key is torch.rsub else (1.0, a)
    role = {0: c_in, 1: c_other, "input": c_in, "other": c_other}
    found: list[float | None] = []
    for i, v in enumerate(node.call.args):
        if is_tensor_arg(v):
            found.append(role.get(i))
    for k, v in (node.call.kwargs).items():
        if is_tensor_arg(v):
            found.append(role.get(k))
    if len(found) == len(node.inputs) and all(c is not None for c in found):
        return tuple(float(c) for c in found if c is not None)
    return (max(1.0, a),) * len(node.inputs)


def _add_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    cs = broadcast_constants(node, operand_coefficients(node), ctx.norm)
    return NodeConstant(constants=cs, certified=True, how="sum of branches (|coef| ||B||)")


def _scale_rule(node: Node, ctx: RuleContext, w: Any, how: str) -> NodeConstant:
    v = copy_norm(w, node.in_shapes[0], node.out_shape, ctx.norm)
    return NodeConstant(constants=(v,), certified=True, how=how)


def _mul_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    return _scale_rule(node, ctx, _other_operand(node), "|multiplier| (diagonal, broadcast)")


def _div_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    d = arg(node, 1, "other")
    w = 1.0 / d.detach().double().abs() if isinstance(d, torch.Tensor) else 1.0 / abs(float(d))
    return _scale_rule(node, ctx, w, "1 / |divisor| (diagonal, broadcast)")


def _copy_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    m = numel(node.out_shape) / max(1, numel(node.in_shapes[0]))
    v = {"2": math.sqrt(m), "1": m, "inf": 1.0}[ctx.norm]
    return NodeConstant(constants=(v,), certified=True, how=f"each entry copied {m:g} times")


def _copy_check(node: Node) -> str | None:
    m = numel(node.out_shape) / max(1, numel(node.in_shapes[0]))
    if m != int(m):
        return "copy count is not an integer"
    return None


def _softmax_n(node: Node) -> tuple[int | None, str | None]:
    shape = node.in_shapes[0]
    if node.module is not None:
        dim = -3 if isinstance(node.module, nn.Softmax2d) else getattr(node.module, "dim", None)
    else:
        dim = arg(node, 1, "dim")
    if dim is None:  # legacy implicit dim, as torch's _get_softmax_dim
        nd = len(shape) + 1
        dim = 0 if nd in (0, 1, 3) else 1
    d = batched_dim(int(dim), len(shape))
    if d is None:
        return None, "softmax over the batch dimension mixes samples"
    return shape[d], None


def _softmax_check(node: Node) -> str | None:
    return _softmax_n(node)[1]


def softmax_constant(norm: str) -> float:
    """Lipschitz constant of softmax over any number of classes: 1/2 in l1, l2 and l-inf."""
    return 0.5


def log_softmax_constant(n: int, norm: str) -> float:
    """Lipschitz constant of log-softmax over ``n`` classes (sup of ``||I - 1 p^T||``)."""
    if n <= 1:
        return 0.0
    return {"2": math.sqrt(n), "1": float(n - 1), "inf": 2.0}[norm]


def _softmax_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    return NodeConstant(
        constants=(softmax_constant(ctx.norm),), certified=True,
        how="||diag(p) - pp^T|| <= 1/2 (Gershgorin)",
    )


def _log_softmax_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    n, _ = _softmax_n(node)
    return NodeConstant(
        constants=(log_softmax_constant(int(n or 1), ctx.norm),), certified=True,
        how=f"sup ||I - 1p^T|| over the simplex, n={n}",
    )


def _reduce_max_check(node: Node) -> str | None:
    gi = node.call.getitem
    if gi is not None and gi != 0:
        return "the argmax/argmin indices are piecewise constant integers (not Lipschitz)"
    if len(node.inputs) >= 2:
        return None  # torch.max(a, b): element-wise maximum of two inputs
    return None


def _max2_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    """Element-wise max/min of inputs (or of one input and a constant), with broadcasting."""
    return NodeConstant(
        constants=broadcast_constants(node, (1.0,) * max(1, len(node.inputs)), ctx.norm),
        certified=True, how="|max(a,b)-max(a',b')| <= max(|a-a'|,|b-b'|)",
        combine=CAT_COMBINE[ctx.norm],  # type: ignore[arg-type]
    )


def _reduce_max_rule(node: Node, ctx: RuleContext) -> NodeConstant:
    if len(node.inputs) >= 2:
        return _max2_rule(node, ctx)  # torch.max(a, b): element-wise maximum of two inputs
    return NodeConstant(constants=(1.0,), certified=True, how="max over disjoint sets")


# ---- registration -------------------------------------------------------------------------
declare(IDENTITY_OPS, name="identity (eval)", kind="linear",
        constant=const_rule(ONE, "identity in eval mode"), check=_eval_identity_check,
        identity=True)
declare(RESHAPE_OPS, name="reshape", kind="linear",
        constant=const_rule(ONE, "rearranges entries"), structural=True, bijective=True)
declare(SELECTION_OPS, name="selection", kind="linear",
        constant=const_rule(ONE, "selects / zero-pads entries"), check=_perm_check,
        structural=True)
declare(COPY_OPS, name="copy", kind="linear", constant=_copy_rule, check=_copy_check,
        structural=True)
declare(ADD_OPS + SUB_OPS, name="add/sub", kind="affine", constant=_add_rule, structural=True)
declare(NEG_OPS, name="neg", kind="linear", constant=const_rule(ONE, "sign flip"),
        structural=True)
declare(MUL_OPS, name="scalar mul", kind="affine", constant=_mul_rule,
        check=_binary_value_check("a product"))
declare(DIV_OPS, name="scalar div", kind="affine", constant=_div_rule, check=_div_check)
declare(CAT_OPS, name="cat", kind="op",
        constant=const_rule(ONE, "concatenation", combine=CAT_COMBINE))
declare(MAX2_OPS, name="maximum", kind="elementwise", constant=_max2_rule,
        slope_range=lambda node: (0.0, 1.0))
declare(REDUCE_MAX_OPS, name="max over a dim", kind="op", constant=_reduce_max_rule,
        check=_reduce_max_check)
declare(SOFTMAX_OPS, name="softmax", kind="op", constant=_softmax_rule, check=_softmax_check)
declare(LOG_SOFTMAX_OPS, name="log_softmax", kind="op", constant=_log_softmax_rule,
        check=_softmax_check)
