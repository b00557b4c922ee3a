"""AutoLip over the captured graph: closed forms, soundness, reuse, unsupported ops."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lipbound.errors import InvalidArgumentError, ShapeError, UnsupportedModelError
from lipbound.graph import capture, simplify
from lipbound.methods.autolip import autolip, compose, node_constants

# ---- helpers ----------------------------------------------------------------------------


def opnorm(W: torch.Tensor, norm: str = "2") -> float:
    W = W.detach().double()
    if norm == "2":
        return float(torch.linalg.matrix_norm(W, 2))
    if norm == "1":
        return float(W.abs().sum(0).max())
    return float(W.abs().sum(1).max())


def jacobians(model: nn.Module, shape: tuple[int, ...], xs: torch.Tensor) -> torch.Tensor:
    """Exact Jacobians (float64) at each row of ``xs``: shape (n, out_numel, in_numel)."""
    m = copy.deepcopy(model).double().eval().requires_grad_(False)

    def f(x: torch.Tensor) -> torch.Tensor:
        return m(x.unsqueeze(0)).reshape(-1)

    J = torch.func.vmap(torch.func.jacrev(f))(xs.double())
    return J.reshape(xs.shape[0], J.shape[1], -1)


def max_jacobian_norm(
    model: nn.Module, shape: tuple[int, ...], *, n: int = 200, norm: str = "2", seed: int = 0
) -> float:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.1, 1.0, 3.0]).repeat_interleave(n // 3 + 1)[:n]
    xs = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    xs = xs * scales.reshape(-1, *([1] * len(shape))).double()
    J = jacobians(model, shape, xs)
    if norm == "2":
        return float(torch.linalg.matrix_norm(J, 2).max())
    if norm == "1":
        return float(J.abs().sum(1).max())
    return float(J.abs().sum(2).max())


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=gen) * 2)
            m.bias.data.copy_(torch.randn(c, generator=gen))


# ---- closed forms -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Linear(7, 5), (7,)),
        (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 6, 6)),
        (nn.ConvTranspose1d(2, 2, 3, stride=2), (2, 5)),
        (nn.AvgPool2d(3, 2), (1, 7, 7)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_single_layer_equals_its_operator_norm(layer: nn.Module, shape: tuple[int, ...]) -> None:
    g = capture(layer, shape)
    (node,) = [n for n in g if n.kind == "linear"]
    exact = opnorm(node.dense()[0])
    r = autolip(layer, shape)
    assert r.certified and r.upper == r.value
    assert r.value >= exact * (1 - 1e-12)
    assert r.value == pytest.approx(exact, rel=1e-6)
    assert len(r.layers) == 1


def test_linear_network_is_merged_and_equals_norm_of_product() -> None:
    net = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 9), nn.Linear(9, 4))
    W = net[2].weight @ net[1].weight @ net[0].weight
    r = autolip(net, (6,))
    assert len(r.layers) == 1 and r.layers[0].name == "0+1+2"
    assert r.value == pytest.approx(opnorm(W), rel=1e-6)
    product = opnorm(net[0].weight) * opnorm(net[1].weight) * opnorm(net[2].weight)
    assert r.value < product  # merging is tighter than multiplying


def test_conv_bn_pool_flatten_linear_is_one_operator() -> None:
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(12, 5)).eval()
    randomize_bn(net)
    shape = (2, 6, 6)
    J = jacobians(net, shape, torch.randn(1, *shape))[0]  # affine: one Jacobian
    r = autolip(net, shape)
    assert len(r.layers) == 1
    assert r.certified
    assert r.value == pytest.approx(opnorm(J), rel=1e-6)
    assert r.value >= opnorm(J) * (1 - 1e-12)


def test_residual_block_gives_one_plus_product() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.w2 = nn.Linear(5, 7), nn.Linear(7, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.w2(torch.relu(self.w1(x)))

    b = Block()
    expect = 1 + opnorm(b.w1.weight) * opnorm(b.w2.weight)
    r = autolip(b, (5,))
    assert r.value == pytest.approx(expect, rel=1e-6)
    assert r.value >= max_jacobian_norm(b, (5,), n=60)
    for norm in ("1", "inf"):
        e = 1 + opnorm(b.w1.weight, norm) * opnorm(b.w2.weight, norm)
        assert e <= autolip(b, (5,), norm=norm).value <= e * (1 + 1e-6)  # + margins


def test_concatenation_root_sum_of_squares() -> None:
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x), F.relu(self.b(x))], dim=1)

    m = Cat()
    na, nb = opnorm(m.a.weight), opnorm(m.b.weight)
    assert autolip(m, (4,)).value == pytest.approx(math.hypot(na, nb), rel=1e-6)
    a1, b1 = opnorm(m.a.weight, "1"), opnorm(m.b.weight, "1")
    assert a1 + b1 <= autolip(m, (4,), norm=1).value <= (a1 + b1) * (1 + 1e-6)
    ai, bi = opnorm(m.a.weight, "inf"), opnorm(m.b.weight, "inf")
    assert max(ai, bi) <= autolip(m, (4,), norm="inf").value <= max(ai, bi) * (1 + 1e-6)


def test_batchnorm_folding_is_exact_and_tighter() -> None:
    conv, bn = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)
    net = nn.Sequential(conv, bn, nn.ReLU()).eval()
    randomize_bn(net, seed=3)
    shape = (1, 5, 5)
    lin = nn.Sequential(conv, bn).eval()
    folded_exact = opnorm(jacobians(lin, shape, torch.zeros(1, *shape))[0])
    r = autolip(net, shape)
    assert [lb.op for lb in r.layers] == ["Conv2d+BatchNorm2d", "ReLU"]
    assert r.layers[0].value == pytest.approx(folded_exact, rel=1e-6)
    g = capture(conv, shape)
    sep = opnorm(next(n for n in g if n.kind == "linear").dense()[0])
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().max().item()
    assert r.value <= sep * s * (1 + 1e-6)


def test_overlapping_maxpool_enters_the_bound() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    r = autolip(net, (1, 9, 9))
    pool = next(lb for lb in r.layers if lb.op == "MaxPool2d")
    assert 2.0 <= pool.value == pytest.approx(2.0)
    assert r.value == pytest.approx(math.prod(lb.value for lb in r.layers), rel=1e-12)


# ---- functional calls and reuse -----------------------------------------------------------


def test_functional_relu_and_reused_module_match_explicit_twin() -> None:
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 6)
            self.shared = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.inp(x))
            x = F.relu(self.shared(x))
            x = self.shared(x).relu()
            return self.out(x)

    reuse = Reuse()
    twin = nn.Sequential(
        reuse.inp, nn.ReLU(), copy.deepcopy(reuse.shared), nn.ReLU(),
        copy.deepcopy(reuse.shared), nn.ReLU(), reuse.out,
    )
    r1, r2 = autolip(reuse, (4,)), autolip(twin, (4,))
    assert len(r1.layers) == len(r2.layers) == 7
    assert r1.value == pytest.approx(r2.value, rel=1e-9)
    names = [lb.name for lb in r1.layers]
    assert "shared (call 1)" in names and "shared (call 2)" in names
    # the walk over model.modules() would have seen `shared` once: the graph sees it twice
    s = opnorm(reuse.shared.weight)
    exact = opnorm(reuse.inp.weight) * s * s * opnorm(reuse.out.weight)
    assert exact * (1 - 1e-6) <= r1.value <= exact * (1 + 4e-6)  # + margins


def test_unsupported_error_lists_every_offender_once() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.emb_like = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            sq = x * x
            h = self.norm(sq)
            scores = self.q(h).unsqueeze(2) @ self.k(h).unsqueeze(1)  # attention-style
            return scores.flatten(1) + torch.exp(self.emb_like(x)).repeat(1, 4)

    with pytest.raises(UnsupportedModelError) as info:
        autolip(Bad(), (4,))
    got = {(n.qualname, n.op) for n in info.value.nodes}
    assert ("mul (*)", "mul") in got
    assert ("norm", "LayerNorm") in got
    assert ("matmul (@)", "matmul") in got
    assert any(op == "exp" for _, op in got)
    assert len(info.value.nodes) == 4
    msg = str(info.value)
    assert "register_rule" in msg and "lower_bound" in msg


# ---- soundness on random networks ------------------------------------------------------------
ACTS = [nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Sigmoid,
        nn.Tanh, nn.Hardtanh, nn.Mish]


class ResNetLike(nn.Module):
    def __init__(self, act: type[nn.Module], c: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Conv2d(c, c, 1, stride=2)
        self.c2 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.act = act()
        self.fc = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.stem(x)))
        x = self.act(x + self.bn2(self.c1(x)))
        x = self.down(x) + self.c2(self.act(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class CatNet(nn.Module):
    def __init__(self, act: type[nn.Module], w: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, w), nn.Linear(3, w)
        self.act = act()
        self.out = nn.Linear(2 * w, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.act(self.a(x)), torch.maximum(self.b(x), -self.a(x))], dim=-1)
        return torch.log_softmax(self.out(h) * 2.0, dim=-1)


def build(kind: str, act: type[nn.Module], width: int, seed: int) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    if kind == "mlp":
        net: nn.Module = nn.Sequential(nn.Linear(3, width), act(), nn.Dropout(0.3),
                                       nn.Linear(width, width), act(), nn.Linear(width, 2))
        shape: tuple = (3,)
    elif kind == "cnn":
        net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), act(),
            nn.MaxPool2d(3, 2), nn.Conv2d(width, 3, 2), act(), nn.AvgPool2d(2, 1),
            nn.Flatten(), nn.Linear(3, 2),
        )
        shape = (1, 8, 8)
    elif kind == "res":
        net = ResNetLike(act, width)
        shape = (1, 6, 6)
    else:
        net = CatNet(act, width)
        shape = (3,)
    randomize_bn(net, seed)
    return net.eval(), shape


@given(
    kind=st.sampled_from(["mlp", "cnn", "res", "cat"]),
    act=st.sampled_from(ACTS),
    width=st.integers(2, 5),
    seed=st.integers(0, 10_000),
)
def test_bound_dominates_jacobian_norms(
    kind: str, act: type[nn.Module], width: int, seed: int
) -> None:
    net, shape = build(kind, act, width, seed)
    r = autolip(net, shape)
    assert r.certified
    worst = max_jacobian_norm(net, shape, n=150, seed=seed)
    assert r.value >= worst * (1 - 1e-9)
    assert r.value >= r.extra["estimate"] * (1 - 1e-9)


@pytest.mark.parametrize("norm", ["1", "inf"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "res", "cat"])
def test_l1_linf_bounds_dominate_jacobian_norms(kind: str, norm: str) -> None:
    net, shape = build(kind, nn.Tanh, 3, seed=7)
    r = autolip(net, shape, norm=norm)
    assert r.certified and r.norm == norm
    assert r.value >= max_jacobian_norm(net, shape, n=90, norm=norm) * (1 - 1e-9)


def test_mlp_l1_linf_equal_products_of_exact_norms() -> None:
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    for norm in ("1", "inf"):
        e = opnorm(net[0].weight, norm) * opnorm(net[2].weight, norm)
        assert e <= autolip(net, (5,), norm=norm).value <= e * (1 + 1e-6)  # + margins


# ---- functional core, results, validation -----------------------------------------------------


def test_compose_with_overridden_constants() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    g = simplify(capture(net, (3,)))
    cs = node_constants(g)
    base = compose(g, cs)
    prod = math.prod(c.constants[0] for c in cs.values())
    assert base == pytest.approx(prod, rel=1e-12)
    names = [n.name for n in g if n.kind == "linear"]
    over = dict(cs)
    over[names[0]] = replace(cs[names[0]], constants=(0.5,))
    for k in names[1:]:
        over[k] = replace(cs[k], constants=(1.0,))
    acts = math.prod(cs[n.name].constants[0] for n in g if n.kind == "activation")
    assert compose(g, over) == pytest.approx(0.5 * acts, rel=1e-12)  # acts: 1 + margin
    a, b = cs[next(n.name for n in g if n.kind == "activation")].slope_range
    assert a == 0.0 and 1.0 <= b <= 1.0 + 1e-6  # widened by the rounding margin


def test_result_rows_and_uncertified_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    r = autolip(net, (3,))
    assert r.method == "autolip" and r.norm == "2" and r.bound == "upper"
    assert [lb.op for lb in r.layers] == ["Linear", "Sigmoid", "Linear"]
    assert 0.25 <= r.layers[1].value <= 0.25 * (1 + 1e-6) and r.layers[1].certified
    assert all(lb.seconds >= 0 for lb in r.layers)
    assert "largest factors" in r.notes[-1]

    import lipbound.rules.linear as lin

    class Est:
        def __init__(self, v: float) -> None:
            self.value, self.upper, self.certified = v, None, False
            self.certificate, self.method = "", "power (test)"

    real = lin.spectral

    def fake(op, shape, ctx):
        return Est(real(op, shape, ctx).value * 0.9)

    monkeypatch.setattr(lin, "spectral", fake)
    r2 = autolip(net, (3,), certify=False)
    assert not r2.certified and r2.upper is None
    assert r2.value == pytest.approx(r.value * 0.81, rel=1e-6)
    assert "not certified" in r2.notes[0] and "estimate" in r2.status


def test_input_validation() -> None:
    net = nn.Linear(3, 2)
    with pytest.raises(InvalidArgumentError):
        autolip(net, (3,), norm=3)
    with pytest.raises(ShapeError):
        autolip(net, (0,))
    with pytest.raises(ShapeError):
        autolip(net, (4,))
    with pytest.raises(InvalidArgumentError):
        autolip(net, (3,), tol=-1.0)
    with pytest.raises(InvalidArgumentError):
        autolip(net, (3,), max_iter=0)
