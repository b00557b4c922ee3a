"""Compare lipbound's bounds with the exact constant and the PyPI peers on the same networks.

Command (writes benchmarks/results/compare.md):

    OMP_NUM_THREADS=1 python benchmarks/compare.py

Options: ``--part main|targets|all`` (default all), ``--quick`` (tiny limits, for a smoke run),
``--out PATH``.

Columns: exact (branch and bound, time-limited per row: when it does not finish the cell shows
the certified lower..upper interval it had), the best witnessed lower bound
(``lipbound.lower_bound``), AutoLip, SeqLip (estimate and certified), LipSDP layer and neuron
(lipbound, verified), and the peers: ECLipsE-Fast (package ``eclipse-nn``; its float answer,
not verified by us), LipSDP-neuron through plain cvxpy with CVXOPT (raw solver value; verified
value in brackets) and with SCS (raw; verified in brackets).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import nn

torch.set_num_threads(1)

from lipbound.zoo.data import digits64, synthetic_gp  # noqa: E402
from lipbound.zoo.models import digits_mlp, paper_mlp  # noqa: E402
from lipbound.zoo.training import fit  # noqa: E402

COMMAND = "OMP_NUM_THREADS=1 python benchmarks/compare.py"
CVXOPT_MAX = 270  # plain-cvxpy CVXOPT peer only up to this LMI size (time budget)


@dataclass
class Cell:
    value: float | None = None
    seconds: float = 0.0
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, str]:
    t0 = time.perf_counter()
    try:
        out = fn()
        err = ""
    except Exception as exc:  # a benchmark keeps going; the cell says what happened
        out = None
        err = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        traceback.print_exc(file=sys.stderr)
    return out, time.perf_counter() - t0, err


def f(x: float | None, d: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{d - 1}e}"
    return f"{x:.{d}g}"


def s(t: float) -> str:
    return f"{t:.1f}s" if t >= 0.1 else f"{t:.2f}s"


# ------------------------------------------------------------------------------------------
# networks
# ------------------------------------------------------------------------------------------
_GP: dict[int, Any] = {}


def gp(dim: int) -> Any:
    if dim not in _GP:
        _GP[dim] = synthetic_gp(2000, 500, seed=0, dim=dim)
    return _GP[dim]


def random_mlp(depth: int, width: int, in_dim: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return paper_mlp(depth, width=width, in_dim=in_dim).eval()


def trained_mlp(
    depth: int, width: int, in_dim: int = 2, epochs: int = 100, seed: int = 0
) -> nn.Module:
    torch.manual_seed(seed)
    xtr, ytr, _, _ = gp(in_dim)
    return fit(paper_mlp(depth, width=width, in_dim=in_dim), xtr, ytr, epochs=epochs, seed=seed)


def trained_digits(epochs: int = 30) -> nn.Module:
    torch.manual_seed(0)
    xtr, ytr, _, _ = digits64()
    return fit(digits_mlp(), xtr, ytr, loss="ce", epochs=epochs, seed=0)


# ------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------
def run_exact(model: nn.Module, shape: tuple[int, ...], limit: float) -> Cell:
    from lipbound.methods.exact import exact

    r, t, err = timed(lambda: exact(model, shape, time_limit=limit))
    if r is None:
        return Cell(None, t, err)
    if r.finished:
        return Cell(r.value, t, f"**{f(r.value, 6)}** exact", {"res": r})
    return Cell(None, t, f"[{f(r.lower)}, {f(r.upper)}] (limit {limit:g}s)", {"res": r})


def run_lower(model: nn.Module, shape: tuple[int, ...], limit: float, data: Any) -> Cell:
    from lipbound.methods.lower import lower_bound

    r, t, err = timed(lambda: lower_bound(model, shape, data=data, time_limit=limit))
    if r is None:
        return Cell(None, t, err)
    return Cell(r.value, t, f(r.value))


def run_autolip(model: nn.Module, shape: tuple[int, ...]) -> Cell:
    from lipbound.methods.autolip import autolip

    r, t, err = timed(lambda: autolip(model, shape))
    if r is None:
        return Cell(None, t, err)
    up = r.upper if r.certified else None
    return Cell(up, t, f(r.value) + ("" if r.certified else " (est.)"))


def run_seqlip(model: nn.Module, shape: tuple[int, ...], limit: float) -> Cell:
    from lipbound.methods.seqlip import seqlip

    r, t, err = timed(lambda: seqlip(model, shape, time_limit=limit))
    if r is None:
        return Cell(None, t, err)
    return Cell(r.upper, t, f"{f(r.value)} / {f(r.upper)}")


def run_lipsdp(
    model: nn.Module, shape: tuple[int, ...], variant: str, solver: str, scs_limit: float
) -> Cell:
    from lipbound.methods.sdp import lipsdp

    def go() -> Any:
        opts: dict[str, Any] = {}
        name = solver
        if solver == "auto":
            import cvxpy as cp

            from lipbound.methods.sdp import _auto_solver, slope_ranges_of

            Ws, _ = slope_ranges_of(model, shape)
            n = sum([Ws[0].shape[1]] + [W.shape[0] for W in Ws[:-1]])
            name = _auto_solver(n, list(cp.installed_solvers()), variant)
        if name == "SCS":
            opts = {
                "time_limit_secs": scs_limit,
                "eps_abs": 1e-6,
                "eps_rel": 1e-6,
                "max_iters": 50000,
            }
        return lipsdp(model, shape, variant=variant, solver=name, solver_options=opts)

    r, t, err = timed(go)
    if r is None:
        return Cell(None, t, err)
    txt = f(r.value) if r.certified else f"{f(r.raw)} (NOT verified)"
    return Cell(r.upper, t, txt, {"res": r})


def run_eclipse(model: nn.Module, shape: tuple[int, ...]) -> Cell:
    def go() -> float:
        from eclipse_nn import ECLipsE_Fast

        from lipbound.methods.sdp import slope_ranges_of

        Ws, ranges = slope_ranges_of(model, shape)
        wt = [torch.tensor(W, dtype=torch.float64) for W in Ws]
        return float(ECLipsE_Fast(wt, [a for a, _ in ranges], [b for _, b in ranges]))

    v, t, err = timed(go)
    return Cell(None, t, err) if v is None else Cell(v, t, f(v))


def hidden_total(model: nn.Module, shape: tuple[int, ...]) -> int:
    from lipbound.methods.sdp import slope_ranges_of

    Ws, _ = slope_ranges_of(model, shape)
    return sum([Ws[0].shape[1]] + [W.shape[0] for W in Ws[:-1]])


# ------------------------------------------------------------------------------------------
# main table
# ------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    exact_limit: float
    data: Callable[[], Any] | None = None


def main_rows(quick: bool) -> list[Row]:
    ep = 3 if quick else 100
    rows = []
    for depth in (2, 5, 10):
        lim = 120.0 if depth == 2 else 10.0
        rows.append(
            Row(f"random MLP, {depth} layers x 80", lambda d=depth: random_mlp(d, 80), (2,), lim)
        )
        rows.append(
            Row(
                f"trained MLP (GP), {depth} layers x 80",
                lambda d=depth: trained_mlp(d, 80, epochs=ep),
                (2,),
                lim,
                lambda: gp(2)[0],
            )
        )
    for depth in (4, 5, 7, 10):
        rows.append(
            Row(
                f"paper MLP{depth} (width 10, GP)",
                lambda d=depth: trained_mlp(d, 10, epochs=ep),
                (2,),
                60.0,
                lambda: gp(2)[0],
            )
        )
    rows.append(
        Row(
            "digits 64-100-100-10 (trained)",
            lambda: trained_digits(3 if quick else 30),
            (64,),
            10.0,
            lambda: digits64()[0],
        )
    )
    return rows


HEAD = [
    "network",
    "exact",
    "t",
    "best lower",
    "t",
    "AutoLip",
    "t",
    "SeqLip est / cert",
    "t",
    "LipSDP-layer",
    "t",
    "LipSDP-neuron",
    "t",
    "ECLipsE-Fast",
    "t",
    "cvxpy+CVXOPT raw [verified]",
    "t",
    "cvxpy+SCS raw [verified]",
    "t",
    "lipbound best (no SDP) vs LipSDP-neuron",
]


def table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def run_main(quick: bool) -> tuple[str, list[str]]:
    lines: list[str] = []
    notes: list[str] = []
    scs_limit = 5.0 if quick else 45.0
    for row in main_rows(quick):
        print(f"[main] {row.name}", file=sys.stderr, flush=True)
        model, t_build, err = timed(row.build)
        if model is None:
            lines.append([row.name, err] + [""] * (len(HEAD) - 2))  # type: ignore[arg-type]
            continue
        model = model.eval()
        n_sdp = hidden_total(model, row.shape)
        lim = 2.0 if quick else row.exact_limit
        ex = run_exact(model, row.shape, lim)
        data = row.data() if row.data is not None else None
        lo = run_lower(model, row.shape, 2.0 if quick else 6.0, data)
        au = run_autolip(model, row.shape)
        sq = run_seqlip(model, row.shape, 1.0 if quick else 5.0)
        sl = run_lipsdp(model, row.shape, "layer", "auto", scs_limit)
        sn = run_lipsdp(model, row.shape, "neuron", "auto", scs_limit)
        ec = run_eclipse(model, row.shape)
        auto_solver = sn.extra["res"].solver if "res" in sn.extra else ""
        # peers: plain cvxpy LipSDP-neuron with CVXOPT and SCS
        if auto_solver == "CVXOPT":
            cv = sn
        elif n_sdp <= CVXOPT_MAX:
            cv = run_lipsdp(model, row.shape, "neuron", "CVXOPT", scs_limit)
        else:
            cv = Cell(None, 0.0, f"skipped (LMI {n_sdp} > {CVXOPT_MAX})")
        sc = (
            sn if auto_solver == "SCS" else run_lipsdp(model, row.shape, "neuron", "SCS", scs_limit)
        )

        def peer(c: Cell) -> str:
            r = c.extra.get("res")
            if r is None:
                return c.text
            return f"{f(r.raw)} [{f(r.upper) if r.certified else 'failed'}]"

        # lipbound's best certified bound without LipSDP vs LipSDP-neuron
        cands = [
            (c.value, c.seconds, name)
            for c, name in ((au, "AutoLip"), (sq, "SeqLip"), (ex, "exact"))
            if c.value is not None
        ]
        exr = ex.extra.get("res")
        if exr is not None and not exr.finished and exr.upper is not None:
            cands.append((exr.upper, ex.seconds, "exact-upper"))
        if cands and sn.value is not None:
            best, bt, bn = min(cands)
            ratio = best / sn.value
            if ratio <= 1 + 1e-9:
                cmp = f"{bn} {f(best)} <= SDP ({s(bt)} vs {s(sn.seconds)})"
            else:
                cmp = f"{bn} {f(best)} = {ratio:.2f}x SDP ({s(bt)} vs {s(sn.seconds)})"
        else:
            cmp = "-"
        lines.append(
            [
                f"{row.name} (LMI {n_sdp})",
                ex.text,
                s(ex.seconds),
                lo.text,
                s(lo.seconds),
                au.text,
                s(au.seconds),
                sq.text,
                s(sq.seconds),
                sl.text,
                s(sl.seconds),
                sn.text + (f" ({auto_solver})" if auto_solver else ""),
                s(sn.seconds),
                ec.text,
                s(ec.seconds),
                peer(cv) if cv is not sn else peer(sn) + " (= LipSDP-neuron run)",
                s(cv.seconds) if cv is not sn else "-",
                peer(sc) if sc is not sn else peer(sn) + " (= LipSDP-neuron run)",
                s(sc.seconds) if sc is not sn else "-",
                cmp,
            ]
        )
        print("   ", lines[-1], file=sys.stderr, flush=True)
        notes.append(f"{row.name}: built in {s(t_build)}")
    return table(HEAD, lines), notes  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# exact targets
# ------------------------------------------------------------------------------------------
def run_targets(quick: bool) -> str:
    from lipbound.methods.exact import exact

    specs: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], float]] = []
    ep = 3 if quick else 100
    for seed in (0, 1, 2):
        specs.append(
            (
                f"random 2-16-16-16-1 (seed {seed})",
                lambda sd=seed: random_mlp(4, 16, 2, sd),
                (2,),
                60.0,
            )
        )
    specs.append(("trained 2-16-16-16-1 (GP)", lambda: trained_mlp(4, 16, 2, ep), (2,), 60.0))
    for seed in (0, 1, 2):
        specs.append(
            (
                f"random 10-12-12-1 (seed {seed})",
                lambda sd=seed: random_mlp(3, 12, 10, sd),
                (10,),
                600.0,
            )
        )
    specs.append(
        ("trained 10-12-12-1 (GP, 10-D)", lambda: trained_mlp(3, 12, 10, ep), (10,), 600.0)
    )
    rows = []
    for name, build, shape, limit in specs:
        print(f"[targets] {name}", file=sys.stderr, flush=True)
        model = build().eval()
        lim = 3.0 if quick else limit
        r, t, err = timed(lambda m=model, sh=shape, li=lim: exact(m, sh, time_limit=li))
        if r is None:
            rows.append([name, err, "", "", "", "", "", "", ""])
            continue
        target = "1 min" if shape == (2,) else "10 min"
        ok = "yes" if r.finished and t <= limit else "NO"
        rows.append(
            [
                name,
                f(r.value, 8) if r.finished else f"[{f(r.lower)}, {f(r.upper)}]",
                "yes" if r.finished else "no",
                s(t),
                f"{ok} ({target})",
                str(r.nodes_explored),
                str(r.lps_solved),
                str(r.regions_visited),
                f(r.extra.get("sample_best")),
            ]
        )
        print("   ", rows[-1], file=sys.stderr, flush=True)
    head = [
        "network",
        "exact L",
        "finished",
        "time",
        "within target",
        "B&B nodes",
        "LPs",
        "leaf regions",
        "best random sample",
    ]
    return table(head, rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["main", "targets", "all"], default="all")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compare.md"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    parts = [
        f"# Exact constants, LipSDP and the other bounds on the same networks\n\n"
        f"Produced by `{COMMAND}`"
        + (" --quick (smoke run, NOT the reference numbers)" if args.quick else "")
        + f" on {platform.machine()} / {platform.python_version()}, torch "
        f"{torch.__version__}, one thread, on a machine shared with other jobs (times "
        f"are wall-clock and noisy).\n"
    ]
    if args.part in ("targets", "all"):
        parts.append(
            "## Exact: speed targets\n\nTargets: finish within a minute on 2-D-input "
            "nets with 3 hidden layers of width 16, within 10 minutes on 10-D-input "
            "nets with 2 hidden layers of width 12 (scalar output, l2).\n"
        )
        parts.append(run_targets(args.quick) + "\n")
    if args.part in ("main", "all"):
        tab, _ = run_main(args.quick)
        parts.append("## All methods on the same networks\n")
        parts.append(LEGEND)
        parts.append(tab + "\n")
    parts.append(f"\nTotal wall time of this run: {time.perf_counter() - t0:.0f}s.\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    print(f"wrote {out}", file=sys.stderr)


LEGEND = """\
All bounds are l2 Lipschitz constants of the whole network. Certified upper bounds: AutoLip,
SeqLip's second number, LipSDP (lipbound's, after verification), the `exact` upper end.
Estimates (not proofs): SeqLip's first number, ECLipsE-Fast (its float answer; not verified),
the raw SDP solver values. Lower bounds are witnessed (`best lower`: lipbound.lower_bound;
`exact`'s lower end: a realised linear region). `exact` cells: **bold** = the exact constant;
`[lo, up]` = the branch and bound stopped at its time limit (the limit is short, 10 s, on the
deep width-80 nets and the digits net, where exact computation obviously cannot finish: these
nets have far too many linear regions). `LMI n` is the size of the LipSDP matrix. Solver
`auto` = CVXOPT up to 250 (neuron) / 400 (layer), SCS beyond
(eps 1e-6, 45 s limit per solve, then verified; the verification repairs SCS's slightly
infeasible multipliers by a small convex combination with a closed-form certificate). Every
LipSDP column is certified after verification unless marked otherwise; the plain-cvxpy peers
show the solver's raw number first. The CVXOPT peer runs only up to LMI size 270 (time budget):
a separate measurement on this machine took 192 s for LipSDP-neuron with CVXOPT on the random
5-layer width-80 net (LMI 322), value 0.48162 (verified 0.48162).
The last column compares lipbound's best certified bound without LipSDP (AutoLip, SeqLip,
exact's upper end) with LipSDP-neuron: its ratio and the two run times.
"""


if __name__ == "__main__":
    main()
