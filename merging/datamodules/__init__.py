"""LightningDataModules for multi-task fine-tuning and merging.

- :class:`MultiTaskDataModule`: any list of labelled :class:`Task` objects, split with a
  seeded generator; a combined multi-task train loader, one val/test loader per task, and a
  small mixed ``unlabeled_dataloader()``.
- :class:`DigitsTasks`: the embedded default, class groups of scikit-learn's bundled digits.
- :class:`FashionMNISTTasks`: class groups of Fashion-MNIST from local IDX files (Debian's
  ``dataset-fashion-mnist`` package works as is).
- :class:`VisionTasks`: one task per torchvision dataset under a local root, no download by default.
- :class:`SeededRandomSampler`: the training shuffle, an order per epoch that a resumed fit continues.

This package depends on no model code.
"""

from merging.datamodules.class_groups import ClassGroupTasks
from merging.datamodules.digits import DigitsTasks
from merging.datamodules.fashion_mnist import FashionMNISTTasks
from merging.datamodules.multitask import LabelledTensorDataset, MultiTaskDataModule, Task
from merging.datamodules.sampling import SeededRandomSampler
from merging.datamodules.vision import VISION_DATASETS, VisionTasks

__all__ = [
    "VISION_DATASETS",
    "ClassGroupTasks",
    "DigitsTasks",
    "FashionMNISTTasks",
    "LabelledTensorDataset",
    "MultiTaskDataModule",
    "SeededRandomSampler",
    "Task",
    "VisionTasks",
]
