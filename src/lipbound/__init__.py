"""lipbound: certified upper and witnessed lower bounds on the Lipschitz constant of PyTorch
networks (AutoLip, SeqLip, exact, LipSDP), operator norms through autodiff, and Lipschitz
regularisation of training.

Public entry points all take ``(model, input_shape, ...)``, ``input_shape`` being the shape of
ONE sample without the batch dimension; options come after ``*``. ``model`` may also be a
:class:`~lipbound.analysis.Analysis` (the model captured once; ``input_shape`` then omitted).

Attributes are imported lazily so ``import lipbound`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__
from .errors import (
    InvalidArgumentError,
    LipboundError,
    MissingDependencyError,
    NonFiniteError,
    NonLinearOperatorError,
    NotSequentialError,
    ShapeError,
    SolverError,
    TrainingModeError,
    UnsupportedModelError,
    ZeroOperatorError,
)
from .results import (
    CertifyResult,
    ExactResult,
    LayerBound,
    LipschitzResult,
    LocalResult,
    LowerBoundResult,
    SDPResult,
    SeqLipResult,
    SpectralResult,
    Witness,
)

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "spectral_norm": "lipbound.spectral",
    "top_singular": "lipbound.spectral",
    "certified_upper": "lipbound.spectral",
    "Analysis": "lipbound.analysis",
    "autolip": "lipbound.methods.autolip",
    "seqlip": "lipbound.methods.seqlip",
    "lower_bound": "lipbound.methods.lower",
    "exact": "lipbound.methods.exact",
    "lipsdp": "lipbound.methods.sdp",
    "local_bound": "lipbound.methods.local",
    "certify": "lipbound.methods.certify",
    "LocalOptions": "lipbound.local.bounds",
    "bound": "lipbound.report",
    "estimate": "lipbound.report",
    "Report": "lipbound.report",
    "register_rule": "lipbound.rules",
    "capture": "lipbound.graph",
    "simplify": "lipbound.graph",
    "sequential_chain": "lipbound.graph",
    "penalty": "lipbound.train",
    "LipschitzPenalty": "lipbound.train",
    "lipschitz_constraint": "lipbound.train",
    "remove_lipschitz_constraint": "lipbound.train",
}

__all__ = [
    "CertifyResult",
    "ExactResult",
    "InvalidArgumentError",
    "LayerBound",
    "LipboundError",
    "LipschitzResult",
    "LocalResult",
    "LowerBoundResult",
    "MissingDependencyError",
    "NonFiniteError",
    "NonLinearOperatorError",
    "NotSequentialError",
    "SDPResult",
    "SeqLipResult",
    "ShapeError",
    "SolverError",
    "SpectralResult",
    "TrainingModeError",
    "UnsupportedModelError",
    "Witness",
    "ZeroOperatorError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lipbound' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from .analysis import Analysis as Analysis
    from .graph import capture as capture
    from .graph import sequential_chain as sequential_chain
    from .graph import simplify as simplify
    from .methods.autolip import autolip as autolip
    from .methods.certify import certify as certify
    from .methods.exact import ExactResult as ExactResult
    from .methods.exact import exact as exact
    from .methods.local import local_bound as local_bound
    from .methods.lower import lower_bound as lower_bound
    from .methods.sdp import SDPResult as SDPResult
    from .methods.sdp import lipsdp as lipsdp
    from .methods.seqlip import SeqLipResult as SeqLipResult
    from .methods.seqlip import seqlip as seqlip
    from .report import Report as Report
    from .report import estimate as estimate
    from .rules import register_rule as register_rule
    from .spectral import spectral_norm as spectral_norm
    from .spectral import top_singular as top_singular
    from .train import (
        LipschitzPenalty as LipschitzPenalty,
    )
    from .train import (
        lipschitz_constraint as lipschitz_constraint,
    )
    from .train import (
        penalty as penalty,
    )
    from .train import (
        remove_lipschitz_constraint as remove_lipschitz_constraint,
    )
