r"""One call, one report: certified upper bound, witnessed lower bound and the gap between them.

:func:`bound` runs several methods on the same ``(model, input_shape)`` and collects them in a
frozen :class:`Report`:

* ``upper`` — the best CERTIFIED upper bound: the minimum over the methods of their results'
  ``upper``. Each of them is ``>= L(f)``, so their minimum is too.
* ``lower`` — the best WITNESSED lower bound: the maximum over the methods of their results'
  ``lower`` (:func:`lipbound.lower_bound`'s witnesses, the region witness of
  :func:`lipbound.exact`). Each is ``<= L(f)``, so their maximum is too.
* ``ratio = upper / lower >= 1`` — how far apart they are (``1`` means ``L(f)`` is known).

Estimates that are not certified (greedy SeqLip, power iterations) are listed with their
status but never enter ``upper`` or ``lower``.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
>>> rep = bound(net, (2,), methods=("lower",), lower={"restarts": 2, "steps": 10})
>>> rep.lower > 0 and rep.upper is None
True
>>> sorted(rep.to_dict())[:3]
['input_shape', 'lipbound_version', 'lower']
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._progress import Progress, ProgressArg, _Reporter, make_progress
from ._validation import check_norm
from ._version import __version__
from .analysis import Analysis, analysis_of
from .errors import (
    InvalidArgumentError,
    MissingDependencyError,
    SolverError,
    UnsupportedModelError,
)
from .methods.autolip import autolip
from .methods.exact import exact
from .methods.lower import lower_bound, probe_widening
from .methods.sdp import lipsdp
from .methods.seqlip import seqlip
from .results import LipschitzResult, format_markdown_table, format_table

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "REPORT_SCHEMA",
    "MethodRun",
    "Progress",
    "ProgressArg",
    "Report",
    "bound",
    "estimate",
    "make_progress",
    "plot_report",
]

# method name -> function; "upper" methods produce upper bounds
METHODS: dict[str, Callable[..., LipschitzResult]] = {
    "lower": lower_bound,
    "autolip": autolip,
    "seqlip": seqlip,
    "exact": exact,
    "lipsdp": lipsdp,
}
# which of estimate()'s own options ("norm", "progress", "time_limit") each method takes
# (tests/test_report.py checks this table against the methods' signatures)
TAKES: dict[str, frozenset[str]] = {
    "lower": frozenset({"norm", "progress", "time_limit"}),
    "autolip": frozenset({"norm", "time_limit"}),
    "seqlip": frozenset({"norm", "progress", "time_limit"}),
    "exact": frozenset({"norm", "time_limit"}),
    "lipsdp": frozenset({"time_limit"}),
}
_UPPER_METHODS = ("autolip", "seqlip", "exact", "lipsdp")
#: what :func:`bound` and the CLI run when no ``methods`` are given
DEFAULT_METHODS = ("lower", "autolip", "lipsdp", "seqlip")
_MAX_WITNESS = 1024  # witnesses with more entries are left out of to_dict()


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _finite(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass(frozen=True, kw_only=True, eq=False)
class MethodRun:
    """One method's outcome: its result, or the error that stopped it, and its time."""

    name: str
    result: LipschitzResult | None
    error: str | None = None
    error_type: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result is not None

    @property
    def upper(self) -> float | None:
        """The certified upper bound this run proves: its result's ``upper`` (``None`` if none)."""
        r = self.result
        return None if r is None or r.upper is None else float(r.upper)

    @property
    def lower(self) -> float | None:
        """The witnessed lower bound this run proves: its result's ``lower`` (``None`` if none,
        or 0: a zero witness proves nothing)."""
        r = self.result
        if r is None or r.lower is None or not r.lower > 0:
            return None
        return float(r.lower)

    @property
    def status(self) -> str:
        if self.result is None:
            return "failed"
        return self.result.status

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        d: dict[str, Any] = {
            "name": self.name,
            "ok": self.ok,
            "error": self.error,
            "error_type": self.error_type,
            "seconds": self.seconds,
            "status": self.status,
            "value": None if r is None else _finite(r.value),
            "certified": None if r is None else bool(r.certified),
            "bound": None if r is None else r.bound,
            "upper": _finite(self.upper),
            "lower": _finite(self.lower),
            "notes": [] if r is None else [str(n) for n in r.notes],
            "layers": [] if r is None else [_clean(lb.to_dict()) for lb in r.layers],
            "how": None,
            "witness": None,
            "extra": {} if r is None else _json_safe(r.extra),
        }
        if r is not None:
            d["how"] = r.how or None
            if r.witness is not None and r.witness.x.numel() <= _MAX_WITNESS:
                d["witness"] = r.witness.to_dict()
        return d


def _json_safe(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar (and dict-of-scalar) entries of a result's ``extra``, JSON-ready."""
    out: dict[str, Any] = {}
    for k, v in extra.items():
        if isinstance(v, (str, bool, int)) or v is None:
            out[str(k)] = v
        elif isinstance(v, float):
            out[str(k)] = _finite(v)
        elif isinstance(v, Mapping) and all(
            isinstance(x, (str, bool, int, float)) or x is None for x in v.values()
        ):
            out[str(k)] = {str(a): (_finite(x) if isinstance(x, float) else x)
                           for a, x in v.items()}
    return out


def _md(rows: list[list[Any]]) -> list[list[Any]]:
    """Escape ``|`` in text cells of a markdown table."""
    return [[c.replace("|", "\\|") if isinstance(c, str) else c for c in r] for r in rows]


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in d.items()}


@dataclass(frozen=True, kw_only=True, eq=False)
class Report:
    """What :func:`bound` found (see the module docstring for the definitions).

    ``upper`` / ``upper_method``: best certified upper bound and who proved it;
    ``lower`` / ``lower_method``: best witnessed lower bound and who found it;
    ``ratio``: ``upper / lower``; ``runs``: every method's :class:`MethodRun`.
    """

    runs: tuple[MethodRun, ...]
    norm: str
    input_shape: tuple[int, ...]
    upper: float | None
    upper_method: str | None
    lower: float | None
    lower_method: str | None
    seconds: float
    model: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ratio(self) -> float | None:
        """``upper / lower`` (``None`` unless both exist and ``lower > 0``)."""
        if self.upper is None or self.lower is None or not self.lower > 0:
            return None
        return self.upper / self.lower

    @property
    def results(self) -> dict[str, LipschitzResult]:
        """The successful results by method name."""
        return {r.name: r.result for r in self.runs if r.result is not None}

    def __getitem__(self, name: str) -> LipschitzResult:
        res = self.results
        if name not in res:
            raise KeyError(f"no successful result for method {name!r}; have: {', '.join(res)}")
        return res[name]

    # ---- rendering -------------------------------------------------------------------------
    def _summary_rows(self) -> list[list[Any]]:
        return [
            ["certified upper bound", self.upper, self.upper_method or "none"],
            ["witnessed lower bound", self.lower, self.lower_method or "none"],
            ["gap (upper / lower)", self.ratio, "1 means exact"],
        ]

    def _method_rows(self) -> list[list[Any]]:
        rows: list[list[Any]] = []
        for run in self.runs:
            r = run.result
            if r is None:
                rows.append([run.name, None, "failed", None, None, run.seconds,
                             (run.error or "").splitlines()[0][:80]])
                continue
            note = r.how or (r.notes[0].splitlines()[0][:80] if r.notes else "")
            rows.append([run.name, r.value, r.status, run.upper, run.lower,
                         run.seconds, note])
        return rows

    _METHOD_HEAD = ("method", "value", "status", "certified upper", "witnessed lower", "seconds",
                    "note")

    def _head(self) -> str:
        shape = "(" + ", ".join(map(str, self.input_shape)) + ("," if len(self.input_shape) == 1
                                                              else "") + ")"
        what = f" of {self.model}" if self.model else ""
        return f"Lipschitz report{what} (l{self.norm} norm, input shape {shape}, " \
               f"{self.seconds:.3g} s)"

    def __repr__(self) -> str:
        parts = [
            self._head(),
            format_table(["quantity", "value", "by"], self._summary_rows()),
            "",
            format_table(list(self._METHOD_HEAD), self._method_rows()),
        ]
        for run in self.runs:
            if run.result is not None and run.result.layers:
                parts += ["", f"per-layer breakdown ({run.name}):", run.result.table()]
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    __str__ = __repr__

    def to_markdown(self) -> str:
        """The report as GitHub-flavoured markdown (summary, methods, per-layer tables)."""
        parts = [
            f"## {self._head()}",
            "",
            format_markdown_table(["quantity", "value", "by"], _md(self._summary_rows())),
            "",
            format_markdown_table(list(self._METHOD_HEAD), _md(self._method_rows())),
        ]
        for run in self.runs:
            r = run.result
            if r is not None and r.layers:
                rows = [[lb.name, lb.op, lb.value, "yes" if lb.certified else "no", lb.estimate,
                         lb.how] for lb in r.layers]
                parts += ["", f"### Per-layer breakdown: {run.name}", "",
                          format_markdown_table(["node", "op", "factor", "certified", "estimate",
                                                 "how"], _md(rows))]
        if self.notes:
            parts += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(parts) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (validates against :data:`REPORT_SCHEMA`); non-finite numbers -> None."""
        return {
            "lipbound_version": __version__,
            "model": self.model,
            "input_shape": list(self.input_shape),
            "norm": self.norm,
            "upper": _finite(self.upper),
            "upper_method": self.upper_method,
            "lower": _finite(self.lower),
            "lower_method": self.lower_method,
            "ratio": _finite(self.ratio),
            "seconds": self.seconds,
            "notes": list(self.notes),
            "methods": [run.to_dict() for run in self.runs],
        }


_NUM_OR_NULL = {"type": ["number", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}

#: JSON schema (draft 2020-12) of :meth:`Report.to_dict` and of ``lipbound estimate --json``.
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "lipbound report",
    "type": "object",
    "required": ["lipbound_version", "model", "input_shape", "norm", "upper", "upper_method",
                 "lower", "lower_method", "ratio", "seconds", "notes", "methods"],
    "additionalProperties": False,
    "properties": {
        "lipbound_version": {"type": "string"},
        "model": {"type": "string"},
        "input_shape": {"type": "array", "items": {"type": "integer", "minimum": 1},
                        "minItems": 1},
        "norm": {"enum": ["1", "2", "inf"]},
        "upper": {"type": ["number", "null"], "minimum": 0},
        "upper_method": _STR_OR_NULL,
        "lower": {"type": ["number", "null"], "minimum": 0},
        "lower_method": _STR_OR_NULL,
        "ratio": {"type": ["number", "null"]},
        "seconds": {"type": "number", "minimum": 0},
        "notes": {"type": "array", "items": {"type": "string"}},
        "methods": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "ok", "error", "seconds", "status", "value", "certified",
                             "bound", "upper", "lower", "notes", "layers"],
                "properties": {
                    "name": {"enum": list(METHODS)},
                    "ok": {"type": "boolean"},
                    "error": _STR_OR_NULL,
                    "error_type": _STR_OR_NULL,
                    "seconds": {"type": "number", "minimum": 0},
                    "status": {"type": "string"},
                    "value": _NUM_OR_NULL,
                    "certified": {"type": ["boolean", "null"]},
                    "bound": {"enum": ["upper", "lower", "exact", "estimate", None]},
                    "upper": _NUM_OR_NULL,
                    "lower": _NUM_OR_NULL,
                    "how": _STR_OR_NULL,
                    "extra": {"type": "object"},
                    "notes": {"type": "array", "items": {"type": "string"}},
                    "witness": {
                        "type": ["object", "null"],
                        "properties": {
                            "kind": {"enum": ["pair", "jacobian", "region"]},
                            "x": {"type": "array", "items": {"type": "number"}},
                            "y": {"type": ["array", "null"], "items": {"type": "number"}},
                            "direction": {"type": ["array", "null"], "items": {"type": "number"}},
                        },
                    },
                    "layers": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "op", "value", "certified"],
                            "properties": {
                                "name": {"type": "string"},
                                "op": {"type": "string"},
                                "value": _NUM_OR_NULL,
                                "certified": {"type": "boolean"},
                                "estimate": _NUM_OR_NULL,
                                "how": {"type": "string"},
                                "seconds": _NUM_OR_NULL,
                            },
                        },
                    },
                },
            },
        },
    },
}


# --------------------------------------------------------------------------------------------
# estimate
# --------------------------------------------------------------------------------------------
def _check_options(name: str, fn: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Refuse a per-method option that ``fn`` does not take, naming it (before any method runs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    bad = [k for k in options if k not in params or k in ("model", "input_shape")]
    if bad:
        raise InvalidArgumentError(
            f"method {name!r} does not accept option(s) {', '.join(bad)}; its options: "
            f"{', '.join(k for k in params if k not in ('model', 'input_shape'))}"
        )


def bound(
    model: nn.Module | Analysis,
    input_shape: Sequence[int] | int | None = None,
    *,
    methods: Iterable[str] = DEFAULT_METHODS,
    data: Any = None,
    norm: Any = 2,
    progress: ProgressArg = False,
    time_limit: float | None = None,
    model_name: str = "",
    **method_options: Mapping[str, Any],
) -> Report:
    """Run ``methods`` on ``model`` and return a :class:`Report` (best certified upper bound,
    best witnessed lower bound, their ratio, every method's result, time and breakdown).

    Parameters
    ----------
    methods:
        any of ``"lower"`` (:func:`lipbound.lower_bound`), ``"autolip"``, ``"lipsdp"``
        (LipSDP-neuron by the structured Schur solver, no extra dependency: on a whole dense
        chain, else on the sequential segments composed with AutoLip), ``"seqlip"``,
        ``"exact"`` (small ReLU nets); run in the given order. Default
        :data:`DEFAULT_METHODS`: ``("lower", "autolip", "lipsdp", "seqlip")``.
    data:
        optional data points ``(N, *input_shape)`` for the lower bound (the paper's data bound
        and starting points of the search).
    norm:
        passed to every method; a method that does not support it is recorded as failed.
    progress:
        ``True``: progress on stderr (a tqdm bar on a terminal, one plain line per stage
        otherwise); or a callback ``(stage, fraction)`` (see :class:`Progress`); stage names
        start with the method's name.
    time_limit:
        ONE overall budget in seconds. Each method that takes a ``time_limit`` gets, when it
        starts, an equal share of what is left (``left / n``, ``n`` the methods still to run,
        itself included), so time a method leaves unused goes to the next ones, except
        AutoLip, which gets all that is left: its certified constants are the baseline that
        LipSDP and SeqLip reuse (without them neither certifies anything), and it stops as
        soon as they are done. A method whose options set ``time_limit`` keeps it.
        Default: every method's own default.
    **method_options:
        per-method keyword options, keyed by method name, e.g.
        ``bound(net, (2,), lower={"restarts": 32}, seqlip={"mode": "greedy"},
        exact={"time_limit": 10})``.

    Errors
    ------
    A method that raises :class:`~lipbound.errors.UnsupportedModelError` (no rule for an op),
    :class:`~lipbound.errors.MissingDependencyError` or :class:`~lipbound.errors.SolverError` is
    recorded in the report (``run.error``) and the others go on. If EVERY requested upper method
    failed so, the report keeps the witnessed lower bound (``upper`` is ``None`` and a note says
    why); only when there is no lower bound either is the first such error raised. Invalid
    arguments, shapes and non-finite weights raise at once.

    (Called ``estimate`` before 0.2: that name still works, with a ``DeprecationWarning``; it
    contradicted the rule that an "estimate" is a number without a proof.)
    """
    t0 = time.perf_counter()
    an, _ = analysis_of(model, input_shape)  # captured once (on first use), for every method
    model, shape = an.model, an.input_shape
    p = check_norm(norm)
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    if not names:
        raise InvalidArgumentError(f"methods is empty; choose among {', '.join(METHODS)}")
    for name in names:
        if name not in METHODS:
            raise InvalidArgumentError(
                f"unknown method {name!r}; allowed: {', '.join(METHODS)}"
            )
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"methods has duplicates: {names!r}")
    if time_limit is not None:
        if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not (
            math.isfinite(float(time_limit)) and time_limit > 0
        ):
            raise InvalidArgumentError(
                f"time_limit must be a positive number of seconds (or None); got {time_limit!r}"
            )
    deadline = math.inf if time_limit is None else t0 + float(time_limit)
    for key, opts in method_options.items():
        if key not in METHODS:
            raise InvalidArgumentError(
                f"unknown keyword {key!r}: per-method options are passed as "
                f"<method>={{...}} with <method> in {', '.join(METHODS)}"
            )
        if key not in names:
            raise InvalidArgumentError(f"options given for {key!r}, which is not in methods")
        if not isinstance(opts, Mapping):
            raise InvalidArgumentError(f"{key}= must be a dict of options; got {opts!r}")

    fns = {name: METHODS[name] for name in names}
    for name, opts in method_options.items():
        _check_options(name, fns[name], opts)
    # the shape check (one forward pass) once, before any method, for one clear error
    probe_widening(model, shape)

    runs: list[MethodRun] = []
    recoverable: tuple[type[BaseException], ...] = (
        UnsupportedModelError, MissingDependencyError, SolverError,
    )
    if p != "2":
        recoverable = (*recoverable, InvalidArgumentError)
    first_upper_error: BaseException | None = None
    reporter = make_progress(progress)
    ctx = _Context(an=an, norm=p, data=data, deadline=deadline, reporter=reporter,
                   recoverable=recoverable)
    try:
        for i, name in enumerate(names):
            err = _run_one(ctx, name, fns[name], names[i:], dict(method_options.get(name, {})),
                           runs)
            if first_upper_error is None and name in _UPPER_METHODS and err is not None:
                first_upper_error = err
    finally:
        reporter.close()
    return _assemble(runs, names, norm=p, shape=shape, t0=t0, model_name=model_name,
                     first_upper_error=first_upper_error, time_limit=time_limit)


def estimate(model: nn.Module, input_shape: Sequence[int] | int, **kwargs: Any) -> Report:
    """Deprecated name of :func:`bound` (same arguments, same :class:`Report`)."""
    warnings.warn("lipbound.estimate is deprecated and will be removed in the next release; use "
                  "lipbound.bound (same arguments)", DeprecationWarning, stacklevel=2)
    return bound(model, input_shape, **kwargs)


def _share(name: str, left: float, todo: Sequence[str]) -> float:
    """A method's part of the ``left`` seconds of :func:`bound`'s budget (see its
    ``time_limit``), ``todo`` the methods still to run, this one first: AutoLip all of it,
    the others ``left / len(todo)``. A fixed share starved AutoLip: with weight 1/4 (before
    0.3) it got 3.3 s of a 30 s budget after the lower bound and refused on resnet18 at 32x32
    (8 s alone); with weight 3 against LipSDP's and SeqLip's 1, VGG-16-BN at 32x32 got 13.6 s
    of a 30 s budget (it needs 13-19 s on a loaded machine), and neither LipSDP nor SeqLip,
    which reuse its constants, could then certify anything."""
    return left if name == "autolip" else left / len(todo)


@dataclass(frozen=True)
class _Context:
    """What every method run of one :func:`bound` call shares."""

    an: Analysis
    norm: str
    data: Any
    deadline: float
    reporter: _Reporter
    recoverable: tuple[type[BaseException], ...]


def _run_one(
    ctx: _Context, name: str, fn: Callable[..., LipschitzResult], todo: Sequence[str],
    kwargs: dict[str, Any], runs: list[MethodRun],
) -> BaseException | None:
    """Run one method of :func:`bound`; append its :class:`MethodRun` to ``runs`` and
    return the recoverable error that stopped it (``None`` if none).

    A method's share of the time left is divided by 1.1: each method keeps its own limit to
    within 10%, so the shares overrun by at most the budget itself."""
    p, reporter, deadline, an = ctx.norm, ctx.reporter, ctx.deadline, ctx.an
    takes = TAKES.get(name, frozenset())
    if "norm" in takes:
        kwargs.setdefault("norm", p)
    elif p != "2":  # the method is l2-only
        runs.append(MethodRun(name=name, result=None,
                              error=f"{name} supports the l2 norm only (asked: l{p})",
                              error_type="InvalidArgumentError"))
        return None
    if name == "lower" and ctx.data is not None:
        kwargs.setdefault("data", ctx.data)
    if reporter.active and "progress" in takes:
        kwargs.setdefault("progress", reporter.sub(f"{name}: "))
    t1 = time.perf_counter()
    if math.isfinite(deadline) and "time_limit" in takes and "time_limit" not in kwargs:
        left = deadline - t1
        if not left > 0:
            runs.append(MethodRun(
                name=name, result=None, error_type="TimeLimit",
                error="not run: the time limit of bound() was spent by the methods before it "
                "(raise time_limit or run fewer methods)"))
            return None
        kwargs["time_limit"] = _share(name, left, todo) / 1.1
    reporter(f"{name}", 0.0)
    try:
        result = fn(an, an.input_shape, **kwargs)
    except ctx.recoverable as e:
        runs.append(MethodRun(name=name, result=None, error=str(e),
                              error_type=type(e).__name__,
                              seconds=time.perf_counter() - t1))
        return e
    runs.append(MethodRun(name=name, result=result, seconds=time.perf_counter() - t1))
    return None


def _assemble(
    runs: list[MethodRun], names: Sequence[str], *, norm: str, shape: tuple[int, ...],
    t0: float, model_name: str, first_upper_error: BaseException | None,
    time_limit: float | None,
) -> Report:
    """The :class:`Report` of :func:`estimate` from its runs."""
    uppers = [(r.upper, r.name) for r in runs if r.upper is not None]
    lowers = [(r.lower, r.name) for r in runs if r.lower is not None]
    asked_upper = [n for n in names if n in _UPPER_METHODS]
    notes: list[str] = []
    if asked_upper and not uppers and first_upper_error is not None and all(
        not r.ok for r in runs if r.name in _UPPER_METHODS
    ):
        if not lowers:  # nothing to report: the refusal is the answer
            raise first_upper_error
        notes.append(
            "no certified upper bound: every upper-bound method failed ("
            + ", ".join(f"{r.name}: {r.error_type}" for r in runs
                        if r.name in _UPPER_METHODS and not r.ok)
            + "); the witnessed lower bound is kept"
        )
    up = min(uppers) if uppers else None
    lo = max(lowers) if lowers else None
    if up is not None and lo is not None and lo[0] > up[0] * (1 + 1e-6):
        notes.append(
            f"INCONSISTENT: witnessed lower bound {lo[0]:.6g} ({lo[1]}) exceeds certified upper "
            f"bound {up[0]:.6g} ({up[1]}); one of them is wrong, please report it"
        )
    for r in runs:
        if r.error is not None:
            notes.append(f"{r.name} failed ({r.error_type}): {r.error.splitlines()[0]}")
    if time_limit is not None:
        notes.append(f"time limit {time_limit:g} s shared by the methods")
    return Report(
        runs=tuple(runs),
        norm=norm,
        input_shape=shape,
        upper=None if up is None else up[0],
        upper_method=None if up is None else up[1],
        lower=None if lo is None else lo[0],
        lower_method=None if lo is None else lo[1],
        seconds=time.perf_counter() - t0,
        model=model_name,
        notes=tuple(notes),
    )

# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------
def plot_report(report: Report, path: str) -> None:
    """Write a PNG: per-layer factors (log scale) of AutoLip vs SeqLip, and every method's
    value against the certified upper and witnessed lower bounds (matplotlib, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("matplotlib", "plot", "--plot / plot_report") from e

    colors = {"autolip": "tab:blue", "seqlip": "tab:orange", "exact": "tab:green",
              "lipsdp": "tab:purple", "lower": "tab:red"}
    bars: list[tuple[str, LipschitzResult, list[Any]]] = []
    for name in ("autolip", "seqlip"):
        res = report.results.get(name)
        if res is None or not res.layers:
            continue
        rows = [lb for lb in res.layers if lb.value != 1.0]  # factors of 1 change nothing
        parts = [lb for lb in rows if lb.op != "segment"] or rows  # segments are aggregates
        if parts:
            bars.append((name, res, parts))
    labels = [lb.name for _, _, parts in bars for lb in parts]  # full qualified names
    longest = max((len(t) for t in labels), default=0)
    n_ticks = len(labels) + max(len(bars) - 1, 0)
    # room for the rotated labels: ~0.075 in per character at fontsize 7 (sin 60 deg ~ 0.87)
    label_in = 0.3 + 0.065 * longest
    width = min(max(12.0, 6.0 + 0.18 * n_ticks), 40.0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(width, 4.0 + label_in),
                                   gridspec_kw={"width_ratios": [max(1.0, n_ticks / 12), 1.0]})
    pos, ticks = 0, []
    for name, res, parts in bars:
        xs = list(range(pos, pos + len(parts)))
        vals = [lb.value if math.isfinite(lb.value) and lb.value > 0 else float("nan")
                for lb in parts]
        ax1.bar(xs, vals, width=0.8, color=colors[name], alpha=0.85,
                label=f"{name}: product {res.value:.4g}")
        ticks += [(x, lb.name) for x, lb in zip(xs, parts)]
        pos += len(parts) + 1
    ran = [name for name, _, _ in bars]
    if bars:
        ax1.set_yscale("log")
        ax1.axhline(1.0, color="gray", lw=0.8)
        ax1.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], rotation=60, fontsize=7,
                       ha="right", rotation_mode="anchor")
        ax1.set_ylabel("factor (nodes with factor 1 omitted)")
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no per-layer breakdown\n(AutoLip / SeqLip not run)",
                 ha="center", va="center", transform=ax1.transAxes)
    title = {("autolip",): "per-layer factors: AutoLip per node",
             ("seqlip",): "per-layer factors: SeqLip per pair",
             ("autolip", "seqlip"): "per-layer contributions: AutoLip per node, SeqLip per pair"}
    ax1.set_title(title.get(tuple(ran), "per-layer contributions"))

    names, values, cols = [], [], []
    for run in report.runs:
        if run.result is None or not math.isfinite(run.result.value) or run.result.value <= 0:
            continue
        names.append(f"{run.name}\n({run.result.status.replace(' (not certified)', '')})")
        values.append(run.result.value)
        cols.append(colors.get(run.name, "gray"))
    if values:
        ax2.barh(range(len(values)), values, color=cols, alpha=0.85)
        ax2.set_yticks(range(len(values)), names, fontsize=8)
        ax2.set_xscale("log")
    if report.upper is not None:
        ax2.axvline(report.upper, color="k", ls="--", label=f"certified upper {report.upper:.4g}")
    if report.lower is not None and report.lower > 0:
        ax2.axvline(report.lower, color="k", ls=":", label=f"witnessed lower {report.lower:.4g}")
    if report.upper is not None or report.lower is not None:
        ax2.legend(fontsize=8)
    ax2.set_title(f"bounds on L (l{report.norm})" + (f", gap {report.ratio:.3g}x"
                                                     if report.ratio else ""))
    fig.suptitle(report._head(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # never cut a label
    plt.close(fig)

