"""The functional core: pure functions on tensors, modules and captured graphs.

Everything the high-level entry points (``autolip``, ``seqlip``, ``exact``...) are built from,
for users who want to compose their own method. Nothing here keeps state.

Operator norms (:mod:`lipbound.spectral`)
    ``spectral_norm``, ``top_singular``, ``certified_upper`` (any linear/affine op, through
    autodiff), ``matrix_norm_upper`` (dense matrix, certified with a rounding margin).
Graphs (:mod:`lipbound.graph`)
    ``capture``, ``simplify``, ``sequential_chain``.
AutoLip composition (:mod:`lipbound.methods.autolip`)
    ``node_constants(graph)`` then ``compose(graph, constants)``.
SeqLip pair factors ``max_{sigma in [0,1]^n} ||L diag(sigma) R||_2`` (``seqlip``)
    ``pair_exact`` (certified), ``pair_greedy`` (a realised value: a lower bound of the
    pair factor, an estimate of SeqLip), ``pair_certified`` (certified upper bounds).
Witnesses (:mod:`lipbound.methods.lower`)
    ``pair_ratio(f, x, y)``, ``jacobian_ratio(f, x, v)``: reproduce a lower bound.

>>> import torch
>>> from lipbound import functional as LF
>>> L, R = torch.eye(2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)
>>> round(LF.pair_exact(L, R).value, 6)   # sigma = (1, 1): ||(1, 1)^T|| = sqrt(2)
1.414214
"""

from __future__ import annotations

from .graph import capture, sequential_chain, simplify
from .methods.autolip import compose, node_constants
from .methods.lower import jacobian_ratio, pair_ratio
from .methods.seqlip import pair_certified, pair_exact, pair_greedy
from .spectral import certified_upper, spectral_norm, top_singular
from .spectral.certify import matrix_norm_upper

__all__ = [
    "capture",
    "certified_upper",
    "compose",
    "jacobian_ratio",
    "matrix_norm_upper",
    "node_constants",
    "pair_certified",
    "pair_exact",
    "pair_greedy",
    "pair_ratio",
    "sequential_chain",
    "simplify",
    "spectral_norm",
    "top_singular",
]
