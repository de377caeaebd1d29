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
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from merging import _multitensor


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


def dare_divisors_multi(
    keys: Sequence[str],
    shapes: Sequence[torch.Size],
    num_experts: int,
    seed: int,
    drop_rate: float,
    device: torch.device,
    dtype: torch.dtype,
) -> list[Tensor] | None:
    """:func:`dare_drop`'s masks for some entries on the multi-tensor (GPU) path, as divisors:
    ``(K, numel)`` per entry, ``1 − p`` where an entry is kept and ±inf where it is dropped, so
    that ``τ / divisor`` is ``τ · keep / (1 − p)`` (a dropped value becomes a zero, the kept ones
    are divided as :func:`dare_drop` divides them).

    The draws are :func:`dare_drop`'s: one ``torch.rand`` per entry with :func:`entry_generator`.
    Four ``torch._foreach_*`` ops over all of them make the divisors: no foreach op compares,
    so ``u ≥ p`` is ``ceil(u − below)`` with ``below`` the largest value of the draws' dtype
    under p (as ``>=`` rounds it; u − below is in (−1, 1) and zero only where u = below), then
    1/that (1 or ±inf) times 1 − p in ``dtype`` (the task vectors': 1 − p rounds as there).
    None where the draws' dtype has no such value on the host (not float16/32/64): the caller
    then takes the per-entry path.
    """
    host = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}.get(
        torch.get_default_dtype()
    )
    if host is None:
        return None
    below = float(np.nextafter(host(drop_rate), host(-np.inf)))
    draws = [
        torch.rand((num_experts, *shape), generator=entry_generator(seed, key, device), device=device)
        for key, shape in zip(keys, shapes)
    ]
    torch._foreach_sub_(draws, below)
    torch._foreach_ceil_(draws)  # 1 where u ≥ p, else ±0
    if draws and draws[0].dtype != dtype:
        draws = _multitensor.fresh(draws, dtype)
    torch._foreach_reciprocal_(draws)
    torch._foreach_mul_(draws, 1.0 - drop_rate)
    return [d.view(num_experts, -1) for d in draws]


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


__all__ = ["dare_drop", "dare_divisors_multi", "entry_generator", "entry_seed"]
