"""What callbacks and tools may rely on in a LightningModule that holds several experts.

A module that fine-tunes K experts jointly (``MultiExpertModule``) is a :class:`HasExperts`;
callbacks test ``isinstance(pl_module, HasExperts)`` and otherwise treat the module as a
single model (measured against its weights at the start of fit).

The contract is explicit: subclass :class:`HasExperts` (or ``HasExperts.register(cls)`` a
class that cannot), and give the instance a ``skeleton`` module. It is not a
``runtime_checkable`` Protocol: since Python 3.12 such a check looks attributes up with
``inspect.getattr_static``, which does not see ``nn.Module`` submodules (they live in
``_modules``), so a module with a ``skeleton`` would not pass it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

from merging.state import StateDict


class HasExperts(ABC):
    """K same-architecture experts fine-tuned from one base.

    Attributes:
        skeleton: one instance of the expert architecture (holds θ₀); evaluate any expert
            or merge on it with ``torch.func.functional_call(skeleton, state, (x,))``.
    """

    skeleton: nn.Module

    @abstractmethod
    def expert_state_dicts(self) -> list[StateDict]:
        """θ_1..θ_K: each expert's live tensors keyed like ``skeleton.state_dict()`` (no copies)."""

    @abstractmethod
    def base_state_dict(self) -> StateDict:
        """θ₀: the pretrained state the experts started from, keyed like the experts."""

    @abstractmethod
    def batch_inputs(self, batch: Any) -> Tensor:
        """The skeleton's input ``(B, *input_shape)`` from a training batch (all tasks mixed)."""
