"""Tasks made of class groups of one labelled dataset (e.g. digits {0,1,2} vs {3,4,5}).

Task ``t`` keeps the samples whose label is in ``groups[t]`` and relabels them by their
position in the group, so its labels are ``0..len(groups[t])-1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merging._validation import check_int_list
from merging.datamodules.multitask import LabelledTensorDataset, MultiTaskDataModule, Task

DEFAULT_GROUPS: tuple[tuple[int, ...], ...] = ((0, 1, 2), (3, 4, 5), (6, 7), (8, 9))


def check_groups(groups: Sequence[Sequence[int]], num_classes: int, owner: str) -> list[list[int]]:
    """Validate class groups against a dataset with ``num_classes`` classes.

    Args:
        groups: one list of original class labels per task.
        num_classes: classes of the source dataset.
        owner: a name for error messages.

    Returns:
        The groups as lists of ints.

    Raises:
        TypeError: ``groups`` or a group is a string or not a list, or a label is not an int.
        ValueError: no groups, an empty group, a label out of range, or a label twice in a group.
    """
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise TypeError(f"{owner}: groups must be a list of lists of class labels, got {groups!r}")
    checked = [check_int_list("groups", group, nonempty=False, owner=owner) for group in groups]
    if not checked:
        raise ValueError(f"{owner}: groups must name at least one class group")
    for group in checked:
        if not group:
            raise ValueError(f"{owner}: empty class group in groups={checked}")
        bad = [c for c in group if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"{owner}: classes {bad} are out of range 0..{num_classes - 1} (groups={checked})")
        if len(set(group)) != len(group):
            raise ValueError(f"{owner}: class group {group} repeats a class")
    return checked


def group_name(prefix: str, group: Sequence[int]) -> str:
    """The task name of a class group: ``"digits_012"`` for prefix ``"digits"`` and ``[0, 1, 2]``."""
    sep = "" if all(c < 10 for c in group) else "-"
    return f"{prefix}_{sep.join(str(c) for c in group)}"


def select_group(labels: Tensor, group: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The samples of a class group and their labels remapped to positions in the group.

    Args:
        labels: ``(N,)`` original labels.
        group: the original classes of the task, in the order that defines the new labels.

    Returns:
        ``(index, new_labels)``: ``index`` ``(M,)`` of the kept samples in ascending order,
        ``new_labels`` ``(M,)`` with ``new_labels[i] = group.index(labels[index[i]])``.
    """
    group_t = torch.as_tensor(list(group), dtype=labels.dtype)
    hits = labels.unsqueeze(1) == group_t.unsqueeze(0)
    index = hits.any(dim=1).nonzero().squeeze(1)
    return index, hits[index].long().argmax(dim=1)


def class_group_tasks(
    inputs: Tensor,
    labels: Tensor,
    groups: Sequence[Sequence[int]],
    prefix: str,
    test_inputs: Tensor | None = None,
    test_labels: Tensor | None = None,
) -> list[Task]:
    """One :class:`Task` per class group of a tensor dataset.

    Args:
        inputs: ``(N, *input_shape)`` floating or ``uint8`` inputs.
        labels: ``(N,)`` original labels.
        groups: one list of original classes per task (validated by :func:`check_groups`).
        prefix: task-name prefix (see :func:`group_name`).
        test_inputs: ``(N_test, *input_shape)`` official test inputs, if the dataset has them.
        test_labels: ``(N_test,)`` official test labels.

    Returns:
        The tasks, in group order.
    """
    tasks = []
    for group in groups:
        index, new_labels = select_group(labels, group)
        test_data = None
        if test_inputs is not None and test_labels is not None:
            test_index, test_new = select_group(test_labels, group)
            test_data = LabelledTensorDataset(test_inputs[test_index], test_new)
        tasks.append(
            Task(
                name=group_name(prefix, group),
                num_classes=len(group),
                data=LabelledTensorDataset(inputs[index], new_labels),
                test_data=test_data,
            )
        )
    return tasks


def subsample_per_class(labels: Tensor, max_per_class: int, generator: torch.Generator) -> Tensor:
    """At most ``max_per_class`` random samples of every class.

    Args:
        labels: ``(N,)`` class labels.
        max_per_class: how many samples of each class to keep at most (>= 1).
        generator: the seeded generator choosing them.

    Returns:
        ``(M,)`` sorted indices of the kept samples.

    Raises:
        ValueError: ``max_per_class`` is below 1.
    """
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    kept = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().squeeze(1)
        kept.append(members[torch.randperm(members.numel(), generator=generator)[:max_per_class]])
    return torch.cat(kept).sort().values


class ClassGroupTasks(MultiTaskDataModule):
    """Base of the class-group datamodules: task names, class counts and input shape are
    known from ``groups`` before ``setup``.

    Subclasses set ``PREFIX`` (task names are ``PREFIX + "_" + classes``), ``NUM_CLASSES`` of
    the source dataset and ``INPUT_SHAPE``, and assign ``self.groups`` with
    :meth:`set_groups` in ``__init__``.
    """

    PREFIX: str
    NUM_CLASSES: int
    INPUT_SHAPE: tuple[int, ...]

    def set_groups(self, groups: Sequence[Sequence[int]]) -> None:
        """Validate and keep the class groups (see :func:`check_groups`)."""
        self.groups = check_groups(groups, self.NUM_CLASSES, type(self).__name__)

    @property
    def task_names(self) -> list[str]:
        """``PREFIX + "_" + classes`` per group (e.g. ``"digits_012"``)."""
        return [group_name(self.PREFIX, group) for group in self.groups]

    @property
    def num_classes(self) -> list[int]:
        """The size of each group."""
        return [len(group) for group in self.groups]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input."""
        return self.INPUT_SHAPE
