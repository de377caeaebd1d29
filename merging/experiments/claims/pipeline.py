"""One seed of the claims benchmark: train, merge, measure; returns plain data.

Per seed (all settings from the :class:`~merging.experiments.claims.protocol.Protocol`):

1. Fashion-MNIST class-group tasks (``FashionMNISTTasks``) split by the seed; θ₀ pretrained
   on the first task (``PretrainModule``), as in the demo.
2. Expert sets fine-tuned jointly from θ₀ (``MultiExpertModule`` with a
   ``StabilityMonitor``), one per learning-rate setting: the protocol's ``experts`` setting
   (the main set every method claim reads) and each ``stability`` setting.
3. On the main set: the feature ensemble, averaging and every protocol method, each at its
   fixed λ and with λ chosen on the validation split; the experts' M-Loss per layer and node,
   and the ensemble-minus-average gap per layer (:mod:`merging.experiments.claims.analyses`).
4. NeuLig's Portland on the main set (the demo's ``neulig_rows``: the Portland chosen on
   validation, tested with the code's rule, one merge per batch from its first sample's
   CoopVec, and per sample); experts from different
   initialisations merged by averaging and MuDSC (``run_different_init_seed``); the soup
   analyses on a ten-class fine-tune.

Every accuracy is the mean over tasks of torchmetrics' ``MulticlassAccuracy`` (its default
macro average, the metric ``MergedModule`` logs), each task read by its own head.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.func import functional_call

from merging.accuracy import accuracy_by_task
from merging.bundle import ExpertBundle
from merging.callbacks import StabilityMonitor
from merging.datamodules import FashionMNISTTasks
from merging.experiments.claims.analyses import layer_gaps, soup_analyses
from merging.experiments.claims.protocol import Protocol, TrainSpec
from merging.experiments.demo import neulig_rows
from merging.experiments.scenarios import run_different_init_seed
from merging.experiments.trainers import quiet_trainer
from merging.methods import get_method
from merging.methods.mties import MTiesMerging, row_keep_rates
from merging.mloss import OUTPUT, m_loss
from merging.models import channels_last
from merging.modules import MultiExpertModule, PretrainModule
from merging.stability import task_vector_stats
from merging.state import StateDict, average_states

Step = Callable[[str], None]


def make_data(protocol: Protocol, seed: int, groups: Sequence[Sequence[int]] | None = None) -> FashionMNISTTasks:
    """The seed's Fashion-MNIST tasks (``groups`` overrides the protocol's)."""
    spec = protocol.data
    data = FashionMNISTTasks(
        groups=groups if groups is not None else spec.groups,
        root=spec.root,
        max_per_class=spec.max_per_class,
        batch_size=spec.batch_size,
        seed=seed,
    )
    data.setup("fit")
    return data


class Evaluator:
    """Accuracy of backbone states on a bundle's tasks (each task read by its own head)."""

    def __init__(self, bundle: ExpertBundle, data: FashionMNISTTasks) -> None:
        self.skeleton = bundle.build_backbone()
        self.heads = bundle.build_heads().eval()
        self.num_classes = bundle.num_classes
        self.loaders = {
            split: [data.task_dataloader(t, split) for t in range(data.num_tasks)] for split in ("val", "test")
        }

    @torch.no_grad()
    def accuracy(self, state: Mapping[str, Tensor], split: str = "test") -> float:
        """Mean over tasks of the accuracy of ``state`` on ``split``."""
        state = channels_last(state)  # same values, 2-4x faster thin CPU convolutions
        accs = accuracy_by_task(
            lambda t, x: self.heads[t](functional_call(self.skeleton, state, (x,))),
            self.loaders[split],
            self.num_classes,
        )
        return sum(accs) / len(accs)

    @torch.no_grad()
    def ensemble_accuracy(self, experts: Sequence[Mapping[str, Tensor]], split: str = "test") -> float:
        """Mean over tasks of the feature ensemble's accuracy (mean features, then the head:
        ``MergedModule``'s ensemble, one expert at a time)."""
        states = [channels_last(e) for e in experts]

        def features(x: Tensor) -> Tensor:
            return torch.stack([functional_call(self.skeleton, s, (x,)) for s in states]).mean(dim=0)

        accs = accuracy_by_task(lambda t, x: self.heads[t](features(x)), self.loaders[split], self.num_classes)
        return sum(accs) / len(accs)


def train_experts(
    protocol: Protocol,
    data: FashionMNISTTasks,
    base_path: Path,
    setting: TrainSpec,
    hardware: Mapping[str, Any],
    root_dir: Path,
    export_dir: Path | None = None,
) -> tuple[ExpertBundle, StabilityMonitor]:
    """K experts fine-tuned jointly from θ₀ at ``setting`` (epochs, lr), with the monitor
    (its report goes to ``root_dir``)."""
    module = MultiExpertModule(
        backbone=protocol.model.backbone,
        backbone_kwargs=dict(protocol.model.backbone_kwargs),
        base_checkpoint=str(base_path),
        lr=setting.lr,
        export_dir=str(export_dir) if export_dir is not None else None,
    )
    module.to(memory_format=torch.channels_last)  # conv weights only; 1.3x faster CPU steps
    monitor = StabilityMonitor(sparsifiers=())
    trainer = quiet_trainer(
        **hardware, max_epochs=setting.epochs, limit_val_batches=0, callbacks=[monitor], default_root_dir=str(root_dir)
    )
    trainer.fit(module, data)
    module.to(memory_format=torch.contiguous_format)
    return module.to_bundle(), monitor


def stability_record(bundle: ExpertBundle, monitor: StabilityMonitor, setting: TrainSpec) -> dict[str, Any]:
    """The quantities read before the merge: Λ = Σ η_t, path length and ‖τ_j‖ (means over
    experts), the dispersion D and the sign-conflict rate."""
    stats = task_vector_stats(bundle.experts, bundle.base)
    trajectories = monitor.trajectories
    return {
        "lr": setting.lr,
        "epochs": setting.epochs,
        "lr_integral": sum(t.lr_integral for t in trajectories) / len(trajectories),
        "path_length": sum(t.path_length for t in trajectories) / len(trajectories),
        "tau_norm": float(stats.norms.mean()),
        "dispersion": float(stats.dispersion),
        "sign_conflict": float(stats.sign_conflict),
    }


def merge_rows(
    protocol: Protocol, bundle: ExpertBundle, evaluator: Evaluator, unlabeled, seed: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
    """Every protocol method at its own λ and with λ chosen on validation (ties keep the
    smaller λ). Returns ``({label: {"fixed", "searched", "lambda", "seconds"}}, M-TIES's node
    M-Loss of the equal-density row)``."""
    rows: dict[str, dict[str, Any]] = {}
    node_mloss: dict[str, Tensor] = {}
    for label, spec in protocol.methods.items():
        hparams = {k: v for k, v in spec.items() if k != "method"}
        method = get_method(spec["method"], **hparams)
        needs = {"model": evaluator.skeleton, "data": unlabeled} if method.requires_data else {}

        def merge(m, needs=needs) -> StateDict:
            return m.merge(bundle.experts, bundle.base, **needs)

        start = time.perf_counter()
        fixed = merge(method)
        row: dict[str, Any] = {"fixed": evaluator.accuracy(fixed), "seconds": time.perf_counter() - start}
        if isinstance(method, MTiesMerging) and label == "mties_equal_density":
            node_mloss = method.node_mloss
        if "scaling" in method.hparam_names():
            grid = protocol.scaling_grid
            search = {s: evaluator.accuracy(merge(method.with_hparams(scaling=s)), "val") for s in grid}
            best = max(sorted(search), key=lambda s: search[s])  # max keeps the first (smallest) of ties
            row["lambda"] = best
            row["searched"] = evaluator.accuracy(merge(method.with_hparams(scaling=best)))
        rows[label] = row
    return rows, node_mloss


def different_init_record(protocol: Protocol, seed: int, hardware: Mapping[str, Any]) -> dict[str, float]:
    """Experts trained from different initialisations, merged every way the scenario knows."""
    data = make_data(protocol, seed)
    rows = run_different_init_seed(
        seed,
        data=data,
        backbone_kwargs=dict(protocol.model.backbone_kwargs),
        epochs=protocol.different_init.epochs,
        lr=protocol.different_init.lr,
        unlabeled_samples=protocol.unlabeled_samples,
        **hardware,
    )
    return {row["model"]: row["test/acc_mean"] for row in rows}


def run_seed(
    protocol: Protocol,
    seed: int,
    run_dir: Path,
    *,
    hardware: Mapping[str, Any] | None = None,
    step: Step | None = None,
) -> dict[str, Any]:
    """Everything one seed measures (see the module docstring), as plain data."""
    hardware = dict(hardware or {"accelerator": "cpu", "devices": 1})
    step = step or (lambda what: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def done(what: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[what] = now - clock
        clock = now
        step(what)

    pl.seed_everything(seed, verbose=False)
    data = make_data(protocol, seed)
    base_path = run_dir / "base.safetensors"
    pretrain = PretrainModule(
        backbone=protocol.model.backbone,
        backbone_kwargs=dict(protocol.model.backbone_kwargs),
        lr=protocol.pretrain.lr,
        export_path=str(base_path),
    )
    pretrain.to(memory_format=torch.channels_last)
    pretrainer = quiet_trainer(
        **hardware, max_epochs=protocol.pretrain.epochs, limit_val_batches=0, default_root_dir=str(run_dir)
    )
    pretrainer.fit(pretrain, data)
    done("pretrain")

    bundle_dir = run_dir / "experts"
    settings = [protocol.experts] + [s for s in protocol.stability if s != protocol.experts]
    stability: list[dict[str, Any]] = []
    main_bundle: ExpertBundle | None = None
    for i, setting in enumerate(settings):
        pl.seed_everything(seed, verbose=False)
        bundle, monitor = train_experts(
            protocol, data, base_path, setting, hardware, run_dir / f"setting_{i}", bundle_dir if i == 0 else None
        )
        evaluator = Evaluator(bundle, data)
        record = stability_record(bundle, monitor, setting)
        record["average"] = evaluator.accuracy(average_states(bundle.experts))
        record["ensemble"] = evaluator.ensemble_accuracy(bundle.experts)
        record["experts"] = sum(evaluator.accuracy(e) for e in bundle.experts) / len(bundle.experts)
        record["main"] = i == 0
        if setting in protocol.stability:
            stability.append(record)
        if i == 0:
            main_bundle, main_evaluator, main_record = bundle, evaluator, record
        done(f"experts lr={setting.lr:g} epochs={setting.epochs}")

    unlabeled = data.unlabeled_dataloader(num_samples=protocol.unlabeled_samples, seed=seed)
    methods, node_mloss = merge_rows(protocol, main_bundle, main_evaluator, unlabeled, seed)
    done("merges")

    report = m_loss(main_evaluator.skeleton, main_bundle.experts, unlabeled, base=main_bundle.base)
    layers = [name for name in report.layer if name != OUTPUT]
    gaps = layer_gaps(main_evaluator, main_bundle.experts, layers, report.node)
    mloss = {
        "layer": {k: report.layer[k] for k in layers},
        "layer_normalized": {k: report.layer_normalized[k] for k in layers},
        "output_normalized": report.layer_normalized.get(OUTPUT),
        "mties_mean_keep_rate": {
            k: float(methods_keep_rate(protocol, v)) for k, v in node_mloss.items() if k in report.layer
        },
    }
    done("M-Loss and layer gaps")

    neulig: dict[str, float] = {}
    if protocol.neulig_epochs:
        rows = neulig_rows(seed, str(bundle_dir), data, protocol.neulig_epochs, hardware, also_test=("per_sample",))
        for row in rows:
            neulig[row["model"]] = row["test/acc_mean"]
        done("NeuLig")

    different_init = different_init_record(protocol, seed, hardware)
    done("different initialisations")

    soup = soup_analyses(protocol, make_data(protocol, seed, groups=[list(range(10))]), seed, base_path)
    done("soups")

    return {
        "seed": seed,
        "ensemble": main_record["ensemble"],
        "average": main_record["average"],
        "experts": main_record["experts"],
        "methods": methods,
        "mloss": mloss,
        "layer_gaps": gaps,
        "neulig": neulig,
        "different_init": different_init,
        "soup": soup,
        "stability": stability,
        "seconds": timings,
    }


def methods_keep_rate(protocol: Protocol, node_mloss: Tensor) -> Tensor:
    """M-TIES's mean row keep rate of a layer at the equal-density row's k and e."""
    spec = protocol.methods["mties_equal_density"]
    return row_keep_rates(node_mloss, density=spec.get("density", 0.8), spread=spec.get("spread", 0.1)).mean()


__all__ = ["Evaluator", "make_data", "run_seed", "train_experts"]
