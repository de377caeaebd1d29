r"""
Expert Drift Stopper
^^^^^^^^^^^^^^^^^^^^

An *action* callback (opt-in): freezes an expert whose task vector outgrows its peers'.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from merging._validation import check_float, check_int
from merging.modules.protocols import HasExperts
from merging.stability_stats import drift_ratios, task_vector_norms


class ExpertDriftStopper(Callback):
    r"""Stop fine-tuning an expert once it drifts ``factor`` times further from θ₀ than its peers.

    The drift ratio of expert j is ‖τ_j‖ / median_{k≠j} ‖τ_k‖ (the ``stability/expert_{j}/
    drift_ratio`` that :class:`~callbacks.StabilityMonitor` logs). Under the SGD-stability
    template, an expert that moves much further than the others (a larger step size, batch
    or step budget) dominates the dispersion D of the merge; this callback caps that by
    freezing it where it stands. This is a heuristic built on measurements, not a rule from
    the L2-stability paper (whose recommendations are not available). Off unless added.

    Unlike :class:`~callbacks.StabilityMonitor`, this callback changes training: from the
    step an expert is stopped, its parameters' gradients are set to ``None`` in
    ``on_before_optimizer_step``, so PyTorch optimizers skip them (no gradient step, no
    momentum, no weight decay). Floating buffers (BatchNorm running statistics) still update
    in train-mode forward passes. Stopped experts stay stopped; the others keep training.
    Each expert's tensors must be whole parameters (not views of a parameter shared with
    other experts), else stopping it raises.

    Logged every check: ``stability/num_stopped`` and ``stability/expert_{j}/stopped`` (0/1).
    DDP: the weights are the same on every rank, and rank zero's decision is broadcast, so all
    ranks stop the same experts.

    Args:
        factor: stop expert j when its drift ratio exceeds this (> 1).
        check_every_n_steps: how often (optimizer steps) the ratios are checked.
        min_steps: no expert is stopped before this many optimizer steps.
        max_stopped: at most this many experts are stopped, >= 1 (None: all but one).

    Raises:
        TypeError: a setting has the wrong type (a float or bool for an int).
        ValueError: a setting is out of range.

    Attributes:
        stopped: ``{expert index: the global step it was stopped at}``.
    """

    def __init__(
        self, factor: float = 3.0, check_every_n_steps: int = 1, min_steps: int = 0, max_stopped: int | None = None
    ) -> None:
        owner = "ExpertDriftStopper"
        self.factor = check_float("factor", factor, low=1.0, low_open=True, owner=owner)
        self.check_every_n_steps = check_int("check_every_n_steps", check_every_n_steps, minimum=1, owner=owner)
        self.min_steps = check_int("min_steps", min_steps, minimum=0, owner=owner)
        self.max_stopped = check_int("max_stopped", max_stopped, minimum=1, optional=True, owner=owner)
        self.stopped: dict[int, int] = {}
        self._last_step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(factor=self.factor, min_steps=self.min_steps)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Called when fit, validate, test, predict, or tune begins: checks the module has experts.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
            stage: the trainer's stage.

        Raises:
            TypeError: the module is not a :class:`HasExperts`.
        """
        if stage == "fit" and not isinstance(pl_module, HasExperts):
            raise TypeError(
                f"ExpertDriftStopper needs a module with experts (merging.modules.protocols.HasExperts); "
                f"{type(pl_module).__name__} is not one"
            )

    def drift_ratios(self, pl_module: LightningModule) -> Tensor:
        """‖τ_j‖ / median_{k≠j} ‖τ_k‖ of the module's current experts (K,)."""
        experts = pl_module.expert_state_dicts()  # type: ignore[attr-defined]
        return drift_ratios(task_vector_norms(experts, pl_module.base_state_dict()))  # type: ignore[attr-defined]

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Called when the train batch ends: after every ``check_every_n_steps`` optimizer steps,
        stops the experts whose drift ratio exceeds ``factor``.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
            outputs: the training step's outputs.
            batch: the training batch.
            batch_idx: index of the batch.
        """
        step = trainer.global_step
        if step == self._last_step or step % self.check_every_n_steps != 0:
            return
        self._last_step = step
        ratios = self.drift_ratios(pl_module)
        k = ratios.numel()
        limit = k - 1 if self.max_stopped is None else min(self.max_stopped, k - 1)
        new: list[int] = []
        if step >= self.min_steps:
            for j in torch.argsort(ratios, descending=True).tolist():
                if len(self.stopped) + len(new) >= limit:
                    break
                if j not in self.stopped and float(ratios[j]) > self.factor:
                    new.append(j)
        new = trainer.strategy.broadcast(new, src=0)
        for j in new:
            self.stopped[j] = step
            rank_zero_info(
                f"ExpertDriftStopper: stopping expert {j} at step {step}: it drifted {float(ratios[j]):.2f}× "
                f"its peers' median distance from θ₀ (factor {self.factor})"
            )
        metrics = {f"stability/expert_{j}/stopped": float(j in self.stopped) for j in range(k)}
        metrics["stability/num_stopped"] = float(len(self.stopped))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Called before ``optimizer.step()``: drops the gradients of the stopped experts.

        Args:
            trainer: the current :class:`~lightning.pytorch.trainer.trainer.Trainer` instance.
            pl_module: the current :class:`~lightning.pytorch.core.LightningModule` instance.
            optimizer: the optimizer about to step.
        """
        if not self.stopped:
            return
        experts = pl_module.expert_state_dicts()  # type: ignore[attr-defined]
        for j in self.stopped:
            for param in _whole_parameters(pl_module, experts[j], j):
                param.grad = None

    @override
    def state_dict(self) -> dict[str, Any]:
        """Called when saving a checkpoint: the stopped experts and their steps.

        Returns:
            The callback state.
        """
        return {"stopped": dict(self.stopped)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called when loading a checkpoint.

        Args:
            state_dict: what :meth:`state_dict` returned.
        """
        self.stopped = {int(j): int(step) for j, step in state_dict["stopped"].items()}


def _whole_parameters(module: nn.Module, expert: dict[str, Tensor], index: int) -> list[nn.Parameter]:
    """The module's parameters that are exactly ``expert``'s trainable tensors.

    Raises:
        ValueError: an expert tensor is only part of a parameter (shared with other experts).
    """
    by_storage = {p.untyped_storage().data_ptr(): p for p in module.parameters()}
    params = []
    for key, tensor in expert.items():
        param = by_storage.get(tensor.untyped_storage().data_ptr())
        if param is None:
            continue  # a buffer
        if tensor.shape != param.shape or tensor.storage_offset() != param.storage_offset():
            raise ValueError(
                f"ExpertDriftStopper cannot stop expert {index}: its {key!r} is a view of a parameter shared "
                "with other experts"
            )
        params.append(param)
    return params


__all__ = ["ExpertDriftStopper"]
