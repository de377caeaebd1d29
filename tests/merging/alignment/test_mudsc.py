"""The registered ``mudsc`` method: permuted-copy recovery, reductions to known methods, errors."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from merging.alignment import (
    build_spec,
    merge_state_dicts,
    mlp_spec,
    permute_state_dict,
    random_permutations,
    reset_batchnorm,
    solve_zip,
)
from merging.methods import available_methods, get_method
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


def _cnn_bn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4),
    )


def _vit() -> VisionTransformer:
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2, num_classes=5)


FAMILIES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 8), nn.GELU(), nn.Linear(8, 3)), (6,)),
    "small_cnn": (lambda: SmallCNN(1, 4, 3, 10), (1, 8, 8)),
    "cnn_bn": (_cnn_bn, (3, 8, 8)),
    "timm_resnet": (lambda: ResNet(BasicBlock, [2, 1, 1, 1], num_classes=5, channels=(8, 8, 16, 16)), (3, 16, 16)),
    "timm_vit": (_vit, (3, 16, 16)),
}


def _head_moving_permutations(spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random symmetries in which every node moves and every head set changes order."""
    g = _gen(seed)
    while True:
        perms = random_permutations(spec, g)
        heads_move = all(
            not torch.equal(perms[n].view(spec[n].groups, -1)[:, 0] // spec[n].group_size, torch.arange(spec[n].groups))
            for n in spec
            if spec[n].groups > 1
        )
        if heads_move and not any(torch.equal(p, torch.arange(p.numel())) for p in perms.values()):
            return perms


@pytest.mark.parametrize("mode", ["align", "zip"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_merging_with_a_permuted_copy_returns_the_same_model(family, mode):
    factory, shape = FAMILIES[family]
    model = _randomize(factory())
    state = model.state_dict()
    spec = build_spec(model)
    copy = permute_state_dict(state, spec, _head_moving_permutations(spec))
    data = list(torch.randn(2, 24, *shape, generator=_gen(1)))
    merged = get_method("mudsc", mode=mode, repair="none", max_iter=10).merge([state, copy], model=model, data=data)
    x = torch.randn(5, *shape, generator=_gen(2))  # fresh inputs: the merge is the same function
    with torch.no_grad():
        torch.testing.assert_close(
            torch.func.functional_call(model, merged, (x,)), model(x), rtol=1e-5, atol=1e-5
        )
    for key, value in state.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["align", "zip"])
def test_three_experts_all_align_to_expert_zero(mode):
    factory, shape = FAMILIES["mlp"]
    model = _randomize(factory())
    state = model.state_dict()
    spec = build_spec(model)
    copies = [permute_state_dict(state, spec, random_permutations(spec, _gen(s))) for s in (3, 4)]
    data = [torch.randn(32, *shape, generator=_gen(5))]
    merged = get_method("mudsc", mode=mode).merge([state, *copies], model=model, data=data)
    for key, value in state.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)


def test_batchnorm_reset_equals_resetting_the_expert():
    model = _randomize(_cnn_bn())
    state = model.state_dict()
    spec = build_spec(model)
    copy = permute_state_dict(state, spec, random_permutations(spec, _gen(0)))
    data = list(torch.randn(2, 16, 3, 8, 8, generator=_gen(1)))
    merged = get_method("mudsc", repair="reset_bn").merge([state, copy], model=model, data=data)
    expected = reset_batchnorm(model, state, data)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged["1.running_mean"], state["1.running_mean"])


def _two_mlps(
    hidden: tuple[int, ...] = (6, 5), seeds: tuple[int, int] = (1, 2)
) -> tuple[nn.Sequential, list[dict[str, torch.Tensor]]]:
    def make(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        dims = (4, *hidden)
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(dims[-1], 3)).eval()

    return make(0), [make(seeds[0]).state_dict(), make(seeds[1]).state_dict()]


def _hungarian(block: torch.Tensor) -> torch.Tensor:
    """Model 1's unit matched to each unit of model 0."""
    return torch.as_tensor(linear_sum_assignment(block.numpy(), maximize=True)[1])


def test_weight_matching_reduction_is_hungarian_on_weight_correlation_and_ignores_data():
    skeleton, states = _two_mlps(hidden=(6,))
    method = MuDSC(use_activation=False, alpha=0.3, repair="none")
    vectors = [torch.cat([s["0.weight"], s["0.bias"][:, None], s["2.weight"].T], 1).double() for s in states]
    cross = torch.corrcoef(torch.cat(vectors))[:6, 6:]
    perm = _hungarian(cross)
    merged = method.merge(states, model=skeleton, data=[torch.randn(3, 4)])
    torch.testing.assert_close(merged["0.weight"], (states[0]["0.weight"] + states[1]["0.weight"][perm]) / 2)
    torch.testing.assert_close(merged["2.weight"], (states[0]["2.weight"] + states[1]["2.weight"][:, perm]) / 2)
    other = MuDSC(use_activation=False, alpha=0.9, repair="none")
    other = other.merge(states, model=skeleton, data=[torch.randn(7, 4) * 5])
    assert all(torch.equal(merged[k], other[k]) for k in merged)


def test_activation_matching_reduction_is_hungarian_on_feature_correlation():
    skeleton, states = _two_mlps()
    x = torch.randn(40, 4, generator=_gen(0))
    with torch.no_grad():
        hidden = [[], []]
        for state in states:
            h1 = torch.tanh(x @ state["0.weight"].T + state["0.bias"])
            h2 = torch.tanh(h1 @ state["2.weight"].T + state["2.bias"])
            hidden[0].append(h1)
            hidden[1].append(h2)
    p0 = _hungarian(torch.corrcoef(torch.cat(hidden[0], 1).T.double())[:6, 6:])
    p2 = _hungarian(torch.corrcoef(torch.cat(hidden[1], 1).T.double())[:5, 5:])
    for alpha in (0.0, 0.7):
        method = MuDSC(use_weight=False, alpha=alpha, repair="none")
        merged = method.merge(states, model=skeleton, data=[x[:15], x[15:]])
        s0, s1 = states
        torch.testing.assert_close(merged["0.weight"], (s0["0.weight"] + s1["0.weight"][p0]) / 2)
        torch.testing.assert_close(merged["2.weight"], (s0["2.weight"] + s1["2.weight"][p2][:, p0]) / 2)
        torch.testing.assert_close(merged["2.bias"], (s0["2.bias"] + s1["2.bias"][p2]) / 2)
        torch.testing.assert_close(merged["4.weight"], (s0["4.weight"] + s1["4.weight"][:, p2]) / 2)


def test_zipit_reduction_is_zip_on_activation_correlation():
    skeleton, states = _two_mlps()
    x = torch.randn(40, 4, generator=_gen(0))
    method = MuDSC(mode="zip", use_weight=False, repair="none")
    spec, result = method.match(states, skeleton, [x])
    assert result.history == []  # no coordinate descent without weights
    expected = {name: solve_zip(result.activation[name], 2) for name in spec}
    for name in spec:
        assert torch.equal(result.matchings[name].unmerge, expected[name].unmerge.to(result.matchings[name].unmerge))
    merged = method.merge(states, model=skeleton, data=[x])
    reference = merge_state_dicts(states, mlp_spec(skeleton), expected)
    for key in merged:
        torch.testing.assert_close(merged[key], reference[key])


def test_coordinate_descent_keeps_the_best_sweep_and_repeats_with_its_seed():
    skeleton, states = _two_mlps(hidden=(8, 8, 8), seeds=(2, 101))
    data = [torch.randn(32, 4, generator=_gen(1))]
    _, result = MuDSC(mode="zip", seed=3).match(states, skeleton, data)
    history = result.history
    best = history.index(max(history))
    # This case's first sweep is its best: later sweeps revert to it until tol = 5 of them fail.
    assert best == 0 and len(history) == 6 and history[-1] < history[0]
    assert result.objective == history[0]
    _, first = MuDSC(mode="zip", seed=3, max_iter=1).match(states, skeleton, data)
    assert all(torch.equal(result.matchings[n].unmerge, first.matchings[n].unmerge) for n in result.matchings)
    _, again = MuDSC(mode="zip", seed=3).match(states, skeleton, data)
    assert again.history == history
    _, patient = MuDSC(mode="zip", seed=3, tol=2).match(states, skeleton, data)
    assert len(patient.history) == 3


def test_registered_with_its_settings():
    assert "mudsc" in available_methods()
    method = get_method("mudsc", mode="zip", alpha=0.2, use_activation=False)
    assert isinstance(method, MuDSC)
    assert (method.config().mode, method.config().alpha, method.config().use_activation) == ("zip", 0.2, False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "average"}, "mode"),
        ({"alpha": -0.1}, "alpha"),
        ({"use_activation": False, "use_weight": False}, "both False"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MuDSC(**kwargs)


def test_bad_inputs_raise():
    skeleton, states = _two_mlps()
    data = [torch.randn(4, 4)]
    method = MuDSC()
    with pytest.raises(ValueError, match="at least 2 experts"):
        method.merge(states[:1], model=skeleton, data=data)
    with pytest.raises(ValueError, match="needs model"):
        method.merge(states, data=data)
    with pytest.raises(ValueError, match="data"):
        method.merge(states, model=skeleton)
    with pytest.raises(ValueError, match="missing keys"):
        method.merge(states, model=nn.Sequential(nn.Linear(4, 6)), data=data)
    with pytest.raises(ValueError, match="no batches"):
        method.merge(states, model=skeleton, data=[])
    with pytest.raises(ValueError, match="'0.weight'"):
        bad = dict(states[1]) | {"0.weight": torch.full((6, 4), float("nan"))}
        method.merge([states[0], bad], model=skeleton, data=data)


def test_single_pass_iterator_with_batchnorm_is_reported():
    model = _randomize(_cnn_bn())
    state = model.state_dict()
    with pytest.raises(ValueError, match="re-iterable"):
        MuDSC().merge([state, state], model=model, data=iter([torch.randn(4, 3, 8, 8)]))


@pytest.mark.slow
def test_digits_mlps_from_different_seeds_merge_far_better_than_averaging():
    from sklearn.datasets import load_digits

    pixels, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(pixels / 16.0, dtype=torch.float32), torch.tensor(labels)
    order = torch.randperm(len(x), generator=_gen(0))
    train, test = order[:1400], order[1400:]

    def trained(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[train]), y[train]).backward()
            opt.step()
        return model.eval()

    models = [trained(0), trained(1)]
    states = [m.state_dict() for m in models]

    def accuracy(state: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return float((torch.func.functional_call(models[0], state, (x[test],)).argmax(1) == y[test]).float().mean())

    assert min(accuracy(s) for s in states) > 0.9
    average = accuracy(get_method("average").merge(states))
    for mode in ("align", "zip"):
        merged = accuracy(get_method("mudsc", mode=mode).merge(states, model=models[0], data=[x[train]]))
        assert merged > 0.85 and merged > average + 0.2, (mode, merged, average)


@pytest.mark.parametrize("tie_heads", [True, False])
def test_vit_head_ties(tie_heads):
    # Two unrelated ViTs: tied query/key and value nodes share one head assignment.
    model = _randomize(_vit())
    states = [model.state_dict(), _randomize(_vit(), seed=1).state_dict()]
    data = [torch.randn(8, 3, 16, 16, generator=_gen(0))]
    spec, result = MuDSC(tie_heads=tie_heads, max_iter=2).match(states, model, data)
    qk, v = result.matchings["blocks.0.attn.qk"], result.matchings["blocks.0.attn.v"]
    for node in (qk, v):  # every merged head takes whole heads of both models
        for i in range(2):
            sources = node.unmerge_block(i).argmax(0).view(3, 8) // 8
            assert (sources == sources[:, :1]).all()
    if tie_heads:
        assert torch.equal(qk.group_assignment, v.group_assignment)
    # Either way a permuted copy is recovered exactly.
    copy = permute_state_dict(states[0], spec, _head_moving_permutations(spec))
    merged = MuDSC(tie_heads=tie_heads, max_iter=2).merge([states[0], copy], model=model, data=data * 3)
    for key, value in states[0].items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
