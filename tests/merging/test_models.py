"""Backbones by name, per-task heads, local checkpoints (never a download)."""

from __future__ import annotations

import pytest
import torch

from merging.io import save_state_dict
from merging.models import MLP, MultiHeadModel, SmallCNN, build_backbone


@pytest.mark.parametrize(
    "name,kwargs,x",
    [
        ("small_cnn", {"width": 4, "num_features": 12}, torch.randn(2, 1, 8, 8)),
        ("mlp", {"in_features": 64, "hidden": 12}, torch.randn(2, 1, 8, 8)),
        ("timm:resnet18", {}, torch.randn(2, 1, 32, 32)),
    ],
)
def test_backbones_map_inputs_to_num_features(name, kwargs, x):
    backbone = build_backbone(name, in_chans=1, **kwargs)
    assert backbone(x).shape == (2, backbone.num_features)


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        build_backbone("resnet")


def test_local_checkpoint_is_loaded_strictly(tmp_path):
    source = SmallCNN(width=4, num_features=8)
    save_state_dict(source.state_dict(), tmp_path / "b.safetensors")
    loaded = build_backbone("small_cnn", width=4, num_features=8, checkpoint=str(tmp_path / "b.safetensors"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_backbone("small_cnn", width=8, num_features=8, checkpoint=str(tmp_path / "b.safetensors"))


def test_multi_head_model_reads_each_task_with_its_head():
    model = MultiHeadModel(MLP(in_features=4, hidden=6), num_classes=[3, 5])
    x = torch.randn(7, 4)
    assert model(x, 0).shape == (7, 3) and model(x, 1).shape == (7, 5)
    torch.testing.assert_close(model(x, 1), model.heads[1](model.backbone(x)))


def test_channels_last_keeps_values_and_changes_only_conv_layouts():
    import torch

    from merging.models import SmallCNN, channels_last

    model = SmallCNN(width=2, depth=2, num_features=4)
    state = model.state_dict()
    converted = channels_last(state)
    assert converted.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(converted[key], value)
        if value.ndim == 4:
            assert converted[key].is_contiguous(memory_format=torch.channels_last)
            if value.shape[1] > 1:  # one input channel: both layouts are the same strides
                assert not value.is_contiguous(memory_format=torch.channels_last)
        else:
            assert converted[key] is value
    x = torch.rand(3, 1, 8, 8)
    expected = model(x)
    got = torch.func.functional_call(model, converted, (x,))
    torch.testing.assert_close(got, expected)
