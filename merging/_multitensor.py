"""The multi-tensor code path that merges on GPUs: a whole model in a few launches.

On a GPU each operator is at least one kernel launch (about 5 µs, whatever its size) and a
read of a value on the host waits for every queued kernel. Walking a model entry by entry,
and each entry in cache-sized slices (the CPU path, tuned for caches and the numba kernels),
costs O(entries x slices x K) launches and a host read per entry, and those, not the bytes
the GPU streams, then set the time. Here the floating entries are split into a few *groups*
(one dtype each, at most :data:`GROUP_ENTRIES` entries per expert; an entry larger than that
is cut into flat slices), and every step of a merge is one ``torch._foreach_*`` operator over
a group's whole list of tensors (on CUDA it covers many tensors per launch), so a merge
dispatches O(K x groups) operators, not O(entries); a value is read on the host a handful of
times per merge, never per entry.

The path is chosen by the tensors' device (:func:`applies`): any device but the CPU. Inside
:func:`forced` it runs on CPU tensors too (torch then runs each ``_foreach_`` operator
tensor by tensor), so CPU-only tests and benchmarks check its results against the CPU path
and count what it dispatches (:class:`merging._opcount.OpCounter` counts one ``_foreach_``
operator as one kernel; on CUDA it is one launch per ~20M entries or per 30–110 tensors).

Half-precision groups run their arithmetic in float32 copies (:func:`in_dtype`) and are
written back in the experts' dtype (:class:`Outputs`), as on the CPU path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

GROUP_ENTRIES = 1 << 25
"""Entries per expert in one group (32M: 128 MB per float32 list). A group's temporaries
(a method's running sums and one task vector) are a few lists of this size; ViT-B/32
(88M parameters) is three groups."""

_forced = False


@contextlib.contextmanager
def forced() -> Iterator[None]:
    """Run the multi-tensor (GPU) path on any device within the block, CPU included: for
    tests that compare it with the CPU path and for counting its launches on a CPU-only
    machine. The fused CPU kernels (:mod:`merging.methods._kernels`) are off meanwhile, as
    they are for GPU tensors."""
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous


def is_forced() -> bool:
    """Whether a :func:`forced` block is running."""
    return _forced


def applies(tensors: Iterable[Tensor]) -> bool:
    """Whether the multi-tensor path runs for a merge of these tensors: they are all on one
    device, which is not the CPU (or any device inside :func:`forced`)."""
    device = None
    for t in tensors:
        if device is None:
            device = t.device
        elif t.device != device:
            return False
    return device is not None and (_forced or device.type != "cpu")


@dataclass(frozen=True)
class Piece:
    """Entries ``[start, stop)`` of the flattened entry ``key`` (the whole entry or a slice)."""

    key: str
    start: int
    stop: int
    whole: bool


def plan(
    keys: Sequence[str], ref: Mapping[str, Tensor], budget: int | None = None, split: bool = True
) -> list[list[Piece]]:
    """The groups of a multi-tensor pass over ``keys``: one dtype each (of ``ref``'s tensors),
    at most ``budget`` entries each (default :data:`GROUP_ENTRIES`), in key order within a
    dtype. An entry larger than the budget is cut into flat slices of ``budget`` entries
    (``split``) or forms a group of its own. Empty entries are left out."""
    groups: list[list[Piece]] = []
    open_groups: dict[torch.dtype, tuple[list[Piece], list[int]]] = {}
    budget = max(1, GROUP_ENTRIES if budget is None else budget)
    for key in keys:
        t = ref[key]
        numel = t.numel()
        if numel == 0:
            continue
        step = budget if split else numel
        for start in range(0, numel, step):
            stop = min(start + step, numel)
            piece = Piece(key, start, stop, start == 0 and stop == numel)
            group, size = open_groups.get(t.dtype, (None, None))
            if group is None or size[0] + (stop - start) > budget:
                group, size = [], [0]
                groups.append(group)
                open_groups[t.dtype] = (group, size)
            group.append(piece)
            size[0] += stop - start
    return groups


def views(state: Mapping[str, Tensor], group: Sequence[Piece]) -> list[Tensor]:
    """The group's pieces of ``state`` as flat tensors (views of contiguous entries)."""
    return [state[p.key].reshape(-1)[p.start : p.stop] for p in group]


def in_dtype(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """The tensors in ``dtype``: themselves when they are already, else fresh copies (one op)."""
    if not tensors or tensors[0].dtype == dtype:
        return tensors
    return fresh(tensors, dtype)


def fresh(tensors: list[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """New tensors holding the values of ``tensors`` in ``dtype`` (one op), free to modify."""
    out = [torch.empty_like(t, dtype=dtype or t.dtype) for t in tensors]
    torch._foreach_copy_(out, tensors)
    return out


def task_vectors(expert: list[Tensor], base: list[Tensor], base_acc: list[Tensor], acc: torch.dtype) -> list[Tensor]:
    """τ = θ − θ₀ of a group, fresh, in the accumulation dtype ``acc`` (``base_acc``: θ₀ in
    ``acc``): one op, two for half-precision experts (copied to ``acc`` first)."""
    if expert[0].dtype == acc:
        return torch._foreach_sub(expert, base_acc)
    tau = fresh(expert, acc)
    torch._foreach_sub_(tau, base_acc)
    return tau


class Outputs:
    """The merged entries, assembled from the results of groups.

    A result piece that is a whole entry in the entry's dtype becomes the entry (a view, no
    copy); the others (half-precision results computed in float32, slices of a large entry)
    are written into entries of the experts' dtype, one op per group.
    """

    def __init__(self, ref: Mapping[str, Tensor], keys: Iterable[str]) -> None:
        self.ref = ref
        self.entries: dict[str, Tensor] = {}
        for key in keys:  # empty entries are in no group
            if ref[key].numel() == 0:
                self.entries[key] = torch.empty(ref[key].shape, dtype=ref[key].dtype, device=ref[key].device)

    def put(self, group: Sequence[Piece], results: Sequence[Tensor]) -> None:
        targets, sources = [], []
        for piece, result in zip(group, results):
            ref = self.ref[piece.key]
            if piece.whole and result.dtype == ref.dtype:
                self.entries[piece.key] = result.view(ref.shape)
                continue
            if piece.key not in self.entries:
                self.entries[piece.key] = torch.empty(ref.shape, dtype=ref.dtype, device=ref.device)
            targets.append(self.entries[piece.key].view(-1)[piece.start : piece.stop])
            sources.append(result)
        if targets:
            torch._foreach_copy_(targets, sources)


def clones(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` (e.g. the integer buffers a merge copies), one op per dtype."""
    out: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for indices in by_dtype.values():
        copies = fresh([tensors[i] for i in indices])
        for i, c in zip(indices, copies):
            out[i] = c
    return out  # type: ignore[return-value]


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every value of every tensor is finite, with one host read.

    The largest magnitude of each tensor (``_foreach_norm`` with ord=inf, one op per dtype,
    NaN propagating) is finite exactly when every value is.
    """
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(t)
    if not by_dtype:
        return True
    maxima = [torch.stack(torch._foreach_norm(ts, ord=math.inf)) for ts in by_dtype.values()]
    largest = torch.cat(maxima) if len(maxima) > 1 else maxima[0]
    return bool(torch.lt(largest, math.inf).all())  # NaN < inf is False


__all__ = [
    "GROUP_ENTRIES",
    "Outputs",
    "Piece",
    "all_finite",
    "applies",
    "clones",
    "forced",
    "fresh",
    "in_dtype",
    "is_forced",
    "plan",
    "task_vectors",
]
