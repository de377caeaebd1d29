"""Drift ratios, shares of the dispersion and per-layer energies against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from merging.stability import global_norm, task_vector_stats
from merging.stability_stats import deviation_shares, drift_ratios, layer_square_norms, task_vector_norms


def experts_and_base():
    base = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(3)}
    experts = [
        {"fc.weight": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "fc.bias": torch.tensor([0.0, 0.0])},
        {"fc.weight": torch.tensor([[0.0, 2.0], [0.0, 0.0]]), "fc.bias": torch.tensor([0.0, 0.0])},
        {"fc.weight": torch.tensor([[0.0, 0.0], [0.0, 0.0]]), "fc.bias": torch.tensor([3.0, 4.0])},
    ]
    for e in experts:
        e["bn.num_batches_tracked"] = torch.tensor(7)
    return experts, base


def test_drift_ratios():
    r = drift_ratios(torch.tensor([1.0, 2.0, 4.0]))
    assert r.tolist() == [1.0 / 3.0, 2.0 / 2.5, 4.0 / 1.5]
    assert drift_ratios(torch.tensor([0.0, 3.0])).tolist() == [0.0, math.inf]
    assert drift_ratios(torch.tensor([0.0, 0.0])).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="two experts"):
        drift_ratios(torch.tensor([1.0]))


def test_task_vector_norms_skip_integer_buffers():
    experts, base = experts_and_base()
    norms = task_vector_norms(experts, base)
    assert norms.dtype == torch.float64
    assert norms.tolist() == [1.0, 2.0, 5.0]
    assert norms.tolist() == [global_norm([e["fc.weight"], e["fc.bias"]]) for e in experts]


def test_deviation_shares_are_each_experts_part_of_the_dispersion():
    experts, base = experts_and_base()
    weights = [0.5, 0.25, 0.25]
    stats = task_vector_stats(experts, base, weights)
    shares = deviation_shares(stats)
    tau = torch.stack([torch.cat([e["fc.bias"], e["fc.weight"].flatten()]) for e in experts]).double()
    w = torch.tensor(weights, dtype=torch.float64)
    mean = w @ tau
    contrib = w * (tau - mean).pow(2).sum(1)
    torch.testing.assert_close(shares, contrib / contrib.sum())
    assert float(shares.sum()) == pytest.approx(1.0)
    same = task_vector_stats([experts[0], experts[0]], base)
    assert deviation_shares(same).tolist() == [0.0, 0.0]


def test_layer_square_norms_sum_to_the_squared_norms():
    experts, base = experts_and_base()
    stats = task_vector_stats(experts, base)
    per_layer = layer_square_norms(stats)
    assert per_layer == pytest.approx({"fc": 1.0 + 4.0 + 25.0})
    assert sum(per_layer.values()) == pytest.approx(float(stats.norms.pow(2).sum()))
