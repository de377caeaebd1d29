"""Permutation specs and their builders: validation, structure, and that every spec is a symmetry."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from timm.layers import GroupNorm
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from merging.alignment import (
    ActPoint,
    PermEntry,
    PermNode,
    PermSpec,
    PermSpecError,
    build_spec,
    cnn_spec,
    mlp_spec,
    permute_state_dict,
    random_permutations,
    resnet_spec,
    vit_spec,
)
from merging.models import MLP, SmallCNN


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, so that no tensor is left symmetric."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def _moving_permutations(spec: PermSpec) -> dict[str, torch.Tensor]:
    """Seeded random symmetries, the first with no identity permutation (so every tensor moves)."""
    generator = torch.Generator().manual_seed(2)
    while True:
        perms = random_permutations(spec, generator)
        if not any(torch.equal(p, torch.arange(p.numel())) for p in perms.values()):
            return perms


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.GELU(), nn.Linear(5, 3))


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
        nn.ReLU(),
        nn.Linear(10, 4),
    )


def _resnet_basic() -> ResNet:
    return ResNet(BasicBlock, [2, 1, 1, 1], num_classes=5, channels=(8, 16, 16, 32))


def _resnet_deep_stem() -> ResNet:  # resnet10t/26d style: tiered deep stem, average-pool shortcuts
    return ResNet(
        BasicBlock, [1, 1, 1, 1], num_classes=5, channels=(8, 16, 16, 32), stem_type="deep_tiered", stem_width=8,
        avg_down=True,
    )


def _resnet_bottleneck_gn() -> ResNet:
    norm = functools.partial(GroupNorm, num_groups=4)
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, channels=(8, 8, 16, 16), norm_layer=norm)


def _vit(**kwargs) -> VisionTransformer:
    args = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2, num_classes=5)
    return VisionTransformer(**(args | kwargs))


# (model factory, input shape, float keys left in place: the output layer)
FAMILIES = {
    "mlp": (_mlp, (4, 6), {"4.bias"}),
    "merging.MLP": (lambda: MLP(6, 8, depth=3), (4, 6), {"layers.4.bias"}),
    "small_cnn": (lambda: SmallCNN(1, 4, 3, 10), (2, 1, 16, 16), {"fc.bias"}),
    "cnn_bn_gn_flatten": (_cnn, (2, 3, 8, 8), {"10.bias"}),
    "resnet_basic": (_resnet_basic, (2, 3, 32, 32), {"fc.bias"}),
    "resnet_deep_stem_avg_down": (_resnet_deep_stem, (2, 3, 32, 32), {"fc.bias"}),
    "resnet_bottleneck_gn": (_resnet_bottleneck_gn, (2, 3, 32, 32), {"fc.bias"}),
    "vit_layerscale_reg": (lambda: _vit(init_values=0.1, reg_tokens=1), (2, 3, 16, 16), {"head.bias"}),
    "vit_avgpool_fcnorm": (lambda: _vit(global_pool="avg", fc_norm=True), (2, 3, 16, 16), {"head.bias"}),
    # Registered timm architectures, as users name them (pretrained=False: nothing is downloaded).
    "timm:resnet10t": (
        lambda: timm.create_model("resnet10t", pretrained=False, num_classes=5),
        (1, 3, 32, 32),
        {"fc.bias"},
    ),
    "timm:vit_tiny_patch16_224": (
        lambda: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5
        ),
        (1, 3, 32, 32),
        {"head.bias"},
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_random_symmetry_preserves_outputs(family):
    factory, shape, untouched = FAMILIES[family]
    model = _randomize(factory())
    spec = build_spec(model)
    state = model.state_dict()
    spec.validate(state)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    perms = _moving_permutations(spec)
    permuted = permute_state_dict(state, spec, perms)
    with torch.no_grad():
        expected = torch.func.functional_call(model, state, (x,))
        got = torch.func.functional_call(model, permuted, (x,))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    float_keys = {k for k, v in state.items() if v.is_floating_point()}
    assert float_keys - set(spec.touched_keys()) == untouched
    # Every permuted tensor really moved (a spec applied as the identity would pass trivially).
    moved = {k for k in spec.touched_keys() if not torch.equal(state[k], permuted[k])}
    assert moved == set(spec.touched_keys())


def test_mlp_spec_structure_and_hand_permutation():
    model = _randomize(_mlp())
    spec = mlp_spec(model)
    assert list(spec) == ["0", "2"]
    entries = (PermEntry("0.weight", 0), PermEntry("0.bias", 0), PermEntry("2.weight", 1, "in"))
    assert spec["0"] == PermNode("0", 8, entries, act=ActPoint("2", "pre", (-1,)))
    assert spec["2"].act == ActPoint("4", "pre", (-1,))
    perm0, perm2 = torch.tensor([3, 1, 0, 2, 7, 6, 5, 4]), torch.tensor([4, 0, 3, 1, 2])
    state = model.state_dict()
    out = permute_state_dict(state, spec, {"0": perm0, "2": perm2})
    torch.testing.assert_close(out["0.weight"], state["0.weight"][perm0], rtol=0, atol=0)
    torch.testing.assert_close(out["0.bias"], state["0.bias"][perm0], rtol=0, atol=0)
    torch.testing.assert_close(out["2.weight"], state["2.weight"][perm2][:, perm0], rtol=0, atol=0)
    torch.testing.assert_close(out["4.weight"], state["4.weight"][:, perm2], rtol=0, atol=0)
    torch.testing.assert_close(out["4.bias"], state["4.bias"], rtol=0, atol=0)


def test_cnn_spec_flatten_boundary_and_norms():
    spec = cnn_spec(_cnn())
    first, second = spec["0"], spec["4"]
    assert {e.key for e in first.entries} == {
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "4.weight",
    }
    assert {e.key for e in first.entries if e.ignore} == {"1.running_mean", "1.running_var"}
    assert second.groups == 2  # GroupNorm(2, 8) groups the node's units
    assert PermEntry("8.weight", 1, "in", inner=16) in second.entries  # Linear after flatten of [8, 4, 4]
    assert second.act == ActPoint("8", "pre", (-1,), inner=16)


def test_resnet_spec_residual_nodes():
    spec = resnet_spec(_resnet_basic())
    residuals = [n for n in spec if n.endswith("residual")]
    # timm's plain stem has 64 channels, so layer1 (8 channels) opens with a projection.
    assert residuals == ["stem.residual"] + [f"layer{s}.0.residual" for s in range(1, 5)]
    stage1 = spec["layer1.0.residual"]
    assert {e.key for e in stage1.entries if e.role == "in"} == {
        "layer1.1.conv1.weight", "layer2.0.conv1.weight", "layer2.0.downsample.0.weight",
    }
    assert {e.key for e in stage1.entries if e.role == "out" and e.key.endswith("weight")} == {
        "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight", "layer1.0.conv2.weight",
        "layer1.0.bn2.weight", "layer1.1.conv2.weight", "layer1.1.bn2.weight",
    }
    assert stage1.act == ActPoint("layer2.0")
    assert spec["layer1.0.conv1"].act == ActPoint("layer1.0.conv2")
    assert spec["layer4.0.residual"].act == ActPoint("global_pool")
    assert PermEntry("fc.weight", 1, "in") in spec["layer4.0.residual"].entries
    gn = resnet_spec(_resnet_bottleneck_gn())
    assert {node.groups for node in gn.values()} == {4}


def test_vit_spec_nodes_heads_and_ties():
    spec = vit_spec(_vit())
    assert list(spec)[:4] == ["residual", "blocks.0.attn.qk", "blocks.0.attn.v", "blocks.0.mlp"]
    qk, v = spec["blocks.0.attn.qk"], spec["blocks.0.attn.v"]
    assert (qk.groups, v.groups, qk.tie) == (2, 2, v.tie)
    assert {(e.key, e.offset) for e in qk.entries} == {
        ("blocks.0.attn.qkv.weight", 0), ("blocks.0.attn.qkv.weight", 16),
        ("blocks.0.attn.qkv.bias", 0), ("blocks.0.attn.qkv.bias", 16),
    }
    assert qk.act == ActPoint("blocks.0.attn.k_norm", "post", (1, 3))
    assert spec.tie_groups() == [("residual",), ("blocks.0.attn.qk", "blocks.0.attn.v"), ("blocks.0.mlp",),
                                 ("blocks.1.attn.qk", "blocks.1.attn.v"), ("blocks.1.mlp",)]
    assert len(spec.tie_groups(use_ties=False)) == len(spec)


def test_backbone_without_classifier_keeps_its_output_in_place():
    vit = vit_spec(_vit(num_classes=0))
    assert "residual" not in vit and len(vit) == 6
    resnet = resnet_spec(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=0, channels=(8, 16, 16, 32)))
    assert "layer4.0.residual" not in resnet and "layer3.0.residual" in resnet


def test_random_permutations_move_heads_as_tied_blocks_and_repeat_with_seed():
    spec = vit_spec(_vit(embed_dim=24, num_heads=3))
    perms = random_permutations(spec, torch.Generator().manual_seed(5))
    again = random_permutations(spec, torch.Generator().manual_seed(5))
    assert all(torch.equal(perms[n], again[n]) for n in spec)
    for block in ("blocks.0", "blocks.1"):
        heads = [perms[f"{block}.attn.{n}"].view(3, 8) // 8 for n in ("qk", "v")]
        for h in heads:
            assert (h == h[:, :1]).all()  # every head's units come from one head
        assert torch.equal(heads[0], heads[1])  # q/k and v heads move together


@pytest.mark.parametrize(
    ("factory", "builder", "match"),
    [
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)), mlp_spec, "LSTM"),
        (lambda: nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)), mlp_spec, "Conv2d"),
        (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 4, 3)), cnn_spec, "grouped"),
        (
            lambda: ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 8, 8, 8), block_args={"attn_layer": "se"}),
            resnet_spec,
            "se",
        ),
        (lambda: _vit(qk_norm=True), vit_spec, "q/k"),
        (lambda: _vit(global_pool="map"), vit_spec, "attention pooling"),
    ],
)
def test_unsupported_structures_raise(factory, builder, match):
    with pytest.raises(ValueError, match=match):
        builder(factory())


def test_permspec_rejects_malformed_nodes():
    entry, entry2 = PermEntry("w", 0), PermEntry("v", 0)
    with pytest.raises(PermSpecError, match="duplicate"):
        PermSpec([PermNode("a", 4, (entry,)), PermNode("a", 4, (PermEntry("v", 0),))])
    with pytest.raises(PermSpecError, match="overlap"):
        PermSpec([PermNode("a", 4, (entry,)), PermNode("b", 4, (PermEntry("w", 0, offset=2),))])
    with pytest.raises(PermSpecError, match="equal groups"):
        PermSpec([PermNode("a", 6, (entry,), groups=4)])
    with pytest.raises(PermSpecError, match="ignored"):
        PermSpec([PermNode("a", 4, (PermEntry("w", 0, ignore=True),))])
    with pytest.raises(PermSpecError, match="different group counts"):
        PermSpec([PermNode("a", 4, (entry,), groups=2, tie="t"), PermNode("b", 4, (entry2,), groups=4, tie="t")])
    # Adjacent segments of one fused tensor are fine.
    spec = PermSpec([PermNode("a", 4, (entry,)), PermNode("b", 4, (PermEntry("w", 0, offset=4),))])
    assert [n for n, _ in spec.memberships("w")] == [spec["a"], spec["b"]]


def test_permspec_validate_names_key_and_shape():
    spec = PermSpec([PermNode("hidden", 4, (PermEntry("fc.weight", 0), PermEntry("out.weight", 1, "in", offset=2)))])
    good = {"fc.weight": torch.zeros(4, 3), "out.weight": torch.zeros(2, 6)}
    spec.validate(good)
    with pytest.raises(PermSpecError, match="'out.weight' is not in"):
        spec.validate({"fc.weight": torch.zeros(4, 3)})
    with pytest.raises(PermSpecError, match=r"indices \[2, 6\)"):
        spec.validate(good | {"out.weight": torch.zeros(2, 5)})
    with pytest.raises(PermSpecError, match="no axis 1"):
        spec.validate(good | {"out.weight": torch.zeros(6)})
