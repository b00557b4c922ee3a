"""Witness strength: lower_bound's defaults against a plain search, on trained digits MLPs.

For each ReLU MLP (widths 128-256, depths 6-8) trained on scikit-learn's 8x8 digits (shipped
with sklearn: nothing is downloaded), in ONE process, side by side:

* **plain**: the max of 20,000 sampled float64 Jacobian norms (dense per-sample Jacobians by
  ``torch.func``, exact 2-norm by ``matrix_norm``) at ``x = s N(0, I)`` with ``s``
  log-uniform in ``[0.1, 10]``, plus 300 Adam steps of pair-ratio ascent from the 64 best
  samples (distance shrinking from 0.1 to 1e-4);
* **lower_bound**: ``lipbound.lower_bound(model, (64,))`` with every default.

Both get no data (the nets take standardised pixels). CPU time (``time.process_time``) and wall
time of each; the value of each (both are realised values, so both are lower bounds on L).
Writes ``benchmarks/results/lower_strength.md`` (generated, never typed). Run:

    OMP_NUM_THREADS=1 python benchmarks/lower_strength.py
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from lipbound.methods.lower import lower_bound
from lipbound.results import format_markdown_table
from lipbound.zoo.models import paper_mlp

NETS = [(128, 6), (256, 6), (128, 8), (256, 8), (192, 7)]


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    x = torch.tensor(X, dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 1.0), torch.tensor(y)


def mlp(width: int, depth: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return paper_mlp(depth, width=width, in_dim=64, out_dim=10)


def train(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 128):
            b = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def plain_search(net: nn.Module, n: int = 64, samples: int = 20_000, steps: int = 300,
                 seed: int = 0) -> float:
    m64 = nn.Sequential(*[m for m in net]).double().eval()
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    xs, vs = [], []
    jac = torch.func.vmap(torch.func.jacrev(lambda z: m64(z[None])[0]))
    for i in range(0, samples, 1000):
        k = min(1000, samples - i)
        s = torch.pow(10.0, -1.0 + 2.0 * torch.rand(k, 1, generator=gen, dtype=torch.float64))
        x = s * torch.randn(k, n, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            v = torch.linalg.matrix_norm(jac(x), 2)
        xs.append(x)
        vs.append(v)
    x, v = torch.cat(xs), torch.cat(vs)
    best = float(v.max())
    top = torch.topk(v, 64).indices
    z = x[top].clone().requires_grad_(True)
    u = torch.randn(64, n, generator=gen, dtype=torch.float64).requires_grad_(True)
    opt = torch.optim.Adam([z, u], lr=0.01)
    for t in range(steps):
        d = 0.1 * (1e-4 / 0.1) ** (t / (steps - 1))
        un = u / u.norm(dim=1, keepdim=True)
        r = (m64(z + d * un) - m64(z)).norm(dim=1) / d
        best = max(best, float(r.detach().max()))
        opt.zero_grad()
        (-r.sum()).backward()
        opt.step()
    return best


def timed(fn, *a, **k):  # type: ignore[no-untyped-def]
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results/lower_strength.md"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    x, y = digits()
    rows = []
    for width, depth in NETS:
        net = mlp(width, depth, seed=width + depth)
        acc = train(net, x, y, args.epochs)
        plain, pw, pc = timed(plain_search, net)
        res, lw, lc = timed(lower_bound, net, (64,))
        rows.append([f"{depth} x {width}", f"{acc:.3f}", f"{plain:.5g}", f"{pc:.1f}",
                     f"{pw:.1f}", f"{res.value:.5g}", f"{lc:.1f}", f"{lw:.1f}",
                     f"{res.value / plain:.4f}", res.how])
        print(rows[-1], flush=True)
    head = ["net (depth x width)", "train acc", "plain value", "plain CPU s", "plain wall s",
            "lower_bound value", "lower_bound CPU s", "lower_bound wall s",
            "lower / plain", "lower_bound witness"]
    text = "\n".join([
        "# Witness strength: lower_bound defaults vs a plain search",
        "",
        "Generated by `benchmarks/lower_strength.py` (do not edit). Digits MLPs trained "
        f"{args.epochs} epochs (Adam 1e-3, batch 128); plain = max of 20,000 sampled float64 "
        "Jacobian norms + 300 steps of pair-ratio ascent; lower_bound = every default. "
        f"torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s).",
        "",
        format_markdown_table(head, rows),
        "",
    ])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
