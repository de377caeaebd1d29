"""The weight-averaging diagnostics of *Rethinking Weight-Averaged Model-merging* (arXiv
2411.09263) on scikit-learn's bundled digits (no download), in seconds on a CPU.

:func:`run_diagnostics` trains the models (:class:`DigitsClassifier`, a shared pretext-task
backbone from :func:`pretrain_backbone`, fine-tuned copies from :func:`finetune_models`, two
linear classifiers for the templates), runs the analyses of :mod:`merging.diagnostics` on
them and writes ``diagnostics.md``/``.csv`` and PNG plots. ``merging diagnose --out
runs/diagnostics`` (or ``python -m merging.experiments.diagnostics``) is its command line.

The digits are split 70/30 into train/test by one seeded permutation of all 1797 images
(:func:`load_digits_split`); the models train in the permutation's order.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from merging.diagnostics import (
    AveragingReport,
    ScalingReport,
    TemplateReport,
    class_mean_images,
    collect_outputs,
    magnitude_stability,
    minmax,
    template_mosaic,
    weight_template_report,
    weight_vs_feature_averaging,
)
from merging.experiments.training import train_sgd
from merging.io import write_atomic, write_text_atomic
from merging.models import build_backbone
from merging.state import StateDict, average_states

log = logging.getLogger(__name__)


class DigitsClassifier(nn.Module):
    """A backbone from :func:`merging.models.build_backbone` and a linear ``head``.

    Args:
        arch: ``"mlp"`` or ``"small_cnn"`` (both take ``(B, 1, 8, 8)`` inputs).
        num_classes: C.
        width: the feature size d (MLP: also its hidden width; CNN: d/8 channels in the first
            block); None: 64 for the MLP, 128 for the CNN.
    """

    def __init__(self, arch: str = "mlp", num_classes: int = 10, width: int | None = None) -> None:
        super().__init__()
        width = width or {"mlp": 64, "small_cnn": 128}.get(arch, 64)
        if arch == "mlp":
            self.backbone = build_backbone("mlp", in_features=64, hidden=width, depth=2)
        elif arch == "small_cnn":
            self.backbone = build_backbone("small_cnn", in_chans=1, width=width // 8, depth=2, num_features=width)
        else:
            raise ValueError(f"arch must be 'mlp' or 'small_cnn', got {arch!r}")
        self.head = nn.Linear(self.backbone.num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 1, 8, 8)`` -> logits ``(B, C)``."""
        return self.head(self.backbone(x))


def load_digits_split(seed: int = 0, test_fraction: float = 0.3) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled digits (1797 images, no download) as ``(1, 8, 8)`` images in [0, 1],
    split into (train, test) by a seeded permutation, each split in the permutation's order.

    The images and their scaling are those of :class:`~merging.datamodules.DigitsTasks`; its
    split is not: it always holds out a validation share, draws it before the test share,
    and sorts each split, which changes the test set and the order SGD sees the samples in
    (so every number of the diagnostics); this split gives the numbers in the README.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).div(16.0).unsqueeze(1)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(labels)))
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


@dataclass
class DiagnosticsResult:
    """What :func:`run_diagnostics` measured and wrote.

    Attributes:
        table: rows ``{"analysis", "setting", "combination", "value"}``.
        averaging: per (arch, init) the :class:`AveragingReport`.
        scaling: per (arch, init) the :class:`ScalingReport`.
        templates: the linear classifier's :class:`TemplateReport`.
        files: the files written.
    """

    table: list[dict[str, str]]
    averaging: dict[str, AveragingReport]
    scaling: dict[str, ScalingReport]
    templates: TemplateReport
    files: list[Path]


def step_decay(steps_per_epoch: int, epochs: int, lr: float, gamma: float = 0.2) -> Callable[[int], float]:
    """η_t: ``lr`` multiplied by ``gamma`` at 50% and again at 80% of the epochs (the paper's
    milestones 20/40 of 50 epochs, as fractions)."""

    def lr_at(step: int) -> float:
        epoch = step // steps_per_epoch
        return lr * gamma ** ((epoch >= 0.5 * epochs) + (epoch >= 0.8 * epochs))

    return lr_at


def finetune_sgd(
    factory: Callable[[], nn.Module], dataset: Dataset, *, lr: float, epochs: int, batch_size: int, seed: int
) -> StateDict:
    """Fine-tune a classifier with the paper's recipe: cross-entropy, SGD with momentum 0.9 and
    weight decay 5e-4, and :func:`step_decay` (final weights). Returns the state dict."""
    schedule = step_decay(-(-len(dataset) // batch_size), epochs, lr)
    state, _ = train_sgd(
        factory,
        nn.functional.cross_entropy,
        dataset,
        lr=schedule,
        batch_size=batch_size,
        epochs=epochs,
        momentum=0.9,
        weight_decay=5e-4,
        seed=seed,
    )
    return state


def pretrain_backbone(
    arch: str, train: TensorDataset, *, epochs: int, lr: float, batch_size: int, seed: int
) -> StateDict:
    """The shared "pre-trained" backbone: trained on a 4-class pretext task of the digits
    (digit parity × digit ≥ 5), so fine-tuning on the 10 classes starts from useful but
    not task-specific features. Returns the backbone's state dict (no head)."""
    x, y = train.tensors
    pretext = TensorDataset(x, 2 * (y % 2) + (y >= 5).long())
    state, _ = train_sgd(
        lambda: DigitsClassifier(arch, num_classes=4),
        nn.functional.cross_entropy,
        pretext,
        lr=lr,
        batch_size=batch_size,
        epochs=epochs,
        momentum=0.9,
        seed=seed,
    )
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def finetune_models(
    arch: str,
    train: TensorDataset,
    backbone: Mapping[str, Tensor] | None,
    *,
    num_models: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> tuple[list[StateDict], TensorDataset]:
    """M digit classifiers, model m with its own seed (head init, data order, 90/10 train/val
    split), from ``backbone`` when given, else from its own random init.

    Returns:
        ``(states, validation set)``: the union of the models' own validation splits serves
        as the held-out set of the greedy selections.
    """
    states, val_x, val_y = [], [], []
    for m in range(num_models):
        model_seed = seed + 1000 * (m + 1)
        x, y = train.tensors
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(model_seed))
        n_val = len(y) // 10
        fit = TensorDataset(x[perm[n_val:]], y[perm[n_val:]])
        val_x.append(x[perm[:n_val]])
        val_y.append(y[perm[:n_val]])

        def factory() -> nn.Module:
            net = DigitsClassifier(arch)
            if backbone is not None:
                net.backbone.load_state_dict(backbone, strict=True)
            return net

        states.append(finetune_sgd(factory, fit, lr=lr, epochs=epochs, batch_size=batch_size, seed=model_seed))
    return states, TensorDataset(torch.cat(val_x), torch.cat(val_y))


def run_diagnostics(
    out_dir: str | Path,
    *,
    num_models: int = 5,
    archs: Sequence[Literal["mlp", "small_cnn"]] = ("mlp", "small_cnn"),
    inits: Sequence[Literal["shared", "independent"]] = ("shared", "independent"),
    epochs: int = 10,
    pretrain_epochs: int = 5,
    lr: float = 0.15,
    batch_size: int = 64,
    magnitude: float = 100.0,
    seed: int = 0,
    num_threads: int | None = 1,
) -> DiagnosticsResult:
    """Run the three analyses on scikit-learn's digits and write tables and plots to ``out_dir``.

    Set-up (a CPU-seconds proxy of the paper's CIFAR runs): a 70/30 train/test split. For
    ``init="shared"`` a backbone is first pre-trained on a pretext task
    (:func:`pretrain_backbone`), then ``num_models`` models are fine-tuned from it on the 10
    classes, each with its own seed (:func:`finetune_models`), as in the paper's code (same
    pre-trained init, different seeds). For ``init="independent"`` each model starts from its
    own random initialisation: the contrast shows when weight averaging works. SGD with
    momentum 0.9 and a step decay (:func:`step_decay`); the final weights are used (the
    paper keeps the best validation checkpoint). The linear-template analysis trains two
    ``Linear(64 -> 10)`` classifiers (different seeds) on raw [0, 1] pixels.

    Writes ``diagnostics.md``, ``diagnostics.csv``, ``weight_vs_feature.png``,
    ``magnitude_stability.png`` and ``templates.png`` (atomically).

    Args:
        out_dir: output folder (created).
        num_models: M.
        archs: backbones to compare.
        inits: ``"shared"`` (fine-tuned from one pre-trained backbone) and/or ``"independent"``.
        epochs: fine-tuning epochs.
        pretrain_epochs: pretext-task epochs of the shared backbone.
        lr: SGD learning rate.
        batch_size: b.
        magnitude: c of the scaling analysis.
        seed: the seed everything derives from.
        num_threads: torch CPU threads during the run (the previous setting is restored
            after). Models this small run fastest on one thread; None keeps the current setting.

    Returns:
        :class:`DiagnosticsResult`.

    Raises:
        ValueError: fewer than two models, or no / an unknown arch or init.
    """
    if num_models < 2:
        raise ValueError(f"num_models must be at least 2 to average, got {num_models}")
    if not archs or any(a not in ("mlp", "small_cnn") for a in archs):
        raise ValueError(f"archs must be a non-empty selection of 'mlp' and 'small_cnn', got {list(archs)}")
    if not inits or any(i not in ("shared", "independent") for i in inits):
        raise ValueError(f"inits must be a non-empty selection of 'shared' and 'independent', got {list(inits)}")
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run_diagnostics(
            Path(out_dir), num_models, archs, inits, epochs, pretrain_epochs, lr, batch_size, magnitude, seed
        )
    finally:
        torch.set_num_threads(threads)


def _run_diagnostics(
    out_dir: Path,
    num_models: int,
    archs: Sequence[str],
    inits: Sequence[str],
    epochs: int,
    pretrain_epochs: int,
    lr: float,
    batch_size: int,
    magnitude: float,
    seed: int,
) -> DiagnosticsResult:
    train, test = load_digits_split(seed)
    test_loader = DataLoader(test, batch_size=512)
    table: list[dict[str, str]] = []
    averaging: dict[str, AveragingReport] = {}
    scaling: dict[str, ScalingReport] = {}
    hyper = {"lr": lr, "batch_size": batch_size, "seed": seed}
    for arch in archs:
        skeleton = DigitsClassifier(arch)
        backbone = pretrain_backbone(arch, train, epochs=pretrain_epochs, **hyper) if "shared" in inits else None
        for init in inits:
            log.info("diagnostics: training %d %s models (%s init)", num_models, arch, init)
            states, val = finetune_models(
                arch, train, backbone if init == "shared" else None, num_models=num_models, epochs=epochs, **hyper
            )
            val_loader = DataLoader(val, batch_size=512)
            setting = f"{arch}, {init} init"
            avg = averaging[setting] = weight_vs_feature_averaging(skeleton, states, test_loader, val_loader)
            for name, value in avg.rows():
                table.append(_row("weight vs feature", setting, name, value))
            table.append(_row("weight vs feature", setting, "soup/ensemble agreement", avg.soup_ensemble_agreement))
            table.append(_row("weight vs feature", setting, "mean ‖f_soup − mean_m f_m‖", avg.soup_feature_distance))
            sc = scaling[setting] = magnitude_stability(skeleton, states, test_loader, val_loader, magnitude=magnitude)
            analysis = f"scaling ×{magnitude:g}"
            for r in sc.rows:
                table.append(_row(analysis, setting, f"{r.scenario} / {r.combiner}", r.accuracy))
                if r.scenario != "none":
                    table.append(_row(analysis, setting, f"{r.scenario} / {r.combiner} flip rate", r.flip_rate))
    templates, means, rows = _linear_templates(train, test_loader, seed)
    table += rows
    files = _write_outputs(out_dir, table, averaging, scaling, templates, means, magnitude)
    return DiagnosticsResult(table=table, averaging=averaging, scaling=scaling, templates=templates, files=files)


def _row(analysis: str, setting: str, combination: str, value: float) -> dict[str, str]:
    return {"analysis": analysis, "setting": setting, "combination": combination, "value": f"{value:.4f}"}


class _LinearClassifier(nn.Module):
    """Linear(64 -> 10) on flattened images; the whole model is its ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x.flatten(1))


def _linear_templates(
    train: TensorDataset, test_loader: DataLoader, seed: int
) -> tuple[TemplateReport, Tensor, list[dict[str, str]]]:
    """Two linear classifiers (different seeds), their soup, and the first one's templates.

    SGD lr 0.01 with momentum 0.9 as in the paper's code; weight decay 1e-3 instead of its
    0.1, which on 64 inputs (not 3072) shrinks the weights to noise."""
    states = [
        train_sgd(
            _LinearClassifier,
            nn.functional.cross_entropy,
            train,
            lr=0.01,
            batch_size=64,
            epochs=30,
            momentum=0.9,
            weight_decay=1e-3,
            seed=seed + s,
        )[0]
        for s in (1, 2)
    ]
    skeleton = _LinearClassifier()
    accs = [collect_outputs(skeleton, s, test_loader).accuracy() for s in states]
    soup_acc = collect_outputs(skeleton, average_states(states), test_loader).accuracy()
    means = class_mean_images(*train.tensors, num_classes=10)
    report = weight_template_report(states[0]["head.weight"], (1, 8, 8), means, pairs=[(i, i + 5) for i in range(5)])
    between = nn.functional.cosine_similarity(states[0]["head.weight"], states[1]["head.weight"], dim=1)
    setting = "linear 64→10"
    rows = [
        _row("templates", setting, "seed A accuracy", accs[0]),
        _row("templates", setting, "seed B accuracy", accs[1]),
        _row("templates", setting, "soup (A+B)/2 accuracy", soup_acc),
        _row("templates", setting, "mean cos(template A, template B)", float(between.mean())),
        _row("templates", setting, "mean cos(template, class mean − global mean)", float(report.class_cosine.mean())),
    ]
    return report, means, rows


def _table_markdown(table: list[dict[str, str]]) -> str:
    lines = ["| analysis | setting | combination | value |", "|---|---|---|---|"]
    lines += [f"| {r['analysis']} | {r['setting']} | {r['combination']} | {r['value']} |" for r in table]
    return "\n".join(lines)


def template_figure(report: TemplateReport, class_means: Tensor | None = None):
    """A matplotlib ``Figure`` of one mosaic: the templates (first row), the class-mean images
    (second row, if given), the mix-ups (last row). Channels-first; 1 channel is drawn in gray."""
    from matplotlib.figure import Figure

    shape = tuple(report.templates.shape[1:])
    rows = [("templates w_c", list(report.templates))]
    if class_means is not None:
        rows.append(("class means", list(minmax(class_means.reshape(-1, *shape)))))
    title = "linear-classifier templates (each min-max stretched)"
    if report.mixups:
        rows.append(("mix-ups", list(report.mixups.values())))
        title += "\nmix-ups: 0.5·w_i + 0.5·w_j for " + ", ".join(f"({i},{j})" for i, j in report.mixups)
    mosaic = template_mosaic([images for _, images in rows])
    fig = Figure(figsize=(0.6 * max(len(r) for _, r in rows) + 1.5, 0.7 * len(rows) + 0.6))
    ax = fig.add_axes((0.14, 0.1, 0.85, 0.8))
    image = mosaic[0] if mosaic.shape[0] == 1 else mosaic.permute(1, 2, 0)
    ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([(r + 0.5) * (shape[1] + 1) for r in range(len(rows))], [label for label, _ in rows], fontsize=6)
    ax.set_xticks(
        [(k + 0.5) * (shape[2] + 1) for k in range(len(report.templates))], range(len(report.templates)), fontsize=6
    )
    ax.set_title(title, fontsize=8)
    return fig


def _write_outputs(
    out: Path,
    table: list[dict[str, str]],
    averaging: Mapping[str, AveragingReport],
    scaling: Mapping[str, ScalingReport],
    templates: TemplateReport,
    means: Tensor,
    magnitude: float,
) -> list[Path]:
    from matplotlib.figure import Figure

    text = "\n".join(
        [
            "# Weight-averaging diagnostics on scikit-learn digits",
            "",
            "Analyses of *Rethinking Weight-Averaged Model-merging* (arXiv 2411.09263) on a CPU-sized proxy:",
            "weight vs feature averaging, parameter scaling (every floating tensor × c), linear-classifier templates.",
            "Accuracies are top-1 on the held-out 30% of the digits; flip rate: predictions changed by the scaling.",
            "",
            _table_markdown(table),
            "",
        ]
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["analysis", "setting", "combination", "value"])
    writer.writeheader()
    writer.writerows(table)
    files = [
        write_text_atomic(out / "diagnostics.md", text),
        write_text_atomic(out / "diagnostics.csv", buffer.getvalue()),
    ]

    fig = Figure(figsize=(3.2 * max(1, len(averaging)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(averaging)), squeeze=False)[0]
    for ax, (setting, report) in zip(axes, averaging.items(), strict=True):
        rows = report.rows()[::-1]
        ax.barh([name.split(" (members")[0] for name, _ in rows], [value for _, value in rows], color="C0")
        ax.set(xlim=(0, 1), xlabel="test accuracy", title=setting)
        ax.tick_params(axis="y", labelsize=6)
    files.append(out / "weight_vs_feature.png")
    write_atomic(files[-1], lambda tmp: fig.savefig(tmp, format="png", dpi=110))

    fig = Figure(figsize=(3.2 * max(1, len(scaling)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(scaling)), squeeze=False)[0]
    for ax, (setting, report) in zip(axes, scaling.items(), strict=True):
        labels = [f"{r.scenario} / {r.combiner}" for r in report.rows]
        ax.barh(labels[::-1], [r.accuracy for r in report.rows][::-1], color="C1")
        ax.set(xlim=(0, 1), xlabel="test accuracy", title=f"{setting}, ×{magnitude:g}")
        ax.tick_params(axis="y", labelsize=6)
    files.append(out / "magnitude_stability.png")
    write_atomic(files[-1], lambda tmp: fig.savefig(tmp, format="png", dpi=110))

    fig = template_figure(templates, means)
    files.append(out / "templates.png")
    write_atomic(files[-1], lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return files


def main(argv: Sequence[str] | None = None) -> DiagnosticsResult:
    """``merging diagnose --out runs/diagnostics`` (or ``python -m merging.experiments.diagnostics``):
    run :func:`run_diagnostics`."""
    parser = argparse.ArgumentParser(
        prog="merging diagnose", description="Weight-averaging diagnostics on scikit-learn digits."
    )
    parser.add_argument("--out", default="runs/diagnostics", help="output folder")
    parser.add_argument("--models", type=int, default=5, help="number of models M")
    parser.add_argument("--archs", nargs="+", default=["mlp", "small_cnn"], choices=["mlp", "small_cnn"])
    parser.add_argument("--inits", nargs="+", default=["shared", "independent"], choices=["shared", "independent"])
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--magnitude", type=float, default=100.0, help="scaling factor c")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_diagnostics(
        args.out,
        num_models=args.models,
        archs=args.archs,
        inits=args.inits,
        epochs=args.epochs,
        magnitude=args.magnitude,
        seed=args.seed,
        num_threads=args.threads,
    )
    log.info(_table_markdown(result.table))
    log.info("wrote %s", ", ".join(str(f) for f in result.files))
    return result


if __name__ == "__main__":
    main()
