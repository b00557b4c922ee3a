"""Tests of lipbound.report: bound() and the Report it returns."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from torch import nn

from lipbound import report as rep_mod
from lipbound.errors import (
    InvalidArgumentError,
    NonFiniteError,
    ShapeError,
    UnsupportedModelError,
    UnsupportedNode,
)
from lipbound.report import REPORT_SCHEMA, Report, bound, plot_report
from lipbound.results import LayerBound, LipschitzResult

FAST_LOWER = {"restarts": 4, "steps": 30}


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 1)).eval()


def _fake(value: float, *, certified: bool = True, bound: str = "upper", upper: float | None = None,
          layers: int = 2, name: str = "fake") -> Any:
    def method(model: nn.Module, input_shape: tuple[int, ...], **kw: Any) -> LipschitzResult:
        rows = tuple(
            LayerBound(name=f"l{i}", op="Linear", value=1.0 + i, certified=certified)
            for i in range(layers)
        )
        return LipschitzResult(value=value, certified=certified, method=name, bound=bound,  # type: ignore[arg-type]
                               upper=upper, layers=rows, extra={"kw": kw})

    return method


def _unsupported(model: nn.Module, input_shape: tuple[int, ...], **kw: Any) -> LipschitzResult:
    raise UnsupportedModelError([UnsupportedNode("mul", "mul", "product of two tensors")])


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Fakes in place of the upper-bound methods (the report's logic is under test): a copy of
    the method table, patched in for the test and restored afterwards."""
    table = dict(rep_mod.METHODS)
    monkeypatch.setattr(rep_mod, "METHODS", table)
    return table


def _validate(r: Report) -> dict[str, Any]:
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    jsonschema.validate(d, REPORT_SCHEMA)
    return d


def test_best_bounds_are_min_of_certified_uppers_and_max_of_lowers(fakes: dict[str, Any]) -> None:
    fakes["autolip"] = _fake(40.0)
    fakes["seqlip"] = _fake(10.0, certified=False, bound="estimate", upper=25.0)  # greedy + cert
    fakes["lipsdp"] = _fake(5.0, certified=False, bound="upper")  # uncertified: ignored
    r = bound(_net(), (2,), methods=("lower", "autolip", "seqlip", "lipsdp"),
                 lower=FAST_LOWER)
    assert r.upper == 25.0 and r.upper_method == "seqlip"
    assert r.lower == r["lower"].value and r.lower_method == "lower"
    assert r.ratio == pytest.approx(25.0 / r.lower)
    assert [run.name for run in r.runs] == ["lower", "autolip", "seqlip", "lipsdp"]
    assert all(run.seconds >= 0 for run in r.runs)
    d = _validate(r)
    assert d["upper"] == 25.0 and d["methods"][2]["upper"] == 25.0
    assert d["methods"][3]["upper"] is None
    assert len(d["methods"][1]["layers"]) == 2


def test_norm_and_options_are_passed(fakes: dict[str, Any]) -> None:
    fakes["autolip"] = _fake(3.0)
    r = bound(_net(), (2,), methods=("autolip",), norm=float("inf"), autolip={"foo": 1})
    assert r["autolip"].extra["kw"] == {"norm": "inf", "foo": 1}
    assert r.norm == "inf" and r.lower is None and r.ratio is None


def test_unsupported_method_is_recorded_when_another_upper_works(fakes: dict[str, Any]) -> None:
    fakes["autolip"] = _fake(7.0)
    fakes["seqlip"] = _unsupported
    r = bound(_net(), (2,), methods=("autolip", "seqlip"))
    assert r.upper == 7.0
    (failed,) = [run for run in r.runs if not run.ok]
    assert failed.name == "seqlip" and failed.error_type == "UnsupportedModelError"
    assert "mul" in (failed.error or "")
    assert any("seqlip failed" in n for n in r.notes)
    assert "failed" in repr(r)
    _validate(r)


def test_all_upper_methods_unsupported_raises(fakes: dict[str, Any]) -> None:
    fakes["autolip"] = _unsupported
    fakes["seqlip"] = _unsupported
    with pytest.raises(UnsupportedModelError):  # no lower bound either: the refusal is raised
        bound(_net(), (2,), methods=("autolip", "seqlip"))
    # with a finished lower bound, the report keeps it (engineer G: it used to be discarded)
    r = bound(_net(), (2,), methods=("lower", "autolip", "seqlip"), lower=FAST_LOWER)
    assert r.upper is None and r.lower is not None and r.lower > 0
    assert any("no certified upper bound" in n for n in r.notes)


def test_inconsistent_bounds_are_flagged(fakes: dict[str, Any]) -> None:
    fakes["autolip"] = _fake(1e-6)  # a (fake) wrong certificate below the witness
    r = bound(_net(), (2,), methods=("lower", "autolip"), lower=FAST_LOWER)
    assert any("INCONSISTENT" in n for n in r.notes)


def test_rendering(fakes: dict[str, Any]) -> None:
    fakes["autolip"] = _fake(12.5, layers=3)
    r = bound(_net(), (2,), methods=("lower", "autolip"), lower=FAST_LOWER, model_name="toy")
    text = repr(r)
    for word in ("certified upper bound", "witnessed lower bound", "gap", "autolip", "lower",
                 "per-layer breakdown (autolip)", "toy", "l2 norm"):
        assert word in text
    md = r.to_markdown()
    assert md.startswith("## Lipschitz report of toy")
    assert "| method | value | status |" in md
    assert "### Per-layer breakdown: autolip" in md
    # every table row has as many cells as its header
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            n = lines[0].count("|")
            assert all(ln.replace("\\|", "").count("|") == n for ln in lines)


def test_plot_writes_png(fakes: dict[str, Any], tmp_path: Path) -> None:
    fakes["autolip"] = _fake(12.5, layers=3)
    fakes["seqlip"] = _fake(6.0, layers=2)
    r = bound(_net(), (2,), methods=("lower", "autolip", "seqlip"), lower=FAST_LOWER)
    out = tmp_path / "p.png"
    plot_report(r, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_witness_left_out_when_large() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(2048, 1))
    r = bound(net, (2048,), methods=("lower",), lower={"restarts": 1, "steps": 2})
    d = _validate(r)
    assert d["methods"][0]["witness"] is None
    r2 = bound(_net(), (2,), methods=("lower",), lower=FAST_LOWER)
    assert len(_validate(r2)["methods"][0]["witness"]["x"]) == 2


def test_lower_with_data_and_exact_constant() -> None:
    net = _net()
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    r = bound(net, (2,), methods=("lower", "exact"), data=data, lower=FAST_LOWER)
    ex = r["exact"]
    assert r.upper is not None and r.lower is not None
    assert r.lower <= r.upper * (1 + 1e-9)
    if ex.bound == "exact":
        assert r.ratio is not None and r.ratio < 1.1
    assert "data" in r["lower"].extra["per_method"]


def test_real_upper_methods_above_lower() -> None:
    net = _net()
    methods = ["lower", "autolip", "seqlip"]
    r = bound(net, (2,), methods=methods, lower=FAST_LOWER)
    assert r.upper is not None and r.lower is not None
    assert r.lower <= r.upper * (1 + 1e-9)
    assert r.ratio is not None and r.ratio >= 1 - 1e-9
    _validate(r)


def test_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net()
    with pytest.raises(InvalidArgumentError, match="lower, autolip, seqlip, exact, lipsdp"):
        bound(net, (2,), methods=("lower", "magic"))
    with pytest.raises(InvalidArgumentError):
        bound(net, (2,), methods=())
    with pytest.raises(InvalidArgumentError, match="not in methods"):
        bound(net, (2,), methods=("lower",), autolip={"x": 1})
    with pytest.raises(InvalidArgumentError, match="per-method options"):
        bound(net, (2,), methods=("lower",), restarts=3)  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        bound(net, (3,), methods=("lower",))
    bad = _net()
    with torch.no_grad():
        bad[0].weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError):
        bound(bad, (2,), methods=("lower",))
    with pytest.raises(InvalidArgumentError, match=r"does not accept option.*no_such_option"):
        bound(net, (2,), methods=("lower",), lower={"no_such_option": 1})


@pytest.mark.parametrize("name", sorted(rep_mod.METHODS))
def test_takes_table_matches_the_signatures(name: str) -> None:
    """estimate passes norm / progress / time_limit to the methods that take them (TAKES, no
    signature probing at run time); the table must say what the signatures say."""
    import inspect

    params = inspect.signature(rep_mod.METHODS[name]).parameters
    assert rep_mod.TAKES[name] == {o for o in ("norm", "progress", "time_limit") if o in params}


def test_public_names_and_frozen_report() -> None:
    import dataclasses

    import lipbound

    assert lipbound.bound is bound and lipbound.Report is Report
    with pytest.warns(DeprecationWarning, match="lipbound.bound"):
        old = lipbound.estimate(_net(), 2, methods="lower", lower=FAST_LOWER)
    assert isinstance(old, Report)
    r = lipbound.bound(_net(), 2, methods="lower", lower=FAST_LOWER)
    assert isinstance(r, Report) and r.input_shape == (2,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.upper = 1.0  # type: ignore[misc]
    with pytest.raises(KeyError, match="autolip"):
        r["autolip"]
