"""The common ImageNet CNN families, re-implemented with torchvision's layer structure.

torchvision is not a dependency (its wheels are tied to CUDA builds), so these are written from
the published architectures with the same modules, shapes and forward passes as torchvision's
definitions (``torchvision.models.*``): ResNet-18/50, VGG-11, VGG-16-BN, MobileNet-V2,
MobileNet-V3 (small), DenseNet-121, ShuffleNet-V2 x1.0, RegNetX-400MF, GoogLeNet (no auxiliary
heads: they only run in training), SqueezeNet 1.1 and EfficientNet-B0. The heads are functional
where torchvision's are (``torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)``,
``x.mean([2, 3])``), and every net takes ``num_classes`` and works at any input size from
``32x32`` up (adaptive pooling before the classifier).

Weights are random (seeded by the caller, e.g. :func:`lipbound.zoo.get`), drawn as
torchvision initialises each family (see :func:`_tv_init`); with ``random_bn_stats``
(default) the BatchNorm running statistics and affine parameters are drawn at random as after
training, so folding them is not the identity. Every factory returns the model in eval mode.

>>> model = resnet50(num_classes=10)
>>> model(torch.zeros(1, 3, 32, 32)).shape
torch.Size([1, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError

__all__ = [
    "densenet121",
    "efficientnet_b0",
    "googlenet",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "resnet18",
    "resnet50",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "vgg11",
    "vgg16_bn",
]


def randomise_batchnorm(net: nn.Module) -> nn.Module:
    """Draw every BatchNorm's running statistics and affine parameters at random, in place:
    mean ``U(-0.5, 0.5)``, variance ``U(0.5, 2)``, weight ``U(0.5, 1.5)``, bias
    ``U(-0.2, 0.2)`` (the same draws as :func:`lipbound.zoo.models.resnet18`)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return net


def _tv_init(net: nn.Module, scheme: str) -> None:
    """torchvision's weight initialisation of each family (it is part of the definitions):

    * ``"fan_out"`` (ResNet, VGG, MobileNets, EfficientNet, RegNet): convolutions
      ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, bias 0;
    * ``"fan_in"`` (DenseNet): convolutions ``kaiming_normal_`` (fan in);
    * ``"trunc"`` (GoogLeNet): convolutions and linears ``trunc_normal_(std=0.01, -2, 2)``;
    * ``"squeeze"`` (SqueezeNet): convolutions ``kaiming_uniform_``, the final one
      ``normal_(0, 0.01)``, biases 0;
    * ``"default"`` (ShuffleNet): PyTorch's default.

    Linear layers: ``normal_(0, 0.01)`` for VGG, MobileNets and RegNet,
    ``uniform_(+-1/sqrt(out))`` for EfficientNet, PyTorch's default otherwise; their biases 0
    where the weights are redrawn, except GoogLeNet's (default). BatchNorm: weight 1, bias 0
    (then drawn again by ``random_bn_stats``).
    """
    if scheme == "default":
        return
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            if scheme == "trunc":
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            elif scheme == "squeeze":
                if m is convs[-1]:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
            elif scheme == "fan_in":
                nn.init.kaiming_normal_(m.weight)
            else:  # fan_out, fan_out_linear, effnet
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if scheme == "trunc":
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            elif scheme == "effnet":
                r = 1.0 / m.out_features**0.5
                nn.init.uniform_(m.weight, -r, r)
            elif scheme == "fan_out_linear":
                nn.init.normal_(m.weight, 0.0, 0.01)
            if scheme in ("fan_in", "fan_out_linear", "effnet") and m.bias is not None:
                nn.init.zeros_(m.bias)


def _finish(net: nn.Module, random_bn_stats: bool, scheme: str = "fan_out") -> nn.Module:
    with torch.no_grad():
        _tv_init(net, scheme)
    if random_bn_stats:
        randomise_batchnorm(net)
    return net.eval()


def _check_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise InvalidArgumentError(f"num_classes must be a positive integer; got {num_classes!r}")


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``min_value``), never more
    than 10% below ``v`` (the channel rounding of the MobileNet family)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Sequential):
    """``conv -> BatchNorm -> activation`` (torchvision's ``Conv2dNormActivation``): "same"
    padding ``(k - 1) // 2 * dilation``, no conv bias; ``act=None`` for no activation."""

    def __init__(
        self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
        act: Callable[..., nn.Module] | None = nn.ReLU, eps: float = 1e-5,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(cout, eps=eps),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """``x * scale(fc2(act(fc1(avgpool(x)))))`` (torchvision's ``ops.SqueezeExcitation``).

    A product of two functions of ``x``: it has no global Lipschitz constant, so AutoLip
    refuses it (the expected outcome)."""

    def __init__(
        self, channels: int, squeeze: int, act: Callable[..., nn.Module] = nn.ReLU,
        scale: Callable[..., nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(s)


class StochasticDepth(nn.Module):
    """Drops the whole residual branch of a sample with probability ``p`` in training ("row"
    mode, torchvision's ``ops.StochasticDepth``); the identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x * mask.bernoulli_(keep).div_(keep)


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet V1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ``ResNet``: 7x7 stem, max-pool, four stages, average pool, ``fc``."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 num_classes: int = 1000) -> None:
        super().__init__()
        _check_classes(num_classes)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, 64, layers[0], 1)
        self.layer2 = self._stage(block, 128, layers[1], 2)
        self.layer3 = self._stage(block, 256, layers[2], 2)
        self.layer4 = self._stage(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], width: int, n: int,
               stride: int) -> nn.Sequential:
        out = width * block.expansion
        down = None
        if stride != 1 or self.inplanes != out:
            down = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride, bias=False),
                                 nn.BatchNorm2d(out))
        blocks: list[nn.Module] = [block(self.inplanes, width, stride, down)]
        self.inplanes = out
        blocks += [block(out, width) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, *, random_bn_stats: bool = True) -> nn.Module:
    """ResNet-18 (BasicBlocks ``[2, 2, 2, 2]``), random weights, eval mode."""
    return _finish(ResNet(BasicBlock, [2, 2, 2, 2], num_classes), random_bn_stats)


def resnet50(num_classes: int = 1000, *, random_bn_stats: bool = True) -> nn.Module:
    """ResNet-50 (V1.5 Bottlenecks ``[3, 4, 6, 3]``), random weights, eval mode."""
    return _finish(ResNet(Bottleneck, [3, 4, 6, 3], num_classes), random_bn_stats)


# --------------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------------
_VGG_CFG: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"],
}


class VGG(nn.Module):
    """torchvision's ``VGG``: conv features, ``AdaptiveAvgPool2d((7, 7))``, 3-layer classifier
    (at inputs below 224 the pool replicates the last map up to 7x7, as torchvision does)."""

    def __init__(self, cfg: Sequence[int | str], batch_norm: bool, num_classes: int = 1000,
                 dropout: float = 0.5) -> None:
        super().__init__()
        _check_classes(num_classes)
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            cout = int(v)
            layers.append(nn.Conv2d(cin, cout, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg11(num_classes: int = 1000, *, random_bn_stats: bool = True) -> nn.Module:
    """VGG-11 (configuration A, no BatchNorm), random weights, eval mode."""
    return _finish(VGG(_VGG_CFG["A"], False, num_classes), random_bn_stats, "fan_out_linear")


def vgg16_bn(num_classes: int = 1000, *, random_bn_stats: bool = True) -> nn.Module:
    """VGG-16 with BatchNorm (configuration D), random weights, eval mode."""
    return _finish(VGG(_VGG_CFG["D"], True, num_classes), random_bn_stats, "fan_out_linear")


# --------------------------------------------------------------------------------------------
# MobileNet-V2
# --------------------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    """MobileNet-V2 block: 1x1 expansion (ReLU6), 3x3 depthwise (ReLU6), linear 1x1
    projection; residual when the stride is 1 and the widths match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``MobileNetV2`` (width 1.0); head
    ``flatten(adaptive_avg_pool2d(x, (1, 1)), 1)``, dropout, ``Linear(1280, num_classes)``."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        _check_classes(num_classes)
        setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                   [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
        cin, last = _make_divisible(32), _make_divisible(1280)
        feats: list[nn.Module] = [ConvBNAct(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in setting:
            cout = _make_divisible(c)
            for i in range(n):
                feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        feats.append(ConvBNAct(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, *, random_bn_stats: bool = True) -> nn.Module:
    """MobileNet-V2 (width 1.0), random weights, eval mode."""
    return _finish(MobileNetV2(num_classes), random_bn_stats, "fan_out_linear")


# --------------------------------------------------------------------------------------------
# MobileNet-V3 (small)
# --------------------------------------------------------------------------------------------
class InvertedResidualV3(nn.Module):
    """MobileNet-V3 block: optional 1x1 expansion, ``k x k`` depthwise, optional
    squeeze-excitation (hard-sigmoid gate), linear 1x1 projection, residual when possible."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool,
                 stride: int) -> None:
        super().__init__()
        act: Callable[..., nn.Module] = nn.Hardswish if hs else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(ConvBNAct(cin, exp, 1, act=act, eps=0.001))
        layers.append(ConvBNAct(exp, exp, k, stride, groups=exp, act=act, eps=0.001))
        if se:
            layers.append(SqueezeExcitation(exp, _make_divisible(exp // 4, 8),
                                            scale=nn.Hardsigmoid))
        layers.append(ConvBNAct(exp, cout, 1, act=None, eps=0.001))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(nn.Module):
    """torchvision's ``mobilenet_v3_small``: hard-swish stem, 11 V3 blocks (9 with SE),
    576-wide last conv, average pool, ``Linear(576, 1024)``, hard-swish, dropout, ``Linear``."""

    # in, kernel, expanded, out, SE, hard-swish, stride
    SMALL = ((16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2),
             (24, 3, 88, 24, False, False, 1), (24, 5, 96, 40, True, True, 2),
             (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
             (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1),
             (48, 5, 288, 96, True, True, 2), (96, 5, 576, 96, True, True, 1),
             (96, 5, 576, 96, True, True, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        _check_classes(num_classes)
        feats: list[nn.Module] = [ConvBNAct(3, 16, 3, 2, act=nn.Hardswish, eps=0.001)]
        feats += [InvertedResidualV3(*cfg) for cfg in self.SMALL]
        feats.append(ConvBNAct(96, 576, 1, act=nn.Hardswish, eps=0.001))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024), nn.Hardswish(inplace=True), nn.Dropout(p=dropout, inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3_small(num_classes: int = 1000, *, random_bn_stats: bool = True) -> nn.Module:
    """MobileNet-V3 small (squeeze-excitation, hard-swish), random weights, eval mode."""
    return _finish(MobileNetV3(num_classes), random_bn_stats, "fan_out_linear")


# --------------------------------------------------------------------------------------------
# DenseNet-121
# --------------------------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    """``BN-ReLU-conv1x1(4 g)-BN-ReLU-conv3x3(g)`` on the concatenation of all earlier maps."""

    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n: int, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision's ``DenseNet``; head ``flatten(adaptive_avg_pool2d(relu(features(x)), 1))``
    then ``Linear``."""

    def __init__(self, growth: int = 32, blocks: Sequence[int] = (6, 12, 24, 16),
                 init_features: int = 64, bn_size: int = 4, num_classes: int = 1000) -> None:
        super().__init__()
        _check_classes(num_classes)
        feats = nn.Sequential()
        feats.add_module("conv0", nn.Conv2d(3, init_features, 7, 2, 3, bias=False))
        feats.add_module("norm0", nn.BatchNorm2d(init_features))
        feats.add_module("relu0", nn.ReLU(inplace=True))
        feats.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        c = init_features
        for i, n in enumerate(blocks):
            feats.add_module(f"denseblock{i + 1}", _DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:
                feats.add_module(f"transition{i + 1}", _Transition(c, c // 2))
                c //= 2
        feats.add_module("norm5", nn.BatchNorm2d(c))
        self.features = feats
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def densenet121(num_classes: int = 1000, *, random_bn_stats: bool = True) -> nn.Module:
    """DenseNet-121 (growth 32, blocks ``(6, 12, 24, 16)``), random weights, eval mode."""
    return _finish(DenseNet(num_classes=num_classes), random_bn_stats, "fan_in")


# --------------------------------------------------------------------------------------------
# ShuffleNet-V2
# --------------------------------------------------------------------------------------------
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(b, g * c, h, w) -> view (b, g, c, h, w) -> transpose(1, 2) -> (b, c * g, h, w)``."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNet-V2 unit: stride 1 splits the channels in halves (one passes through), stride
    2 runs two branches on the whole input; concatenation, then channel shuffle (2 groups)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, 1, 0, bias=False), nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        c2 = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(c2, half, 1, 1, 0, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, 1, 0, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision's ``shufflenet_v2_x1_0``: repeats ``[4, 8, 4]``, widths
    ``[24, 116, 232, 464, 1024]``; head ``x.mean([2, 3])`` then ``fc``."""

    def __init__(self, repeats: Sequence[int] = (4, 8, 4),
                 widths: Sequence[int] = (24, 116, 232, 464, 1024),
                 num_classes: int = 1000) -> None:
        super().__init__()
        _check_classes(num_classes)
        self.conv1 = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = widths[0]
        stages = []
        for n, cout in zip(repeats, widths[1:4]):
            blocks = [ShuffleBlock(cin, cout, 2)] + [ShuffleBlock(cout, cout, 1)
                                                     for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = nn.Sequential(nn.Conv2d(cin, widths[-1], 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))


def shufflenet_v2_x1_0(num_classes: int = 1000, *, random_bn_stats: bool = True) -> nn.Module:
    """ShuffleNet-V2 x1.0, random weights, eval mode."""
    return _finish(ShuffleNetV2(num_classes=num_classes), random_bn_stats, "default")


# --------------------------------------------------------------------------------------------
# RegNetX
# --------------------------------------------------------------------------------------------
class ResBottleneckBlock(nn.Module):
    """RegNet block: ``act(proj(x) + f(x))``, ``f = 1x1, 3x3 grouped (stride), 1x1`` (no SE
    in the X variants); ``proj`` a 1x1 conv + BN when the shape changes, else the identity."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int) -> None:
        super().__init__()
        self.proj: nn.Module | None = None
        if cin != cout or stride != 1:
            self.proj = ConvBNAct(cin, cout, 1, stride, act=None)
        self.f = nn.Sequential()
        self.f.add_module("a", ConvBNAct(cin, cout, 1))
        self.f.add_module("b", ConvBNAct(cout, cout, 3, stride, groups=cout // group_width))
        self.f.add_module("c", ConvBNAct(cout, cout, 1, act=None))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class RegNet(nn.Module):
    """torchvision's ``RegNet`` with the stage parameters given directly: 3x3 stride-2 stem of
    width 32, stages of :class:`ResBottleneckBlock` (first block strided), average pool, ``fc``.
    """

    def __init__(self, depths: Sequence[int], widths: Sequence[int], group_width: int,
                 num_classes: int = 1000, stem_width: int = 32) -> None:
        super().__init__()
        _check_classes(num_classes)
        self.stem = ConvBNAct(3, stem_width, 3, 2)
        trunk = nn.Sequential()
        cin = stem_width
        for i, (d, w) in enumerate(zip(depths, widths)):
            stage = nn.Sequential()
            for j in range(d):
                stage.add_module(f"block{i + 1}-{j}", ResBottleneckBlock(
                    cin if j == 0 else w, w, 2 if j == 0 else 1, min(group_width, w)))
            trunk.add_module(f"block{i + 1}", stage)
            cin = w
        self.trunk_output = trunk
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


def regnet_x_400mf(num_classes: int = 1000, *, random_bn_stats: bool = True) -> nn.Module:
    """RegNetX-400MF (stage depths ``[1, 2, 7, 12]``, widths ``[32, 64, 160, 400]``, group
    width 16, bottleneck ratio 1: what torchvision derives from ``w_0 = 24, w_a = 24.48,
    w_m = 2.54, depth 22``), random weights, eval mode."""
    return _finish(RegNet([1, 2, 7, 12], [32, 64, 160, 400], 16, num_classes), random_bn_stats,
                   "fan_out_linear")


# --------------------------------------------------------------------------------------------
# GoogLeNet
# --------------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """``relu(bn(conv(x)))``, BatchNorm ``eps=0.001`` (GoogLeNet's unit)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision uses 3x3 where the
    paper has 5x5, kept for fidelity); 3x3 max-pool (stride 1, ceil) -> 1x1."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int,
                 pool_proj: int) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, kernel_size=1),
                                     BasicConv2d(c3r, c3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, kernel_size=1),
                                     BasicConv2d(c5r, c5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(cin, pool_proj, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    """torchvision's ``GoogLeNet`` in eval mode (``aux_logits=False``,
    ``transform_input=False``); head ``flatten(avgpool(x), 1)``, dropout 0.2, ``fc``."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        _check_classes(num_classes)
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4c(self.inception4b(self.inception4a(x)))
        x = self.maxpool4(self.inception4e(self.inception4d(x)))
        x = self.inception5b(self.inception5a(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def googlenet(num_classes: int = 1000, *, random_bn_stats: bool = True) -> nn.Module:
    """GoogLeNet (Inception v1, no auxiliary heads), random weights, eval mode."""
    return _finish(GoogLeNet(num_classes), random_bn_stats, "trunc")


# --------------------------------------------------------------------------------------------
# SqueezeNet 1.1
# --------------------------------------------------------------------------------------------
class Fire(nn.Module):
    """``squeeze 1x1 (ReLU)`` then ``cat(expand 1x1 (ReLU), expand 3x3 (ReLU))``."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """torchvision's ``squeezenet1_1``: classifier ``dropout, conv1x1, ReLU,
    AdaptiveAvgPool2d(1)``, then ``flatten``."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        _check_classes(num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Conv2d(512, num_classes, kernel_size=1),
            nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet1_1(num_classes: int = 1000) -> nn.Module:
    """SqueezeNet 1.1 (no BatchNorm), random weights, eval mode."""
    return _finish(SqueezeNet(num_classes), False, "squeeze")


# --------------------------------------------------------------------------------------------
# EfficientNet-B0
# --------------------------------------------------------------------------------------------
class MBConv(nn.Module):
    """EfficientNet block: optional 1x1 expansion (SiLU), ``k x k`` depthwise (SiLU),
    squeeze-excitation (SiLU, sigmoid gate; squeeze width ``cin // 4``), linear 1x1
    projection; stochastic depth on the residual branch."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int,
                 sd_prob: float) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = _make_divisible(cin * expand, 8)
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(ConvBNAct(cin, hidden, 1, act=nn.SiLU))
        layers += [
            ConvBNAct(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcitation(hidden, max(1, cin // 4), act=nn.SiLU),
            ConvBNAct(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNet(nn.Module):
    """torchvision's ``efficientnet_b0``: SiLU stem, 16 MBConv blocks in 7 stages (stochastic
    depth probability rising linearly to 0.2), 1280-wide 1x1 conv, average pool, dropout,
    ``Linear``."""

    # expand, kernel, stride, in, out, repeats
    B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
          (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
          (6, 3, 1, 192, 320, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2,
                 stochastic_depth_prob: float = 0.2) -> None:
        super().__init__()
        _check_classes(num_classes)
        feats: list[nn.Module] = [ConvBNAct(3, 32, 3, 2, act=nn.SiLU)]
        total = sum(cfg[5] for cfg in self.B0)
        idx = 0
        for e, k, s, cin, cout, n in self.B0:
            stage = []
            for j in range(n):
                p = stochastic_depth_prob * idx / total
                stage.append(MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e, p))
                idx += 1
            feats.append(nn.Sequential(*stage))
        feats.append(ConvBNAct(320, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True),
                                        nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def efficientnet_b0(num_classes: int = 1000, *, random_bn_stats: bool = True) -> nn.Module:
    """EfficientNet-B0 (MBConv with squeeze-excitation), random weights, eval mode."""
    return _finish(EfficientNet(num_classes), random_bn_stats, "effnet")
