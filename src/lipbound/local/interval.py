r"""Centre/radius interval arithmetic in float64 with one outward rounding rule.

A :class:`Box` is a pair of float64 tensors ``(c, r)``, ``r >= 0``, standing for every tensor
``t`` with ``|t - c| <= r`` entry-wise. Every operation here returns a box that contains the
exact (real-arithmetic) result of the operation applied to every member of its argument boxes.

Rounding. Each operation is evaluated in float64; its computed centre differs from the exact
one by at most ``k u64 M`` entry-wise, where ``M`` is the sum of the magnitudes of the terms
(``|a| |b|`` for a product, ``(|A| |B|)_{ij}`` for a matrix product, ``sum |t_j|`` for a sum)
and ``k`` the number of roundings in the longest chain (``k <= n + 2`` for a sum of ``n``
terms, Higham, *Accuracy and Stability*, sec. 3.1; a few ulp for ``exp``, ``log``, ``erf``,
``sqrt``). The radius is itself computed in float64 with the same kind of error. Every box
this package produces is padded by :func:`pad`: ``r + REL64 * M + TINY`` with
:data:`REL64` ``= 2^-30``; since ``(n + 2) u64 <= 2^-30 / 2`` for every ``n < 2^22`` terms
(``u64 = 2^-53``), half of the pad covers the centre's error and the other half the radius's
own rounding and the ``c +- r`` conversions. Every reduction of a node has at most as many
terms as the node's input has entries; :func:`lipbound.local.propagate.check_graph` refuses
graphs with a tensor of ``2^22`` entries or more per sample. ``TINY = 2^-1000`` covers
underflow of products of tiny entries (absolute error below ``2^-1074`` each).

The same argument with the graph's own largest per-sample tensor, ``n_max`` entries, instead
of ``2^22`` gives the sharper pad :func:`rel_for` ``(n_max) = 2^-k``, the largest power of two
with ``(n_max + 2) u64 <= 2^-k / 2`` (never above :data:`REL64`): every reduction of the graph
has at most ``n_max`` terms (a node's reductions run over its input's entries, the norms and
products of :mod:`lipbound.local.bounds` and :mod:`lipbound.local.telescope` over one node's
or the input's or the output's entries). :func:`rel64` is the pad in force: :data:`REL64`, or
``rel_for(n_max)`` inside a ``with precision(n_max):`` block (:func:`lipbound.local_bound`
and :func:`lipbound.certify` open one for their graph). Why it matters: the pads are
amplified like any interval width (the wrapping factor of the graph); on a 2-block TinyViT a
radius-0 pass with ``2^-30`` pads ends with an output box of radius 1.4 (entries of size 5),
and the rows of ``J(x)`` cannot be enclosed; with ``2^-42`` (``n_max = 512``) the bound at
radius ``1e-6`` goes from 130 to 1.02 times ``||J(x)||``.

This pad concerns the float64 evaluation of the exact function (parameters as stored). The
rounding of the op's own constants in the model's float32 execution is covered, as for every
certified constant of the package, by the registry's :data:`~lipbound.rules._registry.ROUND_REL`
applied to the final local constants (:mod:`lipbound.methods.local`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

__all__ = ["Box", "MAX_ENTRIES", "REL64", "TINY", "from_bounds", "iadd", "imatmul", "imul",
           "pad", "point", "precision", "rel64", "rel_for"]

#: Relative outward pad of every interval operation (module docstring).
REL64 = 2.0**-30
#: Per-sample tensor size up to which :data:`REL64` covers every reduction.
MAX_ENTRIES = 2**22
TINY = 2.0**-1000
_F64 = torch.float64
_REL: ContextVar[float] = ContextVar("lipbound_local_rel64", default=REL64)


def rel_for(entries: int) -> float:
    """The pad ``2^-k`` proven for graphs whose tensors have at most ``entries`` entries per
    sample (module docstring): ``(entries + 2) u64 <= 2^-k / 2``, and at most :data:`REL64`."""
    k = 52 - math.ceil(math.log2(max(int(entries), 1) + 2))
    return min(REL64, 2.0**-k)


def rel64() -> float:
    """The relative pad in force (:data:`REL64` outside a :func:`precision` block)."""
    return _REL.get()


@contextmanager
def precision(entries: int) -> Iterator[None]:
    """Within the block, :func:`rel64` is ``rel_for(entries)``: use it only for a graph whose
    per-sample tensors all have at most ``entries`` entries."""
    token = _REL.set(rel_for(entries))
    try:
        yield
    finally:
        _REL.reset(token)


@dataclass(frozen=True)
class Box:
    """Entry-wise enclosure ``|t - c| <= r`` (float64 tensors of the same shape)."""

    c: torch.Tensor
    r: torch.Tensor

    @property
    def lo(self) -> torch.Tensor:
        return self.c - self.r

    @property
    def hi(self) -> torch.Tensor:
        return self.c + self.r

    @property
    def mag(self) -> torch.Tensor:
        """``|c| + r``: a bound on ``|t|`` for every member."""
        return self.c.abs() + self.r

    def unsqueeze(self, dim: int) -> Box:
        return Box(self.c.unsqueeze(dim), self.r.unsqueeze(dim))

    def reshape(self, *shape: int) -> Box:
        return Box(self.c.reshape(*shape), self.r.reshape(*shape))


def pad(c: torch.Tensor, r: torch.Tensor, mag: torch.Tensor | None = None) -> Box:
    """The box ``(c, r + rel64() * mag + TINY)`` (``mag`` defaults to ``|c| + r``)."""
    m = c.abs() + r if mag is None else mag
    return Box(c, r + rel64() * m + TINY)


def point(t: torch.Tensor) -> Box:
    """A box of radius 0 around ``t`` (converted to float64 exactly)."""
    c = t.detach().to(_F64)
    return Box(c, torch.zeros_like(c))


def from_bounds(lo: torch.Tensor, hi: torch.Tensor) -> Box:
    """The padded box ``[lo, hi]`` (``lo <= hi`` entry-wise)."""
    return pad((lo + hi) / 2, (hi - lo).clamp_min(0) / 2, torch.maximum(lo.abs(), hi.abs()))


def iadd(a: Box, b: Box) -> Box:
    """``a + b`` (broadcasting)."""
    return pad(a.c + b.c, a.r + b.r)


def imul(a: Box, b: Box) -> Box:
    """``a * b`` entry-wise (broadcasting).

    ``|xy - a_c b_c| <= |a_c| r_b + r_a |b_c| + r_a r_b``.
    """
    c = a.c * b.c
    r = a.c.abs() * b.r + a.r * (b.c.abs() + b.r)
    return pad(c, r, a.mag * b.mag)


def imatmul(a: Box, b: Box) -> Box:
    """``a @ b`` (torch.matmul broadcasting): centre ``a_c b_c``, radius
    ``|a_c| r_b + r_a (|b_c| + r_b)``, padded with ``(|a_c| + r_a)(|b_c| + r_b)``."""
    c = a.c @ b.c
    r = a.c.abs() @ b.r + a.r @ (b.c.abs() + b.r)
    return pad(c, r, a.mag @ b.mag)


def isum(a: Box, dim: int, keepdim: bool = False) -> Box:
    """Sum over ``dim``."""
    return pad(a.c.sum(dim, keepdim=keepdim), a.r.sum(dim, keepdim=keepdim),
               a.mag.sum(dim, keepdim=keepdim))


def iscale(a: Box, s: torch.Tensor | float) -> Box:
    """``s * a`` for an exact (point) multiplier ``s``."""
    if isinstance(s, torch.Tensor):
        return pad(a.c * s, a.r * s.abs())
    return pad(a.c * s, a.r * abs(s))


def sum_to(a: Box, shape: tuple[int, ...]) -> Box:
    """The adjoint of broadcasting: sum ``a`` down to ``shape`` (exact for the members)."""
    if tuple(a.c.shape) == tuple(shape):
        return a
    return pad(a.c.sum_to_size(shape), a.r.sum_to_size(shape), a.mag.sum_to_size(shape))
