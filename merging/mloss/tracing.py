"""Which layers M-Loss measures: activation discovery by one traced forward, and forward helpers.

Wang, Duan, Chen, Wu, Lim, "M-Loss: Quantifying Model Merging Compatibility with Limited
Unlabeled Data", AAAI 2026, https://arxiv.org/abs/2602.08564.

Generalising the authors' ``mlp.c_fc`` of CLIP ViTs, a layer is measured when it is an
``nn.Linear`` / ``nn.Conv1d|2d|3d`` whose output tensor is passed *unchanged* (same tensor
object) to an element-wise activation module, found by one traced forward pass (data flow,
not module order): timm's ``Mlp.fc1 -> act``, ``nn.Sequential(Linear, ReLU)``, a conv
followed directly by ReLU. σ is that activation module, so GELU-tanh, QuickGELU, SiLU, ...
are whatever the model uses. A conv followed by BatchNorm is not measured (σ's input is
not the conv's output).

Every forward here runs one module skeleton with substituted parameters
(``torch.func.functional_call``) in eval mode, restoring the model's own train/eval flags.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
)
"""torch.nn activations treated as element-wise σ. Parameter-free modules defined in
``timm.layers.activations*`` (GELUTanh, QuickGELU, ...) are recognised too."""


# ----------------------------------------------------------------------- forward helpers


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (dropout off, BatchNorm running stats untouched), then
    restore every submodule's own train/eval flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _forward(model: nn.Module, state: Mapping[str, Tensor] | None, args: tuple) -> Any:
    if state is None:
        return model(*args)
    # strict=False: non-persistent buffers are absent from state dicts; keys were checked.
    return functional_call(model, dict(state), args)


def as_forward_args(batch: Any) -> tuple:
    """A batch as forward's positional arguments: a Tensor -> ``(batch,)``; a tuple/list -> itself.

    Raises:
        TypeError: any other batch type (select the inputs first, e.g. with an ``input_fn``).
    """
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise TypeError(
        f"an M-Loss input batch must be a Tensor or a tuple of forward's positional arguments, "
        f"got {type(batch).__name__}"
    )


def _to_device(args: tuple, device: torch.device) -> tuple:
    return tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)


class _StopForward(Exception):
    """Raised by a hook to end a forward early once it has what it was run for."""


# ----------------------------------------------------------------------- layer discovery


def is_elementwise_activation(module: nn.Module, extra_types: Sequence[type[nn.Module]] = ()) -> bool:
    """Whether ``module`` is a parameter-free element-wise activation σ.

    True for :data:`ELEMENTWISE_ACTIVATIONS`, parameter-free modules defined in
    ``timm.layers.activations*``, and instances of ``extra_types``.
    """
    if isinstance(module, tuple(extra_types)):
        return True
    if next(module.parameters(recurse=False), None) is not None:
        return False
    if isinstance(module, ELEMENTWISE_ACTIVATIONS):
        return True
    return type(module).__module__.startswith("timm.layers.activations")


def _measurable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


@dataclass
class _Trace:
    activations: dict[str, nn.Module]
    calls: dict[str, int]
    output: Any


def _trace(
    model: nn.Module,
    state: Mapping[str, Tensor] | None,
    args: tuple,
    activation_types: Sequence[type[nn.Module]],
) -> _Trace:
    """One forward recording which Linear/Conv output feeds an activation module unchanged."""
    layer_names = {m: n for n, m in model.named_modules() if _measurable(m)}
    produced: dict[int, tuple[str, Tensor]] = {}
    found: dict[str, nn.Module] = {}
    calls: dict[str, int] = {}

    def on_layer(module: nn.Module, inputs: tuple, output: Any) -> None:
        name = layer_names[module]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(output, Tensor):
            produced[id(output)] = (name, output)

    def on_activation(module: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], Tensor):
            hit = produced.get(id(inputs[0]))
            if hit is not None and hit[1] is inputs[0]:
                found.setdefault(hit[0], module)

    handles = [m.register_forward_hook(on_layer) for m in layer_names]
    handles += [
        m.register_forward_pre_hook(on_activation)
        for m in model.modules()
        if is_elementwise_activation(m, activation_types)
    ]
    try:
        with torch.no_grad(), _eval_mode(model):
            output = _forward(model, state, args)
    finally:
        for h in handles:
            h.remove()
    order = {name: i for i, name in enumerate(n for n, _ in model.named_modules())}
    return _Trace(dict(sorted(found.items(), key=lambda kv: order[kv[0]])), calls, output)


def find_activation_layers(
    model: nn.Module, *args: Any, activation_types: Sequence[type[nn.Module]] = ()
) -> dict[str, nn.Module]:
    """The layers M-Loss measures by default, with their activation σ.

    Rule: an ``nn.Linear`` / ``nn.Conv1d|2d|3d`` is measured when, in one traced forward
    pass of ``model(*args)`` (eval mode, no grad), its output tensor is passed unchanged
    (the same tensor object) to an element-wise activation module
    (:func:`is_elementwise_activation`). Functional activations (``F.relu`` in
    ``forward``) and anything between the layer and σ (BatchNorm, a reshape) exclude it.

    Args:
        model: the network.
        *args: one batch of its forward's positional arguments.
        activation_types: extra module classes to treat as element-wise activations.

    Returns:
        ``{layer name: σ module}`` in ``model.named_modules()`` order.
    """
    return _trace(model, None, args, activation_types).activations


def capture_layer_input(
    model: nn.Module, layer: str, batch: Any, state: Mapping[str, Tensor] | None = None
) -> Tensor:
    """The input of ``layer`` when ``model`` (with ``state`` substituted) runs on ``batch``.

    Eval mode, no grad; the forward stops right after the layer's first call.

    Args:
        model: the network.
        layer: a module name (``model.named_modules()``).
        batch: a Tensor or a tuple of forward's positional arguments.
        state: parameters/buffers to evaluate with (the reference θ₀, a merge, ...);
            None: the model's own.

    Returns:
        The layer's first positional input, e.g. ``(B, T, d_in)`` for a token MLP.

    Raises:
        ValueError: no such module, or the forward never reached it.
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"capture_layer_input: no module named {layer!r}")
    captured: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple) -> None:
        captured.append(inputs[0].detach())
        raise _StopForward

    handle = modules[layer].register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), _eval_mode(model):
            _forward(model, state, as_forward_args(batch))
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"capture_layer_input: the forward pass never reached {layer!r}")
    return captured[0]


__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "as_forward_args",
    "capture_layer_input",
    "find_activation_layers",
    "is_elementwise_activation",
]
