"""The one exception family of lipbound.

Every error the library raises on purpose derives from :class:`LipboundError`, so callers can
catch them all at once; each concrete class also derives from the matching built-in
(``ValueError``, ``TypeError``, ``ImportError``) so generic handlers keep working.
Messages name the bad value, the allowed ones and what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "LipboundError",
    "InvalidArgumentError",
    "ShapeError",
    "TrainingModeError",
    "NonLinearOperatorError",
    "NonFiniteError",
    "ZeroOperatorError",
    "UnsupportedNode",
    "UnsupportedModelError",
    "NotSequentialError",
    "MissingDependencyError",
    "SolverError",
]


class LipboundError(Exception):
    """Base class of every error raised by lipbound."""


class InvalidArgumentError(LipboundError, ValueError):
    """An argument has a value outside the allowed set (the message names both)."""


class ShapeError(InvalidArgumentError):
    """``input_shape`` does not fit the model (or is empty / non-positive)."""


class TrainingModeError(InvalidArgumentError):
    """A bound method got a model whose mode-dependent layers are in training mode.

    The graph capture behind the upper bounds always evaluates the model in eval mode, while a
    forward pass in training mode is a different (random, batch-dependent) function: bounds of
    both kinds would then describe different functions. Call ``model.eval()`` first.
    """


class NonLinearOperatorError(InvalidArgumentError):
    """An operator given to a linear-only routine failed the superposition check."""


class NonFiniteError(LipboundError, ValueError):
    """A parameter, buffer or output contains NaN or infinity."""


class ZeroOperatorError(LipboundError, ValueError):
    """The operator is identically zero, so it has no singular vectors to return."""


@dataclass(frozen=True)
class UnsupportedNode:
    """One node of a captured graph that no rule covers."""

    qualname: str
    op: str
    hint: str

    def __str__(self) -> str:
        return f"  - {self.qualname} ({self.op}): {self.hint}"


class UnsupportedModelError(LipboundError, TypeError):
    """The model contains operations without a (global) Lipschitz rule.

    Raised once per model, listing every offending node, never node by node. Up to
    :attr:`LIST_AT` nodes are listed one per line; beyond, the message summarises them by op
    type (count, at most :attr:`EXAMPLES` names, the reason), at most :attr:`KINDS` types, so
    that it stays a few lines on a transformer with thousands of nodes. The full list is
    :attr:`nodes` (and :attr:`by_op`, grouped by op type).
    """

    LIST_AT = 8
    EXAMPLES = 3
    KINDS = 8

    def __init__(self, nodes: Sequence[UnsupportedNode], *, what: str = "") -> None:
        self.nodes: tuple[UnsupportedNode, ...] = tuple(nodes)
        groups: dict[str, list[UnsupportedNode]] = {}
        for n in self.nodes:
            groups.setdefault(n.op, []).append(n)
        self.by_op: dict[str, tuple[UnsupportedNode, ...]] = {
            op: tuple(ns) for op, ns in sorted(groups.items(), key=lambda kv: -len(kv[1]))
        }
        head = what or (
            f"the model has {len(self.nodes)} operation(s) without a Lipschitz rule"
        )
        if len(self.nodes) <= self.LIST_AT:
            lines = [head + ":"] + [str(n) for n in self.nodes]
        else:
            lines = [f"{head} ({len(self.by_op)} op type(s); all of them in the exception's "
                     ".nodes):"]
            for op, ns in list(self.by_op.items())[: self.KINDS]:
                names = ", ".join(n.qualname for n in ns[: self.EXAMPLES])
                more = f" and {len(ns) - self.EXAMPLES} more" if len(ns) > self.EXAMPLES else ""
                reasons = {n.hint for n in ns}
                other = f" (+{len(reasons) - 1} other reason(s))" if len(reasons) > 1 else ""
                lines.append(f"  - {op} x{len(ns)} ({names}{more}): {ns[0].hint}{other}")
            rest = list(self.by_op.values())[self.KINDS:]
            if rest:
                lines.append(f"  - ... {len(rest)} more op type(s), "
                             f"{sum(len(ns) for ns in rest)} node(s)")
        lines.append(
            "What to do: give the op a rule with lipbound.register_rule(...), rewrite it with "
            "supported ops, or use lipbound.lower_bound(...), which needs no rules."
        )
        super().__init__("\n".join(lines))


class NotSequentialError(UnsupportedModelError):
    """A method that needs a chain linear -> activation -> linear ... got another graph."""


class MissingDependencyError(LipboundError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the optional package {package!r}, which is not installed. "
            f"Install it with: pip install 'lipbound[{extra}]'"
        )


class SolverError(LipboundError, RuntimeError):
    """A numerical solver (LP, SDP, eigen-solver) failed or returned an unusable answer."""
