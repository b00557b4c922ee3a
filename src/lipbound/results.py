"""Frozen, typed result objects of every method, with readable table ``repr``\\ s: all result
types live here (the method modules re-export theirs).

One vocabulary: the same field means the same thing in every result.

* ``value``: the method's headline number (what ``float(result)`` gives).
* ``upper``: a CERTIFIED upper bound on the Lipschitz constant (or operator norm), or ``None``.
* ``lower``: a WITNESSED lower bound (a :class:`Witness` reproduces it), or ``None``.
* ``certified``: whether ``value`` itself is proven (equal to ``upper`` or to ``lower``).
* ``bound``: what ``value`` is: ``"upper"``, ``"lower"``, ``"exact"`` (``upper == lower``) or
  ``"estimate"`` (no proof); ``status`` says it in words and is derived, never stored.
* ``how``: the algorithm or certificate behind ``value``; ``seconds``: wall time of the call.
* ``layers``: per-node (AutoLip) or per-pair (SeqLip) rows, :class:`LayerBound`.
* ``witness``: the :class:`Witness` of ``lower``; ``notes``: sentences; ``extra``: the rest.

Renamed (the old names still work for one release, with a ``DeprecationWarning``):
``SeqLipResult.certified_upper`` is ``upper``, ``SDPResult.verified`` is ``certified``,
``SDPResult.status`` (the solver's status) is ``solver_status``, ``ExactResult.witness`` (a
tuple) is ``witness.x``, ``LowerBoundResult.x`` / ``.y`` are ``witness.x`` / ``witness.y``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

__all__ = [
    "CertifyResult",
    "ExactResult",
    "LayerBound",
    "LipschitzResult",
    "LocalResult",
    "LowerBoundResult",
    "SDPResult",
    "SeqLipResult",
    "SpectralResult",
    "Witness",
    "format_table",
    "fmt_float",
]

Bound = Literal["upper", "lower", "exact", "estimate"]


def fmt_float(x: float | None, digits: int = 5) -> str:
    """Format a float compactly for tables (``None`` -> ``"-"``)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str = "") -> str:
    """Render a plain-text table with aligned columns (floats via :func:`fmt_float`).

    >>> print(format_table(["a", "b"], [["x", 1.5], ["yy", None]]))
    a   b
    --  ---
    x   1.5
    yy  -
    """
    cells = [[c if isinstance(c, str) else fmt_float(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    out = [title] if title else []
    out.append(line)
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
    return "\n".join(out)


def format_markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render a GitHub-flavoured markdown table."""
    cells = [[c if isinstance(c, str) else fmt_float(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out.extend("| " + " | ".join(r) + " |" for r in cells)
    return "\n".join(out)


@dataclass(frozen=True, kw_only=True)
class LayerBound:
    """One row of a per-node (AutoLip) or per-pair (SeqLip) breakdown.

    ``value`` is the factor this node/pair contributes; ``certified`` whether it is proven;
    ``estimate`` an optional uncertified companion (e.g. the power-iteration value next to a
    Fourier certificate); ``how`` names the rule or algorithm (``"fourier"``, ``"exact"``...).
    """

    name: str
    op: str
    value: float
    certified: bool
    seconds: float = 0.0
    estimate: float | None = None
    how: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "value": self.value,
            "certified": self.certified,
            "estimate": self.estimate,
            "how": self.how,
            "seconds": self.seconds,
        }


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}",
                  DeprecationWarning, stacklevel=3)


def _tensor_list(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else t.detach().cpu().flatten().tolist()


@dataclass(frozen=True, kw_only=True, eq=False)
class Witness:
    """What reproduces a lower bound ``lower`` on ``L(f)``.

    * ``kind="pair"``: ``||f(x) - f(y)|| / ||x - y||`` (``x``, ``y`` set);
    * ``kind="jacobian"``: ``||J_f(x) v|| / ||v||`` at ``x`` along ``direction`` ``v`` (or, without
      a direction, a power-iteration value of ``||J_f(x)||`` from below);
    * ``kind="region"``: a point ``x`` strictly inside an activation region of a piecewise-linear
      net, where ``f`` is affine and ``||J_f(x)||`` is the value.

    Tensors are float64, shaped like ONE input sample.
    """

    kind: str
    x: torch.Tensor
    y: torch.Tensor | None = None
    direction: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "x": _tensor_list(self.x), "y": _tensor_list(self.y),
                "direction": _tensor_list(self.direction)}


@dataclass(frozen=True, kw_only=True, eq=False)
class LipschitzResult:
    """Result of a Lipschitz-constant method (AutoLip, SeqLip, exact, LipSDP, lower bounds);
    the fields are the module docstring's vocabulary."""

    value: float
    certified: bool
    method: str
    norm: str = "2"
    bound: Bound = "upper"
    upper: float | None = None
    lower: float | None = None
    how: str = ""
    witness: Witness | None = None
    layers: tuple[LayerBound, ...] = ()
    iterations: int = 0
    seconds: float = 0.0
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # one vocabulary: a certified upper (exact) value IS the certified upper bound, a
        # certified lower (exact) value IS the witnessed lower bound
        if self.certified and self.bound in ("upper", "exact") and self.upper is None:
            object.__setattr__(self, "upper", float(self.value))
        if self.certified and self.bound in ("lower", "exact") and self.lower is None:
            object.__setattr__(self, "lower", float(self.value))

    def __float__(self) -> float:
        return float(self.value)

    @property
    def status(self) -> str:
        """``"certified upper bound"``, ``"estimate"``, ``"exact"``... in words."""
        if self.bound == "exact":
            return "exact" if self.certified else "exact (not certified)"
        if self.bound == "estimate" or not self.certified:
            return "estimate (not certified)"
        return f"certified {self.bound} bound"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats, strings, lists only)."""
        return {
            "method": self.method,
            "value": self.value,
            "certified": self.certified,
            "bound": self.bound,
            "status": self.status,
            "upper": self.upper,
            "lower": self.lower,
            "how": self.how,
            "witness": None if self.witness is None else self.witness.to_dict(),
            "norm": self.norm,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "layers": [lb.to_dict() for lb in self.layers],
            # a subclass's own fields (SeqLip's estimate, exact's counters, LipSDP's solver
            # report), in declaration order: one serialisation path for every result
            **{f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in _BASE_FIELDS},
        }

    def table(self) -> str:
        """The per-node breakdown as a plain-text table."""
        rows = [
            [lb.name, lb.op, lb.value, lb.certified, lb.estimate, lb.how, lb.seconds]
            for lb in self.layers
        ]
        return format_table(["node", "op", "factor", "certified", "estimate", "how", "s"], rows)

    def __repr__(self) -> str:
        head = (
            f"{type(self).__name__}(method={self.method!r}, value={fmt_float(self.value)}, "
            f"{self.status}, norm=l{self.norm}, upper={fmt_float(self.upper)}, "
            f"seconds={self.seconds:.3g})"
        )
        parts = [head]
        if self.layers:
            parts.append(self.table())
        parts.extend(f"note: {n}" for n in self.notes)
        return "\n".join(parts)


#: the fields :meth:`LipschitzResult.to_dict` writes itself (or leaves out: ``extra``)
_BASE_FIELDS = frozenset(f.name for f in fields(LipschitzResult))


@dataclass(frozen=True, kw_only=True, eq=False)
class LowerBoundResult(LipschitzResult):
    """A witnessed lower bound: ``value = lower <= L(f)``, with the :class:`Witness` that
    reproduces it (a pair, or a Jacobian at a point along a direction)."""

    bound: Bound = "lower"

    @property
    def x(self) -> torch.Tensor | None:
        """Deprecated: ``witness.x``."""
        _deprecated("LowerBoundResult.x", "witness.x")
        return None if self.witness is None else self.witness.x

    @property
    def y(self) -> torch.Tensor | None:
        """Deprecated: ``witness.y``."""
        _deprecated("LowerBoundResult.y", "witness.y")
        return None if self.witness is None else self.witness.y


@dataclass(frozen=True, kw_only=True, eq=False)
class SeqLipResult(LipschitzResult):
    """Result of :func:`lipbound.seqlip`.

    ``value`` the headline (mode ``"exact"``/``"auto"``: the certified bound; ``"greedy"``: the
    greedy estimate), ``certified`` whether ``value`` is proven, ``upper`` the certified SeqLip
    bound, ``estimate`` the SeqLip ESTIMATE: per segment the product of the best realised pair
    values found (the paper's (Greedy) SeqLip), capped by the segment's certified bound when
    that is smaller (the SVD-chain product is one upper bound of the segment's constant among
    several), composed with AutoLip elsewhere; not a certificate.
    ``extra["estimate_uncapped"]`` is the same without the cap, ``extra["estimate_truncated"]``
    the same with each greedy pair valued on its top-``k`` truncation (``||L_k D R_k||``, the
    paper's procedure for CNNs; smaller than the full-pair value of the same pattern).
    ``autolip`` is AutoLip's value for comparison. ``layers`` has one row per pair
    (``how`` is the mode actually used for that pair), per segment and per other node.
    """

    estimate: float
    autolip: float
    segments: int = 0

    @property
    def certified_upper(self) -> float | None:
        """Deprecated: ``upper``."""
        _deprecated("SeqLipResult.certified_upper", "upper")
        return self.upper

    def __repr__(self) -> str:
        head, *rest = super().__repr__().split("\n")
        up = "-" if self.upper is None else f"{self.upper:.6g}"
        line = (
            f"  SeqLip estimate={self.estimate:.6g} (not certified), certified SeqLip "
            f"bound={up}, AutoLip={self.autolip:.6g}, segments={self.segments}"
        )
        return "\n".join([head, line, *rest])



@dataclass(frozen=True, kw_only=True, eq=False)
class ExactResult(LipschitzResult):
    """Result of :func:`lipbound.exact`.

    ``value`` is the exact constant when ``finished`` (``bound == "exact"``, ``upper == lower``),
    otherwise the best realised region's Jacobian norm, a witnessed LOWER bound
    (``bound == "lower"``); ``upper`` is the best certified upper bound; ``witness`` a
    ``kind="region"`` :class:`Witness` (a point inside the best region).
    """

    method: str = "exact"
    finished: bool = False
    regions_visited: int = 0
    lps_solved: int = 0
    nodes_explored: int = 0



@dataclass(frozen=True, kw_only=True, eq=False)
class SDPResult(LipschitzResult):
    """Result of :func:`lipbound.lipsdp`.

    ``value`` = ``upper`` = the VERIFIED bound (``certified=True``) when the solver's multipliers
    pass the float64 check; otherwise ``value`` is the solver's raw value (an estimate,
    ``certified=False``, ``upper=None``). ``raw`` is the solver's ``sqrt(rho)`` (certified only up
    to its tolerance), ``solver`` / ``solver_status`` what ran and what it said.
    """

    method: str = "lipsdp"
    raw: float = math.nan
    variant: str = "neuron"
    solver: str = ""
    solver_status: str = ""
    solve_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def verified(self) -> bool:
        """Deprecated: ``certified``."""
        _deprecated("SDPResult.verified", "certified")
        return self.certified



@dataclass(frozen=True, kw_only=True, eq=False)
class SpectralResult:
    """Operator norm of a linear (or affine) map.

    ``value`` is the best estimate of ``||A||_2`` (from below: power/Lanczos iterates never exceed
    the true norm up to rounding); ``upper`` a certified upper bound or ``None``; ``certified`` is
    ``upper is not None``; ``certificate`` says how ``upper`` was proven. ``singular_values``,
    ``u`` (output-shaped, one per value) and ``v`` (input-shaped) are the top-k triplets.
    """

    value: float
    upper: float | None
    certified: bool
    certificate: str = ""
    method: str = ""
    singular_values: tuple[float, ...] = ()
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    iterations: int = 0
    seconds: float = 0.0
    converged: bool = True
    notes: tuple[str, ...] = ()

    def __float__(self) -> float:
        return float(self.value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "upper": self.upper,
            "certified": self.certified,
            "certificate": self.certificate,
            "method": self.method,
            "singular_values": list(self.singular_values),
            "iterations": self.iterations,
            "seconds": self.seconds,
            "converged": self.converged,
        }

    def __repr__(self) -> str:
        rows: list[list[Any]] = [
            ["estimate (from below)", self.value, self.method],
            ["certified upper", self.upper, self.certificate or "none available"],
        ]
        t = format_table(["quantity", "value", "how"], rows)
        return (
            f"SpectralResult(k={len(self.singular_values)}, iterations={self.iterations}, "
            f"converged={self.converged}, seconds={self.seconds:.3g})\n{t}"
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class LocalResult:
    """Per-sample local Lipschitz bounds on the balls ``{z : ||z - x_i|| <= radius}``.

    ``upper[i]`` is a certified upper bound on the Lipschitz constant of the model restricted
    to the ball around sample ``i`` (same norm on input and output); ``lower[i]`` a witnessed
    lower bound found inside that ball (``None`` when no witness search ran); ``value`` the
    headline per sample (``upper``); ``certified`` whether every ``upper`` is proven. ``extra``
    holds the per-sample parts (``"interval"``: the interval-Jacobian bound, ``"global"``: the
    global certified bound that capped it, if any) and the witnesses' kinds (``"lower_how"``).
    ``witness[i]`` is the :class:`Witness` that reproduces ``lower[i]`` (a pair of points of
    the ball, or a point of the ball and a direction; ``None`` where the search found nothing
    above 0, or when no search ran). ``how`` says which bound made ``upper``; ``status`` is
    derived from ``certified`` as in every result. ``layers`` are the per-node rows: each
    node's certified local constant over the ball, the largest over the samples
    (:mod:`lipbound.local.factors`; per sample in ``extra["node_factors"]``).
    """

    upper: tuple[float, ...]
    lower: tuple[float, ...] | None
    value: tuple[float, ...]
    witness: tuple[Witness | None, ...] | None = None
    certified: bool
    method: str
    norm: str
    radius: float
    how: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    layers: tuple[LayerBound, ...] = ()
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.upper)

    @property
    def status(self) -> str:
        """``"certified upper bound"`` per sample, or ``"estimate (not certified)"``."""
        return "certified upper bound" if self.certified else "estimate (not certified)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats, strings, lists only)."""
        return {
            "method": self.method,
            "norm": self.norm,
            "radius": self.radius,
            "certified": self.certified,
            "status": self.status,
            "how": self.how,
            "upper": list(self.upper),
            "lower": None if self.lower is None else list(self.lower),
            "witness": None if self.witness is None else [
                None if w is None else w.to_dict() for w in self.witness],
            "value": list(self.value),
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "layers": [row.to_dict() for row in self.layers],
            "notes": list(self.notes),
        }

    def table(self) -> str:
        rows = [[i, u, None if self.lower is None else self.lower[i]]
                for i, u in enumerate(self.upper)]
        return format_table(["sample", "upper (certified)", "lower (witness)"], rows)

    def __repr__(self) -> str:
        head = (f"LocalResult(method={self.method!r}, norm=l{self.norm}, "
                f"radius={fmt_float(self.radius)}, samples={len(self.upper)}, "
                f"max upper={fmt_float(max(self.upper) if self.upper else None)}, "
                f"seconds={self.seconds:.3g})")
        return "\n".join([head, self.table(), *(f"note: {n}" for n in self.notes)])


@dataclass(frozen=True, kw_only=True, eq=False)
class CertifyResult:
    """Certified robustness of a batch at one radius.

    Per sample: ``correct`` (the prediction is the label, with a strictly positive margin
    proven in float64 interval arithmetic), ``robust`` (proven robust: every point of the ball
    around the sample keeps the label, ``margin_j > radius * L_j`` for all ``j != y``; called
    ``certified`` before 0.3, a name that means "the value is proven" in every other result:
    ``.certified`` still returns these flags for one release, with a ``DeprecationWarning``),
    ``margin`` (a
    proven lower bound on ``min_j f_y(x) - f_j(x)``; ``<= 0`` for ties and misclassified
    points), ``constant`` (the constant ``L_j`` of the pair ``y, j`` that decided, i.e. the
    smallest ``margin_j - radius L_j``), ``runner_up`` (that ``j``). ``certified_accuracy`` is
    the fraction proven robust (``value``, the headline), ``accuracy`` the fraction correct;
    ``how`` says which constants were used. Every ``robust`` flag is a proof, so ``status`` is
    always ``"certified accuracy"``.
    """

    robust: tuple[bool, ...]
    correct: tuple[bool, ...]
    margin: tuple[float, ...]
    constant: tuple[float, ...]
    runner_up: tuple[int, ...]
    certified_accuracy: float
    accuracy: float
    method: str
    norm: str
    radius: float
    how: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        """The headline: the certified accuracy."""
        return self.certified_accuracy

    @property
    def status(self) -> str:
        return "certified accuracy"

    @property
    def certified(self) -> tuple[bool, ...]:
        """Deprecated name of :attr:`robust` (the per-sample flags)."""
        _deprecated("CertifyResult.certified", "CertifyResult.robust")
        return self.robust

    def __len__(self) -> int:
        return len(self.robust)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats, strings, lists only)."""
        return {
            "method": self.method,
            "norm": self.norm,
            "radius": self.radius,
            "certified_accuracy": self.certified_accuracy,
            "accuracy": self.accuracy,
            "status": self.status,
            "how": self.how,
            "robust": list(self.robust),
            "correct": list(self.correct),
            "margin": list(self.margin),
            "constant": list(self.constant),
            "runner_up": list(self.runner_up),
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "notes": list(self.notes),
        }

    def table(self) -> str:
        rows = [[i, self.correct[i], self.robust[i], self.margin[i], self.constant[i],
                 self.runner_up[i]] for i in range(len(self.robust))]
        return format_table(["sample", "correct", "robust (proven)", "margin", "L (pair)", "vs"],
                            rows)

    def __repr__(self) -> str:
        head = (f"CertifyResult(method={self.method!r}, norm=l{self.norm}, "
                f"radius={fmt_float(self.radius)}, certified accuracy="
                f"{self.certified_accuracy:.4f}, accuracy={self.accuracy:.4f}, "
                f"samples={len(self.robust)}, seconds={self.seconds:.3g})")
        return "\n".join([head, *(f"note: {n}" for n in self.notes)])
