"""The merge-method contract and the registry (name -> class).

Every method is a class with typed ``__init__`` hyperparameters (so LightningCLI can build
it from ``class_path``) and one entry point::

    merge(experts, base=None, *, model=None, data=None) -> StateDict

:class:`MergeMethod.merge` validates the inputs once (keys, shapes, dtypes, finite values,
what the method requires), then walks the state dict **one entry at a time**: floating
entries of the K experts are stacked to ``(K, *shape)`` in the accumulation dtype (fp32
for fp16/bf16 inputs) and handed to :meth:`MergeMethod.merge_tensor`; the result is cast
back to the experts' dtype. Non-float entries (``num_batches_tracked``, integer buffers)
are not merged: they are copied from the base, or from the first expert without a base.
Methods that need a pass over the whole model first (global thresholds, M-Loss
statistics) compute it in :meth:`MergeMethod.prepare`. Peak memory is therefore the
inputs, the output and a few per-entry buffers, never K flattened copies of the model.
Elementwise methods hand :meth:`MergeMethod.merge_tensor` cache-sized slices of each entry,
and CPU float32 TIES and DARE run fused numba loops (:mod:`merging.methods._kernels`): the
walk is tuned for the CPU.

On a GPU the same walk is slow for another reason: every operator is a kernel launch (about
5 µs whatever its size) and every value read on the host (the finite check, the threshold
search) waits for the device, so the walk's O(entries x slices x K) operators and per-entry
host reads, not the memory traffic, set its time (averaging 4 ViT-B/32-sized experts: 12,528
operators and 720 host reads). So where the tensors are on any device but
the CPU (:func:`merging._multitensor.applies`), :meth:`MergeMethod.merge` checks the values
with one host read (:func:`merging.state.check_compatible`) and calls
:meth:`MergeMethod.merge_multi` instead of the walk: averaging, task arithmetic, TIES (global
scope) and DARE run each step as one ``torch._foreach_*`` operator over groups of entries
(:mod:`merging._multitensor`; one dtype and up to 32M entries per expert each), so a merge
dispatches O(K) operators per group and reads the host a few times in all (averaging the same
4 experts: 17 operators and 1 host read), with the walk's results (the same arithmetic in the
same order, except a weighted average's products, fused into its sums). Its peak memory is
the inputs, the output and a few group-sized buffers. The other methods walk the entries on
every device (on a GPU, whole entries rather than slices). ``merging._multitensor.forced()``
runs the GPU path on CPU tensors, for the tests and for counting its launches on a CPU.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from merging import _multitensor
from merging.state import (
    StateDict,
    accumulation_dtype,
    check_compatible,
    is_mergeable,
)

_REGISTRY: dict[str, type[MergeMethod]] = {}
_DEFERRED: dict[str, str] = {}
"""Method name -> the module that registers it when imported (:func:`register_deferred`)."""


class MergeMethod(ABC):
    """Base class of every merge method.

    Class attributes:
        name: registry name (``get_method(name)``).
        paper: URL of the paper the method implements.
        requires_base / requires_model / requires_data: what ``merge`` must be given.
    """

    name: ClassVar[str]
    paper: ClassVar[str | None] = None
    requires_base: ClassVar[bool] = False
    requires_model: ClassVar[bool] = False
    requires_data: ClassVar[bool] = False

    def merge(
        self,
        experts: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None = None,
        *,
        model: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> StateDict:
        """Merge K expert state dicts into one.

        Args:
            experts: θ_1..θ_K, state dicts with identical keys, shapes and dtypes.
            base: θ₀, the pretrained state dict (required by task-vector methods).
            model: an ``nn.Module`` skeleton whose ``state_dict()`` keys match the experts
                (data-dependent methods evaluate it with substituted parameters).
            data: an iterable of unlabeled input batches (data-dependent methods).

        Returns:
            The merged state dict, same keys, shapes and dtypes as the experts.

        Raises:
            ValueError: an input the method needs is missing, or the state dicts are
                incompatible (the message names the key and, where known, the file).
        """
        experts = list(experts)
        self.check_inputs(experts, base, model, data)
        check_compatible(experts, base)
        context = self.prepare(experts, base, model=model, data=data)
        merged = self._merge_multi_tensor(experts, base, context)
        if merged is None:
            merged = {}
            for key in experts[0].keys():
                values = [e[key] for e in experts]
                merged[key] = self.merge_entry(key, values, base[key] if base is not None else None, context)
        return self.finish(merged, context, experts, model=model, data=data)

    def _merge_multi_tensor(
        self, experts: list[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None, context: Any
    ) -> StateDict | None:
        """The whole merge on the multi-tensor path (:mod:`merging._multitensor`), where the
        tensors' device selects it and the method has one (:meth:`merge_multi`); else None."""
        states = [*experts, base] if base is not None else experts
        if not _multitensor.applies(t for s in states for t in s.values() if is_mergeable(t)):
            return None
        keys = [key for key, value in experts[0].items() if is_mergeable(value)]
        floats = self.merge_multi(experts, base, keys, context)
        if floats is None:
            return None
        source = base if base is not None else experts[0]
        others = [key for key in experts[0].keys() if key not in floats]
        copies = dict(zip(others, _multitensor.clones([source[key] for key in others])))
        return {key: floats[key] if key in floats else copies[key] for key in experts[0].keys()}

    def merge_multi(
        self,
        experts: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None,
        keys: Sequence[str],
        context: Any,
    ) -> StateDict | None:
        """The floating entries ``keys`` merged on the multi-tensor (GPU) path, or None when
        the method has none (then :meth:`merge` walks the entries, :meth:`merge_entry`).

        Called by :meth:`merge` instead of the per-entry walk when the tensors are on a GPU
        (any device but the CPU; on the CPU inside :func:`merging._multitensor.forced`): an
        implementation runs each step as one ``torch._foreach_*`` operator over groups of
        entries (:func:`merging._multitensor.plan`), so a merge dispatches O(K) operators per
        group instead of O(K) per entry and slice, and reads no value on the host per entry.
        Its results equal :meth:`merge_entry`'s up to float rounding. Default: None.

        Returns:
            key -> merged value (the experts' shape and dtype) for every key of ``keys``.
        """
        return None

    def finish(
        self,
        merged: StateDict,
        context: Any,
        experts: Sequence[Mapping[str, Tensor]],
        *,
        model: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> StateDict:
        """A whole-model step after the entries are merged (default: none). A method whose
        result needs the merged model as a whole (MuDSC's REPAIR) overrides it; streamed
        merges from files, which never hold the whole model, do not run it."""
        return merged

    def merge_entry(self, key: str, values: Sequence[Tensor], base: Tensor | None, context: Any) -> Tensor:
        """Merge one entry, given its K values (the per-entry step of :meth:`merge`, public so
        that streamed merges from files run exactly the same code).

        Non-float entries are copied from the base (or the first expert). Otherwise the values
        are stacked to ``(K, *shape)`` in the accumulation dtype, one at a time (so a lazy
        sequence that reads each value on access holds one value beside the stack), and passed
        to :meth:`merge_tensor`, or, for elementwise methods, in flat slices.

        Args:
            key: the state-dict key.
            values: θ_1..θ_K's values of this entry (a sequence; may read on access).
            base: θ₀'s value, or None.
            context: what :meth:`prepare` returned.

        Returns:
            The merged value, in the experts' shape and dtype.
        """
        first = values[0]
        if not is_mergeable(first):
            return (base if base is not None else first).clone()
        chunk = self.chunk_size()
        if chunk is not None and (first.device.type != "cpu" or _multitensor.is_forced()):
            chunk = max(first.numel(), 1)  # slices pay off in CPU caches; on a GPU they cost launches
        if chunk is not None:
            return self._merge_chunked(key, [first, *(values[j] for j in range(1, len(values)))], base, context, chunk)
        acc = accumulation_dtype(first.dtype)
        stacked = torch.empty((len(values), *first.shape), dtype=acc, device=first.device)
        stacked[0].copy_(first)
        for j in range(1, len(values)):
            stacked[j].copy_(values[j])
        base_t = base.to(acc) if base is not None else None
        return self.merge_tensor(key, stacked, base_t, context).to(first.dtype)

    def _merge_chunked(self, key: str, values: list[Tensor], base: Tensor | None, context: Any, chunk: int) -> Tensor:
        """Elementwise methods: merge an entry in flat slices of ``chunk`` entries per expert,
        so every intermediate stays cache-sized and no ``(K, *shape)`` copy is made."""
        ref = values[0]
        acc = accumulation_dtype(ref.dtype)
        flats = [v.reshape(-1) for v in values]
        flat_base = base.reshape(-1) if base is not None else None
        out = torch.empty(ref.numel(), dtype=ref.dtype, device=ref.device)
        buffer = torch.empty(len(values), min(chunk, ref.numel()), dtype=acc, device=ref.device)
        for start in range(0, ref.numel(), chunk):
            stop = min(start + chunk, ref.numel())
            stacked = buffer[:, : stop - start]
            for j, flat in enumerate(flats):
                stacked[j].copy_(flat[start:stop])
            base_t = flat_base[start:stop].to(acc) if flat_base is not None else None
            out[start:stop] = self.merge_tensor(key, stacked, base_t, context)
        return out.reshape(ref.shape)

    def chunk_size(self) -> int | None:
        """Entries per expert in one slice for elementwise methods, or None.

        A method whose :meth:`merge_tensor` acts entry by entry (given what :meth:`prepare`
        computed) returns a size here; ``merge`` then hands it flat ``(K, chunk)`` slices
        instead of whole ``(K, *shape)`` entries. Default: None (whole entries).
        """
        return None

    def check_inputs(
        self,
        experts: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None,
        model: nn.Module | None,
        data: Iterable[Any] | None,
    ) -> None:
        """Raise ``ValueError`` naming what this method needs and was not given."""
        if len(experts) == 0:
            raise ValueError(f"{self.name}: no experts given; merging needs at least one expert state dict")
        missing = [
            what
            for what, needed, given in (
                ("base (the pretrained state dict θ₀)", self.requires_base, base),
                ("model (an nn.Module skeleton of the experts)", self.requires_model, model),
                ("data (an iterable of unlabeled input batches)", self.requires_data, data),
            )
            if needed and given is None
        ]
        if missing:
            raise ValueError(f"{self.name} needs {' and '.join(missing)}, which was not given")

    def prepare(
        self,
        experts: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None,
        *,
        model: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> Any:
        """Whole-model pass before the per-entry merge (thresholds, statistics). Default: none."""
        return None

    @abstractmethod
    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: Any) -> Tensor:
        """Merge one entry.

        Args:
            key: the state-dict key.
            experts: the K experts' values of this entry, shape ``(K, *shape)`` (or a flat
                slice ``(K, chunk)`` when :meth:`chunk_size` is set). The tensor is a fresh
                buffer owned by the call: it may be modified in place.
            base: θ₀'s value, shape ``shape`` (or ``(chunk,)``), or None.
            context: what :meth:`prepare` returned.

        Returns:
            The merged value, shape ``shape``.
        """

    @classmethod
    def hparam_names(cls) -> tuple[str, ...]:
        """The names of this method's hyperparameters: its ``__init__`` arguments."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))

    def with_hparams(self, **changes: Any) -> Self:
        """A new method of the same class with some hyperparameters changed (e.g. the λ of a
        search: ``method.with_hparams(scaling=0.5)``); ``self`` is left as it is.

        The other hyperparameters are read from the attributes ``__init__`` stored them in, and
        every one goes through ``__init__`` again, so the copy is validated like any method.

        Args:
            **changes: new values, by ``__init__`` argument name.

        Returns:
            The new method.

        Raises:
            ValueError: a name that is not a hyperparameter of this class (the message names
                the class and its hyperparameters), or a value ``__init__`` refuses.
        """
        names = self.hparam_names()
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} ({self.name}) has no {', '.join(unknown)} hyperparameter; "
                f"its hyperparameters are {', '.join(names) or 'none'}"
            )
        current = {name: getattr(self, name) for name in names if name not in changes}
        return type(self)(**current, **changes)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make ``cls`` reachable as ``get_method(cls.name)``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"merge method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    _DEFERRED.pop(cls.name, None)
    return cls


def register_deferred(name: str, module: str) -> None:
    """Make ``get_method(name)`` import ``module`` (which registers the method) on first use.

    The research methods (M-TIES, MuDSC, NeuLig) import the M-Loss meter, the alignment
    solvers and NeuLig's Portland: about 45 ms that a process merging with task arithmetic
    or TIES need not pay (issue 20: a process's first merge, import included).
    """
    if name not in _REGISTRY:
        _DEFERRED[name] = module


def available_methods() -> list[str]:
    """Names of every registered merge method (deferred ones included), sorted."""
    return sorted(set(_REGISTRY) | set(_DEFERRED))


def get_method(name: str, **hparams: Any) -> MergeMethod:
    """Build a registered merge method by name.

    Args:
        name: a name from :func:`available_methods`.
        **hparams: the method's ``__init__`` arguments.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _REGISTRY and name in _DEFERRED:
        importlib.import_module(_DEFERRED[name])
        if name not in _REGISTRY:
            raise RuntimeError(f"merge method {name!r}: importing {_DEFERRED[name]} did not register it")
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; available: {', '.join(available_methods())}") from None
    return cls(**hparams)
