"""Benchmark: the l2 convolution certificate at the image sizes users have (32 and 224).

For every Conv2d of VGG-11, VGG-16-BN, ResNet-18 and MobileNet-V2 (shapes defined below; no
torchvision), at network inputs 32x32 and 224x224, this measures

* **old**: the grid certificate ``conv_fourier_upper`` (Fourier symbol of a circular conv on
  a grid containing the zero-padded one: cost grows with the image). It is skipped where its
  predicted time (its time at 32 scaled by the number of grid frequencies) exceeds
  ``OLD_LIMIT_S``; the table says so and gives the prediction;
* **torus**: ``conv_torus_upper`` (sup of the symbol over the torus, from a refined cell
  cover: cost independent of the image);
* **est**: the Lanczos estimate ``lipbound.spectral_norm(conv, shape, certify=False).value``
  (from below);
* the ratios upper / est, and the certificate ``conv_l2_upper`` picks (grid while the grid
  has <= ``GRID_LIMIT`` frequencies, torus beyond).

Weights: PyTorch's default init, seeded by the kernel configuration (``c_in, c_out, k,
stride, groups``), so layers of one configuration share a kernel. The torus certificate is a
function of the kernel, stride, dilation and groups only (not of the image): it is computed
once per kernel at 224 and, where it took over ``REUSE_S`` seconds, reused at 32 (marked
"reused"); every other kernel is recomputed at 32 and must give the same number (checked),
which shows the cost is the same. Identical layers of a network (same configuration and input
size) are measured once (column ``n``). One thread (``torch.set_num_threads(1)``); CPU time
(``time.process_time``) and wall time are reported side by side.

Usage: ``python benchmarks/conv_scale.py [--out benchmarks/results/conv_scale.md]``.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lipbound.results import fmt_float, format_markdown_table
from lipbound.spectral import spectral_norm
from lipbound.spectral.certify import (
    GRID_LIMIT,
    ConvSpec,
    _fourier_plans,
    conv_fourier_upper,
    conv_spec,
    conv_torus_upper,
)

OLD_LIMIT_S = 60.0
REUSE_S = 5.0
EST_TOL = 1e-5

# (c_in, c_out, kernel, stride, groups, input size at a 224 network input)
Conv = tuple[int, int, int, int, int, int]


def vgg(cfg: list[int | str]) -> list[Conv]:
    out: list[Conv] = []
    c, h = 3, 224
    for v in cfg:
        if v == "M":
            h //= 2
        else:
            assert isinstance(v, int)
            out.append((c, v, 3, 1, 1, h))
            c = v
    return out


VGG11 = vgg([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"])
VGG16 = vgg([64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M"])


def resnet18() -> list[Conv]:
    out: list[Conv] = [(3, 64, 7, 2, 1, 224)]
    c, h = 64, 56
    for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            s = stride if block == 0 else 1
            out.append((c, width, 3, s, 1, h))
            if s != 1 or c != width:
                out.append((c, width, 1, s, 1, h))  # downsample
            h //= s
            out.append((width, width, 3, 1, 1, h))
            c = width
    return out


def mobilenet_v2() -> list[Conv]:
    out: list[Conv] = [(3, 32, 3, 2, 1, 224)]
    c, h = 32, 112
    for t, width, n, stride in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            s = stride if i == 0 else 1
            hid = c * t
            if t != 1:
                out.append((c, hid, 1, 1, 1, h))
            out.append((hid, hid, 3, s, hid, h))  # depthwise
            h = -(-h // s)
            out.append((hid, width, 1, 1, 1, h))
            c = width
    out.append((c, 1280, 1, 1, 1, h))
    return out


NETS = {"VGG-11": VGG11, "VGG-16-BN": VGG16, "ResNet-18": resnet18(),
        "MobileNet-V2": mobilenet_v2()}


def spec_and_frequencies(conv: nn.Module, shape: tuple[int, ...]) -> tuple[ConvSpec, int]:
    """The conv description of ``conv`` on ``shape`` and the number of frequencies of its
    grid certificate (what that certificate's cost grows with)."""
    with torch.no_grad():
        out = tuple(conv(torch.zeros(1, *shape)).shape[1:])
    spec = conv_spec(conv, shape, out)
    assert spec is not None
    plans, _ = _fourier_plans(spec)
    grid = [p.grid for p in plans]
    return spec, math.prod(grid[:-1]) * (grid[-1] // 2 + 1)


def make_conv(cfg: Conv) -> nn.Conv2d:
    ci, co, k, s, g, _ = cfg
    torch.manual_seed(zlib.crc32(repr((ci, co, k, s, g)).encode()))
    return nn.Conv2d(ci, co, k, stride=s, padding=k // 2, groups=g, bias=False).eval()


def timed(fn):  # type: ignore[no-untyped-def]
    c0, w0 = time.process_time(), time.perf_counter()
    r = fn()
    return r, time.process_time() - c0, time.perf_counter() - w0


@dataclass
class Sweep:
    """What the sweep carries from layer to layer: the torus certificate per kernel (bound,
    CPU s, wall s, how) measured at 224, the old certificate's CPU s and frequency count per
    kernel at 32, the table rows, the largest stride-1 ratio per size and the kernels whose
    torus bound was recomputed at 32 (kernel, CPU s at 224, CPU s at 32)."""

    torus_cache: dict[tuple[int, ...], tuple[float, float, float, str]] = field(
        default_factory=dict)
    old_cost32: dict[tuple[int, ...], tuple[float, int]] = field(default_factory=dict)
    rows: list[list[str]] = field(default_factory=list)
    worst: dict[int, float] = field(default_factory=lambda: {32: 0.0, 224: 0.0})
    check_lines: list[tuple[tuple[int, ...], float, float]] = field(default_factory=list)


def old_certificate(sw: Sweep, key: tuple[int, ...], size: int, spec: ConvSpec, n_freq: int
                    ) -> tuple[float | None, str]:
    """The old grid certificate of one layer (bound or None, table text): skipped where its
    predicted time exceeds ``OLD_LIMIT_S``."""
    ci, h = key[0], key[5]
    kern = key[:5]
    # old grid certificate: 224 runs first, so its cost is predicted from a 32 run done on
    # demand
    if size == 224:
        if kern not in sw.old_cost32:
            h32 = max(1, h * 32 // 224)
            sp32, nf32 = spec_and_frequencies(make_conv((*key[:5], h32)), (ci, h32, h32))
            _, oc, _ = timed(lambda sp32=sp32: conv_fourier_upper(sp32))
            sw.old_cost32[kern] = (oc, nf32)
        oc, nf32 = sw.old_cost32[kern]
        predicted = oc * n_freq / nf32
    else:
        predicted = 0.0
    if predicted > OLD_LIMIT_S:
        return None, f"skipped (~{predicted:.0f} s)"
    (old_b, _), old_c, old_w = timed(lambda spec=spec: conv_fourier_upper(spec))
    return old_b, f"{old_c:.3g} / {old_w:.3g}"


def torus_certificate(sw: Sweep, key: tuple[int, ...], spec: ConvSpec) -> tuple[float, str]:
    """The torus certificate of one layer (bound, table text): the 224 measurement of its
    kernel where that took over ``REUSE_S``, else recomputed (and checked to give the same
    bound as at 224)."""
    kern = key[:5]
    cached = sw.torus_cache.get(kern)
    if cached is not None and cached[1] > REUSE_S:
        tb, tc, tw, how = cached
        return tb, f"{tc:.3g} / {tw:.3g} (reused)"
    (tb, how), tc, tw = timed(lambda spec=spec: conv_torus_upper(spec))
    if cached is None:
        sw.torus_cache[kern] = (tb, tc, tw, how)
    else:
        if tb != cached[0]:
            raise RuntimeError(f"torus bound changed with the image: {key}")
        sw.check_lines.append((kern, cached[1], tc))
    return tb, f"{tc:.3g} / {tw:.3g}"


def measure(sw: Sweep, net: str, size: int, key: tuple[int, ...], count: int) -> None:
    """Measure one layer configuration (``count`` identical layers of ``net``) at network
    input ``size``: appends its row (and prints it)."""
    ci, co, k, s, g, h = key
    conv = make_conv(key)
    shape = (ci, h, h)
    spec, n_freq = spec_and_frequencies(conv, shape)
    old_b, old_txt = old_certificate(sw, key, size, spec, n_freq)
    tb, torus_txt = torus_certificate(sw, key, spec)
    est, _, _ = timed(lambda conv=conv, shape=shape: spectral_norm(
        conv, shape, tol=EST_TOL, certify=False).value)
    pick_grid = n_freq <= GRID_LIMIT
    chosen = old_b if pick_grid else tb
    if pick_grid and chosen is None:
        chosen = tb
    r_t = tb / est if est > 0 else math.nan
    r_c = chosen / est if (chosen is not None and est > 0) else math.nan
    if s == 1:
        sw.worst[size] = max(sw.worst[size], r_c)
    sw.rows.append([
        net, str(size), f"{ci}->{co} k{k} s{s}" + (f" g{g}" if g > 1 else ""),
        f"{h}x{h}", str(count), old_txt, torus_txt, fmt_float(est, 6),
        fmt_float(old_b / est if old_b is not None else None, 5),
        fmt_float(r_t, 5), ("grid " if pick_grid else "torus ") + fmt_float(r_c, 5),
    ])
    print(" | ".join(sw.rows[-1]), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/conv_scale.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    sw = Sweep()
    for size in (224, 32):
        for net, layers in NETS.items():
            seen: dict[tuple[int, ...], int] = {}
            for cfg in layers:
                key = (*cfg[:5], cfg[5] * size // 224)
                seen[key] = seen.get(key, 0) + 1
            for key, count in seen.items():
                measure(sw, net, size, key, count)
    rows, worst, check_lines = sw.rows, sw.worst, sw.check_lines
    total = time.perf_counter() - t_start
    head = ["net", "input", "conv", "layer input", "n", "old s (cpu / wall)",
            "torus s (cpu / wall)", "Lanczos est", "old / est", "torus / est",
            "conv_l2_upper / est"]
    lines = [
        "# Convolution certificate vs image size (generated by benchmarks/conv_scale.py)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, Python "
        f"{sys.version.split()[0]}, torch {torch.__version__}, 1 thread. Times: CPU seconds "
        "(time.process_time) / wall seconds (time.perf_counter), same process.",
        f"Old certificate skipped where predicted over {OLD_LIMIT_S:.0f} s (its time at 32 "
        "scaled by the grid frequency count). Torus times marked 'reused' are the 224 "
        "measurement of the same kernel (the certificate does not read the image size).",
        f"conv_l2_upper picks the grid while it has <= {GRID_LIMIT} frequencies, the torus "
        "beyond.",
        "",
        format_markdown_table(head, rows),
        "",
        f"Largest stride-1 ratio conv_l2_upper / est: 32x32: {worst[32]:.5f}, "
        f"224x224: {worst[224]:.5f} (target <= 1.01).",
        "",
        "Same kernel at both sizes (torus recomputed, identical bound): CPU s at 224 vs 32: "
        + ", ".join(f"{c[0]}->{c[1]} k{c[2]} s{c[3]}"
                    + (f" g{c[4]}" if c[4] > 1 else "") + f": {a:.3g} vs {b:.3g}"
                    for c, a, b in check_lines[:12]),
        "",
        f"Total wall time: {total:.0f} s.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
