"""How the experts' task vectors compare: drift against the peers, shares of the dispersion.

Quantities read off the task vectors τ_j = θ_j − θ₀ of K experts and off their
:class:`~merging.stability.TaskVectorStats` (notation of :mod:`merging.stability`: merge
weights w_j, τ̄ = Σ_j w_j τ_j, dispersion D = Σ_j w_j ‖τ_j − τ̄‖²). Under the SGD-stability
template (Lei & Ying, ICML 2020) an expert that moves much further from θ₀ than its peers
dominates D; the drift ratio names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from merging.stability import TaskVectorStats, global_norm
from merging.state import is_mergeable


def task_vector_norms(experts: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor]) -> Tensor:
    """‖τ_j‖ = ‖θ_j − θ₀‖ over each expert's floating entries (K,), float64 on the CPU.

    Args:
        experts: θ_1..θ_K, state dicts with the keys of ``base`` (detached here).
        base: θ₀.
    """
    return torch.tensor(
        [
            global_norm([v.detach() - base[k].detach() for k, v in expert.items() if is_mergeable(v)])
            for expert in experts
        ],
        dtype=torch.float64,
    )


def drift_ratios(norms: Tensor) -> Tensor:
    """‖τ_j‖ / median_{k≠j} ‖τ_k‖ for K ≥ 2 experts (K,); inf where the peers did not move.

    Args:
        norms: ‖τ_j‖, shape (K,).

    Raises:
        ValueError: fewer than two experts.
    """
    k = norms.numel()
    if k < 2:
        raise ValueError("drift ratios need at least two experts")
    out = torch.empty(k, dtype=torch.float64)
    for j in range(k):
        peers = torch.cat([norms[:j], norms[j + 1 :]]).double()
        median = float(torch.quantile(peers, 0.5))  # the midpoint for an even number of peers
        out[j] = float(norms[j]) / median if median > 0 else (math.inf if float(norms[j]) > 0 else 1.0)
    return out


def deviation_shares(stats: TaskVectorStats) -> Tensor:
    """w_j‖τ_j − τ̄‖² / D for each expert (K,), from the Gram matrix; zeros when D = 0.

    Args:
        stats: the experts' task-vector statistics (its ``gram`` G (K, K) and ``weights`` w (K,)).
    """
    g, w = stats.gram, stats.weights
    sq = torch.diagonal(g) - 2 * (g @ w) + w @ g @ w
    contrib = w * sq.clamp_min(0)
    total = float(contrib.sum())
    return contrib / total if total > 0 else torch.zeros_like(contrib)


def layer_square_norms(stats: TaskVectorStats) -> dict[str, float]:
    """Σ_j ‖τ_j^l‖² per layer l (for one model, its ‖τ^l‖²: the layers' values sum to ‖τ‖²).

    Args:
        stats: task-vector statistics with per-layer norms.
    """
    return {name: float(norms.pow(2).sum()) for name, norms in stats.layer_norms.items()}


__all__ = ["deviation_shares", "drift_ratios", "layer_square_norms", "task_vector_norms"]
