"""LipschitzPenalty / penalty: values, gradients, warm-start state, structure handling."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipbound.errors import InvalidArgumentError, NotSequentialError, UnsupportedModelError
from lipbound.methods.autolip import autolip
from lipbound.train import LipschitzPenalty, penalty
from lipbound.train._power import dense_operator, layer_map


def exact_norm(module: nn.Module, in_shape: tuple[int, ...]) -> float:
    fn = layer_map(module, module.weight.detach().double())
    return float(torch.linalg.matrix_norm(dense_operator(fn, in_shape), ord=2))


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3), nn.ReLU(), nn.Linear(3, 1),
    )


class Reused(nn.Module):
    """F.relu, a module called twice and a residual connection."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(F.relu(self.fc(x))) + x
        return self.out(h)


class Wrap(nn.Module):
    """Calls the penalty: lets functional_call swap the model's weights for gradcheck."""

    def __init__(self, model: nn.Module, pen: LipschitzPenalty) -> None:
        super().__init__()
        self.model = model
        self.pen = pen

    def forward(self) -> torch.Tensor:
        return self.pen()


# ---- closed forms ---------------------------------------------------------------------------
def test_autolip_chain_is_log_product_of_true_operator_norms() -> None:
    net = small_cnn().double()
    pen = LipschitzPenalty(net, (1, 5, 5), init_iterations=300)
    exact = exact_norm(net[0], (1, 5, 5)) * exact_norm(net[3], (18,)) * exact_norm(net[5], (3,))
    val = float(pen().detach())
    assert abs(val - math.log(exact)) < 1e-6
    # the reshaped-kernel norm of the strided conv is a different number: we do not use it
    reshaped = float(torch.linalg.matrix_norm(net[0].weight.detach().reshape(2, -1), 2))
    assert abs(reshaped - exact_norm(net[0], (1, 5, 5))) > 1e-3


def test_seqlip_half_rule_closed_form() -> None:
    # f(x) = relu(x) + relu(-x) = |x|: L = 1, AutoLip = ||M2|| ||M1|| = 2, pair bound
    # (||M2 M1|| + ||M2|| ||M1||) / 2 = (0 + 2) / 2 = 1.
    net = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
    auto = LipschitzPenalty(net, (1,), init_iterations=30)
    seq = LipschitzPenalty(net, (1,), kind="seqlip", init_iterations=30)
    assert abs(float(auto().detach()) - math.log(2.0)) < 1e-5
    assert abs(float(seq().detach()) - 0.0) < 1e-5
    assert abs(seq.certified_bound() - 1.0) < 1e-6
    assert abs(auto.certified_bound() - 2.0) < 1e-6


def test_reused_module_and_functional_relu_follow_autolip_recursion() -> None:
    net = Reused().double()
    pen = LipschitzPenalty(net, (4,), init_iterations=200)
    assert [c.qualname for c in pen.plan.calls] == ["fc (call 1)", "fc (call 2)", "out"]
    s = exact_norm(net.fc, (4,))
    t = exact_norm(net.out, (4,))
    # AutoLip: L(fc o relu o fc) = s^2, the residual adds 1, then out
    assert abs(float(pen().detach()) - math.log(t * (s * s + 1))) < 1e-6
    # forward hooks see the same three calls, but not the wiring: only a product estimate
    hooks = LipschitzPenalty(net, (4,), init_iterations=200, structure="hooks")
    assert len(hooks.plan.calls) == 3 and not hooks.plan.exact
    assert abs(float(hooks().detach()) - math.log(s * s * t)) < 1e-6
    with pytest.raises(InvalidArgumentError):
        LipschitzPenalty(net, (4,), structure="hooks", certified=True)
    with pytest.raises(InvalidArgumentError):
        hooks.certified_bound()
    with pytest.raises(InvalidArgumentError):  # activations unknown: no pair bound
        LipschitzPenalty(net, (4,), structure="hooks", kind="seqlip")
    with pytest.raises(NotSequentialError):
        LipschitzPenalty(net, (4,), kind="seqlip")


def test_graph_and_sequential_parsers_agree() -> None:
    net = small_cnn()
    a = LipschitzPenalty(net, (1, 5, 5), structure="sequential", kind="seqlip")
    b = LipschitzPenalty(net, (1, 5, 5), kind="seqlip")
    # the graph path rounds every certified node constant up by ROUND_REL (2^-22)
    assert abs(a.certified_log() - b.certified_log()) < 1e-6


# ---- gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["autolip", "seqlip"])
def test_gradcheck_float64_fixed_vectors(kind: str) -> None:
    net = small_cnn().double()
    pen = LipschitzPenalty(net, (1, 5, 5), kind=kind, init_iterations=5).eval()
    wrap = Wrap(net, pen)
    names = ["model.0.weight", "model.3.weight", "model.5.weight"]
    params = dict(wrap.named_parameters())
    ws = tuple(params[n].detach().clone().requires_grad_(True) for n in names)

    def f(*w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(wrap, dict(zip(names, w)), ())

    assert torch.autograd.gradcheck(f, ws, eps=1e-6, atol=1e-6)


def test_gradcheck_residual_model() -> None:
    net = Reused().double()
    pen = LipschitzPenalty(net, (4,), init_iterations=5).eval()
    wrap = Wrap(net, pen)
    names = ["model.fc.weight", "model.out.weight"]
    params = dict(wrap.named_parameters())
    ws = tuple(params[n].detach().clone().requires_grad_(True) for n in names)

    def f(*w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(wrap, dict(zip(names, w)), ())

    assert torch.autograd.gradcheck(f, ws, eps=1e-6, atol=1e-6)


# ---- state: warm start, eval mode, state_dict ------------------------------------------------
def test_eval_does_not_update_and_train_does() -> None:
    net = small_cnn()
    pen = LipschitzPenalty(net, (1, 5, 5), init_iterations=0)
    before = {k: v.clone() for k, v in pen.state_dict().items()}
    pen.eval()
    pen()
    pen()
    for k, v in pen.state_dict().items():
        assert torch.equal(v, before[k])
    pen.train()
    pen()
    assert any(not torch.equal(v, before[k]) for k, v in pen.state_dict().items())


def test_warm_start_converges_across_steps() -> None:
    net = small_cnn().double()
    pen = LipschitzPenalty(net, (1, 5, 5), init_iterations=0, n_power_iterations=1)
    exact = exact_norm(net[0], (1, 5, 5)) * exact_norm(net[3], (18,)) * exact_norm(net[5], (3,))
    vals = [float(pen().detach()) for _ in range(200)]
    assert vals[0] < math.log(exact) - 1e-3  # a random start is far off
    assert abs(vals[-1] - math.log(exact)) < 1e-6  # one iteration per step suffices


@pytest.mark.parametrize("kind", ["autolip", "seqlip"])
def test_state_dict_round_trip(kind: str) -> None:
    torch.manual_seed(1)
    net = small_cnn()
    pen = LipschitzPenalty(net, (1, 5, 5), kind=kind, init_iterations=0)
    for _ in range(3):
        pen()  # training mode: vectors move
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "pen": pen.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf)
    torch.manual_seed(2)
    net2 = small_cnn()
    net2.load_state_dict(state["model"])
    pen2 = LipschitzPenalty(net2, (1, 5, 5), kind=kind, init_iterations=0).eval()
    pen.eval()
    assert float(pen2().detach()) != float(pen().detach())  # fresh vectors differ
    pen2.load_state_dict(state["pen"])
    assert float(pen2().detach()) == float(pen().detach())
    for k, v in pen.state_dict().items():
        assert torch.equal(pen2.state_dict()[k], v)
    assert set(pen.state_dict()) == set(pen2.state_dict())


def test_buffers_follow_the_model_dtype() -> None:
    net = small_cnn()
    pen = LipschitzPenalty(net, (1, 5, 5))
    net.double()
    out = pen()
    assert out.dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in pen.state_dict().values())


# ---- value vs certified bound -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["autolip", "seqlip"])
def test_estimate_below_certified_and_certified_above_true_bound(kind: str) -> None:
    torch.manual_seed(3)
    net = small_cnn()
    pen = LipschitzPenalty(net, (1, 5, 5), kind=kind, init_iterations=2)
    est = float(pen().detach())
    cert = pen.certified_log()
    assert est <= cert + 1e-6  # the estimate is from below
    cpen = LipschitzPenalty(net, (1, 5, 5), kind=kind, certified=True, init_iterations=2)
    val = cpen()
    assert abs(float(val.detach()) - cert) < 1e-6
    val.backward()
    assert net[0].weight.grad is not None and bool(net[0].weight.grad.abs().sum() > 0)
    # the AutoLip product with exact norms (the bound it stands for) is below the certified value
    exact = exact_norm(net[0], (1, 5, 5)) * exact_norm(net[3], (18,)) * exact_norm(net[5], (3,))
    if kind == "autolip":
        assert cert >= math.log(exact) - 1e-9
    else:
        assert cert <= LipschitzPenalty(net, (1, 5, 5)).certified_log() + 1e-9
    # any Jacobian norm is a lower bound of L <= exp(cert)
    x = torch.randn(16, 1, 5, 5)
    for i in range(16):
        jac = torch.autograd.functional.jacobian(lambda z: net(z.unsqueeze(0)).squeeze(0), x[i])
        assert float(torch.linalg.matrix_norm(jac.reshape(1, -1), 2)) <= math.exp(cert) * (1 + 1e-6)


def test_certified_matches_lipbound_autolip_on_mlp() -> None:
    from lipbound.zoo.models import paper_mlp

    net = paper_mlp(4)
    res = autolip(net, (2,))
    val = float(penalty(net, (2,), certified=True).detach())
    assert math.exp(val) >= res.upper * (1 - 1e-6)
    assert math.exp(val) <= res.upper * (1 + 1e-6)


def test_functional_penalty_and_errors() -> None:
    net = small_cnn()
    p = penalty(net, (1, 5, 5), n_power_iterations=200)
    exact = exact_norm(net[0], (1, 5, 5)) * exact_norm(net[3], (18,)) * exact_norm(net[5], (3,))
    assert abs(float(p.detach()) - math.log(exact)) < 1e-3
    with pytest.raises(InvalidArgumentError):
        penalty(net, (1, 5, 5), kind="frobenius")
    with pytest.raises(InvalidArgumentError):
        LipschitzPenalty(net, (1, 5, 5), n_power_iterations=-1)
    with pytest.raises(UnsupportedModelError):
        LipschitzPenalty(nn.Sequential(nn.ReLU()), (3,))


def test_minimising_the_penalty_shrinks_the_certified_bound() -> None:
    torch.manual_seed(0)
    net = small_cnn()
    pen = LipschitzPenalty(net, (1, 5, 5))
    start = pen.certified_bound()
    params = list(net.parameters())
    for _ in range(30):  # normalised gradient steps (no torch.optim: slow first import)
        for p in params:
            p.grad = None
        pen().backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 0.05 * p.grad / (p.grad.norm() + 1e-12)
    assert pen.certified_bound() < 0.5 * start


class BNRes(nn.Module):
    """conv -> BatchNorm -> relu, a residual block with BatchNorm, avg-pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_batchnorm_folds_into_its_layer_like_autolip() -> None:
    torch.manual_seed(0)
    net = BNRes().eval()
    with torch.no_grad():
        for bn in (net.bn, net.bn2):
            bn.running_var.uniform_(0.2, 0.5)  # BN scales up to ~2.2: folding matters
            bn.weight.uniform_(0.5, 1.5)
    pen = LipschitzPenalty(net, (2, 5, 5), init_iterations=300)
    groups = [[n.qualname for n in g] for g in pen._groups]
    assert ["conv", "bn"] in groups and ["conv2", "bn2"] in groups
    ref = autolip(net, (2, 5, 5)).upper
    cert = pen.certified_bound()
    assert abs(cert - ref) <= 1e-6 * ref  # every factor is small enough for a dense SVD
    est = float(pen().detach().exp())
    assert est <= cert * (1 + 1e-9) and est >= 0.999 * cert
    # not folding (product of the layer norm and the BN constant) would be far looser
    loose = exact_norm(net.conv, (2, 5, 5)) * float(
        (net.bn.weight / torch.sqrt(net.bn.running_var + net.bn.eps)).detach().abs().max()
    )
    assert loose > 1.2 * exact_norm_folded(net.conv, net.bn, (2, 5, 5))


def exact_norm_folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, shape: tuple[int, ...]) -> float:
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    w = conv.weight.detach().double() * scale.reshape(-1, 1, 1, 1)
    fn = layer_map(conv, w)
    return float(torch.linalg.matrix_norm(dense_operator(fn, shape), ord=2))
