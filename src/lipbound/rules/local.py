"""What the local bounds (:mod:`lipbound.local`) use of the rules package, re-exported.

The rounding margin of every certified constant (:data:`ROUND_REL`, defined and proven in
:mod:`lipbound.rules._registry`) and the argument helpers of captured nodes
(:mod:`lipbound.rules._util`): one definition each, imported from here by the local rules.
"""

from __future__ import annotations

from ._registry import ROUND_REL
from ._util import arg, batched_dim, is_tensor_arg

__all__ = ["ROUND_REL", "arg", "batched_dim", "is_tensor_arg"]
