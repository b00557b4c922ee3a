"""Normalisation layers.

* BatchNorm (eval mode, running statistics) is the per-channel affine map
  ``x -> s_c x + t_c`` with ``s = gamma / sqrt(var + eps)``: constant ``max_c |s_c|`` in every
  norm (diagonal), exact. :func:`lipbound.graph.simplify` folds it into a preceding Linear or
  Conv (``W' = diag(s) W``), which is never looser than bounding the two apart.
* LayerNorm, GroupNorm, InstanceNorm, RMSNorm, LocalResponseNorm, ``F.normalize`` divide by a
  statistic of the input itself. Their Jacobian norm scales like ``|gamma| / sqrt(eps)`` when
  the normalised group has (near) zero variance, so any global constant is useless and none is
  given: they are reported as unsupported with that hint.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._registry import add_hint
from ._util import declare
from .linear import _bn_check, _linear_rule

__all__: list[str] = []

declare([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d], name="batchnorm (eval)",
        kind="linear", constant=_linear_rule, check=_bn_check)

_NORM_HINT = (
    "normalises by a statistic of its own input: near zero variance its Jacobian grows like "
    "|gamma|/sqrt(eps), so there is no useful global constant. Register a rule with "
    "register_rule if your inputs keep the variance away from zero, or use lower_bound"
)
for _k in [
    nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LocalResponseNorm, nn.RMSNorm, F.layer_norm, F.group_norm, F.instance_norm,
    F.local_response_norm, F.normalize, F.rms_norm,
]:
    add_hint(_k, _NORM_HINT)
