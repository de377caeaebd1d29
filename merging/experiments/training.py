"""A deterministic mini-batch SGD loop for small proxy models (pure torch).

The experiments train their digit classifiers with it, and the empirical L2-stability probe
(:func:`merging.stability.empirical_l2_stability`) takes it as its training function A: the
initialisation, data order and dropout depend on the seed alone, so two runs on datasets
that differ in one sample follow the same randomness.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from merging.stability import TrajectoryStats, global_norm
from merging.state import StateDict


def train_sgd(
    model_factory: Callable[[], nn.Module],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    dataset: Dataset,
    *,
    lr: float | Callable[[int], float] = 0.1,
    batch_size: int = 16,
    epochs: int = 1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    init_state: Mapping[str, Tensor] | None = None,
) -> tuple[StateDict, TrajectoryStats]:
    """A deterministic mini-batch SGD loop for small proxy models (pure torch).

    The model's initialisation, the data order and any dropout depend on ``seed`` only
    (the global RNG is forked, not touched), so two calls that differ only in one sample
    of ``dataset`` follow the same randomness, as the L2-stability definition requires.

    Args:
        model_factory: builds the model (called under the seeded RNG).
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar mean loss over the batch.
        dataset: S, map-style, yielding ``(input, target)`` samples.
        lr: η, a constant or a schedule ``step -> η_t`` (step counted from 0).
        batch_size: b (the last batch of an epoch may be smaller).
        epochs: passes over S (each with a fresh seeded permutation).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        seed: the seed of initialisation, data order and dropout.
        init_state: optional x₀ loaded (strictly) into the model instead of its random init.

    Returns:
        ``(state_dict, stats)``: the final weights (detached copies) and the trajectory's
        :class:`TrajectoryStats` (Λ, path length, gradient norms, ...).

    Raises:
        ValueError: an empty dataset or a non-positive batch size / epoch count.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("train_sgd: the dataset is empty")
    if batch_size <= 0 or epochs <= 0:
        raise ValueError(f"train_sgd: batch_size and epochs must be positive, got {batch_size}, {epochs}")
    schedule = lr if callable(lr) else (lambda step, _lr=float(lr): _lr)
    stats = TrajectoryStats()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_factory()
        if init_state is not None:
            model.load_state_dict(init_state, strict=True)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=schedule(0), momentum=momentum, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(seed)
        step = 0
        for _ in range(epochs):
            perm = torch.randperm(n, generator=order).tolist()
            for start in range(0, n, batch_size):
                inputs, targets = _batch(dataset, perm[start : start + batch_size])
                eta = float(schedule(step))
                for group in optimizer.param_groups:
                    group["lr"] = eta
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(inputs), targets).backward()
                grad_norm = global_norm(p.grad for p in params if p.grad is not None)
                before = [p.detach().clone() for p in params]
                optimizer.step()
                update = global_norm(p.detach() - b for p, b in zip(params, before, strict=True))
                stats.update(eta, len(perm[start : start + batch_size]), update, grad_norm)
                step += 1
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, stats


def _batch(dataset: Dataset, indices: list[int]) -> Any:
    """The samples ``indices`` of ``dataset``, collated (one indexing op for a TensorDataset)."""
    if isinstance(dataset, TensorDataset):
        index = torch.tensor(indices)
        return tuple(t[index] for t in dataset.tensors)
    return default_collate([dataset[i] for i in indices])


__all__ = ["train_sgd"]
