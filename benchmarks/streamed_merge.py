"""Peak memory and wall time of streamed merges from safetensors files (``merge_files``).

Writes K expert files (and θ₀) that together exceed 4 GB, tensor by tensor, to a scratch
folder; then merges them with ``merging.streaming.merge_files`` in a fresh subprocess per
method, so each peak resident memory (``ru_maxrss``) is the merge's own; then deletes every
file. The inputs are far larger than the peak: that is the point of streaming.

Run: ``python benchmarks/streamed_merge.py [--experts 8] [--params 140000000] [--workdir /tmp]``.
Writes ``benchmarks/results/streamed_merge.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
TENSOR_ENTRIES = 4_000_000  # entries per tensor (a 2000 x 2000 matrix)
METHODS = {"average": ("average", {}), "ties (global, density 0.2)": ("ties", {"density": 0.2})}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def layout(params: int) -> dict[str, torch.Tensor]:
    """``params`` fp32 entries as 2000 x 2000 matrices (the last one shorter), plus a buffer."""
    shapes = {}
    for i, start in enumerate(range(0, params, TENSOR_ENTRIES)):
        rows = min(TENSOR_ENTRIES, params - start) // 2000
        shapes[f"layers.{i}.weight"] = torch.empty(rows, 2000, device="meta")
    shapes["norm.num_batches_tracked"] = torch.empty((), dtype=torch.int64, device="meta")
    return shapes


def write_files(folder: Path, num_experts: int, params: int) -> tuple[list[Path], Path]:
    """θ₀ ~ N(0, 1); θ_j = θ₀ + 0.01·N(0, 1), every tensor drawn from its own seed."""
    from merging.streaming import stream_safetensors

    spec = layout(params)

    def entries(expert: int | None):
        for i, (key, meta) in enumerate(spec.items()):
            if not meta.is_floating_point():
                yield key, torch.tensor(100)
                continue
            value = torch.randn(meta.shape, generator=torch.Generator().manual_seed(i))
            if expert is not None:
                noise = torch.randn(meta.shape, generator=torch.Generator().manual_seed(1000 * (expert + 1) + i))
                value.add_(noise, alpha=0.01)
            yield key, value

    base = stream_safetensors(folder / "base.safetensors", spec, entries(None))
    experts = [stream_safetensors(folder / f"expert{j}.safetensors", spec, entries(j)) for j in range(num_experts)]
    return experts, base


def child(method_name: str, hparams: str, experts: list[str], base: str, out: str) -> None:
    from merging.methods import get_method
    from merging.streaming import merge_files

    method = get_method(method_name, **json.loads(hparams))
    before = rss_mb()
    start = time.perf_counter()
    merge_files(method, experts, out, base, progress=False)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_rss_mb": peak, "rss_before_mb": before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--params", type=int, default=140_000_000, help="fp32 entries per expert")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="scratch folder for the big files")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child[:2], json.loads(args.child[2]), *args.child[3:])
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from merging.io import write_text_atomic

    scratch = Path(tempfile.mkdtemp(prefix="streamed_merge.", dir=args.workdir))
    params, note = args.params, ""
    bytes_per_file = params * 4
    needed = (args.experts + 2) * bytes_per_file * 1.05
    free = shutil.disk_usage(scratch).free
    if free < needed:
        params = int(free / 1.05 / (args.experts + 2) / 4) // TENSOR_ENTRIES * TENSOR_ENTRIES
        note = f"\nOnly {free / 1e9:.1f} GB free in {args.workdir}: experts shrunk to {params / 1e6:.0f}M parameters.\n"
    rows = []
    try:
        start = time.perf_counter()
        experts, base = write_files(scratch, args.experts, params)
        input_gb = sum(p.stat().st_size for p in [*experts, base]) / 1e9
        print(
            f"wrote {args.experts} experts + base, {input_gb:.2f} GB, in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        for label, (name, hparams) in METHODS.items():
            out = scratch / "merged.safetensors"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                json.dumps(hparams),
                json.dumps([str(p) for p in experts]),
                str(base),
                str(out),
            ]
            result = subprocess.run(cmd, check=True, capture_output=True, text=True)
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            out.unlink()
            rows.append((label, stats))
            print(label, stats, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    lines = [
        "# Streamed merges from safetensors files",
        "",
        f"K = {args.experts} experts of {params / 1e6:.0f}M fp32 parameters ({params * 4 / 1e9:.2f} GB each) "
        f"plus θ₀: {input_gb:.2f} GB of inputs. `merging.streaming.merge_files`, NaN/inf check on, one "
        f"subprocess per method. Peak RSS is `ru_maxrss`; it includes the ~{rows[0][1]['rss_before_mb']:.0f} MB "
        "resident after importing torch and `merging.methods` (mostly shared libraries), so the last column "
        "is what the merge itself holds.",
        note,
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}.",
        "",
        "| method | inputs (GB) | wall (s) | peak RSS (MB) | RSS before merge (MB) | peak − before (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, stats in rows:
        lines.append(
            f"| {label} | {input_gb:.2f} | {stats['wall_s']:.1f} | {stats['peak_rss_mb']:.0f} "
            f"| {stats['rss_before_mb']:.0f} | "
            f"{stats['peak_rss_mb'] - stats['rss_before_mb']:.0f} |"
        )
    lines.append("")
    table = "\n".join(lines)
    write_text_atomic(RESULTS / "streamed_merge.md", table)
    print(table)


if __name__ == "__main__":
    main()
