"""Architectures of the paper's experiments, with random (seeded) weights.

>>> model, shape = get("mnist_cnn4")
>>> model(torch.zeros(2, *shape)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from . import cnn

__all__ = [
    "ZOO",
    "ZooEntry",
    "alexnet",
    "digits_mlp",
    "get",
    "mnist_cnn",
    "paper_mlp",
    "resnet18",
]


def paper_mlp(depth: int, *, width: int = 10, in_dim: int = 2, out_dim: int = 1) -> nn.Sequential:
    """ReLU MLP with ``depth`` Linear layers (``depth - 1`` hidden layers of ``width``).

    The paper's synthetic-function MLPs (2-D input, scalar output) have 4, 5, 7 and 10 layers;
    the paper does not state their width, we use 10 by default (SeqLip's exact enumeration
    stays cheap at that width).
    """
    if depth < 1:
        raise InvalidArgumentError(f"depth must be >= 1; got {depth!r}")
    dims = [in_dim] + [width] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def digits_mlp() -> nn.Sequential:
    """64-100-100-10 ReLU MLP for scikit-learn's 8x8 digits (flattened)."""
    return nn.Sequential(
        nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def mnist_cnn(depth: int = 4) -> nn.Sequential:
    """The paper's MNIST CNNs (input ``(1, 28, 28)``, 10 outputs), ReLU between convs.

    4 layers: conv 1->32 k5 s2, 32->64 k3 s2, 64->128 k3 s2, 128->10 k2. The 5-layer net adds a
    conv 64->64 k3 s1 p1 after the second conv; the 7- and 10-layer nets (not detailed in the
    paper) add 3 and 6 such convs there.
    """
    if depth not in (4, 5, 7, 10):
        raise InvalidArgumentError(f"depth must be one of 4, 5, 7, 10; got {depth!r}")
    layers: list[nn.Module] = [
        nn.Conv2d(1, 32, 5, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2),
        nn.ReLU(),
    ]
    for _ in range(depth - 4):
        layers += [nn.Conv2d(64, 64, 3, stride=1, padding=1), nn.ReLU()]
    layers += [
        nn.Conv2d(64, 128, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(128, 10, 2),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers)


class AlexNet(nn.Module):
    """AlexNet-shaped net (torchvision's layout), input ``(3, 224, 224)``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def alexnet(num_classes: int = 1000) -> AlexNet:
    """AlexNet-shaped net with random weights (no pretrained weights are downloaded)."""
    return AlexNet(num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18-shaped net (BasicBlocks [2, 2, 2, 2]), input ``(3, 224, 224)``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        chans = [64, 128, 256, 512]
        stages: list[nn.Module] = []
        cin = 64
        for i, c in enumerate(chans):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, c, stride), BasicBlock(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, *, random_bn_stats: bool = True) -> ResNet18:
    """ResNet-18-shaped net with random weights, in eval mode.

    With ``random_bn_stats`` the BatchNorm running statistics and affine parameters are drawn at
    random (as after training) so that folding them is not the identity.
    """
    net = ResNet18(num_classes)
    if random_bn_stats:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d) and m.running_var is not None:
                    m.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@dataclass(frozen=True)
class ZooEntry:
    """A built-in model: how to build it and the shape of one input sample."""

    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str


ZOO: dict[str, ZooEntry] = {
    **{
        f"mlp{d}": ZooEntry(
            functools.partial(paper_mlp, d),
            (2,),
            f"paper's synthetic-function MLP, {d} layers, width 10",
        )
        for d in (4, 5, 7, 10)
    },
    **{
        f"mnist_cnn{d}": ZooEntry(
            functools.partial(mnist_cnn, d), (1, 28, 28), f"paper's MNIST CNN, {d} conv layers"
        )
        for d in (4, 5, 7, 10)
    },
    "digits_mlp": ZooEntry(digits_mlp, (64,), "64-100-100-10 MLP for 8x8 digits"),
    "alexnet": ZooEntry(alexnet, (3, 224, 224), "AlexNet-shaped net (random weights)"),
    "resnet18": ZooEntry(resnet18, (3, 224, 224), "ResNet-18-shaped net (random weights)"),
    **{
        name: ZooEntry(getattr(cnn, name), (3, 224, 224), desc + " (random weights)")
        for name, desc in (
            ("resnet50", "ResNet-50, torchvision's layout"),
            ("vgg11", "VGG-11, torchvision's layout"),
            ("vgg16_bn", "VGG-16 with BatchNorm, torchvision's layout"),
            ("mobilenet_v2", "MobileNet-V2, torchvision's layout"),
            ("mobilenet_v3_small", "MobileNet-V3 small (SE, hard-swish), torchvision's layout"),
            ("densenet121", "DenseNet-121, torchvision's layout"),
            ("shufflenet_v2_x1_0", "ShuffleNet-V2 x1.0, torchvision's layout"),
            ("regnet_x_400mf", "RegNetX-400MF, torchvision's layout"),
            ("googlenet", "GoogLeNet without auxiliary heads, torchvision's layout"),
            ("squeezenet1_1", "SqueezeNet 1.1, torchvision's layout"),
            ("efficientnet_b0", "EfficientNet-B0 (MBConv + SE), torchvision's layout"),
        )
    },
}


def get(name: str, *, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Build the zoo model ``name`` with weights drawn from ``seed``, in eval mode."""
    if name not in ZOO:
        raise InvalidArgumentError(
            f"unknown zoo model {name!r}; available: {', '.join(sorted(ZOO))}"
        )
    entry = ZOO[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.factory()
    return model.eval(), entry.input_shape
