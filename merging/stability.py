"""L2-stability quantities of fine-tuning and of the merged model x_avg.

Measurements for *Understanding Model Merging: A Unified Generalization Framework for
Heterogeneous Experts* (Li, Tang, Zhang, Wang, Yin, Shen). Only the paper's abstracts are
available: its bound, constants and scaling laws are not. What is here are measurements
with honest names, built on the standard SGD-stability template of Lei & Ying (ICML 2020,
"Fine-grained analysis of stability and generalization for SGD"), which the paper's
analysis is read to follow ([I] in ``spec/stability.md``).

Notation: pretrained x₀ (θ₀), experts j = 1..K trained on S_j (n_j samples) with step
sizes η_{j,t}, batch sizes b_{j,t}, T_j steps; task vectors τ_j = θ_j − θ₀; merge weights
w_j (normalised to sum to 1); x_avg = x₀ + Σ_j w_j τ_j.

Per expert (:class:`TrajectoryStats`, accumulated step by step):
    the lr integral Λ_j = Σ_t η_{j,t} and Σ_t η_{j,t}/b_{j,t} (= Λ_j/b_j for a constant
    batch), the path length Σ_t ‖θ_{t+1} − θ_t‖, the per-step update norm, gradient-norm
    statistics (running E‖g_t‖²).

Across experts (:func:`task_vector_stats`, streamed one state-dict entry at a time):
    ‖τ_j‖ overall and per layer, the dispersion D = Σ_j w_j ‖τ_j − τ̄‖² (task
    heterogeneity, τ̄ = Σ_j w_j τ_j), pairwise task-vector cosines, sign-conflict rates, and
    the same after TIES trimming or DARE drop-and-rescale (:func:`sparsified_task_vector_stats`).

The empirical L2-stability probe (:func:`empirical_l2_stability`) trains twice, with one
sample swapped, and measures ‖A(S) − A(S^{(i)})‖² for any deterministic training function A.

Non-float state-dict entries (``num_batches_tracked``) are left out of every quantity;
floating buffers (BatchNorm running statistics) are part of τ, as they are merged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from merging.methods.classic import dare_drop, entry_generator, global_magnitude_thresholds, trim_to_density
from merging.state import accumulation_dtype, check_compatible, mergeable_keys

# ----------------------------------------------------------------------- small helpers


def layer_name(key: str, depth: int | None = None) -> str:
    """The layer a state-dict key belongs to.

    Args:
        key: a state-dict key, e.g. ``"blocks.3.mlp.fc1.weight"``.
        depth: ``None``: the owning module (the key without its last component,
            ``"blocks.3.mlp.fc1"``); an int d: the first d components (``depth=2`` gives
            ``"blocks.3"``). A key without a dot is its own layer.

    Returns:
        The layer name.
    """
    parts = key.split(".")
    if depth is None:
        return ".".join(parts[:-1]) if len(parts) > 1 else key
    if depth < 1:
        raise ValueError(f"layer depth must be >= 1 or None, got {depth}")
    return ".".join(parts[:depth])


def global_norm(tensors: Iterator[Tensor] | Sequence[Tensor]) -> float:
    """‖(t_1, ..., t_m)‖₂: the Euclidean norm of several tensors taken as one vector.

    Accumulated in float64, so the result does not depend on how the vector is split.
    """
    norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors]
    if not norms:
        return 0.0
    # One host sync for the whole vector, not one per tensor.
    return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))


def state_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """‖a − b‖₂ over the floating entries of two state dicts with the same keys.

    Raises:
        StateDictError: the state dicts differ in keys, shapes or dtypes.
    """
    check_compatible([a, b], check_values=False)
    return global_norm(a[k].to(accumulation_dtype(a[k].dtype)) - b[k] for k in mergeable_keys(a))


def normalized_weights(
    weights: Sequence[float] | Tensor | None, num_experts: int, device: torch.device | None = None
) -> Tensor:
    """Merge weights w (K,), float64, normalised to sum to 1; ``None`` gives uniform 1/K.

    Args:
        weights: w_1..w_K, or None.
        num_experts: K.
        device: where w is made (the experts' device); None: torch's default device.

    Raises:
        ValueError: wrong length, a negative weight, or a zero sum.
    """
    if num_experts < 1:
        raise ValueError("at least one expert is needed")
    if weights is None:
        return torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64, device=device)
    w = torch.as_tensor(weights, dtype=torch.float64, device=device).flatten()
    if w.numel() != num_experts:
        raise ValueError(f"{w.numel()} merge weights given for {num_experts} experts")
    if bool((w < 0).any()) or float(w.sum()) <= 0 or not bool(torch.isfinite(w).all()):
        raise ValueError(f"merge weights must be finite, non-negative, with a positive sum; got {w.tolist()}")
    return w / w.sum()


# ------------------------------------------------------------ per-expert trajectory


@dataclass
class TrajectoryStats:
    """Running statistics of one expert's optimisation trajectory, one update per optimizer step.

    All sums are over the optimizer steps t = 1..T seen so far. Update with :meth:`update`;
    :meth:`state_dict` / :meth:`load_state_dict` make it resumable.

    Attributes:
        steps: T.
        lr_integral: Λ = Σ_t η_t, the integrated step size (SGD stability grows with it
            under the Lei & Ying template).
        lr_integral_per_sample: Σ_t η_t / b_t (= Λ/b for a constant batch size b): the
            step size a single sample receives, summed.
        samples: Σ_t b_t.
        path_length: Σ_t ‖θ_{t+1} − θ_t‖ (≥ ‖θ_T − θ_0‖ by the triangle inequality).
        last_update_norm / max_update_norm: ‖θ_{t+1} − θ_t‖ of the last step / largest step.
        grad_norm_sum / grad_sq_norm_sum: Σ_t ‖g_t‖ and Σ_t ‖g_t‖² over the steps whose
            gradient was observed (``grad_steps`` of them).
        last_grad_norm / max_grad_norm: ‖g_t‖ of the last step / the largest.
        last_lr: η of the last step.
    """

    steps: int = 0
    lr_integral: float = 0.0
    lr_integral_per_sample: float = 0.0
    samples: int = 0
    path_length: float = 0.0
    last_update_norm: float = 0.0
    max_update_norm: float = 0.0
    grad_steps: int = 0
    grad_norm_sum: float = 0.0
    grad_sq_norm_sum: float = 0.0
    last_grad_norm: float = 0.0
    max_grad_norm: float = 0.0
    last_lr: float = 0.0

    def update(self, lr: float, batch_size: int, update_norm: float | None, grad_norm: float | None = None) -> None:
        """Record one optimizer step.

        Args:
            lr: η_t, the step size the optimizer used at this step.
            batch_size: b_t, the samples the step's gradient averaged over (> 0).
            update_norm: ‖θ_{t+1} − θ_t‖, or None when the update was not measured (the
                path length then only sums the measured steps).
            grad_norm: ‖g_t‖, or None when the gradient was not observed.

        Raises:
            ValueError: a non-positive batch size, or a negative or NaN lr / norm.
        """
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if not (lr >= 0 and (update_norm is None or update_norm >= 0)):
            raise ValueError(f"lr and update norm must be non-negative, got lr={lr}, update_norm={update_norm}")
        self.steps += 1
        self.lr_integral += lr
        self.lr_integral_per_sample += lr / batch_size
        self.samples += batch_size
        self.last_lr = lr
        if update_norm is not None:
            self.path_length += update_norm
            self.last_update_norm = update_norm
            self.max_update_norm = max(self.max_update_norm, update_norm)
        if grad_norm is not None:
            self.grad_steps += 1
            self.grad_norm_sum += grad_norm
            self.grad_sq_norm_sum += grad_norm * grad_norm
            self.last_grad_norm = grad_norm
            self.max_grad_norm = max(self.max_grad_norm, grad_norm)

    @property
    def mean_batch_size(self) -> float:
        """Σ_t b_t / T (0 before the first step)."""
        return self.samples / self.steps if self.steps else 0.0

    @property
    def mean_grad_norm(self) -> float:
        """(1/T) Σ_t ‖g_t‖ over the observed steps (0 before the first)."""
        return self.grad_norm_sum / self.grad_steps if self.grad_steps else 0.0

    @property
    def mean_sq_grad_norm(self) -> float:
        """The running E‖g_t‖² = (1/T) Σ_t ‖g_t‖² over the observed steps (0 before the first)."""
        return self.grad_sq_norm_sum / self.grad_steps if self.grad_steps else 0.0

    def state_dict(self) -> dict[str, float | int]:
        """The statistics as a plain dict (for checkpoints)."""
        return dict(vars(self))

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        """Restore from :meth:`state_dict`.

        Raises:
            KeyError: a field is missing (the message names it).
        """
        for name in vars(self):
            if name not in state:
                raise KeyError(f"TrajectoryStats state has no {name!r}")
            setattr(self, name, type(getattr(self, name))(state[name]))


# ------------------------------------------------------------- across experts


@dataclass
class TaskVectorStats:
    """Task-vector statistics of K experts against one base (all float64, on the CPU: the
    sums are accumulated on the task vectors' device and this K-sized summary is copied back
    once).

    Attributes:
        weights: w (K,), normalised to sum to 1.
        norms: ‖τ_j‖ (K,).
        gram: G_ij = ⟨τ_i, τ_j⟩ (K, K).
        cosine: cos(τ_i, τ_j) (K, K), in [−1, 1]; 0 where a task vector is zero.
        dispersion: D = Σ_j w_j ‖τ_j − τ̄‖², τ̄ = Σ_j w_j τ_j. D does not depend on θ₀
            (τ_j − τ̄ = θ_j − θ̄) and is 0 exactly for identical experts.
        sign_conflict: among the entries where at least two experts are non-zero, the
            fraction whose non-zero values do not all share one sign ([I]; 0 when no entry
            has two non-zero values).
        pairwise_sign_conflict: (K, K), for each pair the fraction of the entries where
            both are non-zero that have opposite signs (0 on the diagonal).
        density: fraction of non-zero entries of each τ_j (K,); 1 for dense task vectors
            up to exact zeros, ≈ the kept fraction after sparsification.
        num_entries: N, the number of floating entries compared.
        layer_norms: per layer (see :func:`layer_name`), ‖τ_j^l‖ (K,).
        layer_dispersion: per layer, D^l (the D's of the layers sum to D).
        layer_sign_conflict: per layer, the sign-conflict rate within the layer.
        layer_entries: per layer, its number of entries.
    """

    weights: Tensor
    norms: Tensor
    gram: Tensor
    cosine: Tensor
    dispersion: float
    sign_conflict: float
    pairwise_sign_conflict: Tensor
    density: Tensor
    num_entries: int
    layer_norms: dict[str, Tensor] = field(default_factory=dict)
    layer_dispersion: dict[str, float] = field(default_factory=dict)
    layer_sign_conflict: dict[str, float] = field(default_factory=dict)
    layer_entries: dict[str, int] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        """K."""
        return int(self.norms.numel())

    def mean_pairwise_cosine(self) -> float:
        """Mean of cos(τ_i, τ_j) over pairs i < j (0 for K = 1)."""
        k = self.num_experts
        if k < 2:
            return 0.0
        iu = torch.triu_indices(k, k, offset=1)
        return float(self.cosine[iu[0], iu[1]].mean())


class _Accumulator:
    """Sufficient statistics of :class:`TaskVectorStats`, summed entry by entry on the task
    vectors' device (float64 sums, int64 counts: no host sync per entry); :meth:`result`
    brings the K-sized summary to the CPU once."""

    def __init__(self, weights: Tensor, layer_depth: int | None) -> None:
        self.w = weights
        self.layer_depth = layer_depth
        self.sums: dict[str, Tensor] | None = None  # made on the first entry's device
        self.entries = 0
        self.layers: dict[str, dict[str, Any]] = {}

    def _zeros(self, like: Tensor) -> dict[str, Tensor]:
        k = self.w.numel()
        return {
            "gram": like.new_zeros(k, k),
            "nonzero": like.new_zeros(k),
            "both_nonzero": like.new_zeros(k, k),
            "opposite": like.new_zeros(k, k),
            "dispersion": like.new_zeros(()),
            "conflicts": like.new_zeros((), dtype=torch.long),
            "active": like.new_zeros((), dtype=torch.long),
        }

    def add(self, key: str, tau: Tensor, deviation: Tensor) -> None:
        """Add one entry: ``tau`` (K, *shape) task vectors, ``deviation`` (K, *shape) any
        per-entry translate of them (θ_j − θ_1 keeps D exactly 0 for identical experts)."""
        k = tau.shape[0]
        flat = tau.reshape(k, -1).to(torch.float64)
        if self.sums is None:
            self.w = self.w.to(device=flat.device, dtype=torch.float64)
            self.sums = self._zeros(flat)
        gram = flat @ flat.T
        dev = deviation.reshape(k, -1).to(torch.float64)
        centred = dev - (self.w.unsqueeze(1) * dev).sum(dim=0, keepdim=True)
        disp = (self.w * centred.pow(2).sum(dim=1)).sum()
        pos, neg = flat > 0, flat < 0
        nz = (pos | neg).to(torch.float64)
        n_conf = (pos.any(dim=0) & neg.any(dim=0)).sum()
        n_active = (nz.sum(dim=0) >= 2).sum()
        posf, negf = pos.to(torch.float64), neg.to(torch.float64)
        sums = self.sums
        sums["gram"] += gram
        sums["nonzero"] += nz.sum(dim=1)
        sums["both_nonzero"] += nz @ nz.T
        sums["opposite"] += posf @ negf.T + negf @ posf.T
        sums["dispersion"] += disp
        sums["conflicts"] += n_conf
        sums["active"] += n_active
        self.entries += flat.shape[1]
        name = layer_name(key, self.layer_depth)
        if name not in self.layers:
            zeros = self._zeros(flat)
            self.layers[name] = {
                "sq": zeros["nonzero"],
                "disp": zeros["dispersion"],
                "conf": zeros["conflicts"],
                "active": zeros["active"],
                "entries": 0,
            }
        layer = self.layers[name]
        layer["sq"] += torch.diagonal(gram)
        layer["disp"] += disp
        layer["conf"] += n_conf
        layer["active"] += n_active
        layer["entries"] += flat.shape[1]

    def result(self) -> TaskVectorStats:
        sums = self._zeros(self.w.new_zeros(())) if self.sums is None else self.sums
        # The summary is K-sized: one copy to the CPU, then plain floats and CPU tensors.
        host = {name: v.cpu() for name, v in sums.items()}
        layers = {
            n: {s: v.cpu() if isinstance(v, Tensor) else v for s, v in layer.items()}
            for n, layer in self.layers.items()
        }
        gram = host["gram"]
        norms = torch.diagonal(gram).clamp_min(0).sqrt()
        denom = norms.unsqueeze(1) * norms.unsqueeze(0)
        cosine = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(denom)).clamp(-1, 1)
        both, opposite = host["both_nonzero"], host["opposite"]
        pairwise = torch.where(both > 0, opposite / both.clamp_min(1), torch.zeros_like(opposite))
        active = int(host["active"])
        return TaskVectorStats(
            weights=self.w.cpu().clone(),
            norms=norms,
            gram=gram,
            cosine=cosine,
            dispersion=float(host["dispersion"]),
            sign_conflict=int(host["conflicts"]) / active if active else 0.0,
            pairwise_sign_conflict=pairwise,
            density=host["nonzero"] / max(self.entries, 1),
            num_entries=self.entries,
            layer_norms={n: v["sq"].sqrt() for n, v in layers.items()},
            layer_dispersion={n: float(v["disp"]) for n, v in layers.items()},
            layer_sign_conflict={
                n: int(v["conf"]) / int(v["active"]) if int(v["active"]) else 0.0 for n, v in layers.items()
            },
            layer_entries={n: v["entries"] for n, v in layers.items()},
        )


def _device(state: Mapping[str, Tensor]) -> torch.device | None:
    """The device of a state dict's first tensor (None for an empty one)."""
    return next((v.device for v in state.values()), None)


def _stacked_task_vectors(
    experts: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor], keys: Sequence[str]
) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Per key: (key, τ stacked (K, *shape), θ_j − θ_1 stacked (K, *shape)) in the accumulation dtype."""
    for key in keys:
        acc = accumulation_dtype(base[key].dtype)
        stacked = torch.stack([e[key].detach().to(acc) for e in experts])
        yield key, stacked - base[key].detach().to(acc), stacked - stacked[:1]


def task_vector_stats(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    weights: Sequence[float] | Tensor | None = None,
    *,
    layer_depth: int | None = None,
    check: bool = True,
) -> TaskVectorStats:
    """Norms, dispersion D, cosines and sign conflicts of the task vectors τ_j = θ_j − θ₀.

    Streams over the state dict one entry at a time: peak extra memory is one stacked
    entry (K, *shape), never K flattened models.

    Args:
        experts: θ_1..θ_K (state dicts with the same keys, shapes and dtypes as ``base``).
        base: θ₀.
        weights: merge weights w_j (normalised to sum to 1); None: uniform.
        layer_depth: how keys are grouped into layers (:func:`layer_name`).
        check: validate keys, shapes, dtypes and finite values first (one extra pass).

    Returns:
        :class:`TaskVectorStats`.

    Raises:
        StateDictError: incompatible state dicts (the message names the key).
        ValueError: bad weights.
    """
    experts = list(experts)
    if check:
        check_compatible(experts, base)
    acc = _Accumulator(normalized_weights(weights, len(experts), _device(base)), layer_depth)
    for key, tau, deviation in _stacked_task_vectors(experts, base, mergeable_keys(base)):
        acc.add(key, tau, deviation)
    return acc.result()


def sparsified_task_vector_stats(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    weights: Sequence[float] | Tensor | None = None,
    *,
    method: Literal["ties", "dare"] = "ties",
    density: float = 0.2,
    scope: Literal["global", "tensor"] = "global",
    drop_rate: float = 0.9,
    seed: int = 0,
    layer_depth: int | None = None,
    check: bool = True,
) -> TaskVectorStats:
    """:func:`task_vector_stats` of the sparsified task vectors τ̃_j that TIES or DARE merge.

    ``"ties"``: τ̃ = trim_to_density(τ, density), the magnitude trim of TIES (before sign
    election), over each whole task vector (``scope="global"``) or per tensor. ``"dare"``:
    τ̃ = dare_drop(τ, p) with survivors rescaled by 1/(1−p), with the same per-entry seeds
    as :class:`merging.methods.classic.Dare` with ``rng="torch"`` (so the statistics describe
    that merge's input; the default ``rng="auto"`` draws other masks, with the same
    distribution, on CPU float32 merges large enough for the numba kernels). Both use the
    classic merges' own functions.

    D here is Σ_j w_j ‖τ̃_j − Σ_k w_k τ̃_k‖²: whether sparsification "suppresses task
    heterogeneity" (the paper's claim, [P]) shows as a smaller D than :func:`task_vector_stats`'s.

    Args:
        experts, base, weights, layer_depth, check: as :func:`task_vector_stats`.
        method: ``"ties"`` or ``"dare"``.
        density: TIES trim density.
        scope: TIES threshold scope.
        drop_rate: DARE drop probability p.
        seed: DARE mask seed.

    Raises:
        ValueError: unknown method, or a density / drop rate out of range.
    """
    if method not in ("ties", "dare"):
        raise ValueError(f"method must be 'ties' or 'dare', got {method!r}")
    if method == "ties" and not 0.0 <= density <= 1.0:
        raise ValueError(f"ties density must be in [0, 1], got {density}")
    if method == "dare" and not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"dare drop_rate must be in [0, 1), got {drop_rate}")
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope must be 'global' or 'tensor', got {scope!r}")
    experts = list(experts)
    if check:
        check_compatible(experts, base)
    keys = mergeable_keys(base)
    thresholds = None
    if method == "ties" and scope == "global" and density < 1.0:
        thresholds = global_magnitude_thresholds(experts, base, keys, density)
    acc = _Accumulator(normalized_weights(weights, len(experts), _device(base)), layer_depth)
    for key, tau, _ in _stacked_task_vectors(experts, base, keys):
        if method == "ties":
            sparse = tau if density >= 1.0 else trim_to_density(tau, density, thresholds)
        else:
            sparse = dare_drop(tau, drop_rate, entry_generator(seed, key, tau.device))
        acc.add(key, sparse, sparse - sparse[:1])
    return acc.result()


# --------------------------------------------------------- the bound's template [I]


def merged_on_average_stability(
    expert_stability: Sequence[float] | Tensor,
    num_samples: Sequence[int] | Tensor,
    weights: Sequence[float] | Tensor | None = None,
) -> float:
    """On-average L2 stability of x_avg from the experts': ε²_avg = Σ_j (n_j/n) · w_j² · ε_j².

    Swapping one sample of task j changes only expert j, and x_avg moves by w_j times
    expert j's move; averaging over the n = Σ_j n_j samples gives the formula
    (``spec/stability.md`` §2.2, [I] derived from the definition).

    Args:
        expert_stability: ε_j² (K,), each expert's own on-average squared L2 stability.
        num_samples: n_j (K,).
        weights: w_j (normalised to sum to 1); None: uniform.

    Raises:
        ValueError: mismatched lengths, negative values or no samples.
    """
    eps2 = torch.as_tensor(expert_stability, dtype=torch.float64).flatten()
    n = torch.as_tensor(num_samples, dtype=torch.float64).flatten()
    if eps2.numel() != n.numel():
        raise ValueError(f"{eps2.numel()} stability values but {n.numel()} sample counts")
    if bool((eps2 < 0).any()) or bool((n < 0).any()) or float(n.sum()) <= 0:
        raise ValueError("stability values and sample counts must be non-negative, with at least one sample")
    w = normalized_weights(weights, eps2.numel())
    return float((n / n.sum() * w.pow(2) * eps2).sum())


def generalization_bound_template(smoothness: float, gamma: float, train_loss: float, stability: float) -> float:
    """Lei & Ying's (ICML 2020, Thm 2b) generalization-gap template for non-negative L-smooth losses:

        E[F(x_avg) − F_S(x_avg)] ≤ (L/γ) · E[F_S(x_avg)] + ((L + γ)/2) · ε²_avg.

    This is the standard template the paper's analysis is read to follow ([I]); the
    paper's own constants are not available, so use it to compare settings, not as the
    paper's bound.

    Args:
        smoothness: L > 0.
        gamma: γ > 0 (free; the bound holds for every γ).
        train_loss: E[F_S(x_avg)] ≥ 0.
        stability: ε²_avg ≥ 0.

    Raises:
        ValueError: L or γ not positive, or a negative loss / stability.
    """
    if smoothness <= 0 or gamma <= 0:
        raise ValueError(f"smoothness L and gamma must be positive, got L={smoothness}, gamma={gamma}")
    if train_loss < 0 or stability < 0:
        raise ValueError(f"train_loss and stability must be non-negative, got {train_loss}, {stability}")
    return smoothness / gamma * train_loss + (smoothness + gamma) / 2 * stability


# -------------------------------------------------- empirical L2-stability probe


class SwappedDataset(Dataset):
    """S^{(i)}: ``dataset`` with sample ``index`` replaced by ``replacement``.

    Args:
        dataset: S, a map-style dataset.
        index: i.
        replacement: the fresh sample z'_i, in the dataset's sample format.

    Raises:
        IndexError: ``index`` outside the dataset.
    """

    def __init__(self, dataset: Dataset, index: int, replacement: Any) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if not -n <= index < n:
            raise IndexError(f"swap index {index} is outside a dataset of {n} samples")
        self.dataset = dataset
        self.index = index % n
        self.replacement = replacement

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int) -> Any:
        return self.replacement if item == self.index else self.dataset[item]


def empirical_l2_stability(
    train_fn: Callable[[Dataset], Mapping[str, Tensor]],
    dataset: Dataset,
    index: int,
    replacement: Any,
    *,
    reference: Mapping[str, Tensor] | None = None,
) -> float:
    """The empirical L2-stability probe ‖A(S) − A(S^{(i)})‖², S^{(i)} = S with sample i swapped.

    ``train_fn`` must be deterministic given its dataset (e.g. a seeded SGD loop such as
    :func:`merging.experiments.training.train_sgd`, wrapped in ``functools.partial``), so the
    two runs differ only by the swap.
    Expensive (two trainings): use a small proxy model.

    Args:
        train_fn: A, maps a dataset to trained weights.
        dataset: S.
        index: i, the sample swapped.
        replacement: the fresh sample z'_i.
        reference: A(S) if already trained (saves one training when probing several i).

    Returns:
        ‖A(S) − A(S^{(i)})‖² over the floating entries.
    """
    theta = reference if reference is not None else train_fn(dataset)
    theta_swapped = train_fn(SwappedDataset(dataset, index, replacement))
    return state_distance(theta, theta_swapped) ** 2


def on_average_l2_stability(
    train_fn: Callable[[Dataset], Mapping[str, Tensor]],
    dataset: Dataset,
    replacements: Sequence[Any],
    indices: Sequence[int],
) -> float:
    """Monte-Carlo estimate of ε²_avg = (1/n) Σ_i E‖A(S^{(i)}) − A(S)‖² over the given indices.

    A(S) is trained once; each index i is swapped for ``replacements[m]`` (fresh samples
    from the same distribution) and trained again.

    Args:
        train_fn: A (deterministic).
        dataset: S.
        replacements: fresh samples z'_m, one per index.
        indices: the swapped positions i_m.

    Raises:
        ValueError: no index, or not one replacement per index.
    """
    if len(indices) == 0 or len(indices) != len(replacements):
        raise ValueError(f"need one replacement per index, got {len(replacements)} for {len(indices)} indices")
    reference = train_fn(dataset)
    probes = [
        empirical_l2_stability(train_fn, dataset, i, z, reference=reference)
        for i, z in zip(indices, replacements, strict=True)
    ]
    return sum(probes) / len(probes)


__all__ = [
    "SwappedDataset",
    "TaskVectorStats",
    "TrajectoryStats",
    "empirical_l2_stability",
    "generalization_bound_template",
    "global_norm",
    "layer_name",
    "merged_on_average_stability",
    "normalized_weights",
    "on_average_l2_stability",
    "sparsified_task_vector_stats",
    "state_distance",
    "task_vector_stats",
]
