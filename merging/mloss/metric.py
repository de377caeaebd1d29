"""M-Loss as a torchmetrics ``Metric``: per-layer sums and counts, reduced across DDP ranks.

Wang, Duan, Chen, Wu, Lim, "M-Loss: Quantifying Model Merging Compatibility with Limited
Unlabeled Data", AAAI 2026, https://arxiv.org/abs/2602.08564.

The only module of :mod:`merging.mloss` that imports torchmetrics (which imports
torchvision), so that the merge methods, which use the M-Loss maths, stay light: import
:class:`MLoss` from here, ``from merging.mloss.metric import MLoss``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from merging.mloss.gap import MLossReport, MLossStatistics, _report


class MLoss(Metric):
    """M-Loss as a torchmetrics ``Metric``: per-layer sums and counts, reduced by ``"sum"``.

    Each rank adds the statistics of its own shard (:func:`merging.mloss.mloss_statistics`); ``compute``
    (a collective under DDP: every rank calls it) reduces the sums and counts and returns
    the same :class:`MLossReport` a single process would compute on all the data, also
    with uneven shards.

    The states are three tensors whatever the number of layers: every layer's node sums
    end to end, the ``(L, 2)`` norm sums and the ``(L, 2)`` counts. An update of every layer
    is a few kernels; ``compute`` reads the sums and counts to the host once (one device
    sync) and keeps the node values on the device; under DDP three tensors are reduced.

    Args:
        node_sizes: ``{layer name: d_out}`` of every layer that may be updated (for
            :data:`~merging.mloss.gap.OUTPUT`: the output's last dimension).
        **kwargs: torchmetrics ``Metric`` options.

    Example::

        stats = mloss_statistics(model, experts, my_shard, base=theta0)
        metric = MLoss({name: s.node_sum.numel() for name, s in stats.items()})
        metric.update(stats)
        report = metric.compute()
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    node_sum: Tensor
    sums: Tensor
    counts: Tensor

    def __init__(self, node_sizes: Mapping[str, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not node_sizes:
            raise ValueError("MLoss needs at least one layer in node_sizes")
        self.node_sizes = {str(name): int(size) for name, size in node_sizes.items()}
        for name, size in self.node_sizes.items():
            if size < 1:
                raise ValueError(f"MLoss: layer {name!r} has {size} nodes")
        self._index = {name: i for i, name in enumerate(self.node_sizes)}
        self._offsets = list(itertools.accumulate(self.node_sizes.values(), initial=0))
        layers = len(self.node_sizes)
        # Every layer's Σ g_i² end to end; per layer (Σ ‖g(s)‖₂, Σ normalized); per layer
        # (positions, samples).
        self.add_state("node_sum", torch.zeros(self._offsets[-1]), dist_reduce_fx="sum")
        self.add_state("sums", torch.zeros(layers, 2), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(layers, 2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, statistics: Mapping[str, MLossStatistics]) -> None:
        """Add one shard's statistics: a few kernels for all the layers, no device sync.

        Raises:
            ValueError: a layer not given at construction, or a different node count.
        """
        rows = []
        for name, s in statistics.items():
            if name not in self._index:
                raise ValueError(f"MLoss: layer {name!r} was not given at construction ({list(self._index)})")
            size = self.node_sizes[name]
            if s.node_sum.numel() != size or s.node_sum.dim() != 1:
                raise ValueError(f"MLoss: layer {name!r} has {size} nodes, statistics have {s.node_sum.numel()}")
            rows.append(self._index[name])
        if not rows:
            return
        stats = list(statistics.values())
        node = torch.cat([s.node_sum for s in stats]).to(self.node_sum)
        sums = torch.stack([t.reshape(()) for s in stats for t in (s.norm_sum, s.normalized_sum)])
        sums = sums.to(self.sums).view(-1, 2)
        # The counts are host integers: one copy to the device, which waits for nothing.
        counts = _to_device(torch.tensor([[s.positions, s.samples] for s in stats]), self.counts.device)
        if rows == list(range(len(self._index))):  # every layer, in order: one add per state
            self.node_sum += node
            self.sums += sums
            self.counts += counts
            return
        start = 0
        for k, i in enumerate(rows):
            size = self._offsets[i + 1] - self._offsets[i]
            self.node_sum[self._offsets[i] : self._offsets[i + 1]] += node[start : start + size]
            start += size
            self.sums[i] += sums[k]
            self.counts[i] += counts[k]

    def compute(self) -> MLossReport:
        """The report over everything added (on all ranks); layers never updated are left out.
        One read of the sums and counts to the host."""
        host = torch.cat([self.sums.to(torch.float64), self.counts.to(torch.float64)], dim=1).tolist()
        kept = [(i, name) for name, i in self._index.items() if host[i][3] != 0]
        return _report(
            [name for _, name in kept],
            [self.node_sum[self._offsets[i] : self._offsets[i + 1]] for i, _ in kept],
            [int(host[i][2]) for i, _ in kept],
            [int(host[i][3]) for i, _ in kept],
            [host[i][0] for i, _ in kept],
            [host[i][1] for i, _ in kept],
        )


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor on ``device`` without a host-device sync: on CUDA through pinned
    memory and a non-blocking copy (a blocking copy would wait for the device's queue)."""
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


__all__ = ["MLoss"]
