"""A small seeded training loop for the demo and the benchmarks.

>>> from lipbound.zoo.models import paper_mlp
>>> from lipbound.zoo.data import synthetic_gp
>>> xtr, ytr, xte, yte = synthetic_gp(256, 64, seed=0)
>>> model = fit(paper_mlp(3), xtr, ytr, epochs=2)
>>> mse(model, xte, yte) >= 0
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_choice, check_positive

__all__ = ["accuracy", "fit", "mse"]


def fit(  # noqa: PLR0913 - the training loop's knobs, all keyword options with defaults
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: str = "mse",
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.0,
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
) -> nn.Module:
    """Train ``model`` with Adam on ``(x, y)``; returns it in eval mode.

    ``loss`` is ``"mse"`` (regression) or ``"ce"`` (classification, integer labels).
    ``regularizer(model)``, if given, is added to every mini-batch loss (e.g. a Lipschitz
    penalty from :mod:`lipbound.train`).
    """
    check_choice("loss", loss, ("mse", "ce"))
    check_positive("epochs", epochs, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("lr", lr)
    loss_fn = F.mse_loss if loss == "mse" else F.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    model.train()
    n = len(x)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            out = loss_fn(model(x[idx]), y[idx])
            if regularizer is not None:
                out = out + regularizer(model)
            out.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of correctly classified samples."""
    return float((model(x).argmax(-1) == y).float().mean())


@torch.no_grad()
def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error."""
    return float(F.mse_loss(model(x), y))
