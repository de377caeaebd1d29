"""NeuLig: Portland, CoopVecs, modified offsets ε* and the joint alignment loss.

Pure torch (no Lightning). Paper: *Towards Performance Consistency in Multi-Level Model
Collaboration* (NeuLig, "Neural Ligand"), ICCV 2025; official code
https://github.com/LiQiiiii/Neural-Ligand (``src/neulig_main.py``). Formulas and tags
([P] paper, [C] code, [I] interpretation) follow ``spec/neulig.md``.

Notation:
    K experts θ_1..θ_K of one architecture E (the *skeleton*), features of size d; task t
    has a head H_t. For an input x:

    - z(x) = concat_k E_{θ_k}(x) ∈ R^{K·d} (expert-major concatenation) [C];
    - Portland: β(x) = softmax(W z(x) + b) ∈ Δ^{K−1}, the **CoopVec** [P][C];
    - ensembling branch: e(x) = Σ_k β_k(x) E_{θ_k}(x), logits H_t(e(x)) [C];
    - merging branch: θ_m = Σ_k β_k θ_k, logits H_t(E_{θ_m}(x)) [C];
    - offsets: ξ_k = θ_k − θ̄ with θ̄ = mean_j θ_j, o_k = Σ_p ξ_k[p],
      ε*_k = (o_k − mean(o)) / std(o) (unbiased std) [P][C];
    - loss: L = L_b + L_a / scaling, L_a = mean_b (β_b · ε*)², L_b = cross-entropy
      (``"sup"``) or mean prediction entropy (``"semi"``) [C].

Experts are evaluated on one skeleton with ``torch.func.functional_call``; merges are
built one state-dict entry at a time (never K flattened copies of the model).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from merging.state import StateDict, accumulation_dtype, check_compatible, is_mergeable

Alignment = Literal["sup", "semi"]
MergeMode = Literal["per_batch_first", "per_batch_mean", "per_sample", "static"]
MERGE_MODES: tuple[str, ...] = ("per_batch_first", "per_batch_mean", "per_sample", "static")
Constraint = Literal["soft", "hard"]
CONSTRAINTS: tuple[str, ...] = ("soft", "hard")
ENTROPY_EPS = 1e-6  # the official code's log(p + 1e-6)

# --------------------------------------------------------------------------- offsets ε*


def raw_offsets(thetas: Tensor) -> Tensor:
    """o_k = Σ_p ξ_k[p] with ξ_k = θ_k − θ̄, θ̄ the mean over experts (code: "ksi").

    Args:
        thetas: one entry (or the whole flattened model) of every expert, shape
            ``(K, *shape)``.

    Returns:
        ``(K,)`` float64 summed offsets (float64 so that a sum over millions of parameters
        does not lose the small differences between experts).
    """
    flat = thetas.detach().reshape(thetas.shape[0], -1).to(torch.float64)
    return (flat - flat.mean(dim=0)).sum(dim=1)


def standardize_offsets(offsets: Tensor) -> Tensor:
    """ε* = (o − mean(o)) / std(o), the unbiased std as in the code (``torch.std``).

    When every o_k is equal (identical experts) they are all 0 (offsets from the mean sum
    to 0), the constraint Σβ_k o_k = 0 holds for every β and ε* is returned as zeros
    instead of 0/0.

    Args:
        offsets: o, shape ``(K,)``, K ≥ 2.

    Returns:
        ε*, shape ``(K,)``, float64.

    Raises:
        ValueError: fewer than two offsets (the std is undefined).
    """
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"modified offsets need K >= 2 experts, got offsets of shape {tuple(offsets.shape)}")
    offsets = offsets.to(torch.float64)
    centred = offsets - offsets.mean()
    std = offsets.std(unbiased=True)
    if std == 0:
        return torch.zeros_like(offsets)
    return centred / std


def offset_scalars(thetas: Tensor) -> Tensor:
    """ε* of flattened experts (the spec's reference form).

    Args:
        thetas: θ_1..θ_K flattened, shape ``(K, P)`` (any trailing shape works).

    Returns:
        ε*, shape ``(K,)``, float64.
    """
    return standardize_offsets(raw_offsets(thetas))


def modified_offsets(experts: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """ε* of K expert state dicts, streamed one entry at a time.

    Equal to :func:`offset_scalars` on the flattened float entries in sorted-key order
    (the sum Σ_p is order-free), without materialising the (K, P) matrix.
    Non-float entries (``num_batches_tracked``) are not parameters and are skipped.

    Args:
        experts: θ_1..θ_K, state dicts with identical keys, shapes and dtypes.

    Returns:
        ε*, shape ``(K,)``, float64, on the experts' device.

    Raises:
        ValueError: fewer than two experts, or incompatible state dicts (names the key).
    """
    if len(experts) < 2:
        raise ValueError(f"NeuLig needs K >= 2 experts to define offsets, got {len(experts)}")
    check_compatible(experts)
    first = next(iter(experts[0].values()))
    total = first.new_zeros(len(experts), dtype=torch.float64)
    for key in sorted(experts[0]):
        if is_mergeable(experts[0][key]):
            total += raw_offsets(torch.stack([e[key] for e in experts]))
    return standardize_offsets(total)


# --------------------------------------------------------------------------- Portland


class Portland(nn.Module):
    """Portland (code: ``WeightingModel``): β(z) = softmax(W z + b), one CoopVec per sample.

    Args:
        num_features: d, the feature size of one expert.
        num_experts: K.
        generator: RNG of the initialisation; the distribution is ``nn.Linear``'s default
            (W, b ~ U(−1/√(K·d), 1/√(K·d))), as in the code. None: the global RNG.
    """

    def __init__(self, num_features: int, num_experts: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if num_features < 1 or num_experts < 1:
            raise ValueError(
                f"Portland needs num_features >= 1 and num_experts >= 1, got {num_features}, {num_experts}"
            )
        self.num_features = num_features
        self.num_experts = num_experts
        self.fc = nn.utils.skip_init(nn.Linear, num_features * num_experts, num_experts)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw W and b from U(−1/√fan_in, 1/√fan_in) (``nn.Linear``'s default law)."""
        bound = 1.0 / math.sqrt(self.fc.in_features)
        with torch.no_grad():
            self.fc.weight.uniform_(-bound, bound, generator=generator)
            self.fc.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, z: Tensor) -> Tensor:
        """CoopVecs of concatenated expert features.

        Args:
            z: z(x) = concat_k E_k(x), shape ``(B, K·d)`` (see :func:`concat_features`).

        Returns:
            β, shape ``(B, K)``, every row on the probability simplex.
        """
        if z.dim() != 2 or z.shape[1] != self.fc.in_features:
            raise ValueError(
                f"Portland expects concatenated features of shape (B, K·d) = (B, {self.fc.in_features}), "
                f"got {tuple(z.shape)}"
            )
        return F.softmax(self.fc(z), dim=1)


def concat_features(features: Tensor) -> Tensor:
    """z = concat_k E_k(x): ``(K, B, d)`` -> ``(B, K·d)``, expert k in columns [k·d, (k+1)·d)."""
    k, b, d = features.shape
    return features.permute(1, 0, 2).reshape(b, k * d)


def expert_features(skeleton: nn.Module, experts: Sequence[Mapping[str, Tensor]], x: Tensor) -> Tensor:
    """E_{θ_k}(x) for every expert, on one skeleton (``functional_call``, strict keys).

    Args:
        skeleton: the backbone architecture E (its own weights are not used).
        experts: θ_1..θ_K, full state dicts of ``skeleton`` (parameters and buffers).
        x: inputs ``(B, *input_shape)``.

    Returns:
        Features, shape ``(K, B, d)``.
    """
    return torch.stack([functional_call(skeleton, dict(e), (x,), strict=True) for e in experts])


def coopvec_ensemble(features: Tensor, beta: Tensor) -> Tensor:
    """The ensembling branch's embedding e = Σ_k β_k E_k(x) [C] (embeddings, not logits).

    Args:
        features: E_k(x), shape ``(K, B, d)``.
        beta: CoopVecs, shape ``(B, K)``.

    Returns:
        e, shape ``(B, d)``.
    """
    return torch.einsum("kbd,bk->bd", features, beta.to(features.dtype))


def alignment_residual(beta: Tensor, eps_star: Tensor) -> Tensor:
    """r_b = Σ_k β_bk ε*_k, the 1-D surrogate of the weighted-offset constraint Σβ_kξ_k = 0.

    Args:
        beta: ``(B, K)``.
        eps_star: ε*, ``(K,)``.

    Returns:
        r, shape ``(B,)`` (code: ``reg_loss``).
    """
    return beta @ eps_star.to(device=beta.device, dtype=beta.dtype)


def project_coopvec(beta: Tensor, eps_star: Tensor) -> Tensor:
    """Project CoopVecs onto the hyperplane Σ_k β_k ε*_k = 0 (the "hard" constraint [I]).

    β' = β − (β·ε* / ‖ε*‖²) ε*: the Euclidean projection onto the surrogate constraint.
    Σ_k ε*_k = 0, so Σ_k β'_k = Σ_k β_k = 1 is kept, but an entry may leave [0, 1]: θ_m is
    then an affine, not a convex, combination of the experts. The paper and code only
    penalise r = β·ε* softly (L_a); this is the exact form of that constraint.

    Args:
        beta: ``(B, K)``.
        eps_star: ε*, ``(K,)``; all zeros (identical experts) leaves β unchanged.

    Returns:
        β', ``(B, K)``, with β'·ε* = 0 up to rounding.
    """
    eps = eps_star.to(device=beta.device, dtype=beta.dtype)
    norm = eps.pow(2).sum().clamp_min(torch.finfo(beta.dtype).tiny)  # ε* = 0 gives β·ε* = 0: β kept
    return beta - (beta @ eps).unsqueeze(-1) * eps / norm


def constrained_coopvec(beta: Tensor, eps_star: Tensor, constraint: Constraint = "soft") -> Tensor:
    """β as used by both branches: unchanged (``"soft"``) or :func:`project_coopvec` ed (``"hard"``).

    Raises:
        ValueError: an unknown ``constraint``.
    """
    if constraint == "soft":
        return beta
    if constraint == "hard":
        return project_coopvec(beta, eps_star)
    raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")


class NeuLigOutput(NamedTuple):
    """The ensembling branch of one batch: ``logits (B, C_t)``, ``beta (B, K)``,
    ``reg`` r ``(B,)`` and the expert ``features (K, B, d)``."""

    logits: Tensor
    beta: Tensor
    reg: Tensor
    features: Tensor


def neulig_forward(
    skeleton: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    head: nn.Module,
    portland: Portland,
    eps_star: Tensor,
    x: Tensor,
    constraint: Constraint = "soft",
) -> NeuLigOutput:
    """Training forward (code: ``FusionModel.forward``) on a task-homogeneous batch.

    The experts run under ``no_grad`` (they are frozen); gradients reach only Portland.

    Args:
        skeleton: the backbone architecture E.
        experts: θ_1..θ_K.
        head: H_t, the batch's task head, ``(B, d) -> (B, C_t)``.
        portland: the Portland network.
        eps_star: ε*, ``(K,)``.
        x: inputs of task t, ``(B, *input_shape)``.
        constraint: ``"soft"`` (the paper and code: β = Portland's output, r penalised by
            L_a) or ``"hard"`` (β projected by :func:`project_coopvec`, so r = 0) [I].

    Returns:
        logits H_t(Σ_k β_k E_k(x)), β, r = β·ε* and the expert features.
    """
    with torch.no_grad():
        features = expert_features(skeleton, experts, x)
    beta = constrained_coopvec(portland(concat_features(features)), eps_star, constraint)
    logits = head(coopvec_ensemble(features, beta))
    return NeuLigOutput(logits, beta, alignment_residual(beta, eps_star), features)


# --------------------------------------------------------------------------- loss


class NeuLigLoss(NamedTuple):
    """``total`` = ``task`` + ``alignment`` / scaling (all scalars); ``alignment`` is L_a
    before the 1/scaling weight."""

    total: Tensor
    task: Tensor
    alignment: Tensor


def prediction_entropy(logits: Tensor) -> Tensor:
    """Mean prediction entropy −Σ_c p_c log(p_c + 1e-6), the ``semi`` task loss [C].

    Args:
        logits: ``(B, C)``.

    Returns:
        Scalar: the batch mean.
    """
    probs = F.softmax(logits, dim=1)
    return -(probs * torch.log(probs + ENTROPY_EPS)).sum(dim=1).mean()


def neulig_loss(
    logits: Tensor,
    reg: Tensor,
    target: Tensor | None = None,
    alignment: Alignment = "sup",
    scaling: float = 100.0,
) -> NeuLigLoss:
    """The joint Portland loss L = L_b + L_a / scaling (paper: α L_a + β L_b, α = 1/scaling, β = 1).

    Args:
        logits: H_t(e), ``(B, C_t)``.
        reg: r = β·ε*, ``(B,)``.
        target: labels ``(B,)``; required for ``"sup"``, ignored for ``"semi"``.
        alignment: ``"sup"`` (L_b = cross-entropy) or ``"semi"`` (L_b = mean prediction
            entropy, labels unused), the code's ``--alignment_type``.
        scaling: the code's ``--scaling`` (default 100, i.e. α = 0.01); ``inf`` drops L_a.

    Returns:
        :class:`NeuLigLoss` (total, L_b, L_a).

    Raises:
        ValueError: unknown ``alignment``, ``"sup"`` without labels, or ``scaling <= 0``.
    """
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0 (L_a is divided by it), got {scaling}")
    if alignment == "sup":
        if target is None:
            raise ValueError("alignment='sup' needs labels (target); use alignment='semi' for unlabeled data")
        task = F.cross_entropy(logits, target)
    elif alignment == "semi":
        task = prediction_entropy(logits)
    else:
        raise ValueError(f"alignment must be 'sup' or 'semi', got {alignment!r}")
    align = reg.pow(2).mean()  # MSE(r, 0)
    return NeuLigLoss(task + align / scaling, task, align)


# --------------------------------------------------------------------------- merging branch


def coopvec_merge(experts: Sequence[Mapping[str, Tensor]], beta: Tensor) -> StateDict:
    """θ_m = Σ_k β_k θ_k (code: ``merge_ckps``), streamed one entry at a time.

    Float entries are combined in the accumulation dtype (fp32 for half inputs) and cast
    back; non-float entries (``num_batches_tracked``) are copied from the first expert.

    Args:
        experts: θ_1..θ_K.
        beta: one CoopVec, shape ``(K,)`` (not required to lie on the simplex).

    Returns:
        The merged state dict.

    Raises:
        ValueError: ``beta`` does not have shape ``(K,)``.
    """
    if beta.shape != (len(experts),):
        raise ValueError(
            f"coopvec_merge: beta must have shape ({len(experts)},) for {len(experts)} experts, got {tuple(beta.shape)}"
        )
    merged: StateDict = {}
    for key, ref in experts[0].items():
        if not is_mergeable(ref):
            merged[key] = ref
            continue
        acc = accumulation_dtype(ref.dtype)
        weights = beta.to(device=ref.device, dtype=acc)
        total = weights[0] * experts[0][key].to(acc)
        for k in range(1, len(experts)):
            total = total + weights[k] * experts[k][key].to(acc)
        merged[key] = total.to(ref.dtype)
    return merged


def merged_features(
    skeleton: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    x: Tensor,
    beta: Tensor,
    mode: MergeMode = "per_batch_first",
) -> Tensor:
    """E_{θ_m}(x), the merging branch, in one of three inference modes [I].

    - ``"per_batch_first"``: faithful to the code (``evaluate_ori``): one merge from the
      **first** sample's CoopVec serves the whole batch; needs task-homogeneous batches.
    - ``"per_batch_mean"``: one merge from the batch's **mean** CoopVec (task-homogeneous
      batches): the same cost, without one sample's β deciding the whole batch.
    - ``"per_sample"``: exact: every sample b runs on its own θ_m(b) = Σ_k β_bk θ_k
      (B merges per batch: very expensive).
    - ``"static"``: one merge from a fixed β̄ (e.g. :func:`mean_coopvec` over a
      calibration set): a true single merged model; not in the paper.

    Args:
        skeleton: the backbone architecture E.
        experts: θ_1..θ_K.
        x: inputs ``(B, *input_shape)``.
        beta: ``(B, K)`` CoopVecs for the per-batch and per-sample modes; ``(K,)`` β̄
            for ``static``.
        mode: the inference mode.

    Returns:
        Features, shape ``(B, d)``.

    Raises:
        ValueError: unknown mode, or ``beta`` of the wrong shape for it.
    """
    k = len(experts)
    if mode == "static":
        if beta.shape != (k,):
            raise ValueError(f"mode 'static' takes one CoopVec β̄ of shape ({k},), got {tuple(beta.shape)}")
        return functional_call(skeleton, coopvec_merge(experts, beta), (x,), strict=True)
    if mode not in MERGE_MODES:
        raise ValueError(f"unknown NeuLig merge mode {mode!r}; use one of {MERGE_MODES}")
    if beta.dim() != 2 or beta.shape != (x.shape[0], k):
        raise ValueError(
            f"mode {mode!r} takes per-sample CoopVecs of shape ({x.shape[0]}, {k}), got {tuple(beta.shape)}"
        )
    if mode in ("per_batch_first", "per_batch_mean"):
        coopvec = beta[0] if mode == "per_batch_first" else beta.mean(dim=0)
        return functional_call(skeleton, coopvec_merge(experts, coopvec), (x,), strict=True)
    rows = [
        functional_call(skeleton, coopvec_merge(experts, beta[b]), (x[b : b + 1],), strict=True)
        for b in range(x.shape[0])
    ]
    return torch.cat(rows)


# --------------------------------------------------------------------------- CoopVec statistics


def batch_inputs(batch: Tensor | Sequence[Tensor]) -> Tensor:
    """The input tensor of a batch: the batch itself, or the first element of ``(x, ...)``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0 and isinstance(batch[0], Tensor):
        return batch[0]
    raise ValueError(f"a batch must be an input tensor or a tuple/list (x, ...), got {type(batch).__name__}")


@torch.no_grad()
def mean_coopvec(
    portland: Portland,
    skeleton: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    batches: Iterable[Tensor | Sequence[Tensor]],
) -> Tensor:
    """β̄ = mean CoopVec over a calibration set (the ``static`` mode's weights) [I].

    Args:
        portland: a trained Portland.
        skeleton: the backbone architecture E.
        experts: θ_1..θ_K.
        batches: input batches ``x`` or ``(x, ...)`` (tasks may be mixed).

    Returns:
        β̄, shape ``(K,)``, float64, on the simplex (the sample-weighted mean), on the
        device the CoopVecs are computed on.

    Raises:
        ValueError: ``batches`` is empty.
    """
    total: Tensor | None = None
    count = 0
    for batch in batches:
        x = batch_inputs(batch)
        beta = portland(concat_features(expert_features(skeleton, experts, x)))
        summed = beta.sum(dim=0).to(torch.float64)
        total = summed if total is None else total + summed
        count += beta.shape[0]
    if count == 0:
        raise ValueError("mean_coopvec: the calibration set is empty (no batch, or only empty batches)")
    return total / count


class CoopVecSummary(NamedTuple):
    """Per-task CoopVec statistics (the CoopVec map [I]); expert k is task k's expert.

    Attributes:
        mean_coopvec: per-task mean β, ``(T, K)``.
        argmax_rate: fraction of task-t samples with argmax_k β_k = t, ``(T,)``.
        entropy: mean H(β) = −Σ_k β_k log β_k of task-t samples (nats), ``(T,)``.
        count: samples per task, ``(T,)``.
    """

    mean_coopvec: Tensor
    argmax_rate: Tensor
    entropy: Tensor
    count: Tensor


def coopvec_statistics(beta: Tensor, task_id: Tensor, num_tasks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sufficient statistics of the CoopVec map (sums, so shards add up across ranks).

    Args:
        beta: CoopVecs ``(N, K)``.
        task_id: the task of every sample ``(N,)``, in ``[0, num_tasks)``.
        num_tasks: T.

    Returns:
        ``(beta_sum (T, K), argmax_hits (T,), entropy_sum (T,), count (T,))``, float64.

    Raises:
        ValueError: shapes disagree or a task id is out of range.
    """
    if beta.dim() != 2 or task_id.shape != (beta.shape[0],):
        raise ValueError(f"beta must be (N, K) and task_id (N,), got {tuple(beta.shape)} and {tuple(task_id.shape)}")
    if task_id.numel() and (int(task_id.min()) < 0 or int(task_id.max()) >= num_tasks):
        low, high = int(task_id.min()), int(task_id.max())
        raise ValueError(f"task ids must lie in [0, {num_tasks}), got range [{low}, {high}]")
    beta = beta.detach().to(torch.float64)
    task_id = task_id.long()
    t, k = num_tasks, beta.shape[1]
    beta_sum = torch.zeros(t, k, dtype=torch.float64, device=beta.device).index_add_(0, task_id, beta)
    hits = (beta.argmax(dim=1) == task_id).to(torch.float64)
    hits_sum = torch.zeros(t, dtype=torch.float64, device=beta.device).index_add_(0, task_id, hits)
    entropy = torch.special.entr(beta).sum(dim=1)
    entropy_sum = torch.zeros(t, dtype=torch.float64, device=beta.device).index_add_(0, task_id, entropy)
    count = torch.bincount(task_id, minlength=t).to(torch.float64)
    return beta_sum, hits_sum, entropy_sum, count


def summarize_coopvec(beta_sum: Tensor, argmax_hits: Tensor, entropy_sum: Tensor, count: Tensor) -> CoopVecSummary:
    """Means from :func:`coopvec_statistics`' sums; tasks without samples give NaN rows."""
    denom = count.to(torch.float64)
    return CoopVecSummary(
        beta_sum / denom.unsqueeze(1),
        argmax_hits / denom,
        entropy_sum / denom,
        count,
    )


@torch.no_grad()
def coopvec_map(
    portland: Portland,
    skeleton: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    task_batches: Iterable[tuple[int, Tensor | Sequence[Tensor]]],
) -> tuple[Tensor, Tensor]:
    """Every sample's CoopVec with its task (the data behind the CoopVec map).

    Args:
        portland: a trained Portland.
        skeleton: the backbone architecture E.
        experts: θ_1..θ_K.
        task_batches: ``(t, batch)`` pairs, ``batch`` = ``x`` or ``(x, ...)`` of task t.

    Returns:
        ``(beta (N, K), task_id (N,))`` on the device the CoopVecs are computed on;
        summarise with :func:`coopvec_statistics` and :func:`summarize_coopvec`.
    """
    betas, tasks = [], []
    for t, batch in task_batches:
        x = batch_inputs(batch)
        betas.append(portland(concat_features(expert_features(skeleton, experts, x))))
        tasks.append(torch.full((x.shape[0],), int(t), dtype=torch.long, device=betas[-1].device))
    if not betas:
        return torch.zeros(0, len(experts)), torch.zeros(0, dtype=torch.long)
    return torch.cat(betas), torch.cat(tasks)


# --------------------------------------------------------------------------- training on cached features


class FeatureBatch(NamedTuple):
    """A task-homogeneous batch with the experts' features precomputed (experts are frozen).

    ``features (K, B, d)``, ``task`` t, ``target (B,)`` labels or None (``semi``)."""

    features: Tensor
    task: int
    target: Tensor | None = None


def train_portland(
    portland: Portland,
    heads: Sequence[nn.Module],
    eps_star: Tensor,
    batches: Sequence[FeatureBatch],
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    alignment: Alignment = "semi",
    scaling: float = 100.0,
) -> list[float]:
    """Train Portland alone with Adam on cached expert features, one step per batch.

    Features are computed once (the experts are frozen), so an epoch costs only Portland
    and the heads. Batches are visited in the given order every epoch: interleave tasks
    (t = 0, 1, ..., T−1, 0, 1, ...) to match the code's round-robin.

    Args:
        portland: updated in place.
        heads: H_1..H_T (frozen: their parameters get no update).
        eps_star: ε*, ``(K,)``.
        batches: the training set as :class:`FeatureBatch` es.
        epochs: passes over ``batches``.
        lr: Adam learning rate (code: 1e-3).
        alignment: ``"sup"`` (needs every batch's ``target``) or ``"semi"``.
        scaling: L_a weight 1/scaling (code: 100).

    Returns:
        The mean joint loss of every epoch.

    Raises:
        ValueError: no batches, or ``epochs < 1``.
    """
    if not batches:
        raise ValueError("train_portland: no training batches")
    if epochs < 1:
        raise ValueError(f"train_portland: epochs must be >= 1, got {epochs}")
    optimizer = torch.optim.Adam(portland.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        total = 0.0
        for batch in batches:
            beta = portland(concat_features(batch.features))
            logits = _call_frozen(heads[batch.task], coopvec_ensemble(batch.features, beta))
            loss = neulig_loss(logits, alignment_residual(beta, eps_star), batch.target, alignment, scaling).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        history.append(total / len(batches))
    return history


def _call_frozen(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with its tensors detached: gradients flow to ``x`` only."""
    state = {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()}
    return functional_call(module, state, (x,), strict=True)
