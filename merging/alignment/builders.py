"""Permutation-spec builders per model family: MLPs, plain CNNs, timm ResNets, timm ViTs.

Specs are written explicitly per family from the module structure (no tracing), following
MuDSC's ``get_resnet_perm`` / ``get_vit_perm``. Common rules:

- A node's activation point is, as in the code's ``refine_perm``, a forward pre-hook on
  its consumer (the next layer's input, after activation and pooling); a residual stream
  is measured where it leaves its stage (the next projection block's input, the global
  pool's input, or the ViT head's input).
- The model's **output units are never permuted**: a layer (or residual stream) with no
  consumer inside the model is its output interface and stays in place, so it is plainly
  averaged. Merge whole classifiers to align everything; a backbone without a classifier
  (``num_classes=0``) keeps its last stage / residual stream unaligned.
- Unsupported structures raise ``ValueError`` naming the module, never a silent wrong spec.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from torch import nn

from merging.alignment.spec import ActPoint, PermEntry, PermNode, PermSpec

_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
)
_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_CONVS = (nn.Conv1d, nn.Conv2d)


@dataclass
class _OpenNode:
    """A node being collected: producers so far, consumers once found."""

    name: str
    size: int
    entries: list[PermEntry] = field(default_factory=list)
    groups: int = 1

    def close(self, act: ActPoint | None, tie: str | None = None) -> PermNode:
        return PermNode(self.name, self.size, tuple(self.entries), self.groups, act, tie)


def _layer_entries(name: str, layer: nn.Module) -> list[PermEntry]:
    entries = [PermEntry(f"{name}.weight", 0)]
    if getattr(layer, "bias", None) is not None:
        entries.append(PermEntry(f"{name}.bias", 0))
    return entries


def _add_norm(node: _OpenNode, name: str, norm: nn.Module) -> None:
    """Attach a normalisation layer's per-unit tensors to ``node`` (its producer side)."""
    if isinstance(norm, nn.Identity):
        return
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        if norm.num_features != node.size:
            raise ValueError(f"{name!r}: BatchNorm over {norm.num_features} features after {node.size} units")
        if norm.affine:
            node.entries += [PermEntry(f"{name}.weight", 0), PermEntry(f"{name}.bias", 0)]
        if norm.track_running_stats:
            node.entries += [
                PermEntry(f"{name}.running_mean", 0, ignore=True),
                PermEntry(f"{name}.running_var", 0, ignore=True),
            ]
        return
    if isinstance(norm, nn.GroupNorm):
        if norm.num_channels != node.size:
            raise ValueError(f"{name!r}: GroupNorm over {norm.num_channels} channels after {node.size} units")
        if node.groups not in (1, norm.num_groups):
            raise ValueError(f"{name!r}: GroupNorm with {norm.num_groups} groups in a node of {node.groups} groups")
        node.groups = norm.num_groups
        if norm.affine:
            node.entries += [PermEntry(f"{name}.weight", 0), PermEntry(f"{name}.bias", 0)]
        return
    if isinstance(norm, nn.LayerNorm):
        if tuple(norm.normalized_shape) != (node.size,):
            raise ValueError(f"{name!r}: LayerNorm over {tuple(norm.normalized_shape)}, expected ({node.size},)")
        if norm.weight is not None:
            node.entries.append(PermEntry(f"{name}.weight", 0))
        if norm.bias is not None:
            node.entries.append(PermEntry(f"{name}.bias", 0))
        return
    raise ValueError(f"{name!r}: unsupported normalisation layer {type(norm).__name__}")


def _chain_spec(model: nn.Module, prefix: str, allow_conv: bool, builder: str) -> PermSpec:
    nodes: list[PermNode] = []
    current: _OpenNode | None = None
    current_is_conv = False
    producer_types = (nn.Linear, *_CONVS) if allow_conv else (nn.Linear,)
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    for name, module in model.named_modules():
        if list(module.children()):
            if list(module.parameters(recurse=False)):
                raise ValueError(
                    f"{builder}: container {name!r} holds its own parameters, which the chain cannot place"
                )
            continue
        full = f"{prefix}{name}"
        if isinstance(module, producer_types):
            if isinstance(module, _CONVS) and module.groups != 1:
                raise ValueError(f"{builder}: grouped convolution {name!r} (groups={module.groups}) is not supported")
            fan_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if current is not None:
                # A Linear after a conv reads the flattened [C, H, W] map: C-major, H·W per channel.
                inner = fan_in // current.size if isinstance(module, nn.Linear) and current_is_conv else 1
                if fan_in != current.size * inner:
                    raise ValueError(
                        f"{builder}: {name!r} takes {fan_in} inputs, but the previous layer has {current.size} units"
                    )
                current.entries.append(PermEntry(f"{full}.weight", 1, "in", inner=inner))
                dims = (-1,) if isinstance(module, nn.Linear) else (1,)
                nodes.append(current.close(ActPoint(full, "pre", dims, inner)))
            size = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            current = _OpenNode(full, size, _layer_entries(full, module))
            current_is_conv = isinstance(module, _CONVS)
        elif isinstance(module, norm_types):
            if current is not None:
                _add_norm(current, full, module)
        elif isinstance(module, (*_ELEMENTWISE, nn.Flatten)) or (allow_conv and isinstance(module, _POOLS)):
            continue
        else:
            raise ValueError(
                f"{builder}: module {name!r} ({type(module).__name__}) is not supported in a feed-forward chain"
            )
    return PermSpec(nodes)


def mlp_spec(model: nn.Module, prefix: str = "") -> PermSpec:
    """Spec of a feed-forward MLP: one node per hidden Linear layer.

    The model's leaf modules, in registration order, must be its execution order (an
    ``nn.Sequential``, or :class:`merging.models.MLP`): Linear layers, element-wise
    activations, dropout, and BatchNorm1d/LayerNorm on a layer's units. Node l holds
    ``fc_l.weight/bias`` (axis 0, plus norm tensors) and ``fc_{l+1}.weight`` (axis 1, in);
    its activations are fc_{l+1}'s input. The last Linear's outputs are the model output.

    Args:
        model: the MLP.
        prefix: prepended to every key and module name (a sub-module's path + ".").

    Raises:
        ValueError: a module the chain cannot place (named in the message).
    """
    return _chain_spec(model, prefix, allow_conv=False, builder="mlp_spec")


def cnn_spec(model: nn.Module, prefix: str = "") -> PermSpec:
    """Spec of a plain CNN (Conv/BN/activation/pool chains, then Linear layers).

    As :func:`mlp_spec`, with Conv1d/Conv2d (``groups=1``), BatchNorm, GroupNorm (the
    node's units are then grouped) and pooling layers. A Linear after a conv reads the
    flattened map: its input is viewed as ``[out, C, H·W]`` and permuted on C
    (``inner = H·W``, from its ``in_features``).
    Works for :class:`merging.models.SmallCNN`.

    Args:
        model: the CNN.
        prefix: prepended to every key and module name.

    Raises:
        ValueError: a module the chain cannot place (named in the message).
    """
    return _chain_spec(model, prefix, allow_conv=True, builder="cnn_spec")


def _find(container: nn.Module, kinds: tuple[type, ...], where: str) -> tuple[str, nn.Module]:
    found = [(n, m) for n, m in container.named_children() if isinstance(m, kinds)]
    if len(found) != 1:
        kind = "/".join(k.__name__ for k in kinds)
        raise ValueError(f"resnet_spec: expected one {kind} in {where!r}, found {len(found)}")
    return found[0]


def resnet_spec(model: nn.Module, prefix: str = "") -> PermSpec:
    """Spec of a timm ResNet (``timm.models.resnet.ResNet``, BasicBlock or Bottleneck).

    Port of MuDSC's ``get_resnet_perm`` built from the module, so deep stems
    (``resnet10t``, ``resnet26d``), average-pool shortcuts and GroupNorm variants come out
    right. One **residual node** per run of blocks between projection shortcuts: the stem's
    last conv/norm, every block's last conv/norm and the projection shortcut's conv/norm
    (producers), every block's first conv and the next projection shortcut's conv
    (consumers), and ``fc`` (consumer of the last one). Every inner block channel set is a
    node of its own (conv_k/bn_k and conv_{k+1}'s input). With GroupNorm a node has the
    norm's groups.

    Args:
        model: a timm ResNet (``pretrained=False`` is fine: only the structure is read).
        prefix: prepended to every key and module name.

    Raises:
        ValueError: squeeze-excitation, grouped convolutions, a convolution stem pool, a
            pooling that changes the feature count, or an unknown block.
    """
    from timm.models.resnet import BasicBlock, Bottleneck

    nodes: list[PermNode] = []
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)

    def conv_check(name: str, conv: nn.Module) -> None:
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise ValueError(f"resnet_spec: {name!r} must be an ungrouped Conv2d, got {conv}")

    # Stem: a single conv, or a deep stem (conv, norm, act, conv, norm, act, conv).
    if isinstance(model.conv1, nn.Conv2d):
        stem = [("conv1", model.conv1)]
    else:
        stem = [(f"conv1.{n}", m) for n, m in model.conv1.named_children()]
    current: _OpenNode | None = None
    for name, module in stem:
        full = f"{prefix}{name}"
        if isinstance(module, nn.Conv2d):
            conv_check(name, module)
            if current is not None:
                current.entries.append(PermEntry(f"{full}.weight", 1, "in"))
                nodes.append(current.close(ActPoint(full)))
            current = _OpenNode(full, module.out_channels, _layer_entries(full, module))
        elif isinstance(module, norms):
            _add_norm(current, full, module)
        elif not isinstance(module, _ELEMENTWISE):
            raise ValueError(f"resnet_spec: unsupported stem module {name!r} ({type(module).__name__})")
    _add_norm(current, f"{prefix}bn1", model.bn1)
    if not isinstance(model.maxpool, (nn.MaxPool2d, nn.AvgPool2d, nn.Identity)):
        raise ValueError("resnet_spec: a stem pool with layers (replace_stem_pool / aa_layer) is not supported")
    residual = _OpenNode(f"{prefix}stem.residual", current.size, current.entries, current.groups)

    stages = [(n, m) for n, m in model.named_children() if n.startswith("layer") and n[5:].isdigit()]
    for stage_name, stage in stages:
        for block_index, block in stage.named_children():
            bname = f"{prefix}{stage_name}.{block_index}"
            if type(block) not in (BasicBlock, Bottleneck):
                raise ValueError(
                    f"resnet_spec: {bname!r} is a {type(block).__name__}, not a timm BasicBlock/Bottleneck"
                )
            if block.se is not None:
                raise ValueError(f"resnet_spec: {bname!r} has an attention module (se), which is not supported")
            depth = 2 if isinstance(block, BasicBlock) else 3
            convs = [(f"{bname}.conv{k}", getattr(block, f"conv{k}")) for k in range(1, depth + 1)]
            bns = [(f"{bname}.bn{k}", getattr(block, f"bn{k}")) for k in range(1, depth + 1)]
            for name, conv in convs:
                conv_check(name, conv)
            residual.entries.append(PermEntry(f"{convs[0][0]}.weight", 1, "in"))
            if block.downsample is not None:
                ds_name, ds_conv = _find(block.downsample, (nn.Conv2d,), f"{bname}.downsample")
                ds_full = f"{bname}.downsample.{ds_name}"
                conv_check(ds_full, ds_conv)
                norm_name, ds_norm = _find(block.downsample, norms, f"{bname}.downsample")
                residual.entries.append(PermEntry(f"{ds_full}.weight", 1, "in"))
                nodes.append(residual.close(ActPoint(bname)))
                residual = _OpenNode(f"{bname}.residual", ds_conv.out_channels, _layer_entries(ds_full, ds_conv))
                _add_norm(residual, f"{bname}.downsample.{norm_name}", ds_norm)
            last_name, last_conv = convs[-1]
            residual.entries += _layer_entries(last_name, last_conv)
            _add_norm(residual, bns[-1][0], bns[-1][1])
            for k in range(depth - 1):
                (name, conv), (bn_name, bn), (next_name, _) = convs[k], bns[k], convs[k + 1]
                inner = _OpenNode(name, conv.out_channels, _layer_entries(name, conv))
                _add_norm(inner, bn_name, bn)
                inner.entries.append(PermEntry(f"{next_name}.weight", 1, "in"))
                nodes.append(inner.close(ActPoint(next_name)))

    if isinstance(model.fc, nn.Linear):
        if model.fc.in_features != residual.size:
            raise ValueError(
                f"resnet_spec: fc takes {model.fc.in_features} features from {residual.size} channels "
                "(a concatenating global pool is not supported)"
            )
        residual.entries.append(PermEntry(f"{prefix}fc.weight", 1, "in"))
        nodes.append(residual.close(ActPoint(f"{prefix}global_pool")))
    return PermSpec(nodes)


def vit_spec(model: nn.Module, prefix: str = "") -> PermSpec:
    """Spec of a timm VisionTransformer (``timm.models.vision_transformer``).

    Port of MuDSC's ``get_vit_perm``:

    - one **residual node** (D units): ``cls_token``/``reg_token``/``pos_embed`` (axis 2),
      the patch embedding's output, every LayerNorm and LayerScale on the stream,
      ``attn.proj`` and ``mlp.fc2`` outputs; ``attn.qkv`` and ``mlp.fc1`` inputs and the
      ``head`` input are its consumers. Measured at the head's input.
    - per block a **QK node**: the q and k rows of the fused ``qkv`` weight (offsets 0 and
      A, A = heads · head_dim) share one permutation, grouped by heads; measured at the
      (Identity) ``attn.k_norm`` output, ``[B, H, N, D_h] → [H·D_h, B·N]``.
    - a **V node**: the v rows (offset 2A) and the ``proj`` input, grouped by heads;
      measured at the ``proj`` input.
    - an **MLP node**: ``fc1`` outputs and ``fc2`` inputs; measured at the ``fc2`` input.

    [I] The QK and V nodes of a block share their head permutation (``tie``): a head
    pairs its attention pattern with its own values, so permuting them differently is not
    a symmetry of the network. The official code solves them separately
    (``MatchConfig.tie_groups=False`` reproduces that).

    Args:
        model: a timm VisionTransformer with standard ``Block``/``Attention``/``Mlp``.
        prefix: prepended to every key and module name.

    Raises:
        ValueError: attention pooling, q/k normalisation, gated attention, or non-standard
            blocks (parallel, residual-post-norm, SwiGLU).
    """
    from timm.layers import Mlp
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, LayerScale

    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("vit_spec: attention pooling (global_pool='map') is not supported")
    dim = model.embed_dim
    p = prefix
    residual = _OpenNode(f"{p}residual", dim)
    for token in ("cls_token", "reg_token", "pos_embed"):
        if getattr(model, token, None) is not None:
            residual.entries.append(PermEntry(f"{p}{token}", 2))
    if not isinstance(model.patch_embed.proj, nn.Conv2d):
        raise ValueError("vit_spec: patch_embed.proj must be a Conv2d")
    residual.entries += _layer_entries(f"{p}patch_embed.proj", model.patch_embed.proj)
    _add_norm(residual, f"{p}patch_embed.norm", model.patch_embed.norm)
    _add_norm(residual, f"{p}norm_pre", model.norm_pre)

    nodes: list[PermNode] = []
    for index, block in enumerate(model.blocks):
        b = f"{p}blocks.{index}"
        attn, mlp = block.attn, block.mlp
        if type(block) is not Block or type(attn) is not Attention or type(mlp) is not Mlp:
            raise ValueError(f"vit_spec: {b!r} is not a standard timm Block(Attention, Mlp)")
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            raise ValueError(f"vit_spec: {b!r} normalises q/k per head, which ties units across heads")
        if attn.gate is not None:
            raise ValueError(f"vit_spec: {b!r} has gated attention, which is not supported")
        heads, width = attn.num_heads, attn.attn_dim
        _add_norm(residual, f"{b}.norm1", block.norm1)
        residual.entries.append(PermEntry(f"{b}.attn.qkv.weight", 1, "in"))
        residual.entries += _layer_entries(f"{b}.attn.proj", attn.proj)
        for scale in ("ls1", "ls2"):
            layer = getattr(block, scale)
            if isinstance(layer, LayerScale):
                residual.entries.append(PermEntry(f"{b}.{scale}.gamma", 0))
            elif not isinstance(layer, nn.Identity):
                raise ValueError(f"vit_spec: {b}.{scale} is a {type(layer).__name__}, not LayerScale/Identity")
        _add_norm(residual, f"{b}.norm2", block.norm2)
        residual.entries.append(PermEntry(f"{b}.mlp.fc1.weight", 1, "in"))
        residual.entries += _layer_entries(f"{b}.mlp.fc2", mlp.fc2)

        qkv = f"{b}.attn.qkv"
        has_bias = attn.qkv.bias is not None
        qk = [PermEntry(f"{qkv}.weight", 0, offset=o) for o in (0, width)]
        qk += [PermEntry(f"{qkv}.bias", 0, offset=o) for o in (0, width)] if has_bias else []
        tie = f"{b}.attn.heads"
        keys = ActPoint(f"{b}.attn.k_norm", "post", (1, 3))
        nodes.append(PermNode(f"{b}.attn.qk", width, tuple(qk), heads, keys, tie))
        value = _OpenNode(f"{b}.attn.v", width, [PermEntry(f"{qkv}.weight", 0, offset=2 * width)], heads)
        if has_bias:
            value.entries.append(PermEntry(f"{qkv}.bias", 0, offset=2 * width))
        _add_norm(value, f"{b}.attn.norm", attn.norm)
        value.entries.append(PermEntry(f"{b}.attn.proj.weight", 1, "in"))
        nodes.append(value.close(ActPoint(f"{b}.attn.proj", "pre", (-1,)), tie))

        hidden = _OpenNode(f"{b}.mlp", mlp.fc1.out_features, _layer_entries(f"{b}.mlp.fc1", mlp.fc1))
        _add_norm(hidden, f"{b}.mlp.norm", mlp.norm)
        hidden.entries.append(PermEntry(f"{b}.mlp.fc2.weight", 1, "in"))
        nodes.append(hidden.close(ActPoint(f"{b}.mlp.fc2", "pre", (-1,))))

    _add_norm(residual, f"{p}norm", model.norm)
    _add_norm(residual, f"{p}fc_norm", model.fc_norm)
    if isinstance(model.head, nn.Linear):
        residual.entries.append(PermEntry(f"{p}head.weight", 1, "in"))
        nodes.insert(0, residual.close(ActPoint(f"{p}head", "pre", (-1,))))
    return PermSpec(nodes)


def build_spec(model: nn.Module) -> PermSpec:
    """The spec of a supported model: timm ResNet, timm VisionTransformer, or a chain.

    Raises:
        ValueError: the model is not one of the supported families (the builder says why).
    """
    if "timm" in sys.modules:  # a timm model implies timm was imported; never import it for others
        from timm.models.resnet import ResNet
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(model, ResNet):
            return resnet_spec(model)
        if isinstance(model, VisionTransformer):
            return vit_spec(model)
    if any(isinstance(m, _CONVS) for m in model.modules()):
        return cnn_spec(model)
    return mlp_spec(model)
