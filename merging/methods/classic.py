"""Classic merges: weight averaging, task arithmetic, TIES and DARE.

Semantics follow ``spec/classic.md``; notation: pretrained θ₀, experts θ_1..θ_K, task
vectors τ_j = θ_j − θ₀, merge weights w_j, scaling λ. The per-tensor steps are pure
functions on stacked tensors ``(K, *shape)`` named after the papers (``trim_to_density``,
``elect_sign``, ``disjoint_mean``, ``dare_drop``); the classes only choose and combine them.

Papers:
    - Model soups, Wortsman et al., ICML 2022: https://arxiv.org/abs/2203.05482
    - Task arithmetic, Ilharco et al., ICLR 2023: https://arxiv.org/abs/2212.04089
    - TIES-Merging, Yadav et al., NeurIPS 2023: https://arxiv.org/abs/2306.01708
    - DARE, Yu et al., ICML 2024: https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from merging.methods.base import MergeMethod, register_method
from merging.state import accumulation_dtype, is_mergeable

# --------------------------------------------------------------------------- pure steps


DEFAULT_CHUNK = 1 << 16
"""Entries per expert in one slice of an elementwise merge: K slices stay cache-sized."""


def keep_count(numel: int, density: float) -> int:
    """How many entries a density keeps: ⌊density · numel⌋ (the spec's rounding)."""
    return int(math.floor(density * numel + 1e-9))


def magnitude_threshold(magnitudes: Tensor, density: float) -> Tensor:
    """Per-row magnitude threshold keeping the ``density`` fraction of largest entries.

    Args:
        magnitudes: |τ| of shape ``(K, N)``.
        density: fraction kept, in [0, 1].

    Returns:
        ``(K,)`` thresholds: the n-th largest magnitude per row, n = ⌊density·N⌋;
        ``+inf`` when n = 0 (nothing kept).
    """
    k, numel = magnitudes.shape
    n = keep_count(numel, density)
    if n == 0:
        return torch.full((k,), math.inf, dtype=magnitudes.dtype, device=magnitudes.device)
    return torch.kthvalue(magnitudes, numel - n + 1, dim=1).values


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


def dare_drop(tau: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """DARE *drop and rescale*: drop each entry with probability p, rescale survivors by 1/(1−p).

    Args:
        tau: ``(K, *shape)`` task vectors.
        drop_rate: p in [0, 1).
        generator: the random source (CPU generator; the mask is drawn on the CPU).

    Returns:
        Same shape as ``tau``.
    """
    if drop_rate == 0:
        return tau
    keep = torch.rand(tau.shape, generator=generator) >= drop_rate
    return tau * keep.to(tau.device) / (1.0 - drop_rate)


def entry_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded by (seed, key): the same entry gets the same draw whatever the
    order or subset of entries merged (streamed merges, two-pass global methods)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


# --------------------------------------------------------- global threshold, streamed


def global_magnitude_thresholds(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    keys: Sequence[str],
    density: float,
    transform=None,
    sample_target: int = 1 << 20,
) -> Tensor:
    """Exact per-expert global magnitude threshold over whole task vectors, without
    concatenating them.

    The n-th largest |τ_j| over all ``keys`` (n = ⌊density · N⌋) is found in two passes:
    a strided sample of every tensor brackets it between two sample quantiles; one pass
    then counts the entries above the bracket and gathers the few inside it, and the
    exact threshold is selected among those. If the bracket misses (rare: adversarially
    structured tensors), it widens and the pass repeats for the experts concerned, so the
    result is always exact. Peak extra memory: one stacked entry plus the bracket's contents.

    Args:
        experts: θ_1..θ_K.
        base: θ₀.
        keys: the floating-point entries forming the task vector.
        density: fraction kept per expert.
        transform: optional ``f(key, tau (K, *shape)) -> tau`` applied before thresholding
            (DARE's drop-and-rescale, which must be deterministic per key).
        sample_target: about how many sampled entries per expert bracket the threshold.

    Returns:
        ``(K,)`` thresholds (``+inf`` when nothing is kept).
    """
    num_experts = len(experts)
    total = sum(base[key].numel() for key in keys)
    n = keep_count(total, density)
    if n == 0 or total == 0:
        return torch.full((num_experts,), math.inf)

    def magnitude_chunks(key: str, stride: int = 1):
        """|τ| of one entry, ``(K, chunk)`` slices (every ``stride``-th entry)."""
        ref = base[key]
        acc = accumulation_dtype(ref.dtype)
        flat_base = ref.reshape(-1)[::stride]
        flats = [e[key].reshape(-1)[::stride] for e in experts]
        step = DEFAULT_CHUNK if transform is None else flat_base.numel()
        for start in range(0, flat_base.numel(), step):
            stop = min(start + step, flat_base.numel())
            tau = torch.stack([f[start:stop] for f in flats]).to(acc).sub_(flat_base[start:stop].to(acc))
            if transform is not None:
                tau = transform(key, tau)
            yield tau.abs_()

    stride = max(1, total // sample_target) if transform is None else 1
    if stride > 1:
        sample = torch.cat([c for key in keys for c in magnitude_chunks(key, stride)], dim=1).float()
        m = sample.shape[1]
        q = 1.0 - n / total
        margin = 4.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 2.0 / m
        lo = torch.quantile(sample, max(0.0, q - margin), dim=1)
        hi = torch.quantile(sample, min(1.0, q + margin), dim=1)
        lo[q - margin <= 0] = 0.0
        hi[q + margin >= 1] = math.inf
    else:
        lo = torch.zeros(num_experts)
        hi = torch.full((num_experts,), math.inf)

    thresholds = torch.empty(num_experts)
    pending = torch.arange(num_experts)
    while len(pending):
        above = torch.zeros(num_experts)
        inside: list[list[Tensor]] = [[] for _ in pending]
        everyone = len(pending) == num_experts
        lo_p, hi_p = lo[pending, None], hi[pending, None]
        for key in keys:
            for a in magnitude_chunks(key):
                a = (a if everyone else a[pending]).float()
                above[pending] += torch.gt(a, hi_p, out=torch.empty_like(a)).sum(dim=1)
                mask = (a >= lo_p) & (a <= hi_p)
                # Boolean indexing is row-major, so the values come grouped by expert.
                for row, values in enumerate(a[mask].split(mask.sum(dim=1).tolist())):
                    inside[row].append(values)
        still = []
        for pieces, j in zip(inside, pending.tolist()):
            cand = torch.cat(pieces)
            r = n - int(above[j])
            if 1 <= r <= cand.numel():
                thresholds[j] = torch.kthvalue(cand, cand.numel() - r + 1).values
            else:
                # The bracket missed the n-th largest value: open the side it fell beyond.
                if r < 1:
                    hi[j] = math.inf
                else:
                    lo[j] = 0.0
                still.append(j)
        pending = torch.tensor(still, dtype=torch.long)
    return thresholds


# ------------------------------------------------------------------------- methods


def _require_base(method: MergeMethod, base: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
    if base is None:
        raise ValueError(f"{method.name} needs base (the pretrained state dict θ₀), which was not given")
    return base


@register_method
class WeightAveraging(MergeMethod):
    """Weight averaging (uniform or weighted model soup): θ = Σ_j w_j θ_j.

    Args:
        weights: w_1..w_K, one per expert; normalised to sum to 1. None: uniform 1/K.
    """

    name = "average"
    paper = "https://arxiv.org/abs/2203.05482"

    def __init__(self, weights: list[float] | None = None) -> None:
        if weights is not None and (len(weights) == 0 or sum(weights) <= 0 or min(weights) < 0):
            raise ValueError(f"average: weights must be non-negative with a positive sum, got {weights}")
        self.weights = weights

    def chunk_size(self) -> int:
        return DEFAULT_CHUNK

    def prepare(self, experts, base, *, model=None, data=None) -> Tensor | None:
        if self.weights is None:
            return None
        if len(self.weights) != len(experts):
            raise ValueError(f"average: {len(self.weights)} weights given for {len(experts)} experts")
        w = torch.tensor(self.weights, dtype=torch.float64)
        return w / w.sum()

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: Tensor | None) -> Tensor:
        if context is None:
            return experts.mean(dim=0)
        w = context.to(experts.dtype).reshape(-1, *([1] * (experts.dim() - 1)))
        return (experts * w).sum(dim=0)


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
        self.scaling = scaling

    def chunk_size(self) -> int:
        return DEFAULT_CHUNK

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: Any) -> Tensor:
        return base + self.scaling * (experts.sum(dim=0) - experts.shape[0] * base)


@register_method
class TiesMerging(MergeMethod):
    """TIES-Merging: θ = θ₀ + λ · disjoint_mean(elect(trim(τ))).

    Args:
        density: fraction of each task vector's entries kept by the magnitude trim.
        scaling: λ.
        scope: ``"global"``: the trim threshold is over each whole task vector (the paper,
            FusionBench), found exactly without concatenating tensors
            (:func:`global_magnitude_thresholds`); ``"tensor"``: per tensor (mergekit, PEFT).

    Ties at the threshold are kept; a zero sign sum elects +; zeros never count in the mean.
    """

    name = "ties"
    paper = "https://arxiv.org/abs/2306.01708"
    requires_base = True

    def __init__(self, density: float = 0.2, scaling: float = 1.0, scope: Literal["global", "tensor"] = "global") -> None:
        _check_fraction("ties", "density", density, closed=True)
        if scope not in ("global", "tensor"):
            raise ValueError(f"ties: scope must be 'global' or 'tensor', got {scope!r}")
        self.density = density
        self.scaling = scaling
        self.scope = scope

    def sparsify(self, key: str, tau: Tensor) -> Tensor:
        """The step applied to τ before trimming (identity for TIES; DARE drops here)."""
        return tau

    def chunk_size(self) -> int | None:
        # Global scope is elementwise once the thresholds are known; tensor scope is not.
        return DEFAULT_CHUNK if self.scope == "global" or self.density >= 1.0 else None

    def prepare(self, experts, base, *, model=None, data=None) -> dict[str, Any]:
        base = _require_base(self, base)
        if self.scope == "tensor" or self.density >= 1.0:
            return {"thresholds": None}
        keys = [k for k, v in base.items() if is_mergeable(v)]
        thresholds = global_magnitude_thresholds(
            experts, base, keys, self.density, transform=self._transform()
        )
        return {"thresholds": thresholds}

    def _transform(self):
        return None

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: dict[str, Any]) -> Tensor:
        tau = self.sparsify(key, experts.sub_(base))
        if self.density < 1.0:
            tau = trim_to_density(tau, self.density, context["thresholds"])
        return base + self.scaling * disjoint_mean(tau, elect_sign(tau))


@register_method
class Dare(TiesMerging):
    """DARE: drop each task-vector entry with probability p, rescale survivors by 1/(1−p),
    then combine with task arithmetic or TIES.

    Args:
        drop_rate: p.
        seed: seed of the drop masks; each entry's mask depends only on (seed, key), so a
            merge is repeatable whatever the order in which entries are visited.
        combine: ``"task_arithmetic"``: θ₀ + λ Σ_j τ̃_j; ``"ties"``: TIES on τ̃ (trim at
            ``density``, elect, disjoint mean; the M-Loss authors' DARE baseline is
            ``density=1.0``, no trim).
        scaling: λ of the backend (None: 0.3 for task arithmetic, 1.0 for TIES).
        density: TIES trim density (``combine="ties"`` only; 1.0 = no trim).
        scope: TIES trim scope (``combine="ties"`` only).
    """

    name = "dare"
    paper = "https://arxiv.org/abs/2311.03099"

    def __init__(
        self,
        drop_rate: float = 0.9,
        seed: int = 0,
        combine: Literal["task_arithmetic", "ties"] = "task_arithmetic",
        scaling: float | None = None,
        density: float = 1.0,
        scope: Literal["global", "tensor"] = "global",
    ) -> None:
        _check_fraction("dare", "drop_rate", drop_rate, closed=False)
        if combine not in ("task_arithmetic", "ties"):
            raise ValueError(f"dare: combine must be 'task_arithmetic' or 'ties', got {combine!r}")
        if combine == "task_arithmetic" and density != 1.0:
            raise ValueError("dare: density applies to combine='ties' only")
        if scaling is None:
            scaling = 0.3 if combine == "task_arithmetic" else 1.0
        super().__init__(density=density, scaling=scaling, scope=scope)
        self.drop_rate = drop_rate
        self.seed = seed
        self.combine = combine

    def sparsify(self, key: str, tau: Tensor) -> Tensor:
        return dare_drop(tau, self.drop_rate, entry_generator(self.seed, key))

    def chunk_size(self) -> None:
        # One draw per whole entry, so the masks do not depend on slicing.
        return None

    def _transform(self):
        return self.sparsify

    def prepare(self, experts, base, *, model=None, data=None) -> dict[str, Any]:
        if self.combine == "task_arithmetic":
            _require_base(self, base)
            return {"thresholds": None}
        return super().prepare(experts, base, model=model, data=data)

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: dict[str, Any]) -> Tensor:
        if self.combine == "task_arithmetic":
            return base + self.scaling * self.sparsify(key, experts.sub_(base)).sum(dim=0)
        return super().merge_tensor(key, experts, base, context)


def _check_fraction(method: str, name: str, value: float, *, closed: bool) -> None:
    upper_ok = value <= 1.0 if closed else value < 1.0
    if not (0.0 <= value and upper_ok):
        bound = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{method}: {name} must be in {bound}, got {value}")


__all__ = [
    "Dare",
    "TaskArithmetic",
    "TiesMerging",
    "WeightAveraging",
    "dare_drop",
    "disjoint_mean",
    "elect_sign",
    "entry_generator",
    "global_magnitude_thresholds",
    "keep_count",
    "magnitude_threshold",
    "trim_to_density",
]
