"""REPAIR: renormalising the merged units, and the variance-collapse diagnostic.

Averaging the weights of two matched units gives a unit whose pre-activation has a *smaller*
spread than either: the members are correlated but not identical, so their average cancels
part of each. Layer after layer the merged network's activations shrink ("variance
collapse", Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair", ICLR 2023, https://arxiv.org/abs/2211.08403), and a merge of well-matched experts
can still fail.

**Diagnostic** (:func:`variance_ratios`): per layer, the mean over units of the merged
model's pre-activation variance divided by the mean over experts and units of theirs,
``r_l = mean_j Var[z'_j] / ((1/N) Σ_i mean_u Var[z_i,u])`` on the unlabeled inputs. The
ratio of means is invariant to permutations of units, so it needs no matching (plain
averaging is measured the same way); ``r_l ≈ 1`` means the scale is kept, ``r_l ≪ 1`` is
collapse. [I] The exact form (variances, ratio of means over units, pre-activations) is
ours. After REPAIR ``r_l`` stays below 1 by design: a merged unit gets its members' mean
*standard deviation*, whose square is at most their mean variance (Jensen), lower the more
unequal the members are; REPAIR meets its per-unit targets exactly.

**REPAIR** (:func:`repair_state`). For every repairable node (below), in network order:

1. Target statistics of merged unit j: the mean over its member units of the experts'
   pre-activation mean and standard deviation, ``μ*_j = (1/N) Σ_i (M_iᵀ μ_i)_j``,
   ``σ*_j = (1/N) Σ_i (M_iᵀ σ_i)_j`` (M = the node's merge matrix: with alignment one
   member per expert, so ``μ* = (μ_A + π μ_B)/2``; with zip, any members). This is REPAIR's
   target at α = 1/2, ``μ_α = (1 − α) μ_A + α μ_B``, ``σ_α = (1 − α) σ_A + α σ_B``
   [paper]; the zip generalisation through M is ZipIt's use of REPAIR [I].
2. The merged unit's own mean μ'_j and standard deviation σ'_j, measured with every
   *earlier* node already repaired (REPAIR resets its inserted BatchNorm layers in one
   training-mode pass, so each layer is normalised given the corrected layers before it;
   we do it exactly, one pass per node).
3. The affine map ``z ↦ (σ*/σ') (z − μ') + μ*`` is folded into the producer:
   ``W_j ← s_j W_j``, ``b_j ← s_j (b_j − μ'_j) + μ*_j`` with ``s_j = σ*_j / σ'_j``
   (REPAIR's "fuse the BatchNorm into the conv" step). After it the merged unit's mean
   and standard deviation on the inputs equal the targets.

Where "pre-activation" is measured [I]: the output of the node's producer, i.e. its Linear
or convolution, or, when the node also holds a BatchNorm/GroupNorm/LayerNorm after it, the
norm's output (the affine ``γ, β`` of the norm are then rescaled the same way). Populations
are all samples of the inputs times spatial positions (or tokens); variances are population
variances in float64.

Choices of ours [I]: a merged unit with ``σ' < eps`` (a dead unit: nothing to rescale) is
only shifted (``s = 1``); a producer without a bias is only rescaled (its mean becomes
``s·μ'``). Nodes that are not one producer (optionally followed by one norm) are left as
they are and listed by :func:`repair_sites`: residual streams (several producers write to
them), grouped nodes (heads, GroupNorm groups) and fused segments (qkv). So REPAIR covers
MLPs and plain CNNs fully, and the inner (non-residual) units of ResNets and ViTs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from merging.alignment.apply import check_model_keys
from merging.alignment.inputs import iter_inputs
from merging.alignment.solvers import UnitMatching
from merging.alignment.spec import PermSpec
from merging.state import StateDict

_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Probe:
    """A module output whose units are measured.

    Attributes:
        module: the submodule's name in the model.
        unit_dim: the output axis indexing units (1 for convolutions and BatchNorm/GroupNorm,
            -1 for Linear and LayerNorm); every other axis counts as samples.
    """

    module: str
    unit_dim: int


@dataclass(frozen=True)
class RepairSite:
    """A node REPAIR corrects: its units are the output units of ``probe.module``.

    Attributes:
        node: the spec node.
        probe: where the node's pre-activations are measured (and corrected).
        weight: state-dict key of the rescaled weight (producer weight or norm γ).
        bias: state-dict key of the shifted bias (or norm β); None: no shift possible.
    """

    node: str
    probe: Probe
    weight: str
    bias: str | None


@dataclass
class UnitMoments:
    """Per-unit mean and population variance of one probe, ``[O]`` each (float64)."""

    mean: Tensor
    var: Tensor

    @property
    def std(self) -> Tensor:
        """The standard deviation σ, ``[O]``."""
        return self.var.clamp(min=0).sqrt()


def _unit_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def layer_probes(model: nn.Module) -> list[Probe]:
    """Every Linear and convolution of ``model``, in module order (their outputs are the
    pre-activations the diagnostic measures)."""
    return [Probe(name, _unit_dim(m)) for name, m in model.named_modules() if isinstance(m, _LINEAR)]


def repair_sites(model: nn.Module, spec: PermSpec) -> tuple[list[RepairSite], dict[str, str]]:
    """The nodes REPAIR can correct, in network order, and why the others cannot be.

    A node is repairable when its output entries (role ``"out"``, not ignored, whole axis 0)
    belong to exactly one Linear/convolution, optionally followed by one affine norm, and it
    is not grouped. The site is the norm when there is one, else the Linear/convolution.

    Returns:
        ``(sites, skipped)``: the sites, sorted by module order, and ``{node: reason}``.
    """
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    sites: list[RepairSite] = []
    skipped: dict[str, str] = {}
    for node in spec.values():
        outs = [e for e in node.entries if e.role == "out" and not e.ignore]
        if node.groups > 1:
            skipped[node.name] = f"grouped ({node.groups} groups)"
            continue
        if any(e.axis != 0 or e.offset != 0 or e.inner != 1 for e in outs):
            skipped[node.name] = "an output entry is a segment of a fused tensor"
            continue
        owners: dict[str, set[str]] = {}
        for e in outs:
            module, _, param = e.key.rpartition(".")
            owners.setdefault(module, set()).add(param)
        modules = {}
        for name in owners:
            try:
                modules[name] = model.get_submodule(name)
            except AttributeError:
                modules[name] = None
        linear = [n for n, m in modules.items() if isinstance(m, _LINEAR)]
        norms = [n for n, m in modules.items() if isinstance(m, _NORMS)]
        if len(linear) != 1 or len(norms) > 1 or len(linear) + len(norms) != len(modules):
            skipped[node.name] = f"not one producer (optionally + one norm): {sorted(modules)}"
            continue
        site = norms[0] if norms else linear[0]
        if "weight" not in owners[site]:
            skipped[node.name] = f"{site!r} has no affine weight in the node"
            continue
        bias = f"{site}.bias" if "bias" in owners[site] else None
        sites.append(RepairSite(node.name, Probe(site, _unit_dim(modules[site])), f"{site}.weight", bias))
    sites.sort(key=lambda s: order[s.probe.module])
    return sites, skipped


@contextmanager
def _hooks(model: nn.Module, probes: Sequence[Probe], sums: dict[Probe, list]):
    def make(probe: Probe):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            z = output.detach().to(torch.float64).movedim(probe.unit_dim, 0)
            z = z.reshape(z.shape[0], -1)
            acc = sums.setdefault(probe, [0.0, 0.0, 0])
            acc[0] = acc[0] + z.sum(1)
            acc[1] = acc[1] + (z * z).sum(1)
            acc[2] += z.shape[1]

        return hook

    handles = []
    try:
        for probe in probes:
            try:
                module = model.get_submodule(probe.module)
            except AttributeError:
                raise ValueError(f"the model has no submodule {probe.module!r} to measure") from None
            handles.append(module.register_forward_hook(make(probe)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def unit_moments(
    model: nn.Module,
    state: Mapping[str, Tensor],
    probes: Sequence[Probe],
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
) -> dict[Probe, UnitMoments]:
    """Per-unit mean and population variance of each probe's output over ``data``.

    ``model`` is evaluated in eval mode with ``state`` substituted
    (``torch.func.functional_call``); its modes are restored afterwards.

    Raises:
        ValueError: a probe names no submodule, or was not reached in forward; no batch.
    """
    check_model_keys(model, state)
    sums: dict[Probe, list] = {}
    device = next(iter(state.values())).device
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with _hooks(model, probes, sums):
            for x in iter_inputs(data, max_batches=max_batches, device=device, purpose="unit statistics"):
                # Keys were checked; strict=False only lets non-persistent buffers keep their values.
                torch.func.functional_call(model, dict(state), (x,), strict=False)
    finally:
        for m, training in modes.items():
            m.train(training)
    out = {}
    for probe in probes:
        if probe not in sums:
            raise ValueError(f"module {probe.module!r} was not called in forward")
        total, squares, count = sums[probe]
        mean = total / count
        out[probe] = UnitMoments(mean, squares / count - mean * mean)
    return out


def variance_ratios(
    model: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    merged: Mapping[str, Tensor],
    data: Iterable[Any],
    *,
    probes: Sequence[Probe] | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Per layer, the merged pre-activations' variance against the experts':
    ``r_l = mean_j Var[z'_j] / ((1/N) Σ_i mean_u Var[z_i,u])``.

    Args:
        model: the skeleton; every state is keyed like ``model.state_dict()``.
        experts: the N experts' state dicts.
        merged: the merged state dict (same architecture).
        data: unlabeled input batches (re-iterable; one pass per state).
        probes: the layers measured; None: every Linear and convolution
            (:func:`layer_probes`).
        max_batches: use at most this many batches; None: all.

    Returns:
        ``{module name: r_l}`` in module order (1: scale kept; ≪ 1: variance collapse;
        ``nan`` when the experts' units have no variance at all).

    Raises:
        ValueError: no experts, or what :func:`unit_moments` rejects.
    """
    if not experts:
        raise ValueError("variance_ratios needs at least one expert")
    probes = list(probes) if probes is not None else layer_probes(model)
    ref = [unit_moments(model, e, probes, data, max_batches=max_batches) for e in experts]
    got = unit_moments(model, merged, probes, data, max_batches=max_batches)
    out = {}
    for probe in probes:
        expert_var = sum(float(r[probe].var.mean()) for r in ref) / len(ref)
        merged_var = float(got[probe].var.mean())
        out[probe.module] = merged_var / expert_var if expert_var > 0 else float("nan")
    return out


def repair_targets(
    moments: Sequence[UnitMoments], matching: UnitMatching | None
) -> tuple[Tensor, Tensor]:
    """REPAIR's targets of one node: ``μ* = (1/N) Σ_i M_iᵀ μ_i`` and ``σ* = (1/N) Σ_i M_iᵀ σ_i``.

    Args:
        moments: the N experts' moments of the node's units, ``[O]`` each.
        matching: the node's matching; None: the identity (plain averaging).

    Returns:
        ``(μ*, σ*)``, ``[O']`` each: the mean over each merged unit's members.

    Raises:
        ValueError: the matching was solved for another number of models.
    """
    n = len(moments)
    if matching is None:
        return torch.stack([m.mean for m in moments]).mean(0), torch.stack([m.std for m in moments]).mean(0)
    if matching.num_models != n:
        raise ValueError(f"a matching of {matching.num_models} models for {n} experts' statistics")
    mean = sum(matching.merge_block(i).to(m.mean).T @ m.mean for i, m in enumerate(moments)) / n
    std = sum(matching.merge_block(i).to(m.std).T @ m.std for i, m in enumerate(moments)) / n
    return mean, std


@torch.no_grad()
def repair_state(
    model: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    merged: Mapping[str, Tensor],
    spec: PermSpec,
    matchings: Mapping[str, UnitMatching],
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    eps: float = 1e-8,
) -> StateDict:
    """Apply REPAIR to a merged state dict (see the module docstring for the exact rule).

    Args:
        model: the skeleton; every state is keyed like ``model.state_dict()``.
        experts: the N experts that were merged.
        merged: their merge with ``matchings``.
        spec: the permutation spec the matchings were solved on.
        matchings: node → matching; a node absent here counts as the identity.
        data: unlabeled input batches (re-iterable: one pass per expert, one per node).
        max_batches: use at most this many batches; None: all.
        eps: a merged unit with σ' below it is only shifted.

    Returns:
        A copy of ``merged`` whose repairable nodes' producers are rescaled and shifted.

    Raises:
        ValueError: keys that do not match the model, or a matching of another N.
    """
    for j, expert in enumerate(experts):
        check_model_keys(model, expert, f"expert {j}")
    out = {k: v.clone() for k, v in merged.items()}
    sites, _ = repair_sites(model, spec)
    if not sites:
        return out
    probes = [s.probe for s in sites]
    ref = [unit_moments(model, e, probes, data, max_batches=max_batches) for e in experts]
    for site in sites:
        target_mean, target_std = repair_targets([r[site.probe] for r in ref], matchings.get(site.node))
        now = unit_moments(model, out, [site.probe], data, max_batches=max_batches)[site.probe]
        std = now.std
        alive = std > eps
        scale = torch.where(alive, target_std / std.clamp(min=eps), torch.ones_like(std))
        weight = out[site.weight]
        shape = (-1,) + (1,) * (weight.ndim - 1)
        out[site.weight] = (weight.to(scale.dtype) * scale.view(shape)).to(weight.dtype)
        if site.bias is not None:
            bias = out[site.bias]
            out[site.bias] = ((bias.to(scale.dtype) - now.mean) * scale + target_mean).to(bias.dtype)
    return out
