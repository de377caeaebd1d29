"""What callbacks and tools may rely on in a LightningModule that holds several experts.

A module that fine-tunes K experts jointly (``MultiExpertModule``) satisfies
:class:`HasExperts`; callbacks test ``isinstance(pl_module, HasExperts)`` and otherwise
treat the module as a single model (measured against its weights at the start of fit).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from merging.state import StateDict


@runtime_checkable
class HasExperts(Protocol):
    """K same-architecture experts fine-tuned from one base.

    Attributes:
        skeleton: one instance of the expert architecture (holds θ₀); evaluate any expert
            or merge on it with ``torch.func.functional_call(skeleton, state, (x,))``.
    """

    skeleton: nn.Module

    def expert_state_dicts(self) -> list[StateDict]:
        """θ_1..θ_K: each expert's live tensors keyed like ``skeleton.state_dict()`` (no copies)."""
        ...

    def base_state_dict(self) -> StateDict:
        """θ₀: the pretrained state the experts started from, keyed like the experts."""
        ...

    def batch_inputs(self, batch: Any) -> Tensor:
        """The skeleton's input ``(B, *input_shape)`` from a training batch (all tasks mixed)."""
        ...
