"""Hard Lipschitz constraint on Linear/Conv layers, as a ``torch.nn.utils.parametrize``
parametrisation of the weight.

``W_eff = W * min(1, max_norm / sigma_hat(W))`` where ``sigma_hat`` is

* in TRAINING mode: the power-iteration estimate ``||A_W v|| / ||v||`` of the layer's TRUE
  operator norm (the convolution with its stride/padding on the given input shape, not the
  reshaped kernel), with ``v`` kept in a buffer, warm-started and updated by
  ``n_power_iterations`` steps at every forward (like torch's ``spectral_norm``), times a
  calibration factor ``calibration >= 1`` refreshed every ``certify_every`` training forwards
  (``calibration = certified(W) / estimate(W)`` at that moment). Gradients flow through the
  estimate. This is NOT a certificate: power iteration approaches the norm from below, so
  between certifications the true norm may exceed ``max_norm`` slightly.
* in EVAL mode: a CERTIFIED upper bound ``c(W) >= ||A_W||_2`` (float64 SVD of ``W`` for Linear,
  dense SVD or the Fourier polyphase bound for convolutions, see
  :func:`lipbound.train._power.certified_layer_norm`), multiplied by ``1 + 8 eps(dtype)`` to absorb
  the rounding of ``W * factor`` in the weight's dtype; cached per weight version. Hence
  ``||A_{W_eff}||_2 = ||A_W||_2 min(1, max_norm / c'(W)) <= max_norm``: the constraint is
  certified whenever the model is used in eval mode, and for the weight kept by
  :func:`remove_lipschitz_constraint` (which removes the parametrisation in eval mode).
  The power-iteration vectors are not updated in eval mode.

A module called on several input shapes (a reused conv) gets one vector per shape; ``sigma_hat``
is the max over them, and so is the certificate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._validation import check_input_shape, check_model, check_positive
from ..errors import InvalidArgumentError
from ._power import (
    LayerSpec,
    certified_layer_norm,
    is_layer,
    power_update,
    random_unit,
    sigma_of,
    spec_of,
)

__all__ = ["LipschitzConstraint", "lipschitz_constraint", "remove_lipschitz_constraint"]


class LipschitzConstraint(nn.Module):
    """The parametrisation ``W -> W * min(1, max_norm / sigma_hat(W))`` (see module doc).

    Buffers: ``v0, v1, ...`` (one power-iteration vector per input shape), ``calibration``
    (scalar >= 1), ``steps`` (training forwards seen).
    """

    def __init__(
        self,
        spec: LayerSpec,
        in_shapes: list[tuple[int, ...]],
        weight: torch.Tensor,
        *,
        max_norm: float,
        n_power_iterations: int,
        init_iterations: int,
        eps: float,
        certify_every: int,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.in_shapes = [tuple(s) for s in in_shapes]
        self.max_norm = float(max_norm)
        self.n_power_iterations = int(n_power_iterations)
        self.eps = float(eps)
        self.certify_every = int(certify_every)
        w = weight.detach()
        for i, s in enumerate(self.in_shapes):
            self.register_buffer(f"v{i}", random_unit(s, dtype=w.dtype, device=w.device))
        self.register_buffer("calibration", torch.ones((), dtype=w.dtype, device=w.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=w.device))
        self._cache: tuple[Any, float] | None = None
        if init_iterations:
            self._power(w, int(init_iterations))

    def _vecs(self, w: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i in range(len(self.in_shapes)):
            v = self._buffers[f"v{i}"]
            if v is None:  # pragma: no cover
                raise InvalidArgumentError(f"missing buffer v{i}")
            if v.device != w.device or v.dtype != w.dtype:
                v = v.to(device=w.device, dtype=w.dtype)
                self._buffers[f"v{i}"] = v
            out.append(v)
        return out

    @torch.no_grad()
    def _power(self, w: torch.Tensor, n: int) -> None:
        fn = self.spec.map(w.detach())
        for v in self._vecs(w):
            v.copy_(power_update(fn, v, n, self.eps))

    def estimate(self, w: torch.Tensor) -> torch.Tensor:
        """Differentiable power-iteration estimate of ``||A_w||`` (max over input shapes)."""
        fn = self.spec.map(w)
        sig = [sigma_of(fn, v) for v in self._vecs(w)]
        return sig[0] if len(sig) == 1 else torch.stack(sig).max()

    @torch.no_grad()
    def certified(self, w: torch.Tensor) -> float:
        """Certified upper bound on ``||A_w||_2`` (max over input shapes)."""
        return max(certified_layer_norm(self.spec, s, w)[0] for s in self.in_shapes)

    def _certified_cached(self, w: torch.Tensor) -> float:
        key = (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        c = self.certified(w)
        self._cache = (key, c)
        return c

    def _buf(self, name: str) -> torch.Tensor:
        t = self._buffers[name]
        if t is None:  # pragma: no cover - registered in __init__
            raise InvalidArgumentError(f"missing buffer {name}")
        return t

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.n_power_iterations:
                self._power(w, self.n_power_iterations)
            steps, calib = self._buf("steps"), self._buf("calibration")
            with torch.no_grad():
                steps.add_(1)
            sig = self.estimate(w)
            if self.certify_every and int(steps) % self.certify_every == 0:
                with torch.no_grad():
                    ratio = self.certified(w) / max(float(sig), self.eps)
                    calib.fill_(max(1.0, ratio))
            sig_hat = sig * calib.to(sig.dtype)
        else:
            c = self._certified_cached(w) * (1.0 + 8.0 * torch.finfo(w.dtype).eps)
            sig = self.estimate(w)
            # value: the certificate; gradient: that of the estimate (scaled to match)
            sig_hat = sig * (c / sig.clamp_min(self.eps)).detach()
        factor = torch.clamp(self.max_norm / sig_hat.clamp_min(self.eps), max=1.0)
        return w * factor

    def extra_repr(self) -> str:
        return (
            f"max_norm={self.max_norm}, in_shapes={self.in_shapes}, "
            f"n_power_iterations={self.n_power_iterations}, certify_every={self.certify_every}"
        )


def _find_shapes(
    model: nn.Module, input_shape: tuple[int, ...]
) -> dict[int, list[tuple[int, ...]]]:
    from ._structure import build_plan

    plan = build_plan(model, input_shape, "auto")
    out: dict[int, list[tuple[int, ...]]] = {}
    for c in plan.calls:
        m = model.get_submodule(c.path)
        lst = out.setdefault(id(m), [])
        if c.in_shape not in lst:
            lst.append(c.in_shape)
    return out


def _plist(module: nn.Module, name: str) -> list[nn.Module]:
    """The parametrisations registered on ``module.<name>``."""
    container: Any = module.parametrizations
    return list(container[name])


def _constrain_one(
    module: nn.Module,
    in_shapes: list[tuple[int, ...]],
    *,
    max_norm: float,
    n_power_iterations: int,
    init_iterations: int,
    eps: float,
    certify_every: int,
    name: str,
) -> nn.Module:
    if parametrize.is_parametrized(module, name) and any(
        isinstance(p, LipschitzConstraint) for p in _plist(module, name)
    ):
        raise InvalidArgumentError(
            f"{type(module).__name__}.{name} already has a Lipschitz constraint; remove it first "
            "with remove_lipschitz_constraint"
        )
    weight = getattr(module, name)
    p = LipschitzConstraint(
        spec_of(module), in_shapes, weight, max_norm=max_norm,
        n_power_iterations=n_power_iterations, init_iterations=init_iterations, eps=eps,
        certify_every=certify_every,
    )
    parametrize.register_parametrization(module, name, p)
    return module


def lipschitz_constraint(
    module: nn.Module,
    input_shape: Any = None,
    *,
    max_norm: float = 1.0,
    n_power_iterations: int = 1,
    init_iterations: int = 15,
    eps: float = 1e-12,
    certify_every: int = 0,
    name: str = "weight",
) -> nn.Module:
    """Constrain the true operator norm of a layer (or of every layer of a model) to ``max_norm``.

    ``module`` is a Linear/Conv1d/2d/3d layer, or any model: then every Linear/Conv layer it
    calls (found like the penalties find them: graph, Sequential parser or hooks) is constrained,
    each with ``max_norm``, using the per-sample input shape(s) the layer sees. ``input_shape`` is
    the per-sample input shape of the LAYER (optional for Linear: ``(in_features,)``) or of the
    MODEL. ``certify_every=k > 0`` recalibrates the training-mode estimate with a certificate
    every ``k`` training forwards (see module doc). Returns ``module``.

    In eval mode the layer's operator norm is certified to be ``<= max_norm`` (up to the
    rounding of the weight's dtype); in training mode it is an estimate, as with torch's
    ``spectral_norm``.

    >>> conv = lipschitz_constraint(nn.Conv2d(1, 4, 3, stride=2, padding=1), (1, 8, 8),
    ...                             max_norm=0.5)
    >>> _ = conv.eval()
    >>> from lipbound.train._power import certified_layer_norm
    >>> certified_layer_norm(conv, (1, 8, 8))[0] <= 0.5 * (1 + 1e-6)
    True
    """
    check_model(module, name="module")
    check_positive("max_norm", max_norm)
    check_positive("n_power_iterations", n_power_iterations, integer=True, allow_zero=True)
    check_positive("init_iterations", init_iterations, integer=True, allow_zero=True)
    check_positive("eps", eps)
    check_positive("certify_every", certify_every, integer=True, allow_zero=True)
    opts = dict(max_norm=float(max_norm), n_power_iterations=int(n_power_iterations),
                init_iterations=int(init_iterations), eps=float(eps),
                certify_every=int(certify_every), name=name)
    if is_layer(module):
        if input_shape is None:
            if not isinstance(module, nn.Linear):
                raise InvalidArgumentError(
                    f"input_shape is required for {type(module).__name__}: the norm of a "
                    "convolution depends on the input size (give one sample's shape, e.g. "
                    "(3, 32, 32))"
                )
            shapes: list[tuple[int, ...]] = [(int(module.in_features),)]
        else:
            shapes = [check_input_shape(input_shape)]
        return _constrain_one(module, shapes, **opts)  # type: ignore[arg-type]
    if name != "weight":
        raise InvalidArgumentError("name must be 'weight' when constraining a whole model")
    if input_shape is None:
        raise InvalidArgumentError("input_shape (one sample of the MODEL's input) is required")
    shape = check_input_shape(input_shape)
    found = _find_shapes(module, shape)
    for m in module.modules():
        if id(m) in found:
            _constrain_one(m, found[id(m)], **opts)  # type: ignore[arg-type]
    return module


def remove_lipschitz_constraint(module: nn.Module, name: str = "weight") -> nn.Module:
    """Remove the constraint(s), KEEPING the constrained weight (like
    ``remove_parametrizations(..., leave_parametrized=True)``).

    The kept weight is computed in eval mode, i.e. with the certified rescaling, so the layer's
    operator norm stays certified ``<= max_norm``. On a model, removes every Lipschitz constraint
    of its layers. Other parametrisations of the same tensor are not supported (raise).

    >>> lin = lipschitz_constraint(nn.Linear(4, 4), max_norm=0.1)
    >>> lin = remove_lipschitz_constraint(lin)
    >>> float(torch.linalg.matrix_norm(lin.weight.detach().double(), 2)) <= 0.1 * (1 + 1e-6)
    True
    """
    check_model(module, name="module")
    targets: list[nn.Module]
    if parametrize.is_parametrized(module, name):
        targets = [module]
    else:
        targets = [
            m for m in module.modules()
            if parametrize.is_parametrized(m, "weight")
            and any(isinstance(p, LipschitzConstraint) for p in _plist(m, "weight"))
        ]
        name = "weight"
        if not targets:
            raise InvalidArgumentError(
                f"{type(module).__name__} has no Lipschitz constraint on {name!r} to remove"
            )
    for m in targets:
        plist = _plist(m, name)
        if len(plist) != 1 or not isinstance(plist[0], LipschitzConstraint):
            raise InvalidArgumentError(
                f"{type(m).__name__}.{name} has other parametrisations; remove them first"
            )
        was = plist[0].training
        plist[0].eval()
        with torch.no_grad():
            parametrize.remove_parametrizations(m, name, leave_parametrized=True)
        del was
    return module
