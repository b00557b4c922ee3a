"""lipbound.Analysis: one capture per model, shared by every method (issue #15).

Closed forms first (the same numbers through an analysis as through the model), then the
contract (staleness, shapes, laziness), then regressions named after what they pin.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import lipbound
import lipbound.analysis as analysis_mod
from lipbound.analysis import Analysis, analysis_of, clear_cache
from lipbound.errors import InvalidArgumentError, TrainingModeError


def _mlp(seed: int = 0, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), act(), nn.Linear(6, 5), act(), nn.Linear(5, 2)).eval()


@pytest.fixture
def captures(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Every capture the analyses run (their input shapes)."""
    seen: list[tuple[int, ...]] = []
    real = analysis_mod.capture

    def spy(model: nn.Module, shape: Any, *a: Any, **kw: Any) -> Any:
        seen.append(tuple(shape))
        return real(model, shape, *a, **kw)

    monkeypatch.setattr(analysis_mod, "capture", spy)
    clear_cache()
    yield seen
    clear_cache()


def test_methods_give_the_same_numbers_through_an_analysis() -> None:
    net = _mlp(1)
    an = Analysis(net, (3,))
    for fn, kw in ((lipbound.autolip, {}), (lipbound.seqlip, {}), (lipbound.exact, {}),
                   (lipbound.lipsdp, {}),
                   (lipbound.lower_bound, {"seed": 3, "time_limit": None})):
        clear_cache()
        direct = fn(net, (3,), **kw)
        via = fn(an, **kw)
        assert via.value == pytest.approx(direct.value, rel=1e-12), fn.__name__
        assert via.certified == direct.certified, fn.__name__


def test_dense_chain_matches_the_weights() -> None:
    net = _mlp(2)
    Ws, bs, acts, names = Analysis(net, (3,)).dense_chain()
    assert [w.shape for w in Ws] == [(6, 3), (5, 6), (2, 5)]
    for W, b, layer in zip(Ws, bs, (net[0], net[2], net[4])):
        assert torch.equal(torch.from_numpy(W), layer.weight.detach().double())
        assert torch.equal(torch.from_numpy(b), layer.bias.detach().double())
    assert len(acts) == 2 and len(names) == 3


def test_constants_are_kept_per_options_on_one_graph() -> None:
    an = Analysis(_mlp(3), (3,))
    a = lipbound.autolip(an)
    b = lipbound.autolip(an, tol=1e-5)
    c = lipbound.autolip(an, norm="inf")
    assert a.extra["graph"] is b.extra["graph"] is c.extra["graph"] is an.graph
    assert not a.extra["reused"] and not b.extra["reused"] and not c.extra["reused"]
    assert lipbound.autolip(an, tol=1e-5).extra["reused"]
    assert an.has_constants(norm=2) and an.has_constants(norm="inf")


def test_a_changed_model_makes_its_analysis_stale() -> None:
    net = _mlp(4)
    an = Analysis(net, (3,))
    lipbound.autolip(an)
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    assert not an.is_current()
    with pytest.raises(InvalidArgumentError, match="changed since this Analysis was built"):
        lipbound.autolip(an)
    # a module goes through the cache, which recomputes for the changed model
    assert lipbound.autolip(net, (3,)).value > 0


def test_shape_arguments_of_an_analysis() -> None:
    an = Analysis(_mlp(5), (3,))
    assert lipbound.autolip(an, (3,)).certified
    with pytest.raises(InvalidArgumentError, match=r"differs from the Analysis's \(3,\)"):
        lipbound.autolip(an, (4,))
    with pytest.raises(InvalidArgumentError, match="input_shape is missing"):
        analysis_of(_mlp(5))


def test_analysis_checks_the_model_at_once() -> None:
    with pytest.raises(TrainingModeError):
        Analysis(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train(), (3,))
    with pytest.raises(InvalidArgumentError, match=r"must be a torch\.nn\.Module"):
        Analysis(lambda x: x, (3,))  # type: ignore[arg-type]


def test_lower_bound_alone_never_captures(captures: list[tuple[int, ...]]) -> None:
    an = Analysis(_mlp(7), (3,))
    lipbound.lower_bound(an, seed=0, time_limit=None)
    assert captures == []


def test_regression_bound_captured_the_model_in_every_method(
    captures: list[tuple[int, ...]],
) -> None:
    """Before the Analysis, ``bound`` with these five methods captured the model four times
    (autolip and seqlip shared a cache, exact and lipsdp captured their own float64 copy
    each, and lipsdp once more for its chain sizes); now once for the graph and once for the
    float64 chain that exact and lipsdp share."""
    rep = lipbound.bound(_mlp(8), (3,), methods=("lower", "autolip", "seqlip", "exact", "lipsdp"))
    assert all(r.ok for r in rep.runs), [r.error for r in rep.runs]
    assert captures == [(3,), (3,)]


def test_regression_options_change_recaptured_the_model(
    captures: list[tuple[int, ...]],
) -> None:
    """The old cache was keyed by the options too: a second call with another ``tol`` threw
    the graph away and captured the model again."""
    net = _mlp(9)
    lipbound.autolip(net, (3,))
    lipbound.autolip(net, (3,), tol=1e-4)
    lipbound.seqlip(net, (3,))
    assert captures == [(3,)]


def test_regression_sequential_structure_had_its_own_slope_table() -> None:
    """``structure="sequential"`` of the penalties read slopes from a private table of seven
    activation types, so a GELU chain (a rule with a slope range) was refused there."""
    net = _mlp(10, nn.GELU).train()
    pen = lipbound.LipschitzPenalty(net, (3,), structure="sequential")
    assert pen.plan.source == "sequential"
    assert torch.isfinite(pen().detach())


def test_regression_capture_left_tensor_constants_on_the_model() -> None:
    """torch.fx stores the tensor constants a forward creates (``w[:, 0]`` of a buffer) on the
    traced root, the user's model: capture left ``_tensor_constant0`` there, so the model's
    fingerprint changed and ``lipsdp`` (which reads its Analysis twice) refused it as stale."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randn(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x @ self.w[:, :2] + self.w[0, :2])

    net = Net().eval()
    before = set(vars(net))
    an = Analysis(net, (4,))
    lipbound.autolip(an)
    assert set(vars(net)) == before and an.is_current()
    assert lipbound.lipsdp(an).upper is not None


def test_local_methods_give_the_same_numbers_through_an_analysis() -> None:
    net = _mlp(10)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(1)
    an = Analysis(net, (3,))
    for norm in (2, "inf"):
        clear_cache()
        direct = lipbound.local_bound(net, x, 0.05, norm=norm, lower=False)
        via = lipbound.local_bound(an, x, 0.05, norm=norm, lower=False)
        assert via.upper == direct.upper
        clear_cache()
        c_direct = lipbound.certify(net, x, y, 0.05, norm=norm)
        c_via = lipbound.certify(an, x, y, 0.05, norm=norm)
        assert (c_via.robust, c_via.constant) == (c_direct.robust, c_direct.constant)
    assert an.has_constants(norm=2) and an.has_constants(norm="inf")  # autolip's, shared


def test_local_methods_reuse_the_analysis(captures: list[tuple[int, ...]]) -> None:
    """local_bound and certify capture nothing given an analysis, and a module's second call
    reuses the first's analysis (graph and AutoLip constants) as every global method does."""
    net = _mlp(11)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    an = Analysis(net, (3,))
    lipbound.local_bound(an, x, 0.1, lower=False)
    lipbound.certify(an, x, torch.tensor([0, 1]), 0.1)
    assert captures == [(3,)]  # the analysis's own, once
    lipbound.local_bound(net, x, 0.1, lower=False)
    lipbound.certify(net, x, torch.tensor([0, 1]), 0.1)
    lipbound.autolip(net, (3,))
    assert captures == [(3,), (3,)]


def test_local_methods_refuse_a_stale_or_misshapen_analysis() -> None:
    net = _mlp(12)
    an = Analysis(net, (3,))
    with pytest.raises(InvalidArgumentError, match=r"input_shape \(4,\) differs"):
        lipbound.local_bound(an, torch.zeros(1, 4), 0.1)
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    with pytest.raises(InvalidArgumentError, match="changed since this Analysis was built"):
        lipbound.certify(an, torch.zeros(1, 3), torch.tensor([0]), 0.1)
