"""SeqLip on models (lipbound.methods.seqlip).

Depends on the graph developer's ``lipbound.graph`` (capture/simplify), ``lipbound.rules`` and
``lipbound.methods.autolip`` (node_constants/compose); the operator path also on
``lipbound.spectral.top_singular``. Reference values (exact Lipschitz constants of tiny ReLU
MLPs, brute-force pair maxima, realised Jacobian norms) are computed here independently.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from lipbound.errors import InvalidArgumentError
from lipbound.methods._pairs import pair_exact
from lipbound.methods.autolip import autolip
from lipbound.methods.lower import lower_bound
from lipbound.methods.seqlip import SeqLipResult, conv_pair_bound, seqlip

F64 = torch.float64
TOL = 1e-7


def opnorm(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M.detach(), ord=2))


def mlp(dims: list[int], act: type[nn.Module] = nn.ReLU, seed: int = 0, **kw: float) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(act(**kw))
    return nn.Sequential(*layers).double()


def max_jacobian_norm(model: nn.Module, shape: tuple[int, ...], n: int = 200) -> float:
    """Largest ||J_f(x)||_2 over random inputs (a witnessed lower bound of L(f))."""
    model = model.double()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(n, *shape, generator=g, dtype=F64) * 2
    best = 0.0
    for x in xs:
        J = torch.func.jacrev(lambda z: model(z[None])[0])(x)
        best = max(best, opnorm(J.reshape(J.shape[0] if J.ndim > 1 else 1, -1)))
    return best


def exact_lipschitz_relu_mlp(model: nn.Sequential) -> float:
    """Exact l2 Lipschitz constant of a small ReLU MLP: enumerate activation patterns, keep the
    full-dimensional linear regions (LP: maximise the margin t of the strict sign constraints,
    HiGHS), take the largest Jacobian norm. Independent of lipbound."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    Ws = [m.weight.detach().double().numpy() for m in lins]
    bs = [m.bias.detach().double().numpy() for m in lins]
    widths = [W.shape[0] for W in Ws[:-1]]
    d = Ws[0].shape[1]
    best = 0.0
    for pattern in itertools.product((0, 1), repeat=sum(widths)):
        masks, pos = [], 0
        for w in widths:
            masks.append(np.array(pattern[pos:pos + w], dtype=float))
            pos += w
        # pre-activation of layer i is A_i x + c_i for x in this region
        A, c = Ws[0], bs[0]
        rows, rhs = [], []
        for i, mask in enumerate(masks):
            sgn = 2 * mask - 1  # active: A x + c >= t; inactive: -(A x + c) >= t
            rows.append(np.hstack([-(sgn[:, None] * A), np.ones((len(mask), 1))]))
            rhs.append(sgn * c)
            A = Ws[i + 1] @ (mask[:, None] * A)
            c = Ws[i + 1] @ (mask * c) + bs[i + 1]
        res = linprog(
            np.r_[np.zeros(d), -1.0], A_ub=np.vstack(rows), b_ub=np.concatenate(rhs),
            bounds=[(None, None)] * d + [(None, 1.0)], method="highs",
        )
        if res.status == 0 and -res.fun > 1e-9:
            best = max(best, float(np.linalg.norm(A, 2)))
    return best


# ---------------------------------------------------------------- closed forms / brute force
def test_one_hidden_layer_equals_brute_force_pair_max() -> None:
    net = mlp([3, 7, 2], seed=1)
    W1, W2 = net[0].weight.detach(), net[2].weight.detach()
    brute = max(
        opnorm(W2 @ torch.diag(torch.tensor(s, dtype=F64)) @ W1)
        for s in itertools.product((0.0, 1.0), repeat=7)
    )
    for mode in ("exact", "auto"):
        r = seqlip(net, (3,), mode=mode)
        assert isinstance(r, SeqLipResult)
        assert r.certified
        # slope ranges are widened by the rules' rounding margin (relative 2^-22)
        assert brute <= r.value <= brute * (1 + 1e-6)
        assert brute <= r.upper <= brute * (1 + 1e-6)
        assert r.value <= r.autolip * (1 + 1e-9)
    g = seqlip(net, (3,), mode="greedy")
    assert not g.certified and g.bound == "estimate"
    assert g.value <= brute * (1 + 1e-6)  # a value at the widened slope ends
    assert g.upper is not None and g.upper >= brute


@pytest.mark.parametrize(
    ("act", "kw", "slopes"),
    [(nn.LeakyReLU, {"negative_slope": 0.1}, (0.1, 1.0)), (nn.Sigmoid, {}, (0.0, 0.25))],
)
def test_activation_slope_scaling(act: type[nn.Module], kw: dict, slopes: tuple) -> None:
    net = mlp([2, 6, 3], act=act, seed=2, **kw)
    W1, W2 = net[0].weight.detach(), net[2].weight.detach()
    brute = max(
        opnorm(W2 @ torch.diag(torch.tensor(s, dtype=F64)) @ W1)
        for s in itertools.product(slopes, repeat=6)
    )
    r = seqlip(net, (2,), mode="exact")
    assert r.value == pytest.approx(brute, rel=1e-6)
    assert r.value >= max_jacobian_norm(net, (2,), n=100) * (1 - 1e-6)


# ---------------------------------------------------------------- exact Lipschitz constants
@pytest.mark.parametrize(
    ("dims", "seed"), [([2, 3, 3, 1], 0), ([2, 4, 3, 2], 3), ([2, 3, 2, 3, 1], 5)]
)
def test_exact_mode_between_true_constant_and_autolip(dims: list[int], seed: int) -> None:
    net = mlp(dims, seed=seed)
    true = exact_lipschitz_relu_mlp(net)
    r = seqlip(net, (dims[0],), mode="exact")
    a = autolip(net, (dims[0],)).value
    assert r.certified
    assert r.value >= true * (1 - 1e-7)
    assert r.value <= a * (1 + 1e-7)
    # the witnessed Jacobian norms never exceed the exact constant (sanity of the reference)
    assert max_jacobian_norm(net, (dims[0],), n=100) <= true * (1 + 1e-7)


# ---------------------------------------------------------------- V versus V^T
def test_v_transpose_trap() -> None:
    """With ``V`` in place of ``V^T`` the 'bound' drops below the true constant on
    non-symmetric layers; SeqLip must not."""
    found = False
    for seed in range(40):
        net = mlp([4, 4, 4, 4], seed=seed)
        Ws = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
        if any(torch.allclose(W, W.T) for W in Ws):
            continue
        svd = [torch.linalg.svd(W) for W in Ws]

        def wrong_pair(i: int, svd: list = svd) -> float:
            U_i, S_i, _ = svd[i]
            _, S_j, Vh_j = svd[i + 1]
            St_i = S_i if i == 0 else S_i.sqrt()
            St_j = S_j if i + 1 == 2 else S_j.sqrt()
            L = St_j[:, None] * Vh_j.T  # WRONG: V instead of V^T
            return pair_exact(L, U_i * St_i).value

        wrong = wrong_pair(0) * wrong_pair(1)
        true = exact_lipschitz_relu_mlp(net)
        if wrong < true * (1 - 1e-3):
            found = True
            r = seqlip(net, (4,), mode="exact")
            assert r.value >= true * (1 - 1e-7)
            break
    assert found, "no seed exposed the V / V^T trap"


# ---------------------------------------------------------------- realised Jacobians, all modes
@pytest.mark.parametrize("mode", ["auto", "exact", "greedy"])
def test_certified_above_realised_jacobians_mlp(mode: str) -> None:
    net = mlp([2, 10, 10, 10, 1], seed=7)
    r = seqlip(net, (2,), mode=mode, max_exact_width=12)
    low = max_jacobian_norm(net, (2,))
    assert r.upper is not None
    assert r.upper >= low * (1 - 1e-7)
    assert r.estimate <= r.upper * (1 + 1e-7)
    assert r.upper <= r.autolip * (1 + 1e-9)
    hows = {lb.how for lb in r.layers if lb.op == "pair"}
    assert hows, "no per-pair rows"
    if mode == "greedy":
        assert all(h.startswith("greedy") for h in hows)
    if mode == "exact":
        assert all(h.startswith("exact") for h in hows)


def test_wide_layers_use_greedy_in_auto_and_certify() -> None:
    net = mlp([3, 40, 40, 2], seed=4)
    r = seqlip(net, (3,), mode="auto", max_exact_width=16, time_limit=2.0)
    hows = [lb.how for lb in r.layers if lb.op == "pair"]
    assert all(h.startswith("greedy") for h in hows)
    # top-k truncated values (paper's procedure) <= full-pair values of the same patterns
    r2 = seqlip(net, (3,), mode="greedy", k=5)
    assert r2.extra["estimate_truncated"] <= r2.extra["estimate_uncapped"] * (1 + 1e-9)
    assert r.certified and r.value == r.upper
    assert r.value >= max_jacobian_norm(net, (3,), n=200) * (1 - 1e-7)
    assert r.value <= r.autolip * (1 + 1e-9)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * 4 * 4, 2),
    ).double()


def stride1_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2, 1, 3, padding=1),
    ).double()


@pytest.mark.parametrize(
    ("make", "shape", "dense_limit"),
    [(tiny_cnn, (1, 9, 9), 30_000_000), (stride1_cnn, (1, 8, 8), 1)],
)
def test_cnn_dense_and_operator_paths(make, shape: tuple, dense_limit: int) -> None:
    net = make()
    r = seqlip(net, shape, mode="auto", max_exact_width=8, dense_limit=dense_limit)
    low = max_jacobian_norm(net, shape, n=150)
    assert r.certified
    assert r.value >= low * (1 - 1e-7)
    assert r.value <= r.autolip * (1 + 1e-9)
    if dense_limit == 1:  # operator path: circular-conv blocks must beat AutoLip strictly
        assert any(lb.op == "segment" and "blocks" in lb.how for lb in r.layers)
        assert r.value < r.autolip


# ---------------------------------------------------------------- circular-conv certificate
@pytest.mark.parametrize("seed", [0, 1])
def test_circular_conv_pair_bound_above_dense_exact(seed: int) -> None:
    torch.manual_seed(seed)
    c1 = nn.Conv2d(1, 2, 3, padding=1).double()
    c2 = nn.Conv2d(2, 1, 3, padding=1).double()
    H = W = 3
    eye = torch.eye(H * W, dtype=F64).reshape(-1, 1, H, W)
    with torch.no_grad():
        W1 = (c1(eye) - c1(torch.zeros_like(eye[:1]))).reshape(H * W, -1).T
        n1 = W1.shape[0]
        eye2 = torch.eye(n1, dtype=F64).reshape(-1, 2, H, W)
        W2 = (c2(eye2) - c2(torch.zeros_like(eye2[:1]))).reshape(n1, -1).T
    ex = pair_exact(W2, W1, time_limit=30)
    assert ex.exact
    bound, parts = conv_pair_bound(c1, c2, (H, W))
    assert bound >= ex.value * (1 - 1e-9)
    assert parts["A"] >= opnorm(W2) * (1 - 1e-9) and parts["B"] >= opnorm(W1) * (1 - 1e-9)
    assert bound <= parts["prod"] * (1 + 1e-12)


# ---------------------------------------------------------------- segments in DAGs
class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.inp = nn.Linear(3, 6)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.pool = nn.MaxPool1d(2)
        self.head1 = nn.Linear(3, 5)
        self.head2 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.b(torch.relu(self.a(torch.relu(h))))
        h = self.pool(torch.relu(h)[:, None, :])[:, 0, :]
        return self.head2(torch.tanh(self.head1(h)))


def test_segments_in_a_dag() -> None:
    net = Residual().double()
    r = seqlip(net, (3,), mode="exact")
    assert r.segments == 2
    a = autolip(net, (3,)).value
    assert r.value <= a * (1 + 1e-9)
    assert r.value >= max_jacobian_norm(net, (3,), n=200) * (1 - 1e-7)
    assert any(lb.op == "segment" for lb in r.layers)


def test_no_segment_is_autolip() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).double()
    r = seqlip(net, (3,))
    assert r.segments == 0
    assert r.value == pytest.approx(autolip(net, (3,)).value, rel=1e-12)


# ---------------------------------------------------------------- errors
def test_errors() -> None:
    net = mlp([2, 40, 1])
    with pytest.raises(InvalidArgumentError):
        seqlip(net, (2,), mode="exact", max_exact_width=20)
    with pytest.raises(InvalidArgumentError):
        seqlip(net, (2,), norm=1)
    with pytest.raises(InvalidArgumentError):
        seqlip(net, (2,), mode="fast")


class ConvBNResidual(nn.Module):
    """Residual block with eval-mode BatchNorm (folded into the convs by the graph)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0 = nn.Conv2d(1, 3, 3, padding=1)
        self.c1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 6 * 6, 2)
        with torch.no_grad():
            for b in (self.b1, self.b2):
                b.running_mean.uniform_(-1, 1)
                b.running_var.uniform_(0.2, 3.0)
                b.weight.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c0(x))
        h = h + self.b2(self.c2(torch.relu(self.b1(self.c1(h)))))
        return self.fc(torch.flatten(torch.relu(h), 1))


@pytest.mark.parametrize("dense_limit", [30_000_000, 1])
def test_conv_batchnorm_residual(dense_limit: int) -> None:
    net = ConvBNResidual().double().eval()
    r = seqlip(net, (1, 6, 6), dense_limit=dense_limit, max_exact_width=8)
    assert r.segments == 1 and r.certified
    assert r.value >= max_jacobian_norm(net, (1, 6, 6), n=150) * (1 - 1e-7)
    assert r.value < r.autolip  # dense pair bound, or circular bound on folded kernels


class _ChannelShuffle(nn.Module):
    """torchvision's ShuffleNet channel shuffle between two convs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(4, 4, 1)
        self.c2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        x = x.view(b, -1, h, w)
        return self.c2(torch.relu(x))


def test_regression_channel_shuffle_view_after_dropped_contiguous() -> None:
    """shufflenet_v2 at 32: seqlip raised torch's raw "view size is not compatible" (simplify
    drops ``.contiguous()``, and the merged node replayed ``transpose -> view``). Shape views
    are replayed as reshapes; the bound is certified and above a witness."""
    m = _ChannelShuffle().eval()
    r = seqlip(m, (4, 3, 3))
    low = lower_bound(m, (4, 3, 3), seed=0)
    assert r.certified and low.value <= r.upper * (1 + 1e-9)
    assert r.upper <= autolip(m, (4, 3, 3)).upper * (1 + 1e-9)
