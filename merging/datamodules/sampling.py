"""Shuffling that a resumed fit continues exactly: the order of epoch ``e`` depends on ``(seed, e)`` only."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import RandomSampler

from merging._validation import check_int


class SeededRandomSampler(RandomSampler):
    """A random permutation of ``range(len(data_source))`` per epoch, a pure function of
    ``(seed, epoch)``.

    A ``DataLoader(shuffle=True, generator=g)`` draws each epoch's order from ``g``'s running
    state, which a checkpoint does not hold: a fit resumed at epoch ``e`` replays the orders of
    epochs ``0, 1, ...`` instead of continuing. Here the order of epoch ``e`` is drawn from a
    generator seeded by ``(seed, e)`` (``numpy.random.SeedSequence``, so no two pairs share a
    stream), and Lightning's fit loop calls :meth:`set_epoch` with the epoch it is about to run,
    the restored one after a resume, also for the loaders inside a ``CombinedLoader``. Every
    pass within one epoch (a shorter loader cycled by ``CombinedLoader("max_size_cycle")``)
    gives that epoch's order again, as ``DistributedSampler`` does. Outside Lightning, call
    ``set_epoch`` yourself before each epoch.

    Exact from checkpoints taken at an epoch's end (``last.ckpt``): a checkpoint taken within
    an epoch (``ModelCheckpoint(every_n_train_steps=...)``) does not hold a plain
    ``DataLoader``'s position, so the resumed epoch starts its order again from the beginning.

    Under a distributed strategy Lightning replaces it, as any ``RandomSampler``, with a
    ``DistributedSampler(shuffle=True, seed=<the seed_everything seed, 0 if none>)``, whose
    order is likewise a function of (that seed, epoch) and whose ``set_epoch`` Lightning calls:
    resuming stays exact there too, and ``seed`` then only fixes the splits.

    Args:
        data_source: the dataset (only its length is used).
        seed: the seed of every epoch's order, an int >= 0.

    Raises:
        TypeError: ``seed`` is not an int.
        ValueError: ``seed`` is negative.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = check_int("seed", seed, minimum=0, owner=type(self).__name__)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next pass yields.

        Args:
            epoch: the zero-based epoch index (Lightning's ``current_epoch``).
        """
        self.epoch = check_int("epoch", epoch, minimum=0, owner=type(self).__name__)

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The order of ``epoch`` (default: the current one), ``(len(data_source),)`` int64."""
        epoch = self.epoch if epoch is None else epoch
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.randperm(len(self.data_source), generator=generator)

    def __iter__(self) -> Iterator[int]:
        yield from self.permutation().tolist()


__all__ = ["SeededRandomSampler"]
