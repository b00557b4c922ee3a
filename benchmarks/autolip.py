"""AutoLip on the zoo networks: wall time, bound, and the layers that dominate it.

Writes ``benchmarks/results/autolip.md``. Run (single thread, as the acceptance asks for the
shared 2-core CPU):

    OMP_NUM_THREADS=1 python benchmarks/autolip.py

Options: ``--models alexnet resnet18`` to restrict, ``--no-estimate-only`` to skip the
``certify=False`` timings, ``--out PATH``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import torch

from lipbound.methods.autolip import autolip
from lipbound.results import fmt_float, format_markdown_table
from lipbound.zoo.models import get

DEFAULT = ["mlp10", "mnist_cnn4", "mnist_cnn10", "alexnet", "resnet18"]
BIG = {"alexnet", "resnet18"}


def run(name: str, estimate_only: bool) -> dict:
    model, shape = get(name, seed=0)
    model.eval()
    t0, c0 = time.perf_counter(), time.process_time()
    r = autolip(model, shape)
    t_cert, c_cert = time.perf_counter() - t0, time.process_time() - c0
    t_est = c_est = v_est = None
    if estimate_only:
        t0, c0 = time.perf_counter(), time.process_time()
        r2 = autolip(model, shape, certify=False)
        t_est, c_est = time.perf_counter() - t0, time.process_time() - c0
        v_est = r2.value
    contrib = r.extra["log_contribution"]
    el = r.extra["elasticity"]
    top = sorted(r.layers, key=lambda lb: -contrib[lb.name])[:6]
    slow = sorted(r.layers, key=lambda lb: -lb.seconds)[:3]
    return {
        "name": name,
        "shape": shape,
        "nodes": len(r.layers),
        "value": r.value,
        "certified": r.certified,
        "estimate": r.extra["estimate"],
        "t_cert": t_cert,
        "t_est": t_est,
        "c_cert": c_cert,
        "c_est": c_est,
        "v_est": v_est,
        "top": [(lb, el[lb.name], contrib[lb.name]) for lb in top],
        "slow": slow,
        "log_value": math.log(r.value) if r.value > 0 else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="*", default=DEFAULT)
    ap.add_argument("--no-estimate-only", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "autolip.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    load0 = os.getloadavg()
    results = [run(m, not args.no_estimate_only and m in BIG) for m in args.models]
    load1 = os.getloadavg()

    lines = [
        "# AutoLip on the zoo networks",
        "",
        "Produced by `OMP_NUM_THREADS=1 python benchmarks/autolip.py` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared "
        f"with other jobs: load average {load0[0]:.1f} at start, {load1[0]:.1f} at end, so "
        "wall times are inflated by about that factor over the core count).",
        "",
        "Random weights (zoo seed 0), eval mode, l2. `certify=True` (default): every linear "
        "factor is a certified upper bound (its estimate is only reported); "
        "`certify=False`: factors are Lanczos estimates (not a certificate).",
        "",
    ]
    rows = []
    for r in results:
        rows.append([
            r["name"], str(r["shape"]), str(r["nodes"]), r["value"],
            "yes" if r["certified"] else "no", r["estimate"],
            f"{r['t_cert']:.1f} / {r['c_cert']:.1f}",
            "-" if r["t_est"] is None else f"{r['t_est']:.1f} / {r['c_est']:.1f}",
            "-" if r["v_est"] is None else fmt_float(r["v_est"]),
        ])
    lines.append(format_markdown_table(
        ["model", "input", "nodes", "AutoLip (certified)", "certified", "composed estimates",
         "wall / CPU s (certify=True)", "wall / CPU s (certify=False)",
         "value (certify=False)"],
        rows,
    ))
    lines.append("")
    lines.append(
        "Acceptance target: alexnet and resnet18 end to end in under 60 s on this CPU. "
        "Wall time depends on the other jobs sharing the 2 cores; CPU time (single thread, "
        "`time.process_time`) is what the same run costs on an idle core. See the per-layer "
        "(wall) seconds below for where the time goes."
    )
    for r in results:
        lines += [
            "",
            f"## {r['name']}: layers that dominate the bound",
            "",
            "`e` is the elasticity of the bound w.r.t. the factor (1 on a chain, < 1 inside a "
            "residual branch) and `e*log(c)` the factor's share of "
            f"log(bound) = {r['log_value']:.3f}.",
            "",
        ]
        rows = [
            [lb.name, lb.op, lb.value, f"{e:.3f}", f"{c:.3f}", "yes" if lb.certified else "no",
             lb.how[:60], f"{lb.seconds:.2f}"]
            for lb, e, c in r["top"]
        ]
        lines.append(format_markdown_table(
            ["node", "op", "factor", "e", "e*log(c)", "certified", "how", "s"], rows
        ))
        lines.append("")
        lines.append(
            "Slowest factors: "
            + ", ".join(f"{lb.name} {lb.seconds:.1f}s ({lb.how[:40]})" for lb in r["slow"])
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
