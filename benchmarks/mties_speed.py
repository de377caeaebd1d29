"""M-TIES against TIES on the same model: time per phase, and the M-TIES / TIES ratio.

The M-Loss paper reports M-TIES at about 3x the time of TIES (≈90 s vs ≈30 s for CLIP
ViT-B/32 on an RTX A6000). Here, on the CPU: a timm ViT-B/32 skeleton (``pretrained=False``,
88M parameters, 224x224 inputs), K experts θ₀ + τ_j with random task vectors
(τ ~ N(0, 0.01²) per entry), and an unlabeled pool of random images in a few batches.

Methods, with the defaults of ``spec/mloss.md`` §1.5/§1.7:

- **TIES**: global top-k at k = 0.2, elect, disjoint mean, λ = 1 (the paper's baseline);
- **M-TIES**: k = 0.8, e = 0.1, S = 1 (K·S draws of the pool per target layer, the pool
  cycling), reference θ₀, targets every ``blocks.*.mlp.fc1``, per-tensor TIES at k elsewhere;
- **Few-Layer M-TIES**: the same on blocks {8, 9, 10} only (§1.6).

Phases (process CPU time, one torch thread unless ``--threads``; with ``--device cuda``
wall-clock time after ``torch.cuda.synchronize``, and each method's peak CUDA memory):

- *M-Loss statistics*: M-TIES's pass over the data (reference forwards with hooks, the K
  experts' fc1 on the hooked inputs, the gap, the node M-Loss, the row rates);
- *row thresholds*: M-TIES's exact row-wise selections on the target weights;
- *tensor / global thresholds*: the exact magnitude thresholds of TIES (the global pass, or
  one per tensor) and of M-TIES's non-target entries (per tensor, as TIES with
  ``scope="tensor"``, which M-TIES runs for them);
- *merge*: trim, elect and disjoint mean of every entry (everything else of ``merge``,
  input checks included).

The statistics' floor is printed beside them: one plain forward of θ₀ over the distinct
batches plus the K-expert fc1 GEMMs of every draw, the FLOPs M-TIES cannot avoid.

Kernels and host syncs per merge, the GPU's fixed costs, are counted on whatever device
runs the benchmark (:class:`merging._opcount.OpCounter`: each kernel is at least one launch
on a GPU, a few µs whatever its size; each sync drains the device queue) on the **GPU code
path**: the multi-tensor path forced on this device's tensors
(:func:`merging._multitensor.forced`: TIES's groups of entries, one host read for the finite
check, the fused CPU-only numba kernels off), M-TIES's row selections over whole weights
instead of the CPU's cache-sized blocks (``mties.SELECTION_BLOCK``). One extra merge per
method, not timed; in all and for M-TIES's two phases of its own (the statistics with the
rates, the row thresholds), with the syncs by operator.

The header gives the device, the torch version and the memory-bandwidth floor (the copy
bandwidth and the time to read the K experts and θ₀ and write the merge once); the M-TIES /
TIES ratio is printed next to its goal (at most 3x on a GPU).

Usage::

    .venv/bin/python benchmarks/mties_speed.py [--experts 4] [--batches 4] [--batch-size 16] [--device cuda]

Prints a table and writes ``benchmarks/results/mties_speed[_cuda].md`` (atomically) and the
figures as JSON beside it (``--json``). ``--toy``: a 12-block ViT of width 32 on 32x32 images,
K = 2, one repeat, written under ``benchmarks/results/toy/``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (  # benchmarks/ is on sys.path when run as a script; puts the root first
    add_device_arguments,
    bandwidth_bytes,
    clock,
    copy_bandwidth,
    device_type,
    environment,
    header_line,
    peak_memory_mb,
    reset_peak_memory,
    result_path,
    write_figures,
)

import merging.methods.classic as classic
import merging.methods.mties as mties
import merging.methods.ties as ties
from merging import _multitensor
from merging._opcount import OpCounter
from merging.io import write_text_atomic
from merging.methods import get_method
from merging.mloss import find_activation_layers

FEW_LAYERS = [f"blocks.{i}.mlp.fc1" for i in (8, 9, 10)]
MTIES_GOAL = {"cuda": 3.0}
"""M-TIES time / TIES (global) time, the goal per device type (issue 20; the paper's GPU ratio)."""
MTIES_RUN, TIES_RUN = "M-TIES (k=0.8, e=0.1, S=1, all fc1)", "TIES (global, k=0.2)"

_now = time.process_time
"""The clock of every phase: :func:`_common.clock` of the device (set in :func:`main`)."""


@dataclass
class Phases:
    """Accumulated process CPU time per phase (s)."""

    times: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        self.times[phase] = self.times.get(phase, 0.0) + seconds


def _timed(fn: Callable[..., Any], phases: Phases, phase: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = _now()
        try:
            return fn(*args, **kwargs)
        finally:
            phases.add(phase, _now() - start)

    return wrapper


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def timed_merge(method_name: str, hparams: dict[str, Any], experts, base, model, data) -> dict[str, float]:
    """One merge; returns {phase: seconds} and the total."""
    method = get_method(method_name, **hparams)
    phases = Phases()
    # Threshold selections, wherever they are called from (module-level names are looked up
    # at call time, so the instrumented versions are the ones the methods run).
    with (
        _patched(classic, "global_magnitude_thresholds", _timed(classic.global_magnitude_thresholds, phases, "tensor")),
        _patched(ties, "global_magnitude_thresholds", _timed(ties.global_magnitude_thresholds, phases, "tensor")),
        _patched(ties, "magnitude_threshold", _timed(ties.magnitude_threshold, phases, "tensor")),
        _patched(mties, "row_thresholds", _timed(mties.row_thresholds, phases, "row")),
    ):
        method.prepare = _timed(method.prepare, phases, "prepare")
        start = _now()
        kwargs = {"model": model, "data": data} if method.requires_data else {}
        method.merge(experts, base, **kwargs)
        total = _now() - start
    t = phases.times
    if method_name == "ties" and hparams.get("scope", "global") == "global":  # prepare = the global pass
        tensor, stats = t.get("prepare", 0.0), 0.0
    elif method_name == "ties":
        tensor, stats = t.get("tensor", 0.0), 0.0
    else:  # prepare = the M-Loss statistics; thresholds are taken entry by entry
        tensor, stats = t.get("tensor", 0.0), t.get("prepare", 0.0)
    row = t.get("row", 0.0)
    merge = total - stats - tensor - row
    return {"stats": stats, "row": row, "tensor": tensor, "merge": merge, "total": total}


def counted_merge(method_name: str, hparams: dict[str, Any], experts, base, model, data) -> dict[str, Any]:
    """One merge on the GPU code path under :class:`OpCounter`: kernels and syncs in all, of
    M-TIES's statistics and rates (``prepare``) and of its row thresholds, syncs by operator."""
    method = get_method(method_name, **hparams)
    phases = {"stats": OpCounter(), "row": OpCounter()}  # accumulators

    def counted(fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            count = OpCounter()
            try:
                with count:
                    return fn(*args, **kwargs)
            finally:
                phases[phase].kernels.update(count.kernels)
                phases[phase].syncs.update(count.syncs)

        return wrapper

    total = OpCounter()
    with (
        _multitensor.forced(),
        _patched(mties, "SELECTION_BLOCK", {}),
        _patched(mties, "row_thresholds", counted(mties.row_thresholds, "row")),
    ):
        if method.requires_data:
            method.prepare = counted(method.prepare, "stats")
        kwargs = {"model": model, "data": data} if method.requires_data else {}
        with total:
            method.merge(experts, base, **kwargs)
    return {
        "kernels": total.kernel_total,
        "syncs": total.sync_total,
        "sync_ops": {k.removeprefix("aten."): n for k, n in total.syncs.most_common()},
        "stats_kernels": phases["stats"].kernel_total,
        "stats_syncs": phases["stats"].sync_total,
        "row_kernels": phases["row"].kernel_total,
        "row_syncs": phases["row"].sync_total,
    }


def statistics_floor(model, base, batches, layers: list[str], experts: int) -> tuple[float, float]:
    """(plain forwards of θ₀ over the distinct batches, the K-expert GEMMs of every draw) in s."""
    with torch.no_grad():
        start = _now()
        for b in batches:
            torch.func.functional_call(model, base, (b,))
        forwards = _now() - start
        modules = dict(model.named_modules())
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        handles = [
            modules[name].register_forward_pre_hook(lambda m, a, n=name: captured[n].append(a[0])) for name in layers
        ]
        for b in batches:
            model(b)
        for h in handles:
            h.remove()
        draws = experts  # K·S with S = 1
        gemms = 0.0
        for name in layers:
            weight = base[f"{name}.weight"].repeat(experts, 1)
            bias = base[f"{name}.bias"].repeat(experts)
            for i in range(draws):
                x = captured[name][i % len(batches)]
                start = _now()
                F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
                gemms += _now() - start
    return forwards, gemms


def _ratio(a: float, b: float) -> float:
    """a / b; inf where a toy run's time rounds to 0."""
    return a / b if b > 0 else float("inf")


def toy_model() -> torch.nn.Module:
    """A 12-block ViT of width 32 on 32x32 images (blocks 8-10 exist for Few-Layer M-TIES)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=12, num_heads=2, num_classes=10)


def main(argv: list[str] | None = None) -> dict:
    from timm import create_model

    global _now
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch32_224", help="timm model name (pretrained=False)")
    parser.add_argument("--experts", type=int, default=4, help="K")
    parser.add_argument("--batches", type=int, default=4, help="batches in the unlabeled pool")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs per method (interleaved; the fastest is kept)")
    parser.add_argument("--threads", type=int, default=1)
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="results table (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.toy:
        args.model, args.experts, args.batches, args.batch_size, args.repeats = "toy ViT", 2, 2, 4, 1
    torch.set_num_threads(args.threads)
    device = args.device
    _now = clock(device, cpu_time=True)
    bandwidth = copy_bandwidth(device, bandwidth_bytes(args.toy))

    torch.manual_seed(0)
    model = (toy_model() if args.toy else create_model(args.model, pretrained=False)).eval().to(device)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    experts = [
        {
            k: v + 0.01 * torch.randn(v.shape, generator=g).to(device) if v.is_floating_point() else v.clone()
            for k, v in base.items()
        }
        for _ in range(args.experts)
    ]
    size = (3, 32, 32) if args.toy else model.default_cfg.get("input_size", (3, 224, 224))
    data = [torch.randn(args.batch_size, *size, generator=g).to(device) for _ in range(args.batches)]
    params = sum(v.numel() for v in base.values() if v.is_floating_point())
    targets = list(find_activation_layers(model, data[0][:1]))

    # Warm-up on two blocks' weights (enough entries for the fused TIES kernels: their
    # import and JIT load, first-call allocations), global and per tensor.
    keys = [k for k in base if k.startswith(("blocks.0.", "blocks.1."))]
    part = {k: base[k] for k in keys}
    for scope in ("global", "tensor"):
        get_method("ties", scope=scope).merge([{k: e[k] for k in keys} for e in experts], part)

    runs = {
        "TIES (global, k=0.2)": ("ties", {"density": 0.2}),
        "TIES (per tensor, k=0.8)": ("ties", {"density": 0.8, "scope": "tensor"}),
        "M-TIES (k=0.8, e=0.1, S=1, all fc1)": ("mties", {}),
        "Few-Layer M-TIES (fc1 of blocks 8-10)": ("mties", {"layers": FEW_LAYERS}),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    peaks: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, (method, hparams) in runs.items():
            reset_peak_memory(device)
            results[name].append(timed_merge(method, hparams, experts, base, model, data))
            peak = peak_memory_mb(device)
            if peak is not None:
                peaks[name] = max(peaks.get(name, 0.0), peak)
    best = {name: min(rs, key=lambda r: r["total"]) for name, rs in results.items()}
    counts = {
        name: counted_merge(method, hparams, experts, base, model, data) for name, (method, hparams) in runs.items()
    }
    floor_all = statistics_floor(model, base, data, targets, args.experts)
    floor_few = statistics_floor(model, base, data, FEW_LAYERS, args.experts)

    ties_total = best[TIES_RUN]["total"]
    kind = device_type(device)
    input_bytes = sum(v.numel() * v.element_size() for v in base.values()) * (args.experts + 2)
    command = (
        f".venv/bin/python benchmarks/mties_speed.py --model {args.model} --experts {args.experts} "
        f"--batches {args.batches} --batch-size {args.batch_size} --repeats {args.repeats} --threads {args.threads}"
        f" --device {device}"
    )
    if args.toy:
        command = f".venv/bin/python benchmarks/mties_speed.py --toy --device {device}"
    clock_text = (
        "wall-clock time after torch.cuda.synchronize"
        if kind == "cuda"
        else f"process CPU time ({platform.machine()}, {args.threads} thread(s))"
    )
    lines = [
        "# M-TIES vs TIES: time per phase" + (" (toy size: a code-path check, not a measurement)" if args.toy else ""),
        "",
        header_line(device, bandwidth) + f"; reading the K experts and θ₀ and writing the merge once: "
        f"{input_bytes / bandwidth * 1e3:.2f} ms  ",
        f"Command: `{command}`  ",
        f"Times: {clock_text}, fastest of {args.repeats} interleaved runs (the machine may be shared with other jobs).",
        "",
        f"Model: timm `{args.model}` (pretrained=False), {params / 1e6:.1f}M parameters, K = {args.experts} experts; "
        f"unlabeled pool: {args.batches} batches x {args.batch_size} random images {tuple(size)} "
        f"({args.batches * args.batch_size} samples; the paper uses 128). M-TIES targets: {len(targets)} fc1 layers, "
        f"each drawing K·S = {args.experts} batches.",
        "",
        "| method | M-Loss statistics (s) | row thresholds (s) | tensor / global thresholds (s) | merge (s) "
        "| total (s) | / TIES (global) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in best.items():
        lines.append(
            f"| {name} | {r['stats']:.2f} | {r['row']:.2f} | {r['tensor']:.2f} | {r['merge']:.2f} | {r['total']:.2f} "
            f"| **{_ratio(r['total'], ties_total):.2f}x** |"
        )
    ratio = _ratio(best[MTIES_RUN]["total"], ties_total)
    kernel_ratio = _ratio(counts[MTIES_RUN]["kernels"], counts[TIES_RUN]["kernels"])
    sync_ratio = _ratio(counts[MTIES_RUN]["syncs"], counts[TIES_RUN]["syncs"])
    goal = MTIES_GOAL.get(kind)
    goal_text = f"goal at most {goal:.0f}x on {kind}" if goal else f"goal at most 3x on a GPU; none on {kind}"
    lines += [
        "",
        f"M-TIES / TIES (global): {ratio:.2f}x time ({goal_text}); {kernel_ratio:.2f}x kernels "
        f"({counts[MTIES_RUN]['kernels']} / {counts[TIES_RUN]['kernels']}) and {sync_ratio:.2f}x host syncs "
        f"({counts[MTIES_RUN]['syncs']} / {counts[TIES_RUN]['syncs']}) per merge on the GPU code path.",
        "",
        "Kernels and host syncs per merge, GPU code path (`merging._multitensor.forced()`: the numba kernels "
        "off, M-TIES's row selections over whole weights), counted with `merging._opcount.OpCounter` on this device:",
        "",
        "| method | kernels | syncs | M-Loss statistics + rates: kernels / syncs | row thresholds: kernels / syncs "
        "| syncs by operator |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in counts.items():
        mine = runs[name][0] == "mties"
        stats_text = f"{c['stats_kernels']} / {c['stats_syncs']}" if mine else "–"
        row_text = f"{c['row_kernels']} / {c['row_syncs']}" if mine else "–"
        ops = ", ".join(f"{op} {n}" for op, n in c["sync_ops"].items()) or "none"
        lines.append(f"| {name} | {c['kernels']} | {c['syncs']} | {stats_text} | {row_text} | {ops} |")
    if peaks:
        lines += ["", "Peak CUDA memory per method (MB): " + ", ".join(f"{n} {p:.0f}" for n, p in peaks.items()) + "."]
    lines += [
        "",
        "Floor of the M-Loss statistics (FLOPs M-TIES cannot avoid): plain forwards of θ₀ over the "
        f"{args.batches} distinct batches + the K-expert fc1 GEMMs of every draw:",
        "",
        "| targets | forwards (s) | K-expert GEMMs (s) | floor (s) | statistics / floor |",
        "|---|---|---|---|---|",
    ]
    for label, (fwd, gemm), key in (
        (f"all {len(targets)} fc1", floor_all, "M-TIES (k=0.8, e=0.1, S=1, all fc1)"),
        ("fc1 of blocks 8-10", floor_few, "Few-Layer M-TIES (fc1 of blocks 8-10)"),
    ):
        stats_time = best[key]["stats"]
        lines.append(f"| {label} | {fwd:.2f} | {gemm:.2f} | {fwd + gemm:.2f} | {_ratio(stats_time, fwd + gemm):.2f} |")
    all_runs = "; ".join(f"{name}: " + ", ".join(f"{r['total']:.2f}" for r in rs) for name, rs in results.items())
    lines += ["", f"All runs (total s): {all_runs}.", ""]
    spread = statistics.pstdev([r["total"] for r in results["TIES (global, k=0.2)"]])
    lines.append(f"TIES run-to-run spread (population sd): {spread:.2f} s.")
    table = "\n".join(lines) + "\n"
    print(table)
    out = args.out or result_path("mties_speed", device, args.toy, "md")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, table)
    result = environment(device, bandwidth, args.toy) | {
        "benchmark": "mties_speed",
        "model": args.model,
        "experts": args.experts,
        "runs": {name: r | {"peak_mb": peaks.get(name)} | counts[name] for name, r in best.items()},
        "mties_over_ties": ratio,
        "mties_over_ties_kernels": kernel_ratio,
        "mties_over_ties_syncs": sync_ratio,
        "mties_goal": goal,
    }
    write_figures(args.json or result_path("mties_speed", device, args.toy, "json"), result)
    return result


if __name__ == "__main__":
    main()
