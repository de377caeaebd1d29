"""The TIES/DARE family: the paper's steps as the reference of the fused forms, DARE as a
composition (drop, then the task-arithmetic sum or TIES)."""

from __future__ import annotations

import math

import pytest
import torch

from merging.methods import _kernels, get_method
from merging.methods.classic import Dare, TiesMerging
from merging.methods.dare import dare_drop, entry_generator
from merging.methods.ties import TiesContext, disjoint_mean, elect_sign, ties_disjoint_merge, trim_to_density


def _task_vectors(k: int, n: int = 5000, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    values = [base + 0.25 * torch.randint(-3, 4, (n,), generator=g).float() for _ in range(k)]
    thresholds = torch.rand(k, generator=g) * 0.6
    thresholds[0] = 0.5  # entries at the threshold are kept
    if k > 1:
        thresholds[1] = math.inf  # this expert keeps nothing
    return values, base, thresholds


def _reference(values, base, thresholds, scaling):
    """θ₀ + λ · disjoint_mean(elect_sign(trim(τ))), step by step as the paper writes it."""
    tau = torch.stack(values) - base
    trimmed = trim_to_density(tau, 0.0, thresholds)
    return base + scaling * disjoint_mean(trimmed, elect_sign(trimmed))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_fused_torch_form_equals_the_paper_steps(k):
    values, base, thresholds = _task_vectors(k)
    fused = base + 0.7 * ties_disjoint_merge(torch.stack(values) - base, thresholds)
    torch.testing.assert_close(fused, _reference(values, base, thresholds, 0.7), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_numba_kernel_equals_the_paper_steps(k):
    assert _kernels.available([torch.zeros(1)]), "numba is a dependency: its kernels must load"
    values, base, thresholds = _task_vectors(k)
    got = _kernels.ties_merge(values, base, thresholds, 0.7)
    torch.testing.assert_close(got, _reference(values, base, thresholds, 0.7), atol=1e-6, rtol=1e-6)


def test_ties_prepare_returns_a_typed_context():
    values, base, _ = _task_vectors(3)
    experts, base_sd = [{"w": v} for v in values], {"w": base, "n": torch.tensor(1)}
    context = TiesMerging(density=0.3).prepare(experts, base_sd)
    assert isinstance(context, TiesContext) and context.entries == base.numel()
    assert context.thresholds.shape == (3,)
    assert TiesMerging(scope="tensor").prepare(experts, base_sd).thresholds is None


def test_dare_composes_drop_with_task_arithmetic_or_ties():
    values, base, _ = _task_vectors(3)
    experts, base_sd = [{"w": v} for v in values], {"w": base}
    tau = dare_drop(torch.stack(values) - base, 0.5, entry_generator(3, "w"))
    dare_ta = Dare(drop_rate=0.5, seed=3).merge(experts, base_sd)["w"]
    torch.testing.assert_close(dare_ta, base + 0.3 * tau.sum(dim=0))
    dare_ties = Dare(drop_rate=0.5, seed=3, combine="ties", scaling=0.7).merge(experts, base_sd)["w"]
    trimmed = trim_to_density(tau, 1.0, torch.zeros(3))
    torch.testing.assert_close(dare_ties, base + 0.7 * disjoint_mean(trimmed, elect_sign(trimmed)))
    assert not isinstance(get_method("dare"), TiesMerging)
