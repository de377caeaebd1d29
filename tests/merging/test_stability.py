"""Stability measurements checked against their definitions on tiny, hand-computable inputs."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from merging.experiments.training import train_sgd
from merging.methods import get_method
from merging.stability import (
    SwappedDataset,
    TrajectoryStats,
    empirical_l2_stability,
    generalization_bound_template,
    global_norm,
    layer_name,
    merged_on_average_stability,
    normalized_weights,
    on_average_l2_stability,
    sparsified_task_vector_stats,
    state_distance,
    task_vector_stats,
)
from merging.state import StateDictError


def random_states(k: int, seed: int = 0, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc.0.weight": (6, 5), "enc.0.bias": (6,), "enc.2.weight": (3, 6), "head.weight": (2, 3)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    base["bn.num_batches_tracked"] = torch.tensor(3)
    experts = [
        {n: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + j for n, v in base.items()}
        for j in range(k)
    ]
    return experts, base


def flat_tau(expert, base):
    return torch.cat([(expert[k] - base[k]).flatten().double() for k in base if base[k].is_floating_point()])


# ------------------------------------------------------------------------ helpers


def test_layer_name_groups_keys_by_module_or_depth():
    assert layer_name("blocks.3.mlp.fc1.weight") == "blocks.3.mlp.fc1"
    assert layer_name("blocks.3.mlp.fc1.weight", depth=2) == "blocks.3"
    assert layer_name("scale") == "scale"
    with pytest.raises(ValueError, match="depth"):
        layer_name("a.b", depth=0)


def test_global_norm_and_state_distance():
    assert global_norm([torch.tensor([3.0]), torch.tensor([[4.0]])]) == pytest.approx(5.0)
    assert global_norm([]) == 0.0
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(9)}
    assert state_distance(a, b) == pytest.approx(5.0)  # the integer entry is ignored
    with pytest.raises(StateDictError, match="'v'"):
        state_distance(a, {"w": a["w"], "v": a["w"]})


def test_normalized_weights():
    assert normalized_weights(None, 4).tolist() == [0.25] * 4
    assert normalized_weights([1, 3], 2).tolist() == [0.25, 0.75]
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="weights"):
            normalized_weights(bad, 2)


# ------------------------------------------------------------- trajectory stats


def test_trajectory_stats_accumulate_by_definition():
    stats = TrajectoryStats()
    steps = [(0.1, 4, 0.5, 2.0), (0.05, 4, 0.25, 1.0), (0.2, 2, 1.0, None)]
    for lr, b, upd, g in steps:
        stats.update(lr, b, upd, g)
    assert stats.steps == 3
    assert stats.lr_integral == pytest.approx(0.35)
    assert stats.lr_integral_per_sample == pytest.approx(0.1 / 4 + 0.05 / 4 + 0.2 / 2)
    assert stats.samples == 10 and stats.mean_batch_size == pytest.approx(10 / 3)
    assert stats.path_length == pytest.approx(1.75)
    assert stats.max_update_norm == 1.0 and stats.last_update_norm == 1.0
    assert stats.grad_steps == 2
    assert stats.mean_grad_norm == pytest.approx(1.5)
    assert stats.mean_sq_grad_norm == pytest.approx(2.5)
    assert stats.max_grad_norm == 2.0 and stats.last_grad_norm == 1.0 and stats.last_lr == 0.2

    restored = TrajectoryStats()
    restored.load_state_dict(stats.state_dict())
    assert restored == stats
    with pytest.raises(KeyError, match="path_length"):
        TrajectoryStats().load_state_dict({k: v for k, v in stats.state_dict().items() if k != "path_length"})
    with pytest.raises(ValueError, match="batch size"):
        stats.update(0.1, 0, 0.0)


# --------------------------------------------------------- task-vector statistics


def test_hand_computed_orthogonal_task_vectors():
    base = {"a.w": torch.zeros(2)}
    experts = [{"a.w": torch.tensor([1.0, 0.0])}, {"a.w": torch.tensor([0.0, 1.0])}]
    s = task_vector_stats(experts, base)
    assert s.norms.tolist() == [1.0, 1.0]
    assert s.cosine.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    # τ̄ = (.5, .5); each ‖τ_j − τ̄‖² = .5; D = .5·.5 + .5·.5
    assert s.dispersion == pytest.approx(0.5)
    assert s.sign_conflict == 0.0  # no entry has two non-zero values
    assert s.density.tolist() == [0.5, 0.5]
    assert s.num_entries == 2


def test_hand_computed_sign_conflicts():
    base = {"a.w": torch.zeros(4)}
    experts = [
        {"a.w": torch.tensor([1.0, -1.0, 2.0, 0.0])},
        {"a.w": torch.tensor([-1.0, -1.0, 0.0, 3.0])},
        {"a.w": torch.tensor([1.0, 0.0, 0.0, 0.0])},
    ]
    s = task_vector_stats(experts, base)
    # entry 0: (+, −, +) conflict; entry 1: (−, −) agree; entries 2, 3: one non-zero value each
    assert s.sign_conflict == pytest.approx(0.5)
    expected = torch.tensor([[0.0, 0.5, 0.0], [0.5, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(s.pairwise_sign_conflict, expected)


def test_identical_experts_have_zero_dispersion_and_no_conflict():
    experts, base = random_states(1)
    s = task_vector_stats([experts[0]] * 3, base, weights=[0.2, 0.3, 0.5])
    assert s.dispersion == 0.0
    assert s.sign_conflict == 0.0
    assert torch.all(s.pairwise_sign_conflict == 0)
    torch.testing.assert_close(s.cosine, torch.ones(3, 3, dtype=torch.float64))
    assert all(v == 0.0 for v in s.layer_dispersion.values())


def test_matches_naive_flattened_definitions():
    experts, base = random_states(4, seed=1)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    s = task_vector_stats(experts, base, weights=[1, 2, 3, 4])
    taus = torch.stack([flat_tau(e, base) for e in experts])
    torch.testing.assert_close(s.norms, taus.norm(dim=1))
    torch.testing.assert_close(s.gram, taus @ taus.T)
    mean = (w[:, None] * taus).sum(0)
    assert s.dispersion == pytest.approx(float((w * (taus - mean).pow(2).sum(1)).sum()), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(taus[:, None], taus[None], dim=-1)
    torch.testing.assert_close(s.cosine, cos)
    assert s.num_entries == taus.shape[1]
    # layers partition the vector
    assert sum(s.layer_dispersion.values()) == pytest.approx(s.dispersion, rel=1e-12)
    torch.testing.assert_close(sum(v.pow(2) for v in s.layer_norms.values()), s.norms.pow(2))
    assert set(s.layer_norms) == {"enc.0", "enc.2", "head"}
    assert sum(s.layer_entries.values()) == s.num_entries


def test_cosines_bounded_symmetric_and_dispersion_base_independent():
    experts, base = random_states(3, seed=2, scale=1.0)
    s = task_vector_stats(experts, base)
    assert bool((s.cosine.abs() <= 1).all())
    torch.testing.assert_close(s.cosine, s.cosine.T)
    torch.testing.assert_close(torch.diagonal(s.cosine), torch.ones(3, dtype=torch.float64))
    assert -1 <= s.mean_pairwise_cosine() <= 1
    shifted = {k: v + 5.0 if v.is_floating_point() else v for k, v in base.items()}
    assert task_vector_stats(experts, shifted).dispersion == pytest.approx(s.dispersion, rel=1e-6)


def test_single_expert_and_zero_task_vector():
    experts, base = random_states(1)
    one = task_vector_stats(experts, base)
    assert one.dispersion == 0.0 and one.mean_pairwise_cosine() == 0.0 and one.num_experts == 1
    zero = task_vector_stats([base, experts[0]], base)
    assert zero.cosine[0, 1] == 0.0 and zero.norms[0] == 0.0


def test_layer_depth_option_and_bad_inputs():
    experts, base = random_states(2)
    s = task_vector_stats(experts, base, layer_depth=1)
    assert set(s.layer_norms) == {"enc", "head"}
    broken = dict(experts[1])
    broken.pop("head.weight")
    with pytest.raises(StateDictError, match="head.weight"):
        task_vector_stats([experts[0], broken], base)
    nan = dict(experts[1])
    nan["enc.0.bias"] = torch.full((6,), float("nan"))
    with pytest.raises(StateDictError, match="enc.0.bias"):
        task_vector_stats([experts[0], nan], base)
    with pytest.raises(ValueError, match="weights"):
        task_vector_stats(experts, base, weights=[1.0])


# ------------------------------------------------------------------ sparsified


def naive_global_trim(experts, base, density):
    """Each τ_j flattened whole; keep entries with |τ| ≥ the n-th largest magnitude."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    out = []
    for e in experts:
        tau = flat_tau(e, base)
        n = int(math.floor(density * tau.numel() + 1e-9))
        thr = tau.abs().sort(descending=True).values[n - 1]
        tau = torch.where(tau.abs() >= thr, tau, 0.0)
        trimmed, offset = {}, 0
        for k in keys:
            numel = base[k].numel()
            trimmed[k] = (base[k].double() + tau[offset : offset + numel].reshape(base[k].shape)).float()
            offset += numel
        out.append(trimmed)
    return out


def test_ties_stats_equal_stats_of_naively_trimmed_vectors():
    experts, base = random_states(3, seed=3)
    s = sparsified_task_vector_stats(experts, base, method="ties", density=0.25)
    fbase = {k: v for k, v in base.items() if v.is_floating_point()}
    ref = task_vector_stats(naive_global_trim(experts, base, 0.25), fbase)
    torch.testing.assert_close(s.norms, ref.norms, rtol=1e-5, atol=1e-6)
    assert s.dispersion == pytest.approx(ref.dispersion, rel=1e-5)
    assert s.sign_conflict == pytest.approx(ref.sign_conflict)
    n = s.num_entries
    torch.testing.assert_close(s.density, torch.full((3,), math.floor(0.25 * n) / n, dtype=torch.float64))
    dense = task_vector_stats(experts, base)
    assert bool((s.norms < dense.norms).all())
    full = sparsified_task_vector_stats(experts, base, method="ties", density=1.0)
    assert full.dispersion == pytest.approx(dense.dispersion, rel=1e-6)


def test_ties_per_tensor_scope_keeps_density_in_every_tensor():
    experts, base = random_states(2, seed=4)
    s = sparsified_task_vector_stats(experts, base, method="ties", density=0.3, scope="tensor")
    # ⌊0.3·n⌋ per tensor: 30 -> 9, 6 -> 1, 18 -> 5, 6 -> 1 entries; global scope keeps ⌊0.3·60⌋ = 18
    torch.testing.assert_close(s.density, torch.full((2,), 16 / 60, dtype=torch.float64))
    whole = sparsified_task_vector_stats(experts, base, method="ties", density=0.3, scope="global")
    torch.testing.assert_close(whole.density, torch.full((2,), 18 / 60, dtype=torch.float64))
    same = sparsified_task_vector_stats([experts[0]] * 2, base, method="ties", density=0.3, scope="tensor")
    assert same.dispersion == 0.0


def test_dare_stats_describe_the_dare_merge_input():
    experts, base = random_states(3, seed=5)
    s = sparsified_task_vector_stats(experts, base, method="dare", drop_rate=0.5, seed=7)
    merged = get_method("dare", drop_rate=0.5, seed=7, scaling=1.0).merge(experts, base)
    # task arithmetic with λ = 1 on the dropped vectors: ‖Σ_j τ̃_j‖² = Σ_ij G_ij
    moved = state_distance(merged, base) ** 2
    assert moved == pytest.approx(float(s.gram.sum()), rel=1e-4)
    assert 0.3 < float(s.density.mean()) < 0.7
    again = sparsified_task_vector_stats(experts, base, method="dare", drop_rate=0.5, seed=7)
    torch.testing.assert_close(again.gram, s.gram)


def test_sparsified_rejects_bad_options():
    experts, base = random_states(2)
    with pytest.raises(ValueError, match="method"):
        sparsified_task_vector_stats(experts, base, method="magnitude")
    with pytest.raises(ValueError, match="density"):
        sparsified_task_vector_stats(experts, base, method="ties", density=1.5)
    with pytest.raises(ValueError, match="drop_rate"):
        sparsified_task_vector_stats(experts, base, method="dare", drop_rate=1.0)


# ---------------------------------------------------------------- bound pieces


def test_merged_on_average_stability_hand_example():
    # (1/4)·(1/4)·1 + (3/4)·(1/4)·4
    assert merged_on_average_stability([1.0, 4.0], [1, 3]) == pytest.approx(0.8125)
    assert merged_on_average_stability([1.0, 4.0], [1, 3], weights=[1, 0]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="sample counts"):
        merged_on_average_stability([1.0], [1, 2])


def test_generalization_bound_template():
    assert generalization_bound_template(2.0, 1.0, 0.5, 0.1) == pytest.approx(2.0 * 0.5 + 1.5 * 0.1)
    with pytest.raises(ValueError, match="positive"):
        generalization_bound_template(0.0, 1.0, 0.5, 0.1)


# ------------------------------------------------------------------ SGD + probe


def regression_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def linear() -> nn.Module:
    return nn.Linear(4, 1)


def test_swapped_dataset():
    data = regression_data(3, 0)
    swapped = SwappedDataset(data, -1, (torch.ones(4), torch.ones(1)))
    assert len(swapped) == 3 and torch.equal(swapped[2][0], torch.ones(4)) and torch.equal(swapped[0][0], data[0][0])
    with pytest.raises(IndexError, match="outside"):
        SwappedDataset(data, 3, data[0])


def train_sgd_weights(ds, lr):
    return train_sgd(linear, nn.functional.mse_loss, ds, lr=lr, batch_size=4, epochs=3, seed=0)[0]


def test_empirical_l2_stability_probe():
    data = regression_data(12, 1)
    fresh = regression_data(3, 99)
    train = functools.partial(train_sgd_weights, lr=0.05)
    assert empirical_l2_stability(train, data, 5, data[5]) == 0.0  # swapping a sample for itself
    probe = empirical_l2_stability(train, data, 5, fresh[0])
    assert probe > 0
    # Λ = 0: the weights never see the data, so no swap can move them
    assert empirical_l2_stability(functools.partial(train_sgd_weights, lr=0.0), data, 5, fresh[0]) == 0.0
    avg = on_average_l2_stability(train, data, [fresh[0], fresh[1]], [5, 7])
    assert avg == pytest.approx((probe + empirical_l2_stability(train, data, 7, fresh[1])) / 2)
    with pytest.raises(ValueError, match="replacement"):
        on_average_l2_stability(train, data, [fresh[0]], [1, 2])


def test_swap_in_one_task_moves_the_merge_by_its_weight_only():
    """x_avg = Σ w_j θ_j: swapping a sample of task 0 changes only θ_0, so ‖Δx_avg‖² = w_0²‖Δθ_0‖²."""
    tasks = [regression_data(8, 10), regression_data(8, 11)]
    fresh = regression_data(1, 12)[0]
    w = [0.25, 0.75]

    def train(ds):
        return train_sgd(linear, nn.functional.mse_loss, ds, lr=0.05, batch_size=4, epochs=2, seed=0)[0]

    experts = [train(t) for t in tasks]
    swapped = [train(SwappedDataset(tasks[0], 2, fresh)), experts[1]]
    merge = get_method("average", weights=w)
    moved = state_distance(merge.merge(experts), merge.merge(swapped)) ** 2
    eps2_0 = empirical_l2_stability(train, tasks[0], 2, fresh, reference=experts[0])
    assert moved == pytest.approx(w[0] ** 2 * eps2_0, rel=1e-4)
    assert merged_on_average_stability([eps2_0, 0.0], [8, 8], w) == pytest.approx(0.5 * w[0] ** 2 * eps2_0)
