"""The CNN families of :mod:`lipbound.zoo.cnn` have torchvision's structure.

The parameter counts are torchvision's published ``num_params`` of each architecture's ImageNet
weights (``torchvision.models.<Name>_Weights.IMAGENET1K_V1.meta["num_params"]``): equal counts
over ~20 differently shaped tensors is a strong check that every layer has the right shape.
"""

from __future__ import annotations

import pytest
import torch

from lipbound.errors import InvalidArgumentError
from lipbound.zoo import cnn, get

TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "vgg11": 132_863_336,
    "vgg16_bn": 138_365_992,
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_small": 2_542_856,
    "densenet121": 7_978_856,
    "shufflenet_v2_x1_0": 2_278_604,
    "regnet_x_400mf": 5_495_976,
    "googlenet": 6_624_904,
    "squeezenet1_1": 1_235_496,
    "efficientnet_b0": 5_288_548,
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision(name: str) -> None:
    model = getattr(cnn, name)()
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]
    assert not model.training


@pytest.mark.parametrize("name", sorted(set(TORCHVISION_PARAMS) - {"resnet18"}))
def test_zoo_entry_runs_at_32(name: str) -> None:
    torch.set_num_threads(1)
    model, shape = get(name, seed=1)
    assert shape == (3, 224, 224)
    with torch.no_grad():
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 1000) and bool(torch.isfinite(y).all())


def test_num_classes_and_seeded_weights() -> None:
    a = cnn.shufflenet_v2_x1_0(num_classes=7)
    assert a.fc.out_features == 7
    m1, _ = get("squeezenet1_1", seed=3)
    m2, _ = get("squeezenet1_1", seed=3)
    m3, _ = get("squeezenet1_1", seed=4)
    w1, w2, w3 = (next(m.parameters()) for m in (m1, m2, m3))
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    with pytest.raises(InvalidArgumentError, match="num_classes"):
        cnn.resnet50(num_classes=0)


def test_channel_shuffle_is_the_transpose_permutation() -> None:
    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    y = cnn.channel_shuffle(x, 2).flatten().tolist()
    assert y == [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]


def test_random_bn_stats_are_drawn_and_eval_dropout_is_identity() -> None:
    m = cnn.resnet50()
    bn = m.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    plain = cnn.resnet50(random_bn_stats=False)
    assert torch.equal(plain.bn1.running_var, torch.ones(64))
    e = cnn.efficientnet_b0(num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(e(x), e(x))
