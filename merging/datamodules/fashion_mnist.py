"""Class-group tasks of Fashion-MNIST, read from local IDX files (no download).

Where the files are looked for, in order (each folder must hold the four files
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each plain or ``.gz``):

1. ``<root>/FashionMNIST/raw`` -- torchvision's layout (what ``torchvision.datasets.FashionMNIST``
   downloads);
2. ``<root>/FashionMNIST``;
3. ``<root>`` itself, e.g. ``root="/usr/share/datasets/fashion-mnist"``;
4. Debian's package folder ``/usr/share/datasets/fashion-mnist``
   (``apt-get install dataset-fashion-mnist``), so a machine with that package needs no
   ``root`` and no copying.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from merging._validation import check_int, check_str
from merging.datamodules import idx
from merging.datamodules.class_groups import DEFAULT_GROUPS, ClassGroupTasks, class_group_tasks, subsample_per_class
from merging.datamodules.multitask import Task

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def fashion_mnist_dirs(root: str | Path | None, *, include_root: bool = True) -> list[Path]:
    """The folders searched for Fashion-MNIST's IDX files, in order (see the module docstring).

    Args:
        root: the user's data root, or ``None`` for Debian's folder only.
        include_root: also search ``root`` itself (off when ``root`` holds several datasets).
    """
    dirs: list[Path] = []
    if root is not None:
        root = Path(root).expanduser()
        dirs += [root / "FashionMNIST" / "raw", root / "FashionMNIST"]
        if include_root:
            dirs.append(root)
    dirs.append(Path(idx.DEBIAN_FASHION_MNIST_DIR))
    return list(dict.fromkeys(dirs))


def locate_fashion_mnist(root: str | Path | None, *, include_root: bool = True) -> idx.IDXFiles:
    """Find Fashion-MNIST's IDX files under ``root`` or in Debian's package folder.

    Raises:
        FileNotFoundError: no searched folder holds them; the message lists the folders and
            the files, and names the Debian package.
    """
    dirs = fashion_mnist_dirs(root, include_root=include_root)
    try:
        files = idx.locate_idx_files(dirs, "Fashion-MNIST")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. Put them in one of these folders, or install Debian's package "
            f"`dataset-fashion-mnist` (files in {idx.DEBIAN_FASHION_MNIST_DIR})."
        ) from err
    debian = Path(idx.DEBIAN_FASHION_MNIST_DIR)
    if root is not None and files.train_images.parent == debian and Path(root).expanduser() != debian:
        rank_zero_info(f"Fashion-MNIST not found under {root}; reading Debian's files in {debian}")
    return files


class FashionMNISTTasks(ClassGroupTasks):
    """Class-group tasks of Fashion-MNIST: gray 28x28 images, inputs ``(1, 28, 28)`` in ``[0, 1]``.

    Task ``t`` holds the classes of ``groups[t]`` relabelled ``0..len(groups[t])-1`` and is
    named ``"fashion_" + classes`` (``"fashion_012"``). The official 60k train images are split
    into train/val by ``val_fraction``; the official 10k test images are the test split.
    The IDX files are read directly (see :func:`fashion_mnist_dirs` for where they are
    looked for), so Debian's ``dataset-fashion-mnist`` package works without copying files.

    Args:
        groups: one list of Fashion-MNIST classes (0..9) per task; default
            ``((0,1,2),(3,4,5),(6,7),(8,9))``.
        root: a folder with the IDX files (or torchvision's ``FashionMNIST/raw`` under it);
            ``None`` uses Debian's ``/usr/share/datasets/fashion-mnist``.
        max_per_class: keep at most this many random images of each class, in the train
            pool and in the test split alike (seeded by ``seed``), for fast CPU runs;
            ``None`` keeps all.
        val_fraction: see :class:`~datamodules.MultiTaskDataModule`.
        batch_size: see :class:`~datamodules.MultiTaskDataModule`.
        eval_batch_size: see :class:`~datamodules.MultiTaskDataModule`.
        num_workers: see :class:`~datamodules.MultiTaskDataModule`.
        seed: see :class:`~datamodules.MultiTaskDataModule`.
        pin_memory: see :class:`~datamodules.MultiTaskDataModule`.
        drop_last: see :class:`~datamodules.MultiTaskDataModule`.
    """

    PREFIX = "fashion"
    NUM_CLASSES = 10
    INPUT_SHAPE = (1, 28, 28)

    def __init__(
        self,
        groups: Sequence[Sequence[int]] = DEFAULT_GROUPS,
        root: str | None = None,
        max_per_class: int | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            val_fraction=val_fraction,
            test_fraction=0.0,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            pin_memory=pin_memory,
            drop_last=drop_last,
        )
        max_per_class = check_int("max_per_class", max_per_class, minimum=1, optional=True, owner="FashionMNISTTasks")
        self.set_groups(groups)
        self.root = check_str("root", root, optional=True, path=True, owner="FashionMNISTTasks")
        self.max_per_class = max_per_class

    def prepare_data(self) -> None:
        """Check that the IDX files exist (nothing is downloaded).

        Raises:
            FileNotFoundError: they are in none of the searched folders.
        """
        locate_fashion_mnist(self.root)

    def build_tasks(self) -> list[Task]:
        """Read the IDX files, subsample per class if asked, and cut the class-group tasks."""
        files = locate_fashion_mnist(self.root)
        generator = torch.Generator().manual_seed(self.seed)
        arrays = []
        for train in (True, False):
            images_file, labels_file = files.split(train)
            images, labels = idx.read_idx_images(images_file), idx.read_idx_labels(labels_file)
            if images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{images_file} holds {images.shape[0]} images but {labels_file} holds {labels.shape[0]} labels"
                )
            if self.max_per_class is not None:
                keep = subsample_per_class(labels, self.max_per_class, generator)
                images, labels = images[keep], labels[keep]
            arrays.append((images.unsqueeze(1), labels))
        (train_x, train_y), (test_x, test_y) = arrays
        return class_group_tasks(train_x, train_y, self.groups, self.PREFIX, test_x, test_y)
