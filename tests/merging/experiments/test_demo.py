"""The main job (``make demo``), end to end at toy size."""

from __future__ import annotations

import json

import pytest

from merging.experiments import demo


@pytest.mark.slow
def test_demo_writes_its_table_and_chooses_lambda_on_validation(tmp_path):
    out = tmp_path / "demo"
    summary = demo.main(
        ["--seeds", "0", "1", "--pretrain-epochs", "1", "--expert-epochs", "1", "--neulig-epochs", "0",
         "--skip-different-init", "--methods", "average", "task_arithmetic", "--out", str(out)]
    )
    models = [e["model"] for e in summary]
    assert models[:1] == ["ensemble"] and {"average", "task_arithmetic", "task_arithmetic (λ on val)"} <= set(models)
    assert {f"results.{ext}" for ext in ("md", "json", "csv", "png")} <= {p.name for p in out.iterdir()}
    runs = json.loads((out / "results.json").read_text())["runs"]
    chosen = [r["test/selected_scaling"] for r in runs if r["model"] == "task_arithmetic (λ on val)"]
    grid = demo.DEMO_SCALING_GRIDS["task_arithmetic"]
    assert len(chosen) == 2 and all(min(abs(c - g) for g in grid) < 1e-6 for c in chosen)
    ta = next(e for e in summary if e["model"] == "task_arithmetic (λ on val)")
    assert "vs_average" in ta and "vs_average" not in next(e for e in summary if e["model"] == "average")


@pytest.mark.cuda
@pytest.mark.slow
def test_demo_runs_on_the_gpu(tmp_path):
    summary = demo.main(
        ["--seeds", "0", "--pretrain-epochs", "1", "--expert-epochs", "1", "--neulig-epochs", "1",
         "--methods", "average", "ties", "dare", "mties", "mudsc", "--accelerator", "gpu", "--out", str(tmp_path)]
    )
    assert {"ensemble", "ties", "ties (λ on val)", "mudsc", "neulig (merged)"} <= {e["model"] for e in summary}
    assert (tmp_path / "different_init.json").is_file()
