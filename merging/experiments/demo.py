"""The main job (``make demo``): pretrain, fine-tune K experts, merge with every method,
and compare with the experts and their ensemble, over several seeds.

On the embedded default (:class:`~merging.datamodules.DigitsTasks`, scikit-learn's digits split
into class groups), per seed:

1. pretrain a small CNN backbone on the first task (θ₀);
2. fine-tune K = 4 experts jointly from θ₀, expert t on task t (``MultiExpertModule``);
3. evaluate the ensemble, each expert alone, and every registered merge method
   (``MergedModule``), each task read by its own head.

Prints one table (mean ± sd over seeds) and writes it as CSV, JSON and Markdown, plus a
plot, to ``runs/demo/``. Then runs the second scenario, experts trained from different
initialisations (:mod:`merging.experiments.scenarios`: averaging vs weight/activation matching vs
MuDSC), and writes ``different_init.{md,json}`` there (``--skip-different-init`` skips it).
Every Trainer runs on ``--accelerator`` (default ``auto``: the GPU where one is found) with
``--devices`` (default 1); the merges run where the module is placed. Run
``python -m merging.experiments.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import statistics
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from merging._validation import check_choice
from merging.callbacks import StabilityMonitor
from merging.datamodules import DigitsTasks
from merging.experiments.scenarios import different_init_scenario
from merging.experiments.trainers import add_hardware_arguments, quiet_trainer
from merging.io import write_text_atomic
from merging.methods import available_methods, get_method
from merging.mloss import m_loss
from merging.modules import EnsembleModule, MergedModule, MultiExpertModule, NeuLigModule, PretrainModule
from merging.neulig import MERGE_MODES, Constraint, MergeMode
from merging.report import UNRESOLVED, accuracy_bars, accuracy_table, plus_minus, summarise
from merging.stability import task_vector_stats

#: Hyperparameters of each method in the demo (defaults of the papers unless noted).
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "average": {},
    "task_arithmetic": {"scaling": 0.3},
    "ties": {"density": 0.2, "scaling": 1.0},
    "dare": {"drop_rate": 0.9, "scaling": 0.3},
    # M-TIES at TIES's density, so the two rows compare the row-wise M-Loss schedule alone.
    "mties": {"density": 0.2, "spread": 0.1},
}
#: Extra labelled rows: ``{label: {"method": registered name, **hyperparameters}}``, run when
#: their method is. M-TIES at the paper's ViT-B/32 recipe (k = 0.8, e = 0.1, S = 1, λ = 1),
#: which the paper compares with global TIES at k = 0.2, λ = 1 (the ``ties`` row).
DEMO_EXTRA_ROWS: dict[str, dict[str, Any]] = {
    "mties (paper recipe)": {"method": "mties", "density": 0.8, "spread": 0.1, "sampling_size": 1, "scaling": 1.0},
}
#: λ grid of the methods the demo also runs with λ chosen on the validation split
#: (``MergedModule(scaling_grid=...)``), as both papers allow when a validation set exists
#: (Ilharco et al., ICLR 2023; Yadav et al., NeurIPS 2023). Each such method gets two rows:
#: its default λ above, and λ chosen on validation. One grid for both (our choice): it holds
#: 1/K = 0.25's neighbours, TA's default 0.3 and TIES's default 1.0.
SCALING_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 16))
DEMO_SCALING_GRIDS: dict[str, tuple[float, ...]] = {"task_arithmetic": SCALING_GRID, "ties": SCALING_GRID}


def searched_label(name: str) -> str:
    """The demo's row label of ``name`` with λ chosen on validation."""
    return f"{name} (λ on val)"


def stability_summary(seed: int, monitor: StabilityMonitor, experts: MultiExpertModule) -> list[dict]:
    """Per expert: Λ = Σ η_t, path length, ‖τ_j‖ and mean cosine to the other experts,
    plus the experts' dispersion D and sign-conflict rate (seed 004's measurable quantities)."""
    stats = task_vector_stats(experts.expert_state_dicts(), experts.base_state_dict())
    k = stats.cosine.shape[0]
    rows = []
    for j, trajectory in enumerate(monitor.trajectories):
        others = [float(stats.cosine[j, i]) for i in range(k) if i != j]
        rows.append(
            {
                "seed": seed,
                "expert": f"expert {j} ({experts.task_names[j]})",
                "lr_integral": trajectory.lr_integral,
                "path_length": trajectory.path_length,
                "tau_norm": float(stats.norms[j]),
                "mean_cosine": statistics.fmean(others) if others else 1.0,
                "dispersion": stats.dispersion,
                "sign_conflict": stats.sign_conflict,
            }
        )
    return rows


def render_stability(stability: list[list[dict]]) -> Table:
    """Mean over seeds of the per-expert stability measurements."""
    by_expert: dict[str, list[dict]] = defaultdict(list)
    for seed_rows in stability:
        for row in seed_rows:
            by_expert[row["expert"]].append(row)
    dispersion = statistics.fmean(rows[0]["dispersion"] for rows in stability)
    conflict = statistics.fmean(rows[0]["sign_conflict"] for rows in stability)
    table = Table(
        title=(
            f"Experts' stability (mean over seeds): dispersion D = {dispersion:.3g}, "
            f"sign conflict {100 * conflict:.1f}%"
        )
    )
    for h in ("expert", "Λ = Σ η_t", "path length", "‖τ_j‖", "mean cos(τ_j, τ_i)"):
        table.add_column(h, justify="left" if h == "expert" else "right")
    for expert, rows in by_expert.items():
        table.add_row(
            expert,
            f"{statistics.fmean(r['lr_integral'] for r in rows):.3g}",
            f"{statistics.fmean(r['path_length'] for r in rows):.3g}",
            f"{statistics.fmean(r['tau_norm'] for r in rows):.3g}",
            f"{statistics.fmean(r['mean_cosine'] for r in rows):.3f}",
        )
    return table


def render_mloss(mloss: list[dict]) -> Table:
    """The experts' M-Loss per measured layer (mean ± sd over seeds)."""
    table = Table(title="Experts' M-Loss per layer (256 unlabeled inputs, reference θ₀; mean ± sd over seeds)")
    for h in ("layer", "M-Loss", "normalized M-Loss"):
        table.add_column(h, justify="left" if h == "layer" else "right")
    for name in mloss[0]["layer"]:
        cells = []
        for kind in ("layer", "layer_normalized"):
            values = [m[kind][name] for m in mloss]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.4f} ± {sd:.4f}")
        table.add_row(name, *cells)
    return table


def run_seed(
    seed: int,
    out: Path,
    args: argparse.Namespace,
    methods: dict[str, dict[str, Any]],
    step,
    stability: list,
    mloss: list,
) -> list[dict]:
    """One seed of the pipeline; returns one result row per evaluated model and appends the
    experts' stability and M-Loss measurements to ``stability`` and ``mloss``."""
    pl.seed_everything(seed, verbose=False)
    hardware = {"accelerator": args.accelerator, "devices": args.devices}
    run_dir = out / f"seed_{seed}"
    data = DigitsTasks(seed=seed, batch_size=args.batch_size)
    backbone_kwargs = {"width": args.width}

    pretrain = PretrainModule(backbone_kwargs=backbone_kwargs, export_path=str(run_dir / "base.safetensors"))
    quiet_trainer(**hardware, max_epochs=args.pretrain_epochs, limit_val_batches=0).fit(pretrain, data)
    step("pretrained")

    experts = MultiExpertModule(
        backbone_kwargs=backbone_kwargs,
        base_checkpoint=str(run_dir / "base.safetensors"),
        lr=args.lr,
        export_dir=str(run_dir / "experts"),
    )
    monitor = StabilityMonitor(sparsifiers=())
    fit = quiet_trainer(
        **hardware,
        max_epochs=args.expert_epochs,
        limit_val_batches=0,
        callbacks=[monitor],
        default_root_dir=str(run_dir),
    )
    fit.fit(experts, data)
    step("experts fine-tuned")
    stability.append(stability_summary(seed, monitor, experts))
    report = m_loss(
        experts.skeleton,
        experts.expert_state_dicts(),
        data.unlabeled_dataloader(num_samples=256, seed=seed),
        base=experts.base_state_dict(),
    )
    mloss.append({"seed": seed, "layer": report.layer, "layer_normalized": report.layer_normalized})

    bundle_dir = str(run_dir / "experts")
    rows = []

    def evaluate(label: str, module) -> None:
        quiet_trainer(**hardware).test(module, data, verbose=False)
        rows.append({"model": label, "seed": seed, **module.results})

    evaluate("ensemble", EnsembleModule(bundle_dir))
    for j, name in enumerate(data.task_names):
        evaluate(f"expert {j} ({name})", EnsembleModule(bundle_dir, members=[j]))
    step("ensemble and experts evaluated")
    for name, spec in methods.items():
        hparams = {k: v for k, v in spec.items() if k != "method"}
        method_name = spec.get("method", name)
        merged = lambda grid=None, method_name=method_name, hparams=hparams: MergedModule(  # noqa: E731
            bundle_dir, method=get_method(method_name, **hparams), report_ensemble=False, seed=seed, scaling_grid=grid
        )
        evaluate(name, merged())
        if name in DEMO_SCALING_GRIDS:
            evaluate(searched_label(name), merged(DEMO_SCALING_GRIDS[name]))
        step(f"merged: {name}")
    if args.neulig_epochs:
        rows += neulig_rows(seed, bundle_dir, data, args.neulig_epochs, hardware)
        step("NeuLig: Portland trained")
    return rows


def neulig_rows(
    seed: int,
    bundle_dir: str,
    data: DigitsTasks,
    epochs: int,
    hardware: dict[str, Any] | None = None,
    *,
    mode: MergeMode = "per_batch_first",
    constraint: Constraint = "soft",
    also_test: Sequence[MergeMode] = (),
) -> list[dict]:
    """Train Portland (supervised) on the frozen experts and report its merged and ensembled
    test accuracy, from the Portland chosen on the validation split.

    Args:
        seed: Portland's initialisation seed.
        bundle_dir: the experts' bundle.
        data: the experts' datamodule (its batch size is Portland's, its eval batch size
            the size of the batches that ``mode`` merges per batch).
        epochs: Portland's training epochs (validated every ``epochs // 5``).
        hardware: the Trainer's ``accelerator`` and ``devices``.
        mode: the merging branch's inference mode (``NeuLigModule(mode=...)``); the default
            is the code's: one merge per test batch from its **first** sample's CoopVec.
        constraint: ``NeuLigModule(constraint=...)`` (default: the paper's soft L_a).
        also_test: more inference modes to test the same Portland with (one more row each,
            ``neulig (merged, <mode>)``; the Portland is still the one ``mode`` chose).

    Returns:
        Two rows, ``neulig (merged)`` and ``neulig (ensembled)``, with ``test/acc/<task>``
        and ``test/acc_mean``, then one per ``also_test`` mode.
    """
    module = NeuLigModule(bundle_dir, alignment="sup", seed=seed, coopvec_plot=False, mode=mode, constraint=constraint)
    trainer = quiet_trainer(**(hardware or {}), max_epochs=epochs, check_val_every_n_epoch=max(1, epochs // 5))
    trainer.fit(module, data)
    rows = []

    def read(kinds: dict[str, str]) -> None:
        trainer.test(module, data, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        for kind, label in kinds.items():
            row = {"model": label, "seed": seed}
            for name in data.task_names:
                row[f"test/acc/{name}"] = metrics[f"test/best/{kind}_acc/{name}"]
            row["test/acc_mean"] = metrics[f"test/best/{kind}_acc"]
            rows.append(row)

    read({"merged": "neulig (merged)", "ensembled": "neulig (ensembled)"})
    for extra in also_test:
        module.hparams.mode = check_choice("also_test", extra, MERGE_MODES, owner="neulig_rows")
        read({"merged": f"neulig (merged, {extra})"})
    module.hparams.mode = mode
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--expert-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--width", type=int, default=32, help="SmallCNN width of the first block (chosen on seeds 0-4: README)"
    )
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method but neulig")
    parser.add_argument("--neulig-epochs", type=int, default=30, help="Portland training epochs (0: no NeuLig rows)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest for these tiny models)")
    parser.add_argument(
        "--skip-different-init", action="store_true", help="skip the experts-from-different-initialisations scenario"
    )
    add_hardware_arguments(parser)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # NeuLig needs a trained Portland: its rows come from NeuLigModule (--neulig-epochs).
    names = args.methods or [m for m in available_methods() if m != "neulig"]
    unknown = sorted(set(names) - set(available_methods()))
    if unknown:
        parser.error(f"unknown methods {unknown}; available: {available_methods()}")
    methods = {name: DEMO_METHODS.get(name, {}) for name in names}
    methods.update({label: spec for label, spec in DEMO_EXTRA_ROWS.items() if spec["method"] in names})

    console = Console(width=None if Console().is_terminal else 160)
    rows: list[dict] = []
    stability: list[list[dict]] = []
    mloss: list[dict] = []
    steps_per_seed = 3 + len(methods) + (1 if args.neulig_epochs else 0)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("demo", total=steps_per_seed * len(args.seeds))
        for seed in args.seeds:

            def step(what: str, seed: int = seed) -> None:
                progress.update(bar, advance=1, description=f"seed {seed}: {what}")

            rows += run_seed(seed, args.out, args, methods, step, stability, mloss)

    task_names = DigitsTasks().task_names
    summary = summarise(rows, reference="ensemble", gap_key="gap_to_ensemble", paired={"vs_average": "average"})
    table, markdown = accuracy_table(
        summary,
        task_names,
        title="Digits class-split tasks: accuracy % (mean ± sd over seeds; gaps paired by seed)",
        gap_key="gap_to_ensemble",
        gap_label="gap to ensemble",
        more_gaps=[("vs_average", "vs average")],
    )
    console.print(table)
    for name in methods:
        chosen = [r["test/selected_scaling"] for r in rows if r["model"] == searched_label(name)]
        if chosen:
            console.print(
                f"{name}: λ chosen on validation per seed {args.seeds}: {', '.join(f'{c:g}' for c in chosen)}"
            )
    console.print(render_stability(stability))
    console.print(render_mloss(mloss))
    console.print(
        "The ensemble averages the experts' features and reads each task with its own head; "
        "at this scale it is not an upper bound of every merge."
    )
    unresolved = [e["model"] for e in summary if UNRESOLVED in plus_minus(e, "vs_average")]
    if unresolved:
        console.print(
            f"Digits is too small to resolve these differences from averaging over {len(args.seeds)} seeds "
            f"(about 70 test images a task; paired 95% interval contains 0): {', '.join(unresolved)}. "
            "The claims benchmark (make claims) reads each paper's claim on Fashion-MNIST over 10 fresh seeds."
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "results.md", markdown)
    write_text_atomic(
        args.out / "results.json",
        json.dumps({"summary": summary, "runs": rows, "stability": stability, "mloss": mloss}, indent=2) + "\n",
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=sorted({k for e in summary for k in e}, key=lambda k: (k != "model", k)))
    writer.writeheader()
    writer.writerows(summary)
    write_text_atomic(args.out / "results.csv", buffer.getvalue())
    accuracy_bars(summary, args.out / "results.png", reference="ensemble")
    console.print(f"written to {args.out}/results.{{md,json,csv,png}}")
    if not args.skip_different_init:
        with console.status("experts from different initialisations") as status:
            _, _, di_table = different_init_scenario(
                args.seeds,
                args.out,
                width=args.width,
                batch_size=args.batch_size,
                step=lambda what: status.update(f"experts from different initialisations: {what}"),
                accelerator=args.accelerator,
                devices=args.devices,
            )
        console.print(di_table)
        console.print(f"written to {args.out}/different_init.{{md,json}}")
    return summary


if __name__ == "__main__":
    main()
