"""What the M-Loss report, metric and meter dispatch (``OpCounter``, the CPU proxy for a GPU's
launches and syncs): one host read per report whatever the number of layers, kernels that do
not grow with it outside the per-layer maths, and the same values as the per-layer forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging._opcount import OpCounter
from merging.mloss import MLossStatistics, centred_gap, mloss_report
from merging.mloss import gap as gap_module
from merging.mloss.gap import _centred_gap_
from merging.mloss.metric import MLoss


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
