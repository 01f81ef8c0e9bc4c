"""Fashion-MNIST from the local IDX files (offline), as uint8 arrays: the reader behind ``--dataset fashion-mnist``.

The IDX format is a big-endian header (magic, dimension sizes) followed by raw uint8 data; the files
ship gzipped. Environment default: ``/usr/share/datasets/fashion-mnist`` (override with
``TIMM_ICL_FASHION_MNIST``). The same data is :data:`HUB_ID` (``zalando-datasets/fashion_mnist``) on the Hub.

Example:
    >>> from timm_icl.data.fashion_mnist import load_fashion_mnist, local_files_available
    >>> if local_files_available("test"):
    ...     images, labels = load_fashion_mnist("test")     # uint8 [10000, 28, 28], int64 [10000]
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

__all__ = [
    "is_fashion_mnist",
    "load_fashion_mnist",
    "local_files_available",
    "fashion_mnist_root",
    "CLASS_NAMES",
    "HUB_ID",
    "DEFAULT_ROOT",
]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
HUB_ID = "zalando-datasets/fashion_mnist"
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FILES = {"train": "train", "test": "t10k"}


def is_fashion_mnist(spec: str | None) -> bool:
    """Whether a dataset spec names Fashion-MNIST: ``"fashion-mnist"``, ``"fashion_mnist"`` or ``"FashionMNIST"``, in
    any case (the Hub id :data:`HUB_ID` is a Hub dataset like any other)."""
    return bool(spec) and spec.lower().replace("_", "-") in ("fashion-mnist", "fashionmnist")


def fashion_mnist_root() -> Path:
    """The folder holding the IDX files (``$TIMM_ICL_FASHION_MNIST`` or the environment default)."""
    return Path(os.environ.get("TIMM_ICL_FASHION_MNIST", DEFAULT_ROOT))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    return None


def local_files_available(split: str = "train") -> bool:
    """Whether the IDX files for ``split`` ("train"/"test") are on disk."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST has no split {split!r}; its splits are {sorted(_FILES)} ('validation' = test)")
    prefix = _FILES[split]
    root = fashion_mnist_root()
    return all(_find(root, f"{prefix}-{kind}") is not None for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Read one split.

    Returns:
        ``(images [N, 28, 28] uint8, labels [N] int64)``; N = 60000 (train) or 10000 (test).
    """
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', got {split!r}")
    root = fashion_mnist_root()
    images_path = _find(root, f"{_FILES[split]}-images-idx3-ubyte")
    labels_path = _find(root, f"{_FILES[split]}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise FileNotFoundError(f"Fashion-MNIST IDX files for split {split!r} not found under {root}")
    images, labels = _read_idx(images_path), _read_idx(labels_path).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels
