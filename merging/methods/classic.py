"""Classic merges: weight averaging, task arithmetic, TIES and DARE.

Semantics follow ``spec/classic.md``; notation: pretrained θ₀, experts θ_1..θ_K, task
vectors τ_j = θ_j − θ₀, merge weights w_j, scaling λ. The per-tensor steps are pure
functions on stacked tensors ``(K, *shape)`` named after the papers (``trim_to_density``,
``elect_sign``, ``disjoint_mean``, ``dare_drop``); the classes only choose and combine them.

Devices: every tensor made here takes its device from the inputs, and a merge returns its
output on the input device. The result is the same on every device up to float rounding
(reductions may sum in another order), except DARE's masks: a CUDA generator (Philox) draws
other numbers than a CPU one (Mersenne Twister) from the same seed, so the same seed gives
the same masks on the same device type, not across device types. CPU float32 TIES of large
models runs fused numba kernels (:mod:`merging.methods._kernels`, one dispatch:
:func:`~merging.methods._kernels.available`); every other device and dtype takes the torch
path, which computes the same thing.

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

from merging._validation import check_choice, check_float, check_int, check_weights
from merging.methods import _kernels
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


def dare_drop(tau: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """DARE *drop and rescale*: drop each entry with probability p, rescale survivors by 1/(1−p).

    Args:
        tau: ``(K, *shape)`` task vectors.
        drop_rate: p in [0, 1).
        generator: the random source, on ``tau``'s device (:func:`entry_generator`): the
            mask is drawn there, so the same seed gives the same mask on the same device
            type (CPU and CUDA generators draw different numbers).

    Returns:
        Same shape as ``tau``.
    """
    if drop_rate == 0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, device=tau.device) >= drop_rate
    return tau * keep / (1.0 - drop_rate)


def entry_generator(seed: int, key: str, device: torch.device | str | None = None) -> torch.Generator:
    """A generator seeded by (seed, key): the same entry gets the same draw whatever the
    order or subset of entries merged (streamed merges, two-pass global methods).

    Args:
        seed: the method's seed.
        key: the state-dict key.
        device: where the draws are made (the task vectors' device); None: the CPU.
    """
    generator = torch.Generator(device=device) if device is not None else torch.Generator()
    return generator.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


# --------------------------------------------------------- global threshold, streamed


_SAMPLE_RUN = 8
"""Consecutive entries per sampled run of the threshold bracket (a cache line of fp32)."""

_BRACKET_BLOCK = 32
"""Block size of the bracket search: only blocks holding a bracket member are compacted."""

_THRESHOLD_CHUNK = 1 << 18
"""Entries per expert in one slice of the threshold pass."""


def global_magnitude_thresholds(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    keys: Sequence[str],
    density: float,
    transform=None,
    sample_target: int = 1 << 18,
) -> Tensor:
    """Exact per-expert global magnitude threshold over whole task vectors, without
    concatenating them.

    The n-th largest |τ_j| over all ``keys`` (n = ⌊density · N⌋) is found in two passes:
    a sample of every tensor (runs of a few consecutive entries at a fixed period)
    brackets it between two sample order statistics [lo, hi]; one pass then counts the
    entries above ``hi`` and gathers the few inside the bracket, and the exact threshold is
    selected among those. The pass keeps boolean work off the bulk of the data: it counts
    with float comparisons, finds the blocks of ``_BRACKET_BLOCK`` entries whose
    ``min |a − (lo+hi)/2|`` could fall in the bracket, and compacts those blocks only (with
    exact ``lo ≤ a ≤ hi`` tests, so the block filter never decides membership). If the
    bracket misses (rare: adversarially structured tensors), it widens and the pass repeats
    for the experts concerned, so the result is always exact. Peak extra memory: a few
    ``(K, _THRESHOLD_CHUNK)`` slices plus the bracket's contents.

    Args:
        experts: θ_1..θ_K.
        base: θ₀.
        keys: the floating-point entries forming the task vector.
        density: fraction kept per expert.
        transform: optional ``f(key, tau (K, *shape)) -> tau`` applied before thresholding
            (DARE's drop-and-rescale, which must be deterministic per key); entries are
            then taken whole and the sample is skipped.
        sample_target: about how many sampled entries per expert bracket the threshold.

    Returns:
        ``(K,)`` float32 thresholds (``+inf`` when nothing is kept), on the device of the
        first key's base tensor (every tensor made here is; torch's default device when ``keys``
        is empty).
    """
    num_experts = len(experts)
    device = base[keys[0]].device if keys else None
    total = sum(base[key].numel() for key in keys)
    n = keep_count(total, density)
    if n == 0 or total == 0:
        return torch.full((num_experts,), math.inf, device=device)

    def magnitudes(key: str, flats: list[Tensor], flat_base: Tensor, start: int, stop: int, out: Tensor) -> Tensor:
        """|τ| of entries [start, stop) of one entry as float32 ``(K, stop − start)``."""
        if transform is not None:
            acc = accumulation_dtype(base[key].dtype)
            tau = torch.stack([e[key] for e in experts]).to(acc).sub_(base[key].to(acc))
            return transform(key, tau).reshape(num_experts, -1).abs_().float()
        if flat_base.dtype == torch.float32:
            # Copy and subtract in one pass per expert, into the reused slice buffer.
            for j, flat in enumerate(flats):
                torch.sub(flat[start:stop], flat_base[start:stop], out=out[j])
            return out.abs_()
        acc = accumulation_dtype(flat_base.dtype)
        tau = torch.stack([f[start:stop] for f in flats]).to(acc).sub_(flat_base[start:stop].to(acc))
        return tau.abs_().float()

    lo, hi = _sample_bracket(experts, base, keys, n, total, sample_target if transform is None else 0)
    thresholds = torch.empty(num_experts, device=device)
    misses = [False] * num_experts
    pending = list(range(num_experts))
    while pending:
        rows = torch.tensor(pending, device=device)
        lo_p, hi_p = lo[rows, None], hi[rows, None]
        above = torch.zeros(len(pending), dtype=torch.float64, device=device)
        inside: list[list[Tensor]] = [[] for _ in pending]
        for key in keys:
            if transform is None and _kernels.available([base[key]], total):
                values = [experts[j][key] for j in pending]
                if _kernels.available(values):  # one fused pass (numba)
                    counts, members = _kernels.scan_bracket(values, base[key], lo[rows], hi[rows])  # CPU
                    above += counts
                    for row, found in enumerate(members):
                        if found.numel():
                            inside[row].append(found)
                    continue
            flat_base = base[key].reshape(-1)
            flats = [e[key].reshape(-1) for e in experts]
            numel = flat_base.numel()
            step = _THRESHOLD_CHUNK if transform is None else numel
            buffer = flat_base.new_empty(num_experts, min(step, numel), dtype=torch.float32)
            scratch = flat_base.new_empty(len(pending), min(step, numel), dtype=torch.float32)
            for start in range(0, numel, step):
                stop = min(start + step, numel)
                a = magnitudes(key, flats, flat_base, start, stop, buffer[:, : stop - start])
                if len(pending) < num_experts:
                    a = a[rows]
                # Slice counts stay below 2^24, so the float32 sum is exact.
                above += torch.gt(a, hi_p, out=scratch[:, : stop - start]).sum(dim=1)
                for row, values in enumerate(_bracket_members(a, lo_p, hi_p, scratch[:, : stop - start])):
                    if values.numel():
                        inside[row].append(values)
        still = []
        for row, j in enumerate(pending):
            cand = torch.cat(inside[row]) if inside[row] else torch.empty(0, device=device)
            r = n - int(above[row])
            if 1 <= r <= cand.numel():
                thresholds[j] = torch.kthvalue(cand, cand.numel() - r + 1).values
            else:
                # The bracket missed the n-th largest value: open the side it fell beyond
                # (a second miss opens both: the pass is then unfiltered and cannot miss).
                if r < 1 or misses[j]:
                    hi[j] = math.inf
                if r >= 1 or misses[j]:
                    lo[j] = 0.0
                misses[j] = True
                still.append(j)
        pending = still
    return thresholds


def _sample_bracket(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    keys: Sequence[str],
    n: int,
    total: int,
    sample_target: int,
) -> tuple[Tensor, Tensor]:
    """``(K,)`` bounds [lo, hi] that hold the n-th largest |τ_j| with high probability:
    sample order statistics 4 standard errors either side of the target quantile. The
    sample is every ``period``-th run of :data:`_SAMPLE_RUN` consecutive entries, so it reads
    a small fraction of memory. Without a sample (small models): [0, +inf]."""
    num_experts = len(experts)
    device = base[keys[0]].device if keys else None
    run = _SAMPLE_RUN
    period = (total // sample_target) * run if sample_target > 0 else 0
    pieces = []
    if period > run:
        for key in keys:
            numel = base[key].numel()
            whole = numel // period * period
            if whole == 0:
                continue
            acc = accumulation_dtype(base[key].dtype)
            runs = [e[key].reshape(-1)[:whole].view(-1, period)[:, :run] for e in experts]
            flat_base = base[key].reshape(-1)[:whole].view(-1, period)[:, :run].to(acc)
            tau = torch.stack(runs).to(acc).sub_(flat_base)
            pieces.append(tau.abs_().reshape(num_experts, -1).float())
    m = sum(p.shape[1] for p in pieces)
    if m < 2 * run:
        return torch.zeros(num_experts, device=device), torch.full((num_experts,), math.inf, device=device)
    sample = torch.cat(pieces, dim=1)
    q = 1.0 - n / total
    margin = 4.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 2.0 / m
    lo_rank, hi_rank = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    lo = torch.zeros(num_experts, device=device)
    hi = torch.full((num_experts,), math.inf, device=device)
    ranks = [(rank, out) for rank, out in ((lo_rank, lo), (hi_rank, hi)) if 1 <= rank <= m]
    # Select the two order statistics within a coarse bracket from every 16th sample
    # (selection costs about 25 ns an entry: the full sample would cost more than the pass).
    coarse = sample[:, ::16]
    mc = coarse.shape[1]
    wide = 6.0 * math.sqrt(max(q * (1 - q), 1.0 / mc) / mc) + 2.0 / mc + margin
    c_lo_rank, c_hi_rank = math.floor((q - wide) * mc), math.ceil((q + wide) * mc)
    c_lo = coarse.kthvalue(c_lo_rank, dim=1).values if c_lo_rank >= 1 else torch.full_like(lo, -math.inf)
    c_hi = coarse.kthvalue(c_hi_rank, dim=1).values if c_hi_rank <= mc else torch.full_like(lo, math.inf)
    for j, row in enumerate(sample):
        within = row[(row >= c_lo[j]) & (row <= c_hi[j])]
        below = int(torch.lt(row, c_lo[j]).sum())
        for rank, out in ranks:
            if 1 <= rank - below <= within.numel():
                out[j] = within.kthvalue(rank - below).values
            else:  # the coarse bracket missed: select in the whole row
                out[j] = row.kthvalue(rank).values
    return lo, hi


def _bracket_members(a: Tensor, lo: Tensor, hi: Tensor, scratch: Tensor) -> list[Tensor]:
    """Per row of ``a`` ``(R, W)``, the values with ``lo ≤ a ≤ hi`` (``(R, 1)`` bounds).

    Only blocks of :data:`_BRACKET_BLOCK` entries whose minimum distance to the bracket's
    centre is within (slightly more than) its half width are compacted; membership itself
    is decided by the exact comparisons. ``scratch`` is a float buffer shaped like ``a``.
    """
    rows, width = a.shape
    full = width // _BRACKET_BLOCK * _BRACKET_BLOCK
    if not bool(torch.isfinite(hi).all()) or full == 0:
        mask = (a >= lo) & (a <= hi)
        return list(a[mask].split(mask.sum(dim=1).tolist()))
    mid = (lo + hi) / 2
    # Widened by the rounding of mid and of |a − mid| (a few ulps of hi), so that every
    # member's block passes the filter: a superset, never a decision.
    eps = torch.finfo(torch.float32).eps
    half = (hi - lo) * (0.5 + 2 * eps) + 4 * eps * hi + torch.finfo(torch.float32).tiny
    distance = torch.sub(a, mid, out=scratch).abs_()
    blocks = distance[:, :full].reshape(rows, -1, _BRACKET_BLOCK)
    hit = (blocks.amin(dim=2) <= half).view(-1).nonzero().squeeze(1)
    cand = a[:, :full].reshape(-1, _BRACKET_BLOCK).index_select(0, hit)
    cand_rows = hit // blocks.shape[1]
    mask = (cand >= lo[cand_rows]) & (cand <= hi[cand_rows])
    counts = torch.zeros(rows, dtype=torch.long, device=a.device).index_add_(0, cand_rows, mask.sum(dim=1))
    members = cand[mask].split(counts.tolist())
    if full == width:
        return list(members)
    tail = a[:, full:]
    tail_mask = (tail >= lo) & (tail <= hi)
    tails = tail[tail_mask].split(tail_mask.sum(dim=1).tolist())
    return [torch.cat([m, t]) for m, t in zip(members, tails)]


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
        if context is None:
            return experts.mean(dim=0)
        w = context.to(device=experts.device, dtype=experts.dtype).reshape(-1, *([1] * (experts.dim() - 1)))
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
        self.scaling = check_float("scaling", scaling, owner="task_arithmetic")

    def chunk_size(self) -> int:
        return DEFAULT_CHUNK

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: Any) -> Tensor:
        # Σ_j (θ_j − θ₀), not Σ_j θ_j − K·θ₀: the latter rounds at the scale of |θ|, which
        # for fine-tunes is hundreds of times |τ| (``experts`` is a scratch stack).
        return base + self.scaling * experts.sub_(base).sum(dim=0)


@register_method
class TiesMerging(MergeMethod):
    """TIES-Merging: θ = θ₀ + λ · disjoint_mean(elect(trim(τ))).

    Args:
        density: fraction of each task vector's entries kept by the magnitude trim, in [0, 1]
            (0 keeps nothing: the merge is θ₀).
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
        owner = self.name
        self.density = check_float("density", density, low=0.0, high=1.0, owner=owner)
        self.scaling = check_float("scaling", scaling, owner=owner)
        self.scope = check_choice("scope", scope, ("global", "tensor"), owner=owner)

    def sparsify(self, key: str, tau: Tensor) -> Tensor:
        """The step applied to τ before trimming (identity for TIES; DARE drops here)."""
        return tau

    def chunk_size(self) -> int | None:
        # Global scope is elementwise once the thresholds are known; tensor scope is not.
        return DEFAULT_CHUNK if self.scope == "global" or self.density >= 1.0 else None

    def prepare(self, experts, base, *, model=None, data=None) -> dict[str, Any]:
        base = _require_base(self, base)
        keys = [k for k, v in base.items() if is_mergeable(v)]
        entries = sum(base[k].numel() for k in keys)
        if self.scope == "tensor" or self.density >= 1.0:
            return {"thresholds": None, "entries": entries}
        thresholds = global_magnitude_thresholds(
            experts, base, keys, self.density, transform=self._transform()
        )
        return {"thresholds": thresholds, "entries": entries}

    def _transform(self):
        return None

    def merge_entry(self, key: str, values: Sequence[Tensor], base: Tensor | None, context: Any) -> Tensor:
        # CPU float32 TIES runs fused (numba, :mod:`merging.methods._kernels`): one pass per
        # entry instead of a dozen element-wise torch ops per slice. Same arithmetic.
        if self._transform() is None and base is not None and _kernels.available([base], context["entries"]):
            values = [values[j] for j in range(len(values))]  # read lazy sequences once
            if _kernels.available(values):
                thresholds = context["thresholds"]
                if self.density >= 1.0:
                    thresholds = base.new_zeros(len(values))
                elif thresholds is None:  # tensor scope: this entry's exact top-k threshold
                    thresholds = global_magnitude_thresholds(
                        [{key: v} for v in values], {key: base}, [key], self.density
                    )
                return _kernels.ties_merge(values, base, thresholds, self.scaling)
        return super().merge_entry(key, values, base, context)

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: dict[str, Any]) -> Tensor:
        tau = self.sparsify(key, experts.sub_(base))
        thresholds = context["thresholds"]
        if self.density >= 1.0:
            thresholds = torch.zeros(tau.shape[0], dtype=tau.dtype, device=tau.device)
        elif thresholds is None:
            thresholds = magnitude_threshold(tau.reshape(tau.shape[0], -1).abs(), self.density)
        return base + self.scaling * ties_disjoint_merge(tau, thresholds)


@register_method
class Dare(TiesMerging):
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
        scaling: λ of the backend (None: 0.3 for task arithmetic, 1.0 for TIES).
        density: TIES trim density in [0, 1] (``combine="ties"`` only; 1.0 = no trim).
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
        drop_rate = check_float("drop_rate", drop_rate, low=0.0, high=1.0, high_open=True, owner="dare")
        seed = check_int("seed", seed, minimum=0, owner="dare")
        combine = check_choice("combine", combine, ("task_arithmetic", "ties"), owner="dare")
        if combine == "task_arithmetic" and density != 1.0:
            raise ValueError("dare: density applies to combine='ties' only")
        if scaling is None:
            scaling = 0.3 if combine == "task_arithmetic" else 1.0
        super().__init__(density=density, scaling=scaling, scope=scope)
        self.drop_rate = drop_rate
        self.seed = seed
        self.combine = combine

    def sparsify(self, key: str, tau: Tensor) -> Tensor:
        return dare_drop(tau, self.drop_rate, entry_generator(self.seed, key, tau.device))

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
    "ties_disjoint_merge",
    "trim_to_density",
]
