"""What every benchmark shares: the device (``--device``), clocks that synchronise CUDA,
the memory-bandwidth floor, the header line (device, torch version, bandwidth) and the
figures written as JSON for the goal summary (``benchmarks/goals.py``).

The benchmarks are scripts: importing this module puts the repository root first on
``sys.path``, so they run this checkout's ``merging`` whatever is installed.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
TOY_RESULTS = RESULTS / "toy"
"""Where ``--toy`` runs write by default: never over a full-size result."""

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--toy`` and ``--json``, the same in every benchmark."""
    parser.add_argument("--device", default="cpu", help="where tensors live and models run: cpu, cuda, cuda:1, ...")
    parser.add_argument("--toy", action="store_true", help="tiny sizes: tests the code path, measures nothing")
    parser.add_argument("--json", type=Path, default=None, help="figures file (default benchmarks/results/...)")


def device_type(device: str) -> str:
    """``"cuda:1"`` -> ``"cuda"``."""
    import torch

    return torch.device(device).type


def result_path(name: str, device: str, toy: bool, ext: str, suffix: str = "") -> Path:
    """``benchmarks/results/{name}[_{device type}]{suffix}.{ext}`` (``results/toy/`` with ``--toy``)."""
    kind = device_type(device)
    folder = TOY_RESULTS if toy else RESULTS
    return folder / f"{name}{'' if kind == 'cpu' else '_' + kind}{suffix}.{ext}"


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: str, cpu_time: bool = False) -> Callable[[], float]:
    """A clock for timing work on ``device``: on CUDA, wall-clock time after a
    ``torch.cuda.synchronize`` (kernels run asynchronously); on the CPU, this process's CPU
    time if ``cpu_time`` (less distorted by other jobs on a shared machine), else wall-clock."""
    if device_type(device) == "cuda":

        def now() -> float:
            synchronize(device)
            return time.perf_counter()

        return now
    return time.process_time if cpu_time else time.perf_counter


def device_name(device: str) -> str:
    """``cuda:0 (NVIDIA H200)``, ``cpu (x86_64, 2 threads)``."""
    import platform

    import torch

    if device_type(device) == "cuda":
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    threads = torch.get_num_threads()
    return f"{device} ({platform.machine()}, {threads} thread{'' if threads == 1 else 's'})"


def copy_bandwidth(device: str, nbytes: int, repeats: int = 5) -> float:
    """The device's copy bandwidth in bytes/s: (bytes read + bytes written) / time of one
    ``dst.copy_(src)`` of ``nbytes``, best of ``repeats``."""
    import torch

    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy touches the pages: not timed
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def bandwidth_bytes(toy: bool) -> int:
    """The copy the bandwidth floor is measured with: 1 GiB (4 MiB with ``--toy``)."""
    return (1 << 22) if toy else (1 << 30)


def header_line(device: str, bandwidth: float) -> str:
    """The line every benchmark prints first: device, torch version, bandwidth floor."""
    import torch

    return (
        f"Device: {device_name(device)}; torch {torch.__version__}; "
        f"bandwidth floor: measured copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)"
    )


def reset_peak_memory(device: str) -> None:
    import torch

    if device_type(device) == "cuda":
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_mb(device: str) -> float | None:
    """Peak CUDA memory allocated since the last reset, in MiB; None on the CPU."""
    import torch

    if device_type(device) == "cuda":
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return None


def rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def environment(device: str, bandwidth: float | None, toy: bool) -> dict[str, Any]:
    """The fields every figures file starts with."""
    import torch

    return {
        "device": device,
        "device_type": device_type(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "bandwidth": bandwidth,
        "toy": toy,
    }


def write_figures(path: Path, figures: dict[str, Any]) -> Path:
    """Write a benchmark's figures as JSON, atomically (the goal summary reads them)."""
    from merging.io import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(figures, indent=1, sort_keys=True) + "\n")


def trainer_hardware(device: str) -> dict[str, Any]:
    """``--device`` as a Lightning Trainer's ``accelerator`` and ``devices``: ``cpu`` ->
    ``("cpu", 1)``, ``cuda`` -> ``("gpu", [0])``, ``cuda:1`` -> ``("gpu", [1])``."""
    import torch

    d = torch.device(device)
    if d.type == "cuda":
        return {"accelerator": "gpu", "devices": [d.index or 0]}
    if d.type == "cpu":
        return {"accelerator": "cpu", "devices": 1}
    raise ValueError(f"--device {device!r}: the benchmarks train on cpu or cuda[:index]")
