"""LightningModules that train: the shared backbone's pretraining, and K experts jointly.

Both read a :class:`~merging.datamodules.MultiTaskDataModule`'s combined training batch
``{task_name: (x, y)}`` and its per-task validation loaders (``dataloader_idx`` = task).
Task names and class counts are taken from the datamodule in ``setup`` when not given, so
a YAML config needs to name the data only once.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from merging._validation import check_float, check_int, check_int_list, check_str, check_str_list
from merging.bundle import ExpertBundle
from merging.io import load_state_dict, save_state_dict
from merging.models import build_backbone
from merging.modules.protocols import HasExperts
from merging.state import StateDict


class _TaskModule(pl.LightningModule):
    """Shared plumbing: a backbone spec, task names/classes (from the datamodule if not
    given), per-task heads and per-task validation accuracy."""

    def __init__(
        self,
        backbone: str,
        backbone_kwargs: dict | None,
        in_chans: int,
        task_names: list[str] | None,
        num_classes: list[int] | None,
        lr: float,
        weight_decay: float,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if backbone_kwargs is not None and not isinstance(backbone_kwargs, Mapping):
            raise TypeError(f"{owner}: backbone_kwargs must be a dict or None, got {backbone_kwargs!r}")
        self.backbone_name = check_str("backbone", backbone, owner=owner)
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.in_chans = check_int("in_chans", in_chans, minimum=1, owner=owner)
        self.task_names = check_str_list("task_names", task_names, optional=True, owner=owner)
        self.num_classes = check_int_list("num_classes", num_classes, minimum=1, optional=True, owner=owner)
        self.lr = check_float("lr", lr, low=0.0, low_open=True, owner=owner)
        self.weight_decay = check_float("weight_decay", weight_decay, low=0.0, owner=owner)
        self.skeleton = build_backbone(backbone, in_chans=in_chans, **self.backbone_kwargs)
        self.heads: nn.ModuleList | None = None
        self.val_acc: nn.ModuleList | None = None
        if self.num_classes is not None:
            self._build_heads()

    def _build_heads(self) -> None:
        if self.task_names is None:
            self.task_names = [f"task_{t}" for t in range(len(self.num_classes))]
        if len(self.task_names) != len(self.num_classes):
            raise ValueError(f"{len(self.task_names)} task names but {len(self.num_classes)} class counts")
        d = self.skeleton.num_features
        self.heads = nn.ModuleList(nn.Linear(d, n) for n in self.num_classes)
        self.val_acc = nn.ModuleList(MulticlassAccuracy(num_classes=n) for n in self.num_classes)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.heads is None:
            if datamodule is None or not hasattr(datamodule, "num_classes"):
                raise ValueError(
                    f"{type(self).__name__}: num_classes was not given and the trainer has no "
                    "multi-task datamodule to read it from"
                )
            self.task_names = list(datamodule.task_names)
            self.num_classes = list(datamodule.num_classes)
            self._build_heads()
        elif (
            datamodule is not None
            and hasattr(datamodule, "num_classes")
            and list(datamodule.num_classes) != self.num_classes
        ):
            raise ValueError(
                f"{type(self).__name__}: num_classes={self.num_classes} does not match the "
                f"datamodule's {list(datamodule.num_classes)}"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def _log_val(self, task: int, logits: Tensor, y: Tensor) -> None:
        self.val_acc[task](logits, y)
        self.log(
            f"val/acc/{self.task_names[task]}", self.val_acc[task], on_epoch=True, add_dataloader_idx=False
        )


class PretrainModule(_TaskModule):
    """Pretrains the shared backbone θ₀ (plus throwaway heads) on some tasks, so a real
    "pretrained" starting point exists offline.

    Args:
        backbone: backbone name (:func:`merging.models.build_backbone`).
        backbone_kwargs: its constructor arguments.
        in_chans: input channels.
        pretrain_tasks: indices of the tasks trained on (default: the first task only, which
            leaves the other tasks for the experts to learn).
        task_names: task names (default: from the datamodule).
        num_classes: classes per task (default: from the datamodule).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        export_path: where rank zero writes θ₀ as safetensors at the end of fit.

    Raises:
        TypeError: an argument has the wrong type (a float or bool for an int, a string for a list).
        ValueError: an argument is out of range, or ``pretrain_tasks`` names no task (checked
            against the datamodule's tasks in ``setup``).
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        backbone_kwargs: dict | None = None,
        in_chans: int = 1,
        pretrain_tasks: list[int] | None = None,
        task_names: list[str] | None = None,
        num_classes: list[int] | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        export_path: str | None = None,
    ) -> None:
        super().__init__(backbone, backbone_kwargs, in_chans, task_names, num_classes, lr, weight_decay)
        self.save_hyperparameters()
        pretrain_tasks = check_int_list(
            "pretrain_tasks", pretrain_tasks, minimum=0, optional=True, owner="PretrainModule"
        )
        self.pretrain_tasks = pretrain_tasks if pretrain_tasks is not None else [0]
        self.export_path = check_str("export_path", export_path, optional=True, path=True, owner="PretrainModule")
        if self.num_classes is not None:
            self._check_pretrain_tasks()

    def _check_pretrain_tasks(self) -> None:
        bad = [t for t in self.pretrain_tasks if t >= len(self.num_classes)]
        if bad:
            raise ValueError(
                f"PretrainModule: pretrain_tasks {bad} are out of range: the tasks are "
                f"{list(enumerate(self.task_names))} (index, name)"
            )

    def setup(self, stage: str) -> None:
        """Build the heads from the datamodule's tasks if not given, and check ``pretrain_tasks`` against them."""
        super().setup(stage)
        self._check_pretrain_tasks()

    def forward(self, x: Tensor) -> Tensor:
        """Backbone features ``(B, d)``."""
        return self.skeleton(x)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        losses, samples = [], 0
        for t in self.pretrain_tasks:
            x, y = batch[self.task_names[t]]
            losses.append(F.cross_entropy(self.heads[t](self.skeleton(x)), y))
            samples += x.shape[0]
        loss = torch.stack(losses).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=samples)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx in self.pretrain_tasks:
            x, y = batch
            self._log_val(dataloader_idx, self.heads[dataloader_idx](self.skeleton(x)), y)

    def on_fit_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            save_state_dict(self.skeleton.state_dict(), self.export_path)
            rank_zero_info(f"pretrained backbone written to {self.export_path}")


class MultiExpertModule(_TaskModule, HasExperts):
    """K experts fine-tuned jointly from one base θ₀: expert t on task t, each with its head.

    This is where callbacks see every expert live: the module is a
    :class:`merging.modules.protocols.HasExperts`.

    Args:
        backbone: backbone name (:func:`merging.models.build_backbone`).
        backbone_kwargs: its constructor arguments.
        in_chans: input channels.
        base_checkpoint: θ₀ file (safetensors / torch / Lightning ckpt), loaded in ``setup``
            when a fit starts; None: the backbone's random initialisation is the base.
        base_prefix: key prefix to strip from ``base_checkpoint`` (e.g. ``"skeleton."``).
        task_names: task names (default: from the datamodule).
        num_classes: classes per task (default: from the datamodule).
        lr: AdamW learning rate of the experts and heads.
        weight_decay: AdamW weight decay.
        export_dir: where rank zero writes the :class:`~merging.bundle.ExpertBundle` at
            the end of fit (what ``MergedModule`` and ``EnsembleModule`` read).

    Raises:
        TypeError: an argument has the wrong type (a float or bool for an int, a string for a list).
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        backbone_kwargs: dict | None = None,
        in_chans: int = 1,
        base_checkpoint: str | None = None,
        base_prefix: str | None = None,
        task_names: list[str] | None = None,
        num_classes: list[int] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__(backbone, backbone_kwargs, in_chans, task_names, num_classes, lr, weight_decay)
        self.save_hyperparameters()
        owner = "MultiExpertModule"
        self.base_checkpoint = check_str("base_checkpoint", base_checkpoint, optional=True, path=True, owner=owner)
        self.base_prefix = check_str("base_prefix", base_prefix, optional=True, nonempty=False, owner=owner)
        self.skeleton.requires_grad_(False)
        self.export_dir = check_str("export_dir", export_dir, optional=True, path=True, owner=owner)
        self.experts: nn.ModuleList | None = None
        if self.num_classes is not None:
            self._build_experts()

    def _build_experts(self) -> None:
        self.experts = nn.ModuleList(copy.deepcopy(self.skeleton).requires_grad_(True) for _ in self.num_classes)

    def setup(self, stage: str) -> None:
        """Build heads/experts if the datamodule gives the tasks; at the start of fit, load θ₀
        from ``base_checkpoint`` into the skeleton and start every expert from it (a resumed
        fit then restores its checkpoint over them, as Lightning restores after ``setup``)."""
        super().setup(stage)
        if self.experts is None:
            self._build_experts()
        if stage == "fit" and self.base_checkpoint is not None:
            base = load_state_dict(self.base_checkpoint, prefix=self.base_prefix)
            self.skeleton.load_state_dict(base, strict=True)
            for expert in self.experts:
                expert.load_state_dict(base, strict=True)

    # ---------------------------------------------------------------- HasExperts
    def expert_state_dicts(self) -> list[StateDict]:
        """θ_1..θ_K, live (detached views, no copies)."""
        return [expert.state_dict() for expert in self.experts]

    def base_state_dict(self) -> StateDict:
        """θ₀."""
        return self.skeleton.state_dict()

    def batch_inputs(self, batch: Any) -> Tensor:
        """Inputs of every task in a combined batch, concatenated ``(ΣB_t, *input_shape)``."""
        if isinstance(batch, Mapping):
            return torch.cat([x for x, _ in batch.values()])
        return batch[0]

    # ---------------------------------------------------------------- training
    def forward(self, x: Tensor, task: int) -> Tensor:
        """Expert ``task``'s logits on its own task ``(B, C_task)``."""
        return self.heads[task](self.experts[task](x))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        losses, samples = [], 0
        for t, name in enumerate(self.task_names):
            x, y = batch[name]
            loss_t = F.cross_entropy(self(x, t), y)
            self.log(f"train/loss/{name}", loss_t, batch_size=x.shape[0])
            losses.append(loss_t)
            samples += x.shape[0]
        loss = torch.stack(losses).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=samples)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self._log_val(dataloader_idx, self(x, dataloader_idx), y)

    def to_bundle(self) -> ExpertBundle:
        """The experts, base and heads as an :class:`~merging.bundle.ExpertBundle` (copies on CPU)."""

        def cpu(state: StateDict) -> StateDict:
            return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

        return ExpertBundle(
            backbone=self.backbone_name,
            backbone_kwargs=self.backbone_kwargs,
            in_chans=self.in_chans,
            task_names=list(self.task_names),
            num_classes=list(self.num_classes),
            base=cpu(self.base_state_dict()),
            experts=[cpu(s) for s in self.expert_state_dicts()],
            heads=[cpu(h.state_dict()) for h in self.heads],
        )

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            self.to_bundle().save(Path(self.export_dir))
            rank_zero_info(f"expert bundle written to {self.export_dir}")
