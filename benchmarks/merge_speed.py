"""Time and peak memory of every classic merge, relative to plain averaging.

K experts of a ~25M-parameter transformer-shaped state dict (embedding, qkv, attention
projection, MLP, norms). Each method runs in a fresh subprocess so its peak resident
memory (``ru_maxrss``) is its own; "peak / inputs" is that peak, less the interpreter's
resident memory before the inputs were made, divided by the experts' (and base's) bytes.

Run: ``make bench`` or ``python benchmarks/merge_speed.py [--experts 8] [--repeats 3]``.
Writes ``benchmarks/results/merge_speed.md``.
"""

from __future__ import annotations

import argparse
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


def transformer_shapes(width: int = 768, vocab: int = 5000, blocks: int = 3) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, width)}
    for b in range(blocks):
        shapes |= block_shapes(f"blocks.{b}.", width)
    return shapes


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(label: str, num_experts: int, repeats: int) -> dict:
    import torch

    from merging.methods import get_method
    from merging.state import num_bytes, num_parameters

    torch.manual_seed(0)
    before = rss_mb()
    shapes = transformer_shapes()
    base = {k: torch.randn(s) * 0.02 for k, s in shapes.items()}
    experts = [{k: v + 0.001 * torch.randn(v.shape) for k, v in base.items()} for _ in range(num_experts)]
    inputs_mb = (num_bytes(base) + sum(num_bytes(e) for e in experts)) / 2**20
    name = label.split(" ")[0]
    method = get_method(name, **METHODS[label])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        merged = method.merge(experts, base)
        times.append(time.perf_counter() - t0)
        del merged
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": label,
        "params": num_parameters(base),
        "seconds": min(times),
        "first": times[0],
        "inputs_mb": inputs_mb,
        "peak_mb": peak_mb - before,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.experts, args.repeats)))
        return

    rows = []
    for label in METHODS:
        out = subprocess.run(
            [sys.executable, __file__, "--one", label, "--experts", str(args.experts), "--repeats", str(args.repeats)],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    avg = rows[0]["seconds"]
    header = (
        f"K={args.experts} experts x {rows[0]['params'] / 1e6:.1f}M parameters (fp32), "
        f"best of {args.repeats}, {rows[0]['threads']} intra-op threads"
    )
    lines = [
        header,
        "",
        "| method | time (s) | time / average | first call (s) | peak RSS (MB) | inputs (MB) | peak / inputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seconds']:.3f} | {r['seconds'] / avg:.2f}x | {r['first']:.3f} "
            f"| {r['peak_mb']:.0f} | "
            f"{r['inputs_mb']:.0f} | {r['peak_mb'] / r['inputs_mb']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from merging.io import write_text_atomic

    write_text_atomic(RESULTS / "merge_speed.md", table)
    print(table)
    print(f"written to {RESULTS / 'merge_speed.md'}")


if __name__ == "__main__":
    main()
