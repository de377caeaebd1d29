"""Result summaries: mean ± sd over seeds and the gap to a reference, seed by seed."""

from __future__ import annotations

import pytest

from merging.report import accuracy_bars, accuracy_table, plus_minus, summarise


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
        summary, ["a"], title="t", gap_key="gap_to_ensemble", gap_label="gap to ensemble", more_gaps=[("vs_average", "vs average")]
    )
    lines = markdown.splitlines()
    assert lines[0] == "| model | a | mean acc (%) | gap to ensemble (pts) | vs average (pts) | merge time (s) |"
    assert lines[2].startswith("| ensemble | 80.0 ± 14.1 | 80.0 ± 14.1 | - | ")
