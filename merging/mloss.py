"""M-Loss: how far parameter averaging is from ensembling, per layer and per node.

Wang, Duan, Chen, Wu, Lim, "M-Loss: Quantifying Model Merging Compatibility with Limited
Unlabeled Data", AAAI 2026, https://arxiv.org/abs/2602.08564 (authors' code:
https://github.com/languangduan/mLoss). Definition numbers (Def. 3.3–3.6, Lemma A.1) are the
paper's, as reconstructed in the project's M-Loss spec; §-numbers refer to that spec.

For a layer that is linear then an element-wise activation σ, with the **same** layer
input x for every expert (hooked on a reference model), expert j's pre-activation is
z_j = W_j x + b_j. Because the layer is linear, Σ_j α_j z_j is exactly the averaged
layer's pre-activation, so the merging-ensembling gap of that layer is

    g = σ(Σ_j α_j z_j) − Σ_j α_j σ(z_j)            (shape (B, P, d_out))

with B samples, P positions per sample (tokens, or output pixels of a conv) and d_out
nodes. From g:

- node M-Loss (Def. 3.4): M_i = mean over samples and positions of g_i², ``[d_out]``;
- layer M-Loss (Def. 3.3): mean over samples s of ‖g(s)‖₂ (norm over P·d_out);
- normalized layer M-Loss (Def. 3.5): mean over s of ‖g(s)‖₂ / (‖σ(Σ_j α_j z_j)(s)‖₂ + 1e-8).

The model output is measured too, under the reserved name :data:`OUTPUT`: the merged
model's output f(Σ_j α_j θ_j) against the ensemble Σ_j α_j f(θ_j), node axis = last
output dimension. It needs K + 1 full forwards, and gives a value even for models whose
activations are functional calls (no layer is then detected).

**Which layers** (generalising the authors' ``mlp.c_fc`` of CLIP ViTs): every
``nn.Linear`` / ``nn.Conv1d|2d|3d`` whose output tensor is passed *unchanged* (same tensor
object) to an element-wise activation module, found by one traced forward pass (data flow,
not module order): timm's ``Mlp.fc1 -> act``, ``nn.Sequential(Linear, ReLU)``, a conv
followed directly by ReLU. σ is that activation module, so GELU-tanh, QuickGELU, SiLU, ...
are whatever the model uses. A conv followed by BatchNorm is not measured (σ's input is
not the conv's output). Users can name layers (the activation is still traced) or pass a
``{name: σ}`` mapping.

**Which input** (``reference``, §1.8 item 1): ``"pretrained"`` hooks θ₀ (the authors'
code, and the default), ``"average"`` hooks Σ_j α_j θ_j, ``"incremental"`` hooks the
partially merged model of the paper's text (entries before the layer's weight in
state-dict order merged, the rest θ₀; one forward per layer and batch), or an explicit
reference state dict.

Cost: per batch, one forward of the reference model carries the hooks; at each measured
layer the K experts' (W, b) run as one batched GEMM/conv on the hooked input (about K of
the layer's own forward passes), whose output is used in the layout it is written in
(no transposing copy), plus the element-wise gap: σ once over all K experts and once on
the merge, and a few in-place passes. Layers only: about K + 1 forwards of the measured
layers plus one forward of the rest of the model. The output adds K + 1 forwards (fewer
when the reference model is the average or one of the experts). A meter that measures
the same batches again (:class:`MLossMeter` with ``cache_forwards``, as the monitor
does) replays the forwards of states that did not change (θ₀, a start snapshot, peers).

Numerics: everything is computed relative to the first expert (z_1 and z_j − z_1,
f_1 and f_j − f_1, using Σ_j α_j = 1), so identical experts give exactly 0 and small
gaps do not drown in cancellation error.

This module is pure maths (no Lightning): the measurement (:func:`m_loss`,
:func:`mloss_statistics`), a torchmetrics :class:`MLoss` whose states are sums and counts
(DDP over uneven shards equals the single-process value), the M-TIES helpers
(:func:`rank_scale`, :func:`robust_scale`, :func:`log_scale`, :func:`row_keep_rates`) and
the closed-form expectations of §1.4 (:func:`gauss_smoothed_act` and friends).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from merging.state import StateDictError, accumulation_dtype, check_compatible, describe, is_mergeable

OUTPUT = "output"
"""Reserved name of the model-output entry in every M-Loss result."""

NORMALIZE_EPS = 1e-8
"""ε of Def. 3.5: ‖g(s)‖₂ / (‖σ(Σ α z)(s)‖₂ + ε)."""

Activation = Callable[[Tensor], Tensor]
Reference = Literal["pretrained", "incremental", "average"]
Scale = Literal["rank", "robust", "log"]

ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
)
"""torch.nn activations treated as element-wise σ. Parameter-free modules defined in
``timm.layers.activations*`` (GELUTanh, QuickGELU, ...) are recognised too."""

_CONV_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}

PIECEWISE_LINEAR_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Threshold)
"""σ computed with exact IEEE operations only (compare, min/max, one multiply): an input gives
bitwise the same output wherever it sits in a tensor, so the gap needs no equality masks to
be exactly 0 for identical experts (see :func:`centred_gap`)."""


# ------------------------------------------------------------------ pure per-layer maths


def expert_preactivations(x: Tensor, weight: Tensor, bias: Tensor | None, layer: nn.Module | None = None) -> Tensor:
    """z_j = W_j x + b_j for K stacked weights on one shared input, as one GEMM / conv.

    Args:
        x: the layer input. Linear: ``(B, ..., d_in)``; ConvNd: ``(B, C_in, *spatial)``.
        weight: W stacked on dim 0. Linear: ``(K, d_out, d_in)``; ConvNd:
            ``(K, C_out, C_in / groups, *kernel)``.
        bias: ``(K, d_out)`` or None.
        layer: the ``nn.ConvNd`` whose stride/padding/dilation/groups apply; None (or an
            ``nn.Linear``) for a linear layer.

    Returns:
        ``(K, B, P, d_out)``: P positions per sample (tokens, or output pixels); a view of
        the GEMM/conv output (not contiguous).

    Raises:
        ValueError: the input has no batch axis, or the conv pads with a mode other than zeros.
    """
    num, d_out = weight.shape[:2]
    batch = x.shape[0] if x.dim() else 0
    z, channels_first = _grouped_preactivations(x, weight, bias, layer)
    if not channels_first:
        return z.view(batch, -1, num, d_out).permute(2, 0, 1, 3)
    groups = z.shape[0] // batch
    return z.view(batch, groups, num, d_out // groups, -1).permute(2, 0, 4, 1, 3).reshape(num, batch, -1, d_out)


def _grouped_preactivations(
    x: Tensor, weight: Tensor, bias: Tensor | None, layer: nn.Module | None
) -> tuple[Tensor, bool]:
    """The K experts' pre-activations in the layout one GEMM / conv writes them, no copy.

    Returns:
        ``(z, channels_first)`` with z of shape ``(M, K, D)``. Linear: M = B·P, D = d_out
        (``channels_first`` False: per sample ``(P, d_out)``). ConvNd with G groups: M = B·G,
        D = (d_out/G)·P (``channels_first`` True: per sample ``(d_out, P)``).
    """
    if x.dim() < 2:
        raise ValueError(f"M-Loss layer input must be batched (B, ..., d_in), got shape {tuple(x.shape)}")
    num, d_out = weight.shape[:2]
    if layer is None or isinstance(layer, nn.Linear):
        flat_bias = None if bias is None else bias.reshape(num * d_out)
        z = F.linear(x.reshape(-1, x.shape[-1]), weight.reshape(num * d_out, -1), flat_bias)
        return z.view(-1, num, d_out), False
    conv = _conv_function(layer)
    if layer.padding_mode != "zeros":
        raise ValueError(f"M-Loss supports zero-padded convs only; this conv pads with {layer.padding_mode!r}")
    groups = layer.groups
    per_group = d_out // groups
    kernel = weight.shape[2:]
    # Stack the K experts inside each group, so one grouped conv computes all of them.
    w = weight.reshape(num, groups, per_group, *kernel).transpose(0, 1).reshape(groups * num * per_group, *kernel)
    b = None if bias is None else bias.reshape(num, groups, per_group).transpose(0, 1).reshape(-1)
    z = conv(x, w, b, layer.stride, layer.padding, layer.dilation, groups).contiguous()
    return z.view(x.shape[0] * groups, num, -1), True


def _conv_function(layer: nn.Module) -> Callable[..., Tensor]:
    for cls, fn in _CONV_FUNCTIONS.items():
        if isinstance(layer, cls):
            return fn
    raise ValueError(f"M-Loss measures nn.Linear and nn.Conv1d/2d/3d layers, not {type(layer).__name__}")


def _is_piecewise_linear(act: Activation) -> bool:
    return isinstance(act, PIECEWISE_LINEAR_ACTIVATIONS) or any(act is f for f in (F.relu, torch.relu))


def centred_gap(z: Tensor, alpha: Tensor, act: Activation) -> tuple[Tensor, Tensor]:
    """The merging-ensembling gap from an anchor pre-activation and expert deltas.

    With z_1 = ``z[0]`` and δ_j = z_j − z_1 = ``z[j - 1]`` for j ≥ 2 (Σ_j α_j = 1):
    merged = σ(z_1 + Σ_{j≥2} α_j δ_j), ensembled = σ(z_1) + Σ_{j≥2} α_j (σ(z_1 + δ_j) − σ(z_1)).
    Identical experts (δ = 0) therefore give exactly 0, and so does every entry where all
    δ_j = 0: for σ other than :data:`PIECEWISE_LINEAR_ACTIVATIONS`, whose vectorised kernels
    may round the same input differently in different positions of a tensor,
    σ(z_1 + δ_j) − σ(z_1) is taken as 0 where δ_j = 0 and σ(merged) as σ(z_1) where every
    δ_j = 0. ``z`` is not modified; ``act`` may work in place if it says so with an
    ``inplace`` attribute, as ``torch.nn`` activations do.

    Args:
        z: ``(K, ...)``: the anchor z_1, then the K − 1 deltas.
        alpha: α ``(K,)``, summing to 1.
        act: σ, element-wise.

    Returns:
        ``(gap, merged)``, each ``z.shape[1:]``: σ(Σ α z) − Σ α σ(z), and σ(Σ α z).
    """
    owned = z.reshape(1, z.shape[0], -1).clone(memory_format=torch.contiguous_format)
    gap, merged = _centred_gap_(owned, alpha.tolist(), act)
    return gap.view(z.shape[1:]), merged.view(z.shape[1:])


def _centred_gap_(z: Tensor, alpha: Sequence[float], act: Activation) -> tuple[Tensor, Tensor]:
    """:func:`centred_gap` on ``z`` of shape ``(M, K, D)`` (anchor ``z[:, 0]``, deltas
    ``z[:, 1:]``), consuming ``z``: it ends up holding σ of every expert. A few passes over
    the K·M·D values, with σ evaluated once over all experts and once on the merge; the
    weighted sums over experts are in-place ``add_`` passes (no copy of the layout).

    Returns:
        ``(gap, merged)``, each ``(M, D)`` and contiguous.
    """
    num = z.shape[1]
    anchor = z[:, 0]
    if num == 1:
        merged = act(anchor.contiguous())
        return torch.zeros_like(merged), merged
    deltas = z[:, 1:]
    merged_pre = torch.add(anchor, z[:, 1], alpha=alpha[1])
    for j in range(2, num):
        merged_pre.add_(z[:, j], alpha=alpha[j])
    # Where δ_j = 0, σ(z_1 + δ_j) must equal σ(z_1) bitwise; a σ that is not piecewise
    # linear may round equal inputs differently in different positions, so those entries
    # are masked (found before an in-place σ overwrites z). Experts that differ everywhere,
    # the usual case, skip the masks after one counting pass.
    agree = None
    if not _is_piecewise_linear(act) and int(torch.count_nonzero(deltas)) < deltas.numel():
        agree = deltas == 0
    merged_is_anchor = None if agree is None else agree.all(dim=1)
    deltas += anchor.unsqueeze(1)  # z_j = z_1 + δ_j
    out = act(z)
    anchor_out = out[:, 0]
    spread = out[:, 1:]
    spread -= anchor_out.unsqueeze(1)  # σ(z_j) − σ(z_1)
    if agree is not None:
        spread.masked_fill_(agree, 0.0)
    ensembled = torch.add(anchor_out, spread[:, 0], alpha=alpha[1])
    for j in range(2, num):
        ensembled.add_(spread[:, j - 1], alpha=alpha[j])
    merged = act(merged_pre)
    if merged_is_anchor is not None:
        merged = torch.where(merged_is_anchor, anchor_out, merged)
    return torch.sub(merged, ensembled, out=ensembled), merged


def _anchored(stacked: Tensor) -> Tensor:
    """``[x_1, x_2 − x_1, ..., x_K − x_1]`` of a ``(K, ...)`` stack."""
    return torch.cat([stacked[:1], stacked[1:] - stacked[:1]])


def _per_sample(t: Tensor, batch: int, d_out: int, channels_first: bool) -> Tensor:
    """``(M, D)`` from :func:`_grouped_preactivations`' layout as ``(B, d_out, P)`` or ``(B, P, d_out)``."""
    return t.view(batch, d_out, -1) if channels_first else t.view(batch, -1, d_out)


def layer_gap(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    alpha: Tensor,
    act: Activation,
    layer: nn.Module | None = None,
) -> tuple[Tensor, Tensor]:
    """g = σ(Σ_j α_j z_j) − Σ_j α_j σ(z_j) of one layer on one shared input.

    Args:
        x: layer input (see :func:`expert_preactivations`).
        weight: W_1..W_K stacked, ``(K, d_out, d_in)`` or ``(K, C_out, C_in/groups, *kernel)``.
        bias: b_1..b_K, ``(K, d_out)``, or None.
        alpha: α ``(K,)`` summing to 1.
        act: σ.
        layer: the conv module for conv layers (None for linear).

    Returns:
        ``(gap, merged)``, each ``(B, P, d_out)`` (for convs a transposed view).
    """
    dtype = accumulation_dtype(x.dtype)
    d_out = weight.shape[1]
    z, channels_first = _grouped_preactivations(
        x.to(dtype),
        _anchored(weight.to(dtype)),
        None if bias is None else _anchored(bias.to(dtype)),
        layer,
    )
    gap, merged = _centred_gap_(z, alpha.tolist(), act)
    gap, merged = (_per_sample(t, x.shape[0], d_out, channels_first) for t in (gap, merged))
    return (gap.transpose(1, 2), merged.transpose(1, 2)) if channels_first else (gap, merged)


def node_mloss(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    alpha: Tensor,
    act: Activation,
    layer: nn.Module | None = None,
) -> Tensor:
    """Node M-Loss (Def. 3.4): M_i = mean over samples and positions of g_i².

    Squared, not rooted, as in the authors' ``compute_llfc_loss_by_row``.

    Args: as :func:`layer_gap`.

    Returns:
        ``(d_out,)``.
    """
    gap, _ = layer_gap(x, weight, bias, alpha, act, layer)
    return gap.square().mean(dim=(0, 1))


def layer_mloss(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    alpha: Tensor,
    act: Activation,
    normalize: bool = False,
    layer: nn.Module | None = None,
) -> Tensor:
    """Per-sample layer M-Loss (Def. 3.3; Def. 3.5 when ``normalize``).

    Args:
        normalize: divide ‖g(s)‖₂ by ‖σ(Σ_j α_j z_j)(s)‖₂ + 1e-8.
        Others: as :func:`layer_gap`.

    Returns:
        ``(B,)``: ‖g(s)‖₂ over the P·d_out values of each sample s (the layer M-Loss is
        its mean).
    """
    gap, merged = layer_gap(x, weight, bias, alpha, act, layer)
    norms = gap.square().sum(dim=(1, 2)).sqrt()
    if normalize:
        norms = norms / (merged.square().sum(dim=(1, 2)).sqrt() + NORMALIZE_EPS)
    return norms


# ------------------------------------------------------------- statistics and the report


@dataclass
class MLossStatistics:
    """Sufficient statistics of one layer's M-Loss over some samples (all sums).

    Attributes:
        node_sum: Σ over samples and positions of g_i², ``(d_out,)``.
        positions: number of (sample, position) pairs summed in ``node_sum``.
        norm_sum: Σ over samples of ‖g(s)‖₂ (0-d tensor).
        normalized_sum: Σ over samples of ‖g(s)‖₂ / (‖σ(Σ α z)(s)‖₂ + 1e-8) (0-d tensor).
        samples: number of samples.
    """

    node_sum: Tensor
    positions: int
    norm_sum: Tensor
    normalized_sum: Tensor
    samples: int

    @classmethod
    def from_gap(cls, gap: Tensor, merged: Tensor, *, channels_first: bool = False) -> MLossStatistics:
        """Statistics of a gap and the merged activation it normalizes by.

        Args:
            gap: g, ``(B, P, d)`` (``(B, d, P)`` when ``channels_first``).
            merged: σ(Σ_j α_j z_j), the same shape.
            channels_first: the node axis is dim 1 (conv layouts) instead of dim 2.
        """
        per_node = gap.square().sum(dim=2 if channels_first else 1)  # (B, d): one pass over the gap
        norms = per_node.sum(dim=1).sqrt()
        scale = torch.linalg.vector_norm(merged.reshape(merged.shape[0], -1), dim=1) + NORMALIZE_EPS
        return cls(
            node_sum=per_node.sum(dim=0),
            positions=gap.numel() // per_node.numel() * gap.shape[0],
            norm_sum=norms.sum(),
            normalized_sum=(norms / scale).sum(),
            samples=gap.shape[0],
        )

    def __add__(self, other: MLossStatistics) -> MLossStatistics:
        if self.node_sum.shape != other.node_sum.shape:
            raise ValueError(
                f"cannot add M-Loss statistics of {self.node_sum.numel()} and {other.node_sum.numel()} nodes"
            )
        return MLossStatistics(
            node_sum=self.node_sum + other.node_sum,
            positions=self.positions + other.positions,
            norm_sum=self.norm_sum + other.norm_sum,
            normalized_sum=self.normalized_sum + other.normalized_sum,
            samples=self.samples + other.samples,
        )


@dataclass
class MLossReport:
    """M-Loss of K experts, per measured layer (and :data:`OUTPUT` for the model output).

    Attributes:
        node: node M-Loss ``[d_out]`` per layer (Def. 3.4: squared gap, mean over samples
            and positions).
        layer: layer M-Loss per layer (Def. 3.3: mean over samples of ‖g(s)‖₂).
        layer_normalized: normalized layer M-Loss per layer (Def. 3.5).
        samples: number of samples each layer was measured on.
    """

    node: dict[str, Tensor]
    layer: dict[str, float]
    layer_normalized: dict[str, float]
    samples: dict[str, int]

    @property
    def mean(self) -> float:
        """Mean layer M-Loss over the measured hidden layers; the output's when none is."""
        hidden = [v for k, v in self.layer.items() if k != OUTPUT]
        values = hidden or list(self.layer.values())
        return sum(values) / len(values) if values else math.nan

    def scalars(self, prefix: str = "mloss") -> dict[str, float]:
        """Flat ``{key: value}`` for loggers: ``<prefix>/layer/<name>``,
        ``<prefix>/normalized/<name>`` and ``<prefix>/mean``."""
        out = {f"{prefix}/layer/{k}": v for k, v in self.layer.items()}
        out.update({f"{prefix}/normalized/{k}": v for k, v in self.layer_normalized.items()})
        out[f"{prefix}/mean"] = self.mean
        return out


def mloss_report(statistics: Mapping[str, MLossStatistics]) -> MLossReport:
    """Turn summed statistics into M-Loss values (layers without samples are left out)."""
    node: dict[str, Tensor] = {}
    layer: dict[str, float] = {}
    normalized: dict[str, float] = {}
    samples: dict[str, int] = {}
    for name, s in statistics.items():
        if s.samples == 0:
            continue
        node[name] = s.node_sum / s.positions
        layer[name] = float(s.norm_sum) / s.samples
        normalized[name] = float(s.normalized_sum) / s.samples
        samples[name] = s.samples
    return MLossReport(node=node, layer=layer, layer_normalized=normalized, samples=samples)


# ------------------------------------------------------------------------ layer discovery


def is_elementwise_activation(module: nn.Module, extra_types: Sequence[type[nn.Module]] = ()) -> bool:
    """Whether ``module`` is a parameter-free element-wise activation σ.

    True for :data:`ELEMENTWISE_ACTIVATIONS`, parameter-free modules defined in
    ``timm.layers.activations*``, and instances of ``extra_types``.
    """
    if isinstance(module, tuple(extra_types)):
        return True
    if next(module.parameters(recurse=False), None) is not None:
        return False
    if isinstance(module, ELEMENTWISE_ACTIVATIONS):
        return True
    return type(module).__module__.startswith("timm.layers.activations")


def _measurable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


@dataclass
class _Trace:
    activations: dict[str, nn.Module]
    calls: dict[str, int]
    output: Any


def _trace(
    model: nn.Module,
    state: Mapping[str, Tensor] | None,
    args: tuple,
    activation_types: Sequence[type[nn.Module]],
) -> _Trace:
    """One forward recording which Linear/Conv output feeds an activation module unchanged."""
    layer_names = {m: n for n, m in model.named_modules() if _measurable(m)}
    produced: dict[int, tuple[str, Tensor]] = {}
    found: dict[str, nn.Module] = {}
    calls: dict[str, int] = {}

    def on_layer(module: nn.Module, inputs: tuple, output: Any) -> None:
        name = layer_names[module]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(output, Tensor):
            produced[id(output)] = (name, output)

    def on_activation(module: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], Tensor):
            hit = produced.get(id(inputs[0]))
            if hit is not None and hit[1] is inputs[0]:
                found.setdefault(hit[0], module)

    handles = [m.register_forward_hook(on_layer) for m in layer_names]
    handles += [
        m.register_forward_pre_hook(on_activation)
        for m in model.modules()
        if is_elementwise_activation(m, activation_types)
    ]
    try:
        with torch.no_grad(), _eval_mode(model):
            output = _forward(model, state, args)
    finally:
        for h in handles:
            h.remove()
    order = {name: i for i, name in enumerate(n for n, _ in model.named_modules())}
    return _Trace(dict(sorted(found.items(), key=lambda kv: order[kv[0]])), calls, output)


def find_activation_layers(
    model: nn.Module, *args: Any, activation_types: Sequence[type[nn.Module]] = ()
) -> dict[str, nn.Module]:
    """The layers M-Loss measures by default, with their activation σ.

    Rule: an ``nn.Linear`` / ``nn.Conv1d|2d|3d`` is measured when, in one traced forward
    pass of ``model(*args)`` (eval mode, no grad), its output tensor is passed unchanged
    (the same tensor object) to an element-wise activation module
    (:func:`is_elementwise_activation`). Functional activations (``F.relu`` in
    ``forward``) and anything between the layer and σ (BatchNorm, a reshape) exclude it.

    Args:
        model: the network.
        *args: one batch of its forward's positional arguments.
        activation_types: extra module classes to treat as element-wise activations.

    Returns:
        ``{layer name: σ module}`` in ``model.named_modules()`` order.
    """
    return _trace(model, None, args, activation_types).activations


# ------------------------------------------------------------------------ the measurement


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (dropout off, BatchNorm running stats untouched), then
    restore every submodule's own train/eval flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _forward(model: nn.Module, state: Mapping[str, Tensor] | None, args: tuple) -> Any:
    if state is None:
        return model(*args)
    # strict=False: non-persistent buffers are absent from state dicts; keys were checked.
    return functional_call(model, dict(state), args)


def as_forward_args(batch: Any) -> tuple:
    """A batch as forward's positional arguments: a Tensor -> ``(batch,)``; a tuple/list -> itself.

    Raises:
        TypeError: any other batch type (select the inputs first, e.g. with an ``input_fn``).
    """
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise TypeError(
        f"an M-Loss input batch must be a Tensor or a tuple of forward's positional arguments, "
        f"got {type(batch).__name__}"
    )


def _to_device(args: tuple, device: torch.device) -> tuple:
    return tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)


class _StopForward(Exception):
    """Raised by a hook once every probed layer was measured and the output is not needed."""


class _LayerProbe:
    """One measured layer: σ, and the K experts' (W, b) in anchored form once loaded."""

    def __init__(self, name: str, module: nn.Module, act: Activation, calls: int) -> None:
        self.name = name
        self.module = module
        self.act = act
        self.calls = max(calls, 1)
        self.d_out = module.out_channels if not isinstance(module, nn.Linear) else module.out_features
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.alpha: list[float] = []
        self.statistics: MLossStatistics | None = None
        self.seen = 0

    def load(self, experts: Sequence[Mapping[str, Tensor]], alpha: Tensor) -> None:
        """Stack [W_1, W_2 − W_1, ...] (and b) once; one batched GEMM/conv then gives every z_j."""
        first = experts[0][f"{self.name}.weight"]
        dtype = accumulation_dtype(first.dtype)
        self.weight = _anchored(torch.stack([e[f"{self.name}.weight"] for e in experts]).to(dtype))
        bias_key = f"{self.name}.bias"
        has_bias = self.module.bias is not None and bias_key in experts[0]
        self.bias = _anchored(torch.stack([e[bias_key] for e in experts]).to(dtype)) if has_bias else None
        self.alpha = alpha.tolist()

    def release(self) -> None:
        self.weight = self.bias = None

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        z, channels_first = _grouped_preactivations(x.to(self.weight.dtype), self.weight, self.bias, module)
        gap, merged = _centred_gap_(z, self.alpha, self.act)
        gap, merged = (_per_sample(t, x.shape[0], self.d_out, channels_first) for t in (gap, merged))
        stats = MLossStatistics.from_gap(gap, merged, channels_first=channels_first)
        self.statistics = stats if self.statistics is None else self.statistics + stats
        self.seen += 1


def _run_probes(
    model: nn.Module,
    state: Mapping[str, Tensor],
    args: tuple,
    probes: Sequence[_LayerProbe],
    need_output: bool,
    record: dict[str, list[Tensor]] | None = None,
) -> Any:
    """One forward with ``state``; ``probes`` measure their layer's input as it passes.

    Stops the forward early (returning None) once every probe fired its traced number of
    calls, unless ``need_output``. ``record`` collects a copy of each probed layer's inputs.
    """

    def make_hook(probe: _LayerProbe) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, inputs: tuple) -> None:
            if record is not None:
                # A copy: a later in-place operation of the forward must not change it.
                record.setdefault(probe.name, []).append(inputs[0].clone())
            probe(module, inputs)
            if not need_output and all(p.seen >= p.calls for p in probes):
                raise _StopForward

        return hook

    for p in probes:
        p.seen = 0
    handles = [p.module.register_forward_pre_hook(make_hook(p)) for p in probes]
    try:
        return _forward(model, state, args)
    except _StopForward:
        return None
    finally:
        for h in handles:
            h.remove()


@dataclass
class _Forward:
    """What one forward of one state on one batch produced, kept by a caching meter: the
    probed layers' inputs and, if it was computed, the output. ``tensors`` holds the state's
    tensors, so that their storage (part of the cache key) cannot be reused meanwhile."""

    tensors: list[Tensor]
    inputs: dict[str, list[Tensor]]
    output: Any = None
    has_output: bool = False


def _state_key(state: Mapping[str, Tensor]) -> tuple | None:
    """Identity and version of every tensor of a state: an in-place update (an optimizer step,
    ``load_state_dict``) or a new tensor changes it. None for tensors without a version counter
    (inference tensors), which are never cached."""
    try:
        return tuple((t.data_ptr(), t._version) for t in state.values())
    except RuntimeError:
        return None


def capture_layer_input(
    model: nn.Module, layer: str, batch: Any, state: Mapping[str, Tensor] | None = None
) -> Tensor:
    """The input of ``layer`` when ``model`` (with ``state`` substituted) runs on ``batch``.

    Eval mode, no grad; the forward stops right after the layer's first call.

    Args:
        model: the network.
        layer: a module name (``model.named_modules()``).
        batch: a Tensor or a tuple of forward's positional arguments.
        state: parameters/buffers to evaluate with (the reference θ₀, a merge, ...);
            None: the model's own.

    Returns:
        The layer's first positional input, e.g. ``(B, T, d_in)`` for a token MLP.

    Raises:
        ValueError: no such module, or the forward never reached it.
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"capture_layer_input: no module named {layer!r}")
    captured: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple) -> None:
        captured.append(inputs[0].detach())
        raise _StopForward

    handle = modules[layer].register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), _eval_mode(model):
            _forward(model, state, as_forward_args(batch))
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"capture_layer_input: the forward pass never reached {layer!r}")
    return captured[0]


def _output_view(output: Any) -> Tensor:
    """The model output as ``(B, P, d)``: node axis = last dimension."""
    if not isinstance(output, Tensor) or not output.is_floating_point():
        raise ValueError(
            f"M-Loss of the model output needs a floating Tensor output, got {type(output).__name__}; "
            "pass output=False to measure the layers only"
        )
    if output.dim() == 0:
        raise ValueError("M-Loss of the model output needs a batched output (B, ...), got a scalar")
    if output.dim() == 1:
        return output.reshape(-1, 1, 1)
    return output.reshape(output.shape[0], -1, output.shape[-1])


def merge_weights(weights: Sequence[float] | Tensor | None, num_experts: int) -> Tensor:
    """α: uniform 1/K, or the given weights checked to be K finite values summing to 1.

    α is configuration read as Python scalars (``alpha.tolist()``), so it is kept on the CPU
    whatever the experts' device: no device-to-host copy each time it is read.

    Raises:
        ValueError: wrong length, non-finite values, or a sum other than 1 (the merged
            model is then not an affine combination, and identical experts would not give 0).
    """
    if weights is None:
        return torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64, device="cpu")
    alpha = torch.as_tensor(weights, dtype=torch.float64, device="cpu").flatten()
    if alpha.numel() != num_experts:
        raise ValueError(f"M-Loss: {alpha.numel()} merge weights given for {num_experts} experts")
    if not bool(torch.isfinite(alpha).all()):
        raise ValueError(f"M-Loss: merge weights must be finite, got {alpha.tolist()}")
    if abs(float(alpha.sum()) - 1.0) > 1e-6:
        raise ValueError(f"M-Loss: merge weights must sum to 1, got {alpha.tolist()} (sum {float(alpha.sum())})")
    return alpha


def weighted_average(experts: Sequence[Mapping[str, Tensor]], alpha: Tensor) -> dict[str, Tensor]:
    """θ̄ = θ_1 + Σ_{j≥2} α_j (θ_j − θ_1) (= Σ_j α_j θ_j when Σ α = 1); non-float entries from θ_1.

    Args:
        experts: θ_1..θ_K.
        alpha: α ``(K,)``.
    """
    out: dict[str, Tensor] = {}
    for key, first in experts[0].items():
        if not is_mergeable(first) or len(experts) == 1:
            out[key] = first
            continue
        dtype = accumulation_dtype(first.dtype)
        anchor = first.to(dtype)
        total = anchor.clone()
        for a, e in zip(alpha[1:].tolist(), experts[1:]):
            total.add_(e[key].to(dtype) - anchor, alpha=a)
        out[key] = total.to(first.dtype)
    return out


def partial_merge(base: Mapping[str, Tensor], merged: Mapping[str, Tensor], upto: str) -> dict[str, Tensor]:
    """The incremental reference of a layer: θ₀ with every entry before ``upto`` (state-dict
    order) taken from ``merged``.

    Args:
        base: θ₀.
        merged: the (partially) merged state; only entries before ``upto`` are read.
        upto: the layer's weight key.
    """
    if upto not in base:
        raise StateDictError(f"partial_merge: key {upto!r} is not in the base state dict")
    out: dict[str, Tensor] = {}
    before = True
    for key, value in base.items():
        before = before and key != upto
        out[key] = merged[key] if before else value
    return out


def check_state_keys(model: nn.Module, state: Mapping[str, Tensor], owner: str) -> None:
    """Check that ``state`` has exactly ``model.state_dict()``'s keys and shapes.

    Raises:
        StateDictError: naming the missing/unexpected keys or the first mismatched shape.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        raise StateDictError(f"{owner} is not keyed like model.state_dict(): " + "; ".join(parts))
    for key, ref in expected.items():
        if state[key].shape != ref.shape:
            raise StateDictError(
                f"{owner}: key {key!r} has shape {tuple(state[key].shape)}, the model has {tuple(ref.shape)}"
            )


def _resolve_layers(
    model: nn.Module,
    layers: Sequence[str] | Mapping[str, Activation] | None,
    trace: _Trace,
) -> dict[str, Activation]:
    if layers is None:
        return dict(trace.activations)
    if isinstance(layers, str):
        raise TypeError(f"M-Loss layers must be a list of names or a mapping, not the string {layers!r}")
    modules = dict(model.named_modules())
    given = layers.items() if isinstance(layers, Mapping) else ((name, None) for name in layers)
    resolved: dict[str, Activation] = {}
    for name, act in given:
        if name == OUTPUT:
            raise ValueError(f"{OUTPUT!r} is reserved for the model output; it cannot name a layer")
        module = modules.get(name)
        if module is None or not _measurable(module):
            known = [n for n, m in modules.items() if _measurable(m)]
            what = "no such module" if module is None else f"a {type(module).__name__}"
            raise ValueError(
                f"M-Loss layer {name!r}: {what}; layers are nn.Linear/nn.Conv modules, e.g. {known[:6]}"
            )
        if act is None:
            act = trace.activations.get(name)
            if act is None:
                raise ValueError(
                    f"M-Loss layer {name!r}: its output does not feed an element-wise activation module "
                    "directly; pass layers as a mapping {name: activation} to say which σ applies"
                )
        resolved[name] = act
    return resolved


class MLossMeter:
    """Measures the M-Loss statistics of K experts batch by batch.

    The layers are traced once (on ``example``); :meth:`set_experts` swaps in new weights
    (a callback measuring live experts during training), :meth:`measure` returns one
    batch's :class:`MLossStatistics`. :func:`m_loss` is the one-shot form; the arguments
    are documented there.

    Args:
        model: the ``nn.Module`` skeleton.
        experts: θ_1..θ_K keyed like ``model.state_dict()``.
        example: one input batch (Tensor or tuple of forward's positional arguments).
        base, layers, weights, reference, merged, output, activation_types, check_values:
            as in :func:`m_loss`.
        cache_forwards: for batches measured again (a monitor measuring the same cached
            inputs at every step): keep, per batch object, the probed layers' inputs of the
            reference forward and the model outputs of every forward it needed, and reuse
            them while the state they came from is unchanged. A state counts as unchanged
            while its tensors are the same (same storage) and have not been modified in
            place (the tensors' version counters: an optimizer step or ``load_state_dict``
            changes them; a write through ``.data`` would not be seen). θ₀ and fixed peers
            are then evaluated once per batch instead of at every measurement. Memory: the
            measured layers' inputs (a copy) and the outputs of every batch measured.
    """

    def __init__(
        self,
        model: nn.Module,
        experts: Sequence[Mapping[str, Tensor]],
        example: Any,
        *,
        base: Mapping[str, Tensor] | None = None,
        layers: Sequence[str] | Mapping[str, Activation] | None = None,
        weights: Sequence[float] | Tensor | None = None,
        reference: Reference | Mapping[str, Tensor] = "pretrained",
        merged: Mapping[str, Tensor] | None = None,
        output: bool = True,
        activation_types: Sequence[type[nn.Module]] = (),
        check_values: bool = True,
        cache_forwards: bool = False,
    ) -> None:
        if isinstance(reference, str) and reference not in ("pretrained", "incremental", "average"):
            raise ValueError(
                f"M-Loss reference must be 'pretrained', 'incremental', 'average' or a state dict, got {reference!r}"
            )
        if not isinstance(reference, (str, Mapping)):
            raise TypeError(f"M-Loss reference must be a string or a state dict, got {type(reference).__name__}")
        if isinstance(reference, Mapping):
            check_state_keys(model, reference, "reference state dict")
        self.model = model
        self.reference = reference
        self.output = output
        self.cache_forwards = cache_forwards
        self._cache: dict[int, tuple[Any, dict[tuple, _Forward]]] = {}
        self._num_experts = len(experts)
        self._alpha = merge_weights(weights, max(len(experts), 1))
        self.set_experts(experts, base, merged=merged, check_values=check_values)
        trace = _trace(model, self._experts[0], self._args(example), activation_types)
        modules = dict(model.named_modules())
        self._probes = {
            name: _LayerProbe(name, modules[name], act, trace.calls.get(name, 1))
            for name, act in _resolve_layers(model, layers, trace).items()
        }
        if output and OUTPUT in self._probes:
            raise ValueError(
                f"M-Loss: the model has a measured layer named {OUTPUT!r}, the name reserved for the model "
                "output; pass output=False or choose the layers explicitly"
            )
        self._output_size = _output_view(trace.output).shape[-1] if output else None

    @property
    def layer_names(self) -> list[str]:
        """The measured layers, in module order (without :data:`OUTPUT`)."""
        return list(self._probes)

    @property
    def node_sizes(self) -> dict[str, int]:
        """``{name: number of nodes}`` of every entry a measurement may return (for :class:`MLoss`)."""
        sizes = {name: p.d_out for name, p in self._probes.items()}
        if self._output_size is not None:
            sizes[OUTPUT] = self._output_size
        return sizes

    def set_experts(
        self,
        experts: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None = None,
        *,
        merged: Mapping[str, Tensor] | None = None,
        check_values: bool = True,
    ) -> None:
        """Use new expert (and base) weights from now on; the layers stay as traced.

        Raises:
            ValueError: a different number of experts, incompatible state dicts, or a
                reference that needs ``base`` without one.
        """
        experts = list(experts)
        if not experts:
            raise ValueError("M-Loss needs at least one expert state dict")
        if len(experts) != self._num_experts:
            raise ValueError(f"M-Loss meter was built for {self._num_experts} experts, got {len(experts)}")
        check_compatible(experts, base, check_values=check_values)
        for j, expert in enumerate(experts):
            check_state_keys(self.model, expert, describe(expert, f"expert {j}"))
        if self.reference in ("pretrained", "incremental") and base is None:
            raise ValueError(
                f"M-Loss reference={self.reference!r} needs base (the pretrained state dict θ₀); "
                "pass base=..., or reference='average'"
            )
        if merged is not None:
            if self.reference != "incremental":
                raise ValueError(
                    "M-Loss: `merged` is the incremental reference's merge; it needs reference='incremental'"
                )
            check_state_keys(self.model, merged, "merged state dict")
        self._experts = experts
        self._base = base
        self._merged = merged
        self._device = next((v.device for v in experts[0].values()), torch.device("cpu"))
        needs_average = (
            self.output or self.reference == "average" or (self.reference == "incremental" and merged is None)
        )
        self._average = weighted_average(experts, self._alpha) if needs_average else None
        for probe in getattr(self, "_probes", {}).values():
            probe.release()

    def _args(self, batch: Any) -> tuple:
        return _to_device(as_forward_args(batch), self._device)

    def measure(
        self,
        batch: Any,
        *,
        layers: Sequence[str] | None = None,
        reference: Mapping[str, Tensor] | None = None,
    ) -> dict[str, MLossStatistics]:
        """M-Loss statistics of one batch.

        Args:
            batch: a Tensor or a tuple of forward's positional arguments.
            layers: measure only these (names from :attr:`node_sizes`, :data:`OUTPUT`
                included); None: all.
            reference: a reference state dict for this call (M-TIES's incremental merge).

        Returns:
            ``{name: statistics}`` of the measured layers (then :data:`OUTPUT`).
        """
        if layers is None:
            probes = list(self._probes.values())
            measure_output = self.output
        else:
            unknown = [n for n in layers if n not in self._probes and not (n == OUTPUT and self.output)]
            if unknown:
                raise ValueError(f"M-Loss: not measured by this meter: {unknown}; measured: {list(self.node_sizes)}")
            probes = [self._probes[n] for n in layers if n != OUTPUT]
            measure_output = OUTPUT in layers
        for p in probes:
            p.statistics = None
            if p.weight is None:
                p.load(self._experts, self._alpha)
        ref = self.reference if reference is None else reference
        if isinstance(ref, Mapping):
            plan = [(ref, probes)]
        elif ref == "pretrained":
            plan = [(self._base, probes)]
        elif ref == "average":
            plan = [(self._average, probes)]
        else:
            source = self._merged if self._merged is not None else self._average
            plan = [(partial_merge(self._base, source, f"{p.name}.weight"), [p]) for p in probes]
        output_from_plan = measure_output and isinstance(ref, str) and ref == "average"
        expert_from_plan = None
        if measure_output and not output_from_plan and len(plan) == 1:
            # θ₀ may be one of the experts (a model against its own start): reuse that forward.
            expert_from_plan = next((j for j, e in enumerate(self._experts) if e is plan[0][0]), None)
        args = self._args(batch)
        previous = self._cache.get(id(batch), (None, {}))
        cached = previous[1] if previous[0] is batch else {}
        # The forwards this call uses, kept for the next call on this batch (None: no cache).
        kept: dict[tuple, _Forward] | None = {} if self.cache_forwards else None
        merged_out = None
        known: dict[int, Any] = {}
        with torch.no_grad(), _eval_mode(self.model):
            for state, group in plan:
                keep = output_from_plan or expert_from_plan is not None
                if group or keep:
                    result = self._probe_forward(state, args, group, keep, cached, kept)
                    if output_from_plan:
                        merged_out = result
                    elif expert_from_plan is not None:
                        known[expert_from_plan] = result
            statistics = {p.name: p.statistics for p in probes if p.statistics is not None}
            if measure_output:
                if merged_out is None:
                    merged_out = _forward(self.model, self._average, args)
                for j, expert in enumerate(self._experts):
                    if j not in known:
                        known[j] = self._probe_forward(expert, args, [], True, cached, kept)
                statistics[OUTPUT] = self._output_statistics(merged_out, known)
        if kept is not None:
            self._cache[id(batch)] = (batch, kept)
        if layers is not None:
            for p in probes:
                p.release()
        return statistics

    def _probe_forward(
        self,
        state: Mapping[str, Tensor],
        args: tuple,
        probes: Sequence[_LayerProbe],
        need_output: bool,
        cached: Mapping[tuple, _Forward],
        kept: dict[tuple, _Forward] | None,
    ) -> Any:
        """A forward of ``state`` on which ``probes`` measure, or its cached replay: the probes
        then run on the recorded layer inputs (the same computation) and the recorded output
        is returned. ``kept`` (None: no caching) receives what this call used or recorded."""
        key = _state_key(state) if kept is not None else None
        if key is not None:
            hit = kept.get(key) or cached.get(key)
            if hit is not None and all(p.name in hit.inputs for p in probes) and (hit.has_output or not need_output):
                for p in probes:
                    p.seen = 0
                    for x in hit.inputs[p.name]:
                        p(p.module, (x,))
                kept[key] = hit
                return hit.output
        record: dict[str, list[Tensor]] | None = {} if key is not None else None
        result = _run_probes(self.model, state, args, probes, need_output, record)
        if key is not None:
            kept[key] = _Forward(list(state.values()), record, result if need_output else None, need_output)
        return result

    def _output_statistics(self, merged_out: Any, known: Mapping[int, Any]) -> MLossStatistics:
        """f(θ̄) against f_1 + Σ_{j≥2} α_j (f_j − f_1), the ensemble (``known``: the outputs f_j)."""
        outs = [_output_view(known[j]) for j in range(len(self._experts))]
        dtype = accumulation_dtype(outs[0].dtype)
        stacked = _anchored(torch.stack(outs).to(dtype))
        rest = self._alpha[1:].to(device=stacked.device, dtype=dtype)
        ensembled = stacked[0] + torch.tensordot(rest, stacked[1:], dims=1)
        merged = _output_view(merged_out).to(dtype)
        return MLossStatistics.from_gap(merged - ensembled, merged)


def mloss_statistics(
    model: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    data: Iterable[Any],
    *,
    base: Mapping[str, Tensor] | None = None,
    layers: Sequence[str] | Mapping[str, Activation] | None = None,
    weights: Sequence[float] | Tensor | None = None,
    reference: Reference | Mapping[str, Tensor] = "pretrained",
    merged: Mapping[str, Tensor] | None = None,
    output: bool = True,
    activation_types: Sequence[type[nn.Module]] = (),
    check_values: bool = True,
) -> dict[str, MLossStatistics]:
    """Summed M-Loss statistics of K experts over ``data`` (arguments as :func:`m_loss`).

    The sums add across calls, shards and ranks (:class:`MLoss`); :func:`mloss_report`
    turns them into values.

    Returns:
        ``{name: statistics}``: hidden layers in module order, then :data:`OUTPUT`.
    """
    batches = iter(data)
    try:
        first = next(batches)
    except StopIteration:
        raise ValueError("M-Loss data is empty: it needs at least one input batch") from None
    meter = MLossMeter(
        model,
        experts,
        first,
        base=base,
        layers=layers,
        weights=weights,
        reference=reference,
        merged=merged,
        output=output,
        activation_types=activation_types,
        check_values=check_values,
    )
    total: dict[str, MLossStatistics] = {}
    for batch in itertools.chain([first], batches):
        for name, stats in meter.measure(batch).items():
            total[name] = total[name] + stats if name in total else stats
    return total


def m_loss(
    model: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    data: Iterable[Any],
    *,
    base: Mapping[str, Tensor] | None = None,
    layers: Sequence[str] | Mapping[str, Activation] | None = None,
    weights: Sequence[float] | Tensor | None = None,
    reference: Reference | Mapping[str, Tensor] = "pretrained",
    merged: Mapping[str, Tensor] | None = None,
    output: bool = True,
    activation_types: Sequence[type[nn.Module]] = (),
    check_values: bool = True,
) -> MLossReport:
    """M-Loss of merging K experts: per layer, per node, raw and normalized.

    Args:
        model: an ``nn.Module`` skeleton; every state dict is evaluated on it with
            ``torch.func.functional_call`` in eval mode (its own train/eval flags are
            restored afterwards; its parameters are never modified).
        experts: θ_1..θ_K, state dicts keyed like ``model.state_dict()``.
        data: an iterable of input batches, each a Tensor or a tuple of forward's
            positional arguments (labels left out); moved to the experts' device.
        base: θ₀, the pretrained state dict (needed by ``"pretrained"``/``"incremental"``).
        layers: None: every Linear/Conv whose output feeds an element-wise activation module
            (:func:`find_activation_layers`); a list of layer names (σ traced); or
            ``{name: σ}`` to give σ explicitly.
        weights: merge weights α_j summing to 1 (default uniform 1/K, the paper's).
        reference: the model whose layer inputs are hooked (§1.8 item 1): ``"pretrained"``
            (authors' code), ``"incremental"`` (the paper's text: entries before the
            layer's weight merged, the rest θ₀; one forward per layer and batch),
            ``"average"``, or a state dict.
        merged: for ``"incremental"``: the merged state whose leading entries form the
            partial merge (default: the weighted average Σ_j α_j θ_j).
        output: also measure the model output (:data:`OUTPUT`): K expert forwards plus
            one of the averaged model (shared with the reference forward for ``"average"``).
        activation_types: extra module classes to treat as element-wise activations.
        check_values: scan the state dicts for NaN/inf first.

    Returns:
        :class:`MLossReport` (``.node``, ``.layer``, ``.layer_normalized``; ``.mean``).

    Raises:
        ValueError: incompatible state dicts (naming the key), weights not summing to 1,
            a reference without ``base``, empty ``data``, an unknown or unsuitable layer.

    Example::

        report = m_loss(backbone, [theta_1, theta_2], unlabeled_loader, base=theta_0)
        report.layer["blocks.11.mlp.fc1"], report.node["blocks.11.mlp.fc1"].shape
    """
    return mloss_report(
        mloss_statistics(
            model,
            experts,
            data,
            base=base,
            layers=layers,
            weights=weights,
            reference=reference,
            merged=merged,
            output=output,
            activation_types=activation_types,
            check_values=check_values,
        )
    )


# ------------------------------------------------------- normalized node M-Loss (Def. 3.6)


def _check_vector(m: Tensor, what: str) -> None:
    if m.dim() != 1 or m.numel() == 0:
        raise ValueError(f"{what} expects a non-empty 1-D node M-Loss vector, got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{what}: the node M-Loss vector holds NaN or inf")


def _min_max(x: Tensor) -> Tensor:
    span = x.max() - x.min()
    if span == 0:
        return torch.zeros_like(x)
    return (x - x.min()) / span


def rank_scale(m: Tensor) -> Tensor:
    """rank(m_i) / (d − 1) in [0, 1]: rank 0 is the smallest; ties ranked by stable argsort
    (index order), as the authors' ``rank_scale``. A single node gets 0.

    Args:
        m: node M-Loss ``(d,)``.

    Returns:
        ``(d,)`` float.
    """
    _check_vector(m, "rank_scale")
    d = m.numel()
    ranks = torch.empty(d, dtype=torch.float64, device=m.device)
    ranks[torch.argsort(m, stable=True)] = torch.arange(d, dtype=torch.float64, device=m.device)
    return ranks / (d - 1) if d > 1 else ranks.zero_()


def robust_scale(m: Tensor) -> Tensor:
    """(m − median) / IQR, then min–max to [0, 1] (the authors' unused alternative).

    The median is ``torch.median`` (the lower middle value), the quartiles are linearly
    interpolated. A zero IQR (or a constant vector) gives zeros.

    Args:
        m: node M-Loss ``(d,)``.

    Returns:
        ``(d,)`` float64.
    """
    _check_vector(m, "robust_scale")
    x = m.to(torch.float64)
    iqr = torch.quantile(x, 0.75) - torch.quantile(x, 0.25)
    if iqr == 0:
        return torch.zeros_like(x)
    return _min_max((x - torch.median(x)) / iqr)


def log_scale(m: Tensor, eps: float = 1e-6) -> Tensor:
    """log(m + eps), then min–max to [0, 1] (the authors' unused alternative; a constant
    vector gives zeros).

    Args:
        m: node M-Loss ``(d,)``, non-negative.
        eps: added before the log.

    Returns:
        ``(d,)`` float64.
    """
    _check_vector(m, "log_scale")
    if bool((m < 0).any()):
        raise ValueError("log_scale: node M-Loss values must be non-negative")
    return _min_max(torch.log(m.to(torch.float64) + eps))


SCALES: dict[str, Callable[[Tensor], Tensor]] = {"rank": rank_scale, "robust": robust_scale, "log": log_scale}


def row_keep_rates(m: Tensor, density: float = 0.8, spread: float = 0.1, scale: Scale = "rank") -> Tensor:
    """M-TIES row keep rates r_i = k − e · scale(M)_i ∈ [k − e, k] (spec §1.5 step c).

    Rows with a larger node M-Loss (more conflict) keep fewer entries.

    Args:
        m: node M-Loss of one layer ``(d_out,)``.
        density: k, the base keep ratio.
        spread: e, the spread of the rates.
        scale: ``"rank"`` (the authors' choice), ``"robust"`` or ``"log"``.

    Returns:
        ``(d_out,)`` float64.

    Raises:
        ValueError: rates outside [0, 1] (needs 0 ≤ k − e and k ≤ 1), or an unknown scale.
    """
    if scale not in SCALES:
        raise ValueError(f"row_keep_rates: scale must be one of {sorted(SCALES)}, got {scale!r}")
    if spread < 0 or density > 1 or density - spread < 0:
        raise ValueError(
            f"row_keep_rates: need 0 <= density - spread and density <= 1, got density={density}, spread={spread}"
        )
    return density - spread * SCALES[scale](m).to(torch.float64)


def node_group_map(node: Mapping[str, Tensor], groups: int = 32) -> tuple[list[str], Tensor]:
    """Bin each layer's nodes into ``groups`` contiguous index groups (the paper's Fig. 3).

    A layer with at least ``groups`` nodes averages each group (sizes differ by at most
    one); a smaller layer repeats node ⌊g·d/groups⌋ in group g.

    Args:
        node: ``{layer: node M-Loss (d,)}``.
        groups: G.

    Returns:
        ``(names, map)`` with ``map`` of shape ``(L, G)``.
    """
    if groups < 1:
        raise ValueError(f"node_group_map: groups must be >= 1, got {groups}")
    rows = []
    for values in node.values():
        v = values.detach().to(device="cpu", dtype=torch.float64).flatten()
        if v.numel() >= groups:
            rows.append(torch.stack([chunk.mean() for chunk in torch.tensor_split(v, groups)]))
        else:
            rows.append(v[(torch.arange(groups) * v.numel()) // groups])
    names = list(node)
    return names, torch.stack(rows) if rows else torch.empty(0, groups, dtype=torch.float64)


# ----------------------------------------------------------- expected values (spec §1.4)
#
# Model [I]: z_j = u + ε_j, ε_j iid N(0, s²): u is the shared pretrained pre-activation and
# ε_j expert j's fine-tuning perturbation; the merged pre-activation is u + ε̄ with
# ε̄ ~ N(0, s²/K). Lemma A.1 (∫Φ(u)Φ(−u)du = 1/√π) is the paper's; the closed forms below are
# this project's derivations, checked by quadrature and Monte Carlo in the tests.

_CLOSED_FORMS = ("relu", "gelu", "leaky_relu")
# σ′(+∞), σ′(−∞)
_ASYMPTOTIC_SLOPES = {name: (1.0, 0.0) for name in ("relu", "gelu", "gelu_tanh", "quick_gelu", "silu")}
_NAMED_ACTS: dict[str, Activation] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
}


def normal_cdf(x: Tensor) -> Tensor:
    """Φ(x), the standard normal CDF."""
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def normal_pdf(x: Tensor) -> Tensor:
    """φ(x), the standard normal density."""
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _activation_name(act: str | nn.Module | Activation, negative_slope: float) -> tuple[str | None, float]:
    """Map a module to a closed-form name: nn.ReLU, nn.GELU (exact/tanh), nn.LeakyReLU, nn.SiLU."""
    if isinstance(act, str):
        return act, negative_slope
    if isinstance(act, nn.LeakyReLU):
        return "leaky_relu", act.negative_slope
    if isinstance(act, nn.ReLU):
        return "relu", negative_slope
    if isinstance(act, nn.GELU):
        return ("gelu" if act.approximate == "none" else "gelu_tanh"), negative_slope
    if isinstance(act, nn.SiLU):
        return "silu", negative_slope
    return None, negative_slope


def gauss_smoothed_act(
    u: Tensor | float,
    v: Tensor | float,
    act: str | nn.Module | Activation = "relu",
    *,
    negative_slope: float = 0.01,
    quadrature_points: int = 96,
) -> Tensor:
    """m_σ(u, v) = E[σ(u + N(0, v))], the expected activation under Gaussian noise (§1.4).

    Closed forms [I]:
      - ReLU: u Φ(u/√v) + √v φ(u/√v);
      - GELU (exact, xΦ(x)): u Φ(u/√(1+v)) + (v/√(1+v)) φ(u/√(1+v));
      - Leaky ReLU (slope a): a·u + (1 − a)·m_ReLU.
    Any other σ (``"gelu_tanh"``, ``"quick_gelu"``, ``"silu"``, a module or a callable):
    Gauss–Hermite quadrature with ``quadrature_points`` nodes.

    Args:
        u: the shared pre-activation.
        v: the noise variance (≥ 0); broadcast with ``u``.
        act: σ: a name, ``nn.ReLU``/``nn.GELU``/``nn.LeakyReLU``/``nn.SiLU``, or a callable.
        negative_slope: a of ``"leaky_relu"``.
        quadrature_points: nodes of the quadrature fallback.

    Returns:
        m_σ(u, v), float64, broadcast shape of ``u`` and ``v``.
    """
    u = torch.as_tensor(u, dtype=torch.float64)
    v = torch.as_tensor(v, dtype=torch.float64)
    if bool((v < 0).any()):
        raise ValueError("gauss_smoothed_act: the variance v must be >= 0")
    name, slope = _activation_name(act, negative_slope)
    if name in ("relu", "leaky_relu"):
        sd = v.sqrt()
        safe = torch.where(sd > 0, sd, torch.ones_like(sd))
        t = u / safe
        relu = torch.where(sd > 0, u * normal_cdf(t) + sd * normal_pdf(t), u.clamp(min=0))
        return relu if name == "relu" else slope * u + (1.0 - slope) * relu
    if name == "gelu":
        scale = torch.sqrt(1.0 + v)
        t = u / scale
        return u * normal_cdf(t) + (v / scale) * normal_pdf(t)
    fn: Activation
    if name is not None:
        if name not in _NAMED_ACTS:
            raise ValueError(
                f"gauss_smoothed_act: unknown activation {name!r}; use one of "
                f"{sorted(set(_CLOSED_FORMS) | set(_NAMED_ACTS))} or a callable"
            )
        fn = _NAMED_ACTS[name]
    else:
        fn = act  # type: ignore[assignment]
    nodes, weights = np.polynomial.hermite.hermgauss(quadrature_points)
    nodes_t = torch.as_tensor(nodes, dtype=torch.float64)
    weights_t = torch.as_tensor(weights, dtype=torch.float64)
    u_b, v_b = torch.broadcast_tensors(u, v)
    points = u_b.unsqueeze(-1) + torch.sqrt(2.0 * v_b).unsqueeze(-1) * nodes_t
    return (fn(points) * weights_t).sum(-1) / math.sqrt(math.pi)


def expected_gap(
    u: Tensor | float,
    s: float,
    num_experts: int,
    act: str | nn.Module | Activation = "relu",
    *,
    negative_slope: float = 0.01,
) -> Tensor:
    """Signed expected gap Δ_σ(u) = m_σ(u, s²/K) − m_σ(u, s²) (≤ 0 for ReLU) (§1.4 [I]).

    Args:
        u: the shared pre-activation.
        s: the per-expert perturbation's standard deviation.
        num_experts: K.
        act: σ (see :func:`gauss_smoothed_act`).
        negative_slope: a of Leaky ReLU.
    """
    if num_experts < 1 or s < 0:
        raise ValueError(f"expected_gap: need K >= 1 and s >= 0, got K={num_experts}, s={s}")
    merged = gauss_smoothed_act(u, s * s / num_experts, act, negative_slope=negative_slope)
    return merged - gauss_smoothed_act(u, s * s, act, negative_slope=negative_slope)


def integrated_gap(
    s: float, num_experts: int, act: str | nn.Module = "relu", *, negative_slope: float = 0.01
) -> float:
    """∫_R Δ_σ(u) du = −(s²/2)(1 − 1/K)(σ′(+∞) − σ′(−∞)) (§1.4 [I]).

    −s²(K−1)/(2K) for ReLU, GELU (exact or tanh), QuickGELU and SiLU; that times (1 − a)
    for Leaky ReLU.

    Args:
        s: the per-expert perturbation's standard deviation.
        num_experts: K.
        act: a name (``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"quick_gelu"``, ``"silu"``,
            ``"leaky_relu"``) or the matching module.
        negative_slope: a of Leaky ReLU.
    """
    name, slope = _activation_name(act, negative_slope)
    if name == "leaky_relu":
        hi, lo = 1.0, slope
    elif name in _ASYMPTOTIC_SLOPES:
        hi, lo = _ASYMPTOTIC_SLOPES[name]
    else:
        raise ValueError(
            f"integrated_gap needs σ's limiting slopes; known: {sorted(_ASYMPTOTIC_SLOPES) + ['leaky_relu']}"
        )
    return -(s * s / 2.0) * (1.0 - 1.0 / num_experts) * (hi - lo)


def gate_disagreement(u: Tensor | float, s: float) -> Tensor:
    """P(two experts' ReLU gates disagree | u) = 2Φ(u/s)Φ(−u/s), z_j = u + N(0, s²) (§1.4 [I])."""
    u = torch.as_tensor(u, dtype=torch.float64)
    return 2.0 * normal_cdf(u / s) * normal_cdf(-u / s)


def integrated_gate_disagreement(s: float) -> float:
    """∫ 2Φ(u/s)Φ(−u/s) du = 2s/√π, by Lemma A.1 (∫Φ(u)Φ(−u)du = 1/√π): the conflict
    region grows linearly in s."""
    return 2.0 * s / math.sqrt(math.pi)


def relu_pair_gap(z: Tensor | float, d: Tensor | float) -> Tensor:
    """ReLU(z) − ½[ReLU(z+d) + ReLU(z−d)] = −½(|d| − |z|)₊: two experts z ± d (§1.4 [I])."""
    z = torch.as_tensor(z, dtype=torch.float64)
    d = torch.as_tensor(d, dtype=torch.float64)
    return -0.5 * (d.abs() - z.abs()).clamp(min=0)


def integrated_squared_relu_gap(s: float) -> float:
    """∫ E[M²] du = s³/(6√π) for K = 2 ReLU experts (d ~ N(0, s²/2), ∫ M² dz = |d|³/6) (§1.4 [I]).

    The node M-Loss is therefore O(s³): experts that stay close to their shared backbone
    merge well.
    """
    return s**3 / (6.0 * math.sqrt(math.pi))


__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "MLoss",
    "MLossMeter",
    "MLossReport",
    "MLossStatistics",
    "NORMALIZE_EPS",
    "OUTPUT",
    "PIECEWISE_LINEAR_ACTIVATIONS",
    "SCALES",
    "as_forward_args",
    "capture_layer_input",
    "centred_gap",
    "check_state_keys",
    "expected_gap",
    "expert_preactivations",
    "find_activation_layers",
    "gate_disagreement",
    "gauss_smoothed_act",
    "integrated_gap",
    "integrated_gate_disagreement",
    "integrated_squared_relu_gap",
    "is_elementwise_activation",
    "layer_gap",
    "layer_mloss",
    "log_scale",
    "m_loss",
    "merge_weights",
    "mloss_report",
    "mloss_statistics",
    "node_group_map",
    "node_mloss",
    "normal_cdf",
    "normal_pdf",
    "partial_merge",
    "rank_scale",
    "relu_pair_gap",
    "robust_scale",
    "row_keep_rates",
    "weighted_average",
]


def __getattr__(name: str) -> Any:
    # The torchmetrics ``MLoss`` lives in :mod:`merging.metrics`, imported on first use:
    # torchmetrics imports torchvision (about 400 MB resident), which merges never need.
    if name == "MLoss":
        from merging.metrics import MLoss

        return MLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
