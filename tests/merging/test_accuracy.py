"""accuracy_by_task: per-task accuracy, each task read by its own head."""

from __future__ import annotations

import pytest
import torch

from merging.accuracy import accuracy_by_task


def test_accuracy_by_task_reads_each_task_with_its_head():
    x = torch.arange(8.0).reshape(8, 1)
    y0 = torch.tensor([0, 1] * 4)
    y1 = torch.zeros(8, dtype=torch.long)
    loaders = [[(x[:4], y0[:4]), (x[4:], y0[4:])], [(x, y1)]]
    heads = [lambda x: torch.cat([x % 2 == 0, x % 2 == 1], dim=1).float(), lambda x: torch.cat([x, -x], dim=1)]
    accs = accuracy_by_task(lambda t, x: heads[t](x), loaders, [2, 2], device="cpu")
    assert accs == pytest.approx([1.0, 1.0])
    wrong = accuracy_by_task(lambda t, x: -heads[t](x), loaders, [2, 2], device="cpu")
    assert wrong[0] == pytest.approx(0.0)


def test_accuracy_by_task_needs_one_loader_per_task():
    with pytest.raises(ValueError, match="1 loaders for 2 tasks"):
        accuracy_by_task(lambda t, x: x, [[]], [2, 2])
