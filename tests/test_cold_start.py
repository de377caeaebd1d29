"""``benchmarks/cold_start.py --toy``: the wheel is built and installed, every scenario's
processes run the installed copy (read-only ones where this machine can mount read-only),
and the table and figures are written."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


@pytest.mark.slow
def test_cold_start_toy_runs_every_scenario(tmp_path):
    cold_start = importlib.import_module("cold_start")
    out = tmp_path / "cold.md"
    figures = cold_start.main(["--toy", "--processes", "1", "--out", str(out), "--json", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text()) == figures
    scenarios = figures["scenarios"]
    assert list(scenarios) == [name for name, *_ in cold_start.SCENARIOS]
    for name, row in scenarios.items():
        if "skipped" in row:  # no root or no unshare here: said in the table
            assert name != "writable" and "not run" in out.read_text()
            continue
        (process,) = row["processes"]
        assert "error" not in process, process
        assert process["cold_seconds"] >= process["import_seconds"] > 0
    assert "| writable |" in out.read_text()


def test_cold_start_refuses_a_gpu_device():
    cold_start = importlib.import_module("cold_start")
    with pytest.raises(SystemExit):
        cold_start.main(["--device", "cuda", "--toy"])
