"""Count the tensor operations a piece of code dispatches, and those that make the host wait.

A GPU merge or monitor step is slow for two reasons a CPU can already see: many small
kernels (each dispatched operator is at least one launch, a few microseconds on a GPU,
whatever its size) and host-device synchronisations (each one drains the device's queue
and stops the launches behind it). :class:`OpCounter` counts both by operator name while
code runs on any device, so the CPU tests and benchmarks can hold the number of launches
and syncs of a GPU code path without a GPU.

A *sync* is an operator that, on a CUDA tensor, makes the host wait for the device: reading
a value on the host (``item()``, ``bool()``: ``aten._local_scalar_dense``; ``tolist()``,
``numpy()``), an output whose size depends on the values (``nonzero``, boolean-mask indexing
and assignment,
``masked_select``, ``unique``, ``repeat_interleave`` without an output size), comparisons
that answer on the host (``equal``, ``is_nonzero``), and a copy that crosses devices (on
CPU-only runs there are none). The count is what the code asks for, measured once, not a
timing: on the CPU the same code runs the same operators.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.nonzero_static",
        "aten.masked_select",
        "aten.unique_dim",
        "aten._unique2",
        "aten._unique",
        "aten.unique_consecutive",
        "aten.equal",
        "aten.is_nonzero",
        "aten.repeat_interleave",
    }
)
"""Operator packets (``aten.<name>``) that make the host wait for a CUDA device."""

NO_KERNEL_OPS = frozenset(
    {"aten.detach", "aten.lift_fresh", "aten.empty", "aten.empty_strided", "aten.empty_like", "aten._to_copy_noop"}
)
"""Operators that launch nothing on a device (besides views): allocation and bookkeeping."""


HOST_READS = frozenset({"tolist", "numpy"})
"""Tensor methods that read a tensor's values on the host without an operator the
dispatcher sees (``item()`` and ``bool()`` go through ``aten._local_scalar_dense``)."""


def _packet(func: Any) -> str:
    return f"{func.namespace}.{func._opname}" if hasattr(func, "_opname") else str(func).split(".")[0]


def _devices(value: Any, into: set[str]) -> None:
    if isinstance(value, torch.Tensor):
        into.add(value.device.type)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _devices(v, into)


def _boolean_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _HostReads(TorchFunctionMode):
    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and isinstance(args[0], torch.Tensor) and args[0].numel():
            self.counter.syncs[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


class OpCounter(TorchDispatchMode):
    """Count dispatched operators and host syncs inside a ``with`` block.

    Attributes:
        ops: operator packet (``"aten.add"``) -> calls, views and allocations included.
        kernels: operator packet -> calls that run a kernel (not views, not allocations).
        syncs: operator packet -> calls that make the host wait (:data:`SYNC_OPS`, and
            copies between devices).

    Example::

        with OpCounter() as count:
            merged = method.merge(experts, base)
        count.kernel_total, count.sync_total
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.kernels: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _packet(func)
        self.ops[name] += 1
        if not (getattr(func, "is_view", False) or name in NO_KERNEL_OPS):
            self.kernels[name] += 1
        if name in SYNC_OPS:
            self.syncs[name] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and _boolean_index(args[1]):
            self.syncs[name] += 1  # a boolean mask becomes indices: nonzero inside the kernel
        elif name in ("aten._to_copy", "aten.copy_", "aten.to"):
            seen: set[str] = set()
            _devices(args, seen)
            target = kwargs.get("device")
            if target is not None:
                seen.add(torch.device(target).type)
            if len(seen) > 1:
                self.syncs[name] += 1
        return func(*args, **kwargs)

    def __enter__(self) -> OpCounter:
        self._host_reads = _HostReads(self)
        self._host_reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._host_reads.__exit__(*exc)

    @property
    def total(self) -> int:
        """Operators dispatched, views included."""
        return sum(self.ops.values())

    @property
    def kernel_total(self) -> int:
        """Operators that run a kernel: on a GPU each is at least one launch, a few
        microseconds whatever its size."""
        return sum(self.kernels.values())

    @property
    def sync_total(self) -> int:
        """Operators that make the host wait for the device."""
        return sum(self.syncs.values())

    def summary(self, top: int = 5) -> str:
        """``"412 kernels (add 120, ...), 3 syncs (_local_scalar_dense 3)"``."""

        def names(counter: Counter[str]) -> str:
            return ", ".join(f"{k.removeprefix('aten.')} {n}" for k, n in counter.most_common(top))

        text = f"{self.kernel_total} kernels ({names(self.kernels)})"
        return f"{text}, {self.sync_total} syncs" + (f" ({names(self.syncs)})" if self.syncs else "")
