"""Similarities (activation, weight, combined), applying matrices, and the BatchNorm reset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging.alignment import (
    ActPoint,
    CorrelationStats,
    PermEntry,
    PermNode,
    PermSpec,
    activation_corr,
    combine_similarity,
    identity_matching,
    merge_state_dicts,
    mlp_spec,
    permutation_matching,
    reset_batchnorm,
    transform_tensor,
    weight_corr,
)
from merging.alignment.similarity import unit_features


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).eval()


def test_streamed_correlation_equals_corrcoef_of_all_samples():
    x = torch.randn(4, 60, generator=_gen(0), dtype=torch.float64)
    x[1] = 3 * x[0] + 1  # perfectly correlated pair
    stats = CorrelationStats(4)
    for chunk in x.split([7, 23, 30], dim=1):
        stats.update(chunk)
    torch.testing.assert_close(stats.compute(), torch.corrcoef(x))
    assert stats.compute()[0, 1] == pytest.approx(1.0)


def test_zero_variance_feature_correlates_zero():
    x = torch.randn(3, 10, generator=_gen(1), dtype=torch.float64)
    x[2] = 5.0
    stats = CorrelationStats(3)
    stats.update(x)
    corr = stats.compute()
    torch.testing.assert_close(corr[2], torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no samples"):
        CorrelationStats(3).compute()
    with pytest.raises(ValueError, match=r"\[3, samples\]"):
        stats.update(torch.zeros(4, 2))


def test_unit_features_reshapes_heads_and_flatten_inner():
    keys = torch.arange(2 * 3 * 5 * 4).reshape(2, 3, 5, 4)  # [B, H, N, D_h]
    feats = unit_features(keys, ActPoint("k", "post", (1, 3)), 12)
    assert feats.shape == (12, 10)
    assert torch.equal(feats[1 * 4 + 2], keys[:, 1, :, 2].reshape(-1))  # unit h·D_h + d
    flat = torch.arange(2 * 3 * 4).reshape(2, 12)  # [B, C·HW] with C = 3, HW = 4
    feats = unit_features(flat, ActPoint("fc", "pre", (-1,), inner=4), 3)
    assert torch.equal(feats[1], flat[:, 4:8].T.reshape(-1))
    with pytest.raises(ValueError, match="expected 5 units"):
        unit_features(flat, ActPoint("fc", "pre", (-1,)), 5)


def test_activation_corr_matches_hand_captured_hidden_features():
    models = [_mlp(0), _mlp(1)]
    skeleton = _mlp(2)
    states = [m.state_dict() for m in models]
    spec = mlp_spec(skeleton)
    x = torch.randn(30, 5, generator=_gen(3))
    data = [x[:10], (x[10:25], torch.zeros(15)), x[25:]]  # tensors and (x, y) batches
    corr = activation_corr(skeleton, states, spec, data)
    with torch.no_grad():
        first = torch.cat([m[1](m[0](x)) for m in models], 1).T.double()
        second = torch.cat([m[3](m[2](m[1](m[0](x)))) for m in models], 1).T.double()
    torch.testing.assert_close(corr["0"], torch.corrcoef(first))
    torch.testing.assert_close(corr["2"], torch.corrcoef(second))
    assert not skeleton.training and not skeleton[2]._forward_pre_hooks  # mode kept, hooks removed


def test_activation_corr_errors():
    skeleton = _mlp(0)
    states = [skeleton.state_dict()] * 2
    with pytest.raises(ValueError, match="no batches"):
        activation_corr(skeleton, states, mlp_spec(skeleton), [])
    with pytest.raises(ValueError, match="missing keys"):
        activation_corr(skeleton, [{"0.weight": states[0]["0.weight"]}] * 2, mlp_spec(skeleton), [torch.zeros(1, 5)])
    bad = PermSpec([PermNode("0", 6, (PermEntry("0.weight", 0),), act=ActPoint("nope"))])
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        activation_corr(skeleton, states, bad, [torch.zeros(1, 5)])


def test_weight_corr_concatenates_rows_bias_and_consumer_columns():
    models = [_mlp(0), _mlp(1)]
    states = [m.state_dict() for m in models]
    spec = mlp_spec(models[0])

    def vectors(state, out_perm=None):
        consumer = state["2.weight"] if out_perm is None else state["2.weight"][out_perm]
        return torch.cat([state["0.weight"], state["0.bias"][:, None], consumer.T], 1).double()

    expected = torch.corrcoef(torch.cat([vectors(s) for s in states]))
    torch.testing.assert_close(weight_corr(states, spec, "0", {}), expected)
    # The consumer's rows belong to node "2": they are seen through model i's matrix.
    perm = torch.tensor([2, 0, 3, 1])
    two = {"2": _two_model_matching(perm)}
    expected = torch.corrcoef(torch.cat([vectors(states[0]), vectors(states[1], perm)]))
    torch.testing.assert_close(weight_corr(states, spec, "0", two), expected)


def _two_model_matching(perm: torch.Tensor):
    """Model 0 unpermuted, model 1 permuted by ``perm`` (as alignment returns)."""
    from merging.alignment import UnitMatching

    p1 = permutation_matching(perm).unmerge
    return UnitMatching.from_assignment(torch.cat([torch.eye(perm.numel()), p1]), 2, 1.0)


def test_combine_similarity():
    w, a = torch.full((2, 2), 1.0), torch.full((2, 2), 0.2)
    torch.testing.assert_close(combine_similarity(w, a, 0.25), torch.full((2, 2), 0.25 * 1.0 + 0.75 * 0.2))
    assert combine_similarity(None, a, 0.9) is a
    assert combine_similarity(w, None, 0.1) is w
    with pytest.raises(ValueError, match="alpha"):
        combine_similarity(w, a, 1.5)
    with pytest.raises(ValueError, match="needs a weight or an activation"):
        combine_similarity(None, None, 0.5)


def test_transform_tensor_segments_offsets_and_inner():
    # A fused [q; k; v] weight (3 x 2 rows) and a consumer seen as [out, C=2, HW=3].
    spec = PermSpec(
        [
            PermNode("qk", 2, (PermEntry("qkv", 0, offset=0), PermEntry("qkv", 0, offset=2))),
            PermNode("c", 2, (PermEntry("fc", 1, "in", inner=3),)),
        ]
    )
    qkv = torch.arange(12.0).reshape(6, 2)
    swap = {"qk": permutation_matching(torch.tensor([1, 0]))}
    out = transform_tensor(qkv, spec.memberships("qkv"), swap, 0)
    assert torch.equal(out, qkv[[1, 0, 3, 2, 4, 5]])  # q and k rows swapped, v rows untouched
    fc = torch.arange(12.0).reshape(2, 6)
    out = transform_tensor(fc, spec.memberships("fc"), {"c": permutation_matching(torch.tensor([1, 0]))}, 0)
    assert torch.equal(out, fc[:, [3, 4, 5, 0, 1, 2]])  # channel blocks of HW = 3 move together
    assert torch.equal(transform_tensor(fc, spec.memberships("fc"), {}, 0), fc)


def test_merge_state_dicts_averages_aligned_units_and_copies_integer_buffers():
    spec = PermSpec([PermNode("h", 2, (PermEntry("a", 0), PermEntry("b", 1, "in")))])
    t = torch.tensor
    s0 = {"a": t([1.0, 2.0]), "b": t([[1.0, 2.0]]), "c": t(3.0), "n": t(7)}
    s1 = {"a": t([20.0, 10.0]), "b": t([[4.0, 3.0]]), "c": t(5.0), "n": t(9)}
    merged = merge_state_dicts([s0, s1], spec, {"h": _two_model_matching(torch.tensor([1, 0]))})
    assert torch.equal(merged["a"], torch.tensor([5.5, 11.0]))
    assert torch.equal(merged["b"], torch.tensor([[2.0, 3.0]]))
    assert merged["c"] == 4.0 and merged["n"] == 7
    with pytest.raises(ValueError, match="matched for 2 models"):
        merge_state_dicts([s0, s1, s0], spec, {"h": identity_matching(2, 2)})


def test_reset_batchnorm_recomputes_cumulative_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.running_mean"].fill_(9.0)
    batches = [torch.randn(8, 3, generator=_gen(i)) for i in range(3)]
    out = reset_batchnorm(model, state, batches)
    with torch.no_grad():
        hidden = [model[0](b) for b in batches]
    # momentum=None: the running statistics are the mean of the per-batch statistics.
    torch.testing.assert_close(out["1.running_mean"], torch.stack([h.mean(0) for h in hidden]).mean(0))
    torch.testing.assert_close(out["1.running_var"], torch.stack([h.var(0) for h in hidden]).mean(0))
    assert int(out["1.num_batches_tracked"]) == 3
    assert state["1.running_mean"][0] == 9.0  # the input is not modified
    assert not model.training and model[1].momentum == 0.1
    torch.testing.assert_close(out["0.weight"], state["0.weight"])
    with pytest.raises(ValueError, match="no batches"):
        reset_batchnorm(model, state, iter([]))
