"""The claims benchmark's analyses beyond merge accuracies: where the ensemble-minus-average
gap sits (per layer, per half of a layer's rows), and the soup analyses of *Rethinking
Weight-Averaged Model-merging* (Wang et al., arXiv 2411.09263) on a ten-class fine-tune.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from merging.diagnostics import collect_outputs, magnitude_stability, weight_vs_feature_averaging
from merging.experiments.diagnostics import finetune_sgd
from merging.io import load_state_dict
from merging.models import build_backbone
from merging.state import StateDict

if TYPE_CHECKING:
    from merging.datamodules import MultiTaskDataModule
    from merging.experiments.claims.protocol import Protocol as ClaimsProtocol


class EnsembleScorer(Protocol):
    """What :func:`layer_gaps` needs of an evaluator (the pipeline's ``Evaluator``)."""

    def ensemble_accuracy(self, experts: Sequence[Mapping[str, Tensor]]) -> float: ...


def _average_rows(experts: Sequence[Mapping[str, Tensor]], keys: Sequence[str], rows: Tensor | None) -> list[StateDict]:
    """The experts with ``keys`` averaged over experts: whole tensors (``rows`` None) or only
    the output rows ``rows`` (dim 0 of a weight, entries of a bias)."""
    out = [dict(e) for e in experts]
    for key in keys:
        stacked = torch.stack([e[key] for e in experts])
        mean = stacked.mean(dim=0)
        for state in out:
            if rows is None:
                state[key] = mean
            else:
                value = state[key].clone()
                value[rows] = mean[rows]
                state[key] = value
    return out


def layer_gaps(
    evaluator: EnsembleScorer,
    experts: Sequence[Mapping[str, Tensor]],
    layers: Sequence[str],
    node_mloss: Mapping[str, Tensor],
) -> dict[str, dict[str, float]]:
    """Per layer l, how much of the ensemble-minus-average gap averaging l alone makes.

    ``gap`` = acc(ensemble) − acc(ensemble of the experts with layer l's parameters replaced
    by their average) (test split, mean over tasks). ``gap_high_rows`` / ``gap_low_rows``: the
    same with only the half of l's output rows (nodes) of highest / lowest node M-Loss
    averaged: M-TIES trims the high-M-Loss rows harder, on the premise that they carry more of
    the gap ([I] this split-half test is our reading of "M-Loss-guided selection").
    """
    reference = evaluator.ensemble_accuracy(experts)
    out: dict[str, dict[str, float]] = {}
    for layer in layers:
        keys = [k for k in experts[0] if k.startswith(layer + ".") and experts[0][k].is_floating_point()]
        entry = {"gap": reference - evaluator.ensemble_accuracy(_average_rows(experts, keys, None))}
        node = node_mloss.get(layer)
        if node is not None and node.numel() >= 2:
            order = torch.argsort(node.float(), descending=True)
            half = node.numel() // 2
            for name, rows in (("gap_high_rows", order[:half]), ("gap_low_rows", order[half:])):
                entry[name] = reference - evaluator.ensemble_accuracy(_average_rows(experts, keys, rows))
        out[layer] = entry
    return out


class Classifier(nn.Module):
    """A backbone and one linear ``head`` (the soup members)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def soup_analyses(
    protocol: ClaimsProtocol, data: MultiTaskDataModule, seed: int, base_path: Path
) -> dict[str, Any]:
    """M models fine-tuned from θ₀ on all ten classes (``data``: one ten-class task; model m:
    its own head initialisation and data order; the paper's code also varies the split, here
    the split is the seed's), then uniform and greedy soups, logit and feature ensembles, and
    the ×c scaling scenarios. The members train with the pure-torch SGD loop on the CPU (they
    are small).
    """
    base = load_state_dict(base_path)
    spec = protocol.soup

    def factory() -> nn.Module:
        backbone = build_backbone(protocol.model.backbone, **protocol.model.backbone_kwargs)
        backbone.load_state_dict(base, strict=True)
        return Classifier(backbone, 10)

    train, batch = data.dataset(0, "train"), protocol.data.batch_size
    states = [
        finetune_sgd(factory, train, lr=spec.lr, epochs=spec.epochs, batch_size=batch, seed=1000 * seed + m + 1)
        for m in range(spec.members)
    ]
    skeleton = factory().eval()
    test, val = data.task_dataloader(0, "test"), data.task_dataloader(0, "val")
    report = weight_vs_feature_averaging(skeleton, states, test, val)
    scaling = magnitude_stability(
        skeleton,
        states,
        test,
        magnitude=spec.magnitude,
        scenarios=("single", "all", "first_only"),
        combiners=("soup", "logit", "feature"),
    )
    val_accuracy = [collect_outputs(skeleton, s, val).accuracy() for s in states]
    return {
        "individual_val_mean": sum(val_accuracy) / len(val_accuracy),
        "individual_mean": sum(report.individual) / len(report.individual),
        "individual_best": max(report.individual),
        "uniform_soup": report.uniform_soup,
        "greedy_soup": report.greedy_soup,
        "greedy_soup_members": report.greedy_soup_members,
        "logit_ensemble": report.logit_ensemble,
        "feature_ensemble_first_head": report.feature_ensemble_first_head,
        "feature_ensemble_avg_head": report.feature_ensemble_avg_head,
        "soup_ensemble_agreement": report.soup_ensemble_agreement,
        "scaling": {
            f"{r.scenario}/{r.combiner}": {"accuracy": r.accuracy, "flip_rate": r.flip_rate} for r in scaling.rows
        },
    }
