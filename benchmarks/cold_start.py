"""The first merges of new processes after installing the wheel: where numba caches the
compiled TIES/DARE kernels, and what process 1, 2 and 3 pay, with site-packages writable or
read-only (issue 20: "whether the compiled cache also works when the package is installed as
a wheel into a read-only site-packages, and what a user's second process pays").

The wheel of this checkout is built and installed with ``pip install --no-deps --target`` into
a temporary folder that is put first on ``PYTHONPATH`` (its dependencies come from the running
venv). Each scenario starts a fresh install and a fresh, empty home, then runs ``--processes``
processes one after another, each timing ``import merging.methods`` plus its first merge
(cold), then a second merge (warm), on the ViT-shaped inputs of ``benchmarks/peers.py``:

- writable: site-packages writable (numba caches beside the code, in ``__pycache__``);
- read-only: site-packages mounted read-only, home writable (numba falls back to
  ``~/.cache/numba``);
- read-only, no cache folder: site-packages and home read-only (no folder for numba's
  cache: compiled in every process, with a warning);
- read-only, ``NUMBA_CACHE_DIR``: site-packages read-only, the cache in that folder.

Read-only mounts need root and ``unshare -m`` (a private mount namespace with a read-only
bind mount; ``chmod`` does not stop root). Where they are not available, those rows say so.

    python benchmarks/cold_start.py            # -> benchmarks/results/cold_start.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import ROOT, add_device_arguments, device_type, environment, result_path, write_figures

WORKER = textwrap.dedent(
    """
    import json, sys, time, warnings
    import torch
    from safetensors.torch import load_file
    torch.set_num_threads(int(sys.argv[3]))
    folder, k = sys.argv[1], int(sys.argv[2])
    base = load_file(f"{folder}/base.safetensors")
    experts = [load_file(f"{folder}/expert{j}.safetensors") for j in range(k)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        from merging.methods import get_method
        t1 = time.perf_counter()
        get_method(sys.argv[4]).merge(experts, base)
        t2 = time.perf_counter()
        get_method(sys.argv[4]).merge(experts, base)
        t3 = time.perf_counter()
    import merging
    print(json.dumps({
        "import_seconds": t1 - t0, "cold_seconds": t2 - t0, "warm_seconds": t3 - t2,
        "module": merging.__file__,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    }))
    """
)

SCENARIOS = (
    ("writable", False, False, False),
    ("read-only", True, False, False),
    ("read-only, no cache folder", True, True, False),
    ("read-only, NUMBA_CACHE_DIR", True, False, True),
)
"""(name, site-packages read-only, home read-only, NUMBA_CACHE_DIR set)."""


def read_only_mounts_work(scratch: Path) -> str | None:
    """None if a read-only bind mount can be made here, else why not."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare -m"
    probe = scratch / "probe"
    probe.mkdir()
    script = f"mount --bind {probe} {probe} && mount -o remount,bind,ro {probe} && ! touch {probe}/x"
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    return None if done.returncode == 0 else f"no read-only bind mount ({done.stderr.strip() or 'refused'})"


def install_wheel(scratch: Path) -> Path:
    """Build this checkout's wheel once (kept in ``scratch/wheel``) and install it into a new folder."""
    wheels = scratch / "wheel"
    if not wheels.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)], check=True
        )
    target = Path(tempfile.mkdtemp(prefix="site-", dir=scratch))
    wheel = next(wheels.glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True
    )
    return target


def where_cached(site: Path, home: Path, cache_dir: Path | None) -> str:
    """Where numba's index files (``*.nbi``) of the kernels ended up."""
    places = [("beside the code", site), ("~/.cache/numba", home), ("NUMBA_CACHE_DIR", cache_dir)]
    found = [name for name, folder in places if folder is not None and any(folder.rglob("_numba_kernels*.nbi"))]
    return ", ".join(found) or "nowhere"


def run_scenario(
    scratch: Path, inputs: Path, args: argparse.Namespace, ro_site: bool, ro_home: bool, cache: bool
) -> dict:
    site = install_wheel(scratch)
    home = Path(tempfile.mkdtemp(prefix="home-", dir=scratch))
    cache_dir = Path(tempfile.mkdtemp(prefix="numba-", dir=scratch)) if cache else None
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "MERGING_NO_NUMBA", "XDG_CACHE_HOME")}
    env |= {"PYTHONPATH": str(site), "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    command = [sys.executable, "-c", WORKER, str(inputs), str(args.experts), str(args.threads), args.method]
    if ro_site or ro_home:
        mounts = [m for m, ro in ((site, ro_site), (home, ro_home)) if ro]
        script = " && ".join(f"mount --bind {m} {m} && mount -o remount,bind,ro {m}" for m in mounts)
        command = ["unshare", "-m", "sh", "-c", f"{script} && exec {shlex.join(command)}"]
    processes = []
    for _ in range(args.processes):
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=scratch)  # not a checkout
        if done.returncode != 0:
            processes.append({"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"})
            continue
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        if not figures["module"].startswith(str(site)):
            raise RuntimeError(f"the worker imported {figures['module']}, not the wheel installed in {site}")
        processes.append(figures)
    return {"processes": processes, "cached": where_cached(site, home, cache_dir)}


def render(rows: dict[str, dict], info: dict) -> str:
    n = info["processes"]
    lines = [
        "# First merges after installing the wheel: numba's kernel cache (issue 20)",
        "",
        f"{info['header']}. Inputs: θ₀ and {info['experts']} experts of {info['params'] / 1e6:.2f}M fp32 parameters "
        f"(benchmarks/peers.py's ViT shape), {info['method']}, {info['threads']} intra-op thread(s). Cold: "
        "`import merging.methods` and the first merge of a new process; warm: the second merge in that "
        "process. Each scenario: a fresh `pip install --no-deps --target` of the wheel and an empty home, "
        "then the processes one after another.",
        "",
        "| site-packages | "
        + " | ".join(f"process {i + 1} cold (s)" for i in range(n))
        + " | warm (s) | numba's cache | warning |",
        "|---|" + "---|" * (n + 3),
    ]
    for name, row in rows.items():
        if "skipped" in row:
            lines.append(f"| {name} | " + " | ".join("–" for _ in range(n)) + f" | – | not run: {row['skipped']} | – |")
            continue
        cells = [p["error"] if "error" in p else f"{p['cold_seconds']:.2f}" for p in row["processes"]]
        warm = [p["warm_seconds"] for p in row["processes"] if "warm_seconds" in p]
        warned = any(p.get("warnings") for p in row["processes"])
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {min(warm):.2f} | {row['cached']} | {'yes' if warned else 'no'} |"
            if warm
            else f"| {name} | " + " | ".join(cells) + f" | – | {row['cached']} | – |"
        )
    lines += ["", f"Command: `python benchmarks/cold_start.py{info['argv']}`; total {info['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    parser.add_argument("--method", default="ties", choices=("ties", "dare", "task_arithmetic"))
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (as peers.py)")
    parser.add_argument("--out", type=Path, default=None, help="table (default benchmarks/results/cold_start.md)")
    args = parser.parse_args(argv)
    if device_type(args.device) != "cpu":
        parser.error("--device: the numba kernels and their cache are CPU-only; run with --device cpu")
    import peers

    start = time.perf_counter()
    out = args.out or result_path("cold_start", args.device, args.toy, "md")
    json_path = args.json or out.with_suffix(".json")
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        scratch = Path(tmp)
        inputs = scratch / "inputs"
        inputs.mkdir()
        peers.make_inputs(inputs, args.experts, seed=0, toy=args.toy)
        meta = json.loads((inputs / "meta.json").read_text())
        why_not = read_only_mounts_work(scratch)
        rows: dict[str, dict] = {}
        for name, ro_site, ro_home, cache in SCENARIOS:
            if (ro_site or ro_home) and why_not:
                rows[name] = {"skipped": why_not}
                continue
            rows[name] = run_scenario(scratch, inputs, args, ro_site, ro_home, cache)
            print(f"{name}: {rows[name]}", flush=True)
    info = {
        "header": meta["header"],
        "experts": args.experts,
        "params": meta["params"],
        "method": args.method,
        "threads": args.threads,
        "processes": args.processes,
        "seconds": time.perf_counter() - start,
        "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
    }
    text = render(rows, info)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    figures = environment("cpu", None, args.toy) | {"scenarios": rows, "info": info}
    write_figures(json_path, figures)
    return figures


if __name__ == "__main__":
    main()
