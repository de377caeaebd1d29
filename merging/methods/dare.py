"""DARE's per-tensor step: drop and rescale, with masks that depend only on (seed, key).

Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch" (DARE), ICML 2024, https://arxiv.org/abs/2311.03099.

Two ways to draw the masks, both depending only on (seed, key, expert, entry index), so a
streamed merge draws what an in-memory one does:

- **torch** (:func:`dare_drop` with :func:`entry_generator`): ``torch.rand`` with a generator
  seeded by (seed, key), on the task vectors' device. A CUDA generator (Philox) draws other
  numbers than a CPU one (Mersenne Twister) from the same seed, so the same seed gives the same
  masks on the same device type, not across device types. On the CPU these are FusionBench's
  masks when FusionBench's ``torch.rand`` is seeded with :func:`entry_seed` per key
  (``benchmarks/peers.py``), except where a draw equals p (the two keep rules differ there).
- **hash** (:func:`merging.methods._kernels.dare_merge`, CPU float32 merges large enough for
  the numba kernels): a counter-based hash of (:func:`entry_seed`, expert j, entry i) gives a
  32-bit draw u, kept iff u ≥ ⌈p · 2³²⌉, computed inside the fused merge loop (no mask or
  random tensor is made). Its masks are not torch's nor FusionBench's: the same seed gives
  other masks with the same distribution (independent Bernoulli(1 − p) keeps, to 2⁻³²).
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor


def dare_drop(tau: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """DARE *drop and rescale*: drop each entry with probability p, rescale survivors by 1/(1−p).

    Args:
        tau: ``(K, *shape)`` task vectors.
        drop_rate: p in [0, 1).
        generator: the random source, on ``tau``'s device (:func:`entry_generator`): the
            mask is drawn there, so the same seed gives the same mask on the same device
            type (CPU and CUDA generators draw different numbers).

    Returns:
        Same shape as ``tau``.
    """
    if drop_rate == 0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, device=tau.device) >= drop_rate
    return tau * keep / (1.0 - drop_rate)


def entry_generator(seed: int, key: str, device: torch.device | str | None = None) -> torch.Generator:
    """A generator seeded by (seed, key): the same entry gets the same draw whatever the
    order or subset of entries merged (streamed merges, two-pass global methods).

    Args:
        seed: the method's seed.
        key: the state-dict key.
        device: where the draws are made (the task vectors' device); None: the CPU.
    """
    generator = torch.Generator(device=device) if device is not None else torch.Generator()
    return generator.manual_seed(entry_seed(seed, key))


def entry_seed(seed: int, key: str) -> int:
    """The seed of one entry's masks, from (seed, key): the torch generator's seed
    (:func:`entry_generator`) and the hash draws' stream seed."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


__all__ = ["dare_drop", "entry_generator", "entry_seed"]
