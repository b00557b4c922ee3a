"""Budgets that hold, witnesses that are strong, progress (engineer G).

Every bound is checked against a realised truth: a dense float64 Jacobian norm
(``torch.autograd.functional.jacobian``) or a realised pair ratio.
"""

from __future__ import annotations

import io
import math
import sys
import time
from typing import Any

import pytest
import torch
from torch import nn

from lipbound.cli import main
from lipbound.methods.lower import lower_bound
from lipbound.methods.seqlip import seqlip
from lipbound.report import bound, make_progress, plot_report

NORMS = ("1", "2", "inf")
SLACK = 0.5  # seconds of start-up allowed on top of 10% of a budget


def _p(norm: str) -> float:
    return {"1": 1.0, "2": 2.0, "inf": math.inf}[norm]


def _jac_norm(model: nn.Module, x: torch.Tensor, norm: str) -> float:
    """Dense float64 Jacobian norm of ``model`` at one sample ``x`` (operator p-norm)."""
    m64 = _double(model)
    J = torch.autograd.functional.jacobian(lambda z: m64(z[None]).flatten(), x.double())
    J = J.reshape(J.shape[0], -1)
    if norm == "2":
        return float(torch.linalg.matrix_norm(J, 2))
    if norm == "1":
        return float(J.abs().sum(0).max())
    return float(J.abs().sum(1).max())


def _double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double().eval()


def _recomputed(model: nn.Module, res: Any, norm: str) -> float:
    """The witness's ratio recomputed independently in float64."""
    m64 = _double(model)
    x = res.witness.x.double()
    with torch.no_grad():
        if res.witness.y is not None:
            y = res.witness.y.double()
            num = torch.linalg.vector_norm((m64(x[None]) - m64(y[None])).flatten(), _p(norm))
            return float(num / torch.linalg.vector_norm((x - y).flatten(), _p(norm)))
    v = res.witness.direction.double()
    J = torch.autograd.functional.jacobian(lambda z: m64(z[None]).flatten(), x)
    jv = J.reshape(J.shape[0], -1) @ v.flatten()
    return float(torch.linalg.vector_norm(jv, _p(norm)) / torch.linalg.vector_norm(v, _p(norm)))


def _mlp(widths: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _conv_net() -> nn.Sequential:
    """Big enough that a 4 s budget binds (power iterations: 128 outputs > 64)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(48 * 32 * 32, 128),
    ).eval()


# ------------------------------------------------------------------------------------------
# ONE overall time limit, honoured within 10% (+ a small constant)
# ------------------------------------------------------------------------------------------
def test_regression_lower_bound_overshoots_time_limit() -> None:
    net = _conv_net()
    lower_bound(net, (3, 32, 32), restarts=2, steps=2, samples=0)  # warm-up (imports)
    budget = 4.0
    t0 = time.perf_counter()
    res = lower_bound(net, (3, 32, 32), restarts=8, time_limit=budget)
    took = time.perf_counter() - t0
    assert took <= 1.1 * budget + SLACK, took
    assert any("time limit" in n for n in res.notes)
    assert res.value > 0
    assert _recomputed(net, res, "2") == pytest.approx(res.value, rel=1e-6)


def test_regression_seqlip_time_limit_is_per_pair() -> None:
    net = _mlp([64, 600, 600, 600, 600, 600, 10], 1)
    seqlip(_mlp([2, 4, 4, 1], 0), (2,))  # warm-up (torch.fx imports)
    budget = 2.0
    t0 = time.perf_counter()
    res = seqlip(net, (64,), time_limit=budget)
    took = time.perf_counter() - t0
    assert took <= 1.1 * budget + SLACK, took
    assert res.certified
    # certified upper bound against realised Jacobian norms (l2, the only norm SeqLip claims)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(64, generator=gen)
        assert _jac_norm(net, x, "2") <= res.value * (1 + 1e-9)


def test_regression_estimate_has_no_overall_time_limit() -> None:
    net = _mlp([64, 600, 600, 600, 600, 600, 10], 2)
    seqlip(_mlp([2, 4, 4, 1], 0), (2,))  # warm-up
    budget = 4.0
    t0 = time.perf_counter()
    rep = bound(net, (64,), time_limit=budget)
    took = time.perf_counter() - t0
    assert took <= 1.1 * budget + SLACK, took
    assert rep.upper is not None and rep.lower is not None
    assert rep.lower <= rep.upper * (1 + 1e-9)
    x = torch.randn(64, generator=torch.Generator().manual_seed(1))
    assert _jac_norm(net, x, "2") <= rep.upper * (1 + 1e-9)


# ------------------------------------------------------------------------------------------
# ops without a double backward: fall back, keep what was found
# ------------------------------------------------------------------------------------------
class _SDPABackward(torch.autograd.Function):
    """The backward of attention as its own op, whose derivative is missing (as for torch's
    fused attention kernels: "the derivative for '..._backward' is not implemented")."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return torch.autograd.grad(out, (q, k, v), g)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise RuntimeError("the derivative for 'sdpa_backward' is not implemented")


class _SDPAOnce(torch.autograd.Function):
    """scaled_dot_product_attention without a double backward (and without forward AD)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = ctx.saved_tensors
        return _SDPABackward.apply(g, q, k, v)  # type: ignore[no-any-return]


class _Attention(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 20 if fused else 3)  # fused: 80 outputs, beyond the full J
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            q, k, v = nn.functional.linear(x, self.mha.in_proj_weight,
                                           self.mha.in_proj_bias).chunk(3, dim=-1)
            y = self.mha.out_proj(_SDPAOnce.apply(q, k, v))
        else:
            y, _ = self.mha(x, x, x, need_weights=False)
        return self.out(y).flatten(1)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("fused", [True, False])
def test_regression_lower_bound_crashes_without_double_backward(fused: bool, norm: str) -> None:
    torch.manual_seed(0)
    net = _Attention(fused).eval()
    res = lower_bound(net, (4, 8), norm=norm, restarts=4, steps=20, samples=64, time_limit=4)
    assert res.value >= 0 and res.certified
    assert _recomputed(net, res, norm) == pytest.approx(res.value, rel=1e-6, abs=1e-12)


# ------------------------------------------------------------------------------------------
# estimate keeps a finished lower bound when every upper method is refused
# ------------------------------------------------------------------------------------------
class _SinCos(nn.Module):
    """f(x) = sin(x) cos(x) = sin(2x) / 2 elementwise: L = 1 in every norm, but the product of
    two tensors has no AutoLip rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * torch.cos(x)


@pytest.mark.parametrize("norm", NORMS)
def test_regression_estimate_discards_lower_when_uppers_refused(norm: str) -> None:
    net = _SinCos().eval()
    methods = ("lower", "autolip", "seqlip") if norm == "2" else ("lower", "autolip")
    rep = bound(net, (3,), methods=methods, norm=norm,
                   lower={"restarts": 4, "steps": 30, "samples": 64})
    assert rep.upper is None
    assert rep.lower is not None and 0.9 < rep.lower <= 1.0 * (1 + 1e-9)  # true L = 1
    assert any("no certified upper bound" in n for n in rep.notes)
    res = rep["lower"]
    assert _recomputed(net, res, norm) == pytest.approx(res.value, rel=1e-6)


# ------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------
def test_regression_progress_writes_carriage_returns_when_not_a_tty(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    buf = io.StringIO()  # not a TTY
    monkeypatch.setattr(sys, "stderr", buf)
    lower_bound(_mlp([2, 8, 1], 0), (2,), restarts=4, steps=20, samples=64, progress=True)
    text = buf.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and all(ln.startswith("lipbound: ") for ln in lines)
    assert len(lines) == len(set(ln.split(" (")[0] for ln in lines))  # ONE line per stage
    # the CLI (stderr captured by pytest: not a TTY)
    monkeypatch.undo()
    rc = main(["estimate", "mlp4", "-m", "lower,autolip", "--restarts", "2", "--steps", "10"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "\r" not in err and "lipbound: lower: pairs" in err


def test_progress_callback_gets_stages_and_fractions() -> None:
    seen: list[tuple[str, float]] = []
    bound(_mlp([2, 8, 8, 1], 0), (2,), methods=("lower", "seqlip"),
             progress=lambda s, f: seen.append((s, f)),
             lower={"restarts": 4, "steps": 20, "samples": 64})
    stages = {s for s, _ in seen}
    assert {"lower: pairs", "lower: check", "seqlip"} <= stages
    assert all(0.0 <= f <= 1.0 for _, f in seen)
    rep = make_progress(False)
    rep("x", 0.5)  # a no-op
    rep.close()


# ------------------------------------------------------------------------------------------
# witness strength: the default search beats a plain one
# ------------------------------------------------------------------------------------------
def _plain_search(net: nn.Module, n: int, samples: int, steps: int, seed: int) -> float:
    """max of sampled float64 Jacobian norms (dense J, exact 2-norm) + pair-ratio ascent."""
    from sklearn.datasets import load_digits  # noqa: F401  (the benchmark's data)

    m64 = _double(net)
    gen = torch.Generator().manual_seed(seed)
    s = torch.pow(10.0, -1.0 + 2.0 * torch.rand(samples, 1, generator=gen, dtype=torch.float64))
    x = s * torch.randn(samples, n, generator=gen, dtype=torch.float64)
    J = torch.func.vmap(torch.func.jacrev(lambda z: m64(z[None])[0]))(x)
    vals = torch.linalg.matrix_norm(J, 2)
    best = float(vals.max().detach())
    top = torch.topk(vals, 16).indices
    z = x[top].clone().requires_grad_(True)
    u = torch.randn(16, n, generator=gen, dtype=torch.float64).requires_grad_(True)
    opt = torch.optim.Adam([z, u], lr=0.01)
    for t in range(steps):
        d = 0.1 * (1e-3 / 0.1) ** (t / max(steps - 1, 1))
        un = u / u.norm(dim=1, keepdim=True)
        r = (m64(z + d * un) - m64(z)).norm(dim=1) / d
        best = max(best, float(r.max()))
        opt.zero_grad()
        (-r.sum()).backward()
        opt.step()
    return best


def _trained_digits_mlp(seed: int) -> nn.Sequential:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    x = torch.tensor(X, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)
    yt = torch.tensor(y)
    net = _mlp([64, 64, 64, 64, 10], seed).train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), yt).backward()
        opt.step()
    return net.eval()


def test_default_lower_bound_at_least_plain_search() -> None:
    net = _trained_digits_mlp(0)
    plain = _plain_search(net, 64, samples=2000, steps=100, seed=0)
    res = lower_bound(net, (64,), time_limit=4)
    assert res.value >= plain * (1 - 1e-9), (res.value, plain)
    assert _recomputed(net, res, "2") == pytest.approx(res.value, rel=1e-6)
    # and never above a certified upper bound
    assert res.value <= seqlip(net, (64,)).value * (1 + 1e-9)


# ------------------------------------------------------------------------------------------
# the plot
# ------------------------------------------------------------------------------------------
def test_regression_plot_cuts_labels_and_names_seqlip_when_absent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder_block_with_long_name = nn.Sequential(nn.Linear(2, 6), nn.ReLU())
            self.head = nn.Linear(6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder_block_with_long_name(x))

    torch.manual_seed(0)
    net = Deep().eval()
    rep = bound(net, (2,), methods=("autolip",))
    figs: list[Any] = []
    real = matplotlib.figure.Figure.savefig

    def grab(self: Any, *a: Any, **k: Any) -> None:
        figs.append(self)
        real(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", grab)
    plot_report(rep, str(tmp_path / "p.png"))
    ax = figs[0].axes[0]
    assert "SeqLip" not in ax.get_title()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    names = [lb.name for lb in rep["autolip"].layers if lb.value != 1.0]
    assert set(names) <= set(labels)  # full qualified names, not cut
    fig = figs[0]
    fig.canvas.draw()
    box = fig.get_window_extent()
    for t in ax.get_xticklabels():
        if t.get_text():
            e = t.get_window_extent()
            assert e.y0 >= box.y0 - 1 and e.x0 >= box.x0 - 1  # inside the figure
