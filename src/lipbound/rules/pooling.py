"""Max-pooling: the constant for overlapping windows.

Max-pooling picks one entry per window: ``y_o = max_{j in W_o} x_j``. Since
``|max_W x - max_W x'| <= max_{j in W} |x_j - x'_j|``,

* l2: ``||y - y'||^2 <= sum_o max_{j in W_o} |d_j|^2 <= sum_o sum_{j in W_o} |d_j|^2
  = sum_j c_j |d_j|^2 <= (max_j c_j) ||d||^2``, where ``c_j`` is the number of windows that
  contain input ``j``. So ``L_2 = sqrt(max_j c_j)``. It is attained: put a large value at an
  input ``j*`` with ``c_{j*} = max c``; it is the argmax of all its windows, the Jacobian has
  ``max c`` ones in column ``j*``, and ``||J e_{j*}|| = sqrt(max c)``.
* l1: ``sum_o max_{j in W_o} |d_j| <= sum_j c_j |d_j|``, so ``L_1 = max_j c_j`` (attained the
  same way).
* l-inf: every output is a max over inputs, ``L_inf = 1``.

Windows are products of 1-D windows, so ``c_j = prod_d c_d(j_d)`` and ``max c = prod_d max
c_d``: per dimension the windows are enumerated exactly with PyTorch's output-size rule
(``pooling_output_shape``: ``floor((L + 2p - d(k-1) - 1 + (s-1 if ceil_mode)) / s) + 1``
windows, dropping the last one in ``ceil_mode`` unless it starts inside the input or the left
padding; with ``ceil_mode`` a window may reach past the right padding, even when the kernel
span exceeds the padded input). Padding is ``-inf`` for max-pooling, so padded positions never
count. A window whose taps all fall on padding (possible with dilation or ``ceil_mode``)
outputs ``-inf``: the map is then not finite and the node is refused. Without
padding/dilation and a large enough input, ``max c_d = ceil(k_d / s_d)``: a 3x3 stride-2 pool
has ``max c = 4`` and ``L_2 = 2``. Adaptive max-pooling uses the windows
``[floor(o L / n), ceil((o + 1) L / n))``. All these constants are certified (exact counts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import nn

from ._registry import NodeConstant, RuleContext
from ._util import arg, declare

if TYPE_CHECKING:  # pragma: no cover
    from ..graph.types import Node

__all__ = [
    "adaptive_window_count",
    "maxpool_constant",
    "padding_only_windows",
    "window_count",
    "window_starts",
]

_MAX = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    F.max_pool1d_with_indices: 1, F.max_pool2d_with_indices: 2, F.max_pool3d_with_indices: 3,
}
_ADAPTIVE = {
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
    F.adaptive_max_pool1d_with_indices: 1, F.adaptive_max_pool2d_with_indices: 2,
    F.adaptive_max_pool3d_with_indices: 3,
}


def window_starts(
    length: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1,
    ceil_mode: bool = False,
) -> list[int]:
    """First tap of every 1-D max-pool window (PyTorch's output-size rule, exact).

    >>> window_starts(2, 3, 2, ceil_mode=True), window_starts(2, 3, 2)
    ([0], [])
    """
    span = dilation * (kernel - 1) + 1
    num = length + 2 * padding - span + (stride - 1 if ceil_mode else 0)
    out = num // stride + 1  # floor division, as torch's div_rtn
    if ceil_mode and (out - 1) * stride >= length + padding:
        out -= 1
    return [o * stride - padding for o in range(max(out, 0))]


def _taps(start: int, kernel: int, dilation: int, length: int) -> list[int]:
    return [j for j in (start + t * dilation for t in range(kernel)) if 0 <= j < length]


def window_count(
    length: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1,
    ceil_mode: bool = False,
) -> int:
    """Largest number of 1-D max-pool windows containing one input position (exact).

    >>> window_count(13, 3, 2), window_count(13, 2, 2), window_count(13, 3, 1)
    (2, 1, 3)
    >>> window_count(2, 3, 2, ceil_mode=True)  # kernel longer than the input: one window
    1
    """
    counts = [0] * length
    for start in window_starts(length, kernel, stride, padding, dilation, ceil_mode):
        for j in _taps(start, kernel, dilation, length):
            counts[j] += 1
    return max(counts) if counts else 0


def padding_only_windows(
    length: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1,
    ceil_mode: bool = False,
) -> int:
    """Number of 1-D windows with no tap inside the input (their max-pool output is -inf).

    >>> padding_only_windows(1, 2, 2, padding=1, dilation=2, ceil_mode=True)
    1
    """
    starts = window_starts(length, kernel, stride, padding, dilation, ceil_mode)
    return sum(1 for st in starts if not _taps(st, kernel, dilation, length))


def adaptive_window_count(length: int, out: int) -> int:
    """Largest number of adaptive-pool windows containing one input position.

    >>> adaptive_window_count(7, 6), adaptive_window_count(6, 6), adaptive_window_count(5, 3)
    (2, 1, 2)
    """
    counts = [0] * length
    for o in range(out):
        lo = (o * length) // out
        hi = -(-((o + 1) * length) // out)
        for j in range(lo, hi):
            counts[j] += 1
    return max(counts) if counts else 0


def maxpool_constant(count: int, norm: str) -> float:
    """Constant of a max-pool whose inputs lie in at most ``count`` windows."""
    return {"2": math.sqrt(count), "1": float(count), "inf": 1.0 if count else 0.0}[norm]


def _tup(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, Sequence):
        t = tuple(int(a) for a in v)
        return t * n if len(t) == 1 else t
    return (int(v),) * n


def _dims(node: Node) -> int:
    key = node.call.key
    return _MAX.get(key) or _ADAPTIVE.get(key) or 2


def _pool_params(node: Node) -> list[tuple[int, int, int, int, int, bool]]:
    """Per spatial dim ``(length, kernel, stride, padding, dilation, ceil_mode)`` of a max-pool."""
    nd = _dims(node)
    spatial = tuple(node.in_shapes[0])[-nd:]
    m = node.module
    if m is not None:
        k, s, p, d, c = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
    else:
        k = arg(node, 1, "kernel_size")
        s = arg(node, 2, "stride")
        p = arg(node, 3, "padding", 0)
        d = arg(node, 4, "dilation", 1)
        c = arg(node, 5, "ceil_mode", False)
    kk = _tup(k, nd)
    ss = _tup(s, nd) if s not in (None, [], ()) else kk
    pp, dd = _tup(p, nd), _tup(d, nd)
    return [(int(L), kk[i], ss[i], pp[i], dd[i], bool(c)) for i, L in enumerate(spatial)]


def max_count(node: Node) -> int:
    """``max_j c_j`` for a (adaptive) max-pool node."""
    nd = _dims(node)
    spatial = tuple(node.in_shapes[0])[-nd:]
    key = node.call.key
    m = node.module
    if key in _ADAPTIVE:
        size = m.output_size if m is not None else arg(node, 1, "output_size")
        outs = _tup(size, nd) if not isinstance(size, Sequence) or len(size) != nd else tuple(
            spatial[i] if size[i] is None else int(size[i]) for i in range(nd)
        )
        return math.prod(adaptive_window_count(L, o) for L, o in zip(spatial, outs))
    return math.prod(window_count(*q) for q in _pool_params(node))


def _rule(node: Node, ctx: RuleContext) -> NodeConstant:
    c = max_count(node)
    return NodeConstant(
        constants=(maxpool_constant(c, ctx.norm),), certified=True,
        how=f"each input in at most {c} window(s)",
    )


def _check(node: Node) -> str | None:
    gi = node.call.getitem
    if gi not in (None, 0):
        return "max-pool indices are piecewise constant integers (not Lipschitz)"
    if node.call.key in _MAX and node.in_shapes:
        for dim, q in enumerate(_pool_params(node)):
            if padding_only_windows(*q):
                L, k, s, p, d, c = q
                return (
                    f"a pooling window lies over padding only (spatial dim {dim}: length {L}, "
                    f"kernel {k}, stride {s}, padding {p}, dilation {d}, ceil_mode={c}): its "
                    "output is -inf, not a finite function of the input. Reduce the padding "
                    "or dilation, or use ceil_mode=False"
                )
        if max_count(node) == 0:
            return "the pooling has no window over the input (empty output)"
    return None


declare(list(_MAX) + list(_ADAPTIVE), name="max-pool", kind="op", constant=_rule,
        check=_check)
