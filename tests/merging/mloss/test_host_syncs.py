"""What the M-Loss report, metric and meter dispatch (``OpCounter``, the CPU proxy for a GPU's
launches and syncs): one host read per report whatever the number of layers, kernels that do
not grow with it outside the per-layer maths, and the same values as the per-layer forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging._opcount import OpCounter
from merging.mloss import MLossMeter, MLossStatistics, centred_gap, mloss_report, weighted_average
from merging.mloss import gap as gap_module
from merging.mloss import states as states_module
from merging.mloss.gap import _anchored, _centred_gap_
from merging.mloss.meter import _load_probes
from merging.mloss.metric import MLoss
from merging.mloss.states import foreach_weighted_average


def _stats(num_layers: int, seed: int = 0) -> dict[str, MLossStatistics]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"l{i}": MLossStatistics(
            node_sum=torch.rand(3 + i, generator=g),
            positions=7 * (i + 1),
            norm_sum=torch.rand((), generator=g),
            normalized_sum=torch.rand((), generator=g),
            samples=2 + i,
        )
        for i in range(num_layers)
    }


def _deep(depth: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(6, 6), act()]
    return nn.Sequential(*layers, nn.Linear(6, 3))


def _experts(model: nn.Module, k: int, seed: int = 1) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {n: v.clone() for n, v in model.state_dict().items()}
    return base, [{n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(k)]


# ------------------------------------------------------------------------- the report


def test_the_report_reads_the_host_once_whatever_the_number_of_layers():
    kernels = {}
    for layers in (2, 8):
        stats = _stats(layers)
        with OpCounter() as count:
            report = mloss_report(stats)
        assert count.sync_total == 1
        kernels[layers] = count.kernel_total
        for name, s in stats.items():  # the values of the per-layer form, bit for bit
            assert report.layer[name] == float(s.norm_sum) / s.samples
            assert report.layer_normalized[name] == float(s.normalized_sum) / s.samples
            assert torch.equal(report.node[name], s.node_sum / s.positions)
            assert report.samples[name] == s.samples
    assert kernels[2] == kernels[8]


def test_the_report_leaves_out_layers_without_samples():
    stats = _stats(3)
    stats["l1"].samples = 0
    assert list(mloss_report(stats).layer) == ["l0", "l2"]
    with OpCounter() as count:
        empty = mloss_report({})
    assert empty.layer == {} and empty.node == {} and count.total == 0


# ------------------------------------------------------------------------- the metric


def test_metric_update_and_compute_do_not_grow_with_the_number_of_layers():
    update_kernels, compute_kernels = {}, {}
    for layers in (2, 8):
        stats = _stats(layers)
        metric = MLoss({name: s.node_sum.numel() for name, s in stats.items()})
        with OpCounter() as update:
            metric.update(stats)
            metric.update(stats)
        with OpCounter() as compute:
            report = metric.compute()
        assert update.sync_total == 0 and compute.sync_total == 1
        update_kernels[layers] = update.kernel_total
        compute_kernels[layers] = compute.kernel_total - compute.kernels["aten.clone"]  # torchmetrics' result copies
        want = mloss_report({name: s + s for name, s in stats.items()})
        assert report.layer == want.layer and report.layer_normalized == want.layer_normalized
        assert report.samples == want.samples
        for name in stats:
            assert torch.equal(report.node[name], want.node[name])
    assert update_kernels[2] == update_kernels[8]
    assert compute_kernels[2] == compute_kernels[8]


def test_metric_updates_of_some_layers_in_any_order():
    stats = _stats(4)
    metric = MLoss({name: s.node_sum.numel() for name, s in stats.items()})
    metric.update({"l2": stats["l2"], "l0": stats["l0"]})
    metric.update(stats)
    report = metric.compute()
    want = mloss_report({name: s + s if name in ("l0", "l2") else s for name, s in stats.items()})
    assert report.layer == want.layer and report.samples == want.samples
    for name in stats:
        assert torch.equal(report.node[name], want.node[name])

    only = MLoss({name: s.node_sum.numel() for name, s in stats.items()})
    only.update({"l1": stats["l1"]})
    assert list(only.compute().layer) == ["l1"]  # layers never updated are left out
    with pytest.raises(ValueError, match="has 3 nodes, statistics have 4"):
        only.update({"l0": stats["l1"]})


# -------------------------------------------------------------------------- the gap


def test_the_gap_off_the_cpu_masks_without_reading_the_host(monkeypatch):
    # On a GPU the gap of a σ that is not piecewise linear does not read a count to the host
    # (a sync per layer and batch); it always masks, and the values are the same.
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(40, 1, 7, generator=g)
    for deltas in (torch.randn(40, 2, 7, generator=g), torch.zeros(40, 2, 7)):
        deltas[::3] = 0.0  # some entries where experts agree
        z = torch.cat([anchor, deltas], dim=1)
        alpha = [0.5, 0.25, 0.25]
        want = _centred_gap_(z.clone(), alpha, nn.GELU())
        monkeypatch.setattr(gap_module, "_host_reads_are_free", lambda t: False)
        with OpCounter() as count:
            got = _centred_gap_(z.clone(), alpha, nn.GELU())
        monkeypatch.undo()
        assert count.sync_total == 0
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    identical = torch.cat([anchor, torch.zeros(40, 1, 7)], dim=1)
    monkeypatch.setattr(gap_module, "_host_reads_are_free", lambda t: False)
    gap, _ = centred_gap(identical.transpose(0, 1), torch.tensor([0.5, 0.5]), nn.SiLU())
    assert torch.count_nonzero(gap) == 0


# ------------------------------------------------------------------------- the meter


@pytest.mark.parametrize("num_experts", [1, 2, 3])
def test_foreach_weighted_average_equals_weighted_average(monkeypatch, num_experts):
    g = torch.Generator().manual_seed(0)
    first = {
        "w": torch.randn(5, 4, generator=g),
        "half": torch.randn(6, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(3),
        "b": torch.randn(4, generator=g),
    }
    experts = [first] + [
        {
            k: (v + torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v + 1
            for k, v in first.items()
        }
        for _ in range(num_experts - 1)
    ]
    alpha = torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
    want = weighted_average(experts, alpha)
    for group in (1 << 24, 6):  # one group; groups of at most 6 elements (an entry alone when larger)
        monkeypatch.setattr(states_module, "FOREACH_GROUP_ELEMENTS", group)
        got = foreach_weighted_average(experts, alpha.tolist())
        assert list(got) == list(want)
        for key, value in want.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_meter_set_experts_and_probe_loading_do_not_grow_with_the_number_of_layers():
    average, loading = {}, {}
    for depth in (2, 8):
        model = _deep(depth)
        base, experts = _experts(model, 3)
        meter = MLossMeter(model, experts, torch.randn(4, 6), base=base)
        with OpCounter() as count:
            meter.set_experts(experts, base, check_values=False)
        average[depth] = count.kernel_total
        probes = list(meter._probes.values())
        with OpCounter() as count:
            _load_probes(probes, experts, [1 / 3] * 3)
        loading[depth] = count.kernel_total
        for p in probes:  # [W_1, W_2 − W_1, W_3 − W_1], as the per-layer form stacks them
            want = _anchored(torch.stack([e[f"{p.name}.weight"] for e in experts]))
            assert torch.equal(p.weight, want)
            assert torch.equal(p.bias, _anchored(torch.stack([e[f"{p.name}.bias"] for e in experts])))
    assert average[2] == average[8] == 4  # 2(K − 1) multi-tensor operations
    assert loading[2] == loading[8] == 5  # 2K − 1


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU])
def test_a_meter_measurement_reads_nothing_to_the_host_off_the_cpu(monkeypatch, act):
    monkeypatch.setattr(gap_module, "_host_reads_are_free", lambda t: False)  # as on a GPU
    for depth in (2, 8):
        model = _deep(depth, act)
        base, experts = _experts(model, 2)
        batch = torch.randn(4, 6)
        meter = MLossMeter(model, experts, batch, base=base, cache_forwards=True)
        meter.measure(batch)
        with OpCounter() as count:
            meter.set_experts(experts, base, check_values=False)
            meter.measure(batch)
        assert count.sync_total == 0, count.summary()
