"""The GPU's multi-tensor merge path (:mod:`merging._multitensor`), run on CPU tensors inside
``forced()``: the CPU path's results, and a launch and sync budget that grows with K and the
number of groups, not with the number of entries (counted with ``OpCounter``)."""

from __future__ import annotations

import pytest
import torch

from merging import _multitensor
from merging._opcount import OpCounter
from merging.state import SourcedStateDict, StateDictError, check_compatible


def many_entries(num_entries: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {
        f"layer.{i}.{kind}": torch.randn(shape, generator=g)
        for i in range(num_entries // 2)
        for kind, shape in (("weight", (8, 6)), ("bias", (8,)))
    }
    experts = [{key: v + 0.1 * torch.randn(v.shape, generator=g) for key, v in base.items()} for _ in range(k)]
    return experts, base


# ---------------------------------------------------------------- the finiteness check


def test_finite_check_reads_the_host_once_and_names_key_and_file():
    experts, base = many_entries(100, 3)
    with _multitensor.forced(), OpCounter() as count:
        check_compatible(experts, base)
    assert count.sync_total == 1, count.summary()
    assert count.kernel_total <= 6, count.summary()

    experts = [SourcedStateDict(e, source=f"expert_{j}.safetensors") for j, e in enumerate(experts)]
    experts[1]["layer.7.bias"] = experts[1]["layer.7.bias"].clone()
    experts[1]["layer.7.bias"][3] = float("nan")
    experts[2]["layer.9.weight"] = experts[2]["layer.9.weight"].clone()
    experts[2]["layer.9.weight"][0, 0] = float("inf")
    with pytest.raises(StateDictError) as cpu:
        check_compatible(experts, base)
    with _multitensor.forced(), pytest.raises(StateDictError) as gpu:
        check_compatible(experts, base)
    assert str(gpu.value) == str(cpu.value)
    assert "expert 1 (expert_1.safetensors): key 'layer.7.bias' has 1 non-finite" in str(gpu.value)
    with _multitensor.forced(), pytest.raises(StateDictError, match=r"base: key 'layer.0.weight'"):
        check_compatible(experts[:1], {**base, "layer.0.weight": torch.full((8, 6), float("-inf"))})


def test_finite_check_passes_half_precision_and_large_finite_values():
    experts = [{"a": torch.full((4,), 6e4, dtype=torch.float16), "b": torch.full((3,), 3e38)} for _ in range(2)]
    with _multitensor.forced():
        check_compatible(experts)  # sums would overflow; the largest magnitude does not
        experts[1]["a"][2] = float("nan")
        with pytest.raises(StateDictError, match=r"expert 1: key 'a' has 1 non-finite"):
            check_compatible(experts)
