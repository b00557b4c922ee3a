"""Loading models, weights and data for the command-line tool, safely.

Three model forms (see docs/cli.md):

* a built-in zoo name (:data:`lipbound.zoo.models.ZOO`), optionally with ``--weights``;
* ``package.module:factory`` (or ``path/to/file.py:factory``) plus ``--weights FILE``: the
  factory builds the architecture, FILE holds its weights as safetensors
  (``safetensors.torch.load_file``) or as a state_dict read by
  ``torch.load(FILE, weights_only=True)``;
* a ``torch.export`` archive (``.pt2``): ``torch.export.load(path).module()``.

Pickled whole models (``torch.save(model)``) are refused: unpickling them can run arbitrary
code. Nothing here ever calls ``torch.load`` with ``weights_only=False``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import pickle
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._validation import check_finite_module
from .errors import InvalidArgumentError, LipboundError

__all__ = [
    "ModelLoadError",
    "UsageError",
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
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if found is None:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
            why = " ".join(detail.group(1).split()[:6]) if detail else _line(e)[:120]
            raise ModelLoadError(
                f"cannot read {p}: not a torch.save file of tensors ({why})"
            ) from e
        what = f" (it pickles a {found.group(1)} object)"
        raise ModelLoadError(
            f"{p} is not a plain state_dict or tensor file{what}: it looks like a pickled "
            f"whole model, which torch.load(weights_only=True) refuses. {PICKLE_ADVICE}"
        ) from e
    except Exception as e:
        raise ModelLoadError(
            f"cannot read {p} with torch.load(weights_only=True): {_line(e)}"
        ) from e


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


def _apply_weights(model: nn.Module, sd: dict[str, torch.Tensor], path: str, what: str) -> None:
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
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise UsageError(
                f"cannot import module {mod_name!r} ({_line(e)}); is its folder on PYTHONPATH?"
            ) from e
        except Exception as e:
            raise ModelLoadError(f"importing module {mod_name!r} failed: {_line(e)}") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise UsageError(f"module {mod_name!r} has no attribute {attr!r}") from e


class _BatchLoop(nn.Module):
    """Runs a module exported with a static batch of 1 sample by sample."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inner(x[i : i + 1]) for i in range(x.shape[0])])


def _load_export(path: Path) -> tuple[nn.Module, tuple[int, ...] | None]:
    try:
        with warnings.catch_warnings():  # torch.export's internal deprecation chatter
            warnings.simplefilter("ignore")
            ep = torch.export.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot read torch.export archive {path}: {_line(e)}") from e
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model: nn.Module = ep.module()
    if static_batch is not None:
        if static_batch != 1:
            raise ModelLoadError(
                f"{path} was exported for a fixed batch of {static_batch} samples; export it "
                "with a dynamic batch dimension (dynamic_shapes={0: torch.export.Dim('batch')}) "
                "or with a batch of 1"
            )
        model = _BatchLoop(model)
    return model, shape


def load_model(
    spec: str, *, weights: str | None = None
) -> tuple[nn.Module, tuple[int, ...] | None, str]:
    """Return ``(model, default_input_shape_or_None, display_name)`` for a CLI MODEL argument."""
    from .zoo.models import ZOO, get

    if spec in ZOO:
        model, shape = get(spec)
        name = spec
        if weights is not None:
            _apply_weights(model, load_state_dict(weights), weights, f"zoo model {spec!r}")
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
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
        name = spec
        if weights is not None:
            _apply_weights(model, load_state_dict(weights), weights, spec)
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
