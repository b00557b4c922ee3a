"""Zoo: architectures have the paper's shapes, data sets are deterministic, MNIST loader works."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lipbound.errors import InvalidArgumentError
from lipbound.zoo import data, models, training


@pytest.mark.parametrize("name", sorted(models.ZOO))
def test_zoo_models_run_on_their_input_shape(name: str) -> None:
    model, shape = models.get(name)
    out = model(torch.zeros(2, *shape))
    assert out.shape[0] == 2
    assert not model.training


def test_get_is_seeded_and_rejects_unknown_names() -> None:
    a, _ = models.get("mlp4", seed=3)
    b, _ = models.get("mlp4", seed=3)
    c, _ = models.get("mlp4", seed=4)
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, c[0].weight)
    with pytest.raises(InvalidArgumentError, match="available"):
        models.get("vgg")


def test_mnist_cnn_layers_match_the_paper() -> None:
    convs = [m for m in models.mnist_cnn(4) if isinstance(m, nn.Conv2d)]
    spec = [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs]
    assert spec == [(1, 32, 5, 2), (32, 64, 3, 2), (64, 128, 3, 2), (128, 10, 2, 1)]
    convs5 = [m for m in models.mnist_cnn(5) if isinstance(m, nn.Conv2d)]
    assert (convs5[2].in_channels, convs5[2].out_channels, convs5[2].padding) == (64, 64, (1, 1))
    assert len([m for m in models.paper_mlp(7) if isinstance(m, nn.Linear)]) == 7


def test_synthetic_gp_is_deterministic_and_smooth() -> None:
    a = data.synthetic_gp(300, 100, seed=5)
    b = data.synthetic_gp(300, 100, seed=5)
    for s, t in zip(a, b):
        assert torch.equal(s, t)
    x, y = a[0], a[1]
    # a GP sample with an RBF kernel: nearby inputs have close outputs
    d = torch.cdist(x, x)
    i, j = torch.nonzero((d > 0) & (d < 0.05), as_tuple=True)
    if len(i):
        assert float((y[i] - y[j]).abs().max()) < 0.5


def test_digits28_shapes_and_range() -> None:
    xtr, ytr, xte, _ = data.digits28(seed=0)
    assert xtr.shape[1:] == (1, 28, 28) and xte.shape[1:] == (1, 28, 28)
    assert len(xtr) + len(xte) == 1797
    assert float(xtr.min()) >= 0 and float(xtr.max()) <= 1
    assert ytr.dtype == torch.int64 and set(ytr.tolist()) <= set(range(10))


def test_digits28_mnist_layout_box() -> None:
    full, _, _, _ = data.digits28(seed=0)
    boxed, _, _, _ = data.digits28(seed=0, box=20)
    assert boxed.shape == full.shape
    # MNIST's layout: the digit in the central 20x20 square, a 4-pixel zero border
    assert float(boxed[..., :4, :].abs().max()) == 0.0
    assert float(boxed[..., -4:, :].abs().max()) == 0.0
    assert float(boxed[..., :, :4].abs().max()) == 0.0
    assert float(boxed[..., 4:24, 4:24].max()) > 0.5
    assert float(full[..., :4, :].max()) > 0.0
    with pytest.raises(InvalidArgumentError, match="box"):
        data.digits28(box=30)


def _write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_reads_idx_files(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28))
    labels = rng.integers(0, 10, size=(7,))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, compress)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, compress)
    x, y = data.load_mnist(tmp_path, "test")
    assert x.shape == (7, 1, 28, 28)
    assert torch.allclose(x[:, 0] * 255, torch.tensor(images, dtype=torch.float32))
    assert y.tolist() == labels.tolist()
    with pytest.raises(InvalidArgumentError, match="never downloads"):
        data.load_mnist(tmp_path, "train")


def test_load_mnist_rejects_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05")
    with pytest.raises(InvalidArgumentError, match="IDX"):
        data.load_mnist(tmp_path, "train")


@pytest.mark.parametrize("compress", [False, True])
def test_mnist5k_reads_the_csv_format(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(8, 784))
    labels = np.arange(8) % 10
    text = "\n".join(",".join(map(str, [*p, lab])) for p, lab in zip(pixels, labels)) + "\n"
    f = tmp_path / ("mnist.csv.gz" if compress else "mnist.csv")
    if compress:
        with gzip.open(f, "wt") as g:
            g.write(text)
    else:
        f.write_text(text)
    xtr, ytr, xte, yte = data.mnist5k(path=f, test_fraction=0.25, seed=3)
    assert xtr.shape == (6, 1, 28, 28) and xte.shape == (2, 1, 28, 28)
    x = torch.cat([xtr, xte]).reshape(8, 784) * 255
    y = torch.cat([ytr, yte])
    # every image comes back with its own label, rows in row-major 28x28 order
    for img, lab in zip(x, y.tolist()):
        i = int(np.flatnonzero(labels == lab)[0])
        assert torch.allclose(img, torch.tensor(pixels[i], dtype=torch.float32), atol=1e-3)


def test_mnist5k_rejects_bad_files(tmp_path: Path) -> None:
    short = tmp_path / "short.csv"
    short.write_text("1,2,3\n")
    with pytest.raises(InvalidArgumentError, match="785"):
        data.mnist5k(path=short)
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(["300"] * 784 + ["1"]) + "\n")
    with pytest.raises(InvalidArgumentError, match=r"0\.\.255"):
        data.mnist5k(path=bad)
    with pytest.raises(InvalidArgumentError, match="no MNIST CSV"):
        data.mnist5k(path=tmp_path / "absent.csv")


def test_fit_reduces_the_loss() -> None:
    xtr, ytr, _, _ = data.synthetic_gp(256, 10, seed=0)
    model = models.paper_mlp(3)
    before = training.mse(model, xtr, ytr)
    training.fit(model, xtr, ytr, epochs=30, lr=1e-2)
    assert training.mse(model, xtr, ytr) < 0.9 * before
