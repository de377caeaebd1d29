"""Demo scenario: experts trained from different initialisations, merged with and without matching.

The main demo fine-tunes every expert from one pretrained θ₀, so their units correspond and
plain averaging works. Here each of the K experts is trained **from its own random
initialisation** (no shared base), expert t on task t with its own head. The hidden units
of such networks are in arbitrary, unrelated orders, so plain averaging mixes unrelated
features; matching the units first (Ainsworth et al., "Git Re-Basin", ICLR 2023,
https://arxiv.org/abs/2209.04836; Stoica et al., "ZipIt!", ICLR 2024,
https://arxiv.org/abs/2305.03053; Xu et al., "Training-Free Pretrained Model Merging"
(MuDSC), CVPR 2024, https://arxiv.org/abs/2403.01753) is what makes a merge possible.

**Heads.** The per-task heads sit outside the merged backbone. A matching merges the
backbone's output units too (the :func:`feature_spec` adds that node), so the merged
features ``f'`` (``(B, d)``) are in the merged unit order: head t, trained on expert t's
features ``f_t``, reads them through expert t's unmerge matrix ``U_t`` (``[d, d]``) of
that node, ``W_t ← W_t U_t`` (``f_t ≈ U_t f'``; for alignment ``U_t`` is a
permutation). Plain averaging has no matching and keeps the heads as they are.

**Variance collapse and REPAIR.** Averaging matched units shrinks the merged
pre-activations' variance layer by layer; every matching is run twice, uncorrected and
with REPAIR (``MuDSC(repair="repair")``, :mod:`merging.alignment.repair`), and every
merge row carries :func:`~merging.alignment.repair.variance_ratios` (``diag/...`` keys).

**What is reported.** Each merge is evaluated per task with the task's (transformed) head.
The reference is every expert on its own task ("experts (own task)"): the features of
differently initialised experts are not aligned, so the main demo's feature ensemble has
no meaning here.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor, nn
from torch.func import functional_call

from merging.alignment import (
    ActPoint,
    MatchResult,
    PermEntry,
    PermNode,
    PermSpec,
    build_spec,
    match_models,
    merge_state_dicts,
)
from merging.alignment.repair import variance_ratios
from merging.datamodules import DigitsTasks, MultiTaskDataModule
from merging.experiments.trainers import add_hardware_arguments, quiet_trainer
from merging.io import write_text_atomic
from merging.methods.mudsc import MuDSC
from merging.models import build_backbone
from merging.modules import MultiExpertModule
from merging.report import accuracy_table, summarise
from merging.state import StateDict, average_states, check_compatible

#: Name of the node :func:`feature_spec` adds for the backbone's output units.
FEATURE_NODE = "output"

#: Suffix of the label of a merge corrected with REPAIR.
REPAIR_SUFFIX = " + REPAIR"

_MATCHINGS: dict[str, dict[str, Any]] = {
    "weight matching (Re-Basin)": {"mode": "align", "use_activation": False},
    "activation matching": {"mode": "align", "use_weight": False},
    "MuDSC-Align": {"mode": "align"},
    "ZipIt": {"mode": "zip", "use_weight": False},
    "MuDSC-Zip": {"mode": "zip"},
}

#: The merges of the scenario: label -> MuDSC hyperparameters (None: plain averaging).
#: Every matching appears twice: uncorrected (``repair="none"``; SmallCNN has no BatchNorm,
#: so ``"reset_bn"`` would be the same) and with REPAIR (label + :data:`REPAIR_SUFFIX`).
DIFFERENT_INIT_MERGES: dict[str, dict[str, Any] | None] = {
    "average": None,
    **{
        label + suffix: {**hparams, "repair": repair}
        for label, hparams in _MATCHINGS.items()
        for suffix, repair in (("", "none"), (REPAIR_SUFFIX, "repair"))
    },
}

#: Row key of the smallest per-layer variance ratio of a merge (see :func:`variance_ratios`).
VAR_RATIO_MIN = "diag/var_ratio_min"

#: Label of the reference row: expert t evaluated on its own task t with its own head.
EXPERTS_LABEL = "experts (own task)"

_PASSTHROUGH = (nn.ReLU, nn.GELU, nn.Identity, nn.Dropout)


def feature_spec(backbone: nn.Module) -> PermSpec:
    """The backbone's spec (:func:`~merging.alignment.build_spec`) plus its output units.

    :func:`~merging.alignment.build_spec` never permutes a model's output units (its
    interface). A backbone read by heads outside it needs them matched as well, so this adds
    one node, :data:`FEATURE_NODE`, for the last Linear layer's outputs (weight rows and
    bias), measured at the backbone's output (``(B, d)``, a forward hook on the backbone).

    Args:
        backbone: a feed-forward chain whose last layer is an ``nn.Linear`` producing the
            features, followed only by element-wise activations or dropout
            (:class:`~merging.models.SmallCNN`, :class:`~merging.models.MLP`).

    Raises:
        ValueError: the backbone does not end in such a Linear layer (the module is named).
    """
    spec = build_spec(backbone)
    leaves = [(name, m) for name, m in backbone.named_modules() if not list(m.children())]
    last = None
    for name, module in reversed(leaves):
        if isinstance(module, nn.Linear):
            last = (name, module)
            break
        if not isinstance(module, _PASSTHROUGH):
            raise ValueError(
                f"feature_spec: {type(backbone).__name__} ends in {name!r} ({type(module).__name__}) "
                "after its last Linear layer; only element-wise activations and dropout may follow it"
            )
    if last is None:
        raise ValueError(f"feature_spec: {type(backbone).__name__} has no Linear layer producing its features")
    name, linear = last
    entries = [PermEntry(f"{name}.weight", 0)]
    if linear.bias is not None:
        entries.append(PermEntry(f"{name}.bias", 0))
    node = PermNode(FEATURE_NODE, linear.out_features, tuple(entries), act=ActPoint("", "post", (1,)))
    return PermSpec([*spec.values(), node])


def transform_heads(heads: Sequence[Mapping[str, Tensor]], result: MatchResult) -> list[StateDict]:
    """Head t reads the merged features through expert t's unmerge matrix: ``W_t ← W_t U_t``.

    Args:
        heads: head t as ``{"weight": (C_t, d), "bias": (C_t,)}``, trained on expert t.
        result: the matching of the K experts' backbones (with the :data:`FEATURE_NODE` node).

    Raises:
        ValueError: the matching has no :data:`FEATURE_NODE` node, or K differs from the heads.
    """
    if FEATURE_NODE not in result.matchings:
        raise ValueError(f"the matching has no {FEATURE_NODE!r} node: solve it with feature_spec(backbone)")
    matching = result.matchings[FEATURE_NODE]
    if matching.num_models != len(heads):
        raise ValueError(f"{len(heads)} heads for a matching of {matching.num_models} experts")
    out = []
    for t, head in enumerate(heads):
        unmerge = matching.unmerge_block(t).to(device=head["weight"].device, dtype=head["weight"].dtype)
        out.append({"weight": head["weight"] @ unmerge, "bias": head["bias"].clone()})
    return out


def merge_with_heads(
    method: MuDSC,
    experts: Sequence[Mapping[str, Tensor]],
    heads: Sequence[Mapping[str, Tensor]],
    *,
    model: nn.Module,
    data: Iterable[Any],
) -> tuple[StateDict, list[StateDict]]:
    """Merge K backbones with MuDSC and move each task's head into the merged feature order.

    The backbone equals ``method.merge(experts, model=model, data=data)`` with the same
    spec: one matching is solved and used for both the backbone and the heads.

    Args:
        method: the MuDSC settings. Its ``spec`` must include :data:`FEATURE_NODE`; None
            uses :func:`feature_spec` of ``model``.
        experts: θ_1..θ_K, keyed like ``model.state_dict()``.
        heads: head t of expert t, ``{"weight": (C_t, d), "bias": (C_t,)}``.
        model: the backbone skeleton.
        data: unlabeled input batches (re-iterable: a DataLoader or a list).

    Returns:
        The merged backbone state dict and the transformed heads.

    Raises:
        ValueError: a spec without :data:`FEATURE_NODE`, one head per expert missing, or
            what :meth:`MuDSC.merge` rejects.
    """
    experts = list(experts)
    spec = method.spec if method.spec is not None else feature_spec(model)
    if FEATURE_NODE not in spec:
        raise ValueError(f"the spec has no {FEATURE_NODE!r} node for the heads' inputs: use feature_spec(model)")
    if len(heads) != len(experts):
        raise ValueError(f"{len(heads)} heads for {len(experts)} experts: expert t needs its head t")
    method.check_inputs(experts, None, model, data)
    check_compatible(experts)
    result = match_models(experts, spec, method.config(), model=model, data=data)
    merged = merge_state_dicts(experts, spec, result.matchings)
    merged = method.correct(model, experts, merged, spec, result.matchings, data)
    return merged, transform_heads(heads, result)


@torch.no_grad()
def task_accuracy(
    backbone: nn.Module,
    state: Mapping[str, Tensor],
    head: Mapping[str, Tensor],
    loader: Iterable[tuple[Tensor, Tensor]],
) -> float:
    """Accuracy of ``head(backbone(x; state))`` over ``(x, y)`` batches.

    Args:
        backbone: the skeleton, in eval mode.
        state: the backbone's parameters, substituted with ``functional_call``.
        head: ``{"weight": (C, d), "bias": (C,)}``.
        loader: batches ``x: (B, *input_shape)``, ``y: (B,)``.
    """
    correct = total = 0
    device = head["weight"].device
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = F.linear(functional_call(backbone, dict(state), (x,)), head["weight"], head["bias"])
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
    return correct / total


def train_different_init_experts(
    data: MultiTaskDataModule,
    seed: int,
    *,
    epochs: int,
    lr: float,
    width: int = 16,
    backbone_kwargs: Mapping[str, Any] | None = None,
    accelerator: str = "cpu",
    devices: int | str = 1,
) -> MultiExpertModule:
    """K experts trained jointly, expert t on task t with its head, each from its **own**
    random initialisation (drawn with ``torch.manual_seed(1000·seed + t)``; the global RNG
    is left as it was). The module is returned on the device it was trained on.

    The backbone is a SmallCNN built with ``backbone_kwargs`` (default ``{"width": width}``)
    and ``in_chans`` from the data's input shape."""
    pl.seed_everything(seed, verbose=False)
    module = MultiExpertModule(
        backbone_kwargs=dict(backbone_kwargs) if backbone_kwargs is not None else {"width": width},
        in_chans=data.input_shape[0],
        task_names=data.task_names,
        num_classes=data.num_classes,
        lr=lr,
    )
    for t, expert in enumerate(module.experts):
        with torch.random.fork_rng():
            torch.manual_seed(1000 * seed + t)
            fresh = build_backbone(module.backbone_name, in_chans=module.in_chans, **module.backbone_kwargs)
        expert.load_state_dict(fresh.state_dict(), strict=True)
    trainer = quiet_trainer(accelerator, devices, max_epochs=epochs, limit_val_batches=0)
    trainer.fit(module, data)
    return module.to(trainer.strategy.root_device).eval()


def run_different_init_seed(
    seed: int,
    *,
    epochs: int = 10,
    lr: float = 3e-3,
    width: int = 16,
    batch_size: int = 32,
    unlabeled_samples: int = 256,
    merges: Mapping[str, dict[str, Any] | None] = DIFFERENT_INIT_MERGES,
    step: Callable[[str], None] | None = None,
    accelerator: str = "cpu",
    devices: int | str = 1,
    data: MultiTaskDataModule | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One seed: train the experts, merge them every way, evaluate each task with its head.

    The arguments are those of :func:`different_init_scenario`; ``seed`` seeds the data
    split, the training order, the experts' initialisations and MuDSC's node order.

    Args:
        data: the tasks (any :class:`~merging.datamodules.MultiTaskDataModule`, e.g.
            ``FashionMNISTTasks``); None: ``DigitsTasks(seed=seed, batch_size=batch_size)``.
            ``batch_size`` is not applied to a given datamodule.
        backbone_kwargs: the SmallCNN's constructor arguments; None: ``{"width": width}``.

    Returns:
        One row per model: ``{"model", "seed", "test/acc/<task>", "test/acc_mean"}``; merges
        add ``"test/merge_seconds"``, ``"diag/var_ratio/<layer>"`` (the merged
        pre-activations' variance against the experts' on the unlabeled inputs, per Linear
        and convolution, :func:`~merging.alignment.repair.variance_ratios`) and
        :data:`VAR_RATIO_MIN`, their minimum over layers.
    """
    if data is None:
        data = DigitsTasks(seed=seed, batch_size=batch_size)
    module = train_different_init_experts(
        data,
        seed,
        epochs=epochs,
        lr=lr,
        width=width,
        backbone_kwargs=backbone_kwargs,
        accelerator=accelerator,
        devices=devices,
    )
    if step is not None:
        step("experts trained")
    skeleton = module.skeleton.eval()
    experts = [{k: v.detach().clone() for k, v in s.items()} for s in module.expert_state_dicts()]
    heads = [{k: v.detach().clone() for k, v in h.state_dict().items()} for h in module.heads]
    unlabeled = data.unlabeled_dataloader(num_samples=unlabeled_samples, seed=seed)
    loaders = [data.task_dataloader(t, "test") for t in range(data.num_tasks)]

    def row(label: str, states: Sequence[Mapping[str, Tensor]], task_heads: Sequence[Mapping[str, Tensor]]) -> dict:
        accs = [task_accuracy(skeleton, states[t], task_heads[t], loaders[t]) for t in range(data.num_tasks)]
        out: dict[str, Any] = {"model": label, "seed": seed}
        out.update({f"test/acc/{name}": acc for name, acc in zip(data.task_names, accs)})
        out["test/acc_mean"] = statistics.fmean(accs)
        return out

    rows = [row(EXPERTS_LABEL, experts, heads)]
    spec = feature_spec(skeleton)
    for label, hparams in merges.items():
        start = time.perf_counter()
        if hparams is None:
            merged, merged_heads = average_states(experts), heads
        else:
            method = MuDSC(spec=spec, seed=seed, **hparams)
            merged, merged_heads = merge_with_heads(method, experts, heads, model=skeleton, data=unlabeled)
        seconds = time.perf_counter() - start
        ratios = variance_ratios(skeleton, experts, merged, unlabeled)
        diag = {f"diag/var_ratio/{layer}": r for layer, r in ratios.items()}
        diag[VAR_RATIO_MIN] = min(ratios.values())
        rows.append({**row(label, [merged] * data.num_tasks, merged_heads), "test/merge_seconds": seconds, **diag})
        if step is not None:
            step(f"merged: {label}")
    return rows


def variance_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd over seeds of every ``diag/...`` key, per merge (first-seen order).

    Args:
        rows: the rows of :func:`run_different_init_seed`; rows without ``diag/`` keys
            (the experts) are left out.

    Returns:
        One dict per merge: ``{"model", "seeds", "<key>", "<key>_sd", ...}``.
    """
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if VAR_RATIO_MIN in row:
            by_model.setdefault(row["model"], []).append(row)
    out = []
    for model, group in by_model.items():
        entry: dict[str, Any] = {"model": model, "seeds": len(group)}
        for key in (k for k in group[0] if k.startswith("diag/")):
            values = [r[key] for r in group if key in r]
            entry[key] = statistics.fmean(values)
            entry[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def variance_markdown(diagnostics: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of :func:`variance_summary`: per merge, each layer's variance ratio
    and the minimum over layers (mean ± sd over seeds)."""
    if not diagnostics:
        return ""
    prefix = "diag/var_ratio/"
    layers = [k[len(prefix) :] for k in diagnostics[0] if k.startswith(prefix) and not k.endswith("_sd")]
    lines = [
        "Variance of the merged pre-activations against the experts' (per layer, mean over units / mean over "
        "experts and units, on the unlabeled inputs; 1 = scale kept):\n",
        "| model | " + " | ".join(layers) + " | min |",
        "|---" * (len(layers) + 2) + "|",
    ]
    for entry in diagnostics:
        cells = [f"{entry[k]:.3f} ± {entry[k + '_sd']:.3f}" for k in [prefix + layer for layer in layers]]
        cells.append(f"{entry[VAR_RATIO_MIN]:.3f} ± {entry[VAR_RATIO_MIN + '_sd']:.3f}")
        lines.append(f"| {entry['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def different_init_scenario(
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    epochs: int = 10,
    lr: float = 3e-3,
    width: int = 16,
    batch_size: int = 32,
    unlabeled_samples: int = 256,
    merges: Mapping[str, dict[str, Any] | None] = DIFFERENT_INIT_MERGES,
    step: Callable[[str], None] | None = None,
    accelerator: str = "cpu",
    devices: int | str = 1,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Table]:
    """Run the scenario over ``seeds`` and write ``different_init.{md,json}`` to ``out_dir``.

    Per seed, K = 4 SmallCNN experts are trained on :class:`~merging.datamodules.DigitsTasks`'
    class-split tasks, expert t on task t from its own initialisation, then merged with
    every entry of ``merges`` (see :data:`DIFFERENT_INIT_MERGES`).

    Args:
        seeds: one run per seed (data split, training order, initialisations, node order).
        out_dir: folder of the result files (written atomically).
        epochs: training epochs of the experts.
        lr: AdamW learning rate.
        width: SmallCNN width of the first block.
        batch_size: training batch size per task.
        unlabeled_samples: unlabeled training inputs for the activation statistics.
        merges: label -> MuDSC hyperparameters, or None for plain averaging.
        step: called with a short description after each stage (progress bars).
        accelerator: where the experts train, are merged and evaluated (Lightning's
            accelerator name; the merges and evaluation follow the trained module).
        devices: Lightning's devices for the training.

    Returns:
        The per-seed rows, the summary (mean ± sd over seeds) and the rich table.

    Raises:
        ValueError: no seeds.
    """
    if not seeds:
        raise ValueError("different_init_scenario needs at least one seed")
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        rows += run_different_init_seed(
            seed,
            epochs=epochs,
            lr=lr,
            width=width,
            batch_size=batch_size,
            unlabeled_samples=unlabeled_samples,
            merges=merges,
            step=step,
            accelerator=accelerator,
            devices=devices,
        )
    task_names = DigitsTasks().task_names
    paired = {"vs_average": "average"} if "average" in merges else None
    summary = summarise(rows, reference=EXPERTS_LABEL, gap_key="gap_to_experts", paired=paired)
    table, markdown = accuracy_table(
        summary,
        task_names,
        title="Experts from different initialisations: accuracy % (mean ± sd over seeds; gaps paired by seed)",
        gap_key="gap_to_experts",
        gap_label="gap to experts",
        more_gaps=[("vs_average", "vs average")] if paired else (),
    )
    diagnostics = variance_summary(rows)
    out_dir = Path(out_dir)
    header = (
        "# Experts from different initialisations\n\n"
        f"SmallCNN (width {width}) experts, each trained {epochs} epochs on one class-split digits task "
        f"from its own random initialisation (no shared base); seeds {list(seeds)} (mean ± sd). "
        "Merges read each task with its own head, moved into the merged feature order; "
        f"activations from {unlabeled_samples} unlabeled training inputs. "
        "The reference is each expert on its own task.\n\n"
    )
    write_text_atomic(out_dir / "different_init.md", header + markdown + "\n" + variance_markdown(diagnostics))
    config = {
        "seeds": list(seeds),
        "epochs": epochs,
        "lr": lr,
        "width": width,
        "batch_size": batch_size,
        "unlabeled_samples": unlabeled_samples,
        "merges": dict(merges),
    }
    payload = {"config": config, "summary": summary, "variance_ratios": diagnostics, "runs": rows}
    write_text_atomic(out_dir / "different_init.json", json.dumps(payload, indent=2) + "\n")
    return rows, summary, table


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``python -m merging.experiments.scenarios``: the scenario alone (``make demo`` runs it too)."""
    import argparse
    import logging
    import warnings

    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=16, help="SmallCNN width of the first block")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest for these tiny models)")
    add_hardware_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    console = Console()
    start = time.perf_counter()
    _, summary, table = different_init_scenario(
        args.seeds, args.out, epochs=args.epochs, width=args.width, accelerator=args.accelerator, devices=args.devices
    )
    console.print(table)
    console.print(f"{time.perf_counter() - start:.1f} s; written to {args.out}/different_init.{{md,json}}")
    return summary


if __name__ == "__main__":
    main()
