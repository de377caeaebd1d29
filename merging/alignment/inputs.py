"""Model inputs from an unlabeled data iterable (tensors, or loader batches ``(x, ...)``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor


def batch_input(batch: Any) -> Tensor:
    """The model input of one batch: the batch itself if it is a tensor, else its first item.

    Raises:
        TypeError: the batch is neither a tensor nor a non-empty tuple/list starting with one.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"a data batch must be a tensor or a tuple/list whose first item is the input tensor, "
        f"got {type(batch).__name__}"
    )


def iter_inputs(
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: torch.device | None = None,
    purpose: str = "merging",
) -> Iterator[Tensor]:
    """Yield the input tensor of each batch of ``data`` (at most ``max_batches``), on ``device``.

    Args:
        data: an iterable of batches (a DataLoader, a list of tensors). It is iterated once
            per call, so pass a re-iterable object when it is used twice (activations, then
            a BatchNorm reset).
        max_batches: stop after this many batches; None: all.
        device: move inputs there; None: leave them.
        purpose: what the data is for, named in the error message.

    Raises:
        ValueError: ``data`` yielded no batch, or ``max_batches`` < 1.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    count = 0
    for batch in data:
        if max_batches is not None and count >= max_batches:
            break
        x = batch_input(batch)
        yield x.to(device) if device is not None else x
        count += 1
    if count == 0:
        raise ValueError(
            f"data yielded no batches for {purpose}; pass a non-empty re-iterable (a DataLoader or a list), "
            "not an exhausted iterator"
        )
