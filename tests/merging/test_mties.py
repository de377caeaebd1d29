"""M-TIES / M-DARE: row rates from M-Loss, row-wise trim, backends, references, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging.methods import get_method
from merging.methods.classic import disjoint_mean, elect_sign, trim_to_density
from merging.methods.mties import (
    MTiesMerging,
    log_scale,
    rank_scale,
    robust_scale,
    row_keep_counts,
    row_keep_rates,
    rowwise_topk_trim,
)
from merging.mloss import MLossMeter, partial_merge


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))


def _experts(model: nn.Module, k: int = 3, scale: float = 0.2, seed: int = 1) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {n: v.clone() for n, v in model.state_dict().items()}
    return base, [{n: v + scale * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(k)]


def _data(n: int = 4, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 6, generator=g) for _ in range(n)]


def _ties_entry(experts: list[dict], base: dict, key: str, density: float) -> torch.Tensor:
    tau = torch.stack([e[key] for e in experts]) - base[key]
    trimmed = trim_to_density(tau, density) if density < 1 else tau
    return base[key] + disjoint_mean(trimmed, elect_sign(trimmed))


def _rowwise_entry(experts: list[dict], base: dict, key: str, rates: torch.Tensor) -> torch.Tensor:
    tau = torch.stack([e[key] for e in experts]) - base[key]
    trimmed = rowwise_topk_trim(tau, rates)
    return base[key] + disjoint_mean(trimmed, elect_sign(trimmed))


# ----------------------------------------------------------------------- row-wise trim


def test_spec_keep_counts():
    rates = row_keep_rates(torch.tensor([0.3, 0.1, 0.2]), density=0.8, spread=0.1)
    assert row_keep_counts(rates, 768).tolist() == [537, 614, 576]
    assert row_keep_counts(rates, 3072).tolist() == [2150, 2457, 2304]
    # and the trim keeps exactly those counts when magnitudes are distinct
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(2, 3, 768, generator=g)
    kept = (rowwise_topk_trim(tau, rates) != 0).sum(dim=2)
    assert kept.tolist() == [[537, 614, 576], [537, 614, 576]]


def test_rowwise_trim_keeps_ties_at_the_threshold():
    x = torch.tensor([[[0.1, -0.5, 0.3, -0.3, 0.05]]])
    trimmed = rowwise_topk_trim(x, torch.tensor([0.4]))
    assert torch.equal(trimmed, torch.tensor([[[0.0, -0.5, 0.3, -0.3, 0.0]]]))


def test_rowwise_trim_equals_per_row_tensor_trim_and_handles_conv_and_zero_rows():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(3, 4, 2, 3, 3, generator=g)  # conv weight: rows of 2·3·3 entries
    rates = torch.tensor([0.5, 0.0, 1.0, 0.25])
    trimmed = rowwise_topk_trim(tau, rates)
    for i, r in enumerate(rates.tolist()):
        torch.testing.assert_close(trimmed[:, i], trim_to_density(tau[:, i], r))
    assert torch.count_nonzero(trimmed[:, 1]) == 0
    torch.testing.assert_close(trimmed[:, 2], tau[:, 2])
    with pytest.raises(ValueError, match="rates"):
        rowwise_topk_trim(tau, torch.ones(3))


# ---------------------------------------------------------------------------- the method


def test_registered_with_defaults():
    method = get_method("mties")
    assert isinstance(method, MTiesMerging)
    assert (method.density, method.spread, method.sampling_size, method.scaling) == (0.8, 0.1, 1, 1.0)
    assert method.reference == "pretrained" and method.backend == "ties" and method.layers is None


def test_requires_base_model_and_data():
    model = _model()
    base, experts = _experts(model)
    with pytest.raises(ValueError, match="base"):
        get_method("mties").merge(experts, model=model, data=_data())
    with pytest.raises(ValueError, match="model"):
        get_method("mties").merge(experts, base, data=_data())
    with pytest.raises(ValueError, match="data"):
        get_method("mties").merge(experts, base, model=model)
    with pytest.raises(ValueError, match="empty"):
        get_method("mties").merge(experts, base, model=model, data=[])


@pytest.mark.parametrize(
    "kwargs",
    [{"density": 0.0}, {"density": 0.3, "spread": 0.4}, {"sampling_size": 0}, {"reference": "x"}, {"backend": "x"}],
)
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        MTiesMerging(**kwargs)


def test_merge_follows_the_spec_step_by_step():
    model = _model()
    base, experts = _experts(model, k=2)
    data = _data(n=5)
    method = get_method("mties", density=0.6, spread=0.2)
    merged = method.merge(experts, base, model=model, data=data)

    # Node M-Loss of each target: per-batch vectors averaged over K·S = 2 successive
    # batches; target "0" takes batches 0-1, target "2" batches 2-3.
    meter = MLossMeter(model, experts, data[0], base=base, output=False)
    for name, batches in (("0", data[0:2]), ("2", data[2:4])):
        vectors = []
        for b in batches:
            s = meter.measure(b, layers=[name])[name]
            vectors.append(s.node_sum / s.positions)
        torch.testing.assert_close(method.node_mloss[name], torch.stack(vectors).mean(0))

    for key in merged:
        layer = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and layer in ("0", "2"):
            rates = row_keep_rates(method.node_mloss[layer], 0.6, 0.2)
            expected = _rowwise_entry(experts, base, key, rates)
        else:
            expected = _ties_entry(experts, base, key, 0.6)
        torch.testing.assert_close(merged[key], expected, msg=key)


def test_rows_with_more_conflict_keep_fewer_entries():
    model = _model()
    base, experts = _experts(model, k=2, scale=0.05)
    # make rows 0-2 of the first layer disagree strongly between the two experts
    experts[0]["0.weight"][:3] += 2.0
    experts[1]["0.weight"][:3] -= 2.0
    method = get_method("mties", density=0.8, spread=0.3)
    merged = method.merge(experts, base, model=model, data=_data(n=4))
    m = method.node_mloss["0"]
    assert set(m.argsort(descending=True)[:3].tolist()) == {0, 1, 2}
    rates = row_keep_rates(m, 0.8, 0.3)
    assert rates[:3].max() < rates[3:].min()
    assert merged["0.weight"].shape == base["0.weight"].shape


def test_spread_zero_makes_data_irrelevant_and_trims_targets_row_by_row():
    model = _model()
    base, experts = _experts(model)
    a = get_method("mties", density=0.5, spread=0.0).merge(experts, base, model=model, data=_data(seed=3))
    b = get_method("mties", density=0.5, spread=0.0).merge(experts, base, model=model, data=_data(seed=4))
    ties = get_method("ties", density=0.5, scope="tensor").merge(experts, base)
    for key in a:
        assert torch.equal(a[key], b[key]), key
        if key in ("0.weight", "2.weight"):
            rates = torch.full((base[key].shape[0],), 0.5, dtype=torch.float64)
            torch.testing.assert_close(a[key], _rowwise_entry(experts, base, key, rates))
        else:  # everything else is exactly per-tensor TIES
            torch.testing.assert_close(a[key], ties[key], msg=key)


def test_identical_experts_and_unchanged_experts():
    model = _model()
    base, experts = _experts(model)
    same = [experts[0]] * 3
    kept = get_method("mties", density=1.0, spread=0.0).merge(same, base, model=model, data=_data())
    for key in kept:
        torch.testing.assert_close(kept[key], experts[0][key], msg=key)
    untouched = get_method("mties").merge([dict(base), dict(base)], base, model=model, data=_data())
    for key in untouched:
        assert torch.equal(untouched[key], base[key]), key


def test_ties_elect_and_disjoint_mean_spec_example():
    # One bias entry of a 4-node layer, no trim (density 1): the spec's elect example.
    model = nn.Sequential(nn.Linear(2, 4))
    base = {"0.weight": torch.zeros(4, 2), "0.bias": torch.zeros(4)}
    taus = [[0.5, -0.25, 0.0, 0.25], [-0.25, -0.25, 0.0, -0.25], [0.25, 0.5, 0.0, 0.0]]
    experts = [{"0.weight": torch.zeros(4, 2), "0.bias": torch.tensor(t)} for t in taus]
    data = [torch.randn(3, 2)]
    merged = get_method("mties", density=1.0, spread=0.0).merge(experts, base, model=model, data=data)
    assert merged["0.bias"].tolist() == [0.375, 0.5, 0.0, 0.25]


def test_few_layer_mties_restricts_the_targets():
    model = _model()
    base, experts = _experts(model)
    method = get_method("mties", density=0.6, spread=0.2, layers=["2"])
    merged = method.merge(experts, base, model=model, data=_data())
    assert list(method.node_mloss) == ["2"]
    torch.testing.assert_close(merged["0.weight"], _ties_entry(experts, base, "0.weight", 0.6))
    rates = row_keep_rates(method.node_mloss["2"], 0.6, 0.2)
    torch.testing.assert_close(merged["2.weight"], _rowwise_entry(experts, base, "2.weight", rates))
    with pytest.raises(ValueError, match="no such module"):
        get_method("mties", layers=["blocks.9"]).merge(experts, base, model=model, data=_data())


def test_mdare_backend_is_seeded_and_rescales():
    model = _model()
    base, experts = _experts(model, k=1)
    run = lambda seed: get_method("mties", backend="dare", density=0.5, spread=0.2, seed=seed).merge(  # noqa: E731
        experts, base, model=model, data=_data()
    )
    a, b, c = run(0), run(0), run(1)
    tau = experts[0]["4.weight"] - base["4.weight"]
    merged_tau = a["4.weight"] - base["4.weight"]
    kept = merged_tau != 0
    # K = 1: elect + disjoint mean return the dropped-and-rescaled task vector itself
    torch.testing.assert_close(merged_tau[kept], tau[kept] / 0.5)
    assert 0 < int(kept.sum()) < tau.numel()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["4.weight"], c["4.weight"])
    # target rows still use the magnitude top-k, whatever the seed
    assert torch.equal(a["0.weight"], c["0.weight"])


def test_incremental_reference_measures_on_the_partial_merge():
    model = _model()
    base, experts = _experts(model, k=2)
    data = _data(n=4)
    method = get_method("mties", reference="incremental", density=0.7, spread=0.2)
    merged = method.merge(experts, base, model=model, data=data)
    pretrained = get_method("mties", density=0.7, spread=0.2)
    pretrained.merge(experts, base, model=model, data=data)
    # the first target sees the same input; the second sees the merged first layer
    torch.testing.assert_close(method.node_mloss["0"], pretrained.node_mloss["0"])
    assert not torch.allclose(method.node_mloss["2"], pretrained.node_mloss["2"])
    meter = MLossMeter(model, experts, data[0], base=base, output=False)
    reference = partial_merge(base, merged, "2.weight")
    vectors = []
    for b in data[2:4]:
        s = meter.measure(b, layers=["2"], reference=reference)["2"]
        vectors.append(s.node_sum / s.positions)
    torch.testing.assert_close(method.node_mloss["2"], torch.stack(vectors).mean(0))


def test_sampling_size_and_cycling_data():
    model = _model()
    base, experts = _experts(model, k=2)
    data = _data(n=3)
    method = get_method("mties", sampling_size=2)
    method.merge(experts, base, model=model, data=data)
    # target "0": batches 0,1,2,0; target "2": batches 1,2,0,1 (the data cycles)
    meter = MLossMeter(model, experts, data[0], base=base, output=False)

    def mean_over(name, order):
        vecs = []
        for i in order:
            s = meter.measure(data[i], layers=[name])[name]
            vecs.append(s.node_sum / s.positions)
        return torch.stack(vecs).mean(0)

    torch.testing.assert_close(method.node_mloss["0"], mean_over("0", [0, 1, 2, 0]))
    torch.testing.assert_close(method.node_mloss["2"], mean_over("2", [1, 2, 0, 1]))


def test_dtype_is_kept():
    model = _model().to(torch.bfloat16)
    base, experts = _experts(model)
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    experts = [{k: v.to(torch.bfloat16) for k, v in e.items()} for e in experts]
    data = [d.to(torch.bfloat16) for d in _data()]
    merged = get_method("mties").merge(experts, base, model=model, data=data)
    assert all(v.dtype == torch.bfloat16 for v in merged.values())


# -------------------------------------------------------------- Def. 3.6 scales and rates


def test_rank_scale_spec_example_and_ties():
    assert rank_scale(torch.tensor([0.3, 0.1, 0.2])).tolist() == [1.0, 0.0, 0.5]
    assert rank_scale(torch.tensor([0.5, 0.5, 0.1])).tolist() == [0.5, 1.0, 0.0]  # ties by index
    assert rank_scale(torch.tensor([2.0])).tolist() == [0.0]


def test_row_keep_rates_spec_example():
    rates = row_keep_rates(torch.tensor([0.3, 0.1, 0.2]), density=0.8, spread=0.1)
    torch.testing.assert_close(rates, torch.tensor([0.7, 0.8, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match="density - spread"):
        row_keep_rates(torch.tensor([0.1, 0.2]), density=0.1, spread=0.2)
    with pytest.raises(ValueError, match="scale"):
        row_keep_rates(torch.tensor([0.1, 0.2]), scale="minmax")


def test_robust_and_log_scales():
    m = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0])
    robust = robust_scale(m)
    # median 2, IQR 2 -> [-1, -0.5, 0, 0.5, 49] -> min-max
    torch.testing.assert_close(robust, (torch.tensor([-1.0, -0.5, 0.0, 0.5, 49.0], dtype=torch.float64) + 1) / 50)
    logs = log_scale(torch.tensor([1e-6, 1.0, 1e6]))
    assert logs[0] == 0 and logs[2] == 1 and 0 < logs[1] < 1
    assert robust_scale(torch.ones(4)).tolist() == [0.0] * 4
    assert log_scale(torch.ones(4)).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="NaN"):
        rank_scale(torch.tensor([0.1, float("nan")]))
