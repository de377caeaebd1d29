"""The numba-compiled loops behind :mod:`merging.methods._kernels` (imported on first use,
so that importing the library does not load LLVM). This module imports nothing from the
project: the wrappers read :data:`BLOCK` from here.

The compiled loops are cached on disk (a few seconds of compilation, once): numba writes
the cache beside this file when its folder is writable, else in the user's cache folder
(``~/.cache/numba``), or in ``NUMBA_CACHE_DIR`` when set. Where none is writable (a
read-only site-packages with a read-only or absent home: containers with a read-only root
filesystem, some cluster images), numba refuses ``cache=True`` with a ``RuntimeError``;
the loops are then compiled without a cache, in every process, with one warning that names
``NUMBA_CACHE_DIR``.
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import njit, prange

_OPTIONS = {"parallel": True, "nogil": True, "boundscheck": False}
_uncached: list[str] = []
"""Loops compiled without a disk cache (no writable cache folder was found for them)."""


def _kernel(fn):
    """``njit(parallel=True, cache=True, nogil=True, boundscheck=False)``, or the same
    without a disk cache where numba finds no writable folder for one."""
    try:
        return njit(cache=True, **_OPTIONS)(fn)
    except RuntimeError as err:
        if "no locator available" not in str(err):
            raise
    if not _uncached:
        warnings.warn(
            f"merging: numba finds no writable folder for its cache of the fused TIES/DARE kernels "
            f"(not beside {__file__}, not in the user cache folder), so they are compiled in every "
            f"process (a few seconds on the first large CPU merge). Set NUMBA_CACHE_DIR to a "
            f"writable folder to compile them once.",
            RuntimeWarning,
            stacklevel=2,
        )
    _uncached.append(fn.__name__)
    return njit(cache=False, **_OPTIONS)(fn)

BLOCK = 4096
"""Entries of one key handled by one parallel task."""

_MINI = 16
"""Sub-block of the threshold scan: only sub-blocks holding a bracket member are compacted."""


@_kernel
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


@_kernel
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


_MASK32 = np.uint64(0xFFFFFFFF)
_M1 = np.uint64(0x7FEB352D)
_M2 = np.uint64(0x846CA68B)
_S15 = np.uint64(15)
_S16 = np.uint64(16)
_S32 = np.uint64(32)


@njit(inline="always")
def _mix32(x):
    """A bijective 32-bit integer mixer (Wellons's lowbias32), on uint64 holding 32 bits."""
    x ^= x >> _S16
    x = (x * _M1) & _MASK32
    x ^= x >> _S15
    x = (x * _M2) & _MASK32
    x ^= x >> _S16
    return x


@njit(inline="always")
def _uniform32(i, lo, hi):
    """The 32-bit draw of entry ``i`` in the stream keyed by (``lo``, ``hi``):
    ``mix32(mix32((i mod 2³²) + lo) xor (hi + ⌊i / 2³²⌋))``, a counter-based hash (no state,
    so any entry's draw is computed independently of the others)."""
    x = _mix32(((i & _MASK32) + lo) & _MASK32)
    return _mix32(x ^ ((hi + (i >> _S32)) & _MASK32))


@_kernel
def _dare_kernel(experts, b, lo, hi, threshold, rescale, scaling, out):
    """``out = b + scaling · rescale · Σ_j keep_j · (e_j − b)`` with expert j's entry i kept
    when ``_uniform32(i, lo[j], hi[j]) >= threshold`` (probability 1 − threshold / 2³²),
    summed over the experts in order in cache-sized per-block buffers."""
    n = b.size
    num_experts = len(experts)
    zero = np.float32(0.0)
    for blk in prange((n + BLOCK - 1) // BLOCK):
        s0 = blk * BLOCK
        w = min(n, s0 + BLOCK) - s0
        total = np.zeros(w, np.float32)
        for j in range(num_experts):
            e = experts[j]
            key_lo = lo[j]
            key_hi = hi[j]
            for i in range(w):
                u = _uniform32(np.uint64(s0 + i), key_lo, key_hi)
                t = e[s0 + i] - b[s0 + i]
                total[i] += t if u >= threshold else zero
        for i in range(w):
            out[s0 + i] = b[s0 + i] + scaling * (rescale * total[i])


@_kernel
def _dare_masks_kernel(n, lo, hi, threshold, keep):
    """``keep[j, i] = _uniform32(i, lo[j], hi[j]) >= threshold``: the masks
    :func:`_dare_kernel` draws, for tests and for callers that need them."""
    for j in range(lo.size):
        for blk in prange((n + BLOCK - 1) // BLOCK):
            for i in range(blk * BLOCK, min(n, blk * BLOCK + BLOCK)):
                keep[j, i] = _uniform32(np.uint64(i), lo[j], hi[j]) >= threshold
