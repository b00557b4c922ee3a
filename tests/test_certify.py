"""certify: brute force on linear models, ties, misclassified points, soundness, CLI."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lipbound
from lipbound.cli import main
from lipbound.errors import LipboundError

torch.set_num_threads(1)
F64 = torch.float64


def _brute_linear(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str
                  ) -> list[bool]:
    """Exact answer for an affine model: the minimum of f_y - f_j over the ball is
    margin_j - eps ||W^T (e_y - e_j)||_* (attained), so certified iff it is > 0 for all j."""
    W, b = lin.weight.detach().double(), lin.bias.detach().double()
    out = x.double() @ W.T + b
    res = []
    for i in range(x.shape[0]):
        ok = True
        for j in range(W.shape[0]):
            if j == int(y[i]):
                continue
            w = W[int(y[i])] - W[j]
            dual = float(w.norm()) if norm == "2" else float(w.abs().sum())
            ok = ok and float(out[i, y[i]] - out[i, j]) - eps * dual > 0
        res.append(ok)
    return res


@pytest.mark.parametrize("norm", ["2", "inf"])
@pytest.mark.parametrize("method", ["local", "global"])
def test_linear_model_agrees_with_brute_force(norm: str, method: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4).eval()
    x = torch.randn(200, 6)
    y = lin(x).argmax(1)
    for eps in (0.01, 0.1, 0.3):
        res = lipbound.certify(lin, x, y, eps, norm=norm, method=method)
        brute = _brute_linear(lin, x, y, eps, norm)
        # only points within a relative 1e-5 of the threshold may differ (rounding margins)
        differ = [i for i in range(200) if res.robust[i] != brute[i]]
        assert all(not res.robust[i] for i in differ)
        assert len(differ) <= 2
        assert 0 < res.certified_accuracy <= 1


def test_ties_and_misclassified_points_are_never_certified() -> None:
    lin = nn.Linear(3, 3).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]]))
        lin.bias.zero_()
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    y = torch.tensor([0, 1, 0])  # ties (classes 0 and 1 equal), then a misclassified point
    for method in ("local", "global"):
        res = lipbound.certify(lin, x, y, 0.0, method=method)
        assert res.robust == (False, False, False)
        assert res.correct == (False, False, False)
        assert res.margin[0] <= 0 and res.margin[2] < 0
        assert res.certified_accuracy == 0.0


def _attack(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
            steps: int = 40) -> torch.Tensor:
    """Whether PGD on the margin finds a point of the ball classified otherwise."""
    net64 = net.double()
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(x.shape, generator=g, dtype=F64) * 2 - 1) * eps
    d.requires_grad_(True)
    broken = torch.zeros(x.shape[0], dtype=torch.bool)
    for _ in range(steps):
        out = net64(x.double() + d)
        other = out.clone()
        other[torch.arange(x.shape[0]), y] = -math.inf
        m = out[torch.arange(x.shape[0]), y] - other.max(1).values
        broken |= (m <= 0).detach()
        (gr,) = torch.autograd.grad(m.sum(), d)
        with torch.no_grad():
            if norm == "inf":
                d -= eps / 8 * gr.sign()
                d.clamp_(-eps, eps)
            else:
                d -= eps / 4 * gr / gr.norm(dim=1, keepdim=True).clamp_min(1e-12)
                n = d.norm(dim=1, keepdim=True)
                d *= torch.clamp(eps / n.clamp_min(1e-300), max=1.0)
    return broken


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), act=st.sampled_from([nn.ReLU, nn.Tanh]),
       norm=st.sampled_from(["2", "inf"]), log_eps=st.floats(-2.0, -0.3))
def test_certified_points_survive_an_attack_and_local_dominates_global(
        seed: int, act: type[nn.Module], norm: str, log_eps: float) -> None:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 16), act(), nn.Linear(16, 3)).eval()
    x = torch.randn(60, 4)
    with torch.no_grad():
        y = net(x).argmax(1)
    eps = 10.0 ** log_eps
    loc = lipbound.certify(net, x, y, eps, norm=norm, method="local")
    glo = lipbound.certify(net, x, y, eps, norm=norm, method="global")
    broken = _attack(net, x, y, eps, norm)
    for i in range(60):
        assert not (loc.robust[i] and bool(broken[i]))
        assert not (glo.robust[i] and bool(broken[i]))
        assert loc.robust[i] or not glo.robust[i]  # local constants <= global ones
        assert loc.constant[i] > 0


def test_pair_constants_beat_sqrt2_times_the_global_constant() -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5)).eval()
    L = lipbound.autolip(net, (4,)).upper
    assert L is not None
    res = lipbound.certify(net, torch.randn(20, 4), torch.zeros(20, dtype=torch.long), 0.1,
                           method="global")
    assert max(res.constant) <= math.sqrt(2) * L


def test_bad_labels_raise() -> None:
    net = nn.Linear(3, 2).eval()
    x = torch.randn(4, 3)
    with pytest.raises(LipboundError, match="labels"):
        lipbound.certify(net, x, torch.zeros(3, dtype=torch.long), 0.1)
    with pytest.raises(LipboundError, match="labels"):
        lipbound.certify(net, x, torch.full((4,), 2), 0.1)
    with pytest.raises(LipboundError, match="labels"):
        lipbound.certify(net, x, torch.zeros(4), 0.1)
    with pytest.raises(LipboundError, match="method"):
        lipbound.certify(net, x, torch.zeros(4, dtype=torch.long), 0.1, method="crown")


def test_result_json_and_repr() -> None:
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(5, 3)
    res = lipbound.certify(net, x, net(x).argmax(1), 0.05, norm="inf", batch_size=2)
    assert isinstance(res, lipbound.CertifyResult)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["norm"] == "inf" and len(d["robust"]) == 5
    assert res.value == res.certified_accuracy
    assert "certified accuracy" in repr(res)
    assert d["status"] == res.status == "certified accuracy" and d["how"].startswith("local")


def test_regression_certify_result_certified_meant_per_sample_flags() -> None:
    """``CertifyResult.certified`` held per-sample robustness flags while ``certified`` means
    "the value is proven" in every other result; the flags are ``robust`` now and the old
    name warns for one release."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    x = torch.randn(4, 3)
    res = lipbound.certify(net, x, net(x).argmax(1), 0.01)
    with pytest.warns(DeprecationWarning, match="CertifyResult.robust"):
        old = res.certified
    assert old == res.robust and len(res.robust) == 4


# ---- CLI --------------------------------------------------------------------------------------
def test_cli_certify_table_json_and_errors(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def _run(*args: str) -> subprocess.CompletedProcess[str]:
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model_path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 4),), dynamic_shapes=(
        {0: torch.export.Dim("batch")},)), model_path)
    x = torch.randn(10, 4)
    y = net(x).argmax(1)
    data_pt = tmp_path / "data.pt"
    torch.save({"inputs": x, "labels": y}, data_pt)
    data_npz = tmp_path / "data.npz"
    np.savez(data_npz, inputs=x.numpy(), labels=y.numpy())
    res = _run("certify", str(model_path), "--data", str(data_pt), "--radius", "0.05",
               "--batch-size", "4")
    assert res.returncode == 0, res.stderr
    assert "certified accuracy" in res.stdout and "certify:" in res.stderr
    res = _run("certify", str(model_path), "--data", str(data_npz), "--radius", "0.05",
               "--norm", "inf", "--method", "global", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    want = lipbound.certify(net, x, y, 0.05, norm="inf", method="global")
    assert d["robust"] == list(want.robust)
    bad = tmp_path / "bad.pt"
    torch.save({"inputs": x}, bad)
    res = _run("certify", str(model_path), "--data", str(bad), "--radius", "0.05")
    assert res.returncode != 0 and "labels" in res.stderr
