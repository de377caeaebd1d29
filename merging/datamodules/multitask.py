"""A LightningDataModule over several labelled classification tasks.

Every task is a labelled dataset yielding ``(x, y)``: ``x`` a float tensor of the shared
``input_shape`` and ``y`` an ``int`` in ``0..C_t-1``. :class:`MultiTaskDataModule` splits
each task into train/val/test with a seeded :class:`torch.Generator` and serves

* ``train_dataloader()``: a :class:`~lightning.pytorch.utilities.CombinedLoader`
  ``{task_name: DataLoader}`` in ``"max_size_cycle"`` mode, so one training batch is
  ``{task_name: (x, y)}`` with ``x: (B, *input_shape)`` and ``y: (B,)``;
* ``val_dataloader()`` / ``test_dataloader()``: one loader per task, in task order, so
  Lightning's ``dataloader_idx`` is the task index;
* ``task_dataloader(task, split)``: one task's loader of one split (task-homogeneous
  batches, per-task evaluation);
* ``unlabeled_dataloader(num_samples, seed)``: a small, seed-reproducible set of inputs
  drawn from the tasks' **train** splits and mixed across tasks, each batch a tensor
  ``(B, *input_shape)`` (the unlabeled data of M-Loss, MuDSC and NeuLig).

All loaders are plain :class:`~torch.utils.data.DataLoader` objects, so under
``strategy="ddp"`` Lightning replaces their samplers with a ``DistributedSampler``
(``use_distributed_sampler=True``), also inside the ``CombinedLoader``. The unlabeled loader
is not handed to the trainer: every rank gets the same set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from merging._validation import check_bool, check_float, check_int
from merging.datamodules.sampling import SeededRandomSampler

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    """One labelled classification task.

    Args:
        name: the task's name (keys of training batches, log keys).
        num_classes: C_t; labels are ``0..C_t-1``.
        data: a map-style dataset of ``(x, y)`` pairs; split into train/val (and test when
            ``test_data`` is ``None``) by :class:`MultiTaskDataModule`.
        test_data: the dataset's own official test split, used as is when given.
    """

    name: str
    num_classes: int
    data: Dataset
    test_data: Dataset | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task name must be a non-empty string, got {self.name!r}")
        if int(self.num_classes) < 1:
            raise ValueError(f"Task {self.name!r}: num_classes must be >= 1, got {self.num_classes}")


class LabelledTensorDataset(Dataset):
    """``(inputs[i], int(labels[i]))`` pairs from two tensors.

    ``uint8`` inputs are kept as bytes (one byte per pixel in memory) and scaled to
    ``[0, 1]`` float32 on access; floating inputs are returned as stored.

    Args:
        inputs: ``(N, *input_shape)``, floating or ``uint8``.
        labels: ``(N,)`` integer class labels.
    """

    def __init__(self, inputs: Tensor, labels: Tensor) -> None:
        if inputs.ndim < 1 or labels.ndim != 1 or inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"inputs (N, ...) and labels (N,) must have the same N, "
                f"got inputs {tuple(inputs.shape)} and labels {tuple(labels.shape)}"
            )
        if not (inputs.is_floating_point() or inputs.dtype == torch.uint8):
            raise ValueError(f"inputs must be floating point or uint8, got {inputs.dtype}")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        self.inputs = inputs
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.inputs[index]
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return x, int(self.labels[index])


class UnlabeledInputs(Dataset):
    """The inputs (no labels) of chosen samples of several datasets.

    Args:
        datasets: the source datasets, each yielding ``(x, y)``.
        task_ids: ``(S,)`` which dataset sample ``s`` comes from.
        indices: ``(S,)`` its index in that dataset.
    """

    def __init__(self, datasets: Sequence[Dataset], task_ids: Tensor, indices: Tensor) -> None:
        if task_ids.shape != indices.shape or task_ids.ndim != 1:
            raise ValueError(
                f"task_ids and indices must be equal-length 1-D tensors, got {task_ids.shape}, {indices.shape}"
            )
        self.datasets = list(datasets)
        self.task_ids = task_ids
        self.indices = indices

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        x, _ = self.datasets[int(self.task_ids[index])][int(self.indices[index])]
        return x


def split_indices(
    n: int, val_fraction: float, test_fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomly partition ``range(n)`` into train/val/test index sets.

    A split with a positive fraction gets ``max(1, round(fraction * n))`` samples; train
    gets the rest. Each returned index tensor is sorted.

    Args:
        n: number of samples.
        val_fraction: share of samples in the validation split, in ``[0, 1)``.
        test_fraction: share of samples in the test split, in ``[0, 1)``.
        generator: the seeded generator that draws the permutation.

    Returns:
        ``(train, val, test)`` disjoint ``int64`` index tensors covering ``range(n)``.

    Raises:
        ValueError: a fraction is out of range, or no sample would be left for training.
    """
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}")
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise ValueError(
            f"{n} samples cannot be split into val={n_val}, test={n_test} and a non-empty train split"
        )
    perm = torch.randperm(n, generator=generator)
    val, test, train = perm[:n_val], perm[n_val : n_val + n_test], perm[n_val + n_test :]
    return train.sort().values, val.sort().values, test.sort().values


def balanced_quotas(sizes: Sequence[int], num_samples: int) -> list[int]:
    """Share ``num_samples`` among pools of the given sizes as equally as possible.

    Every pool gets ``num_samples // T`` (earlier pools one more for the remainder);
    what a pool is too small to give is handed to the pools that still have room.

    Args:
        sizes: size of each of the T pools.
        num_samples: total to draw, at most ``sum(sizes)``.

    Returns:
        The number to draw from each pool, each at most its size, summing to ``num_samples``.

    Raises:
        ValueError: ``num_samples`` is not positive or exceeds ``sum(sizes)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 (an empty unlabeled set), got {num_samples}")
    if num_samples > sum(sizes):
        raise ValueError(f"num_samples={num_samples} exceeds the {sum(sizes)} available samples")
    quotas = [0] * len(sizes)
    left = num_samples
    while left > 0:
        open_pools = [t for t, size in enumerate(sizes) if quotas[t] < size]
        share, extra = divmod(left, len(open_pools))
        for rank, t in enumerate(open_pools):
            take = min(share + (rank < extra), sizes[t] - quotas[t])
            quotas[t] += take
            left -= take
    return quotas


class MultiTaskDataModule(LightningDataModule):
    """Several labelled classification tasks behind one LightningDataModule.

    Give the tasks directly (library use), or subclass and override :meth:`build_tasks`
    (and, to make them known before :meth:`setup`, the ``task_names``, ``num_classes`` and
    ``input_shape`` properties), as :class:`~datamodules.DigitsTasks` does.

    Splits: a task with an official test split (``Task.test_data``) is split into
    train/val by ``val_fraction`` and tested on its test split; any other task is split into
    train/val/test by ``val_fraction``/``test_fraction``. One ``torch.Generator`` seeded with
    ``seed`` draws the splits of the tasks in order, so they are identical on every run and
    every DDP rank. The train loaders shuffle with a
    :class:`~merging.datamodules.sampling.SeededRandomSampler` each, seeded from ``seed`` and the
    task index: the order of epoch ``e`` is a function of (seed, task, e), and Lightning sets
    ``e`` at every epoch, so a fit resumed from a checkpoint sees the same batches as an
    uninterrupted one (under DDP, Lightning's ``DistributedSampler`` takes over the shuffling, with
    the same property).

    Args:
        tasks: the tasks; ``None`` when a subclass builds them in :meth:`build_tasks`.
        val_fraction: share of each task's data held out for validation, in ``(0, 1)``.
        test_fraction: share held out for testing when a task has no official test split,
            in ``[0, 1)``.
        batch_size: batch size B of every per-task training loader.
        eval_batch_size: batch size of validation/test loaders (default: ``batch_size``).
        num_workers: DataLoader worker processes per loader.
        seed: seed of the splits and of the training shuffles, an int >= 0.
        pin_memory: pin host memory in every loader (for GPU training).
        drop_last: drop each training loader's last incomplete batch.

    Raises:
        TypeError: a setting has the wrong type (a float or a bool where an int is expected).
        ValueError: a fraction is out of range, a size is not positive, or task names repeat.
    """

    def __init__(
        self,
        tasks: Sequence[Task] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        val_fraction = check_float(
            "val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True, owner=owner
        )
        test_fraction = check_float("test_fraction", test_fraction, low=0.0, high=1.0, high_open=True, owner=owner)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"{owner}: test_fraction must be in [0, 1) with val_fraction + test_fraction < 1, "
                f"got val_fraction={val_fraction}, test_fraction={test_fraction}"
            )
        batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        eval_batch_size = check_int("eval_batch_size", eval_batch_size, minimum=1, optional=True, owner=owner)
        num_workers = check_int("num_workers", num_workers, minimum=0, owner=owner)
        seed = check_int("seed", seed, minimum=0, owner=owner)
        pin_memory = check_bool("pin_memory", pin_memory, owner=owner)
        drop_last = check_bool("drop_last", drop_last, owner=owner)
        if tasks is not None:
            tasks = list(tasks)
            _check_task_list(tasks)
        self._given_tasks: list[Task] | None = tasks
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self._tasks: list[Task] | None = None
        self._splits: dict[str, list[Dataset]] | None = None
        self._input_shape: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ tasks
    def build_tasks(self) -> list[Task]:
        """Build the tasks (called once, from :meth:`setup`). Subclasses load their data here.

        Raises:
            TypeError: no tasks were given and the subclass does not override this method.
        """
        if self._given_tasks is None:
            raise TypeError(
                f"{type(self).__name__} needs `tasks`, or a subclass that overrides build_tasks()"
            )
        return self._given_tasks

    @property
    def tasks(self) -> list[Task]:
        """The tasks, built on first access."""
        if self._tasks is None:
            tasks = list(self.build_tasks())
            _check_task_list(tasks)
            self._tasks = tasks
        return self._tasks

    @property
    def task_names(self) -> list[str]:
        """The task names, in task order."""
        return [task.name for task in self.tasks]

    @property
    def num_classes(self) -> list[int]:
        """C_t for every task, in task order."""
        return [int(task.num_classes) for task in self.tasks]

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks."""
        return len(self.task_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input ``x`` (without the batch dimension), shared by all tasks."""
        if self._input_shape is None:
            first = self.tasks[0]
            self._input_shape = tuple(_sample_input(first.data, first.name).shape)
        return self._input_shape

    def task_index(self, task: int | str) -> int:
        """The index of ``task`` given as an index or a name.

        Raises:
            KeyError: no task has that name.
            IndexError: the index is out of range.
        """
        names = self.task_names
        if isinstance(task, str):
            if task not in names:
                raise KeyError(f"no task named {task!r}; tasks are {names}")
            return names.index(task)
        if not -len(names) <= task < len(names):
            raise IndexError(f"task index {task} out of range for {len(names)} tasks")
        return task % len(names)

    # ------------------------------------------------------------------ stages
    def setup(self, stage: str | None = None) -> None:
        """Build the tasks and split them (once; later calls are no-ops).

        Args:
            stage: the Lightning stage (``"fit"``, ``"validate"``, ``"test"``, ...); every
                stage gets the same splits.

        Raises:
            ValueError: the built tasks disagree with ``task_names``/``num_classes``/``input_shape``,
                tasks have different input shapes, or a task is too small to split.
        """
        self._ensure_splits()

    def _ensure_splits(self) -> dict[str, list[Dataset]]:
        if self._splits is None:
            self._splits = self._make_splits()
        return self._splits

    def _make_splits(self) -> dict[str, list[Dataset]]:
        tasks = self.tasks
        self._check_built(tasks)
        generator = torch.Generator().manual_seed(self.seed)
        splits: dict[str, list[Dataset]] = {split: [] for split in SPLITS}
        for task in tasks:
            official_test = task.test_data is not None
            if not official_test and self.test_fraction == 0.0:
                raise ValueError(f"task {task.name!r} has no official test split and test_fraction=0")
            test_fraction = 0.0 if official_test else self.test_fraction
            try:
                train, val, test = split_indices(len(task.data), self.val_fraction, test_fraction, generator)
            except ValueError as err:
                raise ValueError(f"task {task.name!r}: {err}") from err
            splits["train"].append(Subset(task.data, train.tolist()))
            splits["val"].append(Subset(task.data, val.tolist()))
            splits["test"].append(task.test_data if official_test else Subset(task.data, test.tolist()))
        return splits

    def _check_built(self, tasks: Sequence[Task]) -> None:
        """The built tasks match the declared names/classes and share ``input_shape``."""
        declared = (self.task_names, self.num_classes)
        built = ([t.name for t in tasks], [int(t.num_classes) for t in tasks])
        if built != declared:
            raise ValueError(
                f"{type(self).__name__}: built tasks {built[0]} with classes {built[1]}, "
                f"but it declares {declared[0]} with classes {declared[1]}"
            )
        for task in tasks:
            for dataset, which in ((task.data, "data"), (task.test_data, "test_data")):
                if dataset is None:
                    continue
                shape = tuple(_sample_input(dataset, task.name).shape)
                if shape != self.input_shape:
                    raise ValueError(
                        f"task {task.name!r} ({which}) has inputs of shape {shape}, "
                        f"but the tasks share input_shape {self.input_shape}"
                    )

    def dataset(self, task: int | str, split: Split) -> Dataset:
        """One task's dataset of one split (calls :meth:`setup` if needed).

        Raises:
            ValueError: ``split`` is not ``"train"``, ``"val"`` or ``"test"``.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._ensure_splits()[split][self.task_index(task)]

    # ------------------------------------------------------------------ loaders
    def task_dataloader(
        self,
        task: int | str,
        split: Split,
        *,
        shuffle: bool | None = None,
        batch_size: int | None = None,
    ) -> DataLoader:
        """One task's loader of one split; its batches are ``(x: (B, *input_shape), y: (B,))``.

        Args:
            task: task index or name.
            split: ``"train"``, ``"val"`` or ``"test"``.
            shuffle: default ``True`` for train, ``False`` otherwise. A shuffled loader draws
                its order with a :class:`~merging.datamodules.sampling.SeededRandomSampler`
                seeded from ``seed`` and the task index: epoch ``e``'s order depends on
                (seed, task, e) only, so a resumed fit continues the uninterrupted one's orders.
            batch_size: default ``batch_size`` for train, ``eval_batch_size`` otherwise.
        """
        check_int("batch_size", batch_size, minimum=1, optional=True, owner="task_dataloader")
        index = self.task_index(task)
        dataset = self.dataset(index, split)
        train = split == "train"
        shuffle = train if shuffle is None else check_bool("shuffle", shuffle, owner="task_dataloader")
        return DataLoader(
            dataset,
            batch_size=batch_size or (self.batch_size if train else self.eval_batch_size),
            sampler=SeededRandomSampler(dataset, seed=self.seed + 1 + index) if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last and train,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> CombinedLoader:
        """``CombinedLoader({task_name: DataLoader}, mode="max_size_cycle")``: a batch is
        ``{task_name: (x, y)}``; an epoch ends with the longest task, shorter ones cycle."""
        loaders = {name: self.task_dataloader(i, "train") for i, name in enumerate(self.task_names)}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        """One validation loader per task, in task order (``dataloader_idx`` = task index)."""
        return [self.task_dataloader(i, "val") for i in range(self.num_tasks)]

    def test_dataloader(self) -> list[DataLoader]:
        """One test loader per task, in task order (``dataloader_idx`` = task index)."""
        return [self.task_dataloader(i, "test") for i in range(self.num_tasks)]

    def unlabeled_dataloader(
        self,
        num_samples: int = 256,
        seed: int = 0,
        batch_size: int | None = None,
        tasks: Sequence[int | str] | None = None,
    ) -> DataLoader:
        """A small unlabeled set drawn from the tasks' train splits, mixed across tasks.

        The S = ``num_samples`` inputs are shared equally among the tasks (a task with too
        few train samples gives all it has and the others make up the rest), drawn without
        replacement, then shuffled together, all with a generator seeded by ``seed``: the
        same ``seed`` gives the same inputs in the same order.

        Args:
            num_samples: S, the number of inputs.
            seed: seed of the draw.
            batch_size: default ``eval_batch_size``.
            tasks: the tasks to draw from (indices or names); default all.

        Returns:
            A loader whose batches are input tensors ``(B, *input_shape)`` (no labels); its
            ``dataset.task_ids`` tells which task each sample came from.

        Raises:
            ValueError: ``num_samples`` is not positive or exceeds the available train samples.
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chosen = [self.task_index(t) for t in (tasks if tasks is not None else range(self.num_tasks))]
        if not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(f"tasks must be a non-empty list without repeats, got {tasks}")
        pools = [self.dataset(t, "train") for t in chosen]
        generator = torch.Generator().manual_seed(seed)
        quotas = balanced_quotas([len(pool) for pool in pools], num_samples)
        task_ids = torch.cat([torch.full((q,), t, dtype=torch.long) for t, q in zip(chosen, quotas)])
        indices = torch.cat(
            [torch.randperm(len(pool), generator=generator)[:q] for pool, q in zip(pools, quotas)]
        )
        order = torch.randperm(num_samples, generator=generator)
        dataset = UnlabeledInputs(self._ensure_splits()["train"], task_ids[order], indices[order])
        return DataLoader(
            dataset,
            batch_size=batch_size or self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )


def _check_task_list(tasks: Sequence[Task]) -> None:
    if not tasks:
        raise ValueError("a MultiTaskDataModule needs at least one task")
    for task in tasks:
        if not isinstance(task, Task):
            raise TypeError(f"tasks must be datamodules.Task objects, got {type(task).__name__}")
    names = [task.name for task in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"task names must be unique, repeated: {repeated}")


def _sample_input(dataset: Dataset, name: str) -> Tensor:
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"task {name!r} has an empty dataset")
    sample: Any = dataset[0]
    if not isinstance(sample, (tuple, list)) or len(sample) != 2 or not isinstance(sample[0], Tensor):
        raise ValueError(f"task {name!r}: a sample must be a pair (x: Tensor, y: int), got {type(sample).__name__}")
    if not sample[0].is_floating_point():
        raise ValueError(f"task {name!r}: inputs must be floating point, got {sample[0].dtype}")
    return sample[0]
