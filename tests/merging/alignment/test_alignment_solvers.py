"""Solvers: Hungarian alignment, group alignment, ZipIt and group zip."""

from __future__ import annotations

import pytest
import torch

from merging.alignment import (
    UnitMatching,
    identity_matching,
    match_groups,
    permutation_matching,
    row_correlation,
    solve_align,
    solve_group_align,
    solve_group_zip,
    solve_node,
    solve_zip,
)


def _features(units: int, dim: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(units, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _similarity(*models: torch.Tensor) -> torch.Tensor:
    """S of N models whose units are the rows of each ``[O, F]`` feature matrix."""
    return row_correlation(torch.cat(models))


def _sources(matching: UnitMatching, model: int) -> torch.Tensor:
    """For each merged unit, the one unit of ``model`` assigned to it (alignment)."""
    block = matching.unmerge_block(model)
    assert torch.equal(block.sum(0), torch.ones(block.shape[1], dtype=block.dtype))
    return block.argmax(0)


def test_align_recovers_a_known_permutation():
    x = _features(7)
    perm = torch.tensor([3, 6, 0, 5, 1, 4, 2])
    # Model 1 stores model 0's unit perm[j] at position j; noise keeps the task non-trivial.
    y = x[perm] + 0.05 * _features(7, seed=1)
    matching = solve_align(_similarity(x, y), 2)
    inverse = torch.argsort(perm)
    assert torch.equal(_sources(matching, 0), torch.arange(7))
    assert torch.equal(_sources(matching, 1), inverse)
    assert torch.equal(matching.merge, matching.unmerge)  # one unit per model: M = P
    assert 0.9 < matching.score <= 1.0


def test_align_three_models_each_onto_model_zero():
    x = _features(5)
    perms = [torch.tensor([1, 2, 3, 4, 0]), torch.tensor([4, 3, 2, 1, 0])]
    matching = solve_align(_similarity(x, x[perms[0]], x[perms[1]]), 3)
    for i, perm in enumerate(perms, start=1):
        assert torch.equal(_sources(matching, i), torch.argsort(perm))
    assert matching.score == pytest.approx(1.0)


def test_group_align_keeps_groups_together_and_recovers_heads():
    groups, gsize = 3, 4
    x = _features(groups * gsize)
    head_order = torch.tensor([2, 0, 1])
    inner = [torch.tensor([1, 0, 3, 2]), torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])]
    perm = torch.cat([int(h) * gsize + inner[j] for j, h in enumerate(head_order)])
    matching = solve_group_align(_similarity(x, x[perm]), 2, groups)
    assert torch.equal(_sources(matching, 1), torch.argsort(perm))
    assert torch.equal(matching.group_assignment, torch.stack([torch.arange(3), torch.argsort(head_order)]))


def test_group_align_never_splits_a_group_even_when_units_prefer_it():
    # Model 1 = model 0 with units 0 and 4 swapped across groups: the unit-level optimum
    # crosses groups, group alignment must not.
    x = _features(8)
    perm = torch.tensor([4, 1, 2, 3, 0, 5, 6, 7])
    unit_level = _sources(solve_align(_similarity(x, x[perm]), 2), 1)
    assert unit_level[0] // 4 != 0  # the free solution crosses groups
    sources = _sources(solve_group_align(_similarity(x, x[perm]), 2, 2), 1)
    for j in range(2):
        assert len(set((sources[j * 4 : (j + 1) * 4] // 4).tolist())) == 1


def test_group_align_with_one_group_is_align():
    s = _similarity(_features(6), _features(6, seed=3))
    assert torch.equal(solve_group_align(s, 2, 1).unmerge, solve_align(s, 2).unmerge)


def test_match_groups_sums_the_pair_scores_of_tied_nodes():
    # Node a weakly prefers head order (0, 1), node b strongly prefers (1, 0): the sum follows b.
    def sims(weight_same: float, weight_swap: float) -> torch.Tensor:
        s = torch.eye(4, dtype=torch.float64)
        cross = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
        for j in range(2):
            cross[j, :, j, :] = weight_same * torch.eye(2)
            cross[j, :, 1 - j, :] = weight_swap * torch.eye(2)
        full = torch.zeros(8, 8, dtype=torch.float64)
        full[:4, :4] = s
        full[4:, 4:] = s
        full[:4, 4:] = cross.reshape(4, 4)
        full[4:, :4] = cross.reshape(4, 4).T
        return full

    a, b = sims(0.6, 0.5), sims(0.1, 0.9)
    assert torch.equal(match_groups([a], 2, 2)[1], torch.tensor([0, 1]))
    assert torch.equal(match_groups([a, b], 2, 2)[1], torch.tensor([1, 0]))
    shared = match_groups([a, b], 2, 2)
    assert torch.equal(solve_group_align(a, 2, 2, group_assignment=shared).group_assignment, shared)


@pytest.mark.parametrize(("num_models", "score"), [(2, 1.0), (3, 0.75)])
def test_zip_of_identical_models_is_the_identity(num_models, score):
    x = _features(6)
    matching = solve_zip(_similarity(*[x] * num_models), num_models)
    assert torch.equal(matching.unmerge, torch.cat([torch.eye(6, dtype=torch.float64)] * num_models))
    # Each merged unit holds one unit of every model: M = P · N / N.
    torch.testing.assert_close(matching.merge, matching.unmerge)
    # N = 3: every unit first pairs two copies at 1, then the pair takes the third copy at
    # a · min(1, 1) = 0.5; the mean over 12 merges is (6 · 1 + 6 · 0.5) / 12.
    assert matching.score == pytest.approx(score)


def test_zip_hand_example_with_an_intra_model_merge():
    # Two models, two units each. Units 0 and 1 (both model 0) are the most similar pair.
    s = torch.tensor(
        [
            [1.0, 0.9, 0.2, 0.1],
            [0.9, 1.0, 0.3, 0.2],
            [0.2, 0.3, 1.0, 0.4],
            [0.1, 0.2, 0.4, 1.0],
        ],
        dtype=torch.float64,
    )
    matching = solve_zip(s, 2)
    # Step 1 merges (0, 1): its similarities become 0.5·min → to 2: 0.1, to 3: 0.05.
    # Model 0's budget int((2 // 2) · 1) = 1 is spent, intra pairs are then forbidden.
    # Step 2 takes (2, 3) at 0.4 (intra model 1, its own budget of 1). Two units remain.
    expected = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(matching.unmerge, expected)
    torch.testing.assert_close(matching.merge, expected)  # colsum 2 = N: M = P · 2 / 2
    assert matching.score == pytest.approx((0.9 + 0.4) / 2)


def test_zip_budget_zero_forbids_intra_model_pairs():
    s = torch.tensor(
        [[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.3, 0.2], [0.2, 0.3, 1.0, 0.4], [0.1, 0.2, 0.4, 1.0]], dtype=torch.float64
    )
    matching = solve_zip(s, 2, b=0.0)
    # Cross pairs only: (1, 2) at 0.3, then (0, 3) at 0.1 (the merged unit inherits the
    # forbidden intra-model entries through the min).
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(matching.unmerge, expected)


def test_zip_merge_matrix_averages_uneven_clusters():
    s = torch.tensor(
        [
            [1.0, 0.1, 0.95, 0.9],
            [0.1, 1.0, 0.0, 0.05],
            [0.95, 0.0, 1.0, 0.8],
            [0.9, 0.05, 0.8, 1.0],
        ],
        dtype=torch.float64,
    )
    matching = solve_zip(s, 2, a=1.0)
    # (0, 2) merge at 0.95, then the cluster {0, 2} absorbs 3 (min(0.9, 0.8) = 0.8 > all else).
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(matching.unmerge, expected)
    torch.testing.assert_close(matching.merge[:, 0], torch.tensor([2 / 3, 0.0, 2 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(matching.merge[:, 1], torch.tensor([0.0, 2.0, 0.0, 0.0], dtype=torch.float64))


def test_group_zip_identity_and_contiguous_heads():
    x = _features(8)
    matching = solve_group_zip(_similarity(x, x), 2, 2)
    assert torch.equal(matching.unmerge, torch.cat([torch.eye(8, dtype=torch.float64)] * 2))
    # Random, unrelated models: every merged head draws from one head per model.
    other = solve_group_zip(_similarity(x, _features(8, seed=9)), 2, 2)
    assert other.unmerge.shape == (16, 8)
    for j in range(2):
        cols = other.unmerge[:, j * 4 : (j + 1) * 4]
        rows = torch.nonzero(cols.sum(1)).flatten()
        for i in range(2):
            heads = set(((rows[(rows >= i * 8) & (rows < (i + 1) * 8)] - i * 8) // 4).tolist())
            assert len(heads) <= 1


def test_group_zip_recovers_permuted_heads():
    x = _features(8)
    perm = torch.tensor([5, 4, 7, 6, 1, 0, 3, 2])  # heads swapped, units shuffled inside
    matching = solve_group_zip(_similarity(x, x[perm]), 2, 2)
    assert torch.equal(matching.unmerge_block(0), torch.eye(8, dtype=torch.float64))
    assert torch.equal(matching.unmerge_block(1).argmax(0), torch.argsort(perm))


def test_solve_node_dispatch_and_identity_helpers():
    s = _similarity(_features(4), _features(4, seed=2))
    assert torch.equal(solve_node(s, 2, "align").unmerge, solve_align(s, 2).unmerge)
    assert torch.equal(solve_node(s, 2, "zip", 2).unmerge, solve_group_zip(s, 2, 2).unmerge)
    with pytest.raises(ValueError, match="mode"):
        solve_node(s, 2, "average")
    ident = identity_matching(3, 2)
    assert torch.equal(ident.merge_block(1), torch.eye(3))
    perm = permutation_matching(torch.tensor([2, 0, 1]))
    assert torch.equal(perm.merge_block(0).T @ torch.tensor([10.0, 20.0, 30.0]), torch.tensor([30.0, 10.0, 20.0]))


def test_solvers_reject_bad_input():
    s = _similarity(_features(4), _features(4, seed=2))
    with pytest.raises(ValueError, match="square"):
        solve_align(s[:, :7], 2)
    with pytest.raises(ValueError, match="split into 3 models"):
        solve_align(s, 3)
    with pytest.raises(ValueError, match="non-finite"):
        solve_zip(s.masked_fill(torch.eye(8, dtype=torch.bool), float("nan")), 2)
    with pytest.raises(ValueError, match="equal groups"):
        solve_group_align(s, 2, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        solve_zip(s, 2, r=1.0)
    with pytest.raises(ValueError, match="not a permutation"):
        solve_group_align(s, 2, 2, group_assignment=torch.tensor([[0, 1], [1, 1]]))
    with pytest.raises(ValueError, match="empty"):
        UnitMatching.from_assignment(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 2, 0.0)
    with pytest.raises(ValueError, match="permutation"):
        permutation_matching(torch.tensor([0, 0, 1]))
