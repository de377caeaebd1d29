"""Fixtures for the datamodule tests: tiny IDX files written on the fly (no real data needed)."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
                  np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def _write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzipped when the name ends in .gz), big-endian."""
    dtype = array.dtype if array.dtype.itemsize == 1 else array.dtype.newbyteorder(">")
    header = bytes([0, 0, IDX_TYPE_CODES[dtype], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as stream:
            stream.write(payload)
    else:
        path.write_bytes(payload)
    return path


@pytest.fixture
def write_idx() -> Callable[[Path, np.ndarray], Path]:
    """``write_idx(path, array)`` writes an IDX file."""
    return _write_idx


def make_mnist_like(n_train: int, n_test: int, size: int = 4, num_classes: int = 10, seed: int = 0):
    """Images whose first pixel is the sample's index within its split (mod 256), labels cycling 0..C-1."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        out[split] = (images, labels)
    return out


def write_mnist_like(directory: Path, data: dict, gz: bool = True) -> None:
    """Write the four MNIST-like files of ``make_mnist_like`` output into ``directory``."""
    ext = ".gz" if gz else ""
    for split, (images, labels) in data.items():
        _write_idx(directory / f"{split}-images-idx3-ubyte{ext}", images)
        _write_idx(directory / f"{split}-labels-idx1-ubyte{ext}", labels)


@pytest.fixture
def mnist_like() -> Callable[..., dict]:
    return make_mnist_like


@pytest.fixture
def write_mnist_files() -> Callable[..., None]:
    return write_mnist_like
