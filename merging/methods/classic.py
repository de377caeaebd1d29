"""Classic merges: weight averaging, task arithmetic, TIES and DARE.

Semantics follow ``spec/classic.md``; notation: pretrained θ₀, experts θ_1..θ_K, task
vectors τ_j = θ_j − θ₀, merge weights w_j, scaling λ. The classes choose and combine the
per-tensor steps, which live one concept per module: TIES's trim, elect and disjoint mean
in :mod:`merging.methods.ties`, DARE's drop and rescale in :mod:`merging.methods.dare`, the
exact top-k thresholds in :mod:`merging.methods.topk`. DARE is a composition: drop, then
the task-arithmetic sum or TIES.

Devices: every tensor made here takes its device from the inputs, and a merge returns its
output on the input device. The result is the same on every device up to float rounding
(reductions may sum in another order), except DARE's masks, which are drawn on the inputs'
device type (and, for CPU float32 merges on the numba kernels, by a hash: see
:class:`Dare`'s ``rng``). CPU float32 TIES and DARE of large models run fused numba kernels
(:mod:`merging.methods._kernels`, one dispatch: :func:`~merging.methods._kernels.available`);
every other device and dtype takes the torch path, which computes the same thing. On a GPU
(any device but the CPU) averaging, task arithmetic, global TIES and DARE merge the whole
model on the multi-tensor path instead of entry by entry (``merge_multi``: ``torch._foreach_*``
operators over groups of entries, see :mod:`merging.methods.base`), with the torch path's
arithmetic; DARE's masks there are the torch path's ``torch.rand`` draws.

Papers:
    - Model soups, Wortsman et al., ICML 2022: https://arxiv.org/abs/2203.05482
    - Task arithmetic, Ilharco et al., ICLR 2023: https://arxiv.org/abs/2212.04089
    - TIES-Merging, Yadav et al., NeurIPS 2023: https://arxiv.org/abs/2306.01708
    - DARE, Yu et al., ICML 2024: https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from merging import _multitensor
from merging._validation import check_choice, check_float, check_int, check_weights
from merging.methods import _kernels
from merging.methods.base import MergeMethod, register_method
from merging.methods.dare import dare_divisors_multi, dare_drop, entry_generator, entry_seed
from merging.methods.ties import (
    TiesContext,
    TiesSums,
    disjoint_mean,
    elect_sign,
    ties_context,
    ties_disjoint_merge,
    ties_thresholds,
    trim_floors,
    trim_to_density,
)
from merging.methods.topk import global_magnitude_thresholds, keep_count, magnitude_threshold
from merging.state import StateDict, accumulation_dtype, is_mergeable, mean_of_stack

DEFAULT_CHUNK = 1 << 16
"""Entries per expert in one slice of an elementwise merge: K slices stay cache-sized."""


def _require_base(method: MergeMethod, base: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
    if base is None:
        raise ValueError(f"{method.name} needs base (the pretrained state dict θ₀), which was not given")
    return base


def _average_multi(
    experts: Sequence[Mapping[str, Tensor]], keys: Sequence[str], weights: list[float] | None
) -> StateDict:
    """Σ_j w_j θ_j on the multi-tensor path: per group, K ops (the plain mean: sum in expert
    order, then divide by K, as ``mean(dim=0)`` on the CPU), plus one copy per expert for
    half-precision experts (summed in float32)."""
    outputs = _multitensor.Outputs(experts[0], keys)
    for group in _multitensor.plan(keys, experts[0]):
        values = [_multitensor.views(e, group) for e in experts]
        acc = accumulation_dtype(values[0][0].dtype)
        if weights is not None:
            total = torch._foreach_mul(_multitensor.in_dtype(values[0], acc), weights[0])
            for w, value in zip(weights[1:], values[1:]):
                torch._foreach_add_(total, _multitensor.in_dtype(value, acc), alpha=w)
        else:
            if len(values) > 1 and values[0][0].dtype == acc:
                total = torch._foreach_add(values[0], values[1])
                rest = values[2:]
            else:
                total, rest = _multitensor.fresh(values[0], acc), values[1:]
            for value in rest:
                torch._foreach_add_(total, _multitensor.in_dtype(value, acc))
            torch._foreach_div_(total, float(len(values)))
        outputs.put(group, total)
    return outputs.entries


def _task_vector_multi(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    keys: Sequence[str],
    scaling: float,
    thresholds: Tensor | None = None,
    dare: Dare | None = None,
) -> StateDict | None:
    """θ₀ + λ · combine(τ̃_1..τ̃_K) on the multi-tensor path: task arithmetic (the plain sum),
    TIES (``thresholds``: :class:`~merging.methods.ties.TiesSums`), either after DARE's drop
    (``dare``: the divisors of :func:`~merging.methods.dare.dare_divisors_multi`, from one
    ``torch.rand`` per entry as on the per-entry path).

    Per group and expert: τ_j (one op; two for half precision), then the sum (one op, DARE's
    drop included) or DARE's drop (one) and TIES's sums (ten); then λ and θ₀ (two). The
    arithmetic is the per-entry path's, in the same order. None where DARE's draws have no
    multi-tensor masks (see :func:`~merging.methods.dare.dare_divisors_multi`).
    """
    num_experts = len(experts)
    drop = dare is not None and dare.drop_rate > 0
    # DARE holds K draws per entry of a group: at most four groups' worth (512 MB of float32).
    budget = _multitensor.GROUP_ENTRIES
    if drop:
        budget = min(budget, 4 * budget // num_experts)
    outputs = _multitensor.Outputs(base, keys)
    below: dict[torch.dtype, Tensor] = {}
    for group in _multitensor.plan(keys, base, budget, split=not drop):
        flat_base = _multitensor.views(base, group)
        acc = accumulation_dtype(flat_base[0].dtype)
        base_acc = _multitensor.in_dtype(flat_base, acc)
        divisors = None
        if drop:
            shapes = [base[p.key].shape for p in group]
            divisors = dare_divisors_multi(
                [p.key for p in group], shapes, num_experts, dare.seed, dare.drop_rate, base_acc[0].device, acc
            )
            if divisors is None:
                return None
        if thresholds is not None and acc not in below:
            below[acc] = trim_floors(thresholds, acc)
        sums = TiesSums(below[acc]) if thresholds is not None else None
        total = None
        for j, expert in enumerate(experts):
            tau = _multitensor.task_vectors(_multitensor.views(expert, group), flat_base, base_acc, acc)
            divisor = [d[j] for d in divisors] if divisors is not None else None
            if sums is not None:
                if divisor is not None:
                    torch._foreach_div_(tau, divisor)  # τ · keep / (1 − p), as dare_drop
                sums.add(tau, j)
            elif total is None:
                total = tau
                if divisor is not None:
                    torch._foreach_div_(total, divisor)
            elif divisor is not None:
                torch._foreach_addcdiv_(total, tau, divisor)
            else:
                torch._foreach_add_(total, tau)
        if sums is not None:
            total = sums.merged()
        torch._foreach_mul_(total, scaling)
        torch._foreach_add_(total, base_acc)
        outputs.put(group, total)
    return outputs.entries


@register_method
class WeightAveraging(MergeMethod):
    """Weight averaging (uniform or weighted model soup): θ = Σ_j w_j θ_j.

    Args:
        weights: w_1..w_K, one per expert; normalised to sum to 1. None: uniform 1/K.
    """

    name = "average"
    paper = "https://arxiv.org/abs/2203.05482"

    def __init__(self, weights: list[float] | None = None) -> None:
        self.weights = check_weights("weights", weights, owner="average")

    def chunk_size(self) -> int:
        return DEFAULT_CHUNK

    def prepare(self, experts, base, *, model=None, data=None) -> Tensor | None:
        if self.weights is None:
            return None
        if len(self.weights) != len(experts):
            raise ValueError(f"average: {len(self.weights)} weights given for {len(experts)} experts")
        ref = next((v for v in experts[0].values() if is_mergeable(v)), None)
        w = torch.tensor(self.weights, dtype=torch.float64, device=ref.device if ref is not None else None)
        return w / w.sum()

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: Tensor | None) -> Tensor:
        return mean_of_stack(experts, context)

    def merge_multi(self, experts, base, keys, context) -> StateDict:
        weights = None
        if self.weights is not None:  # normalised on the host, rounded as the per-entry path's
            total = sum(self.weights)
            weights = [float(np.float32(w / total)) for w in self.weights]
        return _average_multi(experts, keys, weights)


@register_method
class TaskArithmetic(MergeMethod):
    """Task arithmetic: θ = θ₀ + λ Σ_j τ_j.

    Args:
        scaling: λ (0.3 in the paper's default; λ = 1/K gives plain averaging).
    """

    name = "task_arithmetic"
    paper = "https://arxiv.org/abs/2212.04089"
    requires_base = True

    def __init__(self, scaling: float = 0.3) -> None:
        self.scaling = check_float("scaling", scaling, owner="task_arithmetic")

    def chunk_size(self) -> int:
        return DEFAULT_CHUNK

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: Any) -> Tensor:
        # Σ_j (θ_j − θ₀), not Σ_j θ_j − K·θ₀: the latter rounds at the scale of |θ|, which
        # for fine-tunes is hundreds of times |τ| (``experts`` is a scratch stack).
        return base + self.scaling * experts.sub_(base).sum(dim=0)

    def merge_multi(self, experts, base, keys, context) -> StateDict:
        return _task_vector_multi(experts, base, keys, self.scaling)


@register_method
class TiesMerging(MergeMethod):
    """TIES-Merging: θ = θ₀ + λ · disjoint_mean(elect(trim(τ))).

    Args:
        density: fraction of each task vector's entries kept by the magnitude trim, in [0, 1]
            (0 keeps nothing: the merge is θ₀).
        scaling: λ.
        scope: ``"global"``: the trim threshold is over each whole task vector (the paper,
            FusionBench), found exactly without concatenating tensors
            (:func:`~merging.methods.topk.global_magnitude_thresholds`); ``"tensor"``: per
            tensor (mergekit, PEFT).

    Ties at the threshold are kept; a zero sign sum elects +; zeros never count in the mean.
    """

    name = "ties"
    paper = "https://arxiv.org/abs/2306.01708"
    requires_base = True

    def __init__(
        self, density: float = 0.2, scaling: float = 1.0, scope: Literal["global", "tensor"] = "global"
    ) -> None:
        owner = self.name
        self.density = check_float("density", density, low=0.0, high=1.0, owner=owner)
        self.scaling = check_float("scaling", scaling, owner=owner)
        self.scope = check_choice("scope", scope, ("global", "tensor"), owner=owner)

    def chunk_size(self) -> int | None:
        # Global scope is elementwise once the thresholds are known; tensor scope is not.
        return DEFAULT_CHUNK if self.scope == "global" or self.density >= 1.0 else None

    def prepare(self, experts, base, *, model=None, data=None) -> TiesContext:
        return ties_context(experts, _require_base(self, base), self.density, self.scope)

    def merge_entry(self, key: str, values: Sequence[Tensor], base: Tensor | None, context: TiesContext) -> Tensor:
        """One entry: the fused numba kernel where it applies (plain CPU float32 tensors of a
        large merge: one pass per entry instead of a dozen element-wise torch ops per slice,
        the same arithmetic), else the torch path of :meth:`merge_tensor`."""
        if base is not None and _kernels.available([base], context.entries):
            values = [values[j] for j in range(len(values))]  # read lazy sequences once
            if _kernels.available(values):
                thresholds = self._kernel_thresholds(key, values, base, context)
                return _kernels.ties_merge(values, base, thresholds, self.scaling)
        return super().merge_entry(key, values, base, context)

    def _kernel_thresholds(self, key: str, values: list[Tensor], base: Tensor, context: TiesContext) -> Tensor:
        if self.density >= 1.0:
            return base.new_zeros(len(values))
        if context.thresholds is None:  # tensor scope: this entry's exact top-k threshold
            return global_magnitude_thresholds([{key: v} for v in values], {key: base}, [key], self.density)
        return context.thresholds

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: TiesContext) -> Tensor:
        tau = experts.sub_(base)
        return base + self.scaling * ties_disjoint_merge(tau, ties_thresholds(tau, self.density, context))

    def merge_multi(self, experts, base, keys, context: TiesContext) -> StateDict | None:
        thresholds = _multi_thresholds(self.density, context, base, keys, len(experts))
        if thresholds is None:
            return None  # per-tensor thresholds: the per-entry path
        return _task_vector_multi(experts, base, keys, self.scaling, thresholds)


@register_method
class Dare(MergeMethod):
    """DARE: drop each task-vector entry with probability p, rescale survivors by 1/(1−p),
    then combine with task arithmetic or TIES.

    Args:
        drop_rate: p, in [0, 1).
        seed: seed of the drop masks (an int >= 0); each entry's mask depends only on (seed, key)
            and is drawn on the task vectors' device, so a merge is repeatable whatever the order
            in which entries are visited, on the same device type (CPU and CUDA generators draw
            different masks from one seed).
        combine: ``"task_arithmetic"``: θ₀ + λ Σ_j τ̃_j; ``"ties"``: TIES on τ̃ (trim at
            ``density``, elect, disjoint mean; the M-Loss authors' DARE baseline is
            ``density=1.0``, no trim).
        scaling: λ of the combination (None: 0.3 for task arithmetic, 1.0 for TIES).
        density: TIES trim density in [0, 1] (``combine="ties"`` only; 1.0 = no trim).
        scope: TIES trim scope (``combine="ties"`` only); a global trim sees the dropped τ̃.
        rng: how the masks are drawn (:mod:`merging.methods.dare`). ``"auto"``: with
            ``combine="task_arithmetic"``, merges of plain CPU float32 tensors large enough for
            the numba kernels (:func:`~merging.methods._kernels.available`, the dispatch TIES
            uses) draw from a counter-based hash inside one fused loop (drop, rescale and sum in
            one pass: about the cost of task arithmetic); everything else (CUDA, fp16, bf16,
            fp64, small models, ``combine="ties"``) draws with ``torch.rand`` on the tensors'
            device. ``"torch"``: ``torch.rand`` everywhere; on the CPU these are FusionBench's
            masks when its generator is seeded per key (``benchmarks/peers.py``). The two
            draw different masks from one seed, each deterministic: the same (seed, key, path,
            device type) gives the same masks, in memory or streamed.
    """

    name = "dare"
    paper = "https://arxiv.org/abs/2311.03099"
    requires_base = True

    def __init__(
        self,
        drop_rate: float = 0.9,
        seed: int = 0,
        combine: Literal["task_arithmetic", "ties"] = "task_arithmetic",
        scaling: float | None = None,
        density: float = 1.0,
        scope: Literal["global", "tensor"] = "global",
        rng: Literal["auto", "torch"] = "auto",
    ) -> None:
        owner = self.name
        drop_rate = check_float("drop_rate", drop_rate, low=0.0, high=1.0, high_open=True, owner=owner)
        seed = check_int("seed", seed, minimum=0, owner=owner)
        combine = check_choice("combine", combine, ("task_arithmetic", "ties"), owner=owner)
        if combine == "task_arithmetic" and density != 1.0:
            raise ValueError("dare: density applies to combine='ties' only")
        if scaling is None:
            scaling = 0.3 if combine == "task_arithmetic" else 1.0
        self.density = check_float("density", density, low=0.0, high=1.0, owner=owner)
        self.scaling = check_float("scaling", scaling, owner=owner)
        self.scope = check_choice("scope", scope, ("global", "tensor"), owner=owner)
        self.drop_rate = drop_rate
        self.seed = seed
        self.combine = combine
        self.rng = check_choice("rng", rng, ("auto", "torch"), owner=owner)

    def drop(self, key: str, tau: Tensor) -> Tensor:
        """τ̃ of one entry: :func:`~merging.methods.dare.dare_drop` with this entry's mask."""
        return dare_drop(tau, self.drop_rate, entry_generator(self.seed, key, tau.device))

    def chunk_size(self) -> None:
        # One draw per whole entry, so the masks do not depend on slicing.
        return None

    def prepare(self, experts, base, *, model=None, data=None) -> TiesContext:
        base = _require_base(self, base)
        if self.combine == "task_arithmetic":
            return ties_context(experts, base, 1.0, self.scope)  # the entry count only
        return ties_context(experts, base, self.density, self.scope, drop=self.drop)

    def merge_entry(self, key: str, values: Sequence[Tensor], base: Tensor | None, context: TiesContext) -> Tensor:
        """One entry: the fused hash-RNG kernel where ``rng="auto"`` selects it (task-arithmetic
        combine, plain CPU float32 tensors of a large merge), else the torch path of
        :meth:`merge_tensor`."""
        if (
            self.rng == "auto"
            and self.combine == "task_arithmetic"
            and base is not None
            and _kernels.available([base], context.entries)
        ):
            values = [values[j] for j in range(len(values))]  # read lazy sequences once
            if _kernels.available(values):
                return _kernels.dare_merge(values, base, entry_seed(self.seed, key), self.drop_rate, self.scaling)
        return super().merge_entry(key, values, base, context)

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: TiesContext) -> Tensor:
        tau = self.drop(key, experts.sub_(base))
        if self.combine == "task_arithmetic":
            return base + self.scaling * tau.sum(dim=0)
        return base + self.scaling * ties_disjoint_merge(tau, ties_thresholds(tau, self.density, context))

    def merge_multi(self, experts, base, keys, context: TiesContext) -> StateDict | None:
        """Masks drawn with ``torch.rand`` per entry (whatever ``rng``: the hash draws are the
        CPU kernels'), the rest as task arithmetic or TIES on the multi-tensor path."""
        thresholds = None
        if self.combine == "ties":
            thresholds = _multi_thresholds(self.density, context, base, keys, len(experts))
            if thresholds is None:
                return None
        return _task_vector_multi(experts, base, keys, self.scaling, thresholds, dare=self)


def _multi_thresholds(
    density: float, context: TiesContext, base: Mapping[str, Tensor], keys: Sequence[str], num_experts: int
) -> Tensor | None:
    """TIES's ``(K,)`` trim thresholds for the multi-tensor path: 0 at density 1 (every non-zero
    entry kept), the global ones, or None for per-tensor thresholds (not multi-tensor)."""
    if density >= 1.0:
        return torch.zeros(num_experts, device=base[keys[0]].device) if keys else None
    return context.thresholds


__all__ = [
    "DEFAULT_CHUNK",
    "Dare",
    "TaskArithmetic",
    "TiesContext",
    "TiesMerging",
    "WeightAveraging",
    "dare_drop",
    "disjoint_mean",
    "elect_sign",
    "entry_generator",
    "global_magnitude_thresholds",
    "keep_count",
    "magnitude_threshold",
    "ties_disjoint_merge",
    "trim_to_density",
]
