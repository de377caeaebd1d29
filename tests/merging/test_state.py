"""The state algebra of merging.state: stacking, averaging, partial merges."""

from __future__ import annotations

import pytest
import torch

from merging import mloss
from merging.methods import get_method
from merging.state import (
    StateDictError,
    average_states,
    partial_merge,
    stack_states,
    weighted_average,
)


def _states(k: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(70_000, generator=g).to(dtype),
            "b": torch.randn(3, 4, generator=g).to(dtype),
            "n": torch.tensor(j),
        }
        for j in range(k)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 3.0]])
def test_average_states_equals_the_average_method_bit_for_bit(dtype, weights):
    states = _states(dtype=dtype)
    want = get_method("average", weights=weights).merge(states)
    got = average_states(states, weights)
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype
        assert torch.equal(got[key], want[key]), key


def test_average_states_copies_integer_buffers_from_the_first_and_checks_inputs():
    states = _states()
    out = average_states(states)
    assert int(out["n"]) == 0 and out["n"] is not states[0]["n"]
    assert torch.equal(average_states([states[0]])["w"], states[0]["w"])
    with pytest.raises(ValueError, match="2 weights given for 3"):
        average_states(states, [1.0, 1.0])
    bad = dict(states[1], w=states[1]["w"][:10])
    with pytest.raises(StateDictError, match="'w'"):
        average_states([states[0], bad])


def test_stack_states_stacks_every_entry():
    states = _states()
    stacked = stack_states(states)
    assert stacked["w"].shape == (3, 70_000)
    assert torch.equal(stacked["n"], torch.tensor([0, 1, 2]))


def test_mloss_reexports_the_state_algebra():
    assert mloss.weighted_average is weighted_average
    assert mloss.partial_merge is partial_merge
    states = _states(k=2)
    avg = weighted_average(states, torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(avg["w"], (states[0]["w"] + states[1]["w"]) / 2)
    mixed = partial_merge(states[0], states[1], "b")
    assert mixed["w"] is states[1]["w"] and mixed["b"] is states[0]["b"]
