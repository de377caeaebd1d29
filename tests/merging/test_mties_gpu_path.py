"""M-TIES's vectorised rows: one selection for every row (the previous loop over distinct
counts as the reference), one host read for every target's rates, and sync counts that do
not grow with the number of targets or of distinct row counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import merging.methods.mties as mties
from merging._opcount import OpCounter
from merging.methods import get_method
from merging.methods.mties import row_keep_counts, row_keep_rates, row_thresholds, target_rates


def _grouped_thresholds(magnitudes: torch.Tensor, counts: torch.Tensor, bounds=None) -> torch.Tensor:
    """The previous ``row_thresholds``: one ``kthvalue`` per distinct count (three host reads)."""
    num, d_out, row_length = magnitudes.shape
    thresholds = torch.empty(num, d_out, 1, dtype=magnitudes.dtype, device=magnitudes.device)
    values, groups = torch.unique(counts, return_inverse=True)
    order = torch.argsort(groups, stable=True)
    sizes = torch.bincount(groups, minlength=values.numel()).tolist()
    for count, rows in zip(values.tolist(), order.split(sizes)):
        if count == 0:
            thresholds[:, rows] = math.inf
        else:
            selected = magnitudes.index_select(1, rows).kthvalue(row_length - count + 1, dim=2, keepdim=True)
            thresholds[:, rows] = selected.values
    return thresholds


@pytest.mark.parametrize("block", [None, {}, {"cpu": 40}])
def test_one_selection_equals_the_grouped_selections(monkeypatch, block):
    if block is not None:  # {}: a whole weight per selection (the GPU path); 40: blocks of a row or two
        monkeypatch.setattr(mties, "SELECTION_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1, 1), (2, 5, 7), (3, 40, 17), (2, 30, 64), (3, 9, 1)]:
        num, d_out, row_length = shape
        for trial in range(12):
            magnitudes = torch.randn(*shape, generator=g).abs()
            if trial % 3 == 0:
                magnitudes = (magnitudes * 4).round() / 4  # many ties
            if trial % 4 == 0:
                magnitudes[:, : d_out // 2] = 0.0
            low = int(torch.randint(0, row_length + 1, (1,), generator=g))
            high = int(torch.randint(low, row_length + 1, (1,), generator=g))
            counts = torch.randint(low, high + 1, (d_out,), generator=g)
            want = _grouped_thresholds(magnitudes, counts)
            assert torch.equal(row_thresholds(magnitudes, counts), want), (shape, trial)
            # given bounds wider than the counts' own: the same thresholds
            assert torch.equal(row_thresholds(magnitudes, counts, (low, high)), want), (shape, trial)


def test_selection_from_either_end_and_equal_counts():
    g = torch.Generator().manual_seed(1)
    magnitudes = torch.randn(2, 50, 100, generator=g).abs()
    for density, spread in [(0.8, 0.1), (0.2, 0.1), (0.5, 0.0), (0.8, 0.8), (1.0, 0.0)]:
        counts = row_keep_counts(row_keep_rates(torch.rand(50, generator=g), density, spread), 100)
        assert torch.equal(row_thresholds(magnitudes, counts), _grouped_thresholds(magnitudes, counts))
    assert torch.isinf(row_thresholds(magnitudes, torch.zeros(50, dtype=torch.long))).all()


def test_target_rates_equal_row_keep_rates_with_one_host_read():
    g = torch.Generator().manual_seed(2)
    node = {f"l{i}": torch.rand(20 + i, generator=g) for i in range(5)}
    node["tied"] = torch.tensor([0.5, 0.5, 0.1, 0.5])
    lengths = {name: 7 + 3 * i for i, name in enumerate(node)}
    for scale in ("rank", "robust", "log"):
        with OpCounter() as count:
            rates, bounds = target_rates(node, lengths, 0.6, 0.3, scale)
        assert count.sync_total == 1, count.syncs
        for name, m in node.items():
            want = row_keep_rates(m, 0.6, 0.3, scale)
            assert torch.equal(rates[name], want)
            counts = row_keep_counts(want, lengths[name])
            assert bounds[name] == (int(counts.min()), int(counts.max()))
    assert target_rates({}, {}) == ({}, {})


def test_target_rates_name_the_bad_layer():
    node = {"good": torch.rand(4), "bad": torch.tensor([0.1, float("nan")])}
    with pytest.raises(ValueError, match="'bad' holds NaN"):
        target_rates(node, {"good": 3, "bad": 3})
    with pytest.raises(ValueError, match="'neg' is negative"):
        target_rates({"neg": torch.tensor([0.1, -1.0])}, {"neg": 3}, scale="log")
    with pytest.raises(ValueError, match="1-D"):
        target_rates({"empty": torch.zeros(0)}, {"empty": 3})
    with pytest.raises(ValueError, match="density - spread"):
        target_rates({"a": torch.rand(3)}, {"a": 3}, density=0.1, spread=0.2)


def _model(depth: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    size = 16
    for i in range(depth):
        layers += [nn.Linear(size, width + 8 * i), nn.GELU()]
        size = width + 8 * i
    return nn.Sequential(*layers, nn.Linear(size, 3))


def _inputs(model: nn.Module, k: int = 3):
    g = torch.Generator().manual_seed(3)
    base = {n: v.clone() for n, v in model.state_dict().items()}
    experts = [{n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(k)]
    data = [torch.randn(6, 16, generator=g) for _ in range(2)]
    return base, experts, data


@pytest.mark.parametrize(
    "hparams",
    [{}, {"density": 0.2}, {"density": 0.6, "spread": 0.6}, {"reference": "incremental"}, {"scale": "robust"}],
)
def test_merge_equals_the_grouped_selections(monkeypatch, hparams):
    model = _model(3, 40)
    base, experts, data = _inputs(model)
    got = get_method("mties", **hparams).merge(experts, base, model=model, data=data)
    monkeypatch.setattr(mties, "row_thresholds", _grouped_thresholds)
    want = get_method("mties", **hparams).merge(experts, base, model=model, data=data)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _phase_counts(monkeypatch, model: nn.Module, hparams: dict) -> dict[str, OpCounter]:
    """Kernels and syncs of M-TIES's rates (all targets) and row trims (summed over targets)."""
    counters = {"rates": OpCounter(), "rows": OpCounter()}

    def counted(fn, phase):
        def run(*args, **kwargs):
            with OpCounter() as count:
                out = fn(*args, **kwargs)
            counters[phase].kernels.update(count.kernels)
            counters[phase].syncs.update(count.syncs)
            return out

        return run

    monkeypatch.setattr(mties, "target_rates", counted(mties.target_rates, "rates"))
    monkeypatch.setattr(mties, "rowwise_topk_trim", counted(mties.rowwise_topk_trim, "rows"))
    monkeypatch.setattr(mties, "SELECTION_BLOCK", {})  # the GPU path: a whole weight per selection
    base, experts, data = _inputs(model)
    get_method("mties", **hparams).merge(experts, base, model=model, data=data)
    monkeypatch.undo()
    return counters


@pytest.mark.parametrize("hparams", [{}, {"density": 0.6, "spread": 0.5}])
def test_rates_and_rows_syncs_do_not_grow_with_targets_or_distinct_counts(monkeypatch, hparams):
    small = _phase_counts(monkeypatch, _model(2, 24), hparams)  # 2 targets, rows of 16-24
    large = _phase_counts(monkeypatch, _model(6, 96), hparams)  # 6 targets, rows of 16-136
    for counts in (small, large):
        assert counts["rates"].sync_total == 1  # one host read for every target
        assert counts["rows"].sync_total == 0
    # kernels per target stay constant, however many distinct counts the rows take
    assert large["rows"].kernel_total / 6 == small["rows"].kernel_total / 2
