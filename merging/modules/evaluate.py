"""LightningModules that evaluate experts: their prediction-level ensemble, and merges.

Both read an :class:`~merging.bundle.ExpertBundle` and evaluate on one backbone
skeleton with substituted parameters (``torch.func.functional_call``); no module is
copied per expert or per merge. Task t is always read by its own head ``H_t``:

- ensemble:  H_t( Σ_j w_j f(x; θ_j) )   (the M-Loss paper's ensemble: mean embedding, then
  the task's head);
- merge:     H_t( f(x; merge(θ_1..θ_K)) ).

With per-task heads reading averaged features, the ensemble is not an upper bound of the
merge at every scale: it is reported as measured.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.func import functional_call
from torchmetrics.classification import MulticlassAccuracy

from merging._validation import check_bool, check_float_list, check_int, check_int_list, check_str
from merging.accuracy import accuracy_by_task
from merging.bundle import ExpertBundle
from merging.io import save_state_dict
from merging.methods.base import MergeMethod
from merging.methods.classic import TiesMerging
from merging.state import StateDict, stack_states


def ensemble_features(skeleton: nn.Module, stacked: StateDict, x: Tensor) -> Tensor:
    """Mean of the K experts' features ``(B, d)``, one vmapped ``functional_call``.

    Args:
        skeleton: the backbone (in eval mode: BatchNorm uses each expert's running stats).
        stacked: ``{key: (K, *shape)}`` expert states (:func:`stack_states`).
        x: inputs ``(B, *input_shape)``.
    """
    features = torch.func.vmap(lambda state: functional_call(skeleton, state, (x,)), randomness="same")(stacked)
    return features.mean(dim=0)


class _BundleEvalModule(pl.LightningModule, ABC):
    """Loads a bundle in ``setup`` and reports per-task and mean accuracy of ``features``.

    ``setup`` runs before Lightning moves the module to its device, so it only reads the
    bundle and builds the skeleton, heads and metrics (submodules: Lightning moves them).
    The states evaluated (stacked experts, merges) are computed once on :attr:`device`, when
    an evaluation starts (``on_validation_start``, ``on_test_start``, ``on_predict_start``)
    or at their first use outside a Trainer: the experts are copied there from the bundle,
    and nothing goes back to the CPU but what a file needs.
    """

    def __init__(self, experts: str, report_ensemble: bool) -> None:
        super().__init__()
        owner = type(self).__name__
        self.experts_dir = check_str("experts", experts, path=True, owner=owner)
        self.report_ensemble = check_bool("report_ensemble", report_ensemble, owner=owner)
        self.bundle: ExpertBundle | None = None
        self.skeleton: nn.Module | None = None
        self.heads: nn.ModuleList | None = None
        self._states: dict[str, StateDict] = {}
        self._experts: list[StateDict] = []
        self._base: StateDict | None = None
        self._prepared = False
        #: ``{kind: one MulticlassAccuracy per task}`` (kinds: ``"model"``, ``"ensemble"``),
        #: filled in ``setup`` once the bundle gives the tasks' class counts.
        self.metrics = nn.ModuleDict()
        self.results: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        if self.bundle is not None:
            return
        self.bundle = ExpertBundle.load(self.experts_dir)
        self.skeleton = self.bundle.build_backbone().requires_grad_(False)
        self.heads = self.bundle.build_heads().requires_grad_(False)
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "num_classes"):
            if list(datamodule.num_classes) != self.bundle.num_classes:
                raise ValueError(
                    f"bundle {self.experts_dir} has tasks {self.bundle.task_names} with classes "
                    f"{self.bundle.num_classes}, the datamodule has {list(datamodule.num_classes)}"
                )
        for kind in self._kinds():
            self.metrics[kind] = nn.ModuleList(MulticlassAccuracy(num_classes=n) for n in self.bundle.num_classes)

    def _prepare(self) -> None:
        """Compute the evaluated states on the module's device (once). The device copies of
        the experts and base live only while :meth:`prepare_states` runs."""
        if self._prepared:
            return
        device = self.device
        self._experts = [{k: v.to(device) for k, v in e.items()} for e in self.bundle.experts]
        self._base = {k: v.to(device) for k, v in self.bundle.base.items()}
        try:
            if self.report_ensemble:
                self._states["experts"] = stack_states(self._experts)
            self.prepare_states()
        finally:
            self._experts, self._base = [], None
        self._prepared = True

    def on_validation_start(self) -> None:
        self._prepare()

    def on_test_start(self) -> None:
        self._prepare()

    def on_predict_start(self) -> None:
        self._prepare()

    def _kinds(self) -> list[str]:
        return ["model", "ensemble"] if self.report_ensemble else ["model"]

    @abstractmethod
    def prepare_states(self) -> None:
        """Compute what :meth:`features` evaluates (merge the experts, pick members) from
        ``self._experts`` and ``self._base``, which are on :attr:`device`, into ``self._states``."""

    @abstractmethod
    def features(self, x: Tensor) -> Tensor:
        """The backbone features ``(B, d)`` evaluated for inputs ``x`` ``(B, *input_shape)``."""

    def _state(self, name: str) -> StateDict:
        self._prepare()
        state = self._states[name]
        first = next(iter(state.values()))
        if first.device != self.device:
            state = {k: v.to(self.device) for k, v in state.items()}
            self._states[name] = state
        return state

    def _eval_step(self, batch: Any, dataloader_idx: int) -> None:
        x, y = batch
        head = self.heads[dataloader_idx]
        self.metrics["model"][dataloader_idx](head(self.features(x)), y)
        if self.report_ensemble:
            feats = ensemble_features(self.skeleton, self._state("experts"), x)
            self.metrics["ensemble"][dataloader_idx](head(feats), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def _report(self, stage: str) -> None:
        # compute() is a collective under DDP: every rank calls it.
        results: dict[str, float] = {}
        for kind in self._kinds():
            accs = [float(m.compute()) for m in self.metrics[kind]]
            prefix = f"{stage}/acc" if kind == "model" else f"{stage}/ensemble_acc"
            for name, acc in zip(self.bundle.task_names, accs):
                results[f"{prefix}/{name}"] = acc
            results[f"{prefix}_mean"] = sum(accs) / len(accs)
            for m in self.metrics[kind]:
                m.reset()
        if self.report_ensemble:
            results[f"{stage}/gap_to_ensemble"] = results[f"{stage}/acc_mean"] - results[f"{stage}/ensemble_acc_mean"]
        for key, value in results.items():
            self.log(key, value, rank_zero_only=False)
        self.results = results

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_end(self) -> None:
        self._report("test")


class EnsembleModule(_BundleEvalModule):
    """Prediction-level ensemble of experts: task t reads H_t(Σ_j w_j f(x; θ_j)).

    Args:
        experts: an expert bundle directory (:class:`~merging.bundle.ExpertBundle`).
        members: indices of the experts ensembled (default all; ``[j]`` evaluates expert j
            alone on every task).
    """

    def __init__(self, experts: str, members: list[int] | None = None) -> None:
        super().__init__(experts, report_ensemble=False)
        self.save_hyperparameters()
        self.members = check_int_list("members", members, minimum=0, optional=True, owner="EnsembleModule")

    def prepare_states(self) -> None:
        k = len(self.bundle.experts)
        members = self.members if self.members is not None else list(range(k))
        bad = [j for j in members if not 0 <= j < k]
        if bad or not members:
            raise ValueError(f"members {self.members} must be non-empty indices in [0, {k})")
        self._states["members"] = stack_states([self._experts[j] for j in members])

    def features(self, x: Tensor) -> Tensor:
        return ensemble_features(self.skeleton, self._state("members"), x)


class MergedModule(_BundleEvalModule):
    """Merges the experts' backbones with any registered method, then evaluates per task
    with each task's head and reports the gap to the ensemble.

    The merge (and the λ search) runs once, when the first evaluation starts, after Lightning
    has placed the module: on :attr:`device` (the GPU in a GPU run). Only the file written
    to ``save_path`` is copied to the CPU.

    Data-dependent methods get the model skeleton and the datamodule's
    ``unlabeled_dataloader(num_samples, seed)``.

    Args:
        experts: an expert bundle directory (:class:`~merging.bundle.ExpertBundle`).
        method: the merge method (YAML: ``class_path`` + ``init_args``); None: TIES with
            its paper defaults.
        report_ensemble: also evaluate the ensemble and log ``gap_to_ensemble``.
        unlabeled_samples: size of the unlabeled set given to data-dependent methods.
        seed: seed of that unlabeled set.
        save_path: where rank zero writes the merged backbone (safetensors), if anywhere.
        scaling_grid: choose the method's ``scaling`` λ from these values by the mean
            accuracy on the datamodule's **validation** split (each task read by its own
            head) before evaluating; the test split is never used to choose. This is how
            task arithmetic and TIES pick λ in their papers (held-out validation; Ilharco
            et al., ICLR 2023; Yadav et al., NeurIPS 2023). Ties keep the smaller λ. Every
            rank evaluates the whole validation split, so all ranks choose the same λ. The
            choice is logged as ``{stage}/selected_scaling``; the validation accuracy of
            every λ is in :attr:`scaling_search`. None: the method's own ``scaling``.

    Raises:
        TypeError: an argument has the wrong type (``method`` not a :class:`MergeMethod`, a
            float or bool for an int, a string for a list).
        ValueError: an argument is out of range, or ``scaling_grid`` is empty or given for a
            method without ``scaling``.
    """

    def __init__(
        self,
        experts: str,
        method: MergeMethod | None = None,
        report_ensemble: bool = True,
        unlabeled_samples: int = 256,
        seed: int = 0,
        save_path: str | None = None,
        scaling_grid: Sequence[float] | None = None,
    ) -> None:
        super().__init__(experts, report_ensemble=report_ensemble)
        self.save_hyperparameters(ignore=["method"])
        if method is not None and not isinstance(method, MergeMethod):
            raise TypeError(f"MergedModule: method must be a MergeMethod (e.g. TiesMerging()) or None, got {method!r}")
        owner = "MergedModule"
        self.method = method if method is not None else TiesMerging()
        self.unlabeled_samples = check_int("unlabeled_samples", unlabeled_samples, minimum=1, owner=owner)
        self.seed = check_int("seed", seed, minimum=0, owner=owner)
        self.save_path = check_str("save_path", save_path, optional=True, path=True, owner=owner)
        self.scaling_grid = self._check_grid(scaling_grid)
        self.merge_seconds: float | None = None
        #: ``{λ: mean validation accuracy}`` of the ``scaling_grid`` search (empty without one).
        self.scaling_search: dict[float, float] = {}
        self.selected_scaling: float | None = None

    def _check_grid(self, grid: Sequence[float] | None) -> list[float] | None:
        if grid is None:
            return None
        if isinstance(grid, Sequence) and not isinstance(grid, str) and not grid:
            raise ValueError("scaling_grid is empty: give at least one λ, or None for the method's own scaling")
        grid = check_float_list("scaling_grid", grid, owner="MergedModule")
        if "scaling" not in self.method.hparam_names():
            raise ValueError(
                f"scaling_grid was given but {type(self.method).__name__} ({self.method.name}) has no "
                "scaling hyperparameter to choose"
            )
        return sorted(set(grid))

    def unlabeled_data(self):
        """The unlabeled input batches a data-dependent method is given (None if unneeded)."""
        if not self.method.requires_data:
            return None
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "unlabeled_dataloader"):
            raise ValueError(
                f"{self.method.name} needs unlabeled data: run with a datamodule that has unlabeled_dataloader()"
            )
        return datamodule.unlabeled_dataloader(num_samples=self.unlabeled_samples, seed=self.seed)

    def _merge(self, method: MergeMethod) -> tuple[StateDict, float]:
        start = time.perf_counter()
        merged = method.merge(self._experts, self._base, model=self.skeleton, data=self.unlabeled_data())
        return merged, time.perf_counter() - start

    def _validation_loaders(self) -> list:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            raise ValueError("scaling_grid needs validation data: run with a datamodule that has val_dataloader()")
        loaders = datamodule.val_dataloader()
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        if len(loaders) != len(self.bundle.task_names):
            raise ValueError(
                f"scaling_grid: the datamodule gives {len(loaders)} validation loaders, the bundle has "
                f"{len(self.bundle.task_names)} tasks {self.bundle.task_names}"
            )
        return loaders

    def _validation_accuracy(self, merged: StateDict, loaders: list) -> float:
        """Mean over tasks of the merge's validation accuracy (the metric of :meth:`_report`,
        computed on this rank alone, on :attr:`device`: no collective)."""
        accs = accuracy_by_task(
            lambda t, x: self.heads[t](functional_call(self.skeleton, merged, (x,))),
            loaders,
            self.bundle.num_classes,
            device=self.device,
        )
        return sum(accs) / len(accs)

    def _search_scaling(self) -> tuple[StateDict, float, MergeMethod]:
        """Merge at every λ of ``scaling_grid``; keep the best on validation: returns its
        merged state, merge time and method (``method`` at the chosen λ)."""
        loaders = self._validation_loaders()
        best: tuple[float, StateDict, float, MergeMethod] | None = None
        for scaling in self.scaling_grid:
            method = self.method.with_hparams(scaling=scaling)
            merged, seconds = self._merge(method)
            acc = self.scaling_search[scaling] = self._validation_accuracy(merged, loaders)
            if best is None or acc > best[0]:  # strict: ties keep the smaller λ (the grid is sorted)
                best, self.selected_scaling = (acc, merged, seconds, method), scaling
        searched = ", ".join(f"{s:g}: {100 * a:.1f}%" for s, a in self.scaling_search.items())
        rank_zero_info(f"{self.method.name}: λ = {self.selected_scaling:g} chosen on validation ({searched})")
        return best[1:]

    def prepare_states(self) -> None:
        if self.scaling_grid is None:
            method = self.method
            merged, self.merge_seconds = self._merge(method)
        else:
            merged, self.merge_seconds, method = self._search_scaling()
        self._states["merged"] = merged
        rank_zero_info(f"{self.method.name}: merged {len(self.bundle.experts)} experts in {self.merge_seconds:.3f} s")
        if self.save_path and self.trainer.is_global_zero:
            save_state_dict(merged, Path(self.save_path), metadata={"method": repr(method)})
            rank_zero_info(f"merged backbone written to {self.save_path}")

    def features(self, x: Tensor) -> Tensor:
        return functional_call(self.skeleton, self._state("merged"), (x,))

    def _report(self, stage: str) -> None:
        super()._report(stage)
        self.log(f"{stage}/merge_seconds", float(self.merge_seconds), rank_zero_only=False)
        self.results[f"{stage}/merge_seconds"] = float(self.merge_seconds)
        if self.selected_scaling is not None:
            self.log(f"{stage}/selected_scaling", self.selected_scaling, rank_zero_only=False)
            self.results[f"{stage}/selected_scaling"] = self.selected_scaling
