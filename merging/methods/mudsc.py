"""MuDSC: training-free merging under dual-space (activation + weight) constraints.

Xu et al., "Training-Free Pretrained Model Merging", CVPR 2024
(https://arxiv.org/abs/2403.01753; code https://github.com/zju-vipa/training_free_model_merging).

Units of N models are matched on ``S = α·S_w + (1 − α)·S_a``, a balance of weight-space and
activation-space similarity, by coordinate descent over the network's permutation nodes
(:mod:`merging.alignment`), then the weights are permuted (align) or zipped (zip) and
averaged, and the BatchNorm statistics are re-estimated on the data.

Devices: the activation statistics and the transformed weights are computed on the experts'
device (the data batches are moved there); the matching itself (Hungarian assignments,
ZipIt's greedy merges on the O×O similarity matrices of each node) runs on the CPU, where
scipy's solver does.

Correction after the merge (``repair``): averaging matched units shrinks the merged
pre-activations' variance (variance collapse); the merged model is either left as it is,
its BatchNorm statistics are re-estimated, or its units are renormalised with REPAIR
(:mod:`merging.alignment.repair`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from merging._validation import check_bool, check_choice, check_float, check_int
from merging.alignment.apply import batchnorm_modules, check_model_keys, merge_entry, reset_batchnorm
from merging.alignment.builders import build_spec
from merging.alignment.matching import MatchConfig, MatchResult, match_models
from merging.alignment.repair import repair_state
from merging.alignment.solvers import UnitMatching
from merging.alignment.spec import PermSpec
from merging.methods.base import MergeMethod, register_method
from merging.state import StateDict

#: The corrections applied to the merged model (MuDSC's ``repair`` setting).
REPAIR_CHOICES = ("none", "reset_bn", "repair")


@dataclass(frozen=True)
class _Context:
    spec: PermSpec
    result: MatchResult


@register_method
class MuDSC(MergeMethod):
    """MuDSC merging of K >= 2 same-architecture models (not task vectors: ``base`` is unused).

    Expert 0 is the anchor: in ``"align"`` mode every other expert is permuted onto it and
    the permuted weights are averaged; in ``"zip"`` mode (ZipIt) the K·O units of each node
    are greedily merged down to O, intra-model merges included, and each merged unit is the
    mean of its members. Output shapes always equal the experts' (zip removes a fraction
    r = 1 − 1/K of the stacked units).

    Named settings (the official code's variant suffixes):

    ==============================================  =======================================
    setting                                         variant
    ==============================================  =======================================
    ``mode="align"``                                MuDSC-Align (``_act_iws_fs_useperm``)
    ``mode="zip"``                                  MuDSC-Zip (``_act_iws_fs``)
    ``mode="align", use_activation=False``          Re-Basin weight matching (``_useperm``)
    ``mode="align", use_weight=False``              activation matching, A. Align
    ``mode="zip", use_weight=False``                ZipIt (``_act``)
    ``mode="zip", use_activation=False``            W. Zip (``""``)
    ==============================================  =======================================

    Args:
        mode: ``"align"`` (permutations, Hungarian; group align for heads/GroupNorm) or
            ``"zip"`` (ZipIt greedy matching; group zip).
        alpha: α, the balance factor: weight of S_w in ``S = α·S_w + (1 − α)·S_a``. [I] This
            is the official code's ``fix_rate``; the paper's text does not pin down which
            side α multiplies, we read it as the weight side (default 0.5, the code's fixed
            scripts; its grid search picks one of 0.1..0.9 on training data).
        use_activation: use activation similarity S_a (one pass over ``data``).
        use_weight: use weight similarity S_w and the iterative (coordinate-descent) scheme.
        max_iter: most coordinate-descent sweeps (100 in the code).
        tol: non-improving sweeps before the search stops (5 in the code).
        seed: seed of the random node order of each sweep.
        max_batches: batches of ``data`` used for S_a and the BatchNorm reset; None: all.
        tie_heads: [I] solve an attention layer's query/key and value nodes with one shared
            head assignment (a head's attention pattern stays with its values); False solves
            them separately, as the official code does.
        zip_a: ZipIt's factor a on a merged unit's similarities (0.5).
        zip_b: ZipIt's intra-model merge budget factor b (1).
        zip_b_group: group zip's per-head-set budget factor (1).
        repair: the correction of the merged model on ``data``:
            ``"none"`` leaves it as merged; ``"reset_bn"`` re-estimates its BatchNorm
            running statistics (cumulative average; the paper's numbers all assume it;
            nothing changes in a model without BatchNorm); ``"repair"`` resets BatchNorm
            (if any), then renormalises every repairable node's units with REPAIR
            (Jordan et al., ICLR 2023): per merged unit, its pre-activation mean and std on
            ``data`` are set to the mean over its member units of the experts' means and
            stds (:func:`merging.alignment.repair.repair_state`, which states exactly
            what is rescaled). Default ``"repair"``, chosen on the different-init digits
            scenario (:mod:`merging.experiments.scenarios`), selection seeds 0-4 only
            (SmallCNN, no BatchNorm, so ``"reset_bn"`` equals ``"none"`` there): without
            it MuDSC-Align's deepest layer keeps 1.6% of the experts' pre-activation
            variance (min layer ratio 0.016, mean over seeds), with it 0.82; its gain over
            averaging goes from +11.6 ± 12.2 to +32.6 ± 10.1 points, and REPAIR helped
            every matching there (MuDSC-Zip +36.1 -> +47.9). On BatchNorm models
            ``"repair"`` first resets BatchNorm, so it never does less than ``"reset_bn"``.
        spec: the permutation spec; None builds it from ``model``
            (:func:`merging.alignment.build_spec`: MLPs, plain CNNs, timm ResNets and ViTs).

    Note:
        The model's output units are never permuted (they are its interface): merge whole
        classifiers to align every layer. The official code also resets the *experts'*
        BatchNorm statistics before matching; here experts are used as given.
    """

    name = "mudsc"
    paper = "https://arxiv.org/abs/2403.01753"
    requires_model = True
    requires_data = True

    def __init__(
        self,
        mode: Literal["align", "zip"] = "align",
        alpha: float = 0.5,
        use_activation: bool = True,
        use_weight: bool = True,
        max_iter: int = 100,
        tol: int = 5,
        seed: int = 0,
        max_batches: int | None = None,
        tie_heads: bool = True,
        zip_a: float = 0.5,
        zip_b: float = 1.0,
        zip_b_group: float = 1.0,
        repair: Literal["none", "reset_bn", "repair"] = "repair",
        spec: PermSpec | None = None,
    ) -> None:
        owner = "mudsc"
        self.mode = check_choice("mode", mode, ("align", "zip"), owner=owner)
        self.alpha = check_float("alpha", alpha, low=0.0, high=1.0, owner=owner)
        self.use_activation = check_bool("use_activation", use_activation, owner=owner)
        self.use_weight = check_bool("use_weight", use_weight, owner=owner)
        self.max_iter = check_int("max_iter", max_iter, minimum=1, owner=owner)
        self.tol = check_int("tol", tol, minimum=1, owner=owner)
        self.seed = check_int("seed", seed, minimum=0, owner=owner)
        self.max_batches = check_int("max_batches", max_batches, minimum=1, optional=True, owner=owner)
        self.tie_heads = check_bool("tie_heads", tie_heads, owner=owner)
        self.zip_a = check_float("zip_a", zip_a, low=0.0, low_open=True, owner=owner)
        self.zip_b = check_float("zip_b", zip_b, low=0.0, owner=owner)
        self.zip_b_group = check_float("zip_b_group", zip_b_group, low=0.0, owner=owner)
        self.repair = check_choice("repair", repair, REPAIR_CHOICES, owner=owner)
        if spec is not None and not isinstance(spec, PermSpec):
            raise TypeError(f"mudsc: spec must be a PermSpec or None, got {spec!r}")
        self.spec = spec
        self.config()  # the settings' combinations (e.g. no similarity at all) are checked now too

    def config(self) -> MatchConfig:
        """The matching settings (validated)."""
        return MatchConfig(
            mode=self.mode,
            alpha=self.alpha,
            use_activation=self.use_activation,
            use_weight=self.use_weight,
            max_iter=self.max_iter,
            tol=self.tol,
            seed=self.seed,
            max_batches=self.max_batches,
            tie_groups=self.tie_heads,
            zip_a=self.zip_a,
            zip_b=self.zip_b,
            zip_b_group=self.zip_b_group,
        )

    def merge(
        self,
        experts: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None = None,
        *,
        model: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> StateDict:
        """Match, merge and correct the merged model (``repair``).

        Args:
            experts: θ_1..θ_K, K >= 2, keyed like ``model.state_dict()``.
            base: unused by MuDSC (non-float buffers are copied from it when given, as in
                every method).
            model: the skeleton whose ``state_dict()`` keys match the experts.
            data: an iterable of unlabeled input batches (tensors, or ``(x, ...)``); it is
                iterated several times (activations, then the correction), so pass a
                re-iterable such as a DataLoader or a list.

        Returns:
            The merged state dict (same keys, shapes and dtypes as the experts).

        Raises:
            ValueError: fewer than 2 experts, a missing model/data, keys that do not match
                the model, a spec that does not fit, or data without batches.
        """
        return super().merge(experts, base, model=model, data=data)

    def finish(
        self,
        merged: StateDict,
        context: Any,
        experts: Sequence[Mapping[str, Tensor]],
        *,
        model: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> StateDict:
        """Correct the merged model (``repair``) once every entry is merged."""
        return self.correct(model, experts, merged, context.spec, context.result.matchings, data)

    def correct(
        self,
        model: nn.Module,
        experts: Sequence[Mapping[str, Tensor]],
        merged: Mapping[str, Tensor],
        spec: PermSpec,
        matchings: Mapping[str, UnitMatching],
        data: Iterable[Any],
    ) -> StateDict:
        """Apply the ``repair`` setting to a merged state dict (see the class docstring).

        Args:
            model: the skeleton.
            experts: the merged experts.
            merged: their merge with ``matchings`` on ``spec``.
            spec: the permutation spec.
            matchings: node → matching (absent nodes: the identity).
            data: unlabeled input batches (re-iterable).

        Returns:
            The corrected state dict (``merged`` itself with ``"none"``).
        """
        out = dict(merged)
        if self.repair == "none":
            return out
        if batchnorm_modules(model):
            out = reset_batchnorm(model, out, data, max_batches=self.max_batches)
        if self.repair == "repair":
            out = repair_state(model, experts, out, spec, matchings, data, max_batches=self.max_batches)
        return out

    def check_inputs(
        self,
        experts: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None,
        model: nn.Module | None,
        data: Iterable[Any] | None,
    ) -> None:
        """The base checks, plus K >= 2 and expert keys equal to the model's."""
        super().check_inputs(experts, base, model, data)
        if len(experts) < 2:
            raise ValueError(f"{self.name} merges at least 2 experts, got {len(experts)}")
        for j, expert in enumerate(experts):
            check_model_keys(model, expert, f"expert {j}")

    def match(
        self, experts: Sequence[Mapping[str, Tensor]], model: nn.Module, data: Iterable[Any] | None
    ) -> tuple[PermSpec, MatchResult]:
        """The spec and the matching alone (merge/unmerge matrices per node, objective history)."""
        spec = self.spec if self.spec is not None else build_spec(model)
        return spec, match_models(experts, spec, self.config(), model=model, data=data)

    def prepare(
        self,
        experts: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None,
        *,
        model: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> _Context:
        """Solve the matching once for the whole model."""
        spec, result = self.match(experts, model, data)
        return _Context(spec, result)

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: _Context) -> Tensor:
        """``(1/K) Σ_i T_i(W_i)``: each expert's entry transformed by its matrices, then averaged.

        Args:
            key: the state-dict key.
            experts: ``(K, *shape)``.
            base: unused.
            context: the spec and matching from :meth:`prepare`.
        """
        return merge_entry(key, experts, context.spec, context.result.matchings)
