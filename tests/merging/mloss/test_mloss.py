"""M-Loss measurement: the gap maths, layer discovery, references, the report and the Metric."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from merging.mloss import (
    OUTPUT,
    MLossMeter,
    MLossStatistics,
    capture_layer_input,
    centred_gap,
    expert_preactivations,
    find_activation_layers,
    layer_mloss,
    m_loss,
    mloss_report,
    mloss_statistics,
    node_group_map,
    node_mloss,
    partial_merge,
    weighted_average,
)
from merging.mloss.metric import MLoss
from merging.models import SmallCNN
from merging.state import StateDictError


def _mlp(act: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), act or nn.GELU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


def _experts(model: nn.Module, k: int, scale: float = 0.1, seed: int = 1) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {n: v.clone() for n, v in model.state_dict().items()}
    experts = [
        {n: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for n, v in base.items()}
        for _ in range(k)
    ]
    return base, experts


def _data(n: int = 3, batch: int = 4, dim: int = 6, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g) for _ in range(n)]


def _naive_gap(z: torch.Tensor, alpha: torch.Tensor, act) -> torch.Tensor:
    """σ(Σ α z) − Σ α σ(z), element by element with Python loops over experts."""
    merged = sum(a * z[j] for j, a in enumerate(alpha.tolist()))
    ens = sum(a * act(z[j]) for j, a in enumerate(alpha.tolist()))
    return act(merged) - ens


# ------------------------------------------------------------------------- pure maths


def test_node_and_layer_mloss_match_naive_loop_on_token_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g)  # B=3 samples, T=5 tokens, d_in=4
    weight = torch.randn(3, 6, 4, generator=g)
    bias = torch.randn(3, 6, generator=g)
    alpha = torch.tensor([0.5, 0.3, 0.2])
    z = torch.stack([x @ weight[j].T + bias[j] for j in range(3)])  # (K, B, T, d_out)
    gap = _naive_gap(z, alpha, F.gelu)
    expected_node = torch.stack([gap[..., i].pow(2).mean() for i in range(6)])
    expected_layer = torch.stack([gap[s].flatten().norm() for s in range(3)])
    merged = F.gelu(sum(a * z[j] for j, a in enumerate(alpha.tolist())))
    expected_normalized = torch.stack([gap[s].flatten().norm() / (merged[s].flatten().norm() + 1e-8) for s in range(3)])

    torch.testing.assert_close(node_mloss(x, weight, bias, alpha, F.gelu), expected_node, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(layer_mloss(x, weight, bias, alpha, F.gelu), expected_layer, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        layer_mloss(x, weight, bias, alpha, F.gelu, normalize=True), expected_normalized, rtol=1e-4, atol=1e-7
    )


def test_relu_gap_hand_example():
    # Two experts, one node: z = +1 and -1. σ(mean) = ReLU(0) = 0; mean σ = 0.5 → gap = -0.5.
    x = torch.ones(1, 1)
    weight = torch.tensor([[[1.0]], [[-1.0]]])
    node = node_mloss(x, weight, None, torch.tensor([0.5, 0.5]), F.relu)
    assert node.tolist() == [0.25]
    assert layer_mloss(x, weight, None, torch.tensor([0.5, 0.5]), F.relu).tolist() == [0.5]


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2),
        nn.Conv2d(4, 4, 3, padding="same", groups=4, bias=False),
        nn.Conv1d(4, 6, 3, stride=2),
    ],
)
def test_batched_conv_preactivations_equal_per_expert_convs(conv):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *([9, 9] if isinstance(conv, nn.Conv2d) else [11]), generator=g)
    weight = torch.randn(3, *conv.weight.shape, generator=g)
    bias = None if conv.bias is None else torch.randn(3, conv.out_channels, generator=g)
    fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
    z = expert_preactivations(x, weight, bias, conv)
    for j in range(3):
        ref = fn(x, weight[j], None if bias is None else bias[j], conv.stride, conv.padding, conv.dilation, conv.groups)
        torch.testing.assert_close(z[j], ref.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_linear_preactivations_equal_per_expert_linear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g)
    weight, bias = torch.randn(4, 7, 5, generator=g), torch.randn(4, 7, generator=g)
    z = expert_preactivations(x, weight, bias)
    assert z.shape == (4, 2, 3, 7)
    for j in range(4):
        torch.testing.assert_close(z[j], F.linear(x, weight[j], bias[j]))


def test_centred_gap_is_exactly_zero_for_identical_experts_and_in_place_activation():
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(1, 4, 3, 33, generator=g)
    z = torch.cat([anchor, torch.zeros(2, 4, 3, 33)])
    for act in (nn.ReLU(inplace=True), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()):
        gap, merged = centred_gap(z.clone(), torch.tensor([0.2, 0.5, 0.3]), act)
        assert torch.count_nonzero(gap) == 0
        torch.testing.assert_close(merged, act(anchor[0].clone()))


def test_conv_padding_mode_other_than_zeros_is_refused():
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="reflect"):
        expert_preactivations(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 2, 3, 3), None, conv)


# ----------------------------------------------------------------------- layer discovery


class _FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.relu(self.fc(x))


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.act2 = nn.SiLU()

    def forward(self, x):
        return self.act2(self.conv2(self.act(self.bn(self.conv(x)))))


def test_find_activation_layers_follows_data_flow():
    mlp = _mlp()
    found = find_activation_layers(mlp, torch.randn(2, 6))
    assert list(found) == ["0", "2"]
    assert isinstance(found["0"], nn.GELU) and isinstance(found["2"], nn.ReLU)
    assert find_activation_layers(_FunctionalNet(), torch.randn(2, 4)) == {}
    convbn = find_activation_layers(_ConvBN(), torch.randn(2, 1, 6, 6))
    assert list(convbn) == ["conv2"]  # the conv feeding BatchNorm is not measured
    cnn = find_activation_layers(SmallCNN(in_chans=1, width=4, depth=3, num_features=8), torch.randn(2, 1, 8, 8))
    assert list(cnn) == ["features.0", "features.3", "features.6", "fc"]


def test_find_activation_layers_on_timm_vit_picks_mlp_fc1():
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=2, num_heads=2, num_classes=0)
    found = find_activation_layers(vit, torch.randn(1, 1, 8, 8))
    assert list(found) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert all(isinstance(act, nn.GELU) for act in found.values())


# --------------------------------------------------------------------------- m_loss


def test_m_loss_pretrained_reference_matches_hand_computation():
    model = _mlp()
    base, experts = _experts(model, 3)
    data = _data()
    report = m_loss(model, experts, data, base=base)
    x = torch.cat(data)
    alpha = torch.full((3,), 1 / 3)
    # layer "0": its input is the data itself.
    z0 = torch.stack([x @ e["0.weight"].T + e["0.bias"] for e in experts])
    gap0 = _naive_gap(z0, alpha, F.gelu)
    torch.testing.assert_close(report.node["0"], gap0.pow(2).mean(0), rtol=1e-4, atol=1e-8)
    assert report.layer["0"] == pytest.approx(float(gap0.norm(dim=1).mean()), rel=1e-4)
    # layer "2": its input is the *pretrained* model's hidden activation.
    h = F.gelu(x @ base["0.weight"].T + base["0.bias"])
    z2 = torch.stack([h @ e["2.weight"].T + e["2.bias"] for e in experts])
    gap2 = _naive_gap(z2, alpha, F.relu)
    torch.testing.assert_close(report.node["2"], gap2.pow(2).mean(0), rtol=1e-4, atol=1e-8)
    merged2 = F.relu(z2.mean(0))
    normalized = (gap2.norm(dim=1) / (merged2.norm(dim=1) + 1e-8)).mean()
    assert report.layer_normalized["2"] == pytest.approx(float(normalized), rel=1e-4)
    # the output: merged model's output against the mean of the experts' outputs.
    avg = {k: sum(e[k] for e in experts) / 3 for k in base}
    out_gap = functional_call(model, avg, (x,)) - sum(functional_call(model, e, (x,)) for e in experts) / 3
    torch.testing.assert_close(report.node[OUTPUT], out_gap.pow(2).mean(0), rtol=1e-3, atol=1e-9)
    assert report.layer[OUTPUT] == pytest.approx(float(out_gap.norm(dim=1).mean()), rel=1e-3)
    assert report.samples == {"0": 12, "2": 12, OUTPUT: 12}
    assert report.mean == pytest.approx((report.layer["0"] + report.layer["2"]) / 2)


def test_capture_layer_input_on_a_substituted_state():
    model = _mlp()
    base, experts = _experts(model, 1)
    x = _data(n=1)[0]
    got = capture_layer_input(model, "2", x, state=experts[0])
    torch.testing.assert_close(got, F.gelu(x @ experts[0]["0.weight"].T + experts[0]["0.bias"]))
    torch.testing.assert_close(capture_layer_input(model, "2", x), F.gelu(x @ base["0.weight"].T + base["0.bias"]))
    with pytest.raises(ValueError, match="no module"):
        capture_layer_input(model, "9", x)


def test_references_hook_the_right_model():
    model = _mlp()
    base, experts = _experts(model, 2)
    data = _data()
    avg = weighted_average(experts, torch.tensor([0.5, 0.5], dtype=torch.float64))
    pre = m_loss(model, experts, data, base=base, reference="pretrained", output=False)
    average = m_loss(model, experts, data, base=base, reference="average", output=False)
    explicit = m_loss(model, experts, data, reference=avg, output=False)
    incremental = m_loss(model, experts, data, base=base, reference="incremental", output=False)
    # the first layer sees the data whatever the reference
    torch.testing.assert_close(pre.node["0"], average.node["0"])
    assert not torch.allclose(pre.node["2"], average.node["2"])
    torch.testing.assert_close(explicit.node["2"], average.node["2"])
    # incremental: layers before "2" averaged, the rest θ₀ -> the same input as "average" here
    torch.testing.assert_close(incremental.node["2"], average.node["2"])
    # with an explicit merged state, the partial merge takes its leading entries
    other = {k: v + 0.3 for k, v in base.items()}
    inc_other = m_loss(model, experts, data, base=base, reference="incremental", merged=other, output=False)
    manual = m_loss(model, experts, data, reference=partial_merge(base, other, "2.weight"), output=False)
    torch.testing.assert_close(inc_other.node["2"], manual.node["2"])


def test_identical_experts_give_exactly_zero():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(inplace=True), nn.Linear(10, 9), nn.GELU(), nn.Linear(9, 2))
    base, experts = _experts(model, 1)
    for ref in ("pretrained", "average", "incremental"):
        report = m_loss(model, [experts[0]] * 3, _data(), base=base, reference=ref, weights=[0.2, 0.3, 0.5])
        assert set(report.layer) == {"0", "2", OUTPUT}
        assert all(v == 0.0 for v in report.layer.values())
        assert all(torch.count_nonzero(v) == 0 for v in report.node.values())


def test_single_expert_and_linear_model():
    model = _mlp()
    base, experts = _experts(model, 2)
    single = m_loss(model, experts[:1], _data(), base=base)
    assert all(v == 0.0 for v in single.layer.values())
    linear = nn.Sequential(nn.Linear(6, 2))
    lbase, lexperts = _experts(linear, 3, scale=0.5)
    report = m_loss(linear, lexperts, _data(), base=lbase)
    assert list(report.layer) == [OUTPUT]  # no activation: only the output is measured
    assert report.layer[OUTPUT] < 1e-5  # linear in θ: averaging weights = averaging outputs
    deep = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))  # bilinear in θ: a real gap
    dbase, dexperts = _experts(deep, 3, scale=0.5)
    assert m_loss(deep, dexperts, _data(), base=dbase).layer[OUTPUT] > 0.1


def test_base_that_is_an_expert_gives_the_same_values():
    # θ₀ is expert 0 (a model measured against its own start): the reference forward is reused
    model = _mlp()
    _, experts = _experts(model, 2)
    shared = m_loss(model, experts, _data(), base=experts[0])
    copied = m_loss(model, experts, _data(), base={k: v.clone() for k, v in experts[0].items()})
    assert shared.layer == copied.layer
    for name in shared.node:
        assert torch.equal(shared.node[name], copied.node[name])


def test_expert_order_does_not_matter():
    model = _mlp()
    base, experts = _experts(model, 3)
    a = m_loss(model, experts, _data(), base=base)
    b = m_loss(model, experts[::-1], _data(), base=base)
    for name in a.node:
        torch.testing.assert_close(a.node[name], b.node[name], rtol=1e-4, atol=1e-9)


def test_named_layers_and_explicit_activation():
    model = _mlp()
    base, experts = _experts(model, 2)
    only = m_loss(model, experts, _data(), base=base, layers=["2"], output=False)
    assert list(only.layer) == ["2"]
    full = m_loss(model, experts, _data(), base=base, output=False)
    assert only.layer["2"] == pytest.approx(full.layer["2"])
    # the last layer feeds no activation: σ must be given explicitly
    explicit = m_loss(model, experts, _data(), base=base, layers={"4": torch.tanh}, output=False)
    assert explicit.layer["4"] > 0


def test_m_loss_restores_modes_and_leaves_weights_and_buffers_alone():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5))
    model.train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base, experts = _experts(model, 2)
    experts_before = [{k: v.clone() for k, v in e.items()} for e in experts]
    report_a = m_loss(model, experts, _data(), base=base)
    report_b = m_loss(model, experts, _data(), base=base)
    assert report_a.layer == report_b.layer  # dropout is off: deterministic
    assert model.training and not model[1].training and model[4].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for e, e_before in zip(experts, experts_before):  # BatchNorm running stats untouched
        for k, v in e.items():
            assert torch.equal(v, e_before[k]), k


def test_tuple_batches_are_positional_arguments():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 5)
            self.act = nn.ReLU()

        def forward(self, x, y):
            return self.act(self.fc(x + y))

    model = TwoInputs()
    base, experts = _experts(model, 2)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g))]
    report = m_loss(model, experts, data, base=base)
    summed = [(data[0][0] + data[0][1],)]

    class OneInput(TwoInputs):
        def forward(self, x):
            return self.act(self.fc(x))

    one = OneInput()
    torch.testing.assert_close(m_loss(one, experts, summed, base=base).node["fc"], report.node["fc"])


def test_bad_inputs_raise_clear_errors():
    model = _mlp()
    base, experts = _experts(model, 2)
    data = _data()
    wrong = dict(experts[1])
    wrong.pop("2.bias")
    with pytest.raises(StateDictError, match="2.bias"):
        m_loss(model, [experts[0], wrong], data, base=base)
    with pytest.raises(ValueError, match="sum to 1"):
        m_loss(model, experts, data, base=base, weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="needs base"):
        m_loss(model, experts, data)
    with pytest.raises(ValueError, match="empty"):
        m_loss(model, experts, [], base=base)
    with pytest.raises(ValueError, match="no such module"):
        m_loss(model, experts, data, base=base, layers=["nope"])
    with pytest.raises(ValueError, match="does not feed"):
        m_loss(model, experts, data, base=base, layers=["4"])
    with pytest.raises(ValueError, match="reserved"):
        m_loss(model, experts, data, base=base, layers=[OUTPUT])
    with pytest.raises(TypeError, match="Tensor or a tuple"):
        m_loss(model, experts, [{"x": data[0]}], base=base)

    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return {"y": self.fc(x)}

    dict_model = DictOut()
    dbase, dexperts = _experts(dict_model, 2)
    with pytest.raises(ValueError, match="output=False"):
        m_loss(dict_model, dexperts, data, base=dbase)


def test_nan_weights_are_named():
    model = _mlp()
    base, experts = _experts(model, 2)
    experts[1]["2.weight"][0, 0] = float("nan")
    with pytest.raises(StateDictError, match="2.weight"):
        m_loss(model, experts, _data(), base=base)


# ------------------------------------------------------------------ statistics and Metric


def test_statistics_add_up_over_batches():
    model = _mlp()
    base, experts = _experts(model, 3)
    data = _data(n=3)
    per_batch = [mloss_statistics(model, experts, [b], base=base) for b in data]
    together = mloss_statistics(model, experts, [torch.cat(data)], base=base)
    for name, stats in together.items():
        summed = per_batch[0][name] + per_batch[1][name] + per_batch[2][name]
        torch.testing.assert_close(summed.node_sum, stats.node_sum, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(summed.norm_sum, stats.norm_sum, rtol=1e-5, atol=1e-9)
        assert (summed.positions, summed.samples) == (stats.positions, stats.samples)


def test_metric_equals_functional_form():
    model = _mlp()
    base, experts = _experts(model, 2)
    data = _data(n=4)
    meter = MLossMeter(model, experts, data[0], base=base)
    metric = MLoss(meter.node_sizes)
    for b in data:
        metric.update(meter.measure(b))
    got = metric.compute()
    want = m_loss(model, experts, data, base=base)
    for name in want.layer:
        assert got.layer[name] == pytest.approx(want.layer[name], rel=1e-5)
        torch.testing.assert_close(got.node[name], want.node[name], rtol=1e-5, atol=1e-10)
    with pytest.raises(ValueError, match="not given at construction"):
        metric.update({"zzz": next(iter(meter.measure(data[0]).values()))})


def test_meter_set_experts_and_layer_subset():
    model = _mlp()
    base, experts = _experts(model, 2)
    _, others = _experts(model, 2, seed=7)
    data = _data()
    meter = MLossMeter(model, experts, data[0], base=base)
    meter.set_experts(others, base)
    got = mloss_report(meter.measure(data[1]))
    want = m_loss(model, others, [data[1]], base=base)
    assert got.layer == pytest.approx(want.layer)
    subset = meter.measure(data[1], layers=["2"])
    assert list(subset) == ["2"]
    assert mloss_report(subset).layer["2"] == pytest.approx(want.layer["2"])
    with pytest.raises(ValueError, match="built for 2 experts"):
        meter.set_experts(others + others, base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, shards, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _mlp()
        base, experts = _experts(model, 3)
        meter = MLossMeter(model, experts, shards[0][0], base=base)
        metric = MLoss(meter.node_sizes)
        for batch in shards[rank]:
            metric.update(meter.measure(batch))
        report = metric.compute()
        torch.save({"layer": report.layer, "node": report.node}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_metric_two_process_gloo_uneven_shards_equals_single_process():
    model = _mlp()
    base, experts = _experts(model, 3)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 6, generator=g) for n in (5, 2, 3, 7)]
    shards = [batches[:3], batches[3:]]  # 10 samples on rank 0, 7 on rank 1
    want = m_loss(model, experts, batches, base=base)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _ddp_worker, args=(2, _free_port(), shards, tmp), nprocs=2, join=True, start_method="fork"
        )
        for rank in range(2):
            got = torch.load(os.path.join(tmp, f"rank{rank}.pt"), weights_only=True)
            assert got["layer"] == pytest.approx(want.layer, rel=1e-5)
            for name, node in want.node.items():
                torch.testing.assert_close(got["node"][name], node, rtol=1e-5, atol=1e-10)
    # a mean of per-rank means would not match: the shards are uneven
    per_rank = [m_loss(model, experts, s, base=base).layer["0"] for s in shards]
    assert sum(per_rank) / 2 != pytest.approx(want.layer["0"], rel=1e-4)


def test_node_group_map_bins_contiguous_nodes():
    names, grid = node_group_map({"a": torch.arange(8.0), "b": torch.tensor([1.0, 3.0])}, groups=4)
    assert names == ["a", "b"]
    assert grid[0].tolist() == [0.5, 2.5, 4.5, 6.5]
    assert grid[1].tolist() == [1.0, 1.0, 3.0, 3.0]


def test_statistics_reject_mismatched_sizes():
    a = MLossStatistics(torch.zeros(2), 1, torch.tensor(0.0), torch.tensor(0.0), 1)
    b = MLossStatistics(torch.zeros(3), 1, torch.tensor(0.0), torch.tensor(0.0), 1)
    with pytest.raises(ValueError, match="2 and 3 nodes"):
        a + b
