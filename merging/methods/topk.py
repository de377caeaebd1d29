"""Exact top-k magnitude thresholds of task vectors: per tensor, and global over a whole
task vector without concatenating it.

TIES-Merging (Yadav et al., NeurIPS 2023, https://arxiv.org/abs/2306.01708) keeps, per
expert, the ⌊density · N⌋ entries of largest |τ_j|. The threshold is the n-th largest
magnitude; everything here computes it exactly (ties at the threshold are then kept by the
trim). The global search reads each tensor slice by slice; CPU float32 merges of large
models scan with the fused numba loop (:func:`merging.methods._kernels.scan_bracket`),
everything else with torch, on the tensors' device. On a GPU it reads groups of entries
instead (:func:`_multi_tensor_thresholds`): a few operators per group, a host read per group
and per round instead of several per entry and slice, and the same thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from merging import _multitensor
from merging.methods import _kernels
from merging.state import accumulation_dtype


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
    transform: Callable[[str, Tensor], Tensor] | None = None,
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
    if _multitensor.applies([base[keys[0]]]):  # one tensor: the state dicts may read on access (streaming)
        return _multi_tensor_thresholds(experts, base, keys, n, total, transform, sample_target)

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
            step = _THRESHOLD_CHUNK if transform is None else max(numel, 1)
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


_SEARCH_ENTRIES = 1 << 27
"""Magnitudes (all experts together) in one group of the multi-tensor search: 512 MB of float32
and three boolean masks of a quarter of that (ViT-B/32, K = 4: three groups, three host reads)."""


def _multi_tensor_thresholds(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    keys: Sequence[str],
    n: int,
    total: int,
    transform: Callable[[str, Tensor], Tensor] | None,
    sample_target: int,
) -> Tensor:
    """:func:`global_magnitude_thresholds` on the multi-tensor (GPU) path: the same bracket
    and exact selection, with O(1) operators per group of entries instead of per entry and
    slice, and host reads only where sizes depend on the data.

    The sample is gathered with one ``cat`` per dtype and its order statistics selected over
    all experts at once (:func:`_multi_tensor_bracket`). Each round of the pass then reads the
    entries in groups (:func:`merging._multitensor.plan`) of ``(K, n)`` magnitudes: the counts
    above the brackets, and the members (one ``nonzero``: one host read per group); the
    thresholds of every expert are then selected on the device from the members sorted by
    expert and magnitude, and one host read per round says whether a bracket missed (the
    missed ones widen as in the per-entry search, and the round repeats). The thresholds are
    the exact order statistics, equal to the per-entry search's.
    """
    num_experts = len(experts)
    device = base[keys[0]].device
    lo, hi = _multi_tensor_bracket(experts, base, keys, n, total, sample_target if transform is None else 0)
    thresholds = torch.full((num_experts,), math.inf, device=device)
    done = torch.zeros(num_experts, dtype=torch.bool, device=device)
    missed = torch.zeros(num_experts, dtype=torch.bool, device=device)
    groups = _multitensor.plan(keys, base, max(1, _SEARCH_ENTRIES // num_experts), split=transform is None)
    while True:
        above = torch.zeros(num_experts, dtype=torch.long, device=device)
        lo_c, hi_c = lo.unsqueeze(1), hi.unsqueeze(1)
        rows, values = [], []
        for group in groups:
            a = _group_magnitudes(experts, base, group, transform)
            above += torch.gt(a, hi_c).sum(dim=1)
            inside = torch.ge(a, lo_c).logical_and_(torch.le(a, hi_c))
            where = inside.nonzero()  # the group's one host read: how many members
            if where.shape[0]:
                rows.append(where[:, 0])
                values.append(a[where[:, 0], where[:, 1]])
        rank = n - above  # the threshold is the rank-th largest member
        counts = torch.zeros(num_experts, dtype=torch.long, device=device)
        if values:
            member_rows, members = (torch.cat(rows), torch.cat(values)) if len(rows) > 1 else (rows[0], values[0])
            counts.index_add_(0, member_rows, torch.ones_like(member_rows))
            # Members by expert, each expert's in decreasing magnitude (two stable sorts).
            members, order = torch.sort(members, descending=True, stable=True)
            order = torch.sort(member_rows[order], stable=True).indices
            members = members[order]
            start = counts.cumsum(0).sub_(counts)
            picked = members[start.add(rank).sub_(1).clamp_(0, members.numel() - 1)]
        else:
            picked = thresholds
        found = rank.ge(1).logical_and_(rank.le(counts))
        thresholds = torch.where(found.logical_and(done.logical_not()), picked, thresholds)
        done.logical_or_(found)
        if bool(done.all()):  # the round's host read
            return thresholds
        # A missed bracket opens the side the n-th largest value fell beyond (a second miss
        # opens both: the pass is then unfiltered and cannot miss).
        miss = done.logical_not()
        hi = hi.masked_fill(miss.logical_and(rank.lt(1).logical_or_(missed)), math.inf)
        lo = lo.masked_fill(miss.logical_and(rank.ge(1).logical_or_(missed)), 0.0)
        missed.logical_or_(miss)


def _group_magnitudes(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    group: Sequence[_multitensor.Piece],
    transform: Callable[[str, Tensor], Tensor] | None,
) -> Tensor:
    """``(K, n)`` float32 |τ| of a group's pieces (the magnitudes the per-entry search reads)."""
    num_experts = len(experts)
    if transform is not None:  # whole entries: the transform draws per entry
        parts = []
        for piece in group:
            acc = accumulation_dtype(base[piece.key].dtype)
            tau = torch.stack([e[piece.key] for e in experts]).to(acc).sub_(base[piece.key].to(acc))
            parts.append(transform(piece.key, tau).reshape(num_experts, -1).abs_().float())
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    dtype = base[group[0].key].dtype
    acc = accumulation_dtype(dtype)
    stacked = torch.cat([v for e in experts for v in _multitensor.views(e, group)])
    flat_base = _multitensor.views(base, group)
    flat_base = torch.cat(flat_base) if len(flat_base) > 1 else flat_base[0]
    if dtype != acc:
        stacked, flat_base = stacked.to(acc), flat_base.to(acc)
    a = stacked.view(num_experts, -1).sub_(flat_base).abs_()
    return a if a.dtype == torch.float32 else a.float()


def _multi_tensor_bracket(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    keys: Sequence[str],
    n: int,
    total: int,
    sample_target: int,
) -> tuple[Tensor, Tensor]:
    """:func:`_sample_bracket` on the multi-tensor path: the same sample (the same runs of
    every tensor, gathered by one ``cat`` per dtype) and the same two order statistics,
    selected on the whole ``(K, m)`` sample at once (no host read)."""
    num_experts = len(experts)
    device = base[keys[0]].device
    lo = torch.zeros(num_experts, device=device)
    hi = torch.full((num_experts,), math.inf, device=device)
    run = _SAMPLE_RUN
    period = (total // sample_target) * run if sample_target > 0 else 0
    if period <= run:
        return lo, hi
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key in keys:
        if base[key].numel() // period:
            by_dtype.setdefault(base[key].dtype, []).append(key)

    def runs(state: Mapping[str, Tensor], key: str) -> Tensor:
        whole = state[key].numel() // period * period
        return state[key].reshape(-1)[:whole].view(-1, period)[:, :run]

    pieces = []
    for dtype, dtype_keys in by_dtype.items():
        acc = accumulation_dtype(dtype)
        sample = torch.cat([runs(e, key) for e in experts for key in dtype_keys]).to(acc)
        flat_base = torch.cat([runs(base, key) for key in dtype_keys]).to(acc)
        tau = sample.view(num_experts, -1, run).sub_(flat_base).abs_()
        pieces.append(tau.view(num_experts, -1).float())
    m = sum(p.shape[1] for p in pieces)
    if m < 2 * run:
        return lo, hi
    sample = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    q = 1.0 - n / total
    margin = 4.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 2.0 / m
    lo_rank, hi_rank = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    if 1 <= lo_rank <= m:
        lo = sample.kthvalue(lo_rank, dim=1).values
    if 1 <= hi_rank <= m:
        hi = sample.kthvalue(hi_rank, dim=1).values
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


__all__ = ["global_magnitude_thresholds", "keep_count", "magnitude_threshold"]
