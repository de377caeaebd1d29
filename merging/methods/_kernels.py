"""Fused CPU kernels (numba) for the two passes of global TIES.

The torch implementation of TIES (:func:`merging.methods.ties.ties_disjoint_merge`, the
threshold pass of :func:`merging.methods.topk.global_magnitude_thresholds`) is a chain of
about a dozen element-wise operations over ``(K, chunk)`` slices: each one reads and writes
the slice again. Here each pass is one loop that reads every expert entry once and keeps the
per-entry state in registers/cache-sized buffers, compiled by numba in
:mod:`merging.methods._numba_kernels` (``parallel=True`` over blocks of ``BLOCK`` entries,
``cache=True`` so the compilation, a few seconds, happens once per machine).

Scope: CPU float32 tensors of merges with at least :data:`MIN_ENTRIES` entries per expert;
everything else (CUDA tensors, fp16, bf16, fp64, small models) takes the torch path, which
computes the same thing. Without numba installed, or with the environment variable
``MERGING_NO_NUMBA=1``, the torch path is used everywhere; :func:`disabled` switches the
kernels off within a block (the tests compare the two paths).

Threads: the kernels run on ``torch.get_num_threads()`` threads (capped by numba's own
maximum), so ``torch.set_num_threads`` governs both paths.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from merging import _multitensor

# numba is a dependency; the torch path is kept for platforms without its wheels. It is
# imported on first use (it loads LLVM: about 110 MB of resident memory).
_HAVE_NUMBA = importlib.util.find_spec("numba") is not None

_CAPACITY = 256
"""Bracket members stored per block and expert before the key is rescanned with more room."""

MIN_ENTRIES = 1 << 20
"""Smallest task vector (entries per expert, whole model) merged with the kernels: below it
the torch path is as fast, and importing numba and loading the compiled loops (0.5–0.9 s
in a new process) would dominate."""

_PLAIN = (torch.Tensor, torch.nn.Parameter)
"""Tensor types whose memory numpy reads (subclasses may hold no data: fake, meta-like)."""

_enabled = _HAVE_NUMBA and os.environ.get("MERGING_NO_NUMBA", "") in ("", "0")


def available(tensors: Sequence[Tensor], total: int | None = None) -> bool:
    """The one dispatch between the kernels and the torch path: whether the kernels apply.

    They do when numba is present and enabled, every tensor is a plain CPU float32 tensor
    (not a subclass such as a fake or distributed tensor, whose data numpy cannot read), and
    (when ``total``, the entries per expert of the whole merge, is given) the merge has at
    least :data:`MIN_ENTRIES` entries. Tensors on any other device take the torch path, and
    so does every merge inside :func:`merging._multitensor.forced` (the GPU path on the CPU).
    """
    if (total is not None and total < MIN_ENTRIES) or _multitensor.is_forced():
        return False
    return _enabled and all(t.device.type == "cpu" and t.dtype == torch.float32 and type(t) in _PLAIN for t in tensors)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the enclosed merges on the torch path (for comparisons and tests)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


@contextlib.contextmanager
def _threads() -> Iterator[None]:
    """Run the kernels on torch's intra-op thread count. numba's OpenMP layer shares the
    OpenMP runtime with torch, so setting numba's count also sets torch's: torch's is put
    back afterwards."""
    import numba

    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _compiled():
    from merging.methods import _numba_kernels

    return _numba_kernels


def _flat_arrays(values: Sequence[Tensor]) -> tuple[np.ndarray, ...]:
    """The values' flat float32 arrays (views when contiguous), as a tuple: numba compiles
    (and caches on disk) one specialisation per number of experts, and a tuple, unlike a
    typed list, costs no compilation per process."""
    return tuple(v.detach().reshape(-1).numpy() for v in values)


def scan_bracket(values: Sequence[Tensor], base: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, list[Tensor]]:
    """One entry's contribution to the global threshold search, in one pass.

    Args:
        values: the K experts' values of the entry (CPU float32, any shape).
        base: θ₀'s value.
        lo: ``(K,)`` lower ends of the brackets.
        hi: ``(K,)`` upper ends.

    Returns:
        ``(K,)`` int64 counts of |τ_j| > hi_j, and per expert the values with
        lo_j ≤ |τ_j| ≤ hi_j (float32, in no particular order).
    """
    kernels = _compiled()
    experts = _flat_arrays(values)
    b = base.detach().reshape(-1).numpy()
    blocks = (b.size + kernels.BLOCK - 1) // kernels.BLOCK
    k = len(values)
    lo_np = lo.to(torch.float32).numpy()
    hi_np = hi.to(torch.float32).numpy()
    above = np.empty((k, blocks), np.int64)
    counts = np.empty((k, blocks), np.int64)
    capacity = min(_CAPACITY, kernels.BLOCK)
    with _threads():
        while True:
            members = np.empty((k, blocks, capacity), np.float32)
            kernels._scan_kernel(experts, b, lo_np, hi_np, above, counts, members)
            needed = int(counts.max()) if counts.size else 0
            if needed <= capacity:
                break
            capacity = needed  # a crowded bracket (e.g. a wide one): rescan with room for all
    kept = np.arange(capacity) < counts[:, :, None]
    inside = [torch.from_numpy(members[j][kept[j]]) for j in range(k)]
    return torch.from_numpy(above.sum(axis=1)), inside


def ties_merge(values: Sequence[Tensor], base: Tensor, thresholds: Tensor, scaling: float) -> Tensor:
    """θ₀ + λ · TIES(trim at ``thresholds``, elect, disjoint mean) of one entry, in one pass.

    The same arithmetic as :func:`merging.methods.ties.ties_disjoint_merge` (float32 sums
    over the experts in order), so the two paths agree to rounding.

    Args:
        values: the K experts' values (CPU float32).
        base: θ₀'s value.
        thresholds: ``(K,)`` magnitude thresholds (``+inf``: expert j keeps nothing).
        scaling: λ.

    Returns:
        The merged value, shaped like ``base``.
    """
    experts = _flat_arrays(values)
    b = base.detach().reshape(-1).numpy()
    smallest = float(np.nextafter(np.float32(0), np.float32(1)))
    floors = thresholds.to(torch.float32).clamp(min=smallest).numpy()
    out = np.empty_like(b)
    if b.size:
        with _threads():
            _compiled()._ties_kernel(experts, b, floors, np.float32(scaling), out)
    return torch.from_numpy(out).reshape(base.shape)


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele, Lea, Flood 2014) on a Python int, mod 2⁶⁴."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def dare_streams(stream_seed: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-expert keys of DARE's hash draws for one entry: ``(lo, hi)``, two ``(K,)``
    uint64 arrays of 32-bit halves of ``splitmix64(splitmix64(stream_seed) + j)``.

    Args:
        stream_seed: the entry's seed (:func:`merging.methods.dare.entry_seed`).
        num_experts: K.
    """
    root = _splitmix64(stream_seed)
    keys = [_splitmix64((root + j) & 0xFFFFFFFFFFFFFFFF) for j in range(num_experts)]
    lo = np.array([k & 0xFFFFFFFF for k in keys], np.uint64)
    hi = np.array([k >> 32 for k in keys], np.uint64)
    return lo, hi


def dare_threshold(drop_rate: float) -> np.uint64:
    """The 32-bit draw below which an entry is dropped: ⌈p · 2³²⌉ (keep rate 1 − ⌈p · 2³²⌉ / 2³²,
    within 2⁻³² of 1 − p)."""
    return np.uint64(math.ceil(drop_rate * 2.0**32))


def dare_merge(values: Sequence[Tensor], base: Tensor, stream_seed: int, drop_rate: float, scaling: float) -> Tensor:
    """θ₀ + λ · Σ_j drop(τ_j) / (1 − p) of one entry, in one pass, the masks drawn by a
    counter-based hash of (``stream_seed``, expert j, entry index) (:func:`dare_masks`).

    Args:
        values: the K experts' values (CPU float32).
        base: θ₀'s value.
        stream_seed: the entry's seed.
        drop_rate: p in [0, 1).
        scaling: λ.

    Returns:
        The merged value, shaped like ``base``.
    """
    experts = _flat_arrays(values)
    b = base.detach().reshape(-1).numpy()
    lo, hi = dare_streams(stream_seed, len(values))
    out = np.empty_like(b)
    if b.size:
        rescale = np.float32(1.0 / (1.0 - drop_rate))
        with _threads():
            _compiled()._dare_kernel(experts, b, lo, hi, dare_threshold(drop_rate), rescale, np.float32(scaling), out)
    return torch.from_numpy(out).reshape(base.shape)


def dare_masks(numel: int, num_experts: int, stream_seed: int, drop_rate: float) -> Tensor:
    """``(K, numel)`` bool: the keep masks :func:`dare_merge` draws for an entry of ``numel``
    values (for tests and inspection)."""
    lo, hi = dare_streams(stream_seed, num_experts)
    keep = np.empty((num_experts, numel), np.bool_)
    with _threads():
        _compiled()._dare_masks_kernel(numel, lo, hi, dare_threshold(drop_rate), keep)
    return torch.from_numpy(keep)
