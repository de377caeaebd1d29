"""Backbones and per-task heads.

A merged model is one shared **backbone** (the part experts fine-tune and merging
combines) plus one **head per task** (kept per expert, never merged). Backbones map a
batch of inputs ``(B, *input_shape)`` to features ``(B, num_features)``.

Backbones are built from a string (configs hold strings, code holds classes):
``"small_cnn"``, ``"mlp"``, or ``"timm:<name>"`` for any timm model, always with
``pretrained=False`` (no download); a local checkpoint can be loaded instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn


def channels_last(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every 4-D floating tensor (conv weights) in ``torch.channels_last``
    memory format; other entries are passed through.

    Values are unchanged; only the layout is. Convolutions with channels-last weights run on
    oneDNN's (CPU) and cuDNN's (GPU) channels-last kernels whatever the inputs' layout: on the
    CPU, 2-4x faster for the thin convolutions of :class:`SmallCNN` (measured by the claims
    benchmark's evaluations). Use it on states evaluated with ``torch.func.functional_call``;
    for a module, ``module.to(memory_format=torch.channels_last)`` does the same.
    """
    return {
        k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 and v.is_floating_point() else v
        for k, v in state.items()
    }


class SmallCNN(nn.Module):
    """A plain CPU-speed CNN: ``depth`` blocks of conv3x3 -> ReLU (-> 2x2 max-pool), then
    global average pooling and a linear -> ReLU projection to ``num_features``.

    Every conv and the projection are followed directly by ReLU, so M-Loss measures them all.

    Args:
        in_chans: input channels.
        width: channels of the first block (doubled every block).
        depth: number of conv blocks.
        num_features: output feature size d.
    """

    def __init__(self, in_chans: int = 1, width: int = 32, depth: int = 3, num_features: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        chans = in_chans
        for i in range(depth):
            out = width * 2**i
            layers += [nn.Conv2d(chans, out, 3, padding=1), nn.ReLU()]
            if i < depth - 1:
                layers.append(nn.MaxPool2d(2))
            chans = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chans, num_features)
        self.act = nn.ReLU()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, num_features)``."""
        return self.act(self.fc(self.pool(self.features(x)).flatten(1)))


class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs: ``depth`` (Linear -> activation) layers.

    Args:
        in_features: flattened input size.
        hidden: width of every layer (also the output feature size).
        depth: number of Linear -> activation layers.
        act: ``"relu"`` or ``"gelu"``.
    """

    def __init__(self, in_features: int = 64, hidden: int = 128, depth: int = 2, act: str = "relu") -> None:
        super().__init__()
        acts = {"relu": nn.ReLU, "gelu": nn.GELU}
        if act not in acts:
            raise ValueError(f"MLP act must be one of {sorted(acts)}, got {act!r}")
        layers: list[nn.Module] = []
        dim = in_features
        for _ in range(depth):
            layers += [nn.Linear(dim, hidden), acts[act]()]
            dim = hidden
        self.layers = nn.Sequential(*layers)
        self.num_features = hidden

    def forward(self, x: Tensor) -> Tensor:
        """``(B, *)`` -> ``(B, hidden)``."""
        return self.layers(x.flatten(1))


def build_backbone(
    name: str = "small_cnn",
    *,
    in_chans: int = 1,
    checkpoint: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build a backbone with a ``num_features`` attribute.

    Args:
        name: ``"small_cnn"``, ``"mlp"`` or ``"timm:<model name>"`` (e.g. ``"timm:resnet18"``).
        in_chans: input channels (``SmallCNN`` and timm models).
        checkpoint: optional local state-dict file (safetensors / torch / Lightning ckpt)
            loaded strictly into the backbone. Nothing is ever downloaded.
        **kwargs: passed to the backbone's constructor.

    Raises:
        ValueError: unknown backbone name.
    """
    if name == "small_cnn":
        backbone: nn.Module = SmallCNN(in_chans=in_chans, **kwargs)
    elif name == "mlp":
        backbone = MLP(**kwargs)
    elif name.startswith("timm:"):
        import timm

        backbone = timm.create_model(name[5:], pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    else:
        raise ValueError(f"unknown backbone {name!r}: use 'small_cnn', 'mlp' or 'timm:<model name>'")
    if checkpoint is not None:
        from merging.io import load_state_dict

        backbone.load_state_dict(load_state_dict(checkpoint), strict=True)
    return backbone


class MultiHeadModel(nn.Module):
    """One backbone and one linear head per task.

    Args:
        backbone: maps inputs to features ``(B, d)``; must have ``num_features`` = d.
        num_classes: classes of each task, in task order.
    """

    def __init__(self, backbone: nn.Module, num_classes: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Linear(backbone.num_features, n) for n in num_classes)

    def forward(self, x: Tensor, task: int) -> Tensor:
        """Logits ``(B, num_classes[task])`` of task ``task``."""
        return self.heads[task](self.backbone(x))

