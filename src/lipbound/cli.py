"""The ``lipbound`` command-line tool.

::

    lipbound estimate MODEL [--input-shape C,H,W] [--weights FILE] [--method lower,autolip,...]
                            [--norm 2] [--data FILE] [--json | --markdown] [--plot out.png]
                            [--restarts N] [--steps N] [--batch-size N] [--time-limit S]
                            [--seed N] [--quiet] [--debug]
    lipbound certify MODEL --data FILE --radius R [--norm 2|inf] [--method local|global]
                           [--input-shape C,H,W] [--weights FILE] [--batch-size N] [--json]
                           [--quiet] [--debug]
    lipbound demo [--quiet] [--json] [--plot out.png] [--seed N]
    lipbound zoo

Exit codes: 0 success; 2 bad usage (unknown option, model form or method, malformed shape,
missing file, an output path that cannot be written, checked BEFORE anything is computed); 1
error while loading or estimating (pickled model or unsafe ``.pt2`` archive refused, weights
that do not match the architecture or are not floating point, NaN weights, input shape that does
not fit the model, unsupported op, user code that raised or called ``sys.exit``); 130
interrupted (Ctrl-C). Every error is ONE line on stderr (``--debug`` adds the traceback).
Warnings and log records of torch and other libraries are swallowed (``--debug`` shows them);
remarks the user must see (weights cast to another dtype) are one ``lipbound: note:`` line each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._io import (
    ModelLoadError,
    UsageError,
    _existing,
    _safe_torch_load,
    load_data,
    load_model,
    parse_shape,
)
from ._version import __version__
from .errors import LipboundError, MissingDependencyError
from .local.bounds import LocalOptions
from .methods.certify import certify
from .report import DEFAULT_METHODS, METHODS, bound, plot_report
from .results import format_table
from .zoo.data import synthetic_gp
from .zoo.models import ZOO, paper_mlp
from .zoo.training import fit, mse

__all__ = ["main"]

class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (raised as UsageError, exit code 2)."""

    def error(self, message: str) -> NoReturn:

        raise UsageError(f"{message} (see: {self.prog} --help)")


def _build_parser() -> _Parser:

    parser = _Parser(
        prog="lipbound",
        description="Certified upper and witnessed lower bounds on the Lipschitz constant of "
        "PyTorch networks (AutoLip, SeqLip, exact, LipSDP).",
    )
    parser.add_argument("--version", action="version", version=f"lipbound {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    est = sub.add_parser(
        "estimate",
        help="bound the Lipschitz constant of a model",
        description="Bound the Lipschitz constant of MODEL: a zoo name (see 'lipbound zoo'), "
        "package.module:factory with --weights FILE (.safetensors or a torch.save'd "
        "state_dict), or a torch.export archive (.pt2). Pickled whole models are refused.",
    )
    est.add_argument("model", metavar="MODEL")
    est.add_argument("--input-shape", "-s", metavar="C,H,W",
                     help="shape of ONE input sample, no batch dimension (default: the zoo "
                     "entry's, or the shape recorded in a .pt2 archive)")
    est.add_argument("--weights", "-w", metavar="FILE",
                     help="weights for a factory or zoo model (.safetensors or state_dict)")
    est.add_argument("--method", "-m", action="append", metavar="M[,M...]",
                     help="methods to run, comma-separated or repeated: lower, autolip, "
                     "lipsdp, seqlip, exact (default: lower,autolip,lipsdp,seqlip)")
    est.add_argument("--norm", default="2", choices=["1", "2", "inf"],
                     help="p-norm on inputs and outputs (default: 2)")
    est.add_argument("--data", metavar="FILE",
                     help="data points (N, *shape) for the lower bound: .npy, .pt, .safetensors")
    fmt = est.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the report as JSON")
    fmt.add_argument("--markdown", action="store_true", help="print the report as markdown")
    est.add_argument("--plot", metavar="PNG", help="write a plot of the per-layer factors")
    _search_options(est)

    demo = sub.add_parser(
        "demo",
        help="train a small net in seconds and print its full report",
        description="Train the paper's 4-layer MLP on a synthetic smooth function (a sample of "
        "a Gaussian-process prior) for a few seconds, then bound its Lipschitz constant with "
        "every method that fits (lower bound, AutoLip, SeqLip, exact).",
    )
    fmt = demo.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the report as JSON")
    fmt.add_argument("--markdown", action="store_true", help="print the report as markdown")
    demo.add_argument("--plot", metavar="PNG", help="write a plot of the per-layer factors")
    demo.add_argument("--epochs", type=int, default=150, help="training epochs (default: 150)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, weights and search")
    demo.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    demo.add_argument("--debug", action="store_true", help="show tracebacks")

    cert = sub.add_parser(
        "certify",
        help="certified robustness of labelled data at a radius",
        description="Certify that every point within RADIUS (l2 or l-inf) of each input keeps "
        "its label, from local (or global) Lipschitz bounds on the logit differences. MODEL as "
        "for 'estimate'; --data is a .pt (torch.save'd dict of tensors, loaded with "
        "weights_only=True) or .npz (numpy, no pickle) file with 'inputs' and 'labels'.",
    )
    cert.add_argument("model", metavar="MODEL")
    cert.add_argument("--data", required=True, metavar="FILE",
                      help=".pt or .npz with 'inputs' (N, *shape) and 'labels' (N,)")
    cert.add_argument("--radius", required=True, type=float, metavar="R",
                      help="radius of the ball around each input (>= 0)")
    cert.add_argument("--norm", default="2", choices=["2", "inf"],
                      help="norm of the ball (default: 2)")
    cert.add_argument("--method", default="local", choices=["local", "global"],
                      help="local bounds on each ball (default) or global constants")
    cert.add_argument("--input-shape", "-s", metavar="C,H,W",
                      help="shape of ONE input sample (default: the data's, or the model's)")
    cert.add_argument("--weights", "-w", metavar="FILE",
                      help="weights for a factory or zoo model (.safetensors or state_dict)")
    cert.add_argument("--batch-size", type=int, default=32, metavar="N",
                      help="samples bounded at once (memory; default: 32)")
    cert.add_argument("--json", action="store_true", help="print the result as JSON")
    cert.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    cert.add_argument("--debug", action="store_true", help="show tracebacks")

    zoo = sub.add_parser("zoo", help="list the built-in models")
    zoo.add_argument("--json", action="store_true", help="print the list as JSON")
    return parser


def _search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--restarts", type=int, metavar="N", help="lower bound: number of starts")
    p.add_argument("--steps", type=int, metavar="N", help="lower bound: steps per start")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="lower bound: points per batched forward pass (memory)")
    p.add_argument("--time-limit", type=float, metavar="S",
                   help="ONE overall time limit in seconds, shared by the methods (each gets "
                   "its share of what is left when it starts; default: each method's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the lower-bound search")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress output (default: a bar on a terminal, one line per stage "
                   "otherwise)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _methods(values: Sequence[str] | None) -> tuple[str, ...]:

    if not values:
        return DEFAULT_METHODS
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    for n in names:
        if n not in METHODS:
            raise UsageError(f"unknown method {n!r}; allowed: {', '.join(METHODS)}")
    if not names:
        raise UsageError(f"--method is empty; allowed: {', '.join(METHODS)}")
    return tuple(dict.fromkeys(names))


def _options(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, dict[str, Any]]:

    opts: dict[str, dict[str, Any]] = {}
    lower: dict[str, Any] = {"seed": args.seed}
    for key in ("restarts", "steps", "batch_size"):
        val = getattr(args, key)
        if val is not None:
            if val <= 0:
                raise UsageError(f"--{key.replace('_', '-')} must be > 0; got {val}")
            lower[key] = val
    if args.time_limit is not None and not (
        args.time_limit > 0 and args.time_limit < float("inf")
    ):
        raise UsageError(f"--time-limit must be a positive number of seconds; got "
                         f"{args.time_limit}")
    if "lower" in methods:
        opts["lower"] = lower
    return opts


_PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff",
                 ".webp", ".pgf", ".raw", ".rgba", ".svgz")


def _check_output(path: str, option: str) -> None:
    """Fail fast (UsageError, exit 2) on an output path that cannot be written, before any
    model is loaded or bound computed: a writable existing folder, not itself a folder, a
    writable file if it exists, a format matplotlib writes, matplotlib installed."""

    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name such as {p / 'out.png'}")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{option} {path} is not writable (permission denied)")
    if p.suffix.lower() not in _PLOT_FORMATS:
        raise UsageError(f"{option} {path}: unknown image format {p.suffix or '(none)'!r}; "
                         f"use one of {', '.join(_PLOT_FORMATS[:4])}")
    if importlib.util.find_spec("matplotlib") is None:

        raise MissingDependencyError("matplotlib", "plot", f"{option}")


class _TorchMuted:
    """A stand-in for ``sys.stderr`` that drops what code in ``torch`` writes to it directly
    (``torch.fx``'s ``_WrappedCall`` prints the whole generated graph when a call fails) and
    passes everything else (progress bars, lipbound's own lines) through."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller == "torch" or caller.startswith("torch."):
            return len(text)
        return int(self._stream.write(text))

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding...
        return getattr(self._stream, name)


@contextlib.contextmanager
def _quiet(debug: bool) -> Iterator[None]:
    """Swallow third-party warnings, log records and torch's direct writes to stderr (graph
    dumps when a trace fails) so that an error stays one line; ``--debug`` lets them through."""
    if debug:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        stderr = sys.stderr
        sys.stderr = _TorchMuted(stderr)
        try:
            yield
        finally:
            sys.stderr = stderr
            logging.disable(previous)


def _say_notes(notes: Sequence[str]) -> None:
    for note in dict.fromkeys(notes):
        print(f"lipbound: note: {note}", file=sys.stderr)


def _emit(report: Any, args: argparse.Namespace) -> None:
    if args.plot:

        plot_report(report, args.plot)
        if not args.quiet:
            print(f"plot written to {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif args.markdown:
        print(report.to_markdown())
    else:
        print(report)


def _cmd_estimate(args: argparse.Namespace) -> int:

    methods = _methods(args.method)
    opts: dict[str, Any] = _options(args, methods)
    shape = parse_shape(args.input_shape) if args.input_shape is not None else None
    if args.plot:
        _check_output(args.plot, "--plot")
    notes: list[str] = []
    model, default_shape, name = load_model(args.model, weights=args.weights, notes=notes)
    _say_notes(notes)
    if shape is None:
        shape = default_shape
    if shape is None:
        raise UsageError(f"--input-shape is required for {args.model} (e.g. --input-shape 1,28,28)")
    data = None if args.data is None else load_data(args.data, shape)
    report = bound(
        model, shape, methods=methods, data=data, norm=args.norm, progress=not args.quiet,
        time_limit=args.time_limit, model_name=name, **opts,
    )
    _emit(report, args)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch


    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.epochs <= 0:

        raise UsageError(f"--epochs must be > 0; got {args.epochs}")
    if args.plot:
        _check_output(args.plot, "--plot")
    t0 = time.perf_counter()
    say("lipbound demo: the paper's 4-layer MLP (2-10-10-10-1, ReLU) on a synthetic smooth "
        "function R^2 -> R (a Gaussian-process sample)")
    xtr, ytr, xte, yte = synthetic_gp(1000, 250, seed=args.seed)
    torch.manual_seed(args.seed)
    model: Any = paper_mlp(4)
    model = fit(model, xtr, ytr, epochs=args.epochs, lr=1e-2, batch_size=128, seed=args.seed)
    err = mse(model, xte, yte)
    say(f"trained in {time.perf_counter() - t0:.1f} s, test MSE {err:.4f} "
        f"(target variance {float(yte.var()):.3f})")
    methods = ("lower", "autolip", "lipsdp", "seqlip", "exact")
    opts: dict[str, Any] = {
        "lower": {"seed": args.seed, "steps": 100}, "exact": {"time_limit": 10.0},
    }
    say(f"bounding its Lipschitz constant with: {', '.join(methods)}")
    report = bound(
        model, (2,), methods=methods, data=xtr, progress=not args.quiet,
        model_name="paper_mlp(4) trained on synthetic_gp", **opts,
    )
    _emit(report, args)
    say(f"total {time.perf_counter() - t0:.1f} s. 'certified' numbers are proven; "
        "'estimate' numbers are not; the true constant lies between the witnessed lower bound "
        "and the certified upper bound.")
    return 0


def _load_labelled(path: str) -> tuple[Any, Any]:
    """``(inputs, labels)`` from a ``.pt`` dict (weights_only) or a ``.npz`` (no pickle)."""
    import torch


    p = _existing(path, "data")
    if p.suffix == ".npz":
        import numpy as np

        try:
            with np.load(p, allow_pickle=False) as z:
                obj: Any = {k: torch.as_tensor(z[k]) for k in z.files}
        except Exception as e:
            raise ModelLoadError(f"cannot read {path} (numpy .npz, no pickle): {e}") from e
    elif p.suffix in (".pt", ".pth"):
        obj = _safe_torch_load(p)
    else:
        raise UsageError(f"--data {path}: use a .pt (dict of tensors) or .npz file")
    if not isinstance(obj, dict) or "inputs" not in obj or "labels" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ModelLoadError(f"{path} must hold 'inputs' and 'labels'; found {keys}")
    x, y = obj["inputs"], obj["labels"]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ModelLoadError(f"{path}: 'inputs' and 'labels' must be tensors / arrays")
    return (x if x.is_floating_point() else x.float()), y


def _cmd_certify(args: argparse.Namespace) -> int:

    if not args.radius >= 0 or args.radius == float("inf"):
        raise UsageError(f"--radius must be a finite number >= 0; got {args.radius}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be > 0; got {args.batch_size}")
    notes: list[str] = []
    model, default_shape, name = load_model(args.model, weights=args.weights, notes=notes)
    _say_notes(notes)
    x, y = _load_labelled(args.data)
    shape = parse_shape(args.input_shape) if args.input_shape is not None else default_shape
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        if x.dim() == 2 and x.shape[1] == math.prod(shape):
            x = x.reshape(x.shape[0], *shape)
        else:
            raise UsageError(f"inputs in {args.data} have shape {tuple(x.shape)}; the model "
                             f"takes (N, {', '.join(map(str, shape))})")

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    res = certify(model, x, y, args.radius, norm=args.norm, method=args.method,
                  batch_size=args.batch_size, options=LocalOptions(progress=progress))
    if args.json:
        d = res.to_dict()
        d["model"] = name
        print(json.dumps(d, indent=2))
        return 0
    print(f"{name}: {len(res)} samples, l{res.norm} radius {res.radius:g}, method "
          f"{res.method}")
    print(res.table())
    print(format_table(["quantity", "value"], [
        ["accuracy", res.accuracy], ["certified accuracy", res.certified_accuracy],
        ["seconds (wall)", res.seconds], ["seconds (CPU)", res.cpu_seconds]]))
    for n in res.notes:
        print(f"note: {n}")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:

    if args.json:
        print(json.dumps({k: {"input_shape": list(v.input_shape), "description": v.description}
                          for k, v in ZOO.items()}, indent=2))
        return 0

    rows = [[k, ",".join(map(str, v.input_shape)), v.description] for k, v in ZOO.items()]
    print(format_table(["name", "input shape", "description"], rows))
    return 0


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] + ("" if len(lines) == 1 else " " + " ".join(lines[1:]))


def _run(argv: list[str], debug: bool) -> int:
    """Parse ``argv`` and run its command (:func:`main` turns errors into exit codes)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler = {"estimate": _cmd_estimate, "demo": _cmd_demo, "zoo": _cmd_zoo,
               "certify": _cmd_certify}[args.command]
    try:
        with _quiet(debug):
            return handler(args)
    except SystemExit as e:  # from user code (a factory, a forward): never a silent exit
        if debug:
            traceback.print_exc()
        print(f"lipbound: error: the model's code called sys.exit({e.code!r}) "
              "(SystemExit); lipbound stopped", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lipbound`` console script; returns the exit code."""

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return _run(argv, debug)
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"lipbound: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except LipboundError as e:
        if debug:
            traceback.print_exc()
        print(f"lipbound: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("lipbound: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for users; --debug shows it
        if debug:
            traceback.print_exc()
        print(
            f"lipbound: error: {type(e).__name__}: {_one_line(e)} (run with --debug for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
