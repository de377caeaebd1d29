"""Image-classification tasks backed by torchvision datasets stored under a local root.

Nothing is downloaded unless ``download=True``. Each dataset is read by torchvision's own
class from torchvision's layout under ``root``; before anything is constructed the files
are checked, and a missing dataset raises :class:`FileNotFoundError` naming the folder and
the files expected there:

- ``mnist``, ``fashionmnist``, ``kmnist``: ``MNIST/raw``, ``FashionMNIST/raw``, ``KMNIST/raw``
  with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``;
- ``cifar10``: ``cifar-10-batches-py`` with ``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``, ``batches.meta``;
- ``cifar100``: ``cifar-100-python`` with ``train``, ``test``, ``meta``;
- ``svhn``: ``svhn`` with ``train_32x32.mat``, ``test_32x32.mat``;
- ``eurosat`` (no official test split): ``eurosat/2750`` with one folder per class
  (``AnnualCrop``, ``Forest``, ...);
- ``gtsrb``: ``gtsrb`` with ``GTSRB/Training``, ``GTSRB/Final_Test/Images``, ``GT-final_test.csv``;
- ``dtd``: ``dtd/dtd`` with ``images``, ``labels/train1.txt``, ``labels/val1.txt``, ``labels/test1.txt``;
- ``stl10``: ``stl10_binary`` with ``train_X.bin``, ``train_y.bin``, ``unlabeled_X.bin``,
  ``test_X.bin``, ``test_y.bin`` (torchvision checks all five).

The MNIST family is also read from IDX files (plain or ``.gz``) in ``<root>/<Class>/raw`` or
``<root>/<Class>`` when torchvision's unpacked files are absent, and Fashion-MNIST from
Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``) when
``root`` has neither (see :mod:`datamodules.fashion_mnist`). SVHN lives in ``<root>/svhn``
(torchvision itself would put it in ``root``). DTD trains on its official train+val
partition 1. A dataset without an official test split is split into train/val/test by
the fractions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset

from merging._validation import check_int
from merging.datamodules import idx
from merging.datamodules.fashion_mnist import fashion_mnist_dirs
from merging.datamodules.multitask import MultiTaskDataModule, Task

Transform = Callable[[Any], Any]

_MNIST_FILES = tuple(idx.MNIST_FILE_STEMS.values())
_EUROSAT_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)


@dataclass(frozen=True)
class VisionDatasetSpec:
    """Where a torchvision dataset lives under ``root`` and how to build it.

    Attributes:
        name: the task name (lower case).
        num_classes: C_t.
        folder: its folder relative to ``root``.
        required: files/folders relative to ``folder`` that torchvision needs.
        official_test: whether the dataset has its own test split.
        torchvision_class: the name of the class in ``torchvision.datasets``.
    """

    name: str
    num_classes: int
    folder: str
    required: tuple[str, ...]
    official_test: bool
    torchvision_class: str

    @property
    def idx_format(self) -> bool:
        """Whether the dataset is MNIST-like (IDX files)."""
        return self.torchvision_class in ("MNIST", "FashionMNIST", "KMNIST")


VISION_DATASETS: dict[str, VisionDatasetSpec] = {
    spec.name: spec
    for spec in (
        VisionDatasetSpec("mnist", 10, "MNIST/raw", _MNIST_FILES, True, "MNIST"),
        VisionDatasetSpec("fashionmnist", 10, "FashionMNIST/raw", _MNIST_FILES, True, "FashionMNIST"),
        VisionDatasetSpec("kmnist", 10, "KMNIST/raw", _MNIST_FILES, True, "KMNIST"),
        VisionDatasetSpec(
            "cifar10", 10, "cifar-10-batches-py",
            tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"), True, "CIFAR10",
        ),
        VisionDatasetSpec("cifar100", 100, "cifar-100-python", ("train", "test", "meta"), True, "CIFAR100"),
        VisionDatasetSpec("svhn", 10, "svhn", ("train_32x32.mat", "test_32x32.mat"), True, "SVHN"),
        VisionDatasetSpec("eurosat", 10, "eurosat/2750", _EUROSAT_CLASSES, False, "EuroSAT"),
        VisionDatasetSpec(
            "gtsrb", 43, "gtsrb", ("GTSRB/Training", "GTSRB/Final_Test/Images", "GT-final_test.csv"), True, "GTSRB",
        ),
        VisionDatasetSpec(
            "dtd", 47, "dtd/dtd", ("images", "labels/train1.txt", "labels/val1.txt", "labels/test1.txt"), True, "DTD",
        ),
        VisionDatasetSpec(
            "stl10", 10, "stl10_binary",
            ("train_X.bin", "train_y.bin", "unlabeled_X.bin", "test_X.bin", "test_y.bin"), True, "STL10",
        ),
    )
}
"""The supported datasets, by task name."""


def vision_spec(name: str) -> VisionDatasetSpec:
    """The spec of a dataset name, case-insensitive, ignoring ``-`` and ``_`` (``"Fashion-MNIST"``).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in VISION_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(VISION_DATASETS)}")
    return VISION_DATASETS[key]


def _idx_dirs(spec: VisionDatasetSpec, root: Path) -> list[Path]:
    if spec.name == "fashionmnist":
        return fashion_mnist_dirs(root, include_root=False)
    return [root / spec.folder, root / spec.torchvision_class]


def _missing(spec: VisionDatasetSpec, root: Path) -> list[str]:
    folder = root / spec.folder
    return [entry for entry in spec.required if not (folder / entry).exists()]


def check_vision_dataset(name: str, root: str | Path) -> None:
    """Check that a dataset's files are under ``root`` (see the module table).

    Raises:
        FileNotFoundError: they are not; the message names the folder, the files expected
            and those missing.
    """
    spec = vision_spec(name)
    root = Path(root).expanduser()
    missing = _missing(spec, root)
    if not missing:
        return
    if spec.idx_format and any(idx.find_idx_files(d) is not None for d in _idx_dirs(spec, root)):
        return
    message = (
        f"{spec.name}: dataset not found. torchvision's layout expects the folder "
        f"'{root / spec.folder}' to contain: {', '.join(spec.required)}; missing: {', '.join(missing)}."
    )
    if spec.idx_format:
        alternatives = ", ".join(f"'{d}'" for d in _idx_dirs(spec, root)[1:])
        message += f" IDX files (plain or .gz) are also read from {alternatives}."
    message += " Put the files there, or pass download=True to fetch them with torchvision."
    raise FileNotFoundError(message)


def load_vision_dataset(
    name: str, root: str | Path, train: bool, transform: Transform | None, download: bool = False
) -> Dataset:
    """One split of a dataset, read by torchvision's class (or from IDX files, MNIST family).

    Args:
        name: dataset name (see :func:`vision_spec`).
        root: the data root.
        train: the train split (for DTD: train + val), else the official test split.
        transform: applied to each PIL image.
        download: let torchvision download missing files.

    Returns:
        A dataset of ``(transform(image), label)``.

    Raises:
        FileNotFoundError: the files are missing (names the folder and files), or torchvision
            failed to read them.
        ValueError: ``train=False`` for a dataset without an official test split.
    """
    import torchvision.datasets as tvd

    spec = vision_spec(name)
    root = Path(root).expanduser()
    if not train and not spec.official_test:
        raise ValueError(f"{spec.name} has no official test split")
    if not download:
        check_vision_dataset(spec.name, root)
        if spec.idx_format and _missing(spec, root):
            files = idx.locate_idx_files(_idx_dirs(spec, root), spec.name)
            return idx.IDXImageDataset(*files.split(train), transform=transform)
    cls = getattr(tvd, spec.torchvision_class)
    split = "train" if train else "test"
    try:
        if spec.name == "svhn":
            return cls(str(root / "svhn"), split=split, transform=transform, download=download)
        if spec.name in ("gtsrb", "stl10"):
            return cls(str(root), split=split, transform=transform, download=download)
        if spec.name == "dtd":
            if not train:
                return cls(str(root), split="test", transform=transform, download=download)
            return ConcatDataset(
                [cls(str(root), split=s, transform=transform, download=download) for s in ("train", "val")]
            )
        if spec.name == "eurosat":
            return cls(str(root), transform=transform, download=download)
        return cls(str(root), train=train, transform=transform, download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{spec.name}: torchvision could not read '{root / spec.folder}' "
            f"(expected: {', '.join(spec.required)}): {err}"
        ) from err


def image_transform(
    image_size: int, channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Transform:
    """PIL image -> float tensor ``(channels, image_size, image_size)`` in ``[0, 1]`` (or normalised).

    Gray images are replicated to 3 channels (``channels=3``) and colour images converted to
    luminance (``channels=1``), so tasks from different datasets share one input shape.
    """
    from torchvision.transforms import v2

    steps: list[Any] = [
        v2.RGB() if channels == 3 else v2.Grayscale(num_output_channels=1),
        v2.Resize((image_size, image_size), antialias=True),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
    ]
    if mean is not None and std is not None:
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


class VisionTasks(MultiTaskDataModule):
    """One task per torchvision dataset, all resized to one input shape.

    Inputs are ``(channels, image_size, image_size)`` float tensors in ``[0, 1]`` (or
    normalised by ``mean``/``std``); each task keeps its dataset's labels ``0..C_t-1`` and is
    named by its dataset (``"mnist"``, ``"cifar10"``, ...). Supported datasets and their
    layout under ``root``: see :mod:`datamodules.vision`.

    Args:
        datasets: dataset names, e.g. ``["mnist", "svhn", "cifar10"]`` (case-insensitive).
        root: the local data root.
        image_size: side of the square inputs.
        channels: 1 (gray) or 3 (RGB); datasets of the other kind are converted.
        mean: per-channel normalisation mean (with ``std``); ``None`` keeps ``[0, 1]``.
        std: per-channel normalisation std.
        download: let torchvision download missing datasets in :meth:`prepare_data`.
        val_fraction: see :class:`~datamodules.MultiTaskDataModule`.
        test_fraction: see :class:`~datamodules.MultiTaskDataModule` (datasets without an
            official test split only).
        batch_size: see :class:`~datamodules.MultiTaskDataModule`.
        eval_batch_size: see :class:`~datamodules.MultiTaskDataModule`.
        num_workers: see :class:`~datamodules.MultiTaskDataModule`.
        seed: see :class:`~datamodules.MultiTaskDataModule`.
        pin_memory: see :class:`~datamodules.MultiTaskDataModule`.
        drop_last: see :class:`~datamodules.MultiTaskDataModule`.

    Raises:
        ValueError: an unknown or repeated dataset name, ``channels`` not 1 or 3, a
            non-positive ``image_size``, or ``mean``/``std`` not of length ``channels``.
    """

    def __init__(
        self,
        datasets: Sequence[str],
        root: str = "data",
        image_size: int = 32,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        download: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            pin_memory=pin_memory,
            drop_last=drop_last,
        )
        if isinstance(datasets, str) or not datasets:
            raise ValueError(f"datasets must be a non-empty list of names, got {datasets!r}")
        self.specs = [vision_spec(name) for name in datasets]
        names = [spec.name for spec in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets repeat a dataset: {list(datasets)}")
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        image_size = check_int("image_size", image_size, minimum=1, owner="VisionTasks")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        for label, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != channels:
                raise ValueError(f"{label} needs {channels} values (one per channel), got {list(values)}")
        self.root = root
        self.image_size = image_size
        self.channels = channels
        self.mean = None if mean is None else list(mean)
        self.std = None if std is None else list(std)
        self.download = download

    @property
    def task_names(self) -> list[str]:
        """The dataset names, lower case."""
        return [spec.name for spec in self.specs]

    @property
    def num_classes(self) -> list[int]:
        """C_t of each dataset."""
        return [spec.num_classes for spec in self.specs]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(channels, image_size, image_size)``."""
        return (self.channels, self.image_size, self.image_size)

    def prepare_data(self) -> None:
        """Download the datasets when ``download=True``; otherwise check that they are there.

        Raises:
            FileNotFoundError: a dataset is missing (names the folder and the files expected).
        """
        for spec in self.specs:
            if self.download:
                for train in (True, False) if spec.official_test else (True,):
                    load_vision_dataset(spec.name, self.root, train, transform=None, download=True)
            else:
                check_vision_dataset(spec.name, self.root)

    def build_tasks(self) -> list[Task]:
        """Construct each dataset's train pool and official test split with the shared transform."""
        transform = image_transform(self.image_size, self.channels, self.mean, self.std)
        tasks = []
        for spec in self.specs:
            data = load_vision_dataset(spec.name, self.root, True, transform)
            test = load_vision_dataset(spec.name, self.root, False, transform) if spec.official_test else None
            tasks.append(Task(spec.name, spec.num_classes, data, test))
        return tasks
