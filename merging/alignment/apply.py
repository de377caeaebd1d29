"""Applying merge/unmerge (or permutation) matrices to state dicts, and BatchNorm reset.

For model i and a tensor W_i, every (node, entry) membership transforms one axis segment:
``W_i ← M_iᵀ ×_axis W_i`` on output axes (role ``"out"``) and ``W_i ← U_iᵀ ×_axis W_i`` on
input axes (role ``"in"``), where ``×_axis`` multiplies along that axis (MuDSC's
``get_merged_state_dict``). The merged tensor is ``(1/N) Σ_i W_i``; tensors in no node are
plainly averaged; non-floating entries (``num_batches_tracked``) are copied from model 0.
With alignment this is averaging of permuted weights; with zip, the mean of merged units.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from merging.alignment.inputs import iter_inputs
from merging.alignment.solvers import UnitMatching, permutation_matching
from merging.alignment.spec import PermEntry, PermNode, PermSpec
from merging.state import StateDict, accumulation_dtype, is_mergeable


def transform_tensor(
    tensor: Tensor,
    memberships: Sequence[tuple[PermNode, PermEntry]],
    matchings: Mapping[str, UnitMatching],
    model: int,
    *,
    skip_axis: int | None = None,
) -> Tensor:
    """Apply model ``model``'s matrices to every axis segment of ``tensor`` that a node indexes.

    Args:
        tensor: W_i, any shape.
        memberships: ``spec.memberships(key)`` for this tensor.
        matchings: node name → :class:`UnitMatching`; nodes absent here are left as they are
            (the identity).
        model: i, the model whose blocks M_i / U_i are applied.
        skip_axis: leave this axis alone (weight-similarity vectors slice it instead).

    Returns:
        The transformed tensor; an axis whose node changes width (zip with r ≠ 1 − 1/N)
        changes length accordingly.
    """
    by_axis: dict[int, list[tuple[PermNode, PermEntry]]] = {}
    for node, entry in memberships:
        if node.name in matchings and entry.axis != skip_axis:
            by_axis.setdefault(entry.axis, []).append((node, entry))
    for axis, members in sorted(by_axis.items()):
        members.sort(key=lambda m: m[1].offset)
        length = tensor.shape[axis]
        pieces: list[Tensor] = []
        pos = 0
        for node, entry in members:
            if entry.offset > pos:
                pieces.append(tensor.narrow(axis, pos, entry.offset - pos))
            span = node.size * entry.inner
            matching = matchings[node.name]
            mat = matching.merge_block(model) if entry.role == "out" else matching.unmerge_block(model)
            pieces.append(_multiply_axis(tensor.narrow(axis, entry.offset, span), mat, axis, node.size))
            pos = entry.offset + span
        if pos < length:
            pieces.append(tensor.narrow(axis, pos, length - pos))
        tensor = torch.cat(pieces, axis)
    return tensor


def _multiply_axis(segment: Tensor, mat: Tensor, axis: int, size: int) -> Tensor:
    """``matᵀ ×_axis segment``: segment has ``size · inner`` indices on ``axis``, mat ``[size, O']``."""
    moved = segment.movedim(axis, 0)
    rest = moved.shape[1:]
    out = mat.to(device=moved.device, dtype=moved.dtype).T @ moved.reshape(size, -1)
    return out.reshape(-1, *rest).movedim(0, axis)


def merge_entry(key: str, stacked: Tensor, spec: PermSpec, matchings: Mapping[str, UnitMatching]) -> Tensor:
    """Merge one entry of N models: ``(1/N) Σ_i T_i(W_i)``.

    Args:
        key: the state-dict key.
        stacked: ``(N, *shape)``, the N models' values.
        spec: the permutation spec.
        matchings: node name → matching of N models.

    Raises:
        ValueError: the merged tensor's shape differs from the inputs' (a width-changing zip).
    """
    memberships = spec.memberships(key)
    total = sum(transform_tensor(w, memberships, matchings, i) for i, w in enumerate(stacked))
    merged = total / stacked.shape[0]
    if merged.shape != stacked.shape[1:]:
        raise ValueError(
            f"merging key {key!r} changes its shape from {tuple(stacked.shape[1:])} to {tuple(merged.shape)}; "
            "merged nodes must keep their width (zip with r = 1 - 1/N)"
        )
    return merged


def merge_state_dicts(
    states: Sequence[Mapping[str, Tensor]], spec: PermSpec, matchings: Mapping[str, UnitMatching]
) -> StateDict:
    """Merge N state dicts with the given matchings (same keys, shapes and dtypes out).

    Raises:
        ValueError: a matching was solved for a different number of models.
    """
    for name, matching in matchings.items():
        if matching.num_models != len(states):
            raise ValueError(f"node {name!r} was matched for {matching.num_models} models, got {len(states)} states")
    merged: StateDict = {}
    for key, ref in states[0].items():
        if not is_mergeable(ref):
            merged[key] = ref.clone()
            continue
        acc = accumulation_dtype(ref.dtype)
        stacked = torch.stack([s[key].to(acc) for s in states])
        merged[key] = merge_entry(key, stacked, spec, matchings).to(ref.dtype)
    return merged


def permute_state_dict(state: Mapping[str, Tensor], spec: PermSpec, perms: Mapping[str, Tensor]) -> StateDict:
    """Permute the units of one model: new unit j of node n is old unit ``perms[n][j]``.

    When every permutation respects the node's groups and ties (as
    :func:`random_permutations` draws them), the result computes the same function.

    Raises:
        ValueError: an unknown node or a permutation of the wrong length.
    """
    matchings = {}
    for name, perm in perms.items():
        if name not in spec:
            raise ValueError(f"no node {name!r} in the spec")
        if perm.numel() != spec[name].size:
            raise ValueError(f"node {name!r} has {spec[name].size} units, got a permutation of {perm.numel()}")
        matchings[name] = permutation_matching(perm)
    return {
        key: transform_tensor(t, spec.memberships(key), matchings, 0).to(t.dtype) if is_mergeable(t) else t.clone()
        for key, t in state.items()
    }


def random_permutations(spec: PermSpec, generator: torch.Generator, *, use_ties: bool = True) -> dict[str, Tensor]:
    """A random symmetry of the network: one permutation per node.

    Grouped nodes permute their groups as blocks and units inside each group; tied nodes
    share the group permutation (one head order for the query/key and value nodes).

    Args:
        spec: the permutation spec.
        generator: the source of randomness.
        use_ties: share group permutations between tied nodes.
    """
    perms: dict[str, Tensor] = {}
    for unit in spec.tie_groups(use_ties):
        group_order = torch.randperm(spec[unit[0]].groups, generator=generator)
        for name in unit:
            node = spec[name]
            gsize = node.group_size
            inner = [torch.randperm(gsize, generator=generator) for _ in range(node.groups)]
            perms[name] = torch.cat([int(g) * gsize + inner[j] for j, g in enumerate(group_order)])
    return perms


def check_model_keys(model: nn.Module, state: Mapping[str, Tensor], owner: str = "the state dict") -> None:
    """Check that ``state`` has exactly the keys of ``model.state_dict()``.

    Raises:
        ValueError: listing missing and unexpected keys.
    """
    expected = set(model.state_dict().keys())
    keys = set(state.keys())
    if keys != expected:
        missing = sorted(expected - keys)[:5]
        extra = sorted(keys - expected)[:5]
        raise ValueError(
            f"{owner} does not match the model skeleton ({type(model).__name__}): "
            f"missing keys {missing}, unexpected keys {extra} (first 5 of each)"
        )


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm layers that track running statistics, by name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def reset_batchnorm(
    model: nn.Module,
    state: Mapping[str, Tensor],
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
) -> StateDict:
    """Recompute the BatchNorm running statistics of ``state`` on ``data``.

    The statistics are reset and re-estimated as a cumulative average over the batches
    (``momentum=None``), with only the BatchNorm layers in training mode; weights are not
    touched. ``model`` is evaluated with ``state`` substituted
    (``torch.func.functional_call``); its mode and momenta are restored afterwards.

    Args:
        model: the skeleton; ``state``'s keys match ``model.state_dict()``.
        state: the merged state dict.
        data: an iterable of input batches (tensors or ``(x, ...)``).
        max_batches: use at most this many batches; None: all.

    Returns:
        A copy of ``state`` with new ``running_mean``/``running_var``/``num_batches_tracked``.

    Raises:
        ValueError: ``data`` yields no batch, or ``state`` lacks a BatchNorm buffer.
    """
    check_model_keys(model, state)
    out = {k: v.clone() for k, v in state.items()}
    norms = batchnorm_modules(model)
    if not norms:
        return out
    for name, _ in norms:
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            if f"{name}.{buffer}" not in out:
                raise ValueError(f"BatchNorm reset: key '{name}.{buffer}' is not in the state dict")
        out[f"{name}.running_mean"].zero_()
        out[f"{name}.running_var"].fill_(1.0)
        out[f"{name}.num_batches_tracked"].zero_()
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for _, m in norms}
    device = next(iter(out.values())).device
    try:
        model.eval()
        for _, m in norms:
            m.train()
            m.momentum = None
        for x in iter_inputs(data, max_batches=max_batches, device=device, purpose="the BatchNorm reset"):
            # Keys were checked against the model; strict=False only lets non-persistent buffers
            # keep their module values.
            torch.func.functional_call(model, out, (x,), strict=False)
    finally:
        for m, training in modes.items():
            m.train(training)
        for m, momentum in momenta.items():
            m.momentum = momentum
    return out
