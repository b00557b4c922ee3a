"""Loading models, weights and data for the command-line tool, safely.

Three model forms (see docs/cli.md):

* a built-in zoo name (:data:`lipbound.zoo.models.ZOO`), optionally with ``--weights``;
* ``package.module:factory`` (or ``path/to/file.py:factory``) plus ``--weights FILE``: the
  factory builds the architecture, FILE holds its weights as safetensors
  (``safetensors.torch.load_file``) or as a state_dict read by
  ``torch.load(FILE, weights_only=True)``;
* a ``torch.export`` archive (``.pt2``): ``torch.export.load(path).module()``, after the
  archive has been checked (:func:`check_pt2_archive`).

Pickled whole models (``torch.save(model)``) are refused: unpickling them can run arbitrary
code. Nothing here ever calls ``torch.load`` with ``weights_only=False``, and a ``.pt2`` archive
is inspected BEFORE ``torch.export.load`` sees it, because that loader (torch 2.13) runs code
from the file in six places: ``torch.load(weights_only=False)`` of weights and constants marked
``use_pickle`` (``pt2_archive/_package.py``); its fall-back to ``weights_only=False`` when the
sample inputs or a legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` do not
load with ``weights_only=True`` (``_export/serde/serialize.py::deserialize_torch_artifact``),
which the pre-2.8 archive layout always takes; ``pickle.loads`` of ``opaque_obj_*`` constants and
the TorchScript unpickler of ``custom_obj_*`` ones; ``sympy.sympify`` (an ``eval``) of every
symbolic-shape string ``expr_str``; ``exec`` of the ``guards_code`` strings in ``.module()``;
AOTInductor shared libraries under ``data/aotinductor/``. Graph node targets resolve to ANY
attribute of ``torch`` / ``math`` / ``operator`` (``torch.os.system`` is one), run when the model
is called. Each of these is refused; see :func:`check_pt2_archive` for the exact list.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import math
import operator
import os
import pickle
import pickletools
import re
import sys
import types
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._validation import check_finite_module
from .errors import InvalidArgumentError, LipboundError

__all__ = [
    "ModelLoadError",
    "UsageError",
    "check_pt2_archive",
    "load_data",
    "load_model",
    "load_state_dict",
    "parse_shape",
    "PICKLE_ADVICE",
]

PICKLE_ADVICE = (
    "lipbound never unpickles whole models, because unpickling can execute arbitrary code. "
    "Instead save the weights, torch.save(model.state_dict(), 'w.pt') or "
    "safetensors.torch.save_file(model.state_dict(), 'w.safetensors'), and pass "
    "'package.module:factory --weights w.pt'; or export the model with "
    "torch.export.save(torch.export.export(model, (example,)), 'model.pt2') and pass model.pt2"
)


class UsageError(LipboundError, ValueError):
    """The command line is wrong (unknown option or model form, missing file): exit code 2."""


class ModelLoadError(LipboundError, ValueError):
    """A model or weights file could not be used (pickled model, mismatched weights...)."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` (or ``"1x28x28"``, ``"(1, 28, 28)"``) -> ``(1, 28, 28)``.

    >>> parse_shape("1,28,28"), parse_shape("784"), parse_shape("(3, 32, 32)")
    ((1, 28, 28), (784,), (3, 32, 32))
    """
    parts = re.split(r"\s*[,x]\s*", text.strip().strip("()[]").strip())
    if len(parts) > 1 and parts[-1] == "":  # "784," is (784,)
        parts = parts[:-1]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(
            f"--input-shape must be positive integers separated by commas, e.g. 1,28,28 "
            f"(one sample, no batch dimension); got {text!r}"
        )
    return shape


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} file not found: {path}")
    if not p.is_file():
        raise UsageError(f"{what} path is not a file: {path}")
    return p


def _safe_torch_load(p: Path) -> Any:
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        name = found.group(1) if found is not None else _first_class(p)
        if name is None:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
            why = " ".join(detail.group(1).split()[:6]) if detail else _line(e)[:120]
            raise ModelLoadError(
                f"cannot read {p}: not a torch.save file of tensors ({why})"
            ) from e
        what = f" (it pickles a {name} object)"
        raise ModelLoadError(
            f"{p} is not a plain state_dict or tensor file{what}: it looks like a pickled "
            f"whole model, which torch.load(weights_only=True) refuses. {PICKLE_ADVICE}"
        ) from e
    except Exception as e:
        raise ModelLoadError(
            f"cannot read {p} with torch.load(weights_only=True): {_line(e)}"
        ) from e


def _first_class(p: Path) -> str | None:
    """The first non-torch-storage class a ``torch.save`` archive's pickle names, read with
    :func:`pickletools.genops` (a disassembler: nothing is imported or run). The weights-only
    unpickler stops at opcodes it does not know (pickle protocol 4's FRAME) before it reaches the
    class, so its error cannot name it."""
    try:
        with zipfile.ZipFile(p) as z:
            data = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
            if data is None:
                return None
            raw = z.read(data)
        strings: list[str] = []
        for op, arg, _pos in pickletools.genops(raw):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(str(arg))
            name = None
            if op.name == "GLOBAL":
                name = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            if name and not name.startswith(("torch._utils.", "collections.OrderedDict",
                                              "torch.FloatStorage", "torch.DoubleStorage")):
                return name
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError):
        return None
    return None


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state_dict from a ``.safetensors`` file or a ``torch.save``\\ d state_dict."""
    p = _existing(path, "weights")
    if p.suffix == ".pt2":
        raise UsageError(
            f"{path} is a torch.export archive: pass it as the MODEL itself, without --weights"
        )
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            from .errors import MissingDependencyError

            raise MissingDependencyError("safetensors", "io", "reading .safetensors") from e
        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as e:
            raise ModelLoadError(f"cannot read safetensors file {path}: {_line(e)}") from e
    obj = _safe_torch_load(p)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only never returns modules
        raise ModelLoadError(f"{path} holds a whole model. {PICKLE_ADVICE}")
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelLoadError(
            f"{path} does not hold a state_dict (a dict of parameter name -> tensor); "
            f"got {type(obj).__name__}"
        )
    return dict(obj)


def _apply_weights(model: nn.Module, sd: dict[str, torch.Tensor], path: str, what: str,
                   notes: list[str] | None = None) -> None:
    """Load ``sd`` into ``model`` strictly. ``load_state_dict`` casts silently: integer or bool
    tensors for floating parameters are refused (they are not weights of this model), other
    dtype changes (float16 -> float32...) are reported in ``notes``."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} in the file vs {tuple(own[k].shape)} in the model"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {_few(shapes)}")
        raise ModelLoadError(
            f"the weights in {path} do not match the architecture of {what}: "
            + "; ".join(parts)
        )
    ints = [f"{k} ({sd[k].dtype} in the file, {v.dtype} in the model)" for k, v in own.items()
            if v.is_floating_point() and not sd[k].is_floating_point()]
    if ints:
        raise ModelLoadError(
            f"the weights in {path} are not floating point: {_few(ints)}; lipbound does not "
            f"cast integer tensors into the floating parameters of {what}. Save the real "
            "(floating) weights"
        )
    casts = sorted({f"{sd[k].dtype} -> {v.dtype}" for k, v in own.items()
                    if sd[k].dtype != v.dtype})
    if casts and notes is not None:
        n = sum(sd[k].dtype != v.dtype for k, v in own.items())
        notes.append(f"{n} tensor(s) in {path} were cast to the model's dtype "
                     f"({', '.join(casts)}); the bounds are for the cast model")
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load the weights in {path} into {what}: {_line(e)}") from e


def _few(items: list[str], k: int = 4) -> str:
    more = f" (+{len(items) - k} more)" if len(items) > k else ""
    return ", ".join(items[:k]) + more


def _import_factory(spec: str) -> Any:
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise UsageError(f"model {spec!r}: expected package.module:factory")
    if mod_name.endswith(".py"):
        path = _existing(mod_name, "factory module")
        modspec = importlib.util.spec_from_file_location(path.stem, path)
        if modspec is None or modspec.loader is None:
            raise UsageError(f"cannot import {mod_name} as a module")
        module = importlib.util.module_from_spec(modspec)
        sys.modules.setdefault(path.stem, module)
        try:
            modspec.loader.exec_module(module)
        except Exception as e:
            raise ModelLoadError(f"importing {mod_name} failed: {_line(e)}") from e
        except SystemExit as e:
            raise ModelLoadError(f"importing {mod_name} called sys.exit({e.code!r}); a model "
                                 "module must define its factory, not exit") from e
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise UsageError(
                f"cannot import module {mod_name!r} ({_line(e)}); is its folder on PYTHONPATH?"
            ) from e
        except Exception as e:
            raise ModelLoadError(f"importing module {mod_name!r} failed: {_line(e)}") from e
        except SystemExit as e:
            raise ModelLoadError(f"importing module {mod_name!r} called sys.exit({e.code!r}); "
                                 "a model module must define its factory, not exit") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise UsageError(f"module {mod_name!r} has no attribute {attr!r}") from e


class _Exported(nn.Module):
    """The module of a loaded ``torch.export`` archive, as a submodule: torch.fx then calls it
    through ``Module.__call__``, so the hooks torch.export puts on it (input checks, state
    handling) run as in any call and are part of the traced graph."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _BatchLoop(nn.Module):
    """Runs a module exported with a static batch of 1 sample by sample."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing (AutoLip, SeqLip capture)
            raise InvalidArgumentError(
                "re-export with a dynamic batch: this torch.export archive has a fixed batch "
                "of 1, so its graph cannot be captured (only the lower bound runs on it); use "
                "dynamic_shapes=({0: torch.export.Dim('batch')},)"
            )
        return torch.cat([self.inner(x[i : i + 1]) for i in range(x.shape[0])])


_PT2_FIXED = frozenset({"archive_format", "archive_version", "byteorder", ".data/version",
                        ".data/serialization_id"})
_SYM_NAMES = frozenset({
    # constructors and assumptions torch's printer writes in ``expr_str``
    "Symbol", "Integer", "Float", "Rational", "True", "False", "positive", "negative",
    "nonnegative", "integer", "real", "finite", "oo",
    # sympy functions and the torch.utils._sympy.functions the deserializer passes as locals
    "Max", "Min", "Abs", "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or",
    "Not", "Piecewise", "sqrt", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod",
    "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural",
    "FloatPow", "TruncToFloat", "IntTrueDiv", "FloatTrueDiv", "ToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "Identity", "IsNonOverlappingAndDenseIndicator",
})
_SYM_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_]\w*)"
    r"|(?P<str>'[a-z]{1,3}\d+')|(?P<op>\*\*|//|==|!=|<=|>=|[-+*/%(),<>=&|~]))"
)
_SYMBOL = re.compile(r"[a-z]{1,3}\d+")
_SYM_OPS = frozenset({
    operator.eq, operator.ne, operator.le, operator.ge, operator.lt, operator.gt, operator.neg,
    operator.pos, operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod,
    operator.pow, operator.truediv, operator.and_, operator.or_, operator.lshift,
    operator.rshift, operator.getitem, math.trunc, torch.sym_not, torch.sym_int,
    torch.sym_float, torch.sym_ite, torch.sym_max, torch.sym_min, torch.sym_sqrt,
})


def _unsafe(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"refusing torch.export archive {path}: {what}. lipbound loads .pt2 archives only when "
        "nothing in them would run code (no pickled weights, constants or inputs, no custom or "
        "opaque objects, no AOTInductor libraries, no guard code, only torch operators); "
        "re-export it with torch.export.save(torch.export.export(model, (x,)), 'model.pt2') "
        f"using torch {torch.__version__}, or pass the weights as a state_dict"
    )


def _check_sym_expr(text: str, path: Path) -> None:
    """``text`` is passed to ``sympy.sympify`` (an ``eval``): allow a closed grammar only.

    Tokens: numbers, operators, quoted symbol names (``'s0'``), and names that are either
    symbols (``s0``, ``u12``: 1-3 lower-case letters + digits) or in :data:`_SYM_NAMES`
    (sympy constructors, assumptions and functions). No ``.``, ``_``-prefixed or other name, no
    attribute access and no other string can occur, so the ``eval`` only builds sympy objects.
    """
    pos = 0
    while pos < len(text.rstrip()):
        m = _SYM_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise _unsafe(path, f"symbolic-shape expression {text[:80]!r} is not a plain "
                                "sympy expression (it would be passed to eval)")
        name = m.group("name")
        if name is not None and name not in _SYM_NAMES and not _SYMBOL.fullmatch(name):
            raise _unsafe(path, f"symbolic-shape expression {text[:80]!r} uses the name "
                                f"{name!r} (it would be passed to eval)")
        pos = m.end()


def _walk_json(obj: Any) -> Iterator[tuple[str, Any]]:
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            for k, v in o.items():
                yield k, v
                stack.append(v)
        elif isinstance(o, list):
            stack.extend(o)


def _payload_files(raw: bytes, where: str, path: Path, tensor_prefix: str) -> set[str]:
    """Raw tensor files a weights/constants config names; refuse every unpickled entry."""
    try:
        config = json.loads(raw)["config"]
        items = list(config.items())
    except Exception as e:
        raise _unsafe(path, f"{where} is not a payload config ({_line(e)})") from e
    files = set()
    for fqn, meta in items:
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _unsafe(path, f"{where}: entry {fqn!r} is pickled (use_pickle), which torch "
                                "loads with torch.load(weights_only=False)")
        name = meta.get("path_name")
        if not isinstance(name, str) or not name.startswith(tensor_prefix) or "/" in name:
            raise _unsafe(path, f"{where}: entry {fqn!r} is stored as {name!r}, not as a raw "
                                f"tensor file {tensor_prefix}N (custom and opaque objects are "
                                "unpickled)")
        files.add(name)
    return files


def check_pt2_archive(data: bytes, path: Path) -> None:
    """Refuse a ``torch.export`` archive (its bytes) from which ``torch.export.load`` would run
    code; raise :class:`ModelLoadError` naming the entry.

    Accepted: one root folder holding exactly ``archive_format`` (``pt2``), ``archive_version``,
    ``byteorder``, ``.data/version``, ``.data/serialization_id``, ``models/M.json``,
    ``data/sample_inputs/M.pt`` (loaded here with ``torch.load(weights_only=True)``: torch then
    loads it the same way and never takes its ``weights_only=False`` fall-back),
    ``data/weights/M_weights_config.json`` and ``data/constants/M_constants_config.json`` whose
    every entry has ``use_pickle: false`` and names a raw tensor file (``weight_N`` /
    ``tensor_N``, read as bytes, never unpickled), those raw files, and ``extra/*`` (read as
    text). In ``models/M.json``, ``guards_code`` must be empty and every ``expr_str`` must pass
    :func:`_check_sym_expr`. Everything else is refused: legacy (pre-2.8) archives, pickled or
    legacy ``.pt`` weights/constants, custom/opaque objects, AOTInductor/ExecuTorch/MTIA
    payloads, duplicate names. (Node targets are checked after loading, by
    :func:`_check_graph_targets`.)
    """
    zf, rel = _pt2_entries(data, path)
    allowed = _pt2_allowed(zf, rel, path)
    for r in sorted(rel):
        if r not in allowed and not (r.startswith("extra/") and len(r) > len("extra/")):
            raise _unsafe(path, f"it holds the entry {r!r}, which lipbound does not load "
                                "(pickled data, AOTInductor code or an unknown payload)")
    if "data/sample_inputs/model.pt" in rel:
        _pt2_check_samples(zf, rel["data/sample_inputs/model.pt"], path)
    _pt2_check_program(zf, rel["models/model.json"], path)


def _pt2_entries(data: bytes, path: Path) -> tuple[zipfile.ZipFile, dict[str, str]]:
    """The archive and its entries by path under the one root folder, after the layout checks
    (a zip, no duplicate names, one root, ``archive_format: pt2``, one program ``model``)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read torch.export archive {path}: not a zip archive "
                             f"({_line(e)})") from e
    if len(set(names)) != len(names):
        raise _unsafe(path, "it holds duplicate entry names")
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise _unsafe(path, "its entries are not in one root folder (not a torch.export.save "
                            "archive of torch >= 2.8)")
    root = roots.pop() + "/"
    rel = {n[len(root):]: n for n in names}
    if (zf.read(rel["archive_format"]) if "archive_format" in rel else b"") != b"pt2":
        raise _unsafe(path, "it has no 'archive_format: pt2' entry (a legacy archive, whose "
                            "state dict is pickled)")
    models = [r[len("models/"):-len(".json")] for r in rel
              if r.startswith("models/") and r.endswith(".json")]
    if models != ["model"]:
        raise _unsafe(path, f"it holds the programs {models}; expected one, 'model'")
    return zf, rel


def _pt2_allowed(zf: zipfile.ZipFile, rel: dict[str, str], path: Path) -> set[str]:
    """The entries lipbound loads: the fixed ones and the raw tensor files the weights and
    constants configs name (each config refusing pickled payloads)."""
    allowed = set(_PT2_FIXED) | {"models/model.json", "data/sample_inputs/model.pt",
                                 "data/weights/model_weights_config.json",
                                 "data/constants/model_constants_config.json"}
    for r in ("data/weights/model_weights_config.json",
              "data/constants/model_constants_config.json"):
        if r not in rel:
            raise _unsafe(path, f"it has no {r} (a legacy layout, whose payload is pickled)")
    allowed |= {"data/weights/" + f for f in _payload_files(
        zf.read(rel["data/weights/model_weights_config.json"]), "the weights config", path,
        "weight_")}
    allowed |= {"data/constants/" + f for f in _payload_files(
        zf.read(rel["data/constants/model_constants_config.json"]), "the constants config",
        path, "tensor_")}
    return allowed


def _pt2_check_samples(zf: zipfile.ZipFile, entry: str, path: Path) -> None:
    """The sample inputs must load with ``weights_only=True`` (else torch unpickles them)."""
    try:
        sample = torch.load(io.BytesIO(zf.read(entry)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _unsafe(path, "its sample inputs do not load with torch.load(weights_only="
                            f"True) ({_line(e)[:120]}), so torch would unpickle them "
                            "with weights_only=False") from e
    if not isinstance(sample, (tuple, dict)):
        raise _unsafe(path, f"its sample inputs are a {type(sample).__name__}, not a tuple")


def _pt2_check_program(zf: zipfile.ZipFile, entry: str, path: Path) -> None:
    """``models/model.json``: JSON, no ``guards_code``, every ``expr_str`` checked."""
    try:
        program = json.loads(zf.read(entry))
    except Exception as e:
        raise ModelLoadError(f"cannot read torch.export archive {path}: models/model.json is "
                             f"not JSON ({_line(e)})") from e
    if not isinstance(program, dict) or program.get("guards_code", []) not in ([], None):
        raise _unsafe(path, "models/model.json holds guards_code (Python that torch would exec)")
    for key, val in _walk_json(program):
        if key == "expr_str":
            if not isinstance(val, str):
                raise _unsafe(path, f"a symbolic-shape expression is a {type(val).__name__}")
            _check_sym_expr(val, path)


def _check_graph_targets(gm: torch.fx.GraphModule, path: Path) -> None:
    """Every call in the deserialized graphs must be a torch operator (``OpOverload``), a
    higher-order operator or a symbolic-shape op: torch resolves a node's target string to ANY
    attribute of ``torch`` / ``math`` / ``operator`` (``torch.os.system``, ``torch.load``...)."""
    for sub in gm.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            t = node.target
            ok = node.op == "call_function" and (
                isinstance(t, (torch._ops.OpOverload, torch._ops.HigherOrderOperator))
                or (not isinstance(t, str) and t in _SYM_OPS)
            )
            if not ok:
                raise _unsafe(path, f"graph node {node.name!r} calls {node.op} {t!r}, which is "
                                    "not a torch operator")


def _fixed_mode(self: nn.Module, mode: bool = True) -> nn.Module:
    """train()/eval() of a loaded exported module: its graph is fixed (it does not depend on
    the training flags), so switching modes is a no-op and the module reports eval mode."""
    for m in self.modules():
        m.training = False
    return self


def _fixed_eval(self: nn.Module) -> nn.Module:
    return _fixed_mode(self, False)


def _load_export(path: Path) -> tuple[nn.Module, tuple[int, ...] | None]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"cannot read torch.export archive {path}: {_line(e)}") from e
    check_pt2_archive(data, path)
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    try:  # the same bytes that were checked; every torch.load forced to weights_only=True
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        with warnings.catch_warnings():  # torch.export's internal deprecation chatter
            warnings.simplefilter("ignore")
            ep = torch.export.load(io.BytesIO(data))
    except LipboundError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot read torch.export archive {path}: {_line(e)}") from e
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved
    _check_graph_targets(ep.graph_module, path)
    shape: tuple[int, ...] | None = None
    static_batch: int | None = None
    user_inputs = list(ep.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ModelLoadError(
            f"{path} takes {len(user_inputs)} inputs; lipbound needs a model with exactly one"
        )
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name == user_inputs[0]:
            val = node.meta.get("val")
            if val is not None and hasattr(val, "shape") and len(val.shape) >= 2:
                dims = list(val.shape)
                if all(isinstance(d, int) for d in dims[1:]):
                    shape = tuple(int(d) for d in dims[1:])
                if isinstance(dims[0], int):
                    static_batch = int(dims[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported: nn.Module = ep.module()
    except Exception as e:
        raise ModelLoadError(f"cannot build the module of {path}: {_line(e)}") from e
    # torch.export's module raises NotImplementedError in train()/eval(); its graph is fixed
    exported.train = types.MethodType(_fixed_mode, exported)  # type: ignore[method-assign]
    exported.eval = types.MethodType(_fixed_eval, exported)  # type: ignore[method-assign]
    model: nn.Module = _Exported(exported).eval()
    if static_batch is not None:
        if static_batch != 1:
            raise ModelLoadError(
                f"{path} was exported for a fixed batch of {static_batch} samples; export it "
                "with a dynamic batch dimension (dynamic_shapes={0: torch.export.Dim('batch')}) "
                "or with a batch of 1"
            )
        model = _BatchLoop(model).eval()
    return model, shape


def load_model(
    spec: str, *, weights: str | None = None, notes: list[str] | None = None
) -> tuple[nn.Module, tuple[int, ...] | None, str]:
    """Return ``(model, default_input_shape_or_None, display_name)`` for a CLI MODEL argument.

    One-line remarks the user should see (weights cast to another dtype) go to ``notes``."""
    from .zoo.models import ZOO, get

    if spec in ZOO:
        model, shape = get(spec)
        name = spec
        if weights is not None:
            _apply_weights(model, load_state_dict(weights), weights, f"zoo model {spec!r}",
                           notes)
            name = f"{spec} + {Path(weights).name}"
        check_finite_module(model, name=name)
        return model.eval(), tuple(shape), name
    suffix = Path(spec).suffix
    if suffix == ".pt2":
        if weights is not None:
            raise UsageError("--weights is not used with a torch.export archive (.pt2)")
        p = _existing(spec, "model")
        exported, ex_shape = _load_export(p)
        check_finite_module(exported, name=p.name)
        return exported, ex_shape, p.name
    if suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".safetensors") and ":" not in spec:
        p = _existing(spec, "model")
        if suffix != ".safetensors":
            _safe_torch_load(p)  # refuses pickled whole models with the advice
        raise UsageError(
            f"{spec} holds weights only; give the architecture too: "
            f"lipbound estimate package.module:factory --weights {spec}"
        )
    if ":" in spec:
        factory = _import_factory(spec)
        if not callable(factory):
            raise UsageError(f"{spec} is not callable; it must build and return an nn.Module")
        try:
            model = factory()
        except LipboundError:
            raise
        except Exception as e:
            raise ModelLoadError(f"calling {spec}() failed: {_line(e)}") from e
        except SystemExit as e:
            raise ModelLoadError(f"calling {spec}() raised SystemExit({e.code!r}) instead of "
                                 "returning an nn.Module") from e
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
        name = spec
        if weights is not None:
            _apply_weights(model, load_state_dict(weights), weights, spec, notes)
            name = f"{spec} + {Path(weights).name}"
        check_finite_module(model, name=name)
        return model.eval(), None, name
    if Path(spec).exists():
        raise UsageError(
            f"don't know how to load {spec!r}: use a .pt2 torch.export archive, or "
            "package.module:factory --weights FILE"
        )
    raise UsageError(
        f"unknown model {spec!r}: give a zoo name ({', '.join(sorted(ZOO))}), "
        "package.module:factory with --weights FILE, or a torch.export archive (.pt2)"
    )


def load_data(path: str, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Data points ``(N, *input_shape)`` from ``.npy`` / ``.pt`` / ``.safetensors`` (no pickle)."""
    p = _existing(path, "data")
    if p.suffix == ".npy":
        import numpy as np

        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as e:
            raise ModelLoadError(f"cannot read {path} (numpy, no pickle): {_line(e)}") from e
        t = torch.as_tensor(arr)
    elif p.suffix == ".safetensors":
        sd = load_state_dict(path)
        t = sd["data"] if "data" in sd else next(iter(sd.values()))
    else:
        obj = _safe_torch_load(p)
        if isinstance(obj, Mapping):
            obj = obj.get("data", obj.get("x", next(iter(obj.values()), None)))
        if isinstance(obj, (tuple, list)) and obj:
            obj = obj[0]
        if not isinstance(obj, torch.Tensor):
            raise ModelLoadError(f"{path} does not hold a tensor of data points")
        t = obj
    t = t.float() if not t.is_floating_point() else t
    n = math.prod(input_shape)
    if t.ndim >= 1 and t.numel() % n == 0 and tuple(t.shape[-len(input_shape):]) != input_shape:
        if t.ndim == 2 and t.shape[1] == n:
            t = t.reshape(t.shape[0], *input_shape)
    if tuple(t.shape[1:]) != tuple(input_shape):
        raise InvalidArgumentError(
            f"data in {path} has shape {tuple(t.shape)}; expected (N, "
            f"{', '.join(map(str, input_shape))})"
        )
    return t
