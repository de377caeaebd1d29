"""The gap maths of M-Loss: per-layer merging-ensembling gap, node and layer M-Loss, statistics.

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

The model output is measured the same way under the reserved name :data:`OUTPUT`: the
merged model's output f(Σ_j α_j θ_j) against the ensemble Σ_j α_j f(θ_j), node axis = last
output dimension.

Cost: the K experts' (W, b) run as one batched GEMM/conv on the shared input, whose output
is used in the layout it is written in (no transposing copy), plus the element-wise gap:
σ once over all K experts and once on the merge, and a few in-place passes.

Numerics: everything is computed relative to the first expert (z_1 and z_j − z_1, using
Σ_j α_j = 1), so identical experts give exactly 0 and small gaps do not drown in
cancellation error.

The sums of :class:`MLossStatistics` add across batches, shards and ranks;
:func:`mloss_report` turns them into the values of an :class:`MLossReport`. Pure tensor
functions: no hooks, no state dicts, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merging.state import accumulation_dtype

OUTPUT = "output"
"""Reserved name of the model-output entry in every M-Loss result."""

NORMALIZE_EPS = 1e-8
"""ε of Def. 3.5: ‖g(s)‖₂ / (‖σ(Σ α z)(s)‖₂ + ε)."""

Activation = Callable[[Tensor], Tensor]

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


def _host_reads_are_free(t: Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs no host-device sync (a CPU tensor)."""
    return t.device.type == "cpu"


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
    # are masked (found before an in-place σ overwrites z). On the CPU, experts that differ
    # everywhere, the usual case, skip the masks after one counting pass; on another device
    # reading that count would make the host wait for the device (a sync per layer and
    # batch), so the masks are always applied there: where no δ_j is 0 they change nothing.
    agree = None
    if not _is_piecewise_linear(act):
        if not _host_reads_are_free(deltas) or int(torch.count_nonzero(deltas)) < deltas.numel():
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
    """Turn summed statistics into M-Loss values (layers without samples are left out).

    The layers' sums are read to the host together (one device sync, whatever the number of
    layers); the node values stay on the statistics' device.
    """
    kept = {name: s for name, s in statistics.items() if s.samples != 0}
    sums = [t for s in kept.values() for t in (s.norm_sum, s.normalized_sum)]
    host = torch.stack([t.reshape(()) for t in sums]).tolist() if sums else []
    return _report(
        list(kept),
        [s.node_sum for s in kept.values()],
        [s.positions for s in kept.values()],
        [s.samples for s in kept.values()],
        host[0::2],
        host[1::2],
    )


def _report(
    names: Sequence[str],
    node_sums: Sequence[Tensor],
    positions: Sequence[int],
    samples: Sequence[int],
    norm_sums: Sequence[float],
    normalized_sums: Sequence[float],
) -> MLossReport:
    """The report of layers with samples, from their node sums (on the device) and their
    counts and sums already read to the host: no device sync; the node means are one
    ``foreach`` division."""
    node = torch._foreach_div(list(node_sums), list(positions)) if names else []
    return MLossReport(
        node=dict(zip(names, node)),
        layer={name: total / n for name, total, n in zip(names, norm_sums, samples)},
        layer_normalized={name: total / n for name, total, n in zip(names, normalized_sums, samples)},
        samples=dict(zip(names, samples)),
    )


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
    # One copy of every layer's nodes to the host, not one per layer.
    flat = torch.cat([v.detach().flatten() for v in node.values()]) if node else torch.empty(0)
    host = flat.to(device="cpu", dtype=torch.float64).split([v.numel() for v in node.values()])
    for v in host:
        if v.numel() >= groups:
            rows.append(torch.stack([chunk.mean() for chunk in torch.tensor_split(v, groups)]))
        else:
            rows.append(v[(torch.arange(groups) * v.numel()) // groups])
    names = list(node)
    return names, torch.stack(rows) if rows else torch.empty(0, groups, dtype=torch.float64)


__all__ = [
    "NORMALIZE_EPS",
    "OUTPUT",
    "PIECEWISE_LINEAR_ACTIVATIONS",
    "Activation",
    "MLossReport",
    "MLossStatistics",
    "centred_gap",
    "expert_preactivations",
    "layer_gap",
    "layer_mloss",
    "mloss_report",
    "node_group_map",
    "node_mloss",
]
