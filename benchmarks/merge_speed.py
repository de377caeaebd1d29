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

Run: ``make bench`` or ``python benchmarks/merge_speed.py [--experts 8] [--repeats 3]
[--device cuda]``. Writes ``benchmarks/results/merge_speed.md`` (``merge_speed_<device>.md``
for another device). ``--toy`` runs a tiny state dict (a test runs the CUDA code path on CPU
tensors with it).
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

RESULTS = Path(__file__).parent / "results"

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


def transformer_shapes(width: int = 768, vocab: int = 5000, blocks: int = 3) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, width)}
    for b in range(blocks):
        shapes |= block_shapes(f"blocks.{b}.", width)
    return shapes


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def synchronize(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
    cuda = torch.device(device).type == "cuda"
    before = rss_mb()
    shapes = transformer_shapes(width=32, vocab=50, blocks=1) if toy else transformer_shapes()
    base = {k: (torch.randn(s) * 0.02).to(device) for k, s in shapes.items()}
    experts = [
        {k: v + 0.001 * torch.randn(v.shape, device=device) for k, v in base.items()} for _ in range(num_experts)
    ]
    inputs_mb = (num_bytes(base) + sum(num_bytes(e) for e in experts)) / 2**20
    name = label.split(" ")[0]
    method = get_method(name, **METHODS[label])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        merged = method.merge(experts, base)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        del merged
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {
        "method": label,
        "params": num_parameters(base),
        "seconds": min(times),
        "first": times[0],
        "inputs_mb": inputs_mb,
        "peak_mb": peak_mb,
        "threads": torch.get_num_threads(),
    }


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
    peak = "peak CUDA memory (MB)" if kind == "cuda" else "peak RSS (MB)"
    lines = [
        header,
        "",
        f"| method | time (s) | time / average | time / floor | first call (s) | {peak} "
        "| inputs (MB) | peak / inputs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor = floor_bytes(r["method"], params, args.experts) / bandwidth
        lines.append(
            f"| {r['method']} | {r['seconds']:.3f} | {r['seconds'] / avg:.2f}x | {r['seconds'] / floor:.1f}x "
            f"| {r['first']:.3f} | {r['peak_mb']:.0f} | {r['inputs_mb']:.0f} | {r['peak_mb'] / r['inputs_mb']:.2f} |"
        )
    dare = next((r for r in rows if r["method"] == "dare (task arithmetic)"), None)
    if dare is not None:
        goal = DARE_GOAL.get(kind)
        goal_text = f"goal at most {goal:.0f}x on {kind}" if goal else "no goal set for this device type"
        lines += ["", f"DARE (task arithmetic) / average: {dare['seconds'] / avg:.2f}x ({goal_text})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=None, help="K (default 8; 2 with --toy)")
    parser.add_argument("--repeats", type=int, default=None, help="timed merges per method (default 3; 1 with --toy)")
    parser.add_argument("--device", default="cpu", help="where the state dicts live: cpu, cuda, cuda:1, ...")
    parser.add_argument("--toy", action="store_true", help="a tiny state dict, each method in this process")
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/...)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.experts = args.experts if args.experts is not None else (2 if args.toy else 8)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.toy else 3)
    if args.one:
        print(json.dumps(run_one(args.one, args.experts, args.repeats, args.device, args.toy)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
    device = torch.device(args.device)
    if device.type == "cuda":
        device_name = f"{args.device} ({torch.cuda.get_device_name(device)})"
    else:
        device_name = f"{args.device} ({torch.get_num_threads()} threads)"
    bandwidth = copy_bandwidth(args.device, (1 << 22) if args.toy else (1 << 30))
    text = table(rows, args, device_name, torch.__version__, bandwidth)
    from merging.io import write_text_atomic

    suffix = "" if device.type == "cpu" else f"_{device.type}"
    out_path = args.out or RESULTS / f"merge_speed{suffix}.md"
    write_text_atomic(out_path, text)
    print(text)
    print(f"written to {out_path}")


if __name__ == "__main__":
    main()
