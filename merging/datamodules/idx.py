"""IDX files (the MNIST family's format), read with numpy, gzipped or not.

An IDX file is a big-endian header: two zero bytes, a type code (``0x08`` unsigned byte,
``0x09`` signed byte, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64),
the number of dimensions, then one uint32 size per dimension, then the data in C order.
Image files of MNIST-like datasets start with the magic number 2051 (``0x00000803``:
``(N, H, W)`` bytes), label files with 2049 (``0x00000801``: ``(N,)`` bytes).

This is how Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist``): four ``.gz`` IDX files in
``/usr/share/datasets/fashion-mnist/`` (:data:`DEBIAN_FASHION_MNIST_DIR`).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the Fashion-MNIST IDX files."""

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_FILE_STEMS: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The four files of an MNIST-like dataset (each may also end in ``.gz``)."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into a native-endian numpy array.

    Args:
        path: the file.

    Returns:
        The array, of the shape and type the header declares.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the header is malformed or the data size does not match it (the message
            names the file).
    """
    return _read_idx_with_magic(Path(path))[1]


def _read_idx_with_magic(path: Path) -> tuple[int, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        raw = stream.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (the header must start with two zero bytes)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02X}")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {shape} of {dtype} ({expected} bytes), "
            f"but {len(raw) - header_end} data bytes follow"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
    return int.from_bytes(raw[:4], "big"), data.astype(dtype.newbyteorder("="), copy=True)


def _read_checked(path: Path, magic: int) -> np.ndarray:
    found, array = _read_idx_with_magic(path)
    if found != magic:
        raise ValueError(f"{path}: expected IDX magic number {magic}, found {found}")
    return array


def read_idx_images(path: str | Path) -> Tensor:
    """Read an IDX image file (magic 2051) as a ``uint8`` tensor ``(N, H, W)``.

    Raises:
        ValueError: wrong magic number or shape (names the file).
    """
    return torch.from_numpy(_read_checked(Path(path), IMAGES_MAGIC))


def read_idx_labels(path: str | Path) -> Tensor:
    """Read an IDX label file (magic 2049) as an ``int64`` tensor ``(N,)``.

    Raises:
        ValueError: wrong magic number or shape (names the file).
    """
    return torch.from_numpy(_read_checked(Path(path), LABELS_MAGIC).astype(np.int64))


@dataclass(frozen=True)
class IDXFiles:
    """The four IDX files of an MNIST-like dataset."""

    train_images: Path
    train_labels: Path
    test_images: Path
    test_labels: Path

    def split(self, train: bool) -> tuple[Path, Path]:
        """``(images, labels)`` of the train or the test split."""
        return (self.train_images, self.train_labels) if train else (self.test_images, self.test_labels)


def find_idx_files(directory: str | Path) -> IDXFiles | None:
    """The MNIST-like IDX files in ``directory`` (each plain or ``.gz``), or ``None`` if any is missing."""
    directory = Path(directory)
    found: dict[str, Path] = {}
    for key, stem in MNIST_FILE_STEMS.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return IDXFiles(**found)


def locate_idx_files(directories: Sequence[str | Path], name: str) -> IDXFiles:
    """The IDX files in the first of ``directories`` that holds all four.

    Raises:
        FileNotFoundError: none does; the message lists the folders and the files expected.
    """
    for directory in directories:
        files = find_idx_files(directory)
        if files is not None:
            return files
    folders = ", ".join(f"'{d}'" for d in directories)
    expected = ", ".join(MNIST_FILE_STEMS.values())
    raise FileNotFoundError(f"{name}: none of the folders {folders} holds the IDX files {expected} (each plain or .gz)")


class IDXImageDataset(Dataset):
    """One split of an MNIST-like dataset read from IDX files.

    Items are ``(transform(image), label)`` with ``image`` a grayscale ``PIL.Image`` (mode
    ``"L"``), exactly as :class:`torchvision.datasets.MNIST` yields them, so the same
    transforms apply.

    Args:
        images_file: IDX image file, ``(N, H, W)`` bytes (magic 2051).
        labels_file: IDX label file, ``(N,)`` bytes (magic 2049).
        transform: applied to each PIL image; ``None`` returns the PIL image.

    Raises:
        ValueError: the two files hold different numbers of samples (names both files).
    """

    def __init__(
        self,
        images_file: str | Path,
        labels_file: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.data = read_idx_images(images_file)
        self.targets = read_idx_labels(labels_file)
        if self.data.shape[0] != self.targets.shape[0]:
            raise ValueError(
                f"{images_file} holds {self.data.shape[0]} images but {labels_file} holds "
                f"{self.targets.shape[0]} labels"
            )
        self.transform = transform

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image: Any = Image.fromarray(self.data[index].numpy())
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
