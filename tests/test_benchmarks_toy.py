"""Every benchmark's ``--toy`` path on CPU tensors, and the goal summary of ``make bench``:
the code a GPU run takes (``--device``, synchronised clocks, bandwidth floor, JSON figures,
goals) cannot fail on a code error the first time it meets a GPU or FusionBench's venv."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


def _module(name: str):
    return importlib.import_module(name)


@contextlib.contextmanager
def _restored_process_state():
    """The benchmarks set process-wide state (torch's thread count; mloss_overhead the root
    logger and Lightning's log levels): put it back for the tests that follow in this worker."""
    threads = torch.get_num_threads()
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    root_level, root_handlers = logging.root.level, logging.root.handlers[:]
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        logging.root.setLevel(root_level)
        logging.root.handlers[:] = root_handlers


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """``bench.py --toy`` once: every benchmark at toy size on the CPU, then the summary."""
    results = tmp_path_factory.mktemp("bench")
    with _restored_process_state():
        rows = _module("bench").main(
            ["--toy", "--no-gpu", "--results", str(results), "--peer-python", str(results / "no-peer-python")]
        )
    return results, rows


def test_toy_run_leaves_the_process_state_as_it_found_it(toy_run):
    assert logging.getLogger("lightning.pytorch").level != logging.ERROR


def test_toy_run_writes_every_table_and_figures(toy_run):
    results, _ = toy_run
    for stem in ("merge_speed", "mloss_overhead", "mties_speed"):
        text = (results / f"{stem}.md").read_text()
        figures = json.loads((results / f"{stem}.json").read_text())
        assert f"torch {torch.__version__}" in text and "cpu (" in text
        assert figures["device_type"] == "cpu" and figures["toy"] and figures["bandwidth"] > 0
    assert "Bandwidth floor" in (results / "merge_speed.md").read_text()
    assert "bandwidth floor" in (results / "mties_speed.md").read_text()
    assert "bandwidth floor" in (results / "mloss_overhead.md").read_text()


def test_mties_toy_ratio_and_goal(toy_run):
    results, _ = toy_run
    figures = json.loads((results / "mties_speed.json").read_text())
    runs = figures["runs"]
    mties, ties = runs["M-TIES (k=0.8, e=0.1, S=1, all fc1)"], runs["TIES (global, k=0.2)"]
    assert figures["mties_over_ties"] == pytest.approx(mties["total"] / ties["total"])
    assert figures["mties_goal"] is None  # the goal is set on a GPU only
    assert "goal at most 3x on a GPU; none on cpu" in (results / "mties_speed.md").read_text()
    # kernels and syncs per merge on the GPU code path, beside the time ratio
    assert figures["mties_over_ties_kernels"] == pytest.approx(mties["kernels"] / ties["kernels"])
    assert figures["mties_over_ties_syncs"] == pytest.approx(mties["syncs"] / ties["syncs"])
    assert mties["row_syncs"] == 0 and mties["row_kernels"] > 0 and ties["row_kernels"] == 0
    assert "Kernels and host syncs per merge, GPU code path" in (results / "mties_speed.md").read_text()


def test_mloss_toy_overhead_and_goal(toy_run):
    results, _ = toy_run
    figures = json.loads((results / "mloss_overhead.json").read_text())
    assert figures["period"] == 2 and figures["precision"] == "32-true"
    case = _module("mloss_overhead").GOAL_CASE
    assert figures["overhead"] == figures["cases"][case]["overhead"]
    text = (results / "mloss_overhead.md").read_text()
    assert "toy schedule (one measurement every 2 steps" in text
    # the counting block: what a measurement and the other steps dispatch
    counted = figures["cases"][case]
    assert counted["kernels_per_measurement"] > 0 and counted["syncs_per_measurement"] >= 1
    assert counted["kernels_per_other_step"] == counted["syncs_per_other_step"] == 0
    assert counted["cuda_syncs_per_measurement"] is None and counted["logged_values"] > 0
    assert "kernels per measurement" in text
    assert "goal under 5% on a GPU; none on cpu" in text and "accelerator cpu, precision 32-true" in text


def test_mloss_toy_bf16(tmp_path):
    with _restored_process_state():
        figures = _module("mloss_overhead").main(
            ["--toy", "--skip-cost", "--precision", "bf16-mixed", "--out", str(tmp_path / "m.md"),
             "--json", str(tmp_path / "m.json")]
        )  # fmt: skip
    assert figures["precision"] == "bf16-mixed" and json.loads((tmp_path / "m.json").read_text()) == figures
    assert "precision bf16-mixed" in (tmp_path / "m.md").read_text()


def test_summary_table_lists_every_goal(toy_run):
    results, rows = toy_run
    goals = _module("goals")
    text = (results / "goals.md").read_text()
    assert len(rows) == len(goals.GOALS) and text.count("\n| ") == len(goals.GOALS) + 1
    by_goal = {r["goal"]: r for r in rows}
    dare = by_goal["DARE (task arithmetic) time / averaging, at most 3x"]
    figures = json.loads((results / "merge_speed.json").read_text())
    assert dare["figure"] == f"{figures['dare_over_average']:.2f}x"
    assert dare["status"] == ("pass" if figures["dare_over_average"] <= 3 else "fail") + " (toy size)"
    for goal in goals.GOALS:
        row = by_goal[goal.text]
        if goal.device == "cuda":
            assert row["status"] == "not measured: no GPU" and row["figure"] == "–"
        elif goal.source == "peers/cpu":
            assert row["status"].startswith("not measured: no FusionBench venv")


def test_summary_pass_fail_and_missing():
    goals = _module("goals")
    figures = {
        "merge_speed/cpu": {"dare_over_average": 3.5, "device_name": "cpu"},
        "merge_speed/cuda": {
            "dare_over_average": 1.5,
            "device_name": "cuda:0",
            "methods": {m: {"over_floor": f} for m, f in (("average", 2.0), ("task_arithmetic", 10.0),
                                                         ("ties (global)", 12.0))},
        },
        "mloss_overhead/cuda/32-true": {"overhead": 0.05},
        "mloss_overhead/cuda/bf16-mixed": {"overhead": 0.049},
    }  # fmt: skip
    rows = {r["goal"]: r for r in goals.summarize(figures, {"peers/cpu": "no venv"})}
    assert rows["DARE (task arithmetic) time / averaging, at most 3x"]["status"] == "fail"
    assert rows["DARE (task arithmetic) time / averaging, at most 2x"]["status"] == "pass"
    assert rows["task_arithmetic merge time / memory-bandwidth floor, at most 10x"]["status"] == "pass"
    assert rows["ties (global) merge time / memory-bandwidth floor, at most 10x"]["status"] == "fail"
    fp32 = "MLossMonitor overhead, default schedule, digits default, fp32, under 5% of step time"
    assert rows[fp32]["status"] == "fail" and rows[fp32]["figure"] == "5.0%"  # "under": 5% fails
    assert rows[fp32.replace("fp32", "bf16")]["status"] == "pass"
    assert rows["M-TIES time / TIES (global), at most 3x"]["status"] == "not measured: not in this run"
    first_ties = "first ties merge in a new process, import included, ours / FusionBench, at most 0.5x"
    assert rows[first_ties]["status"] == "not measured: no venv"


def test_peers_toy_ours_side(tmp_path):
    """The peers benchmark's inputs, workers (cold and warm), comparison and report at toy size.
    FusionBench is not installed here: its side is stood in for by copies of ours."""
    peers = _module("peers")
    folder = tmp_path / "inputs"
    folder.mkdir()
    with _restored_process_state():
        peers.main(["--make-inputs", str(folder), "--toy"])
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["environment"]["toy"] and "bandwidth floor" in meta["header"]
        for label in peers.OURS:
            peers.main(["--worker", "ours", label, str(folder), "--toy", "--cold"])
            peers.main(["--worker", "ours", label, str(folder), "--toy", "--repeats", "2"])
    figures = {}
    for label in peers.OURS:
        figures[label] = json.loads((folder / f"ours-{peers.tag(label)}-2.json").read_text())
        cold = json.loads((folder / f"ours-{peers.tag(label)}-2-cold.json").read_text())
        assert cold["cold_seconds"] > cold["import_seconds"] > 0 and "cold_seconds" not in figures[label]
        figures[label] |= cold
        assert len(figures[label]["times"]) == 2
        for name in [label] + ([peers.THEIRS[label]] if peers.THEIRS[label] else []):
            shutil.copy(
                folder / f"ours-{peers.tag(label)}-2.safetensors", folder / f"theirs-{peers.tag(name)}-2.safetensors"
            )
    peers.main(["--compare", str(folder), "--toy"])
    compared = json.loads((folder / "compare-2.json").read_text())
    assert compared["ties"]["differing"] == 0
    rows = []
    for label, variant in peers.THEIRS.items():
        rows.append(
            {"k": 2, "label": label, "ours": figures[label], "theirs": figures[label], "compare": compared[label]}
        )
        if variant:
            rows.append(
                {"k": 2, "label": variant, "ours": figures[label], "theirs": None, "compare": compared[variant]}
            )
    args = peers.argparse.Namespace(experts=[2], repeats=2)
    peer = {"fusion-bench": "stand-in", "torch": torch.__version__, "python": "3"}
    extra = {"load_before": "0", "load_after": "0", "wall": 1.0, "command": "test"}
    info = peers.info_from(meta, rows, args, peer, extra)
    result = peers.report(rows, info, tmp_path / "peers.md", tmp_path / "peers.json")
    text = (tmp_path / "peers.md").read_text()
    assert "| ours cold (s) | FB cold (s) | cold ratio |" in text and "bandwidth floor" in text
    assert "first ties merge in a new process, import included, on K=2 experts at most 0.5x" in text
    assert result["cold_ratios"] == {"ties": 1.0, "task_arithmetic": 1.0, "dare": 1.0}
    assert json.loads((tmp_path / "peers.json").read_text())["cold_goal"] == 0.5
    goals = _module("goals")
    status = {r["goal"]: r["status"] for r in goals.summarize({"peers/cpu": result}, {})}
    assert status["first ties merge in a new process, import included, ours / FusionBench, at most 0.5x"] == (
        "fail (toy size)"
    )


def test_peers_without_its_venv_says_how_to_make_it(tmp_path):
    with pytest.raises(SystemExit, match="make bench-peers"):
        _module("peers").main(["--toy", "--peer-python", str(tmp_path / "missing" / "python")])


def test_device_helpers():
    common = _module("_common")
    assert common.trainer_hardware("cpu") == {"accelerator": "cpu", "devices": 1}
    assert common.trainer_hardware("cuda") == {"accelerator": "gpu", "devices": [0]}
    assert common.trainer_hardware("cuda:1") == {"accelerator": "gpu", "devices": [1]}
    assert common.peak_memory_mb("cpu") is None
    assert common.result_path("mties_speed", "cuda:1", False, "json") == common.RESULTS / "mties_speed_cuda.json"
    assert common.result_path("merge_speed", "cpu", True, "md") == common.TOY_RESULTS / "merge_speed.md"
    assert common.clock("cpu", cpu_time=True)() >= 0
    assert f"torch {torch.__version__}" in common.header_line("cpu", 1e10) and "10.0 GB/s" in common.header_line(
        "cpu", 1e10
    )
