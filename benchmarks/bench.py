"""``make bench``: every benchmark on the CPU, on the GPU where there is one, then one summary
table of issue 20's goals (``benchmarks/goals.py``), written to ``benchmarks/results/goals.md``.

Runs, each writing its table and its figures (JSON):

- ``merge_speed.py`` on the CPU (and ``--device cuda``);
- ``mloss_overhead.py`` on the CPU (fp32); on the GPU in fp32 and ``--precision bf16-mixed``;
- ``mties_speed.py`` on the CPU (and ``--device cuda``);
- ``peers.py`` (FusionBench side by side, cold and warm) where ``.venv-peers`` exists
  (``make bench-peers`` installs it; without it the goal reads "not measured").

Full-size runs each start a fresh interpreter (as from the shell); ``--toy`` runs every
benchmark at toy size in this process into ``--results`` (default ``benchmarks/results/toy``):
a check of the code paths, not a measurement. ``--no-gpu`` leaves the GPU runs out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import goals
from _common import RESULTS, TOY_RESULTS

HERE = Path(__file__).resolve().parent


def _shown(path: Path) -> str:
    """A path relative to the repository root where it lies inside it."""
    from _common import ROOT

    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def plan(gpu: bool, peers: bool) -> list[tuple[str, str, str, list[str]]]:
    """(benchmark, device, variant, extra arguments) of every run, in order."""
    runs = [("merge_speed", "cpu", "", []), ("mloss_overhead", "cpu", "32-true", []), ("mties_speed", "cpu", "", [])]
    if peers:
        runs.append(("peers", "cpu", "", []))
    if gpu:
        runs += [
            ("merge_speed", "cuda", "", []),
            ("mloss_overhead", "cuda", "32-true", []),
            ("mloss_overhead", "cuda", "bf16-mixed", ["--precision", "bf16-mixed"]),
            ("mties_speed", "cuda", "", []),
        ]
    return runs


def run(benchmark: str, argv: list[str], in_process: bool) -> None:
    """One benchmark: ``main(argv)`` in this process, or the script in a fresh interpreter."""
    if in_process:
        importlib.import_module(benchmark).main(argv)
    else:
        subprocess.run([sys.executable, str(HERE / f"{benchmark}.py"), *argv], check=True)


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="toy sizes, in this process: a code-path check")
    parser.add_argument("--results", type=Path, default=None, help="folder of the tables, figures and goals.md")
    parser.add_argument("--no-gpu", action="store_true", help="leave the GPU runs out even where CUDA is found")
    parser.add_argument("--peer-python", type=Path, default=None, help="FusionBench's python (default .venv-peers)")
    args = parser.parse_args(argv)
    import peers
    import torch

    results = args.results or (TOY_RESULTS if args.toy else RESULTS)
    gpu = torch.cuda.is_available() and not args.no_gpu
    peer_python = args.peer_python or peers.PEER_PYTHON
    missing = {
        "cuda": "no GPU" if not torch.cuda.is_available() else "left out (--no-gpu)",
        "peers/cpu": f"no FusionBench venv ({_shown(peer_python)} missing; `make bench-peers` installs it)",
    }
    figures: dict[str, dict] = {}
    for benchmark, device, variant, extra in plan(gpu, peer_python.exists()):
        # The names each benchmark writes by default (fp32 has no suffix).
        suffix = variant if variant != "32-true" else ""
        stem = "_".join(p for p in (benchmark, device if device != "cpu" else "", suffix) if p)
        out, json_path = results / f"{stem}.md", results / f"{stem}.json"
        cli = ["--device", device, "--out", str(out), "--json", str(json_path), *extra]
        cli += ["--toy"] if args.toy else []
        cli += ["--peer-python", str(peer_python)] if benchmark == "peers" else []
        print(f"== {benchmark} {' '.join(cli)}", flush=True)
        run(benchmark, cli, in_process=args.toy)
        figures[goals.source_key(benchmark, device, variant if benchmark == "mloss_overhead" else "")] = json.loads(
            json_path.read_text()
        )
    rows = goals.summarize(figures, missing)
    title = "Performance goals (issue 20)" + (": toy sizes, a code-path check, not figures" if args.toy else "")
    command = "python benchmarks/bench.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    notes = [
        f"Command: `{command}`; torch {torch.__version__}. Each figure is a ratio measured within one run of one "
        "benchmark; its table is beside this file.",
    ]
    text = goals.render(rows, title, notes)
    path = goals.write(results / "goals.md", text)
    print(text)
    print(f"written to {path}")
    return rows


if __name__ == "__main__":
    main()
