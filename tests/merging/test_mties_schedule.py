"""M-TIES's fast paths: the draw schedule (one forward per batch), the row thresholds by
selection, and non-target entries through the classic TIES/DARE methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging.methods import get_method
from merging.methods.mties import row_keep_counts, row_thresholds, scheduled_node_mloss
from merging.mloss import MLossMeter


class _Counted(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 9), nn.SiLU(), nn.Linear(9, 3)
        )
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def _setup(k: int = 2):
    torch.manual_seed(0)
    model = _Counted()
    g = torch.Generator().manual_seed(1)
    base = {n: v.clone() for n, v in model.state_dict().items()}
    experts = [{n: v + 0.2 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(k)]
    return model, base, experts, g


def _per_draw(meter: MLossMeter, layers: list[str], data: list, draws: int) -> dict[str, torch.Tensor]:
    """The definition: layer l averages draws l·N .. (l+1)·N − 1 of the cycled data, one by one."""
    out = {}
    for layer, name in enumerate(layers):
        vectors = []
        for i in range(layer * draws, (layer + 1) * draws):
            s = meter.measure(data[i % len(data)], layers=[name])[name]
            vectors.append(s.node_sum / s.positions)
        out[name] = torch.stack(vectors).mean(dim=0)
    return out


@pytest.mark.parametrize("num_batches", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("known_length", [True, False])
def test_schedule_equals_measuring_every_draw(num_batches, known_length):
    model, base, experts, g = _setup()
    data = [torch.randn(4, 6, generator=g) for _ in range(num_batches)]
    meter = MLossMeter(model, experts, data[0], base=base, output=False)
    layers = meter.layer_names
    assert layers == ["0", "2", "4"]
    want = _per_draw(meter, layers, data, draws=2)
    model.calls = 0
    got = scheduled_node_mloss(meter, layers, iter(data), 2, len(data) if known_length else None)
    for name in layers:
        assert torch.equal(got[name], want[name]), name
    total = len(layers) * 2  # 6 draws
    distinct = min(num_batches, total)
    if known_length or num_batches >= total:
        assert model.calls == distinct  # one forward per batch
    else:
        assert model.calls <= 2 * distinct


def test_schedule_errors():
    model, base, experts, g = _setup()
    data = [torch.randn(4, 6, generator=g)]
    meter = MLossMeter(model, experts, data[0], base=base, output=False)
    with pytest.raises(ValueError, match="empty"):
        scheduled_node_mloss(meter, ["0"], iter([]), 2)


def test_mties_counts_one_forward_per_batch_of_a_cycled_pool():
    model, base, experts, g = _setup(k=3)
    data = [torch.randn(4, 6, generator=g) for _ in range(2)]
    model.calls = 0
    get_method("mties", density=0.6, spread=0.2).merge(experts, base, model=model, data=data)
    # 1 trace + 2 batches serving 3 targets x K=3 draws (instead of 9 forwards)
    assert model.calls == 1 + 2


def _sorted_thresholds(magnitudes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    ordered = magnitudes.sort(dim=2, descending=True).values
    index = (counts - 1).clamp(min=0).view(1, -1, 1).expand(magnitudes.shape[0], -1, 1)
    out = ordered.gather(2, index)
    return torch.where(counts.view(1, -1, 1) > 0, out, torch.full_like(out, float("inf")))


def test_row_thresholds_by_selection_equal_the_sorted_rows():
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.randn(3, 40, 17, generator=g).abs()
    magnitudes[:, 5] = 0.25  # a row of ties
    counts = torch.randint(0, 18, (40,), generator=g)
    counts[:3] = torch.tensor([0, 17, 1])
    assert torch.equal(row_thresholds(magnitudes, counts), _sorted_thresholds(magnitudes, counts))


def test_row_thresholds_from_the_spec_rates():
    g = torch.Generator().manual_seed(2)
    rates = torch.tensor([0.7, 0.8, 0.75], dtype=torch.float64)
    counts = row_keep_counts(rates, 768)
    magnitudes = torch.randn(2, 3, 768, generator=g).abs()
    thresholds = row_thresholds(magnitudes, counts)
    assert ((magnitudes >= thresholds).sum(dim=2) == counts).all()


@pytest.mark.parametrize("backend", ["ties", "dare"])
def test_non_target_entries_are_exactly_the_classic_methods(backend):
    model, base, experts, g = _setup(k=3)
    data = [torch.randn(4, 6, generator=g)]
    merged = get_method("mties", density=0.5, spread=0.2, backend=backend, seed=3).merge(
        experts, base, model=model, data=data
    )
    if backend == "ties":
        classic = get_method("ties", density=0.5, scope="tensor").merge(experts, base)
    else:
        classic = get_method("dare", drop_rate=0.5, seed=3, combine="ties", scaling=1.0).merge(experts, base)
    for key in merged:
        if key not in ("0.weight", "2.weight", "4.weight"):
            assert torch.equal(merged[key], classic[key]), key
