"""MLossMeter(cache_forwards=True): the same statistics as without the cache, fewer forwards,
and no stale values after a state changes."""

from __future__ import annotations

import torch
from torch import nn

from merging.mloss import OUTPUT, MLossMeter


class _Counted(nn.Sequential):
    """Linear -> GELU -> Linear -> ReLU -> Linear that counts its forwards."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def _setup(k: int = 3):
    torch.manual_seed(0)
    model = _Counted()
    g = torch.Generator().manual_seed(1)
    base = {n: v.clone() for n, v in model.state_dict().items()}
    experts = [{n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(k)]
    batches = [(torch.randn(4, 6, generator=g),) for _ in range(2)]
    return model, base, experts, batches


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name].node_sum, b[name].node_sum), name
        assert torch.equal(a[name].norm_sum, b[name].norm_sum), name
        assert torch.equal(a[name].normalized_sum, b[name].normalized_sum), name
        assert (a[name].positions, a[name].samples) == (b[name].positions, b[name].samples)


def _step(experts: list[dict], scale: float) -> None:
    """An optimizer-like in-place update of every expert."""
    with torch.no_grad():
        for j, e in enumerate(experts):
            for v in e.values():
                v.add_(scale * (j + 1))


def test_cached_meter_equals_uncached_and_skips_the_fixed_reference_forward():
    model, base, experts, batches = _setup()
    cached = MLossMeter(model, experts, batches[0], base=base, cache_forwards=True)
    plain = MLossMeter(model, experts, batches[0], base=base)
    for step in range(3):
        if step:
            _step(experts, 1e-3)
        cached.set_experts(experts, base)
        plain.set_experts(experts, base)
        for batch in batches:
            model.calls = 0
            got = cached.measure(batch)
            calls = model.calls
            _assert_same(got, plain.measure(batch))
            # K experts + the average each time; θ₀'s forward only the first time
            assert calls == (3 + 1 if step else 3 + 2)


def test_a_base_changed_in_place_is_evaluated_again():
    model, base, experts, batches = _setup()
    cached = MLossMeter(model, experts, batches[0], base=base, output=False, cache_forwards=True)
    first = cached.measure(batches[0])
    with torch.no_grad():
        base["0.weight"].mul_(1.5)  # θ₀'s layer "2" input changes
    plain = MLossMeter(model, experts, batches[0], base=base, output=False)
    again = cached.measure(batches[0])
    _assert_same(again, plain.measure(batches[0]))
    assert not torch.equal(again["2"].node_sum, first["2"].node_sum)


def test_a_reference_that_is_an_expert_keeps_its_output_and_new_batch_objects_miss():
    model, base, experts, batches = _setup(k=2)
    snapshot = experts[0]  # a model measured against its start: θ₀ is expert 0
    cached = MLossMeter(model, experts, batches[0], base=snapshot, cache_forwards=True)
    cached.measure(batches[0])
    _step(experts[1:], 1e-3)
    cached.set_experts(experts, snapshot)
    model.calls = 0
    got = cached.measure(batches[0])
    assert model.calls == 2  # the changed expert and the average; the snapshot is replayed
    plain = MLossMeter(model, experts, batches[0], base=snapshot)
    _assert_same(got, plain.measure(batches[0]))
    model.calls = 0
    cached.measure((batches[0][0].clone(),))  # equal values, another object: no replay
    assert model.calls == 2 + 1


def test_layer_subsets_and_the_output_alone_replay_correctly():
    model, base, experts, batches = _setup()
    cached = MLossMeter(model, experts, batches[0], base=base, cache_forwards=True)
    plain = MLossMeter(model, experts, batches[0], base=base)
    _assert_same(cached.measure(batches[1], layers=["2"]), plain.measure(batches[1], layers=["2"]))
    _assert_same(cached.measure(batches[1], layers=["0", OUTPUT]), plain.measure(batches[1], layers=["0", OUTPUT]))
    _assert_same(cached.measure(batches[1]), plain.measure(batches[1]))


def test_inference_tensors_are_measured_without_caching():
    model, base, experts, batches = _setup()
    with torch.inference_mode():
        frozen = {n: v.clone() for n, v in base.items()}
    cached = MLossMeter(model, experts, batches[0], base=frozen, cache_forwards=True)
    plain = MLossMeter(model, experts, batches[0], base=base)
    for _ in range(2):
        _assert_same(cached.measure(batches[0]), plain.measure(batches[0]))
