"""Tiny model factories for the CLI tests (``PYTHONPATH=tests``, ``test_cli_factories:NAME``).

No tests here; the module is imported by ``lipbound estimate test_cli_factories:tiny_mlp``.
"""

from __future__ import annotations

import torch
from torch import nn


def tiny_mlp() -> nn.Module:
    """2-6-1 ReLU MLP (random weights; the CLI tests load saved weights into it)."""
    return nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1))


def wide_mlp() -> nn.Module:
    """2-7-1: same layout as tiny_mlp, different width (weights do not fit it)."""
    return nn.Sequential(nn.Linear(2, 7), nn.ReLU(), nn.Linear(7, 1))


class Square(nn.Module):
    """f(x) = lin(x) * lin(x): a product of two activations, which has no global Lipschitz rule."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h * h


def square() -> nn.Module:
    return Square()


def not_a_module() -> int:
    return 3
