"""The shared input checks name the bad value and the allowed ones."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipbound import _validation as v
from lipbound.errors import InvalidArgumentError, LipboundError, NonFiniteError, ShapeError


@pytest.mark.parametrize("bad", [(), [], "3,4", (3, 0), (3, -1), (2.5,), (True,), None])
def test_bad_shapes_raise_shape_error(bad: object) -> None:
    with pytest.raises(ShapeError):
        v.check_input_shape(bad)


def test_good_shapes() -> None:
    assert v.check_input_shape(torch.Size([1, 2])) == (1, 2)
    assert v.check_input_shape(7) == (7,)


@pytest.mark.parametrize(
    ("norm", "expected"), [(2, "2"), (1, "1"), (math.inf, "inf"), ("l2", "2"), ("linf", "inf")]
)
def test_norm_spellings(norm: object, expected: str) -> None:
    assert v.normalize_norm(norm) == expected


@pytest.mark.parametrize("bad", [3, 0, "fro", -math.inf, True, None])
def test_bad_norms_name_the_allowed_ones(bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="one of 1, 2"):
        v.normalize_norm(bad)


def test_check_norm_restricts_per_method() -> None:
    with pytest.raises(InvalidArgumentError, match="seqlip"):
        v.check_norm(1, allowed=("2",), method="seqlip")


def test_non_finite_weights_are_named() -> None:
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        m[1].bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"1\.bias"):
        v.check_model(m)
    with pytest.raises(InvalidArgumentError, match=r"nn\.Module"):
        v.check_model(lambda x: x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "both"])
def test_non_finite_entries_are_found_in_large_weights(bad: object) -> None:
    m = nn.Linear(300, 200)
    with torch.no_grad():
        if bad == "both":  # +inf and -inf: a sum gives NaN, still caught
            m.weight[3, 7] = float("inf")
            m.weight[150, 299] = float("-inf")
        else:
            m.weight[150, 299] = bad
    with pytest.raises(NonFiniteError, match="weight"):
        v.check_model(m)


def test_finite_weights_whose_sum_overflows_are_accepted() -> None:
    # the sum of these float32 entries overflows to inf: the fast path must fall back to the
    # entry-wise check and accept them
    m = nn.Linear(100, 100, bias=False)
    with torch.no_grad():
        m.weight.fill_(3e38)
    assert not torch.isfinite(m.weight.sum())
    assert v.check_model(m) is m


def test_every_error_is_in_the_family() -> None:
    for exc in (ShapeError, InvalidArgumentError, NonFiniteError):
        assert issubclass(exc, LipboundError)
    with pytest.raises(InvalidArgumentError):
        v.check_choice("mode", "fast", ("exact", "greedy"))
    with pytest.raises(InvalidArgumentError):
        v.check_positive("tol", 0.0)


@pytest.mark.parametrize("bad", [7, 29, 20.0, True, "20", None])
def test_check_int_range_names_value_and_range(bad):
    with pytest.raises(InvalidArgumentError, match=r"box must be an int in \[8, 28\]; got"):
        v.check_int_range("box", bad, 8, 28)
    assert v.check_int_range("box", 8, 8, 28) == 8 and v.check_int_range("box", 28, 8, 28) == 28
