"""The merge-speed benchmark's code paths at toy size, on CPU tensors: the path a GPU run
takes (``--device``, synchronised timing, bandwidth floor, DARE's goal) cannot fail on a
code error the first time it meets a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "merge_speed.py"


@pytest.fixture(scope="module")
def merge_speed():
    if str(BENCHMARKS) not in sys.path:  # its shared helpers, benchmarks/_common.py
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("merge_speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_run_prints_device_floor_and_dare_goal(merge_speed, tmp_path, capsys):
    out = tmp_path / "merge_speed.md"
    result = merge_speed.main(["--device", "cpu", "--toy", "--out", str(out), "--json", str(tmp_path / "f.json")])
    text = out.read_text()
    assert json.loads((tmp_path / "f.json").read_text()) == json.loads(json.dumps(result))
    assert result["toy"] and result["device_type"] == "cpu" and result["dare_goal"] == 3.0
    assert result["dare_over_average"] == pytest.approx(
        result["methods"]["dare (task arithmetic)"]["seconds"] / result["methods"]["average"]["seconds"]
    )
    assert "Time / floor: average" in text
    assert text in capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and "on cpu" in text
    assert "Bandwidth floor" in text and "time / floor" in text
    assert "DARE (task arithmetic) / average" in text and "goal at most 3x on cpu" in text
    for label in merge_speed.METHODS:
        assert f"| {label} |" in text


def test_one_method_subprocess_entry_point(merge_speed, capsys):
    merge_speed.main(["--one", "dare (task arithmetic)", "--device", "cpu", "--toy", "--experts", "2"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["method"] == "dare (task arithmetic)" and row["seconds"] > 0


def test_cuda_goal_and_floor(merge_speed):
    assert merge_speed.DARE_GOAL == {"cpu": 3.0, "cuda": 2.0}
    assert merge_speed.floor_bytes("average", 10, 4) == 4 * 10 * 5
    assert merge_speed.floor_bytes("dare (task arithmetic)", 10, 4) == 4 * 10 * 6
