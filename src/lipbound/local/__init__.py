"""Local Lipschitz machinery: interval bounds over a ball and interval secant Jacobians.

* :mod:`lipbound.local.interval`: centre/radius boxes in float64 with outward rounding;
* :mod:`lipbound.local.linear`: affine nodes (``W c + b +- |W| r`` and transposes);
* :mod:`lipbound.local.rules`: local rules of the non-linear nodes, with their proofs;
* :mod:`lipbound.local.crown`: CROWN-style back-substituted bounds of intermediate values;
* :mod:`lipbound.local.propagate`: the forward (boxes) and backward (secant rows) passes.

The public entry points are :func:`lipbound.local_bound` and :func:`lipbound.certify`.
"""

from .interval import Box
from .propagate import backward_rows, check_graph, forward_boxes

__all__ = ["Box", "backward_rows", "check_graph", "forward_boxes"]
