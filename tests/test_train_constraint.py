"""lipschitz_constraint / remove_lipschitz_constraint: the certified norm stays <= target."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lipbound.errors import InvalidArgumentError
from lipbound.train import lipschitz_constraint, remove_lipschitz_constraint
from lipbound.train._power import certified_layer_norm, dense_operator, layer_map
from lipbound.train.constraint import LipschitzConstraint

TOL = 1e-5  # float32 weights: relative rounding slack


def exact_norm(module: nn.Module, in_shape: tuple[int, ...]) -> float:
    """Dense float64 SVD of the layer's true operator, with its CURRENT (effective) weight."""
    fn = layer_map(module, module.weight.detach().double())
    return float(torch.linalg.matrix_norm(dense_operator(fn, in_shape), ord=2))


def train_steps(model: nn.Module, in_shape: tuple[int, ...], steps: int, out_dim: int) -> None:
    """Normalised gradient steps on a regression target that wants a LARGE Lipschitz constant
    (so the constraint is active). No torch.optim: its first step costs seconds of imports."""
    params = list(model.parameters())
    x = torch.randn(32, *in_shape)
    y = 10.0 * torch.randn(32, out_dim)
    model.train()
    for _ in range(steps):
        for p in params:
            p.grad = None
        F.mse_loss(model(x).reshape(32, -1), y).backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 0.3 * p.grad / (p.grad.norm() + 1e-12)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Linear(6, 4), (6,)),
        (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 7)),
        (nn.Conv2d(1, 4, 4, stride=3, padding=2, dilation=1), (1, 9, 9)),
        (nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"), (2, 8)),
        (nn.Conv3d(1, 2, 2, stride=2), (1, 4, 4, 4)),
    ],
)
def test_certified_norm_below_target_after_training(
    layer: nn.Module, shape: tuple[int, ...]
) -> None:
    target = 0.7
    lipschitz_constraint(layer, shape, max_norm=target)
    out_dim = int(layer(torch.zeros(1, *shape)).numel())
    train_steps(layer, shape, 25, out_dim)
    # without the constraint, training towards a big target pushes the norm way up
    raw = layer.parametrizations.weight.original.detach()
    raw_norm = float(torch.linalg.matrix_norm(
        dense_operator(layer_map(layer, raw.double()), shape), ord=2))
    assert raw_norm > target
    layer.eval()
    assert exact_norm(layer, shape) <= target * (1 + TOL)
    # the constraint is active: the norm is at the target, not far below
    assert exact_norm(layer, shape) >= 0.98 * target
    # and also through certified_layer_norm (Fourier path forced)
    if not isinstance(layer, nn.Linear) and layer.padding_mode == "zeros":
        assert certified_layer_norm(layer, shape, dense_limit=0)[0] <= target * 1.2


def test_reshaped_kernel_spectral_norm_is_not_enough() -> None:
    # torch's spectral_norm bounds the reshaped kernel; the conv operator can be larger
    torch.manual_seed(0)
    shape = (3, 8, 8)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    torch_sn = torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 3, 3, padding=1))
    with torch.no_grad():
        torch_sn.parametrizations.weight.original.copy_(conv.weight)
    for _ in range(50):
        torch_sn.weight  # noqa: B018 - power iterations in training mode
    torch_sn.eval()
    assert exact_norm(torch_sn, shape) > 1.2  # reshaped-kernel norm 1, true norm larger
    lipschitz_constraint(conv, shape, max_norm=1.0)
    conv.eval()
    assert exact_norm(conv, shape) <= 1.0 + TOL


def test_model_level_helper_constrains_every_called_layer_and_remove_keeps_weights() -> None:
    torch.manual_seed(0)
    # the paper's CNN layout (strided convs, ReLU, Flatten), on a smaller input
    model = nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.Conv2d(8, 3, 2), nn.Flatten(), nn.Linear(12, 2),
    )
    shape = (1, 15, 15)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    lipschitz_constraint(model, shape, max_norm=1.0)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)
    shapes = [(1, 15, 15), (4, 6, 6), (8, 3, 3), (12,)]
    assert [m.parametrizations.weight[0].in_shapes for m in layers] == [[s] for s in shapes]
    train_steps(model, shape, 3, 2)
    model.eval()
    with torch.no_grad():
        out_before = model(torch.ones(2, *shape))
    for m, s in zip(layers, shapes):
        assert exact_norm(m, s) <= 1.0 + TOL
    remove_lipschitz_constraint(model)
    assert not any(parametrize.is_parametrized(m) for m in layers)
    with torch.no_grad():
        assert torch.allclose(model(torch.ones(2, *shape)), out_before, atol=1e-5)
    for m, s in zip(layers, shapes):
        assert exact_norm(m, s) <= 1.0 + TOL
        assert exact_norm(m, s) >= 0.9  # the constraint was active (weights were scaled up)
    with pytest.raises(InvalidArgumentError):
        remove_lipschitz_constraint(model)


def test_reused_module_gets_one_vector_per_input_shape() -> None:
    class TwoSizes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.conv(x)
            b = self.conv(F.avg_pool2d(x, 2))
            return a.flatten(1)[:, :4] + b.flatten(1)[:, :4]

    net = TwoSizes()
    lipschitz_constraint(net, (1, 6, 6), max_norm=0.5)
    p = net.conv.parametrizations.weight[0]
    assert sorted(p.in_shapes) == [(1, 3, 3), (1, 6, 6)]
    net.eval()
    assert max(exact_norm(net.conv, (1, 6, 6)), exact_norm(net.conv, (1, 3, 3))) <= 0.5 * (1 + TOL)


def test_eval_does_not_update_vectors_and_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    shape = (2, 6, 6)
    conv = lipschitz_constraint(nn.Conv2d(2, 3, 3, stride=2, padding=1), shape, max_norm=0.5)
    train_steps(conv, shape, 4, 27)
    conv.eval()
    p = conv.parametrizations.weight[0]
    v = p.v0.clone()
    _ = conv.weight
    _ = conv(torch.randn(2, *shape))
    assert torch.equal(p.v0, v)
    steps = int(p.steps)
    conv.train()
    _ = conv.weight
    assert not torch.equal(p.v0, v)
    assert int(p.steps) == steps + 1
    state = conv.state_dict()
    assert {"parametrizations.weight.0.v0", "parametrizations.weight.0.calibration",
            "parametrizations.weight.0.steps", "parametrizations.weight.original"} <= set(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    torch.manual_seed(5)
    conv2 = lipschitz_constraint(nn.Conv2d(2, 3, 3, stride=2, padding=1), shape, max_norm=0.5)
    assert not torch.equal(conv2.parametrizations.weight[0].v0, p.v0)
    conv2.load_state_dict(torch.load(buf))
    assert torch.equal(conv2.parametrizations.weight[0].v0, p.v0)
    conv.eval()
    conv2.eval()
    assert torch.equal(conv2.weight, conv.weight)


def test_certify_every_calibrates_training_mode() -> None:
    torch.manual_seed(0)
    shape = (2, 7, 7)
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.mul_(5.0)
    lipschitz_constraint(conv, shape, max_norm=1.0, init_iterations=0, certify_every=1)
    conv.train()
    w = conv.weight  # training mode, certified at this very step
    p = conv.parametrizations.weight[0]
    assert float(p.calibration) >= 1.0
    fn = layer_map(conv, w.detach().double())
    assert float(torch.linalg.matrix_norm(dense_operator(fn, shape), 2)) <= 1.0 + TOL


def test_argument_errors() -> None:
    with pytest.raises(InvalidArgumentError):
        lipschitz_constraint(nn.Conv2d(1, 1, 3))  # conv needs an input shape
    with pytest.raises(InvalidArgumentError):
        lipschitz_constraint(nn.Linear(2, 2), max_norm=0.0)
    lin = lipschitz_constraint(nn.Linear(2, 2))
    with pytest.raises(InvalidArgumentError):
        lipschitz_constraint(lin)
    assert isinstance(lin.parametrizations.weight[0], LipschitzConstraint)
