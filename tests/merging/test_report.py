"""Result summaries (mean ± sd over seeds, the gap to a reference seed by seed), the
merge-friendliness report from plain data, and the node M-Loss map."""

from __future__ import annotations

import pytest
import torch

from merging.report import (
    StabilityReportData,
    accuracy_bars,
    accuracy_table,
    plus_minus,
    save_node_map,
    sparsifier_label,
    stability_report_figure,
    stability_report_markdown,
    summarise,
)
from merging.stability import TrajectoryStats, sparsified_task_vector_stats, task_vector_stats


def rows():
    return [
        {"model": "ensemble", "seed": 0, "test/acc/a": 0.9, "test/acc_mean": 0.9},
        {"model": "ensemble", "seed": 1, "test/acc/a": 0.7, "test/acc_mean": 0.7},
        {"model": "ties", "seed": 1, "test/acc/a": 0.6, "test/acc_mean": 0.6, "test/merge_seconds": 0.2},
        {"model": "ties", "seed": 0, "test/acc/a": 0.8, "test/acc_mean": 0.8, "test/merge_seconds": 0.4},
    ]


def test_summarise_means_sds_and_seedwise_gap():
    summary = summarise(rows(), reference="ensemble", gap_key="gap_to_ensemble")
    assert [e["model"] for e in summary] == ["ensemble", "ties"]
    ties = summary[1]
    assert ties["test/acc_mean"] == pytest.approx(0.7)
    assert ties["test/acc_mean_sd"] == pytest.approx(0.1414213, rel=1e-5)
    # Gaps pair rows of the same seed (ties' rows come in another order): both are -0.1.
    assert ties["gap_to_ensemble"] == pytest.approx(-0.1)
    assert ties["gap_to_ensemble_sd"] == pytest.approx(0.0, abs=1e-12)
    assert "test/merge_seconds" not in summary[0]


def test_table_and_plot(tmp_path):
    summary = summarise(rows(), reference="ensemble", gap_key="gap_to_ensemble")
    _, markdown = accuracy_table(summary, ["a"], title="t", gap_key="gap_to_ensemble", gap_label="gap to ensemble")
    lines = markdown.splitlines()
    assert lines[0] == "| model | a | mean acc (%) | gap to ensemble (pts) | merge time (s) |"
    assert lines[3] == "| ties | 70.0 ± 14.1 | 70.0 ± 14.1 | -10.0 ± 0.0 | 0.300 ± 0.141 |"
    assert plus_minus(summary[0], "test/merge_seconds") == "-"
    accuracy_bars(summary, tmp_path / "bars.png", reference="ensemble")
    assert (tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_gaps_to_several_references():
    more = rows() + [
        {"model": "average", "seed": 0, "test/acc/a": 0.5, "test/acc_mean": 0.5},
        {"model": "average", "seed": 1, "test/acc/a": 0.6, "test/acc_mean": 0.6},
    ]
    summary = summarise(more, reference="ensemble", gap_key="gap_to_ensemble", paired={"vs_average": "average"})
    by_model = {e["model"]: e for e in summary}
    # ties − average per seed: +0.3 (seed 0), 0.0 (seed 1).
    assert by_model["ties"]["vs_average"] == pytest.approx(0.15)
    assert by_model["ties"]["vs_average_sd"] == pytest.approx(0.2121320, rel=1e-5)
    assert "vs_average" not in by_model["average"] and "gap_to_ensemble" not in by_model["ensemble"]
    _, markdown = accuracy_table(
        summary,
        ["a"],
        title="t",
        gap_key="gap_to_ensemble",
        gap_label="gap to ensemble",
        more_gaps=[("vs_average", "vs average")],
    )
    lines = markdown.splitlines()
    assert lines[0] == "| model | a | mean acc (%) | gap to ensemble (pts) | vs average (pts) | merge time (s) |"
    assert lines[2].startswith("| ensemble | 80.0 ± 14.1 | 80.0 ± 14.1 | - | ")


# ------------------------------------------------------- merge-friendliness report


def report_data(multi_expert: bool, **settings) -> StabilityReportData:
    base = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}
    experts = [
        {"fc.weight": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "fc.bias": torch.tensor([0.0, 0.0])},
        {"fc.weight": torch.tensor([[0.0, 2.0], [0.0, 0.0]]), "fc.bias": torch.tensor([0.0, 0.0])},
        {"fc.weight": torch.tensor([[0.0, 0.0], [0.0, -9.0]]), "fc.bias": torch.tensor([3.0, 4.0])},
    ]
    experts = experts if multi_expert else experts[:1]
    trajectories = []
    for j, _ in enumerate(experts):
        stats = TrajectoryStats()
        for _ in range(4):
            stats.update(0.1 * (j + 1), 2, 0.5 * (j + 1), 1.0)
        trajectories.append(stats)
    dense = task_vector_stats(experts, base)
    history = [
        {
            "step": 4,
            "tau_norm": dense.norms.tolist(),
            "lr_integral": [s.lr_integral for s in trajectories],
            "path_length": [s.path_length for s in trajectories],
            "dispersion": dense.dispersion,
        }
    ]
    defaults = dict(track_updates=True, drift_factor=1.5, density=0.2, drop_rate=0.9, top_layers=5)
    return StabilityReportData(
        dense=dense,
        sparse={"ties": sparsified_task_vector_stats(experts, base, method="ties", density=0.5)},
        trajectories=trajectories,
        history=history,
        train_loss=0.25,
        multi_expert=multi_expert,
        **{**defaults, **settings},
    )


def test_stability_report_from_plain_data_flags_the_drifting_expert():
    data = report_data(multi_expert=True)
    text = stability_report_markdown(data)
    assert text.startswith("# Merge-friendliness report (StabilityMonitor)\n") and text.endswith("\n")
    assert "| expert 2 | 4 | 1.2 | 0.6 | 6 | " in text
    assert "Last epoch's mean training loss (all ranks, all experts together): 0.25." in text
    assert "- Expert 2 moved" in text and "above the 1.5× flag" in text
    assert "| TIES trim (density 0.2) |" in text  # the label reads the report's settings
    assert "Expert 2 has the largest Σ_t η_t/b_t (0.6)" in text
    assert "Expert 2 moved" not in stability_report_markdown(report_data(multi_expert=True, drift_factor=100.0))


def test_stability_report_for_one_model_speaks_of_the_model():
    data = report_data(multi_expert=False, track_updates=False)
    text = stability_report_markdown(data)
    assert "experts" not in text
    assert "## Layers carrying the task vector" in text and "| fc | 100.0% | 100.0% |" in text
    assert "| model | 4 | 0.4 | 0.2 | n/a | 1 | n/a |" in text
    assert "TIES trim (density 0.2) multiplies ‖τ‖² by" in text


def test_stability_report_figure_and_labels():
    multi = stability_report_figure(report_data(multi_expert=True))
    single = stability_report_figure(report_data(multi_expert=False))
    assert len(multi.axes) == 5 and len(single.axes) == 3  # 2 × 2 panels and the cosine colour bar
    assert sparsifier_label("ties", 0.3, 0.5) == "TIES trim (density 0.3)"
    assert sparsifier_label("dare", 0.3, 0.5) == "DARE drop (p = 0.5)"


def test_save_node_map_writes_a_png(tmp_path):
    node = {"fc1": torch.rand(64), "fc2": torch.zeros(16)}
    path = save_node_map(node, tmp_path / "map.png", groups=8, title="node M-Loss")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no layer"):
        save_node_map({}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()
