"""TIES-Merging's per-tensor steps: the paper's three steps, and the fused form merges run.

Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging
Models", NeurIPS 2023, https://arxiv.org/abs/2306.01708 (``spec/classic.md``). Inputs are
task vectors stacked on dim 0, ``(K, *shape)``.

The reference steps, one function each as the paper writes them:

1. :func:`trim_to_density`: keep each expert's entries of largest magnitude;
2. :func:`elect_sign`: per entry, the sign of the summed trimmed values;
3. :func:`disjoint_mean`: the mean of the values that agree with the elected sign.

:func:`ties_disjoint_merge` computes ``disjoint_mean(t, elect_sign(t))`` of the trimmed
``t`` in one sweep, the form every merge runs on torch; the numba kernel
(:func:`merging.methods._kernels.ties_merge`) runs the same sums for CPU float32. Both are
tested equal to the reference steps. :func:`ties_context` is the whole-model pass (the
thresholds), :func:`ties_thresholds` the per-entry choice among them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from merging.methods.topk import global_magnitude_thresholds, magnitude_threshold
from merging.state import is_mergeable


def trim_to_density(tau: Tensor, density: float, thresholds: Tensor | None = None) -> Tensor:
    """TIES *trim*: zero every entry whose magnitude is below its expert's threshold.

    Ties at the threshold are kept (entries with |τ| ≥ threshold survive), so slightly more
    than ``density`` may survive when magnitudes repeat.

    Args:
        tau: task vectors of one entry, shape ``(K, *shape)``.
        density: fraction of entries kept per expert (used when ``thresholds`` is None:
            the threshold is then per tensor, mergekit/PEFT's ``scope="tensor"``).
        thresholds: ``(K,)`` precomputed thresholds (e.g. global over the whole task vector).

    Returns:
        The trimmed task vectors, same shape as ``tau``.
    """
    flat = tau.reshape(tau.shape[0], -1)
    magnitudes = flat.abs()
    if thresholds is None:
        thresholds = magnitude_threshold(magnitudes, density)
    # A float 0/1 mask written over the magnitudes: bool masks are several times slower here.
    keep = torch.ge(magnitudes, thresholds.to(magnitudes.dtype).unsqueeze(1), out=magnitudes)
    return (flat * keep).reshape(tau.shape)


def elect_sign(trimmed: Tensor) -> Tensor:
    """TIES *elect*: per entry, the sign of the summed trimmed values (total mass).

    A zero sum elects +1 (as in the M-Loss authors' code).

    Args:
        trimmed: ``(K, *shape)``.

    Returns:
        ``(*shape)`` tensor of +1/−1 in ``trimmed``'s dtype.
    """
    total = trimmed.sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(trimmed.dtype)


def disjoint_mean(trimmed: Tensor, sign: Tensor) -> Tensor:
    """TIES *disjoint merge*: mean of the values whose sign agrees with the elected sign.

    Zeros never count; an entry with no agreeing value stays 0.

    Args:
        trimmed: ``(K, *shape)``.
        sign: ``(*shape)`` elected signs (+1/−1).

    Returns:
        ``(*shape)``.
    """
    agreeing = (trimmed * sign).clamp_(min=0)  # |τ| where the sign agrees, else 0
    count = torch.sign(agreeing).sum(dim=0).clamp_(min=1)
    return sign * agreeing.sum(dim=0) / count


def ties_disjoint_merge(tau: Tensor, thresholds: Tensor) -> Tensor:
    """TIES trim, elect and disjoint mean in one sweep:
    ``disjoint_mean(t, elect_sign(t))`` with ``t = trim_to_density(tau, ·, thresholds)``.

    The same result from four sums over the experts instead of a chain of ``(K, *shape)``
    temporaries. With the kept entries t_j (|τ_j| ≥ threshold_j, τ_j ≠ 0), S = Σ_j t_j,
    A = Σ_j |t_j|, C = #kept and P = Σ_j sign(t_j): the elected sign is s = sign(S) (+ when
    S = 0), the agreeing values sum to s·(|S| + A)/2 (no cancellation: s·S = |S|) and
    number (C + s·P)/2, so the mean is s·(|S| + A)/(C + s·P), and 0 with no agreeing value.
    Ties at the threshold are kept; zeros never count. Equal to the step-by-step functions
    up to float rounding of the sums.

    Args:
        tau: task vectors of one entry, shape ``(K, *shape)``; modified in place (it ends
            up holding the trimmed values).
        thresholds: ``(K,)`` magnitude thresholds; 0 keeps every non-zero entry, ``+inf``
            none.

    Returns:
        The merged task vector, shape ``(*shape)``.
    """
    flat = tau.reshape(tau.shape[0], -1)
    smallest = torch.nextafter(flat.new_zeros(()), flat.new_ones(()))
    # Thresholds of at least the smallest subnormal: a kept entry is never zero.
    floor = thresholds.to(flat.dtype).clamp(min=smallest).unsqueeze(1)
    work = flat.abs()
    keep = torch.ge(work, floor, out=work)  # float 0/1: bool masks are several times slower
    count = keep.sum(dim=0)
    trimmed = flat.mul_(keep)
    total = trimmed.sum(dim=0)
    mass = torch.abs(trimmed, out=work).sum(dim=0)
    balance = torch.sign(trimmed, out=work).sum(dim=0)
    sign = total.ge(0).to(flat.dtype).mul_(2).sub_(1)
    agreeing_sum = total.abs_().add_(mass).mul_(sign)  # 2 · Σ agreeing t_j
    agreeing_count = balance.mul_(sign).add_(count).clamp_(min=2)  # 2 · #agreeing, ≥ 2
    return agreeing_sum.div_(agreeing_count).reshape(tau.shape[1:])


def trim_floors(thresholds: Tensor, dtype: torch.dtype) -> Tensor:
    """``(K,)`` the largest values of ``dtype`` below each expert's trim floor (the threshold,
    at least the smallest subnormal, as in :func:`ties_disjoint_merge`): |τ| is kept exactly
    when it exceeds its expert's value (:class:`TiesSums`)."""
    info = torch.finfo(dtype)
    floor = thresholds.to(dtype).clamp(min=info.smallest_normal * info.eps)  # the smallest subnormal
    return torch.nextafter(floor, torch.zeros_like(floor))


class TiesSums:
    """:func:`ties_disjoint_merge` on the multi-tensor (GPU) path: the same four sums over the
    experts (S, A, C, P), each a list over a group of entries, accumulated one expert at a time
    with ``torch._foreach_*`` ops (10 per expert, 9 more to finish), whatever the number of
    entries. No foreach op compares, so the trim mask is ``sign(max(|τ| − below, 0))`` with
    ``below`` from :func:`trim_floors`: 1 exactly where ``|τ| ≥ floor`` (a float subtraction
    is zero only between equal values and has the sign of the exact difference). The sums
    run in the same order as the torch path's, so the results are the same.

    Args:
        below: ``(K,)`` :func:`trim_floors` of the thresholds, in the group's dtype.
    """

    def __init__(self, below: Tensor) -> None:
        self.below = below
        self.total: list[Tensor] | None = None

    def add(self, tau: list[Tensor], j: int) -> None:
        """Add expert j's task vectors of the group (fresh tensors: trimmed in place)."""
        keep = torch._foreach_abs(tau)
        torch._foreach_add_(keep, self.below[j], alpha=-1)
        torch._foreach_clamp_min_(keep, 0.0)
        torch._foreach_sign_(keep)  # 1 where |τ| ≥ floor, else 0
        torch._foreach_mul_(tau, keep)  # the trimmed values t_j
        sign = torch._foreach_sign(tau)
        if self.total is None:
            self.total, self.count, self.balance = tau, keep, sign
            self.mass = torch._foreach_abs(tau)
            return
        torch._foreach_add_(self.total, tau)
        torch._foreach_add_(self.count, keep)
        torch._foreach_add_(self.balance, sign)
        torch._foreach_addcmul_(self.mass, tau, sign)  # + |t_j|

    def merged(self) -> list[Tensor]:
        """The disjoint means s·(|S| + A)/(C + s·P) (0 where no value agrees), in place."""
        total, balance = self.total, self.balance
        negative = torch._foreach_clamp_max(total, 0.0)
        torch._foreach_sign_(negative)  # −1 where S < 0 (the elected sign s = 1 + 2·this), else 0
        torch._foreach_abs_(total)
        torch._foreach_add_(total, self.mass)
        torch._foreach_addcmul_(total, total, negative, value=2.0)  # 2·Σ agreeing t_j = s·(|S| + A)
        torch._foreach_addcmul_(balance, balance, negative, value=2.0)  # s·P
        torch._foreach_add_(balance, self.count)
        torch._foreach_clamp_min_(balance, 2.0)  # 2·#agreeing, ≥ 2
        torch._foreach_div_(total, balance)
        return total


@dataclass(frozen=True)
class TiesContext:
    """What a TIES merge computes over the whole model before merging entry by entry.

    Attributes:
        thresholds: ``(K,)`` global magnitude thresholds of the trim; None when the trim is
            per tensor (``scope="tensor"``) or keeps everything (density 1).
        entries: floating entries per expert in the whole merge (the size rule of the
            fused kernels, :func:`merging.methods._kernels.available`).
    """

    thresholds: Tensor | None
    entries: int


def ties_context(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    density: float,
    scope: str,
    drop: Callable[[str, Tensor], Tensor] | None = None,
) -> TiesContext:
    """The whole-model pass of TIES: the global trim thresholds (scope ``"global"``, density < 1).

    Args:
        experts: θ_1..θ_K.
        base: θ₀.
        density: fraction of each task vector kept.
        scope: ``"global"`` or ``"tensor"``.
        drop: ``f(key, tau (K, *shape)) -> tau`` applied to τ before thresholding (DARE's
            drop and rescale, deterministic per key), or None.
    """
    keys = [k for k, v in base.items() if is_mergeable(v)]
    entries = sum(base[k].numel() for k in keys)
    if scope == "tensor" or density >= 1.0:
        return TiesContext(thresholds=None, entries=entries)
    thresholds = global_magnitude_thresholds(experts, base, keys, density, transform=drop)
    return TiesContext(thresholds=thresholds, entries=entries)


def ties_thresholds(tau: Tensor, density: float, context: TiesContext) -> Tensor:
    """The ``(K,)`` trim thresholds of one entry's τ ``(K, *shape)``: 0 at density 1 (every
    non-zero entry kept), the context's global thresholds, or this tensor's own top-k ones."""
    if density >= 1.0:
        return torch.zeros(tau.shape[0], dtype=tau.dtype, device=tau.device)
    if context.thresholds is None:
        return magnitude_threshold(tau.reshape(tau.shape[0], -1).abs(), density)
    return context.thresholds


__all__ = [
    "TiesContext",
    "disjoint_mean",
    "elect_sign",
    "ties_context",
    "ties_disjoint_merge",
    "ties_thresholds",
    "trim_floors",
    "trim_to_density",
    "TiesSums",
]
