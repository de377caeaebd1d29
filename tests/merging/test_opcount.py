"""OpCounter counts kernels and host syncs by operator, the proxy the CPU tests and
benchmarks use for a GPU code path's launches and synchronisations."""

from __future__ import annotations

import torch

from merging._opcount import OpCounter


def test_counts_kernels_not_views():
    x = torch.randn(4, 5)
    with OpCounter() as count:
        y = x.t()[1:]  # views: no kernel
        z = y + 1  # one kernel
        z.mul_(2)  # one kernel
    assert count.kernel_total == 2
    assert count.kernels["aten.add"] == 1 and count.kernels["aten.mul_"] == 1
    assert count.total > count.kernel_total
    assert count.sync_total == 0


def test_counts_host_reads_and_value_dependent_shapes_as_syncs():
    x = torch.randn(100)
    with OpCounter() as count:
        float(x.sum())  # _local_scalar_dense
        x[x > 0]  # boolean indexing: nonzero
        x.tolist()
    assert count.syncs["aten._local_scalar_dense"] == 1
    assert count.syncs["aten.index"] == 1
    assert count.syncs["Tensor.tolist"] == 1
    assert "syncs" in count.summary()


def test_one_device_copies_are_not_syncs():
    x = torch.randn(3)
    with OpCounter() as count:
        x.to(torch.float64).clone()
    assert count.sync_total == 0
    assert count.kernel_total == 2
