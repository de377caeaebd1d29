"""Side-by-side benchmark against FusionBench: TIES, task arithmetic and DARE on the same files.

Makes the inputs once: θ₀ and 8 experts θ_j = θ₀ + τ_j of a ~20M-parameter ViT-shaped
state dict (patch embedding, position embedding, 6 pre-norm blocks of width 512 with qkv,
projection and a 4x MLP, final norm, a 1000-way head), fp32, one safetensors file each, in
a scratch folder. Then, for K = 3 and K = 8, every measurement runs in a fresh subprocess
that loads the same files: ours with this repository's ``.venv`` (``merging.methods.
get_method``), theirs with ``.venv-peers`` calling FusionBench's own state-dict functions
(``fusion_bench.method.ties_merging.ties_merging_utils``, ``fusion_bench.method.dare.utils``,
``fusion_bench.utils.state_dict_arithmetic``), glued exactly as FusionBench's own
``TiesMergingAlgorithm.run``, ``TaskArithmeticAlgorithm.run`` and ``DareTaskArithmetic.run``
glue them, minus the model loading. Each worker writes its merged state dict; a third
subprocess counts the entries where ours and theirs differ.

Measured per worker:
    - cold: in a worker of its own, the first merge in a fresh process, import included:
      importing the merge code (ours: ``merging.methods``; theirs: FusionBench's modules) and
      building the method, then one merge (torch is imported and the inputs loaded before:
      both sides need them). It runs with an empty numba cache (``NUMBA_CACHE_DIR`` a new
      folder), as after a fresh install, so our TIES compiles its loops in that merge. The
      goal (issue 20): ours at most 0.5x FusionBench's. The warm worker below runs with the
      machine's numba cache, as before;
    - time (warm): best of ``--repeats`` merges, the inputs already in memory (loading excluded);
    - peak: the high-water mark of resident memory during each merge less the resident
      memory after loading the inputs, largest over the repeats (the high-water mark is
      reset before each merge by writing 5 to ``/proc/self/clear_refs``, so the load's
      transient does not hide the merge's peak; where that is refused, ``ru_maxrss`` is
      used), and the absolute ``ru_maxrss`` of the process (imports, inputs and merges);
    - outputs: per entry, ``torch.equal``-style counts of differing values and the largest
      absolute difference, ours vs theirs.
The orchestrating process imports no torch: a child's ``ru_maxrss`` starts at its parent's
resident size when it was spawned. Both sides run with ``--threads`` intra-op threads (default
1): with two OpenMP threads per process on a loaded two-core machine, every parallel region
waits for whichever thread was descheduled, so methods made of many small parallel ops (ours
merges in cache-sized slices) measured the scheduler rather than the code (ours' task
arithmetic on K=3 took 1.1 to 31.6 s with 2 threads, 0.43 s with 1, on that machine).

Semantic differences, matched by configuration (stated in the results' notes):
    - FusionBench's TIES trims with ``kthvalue`` at rank N − int(N·k), so it keeps
      int(N·k) + 1 entries per task vector, one more than ours (n = ⌊density·N⌋); its
      default disjoint merge is a sum and its default λ is 0.3. Row ``ties`` passes it
      ``merge_func="mean"``, λ = 1 and the keep fraction k = (n − ½)/N, so both keep
      exactly n; row ``ties (FB rounding)`` passes k = 0.2 as given (one extra entry kept
      per expert, unless the (n+1)-th magnitude ties with the n-th, which both rules keep:
      the outputs then differ at those entries only).
    - DARE is random. Row ``dare`` runs ours with ``rng="torch"`` (the hash draws of the CPU
      kernels give other masks) and matches FusionBench's RNG to it: for each key, the
      global generator is seeded with the seed of our per-key generator
      (``entry_generator(seed, key).initial_seed()``) before FusionBench's
      ``param_random_drop_`` runs on the K task vectors in order, which draws what our one
      ``(K, *shape)`` draw does. Row ``dare (FB RNG)`` calls ``module_random_drop_`` as is
      (after ``torch.manual_seed(0)``): its entries differ, so compare the fraction of
      entries moved away from θ₀, whose expectation is 1 − p^K.

FusionBench install (``make bench-peers``): ``fusion-bench==0.2.33`` with its full
dependency set (transformers, peft, datasets, hydra-core, lightning, ...) installs cleanly
from PyPI under ``-c constraints.txt`` (torch 2.14.1, torchvision 0.29.1), in about 4 minutes
and 6.3 GB; ``pip check`` finds no broken requirement. PyPI has no CPU-only Linux wheel of
torch 2.14.1, so both sides run the same PyPI build (``2.14.1+cu130``, as in ``.venv``) on the
CPU. Importing FusionBench's merge functions imports the whole package (about 20 s, 1.1 GB
resident), which the absolute peaks include and the timings do not.

``--device cuda`` loads the inputs there and synchronises around every merge (peaks are then
``torch.cuda.max_memory_allocated`` above the inputs). The header gives the device, the torch
version and the memory-bandwidth floor (the copy bandwidth, measured in the inputs' process,
and the time to read K experts and θ₀ and write the merge once).

Run: ``make bench-peers`` or ``.venv/bin/python benchmarks/peers.py [--experts 3 8]
[--repeats 3] [--threads 1] [--peer-python .venv-peers/bin/python] [--workdir DIR] [--device cuda]``.
Writes ``benchmarks/results/peers[_cuda].md`` and the figures as JSON beside it (``--json``).
``--toy``: a ViT-shaped state dict of width 32 and one block, written under ``results/toy/``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import ROOT, add_device_arguments, result_path, rss_mb  # benchmarks/ is on sys.path as a script
from merge_speed import block_shapes

PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"

DENSITY = 0.2
"""TIES trim density (fraction of each task vector kept)."""
TA_SCALING = 0.3
"""λ of task arithmetic and of DARE's task-arithmetic combine."""
DROP_RATE = 0.9
"""DARE's drop probability p."""
DARE_SEED = 0
COLD_GOAL = 0.5
"""Ours / FusionBench's cold first merge (import included), the goal (issue 20)."""

OURS: dict[str, tuple[str, dict]] = {
    "ties": ("ties", {"density": DENSITY, "scaling": 1.0, "scope": "global"}),
    "task_arithmetic": ("task_arithmetic", {"scaling": TA_SCALING}),
    "dare": (
        "dare",
        {
            "drop_rate": DROP_RATE,
            "seed": DARE_SEED,
            "combine": "task_arithmetic",
            "scaling": TA_SCALING,
            "rng": "torch",
        },
    ),
}
"""Our runs: label -> (registry name, hyperparameters)."""

THEIRS: dict[str, str | None] = {"ties": "ties (FB rounding)", "task_arithmetic": None, "dare": "dare (FB RNG)"}
"""FusionBench's timed runs, each compared with our run of the same label, and the variant its
worker runs once more after timing (compared with the same run of ours; not timed)."""


def tag(label: str) -> str:
    """A file-name form of a run label."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


# ------------------------------------------------------------------------- inputs


def vit_shapes(width: int = 512, depth: int = 6, tokens: int = 197, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a ViT (patch 16, 3 channels) of the given width and depth."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, tokens, width),
        "patch_embed.proj.weight": (width, 3, 16, 16),
        "patch_embed.proj.bias": (width,),
    }
    for b in range(depth):
        shapes |= block_shapes(f"blocks.{b}.", width)
    shapes |= {"norm.weight": (width,), "norm.bias": (width,), "head.weight": (classes, width), "head.bias": (classes,)}
    return shapes


def make_inputs(folder: Path, num_experts: int, seed: int, device: str = "cpu", toy: bool = False) -> None:
    """Write ``base.safetensors``, ``expert{j}.safetensors`` and ``meta.json`` to ``folder``;
    the meta holds the device's copy bandwidth and header line.

    θ₀ ~ N(0, 0.02²) (norm weights 1 + N(0, 0.02²)); τ_j = 10⁻³ · (z₀ + z_j)/√2 with a
    component z₀ shared by all experts, as fine-tunes of one model partly agree in sign.
    """
    import torch
    from _common import bandwidth_bytes, copy_bandwidth, environment, header_line
    from safetensors.torch import save_file

    from merging.methods.classic import entry_generator, keep_count

    generator = torch.Generator().manual_seed(seed)
    shapes = vit_shapes(width=32, depth=1, tokens=5, classes=10) if toy else vit_shapes()
    base = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=generator) * 0.02
        base[key] = value + 1.0 if key.endswith("norm1.weight") or key.endswith("norm2.weight") else value
    shared = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    save_file(base, str(folder / "base.safetensors"))
    for j in range(num_experts):
        expert = {
            key: base[key] + 1e-3 * (shared[key] + torch.randn(shape, generator=generator)) / 2**0.5
            for key, shape in shapes.items()
        }
        save_file(expert, str(folder / f"expert{j}.safetensors"))
    params = sum(v.numel() for v in base.values())
    keep = keep_count(params, DENSITY)
    meta = {
        "params": params,
        "keep": keep,
        "kept_at_threshold": [kept_at_threshold(folder, j, keep) for j in range(num_experts)],
        "dare_seeds": {key: entry_generator(DARE_SEED, key).initial_seed() for key in shapes},
        "input_mb": params * 4 / 2**20,
    }
    bandwidth = copy_bandwidth(device, bandwidth_bytes(toy))
    meta |= {"header": header_line(device, bandwidth), "environment": environment(device, bandwidth, toy)}
    (folder / "meta.json").write_text(json.dumps(meta))


def kept_at_threshold(folder: Path, expert: int, keep: int) -> tuple[int, int]:
    """How many entries of τ_j have |τ| ≥ the n-th largest (ours) and ≥ the (n+1)-th largest
    (FusionBench's rank with k = density): equal when the two magnitudes tie in fp32."""
    import torch
    from safetensors.torch import load_file

    base = load_file(str(folder / "base.safetensors"))
    theta = load_file(str(folder / f"expert{expert}.safetensors"))
    magnitudes = torch.cat([(theta[k] - base[k]).reshape(-1) for k in base]).abs_()
    numel = magnitudes.numel()
    nth = magnitudes.kthvalue(numel - keep + 1).values
    next_one = magnitudes.kthvalue(numel - keep).values
    return int((magnitudes >= nth).sum()), int((magnitudes >= next_one).sum())


# ------------------------------------------------------------------------- workers


def high_water_mb() -> float:
    """``VmHWM``: the peak resident memory since start or the last reset, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def reset_high_water() -> bool:
    """Reset ``VmHWM`` to the current resident memory; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def ours_merge(label: str) -> Callable:
    from merging.methods import get_method

    name, hparams = OURS[label]
    method = get_method(name, **hparams)
    return lambda experts, base, keys: method.merge(experts, base)


def theirs_merge(label: str, meta: dict) -> Callable:
    """FusionBench's state-dict functions, glued as its algorithms' ``run`` methods glue them."""
    import torch

    if label.startswith("ties"):
        from fusion_bench.method.ties_merging.ties_merging_utils import (
            state_dict_to_vector,
            ties_merging,
            vector_to_state_dict,
        )

        params, keep = meta["params"], meta["keep"]
        fraction = DENSITY if label == "ties (FB rounding)" else (keep - 0.5) / params
        kept = int(params * fraction) + 1  # topk_values_mask's kthvalue rank is N − int(N·k)
        if label == "ties" and kept != keep:
            raise RuntimeError(f"keep fraction {fraction!r} makes FusionBench keep {kept} entries, not {keep}")

        def ties(experts, base, keys):
            # TiesMergingAlgorithm.run, "merging models" block; λ = 1, disjoint mean.
            flat_ft = torch.vstack([state_dict_to_vector(check, []) for check in experts])
            flat_ptm = state_dict_to_vector(base, [])
            tv_flat_checks = flat_ft - flat_ptm
            merged_tv = ties_merging(tv_flat_checks, reset_thresh=fraction, merge_func="mean")
            merged_check = flat_ptm + 1.0 * merged_tv
            return vector_to_state_dict(merged_check, base, remove_keys=[])

        return ties

    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub, state_dict_sum

    if label == "task_arithmetic":

        def task_arithmetic(experts, base, keys):
            # TaskArithmeticAlgorithm.run.
            task_vector = None
            for model in experts:
                if task_vector is None:
                    task_vector = state_dict_sub(model, base)
                else:
                    task_vector = state_dict_add(task_vector, state_dict_sub(model, base))
            task_vector = state_dict_mul(task_vector, TA_SCALING, keep_dtype_when_zero=True)
            return state_dict_add(base, task_vector)

        return task_arithmetic

    from fusion_bench.method.dare.utils import module_random_drop_, module_sub_, param_random_drop_

    seeds = meta["dare_seeds"]

    def dare(experts, base, keys):
        # DareTaskArithmetic.run on state dicts (only_on_linear_weights=False, rescale=True).
        # module_sub_ reassigns .data of its first argument's tensors: detached aliases keep
        # the loaded inputs intact for the next repeat (no copy).
        task_vectors = [
            module_sub_({k: v.detach() for k, v in check.items()}, base, trainable_only=False) for check in experts
        ]
        if label == "dare (FB RNG)":
            torch.manual_seed(DARE_SEED)
            for tv in task_vectors:
                module_random_drop_(tv, DROP_RATE, rescale=True)
        else:
            for key in keys:
                torch.manual_seed(seeds[key])
                for tv in task_vectors:
                    param_random_drop_(tv[key], DROP_RATE, rescale=True)
        task_vector_sum = state_dict_sum(task_vectors)
        return state_dict_add(base, state_dict_mul(task_vector_sum, TA_SCALING))

    return dare


def worker(
    side: str,
    label: str,
    folder: Path,
    num_experts: int,
    repeats: int,
    threads: int,
    device: str = "cpu",
    cold: bool = False,
) -> None:
    """Load the inputs, import the merge code and merge ``repeats`` times, write the figures
    and the last merge; then, for FusionBench's runs with a variant (:data:`THEIRS`), merge
    once more with the variant (not timed) and write that too. Files:
    ``{side}-{tag(label)}-{K}.json|.safetensors``. With ``cold``: the import and one merge,
    timed together, written to ``{side}-{tag(label)}-{K}-cold.json``."""
    import contextlib
    import io

    import torch
    from _common import peak_memory_mb, reset_peak_memory, synchronize
    from safetensors.torch import load_file, save_file

    if threads > 0:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    meta = json.loads((folder / "meta.json").read_text())
    cuda = torch.device(device).type == "cuda"

    def load(name: str) -> dict:
        # load_file maps the file lazily: copy into ordinary memory, as a model in memory is,
        # so that the resident memory after loading holds the inputs and the merges do not
        # page them in.
        return {k: v.clone().to(device) for k, v in load_file(str(folder / name)).items()}

    base = load("base.safetensors")
    experts = [load(f"expert{j}.safetensors") for j in range(num_experts)]
    keys = list(base)
    gc.collect()
    loaded = rss_mb()
    loaded_cuda = torch.cuda.memory_allocated(torch.device(device)) / 2**20 if cuda else 0.0
    synchronize(device)
    start = time.perf_counter()
    merge = ours_merge(label) if side == "ours" else theirs_merge(label, meta)  # imports the merge code
    import_seconds = time.perf_counter() - start
    if cold:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            merge(experts, base, keys)
        synchronize(device)
        cold_seconds = time.perf_counter() - start
        figures = {"import_seconds": import_seconds, "cold_seconds": cold_seconds, "threads": threads}
        (folder / f"{side}-{tag(label)}-{num_experts}-cold.json").write_text(json.dumps(figures))
        return
    resettable = True
    times, peaks = [], []
    threads_after = set()
    # FusionBench's TIES prints its progress: keep this worker's output clean.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        for _ in range(repeats):
            merged = None
            gc.collect()
            torch.set_num_threads(threads)  # every repeat under the same setting, whatever a merge did
            resettable = resettable and reset_high_water()
            reset_peak_memory(device)
            synchronize(device)
            start = time.perf_counter()
            merged = merge(experts, base, keys)
            synchronize(device)
            times.append(time.perf_counter() - start)
            if cuda:
                peaks.append(peak_memory_mb(device) - loaded_cuda)
            else:
                high = high_water_mb() if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                peaks.append(high - loaded)
            threads_after.add(torch.get_num_threads())
        absolute = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        outputs = {label: merged}
        variant = THEIRS.get(label) if side == "theirs" else None
        if variant is not None:
            outputs[variant] = theirs_merge(variant, meta)(experts, base, keys)
    for name, state in outputs.items():
        path = folder / f"{side}-{tag(name)}-{num_experts}.safetensors"
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path))
    figures = {
        "import_seconds": import_seconds,
        "seconds": min(times),
        "times": times,
        "loaded_mb": loaded,
        "peak_mb": max(peaks),
        "peaks": peaks,
        "absolute_mb": absolute,
        "peak_source": "torch.cuda.max_memory_allocated, reset before each merge"
        if cuda
        else ("VmHWM, reset before each merge" if resettable else "ru_maxrss"),
        "threads": threads,
        "threads_after": sorted(threads_after - {threads}),
        "torch": torch.__version__,
    }
    (folder / f"{side}-{tag(label)}-{num_experts}.json").write_text(json.dumps(figures))


def compare(folder: Path, num_experts: int, pairs: list[tuple[str, str]]) -> None:
    """For each (ours label, theirs label), count the entries where the two merged state dicts
    differ and the entries each moved away from θ₀; writes ``compare-{K}.json``."""
    import torch
    from safetensors.torch import load_file

    base = load_file(str(folder / "base.safetensors"))
    results = {}
    for mine, theirs in pairs:
        a = load_file(str(folder / f"ours-{tag(mine)}-{num_experts}.safetensors"))
        b = load_file(str(folder / f"theirs-{tag(theirs)}-{num_experts}.safetensors"))
        if set(a) != set(b):
            raise RuntimeError(f"{mine} vs {theirs}: the merges hold different keys: {sorted(set(a) ^ set(b))}")
        differing = numel = moved_ours = moved_theirs = 0
        max_abs = 0.0
        for key in a:
            if a[key].shape != b[key].shape:
                raise RuntimeError(f"{key}: shape {tuple(a[key].shape)} (ours) vs {tuple(b[key].shape)} (theirs)")
            differing += int(torch.ne(a[key], b[key]).sum())
            max_abs = max(max_abs, float((a[key] - b[key]).abs().max()))
            moved_ours += int(torch.ne(a[key], base[key]).sum())
            moved_theirs += int(torch.ne(b[key], base[key]).sum())
            numel += a[key].numel()
        results[theirs] = {
            "differing": differing,
            "max_abs": max_abs,
            "numel": numel,
            "moved_ours": moved_ours / numel,
            "moved_theirs": moved_theirs / numel,
        }
    (folder / f"compare-{num_experts}.json").write_text(json.dumps(results))


# ------------------------------------------------------------------------- orchestration


def spawn(python: Path | str, *args: str, env: dict[str, str] | None = None) -> None:
    """Run this script in a fresh interpreter (``env`` added to this one's environment); raise
    with its stderr's tail on failure."""
    done = subprocess.run(
        [str(python), __file__, *args], capture_output=True, text=True, cwd=ROOT, env=os.environ | (env or {})
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{python} {__file__} {' '.join(args)} failed ({done.returncode}):\n{tail}")


def check_peer(peer_python: Path) -> dict[str, str]:
    """Versions in the peer venv; a clear error when it or FusionBench is missing."""
    if not peer_python.exists():
        raise SystemExit(
            f"FusionBench's virtual environment is missing: {peer_python} does not exist.\n"
            "Create it with `make bench-peers` (installs fusion-bench from PyPI into .venv-peers "
            "and runs this benchmark), or pass --peer-python PATH."
        )
    probe = (
        "import importlib.metadata as m, json, platform, torch; "
        "print(json.dumps({'fusion-bench': m.version('fusion-bench'), 'torch': torch.__version__, "
        "'python': platform.python_version()}))"
    )
    done = subprocess.run([str(peer_python), "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"{peer_python} cannot import fusion-bench and torch (run `make bench-peers` to install them):\n"
            + "\n".join(done.stderr.strip().splitlines()[-5:])
        )
    return json.loads(done.stdout)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def cold_ratios(rows: list[dict]) -> dict[str, float]:
    """Per timed method at the smallest K: ours / FusionBench's cold first merge."""
    k = min(r["k"] for r in rows)
    return {
        r["label"]: r["ours"]["cold_seconds"] / r["theirs"]["cold_seconds"]
        for r in rows
        if r["k"] == k and r["theirs"] is not None
    }


def render(rows: list[dict], info: dict) -> str:
    """The results as Markdown: the side-by-side table, DARE's statistics, the target, notes."""
    dash = "–"
    lines = [
        "# Side-by-side: lightning-merging vs FusionBench",
        "",
        f"Inputs: θ₀ and K experts of a ViT-shaped state dict, {info['params'] / 1e6:.2f}M fp32 parameters "
        f"({info['input_mb']:.0f} MB) each, safetensors; every measurement in a fresh process loading the "
        f"same files. Time: best of {info['repeats']} merges, loading excluded. Peak: largest high-water mark "
        "of resident memory during a merge less the resident memory after loading; abs.: the process's "
        "`ru_maxrss` (imports + inputs + merges). Ratios are ours / FusionBench (FB).",
        "",
        f"Versions: fusion-bench {info['peer']['fusion-bench']} (torch {info['peer']['torch']}) vs "
        f"lightning-merging (torch {info['ours_torch']}), Python {info['python']}, {info['threads']} intra-op "
        f"thread{'s' if info['threads'] != 1 else ''} per process, {info['cpus']} CPUs. "
        f"Load average (1, 5, 15 min) {info['load_before']} before, "
        f"{info['load_after']} after: the machine is shared, so times are noisy (every repeat is listed "
        f"below). Total run {info['wall']:.0f} s.",
        "",
        f"{info.get('header', 'Device: cpu')}; reading K experts and θ₀ and writing the merge once takes "
        + ", ".join(f"{floor * 1e3:.3g} ms (K={k})" for k, floor in info.get("floors", {}).items())
        + ".",
        "",
        "Cold: the first merge in a fresh process, import of the merge code included (ours with an empty "
        "numba cache, as after a fresh install); warm: the best of the repeats in that process.",
        "",
        "| K | method | ours cold (s) | FB cold (s) | cold ratio | ours warm (s) | FB warm (s) | warm ratio "
        "| ours peak (MB) | FB peak (MB) | peak ratio | ours abs. (MB) | FB abs. (MB) | differing entries "
        "| max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, t, c = r["ours"], r["theirs"], r["compare"]
        if t is None:  # a variant run once after the timed runs: compared, not measured
            figures = " | ".join([dash] * 11)
        else:
            figures = (
                f"{o['cold_seconds']:.3f} | {t['cold_seconds']:.3f} | {ratio(o['cold_seconds'], t['cold_seconds'])} | "
                f"{o['seconds']:.3f} | {t['seconds']:.3f} | {ratio(o['seconds'], t['seconds'])} "
                f"| {o['peak_mb']:.0f} | {t['peak_mb']:.0f} | {ratio(o['peak_mb'], t['peak_mb'])} "
                f"| {o['absolute_mb']:.0f} | {t['absolute_mb']:.0f}"
            )
        lines.append(
            f"| {r['k']} | {r['label']} | {figures} | {c['differing']:,} of {c['numel']:,} | {c['max_abs']:.3g} |"
        )
    lines += [
        "",
        f"DARE: fraction of entries moved away from θ₀ (expected 1 − p^K, p = {DROP_RATE}).",
        "",
        "| K | method | ours | FB | expected |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["label"].startswith("dare"):
            c = r["compare"]
            lines.append(
                f"| {r['k']} | {r['label']} | {c['moved_ours']:.5f} | {c['moved_theirs']:.5f} "
                f"| {1 - DROP_RATE ** r['k']:.5f} |"
            )
    ties3 = next((r for r in rows if r["k"] == 3 and r["label"] == "ties"), None)
    if ties3 is not None:
        tr = ties3["ours"]["seconds"] / ties3["theirs"]["seconds"]
        pr = ties3["ours"]["peak_mb"] / ties3["theirs"]["peak_mb"]
        verdict = "met" if tr <= 0.5 and pr <= 0.5 else "NOT met"
        lines += [
            "",
            f"Target (issue 9): TIES (global, disjoint mean, density {DENSITY}) on 3 experts in at most half "
            f"FusionBench's time and peak memory: time ratio {tr:.2f}, peak ratio {pr:.2f}: {verdict}.",
        ]
    for label, r in cold_ratios(rows).items():
        verdict = "met" if r <= COLD_GOAL else "NOT met"
        lines += [
            "",
            f"Goal (issue 20): the first {label} merge in a new process, import included, on K={min(info['experts'])} "
            f"experts at most {COLD_GOAL}x FusionBench's: {r:.2f}x: {verdict}.",
        ]
    extra = sum(fb - ours for ours, fb in info["kept_at_threshold"][: max(r["k"] for r in rows)])
    lines += [
        "",
        "Notes:",
        "- FusionBench is called through its own state-dict functions (`ties_merging_utils.state_dict_to_vector`, "
        "`ties_merging`, `vector_to_state_dict`; `dare.utils.module_sub_`, `param_random_drop_`, "
        "`module_random_drop_`; `utils.state_dict_arithmetic`), glued as in its `TiesMergingAlgorithm.run`, "
        "`TaskArithmeticAlgorithm.run` and `DareTaskArithmetic.run`, without building `nn.Module`s.",
        f"- ties: ours `ties(density={DENSITY}, scaling=1.0, scope='global')`. FusionBench configured to match: "
        "`merge_func='mean'` (its default is a disjoint sum), λ = 1 (its default 0.3), and keep fraction "
        f"k = (n − ½)/N with n = ⌊{DENSITY}·N⌋ = {info['keep']:,}, because its `topk_values_mask` keeps "
        "the entries ≥ the (int(N·k) + 1)-th largest magnitude. Both keep every entry tied at the threshold; "
        "a zero sign sum elects + in ours and the majority sign in FusionBench, which only matters where "
        "every trimmed value is 0 (the entry stays θ₀ either way). The differing entries are float "
        "rounding: ours forms the disjoint mean from per-entry sums in one sweep.",
        f"- ties (FB rounding): FusionBench with k = {DENSITY} as given, i.e. threshold at the (n+1)-th "
        "largest magnitude, run once more in the same worker (not timed) and compared with the same ours "
        f"run. On these inputs it keeps {extra} more entries than ours over the {max(r['k'] for r in rows)} "
        "experts: an fp32 ulp at the threshold holds about one entry, so the (n+1)-th magnitude often "
        "equals the n-th, and both rules then keep the same ties.",
        f"- task_arithmetic: λ = {TA_SCALING} both; both evaluate θ₀ + λΣ_j(θ_j − θ₀) (any differing "
        "entry is the order of the float sums).",
        f"- dare: p = {DROP_RATE}, rescale 1/(1 − p), task-arithmetic combine, λ = {TA_SCALING}. Row `dare` "
        "seeds FusionBench's global RNG per key with our per-key seed before its `param_random_drop_` runs "
        "on the K task vectors in turn, which draws the same uniforms as our one (K, *shape) draw; ours "
        "keeps u ≥ p, FusionBench u > p, so they differ only where u equals p in float32 (about "
        "K·N/2²⁴ entries). Row `dare (FB RNG)` runs `module_random_drop_` unchanged after "
        "`torch.manual_seed(0)` (once more in the same worker, not timed): compare the moved fractions.",
        "- Threads: the same intra-op thread count on both sides (`--threads`, default 1; 0 gives "
        "torch's default): on a loaded machine, several OpenMP threads per process wait on each other at "
        "every parallel region, which measures the scheduler rather than the code.",
        f"- Peak source: {info['peak_source']}.",
    ]
    for r in (r for r in rows if r["theirs"] is not None):
        for side, name in (("ours", "our"), ("theirs", "FusionBench's")):
            if r[side]["threads_after"]:
                lines.append(
                    f"- K={r['k']} {r['label']}: {name} merge changed torch's intra-op thread count from "
                    f"{r[side]['threads']} to {r[side]['threads_after']}; each repeat starts from "
                    f"{r[side]['threads']} again."
                )
    lines += [
        "",
        "Every repeat, in order: time (s) / peak over the resident memory after loading (MB). The first "
        "merge in a fresh process also pays one-time costs (code paged in, lazy initialisation, any JIT "
        "compilation); the table keeps the best time and the largest peak.",
        "",
    ]
    for r in (r for r in rows if r["theirs"] is not None):
        ours_runs, fb_runs = (
            ", ".join(f"{t:.2f}/{p:.0f}" for t, p in zip(r[side]["times"], r[side]["peaks"]))
            for side in ("ours", "theirs")
        )
        lines.append(f"- K={r['k']} {r['label']}: ours {ours_runs}; FB {fb_runs}")
    lines += ["", f"Command: `{info['command']}`"]
    return "\n".join(lines) + "\n"


def figures_json(rows: list[dict], info: dict) -> dict:
    """The run's figures for the goal summary."""
    return info["environment"] | {
        "benchmark": "peers",
        "experts": info["experts"],
        "rows": rows,
        "cold_ratios": cold_ratios(rows),
        "cold_goal": COLD_GOAL,
        "peer": info["peer"],
    }


def report(rows: list[dict], info: dict, out: Path, json_path: Path) -> dict:
    """Render the table, write it and the figures (both atomically); returns the figures."""
    from _common import write_figures

    from merging.io import write_text_atomic

    table = render(rows, info)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, table)
    result = figures_json(rows, info)
    write_figures(json_path, result)
    print(table)
    print(f"written to {out} and {json_path}")
    return result


def info_from(meta: dict, rows: list[dict], args: argparse.Namespace, peer: dict, extra: dict) -> dict:
    """What :func:`render` needs besides the rows."""
    sources = {r[side]["peak_source"] for r in rows for side in ("ours", "theirs") if r[side] is not None}
    bandwidth = meta["environment"]["bandwidth"]
    return extra | {
        "params": meta["params"],
        "keep": meta["keep"],
        "kept_at_threshold": meta["kept_at_threshold"],
        "input_mb": meta["input_mb"],
        "header": meta["header"],
        "environment": meta["environment"],
        "floors": {k: 4 * meta["params"] * (k + 2) / bandwidth for k in args.experts},
        "experts": args.experts,
        "repeats": args.repeats,
        "peer": peer,
        "ours_torch": rows[0]["ours"]["torch"],
        "python": platform.python_version(),
        "threads": rows[0]["ours"]["threads"],
        "cpus": os.cpu_count(),
        "peak_source": ", ".join(sorted(sources)),
    }


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=None, help="values of K (default 3 8; 2 with --toy)")
    parser.add_argument("--repeats", type=int, default=3, help="merges per measurement (the best is kept)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of both sides (0: torch's default); 1 keeps timings stable on a loaded machine",
    )
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON, help="python of the FusionBench venv")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the scratch folder (default: temp)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="results table (default benchmarks/results/...)")
    parser.add_argument("--make-inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "LABEL", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--compare", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.experts = args.experts or ([2] if args.toy else [3, 8])

    if args.make_inputs:
        make_inputs(args.make_inputs, max(args.experts), args.seed, args.device, args.toy)
        return None
    if args.worker:
        side, label, folder = args.worker
        worker(side, label, Path(folder), args.experts[0], args.repeats, args.threads, args.device, args.cold)
        return None
    if args.compare:
        pairs = [(label, label) for label in THEIRS] + [(label, v) for label, v in THEIRS.items() if v is not None]
        compare(args.compare, args.experts[0], pairs)
        return None

    peer = check_peer(args.peer_python)
    start = time.perf_counter()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    common = ["--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device]
    rows = []
    with tempfile.TemporaryDirectory(prefix="peers-", dir=args.workdir) as tmp:
        folder = Path(tmp)
        experts = [str(k) for k in args.experts]
        toy = ["--toy"] if args.toy else []
        spawn(
            sys.executable,
            "--make-inputs",
            str(folder),
            "--experts",
            *experts,
            "--seed",
            str(args.seed),
            "--device",
            args.device,
            *toy,
        )
        meta = json.loads((folder / "meta.json").read_text())
        for k in args.experts:
            figures: dict[tuple[str, str], dict] = {}
            for side, python, labels in (("ours", sys.executable, OURS), ("theirs", args.peer_python, THEIRS)):
                for label in labels:
                    run = [python, "--worker", side, label, str(folder), "--experts", str(k), *common]
                    # Cold: an empty numba cache, so its merge is the first after a fresh install.
                    with tempfile.TemporaryDirectory(prefix="numba-cache-", dir=args.workdir) as cache:
                        spawn(*run, "--cold", env={"NUMBA_CACHE_DIR": cache})
                    spawn(*run)
                    figures[side, label] = json.loads((folder / f"{side}-{tag(label)}-{k}.json").read_text())
                    figures[side, label] |= json.loads((folder / f"{side}-{tag(label)}-{k}-cold.json").read_text())
                    print(
                        f"K={k} {side} {label}: cold {figures[side, label]['cold_seconds']:.3f} s, "
                        f"warm {figures[side, label]['seconds']:.3f} s",
                        flush=True,
                    )
            spawn(sys.executable, "--compare", str(folder), "--experts", str(k))
            compared = json.loads((folder / f"compare-{k}.json").read_text())
            for f in folder.glob(f"*-{k}.safetensors"):
                f.unlink()
            for label, variant in THEIRS.items():
                mine, theirs = figures["ours", label], figures["theirs", label]
                rows.append({"k": k, "label": label, "ours": mine, "theirs": theirs, "compare": compared[label]})
                if variant is not None:
                    rows.append({"k": k, "label": variant, "ours": mine, "theirs": None, "compare": compared[variant]})
    extra = {
        "load_before": load_before,
        "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "wall": time.perf_counter() - start,
        "command": "make bench-peers" if not sys.argv[1:] else "benchmarks/peers.py " + " ".join(sys.argv[1:]),
    }
    info = info_from(meta, rows, args, peer, extra)
    out = args.out or result_path("peers", args.device, args.toy, "md")
    return report(rows, info, out, args.json or result_path("peers", args.device, args.toy, "json"))


if __name__ == "__main__":
    main()
