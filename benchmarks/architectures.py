"""The common CNN families: AutoLip, SeqLip, lower_bound and bound at 224x224 and 32x32.

For each family of :mod:`lipbound.zoo.cnn` (random seeded weights, random BatchNorm statistics,
eval mode; built by ``lipbound.zoo.get(name)``), at each input size, ONE thread, each method in
turn with its own freshly built copy of the model (so no method reuses another's AutoLip
constants; in :func:`lipbound.bound` autolip and seqlip share them):

* ``autolip``: ``lipbound.autolip(model, shape, time_limit=--autolip-limit)``;
* ``seqlip``: ``lipbound.seqlip(model, shape, time_limit=--seqlip-limit)``;
* ``lower_bound``: ``lipbound.lower_bound(model, shape, time_limit=--lower-limit)``;
* ``bound``: ``lipbound.bound(model, shape, time_limit=--bound-limit)`` (lower,
  autolip, seqlip sharing one budget; the value shown is the certified upper bound, or the
  lower bound when no upper method gave a certified bound).

Columns: the value (or the refusal: nets with squeeze-excitation multiply two functions of the
input and have no global constant, so the upper methods refuse them: the expected outcome),
whether it is certified (upper bounds) or a witness (lower bounds), CPU seconds
(``time.process_time``), wall seconds, and the peak resident memory of the call above the
resident memory before it (Linux ``VmHWM`` of ``/proc/self/status``, reset before each call
through ``/proc/self/clear_refs``; where that reset is unavailable, the growth of
``ru_maxrss``, a lower bound of the call's peak, and the header says which).
Writes ``benchmarks/results/architectures.md`` (generated, never typed). Run:

    OMP_NUM_THREADS=1 python benchmarks/architectures.py [--sizes 32 224] [--families ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lipbound
from lipbound.errors import LipboundError
from lipbound.results import format_markdown_table
from lipbound.zoo import get

FAMILIES = [
    "resnet18", "resnet50", "vgg11", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_small",
    "densenet121", "shufflenet_v2_x1_0", "regnet_x_400mf", "googlenet", "squeezenet1_1",
    "efficientnet_b0",
]
METHODS = ("autolip", "seqlip", "lower_bound", "bound")


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) of this process; False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class Meter:
    """CPU, wall and peak-memory of one call."""

    def __init__(self) -> None:
        self.hwm = _reset_peak()
        self.how = ("peak RSS above the start (VmHWM, reset per call)" if self.hwm
                    else "growth of ru_maxrss (a lower bound of the call's peak)")

    def run(self, fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
        if self.hwm:
            _reset_peak()
            base = _status_kib("VmRSS") or 0
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            out: Any = fn()
        except LipboundError as exc:
            out = exc
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if self.hwm:
            peak = (_status_kib("VmHWM") or 0) - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        return out, cpu, wall, max(peak, 0) / 1024.0


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " ".join(lines[:2])
    return (text[:160] + "...") if len(text) > 160 else text


def _cell(out: Any, method: str) -> tuple[str, str, str]:
    """(value, certified / witness, note) of one result."""
    if isinstance(out, BaseException):
        return "refused", "-", f"{type(out).__name__}: {_first_line(out)}"
    if method == "lower_bound":
        return f"{out.value:.5g}", "witness", str(getattr(out, "how", ""))[:60]
    if method == "bound":
        if out.upper is not None:
            lo = "-" if out.lower is None else f"{out.lower:.4g}"
            return (f"{out.upper:.5g}", "True",
                    f"upper by {out.upper_method}; lower {lo} by {out.lower_method}")
        if out.lower is not None:
            why = [f"{r.name}: {r.error_type}" if r.error else f"{r.name}: not certified"
                   for r in out.runs if r.name != "lower"
                   and (r.error or (r.result is not None and not r.result.certified))]
            return (f"{out.lower:.5g}", "witness",
                    f"no certified upper bound ({'; '.join(why)})")
        return "-", "-", "no result"
    notes = [n for n in out.notes if not n.startswith("largest factors")]
    return f"{out.value:.5g}", str(bool(out.certified)), (notes[0][:120] if notes else "")


def _call(method: str, model: nn.Module, shape: tuple[int, ...],
          args: argparse.Namespace) -> Callable[[], Any]:
    if method == "autolip":
        return lambda: lipbound.autolip(model, shape, time_limit=args.autolip_limit)
    if method == "seqlip":
        return lambda: lipbound.seqlip(model, shape, time_limit=args.seqlip_limit)
    if method == "lower_bound":
        return lambda: lipbound.lower_bound(model, shape, time_limit=args.lower_limit)
    return lambda: lipbound.bound(model, shape, time_limit=args.bound_limit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--autolip-limit", type=float, default=120.0)
    ap.add_argument("--seqlip-limit", type=float, default=30.0)
    ap.add_argument("--lower-limit", type=float, default=15.0)
    ap.add_argument("--bound-limit", type=float, default=30.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results/architectures.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    meter = Meter()
    # imports that the first graph capture triggers (torch.fx, dynamo) are not timed
    lipbound.autolip(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(), nn.Conv2d(1, 1, 3)).eval(),
                     (1, 8, 8))
    load0 = os.getloadavg()[0]
    rows: list[list[str]] = []
    for size in args.sizes:
        for name in args.families:
            for method in args.methods:
                model, _ = get(name)  # a fresh copy per method: nothing reused across methods
                shape = (3, size, size)
                out, cpu, wall, mem = meter.run(_call(method, model, shape, args))
                value, cert, note = _cell(out, method)
                rows.append([name, f"{size}", method, value, cert, f"{cpu:.1f}", f"{wall:.1f}",
                             f"{mem:.0f}", note.replace("|", "/")])
                print(" | ".join(rows[-1]), flush=True)
    head = ["family", "input", "method", "value", "certified", "CPU s", "wall s", "peak MiB",
            "note"]
    text = "\n".join([
        "# The common CNN families: bounds, time and memory",
        "",
        "Generated by `benchmarks/architectures.py` (do not edit). Random seeded weights "
        "(`lipbound.zoo.get(name)`, random BatchNorm statistics), eval mode, input "
        "`(3, s, s)`; time limits: autolip "
        f"{args.autolip_limit:g} s, seqlip {args.seqlip_limit:g} s, lower_bound "
        f"{args.lower_limit:g} s, bound {args.bound_limit:g} s. 'certified' is for upper "
        "bounds; lower bounds are witnesses (realised values). Peak memory: "
        f"{meter.how}. torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread, {os.cpu_count()} CPU(s) on the machine, load "
        f"average {load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (wall time "
        "above CPU time is time spent waiting for a core: the time limits are wall-clock).",
        "",
        format_markdown_table(head, rows),
        "",
    ])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
