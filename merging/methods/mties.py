"""M-TIES (and M-DARE, Few-Layer M-TIES): TIES-Merging whose per-row density follows M-Loss.

Wang, Duan, Chen, Wu, Lim, "M-Loss: Quantifying Model Merging Compatibility with Limited
Unlabeled Data", AAAI 2026, https://arxiv.org/abs/2602.08564 (``spec/mloss.md`` §1.5–1.6).

Algorithm (θ₀ pretrained, θ_1..θ_K experts, τ_j = θ_j − θ₀, keep ratio k, spread e):

1. Walk the state dict in order. For a **target weight** W ``(d_out, d_in...)`` (the weight
   of a layer M-Loss measures, :func:`merging.mloss.find_activation_layers`):
   a. take the next N = K·S batches of the cycled unlabeled data (successive targets
      consume successive batches);
   b. node M-Loss M ∈ R^{d_out} of the layer with α = 1/K on each batch, averaged over
      the N batches;
   c. row keep rates r_i = k − e · rank_scale(M)_i ∈ [k − e, k]: rows with more conflict
      keep fewer entries;
   d. per expert and row, keep the ⌊r_i · d_in⌋ largest |τ_j[i, :]| (every entry ≥ the
      threshold survives, so ties may keep a few more): :func:`rowwise_topk_trim`.
   Every **other** entry (biases of target layers included) is trimmed per tensor at k
   (TIES backend), or dropped with a Bernoulli(k) keep mask and rescaled by 1/k (DARE
   backend, "M-DARE"; target rows still use the row-wise top-k).
2. TIES elect (a zero sum elects +) and disjoint mean, then θ = θ₀ + λ τ_merged.

Discrepancies in the sources and the choices made here (spec §1.8):

- Reference model: the authors' code hooks the layer inputs on the **pretrained** model
  (default ``reference="pretrained"``); the paper's text describes the **incremental**
  (partially merged) model: ``reference="incremental"`` merges entries in state-dict order
  and measures each target on θ₀ with every earlier entry already merged. ``"average"``
  hooks Σ_j θ_j / K.
- Samples: the paper says 128 unlabeled samples; the code draws K·S batches per target.
  Here: K·``sampling_size`` successive batches of ``data`` per target, cycling ``data``
  when it runs out, so the batch size sets the sample count.
- σ is the model's own activation module (the code hard-codes GELU-tanh although CLIP uses
  QuickGELU), and the targets generalise the code's ``mlp.c_fc`` to every Linear/Conv
  followed by an element-wise activation; ``layers`` restricts them (Few-Layer M-TIES:
  a few deep blocks' ``fc1``).
- Budget: no global renormalisation: a target layer keeps k − e/2 on average against k
  elsewhere (as in the code). Non-target entries are trimmed per tensor, not globally.
- The row scale is ``rank`` (the code's); ``robust`` and ``log`` are the code's unused
  alternatives. Whether the paper's Def. 3.6 is rank- or ratio-based is unverified.
- M-DARE's masks depend only on (seed, key) (:func:`merging.methods.classic.entry_generator`),
  so a merge is repeatable whatever order entries are visited in.
- With ``spread=0`` the data no longer matters: M-TIES is then per-tensor TIES except that
  target weights are trimmed row by row at k.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from merging.methods.base import MergeMethod, register_method
from merging.methods.classic import dare_drop, disjoint_mean, elect_sign, entry_generator, trim_to_density
from merging.mloss import SCALES, MLossMeter, row_keep_rates
from merging.state import accumulation_dtype, is_mergeable

log = logging.getLogger(__name__)


def row_keep_counts(rates: Tensor, row_length: int) -> Tensor:
    """⌊r_i · d_in⌋ per row (the same rounding as ``classic.keep_count``), in [0, d_in]."""
    counts = torch.floor(rates.to(torch.float64) * row_length + 1e-9).long()
    return counts.clamp_(0, row_length)


def rowwise_topk_trim(tau: Tensor, rates: Tensor) -> Tensor:
    """Keep, in each row i of each expert's task vector, the ⌊r_i · d_in⌋ largest |τ|.

    Every entry with |τ| ≥ the row's n_i-th largest magnitude survives (ties kept, so a
    row may keep a few more); a row with n_i = 0 is zeroed. Conv weights are rows of
    ``C_in/groups · kernel`` entries.

    Args:
        tau: τ of one weight for K experts, ``(K, d_out, *row_shape)``.
        rates: r ``(d_out,)`` in [0, 1].

    Returns:
        The trimmed τ, same shape.
    """
    if tau.dim() < 2 or rates.dim() != 1 or rates.numel() != tau.shape[1]:
        raise ValueError(
            f"rowwise_topk_trim: need tau (K, d_out, ...) and rates (d_out,), got {tuple(tau.shape)} "
            f"and {tuple(rates.shape)}"
        )
    num, d_out = tau.shape[:2]
    flat = tau.reshape(num, d_out, -1)
    row_length = flat.shape[2]
    counts = row_keep_counts(rates, row_length).to(tau.device)
    magnitudes = flat.abs()
    ordered = magnitudes.sort(dim=2, descending=True).values
    index = (counts - 1).clamp(min=0).view(1, d_out, 1).expand(num, d_out, 1)
    thresholds = ordered.gather(2, index)
    thresholds = torch.where(counts.view(1, d_out, 1) > 0, thresholds, torch.full_like(thresholds, math.inf))
    return (flat * (magnitudes >= thresholds)).reshape(tau.shape)


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    """``itertools.cycle`` that raises on empty data instead of stopping."""
    seen = []
    for batch in data:
        seen.append(batch)
        yield batch
    if not seen:
        raise ValueError("mties: data is empty; M-TIES needs unlabeled input batches")
    yield from itertools.cycle(seen)


@register_method
class MTiesMerging(MergeMethod):
    """M-TIES / M-DARE / Few-Layer M-TIES (module docstring: algorithm and choices).

    Args:
        density: k, the keep ratio (row rates lie in [k − e, k]).
        spread: e, the spread of the row rates.
        sampling_size: S; each target layer's M-Loss averages K·S batches.
        reference: the model whose layer inputs are hooked: ``"pretrained"`` (authors'
            code), ``"incremental"`` (paper's text), ``"average"``.
        backend: non-target entries: ``"ties"`` (per-tensor magnitude trim at k) or
            ``"dare"`` (Bernoulli(k) keep, rescale 1/k: M-DARE).
        layers: target layer names (module names, e.g. ``"blocks.9.mlp.fc1"``); None: every
            layer M-Loss measures. A few deep blocks give Few-Layer M-TIES.
        scaling: λ.
        seed: seed of M-DARE's masks.
        scale: the row scale of Def. 3.6: ``"rank"`` (authors'), ``"robust"``, ``"log"``.

    After :meth:`merge`, :attr:`node_mloss` holds each target's averaged node M-Loss.
    """

    name = "mties"
    paper = "https://arxiv.org/abs/2602.08564"
    requires_base = True
    requires_model = True
    requires_data = True

    def __init__(
        self,
        density: float = 0.8,
        spread: float = 0.1,
        sampling_size: int = 1,
        reference: Literal["pretrained", "incremental", "average"] = "pretrained",
        backend: Literal["ties", "dare"] = "ties",
        layers: list[str] | None = None,
        scaling: float = 1.0,
        seed: int = 0,
        scale: Literal["rank", "robust", "log"] = "rank",
    ) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"mties: density must be in (0, 1], got {density}")
        if spread < 0 or density - spread < 0:
            raise ValueError(f"mties: need 0 <= spread <= density, got spread={spread}, density={density}")
        if isinstance(sampling_size, bool) or not isinstance(sampling_size, int) or sampling_size < 1:
            raise ValueError(f"mties: sampling_size must be a positive int, got {sampling_size!r}")
        if reference not in ("pretrained", "incremental", "average"):
            raise ValueError(f"mties: reference must be 'pretrained', 'incremental' or 'average', got {reference!r}")
        if backend not in ("ties", "dare"):
            raise ValueError(f"mties: backend must be 'ties' or 'dare', got {backend!r}")
        if scale not in SCALES:
            raise ValueError(f"mties: scale must be one of {sorted(SCALES)}, got {scale!r}")
        if isinstance(layers, str):
            raise ValueError(f"mties: layers must be a list of layer names, got the string {layers!r}")
        if not math.isfinite(scaling):
            raise ValueError(f"mties: scaling must be finite, got {scaling}")
        self.density = density
        self.spread = spread
        self.sampling_size = sampling_size
        self.reference = reference
        self.backend = backend
        self.layers = list(layers) if layers is not None else None
        self.scaling = scaling
        self.seed = seed
        self.scale = scale
        self._node_mloss: dict[str, Tensor] = {}

    @property
    def node_mloss(self) -> dict[str, Tensor]:
        """``{target layer: averaged node M-Loss (d_out,)}`` of the last merge."""
        return dict(self._node_mloss)

    def prepare(
        self,
        experts: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None,
        *,
        model: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> dict[str, Any]:
        stream = _cycle(data)
        first = next(stream)
        meter = MLossMeter(
            model,
            experts,
            first,
            base=base,
            layers=self.layers,
            reference="average" if self.reference == "average" else "pretrained",
            output=False,
            check_values=False,
        )
        batches = itertools.chain([first], stream)
        targets = {f"{name}.weight": name for name in meter.layer_names}
        if not targets:
            log.warning("mties: no layer followed by an element-wise activation; M-TIES reduces to per-tensor TIES")
        draws = len(experts) * self.sampling_size
        self._node_mloss = {}
        if self.reference != "incremental":
            for name in targets.values():
                self._node_mloss[name] = self._node_mloss_of(meter, name, batches, draws, None)
            return {"rates": self._rates(targets), "merged": None}

        # Incremental: merge in state-dict order; each target is measured on θ₀ with every
        # earlier entry already merged.
        current = dict(base)
        merged: dict[str, Tensor] = {}
        for key, ref in experts[0].items():
            if not is_mergeable(ref):
                continue
            if key in targets:
                name = targets[key]
                self._node_mloss[name] = self._node_mloss_of(meter, name, batches, draws, current)
            acc = accumulation_dtype(ref.dtype)
            stacked = torch.stack([e[key].to(acc) for e in experts])
            rates = self._rates({key: targets[key]}).get(key) if key in targets else None
            merged[key] = self._merge_entry(key, stacked, base[key].to(acc), rates)
            current[key] = merged[key].to(ref.dtype)
        return {"rates": {}, "merged": merged}

    def _node_mloss_of(
        self,
        meter: MLossMeter,
        name: str,
        batches: Iterator[Any],
        draws: int,
        reference: Mapping[str, Tensor] | None,
    ) -> Tensor:
        """Mean over ``draws`` successive batches of the per-batch node M-Loss of one layer."""
        vectors = []
        for batch in itertools.islice(batches, draws):
            stats = meter.measure(batch, layers=[name], reference=reference).get(name)
            if stats is not None:
                vectors.append(stats.node_sum / stats.positions)
        if not vectors:
            raise ValueError(f"mties: layer {name!r} was never reached by a forward pass on the data")
        return torch.stack(vectors).mean(dim=0)

    def _rates(self, targets: Mapping[str, str]) -> dict[str, Tensor]:
        return {
            key: row_keep_rates(self._node_mloss[name], self.density, self.spread, self.scale)
            for key, name in targets.items()
        }

    def merge_tensor(self, key: str, experts: Tensor, base: Tensor | None, context: dict[str, Any]) -> Tensor:
        if context["merged"] is not None:
            return context["merged"][key]
        return self._merge_entry(key, experts, base, context["rates"].get(key))

    def _merge_entry(self, key: str, experts: Tensor, base: Tensor, rates: Tensor | None) -> Tensor:
        """θ₀ + λ · disjoint_mean(elect(trimmed τ)) of one entry; ``rates`` marks a target."""
        tau = experts - base
        if rates is not None:
            trimmed = rowwise_topk_trim(tau, rates)
        elif self.backend == "ties":
            trimmed = trim_to_density(tau, self.density) if self.density < 1.0 else tau
        else:
            trimmed = dare_drop(tau, 1.0 - self.density, entry_generator(self.seed, key))
        return base + self.scaling * disjoint_mean(trimmed, elect_sign(trimmed))


__all__ = ["MTiesMerging", "row_keep_counts", "rowwise_topk_trim"]
