"""NeuLig as a merge method: one static merge θ = Σ_k β̄_k θ_k from a Portland's mean CoopVec.

NeuLig (ICCV 2025, https://github.com/LiQiiiii/Neural-Ligand) merges per input batch; a
single merged state dict needs one CoopVec, so this method is the ``static`` mode [I] of
``spec/neulig.md``: β̄ = the mean CoopVec of a Portland over the calibration ``data``. The
Portland either comes from a checkpoint (e.g. a :class:`~merging.modules.neulig.NeuLigModule`
fit) or is trained here on the unlabeled ``data`` in ``semi`` mode (entropy of the heads'
predictions, plus the offset-alignment term). The maths is in :mod:`merging.neulig`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from merging._validation import check_choice, check_float, check_int, check_str
from merging.bundle import ExpertBundle
from merging.io import load_state_dict
from merging.methods.base import MergeMethod, register_method
from merging.neulig import (
    FeatureBatch,
    Portland,
    batch_inputs,
    concat_features,
    expert_features,
    modified_offsets,
    train_portland,
)


@register_method
class NeuLigMerging(MergeMethod):
    """Static NeuLig: θ = Σ_k β̄_k θ_k with β̄ = mean_x β(x), β = Portland's CoopVec.

    ``data`` is the calibration set, in one of two forms:

    - an iterable of input batches ``x`` or ``(x, ...)`` (tasks may be mixed, e.g. a
      ``MultiTaskDataModule.unlabeled_dataloader()``): enough with a ``portland`` checkpoint;
    - a mapping ``{task index t: iterable of batches of task t}`` (task-homogeneous, labels
      ignored): needed to train Portland here, since the entropy loss of a batch uses its
      task's head H_t. Batches are visited round-robin over tasks, as in the code.

    Args:
        portland: a Portland checkpoint: a NeuLigModule ``.ckpt`` (its ``best_portland`` or
            ``portland`` entries, see ``which``) or a state-dict file with ``fc.weight``,
            ``fc.bias``. None: train one on ``data`` (needs ``heads``).
        which: ``"best"`` (validation-selected) or ``"last"`` Portland of a NeuLigModule
            checkpoint.
        heads: directory of the :class:`~merging.bundle.ExpertBundle` whose per-task heads
            (head t for expert t) train Portland when ``portland`` is None.
        epochs: training epochs over the calibration set (experts' features are cached once).
        lr: Adam learning rate (code: 1e-3).
        scaling: L = L_b + L_a / scaling (code: 100).
        seed: seed of Portland's initialisation.
    """

    name = "neulig"
    paper = "https://github.com/LiQiiiii/Neural-Ligand"
    requires_model = True
    requires_data = True

    def __init__(
        self,
        portland: str | None = None,
        which: Literal["best", "last"] = "best",
        heads: str | None = None,
        epochs: int = 100,
        lr: float = 1e-3,
        scaling: float = 100.0,
        seed: int = 0,
    ) -> None:
        owner = "neulig"
        self.portland = check_str("portland", portland, optional=True, path=True, owner=owner)
        self.which = check_choice("which", which, ("best", "last"), owner=owner)
        self.heads = check_str("heads", heads, optional=True, path=True, owner=owner)
        self.epochs = check_int("epochs", epochs, minimum=1, owner=owner)
        self.lr = check_float("lr", lr, low=0.0, low_open=True, owner=owner)
        self.scaling = check_float("scaling", scaling, low=0.0, low_open=True, owner=owner)
        self.seed = check_int("seed", seed, minimum=0, owner=owner)

    def prepare(self, experts, base, *, model=None, data=None) -> Tensor:
        return self.calibrate(experts, model, data)

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: Tensor) -> Tensor:
        weights = context.to(device=experts.device, dtype=experts.dtype).reshape(-1, *([1] * (experts.dim() - 1)))
        return (experts * weights).sum(dim=0)

    def calibrate(
        self,
        experts: Sequence[Mapping[str, Tensor]],
        model: nn.Module,
        data: Iterable[Any] | Mapping[int, Iterable[Any]],
    ) -> Tensor:
        """β̄: load or train Portland, then average its CoopVecs over ``data``.

        Args:
            experts: θ_1..θ_K (K >= 2).
            model: the backbone skeleton E (run in eval mode; its mode is restored).
            data: the calibration set (see the class docstring).

        Returns:
            β̄, shape ``(K,)``, float64, on the simplex.

        Raises:
            ValueError: fewer than two experts, an empty calibration set, a checkpoint that
                does not fit the experts, or training asked without heads or task batches.
        """
        if len(experts) < 2:
            raise ValueError(f"neulig needs at least 2 experts, got {len(experts)}")
        was_training = model.training
        model.eval()
        try:
            batches = _cache_features(model, experts, data)
        finally:
            model.train(was_training)
        if not batches:
            raise ValueError("neulig: the calibration data is empty")
        num_features = batches[0].features.shape[-1]
        portland = self._load_portland(num_features, len(experts)) if self.portland else None
        if portland is None:
            portland = self._train_portland(experts, batches, num_features, isinstance(data, Mapping))
        portland.to(batches[0].features.device)
        with torch.no_grad():
            total = sum(portland(concat_features(b.features)).double().sum(dim=0) for b in batches)
        return total / sum(b.features.shape[1] for b in batches)

    def _load_portland(self, num_features: int, num_experts: int) -> Portland:
        state = load_state_dict(self.portland)
        prefix = {"best": "best_portland.", "last": "portland."}[self.which]
        if "fc.weight" not in state:
            if f"{prefix}fc.weight" not in state:
                raise ValueError(f"{self.portland}: no Portland weights (neither 'fc.weight' nor '{prefix}fc.weight')")
            state = {key[len(prefix) :]: v for key, v in state.items() if key.startswith(prefix)}
        state = {key: v for key, v in state.items() if key.startswith("fc.")}
        expected = (num_experts, num_experts * num_features)
        if tuple(state["fc.weight"].shape) != expected:
            raise ValueError(
                f"{self.portland}: Portland weight 'fc.weight' has shape {tuple(state['fc.weight'].shape)}, "
                f"but {num_experts} experts with {num_features} features need {expected}"
            )
        portland = Portland(num_features, num_experts, generator=torch.Generator().manual_seed(self.seed))
        portland.load_state_dict(state, strict=True)
        return portland.eval()

    def _train_portland(
        self, experts: Sequence[Mapping[str, Tensor]], batches: list[FeatureBatch], num_features: int, by_task: bool
    ) -> Portland:
        if self.heads is None or not by_task:
            raise ValueError(
                "neulig needs a trained Portland: give `portland` (a checkpoint path), or give `heads` "
                "(an expert bundle directory) and data as {task index: batches} to train one in semi mode"
            )
        heads = ExpertBundle.load(self.heads).build_heads().eval().requires_grad_(False)
        if len(heads) != len(experts):
            raise ValueError(
                f"{self.heads}: {len(heads)} heads for {len(experts)} experts (head t pairs with expert t)"
            )
        bad = sorted({b.task for b in batches if not 0 <= b.task < len(heads)})
        if bad:
            raise ValueError(f"neulig: data has task indices {bad} outside [0, {len(heads)})")
        device = batches[0].features.device
        portland = Portland(num_features, len(experts), generator=torch.Generator().manual_seed(self.seed)).to(device)
        heads.to(device)
        eps_star = modified_offsets(experts)
        train_portland(
            portland, heads, eps_star, batches, epochs=self.epochs, lr=self.lr, alignment="semi", scaling=self.scaling
        )
        return portland.eval()


@torch.no_grad()
def _cache_features(
    model: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    data: Iterable[Any] | Mapping[int, Iterable[Any]],
) -> list[FeatureBatch]:
    """Features ``(K, B, d)`` of every calibration batch, computed once (experts are frozen);
    task batches are interleaved round-robin (task 0, 1, ..., T−1, 0, 1, ...)."""
    device = next(iter(experts[0].values())).device

    def features(batches: Iterable[Any], task: int) -> list[FeatureBatch]:
        inputs = (batch_inputs(batch).to(device) for batch in batches)
        return [FeatureBatch(expert_features(model, experts, x), task) for x in inputs if x.shape[0]]

    if not isinstance(data, Mapping):
        return features(data, -1)
    per_task = {int(t): features(loader, int(t)) for t, loader in data.items()}
    longest = max((len(b) for b in per_task.values()), default=0)
    return [per_task[t][i] for i in range(longest) for t in sorted(per_task) if i < len(per_task[t])]
