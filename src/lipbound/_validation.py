"""Input checks shared by every public entry point (one place, one wording)."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgumentError, NonFiniteError, ShapeError, TrainingModeError

__all__ = [
    "MAX_INPUT_ENTRIES",
    "TrainingModeError",
    "check_eval_mode",
    "check_input_shape",
    "check_norm",
    "check_choice",
    "check_positive",
    "check_probability",
    "check_finite_module",
    "check_model",
    "normalize_norm",
]

_NORMS: tuple[str, ...] = ("1", "2", "inf")

#: Largest number of entries of ONE input sample that the entry points accept. Every method
#: evaluates batches of such samples (capture: 2, lower bounds: up to ``batch_size``, Lanczos:
#: a basis of ~24 vectors), so 2^27 entries (512 MiB per float32 sample) is already far beyond
#: what any of them can run; raise it (``lipbound._validation.MAX_INPUT_ENTRIES = ...``) only
#: on a machine that has the memory.
MAX_INPUT_ENTRIES = 2**27


def _is_bool(d: Any) -> bool:
    return isinstance(d, bool) or type(d).__name__ in ("bool_", "bool")


def _as_dim(d: Any) -> int | None:
    """``d`` as a Python int if it is an integer (int, numpy / torch integer), else ``None``."""
    if _is_bool(d) or isinstance(d, float):
        return None
    if isinstance(d, torch.Tensor):
        if d.dim() != 0 or d.is_floating_point() or d.dtype == torch.bool:
            return None
        return int(d)
    try:
        return operator.index(d)
    except TypeError:
        return None


def check_input_shape(input_shape: Any, *, name: str = "input_shape") -> tuple[int, ...]:
    """Return ``input_shape`` as a tuple of positive ints, or raise :class:`ShapeError`.

    ``input_shape`` is the shape of ONE sample, without the batch dimension: ``(784,)`` for an
    MLP on flattened MNIST, ``(1, 28, 28)`` for a CNN.

    >>> check_input_shape([3, 32, 32])
    (3, 32, 32)
    >>> check_input_shape(5)
    (5,)
    """
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, (Sequence, str)) and hasattr(input_shape, "tolist"):
        input_shape = input_shape.tolist()  # a numpy array / tensor of dims
    single = _as_dim(input_shape) if not isinstance(input_shape, (Sequence, str)) else None
    if single is not None:
        input_shape = (single,)
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
        raise ShapeError(
            f"{name} must be a tuple of positive ints (the shape of one sample without the "
            f"batch dimension, e.g. (1, 28, 28)); got {input_shape!r}"
        )
    if len(input_shape) == 0:
        raise ShapeError(
            f"{name} is empty; give the shape of one sample without the batch dimension, "
            "e.g. (784,) or (3, 224, 224)"
        )
    dims: list[int] = []
    for d in input_shape:
        v = _as_dim(d)
        if v is None or v <= 0:
            what = "a bool" if _is_bool(d) else ("not an int" if v is None else "not positive")
            raise ShapeError(
                f"{name} must contain positive ints only; got {tuple(input_shape)!r} "
                f"(bad entry {d!r}: {what})"
            )
        dims.append(v)
    shape = tuple(dims)
    n = math.prod(shape)
    if n > MAX_INPUT_ENTRIES:
        raise ShapeError(
            f"{name}={shape} has {n:.3g} entries per sample ({4 * n / 2**30:.3g} GiB in float32 "
            f"for ONE sample, and the methods evaluate batches of them); the limit is "
            f"lipbound._validation.MAX_INPUT_ENTRIES = {MAX_INPUT_ENTRIES}. Check input_shape "
            "(one sample, without the batch dimension), or raise that limit if the machine "
            "has the memory."
        )
    return shape


def normalize_norm(norm: Any) -> str:
    """Map the accepted spellings of a norm to one of ``"1"``, ``"2"``, ``"inf"``.

    >>> normalize_norm(2), normalize_norm(float("inf")), normalize_norm("inf")
    ('2', 'inf', 'inf')
    """
    if isinstance(norm, bool):
        pass
    elif isinstance(norm, (int, float)):
        if math.isinf(norm) and norm > 0:
            return "inf"
        if norm in (1, 2):
            return str(int(norm))
    elif isinstance(norm, str) and norm.lower() in ("1", "2", "inf", "l1", "l2", "linf"):
        s = norm.lower().removeprefix("l")
        return "inf" if s in ("inf", "linf") else s
    raise InvalidArgumentError(
        f"norm must be one of 1, 2, float('inf') (or '1', '2', 'inf'); got {norm!r}"
    )


def check_norm(norm: Any, *, allowed: Iterable[str] = _NORMS, method: str = "") -> str:
    """Normalise ``norm`` and check that ``method`` supports it."""
    n = normalize_norm(norm)
    allowed = tuple(allowed)
    if n not in allowed:
        where = f" by {method}" if method else ""
        raise InvalidArgumentError(
            f"norm {norm!r} is not supported{where}; allowed: {', '.join(allowed)}"
        )
    return n


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Raise unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise InvalidArgumentError(
            f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}"
        )
    return value


def check_positive(
    name: str, value: Any, *, integer: bool = False, allow_zero: bool = False
) -> Any:
    """Raise unless ``value`` is a finite positive number (an int when ``integer``)."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an int" if integer else "a number"
        raise InvalidArgumentError(f"{name} must be {kind}; got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgumentError(f"{name} must be finite and {bound}; got {value!r}")
    return value


def check_int_range(name: str, value: Any, lo: int, hi: int) -> int:
    """Raise unless ``value`` is an int with ``lo <= value <= hi``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgumentError(f"{name} must be an int in [{lo}, {hi}]; got {value!r}")
    return value


def check_probability(name: str, value: Any) -> float:
    """Raise unless ``0 < value < 1``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise InvalidArgumentError(f"{name} must be a number in (0, 1); got {value!r}")
    return float(value)


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite.

    Fast path: a floating-point sum with a NaN or infinite term is NaN or infinite (NaN
    propagates, inf + finite = inf, inf - inf = NaN), so a finite sum proves every entry
    finite, without the entry-wise boolean tensor of ``isfinite`` (40x slower on a 4096 x 9216
    weight, torch 2.13 CPU). Only a non-finite sum, which finite entries can also give by
    overflow, falls back to the entry-wise check.
    """
    with torch.no_grad():
        if t.numel() == 0 or bool(torch.isfinite(t.detach().sum())):
            return True
        return bool(torch.isfinite(t.detach()).all())


def check_finite_module(module: nn.Module, *, name: str = "model") -> None:
    """Raise :class:`NonFiniteError` naming every parameter or buffer with NaN/inf."""
    bad = [
        qual
        for qual, t in list(module.named_parameters()) + list(module.named_buffers())
        if t.is_floating_point() and not _all_finite(t)
    ]
    if bad:
        raise NonFiniteError(
            f"{name} has NaN or infinite values in: {', '.join(bad)}. "
            "Check the weights you loaded (or the training run that produced them)."
        )


#: Layers whose forward depends on ``module.training`` (dropout, batch statistics, RReLU's
#: random slopes). A model whose only modules in training mode are other ones (a freshly built
#: ``nn.Sequential(nn.Linear(...), nn.ReLU())``) computes the same function in both modes.
_MODE_DEPENDENT: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.RReLU,
    nn.MultiheadAttention,
)


def training_modules(model: nn.Module) -> list[str]:
    """Qualified names of the mode-dependent layers of ``model`` that are in training mode.

    Dropout with ``p == 0`` and instance norms without running statistics compute the same in
    both modes and are not listed.
    """
    out: list[str] = []
    for qual, m in model.named_modules():
        if not m.training or not isinstance(m, _MODE_DEPENDENT):
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0:
            continue
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats:
            continue
        if isinstance(m, nn.MultiheadAttention) and m.dropout == 0:
            continue
        out.append(f"{qual or '(root)'} ({type(m).__name__})")
    return out


def check_eval_mode(model: nn.Module, *, name: str = "model") -> None:
    """Raise :class:`TrainingModeError` if a mode-dependent layer of ``model`` is training.

    The one policy of every bound method: upper bounds are computed on the eval-mode graph, and
    a training-mode forward pass (dropout, batch statistics) is another, random function, so a
    "lower bound" witnessed on it is no lower bound of the eval-mode function (a Dropout(0.5)
    net gave a witness 16,000x above the certified upper bound). The training penalties and
    constraints (:mod:`lipbound.train`) do not call this: they run during training by design.
    """
    bad = training_modules(model)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise TrainingModeError(
            f"{name} is in training mode: {len(bad)} layer(s) whose output depends on it "
            f"(dropout, batch statistics): {shown}. Bounds are computed for the eval-mode "
            f"function; call {name}.eval() first (and {name}.train() afterwards to resume "
            "training)."
        )


def unwrap_model(model: Any) -> Any:
    """The user's module inside ``torch.compile`` (``_orig_mod``) and ``DataParallel`` /
    ``DistributedDataParallel`` (``.module``) wrappers, any nesting; other objects unchanged.
    """
    for _ in range(16):
        inner = None
        if isinstance(model, nn.Module) and hasattr(model, "_orig_mod") and type(
                model).__name__ == "OptimizedModule":
            inner = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def check_model(model: Any, *, name: str = "model", require_eval: bool = False) -> nn.Module:
    """The module to analyse: ``model`` unwrapped, checked, or an error.

    Unwraps ``torch.compile`` / ``DataParallel`` / ``DistributedDataParallel`` (use the
    returned module: ``model = check_model(model)``), refuses non-modules, parameters or
    buffers on the meta device (no values) and NaN/inf values; with ``require_eval``, also
    training-mode layers (:func:`check_eval_mode`, the policy of every bound method).
    """
    model = unwrap_model(model)
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{name} must be a torch.nn.Module; got {type(model).__name__}. "
            "Wrap a plain function in an nn.Module whose forward calls it."
        )
    meta = [q for q, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if meta:
        shown = ", ".join(meta[:4]) + (f" and {len(meta) - 4} more" if len(meta) > 4 else "")
        raise InvalidArgumentError(
            f"{name} has {len(meta)} parameter(s)/buffer(s) on the meta device ({shown}): "
            "parameters on the meta device have no values: load weights first (e.g. "
            f"{name}.to_empty(device='cpu') then {name}.load_state_dict(state), or "
            "load_state_dict(state, assign=True))."
        )
    check_finite_module(model, name=name)
    if require_eval:
        check_eval_mode(model, name=name)
    return model
