"""M-Loss: how far parameter averaging is from ensembling, per layer and per node.

Wang, Duan, Chen, Wu, Lim, "M-Loss: Quantifying Model Merging Compatibility with Limited
Unlabeled Data", AAAI 2026, https://arxiv.org/abs/2602.08564 (authors' code:
https://github.com/languangduan/mLoss).

One job per module:

- :mod:`~merging.mloss.gap`: the maths of one layer on one shared input: the gap
  g = σ(Σ_j α_j z_j) − Σ_j α_j σ(z_j), node M-Loss (Def. 3.4), layer M-Loss (Def. 3.3, 3.5),
  their summable :class:`MLossStatistics` and the :class:`MLossReport`;
- :mod:`~merging.mloss.tracing`: which layers are measured (a Linear/Conv whose output
  feeds an element-wise activation module, found by one traced forward) and forward helpers;
- :mod:`~merging.mloss.states`: merge weights α, the average θ̄, the incremental reference;
- :mod:`~merging.mloss.meter`: :class:`MLossMeter` (hooks, batched expert GEMMs, forward
  cache) and the one-shot :func:`m_loss`;
- :mod:`~merging.mloss.expectations`: closed-form expected gaps (import it explicitly);
- :mod:`~merging.mloss.metric`: the torchmetrics :class:`~merging.mloss.metric.MLoss`
  (import it explicitly: it is the only module here that imports torchmetrics, so that
  merging, which uses this package, does not).

Nothing here imports Lightning, the merge methods, the callbacks or the LightningModules.

Example::

    from merging.mloss import m_loss

    report = m_loss(backbone, [theta_1, theta_2], unlabeled_loader, base=theta_0)
    report.layer["blocks.11.mlp.fc1"], report.node["blocks.11.mlp.fc1"].shape
"""

from merging.mloss.gap import (
    NORMALIZE_EPS,
    OUTPUT,
    PIECEWISE_LINEAR_ACTIVATIONS,
    Activation,
    MLossReport,
    MLossStatistics,
    centred_gap,
    expert_preactivations,
    layer_gap,
    layer_mloss,
    mloss_report,
    node_group_map,
    node_mloss,
)
from merging.mloss.meter import MLossMeter, Reference, m_loss, mloss_statistics
from merging.mloss.states import check_state_keys, merge_weights, partial_merge, weighted_average
from merging.mloss.tracing import (
    ELEMENTWISE_ACTIVATIONS,
    as_forward_args,
    capture_layer_input,
    find_activation_layers,
    is_elementwise_activation,
)

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "NORMALIZE_EPS",
    "OUTPUT",
    "PIECEWISE_LINEAR_ACTIVATIONS",
    "Activation",
    "MLossMeter",
    "MLossReport",
    "MLossStatistics",
    "Reference",
    "as_forward_args",
    "capture_layer_input",
    "centred_gap",
    "check_state_keys",
    "expert_preactivations",
    "find_activation_layers",
    "is_elementwise_activation",
    "layer_gap",
    "layer_mloss",
    "m_loss",
    "merge_weights",
    "mloss_report",
    "mloss_statistics",
    "node_group_map",
    "node_mloss",
    "partial_merge",
    "weighted_average",
]
