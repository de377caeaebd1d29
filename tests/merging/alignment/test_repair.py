"""REPAIR and the variance-collapse diagnostic: exact recovery, target statistics, errors, digits."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from merging.alignment import (
    build_spec,
    identity_matching,
    merge_state_dicts,
    permute_state_dict,
    random_permutations,
    reset_batchnorm,
)
from merging.alignment.repair import (
    Probe,
    UnitMoments,
    layer_probes,
    repair_sites,
    repair_state,
    repair_targets,
    unit_moments,
    variance_ratios,
)
from merging.alignment.solvers import UnitMatching
from merging.methods import get_method
from merging.methods.mudsc import MuDSC
from merging.models import SmallCNN


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _cnn_bn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4),
    )  # fmt: skip


FAMILIES = {
    "mlp": (lambda: _mlp(), (6,)),
    "small_cnn": (lambda: SmallCNN(1, 4, 3, 10), (1, 8, 8)),
    "cnn_bn": (_cnn_bn, (3, 8, 8)),
    "timm_resnet": (lambda: ResNet(BasicBlock, [2, 1, 1, 1], num_classes=5, channels=(8, 8, 16, 16)), (3, 16, 16)),
    "timm_vit": (
        lambda: VisionTransformer(
            img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2, num_classes=5
        ),
        (3, 16, 16),
    ),
}


@pytest.mark.parametrize("mode", ["align", "zip"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_repair_of_a_model_and_its_permuted_copy_gives_the_model_back(family, mode):
    factory, shape = FAMILIES[family]
    model = _randomize(factory())
    data = list(torch.randn(2, 24, *shape, generator=_gen(1)))
    # BatchNorm models: REPAIR runs after the BatchNorm reset, so the expert must be reset
    # already for the merge to be that expert.
    state = reset_batchnorm(model, model.state_dict(), data)
    spec = build_spec(model)
    copy = permute_state_dict(state, spec, random_permutations(spec, _gen(3)))
    merged = MuDSC(mode=mode, repair="repair", max_iter=10).merge([state, copy], model=model, data=data)
    for key, value in state.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-5)
    ratios = variance_ratios(model, [state, copy], merged, data)
    assert ratios and all(r == pytest.approx(1.0, abs=1e-5) for r in ratios.values())


def test_repair_sites_cover_chains_and_skip_residual_streams_and_heads():
    mlp = _mlp()
    sites, skipped = repair_sites(mlp, build_spec(mlp))
    assert [s.probe for s in sites] == [Probe("0", -1), Probe("2", -1)] and not skipped
    cnn = _cnn_bn()
    sites, _ = repair_sites(cnn, build_spec(cnn))  # the BatchNorm output is the pre-activation
    assert [(s.probe, s.weight, s.bias) for s in sites] == [
        (Probe("1", 1), "1.weight", "1.bias"),
        (Probe("5", 1), "5.weight", "5.bias"),
    ]
    vit = FAMILIES["timm_vit"][0]()
    sites, skipped = repair_sites(vit, build_spec(vit))
    assert {s.probe.module for s in sites} == {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    assert skipped and all("fc1" not in name for name in skipped)


def _moments(mean, std) -> UnitMoments:
    return UnitMoments(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64) ** 2)


def test_repair_targets_are_the_mean_over_each_merged_units_members():
    a, b = _moments([1.0, 2.0], [1.0, 4.0]), _moments([10.0, 20.0], [3.0, 5.0])
    # Alignment: model 1's unit 1 goes to merged unit 0 and its unit 0 to merged unit 1.
    swap = UnitMatching.from_assignment(torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0]]), 2, 0.0)
    mean, std = repair_targets([a, b], swap)
    torch.testing.assert_close(mean, torch.tensor([10.5, 6.0], dtype=torch.float64))
    torch.testing.assert_close(std, torch.tensor([3.0, 3.5], dtype=torch.float64))
    # Zip: merged unit 0 = {a0, a1, b0}, merged unit 1 = {b1}.
    zipped = UnitMatching.from_assignment(torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]]), 2, 0.0)
    mean, std = repair_targets([a, b], zipped)
    torch.testing.assert_close(mean, torch.tensor([13.0 / 3, 20.0], dtype=torch.float64))
    torch.testing.assert_close(std, torch.tensor([8.0 / 3, 5.0], dtype=torch.float64))
    torch.testing.assert_close(repair_targets([a, b], None)[0], repair_targets([a, b], identity_matching(2, 2))[0])
    with pytest.raises(ValueError, match="3 models"):
        repair_targets([a, b], identity_matching(2, 3))


@pytest.mark.parametrize("mode", ["align", "zip"])
def test_repair_sets_every_merged_units_mean_and_std_to_its_target(mode):
    model = SmallCNN(1, 4, 3, 10).eval()
    experts = [_randomize(SmallCNN(1, 4, 3, 10), seed).state_dict() for seed in (1, 2)]
    data = list(torch.randn(3, 16, 1, 8, 8, generator=_gen(4)))
    spec = build_spec(model)
    method = MuDSC(mode=mode, repair="none", max_iter=5)
    _, result = method.match(experts, model, data)
    merged = merge_state_dicts(experts, spec, result.matchings)
    repaired = repair_state(model, experts, merged, spec, result.matchings, data)
    sites, _ = repair_sites(model, spec)
    assert len(sites) == 3
    probes = [s.probe for s in sites]
    before = unit_moments(model, merged, probes, data)
    after = unit_moments(model, repaired, probes, data)
    ref = [unit_moments(model, e, probes, data) for e in experts]
    for site in sites:
        mean, std = repair_targets([r[site.probe] for r in ref], result.matchings[site.node])
        torch.testing.assert_close(after[site.probe].mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after[site.probe].std, std, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(before[site.probe].std, std, rtol=1e-2)  # there was something to repair
    # The method's "repair" setting is exactly this correction.
    via_method = MuDSC(mode=mode, repair="repair", max_iter=5).merge(experts, model=model, data=data)
    for key, value in repaired.items():
        torch.testing.assert_close(via_method[key], value)


def test_variance_ratio_is_permutation_invariant_and_shows_the_collapse_of_averaging():
    model = SmallCNN(1, 4, 3, 10).eval()
    spec = build_spec(model)
    a, b = (_randomize(SmallCNN(1, 4, 3, 10), s).state_dict() for s in (1, 2))
    data = list(torch.randn(2, 16, 1, 8, 8, generator=_gen(5)))
    copy = permute_state_dict(a, spec, random_permutations(spec, _gen(6)))
    assert variance_ratios(model, [a], copy, data) == pytest.approx(dict.fromkeys(["features.0", "features.3",
                                                                                   "features.6", "fc"], 1.0))
    average = {k: (a[k] + b[k]) / 2 for k in a}
    ratios = variance_ratios(model, [a, b], average, data)
    assert list(ratios) == [p.module for p in layer_probes(model)]
    assert all(r < 0.8 for r in ratios.values())  # unrelated units cancel: the variance collapses
    repaired = variance_ratios(model, [a, b], repair_state(model, [a, b], average, spec, {}, data), data)
    assert all(0.85 < repaired[layer] <= 1.0 + 1e-6 for layer in ("features.0", "features.3", "features.6"))


def test_repair_argument_is_validated_with_its_name():
    with pytest.raises(ValueError, match="repair must be one of 'none', 'reset_bn', 'repair'"):
        MuDSC(repair="REPAIR")
    with pytest.raises(ValueError, match="repair"):
        get_method("mudsc", repair=True)
    assert MuDSC().repair == "repair"


def test_repair_rejects_experts_that_do_not_fit_the_model():
    model = _mlp()
    state = model.state_dict()
    bad = {k: v for k, v in state.items() if k != "0.bias"}
    with pytest.raises(ValueError, match="expert 1"):
        repair_state(model, [state, bad], state, build_spec(model), {}, [torch.randn(4, 6)])


def _digits_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def test_align_with_repair_keeps_the_scale_of_digits_activations():
    """Two digits MLPs trained from different seeds (a few seconds): plain MuDSC-Align's
    hidden pre-activations lose variance layer by layer; with REPAIR both hidden layers keep
    it (ratio within [0.9, 1.0]: REPAIR matches the std to the experts' mean std, so the
    variance ratio is at most 1 by Jensen's inequality, up to the last layer's noise)."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    states = []
    for j in (0, 1):
        model = _digits_mlp(j)
        generator = _gen(100 + j)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(5):
            for idx in torch.randperm(len(x), generator=generator).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    skeleton = _digits_mlp(0).eval()
    data = list(x[:512].split(256))
    ratios = {}
    for repair in ("none", "repair"):
        merged = MuDSC(mode="align", repair=repair).merge(states, model=skeleton, data=data)
        ratios[repair] = variance_ratios(skeleton, states, merged, data)
    hidden = ("0", "2")
    assert ratios["none"]["2"] < 0.8, ratios
    assert all(0.9 <= ratios["repair"][layer] <= 1.0 + 1e-6 for layer in hidden), ratios
    assert all(ratios["repair"][layer] > ratios["none"][layer] + 0.1 for layer in hidden), ratios
