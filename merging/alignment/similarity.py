"""Unit similarities of N models: activation (S_a), weight (S_w) and their combination.

Each similarity is ``[N·O, N·O]`` over the concatenated units of the N models of a node.

- **Activation** (MuDSC's ``CovarianceMetric``): every batch is run through each model
  (one skeleton, parameters substituted with ``torch.func.functional_call``); forward hooks
  capture each node's features at its :class:`~merging.alignment.spec.ActPoint`, reshaped
  to ``[O, samples]`` (batch × spatial positions or tokens); the N models' features are
  concatenated to ``[N·O, samples]`` and reduced to sum statistics Σx, Σxxᵀ and the count
  (float64), from which ``corr = (E[xxᵀ] − μμᵀ) / max(σσᵀ, 1e-7)``.
- **Weight** (``get_weight_vectors`` + ``_correlation``): a unit's vector concatenates its
  slices of every non-ignored entry (its output row, bias and norm scalars, and the input
  columns of consumer layers), each taken after the current matrices of the *other* nodes
  are applied on the tensor's other axes; rows are then correlated (Pearson).
- **Combined**: ``S = α · S_w + (1 − α) · S_a`` (α is the code's ``fix_rate``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from merging.alignment.apply import check_model_keys, transform_tensor
from merging.alignment.inputs import iter_inputs
from merging.alignment.solvers import UnitMatching
from merging.alignment.spec import ActPoint, PermSpec


class CorrelationStats:
    """Streaming sufficient statistics for the Pearson correlation of F features.

    Args:
        num_features: F.
        dtype: accumulation dtype (float64: sums of squares lose precision in float32).
        device: where the sums live.
    """

    def __init__(self, num_features: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None):
        self.sum = torch.zeros(num_features, dtype=dtype, device=device)
        self.outer = torch.zeros(num_features, num_features, dtype=dtype, device=device)
        self.count = 0

    def update(self, x: Tensor) -> None:
        """Add samples ``x`` of shape ``[F, S]``.

        Raises:
            ValueError: ``x`` does not have F rows.
        """
        if x.ndim != 2 or x.shape[0] != self.sum.shape[0]:
            raise ValueError(f"expected features of shape [{self.sum.shape[0]}, samples], got {tuple(x.shape)}")
        x = x.to(self.sum)
        self.sum += x.sum(1)
        self.outer += x @ x.T
        self.count += x.shape[1]

    def compute(self, eps: float = 1e-7) -> Tensor:
        """The ``[F, F]`` Pearson correlation of everything seen so far.

        Raises:
            ValueError: no samples were added.
        """
        return pearson_from_sums(self.sum, self.outer, self.count, eps)


def pearson_from_sums(total: Tensor, outer: Tensor, count: int, eps: float = 1e-7) -> Tensor:
    """Pearson correlation from Σx ``[F]``, Σxxᵀ ``[F, F]`` and the sample count.

    A feature with zero variance correlates 0 with everything (the denominator is clamped
    at ``eps``, as in MuDSC's ``CovarianceMetric``).
    """
    if count <= 0:
        raise ValueError("no samples: cannot compute a correlation")
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    std = cov.diagonal().clamp(min=0).sqrt()
    return cov / torch.outer(std, std).clamp(min=eps)


def row_correlation(vectors: Tensor, eps: float = 1e-12) -> Tensor:
    """Pearson correlation between the rows of ``vectors`` ``[R, F]``: ``[R, R]``."""
    centered = vectors - vectors.mean(1, keepdim=True)
    normed = centered / centered.norm(dim=1, keepdim=True).clamp(min=eps)
    return normed @ normed.T


def unit_features(tensor: Tensor, point: ActPoint, size: int) -> Tensor:
    """Reshape a captured tensor to ``[O, samples]`` as ``point`` describes.

    Raises:
        ValueError: the unit axes do not hold ``size · point.inner`` indices.
    """
    dims = [d % tensor.ndim for d in point.dims]
    rest = [d for d in range(tensor.ndim) if d not in dims]
    units = math.prod(tensor.shape[d] for d in dims)
    if units != size * point.inner:
        raise ValueError(
            f"activation at {point.module!r} ({point.hook}-hook) has shape {tuple(tensor.shape)}: axes {point.dims} "
            f"hold {units} indices, expected {size} units x inner {point.inner}"
        )
    return tensor.permute(*dims, *rest).reshape(size, -1)


# Captures are cloned: later in-place ops (ReLU(inplace=True), ``x += shortcut``) must not
# change them.
def _store_input(store: dict[str, Tensor], name: str):
    def hook(module: nn.Module, args: tuple) -> None:
        store[name] = args[0].clone()

    return hook


def _store_output(store: dict[str, Tensor], name: str):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        store[name] = output.clone()

    return hook


@contextmanager
def _capture(model: nn.Module, points: Mapping[str, ActPoint], store: dict[str, Tensor]):
    handles = []
    try:
        for name, point in points.items():
            try:
                module = model.get_submodule(point.module)
            except AttributeError:
                raise ValueError(f"node {name!r}: the model has no submodule {point.module!r} to hook") from None
            if point.hook == "pre":
                handles.append(module.register_forward_pre_hook(_store_input(store, name)))
            else:
                handles.append(module.register_forward_hook(_store_output(store, name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def activation_corr(
    model: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    spec: PermSpec,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    nodes: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """S_a of every node with an activation point: ``{node: [N·O, N·O]}``.

    Args:
        model: the skeleton (evaluated in eval mode, restored afterwards).
        states: the N models' state dicts, keyed like ``model.state_dict()``.
        spec: the permutation spec.
        data: an iterable of unlabeled input batches (tensors, or ``(x, ...)``).
        max_batches: use at most this many batches; None: all.
        nodes: restrict to these nodes; None: every node with an activation point.
        dtype: accumulation dtype.

    Raises:
        ValueError: no batch, a missing module, a hook point that was not reached, or a
            captured tensor whose unit axes do not match the node's size.
    """
    for j, state in enumerate(states):
        check_model_keys(model, state, f"model {j}'s state dict")
    names = [n for n in (nodes if nodes is not None else spec) if spec[n].act is not None]
    points = {n: spec[n].act for n in names}
    device = next(iter(states[0].values())).device
    stats = {n: CorrelationStats(len(states) * spec[n].size, dtype, device) for n in names}
    store: dict[str, Tensor] = {}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with _capture(model, points, store):
            for x in iter_inputs(data, max_batches=max_batches, device=device, purpose="activation similarity"):
                features: dict[str, list[Tensor]] = {n: [] for n in names}
                for state in states:
                    store.clear()
                    # Keys were checked above; strict=False only lets non-persistent buffers keep
                    # their module values.
                    torch.func.functional_call(model, state, (x,), strict=False)
                    for n in names:
                        if n not in store:
                            raise ValueError(f"node {n!r}: module {points[n].module!r} was not called in forward")
                        features[n].append(unit_features(store[n].to(dtype), points[n], spec[n].size))
                for n in names:
                    stats[n].update(torch.cat(features[n]))
    finally:
        for m, training in modes.items():
            m.train(training)
    return {n: s.compute() for n, s in stats.items()}


def unit_weight_vectors(
    state: Mapping[str, Tensor],
    spec: PermSpec,
    node: str,
    matchings: Mapping[str, UnitMatching],
    model: int,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Model i's weight vector of every unit of ``node``: ``[O, F]``.

    Each non-ignored entry contributes its segment on the entry's axis, after the other
    axes were transformed with model i's current matrices (nodes absent from
    ``matchings`` count as the identity).
    """
    spec_node = spec[node]
    parts = []
    for entry in spec_node.entries:
        if entry.ignore:
            continue
        tensor = state[entry.key].to(dtype).narrow(entry.axis, entry.offset, spec_node.size * entry.inner)
        tensor = transform_tensor(tensor, spec.memberships(entry.key), matchings, model, skip_axis=entry.axis)
        parts.append(tensor.movedim(entry.axis, 0).reshape(spec_node.size, -1))
    return torch.cat(parts, 1)


def weight_corr(
    states: Sequence[Mapping[str, Tensor]],
    spec: PermSpec,
    node: str,
    matchings: Mapping[str, UnitMatching],
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """S_w of ``node`` given the other nodes' current matchings: ``[N·O, N·O]``."""
    vectors = torch.cat([unit_weight_vectors(s, spec, node, matchings, i, dtype) for i, s in enumerate(states)])
    return row_correlation(vectors)


def combine_similarity(weight: Tensor | None, activation: Tensor | None, alpha: float) -> Tensor:
    """S = α · S_w + (1 − α) · S_a; with only one of them given, that one.

    Raises:
        ValueError: neither is given, or α is outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if weight is None and activation is None:
        raise ValueError("combine_similarity needs a weight or an activation similarity")
    if activation is None:
        return weight
    if weight is None:
        return activation
    return alpha * weight + (1.0 - alpha) * activation.to(weight)
