"""M-Loss as a torchmetrics ``Metric``: per-layer sums and counts, reduced across DDP ranks.

Wang, Duan, Chen, Wu, Lim, "M-Loss: Quantifying Model Merging Compatibility with Limited
Unlabeled Data", AAAI 2026, https://arxiv.org/abs/2602.08564.

The only module of :mod:`merging.mloss` that imports torchmetrics (which imports
torchvision), so that the merge methods, which use the M-Loss maths, stay light: import
:class:`MLoss` from here, ``from merging.mloss.metric import MLoss``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchmetrics import Metric

from merging.mloss.gap import MLossReport, MLossStatistics, mloss_report


class MLoss(Metric):
    """M-Loss as a torchmetrics ``Metric``: per-layer sums and counts, reduced by ``"sum"``.

    Each rank adds the statistics of its own shard (:func:`merging.mloss.mloss_statistics`); ``compute``
    (a collective under DDP: every rank calls it) reduces the sums and counts and returns
    the same :class:`MLossReport` a single process would compute on all the data, also
    with uneven shards.

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

    def __init__(self, node_sizes: Mapping[str, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not node_sizes:
            raise ValueError("MLoss needs at least one layer in node_sizes")
        self.node_sizes = {str(name): int(size) for name, size in node_sizes.items()}
        for i, size in enumerate(self.node_sizes.values()):
            if size < 1:
                raise ValueError(f"MLoss: layer {list(self.node_sizes)[i]!r} has {size} nodes")
            self.add_state(f"node_sum_{i}", torch.zeros(size), dist_reduce_fx="sum")
            self.add_state(f"positions_{i}", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"norm_sum_{i}", torch.tensor(0.0), dist_reduce_fx="sum")
            self.add_state(f"normalized_sum_{i}", torch.tensor(0.0), dist_reduce_fx="sum")
            self.add_state(f"samples_{i}", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self._index = {name: i for i, name in enumerate(self.node_sizes)}

    def update(self, statistics: Mapping[str, MLossStatistics]) -> None:
        """Add one shard's statistics.

        Raises:
            ValueError: a layer not given at construction, or a different node count.
        """
        for name, s in statistics.items():
            if name not in self._index:
                raise ValueError(f"MLoss: layer {name!r} was not given at construction ({list(self._index)})")
            i = self._index[name]
            node_sum = getattr(self, f"node_sum_{i}")
            if s.node_sum.shape != node_sum.shape:
                raise ValueError(
                    f"MLoss: layer {name!r} has {node_sum.numel()} nodes, statistics have {s.node_sum.numel()}"
                )
            setattr(self, f"node_sum_{i}", node_sum + s.node_sum.to(node_sum))
            setattr(self, f"positions_{i}", getattr(self, f"positions_{i}") + s.positions)
            norm_sum = getattr(self, f"norm_sum_{i}")
            setattr(self, f"norm_sum_{i}", norm_sum + s.norm_sum.to(norm_sum))
            normalized = getattr(self, f"normalized_sum_{i}")
            setattr(self, f"normalized_sum_{i}", normalized + s.normalized_sum.to(normalized))
            setattr(self, f"samples_{i}", getattr(self, f"samples_{i}") + s.samples)

    def compute(self) -> MLossReport:
        """The report over everything added (on all ranks); layers never updated are left out."""
        stats = {
            name: MLossStatistics(
                node_sum=getattr(self, f"node_sum_{i}"),
                positions=int(getattr(self, f"positions_{i}")),
                norm_sum=getattr(self, f"norm_sum_{i}"),
                normalized_sum=getattr(self, f"normalized_sum_{i}"),
                samples=int(getattr(self, f"samples_{i}")),
            )
            for name, i in self._index.items()
        }
        return mloss_report(stats)


__all__ = ["MLoss"]
