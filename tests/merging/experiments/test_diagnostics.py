"""The digits runner of the weight-averaging diagnostics, end to end at toy size."""

from __future__ import annotations

import pytest
import torch

from merging.experiments.diagnostics import main, run_diagnostics


@pytest.mark.slow
def test_run_diagnostics_and_command_line(tmp_path):
    result = run_diagnostics(tmp_path / "api", num_models=2, archs=("mlp",), epochs=2, pretrain_epochs=1)
    for name in (
        "diagnostics.md",
        "diagnostics.csv",
        "weight_vs_feature.png",
        "magnitude_stability.png",
        "templates.png",
    ):
        assert (tmp_path / "api" / name).is_file()
    assert set(result.averaging) == {"mlp, shared init", "mlp, independent init"}
    assert any(r["combination"] == "uniform soup" for r in result.table)
    assert result.templates.templates.shape == (10, 1, 8, 8)
    csv_lines = (tmp_path / "api" / "diagnostics.csv").read_text().splitlines()
    assert csv_lines[0] == "analysis,setting,combination,value" and len(csv_lines) == len(result.table) + 1

    threads = torch.get_num_threads()
    main(["--out", str(tmp_path / "cli"), "--models", "2", "--archs", "mlp", "--inits", "shared", "--epochs", "1"])
    assert torch.get_num_threads() == threads  # the run's single-thread setting is undone
    assert (
        "| weight vs feature | mlp, shared init | uniform soup |" in (tmp_path / "cli" / "diagnostics.md").read_text()
    )
    with pytest.raises(ValueError, match="num_models"):
        run_diagnostics(tmp_path, num_models=1)
