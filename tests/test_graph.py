"""Graph capture, simplification and sequential chains (lipbound.graph)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipbound.errors import InvalidArgumentError, NotSequentialError, ShapeError
from lipbound.graph import Node, OpGraph, capture, sequential_chain, simplify
from lipbound.graph.modules import FoldedBatchNorm


def run_graph(g: OpGraph, x: torch.Tensor) -> torch.Tensor:
    """Evaluate a graph node by node with each node's ``fn``."""
    vals: dict[str, torch.Tensor] = {}
    for n in g:
        if n.kind == "input":
            vals[n.name] = x
        else:
            vals[n.name] = n.fn(*[vals[i] for i in n.inputs])
    return vals[g.output.name]


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) + x


class Everything(nn.Module):
    """F.relu, torch.relu, x.relu(), add, cat, view/reshape/flatten/permute, scalar mul,
    a reused module and a nested module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.shared = nn.Linear(6, 6)
        self.inner = Inner()
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))  # (B, 3, 4, 4)
        y = y.permute(0, 2, 3, 1).reshape(y.size(0), -1)  # (B, 48)
        y = y.view(y.size(0), 8, 6)[:, 0]  # (B, 6)
        a = self.shared(y).relu()
        b = self.shared(a) * 0.5
        c = self.inner(b)
        z = torch.cat([c, torch.flatten(a.unsqueeze(1), 1)], dim=1)
        return self.head(z)


def test_capture_sees_functional_calls_reuse_and_nesting() -> None:
    g = capture(Everything(), (2, 4, 4))
    quals = [n.qualname for n in g]
    ops = [n.op for n in g]
    assert "shared (call 1)" in quals and "shared (call 2)" in quals
    assert any(q.startswith("inner.fc") for q in quals)
    assert any(q.startswith("inner.") and "torch.relu" in q for q in quals)  # nested functional
    for op in ("relu", "permute", "reshape", "view", "flatten", "cat", "mul", "add", "getitem"):
        assert op in ops, op
    kinds = {n.op: n.kind for n in g}
    assert kinds["relu"] == "activation" and kinds["cat"] == "op"
    assert kinds["mul"] == "linear" and kinds["add"] == "op"
    assert g.input.kind == "input" and g.output.kind == "output"
    assert g.input.out_shape == (2, 4, 4)
    # shape queries are not nodes
    assert "size" not in ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 5])
def test_node_functions_reproduce_the_model(dtype: torch.dtype, batch: int) -> None:
    model = Everything()
    g = capture(model, (2, 4, 4))
    x = torch.randn(batch, 2, 4, 4, dtype=dtype)
    ref = model.to(dtype)(x) if dtype == torch.float32 else model.double()(x)
    model.float()
    out = run_graph(g, x)  # float64 input: parameters cast on the fly
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref.to(dtype), rtol=1e-5, atol=1e-5)
    out2 = run_graph(simplify(g), x)
    torch.testing.assert_close(out2, ref.to(dtype), rtol=1e-5, atol=1e-5)


def test_topological_order_and_users() -> None:
    g = capture(Everything(), (2, 4, 4))
    seen: set[str] = set()
    for n in g:
        assert all(i in seen for i in n.inputs), n.qualname
        seen.add(n.name)
    assert g.users(g.input.name)  # someone consumes the input
    assert len(g) == len(list(g))


def test_eval_semantics_and_no_side_effects() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.ReLU())
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    net.train()
    before = net[1].running_mean.clone(), int(net[1].num_batches_tracked)
    g = simplify(capture(net, (3,)))
    assert net.training and net[1].training  # flags restored
    assert torch.equal(net[1].running_mean, before[0])
    assert int(net[1].num_batches_tracked) == before[1]
    x = torch.randn(7, 3)
    net.eval()
    torch.testing.assert_close(run_graph(g, x), net(x))
    net.train()
    torch.testing.assert_close(run_graph(g, x), net.eval()(x))  # graph is always eval


def test_simplify_merges_conv_bn_pool_flatten_linear() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3),
        nn.Identity(), nn.Dropout(), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 1),
    )
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.3, 3)
    net.eval()
    g = simplify(capture(net, (1, 6, 6)))
    mids = [n for n in g if n.kind not in ("input", "output")]
    assert [n.kind for n in mids] == ["linear", "activation", "linear"]
    first, _, last = mids
    assert isinstance(first.module, nn.Sequential)
    assert isinstance(first.module[0], FoldedBatchNorm)  # BN folded into the conv
    assert first.parts == ("0+1", "2", "3", "4")
    assert last.parts == ("8", "9")
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(run_graph(g, x), net(x))
    torch.testing.assert_close(first.module(x), net[:5](x))


def test_batchnorm_without_linear_parent_stays_a_diagonal_node() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2), nn.ReLU())
    net[2].running_var.fill_(4.0)
    g = simplify(capture(net, (1, 5, 5)))
    kinds = [n.kind for n in g][1:-1]
    assert kinds == ["linear", "activation", "linear", "activation"]
    bn = [n for n in g][3]
    W, _b = bn.dense()
    assert torch.allclose(W, torch.eye(18, dtype=torch.float64) * 0.5 / (1 + 1e-5 / 4) ** 0.5)


def test_dense_matches_the_layer_in_float64() -> None:
    lin = nn.Linear(5, 3)
    g = capture(nn.Sequential(lin), (5,))
    node = [n for n in g][1]
    W, b = node.dense()
    assert W.dtype == torch.float64 and W.shape == (3, 5)
    torch.testing.assert_close(W, lin.weight.double())
    torch.testing.assert_close(b, lin.bias.double())


def test_sequential_chain_accepts_chains_and_lists_every_offender() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Dropout(), nn.Linear(5, 5),
                        nn.ReLU(), nn.Linear(5, 1))
    chain = sequential_chain(simplify(capture(mlp, (2, 2))))
    assert [n.kind for n in chain] == ["linear", "activation"] * 2 + ["linear"]
    assert all(isinstance(n, Node) for n in chain)
    assert chain[1].slope_range == pytest.approx((0.0, 1.0), rel=1e-6)  # rounding margin
    assert chain[1].slope_range[0] <= 0.0 and chain[1].slope_range[1] >= 1.0

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(x + self.b(F.relu(self.a(x))))

    with pytest.raises(NotSequentialError) as info:
        sequential_chain(simplify(capture(Res(), (3,))))
    names = {n.qualname for n in info.value.nodes}
    assert "add (+)" in names  # two inputs
    assert any("sigmoid" in q for q in names)  # ends with an activation
    assert len(info.value.nodes) >= 2


def test_tuple_ops_and_shape_queries() -> None:
    class Split(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = torch.chunk(x, 2, dim=1)
            m = x.max(dim=1)[0]
            z = x.new_zeros(x.size(0), 1)
            return torch.cat([a - b, m.unsqueeze(1), z], dim=1)

    g = capture(Split(), (4,))
    x = torch.randn(3, 4)
    torch.testing.assert_close(run_graph(g, x), Split()(x))
    assert all(n.unsupported is None for n in g if n.kind not in ("input", "output"))


def test_capture_errors() -> None:
    class TwoInputs(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(InvalidArgumentError, match="one tensor"):
        capture(TwoInputs(), (3,))
    with pytest.raises(InvalidArgumentError, match=r"torch\.fx could not trace"):
        capture(Branchy(), (3,))
    with pytest.raises(ShapeError):
        capture(nn.Linear(3, 2), (4,))
    with pytest.raises(InvalidArgumentError):
        capture("not a model", (3,))  # type: ignore[arg-type]


def test_embedding_models_are_reported_not_crashed() -> None:
    from lipbound.errors import UnsupportedModelError

    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(idx)).sum(1)

    with pytest.raises(UnsupportedModelError, match="embedding") as info:
        capture(Emb(), (3,))
    assert [n.qualname for n in info.value.nodes] == ["emb"]


def test_node_functions_never_modify_their_inputs() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 1.0
            y *= 2.0
            y = self.act(y)
            y += x
            return F.relu(y, inplace=True).relu_()

    g = capture(InPlace(), (4,))
    for n in g:
        if n.kind in ("input", "output"):
            continue
        xs = [torch.randn(3, *s) for s in n.in_shapes]
        keep = [x.clone() for x in xs]
        n.fn(*xs)
        assert all(torch.equal(a, b) for a, b in zip(xs, keep)), n.qualname
    x = torch.randn(5, 4)
    torch.testing.assert_close(run_graph(simplify(g), x), InPlace()(x.clone()))
    W, _ = next(n for n in simplify(g) if n.kind == "linear").dense()
    torch.testing.assert_close(W, 2 * torch.eye(4, dtype=torch.float64))


def test_torch_export_fallback_when_fx_fails() -> None:
    from lipbound.methods.autolip import autolip

    class ShapeBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 4:  # fx cannot trace this; torch.export specialises on it
                x = F.max_pool2d(F.relu(self.c(x)), 3, 1)
            z = torch.zeros(x.size(0), 1)
            return torch.cat([self.fc(x.flatten(1)), z], 1)

    m = ShapeBranch().eval()
    g = capture(m, (1, 8, 8))
    assert [n.op for n in g][1:-1] == ["conv2d", "relu", "max_pool2d", "flatten", "linear", "cat"]
    x = torch.randn(5, 1, 8, 8)  # another batch size than the traced one
    torch.testing.assert_close(run_graph(simplify(g), x), m(x))
    r = autolip(m, (1, 8, 8))
    pool = next(lb for lb in r.layers if lb.op == "max_pool2d")
    assert 3.0 <= pool.value <= 3.0 * (1 + 1e-6)  # 3x3 stride-1 windows: 9 per input
    J = torch.func.vmap(torch.func.jacrev(lambda v: m(v.unsqueeze(0))[0]))(x)
    assert r.value >= float(torch.linalg.matrix_norm(J.detach().reshape(5, 4, -1), 2).max())


@pytest.mark.parametrize("bn", [False, True])
def test_regression_conv_node_dense_matrix_is_written_from_its_kernel(
        bn: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node.dense pushed every basis vector through a conv node (VGG-11 at 32x32: 7 s of
    lipsdp's 9.7 s, past its time limit); a zero-padded conv (and conv + BatchNorm) node now
    gets its matrix from the kernel, equal to the basis-vector one."""
    from lipbound.graph import types as graph_types
    from lipbound.spectral.certify import dense_matrix

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 5, 3, padding=1, stride=2)]
    if bn:
        norm = nn.BatchNorm2d(5)
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2.0)
        layers.append(norm)
    model = nn.Sequential(*layers, nn.ReLU()).eval()
    g = simplify(capture(model, (3, 6, 6)))
    (node,) = [n for n in g if n.kind == "linear"]
    # the reference: the unfolded layers in float64, from basis vectors
    W_ref, b_ref = dense_matrix(copy.deepcopy(model[:-1]).double(), (3, 6, 6))

    def basis_vectors(*a: object, **k: object) -> None:
        raise AssertionError("the conv node's matrix was built from basis vectors")

    monkeypatch.setattr(graph_types, "dense_matrix", basis_vectors)
    W, b = node.dense()
    torch.testing.assert_close(W, W_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, b_ref.reshape(-1), rtol=1e-6, atol=1e-6)  # float32 bias


def test_cast_parameters_follow_in_place_changes_and_replacements() -> None:
    """Inside a shared_casts block the float64 casts of a float32 module's parameters are made
    once (a Lanczos run cast a 25088 x 4096 weight at every step): a change in place (version
    counter) or a new storage (``.data = ...``) must give a fresh cast, never a stale one."""
    from lipbound.graph.capture import call_module_as
    from lipbound.spectral import shared_casts

    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3, dtype=torch.float64)

    def ref() -> torch.Tensor:
        return x @ lin.weight.detach().double().T + lin.bias.detach().double()

    with shared_casts():
        torch.testing.assert_close(call_module_as(lin, x), ref())
        torch.testing.assert_close(call_module_as(lin, x), ref())
        with torch.no_grad():
            lin.weight.mul_(2.0)
        torch.testing.assert_close(call_module_as(lin, x), ref())
        lin.weight.data = torch.zeros(2, 3)
        torch.testing.assert_close(call_module_as(lin, x), ref())
