"""NeuLigModule: train Portland on frozen experts and compare merging with ensembling.

The maths (Portland, ε*, the joint loss, the merge modes) lives in :mod:`merging.neulig`;
this module only orchestrates it in Lightning. Paper: NeuLig, ICCV 2025,
https://github.com/LiQiiiii/Neural-Ligand; spec: ``spec/neulig.md``.

Training (spec, [C]): only Portland is trained, with Adam; every training batch of a
:class:`~merging.datamodules.MultiTaskDataModule` is ``{task_name: (x, y)}`` and the module takes
**one optimizer step per task in turn** on these task-homogeneous batches (the code's
round-robin). The datamodule cycles shorter tasks up to the longest one
(``"max_size_cycle"``), where the code stops at the shortest: only the epoch length differs.

Evaluation: on every validation/test batch of task t (one loader per task) the module
computes the ensembling branch H_t(Σ_k β_k E_k(x)) and the merging branch H_t(E_{θ_m}(x))
in the chosen mode, and logs per task

- ``{stage}/merged_acc/<task>``, ``{stage}/ensembled_acc/<task>``,
  ``{stage}/gap/<task>`` = |merged − ensembled| (the paper's Gap column);
- ``{stage}/coopvec/argmax_rate/<task>`` and ``{stage}/coopvec/entropy/<task>``;

plus task averages ``{stage}/merged_acc``, ``{stage}/ensembled_acc`` and
``{stage}/gap`` = |mean merged − mean ensembled|. ``"per_batch_first"`` figures depend on
which sample opens each batch, hence on the evaluation batch size and on DDP sharding;
``"per_batch_mean"`` on the batch's composition; ``"per_sample"`` and ``"static"`` do not.

Best versus last [I] (spec 1b.4): the code reports the best merged accuracy seen on the
evaluation split, an optimistic choice. Here the best epoch is chosen on the
**validation** split only (``val/best/*``); Portland at that epoch is kept in
``best_portland``, and ``test`` evaluates both the last Portland (``test/last/*``) and the
best one (``test/best/*``). Test data never selects anything.

All figures are ``torchmetrics`` states (sums and counts) reduced across DDP ranks; the
CoopVec-map PNG is written by rank zero only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from merging._validation import check_bool, check_choice, check_float, check_int, check_str
from merging.bundle import ExpertBundle
from merging.models import channels_last
from merging.neulig import (
    CONSTRAINTS,
    MERGE_MODES,
    Alignment,
    Constraint,
    CoopVecSummary,
    MergeMode,
    Portland,
    concat_features,
    constrained_coopvec,
    coopvec_ensemble,
    coopvec_statistics,
    expert_features,
    mean_coopvec,
    merged_features,
    modified_offsets,
    neulig_forward,
    neulig_loss,
    summarize_coopvec,
)
from merging.state import StateDict


class CoopVecStats(Metric):
    """The CoopVec map as a DDP-safe metric: per-task sums of β, argmax hits, entropies, counts.

    Args:
        num_tasks: T.
        num_experts: K (expert k is task k's expert).
    """

    full_state_update = False
    beta_sum: Tensor
    argmax_hits: Tensor
    entropy_sum: Tensor
    count: Tensor

    def __init__(self, num_tasks: int, num_experts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_tasks = num_tasks
        self.add_state("beta_sum", torch.zeros(num_tasks, num_experts, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("argmax_hits", torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("entropy_sum", torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, beta: Tensor, task_id: Tensor) -> None:
        """Add CoopVecs ``beta (B, K)`` of samples of tasks ``task_id (B,)``."""
        beta_sum, hits, entropy, count = coopvec_statistics(beta, task_id, self.num_tasks)
        self.beta_sum += beta_sum
        self.argmax_hits += hits
        self.entropy_sum += entropy
        self.count += count

    def compute(self) -> CoopVecSummary:
        """Per-task mean CoopVec ``(T, K)``, argmax = task rate ``(T,)``, mean entropy ``(T,)``."""
        return summarize_coopvec(self.beta_sum, self.argmax_hits, self.entropy_sum, self.count)


class NeuLigModule(LightningModule):
    """Train Portland (NeuLig) on K frozen experts; log merged vs ensembled accuracy per task.

    Args:
        experts: directory of an :class:`~merging.bundle.ExpertBundle` (K expert backbones
            of one architecture, the base, one head per task; expert k belongs to task k).
        alignment: the task loss L_b: ``"sup"`` (cross-entropy with labels) or ``"semi"``
            (prediction entropy, labels unused), the code's ``--alignment_type``.
        scaling: L = L_b + L_a / scaling (the code's ``--scaling``; α = 1/scaling = 0.01).
        lr: Adam learning rate of Portland (code: 1e-3).
        mode: merging-branch inference mode [I]: ``"per_batch_first"`` (faithful to the
            code: the first sample's CoopVec merges the model for the whole task-homogeneous
            batch), ``"per_batch_mean"`` (the batch's mean CoopVec, same cost; on the digits
            demo it is far less noisy, ``benchmarks/results/neulig_ablation.md``),
            ``"per_sample"`` (exact, one merge per sample) or ``"static"`` (one merge
            from the mean CoopVec β̄ over a calibration set: a true single merged model).
        constraint: the weighted-offset constraint Σ_k β_k ε*_k = 0 [I]: ``"soft"`` (the
            paper and code: only penalised by L_a / scaling) or ``"hard"`` (every CoopVec,
            in training and in both evaluation branches, is projected onto the hyperplane,
            :func:`~merging.neulig.project_coopvec`; it keeps Σβ = 1 but may leave [0, 1]).
        calibration_samples: size of the calibration set of ``"static"`` mode, drawn with
            the datamodule's ``unlabeled_dataloader`` (train split, tasks mixed).
        calibration_seed: seed of that draw.
        seed: seed of Portland's initialisation.
        coopvec_plot: write ``coopvec_map.png`` (last validation's CoopVec map) into the
            trainer's log directory at the end of ``fit``.

    The bundle is loaded, and Portland built, by :meth:`configure_model`.

    Raises:
        TypeError: an argument has the wrong type (a float or bool for an int).
        ValueError: an unknown ``alignment`` or ``mode``, or a setting out of range.
    """

    def __init__(
        self,
        experts: str,
        alignment: Alignment = "sup",
        scaling: float = 100.0,
        lr: float = 1e-3,
        mode: MergeMode = "per_batch_first",
        constraint: Constraint = "soft",
        calibration_samples: int = 256,
        calibration_seed: int = 0,
        seed: int = 0,
        coopvec_plot: bool = True,
    ) -> None:
        super().__init__()
        owner = "NeuLigModule"
        check_str("experts", experts, path=True, owner=owner)
        check_choice("alignment", alignment, ("sup", "semi"), owner=owner)
        check_choice("mode", mode, MERGE_MODES, owner=owner)
        check_choice("constraint", constraint, CONSTRAINTS, owner=owner)
        check_float("scaling", scaling, low=0.0, low_open=True, owner=owner)
        check_float("lr", lr, low=0.0, low_open=True, owner=owner)
        check_int("calibration_samples", calibration_samples, minimum=1, owner=owner)
        check_int("calibration_seed", calibration_seed, minimum=0, owner=owner)
        check_int("seed", seed, minimum=0, owner=owner)
        check_bool("coopvec_plot", coopvec_plot, owner=owner)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.task_names: list[str] = []
        self.num_classes: list[int] = []
        # Built by configure_model once the bundle is read (a config parses before it exists).
        self.skeleton: nn.Module | None = None
        self.heads: nn.ModuleList | None = None
        self.portland: Portland | None = None
        self.best_portland: Portland | None = None
        self.accuracy = nn.ModuleDict()
        self.coopvec = nn.ModuleDict()
        self._experts: list[StateDict] = []
        self._static_coopvec: dict[str, Tensor] = {}
        self._last_val_coopvec: CoopVecSummary | None = None

    def configure_model(self) -> None:
        """Load the expert bundle and build the frozen skeleton and heads, ε*, Portland and the
        metrics (once; later calls do nothing).

        Lightning calls this before training, evaluation and checkpoint loading; call it
        yourself to use the module outside a Trainer. Deferred from ``__init__`` so that a
        config parses before the bundle exists.

        Raises:
            FileNotFoundError: ``experts`` is not a bundle directory.
            ValueError: fewer than two experts, or experts, heads and tasks that disagree in number.
        """
        if self._experts:
            return
        directory = self.hparams.experts
        bundle = ExpertBundle.load(directory)
        k = len(bundle.experts)
        if k < 2:
            raise ValueError(f"{directory}: NeuLig needs at least 2 experts, the bundle holds {k}")
        if len(bundle.heads) != k or len(bundle.task_names) != k:
            raise ValueError(
                f"{directory}: NeuLig pairs expert k with task k, but the bundle holds {k} experts, "
                f"{len(bundle.heads)} heads and {len(bundle.task_names)} task names"
            )
        self.task_names = list(bundle.task_names)
        self.num_classes = [int(c) for c in bundle.num_classes]
        self.skeleton = bundle.build_backbone().eval().requires_grad_(False)
        self.heads = bundle.build_heads().eval().requires_grad_(False)
        # Frozen experts are plain tensors, not buffers: they stay out of checkpoints and of
        # DDP's buffer broadcasts, and move to the module's device on first use.
        # Conv weights channels-last: same values, 2-4x faster thin convolutions on the CPU.
        self._experts = [channels_last(e) for e in bundle.experts]
        self.register_buffer("eps_star", modified_offsets(self._experts).float())

        num_features = int(self.skeleton.num_features)
        self.portland = Portland(num_features, k, generator=torch.Generator().manual_seed(self.hparams.seed))
        self.best_portland = copy.deepcopy(self.portland).requires_grad_(False)
        self.register_buffer("best_epoch", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("best_scores", torch.zeros(3))  # merged, ensembled, gap; valid when best_epoch >= 0

        self.accuracy = nn.ModuleDict(
            {
                f"{prefix}_{branch}": nn.ModuleList(MeanMetric() for _ in range(k))
                for prefix in ("val", "test_last", "test_best")
                for branch in ("merged", "ensembled")
            }
        )
        self.coopvec = nn.ModuleDict({prefix: CoopVecStats(k, k) for prefix in ("val", "test_last", "test_best")})
        self.to(self.device)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Build the module first (:meth:`configure_model`), then load as ``nn.Module`` does."""
        self.configure_model()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ helpers
    @property
    def expert_states(self) -> list[StateDict]:
        """θ_1..θ_K on the module's device (moved once, on first use)."""
        first = next(iter(self._experts[0].values()))
        if first.device != self.device:
            self._experts = [channels_last({key: v.to(self.device) for key, v in e.items()}) for e in self._experts]
        return self._experts

    def train(self, mode: bool = True) -> NeuLigModule:
        """Set train/eval mode; the frozen skeleton and heads always stay in eval mode."""
        super().train(mode)
        if self._experts:
            self.skeleton.eval()
            self.heads.eval()
        return self

    def _task_index(self, name: str) -> int:
        if name not in self.task_names:
            raise ValueError(f"training batch has task {name!r}, but the expert bundle's tasks are {self.task_names}")
        return self.task_names.index(name)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        """Build the module (:meth:`configure_model`) and check that the datamodule serves the
        bundle's tasks in the bundle's order.

        Args:
            stage: the Lightning stage.

        Raises:
            ValueError: the datamodule's task names or class counts differ from the bundle's.
        """
        self.configure_model()
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "task_names"):
            return
        names, classes = list(datamodule.task_names), [int(c) for c in datamodule.num_classes]
        if names != self.task_names or classes != self.num_classes:
            raise ValueError(
                f"the datamodule's tasks {names} (classes {classes}) "
                f"do not match the expert bundle's {self.task_names} (classes {self.num_classes})"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on Portland's parameters only (the experts and heads are frozen)."""
        return torch.optim.Adam(self.portland.parameters(), lr=self.hparams.lr)

    def training_step(self, batch: Mapping[str, Sequence[Tensor]], batch_idx: int) -> None:
        """One Adam step per task, in task order, on ``{task_name: (x, y)}``.

        Args:
            batch: a :class:`~merging.datamodules.MultiTaskDataModule` training batch.
            batch_idx: the batch index.

        Raises:
            ValueError: the batch is not a mapping of task names to ``(x, y)`` pairs.
        """
        if not isinstance(batch, Mapping):
            raise ValueError(
                "NeuLig trains on task-homogeneous batches: a training batch must be {task_name: (x, y)} "
                f"(a MultiTaskDataModule's train loader), got {type(batch).__name__}"
            )
        optimizer = self.optimizers()
        sums = torch.zeros(3, device=self.device)
        samples = 0
        for name, (x, y) in batch.items():
            samples += x.shape[0]
            t = self._task_index(name)
            out = neulig_forward(
                self.skeleton,
                self.expert_states,
                self.heads[t],
                self.portland,
                self.eps_star,
                x,
                self.hparams.constraint,
            )
            loss = neulig_loss(out.logits, out.reg, y, self.hparams.alignment, self.hparams.scaling)
            optimizer.zero_grad()
            self.manual_backward(loss.total)
            optimizer.step()
            sums += torch.stack([loss.total, loss.task, loss.alignment]).detach()
        means = sums / len(batch)
        for i, key in enumerate(("loss", "task_loss", "alignment")):
            self.log(
                f"train/{key}",
                means[i],
                on_step=True,
                on_epoch=True,
                prog_bar=key == "loss",
                sync_dist=True,
                batch_size=samples,
            )

    def on_validation_epoch_start(self) -> None:
        """Reset the figures; calibrate β̄ for ``"static"`` mode with the current Portland."""
        self._reset_metrics("val")
        if self.hparams.mode == "static":
            self._static_coopvec["val"] = self.calibrate(self.portland)

    def on_test_epoch_start(self) -> None:
        """Reset the figures; calibrate β̄ of the last and best Portland for ``"static"`` mode."""
        self._reset_metrics("test_last")
        self._reset_metrics("test_best")
        if self.hparams.mode == "static":
            self._static_coopvec["test_last"] = self.calibrate(self.portland)
            if self._has_best():
                self._static_coopvec["test_best"] = self.calibrate(self.best_portland)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Evaluate both branches on a batch of task ``dataloader_idx``.

        Args:
            batch: ``(x, y)`` of one task.
            batch_idx: the batch index.
            dataloader_idx: the task index (one validation loader per task).
        """
        self._evaluate_batch(batch, dataloader_idx, {"val": self.portland})

    def test_step(self, batch: Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Evaluate the last and (when validated) the best Portland on a batch of one task.

        Args:
            batch: ``(x, y)`` of one task.
            batch_idx: the batch index.
            dataloader_idx: the task index (one test loader per task).
        """
        portlands = {"test_last": self.portland}
        if self._has_best():
            portlands["test_best"] = self.best_portland
        self._evaluate_batch(batch, dataloader_idx, portlands)

    def on_validation_epoch_end(self) -> None:
        """Log per-task figures; during ``fit``, keep Portland if its mean merged accuracy is the
        best so far (sanity checks and stand-alone ``validate`` select nothing)."""
        merged, ensembled, summary = self._log_stage("val", "val")
        if self.trainer.sanity_checking or self.trainer.state.fn != TrainerFn.FITTING:
            return  # only validation inside fit selects the best Portland
        self._last_val_coopvec = summary
        score = merged.mean()
        if bool(self.best_epoch < 0) or bool(score > self.best_scores[0]):
            self.best_epoch.fill_(self.current_epoch)
            self.best_scores.copy_(torch.stack([score, ensembled.mean(), (score - ensembled.mean()).abs()]))
            self.best_portland.load_state_dict(self.portland.state_dict())
        best = {"merged_acc": self.best_scores[0], "ensembled_acc": self.best_scores[1], "gap": self.best_scores[2]}
        best["epoch"] = self.best_epoch.float()
        self.log_dict({f"val/best/{k}": v for k, v in best.items()}, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        """Log the test figures of the last and (when validated) the best Portland."""
        self._log_stage("test_last", "test/last")
        if self._has_best():
            self._log_stage("test_best", "test/best")
        else:
            rank_zero_warn("NeuLigModule: no validation epoch ran, so only the last Portland is tested (test/last/*)")

    def on_fit_end(self) -> None:
        """Write the CoopVec map of the last validation epoch (rank zero)."""
        if not self.hparams.coopvec_plot:
            return
        if self._last_val_coopvec is None:
            rank_zero_warn("NeuLigModule: no validation epoch ran, so no CoopVec map is written")
            return
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        self._write_coopvec_plot(self._last_val_coopvec, root / "coopvec_map.png")

    @rank_zero_only
    def _write_coopvec_plot(self, summary: CoopVecSummary, path: Path) -> None:
        plot_coopvec_map(summary, self.task_names, path, title=f"NeuLig CoopVec map (val, epoch {self.current_epoch})")
        rank_zero_info(f"NeuLig CoopVec map written to {path}")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def calibrate(self, portland: Portland) -> Tensor:
        """β̄ = mean CoopVec of ``portland`` over the datamodule's unlabeled calibration set.

        Every rank draws the same set (the unlabeled loader is not sharded), so β̄ agrees
        across ranks.

        Raises:
            ValueError: the datamodule has no ``unlabeled_dataloader``.
        """
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "unlabeled_dataloader"):
            raise ValueError("mode='static' needs a datamodule with unlabeled_dataloader(num_samples, seed)")
        loader = datamodule.unlabeled_dataloader(self.hparams.calibration_samples, self.hparams.calibration_seed)
        batches = (batch.to(self.device) for batch in loader)
        beta = mean_coopvec(portland, self.skeleton, self.expert_states, batches).to(self.device, torch.float32)
        # the projection is affine, so projecting the mean = the mean of the projected CoopVecs
        return constrained_coopvec(beta.unsqueeze(0), self.eps_star, self.hparams.constraint).squeeze(0)

    def _evaluate_batch(self, batch: Sequence[Tensor], task: int, portlands: Mapping[str, Portland]) -> None:
        x, y = batch[0], batch[1]
        head = self.heads[task]
        features = expert_features(self.skeleton, self.expert_states, x)
        task_ids = torch.full_like(y, task)
        for prefix, portland in portlands.items():
            raw = portland(concat_features(features))  # on the simplex: the CoopVec map's statistics
            beta = constrained_coopvec(raw, self.eps_star, self.hparams.constraint)
            coopvec = self._static_coopvec[prefix] if self.hparams.mode == "static" else beta
            merged = head(merged_features(self.skeleton, self.expert_states, x, coopvec, self.hparams.mode))
            ensembled = head(coopvec_ensemble(features, beta))
            self.accuracy[f"{prefix}_merged"][task].update((merged.argmax(1) == y).float())
            self.accuracy[f"{prefix}_ensembled"][task].update((ensembled.argmax(1) == y).float())
            self.coopvec[prefix].update(raw, task_ids)

    def _log_stage(self, prefix: str, group: str) -> tuple[Tensor, Tensor, CoopVecSummary]:
        merged = torch.stack([m.compute() for m in self.accuracy[f"{prefix}_merged"]])
        ensembled = torch.stack([m.compute() for m in self.accuracy[f"{prefix}_ensembled"]])
        summary = self.coopvec[prefix].compute()
        values: dict[str, Tensor] = {}
        for t, name in enumerate(self.task_names):
            values[f"{group}/merged_acc/{name}"] = merged[t]
            values[f"{group}/ensembled_acc/{name}"] = ensembled[t]
            values[f"{group}/gap/{name}"] = (merged[t] - ensembled[t]).abs()
            values[f"{group}/coopvec/argmax_rate/{name}"] = summary.argmax_rate[t].float()
            values[f"{group}/coopvec/entropy/{name}"] = summary.entropy[t].float()
        values[f"{group}/merged_acc"] = merged.mean()
        values[f"{group}/ensembled_acc"] = ensembled.mean()
        values[f"{group}/gap"] = (merged.mean() - ensembled.mean()).abs()
        self.log_dict(values, sync_dist=True)
        self._reset_metrics(prefix)
        return merged, ensembled, summary

    def _reset_metrics(self, prefix: str) -> None:
        # Also at epoch start: under ddp_spawn the metric states a worker inherits share
        # memory with the parent's until their first reset, so the parent's may be stale.
        for metric in (*self.accuracy[f"{prefix}_merged"], *self.accuracy[f"{prefix}_ensembled"], self.coopvec[prefix]):
            metric.reset()

    def _has_best(self) -> bool:
        return bool(self.best_epoch >= 0)


def plot_coopvec_map(
    summary: CoopVecSummary,
    task_names: Sequence[str],
    path: str | Path,
    title: str = "NeuLig CoopVec map",
) -> Path:
    """Draw the CoopVec map as a PNG: per-task mean CoopVec (rows: tasks, columns: experts).

    Each cell holds the mean β_k of the task's samples; each row label gives the task's
    argmax(β) = task rate and mean entropy H(β). Near one-hot rows on the diagonal are the
    regime where merging ≈ ensembling (spec 1b.2).

    Args:
        summary: a :class:`~merging.neulig.CoopVecSummary` (T tasks × K experts).
        task_names: T names (expert k is named after task k).
        path: the PNG to write (parent folders are created; written atomically).
        title: the figure title.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from merging.io import write_atomic

    mean = summary.mean_coopvec.detach().cpu().float()
    t, k = mean.shape
    if len(task_names) != t:
        raise ValueError(f"plot_coopvec_map: {len(task_names)} task names for a map of {t} tasks")
    experts = [f"E[{task_names[j]}]" if j < len(task_names) else f"E{j}" for j in range(k)]
    rows = [
        f"{name}\nargmax={float(summary.argmax_rate[i]):.0%}  H={float(summary.entropy[i]):.2f}"
        for i, name in enumerate(task_names)
    ]
    fig, ax = plt.subplots(figsize=(1.2 * k + 3.0, 0.7 * t + 1.5))
    image = ax.imshow(mean.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(t):
        for j in range(k):
            value = float(mean[i, j])
            color = "black" if value > 0.5 else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(k), experts, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(t), rows, fontsize=8)
    ax.set_xlabel("expert k")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="mean β_k")
    fig.tight_layout()
    path = Path(path)
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path
