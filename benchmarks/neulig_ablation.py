"""Where NeuLig's merged-vs-ensembled gap comes from: an ablation of its parts on the demo.

Per seed, the experts are trained exactly as in the demo (``merging.experiments.demo``:
``PretrainModule`` θ₀ on task 0, then ``MultiExpertModule``, same epochs, lr, width and
batch size); then Portland is trained under each variant and evaluated on the test split,
reporting the **merged** accuracy (H_t(E_{θ_m}(x)), θ_m = Σ_k β_k θ_k), the **ensembled**
accuracy (H_t(Σ_k β_k E_k(x))) and the gap merged − ensembled, as mean ± sd over seeds;
every difference is paired by seed.

Portland is trained here on **cached expert features** with the maths of
:mod:`merging.neulig` (the experts are frozen and in eval mode, so E_k(x) of a sample never
changes): per epoch every task's train split is shuffled, cut into batches and visited
round-robin, one Adam step per task batch, shorter tasks cycled up to the longest
(``NeuLigModule``'s ``max_size_cycle`` order, drawn from its own seeded generator). Portland
is validated every ``epochs // 5`` epochs on the validation split's merged accuracy and the
best one is tested, as ``neulig_rows`` in the demo does (``last`` variants test the last).
Every variant selects on the first-sample merged accuracy, so the inference rows reuse the
recipe's Portland (``NeuLigModule`` selects with its own ``mode``). Cross-check: on seeds 0
and 1 the demo's own ``neulig_rows`` (Lightning, NeuLigModule) gives 84.1 / 95.6 and
78.9 / 96.2 (merged / ensembled), this script's recipe 83.4 / 95.6 and 79.2 / 96.2.

Variants (``VARIANTS``): the demo's recipe, each loss term removed, the ``semi`` loss, the
hard constraint (β projected onto Σβ_kε*_k = 0), the inference modes (per batch's first
sample, per sample, per task = mean CoopVec of the task's train split, static = one mean
CoopVec), last versus best, and longer training (the code's default is 1000 epochs).
The ``task-recognition`` rows add a term that is **not** in the paper, CE(log β, t), which
tells Portland the batch's task: a test of whether a β that favours the own-task expert
closes the gap. ``oracle one-hot`` sets β = e_t (expert t for task t): the value both branches reach when
Portland recognises the task perfectly; the ``fixed β`` rows mix e_t with the uniform β and
measure how fast merging falls behind ensembling as β softens (uniform: averaging).

    python benchmarks/neulig_ablation.py --seeds 0 1 2 3 4 --out benchmarks/results/neulig_ablation
    python benchmarks/neulig_ablation.py --render benchmarks/results/neulig_ablation.json  # tables only

Writes ``<out>.md`` and ``<out>.json`` (every seed's figures and validation history).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from merging.bundle import ExpertBundle
from merging.datamodules import DigitsTasks
from merging.experiments.trainers import add_hardware_arguments, quiet_trainer
from merging.io import write_text_atomic
from merging.modules import MultiExpertModule, PretrainModule
from merging.neulig import (
    Portland,
    alignment_residual,
    concat_features,
    coopvec_ensemble,
    coopvec_merge,
    expert_features,
    modified_offsets,
    neulig_loss,
    project_coopvec,
)


@dataclass(frozen=True)
class Variant:
    """One Portland recipe: training (loss, constraint, length) and inference (mode, selection)."""

    name: str
    epochs: int = 30  # the demo's --neulig-epochs
    lr: float = 1e-3
    alignment: str = "sup"
    task_weight: float = 1.0  # β in α L_a + β L_b
    scaling: float = 100.0  # α = 1/scaling; inf drops L_a
    constraint: str = "soft"  # soft (L_a only) | hard (β projected onto Σβε* = 0)
    mode: str = "per_batch_first"  # per_batch_first | per_batch_mean | per_sample | per_task | static | oracle
    select: str = "best"  # best (on val merged accuracy) | last
    recognition: float = 0.0  # not in the paper: + weight · CE(log β, t), Portland told the task
    mix: float = 0.0  # oracle only: β = (1 − mix) e_t + mix · uniform (mix = 1: averaging vs feature ensemble)


def variants(epochs: int, long_epochs: int) -> list[Variant]:
    """The ablation's rows; ``epochs`` is the demo's Portland length (30), ``long_epochs`` the
    official code's default (1000)."""
    base = Variant("demo recipe (sup, α=0.01, soft, first-sample β, best on val)", epochs=epochs)
    long = replace(base, epochs=long_epochs)
    return [
        base,
        replace(base, name="without L_a (α = 0)", scaling=math.inf),
        replace(base, name="without L_b (L_a only)", task_weight=0.0),
        replace(base, name="semi (entropy L_b)", alignment="semi"),
        replace(base, name="hard constraint (β projected onto Σβε* = 0)", constraint="hard"),
        replace(base, name="last epoch (no selection)", select="last"),
        replace(base, name="Portland lr x10 (1e-2)", lr=1e-2),
        replace(base, name="inference: per sample", mode="per_sample"),
        replace(base, name="inference: per batch, mean β", mode="per_batch_mean"),
        replace(base, name="inference: per task, mean β of its train split", mode="per_task"),
        replace(base, name="inference: static, one mean β", mode="static"),
        replace(long, name=f"{long_epochs} epochs (the code's default is 1000), first-sample β"),
        replace(long, name=f"{long_epochs} epochs, per sample", mode="per_sample"),
        replace(long, name=f"{long_epochs} epochs, per batch, mean β", mode="per_batch_mean"),
        replace(long, name=f"{long_epochs} epochs, per task", mode="per_task"),
        replace(base, name="+ task-recognition CE(β, t) (not in the paper), first-sample β", recognition=1.0),
        replace(
            base, name="+ task-recognition CE(β, t) (not in the paper), per sample", recognition=1.0, mode="per_sample"
        ),
        replace(base, name="fixed β = uniform (averaging vs feature ensemble)", mode="oracle", mix=1.0),
        replace(base, name="fixed β = 0.5 e_t + 0.5 uniform", mode="oracle", mix=0.5),
        replace(base, name="fixed β = 0.8 e_t + 0.2 uniform", mode="oracle", mix=0.2),
        replace(base, name="oracle one-hot β = e_t (expert t alone)", mode="oracle"),
    ]


def training_key(variant: Variant) -> tuple:
    """Variants that differ only in inference share one trained Portland."""
    return tuple(v for k, v in asdict(variant).items() if k not in ("name", "mode", "mix"))


# --------------------------------------------------------------------------- experts


def make_data(dataset: str, seed: int, batch_size: int, max_per_class: int | None = 300) -> Any:
    """The demo's tasks: ``DigitsTasks``, or ``FashionMNISTTasks`` (train split capped at
    ``max_per_class`` images per class; the official test split, whole)."""
    if dataset == "digits":
        return DigitsTasks(seed=seed, batch_size=batch_size)
    from merging.datamodules import FashionMNISTTasks

    return FashionMNISTTasks(seed=seed, batch_size=batch_size, max_per_class=max_per_class)


def train_experts(seed: int, out: Path, data: Any, args: argparse.Namespace) -> str:
    """θ₀ and K experts as ``merging.experiments.demo.run_seed`` trains them; returns the bundle dir."""
    pl.seed_everything(seed, verbose=False)
    hardware = {"accelerator": args.accelerator, "devices": args.devices}
    run_dir = out / f"seed_{seed}"
    backbone_kwargs = {"width": args.width}
    in_chans = data.input_shape[0]
    pretrain = PretrainModule(
        backbone_kwargs=backbone_kwargs, in_chans=in_chans, export_path=str(run_dir / "base.safetensors")
    )
    quiet_trainer(**hardware, max_epochs=args.pretrain_epochs, limit_val_batches=0).fit(pretrain, data)
    experts = MultiExpertModule(
        backbone_kwargs=backbone_kwargs,
        in_chans=in_chans,
        base_checkpoint=str(run_dir / "base.safetensors"),
        lr=args.lr,
        export_dir=str(run_dir / "experts"),
    )
    trainer = quiet_trainer(**hardware, max_epochs=args.expert_epochs, limit_val_batches=0, default_root_dir=run_dir)
    trainer.fit(experts, data)
    return str(run_dir / "experts")


# --------------------------------------------------------------------------- cached features


@dataclass
class Split:
    """One task's split: inputs, labels and the experts' features ``(K, N, d)``."""

    x: Tensor
    y: Tensor
    features: Tensor


@torch.no_grad()
def cache_splits(bundle: ExpertBundle, skeleton, data: Any) -> dict[str, list[Split]]:
    data.setup("fit")
    splits: dict[str, list[Split]] = {}
    for split in ("train", "val", "test"):
        splits[split] = []
        for t in range(data.num_tasks):
            xs, ys = zip(*data.task_dataloader(t, split, shuffle=False, batch_size=512))
            x, y = torch.cat(xs), torch.cat(ys)
            splits[split].append(Split(x, y, expert_features(skeleton, bundle.experts, x)))
    return splits


def coopvecs(portland: Portland, features: Tensor, eps_star: Tensor, constraint: str) -> Tensor:
    beta = portland(concat_features(features))
    return project_coopvec(beta, eps_star) if constraint == "hard" else beta


def train(
    variant: Variant,
    seed: int,
    train_splits: list[Split],
    val_splits: list[Split],
    ctx: dict,
    batch_size: int,
) -> tuple[Portland, list[dict]]:
    """Portland under ``variant``; returns the selected Portland and the validation history."""
    k, d = train_splits[0].features.shape[0], train_splits[0].features.shape[2]
    portland = Portland(d, k, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(portland.parameters(), lr=variant.lr)
    heads, eps_star = ctx["heads"], ctx["eps_star"]
    order = torch.Generator().manual_seed(10_000 + seed)
    every = max(1, variant.epochs // 5)
    best_state, best_score, history = None, -1.0, []
    for epoch in range(variant.epochs):
        batches = []
        for split in train_splits:
            perm = torch.randperm(split.y.shape[0], generator=order)
            batches.append(perm.split(batch_size))
        longest = max(len(b) for b in batches)
        for i in range(longest):
            for t, split in enumerate(train_splits):
                idx = batches[t][i % len(batches[t])]
                features = split.features[:, idx]
                beta = coopvecs(portland, features, eps_star, variant.constraint)
                logits = heads[t](coopvec_ensemble(features, beta))
                reg = alignment_residual(beta, eps_star)
                loss = neulig_loss(logits, reg, split.y[idx], variant.alignment, variant.scaling)
                total = variant.task_weight * loss.task + loss.alignment / variant.scaling  # α = 0 at inf
                if variant.recognition:
                    task_id = torch.full_like(split.y[idx], t)
                    total = total + variant.recognition * F.nll_loss(beta.clamp_min(1e-12).log(), task_id)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
        if (epoch + 1) % every == 0:
            score = evaluate(portland, val_splits, ctx, "per_batch_first", variant.constraint, batch_size)
            history.append({"epoch": epoch, **score})
            if score["merged"] > best_score:
                best_score = score["merged"]
                best_state = {n: v.clone() for n, v in portland.state_dict().items()}
    if variant.select == "best" and best_state is not None:
        portland.load_state_dict(best_state)
    return portland, history


@torch.no_grad()
def merged_logits(ctx: dict, x: Tensor, beta: Tensor, t: int) -> Tensor:
    return ctx["heads"][t](functional_call(ctx["skeleton"], coopvec_merge(ctx["experts"], beta), (x,), strict=True))


@torch.no_grad()
def evaluate(
    portland: Portland,
    splits: list[Split],
    ctx: dict,
    mode: str,
    constraint: str,
    batch_size: int,
    calibration: list[Split] | None = None,
    mix: float = 0.0,
) -> dict:
    """Mean over tasks of merged and ensembled accuracy, argmax(β) = task rate and mean max β."""
    merged_acc, ens_acc, argmax, top = [], [], [], []
    eps_star = ctx["eps_star"]
    k = splits[0].features.shape[0]
    if mode == "static":
        everything = torch.cat([s.features for s in calibration], dim=1)
        static = coopvecs(portland, everything, eps_star, constraint).mean(0)
    for t, split in enumerate(splits):
        beta = coopvecs(portland, split.features, eps_star, constraint)
        ens_acc.append(
            float((ctx["heads"][t](coopvec_ensemble(split.features, beta)).argmax(1) == split.y).float().mean())
        )
        argmax.append(float((beta.argmax(1) == t).float().mean()))
        top.append(float(beta.max(1).values.mean()))
        if mode == "per_batch_first":
            hits = [
                merged_logits(ctx, split.x[i : i + batch_size], beta[i], t).argmax(1) == split.y[i : i + batch_size]
                for i in range(0, split.y.shape[0], batch_size)
            ]
        elif mode == "per_batch_mean":
            hits = [
                merged_logits(ctx, split.x[i : i + batch_size], beta[i : i + batch_size].mean(0), t).argmax(1)
                == split.y[i : i + batch_size]
                for i in range(0, split.y.shape[0], batch_size)
            ]
        elif mode == "per_sample":
            hits = [
                merged_logits(ctx, split.x[i : i + 1], beta[i], t).argmax(1) == split.y[i : i + 1]
                for i in range(split.y.shape[0])
            ]
        else:
            if mode == "per_task":
                coopvec = coopvecs(portland, calibration[t].features, eps_star, constraint).mean(0)
            elif mode == "static":
                coopvec = static
            elif mode == "oracle":
                coopvec = (1 - mix) * torch.nn.functional.one_hot(torch.tensor(t), k).float() + mix / k
            else:
                raise ValueError(f"unknown mode {mode!r}")
            hits = [merged_logits(ctx, split.x, coopvec, t).argmax(1) == split.y]
            if mode == "oracle":  # the ensembling branch with the same fixed β
                fixed = coopvec.expand(split.y.shape[0], k)
                ens = ctx["heads"][t](coopvec_ensemble(split.features, fixed))
                ens_acc[-1] = float((ens.argmax(1) == split.y).float().mean())
        merged_acc.append(float(torch.cat(hits).float().mean()))
    return {
        "merged": 100 * statistics.fmean(merged_acc),
        "ensembled": 100 * statistics.fmean(ens_acc),
        "argmax_rate": 100 * statistics.fmean(argmax),
        "max_beta": statistics.fmean(top),
    }


def run_seed(seed: int, args: argparse.Namespace, out: Path) -> list[dict]:
    data = make_data(args.dataset, seed, args.batch_size, args.max_per_class)
    bundle_dir = train_experts(seed, out, data, args)
    bundle = ExpertBundle.load(bundle_dir)
    skeleton = bundle.build_backbone().eval().requires_grad_(False)
    heads = bundle.build_heads().eval().requires_grad_(False)
    splits = cache_splits(bundle, skeleton, data)
    ctx = {
        "skeleton": skeleton,
        "heads": heads,
        "experts": bundle.experts,
        "eps_star": modified_offsets(bundle.experts).float(),
    }
    rows, trained = [], {}
    for variant in variants(args.epochs, args.long_epochs):
        start = time.perf_counter()
        key = training_key(variant)
        if key not in trained:
            trained[key] = train(variant, seed, splits["train"], splits["val"], ctx, args.batch_size)
        portland, history = trained[key]
        result = evaluate(
            portland,
            splits["test"],
            ctx,
            variant.mode,
            variant.constraint,
            args.batch_size,
            splits["train"],
            variant.mix,
        )
        gap = result["merged"] - result["ensembled"]
        seconds = time.perf_counter() - start
        rows.append(
            {"variant": variant.name, "seed": seed, **result, "gap": gap, "seconds": seconds, "history": history}
        )
    return rows


# --------------------------------------------------------------------------- report


def summarise(rows: list[dict], names: list[str]) -> list[dict]:
    """Mean ± sd over seeds of every figure, the paired gap (seed-wise merged − ensembled) and
    the paired change of the merged accuracy against the first variant (the demo's recipe)."""
    summary = []
    base = {r["seed"]: r["merged"] for r in rows if r["variant"] == names[0]}
    for name in names:
        mine = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["seed"])
        entry: dict[str, Any] = {"variant": name, "seeds": [r["seed"] for r in mine]}
        for r in mine:
            r["merged_vs_demo"] = r["merged"] - base[r["seed"]]
        for key in ("merged", "ensembled", "gap", "merged_vs_demo", "argmax_rate", "max_beta", "seconds"):
            values = [r[key] for r in mine]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def markdown(summary: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines = [
        f"# NeuLig ablation ({args.dataset}, seeds {' '.join(map(str, args.seeds))})",
        "",
        f"Command: `python benchmarks/neulig_ablation.py --seeds {' '.join(map(str, args.seeds))} "
        f"--dataset {args.dataset} --epochs {args.epochs} --long-epochs {args.long_epochs} --out {args.out} "
        f"--accelerator {args.accelerator}`; "
        f"wall time {wall:.0f} s "
        f"(torch threads: {torch.get_num_threads()}).",
        "",
        "Test accuracy % (mean ± sd over seeds). gap = merged − ensembled, paired by seed. "
        "argmax = share of test samples whose largest β_k is their own task's expert; "
        "max β = mean largest CoopVec entry.",
        "",
        "Portland is selected on the validation split's first-sample merged accuracy in every row, so the "
        "inference rows reuse the recipe's trained Portland (`s / seed`: their evaluation only).",
        "",
        "| variant | merged | ensembled | gap (merged − ens.) | merged − demo recipe | argmax(β) = task | max β "
        "| s / seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        lines.append(
            f"| {e['variant']} | {e['merged']:.1f} ± {e['merged_sd']:.1f} "
            f"| {e['ensembled']:.1f} ± {e['ensembled_sd']:.1f} "
            f"| {e['gap']:+.1f} ± {e['gap_sd']:.1f} | {e['merged_vs_demo']:+.1f} ± {e['merged_vs_demo_sd']:.1f} "
            f"| {e['argmax_rate']:.1f} ± {e['argmax_rate_sd']:.1f} "
            f"| {e['max_beta']:.2f} ± {e['max_beta_sd']:.2f} | {e['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/neulig_ablation"))
    parser.add_argument("--epochs", type=int, default=30, help="Portland epochs of the demo recipe")
    parser.add_argument("--work", type=Path, default=Path("runs/neulig_ablation"), help="experts' bundles")
    parser.add_argument("--long-epochs", type=int, default=1000, help="Portland epochs of the long rows")
    parser.add_argument("--dataset", choices=("digits", "fashion_mnist"), default="digits")
    parser.add_argument("--max-per-class", type=int, default=300, help="fashion_mnist: train images per class")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--expert-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="experts' learning rate")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", type=Path, default=None, help="re-render the tables from this run's json")
    add_hardware_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.render:  # re-render the tables of a finished run (no training)
        payload = json.loads(args.render.read_text())
        rows, wall = payload["runs"], payload["wall_s"]
    else:
        start = time.perf_counter()
        rows = []
        for seed in args.seeds:
            rows += run_seed(seed, args, args.work)
            print(f"seed {seed} done at {time.perf_counter() - start:.0f} s", flush=True)
        wall = time.perf_counter() - start
    names = [v.name for v in variants(args.epochs, args.long_epochs)]
    summary = summarise(rows, names)
    text = markdown(summary, args, wall)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out.with_suffix(".md"), text)
    recorded = {k: str(v) for k, v in vars(args).items()}
    if args.render:
        recorded = {**payload["args"], "rendered_from": str(args.render)}
    payload = {"args": recorded, "wall_s": wall, "summary": summary, "runs": rows}
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
