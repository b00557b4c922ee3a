"""Built-in networks and data of the paper's experiments (no downloads, ever).

* :mod:`lipbound.zoo.models`: the paper's synthetic-function MLPs and MNIST CNNs, an
  AlexNet-shaped and a ResNet-18-shaped net, a 64-100-100-10 digits MLP.
* :mod:`lipbound.zoo.data`: the paper's synthetic 2-D function (a Gaussian-process sample),
  scikit-learn's digits upsampled to 28x28, and a loader for MNIST files in a local folder.
* :mod:`lipbound.zoo.training`: a small, seeded training loop for the benchmarks and the demo.
"""

from .models import ZOO, ZooEntry, alexnet, get, mnist_cnn, paper_mlp, resnet18

__all__ = ["ZOO", "ZooEntry", "alexnet", "get", "mnist_cnn", "paper_mlp", "resnet18"]
