"""State-dict algebra shared by every merge method.

A state dict here is a plain ``dict[str, Tensor]``. Floating-point entries are merged;
every other entry (``num_batches_tracked``, integer or bool buffers) is not merged: it
is copied from the base model, or from the first expert when there is no base.

One compatibility policy is used everywhere (:func:`check_compatible`): the same keys,
shapes and dtypes in every state dict, and finite floating-point values. Its errors name
the offending key and, where known, the file the state dict came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from merging import _multitensor

StateDict = dict[str, Tensor]


class StateDictError(ValueError):
    """A state dict is malformed or incompatible with the others it is merged with."""


class SourcedStateDict(dict):
    """A ``dict[str, Tensor]`` that remembers where it was loaded from (for error messages)."""

    def __init__(self, *args, source: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source = source


def describe(state: Mapping[str, Tensor], default: str) -> str:
    """A human name for ``state``: its file when known, else ``default`` (e.g. ``"expert 2"``)."""
    source = getattr(state, "source", None)
    return f"{default} ({source})" if source else default


def is_mergeable(tensor: Tensor) -> bool:
    """Whether an entry is merged (floating point) rather than copied (integer/bool buffers)."""
    return tensor.is_floating_point() or tensor.is_complex()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merge arithmetic runs in: fp32 for half-precision inputs, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_finite(tensor: Tensor, key: str, owner: str) -> None:
    """Raise :class:`StateDictError` if a floating tensor holds NaN or inf."""
    if not is_mergeable(tensor) or tensor.numel() == 0:
        return
    # A NaN or inf makes the sum non-finite, and a reduction allocates nothing; only a
    # non-finite sum (a real NaN/inf, or finite values overflowing) needs the exact scan.
    if bool(torch.isfinite(tensor.sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise StateDictError(f"{owner}: key {key!r} has {bad} non-finite value(s) (NaN or inf)")


def check_state_dict(state: Mapping[str, Tensor], owner: str = "state dict") -> None:
    """Check that ``state`` maps strings to tensors, with finite floating values.

    Raises:
        StateDictError: naming the first offending key.
    """
    if not isinstance(state, Mapping):
        raise StateDictError(f"{owner} is a {type(state).__name__}, not a mapping of names to tensors")
    if len(state) == 0:
        raise StateDictError(f"{owner} is empty")
    for key, value in state.items():
        if not isinstance(key, str):
            raise StateDictError(f"{owner}: key {key!r} is not a string")
        if not isinstance(value, Tensor):
            raise StateDictError(f"{owner}: key {key!r} holds a {type(value).__name__}, not a tensor")
        check_finite(value, key, owner)


def check_compatible(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor] | None = None,
    *,
    check_values: bool = True,
) -> None:
    """Check that experts (and the base) share keys, shapes and dtypes, with finite values.

    Args:
        experts: the K expert state dicts θ_1..θ_K.
        base: the pretrained state dict θ₀, if any.
        check_values: also scan every floating tensor for NaN/inf (one pass over the data;
            on a GPU, one host read for all of them, :func:`merging._multitensor.all_finite`,
            and the key is looked for only when a value is not finite).

    Raises:
        StateDictError: naming the offending key and the state dict (file when known).
    """
    if len(experts) == 0:
        raise StateDictError("no experts given: merging needs at least one expert state dict")
    named = [(describe(e, f"expert {j}"), e) for j, e in enumerate(experts)]
    if base is not None:
        named.insert(0, (describe(base, "base"), base))
    ref_name, ref = named[0]
    for name, state in named:
        if not isinstance(state, Mapping):
            raise StateDictError(f"{name} is a {type(state).__name__}, not a mapping of names to tensors")
    ref_keys = set(ref.keys())
    if not ref_keys:
        raise StateDictError(f"{ref_name} is empty")
    for name, state in named[1:]:
        keys = set(state.keys())
        if keys != ref_keys:
            raise StateDictError(
                f"{name} does not match {ref_name}: {key_mismatch(sorted(ref_keys - keys), sorted(keys - ref_keys))}"
            )
    # On the multi-tensor (GPU) path the values are checked after the structure, all at once
    # with one host read (:func:`merging._multitensor.all_finite`), not one read per tensor.
    batched = check_values and _multitensor.applies(
        t for _, state in named for t in state.values() if isinstance(t, Tensor) and is_mergeable(t)
    )
    for key in ref.keys():
        ref_t = ref[key]
        if not isinstance(ref_t, Tensor):
            raise StateDictError(f"{ref_name}: key {key!r} holds a {type(ref_t).__name__}, not a tensor")
        for name, state in named[1:]:
            t = state[key]
            if not isinstance(t, Tensor):
                raise StateDictError(f"{name}: key {key!r} holds a {type(t).__name__}, not a tensor")
            if t.shape != ref_t.shape:
                raise StateDictError(
                    f"{name}: key {key!r} has shape {tuple(t.shape)}, but {ref_name} has {tuple(ref_t.shape)}"
                )
            if t.dtype != ref_t.dtype:
                raise StateDictError(f"{name}: key {key!r} has dtype {t.dtype}, but {ref_name} has {ref_t.dtype}")
        if check_values and not batched:
            for name, state in named:
                check_finite(state[key], key, name)
    if batched and not _multitensor.all_finite([t for _, state in named for t in state.values() if is_mergeable(t)]):
        for key in ref.keys():  # find the offending key, for the message
            for name, state in named:
                check_finite(state[key], key, name)


def key_mismatch(missing: list[str], extra: list[str]) -> str:
    """``"missing keys [...]; unexpected keys [...]"``, each list cut to a preview."""
    parts = [f"missing keys {_preview(missing)}"] if missing else []
    if extra:
        parts.append(f"unexpected keys {_preview(extra)}")
    return "; ".join(parts)


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


def mergeable_keys(state: Mapping[str, Tensor]) -> list[str]:
    """Keys of the floating-point entries, in the state dict's order."""
    return [k for k, v in state.items() if is_mergeable(v)]


def stack_entry(experts: Sequence[Mapping[str, Tensor]], key: str, dtype: torch.dtype | None = None) -> Tensor:
    """Stack one entry of every expert on a new leading axis: shape ``(K, *shape)``."""
    return torch.stack([e[key].to(dtype) if dtype is not None else e[key] for e in experts])


def stack_states(states: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """``{key: (K, *shape)}`` from K state dicts with the same keys (every entry, integer
    buffers included: the form ``torch.func.vmap`` over ``functional_call`` reads)."""
    return {key: stack_entry(states, key) for key in states[0]}


def mean_of_stack(stacked: Tensor, weights: Tensor | None = None) -> Tensor:
    """Σ_j w_j θ_j of one entry stacked ``(K, *shape)`` (or a flat slice ``(K, n)``).

    Args:
        stacked: θ_1..θ_K's values, in the dtype the sum runs in.
        weights: w ``(K,)`` summing to 1; None: the plain mean (w_j = 1/K).

    Returns:
        ``(*shape)``, in ``stacked``'s dtype and on its device.
    """
    if weights is None:
        return stacked.mean(dim=0)
    w = weights.to(device=stacked.device, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    return (stacked * w).sum(dim=0)


def average_states(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | Tensor | None = None,
) -> StateDict:
    """The weight average (model soup) θ = Σ_j w_j θ_j of K compatible state dicts.

    Floating entries are summed in :func:`accumulation_dtype` and cast back; integer and bool
    buffers are copied from the first state dict. The same values as the ``average`` merge
    method (which computes :func:`mean_of_stack` slice by slice).

    Args:
        states: θ_1..θ_K (same keys, shapes and dtypes; finite values).
        weights: w_1..w_K, normalised here to sum to 1; None: uniform 1/K.

    Raises:
        StateDictError: incompatible or non-finite state dicts (naming the key).
        ValueError: a number of weights other than K.
    """
    states = list(states)
    check_compatible(states)
    w = None
    if weights is not None:
        ref = next((v for v in states[0].values() if is_mergeable(v)), None)
        w = torch.as_tensor(weights, dtype=torch.float64, device=ref.device if ref is not None else None).flatten()
        if w.numel() != len(states):
            raise ValueError(f"average_states: {w.numel()} weights given for {len(states)} state dicts")
        w = w / w.sum()
    out: StateDict = {}
    for key, first in states[0].items():
        if not is_mergeable(first):
            out[key] = first.clone()
            continue
        stacked = stack_entry(states, key, accumulation_dtype(first.dtype))
        out[key] = mean_of_stack(stacked, w).to(first.dtype)
    return out


def weighted_average(experts: Sequence[Mapping[str, Tensor]], alpha: Tensor) -> StateDict:
    """θ̄ = θ_1 + Σ_{j≥2} α_j (θ_j − θ_1) (= Σ_j α_j θ_j when Σ α = 1); non-float entries from θ_1.

    Anchored at θ_1, so that the rounding is at the scale of the differences between the
    experts rather than of the weights (the M-Loss reference model).

    Args:
        experts: θ_1..θ_K.
        alpha: α ``(K,)``, read as Python scalars.
    """
    out: StateDict = {}
    for key, first in experts[0].items():
        if not is_mergeable(first) or len(experts) == 1:
            out[key] = first
            continue
        dtype = accumulation_dtype(first.dtype)
        anchor = first.to(dtype)
        total = anchor.clone()
        for a, e in zip(alpha[1:].tolist(), experts[1:]):
            total.add_(e[key].to(dtype) - anchor, alpha=a)
        out[key] = total.to(first.dtype)
    return out


def partial_merge(base: Mapping[str, Tensor], merged: Mapping[str, Tensor], upto: str) -> StateDict:
    """θ₀ with every entry before ``upto`` (state-dict order) taken from ``merged``: the
    reference of an incremental merge at the entry ``upto``.

    Args:
        base: θ₀.
        merged: the (partially) merged state; only entries before ``upto`` are read.
        upto: the first key taken from ``base``.

    Raises:
        StateDictError: ``upto`` is not a key of ``base``.
    """
    if upto not in base:
        raise StateDictError(f"partial_merge: key {upto!r} is not in the base state dict")
    out: StateDict = {}
    before = True
    for key, value in base.items():
        before = before and key != upto
        out[key] = merged[key] if before else value
    return out


def task_vector(expert: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> StateDict:
    """τ = θ − θ₀ over the floating-point entries (non-float entries are left out)."""
    return {k: expert[k] - base[k] for k in mergeable_keys(base)}


def task_vectors(experts: Iterable[Mapping[str, Tensor]], base: Mapping[str, Tensor]) -> list[StateDict]:
    """τ_j = θ_j − θ₀ for every expert."""
    return [task_vector(e, base) for e in experts]


def apply_task_vector(base: Mapping[str, Tensor], tau: Mapping[str, Tensor], scaling: float = 1.0) -> StateDict:
    """θ₀ + λ·τ; entries absent from ``tau`` (non-float buffers) are copied from ``base``."""
    return {k: (v + scaling * tau[k]).to(v.dtype) if k in tau else v.clone() for k, v in base.items()}


def num_parameters(state: Mapping[str, Tensor]) -> int:
    """Number of floating-point entries (scalars) in a state dict."""
    return sum(v.numel() for v in state.values() if is_mergeable(v))


def num_bytes(state: Mapping[str, Tensor]) -> int:
    """Bytes held by the tensors of a state dict."""
    return sum(v.numel() * v.element_size() for v in state.values())
