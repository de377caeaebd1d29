r"""
Stability Monitor
^^^^^^^^^^^^^^^^^

Logs the L2-stability quantities of fine-tuning (:mod:`merging.stability`) under
``stability/...`` during any fit, and writes a merge-friendliness report at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from merging._validation import (
    check_bool,
    check_callable,
    check_float,
    check_int,
    check_str,
    check_str_list,
    check_weights,
)
from merging.io import write_atomic, write_text_atomic
from merging.modules.protocols import HasExperts
from merging.report import StabilityReportData, sparsifier_label, stability_report_figure, stability_report_markdown
from merging.stability import (
    TaskVectorStats,
    TrajectoryStats,
    global_norm,
    sparsified_task_vector_stats,
    task_vector_stats,
)
from merging.stability_stats import drift_ratios
from merging.state import is_mergeable

Sparsifier = Literal["ties", "dare"]


class StabilityMonitor(Callback):
    r"""Measure how merge-friendly the model(s) being fine-tuned are, without touching them.

    Works on any LightningModule. For a module satisfying
    :class:`merging.modules.protocols.HasExperts` every expert j is tracked against the base
    θ₀ and the experts are compared with each other; any other module is one model whose
    task vector is taken relative to its weights at the start of fit.

    Logged (``p`` = ``stability`` for one model, ``stability/expert_{j}`` per expert):

    * every optimizer step: ``p/lr`` (η_t), ``p/lr_integral`` (Λ = Σ_t η_t),
      ``p/lr_integral_per_sample`` (Σ_t η_t/b_t, = Λ/b for a constant batch),
      ``p/grad_norm`` (‖g_t‖), ``p/grad_sq_norm_mean`` (running E‖g_t‖²),
      ``p/update_norm`` (‖θ_{t+1} − θ_t‖), ``p/path_length`` (Σ_t ‖θ_{t+1} − θ_t‖);
    * every ``every_n_steps`` steps and at each epoch end: ``p/tau_norm`` (‖τ‖),
      ``p/tau_norm/layer/<layer>``; with several experts also ``p/drift_ratio``
      (‖τ_j‖ over the median ‖τ_k‖ of its peers), ``stability/max_drift_ratio``,
      ``stability/dispersion`` (D = Σ_j w_j‖τ_j − τ̄‖²) and its per-layer split,
      ``stability/cosine/<i>_<j>``, ``stability/cosine_mean``, ``stability/sign_conflict``
      (and per layer); for each sparsifier ``s`` in ``sparsifiers``: ``stability/<s>/tau_norm``
      (mean over experts), ``stability/<s>/dispersion``, ``stability/<s>/sign_conflict``;
    * each epoch end: ``stability/train_loss``, the sample-weighted mean training loss of the
      epoch over all ranks (a proxy of F_S(x) measured while x moves).

    Every value is a ``pl_module.log`` metric, so any logger gets it and
    ``ModelCheckpoint(monitor="stability/...")`` or ``EarlyStopping`` can use it. At the end
    of fit, rank zero writes ``<report_name>.md`` and ``<report_name>.png`` to
    ``trainer.log_dir``: which experts drift most, which layers carry the dispersion and the
    sign conflicts, what sparsification does to them, stated as measurements (the paper's
    constants are not available).

    **What is measured, exactly.** η_t is read from the optimizer's param groups in
    ``on_before_optimizer_step`` (before the scheduler moves it), as the numel-weighted mean
    over the tracked tensors of the groups holding them, so an expert trained in its own
    param group gets its own η_j. b_t is the samples of the accumulated batches of the step
    (``batch_size_fn``, by default Lightning's ``extract_batch_size``) times the world size.
    ‖g_t‖ is read in ``on_before_optimizer_step``, after backward and gradient unscaling
    (mixed precision), before clipping. A step that a gradient scaler (16-mixed) skips because
    the gradient is not finite is not a step: it records no η_t, ‖g_t‖ or update. The update
    θ_{t+1} − θ_t is the change between two consecutive optimizer steps, floating buffers
    (BatchNorm statistics) included, so the path length bounds ‖τ‖ by the triangle inequality.
    Parameters of a single model that are frozen (``requires_grad=False``) when fit starts are
    left out. With several optimizers stepping in one batch (manual optimization), each model's
    η and ‖g‖ come from the optimizer holding its parameters and the update is measured once per
    batch.

    **DDP.** Parameters, their all-reduced gradients and the learning rates are the same on
    every rank, so every quantity but the training loss is global as computed; the training
    loss is summed with its sample count across ranks (``trainer.strategy.reduce``) before
    dividing. Files are written by rank zero only.

    **Resuming.** :meth:`state_dict` holds the accumulated statistics, the history, and for a
    single model its fit-start weights (so τ stays relative to them after a restart: this
    adds one model-sized copy to checkpoints).

    **Cost.** One model-sized copy per tracked model (the previous step's weights, for the
    update norm; ``track_updates=False`` drops it and the path length), plus one for a single
    model's fit-start weights; one pass over the weights per step; the cross-expert statistics
    stream one state-dict entry at a time every ``every_n_steps``.

    Args:
        every_n_steps: how often the task-vector statistics are computed and logged (they are
            also computed at each epoch end). None: the trainer's ``log_every_n_steps``.
        layer_depth: how state-dict keys are grouped into layers: None, the owning module;
            d, the first d dot-separated components (see :func:`merging.stability.layer_name`).
        log_layers: log the per-layer values (one key per layer and expert).
        weights: merge weights w_j of the experts for D, one per expert, >= 0 with a positive
            sum (normalised; None: uniform).
        sparsifiers: which sparsified versions to measure: ``"ties"`` (magnitude trim at
            ``density``, global scope) and/or ``"dare"`` (drop at ``drop_rate``, rescale).
        density: TIES trim density, in [0, 1].
        drop_rate: DARE drop probability p.
        seed: DARE mask seed.
        track_updates: measure the per-step update norm and the path length.
        batch_size_fn: ``batch -> b`` (one int for all models, or one per expert) when
            Lightning's ``extract_batch_size`` does not fit (e.g. experts trained on
            different parts of a mixed batch). Its result is checked on the first training
            batch, before that batch's training step.
        drift_factor: the report flags an expert whose ‖τ‖ exceeds this multiple of its peers'
            median.
        top_layers: how many layers the report lists.
        report: write the end-of-fit report.
        report_name: file stem of the report.

    Raises:
        TypeError: a setting has the wrong type (a float or bool for an int, a string for a list).
        ValueError: a setting is out of range; at fit start, ``weights`` does not have one
            entry per tracked model; on the first batch, ``batch_size_fn`` does not return one
            count or one per model.

    Attributes:
        trajectories: one :class:`~merging.stability.TrajectoryStats` per tracked model.
        history: per task-vector measurement, ``{"step", "tau_norm", "lr_integral",
            "path_length", "dispersion"}`` (the report's curves).
        train_loss: the last epoch's mean training loss over all ranks (None before one ends).
        multi_expert: whether the module is tracked as :class:`HasExperts` experts.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        layer_depth: int | None = None,
        log_layers: bool = True,
        weights: Sequence[float] | None = None,
        sparsifiers: Sequence[Sparsifier] = ("ties", "dare"),
        density: float = 0.2,
        drop_rate: float = 0.9,
        seed: int = 0,
        track_updates: bool = True,
        batch_size_fn: Callable[[Any], int | Sequence[int]] | None = None,
        drift_factor: float = 1.5,
        top_layers: int = 5,
        report: bool = True,
        report_name: str = "stability_report",
    ) -> None:
        owner = "StabilityMonitor"
        sparsifiers = check_str_list("sparsifiers", sparsifiers, nonempty=False, owner=owner)
        unknown = [s for s in sparsifiers if s not in ("ties", "dare")]
        if unknown or len(set(sparsifiers)) != len(sparsifiers):
            raise ValueError(
                f"StabilityMonitor: sparsifiers must list 'ties' and/or 'dare' (each once), got {sparsifiers}"
            )
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1, optional=True, owner=owner)
        self.layer_depth = check_int("layer_depth", layer_depth, minimum=1, optional=True, owner=owner)
        self.log_layers = check_bool("log_layers", log_layers, owner=owner)
        self.weights = check_weights("weights", weights, owner=owner)
        self.sparsifiers = tuple(sparsifiers)
        self.density = check_float("density", density, low=0.0, high=1.0, owner=owner)
        self.drop_rate = check_float("drop_rate", drop_rate, low=0.0, high=1.0, high_open=True, owner=owner)
        self.seed = check_int("seed", seed, minimum=0, owner=owner)
        self.track_updates = check_bool("track_updates", track_updates, owner=owner)
        self.batch_size_fn = check_callable("batch_size_fn", batch_size_fn, owner=owner)
        self.drift_factor = check_float("drift_factor", drift_factor, low=1.0, low_open=True, owner=owner)
        self.top_layers = check_int("top_layers", top_layers, minimum=1, owner=owner)
        self.report = check_bool("report", report, owner=owner)
        self.report_name = check_str("report_name", report_name, owner=owner)

        self.trajectories: list[TrajectoryStats] = []
        self.history: list[dict[str, Any]] = []
        self.train_loss: float | None = None
        self.multi_expert = False
        self._frozen: set[str] = set()
        self._reference: dict[str, Tensor] | None = None
        self._previous: list[dict[str, Tensor]] = []
        self._every = 1
        self._last_step = 0
        self._pending_samples: list[int] = []
        self._pending_lr: dict[int, float] = {}
        self._pending_grad: dict[int, float] = {}
        self._loss_sum = 0.0
        self._loss_count = 0
        self._loaded: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, layer_depth=self.layer_depth, weights=self.weights
        )

    # ------------------------------------------------------------------ tracked state

    def models(self, pl_module: LightningModule) -> list[dict[str, Tensor]]:
        """The tracked models' live floating tensors (detached views, no copies): one per
        expert of a :class:`HasExperts` module, else the module's own state minus frozen
        parameters."""
        if self.multi_expert:
            return [
                {k: v.detach() for k, v in expert.items() if is_mergeable(v)}
                for expert in pl_module.expert_state_dicts()  # type: ignore[attr-defined]
            ]
        return [{k: v for k, v in pl_module.state_dict().items() if is_mergeable(v) and k not in self._frozen}]

    def base(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """θ₀ the task vectors are taken from: the experts' base, or a single model's fit-start weights."""
        if self.multi_expert:
            return {k: v.detach() for k, v in pl_module.base_state_dict().items() if is_mergeable(v)}  # type: ignore[attr-defined]
        if self._reference is None:
            raise RuntimeError("StabilityMonitor: the reference weights are taken in on_fit_start; no fit has started")
        return self._reference

    def _prefix(self, j: int) -> str:
        return f"stability/expert_{j}" if self.multi_expert else "stability"

    # ----------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Called when fit, validate, test, predict, or tune begins.

        Decides between single-model and multi-expert tracking and the logging interval.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
            stage: the trainer's stage.
        """
        if stage != "fit":
            return
        self.multi_expert = isinstance(pl_module, HasExperts)
        self._every = self.every_n_steps or max(1, int(trainer.log_every_n_steps))
        self._frozen = {n for n, p in pl_module.named_parameters() if not p.requires_grad}

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called when fit begins (after a checkpoint's callback state is restored).

        Takes the single model's reference weights θ₀ (or restores them from the checkpoint)
        and the per-model trajectories.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
        """
        models = self.models(pl_module)
        if self.weights is not None and len(self.weights) != len(models):
            what = f"{len(models)} experts" if self.multi_expert else "a single model (give weights=None)"
            raise ValueError(f"StabilityMonitor: {len(self.weights)} weights given for {what}")
        loaded, self._loaded = self._loaded, None
        if not self.multi_expert:
            if loaded is not None and loaded.get("reference") is not None:
                ref = loaded["reference"]
                missing = sorted(set(models[0]) - set(ref))
                if missing:
                    raise KeyError(f"StabilityMonitor checkpoint state lacks reference weights for {missing[:5]}")
                self._reference = {k: ref[k].to(device=v.device, dtype=v.dtype) for k, v in models[0].items()}
            else:
                self._reference = {k: v.clone() for k, v in models[0].items()}
        self.trajectories = [TrajectoryStats() for _ in models]
        self.history, self.train_loss = [], None
        if loaded is not None:
            if len(loaded["trajectories"]) != len(models):
                tracked = len(loaded["trajectories"])
                raise ValueError(f"StabilityMonitor checkpoint tracked {tracked} models, this fit has {len(models)}")
            for stats, state in zip(self.trajectories, loaded["trajectories"], strict=True):
                stats.load_state_dict(state)
            self.history = list(loaded["history"])
            self.train_loss = loaded["train_loss"]
        self._describe(pl_module, models)

    def _describe(self, pl_module: LightningModule, models: list[dict[str, Tensor]]) -> None:
        """One info line: which models are tracked, against which θ₀, and how often."""
        name = type(pl_module).__name__
        entries = sum(v.numel() for v in models[0].values()) if models else 0
        if self.multi_expert:
            what = f"the {len(models)} experts of {name} ({entries:,} entries each) against their base θ₀"
        else:
            frozen = f", {len(self._frozen)} frozen parameter(s) left out" if self._frozen else ""
            what = f"{name} as one model ({entries:,} entries{frozen}) against its weights at the start of fit (θ₀)"
        sparse = ", ".join(sparsifier_label(n, self.density, self.drop_rate) for n in self.sparsifiers) or "none"
        rank_zero_info(
            f"StabilityMonitor: tracking {what}; step statistics every optimizer step, task-vector statistics "
            f"every {self._every} steps and at each epoch end; sparsified versions: {sparse}."
        )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called when the train begins: snapshots the weights the first update is measured from.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
        """
        self._last_step = trainer.global_step
        self._previous = (
            [{k: v.clone() for k, v in m.items()} for m in self.models(pl_module)] if self.track_updates else []
        )
        self._pending_samples = [0] * len(self.trajectories)
        self._pending_lr.clear()
        self._pending_grad.clear()

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called when the train epoch begins: resets the epoch's training-loss sums.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
        """
        self._loss_sum, self._loss_count = 0.0, 0

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Called when the train batch begins: counts its samples toward b_t.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
            batch: the training batch.
            batch_idx: index of the batch.
        """
        sizes = self._batch_sizes(batch)
        self._pending_samples = [p + s for p, s in zip(self._pending_samples, sizes, strict=True)]

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Called before ``optimizer.step()``: reads η_t and ‖g_t‖ of each model (observing only).

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
            optimizer: the optimizer about to step.
        """
        owners = {
            p.untyped_storage().data_ptr(): (p, float(group["lr"]))
            for group in optimizer.param_groups
            for p in group["params"]
        }
        # With a gradient scaler (16-mixed), a non-finite gradient makes the scaler skip this
        # optimizer's step: then none of the models it holds records a step.
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        stepped: list[int] = []
        for j, model in enumerate(self.models(pl_module)):
            weighted_lr, numel, grads = 0.0, 0, []
            for tensor in model.values():
                owner = owners.get(tensor.untyped_storage().data_ptr())
                if owner is None:
                    continue
                param, lr = owner
                weighted_lr += lr * tensor.numel()
                numel += tensor.numel()
                grad = _grad_view(tensor, param)
                if grad is not None:
                    grads.append(grad)
            if numel:
                self._pending_lr[j] = weighted_lr / numel
                self._pending_grad[j] = global_norm(grads)
                stepped.append(j)
        if scaled and not all(math.isfinite(self._pending_grad[j]) for j in stepped):
            for j in stepped:
                del self._pending_lr[j], self._pending_grad[j]

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Called when the train batch ends: records the step (if one was taken) and logs.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
            outputs: the training step's outputs (its ``"loss"`` feeds ``stability/train_loss``).
            batch: the training batch.
            batch_idx: index of the batch.
        """
        self._add_loss(trainer, pl_module, outputs, batch)
        if trainer.global_step == self._last_step:
            return  # accumulating gradients: no optimizer step yet
        self._last_step = trainer.global_step
        models = self.models(pl_module)
        metrics: dict[str, float] = {}
        for j, (model, stats) in enumerate(zip(models, self.trajectories, strict=True)):
            if j not in self._pending_lr:
                continue  # no optimizer holding this model's parameters stepped
            update = None
            if self.track_updates:
                previous = self._previous[j]
                update = global_norm([v - previous[k] for k, v in model.items()])
                for k, v in model.items():
                    previous[k].copy_(v)
            batch_size = max(1, self._pending_samples[j]) * trainer.world_size
            stats.update(self._pending_lr[j], batch_size, update, self._pending_grad.get(j))
            metrics.update(self._step_metrics(j, stats))
        self._pending_samples = [0] * len(self.trajectories)
        self._pending_lr.clear()
        self._pending_grad.clear()
        if trainer.global_step % self._every == 0:
            metrics.update(self._task_vector_metrics(trainer, pl_module))
        # Values of the whole step, the same on every rank: no batch to weight them by.
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called when the train epoch ends: logs the epoch's training loss (reduced across
        ranks) and the task-vector statistics.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
        """
        totals = torch.tensor([self._loss_sum, float(self._loss_count)], dtype=torch.float64, device=pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        if float(totals[1]) > 0:
            self.train_loss = float(totals[0] / totals[1])
            # Already global; sync_dist only tells Lightning so (the mean of equal values).
            pl_module.log(
                "stability/train_loss", self.train_loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=1
            )
        if trainer.global_step % self._every != 0:
            pl_module.log_dict(
                self._task_vector_metrics(trainer, pl_module), on_step=False, on_epoch=True, batch_size=1
            )

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called when training ends: rank zero writes the merge-friendliness report.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
        """
        if not self.report:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        dense, sparse = self._compute_stats(pl_module)
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self._record_history(trainer.global_step, dense)
        out_dir = Path(log_dir or trainer.default_root_dir)
        data = self.report_data(dense, sparse)
        md_path = write_text_atomic(out_dir / f"{self.report_name}.md", stability_report_markdown(data))
        figure = stability_report_figure(data)
        write_atomic(out_dir / f"{self.report_name}.png", lambda tmp: figure.savefig(tmp, format="png", dpi=110))
        rank_zero_info(f"StabilityMonitor: merge-friendliness report written to {md_path}")

    @override
    def state_dict(self) -> dict[str, Any]:
        """Called when saving a checkpoint: the statistics, the history and a single model's θ₀.

        Returns:
            The callback state.
        """
        return {
            "trajectories": [s.state_dict() for s in self.trajectories],
            "history": list(self.history),
            "train_loss": self.train_loss,
            "reference": {k: v.detach().cpu() for k, v in self._reference.items()} if self._reference else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called when loading a checkpoint; the state is applied in ``on_fit_start``.

        Args:
            state_dict: what :meth:`state_dict` returned.
        """
        missing = {"trajectories", "history", "train_loss", "reference"} - set(state_dict)
        if missing:
            raise KeyError(f"StabilityMonitor checkpoint state lacks {sorted(missing)}")
        self._loaded = state_dict

    def report_data(self, dense: TaskVectorStats, sparse: Mapping[str, TaskVectorStats]) -> StabilityReportData:
        """The measurements and settings the merge-friendliness report shows (a snapshot).

        Args:
            dense: the task-vector statistics to report.
            sparse: the same after each sparsifier, by name.
        """
        return StabilityReportData(
            dense=dense,
            sparse=dict(sparse),
            trajectories=list(self.trajectories),
            history=list(self.history),
            train_loss=self.train_loss,
            multi_expert=self.multi_expert,
            track_updates=self.track_updates,
            drift_factor=self.drift_factor,
            density=self.density,
            drop_rate=self.drop_rate,
            top_layers=self.top_layers,
        )

    # --------------------------------------------------------------------- helpers

    def _batch_sizes(self, batch: Any) -> list[int]:
        k = len(self.trajectories)
        if self.batch_size_fn is None:
            return [extract_batch_size(batch)] * k
        size = self.batch_size_fn(batch)
        if isinstance(size, Tensor) and size.numel() == 1:
            size = size.item()
        if isinstance(size, Integral) and not isinstance(size, bool):
            sizes = [int(size)] * k
        elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == k:
            sizes = [int(s) if isinstance(s, Integral) and not isinstance(s, bool) else -1 for s in size]
        else:
            models = f"{k} experts" if self.multi_expert else "1 model"
            raise ValueError(
                f"StabilityMonitor: batch_size_fn must return one int, or one int per tracked model ({models}), "
                f"got {size!r}"
            )
        if min(sizes) < 0:
            raise ValueError(f"StabilityMonitor: batch_size_fn must return sample counts (ints >= 0), got {size!r}")
        return sizes

    def _add_loss(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        if pl_module.automatic_optimization:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divides it for accumulation
        size = extract_batch_size(batch) if self.batch_size_fn is None else max(self._batch_sizes(batch))
        self._loss_sum += float(loss) * size
        self._loss_count += size

    def _step_metrics(self, j: int, stats: TrajectoryStats) -> dict[str, float]:
        p = self._prefix(j)
        metrics = {
            f"{p}/lr": stats.last_lr,
            f"{p}/lr_integral": stats.lr_integral,
            f"{p}/lr_integral_per_sample": stats.lr_integral_per_sample,
        }
        if stats.grad_steps:
            metrics[f"{p}/grad_norm"] = stats.last_grad_norm
            metrics[f"{p}/grad_sq_norm_mean"] = stats.mean_sq_grad_norm
        if self.track_updates:
            metrics[f"{p}/update_norm"] = stats.last_update_norm
            metrics[f"{p}/path_length"] = stats.path_length
        return metrics

    def _compute_stats(self, pl_module: LightningModule) -> tuple[TaskVectorStats, dict[str, TaskVectorStats]]:
        models, base = self.models(pl_module), self.base(pl_module)
        base = {k: base[k] for k in models[0]}
        common = {"layer_depth": self.layer_depth, "check": False}
        dense = task_vector_stats(models, base, self.weights, **common)
        sparse = {
            name: sparsified_task_vector_stats(
                models,
                base,
                self.weights,
                method=name,
                density=self.density,
                drop_rate=self.drop_rate,
                seed=self.seed,
                **common,
            )
            for name in self.sparsifiers
        }
        return dense, sparse

    def _record_history(self, step: int, dense: TaskVectorStats) -> None:
        self.history.append(
            {
                "step": step,
                "tau_norm": dense.norms.tolist(),
                "lr_integral": [s.lr_integral for s in self.trajectories],
                "path_length": [s.path_length for s in self.trajectories],
                "dispersion": dense.dispersion,
            }
        )

    def _task_vector_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        dense, sparse = self._compute_stats(pl_module)
        self._record_history(trainer.global_step, dense)
        metrics: dict[str, float] = {}
        for j in range(dense.num_experts):
            p = self._prefix(j)
            metrics[f"{p}/tau_norm"] = float(dense.norms[j])
            if self.log_layers:
                for layer, norms in dense.layer_norms.items():
                    metrics[f"{p}/tau_norm/layer/{layer}"] = float(norms[j])
        if self.multi_expert and dense.num_experts > 1:
            ratios = drift_ratios(dense.norms)
            for j, r in enumerate(ratios.tolist()):
                metrics[f"{self._prefix(j)}/drift_ratio"] = r
            metrics["stability/max_drift_ratio"] = float(ratios.max())
            metrics["stability/dispersion"] = dense.dispersion
            metrics["stability/sign_conflict"] = dense.sign_conflict
            metrics["stability/cosine_mean"] = dense.mean_pairwise_cosine()
            k = dense.num_experts
            for i in range(k):
                for j in range(i + 1, k):
                    metrics[f"stability/cosine/{i}_{j}"] = float(dense.cosine[i, j])
            if self.log_layers:
                for layer, value in dense.layer_dispersion.items():
                    metrics[f"stability/dispersion/layer/{layer}"] = value
                    metrics[f"stability/sign_conflict/layer/{layer}"] = dense.layer_sign_conflict[layer]
        for name, stats in sparse.items():
            metrics[f"stability/{name}/tau_norm"] = float(stats.norms.mean())
            if self.multi_expert and stats.num_experts > 1:
                metrics[f"stability/{name}/dispersion"] = stats.dispersion
                metrics[f"stability/{name}/sign_conflict"] = stats.sign_conflict
        return metrics


def _grad_view(tensor: Tensor, param: Tensor) -> Tensor | None:
    """The part of ``param.grad`` that belongs to ``tensor``, a view of (or ``param`` itself)."""
    grad = param.grad
    if grad is None:
        return None
    same = (
        tensor.shape == param.shape
        and tensor.stride() == param.stride()
        and tensor.storage_offset() == param.storage_offset()
    )
    if same:
        return grad
    if grad.stride() != param.stride():
        return None
    offset = grad.storage_offset() + tensor.storage_offset() - param.storage_offset()
    return grad.as_strided(tensor.shape, tensor.stride(), offset)


__all__ = ["StabilityMonitor"]
