"""Measuring M-Loss on a model: :class:`MLossMeter`, its forward cache, and :func:`m_loss`.

Wang, Duan, Chen, Wu, Lim, "M-Loss: Quantifying Model Merging Compatibility with Limited
Unlabeled Data", AAAI 2026, https://arxiv.org/abs/2602.08564 (authors' code:
https://github.com/languangduan/mLoss). §-numbers refer to the project's M-Loss spec.

The meter traces the measured layers once (:mod:`merging.mloss.tracing`), then per batch
runs one forward of a reference model whose pre-hooks hand each measured layer's input x
to the gap maths of :mod:`merging.mloss.gap` with the K experts' (W, b). Users can name
layers (the activation is still traced) or pass a ``{name: σ}`` mapping.

**Which input** (``reference``, §1.8 item 1): ``"pretrained"`` hooks θ₀ (the authors'
code, and the default), ``"average"`` hooks Σ_j α_j θ_j, ``"incremental"`` hooks the
partially merged model of the paper's text (entries before the layer's weight in
state-dict order merged, the rest θ₀; one forward per layer and batch), or an explicit
reference state dict.

**The model output** (:data:`~merging.mloss.gap.OUTPUT`): f(Σ_j α_j θ_j) against
Σ_j α_j f(θ_j), computed as f_1 and f_j − f_1. It needs K + 1 full forwards (fewer when
the reference model is the average or one of the experts), and gives a value even for
models whose activations are functional calls (no layer is then detected).

Cost: per batch, one forward of the reference model carries the hooks; at each measured
layer the K experts' layer runs as one batched GEMM/conv on the hooked input (about K of
the layer's own forward passes), and a forward stops as soon as every measured layer has
been seen when the output is not needed. Layers only: about K + 1 forwards of the measured
layers plus one forward of the rest of the model. After new weights (:meth:`MLossMeter.set_experts`)
the measured layers' stacked weights and the average model are built by a handful of
multi-tensor (``foreach``) operations for all layers together, and a measurement reads
nothing back to the host on a GPU: its statistics stay on the device.

**Forward cache** (``cache_forwards``, as the monitor uses it): per batch object, the
probed layers' inputs and the outputs of the forwards a measurement ran, keyed by the
identity and version counter of every tensor of the state evaluated; a later measurement
of the same batch replays the forwards of states that did not change (θ₀, a start
snapshot, fixed peers).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from merging.mloss.gap import (
    OUTPUT,
    Activation,
    MLossReport,
    MLossStatistics,
    _anchored,
    _centred_gap_,
    _grouped_preactivations,
    _per_sample,
    mloss_report,
)
from merging.mloss.states import check_state_keys, foreach_weighted_average, merge_weights, partial_merge
from merging.mloss.tracing import (
    _eval_mode,
    _forward,
    _measurable,
    _StopForward,
    _to_device,
    _Trace,
    _trace,
    as_forward_args,
)
from merging.state import accumulation_dtype, check_compatible, describe

Reference = Literal["pretrained", "incremental", "average"]
"""The model whose layer inputs are hooked: θ₀, the partial merge, or Σ_j α_j θ_j."""


class _LayerProbe:
    """One measured layer: σ, and the K experts' (W, b) in anchored form once loaded."""

    def __init__(self, name: str, module: nn.Module, act: Activation, calls: int) -> None:
        self.name = name
        self.module = module
        self.act = act
        self.calls = max(calls, 1)
        self.d_out = module.out_channels if not isinstance(module, nn.Linear) else module.out_features
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.alpha: list[float] = []
        self.statistics: MLossStatistics | None = None
        self.seen = 0

    def release(self) -> None:
        self.weight = self.bias = None

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        z, channels_first = _grouped_preactivations(x.to(self.weight.dtype), self.weight, self.bias, module)
        gap, merged = _centred_gap_(z, self.alpha, self.act)
        gap, merged = (_per_sample(t, x.shape[0], self.d_out, channels_first) for t in (gap, merged))
        stats = MLossStatistics.from_gap(gap, merged, channels_first=channels_first)
        self.statistics = stats if self.statistics is None else self.statistics + stats
        self.seen += 1


def _load_probes(probes: Sequence[_LayerProbe], experts: Sequence[Mapping[str, Tensor]], alpha: list[float]) -> None:
    """Stack every probe's [W_1, W_2 − W_1, ..., W_K − W_1] (and b) in the accumulation dtype,
    so that one batched GEMM/conv then gives every z_j: 2K − 1 multi-tensor (``foreach``)
    operations for all the layers together, not a few kernels per layer."""
    num = len(experts)
    targets: list[list[Tensor]] = [[] for _ in range(num)]
    sources: list[list[Tensor]] = [[] for _ in range(num)]
    for probe in probes:
        bias_key = f"{probe.name}.bias"
        has_bias = probe.module.bias is not None and bias_key in experts[0]
        stacks = []
        for key in (f"{probe.name}.weight", bias_key) if has_bias else (f"{probe.name}.weight",):
            first = experts[0][key]
            stack = torch.empty((num, *first.shape), dtype=accumulation_dtype(first.dtype), device=first.device)
            stacks.append(stack)
            for j in range(num):
                targets[j].append(stack[j])
                sources[j].append(experts[j][key])
        probe.weight = stacks[0]
        probe.bias = stacks[1] if has_bias else None
        probe.alpha = alpha
    for j in range(num):
        torch._foreach_copy_(targets[j], sources[j])
        if j:
            torch._foreach_sub_(targets[j], targets[0])


def _run_probes(
    model: nn.Module,
    state: Mapping[str, Tensor],
    args: tuple,
    probes: Sequence[_LayerProbe],
    need_output: bool,
    record: dict[str, list[Tensor]] | None = None,
) -> Any:
    """One forward with ``state``; ``probes`` measure their layer's input as it passes.

    Stops the forward early (returning None) once every probe fired its traced number of
    calls, unless ``need_output``. ``record`` collects a copy of each probed layer's inputs.
    """

    def make_hook(probe: _LayerProbe) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, inputs: tuple) -> None:
            if record is not None:
                # A copy: a later in-place operation of the forward must not change it.
                record.setdefault(probe.name, []).append(inputs[0].clone())
            probe(module, inputs)
            if not need_output and all(p.seen >= p.calls for p in probes):
                raise _StopForward

        return hook

    for p in probes:
        p.seen = 0
    handles = [p.module.register_forward_pre_hook(make_hook(p)) for p in probes]
    try:
        return _forward(model, state, args)
    except _StopForward:
        return None
    finally:
        for h in handles:
            h.remove()


@dataclass
class _Forward:
    """What one forward of one state on one batch produced, kept by a caching meter: the
    probed layers' inputs and, if it was computed, the output. ``tensors`` holds the state's
    tensors, so that their storage (part of the cache key) cannot be reused meanwhile."""

    tensors: list[Tensor]
    inputs: dict[str, list[Tensor]]
    output: Any = None
    has_output: bool = False


def _state_key(state: Mapping[str, Tensor]) -> tuple | None:
    """Identity and version of every tensor of a state: an in-place update (an optimizer step,
    ``load_state_dict``) or a new tensor changes it. None for tensors without a version counter
    (inference tensors), which are never cached."""
    try:
        return tuple((t.data_ptr(), t._version) for t in state.values())
    except RuntimeError:
        return None


def _output_view(output: Any) -> Tensor:
    """The model output as ``(B, P, d)``: node axis = last dimension."""
    if not isinstance(output, Tensor) or not output.is_floating_point():
        raise ValueError(
            f"M-Loss of the model output needs a floating Tensor output, got {type(output).__name__}; "
            "pass output=False to measure the layers only"
        )
    if output.dim() == 0:
        raise ValueError("M-Loss of the model output needs a batched output (B, ...), got a scalar")
    if output.dim() == 1:
        return output.reshape(-1, 1, 1)
    return output.reshape(output.shape[0], -1, output.shape[-1])


def _resolve_layers(
    model: nn.Module,
    layers: Sequence[str] | Mapping[str, Activation] | None,
    trace: _Trace,
) -> dict[str, Activation]:
    if layers is None:
        return dict(trace.activations)
    if isinstance(layers, str):
        raise TypeError(f"M-Loss layers must be a list of names or a mapping, not the string {layers!r}")
    modules = dict(model.named_modules())
    given = layers.items() if isinstance(layers, Mapping) else ((name, None) for name in layers)
    resolved: dict[str, Activation] = {}
    for name, act in given:
        if name == OUTPUT:
            raise ValueError(f"{OUTPUT!r} is reserved for the model output; it cannot name a layer")
        module = modules.get(name)
        if module is None or not _measurable(module):
            known = [n for n, m in modules.items() if _measurable(m)]
            what = "no such module" if module is None else f"a {type(module).__name__}"
            raise ValueError(
                f"M-Loss layer {name!r}: {what}; layers are nn.Linear/nn.Conv modules, e.g. {known[:6]}"
            )
        if act is None:
            act = trace.activations.get(name)
            if act is None:
                raise ValueError(
                    f"M-Loss layer {name!r}: its output does not feed an element-wise activation module "
                    "directly; pass layers as a mapping {name: activation} to say which σ applies"
                )
        resolved[name] = act
    return resolved


class MLossMeter:
    """Measures the M-Loss statistics of K experts batch by batch.

    The layers are traced once (on ``example``); :meth:`set_experts` swaps in new weights
    (a callback measuring live experts during training), :meth:`measure` returns one
    batch's :class:`MLossStatistics`. :func:`m_loss` is the one-shot form; the arguments
    are documented there.

    Args:
        model: the ``nn.Module`` skeleton.
        experts: θ_1..θ_K keyed like ``model.state_dict()``.
        example: one input batch (Tensor or tuple of forward's positional arguments).
        base, layers, weights, reference, merged, output, activation_types, check_values:
            as in :func:`m_loss`.
        cache_forwards: for batches measured again (a monitor measuring the same cached
            inputs at every step): keep, per batch object, the probed layers' inputs of the
            reference forward and the model outputs of every forward it needed, and reuse
            them while the state they came from is unchanged. A state counts as unchanged
            while its tensors are the same (same storage) and have not been modified in
            place (the tensors' version counters: an optimizer step or ``load_state_dict``
            changes them; a write through ``.data`` would not be seen). θ₀ and fixed peers
            are then evaluated once per batch instead of at every measurement. Memory: the
            measured layers' inputs (a copy) and the outputs of every batch measured.
    """

    def __init__(
        self,
        model: nn.Module,
        experts: Sequence[Mapping[str, Tensor]],
        example: Any,
        *,
        base: Mapping[str, Tensor] | None = None,
        layers: Sequence[str] | Mapping[str, Activation] | None = None,
        weights: Sequence[float] | Tensor | None = None,
        reference: Reference | Mapping[str, Tensor] = "pretrained",
        merged: Mapping[str, Tensor] | None = None,
        output: bool = True,
        activation_types: Sequence[type[nn.Module]] = (),
        check_values: bool = True,
        cache_forwards: bool = False,
    ) -> None:
        if isinstance(reference, str) and reference not in ("pretrained", "incremental", "average"):
            raise ValueError(
                f"M-Loss reference must be 'pretrained', 'incremental', 'average' or a state dict, got {reference!r}"
            )
        if not isinstance(reference, (str, Mapping)):
            raise TypeError(f"M-Loss reference must be a string or a state dict, got {type(reference).__name__}")
        if isinstance(reference, Mapping):
            check_state_keys(model, reference, "reference state dict")
        self.model = model
        self.reference = reference
        self.output = output
        self.cache_forwards = cache_forwards
        self._cache: dict[int, tuple[Any, dict[tuple, _Forward]]] = {}
        self._num_experts = len(experts)
        self._alpha = merge_weights(weights, max(len(experts), 1))
        self._alpha_values: list[float] = self._alpha.tolist()  # read once (a CPU tensor)
        # α_2..α_K on the outputs' device and dtype, copied there once (a blocking copy per
        # measurement would make the host wait for the device).
        self._alpha_rest: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.set_experts(experts, base, merged=merged, check_values=check_values)
        trace = _trace(model, self._experts[0], self._args(example), activation_types)
        modules = dict(model.named_modules())
        self._probes = {
            name: _LayerProbe(name, modules[name], act, trace.calls.get(name, 1))
            for name, act in _resolve_layers(model, layers, trace).items()
        }
        if output and OUTPUT in self._probes:
            raise ValueError(
                f"M-Loss: the model has a measured layer named {OUTPUT!r}, the name reserved for the model "
                "output; pass output=False or choose the layers explicitly"
            )
        self._output_size = _output_view(trace.output).shape[-1] if output else None

    @property
    def layer_names(self) -> list[str]:
        """The measured layers, in module order (without :data:`OUTPUT`)."""
        return list(self._probes)

    @property
    def node_sizes(self) -> dict[str, int]:
        """``{name: number of nodes}`` of every entry a measurement may return (the
        :class:`~merging.mloss.metric.MLoss` constructor's argument)."""
        sizes = {name: p.d_out for name, p in self._probes.items()}
        if self._output_size is not None:
            sizes[OUTPUT] = self._output_size
        return sizes

    def set_experts(
        self,
        experts: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None = None,
        *,
        merged: Mapping[str, Tensor] | None = None,
        check_values: bool = True,
    ) -> None:
        """Use new expert (and base) weights from now on; the layers stay as traced.

        Raises:
            ValueError: a different number of experts, incompatible state dicts, or a
                reference that needs ``base`` without one.
        """
        experts = list(experts)
        if not experts:
            raise ValueError("M-Loss needs at least one expert state dict")
        if len(experts) != self._num_experts:
            raise ValueError(f"M-Loss meter was built for {self._num_experts} experts, got {len(experts)}")
        check_compatible(experts, base, check_values=check_values)
        for j, expert in enumerate(experts):
            check_state_keys(self.model, expert, describe(expert, f"expert {j}"))
        if self.reference in ("pretrained", "incremental") and base is None:
            raise ValueError(
                f"M-Loss reference={self.reference!r} needs base (the pretrained state dict θ₀); "
                "pass base=..., or reference='average'"
            )
        if merged is not None:
            if self.reference != "incremental":
                raise ValueError(
                    "M-Loss: `merged` is the incremental reference's merge; it needs reference='incremental'"
                )
            check_state_keys(self.model, merged, "merged state dict")
        self._experts = experts
        self._base = base
        self._merged = merged
        self._device = next((v.device for v in experts[0].values()), torch.device("cpu"))
        needs_average = (
            self.output or self.reference == "average" or (self.reference == "incremental" and merged is None)
        )
        self._average = foreach_weighted_average(experts, self._alpha_values) if needs_average else None
        for probe in getattr(self, "_probes", {}).values():
            probe.release()

    def _args(self, batch: Any) -> tuple:
        return _to_device(as_forward_args(batch), self._device)

    def measure(
        self,
        batch: Any,
        *,
        layers: Sequence[str] | None = None,
        reference: Mapping[str, Tensor] | None = None,
    ) -> dict[str, MLossStatistics]:
        """M-Loss statistics of one batch.

        Args:
            batch: a Tensor or a tuple of forward's positional arguments.
            layers: measure only these (names from :attr:`node_sizes`, :data:`OUTPUT`
                included); None: all.
            reference: a reference state dict for this call (M-TIES's incremental merge).

        Returns:
            ``{name: statistics}`` of the measured layers (then :data:`OUTPUT`).
        """
        if layers is None:
            probes = list(self._probes.values())
            measure_output = self.output
        else:
            unknown = [n for n in layers if n not in self._probes and not (n == OUTPUT and self.output)]
            if unknown:
                raise ValueError(f"M-Loss: not measured by this meter: {unknown}; measured: {list(self.node_sizes)}")
            probes = [self._probes[n] for n in layers if n != OUTPUT]
            measure_output = OUTPUT in layers
        for p in probes:
            p.statistics = None
        unloaded = [p for p in probes if p.weight is None]
        if unloaded:
            _load_probes(unloaded, self._experts, self._alpha_values)
        ref = self.reference if reference is None else reference
        if isinstance(ref, Mapping):
            plan = [(ref, probes)]
        elif ref == "pretrained":
            plan = [(self._base, probes)]
        elif ref == "average":
            plan = [(self._average, probes)]
        else:
            source = self._merged if self._merged is not None else self._average
            plan = [(partial_merge(self._base, source, f"{p.name}.weight"), [p]) for p in probes]
        output_from_plan = measure_output and isinstance(ref, str) and ref == "average"
        expert_from_plan = None
        if measure_output and not output_from_plan and len(plan) == 1:
            # θ₀ may be one of the experts (a model against its own start): reuse that forward.
            expert_from_plan = next((j for j, e in enumerate(self._experts) if e is plan[0][0]), None)
        args = self._args(batch)
        previous = self._cache.get(id(batch), (None, {}))
        cached = previous[1] if previous[0] is batch else {}
        # The forwards this call uses, kept for the next call on this batch (None: no cache).
        kept: dict[tuple, _Forward] | None = {} if self.cache_forwards else None
        merged_out = None
        known: dict[int, Any] = {}
        with torch.no_grad(), _eval_mode(self.model):
            for state, group in plan:
                keep = output_from_plan or expert_from_plan is not None
                if group or keep:
                    result = self._probe_forward(state, args, group, keep, cached, kept)
                    if output_from_plan:
                        merged_out = result
                    elif expert_from_plan is not None:
                        known[expert_from_plan] = result
            statistics = {p.name: p.statistics for p in probes if p.statistics is not None}
            if measure_output:
                if merged_out is None:
                    merged_out = _forward(self.model, self._average, args)
                for j, expert in enumerate(self._experts):
                    if j not in known:
                        known[j] = self._probe_forward(expert, args, [], True, cached, kept)
                statistics[OUTPUT] = self._output_statistics(merged_out, known)
        if kept is not None:
            self._cache[id(batch)] = (batch, kept)
        if layers is not None:
            for p in probes:
                p.release()
        return statistics

    def _probe_forward(
        self,
        state: Mapping[str, Tensor],
        args: tuple,
        probes: Sequence[_LayerProbe],
        need_output: bool,
        cached: Mapping[tuple, _Forward],
        kept: dict[tuple, _Forward] | None,
    ) -> Any:
        """A forward of ``state`` on which ``probes`` measure, or its cached replay: the probes
        then run on the recorded layer inputs (the same computation) and the recorded output
        is returned. ``kept`` (None: no caching) receives what this call used or recorded."""
        key = _state_key(state) if kept is not None else None
        if key is not None:
            hit = kept.get(key) or cached.get(key)
            if hit is not None and all(p.name in hit.inputs for p in probes) and (hit.has_output or not need_output):
                for p in probes:
                    p.seen = 0
                    for x in hit.inputs[p.name]:
                        p(p.module, (x,))
                kept[key] = hit
                return hit.output
        record: dict[str, list[Tensor]] | None = {} if key is not None else None
        result = _run_probes(self.model, state, args, probes, need_output, record)
        if key is not None:
            kept[key] = _Forward(list(state.values()), record, result if need_output else None, need_output)
        return result

    def _output_statistics(self, merged_out: Any, known: Mapping[int, Any]) -> MLossStatistics:
        """f(θ̄) against f_1 + Σ_{j≥2} α_j (f_j − f_1), the ensemble (``known``: the outputs f_j)."""
        outs = [_output_view(known[j]) for j in range(len(self._experts))]
        dtype = accumulation_dtype(outs[0].dtype)
        stacked = _anchored(torch.stack(outs).to(dtype))
        rest = self._alpha_rest.get((stacked.device, dtype))
        if rest is None:
            rest = self._alpha_rest[(stacked.device, dtype)] = self._alpha[1:].to(device=stacked.device, dtype=dtype)
        ensembled = stacked[0] + torch.tensordot(rest, stacked[1:], dims=1)
        merged = _output_view(merged_out).to(dtype)
        return MLossStatistics.from_gap(merged - ensembled, merged)


def mloss_statistics(
    model: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    data: Iterable[Any],
    *,
    base: Mapping[str, Tensor] | None = None,
    layers: Sequence[str] | Mapping[str, Activation] | None = None,
    weights: Sequence[float] | Tensor | None = None,
    reference: Reference | Mapping[str, Tensor] = "pretrained",
    merged: Mapping[str, Tensor] | None = None,
    output: bool = True,
    activation_types: Sequence[type[nn.Module]] = (),
    check_values: bool = True,
) -> dict[str, MLossStatistics]:
    """Summed M-Loss statistics of K experts over ``data`` (arguments as :func:`m_loss`).

    The sums add across calls, shards and ranks (:class:`~merging.mloss.metric.MLoss`);
    :func:`~merging.mloss.gap.mloss_report` turns them into values.

    Returns:
        ``{name: statistics}``: hidden layers in module order, then :data:`OUTPUT`.
    """
    batches = iter(data)
    try:
        first = next(batches)
    except StopIteration:
        raise ValueError("M-Loss data is empty: it needs at least one input batch") from None
    meter = MLossMeter(
        model,
        experts,
        first,
        base=base,
        layers=layers,
        weights=weights,
        reference=reference,
        merged=merged,
        output=output,
        activation_types=activation_types,
        check_values=check_values,
    )
    total: dict[str, MLossStatistics] = {}
    for batch in itertools.chain([first], batches):
        for name, stats in meter.measure(batch).items():
            total[name] = total[name] + stats if name in total else stats
    return total


def m_loss(
    model: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    data: Iterable[Any],
    *,
    base: Mapping[str, Tensor] | None = None,
    layers: Sequence[str] | Mapping[str, Activation] | None = None,
    weights: Sequence[float] | Tensor | None = None,
    reference: Reference | Mapping[str, Tensor] = "pretrained",
    merged: Mapping[str, Tensor] | None = None,
    output: bool = True,
    activation_types: Sequence[type[nn.Module]] = (),
    check_values: bool = True,
) -> MLossReport:
    """M-Loss of merging K experts: per layer, per node, raw and normalized.

    Args:
        model: an ``nn.Module`` skeleton; every state dict is evaluated on it with
            ``torch.func.functional_call`` in eval mode (its own train/eval flags are
            restored afterwards; its parameters are never modified).
        experts: θ_1..θ_K, state dicts keyed like ``model.state_dict()``.
        data: an iterable of input batches, each a Tensor or a tuple of forward's
            positional arguments (labels left out); moved to the experts' device.
        base: θ₀, the pretrained state dict (needed by ``"pretrained"``/``"incremental"``).
        layers: None: every Linear/Conv whose output feeds an element-wise activation module
            (:func:`~merging.mloss.tracing.find_activation_layers`); a list of layer names
            (σ traced); or ``{name: σ}`` to give σ explicitly.
        weights: merge weights α_j summing to 1 (default uniform 1/K, the paper's).
        reference: the model whose layer inputs are hooked (§1.8 item 1): ``"pretrained"``
            (authors' code), ``"incremental"`` (the paper's text: entries before the
            layer's weight merged, the rest θ₀; one forward per layer and batch),
            ``"average"``, or a state dict.
        merged: for ``"incremental"``: the merged state whose leading entries form the
            partial merge (default: the weighted average Σ_j α_j θ_j).
        output: also measure the model output (:data:`OUTPUT`): K expert forwards plus
            one of the averaged model (shared with the reference forward for ``"average"``).
        activation_types: extra module classes to treat as element-wise activations.
        check_values: scan the state dicts for NaN/inf first.

    Returns:
        :class:`MLossReport` (``.node``, ``.layer``, ``.layer_normalized``; ``.mean``).

    Raises:
        ValueError: incompatible state dicts (naming the key), weights not summing to 1,
            a reference without ``base``, empty ``data``, an unknown or unsuitable layer.

    Example::

        report = m_loss(backbone, [theta_1, theta_2], unlabeled_loader, base=theta_0)
        report.layer["blocks.11.mlp.fc1"], report.node["blocks.11.mlp.fc1"].shape
    """
    return mloss_report(
        mloss_statistics(
            model,
            experts,
            data,
            base=base,
            layers=layers,
            weights=weights,
            reference=reference,
            merged=merged,
            output=output,
            activation_types=activation_types,
            check_values=check_values,
        )
    )


__all__ = ["MLossMeter", "Reference", "m_loss", "mloss_statistics"]
