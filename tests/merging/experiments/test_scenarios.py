"""The different-initialisation scenario: output-unit spec, head transform, end-to-end margin."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from merging.alignment import (
    MatchResult,
    PermSpec,
    UnitMatching,
    identity_matching,
    permute_state_dict,
    random_permutations,
)
from merging.experiments.scenarios import (
    DIFFERENT_INIT_MERGES,
    EXPERTS_LABEL,
    FEATURE_NODE,
    different_init_scenario,
    feature_spec,
    merge_with_heads,
    transform_heads,
)
from merging.methods.mudsc import MuDSC
from merging.models import MLP, SmallCNN


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _backbone(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(width=4, depth=2, num_features=8).eval()


def _head(classes: int, features: int, seed: int) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {"weight": torch.randn(classes, features, generator=g), "bias": torch.randn(classes, generator=g)}


def _logits(model: nn.Module, state, head, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.linear(functional_call(model, state, (x,)), head["weight"], head["bias"])


def test_feature_spec_permutes_the_output_units_as_a_symmetry():
    model = _backbone()
    spec = feature_spec(model)
    assert FEATURE_NODE in spec and spec[FEATURE_NODE].size == 8
    assert {e.key for e in spec[FEATURE_NODE].entries} == {"fc.weight", "fc.bias"}
    perms = random_permutations(spec, _gen(1))
    assert not torch.equal(perms[FEATURE_NODE], torch.arange(8))
    permuted = permute_state_dict(model.state_dict(), spec, perms)
    x = torch.randn(16, 1, 8, 8, generator=_gen(2))
    with torch.no_grad():
        expected = model(x)[:, perms[FEATURE_NODE]]
        got = functional_call(model, permuted, (x,))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_feature_spec_covers_mlp_and_rejects_a_trailing_norm():
    assert feature_spec(MLP(in_features=6, hidden=5, depth=2))[FEATURE_NODE].size == 5
    with pytest.raises(ValueError, match="LayerNorm"):
        feature_spec(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.LayerNorm(3)))


@pytest.mark.parametrize("mode", ["align", "zip"])
def test_merging_an_expert_with_its_permuted_copy_keeps_every_heads_logits(mode):
    model = _backbone()
    spec = feature_spec(model)
    expert = model.state_dict()
    perms = random_permutations(spec, _gen(3))
    copy = permute_state_dict(expert, spec, perms)
    heads = [_head(3, 8, 4), _head(2, 8, 5)]
    # The copy's head reads the copy's permuted features: W'[:, j] = W[:, perm[j]].
    copy_head = {"weight": heads[1]["weight"][:, perms[FEATURE_NODE]], "bias": heads[1]["bias"]}
    x = torch.randn(32, 1, 8, 8, generator=_gen(6))
    torch.testing.assert_close(_logits(model, copy, copy_head, x), _logits(model, expert, heads[1], x))

    data = list(torch.randn(96, 1, 8, 8, generator=_gen(7)).split(32))
    method = MuDSC(mode=mode)
    merged, new_heads = merge_with_heads(method, [expert, copy], [heads[0], copy_head], model=model, data=data)

    for t in (0, 1):
        expected = _logits(model, expert, heads[t], x)
        torch.testing.assert_close(_logits(model, merged, new_heads[t], x), expected, atol=1e-5, rtol=1e-5)
    # Without the transform the copy's head reads the merged (expert-0-ordered) features wrongly.
    assert not torch.allclose(_logits(model, merged, copy_head, x), _logits(model, expert, heads[1], x), atol=1e-3)


def test_transform_heads_applies_each_experts_unmerge_block():
    # Zip-like matching of 2 models x 2 units into 2 merged units: model 0 keeps its order,
    # model 1's units both go to merged unit 1, so its head sums those two columns.
    assignment = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    result = MatchResult({FEATURE_NODE: UnitMatching.from_assignment(assignment, 2, 0.0)}, 0.0)
    heads = [
        {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.zeros(1)},
        {"weight": torch.tensor([[3.0, 4.0]]), "bias": torch.ones(1)},
    ]
    out = transform_heads(heads, result)
    torch.testing.assert_close(out[0]["weight"], torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(out[1]["weight"], torch.tensor([[0.0, 7.0]]))
    torch.testing.assert_close(out[1]["bias"], torch.ones(1))


def test_head_transform_inputs_are_checked():
    result = MatchResult({"other": identity_matching(2, 2)}, 0.0)
    with pytest.raises(ValueError, match=FEATURE_NODE):
        transform_heads([_head(2, 2, 0)] * 2, result)
    model = _backbone()
    data = [torch.randn(8, 1, 8, 8, generator=_gen(0))]
    state = model.state_dict()
    with pytest.raises(ValueError, match="2 heads for 3 experts"):
        merge_with_heads(MuDSC(), [state] * 3, [_head(2, 8, 0)] * 2, model=model, data=data)
    with pytest.raises(ValueError, match=FEATURE_NODE):
        merge_with_heads(MuDSC(spec=PermSpec([])), [state] * 2, [_head(2, 8, 0)] * 2, model=model, data=data)


@pytest.mark.slow
def test_mudsc_zip_beats_plain_averaging_of_different_init_experts(tmp_path):
    merges = {k: DIFFERENT_INIT_MERGES[k] for k in ("average", "MuDSC-Zip")}
    rows, summary, _ = different_init_scenario([0], tmp_path, merges=merges)
    acc = {r["model"]: r["test/acc_mean"] for r in rows}
    assert set(acc) == {EXPERTS_LABEL, "average", "MuDSC-Zip"}
    assert acc[EXPERTS_LABEL] > 0.95
    # Averaging differently initialised networks is near chance; matching the units first is not.
    assert acc["MuDSC-Zip"] > acc["average"] + 0.15
    markdown = (tmp_path / "different_init.md").read_text()
    assert markdown.count("| MuDSC-Zip |") == 2  # the accuracy table and the variance-ratio table
    assert "Variance of the merged pre-activations" in markdown
    payload = json.loads((tmp_path / "different_init.json").read_text())
    assert [e["model"] for e in payload["summary"]] == [e["model"] for e in summary]
    assert "gap_to_experts" not in payload["summary"][0]  # the reference row has no gap to itself
    assert [e["model"] for e in payload["variance_ratios"]] == ["average", "MuDSC-Zip"]
