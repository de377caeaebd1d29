"""``merging claims`` / ``make claims``: run the pre-registered claims benchmark.

Runs :func:`~merging.experiments.claims.pipeline.run_seed` for each seed (in ``--jobs``
parallel processes; a seed whose record exists under ``--work`` for the same protocol is
reused), reads the claims (:mod:`~merging.experiments.claims.readout`) and writes
``claims.json``, ``claims.md`` and ``claims.png`` to ``--out``. The default seeds are the
protocol's confirmation seeds, and the default ``--out`` is then ``results/``; any other seed
list (``--seeds``, ``--selection``) writes to ``runs/claims/`` unless ``--out`` is given, so a
short run never overwrites the committed table.

The confirmation run refuses a protocol file with uncommitted changes: the results record the
commit that last changed it, which must be older than they are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from merging.experiments.claims.protocol import Protocol, load_protocol
from merging.experiments.claims.readout import claims_markdown, read_claims
from merging.io import write_atomic, write_text_atomic

DEFAULT_PROTOCOL = Path("benchmarks/claims.yaml")


def protocol_digest(protocol: Protocol) -> str:
    """A hash of the protocol's settings (not its seeds, path or commit): a seed's record is
    reused only under the same settings."""
    settings = protocol.as_dict()
    for key in ("selection_seeds", "confirmation_seeds", "path", "commit", "commit_date", "dirty"):
        settings.pop(key)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def run_one(protocol: Protocol, seed: int, work: Path, hardware: dict[str, Any], threads: int) -> dict[str, Any]:
    """One seed in this process; writes ``work/seed_<seed>.json`` atomically and returns it."""
    import torch

    from merging.experiments.claims.pipeline import run_seed

    _quiet()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    record = run_seed(protocol, seed, work / f"seed_{seed}", hardware=hardware)
    record["wall_seconds"] = time.perf_counter() - start
    record["protocol_digest"] = protocol_digest(protocol)
    write_text_atomic(work / f"seed_{seed}.json", json.dumps(record, indent=1) + "\n")
    return record


def _cached(work: Path, seed: int, digest: str) -> dict[str, Any] | None:
    path = work / f"seed_{seed}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("protocol_digest") == digest else None


def claims_figure(claims: list[dict[str, Any]], path: Path) -> None:
    """Per row: each seed's value (dots) and the mean with its 95% interval; accuracy
    differences (points) on the left, rank correlations on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"difference": [], "correlation": []}
    for claim in claims:
        for e in claim["rows"]:
            panels[e["kind"]].append((f"{claim['name']}: {e['row']}", e))
    height = max(len(p) for p in panels.values()) * 0.32 + 1.2
    fig, axes = plt.subplots(1, 2, figsize=(16, height), constrained_layout=True)
    for ax, (kind, rows) in zip(axes, panels.items(), strict=True):
        for i, (_label, e) in enumerate(reversed(rows)):
            values = [v for v in e["values"] if v is not None]
            ax.scatter(values, [i] * len(values), s=10, alpha=0.5, color="tab:blue")
            if e["mean"] is not None and e["ci95"][0] is not None:
                ax.errorbar(e["mean"], i, xerr=[[e["mean"] - e["ci95"][0]], [e["ci95"][1] - e["mean"]]],
                            fmt="o", color="black", capsize=3)  # fmt: skip
        ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=7)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("accuracy points (paired by seed)" if kind == "difference" else "Spearman ρ per seed")
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="merging claims", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_PROTOCOL, help="the protocol YAML")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", help="default: the protocol's confirmation seeds")
    seeds.add_argument("--selection", action="store_true", help="run the protocol's selection seeds")
    parser.add_argument("--out", type=Path, default=None, help="default: results/ (confirmation) or runs/claims/")
    parser.add_argument("--work", type=Path, default=Path("runs/claims/seeds"), help="per-seed records and bundles")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="seeds run in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator of every fit (cpu, gpu, auto)")
    parser.add_argument("--devices", default="1", help="devices per fit")
    parser.add_argument(
        "--allow-uncommitted", action="store_true", help="run the confirmation seeds on an uncommitted protocol"
    )
    args = parser.parse_args(argv)
    try:
        protocol = load_protocol(args.config)
    except (OSError, ValueError, TypeError) as err:
        parser.error(str(err))
    confirmation = args.seeds is None and not args.selection
    seed_list = protocol.selection_seeds if args.selection else args.seeds or protocol.confirmation_seeds
    if confirmation and protocol.dirty and not args.allow_uncommitted:
        parser.error(
            f"{args.config} has uncommitted changes (or is not in git): commit the protocol before the "
            "confirmation run, so the results can record its commit (or pass --allow-uncommitted)"
        )
    if args.seeds and set(args.seeds) & set(protocol.selection_seeds):
        print(f"note: seeds {sorted(set(args.seeds) & set(protocol.selection_seeds))} are selection seeds")
    out = args.out or (Path("results") if confirmation else Path("runs/claims"))
    from merging.datamodules.fashion_mnist import locate_fashion_mnist

    try:
        locate_fashion_mnist(protocol.data.root)
    except FileNotFoundError as err:
        parser.error(f"{err}\nOn Debian/Ubuntu: sudo apt-get install -y dataset-fashion-mnist")
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    hardware = {"accelerator": args.accelerator, "devices": devices}
    digest = protocol_digest(protocol)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for seed in seed_list:
        cached = _cached(args.work, seed, digest)
        if cached is not None:
            records[seed] = cached
            print(f"seed {seed}: reusing {args.work}/seed_{seed}.json")
        else:
            todo.append(seed)
    if todo:
        print(f"running seeds {todo} in {min(args.jobs, len(todo))} process(es); records in {args.work}/")
        if args.jobs <= 1 or len(todo) == 1:
            for seed in todo:
                records[seed] = run_one(protocol, seed, args.work, hardware, args.threads)
                print(f"seed {seed}: done in {records[seed]['wall_seconds']:.0f} s", flush=True)
        else:
            with ProcessPoolExecutor(max_workers=min(args.jobs, len(todo)), mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(run_one, protocol, s, args.work, hardware, args.threads): s for s in todo}
                for future in as_completed(futures):
                    seed = futures[future]
                    records[seed] = future.result()
                    print(f"seed {seed}: done in {records[seed]['wall_seconds']:.0f} s", flush=True)
    wall = time.perf_counter() - start
    ordered = [records[s] for s in seed_list]
    claims = read_claims(ordered)
    result = {
        "protocol": protocol.as_dict(),
        "protocol_commit": protocol.commit,
        "protocol_commit_date": protocol.commit_date,
        "protocol_uncommitted": protocol.dirty,
        "seeds": list(seed_list),
        "confirmation": confirmation,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds": wall,
        "seed_wall_seconds": {r["seed"]: r.get("wall_seconds") for r in ordered},
        "jobs": args.jobs,
        "hardware": hardware,
        "command": "merging claims " + " ".join(sys.argv[1:] if argv is None else argv),
        "claims": claims,
        "records": ordered,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "claims.json", json.dumps(result, indent=1) + "\n")
    header = (
        f"Claims on Fashion-MNIST class-group tasks, seeds {', '.join(map(str, seed_list))} "
        f"({'confirmation' if confirmation else 'not the confirmation set'}); protocol {args.config} at commit "
        f"{(protocol.commit or 'uncommitted')[:10]}{' (modified since)' if protocol.dirty else ''}; "
        f"wall time {wall / 60:.1f} min with {args.jobs} job(s).\n\n"
    )
    write_text_atomic(out / "claims.md", header + claims_markdown(claims))
    claims_figure(claims, out / "claims.png")
    print(claims_markdown(claims))
    print(f"written to {out}/claims.{{json,md,png}} ({wall / 60:.1f} min)")
    return result


if __name__ == "__main__":
    main()
