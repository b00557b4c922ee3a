"""One result vocabulary: the same field means the same thing in every result type."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import lipbound
from lipbound.results import (
    ExactResult,
    LipschitzResult,
    LowerBoundResult,
    SDPResult,
    SeqLipResult,
    Witness,
)

VOCABULARY = {"value", "certified", "method", "norm", "bound", "upper", "lower", "how",
              "witness", "layers", "seconds", "notes", "extra"}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1)).eval()


@pytest.mark.parametrize("cls", [LipschitzResult, LowerBoundResult, SeqLipResult, ExactResult,
                                 SDPResult])
def test_every_result_type_has_the_vocabulary_and_no_shadow(cls: type) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    assert VOCABULARY <= names
    # SDPResult.status (the solver's) shadowed the derived LipschitzResult.status
    assert isinstance(cls.status, property)


def test_upper_and_lower_mean_the_same_in_every_method() -> None:
    net = _net()
    res = {
        "autolip": lipbound.autolip(net, (2,)),
        "seqlip": lipbound.seqlip(net, (2,)),
        "lower": lipbound.lower_bound(net, (2,), restarts=4, steps=20),
        "exact": lipbound.exact(net, (2,)),
    }
    for name in ("autolip", "seqlip", "exact"):
        assert res[name].upper is not None and res[name].certified, name
    lo = res["lower"]
    assert lo.upper is None and lo.lower == lo.value
    assert isinstance(lo.witness, Witness) and lo.witness.kind in ("pair", "jacobian")
    ex = res["exact"]
    assert ex.bound == "exact" and ex.lower == ex.upper == ex.value
    assert isinstance(ex.witness, Witness) and ex.witness.kind == "region"
    assert ex.witness.x.shape == (2,)
    for name, r in res.items():
        assert r.lower is None or r.upper is None or r.lower <= r.upper * (1 + 1e-9), name
        d = r.to_dict()
        assert {"value", "upper", "lower", "how", "status", "witness"} <= set(d), name


def test_regression_sdp_status_is_the_derived_status() -> None:
    """``bound(..., methods=('lower', 'lipsdp'))`` showed lipsdp's status as the solver's
    "optimal"; the solver's word is ``solver_status`` now."""
    r = lipbound.lipsdp(_net(), (2,))
    assert r.status == "certified upper bound" and r.solver_status
    with pytest.warns(DeprecationWarning, match="certified"):
        assert r.verified is True


def test_old_names_warn_and_still_work() -> None:
    net = _net()
    s = lipbound.seqlip(net, (2,))
    with pytest.warns(DeprecationWarning, match="upper"):
        assert s.certified_upper == s.upper
    lo = lipbound.lower_bound(net, (2,), restarts=2, steps=10)
    with pytest.warns(DeprecationWarning, match="witness.x"):
        assert lo.x is lo.witness.x


def test_certified_upper_value_fills_upper() -> None:
    r = LipschitzResult(value=2.0, certified=True, method="m", bound="upper")
    assert r.upper == 2.0 and r.lower is None
    e = LipschitzResult(value=2.0, certified=True, method="m", bound="exact")
    assert e.upper == e.lower == 2.0
    u = LipschitzResult(value=2.0, certified=False, method="m", bound="estimate")
    assert u.upper is None and u.lower is None
