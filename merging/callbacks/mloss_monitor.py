r"""
M-Loss Monitor
^^^^^^^^^^^^^^

Watch, during a fit, how far averaging the weights is from ensembling the models
(M-Loss: Wang et al., AAAI 2026, https://arxiv.org/abs/2602.08564), in any Lightning project.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from typing_extensions import override

from merging._validation import (
    check_activation_map,
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_str,
    check_str_list,
    listed,
)
from merging.io import load_state_dict
from merging.mloss import OUTPUT, MLossMeter, MLossReport, as_forward_args, check_state_keys
from merging.mloss.metric import MLoss
from merging.modules.protocols import HasExperts
from merging.report import save_node_map
from merging.state import StateDict

DEFAULT_EVERY_N_TRAIN_STEPS = 100
"""Measure every 100 optimizer steps when no schedule is given. A measurement costs about
``num_batches`` · (K + 1) forward passes (the K experts' outputs and the averaged model's;
θ₀'s forward, and a snapshot's or peer's, are replayed from the cache after the first
measurement) plus K GEMMs of each measured layer and the gap's element-wise work: 3-4 % of
the training step time on the digits default (``MultiExpertModule``, K = 4), and under 5 %
for a single SmallCNN and for BoringModel (``benchmarks/results/mloss_overhead.md``, which
also counts a measurement's kernels and its one host-device sync)."""


class MLossMonitor(Callback):
    r"""Log the M-Loss of the weights being trained, per layer, through ``pl_module.log``.

    What is measured:

    - a :class:`~merging.modules.protocols.HasExperts` module (K experts trained
      jointly): its live experts against each other, on ``pl_module.skeleton``, with
      ``base_state_dict()`` as θ₀, inputs from ``pl_module.batch_inputs(batch)``;
    - any other ``LightningModule``: its current weights against a snapshot taken at the
      start of the fit (experts ``[snapshot, current]``, θ₀ = the snapshot), or, when
      ``peers`` are given, the current weights together with those checkpoints (experts
      ``[current, *peers]``, θ₀ = the snapshot): how well the model being trained would merge
      with its peers.

    Inputs: the first ``num_batches`` batches the fit trains on (each rank caches its own
    shard, detached copies, before the step trains on them; a first epoch with fewer
    batches closes the cache), passed through ``input_fn`` (default: the batch itself if it
    is a Tensor, else its first element; ``pl_module.batch_inputs`` for multi-expert
    modules). The cached batches are part of the checkpoint (every rank's, gathered once when
    the cache closes: ``num_batches`` × world size batches, on the CPU), so a resumed fit
    measures on the same inputs as an uninterrupted one. A checkpoint taken before the cache
    closed, or a resume on another number of processes, refills it from the first batches
    after the resume (with a warning).

    Every ``every_n_train_steps`` optimizer steps (or ``every_n_epochs`` epochs) it logs
    ``<prefix>/layer/<name>``, ``<prefix>/normalized/<name>`` and ``<prefix>/mean``. The sums
    and counts are reduced across ranks by the :class:`~merging.mloss.metric.MLoss` metric, so a
    DDP run logs the M-Loss of all ranks' inputs together (identical on every rank). A
    measurement runs in ``no_grad`` and eval mode, restores every module's train/eval flag
    and the RNG states, and never changes the weights.

    Cost on a GPU: a measurement reads its values to the host once (one host-device sync,
    whatever the number of layers) and logs them, after a step, as CPU tensors (so
    ``trainer.callback_metrics`` holds them on the CPU, and neither Lightning nor the loggers
    copy them between host and device); at an epoch end, where Lightning reduces them across
    ranks, they are logged on the module's device. A step that does not measure runs no
    tensor operation at all (after the first ``num_batches`` steps, which cache the inputs).

    The fit's last step is always measured and logged: if the schedule did not measure it, the
    last epoch's end does (logged with ``on_epoch=True``), when the fit ends there by
    ``max_epochs``, ``max_steps`` or ``trainer.should_stop``; a fit stopped in another way
    (``should_stop`` set by a callback running after this one at that epoch end) is measured
    in ``on_train_end``, where Lightning allows no logging, into :attr:`history` and
    :attr:`last_report` only. This end-of-fit measurement is off the schedule, so a checkpoint
    leaves it out: a fit resumed from that checkpoint did not end there, and its history equals
    an uninterrupted fit's. At the end of the fit rank zero writes the node map (layers × node
    groups, as the paper's Fig. 3) as a PNG into ``trainer.log_dir``.

    Sharded strategies (FSDP, DeepSpeed) are not supported: the callback reads full state dicts.

    Args:
        every_n_train_steps: measure after every N optimizer steps. Default
            (neither schedule given): :data:`DEFAULT_EVERY_N_TRAIN_STEPS`.
        every_n_epochs: measure after every N training epochs instead.
        num_batches: how many training batches to cache and measure on.
        input_fn: ``batch -> forward's positional arguments`` (a Tensor or a tuple), e.g.
            ``lambda batch: (batch[0], batch[1])`` for a model called as ``forward(inputs, target)``
            (a module-level function under ``strategy="ddp_spawn"``, which pickles the callbacks).
        peers: checkpoint files of peer experts (safetensors, torch, Lightning ``.ckpt``),
            keyed like ``pl_module.state_dict()`` (after ``peer_prefix``), loaded with
            :func:`merging.io.load_state_dict`.
        peer_prefix: key prefix to keep and strip when loading peers.
        reference: the model whose layer inputs are hooked: ``"pretrained"`` (θ₀),
            ``"average"``, ``"incremental"`` (see :func:`merging.mloss.m_loss`).
        layers: layer names to measure (checked against the model when the fit starts), or
            ``{name: activation σ}`` where σ is functional (``F.relu`` in ``forward``); None:
            every Linear/Conv feeding an activation module.
        output: also measure the model output (logged as ``<prefix>/layer/output``).
        node_groups: columns of the node map.
        heatmap_filename: file name of the node map PNG; None: do not write it.
        log_prefix: the first part of every logged key.
        cache_forwards: evaluate the models that do not change during the fit (θ₀, the
            snapshot, the peers) once per cached batch and reuse their hooked layer inputs
            and outputs at later measurements (:class:`merging.mloss.MLossMeter`'s
            ``cache_forwards``; the values are the same). Costs a copy of the measured
            layers' inputs for ``num_batches`` batches.

    Raises:
        TypeError: a setting has the wrong type (a float or bool for an int, a string for a list).
        ValueError: a setting is out of range; at fit start, ``layers`` names no measurable
            module of the model (the message lists the measurable ones).

    Example::

        trainer = Trainer(callbacks=[MLossMonitor(every_n_train_steps=100)])
        # lightning.pytorch.demos.Transformer, called as forward(inputs, target):
        MLossMonitor(input_fn=lambda batch: (batch[0], batch[1]))
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        num_batches: int = 2,
        input_fn: Callable[[Any], Any] | None = None,
        peers: Sequence[str] | None = None,
        peer_prefix: str | None = None,
        reference: Literal["pretrained", "incremental", "average"] = "pretrained",
        layers: list[str] | dict[str, Callable[[Tensor], Tensor]] | None = None,
        output: bool = True,
        node_groups: int = 32,
        heatmap_filename: str | None = "mloss_node_map.png",
        log_prefix: str = "mloss",
        cache_forwards: bool = True,
    ) -> None:
        owner = "MLossMonitor"
        every_n_train_steps = check_int(
            "every_n_train_steps", every_n_train_steps, minimum=1, optional=True, owner=owner
        )
        every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=1, optional=True, owner=owner)
        if every_n_train_steps is not None and every_n_epochs is not None:
            raise ValueError("MLossMonitor: give every_n_train_steps or every_n_epochs, not both")
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_train_steps = DEFAULT_EVERY_N_TRAIN_STEPS
        if isinstance(peers, (str, os.PathLike)):
            peers = [peers]
        if peers is not None and not isinstance(peers, Sequence):
            raise TypeError(f"MLossMonitor: peers must be a list of checkpoint paths or None, got {peers!r}")
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.num_batches = check_int("num_batches", num_batches, minimum=1, owner=owner)
        self.input_fn = check_callable("input_fn", input_fn, owner=owner)
        self.peers = [check_str("peers", path, path=True, owner=owner) for path in peers or []]
        self.peer_prefix = check_str("peer_prefix", peer_prefix, optional=True, nonempty=False, owner=owner)
        self.reference = check_choice("reference", reference, ("pretrained", "incremental", "average"), owner=owner)
        self.layers = (
            check_activation_map("layers", layers, owner=owner)
            if isinstance(layers, Mapping)
            else check_str_list("layers", layers, optional=True, owner=owner)
        )
        self.output = check_bool("output", output, owner=owner)
        self.node_groups = check_int("node_groups", node_groups, minimum=1, owner=owner)
        self.heatmap_filename = check_str("heatmap_filename", heatmap_filename, optional=True, owner=owner)
        self.log_prefix = check_str("log_prefix", log_prefix, owner=owner)
        self.cache_forwards = check_bool("cache_forwards", cache_forwards, owner=owner)

        self._snapshot: StateDict | None = None
        self._peer_states: list[StateDict] = []
        self._inputs: list[tuple] = []
        self._cache_closed = False
        self._saved_inputs: list[list[tuple]] | None = None
        self._restored: dict[str, Any] | None = None
        self._meter: MLossMeter | None = None
        self._metric: MLoss | None = None
        self._history: list[dict[str, float]] = []
        self._scheduled: list[bool] = []
        self._last_report: MLossReport | None = None
        self._last_measured_step = -1
        self._last_measured_epoch = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_train_steps=self.every_n_train_steps,
            every_n_epochs=self.every_n_epochs,
            reference=self.reference,
            log_prefix=self.log_prefix,
        )

    @property
    def history(self) -> list[dict[str, float]]:
        """One entry per measurement: ``step``, ``epoch`` and the logged values."""
        return list(self._history)

    @property
    def last_report(self) -> MLossReport | None:
        """The latest full report (node M-Loss included), or None before the first measurement."""
        return self._last_report

    def should_measure(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """The schedule: called with the zero-based index of the last optimizer step, or of
        the epoch that just ended. Override it for another policy.

        Args:
            step_idx: index of the last optimizer step, or None at an epoch end.
            epoch_idx: index of the epoch that ended, or None after a step.

        Returns:
            Whether to measure now.
        """
        if step_idx is not None and self.every_n_train_steps is not None:
            return (step_idx + 1) % self.every_n_train_steps == 0
        if epoch_idx is not None and self.every_n_epochs is not None:
            return (epoch_idx + 1) % self.every_n_epochs == 0
        return False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Called when fit, validate, test, predict, or tune begins.

        At fit: loads the peer checkpoints and clears what a previous fit left (a resumed
        fit then restores the snapshot, the history and the input cache from its checkpoint).

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
            stage: the :class:`~lightning.pytorch.trainer.trainer.Trainer` state.
        """
        if stage != "fit":
            return
        self._peer_states = [load_state_dict(path, prefix=self.peer_prefix) for path in self.peers]
        model = pl_module.skeleton if isinstance(pl_module, HasExperts) else pl_module
        for path, state in zip(self.peers, self._peer_states):
            check_state_keys(model, state, f"peer checkpoint {path}")
        self._snapshot = None
        self._inputs = []
        self._cache_closed = False
        self._saved_inputs = None
        self._restored = None
        self._meter = None
        self._metric = None
        self._history = []
        self._scheduled = []
        self._last_report = None
        self._last_measured_step = -1
        self._last_measured_epoch = -1

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called when fit begins (after ``configure_model``, before any step): checks that
        ``layers`` names measurable modules of the model.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.

        Raises:
            ValueError: a name in ``layers`` is no ``nn.Linear``/``nn.Conv`` module of the
                measured model; the message lists those it has.
        """
        if self.layers is not None:
            model = pl_module.skeleton if isinstance(pl_module, HasExperts) else pl_module
            _check_layers(model, self.layers)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called when the train begins.

        Takes the start-of-fit snapshot of a single-model module (unless one was restored
        from a checkpoint), moves the snapshot and peers to the module's device, and puts back
        this rank's input cache restored from a checkpoint.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
        """
        device = pl_module.device
        if not isinstance(pl_module, HasExperts):
            if self._snapshot is None:
                self._snapshot = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            else:
                check_state_keys(pl_module, self._snapshot, "MLossMonitor snapshot restored from the checkpoint")
                self._snapshot = {k: v.to(device) for k, v in self._snapshot.items()}
        self._peer_states = [{k: v.to(device) for k, v in state.items()} for state in self._peer_states]
        restored, self._restored = self._restored, None
        if restored is None:
            return
        saved = restored.get("inputs")
        if saved is not None and len(saved) == trainer.world_size:
            self._inputs = [_to_device(args, device) for args in saved[trainer.global_rank]]
            self._cache_closed = True
            self._saved_inputs = saved
            return
        if saved is None:
            why = "the checkpoint holds no input cache (it was taken before the cache was full)"
        else:
            why = (
                f"the checkpoint's input cache was taken by {len(saved)} processes and this fit runs "
                f"{trainer.world_size}"
            )
        rank_zero_warn(
            f"MLossMonitor: {why}; the cache is refilled from the first batches after the resume, so the "
            "measurements differ from an uninterrupted fit's"
        )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Called when a training batch begins: caches its inputs until ``num_batches`` are held.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
            batch: the training batch.
            batch_idx: index of the training batch.
        """
        if self._cache_closed:
            return
        self._inputs.append(self._select_inputs(pl_module, batch))
        if len(self._inputs) >= self.num_batches:
            self._close_cache(trainer)
        if self._meter is None:
            self._build_meter(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        """Called when a training batch ends: measures and logs if :meth:`should_measure` says so.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
            outputs: outputs of the training step.
            batch: the training batch.
            batch_idx: index of the training batch.
        """
        step = trainer.global_step
        if step > self._last_measured_step and step > 0 and self.should_measure(step_idx=step - 1):
            report = self._measure(trainer, pl_module, scheduled=True)
            self._log(pl_module, report, on_epoch=False)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called when a training epoch ends: closes the input cache; measures and logs if
        :meth:`should_measure` says so, or if the fit ends with this epoch and its last step
        was not measured.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
        """
        if not self._cache_closed:
            self._close_cache(trainer)
        if not self._inputs:
            return
        epoch = trainer.current_epoch
        if epoch > self._last_measured_epoch and self.should_measure(epoch_idx=epoch):
            self._last_measured_epoch = epoch
            self._log(pl_module, self._measure(trainer, pl_module, scheduled=True), on_epoch=True)
        elif self._last_measured_step != trainer.global_step and _fit_ends_after_this_epoch(trainer):
            self._log(pl_module, self._measure(trainer, pl_module, scheduled=False), on_epoch=True)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called when training ends: measures the final weights (if the last step was not
        measured) and, on rank zero, writes the node map.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
        """
        if not self._inputs:
            rank_zero_warn("MLossMonitor: no training batch was seen, so nothing was measured")
            return
        if self._last_measured_step != trainer.global_step or self._last_report is None:
            self._measure(trainer, pl_module, scheduled=False)
        if self.heatmap_filename is None:
            return
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every rank asks
        if trainer.is_global_zero and self._last_report is not None:
            path = Path(log_dir) / self.heatmap_filename
            save_node_map(
                self._last_report.node,
                path,
                groups=self.node_groups,
                title=f"node M-Loss at step {trainer.global_step}",
            )
            rank_zero_info(f"MLossMonitor: node map written to {path}")

    @override
    def state_dict(self) -> dict[str, Any]:
        """Called when saving a checkpoint: the start-of-fit snapshot (on the CPU), the
        scheduled measurements' history, the schedule's position and every rank's cached
        inputs (on the CPU; None before the cache closed). An end-of-fit measurement off the
        schedule is left out: a fit resumed from this checkpoint does not end here.

        Returns:
            The callback state.
        """
        snapshot = None if self._snapshot is None else {k: v.detach().cpu() for k, v in self._snapshot.items()}
        scheduled = [entry for entry, on_schedule in zip(self._history, self._scheduled) if on_schedule]
        return {
            "snapshot": snapshot,
            "history": scheduled,
            "last_measured_step": int(scheduled[-1]["step"]) if scheduled else -1,
            "last_measured_epoch": self._last_measured_epoch,
            "inputs": self._saved_inputs,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called when loading a checkpoint: restores what :meth:`state_dict` saved (the input
        cache is put back in ``on_train_start``, where the rank is known).

        Args:
            state_dict: the callback state.
        """
        self._snapshot = state_dict["snapshot"]
        self._history = list(state_dict["history"])
        self._scheduled = [True] * len(self._history)
        self._last_measured_step = state_dict["last_measured_step"]
        self._last_measured_epoch = state_dict["last_measured_epoch"]
        self._restored = state_dict

    # ------------------------------------------------------------------------ internals

    def _select_inputs(self, pl_module: LightningModule, batch: Any) -> tuple:
        """Forward's positional arguments from a training batch, detached copies."""
        if self.input_fn is not None:
            inputs = self.input_fn(batch)
        elif isinstance(pl_module, HasExperts):
            inputs = pl_module.batch_inputs(batch)
        elif isinstance(batch, Tensor):
            inputs = batch
        elif isinstance(batch, (tuple, list)) and len(batch) > 0:
            inputs = batch[0]
        else:
            raise TypeError(
                f"MLossMonitor: cannot pick the model input out of a {type(batch).__name__} batch; "
                "give input_fn=lambda batch: <forward's positional arguments>"
            )
        return tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in as_forward_args(inputs))

    def _models(
        self, pl_module: LightningModule
    ) -> tuple[nn.Module, list[Mapping[str, Tensor]], Mapping[str, Tensor]]:
        """(skeleton, experts, θ₀) of the measurement."""
        if isinstance(pl_module, HasExperts):
            experts = list(pl_module.expert_state_dicts()) + self._peer_states
            return pl_module.skeleton, experts, pl_module.base_state_dict()
        if self._snapshot is None:
            raise RuntimeError("MLossMonitor: no start-of-fit snapshot; was on_train_start called?")
        current = pl_module.state_dict()
        experts = [current, *self._peer_states] if self._peer_states else [self._snapshot, current]
        return pl_module, experts, self._snapshot

    def _close_cache(self, trainer: Trainer) -> None:
        """Stop caching, and gather every rank's cached inputs (CPU copies) for the checkpoint:
        a collective, reached by every rank at the same batch."""
        self._cache_closed = True
        local = [tuple(a.detach().cpu() if isinstance(a, Tensor) else a for a in args) for args in self._inputs]
        if trainer.world_size == 1:
            self._saved_inputs = [local]
        elif dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            self._saved_inputs = gathered
        else:
            self._saved_inputs = None

    def _build_meter(self, pl_module: LightningModule) -> None:
        """Trace the measured layers on the first cached batch (before the first step trains on
        it, so a bad ``layers`` setting fails before any training) and say what is measured."""
        model, experts, base = self._models(pl_module)
        with torch.no_grad(), _preserve_rng(pl_module.device):
            self._meter = MLossMeter(
                model,
                experts,
                self._inputs[0],
                base=base,
                layers=self.layers,
                reference=self.reference,
                output=self.output,
                check_values=False,
                cache_forwards=self.cache_forwards,
            )
        self._describe(pl_module, self._meter.layer_names, num_experts=len(experts))

    def _describe(self, pl_module: LightningModule, layers: list[str], *, num_experts: int) -> None:
        """One info line: which models, which layers, which reference, how often; a warning
        when no hidden layer is measured."""
        name = type(pl_module).__name__
        if isinstance(pl_module, HasExperts):
            models = f"the {num_experts - len(self._peer_states)} experts of {name} against each other"
            if self._peer_states:
                models += f" and {len(self._peer_states)} peer checkpoint(s)"
            base = "their shared base"
        elif self._peer_states:
            models = f"{name} together with {len(self._peer_states)} peer checkpoint(s)"
            base = "its weights at the start of fit"
        else:
            models = f"{name}'s current weights against its weights at the start of fit"
            base = "the start-of-fit weights"
        shown = ", ".join(layers[:4]) + (f", ... ({len(layers)} in all)" if len(layers) > 4 else "")
        what = f"{len(layers)} layer(s) ({shown})" if layers else "no hidden layer"
        if self.output:
            what += " and the model output"
        schedule = (
            f"every {self.every_n_train_steps} optimizer steps"
            if self.every_n_train_steps is not None
            else f"every {self.every_n_epochs} epoch(s)"
        )
        rank_zero_info(
            f"MLossMonitor: M-Loss of {models}, on {what}; θ₀ = {base}, reference={self.reference!r}; "
            f"{schedule} and at the end of fit, on {self.num_batches} cached training batch(es)."
        )
        if not layers:
            rank_zero_warn(
                f"MLossMonitor: no nn.Linear/nn.Conv layer of {name} feeds an element-wise activation module, so "
                + ("only the model output is measured" if self.output else "nothing is measured")
                + ". The output M-Loss is 0 whenever the output is linear in the weights (averaging the weights "
                "then equals averaging the outputs). Name the layers with layers=[...] (a mapping "
                "{name: activation} when the activation is functional)."
            )

    def _measure(self, trainer: Trainer, pl_module: LightningModule, *, scheduled: bool) -> MLossReport:
        """M-Loss on the cached inputs, reduced over ranks (every rank must call it).
        ``scheduled``: a measurement of the schedule (kept in checkpoints), not an end-of-fit one."""
        model, experts, base = self._models(pl_module)
        with torch.no_grad(), _preserve_rng(pl_module.device):
            if self._meter is None:  # inputs restored from a checkpoint, no batch seen since
                self._build_meter(pl_module)
            self._meter.set_experts(experts, base, check_values=False)
            if self._metric is None:
                self._metric = MLoss(self._meter.node_sizes).to(pl_module.device)
            self._metric.reset()
            for args in self._inputs:
                self._metric.update(self._meter.measure(args))
            report = self._metric.compute()
        self._last_report = report
        self._last_measured_step = trainer.global_step
        entry = {"step": float(trainer.global_step), "epoch": float(trainer.current_epoch)}
        entry.update(report.scalars(self.log_prefix))
        self._history.append(entry)
        self._scheduled.append(scheduled)
        return report

    def _log(self, pl_module: LightningModule, report: MLossReport, *, on_epoch: bool) -> None:
        """Log the report's values, already on the host (read once by the metric).

        After a step they are logged as CPU tensors: Lightning would copy each Python float to
        the module's device (on a GPU a host-device sync per value) and its loggers read them
        back (another per value, at every logging step until the epoch ends). At an epoch end
        Lightning reduces them across ranks (``sync_dist``), which needs them on the module's
        device: one copy of all the values together.
        """
        scalars = report.scalars(self.log_prefix)
        device = pl_module.device if on_epoch else torch.device("cpu")
        dtype = torch.get_default_dtype() if torch.get_default_dtype() == torch.float64 else torch.float32
        values = torch.tensor(list(scalars.values()), dtype=dtype, device=device)  # Lightning's dtype for floats
        # The values are already reduced over ranks by the MLoss metric; syncing again at
        # epoch level only averages identical values (and keeps Lightning from warning).
        for key, value in zip(scalars, values.unbind()):
            pl_module.log(key, value, on_step=not on_epoch, on_epoch=on_epoch, sync_dist=on_epoch, batch_size=1)


def _check_layers(model: nn.Module, layers: Sequence[str]) -> None:
    """Every name in ``layers`` is an ``nn.Linear``/``nn.Conv`` module of ``model``."""
    measurable = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    bad = [name for name in layers if name not in measurable]
    if bad:
        reserved = f" ({OUTPUT!r} is the model output, measured with output=True)" if OUTPUT in bad else ""
        raise ValueError(
            f"MLossMonitor: layers {bad} name no nn.Linear/nn.Conv module of {type(model).__name__}{reserved}; "
            f"its measurable layers are {listed(measurable) or 'none'}"
        )


def _fit_ends_after_this_epoch(trainer: Trainer) -> bool:
    """Whether Lightning's fit loop stops after the epoch whose ``on_train_epoch_end`` runs
    now: ``max_steps`` or ``max_epochs`` reached, or ``should_stop`` set with ``min_epochs``
    and ``min_steps`` met (the fit loop's own conditions)."""
    epochs, steps = trainer.current_epoch + 1, trainer.global_step
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= steps:
        return True
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epochs:
        return True
    if not trainer.should_stop:
        return False
    met_min_epochs = not trainer.min_epochs or epochs >= trainer.min_epochs
    return met_min_epochs and (not trainer.min_steps or steps >= trainer.min_steps)


def _to_device(args: tuple, device: torch.device) -> tuple:
    return tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)


@contextmanager
def _preserve_rng(device: torch.device) -> Iterator[None]:
    """Leave the torch RNG streams (CPU, and the module's CUDA device) as they were."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


__all__ = ["DEFAULT_EVERY_N_TRAIN_STEPS", "MLossMonitor"]
