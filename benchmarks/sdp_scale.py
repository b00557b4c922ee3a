"""LipSDP-neuron at scale: the Schur-complement solver vs an interior-point SDP and ECLipsE-Fast.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sdp_scale.py [--quick]``; writes
``benchmarks/results/sdp_scale.md``. One process; CPU seconds by ``time.process_time`` and wall
seconds by ``time.perf_counter``. Interior point: cvxpy + CVXOPT (then verified), skipped where
the LMI has more than ``IP_MAX`` rows (it would take > 120 s here). ECLipsE-Fast: the
``eclipse-nn`` package when installed (its float value, not certified), else omitted.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lipbound.methods import sdp

IP_MAX = 300


def _timed(fn: Any) -> tuple[Any, float, float]:
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def _tabular(name: str) -> tuple[np.ndarray, np.ndarray, bool]:
    from sklearn import datasets

    d = getattr(datasets, f"load_{name}")()
    X = (d.data - d.data.mean(0)) / (d.data.std(0) + 1e-9)
    return X, d.target, name != "diabetes"


def _train(X: np.ndarray, y: np.ndarray, cls: bool, width: int, depth: int, act: type) -> nn.Module:
    torch.manual_seed(0)
    nout = int(y.max()) + 1 if cls else 1
    sizes = [X.shape[1]] + [width] * depth + [nout]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    net = nn.Sequential(*layers).double()
    Xt = torch.as_tensor(X)
    yt = torch.as_tensor(y)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        out = net(Xt)
        if cls:
            loss = nn.functional.cross_entropy(out, yt.long())
        else:
            loss = nn.functional.mse_loss(out.squeeze(1), (yt - yt.mean()) / yt.std())
        loss.backward()
        opt.step()
    return net.eval()


def _random_mlp(width: int, depth: int, seed: int) -> nn.Module:
    """ECLipsE's random nets: each weight scaled to a spectral norm uniform in [0.4, 1.8]."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(width, width if i < depth - 1 else 1).double()
        with torch.no_grad():
            W = torch.randn(lin.weight.shape, generator=g, dtype=torch.float64)
            target = 0.4 + 1.4 * float(torch.rand((), generator=g, dtype=torch.float64))
            lin.weight.copy_(W / torch.linalg.matrix_norm(W, ord=2) * target)
        layers.append(lin)
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _eclipse_fast(net: nn.Module) -> tuple[float | None, float, float]:
    try:
        from eclipse_nn.eclipsE_fast import ECLipsE_Fast
    except ImportError:
        return None, math.nan, math.nan
    Ws = [m.weight.detach().double() for m in net if isinstance(m, nn.Linear)]
    H = len(Ws) - 1
    out, c, w = _timed(lambda: ECLipsE_Fast(Ws, [0.0] * H, [1.0] * H))
    return float(out), c, w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows_tab: list[list[str]] = []
    tab = [
        ("breast_cancer", 32, 2, nn.ReLU),
        ("wine", 64, 2, nn.Tanh),
        ("digits", 32, 4, nn.LeakyReLU),
        ("diabetes", 64, 4, nn.ReLU),
        ("breast_cancer", 128, 2, nn.Tanh),
        ("digits", 256, 2, nn.ReLU),
        ("wine", 32, 8, nn.ReLU),
        ("diabetes", 128, 8, nn.Tanh),
    ]
    if args.quick:
        tab = tab[:2]
    for name, width, depth, act in tab:
        X, y, cls = _tabular(name)
        net = _train(X, y, cls, width, depth, act)
        shape = (X.shape[1],)
        n = X.shape[1] + width * depth
        r_s, c_s, w_s = _timed(lambda net=net, shape=shape: sdp.lipsdp(net, shape))
        if n <= IP_MAX:
            r_i, c_i, w_i = _timed(
                lambda net=net, shape=shape: sdp.lipsdp(net, shape, solver="CVXOPT")
            )
            ip = f"{r_i.value:.6g}" + ("" if r_i.certified else " (est.)")
            rel = f"{r_s.value / r_i.value - 1:+.2e}"
            sp = f"{w_i / w_s:.1f}x"
            ipt = f"{c_i:.1f} / {w_i:.1f}"
        else:
            ip, rel, sp, ipt = f"skipped (LMI {n} rows > {IP_MAX})", "-", "-", "-"
        closed = r_s.extra.get("closed_form")
        rows_tab.append([
            f"{name} {act.__name__} {width}x{depth}", str(n), f"{r_s.value:.6g}",
            f"{closed:.6g}" if closed else "-", ip, rel, f"{c_s:.2f} / {w_s:.2f}", ipt, sp,
        ])
        print(rows_tab[-1], flush=True)
    rows_rand: list[list[str]] = []
    grid = [(100, 10), (100, 20), (100, 50), (200, 10), (200, 20), (200, 50),
            (1000, 10), (1000, 20), (1000, 50)]
    if args.quick:
        grid = grid[:2]
    for width, depth in grid:
        net = _random_mlp(width, depth, seed=width + depth)
        tl = 30.0 if width >= 1000 else 20.0
        r_s, c_s, w_s = _timed(
            lambda net=net, width=width, tl=tl: sdp.lipsdp(net, (width,), time_limit=tl)
        )
        e_v, e_c, e_w = _eclipse_fast(net)
        closed = r_s.extra.get("closed_form")
        rows_rand.append([
            f"{width}x{depth}", f"{r_s.value:.6g}", f"{closed:.6g}" if closed else "-",
            f"{e_v:.6g}" if e_v is not None else "not installed",
            f"{r_s.value / e_v - 1:+.2e}" if e_v else "-",
            f"{c_s:.1f} / {w_s:.1f}", f"{e_c:.2f} / {e_w:.2f}" if e_v is not None else "-",
            str(r_s.iterations),
        ])
        print(rows_rand[-1], flush=True)
    out = ["# LipSDP-neuron at scale (generated by benchmarks/sdp_scale.py)", "",
           "Certified values (upper bounds on the l2 Lipschitz constant). Times: CPU / wall s.",
           "", "## Tabular MLPs (scikit-learn data, 200 Adam steps)", "",
           "| net | LMI rows | schur (certified) | closed form (certified) | CVXOPT (verified) "
           "| schur/CVXOPT - 1 | schur s | CVXOPT s | speed-up (wall) |",
           "|---|---|---|---|---|---|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in rows_tab]
    out += ["", "## Random ReLU MLPs (ECLipsE setting: spectral norms uniform in [0.4, 1.8])", "",
            "| width x depth | schur (certified) | closed form (certified) | ECLipsE-Fast "
            "(eclipse-nn, float) | schur/ECLipsE-Fast - 1 | schur s | ECLipsE-Fast s | LBFGS its |",
            "|---|---|---|---|---|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in rows_rand]
    Path(__file__).with_name("results").joinpath("sdp_scale.md").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
