"""Time and peak memory of every classic merge, relative to plain averaging.

K experts of a ~25M-parameter transformer-shaped state dict (embedding, qkv, attention
projection, MLP, norms). Each method runs in a fresh subprocess so its peak resident
memory (``ru_maxrss``) is its own; "peak / inputs" is that peak, less the interpreter's
resident memory before the inputs were made, divided by the experts' (and base's) bytes (on
CUDA: the peak of ``torch.cuda.max_memory_allocated``, the inputs included).

``--device`` puts the state dicts there (times synchronise CUDA). The header gives the
device, the torch version and the memory-bandwidth floor: the bytes a method must read and
write (K experts, the base where it takes one, the output) over the device's copy bandwidth,
measured here with a large ``copy_``; each method's time is also given as a multiple of its
floor. DARE's ratio to averaging is printed next to its goal (3x on the CPU, 2x on a GPU).

On a GPU, averaging, task arithmetic and TIES (global) are also set against their goal of at
most 10x their floor.

Each method's "kernels" and "syncs" are what one merge on the GPU code path dispatches
(:class:`merging._opcount.OpCounter`, in a merge outside the timed ones): operators that run
a kernel (on a GPU, at least one launch each, a few microseconds whatever their size) and
host-device synchronisations. On a GPU they are counted on the run's device; on a CPU run the
GPU path is forced on the CPU tensors (:func:`merging._multitensor.forced`) at the same size.

Run: ``make bench`` or ``python benchmarks/merge_speed.py [--experts 8] [--repeats 3]
[--device cuda]``. Writes ``benchmarks/results/merge_speed.md`` (``merge_speed_<device>.md``
for another device) and the figures as JSON beside it (``--json``) for the goal summary.
``--toy`` runs a tiny state dict in this process (a test runs the CUDA code path on CPU
tensors with it) and writes under ``benchmarks/results/toy/`` unless told otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import (  # benchmarks/ is on sys.path when run as a script
    add_device_arguments,
    bandwidth_bytes,
    copy_bandwidth,
    device_name,
    environment,
    peak_memory_mb,
    reset_peak_memory,
    result_path,
    rss_mb,
    synchronize,
    write_figures,
)

METHODS = {
    "average": {},
    "task_arithmetic": {"scaling": 0.3},
    "ties (global)": {"density": 0.2},
    "ties (tensor)": {"density": 0.2, "scope": "tensor"},
    "dare (task arithmetic)": {"drop_rate": 0.9},
    "dare (ties)": {"drop_rate": 0.9, "combine": "ties"},
}


def block_shapes(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one pre-norm transformer block (qkv, projection, 4x MLP, norms)."""
    return {
        prefix + "norm1.weight": (width,),
        prefix + "norm1.bias": (width,),
        prefix + "attn.qkv.weight": (3 * width, width),
        prefix + "attn.qkv.bias": (3 * width,),
        prefix + "attn.proj.weight": (width, width),
        prefix + "attn.proj.bias": (width,),
        prefix + "norm2.weight": (width,),
        prefix + "norm2.bias": (width,),
        prefix + "mlp.fc1.weight": (4 * width, width),
        prefix + "mlp.fc1.bias": (4 * width,),
        prefix + "mlp.fc2.weight": (width, 4 * width),
        prefix + "mlp.fc2.bias": (width,),
    }


DARE_GOAL = {"cpu": 3.0, "cuda": 2.0}
"""DARE (task-arithmetic combine) time / averaging time, the goal per device type (issue 20)."""
FLOOR_GOAL = {"cuda": 10.0}
"""Time / bandwidth floor of :data:`FLOOR_GOAL_METHODS`, the goal per device type (issue 20)."""
FLOOR_GOAL_METHODS = ("average", "task_arithmetic", "ties (global)")


def transformer_shapes(width: int = 768, vocab: int = 5000, blocks: int = 3) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, width)}
    for b in range(blocks):
        shapes |= block_shapes(f"blocks.{b}.", width)
    return shapes


def floor_bytes(label: str, params: int, num_experts: int) -> int:
    """Bytes a merge must move at least: K experts read, the base read (all but averaging),
    the output written, in fp32."""
    reads = num_experts + (0 if label == "average" else 1)
    return 4 * params * (reads + 1)


def run_one(label: str, num_experts: int, repeats: int, device: str = "cpu", toy: bool = False) -> dict:
    import torch

    from merging.methods import get_method
    from merging.state import num_bytes, num_parameters

    torch.manual_seed(0)
    before = rss_mb()
    shapes = transformer_shapes(width=32, vocab=50, blocks=1) if toy else transformer_shapes()
    base = {k: (torch.randn(s) * 0.02).to(device) for k, s in shapes.items()}
    experts = [
        {k: v + 0.001 * torch.randn(v.shape, device=device) for k, v in base.items()} for _ in range(num_experts)
    ]
    inputs_mb = (num_bytes(base) + sum(num_bytes(e) for e in experts)) / 2**20
    name = label.split(" ")[0]
    method = get_method(name, **METHODS[label])
    reset_peak_memory(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        merged = method.merge(experts, base)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        del merged
    peak_mb = peak_memory_mb(device)
    if peak_mb is None:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    count = gpu_path_count(method, experts, base, device)
    return {
        "method": label,
        "params": num_parameters(base),
        "seconds": min(times),
        "first": times[0],
        "inputs_mb": inputs_mb,
        "peak_mb": peak_mb,
        "threads": torch.get_num_threads(),
        "kernels": count.kernel_total,
        "syncs": count.sync_total,
    }


def gpu_path_count(method, experts: list[dict], base: dict, device: str):
    """What one merge on the GPU code path dispatches (an ``OpCounter``): on the run's device
    when it is a GPU, else the GPU path forced on these CPU tensors."""
    from merging import _multitensor
    from merging._opcount import OpCounter

    forced = _multitensor.forced() if device.split(":")[0] == "cpu" else contextlib.nullcontext()
    with forced, OpCounter() as count:
        method.merge(experts, base)
    return count


def table(rows: list[dict], args: argparse.Namespace, device_name: str, torch_version: str, bandwidth: float) -> str:
    """The results as markdown: a header (device, torch, bandwidth floor), one row per method,
    and DARE's ratio to averaging next to its goal."""
    avg = rows[0]["seconds"]
    params = rows[0]["params"]
    kind = args.device.split(":")[0]
    avg_floor = floor_bytes("average", params, args.experts) / bandwidth
    header = (
        f"K={args.experts} experts x {params / 1e6:.1f}M parameters (fp32) on {device_name}, torch {torch_version}, "
        f"best of {args.repeats}, {rows[0]['threads']} intra-op threads\n\n"
        f"Bandwidth floor: measured copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); averaging moves "
        f"{floor_bytes('average', params, args.experts) / 1e9:.2f} GB (K experts read, output written): "
        f"floor {avg_floor * 1e3:.2f} ms; the other methods also read the base."
    )
    where = (
        f"counted on {kind}"
        if kind != "cpu"
        else "counted on this CPU run, with that path forced on the same tensors: merging._multitensor.forced()"
    )
    header += (
        f"\n\nkernels / syncs: what one merge on the GPU code path dispatches ({where}; "
        "merging._opcount.OpCounter): operators that run a kernel (a torch._foreach_ operator counts once; "
        "on CUDA it runs one launch per ~20M entries or ~30-110 tensors) and host-device syncs."
    )
    peak = "peak CUDA memory (MB)" if kind == "cuda" else "peak RSS (MB)"
    lines = [
        header,
        "",
        f"| method | time (s) | time / average | time / floor | first call (s) | {peak} "
        "| inputs (MB) | peak / inputs | kernels | syncs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor = floor_bytes(r["method"], params, args.experts) / bandwidth
        lines.append(
            f"| {r['method']} | {r['seconds']:.3f} | {r['seconds'] / avg:.2f}x | {r['seconds'] / floor:.1f}x "
            f"| {r['first']:.3f} | {r['peak_mb']:.0f} | {r['inputs_mb']:.0f} | {r['peak_mb'] / r['inputs_mb']:.2f} "
            f"| {r['kernels']} | {r['syncs']} |"
        )
    dare = next((r for r in rows if r["method"] == "dare (task arithmetic)"), None)
    if dare is not None:
        goal = DARE_GOAL.get(kind)
        goal_text = f"goal at most {goal:.0f}x on {kind}" if goal else "no goal set for this device type"
        lines += ["", f"DARE (task arithmetic) / average: {dare['seconds'] / avg:.2f}x ({goal_text})."]
    goal = FLOOR_GOAL.get(kind)
    floors = ", ".join(
        f"{r['method']} {r['seconds'] * bandwidth / floor_bytes(r['method'], params, args.experts):.1f}x"
        for r in rows
        if r["method"] in FLOOR_GOAL_METHODS
    )
    goal_text = f"goal at most {goal:.0f}x on {kind}" if goal else "goal at most 10x on a GPU; none on " + kind
    lines += ["", f"Time / floor: {floors} ({goal_text})."]
    return "\n".join(lines) + "\n"


def figures(rows: list[dict], args: argparse.Namespace, bandwidth: float) -> dict:
    """The run's figures for the goal summary: per method time, time / average, time / floor."""
    avg = rows[0]["seconds"]
    params = rows[0]["params"]
    methods = {
        r["method"]: r
        | {
            "over_average": r["seconds"] / avg,
            "over_floor": r["seconds"] * bandwidth / floor_bytes(r["method"], params, args.experts),
        }
        for r in rows
    }
    dare = methods.get("dare (task arithmetic)")
    return environment(args.device, bandwidth, args.toy) | {
        "benchmark": "merge_speed",
        "experts": args.experts,
        "repeats": args.repeats,
        "params": params,
        "methods": methods,
        "dare_over_average": dare["over_average"] if dare else None,
        "dare_goal": DARE_GOAL.get(args.device.split(":")[0]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=None, help="K (default 8; 2 with --toy)")
    parser.add_argument("--repeats", type=int, default=None, help="timed merges per method (default 3; 1 with --toy)")
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="results table (default benchmarks/results/...)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.experts = args.experts if args.experts is not None else (2 if args.toy else 8)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.toy else 3)
    if args.one:
        row = run_one(args.one, args.experts, args.repeats, args.device, args.toy)
        print(json.dumps(row))
        return row

    import torch

    rows = []
    for label in METHODS:
        if args.toy:  # in this process: the code path of the subprocesses, without their start-up
            with contextlib.redirect_stdout(sys.stderr):
                rows.append(run_one(label, args.experts, args.repeats, args.device, args.toy))
            continue
        command = [sys.executable, __file__, "--one", label, "--experts", str(args.experts)]
        command += ["--repeats", str(args.repeats), "--device", args.device]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    bandwidth = copy_bandwidth(args.device, bandwidth_bytes(args.toy))
    text = table(rows, args, device_name(args.device), torch.__version__, bandwidth)
    from merging.io import write_text_atomic

    out_path = args.out or result_path("merge_speed", args.device, args.toy, "md")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_path, text)
    result = figures(rows, args, bandwidth)
    json_path = write_figures(args.json or result_path("merge_speed", args.device, args.toy, "json"), result)
    print(text)
    print(f"written to {out_path} and {json_path}")
    return result


if __name__ == "__main__":
    main()
