"""The state dicts M-Loss evaluates: merge weights α, the average θ̄, the incremental reference.

Wang, Duan, Chen, Wu, Lim, "M-Loss: Quantifying Model Merging Compatibility with Limited
Unlabeled Data", AAAI 2026, https://arxiv.org/abs/2602.08564.

The merged model is the affine combination θ̄ = Σ_j α_j θ_j (Σ_j α_j = 1); the paper's text
hooks each layer's input on the partially merged model (entries before the layer merged,
the rest θ₀), the authors' code on θ₀. Every state dict is checked to be keyed like the
model it is evaluated on, naming the offending key. The state algebra itself (θ̄ and the
partial merge) is :func:`merging.state.weighted_average` and :func:`merging.state.partial_merge`;
:func:`foreach_weighted_average` computes the same θ̄ with a handful of multi-tensor operations
(the meter's average model at every measurement of a monitor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from merging._multitensor import plan
from merging.state import (
    StateDict,
    StateDictError,
    accumulation_dtype,
    is_mergeable,
    key_mismatch,
    partial_merge,
    weighted_average,
)

FOREACH_GROUP_ELEMENTS = 1 << 24
"""Entries averaged together by :func:`foreach_weighted_average`: their differences (16M
elements, 64 MB in fp32) are held at once (groups of :func:`merging._multitensor.plan`: one
dtype each, an entry larger than this alone)."""


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


def foreach_weighted_average(experts: Sequence[Mapping[str, Tensor]], alpha: Sequence[float]) -> StateDict:
    """θ̄ = θ_1 + Σ_{j≥2} α_j (θ_j − θ_1), as :func:`merging.state.weighted_average` computes it
    (the same anchored operations, in the accumulation dtype, non-float entries from θ_1), in
    multi-tensor (``foreach``) form: 2(K − 1) operations per group of entries instead of about
    three kernels per entry, which on a GPU is the difference between a handful of launches
    and hundreds. The M-Loss meter builds its average model with it at every measurement.

    Args:
        experts: θ_1..θ_K.
        alpha: α as Python floats (no host read of a tensor).
    """
    first = experts[0]
    out: StateDict = dict(first)
    if len(experts) == 1:
        return out
    keys = [key for key, value in first.items() if is_mergeable(value)]
    for group in ([p.key for p in g] for g in plan(keys, first, FOREACH_GROUP_ELEMENTS, split=False)):
        anchor = [first[key].to(accumulation_dtype(first[key].dtype)) for key in group]
        total: list[Tensor] | None = None
        for a, expert in zip(alpha[1:], experts[1:]):
            others = [expert[key].to(accumulation_dtype(expert[key].dtype)) for key in group]
            difference = torch._foreach_sub(others, anchor)
            if total is None:
                total = torch._foreach_add(anchor, difference, alpha=a)
            else:
                torch._foreach_add_(total, difference, alpha=a)
        for key, value in zip(group, total):
            out[key] = value.to(first[key].dtype)
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
        raise StateDictError(f"{owner} is not keyed like model.state_dict(): {key_mismatch(missing, extra)}")
    for key, ref in expected.items():
        if state[key].shape != ref.shape:
            raise StateDictError(
                f"{owner}: key {key!r} has shape {tuple(state[key].shape)}, the model has {tuple(ref.shape)}"
            )


__all__ = ["check_state_keys", "foreach_weighted_average", "merge_weights", "partial_merge", "weighted_average"]
