"""The numba-compiled loops behind :mod:`merging.methods._kernels` (imported on first use,
so that importing the library does not load LLVM). This module imports nothing from the
project: the wrappers read :data:`BLOCK` from here."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

BLOCK = 4096
"""Entries of one key handled by one parallel task."""

_MINI = 16
"""Sub-block of the threshold scan: only sub-blocks holding a bracket member are compacted."""


@njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _scan_kernel(experts, b, lo, hi, above, counts, members):
    """Per block of BLOCK entries and expert j: count |τ_j| > hi_j into ``above[j, blk]``,
    count lo_j ≤ |τ_j| ≤ hi_j into ``counts[j, blk]`` and store the first
    ``members.shape[2]`` of those values in ``members[j, blk]``. The counting loop over
    _MINI entries is branch-free (it vectorises); only sub-blocks holding a member are
    compacted."""
    n = b.size
    num_experts = len(experts)
    capacity = members.shape[2]
    for blk in prange(counts.shape[1]):
        s0 = blk * BLOCK
        s1 = min(n, s0 + BLOCK)
        for j in range(num_experts):
            e = experts[j]
            low = lo[j]
            high = hi[j]
            n_above = 0
            n_inside = 0
            for m0 in range(s0, s1, _MINI):
                m1 = min(m0 + _MINI, s1)
                inside = 0
                for i in range(m0, m1):  # branch-free: vectorises
                    m = abs(e[i] - b[i])
                    n_above += m > high
                    inside += (m >= low) & (m <= high)
                if inside:
                    for i in range(m0, m1):
                        m = abs(e[i] - b[i])
                        if (m >= low) & (m <= high):
                            if n_inside < capacity:
                                members[j, blk, n_inside] = m
                            n_inside += 1
            above[j, blk] = n_above
            counts[j, blk] = n_inside


@njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _ties_kernel(experts, b, thresholds, scaling, out):
    """``out = b + scaling · disjoint_mean(elect(trim(τ)))`` with the four sums of
    :func:`merging.methods.ties.ties_disjoint_merge` (total, mass, kept count, sign
    balance), accumulated over the experts in order in cache-sized per-block buffers."""
    n = b.size
    num_experts = len(experts)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    two = np.float32(2.0)
    for blk in prange((n + BLOCK - 1) // BLOCK):
        s0 = blk * BLOCK
        w = min(n, s0 + BLOCK) - s0
        total = np.zeros(w, np.float32)
        mass = np.zeros(w, np.float32)
        count = np.zeros(w, np.float32)
        balance = np.zeros(w, np.float32)
        for j in range(num_experts):
            e = experts[j]
            floor = thresholds[j]
            for i in range(w):
                t = e[s0 + i] - b[s0 + i]
                m = abs(t)
                keep = one if m >= floor else zero
                t = t * keep
                total[i] += t
                mass[i] += m * keep
                count[i] += keep
                balance[i] += one if t > zero else (-one if t < zero else zero)
        for i in range(w):
            sign = one if total[i] >= zero else -one
            agreeing = max(count[i] + sign * balance[i], two)
            out[s0 + i] = b[s0 + i] + scaling * (sign * (abs(total[i]) + mass[i]) / agreeing)
