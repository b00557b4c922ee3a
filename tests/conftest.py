"""Shared test configuration: seeds, threads, hypothesis profiles, per-dtype tolerances."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from torch import nn

torch.set_num_threads(int(os.environ.get("LIPBOUND_TEST_THREADS", "1")))

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# relative tolerances by dtype, for comparisons of estimates with exact values
RTOL = {torch.float64: 1e-7, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def rtol() -> dict[torch.dtype, float]:
    return RTOL


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.a(x))


@pytest.fixture
def residual_net() -> nn.Module:
    """``x + relu(a x)`` on R^2: a residual block, rejected by the sequential-only methods."""
    return _Residual()
