"""The embedded default tasks: class groups of scikit-learn's bundled digits (no download)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.datamodules.class_groups import DEFAULT_GROUPS, ClassGroupTasks, class_group_tasks
from merging.datamodules.multitask import Task


class DigitsTasks(ClassGroupTasks):
    """Class-group tasks of ``sklearn.datasets.load_digits``: 1797 gray 8x8 images.

    Pixels (0..16 in the source) are scaled to ``[0, 1]``; inputs have shape ``(1, 8, 8)``.
    Task ``t`` holds the digits of ``groups[t]`` relabelled ``0..len(groups[t])-1`` and is
    named ``"digits_" + digits`` (``"digits_012"``). The dataset has no official test split,
    so each task is split into train/val/test by the fractions.

    Args:
        groups: one list of digits per task; default ``((0,1,2),(3,4,5),(6,7),(8,9))``.
        val_fraction: see :class:`~datamodules.MultiTaskDataModule`.
        test_fraction: see :class:`~datamodules.MultiTaskDataModule`.
        batch_size: see :class:`~datamodules.MultiTaskDataModule`.
        eval_batch_size: see :class:`~datamodules.MultiTaskDataModule`.
        num_workers: see :class:`~datamodules.MultiTaskDataModule`.
        seed: see :class:`~datamodules.MultiTaskDataModule`.
        pin_memory: see :class:`~datamodules.MultiTaskDataModule`.
        drop_last: see :class:`~datamodules.MultiTaskDataModule`.
    """

    PREFIX = "digits"
    NUM_CLASSES = 10
    INPUT_SHAPE = (1, 8, 8)

    def __init__(
        self,
        groups: Sequence[Sequence[int]] = DEFAULT_GROUPS,
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
        self.set_groups(groups)

    def build_tasks(self) -> list[Task]:
        """Load the bundled digits and cut them into the class-group tasks."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        return class_group_tasks(images, labels, self.groups, prefix=self.PREFIX)
