"""MuDSC's matching: activation initialisation, then coordinate descent on dual-space similarity.

Xu et al., "Training-Free Pretrained Model Merging", CVPR 2024
(https://arxiv.org/abs/2403.01753); official code ``transform`` → ``act_transform`` →
``iter_transform`` in https://github.com/zju-vipa/training_free_model_merging.

1. With activations: S_a of every node is computed once (it does not depend on the other
   nodes' matrices) and every node's matrices are initialised from S_a alone.
2. With weights: coordinate descent, at most ``max_iter`` sweeps. Each sweep visits the
   nodes in a random order (a ``torch.Generator`` seeded with ``seed``); each node recomputes
   S_w given the others' current matrices, forms ``S = α·S_w + (1 − α)·S_a`` and re-solves.
   The objective is the mean node score. A sweep that does not improve on the best
   objective reverts to the best state; ``tol`` such sweeps stop the search, and so does a
   sweep that changes no matching (a fixed point: later sweeps would repeat it).

Tied nodes (one attention layer's query/key and value nodes) are solved together: their
group (head) assignment is the outer assignment on their summed head-pair scores, and each
node's units are then matched inside the shared head pairs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from merging.alignment.similarity import activation_corr, combine_similarity, weight_corr
from merging.alignment.solvers import Mode, UnitMatching, match_groups, solve_node
from merging.alignment.spec import PermSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatchConfig:
    """Settings of the MuDSC matching.

    Attributes:
        mode: ``"align"`` (permutations onto model 0) or ``"zip"`` (ZipIt-style merges,
            intra-model merges allowed).
        alpha: α, weight of S_w in ``S = α·S_w + (1 − α)·S_a`` (the code's ``fix_rate``).
        use_activation: compute S_a (needs a model and data).
        use_weight: compute S_w and run the coordinate descent.
        max_iter: most coordinate-descent sweeps.
        tol: non-improving sweeps before stopping.
        seed: seed of the node-order generator.
        max_batches: batches of data used for S_a; None: all.
        tie_groups: solve tied nodes with one shared group assignment; False solves every
            node alone, as the official code does.
        zip_a: ZipIt's factor a on a merged unit's similarities.
        zip_b: ZipIt's intra-model budget factor b.
        zip_b_group: group zip's per-set intra-model budget factor.

    Raises:
        ValueError: a setting is out of range, or both similarities are switched off.
    """

    mode: Mode = "align"
    alpha: float = 0.5
    use_activation: bool = True
    use_weight: bool = True
    max_iter: int = 100
    tol: int = 5
    seed: int = 0
    max_batches: int | None = None
    tie_groups: bool = True
    zip_a: float = 0.5
    zip_b: float = 1.0
    zip_b_group: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("align", "zip"):
            raise ValueError(f"mode must be 'align' or 'zip', got {self.mode!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not (self.use_activation or self.use_weight):
            raise ValueError("use_activation and use_weight are both False: no similarity to match on")
        if self.max_iter < 1 or self.tol < 1:
            raise ValueError(f"max_iter and tol must be >= 1, got {self.max_iter} and {self.tol}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {self.max_batches}")
        if self.zip_a <= 0 or self.zip_b < 0 or self.zip_b_group < 0:
            raise ValueError("zip_a must be > 0, zip_b and zip_b_group >= 0")


@dataclass
class MatchResult:
    """What :func:`match_models` found.

    Attributes:
        matchings: node name → merge/unmerge matrices of the N models.
        objective: mean node score of the returned matchings.
        history: the objective after each coordinate-descent sweep (empty without weights).
        activation: S_a per node (empty without activations).
    """

    matchings: dict[str, UnitMatching]
    objective: float
    history: list[float] = field(default_factory=list)
    activation: dict[str, Tensor] = field(default_factory=dict)


def match_models(
    states: Sequence[Mapping[str, Tensor]],
    spec: PermSpec,
    config: MatchConfig = MatchConfig(),
    *,
    model: nn.Module | None = None,
    data: Iterable[Any] | None = None,
) -> MatchResult:
    """Solve every node's merge/unmerge matrices for N >= 2 models (model 0 is the anchor).

    Args:
        states: the N models' state dicts, keyed like the spec (and ``model``).
        spec: the permutation spec.
        config: the settings.
        model: the skeleton, needed for activations.
        data: unlabeled input batches, needed for activations.

    Raises:
        ValueError: fewer than 2 models, a spec that does not fit, or activations requested
            without a model, data, or an activation point for a node that only they can solve.
    """
    num_models = len(states)
    if num_models < 2:
        raise ValueError(f"matching needs at least 2 models, got {num_models}")
    for j, state in enumerate(states):
        spec.validate(state, f"model {j}'s state dict")
    units = spec.tie_groups(config.tie_groups)
    activation: dict[str, Tensor] = {}
    if config.use_activation:
        if model is None or data is None:
            raise ValueError("activation similarity needs the model skeleton and data")
        activation = activation_corr(model, states, spec, data, max_batches=config.max_batches)
        if not config.use_weight:
            missing = [n for n in spec if n not in activation]
            if missing:
                raise ValueError(
                    f"activation-only matching needs an activation point on every node; missing: {missing}"
                )

    def solve_unit(
        unit: tuple[str, ...], current: Mapping[str, UnitMatching], weights: bool
    ) -> dict[str, UnitMatching]:
        sims = {
            name: combine_similarity(
                weight_corr(states, spec, name, current) if weights else None, activation.get(name), config.alpha
            )
            for name in unit
        }
        groups = spec[unit[0]].groups
        shared = match_groups(list(sims.values()), num_models, groups) if groups > 1 and len(unit) > 1 else None
        return {
            name: solve_node(
                sims[name],
                num_models,
                config.mode,
                spec[name].groups,
                a=config.zip_a,
                b=config.zip_b,
                b_group=config.zip_b_group,
                group_assignment=shared,
            )
            for name in unit
        }

    matchings: dict[str, UnitMatching] = {}
    if config.use_activation:
        for unit in units:
            if all(name in activation for name in unit):
                matchings.update(solve_unit(unit, matchings, weights=False))
    if not config.use_weight:
        return MatchResult(matchings, _objective(matchings), [], activation)

    generator = torch.Generator().manual_seed(config.seed)
    best, best_state, stale = -float("inf"), dict(matchings), 0
    history: list[float] = []
    for sweep in range(config.max_iter):
        changed = False
        for index in torch.randperm(len(units), generator=generator).tolist():
            for name, new in solve_unit(units[index], matchings, weights=True).items():
                old = matchings.get(name)
                changed |= old is None or not torch.equal(old.unmerge, new.unmerge)
                matchings[name] = new
        objective = _objective(matchings)
        history.append(objective)
        log.debug("MuDSC sweep %d: objective %.6f (best %.6f)", sweep, objective, best)
        if objective > best:
            best, best_state, stale = objective, dict(matchings), 0
        else:
            matchings, stale = dict(best_state), stale + 1
        if not changed or stale >= config.tol:
            break
    return MatchResult(best_state, best, history, activation)


def _objective(matchings: Mapping[str, UnitMatching]) -> float:
    if not matchings:
        return 0.0
    return sum(m.score for m in matchings.values()) / len(matchings)
