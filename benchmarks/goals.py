"""The performance goals of issue 20, and the one summary table ``make bench`` ends with.

Each goal is a ratio measured within one run of one benchmark, read from the figures that
benchmark wrote as JSON (``--json``). The table gives, per goal: the goal, the figure of this
run, the device, and pass / fail / "not measured: <why>" (a GPU goal on a machine without
one, the FusionBench goal without its venv, a benchmark left out of the run).

Run by ``benchmarks/bench.py`` (``make bench``), which passes the figures it produced; no
stale file from an earlier run is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Figures = dict[str, Any]


@dataclass(frozen=True)
class Goal:
    """One goal: ``figure(figures) <= limit`` (``< limit`` where ``strict``).

    Attributes:
        text: the goal in words, the limit included.
        source: the key of the figures it is read from (see :func:`source_key`).
        device: the device type it is set on (``cpu``, ``cuda``).
        limit: the bound on the figure.
        figure: the figure from the benchmark's JSON (None where the run lacks it).
        unit: ``x`` (a ratio) or ``%``.
        strict: ``under`` rather than ``at most``.
    """

    text: str
    source: str
    device: str
    limit: float
    figure: Callable[[Figures], float | None]
    unit: str = "x"
    strict: bool = False

    def passed(self, value: float) -> bool:
        return value < self.limit if self.strict else value <= self.limit

    def format(self, value: float) -> str:
        return f"{100 * value:.1f}%" if self.unit == "%" else f"{value:.2f}x"


def source_key(benchmark: str, device: str, variant: str = "") -> str:
    """``merge_speed/cpu``, ``mloss_overhead/cuda/bf16-mixed``: a figures file's key."""
    return "/".join(p for p in (benchmark, device, variant) if p)


def _floor(method: str) -> Callable[[Figures], float | None]:
    return lambda f: f["methods"][method]["over_floor"]


def _cold(label: str) -> Callable[[Figures], float | None]:
    return lambda f: f["cold_ratios"].get(label)


GOALS: list[Goal] = [
    Goal("DARE (task arithmetic) time / averaging, at most 3x", "merge_speed/cpu", "cpu", 3.0,
         lambda f: f["dare_over_average"]),
    *(
        Goal(f"first {label} merge in a new process, import included, ours / FusionBench, at most 0.5x",
             "peers/cpu", "cpu", 0.5, _cold(label))
        for label in ("ties", "task_arithmetic", "dare")
    ),
    Goal("DARE (task arithmetic) time / averaging, at most 2x", "merge_speed/cuda", "cuda", 2.0,
         lambda f: f["dare_over_average"]),
    *(
        Goal(f"{method} merge time / memory-bandwidth floor, at most 10x", "merge_speed/cuda", "cuda", 10.0,
             _floor(method))
        for method in ("average", "task_arithmetic", "ties (global)")
    ),
    Goal("M-TIES time / TIES (global), at most 3x", "mties_speed/cuda", "cuda", 3.0, lambda f: f["mties_over_ties"]),
    *(
        Goal(f"MLossMonitor overhead, default schedule, digits default, {name}, under 5% of step time",
             f"mloss_overhead/cuda/{precision}", "cuda", 0.05, lambda f: f["overhead"], unit="%", strict=True)
        for name, precision in (("fp32", "32-true"), ("bf16", "bf16-mixed"))
    ),
]  # fmt: skip
"""Issue 20's goals, CPU first."""


def summarize(figures: dict[str, Figures], missing: dict[str, str]) -> list[dict[str, str]]:
    """One row per goal: ``goal``, ``figure``, ``device`` and ``status``.

    Args:
        figures: this run's figures by :func:`source_key`.
        missing: why a source was not measured, by source key or by its first part(s)
            (``{"cuda": "no GPU"}`` covers every CUDA source; ``{"peers/cpu": "..."}`` one).

    Returns:
        The rows, in the order of :data:`GOALS`.
    """
    rows = []
    for goal in GOALS:
        found = figures.get(goal.source)
        value = goal.figure(found) if found is not None else None
        if value is None:
            parts = goal.source.split("/")
            keys = [goal.source, *("/".join(parts[:n]) for n in range(len(parts) - 1, 0, -1)), goal.device]
            reason = next((missing[k] for k in keys if k in missing), "not in this run")
            figure, device, status = "–", goal.device, f"not measured: {reason}"
        else:
            figure = goal.format(value)
            device = found.get("device_name", goal.device)
            status = ("pass" if goal.passed(value) else "fail") + (" (toy size)" if found.get("toy") else "")
        rows.append({"goal": goal.text, "figure": figure, "device": device, "status": status})
    return rows


def render(rows: list[dict[str, str]], title: str, notes: list[str] = ()) -> str:
    """The rows as one Markdown table under ``title``, then the notes."""
    lines = [f"# {title}", "", "| goal | figure (this run) | device | status |", "|---|---|---|---|"]
    lines += [f"| {r['goal']} | {r['figure']} | {r['device']} | {r['status']} |" for r in rows]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> Path:
    """Write the summary atomically."""
    from _common import ROOT  # noqa: F401 (puts the repository root on sys.path)

    from merging.io import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, text)
