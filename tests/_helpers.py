"""Helpers shared by several test files (importable as ``_helpers``: ``pythonpath`` in
``pyproject.toml``). References here must not use the code they check."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def mlp(
    sizes: list[int], *, seed: int, act: Callable[[], nn.Module] = nn.ReLU,
    dtype: torch.dtype = torch.float64, leaky: float | None = None,
) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) -> act() -> ... -> Linear`` with torch's default init after
    ``torch.manual_seed(seed)``, in ``dtype``, eval mode; ``leaky``: ``LeakyReLU(leaky)``."""
    if leaky is not None:
        act = functools.partial(nn.LeakyReLU, leaky)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype).eval()


def linear_params(net: nn.Module) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    """The chain of a (ReLU / leaky-ReLU) MLP read off its modules in order, in float64:
    weights, biases and each activation's negative slope."""
    Ws, bs, negs = [], [], []
    for m in net.modules():
        if isinstance(m, nn.Linear):
            Ws.append(m.weight.detach().double().numpy())
            bs.append(m.bias.detach().double().numpy())
        elif isinstance(m, nn.LeakyReLU):
            negs.append(float(m.negative_slope))
        elif isinstance(m, nn.ReLU):
            negs.append(0.0)
    return Ws, bs, negs


def opnorm(J: np.ndarray, norm: str) -> float:
    """Operator norm of a dense matrix for the vector norm ``norm`` ("2", "inf" or "1")."""
    if norm == "2":
        return float(np.linalg.svd(J, compute_uv=False)[0])
    if norm == "inf":
        return float(np.abs(J).sum(axis=1).max())
    return float(np.abs(J).sum(axis=0).max())


class ResMLP(nn.Module):
    """``x -> head(stem(x) + B_1(.) + ... B_k(.))``, residual blocks ``B_i = W_2 act(W_1 .)``
    (``act`` ReLU by default), a Linear stem and a Linear-Tanh-Linear head."""

    def __init__(self, d: int = 3, width: int = 6, blocks: int = 2, act: type = nn.ReLU) -> None:
        super().__init__()
        self.stem = nn.Linear(d, width)
        self.act = act()
        self.inner = nn.ModuleList(nn.Linear(width, width) for _ in range(2 * blocks))
        self.head = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(0, len(self.inner), 2):
            x = x + self.inner[i + 1](self.act(self.inner[i](x)))
        return self.head(x)
