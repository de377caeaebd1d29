"""The different-initialisation scenario's REPAIR rows, diagnostics and pluggable data/backbone."""

from __future__ import annotations

import pytest
import torch

from merging.datamodules import LabelledTensorDataset, MultiTaskDataModule, Task
from merging.experiments.scenarios import (
    DIFFERENT_INIT_MERGES,
    EXPERTS_LABEL,
    REPAIR_SUFFIX,
    VAR_RATIO_MIN,
    run_different_init_seed,
    variance_markdown,
    variance_summary,
)


def test_every_matching_is_reported_with_and_without_repair():
    labels = [k for k in DIFFERENT_INIT_MERGES if k != "average"]
    plain = [k for k in labels if not k.endswith(REPAIR_SUFFIX)]
    assert set(plain) >= {"activation matching", "MuDSC-Align", "ZipIt", "MuDSC-Zip"}
    for label in plain:
        assert DIFFERENT_INIT_MERGES[label]["repair"] == "none"
        repaired = DIFFERENT_INIT_MERGES[label + REPAIR_SUFFIX]
        assert repaired == {**DIFFERENT_INIT_MERGES[label], "repair": "repair"}
    assert len(labels) == 2 * len(plain)


def _tiny_tasks(seed: int) -> MultiTaskDataModule:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(2):
        y = torch.arange(48) % 2
        x = torch.randn(48, 1, 8, 8, generator=g) + y[:, None, None, None] * (1.0 + t)
        tasks.append(Task(f"toy_{t}", 2, LabelledTensorDataset(x, y)))
    return MultiTaskDataModule(tasks, batch_size=16, seed=seed)


def test_run_seed_takes_any_datamodule_and_backbone_and_reports_the_variance_ratios():
    merges = {k: DIFFERENT_INIT_MERGES[k] for k in ("average", "MuDSC-Align", "MuDSC-Align" + REPAIR_SUFFIX)}
    rows = run_different_init_seed(
        0,
        epochs=1,
        unlabeled_samples=32,
        merges=merges,
        data=_tiny_tasks(0),
        backbone_kwargs={"width": 4, "depth": 2, "num_features": 8},
    )
    assert [r["model"] for r in rows] == [EXPERTS_LABEL, *merges]
    assert set(rows[0]) == {"model", "seed", "test/acc/toy_0", "test/acc/toy_1", "test/acc_mean"}
    layers = ["features.0", "features.3", "fc"]  # depth 2: the given backbone was built
    for row in rows[1:]:
        ratios = [row[f"diag/var_ratio/{layer}"] for layer in layers]
        assert row[VAR_RATIO_MIN] == min(ratios)
        assert not any(k.startswith("diag/var_ratio/features.6") for k in row)
    repaired = rows[3]
    # REPAIR sets each merged unit's std to its members' mean std: the scale is (nearly) kept.
    assert all(0.5 < repaired[f"diag/var_ratio/{layer}"] <= 1.0 + 1e-6 for layer in layers), repaired

    summary = variance_summary(rows + [{**r, "seed": 1} for r in rows])
    assert [e["model"] for e in summary] == list(merges)
    assert summary[0][VAR_RATIO_MIN] == pytest.approx(rows[1][VAR_RATIO_MIN])
    assert summary[0][VAR_RATIO_MIN + "_sd"] == 0.0
    table = variance_markdown(summary)
    assert "| model | features.0 | features.3 | fc | min |" in table
    assert table.count("| MuDSC-Align") == 2 and table.count("| average |") == 1
