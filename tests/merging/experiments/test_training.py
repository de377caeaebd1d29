"""The deterministic SGD loop of the experiments: its trajectory statistics and its seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from merging.experiments.training import train_sgd
from merging.stability import state_distance


def regression_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def linear() -> nn.Module:
    return nn.Linear(4, 1)


def test_train_sgd_lr_integral_path_length_and_determinism():
    data = regression_data(10, 0)
    rng = torch.random.get_rng_state()
    state, stats = train_sgd(linear, nn.functional.mse_loss, data, lr=0.1, batch_size=4, epochs=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left alone
    assert stats.steps == 6  # ⌈10/4⌉ = 3 batches per epoch
    assert stats.lr_integral == pytest.approx(0.6)
    assert stats.lr_integral_per_sample == pytest.approx(2 * (0.1 / 4 + 0.1 / 4 + 0.1 / 2))
    assert stats.samples == 20
    init, _ = train_sgd(linear, nn.functional.mse_loss, data, lr=0.0, batch_size=4, epochs=1, seed=3)
    assert stats.path_length >= state_distance(state, init) - 1e-6
    again, _ = train_sgd(linear, nn.functional.mse_loss, data, lr=0.1, batch_size=4, epochs=2, seed=3)
    assert all(torch.equal(state[k], again[k]) for k in state)

    schedule = [0.3, 0.2, 0.1, 0.05]
    _, sched = train_sgd(linear, nn.functional.mse_loss, data, lr=lambda t: schedule[t], batch_size=5, epochs=2)
    assert sched.lr_integral == pytest.approx(sum(schedule))
    with pytest.raises(ValueError, match="empty"):
        train_sgd(linear, nn.functional.mse_loss, TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1)))
