"""Progress reporting shared by every long-running method: a ``progress=`` option becomes a
reporter (``make_progress``) that is called as ``(stage, fraction)``.

It sits beside ``errors`` and ``results`` at the bottom of the package so that the methods and
``report`` (``estimate``) use one implementation without importing each other.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from collections.abc import Callable
from typing import IO, Protocol

import torch

from .errors import InvalidArgumentError

__all__ = ["Progress", "ProgressArg", "make_progress"]


class Progress(Protocol):
    """A progress callback: ``progress(stage, fraction)`` with ``stage`` a short name (e.g.
    ``"lower: pairs"``) and ``fraction`` in ``[0, 1]`` the part of that stage done (of its work
    or of its time budget, whichever is larger, so that an ETA read from it is not too short)."""

    def __call__(self, stage: str, fraction: float) -> None: ...


#: what the ``progress=`` option of the methods accepts: ``False``/``None`` (off), ``True``
#: (tqdm on stderr when it is a terminal, one plain line per stage otherwise) or a callback.
ProgressArg = bool | None | Progress | Callable[[str, float], None]


class _Reporter:
    """The progress sink behind :func:`make_progress`: callable ``(stage, fraction)``, plus
    :meth:`close`. Subclasses write to a stream; the base forwards to a user callback."""

    def __init__(self, fn: Callable[[str, float], None] | None = None, prefix: str = "") -> None:
        self._fn = fn
        self.prefix = prefix

    def __call__(self, stage: str, fraction: float) -> None:
        if self._fn is not None:
            f = float(fraction)
            self._fn(self.prefix + stage, min(max(f if math.isfinite(f) else 0.0, 0.0), 1.0))

    @property
    def active(self) -> bool:
        """Whether anything listens (a no-op reporter is not passed on to the methods)."""
        return self._fn is not None

    def sub(self, prefix: str) -> _Reporter:
        """A reporter whose stage names start with ``prefix`` (same sink)."""
        return _Reporter(self, prefix) if self.active else _Reporter()

    def close(self) -> None:
        pass


class _LineReporter(_Reporter):
    """ONE plain line per stage (no carriage return: fit for logs), when the stage starts:
    ``lipbound: <stage> (<elapsed> s elapsed)``. No ETA (none that would be reliable)."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self._fn = self._line
        self.stream = stream
        self.stage: str | None = None
        self.t0 = time.perf_counter()

    def _line(self, stage: str, fraction: float) -> None:
        if stage != self.stage:
            self.stage = stage
            self.stream.write(f"lipbound: {stage} "
                              f"({time.perf_counter() - self.t0:.1f} s elapsed)\n")
            self.stream.flush()


class _TqdmReporter(_Reporter):
    """One tqdm bar (percent of the current stage) on a terminal, reset at each stage."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        from tqdm.auto import tqdm

        self.bar = tqdm(total=1000, file=stream, leave=False, unit="", dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self.stage: str | None = None
        self.done = 0
        self._fn = self._bar

    def _bar(self, stage: str, fraction: float) -> None:
        if stage != self.stage:
            self.stage, self.done = stage, 0
            self.bar.reset(total=1000)
            self.bar.set_description_str(stage, refresh=False)
        f = float(fraction) if math.isfinite(float(fraction)) else 0.0
        n = int(1000 * min(max(f, 0.0), 1.0))
        if n > self.done:
            self.bar.update(n - self.done)
            self.done = n

    def close(self) -> None:
        self.bar.close()


def make_progress(progress: ProgressArg, *, stream: IO[str] | None = None) -> _Reporter:
    """The reporter for a ``progress=`` option (always callable; call ``.close()`` at the end).

    ``True``: a tqdm bar on ``stream`` (default ``sys.stderr``) when it is a terminal and tqdm
    is installed, else one plain line per stage; a callable: called as ``(stage, fraction)``;
    ``False``/``None``: nothing. A reporter passed in is used as is (nested calls share it).
    """
    if isinstance(progress, _Reporter):
        return progress.sub("")
    if progress is None or progress is False:
        return _Reporter()
    if progress is True:
        out = sys.stderr if stream is None else stream
        isatty = getattr(out, "isatty", None)
        if callable(isatty) and isatty() and importlib.util.find_spec("tqdm") is not None:
            return _TqdmReporter(out)
        return _LineReporter(out)
    if callable(progress):
        return _Reporter(progress)
    raise InvalidArgumentError(
        f"progress must be True, False or a callable (stage: str, fraction: float); "
        f"got {progress!r}"
    )


def flop_rate() -> float:
    """float64 matrix-product flop/s of this machine per WALL second, measured now (three
    384 x 384 products): the time models of the budgets use it (on a shared machine the
    wall-clock rate changes from call to call, so callers measure once per call)."""
    a = torch.randn(384, 384, dtype=torch.float64)
    t0 = time.perf_counter()
    for _ in range(3):
        _ = a @ a
    return 3 * 2 * 384**3 / max(time.perf_counter() - t0, 1e-6)
