"""Per-task accuracy of a multi-task classifier: the number a λ search chooses by and the
result tables report.

Task t is read by its own head: ``logits_of(t, x)`` gives the logits of task t's classes
for inputs ``x``. Accuracy is torchmetrics' ``MulticlassAccuracy`` with its defaults (the
metric the evaluation modules log), computed on one process (no collective).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy


@torch.no_grad()
def accuracy_by_task(
    logits_of: Callable[[int, Tensor], Tensor],
    loaders: Sequence[Iterable[tuple[Tensor, Tensor]]],
    num_classes: Sequence[int],
    device: torch.device | str | None = None,
) -> list[float]:
    """The accuracy of every task on its loader.

    Args:
        logits_of: ``(t, x (B, *input_shape)) -> logits (B, C_t)`` of task t.
        loaders: one iterable of ``(x, y)`` batches per task, in task order.
        num_classes: C_t per task.
        device: where batches and the metric live (the model's device); None: the CPU.

    Returns:
        One accuracy in [0, 1] per task.

    Raises:
        ValueError: as many loaders as class counts are needed.
    """
    if len(loaders) != len(num_classes):
        raise ValueError(f"accuracy_by_task: {len(loaders)} loaders for {len(num_classes)} tasks")
    accuracies = []
    for t, loader in enumerate(loaders):
        metric = MulticlassAccuracy(num_classes=num_classes[t], sync_on_compute=False).to(device)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            metric.update(logits_of(t, x), y)
        accuracies.append(float(metric.compute()))
    return accuracies


__all__ = ["accuracy_by_task"]
