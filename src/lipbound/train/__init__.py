"""Lipschitz regularisation of training: penalties and hard constraints.

* :class:`LipschitzPenalty` / :func:`penalty`: a differentiable log-bound (AutoLip product of
  layer norms, or a SeqLip-style pair bound) with warm-started power-iteration vectors kept as
  buffers; see :mod:`lipbound.train.penalty`.
* :func:`lipschitz_constraint` / :func:`remove_lipschitz_constraint`: a parametrisation that
  rescales a Linear/Conv weight so the layer's TRUE operator norm (with stride and padding) is at
  most ``max_norm``; certified in eval mode; see :mod:`lipbound.train.constraint`.
"""

from .constraint import lipschitz_constraint, remove_lipschitz_constraint
from .penalty import LipschitzPenalty, penalty

__all__ = ["LipschitzPenalty", "lipschitz_constraint", "penalty", "remove_lipschitz_constraint"]
