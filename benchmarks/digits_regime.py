"""Which fine-tuning regime makes merges separate on the digits default? (issue #4)

Set-up: the embedded :class:`~merging.datamodules.DigitsTasks` (class-split tasks {0,1,2}, {3,4,5},
{6,7}, {8,9} of scikit-learn's digits, no download), a ``SmallCNN`` backbone pretrained
on the first task (:class:`~merging.modules.PretrainModule`, θ₀), then K = 4 experts
fine-tuned jointly from θ₀, expert t on task t with its own head
(:class:`~merging.modules.MultiExpertModule`), exactly the ``make demo`` pipeline. Each
*setting* changes one or two knobs of that pipeline's fine-tuning regime (expert lr,
epochs, batch size, optimizer, width, pretraining length, whether the heads are
linear-probed on θ₀ before fine-tuning, and whether they then stay frozen, as in task
arithmetic's own protocol); every setting runs the same seeds. The default seeds 3-12 were
chosen disjoint from the demo's seeds when it ran 0-2 (it now runs 0-4), so the sweep also
checks the demo's table on seeds it had not seen. The backbone
has no BatchNorm, so BN handling is not an axis here.

Per seed and setting, every model is evaluated per task with that task's own head
H_t (mean accuracy over the K tasks), on one backbone skeleton with substituted
parameters (``torch.func.functional_call``), as :class:`~merging.modules.MergedModule` does:

- experts: expert t on its own task t;
- ensemble: H_t(mean_j f(x; θ_j)) (:func:`merging.modules.evaluate.ensemble_features`);
- average: mean_j θ_j (``get_method("average")``);
- task arithmetic θ₀ + λ Σ_j τ_j (Ilharco et al., ICLR 2023) at λ ∈ {1/K, 0.3, 0.5, 0.75,
  1.0} (λ = 1/K *is* the average), and at the λ of that grid with the best mean accuracy
  on the **validation** split (ties: the smallest such λ); the test split is never used to
  choose;
- TIES (Yadav et al., NeurIPS 2023), density 0.2, λ = 1;

plus ‖τ_j‖ (mean over experts) and the mean off-diagonal cos(τ_i, τ_j)
(:func:`merging.stability.task_vector_stats`). Linear probing first (LP-FT, Kumar et al.,
ICLR 2022) is done with the modules' public surface: a first fit of the
``MultiExpertModule`` with its experts frozen (its optimizer takes only parameters that
require grad, so only the heads train), then the fine-tuning fit with the experts unfrozen;
the modules expose no option for it.

Usage (1 torch thread per process; 10-60 s per seed and setting on a busy 2-core machine)::

    .venv/bin/python benchmarks/digits_regime.py [--seeds 3 ... 12] [--settings NAME ...] [--jobs 2]

Writes ``benchmarks/results/digits_regime.md`` (atomically, or ``--out``) with the command
that made it. A setting picked from one set of seeds is re-measured on fresh ones before it
is believed (``benchmarks/results/digits_regime_confirm.md``: seeds 13-22).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchmetrics.functional.classification import multiclass_accuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.datamodules import DigitsTasks  # noqa: E402
from merging.experiments.trainers import add_hardware_arguments, quiet_trainer  # noqa: E402
from merging.io import write_text_atomic  # noqa: E402
from merging.methods import get_method  # noqa: E402
from merging.modules import MultiExpertModule, PretrainModule  # noqa: E402
from merging.modules.evaluate import ensemble_features  # noqa: E402
from merging.stability import task_vector_stats  # noqa: E402
from merging.state import StateDict, stack_states  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: Task-arithmetic scalings λ besides 1/K (which is added per run: it is plain averaging).
TA_SCALINGS: tuple[float, ...] = (0.3, 0.5, 0.75, 1.0)
TIES_HPARAMS = {"density": 0.2, "scaling": 1.0}


@dataclass(frozen=True)
class Regime:
    """One fine-tuning regime of the demo pipeline (defaults: today's ``make demo``).

    Args:
        name: the setting's label in the table.
        why: what the setting tests (one line, printed under the table).
        lr: experts' (and heads') AdamW learning rate.
        epochs: experts' fine-tuning epochs.
        weight_decay: experts' AdamW (decoupled) weight decay; it pulls towards 0, not θ₀.
        width: ``SmallCNN`` width of the first block.
        pretrain_epochs: θ₀'s pretraining epochs on the first task (AdamW, lr 3e-3).
        batch_size: per-task training batch size.
        probe_epochs: epochs of head-only training on θ₀ before fine-tuning (0: heads start
            from their random initialisation, as in the demo).
        probe_lr: learning rate of that head-only phase.
        freeze_heads: keep the heads fixed during fine-tuning (after the probe, if any), so
            every expert moves its backbone towards a fixed read-out, as task arithmetic's
            own protocol does with its frozen zero-shot heads (Ilharco et al., ICLR 2023).
        optimizer: the experts' optimizer: ``"adamw"`` (the module's own) or ``"sgd"``
            (momentum 0.9, same ``lr`` and ``weight_decay``; the module does not expose an
            optimizer choice, so :class:`_SGDExperts` overrides ``configure_optimizers``).
    """

    name: str
    why: str
    lr: float = 1e-3
    epochs: int = 10
    weight_decay: float = 0.0
    width: int = 16
    pretrain_epochs: int = 10
    batch_size: int = 32
    probe_epochs: int = 0
    probe_lr: float = 1e-2
    freeze_heads: bool = False
    optimizer: Literal["adamw", "sgd"] = "adamw"

    def changes(self) -> str:
        """The knobs that differ from the demo default, e.g. ``lr=0.0001, epochs=3``."""
        default = Regime("", "")
        diff = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if f.name not in ("name", "why") and getattr(self, f.name) != getattr(default, f.name)
        ]
        if self.probe_epochs == 0:
            diff = [d for d in diff if not d.startswith("probe_lr")]
        return ", ".join(diff) or "(demo default)"


_DEFAULT = Regime("default", "today's `make demo` regime")
#: The sweep: one axis at a time from the default, plus a few combinations (LP-FT with small
#: steps; frozen heads with other knobs), in the order they run.
REGIMES: tuple[Regime, ...] = (
    _DEFAULT,
    replace(_DEFAULT, name="width 32", why="a wider backbone (4x parameters in the convs)", width=32),
    replace(
        _DEFAULT,
        name="SGD lr 3e-2",
        why="SGD+momentum: steps follow the gradient, not Adam's sign",
        optimizer="sgd",
        lr=3e-2,
    ),
    replace(_DEFAULT, name="LP-FT", why="heads linear-probed on θ₀ first (5 epochs)", probe_epochs=5),
    replace(_DEFAULT, name="LP-FT, lr 1e-4", why="probed heads and small steps", probe_epochs=5, lr=1e-4),
    replace(_DEFAULT, name="lr 3e-4", why="experts move less far", lr=3e-4),
    replace(_DEFAULT, name="3 epochs", why="fewer steps at the default lr", epochs=3),
    replace(_DEFAULT, name="lr 3e-3", why="experts move further", lr=3e-3),
    replace(_DEFAULT, name="lr 1e-4", why="experts move much less far", lr=1e-4),
    replace(_DEFAULT, name="pretrain 3", why="a weaker θ₀", pretrain_epochs=3),
    replace(_DEFAULT, name="pretrain 30", why="a stronger θ₀ (3x pretraining)", pretrain_epochs=30),
    replace(_DEFAULT, name="batch 128", why="4x fewer optimizer steps, same epochs", batch_size=128),
    # Small steps for longer: experts stay close to θ₀ (where task vectors add with little
    # interference) yet train to a high accuracy.
    replace(_DEFAULT, name="lr 1e-4, 40 epochs", why="small steps, trained longer", lr=1e-4, epochs=40),
    replace(
        _DEFAULT,
        name="LP-FT, lr 1e-4, 40 epochs",
        why="probed heads, small steps, trained longer",
        probe_epochs=5,
        lr=1e-4,
        epochs=40,
    ),
    replace(_DEFAULT, name="SGD lr 1e-2", why="gentler SGD+momentum", optimizer="sgd", lr=1e-2),
    replace(
        _DEFAULT,
        name="frozen heads",
        why="heads probed on θ₀, then frozen while the backbones fine-tune",
        probe_epochs=5,
        freeze_heads=True,
    ),
    replace(
        _DEFAULT,
        name="frozen heads, lr 3e-4",
        why="frozen probed heads, smaller steps",
        probe_epochs=5,
        freeze_heads=True,
        lr=3e-4,
    ),
    replace(
        _DEFAULT,
        name="frozen heads, SGD lr 1e-2",
        why="frozen probed heads, SGD+momentum",
        probe_epochs=5,
        freeze_heads=True,
        optimizer="sgd",
        lr=1e-2,
    ),
    replace(
        _DEFAULT,
        name="frozen heads, 20 epochs",
        why="frozen probed heads, trained longer",
        probe_epochs=5,
        freeze_heads=True,
        epochs=20,
    ),
)


class _SGDExperts(MultiExpertModule):
    """:class:`~merging.modules.MultiExpertModule` trained with SGD (momentum 0.9) instead of AdamW."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)


def _split_tensors(data: DigitsTasks, split: str) -> list[tuple[Tensor, Tensor]]:
    """Every task's ``split`` as one ``(x: (N_t, 1, 8, 8), y: (N_t,))`` pair (the sets are tiny)."""
    out = []
    for t in range(data.num_tasks):
        xs, ys = zip(*data.task_dataloader(t, split, batch_size=1024))
        out.append((torch.cat(xs), torch.cat(ys)))
    return out


@torch.no_grad()
def _mean_accuracy(
    skeleton: nn.Module, heads: nn.ModuleList, state_of_task, tasks: list[tuple[Tensor, Tensor]], ensemble: bool = False
) -> float:
    """Mean over tasks of the accuracy of H_t(f(x; state_of_task(t))).

    Accuracy is torchmetrics' ``MulticlassAccuracy`` default (macro: mean per-class
    recall), as in :class:`~merging.modules.MergedModule` and the demo's table.

    ``state_of_task(t)`` gives the backbone state read on task t (an expert, or one merge
    for all t); with ``ensemble`` it gives stacked ``{key: (K, *shape)}`` states whose
    features are averaged.
    """
    accs = []
    for t, (x, y) in enumerate(tasks):
        state = state_of_task(t)
        feats = ensemble_features(skeleton, state, x) if ensemble else functional_call(skeleton, state, (x,))
        logits = heads[t](feats)
        accs.append(float(multiclass_accuracy(logits, y, num_classes=logits.shape[1], average="macro")))
    return 100.0 * statistics.fmean(accs)


def _pretrained_base(regime: Regime, seed: int, data: DigitsTasks, cache: Path, hardware: dict) -> Path:
    """θ₀ of this seed, width, pretraining length and batch size: read from ``cache`` when
    an earlier setting made it, else pretrained (from ``seed_everything(seed)``) and saved.

    Settings that share these four knobs share θ₀ (as they would if run alone: the
    pretraining starts from the same seed), which saves a third of the sweep's time.
    """
    path = cache / f"base_w{regime.width}_p{regime.pretrain_epochs}_b{regime.batch_size}_s{seed}.safetensors"
    if not path.exists():
        pl.seed_everything(seed, verbose=False)
        pretrain = PretrainModule(backbone_kwargs={"width": regime.width}, export_path=str(path))
        quiet_trainer(**hardware, max_epochs=regime.pretrain_epochs, limit_val_batches=0).fit(pretrain, data)
    return path


def _train(regime: Regime, seed: int, data: DigitsTasks, cache: Path, hardware: dict) -> MultiExpertModule:
    """Pretrain (or reuse) θ₀, then fine-tune the K experts (optionally after a head-only
    probe) from ``seed_everything(seed)``."""
    backbone_kwargs = {"width": regime.width}
    base_path = _pretrained_base(regime, seed, data, cache, hardware)
    pl.seed_everything(seed, verbose=False)
    module_cls = _SGDExperts if regime.optimizer == "sgd" else MultiExpertModule
    experts = module_cls(
        backbone_kwargs=backbone_kwargs,
        base_checkpoint=str(base_path),
        task_names=data.task_names,
        num_classes=data.num_classes,
        lr=regime.lr,
        weight_decay=regime.weight_decay,
    )
    if regime.probe_epochs:
        # Head-only phase: the module's optimizer takes the parameters that require grad.
        experts.experts.requires_grad_(False)
        experts.lr = regime.probe_lr
        quiet_trainer(**hardware, max_epochs=regime.probe_epochs, limit_val_batches=0).fit(experts, data)
        experts.experts.requires_grad_(True)
        experts.lr = regime.lr
    if regime.freeze_heads:
        experts.heads.requires_grad_(False)
    quiet_trainer(**hardware, max_epochs=regime.epochs, limit_val_batches=0).fit(experts, data)
    return experts.eval()


def run_seed(regime: Regime, seed: int, cache: Path, hardware: dict | None = None) -> dict[str, float]:
    """One seed of one setting: train, merge, evaluate; returns ``{quantity: value}``
    (accuracies in %, ``seconds`` the wall time of this run).

    Args:
        regime: the setting.
        seed: seed of the data splits, the pretraining and the fine-tuning.
        cache: folder of pretrained θ₀ files shared by settings (:func:`_pretrained_base`).
        hardware: the Trainers' ``accelerator`` and ``devices`` (default: one CPU).
    """
    hardware = hardware or {}
    start = time.perf_counter()
    data = DigitsTasks(seed=seed, batch_size=regime.batch_size)
    module = _train(regime, seed, data, cache, hardware)
    val, test = _split_tensors(data, "val"), _split_tensors(data, "test")
    skeleton, heads = module.skeleton.eval(), module.heads.eval()
    experts: list[StateDict] = [{k: v.detach().clone() for k, v in s.items()} for s in module.expert_state_dicts()]
    base: StateDict = {k: v.detach().clone() for k, v in module.base_state_dict().items()}
    k = len(experts)

    row: dict[str, float] = {}
    row["experts"] = _mean_accuracy(skeleton, heads, lambda t: experts[t], test)
    row["expert_min"] = min(
        _mean_accuracy(skeleton, heads[t : t + 1], lambda _: experts[t], test[t : t + 1]) for t in range(k)
    )
    stacked = stack_states(experts)
    row["ensemble"] = _mean_accuracy(skeleton, heads, lambda _: stacked, test, ensemble=True)
    average = get_method("average").merge(experts, base)
    row["average"] = _mean_accuracy(skeleton, heads, lambda _: average, test)
    best_val, best_scaling = -1.0, None
    for scaling in (1.0 / k, *TA_SCALINGS):
        merged = get_method("task_arithmetic", scaling=scaling).merge(experts, base)
        row[f"ta@{scaling:g}"] = _mean_accuracy(skeleton, heads, lambda _: merged, test)
        val_acc = _mean_accuracy(skeleton, heads, lambda _: merged, val)
        if val_acc > best_val:  # strict: ties keep the smaller λ
            best_val, best_scaling = val_acc, scaling
    row["ta@val"] = row[f"ta@{best_scaling:g}"]
    row["lambda_val"] = best_scaling
    ties = get_method("ties", **TIES_HPARAMS).merge(experts, base)
    row["ties"] = _mean_accuracy(skeleton, heads, lambda _: ties, test)
    stats = task_vector_stats(experts, base)
    off_diagonal = [float(stats.cosine[i, j]) for i in range(k) for j in range(k) if i != j]
    row["tau_norm"] = float(stats.norms.mean())
    row["cosine"] = statistics.fmean(off_diagonal)
    row["seconds"] = time.perf_counter() - start
    return row


def _ms(values: list[float], fmt: str = ".1f") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{fmt}} ± {sd:{fmt}}"


def _beats(rows: list[dict[str, float]], key: str) -> bool:
    """``key`` above ``average`` beyond the seeds' spread, paired by seed: the mean of the
    per-seed gains ``key − average`` exceeds their sd (a seed's data split, θ₀ and experts
    are shared by every method, so the seed-to-seed swing of all methods together cancels)."""
    gains = [r[key] - r["average"] for r in rows]
    sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
    return statistics.fmean(gains) - sd > 0


def _wins(rows: list[dict[str, float]], key: str) -> str:
    """Seeds on which ``key`` scores above ``average``, e.g. ``9/10``."""
    return f"{sum(r[key] > r['average'] for r in rows)}/{len(rows)}"


def render(
    results: list[tuple[Regime, list[dict[str, float]]]], k: int, command: str, seeds: list[int], missing: list[str]
) -> str:
    """The Markdown report: one accuracy table and one explanation table over the settings
    (``missing``: settings of the run that have not finished, named under the tables)."""
    ta_cols = [f"ta@{s:g}" for s in (1.0 / k, *TA_SCALINGS)]
    lines = [
        "# Digits default: fine-tuning regime sweep (issue #4)",
        "",
        f"Command: `{command}` (1 torch thread; seeds {seeds}).",
        "",
        "Test accuracy % (mean ± sd over seeds), each task read by its own head, mean over the "
        f"{k} tasks. `TA λ` = task arithmetic θ₀ + λ Σ τ_j (λ = 1/K = {1 / k:g} is plain "
        "averaging); `TA val` = TA at the λ of that grid with the best mean **validation** "
        "accuracy (the chosen λ per seed in brackets); TIES: density 0.2, λ = 1. "
        "`min expert` = the worst expert's own-task accuracy (chance: 33% or 50%). "
        "`>avg` marks TA val / TIES whose paired gain over averaging (per seed, then mean ± sd) "
        "has mean − sd > 0, i.e. exceeds the seeds' spread.",
        "",
        "| setting | experts | min expert | ensemble | average | "
        + " | ".join(f"TA {c[3:]}" for c in ta_cols[1:])
        + " | TA val [λ] | TIES | >avg (TA val, TIES) | s/seed |",
        "|---|" + "---:|" * (7 + len(ta_cols)),
    ]
    for regime, rows in results:
        seconds = statistics.fmean(r["seconds"] for r in rows)
        col = lambda key: _ms([r[key] for r in rows])  # noqa: E731
        lambdas = ",".join(f"{r['lambda_val']:g}" for r in rows)
        marks = f"{'yes' if _beats(rows, 'ta@val') else 'no'}, {'yes' if _beats(rows, 'ties') else 'no'}"
        lines.append(
            f"| {regime.name} | {col('experts')} | {col('expert_min')} | {col('ensemble')} | {col('average')} | "
            + " | ".join(col(c) for c in ta_cols[1:])
            + f" | {col('ta@val')} [{lambdas}] | {col('ties')} | {marks} | {seconds:.0f} |"
        )
    lines += [
        "",
        "Paired differences to averaging (per seed, then mean ± sd), and what the experts moved:",
        "",
        "| setting | changes from the demo | TA val − average | wins | TIES − average | wins "
        "| ‖τ_j‖ (mean over j) | mean cos(τ_i, τ_j) | what it tests |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for regime, rows in results:
        d_ta = [r["ta@val"] - r["average"] for r in rows]
        d_ties = [r["ties"] - r["average"] for r in rows]
        lines.append(
            f"| {regime.name} | {regime.changes()} | {_ms(d_ta)} | {_wins(rows, 'ta@val')} "
            f"| {_ms(d_ties)} | {_wins(rows, 'ties')} | "
            f"{_ms([r['tau_norm'] for r in rows], '.2f')} | {_ms([r['cosine'] for r in rows], '.3f')} | {regime.why} |"
        )
    if missing:
        lines += [
            "",
            f"Not finished when this file was written (the run was stopped or is running): {', '.join(missing)}.",
        ]
    return "\n".join(lines) + "\n"


def _quiet() -> None:
    """One torch thread and no Lightning chatter (the main process and every worker)."""
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: list[str] | None = None) -> str:
    """Run the sweep and write the report; returns the report's Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(3, 13)))
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        choices=[r.name for r in REGIMES],
        metavar="NAME",
        help=f"run only these settings (default: all of {[r.name for r in REGIMES]})",
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (each with 1 torch thread)")
    parser.add_argument(
        "--out", type=Path, default=None, help="report path (default: benchmarks/results/digits_regime.md)"
    )
    add_hardware_arguments(parser)
    args = parser.parse_args(argv)
    hardware = {"accelerator": args.accelerator, "devices": args.devices}

    _quiet()
    log = logging.getLogger("digits_regime")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    regimes = [r for r in REGIMES if args.settings is None or r.name in args.settings]
    command = "python benchmarks/digits_regime.py " + " ".join(argv if argv is not None else sys.argv[1:])
    k = len(DigitsTasks().task_names)
    out = args.out or RESULTS / "digits_regime.md"
    runs: dict[tuple[str, int], dict[str, float]] = {}

    def write_report() -> None:
        # Rewritten as each setting completes, so an interrupted sweep leaves its finished part.
        done = [
            (r, [runs[r.name, s] for s in args.seeds]) for r in regimes if all((r.name, s) in runs for s in args.seeds)
        ]
        missing = [r.name for r in regimes if all(r is not d for d, _ in done)]
        write_text_atomic(out, render(done, k, command.strip(), args.seeds, missing))

    with (
        tempfile.TemporaryDirectory() as cache,
        ProcessPoolExecutor(
            max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet
        ) as pool,
    ):
        futures = {
            pool.submit(run_seed, r, seed, Path(cache), hardware): (r.name, seed)
            for r in regimes
            for seed in args.seeds
        }
        for future in as_completed(futures):
            name, seed = futures[future]
            runs[name, seed] = row = future.result()
            log.info(
                "%-16s seed %d: experts %.1f  average %.1f  TA val %.1f (λ=%g)  TIES %.1f  (%.0f s)",
                name,
                seed,
                row["experts"],
                row["average"],
                row["ta@val"],
                row["lambda_val"],
                row["ties"],
                row["seconds"],
            )
            if all((name, s) in runs for s in args.seeds):
                write_report()
    log.info("written to %s", out)
    return out.read_text()


if __name__ == "__main__":
    main()
