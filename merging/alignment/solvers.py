"""Solvers: from a unit-similarity matrix to merge/unmerge matrices.

Every solver takes S, the ``[N·O, N·O]`` similarity of the concatenated units of N models
(model i's units are rows ``[i·O, (i+1)·O)``), and returns a :class:`UnitMatching`: a 0/1
assignment P ``[N·O, O']`` (P[u, j] = 1 when unit u goes to merged unit j), the merge matrix
``M = P · N / colsum(P)`` and the unmerge matrix ``U = P``. Merged weights are then
``(1/N) Σ_i M_iᵀ W_i`` on output axes and ``W_i U_i`` on input axes (:mod:`.apply`), i.e.
the mean of the units merged into each merged unit.

- :func:`solve_align` (Re-Basin style): model 0 is the anchor; for each i > 0 a linear
  assignment (Hungarian, ``scipy.optimize.linear_sum_assignment``) on the cross block
  ``S[0, i]`` permutes model i onto model 0.
- :func:`solve_group_align`: the cross block is read as ``[G, O_g, G, O_g]``; an inner
  assignment per pair of groups scores the pair (mean matched similarity), an outer
  assignment on the ``G × G`` scores matches groups, so heads move as whole blocks.
- :func:`solve_zip` (ZipIt, Stoica et al. 2023, https://arxiv.org/abs/2305.03053): greedy
  pairing of the most similar units of *any* two models, including units of one model.
- :func:`solve_group_zip`: match groups to model 0 first, then zip inside each set of
  matched groups; merged groups stay contiguous.

Solvers run on the CPU in float64 (S is moved there; assignment solvers are CPU code) and
return CPU matrices; applying them moves them to the weights' device.

The official MuDSC code (``homogeneous_tasks/mudsc.py``) divides by ``colsum + 1e-5``; we
divide by ``colsum`` (never 0: every merged unit holds at least one unit), so aligning a
model with a permuted copy of itself reproduces its weights exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Mode = Literal["align", "zip"]


@dataclass(frozen=True)
class UnitMatching:
    """Merge and unmerge matrices of one node for N models.

    Attributes:
        unmerge: U = P, shape ``[N·O, O']``, 0/1; model i's block is rows ``[i·O, (i+1)·O)``.
        merge: M = P · N / colsum(P), shape ``[N·O, O']``.
        num_models: N.
        score: the solver's objective (mean similarity of the matched or merged pairs).
        group_assignment: ``[N, G]`` long, model i's group merged into merged group j
            (row 0 is ``arange(G)``), for grouped solvers; else None.
    """

    unmerge: Tensor
    merge: Tensor
    num_models: int
    score: float
    group_assignment: Tensor | None = None

    @classmethod
    def from_assignment(
        cls, assignment: Tensor, num_models: int, score: float, group_assignment: Tensor | None = None
    ) -> UnitMatching:
        """Build M and U from a 0/1 assignment P ``[N·O, O']`` whose every column is non-empty.

        Raises:
            ValueError: a merged unit receives no unit, or the rows do not split into N blocks.
        """
        if assignment.ndim != 2 or assignment.shape[0] % num_models:
            raise ValueError(f"assignment of shape {tuple(assignment.shape)} does not split into {num_models} models")
        colsum = assignment.sum(0, keepdim=True)
        if bool((colsum == 0).any()):
            raise ValueError("every merged unit must receive at least one unit; an assignment column is empty")
        merge = assignment * (num_models / colsum)
        return cls(assignment, merge, num_models, float(score), group_assignment)

    @property
    def size(self) -> int:
        """O, units per model."""
        return self.unmerge.shape[0] // self.num_models

    def merge_block(self, model: int) -> Tensor:
        """M_i, shape ``[O, O']``."""
        return self.merge[model * self.size : (model + 1) * self.size]

    def unmerge_block(self, model: int) -> Tensor:
        """U_i, shape ``[O, O']``."""
        return self.unmerge[model * self.size : (model + 1) * self.size]


def identity_matching(size: int, num_models: int, dtype: torch.dtype = torch.float32) -> UnitMatching:
    """Unit o of every model goes to merged unit o (plain averaging of this node)."""
    eye = torch.eye(size, dtype=dtype)
    return UnitMatching.from_assignment(torch.cat([eye] * num_models), num_models, 0.0)


def permutation_matching(perm: Tensor, dtype: torch.dtype = torch.float32) -> UnitMatching:
    """A one-model matching that sends unit ``perm[j]`` to position j (``W[perm]`` on rows).

    Raises:
        ValueError: ``perm`` is not a permutation of ``range(len(perm))``.
    """
    n = perm.numel()
    if perm.ndim != 1 or not torch.equal(torch.sort(perm).values, torch.arange(n, device=perm.device)):
        raise ValueError(f"perm must be a permutation of range({n}), got {perm.tolist()}")
    assignment = torch.zeros(n, n, dtype=dtype)
    assignment[perm.cpu(), torch.arange(n)] = 1
    return UnitMatching.from_assignment(assignment, 1, 1.0)


def solve_align(similarity: Tensor, num_models: int) -> UnitMatching:
    """Permute every model onto model 0 by a linear assignment on the cross blocks.

    Args:
        similarity: S, shape ``[N·O, N·O]``.
        num_models: N >= 1.

    Returns:
        P_0 = I and P_i[col[r], r] = 1, where ``col = argmax_π Σ_r S[0, i][r, π(r)]``;
        score = the mean matched similarity over all i > 0.
    """
    similarity, size = _prepare(similarity, num_models)
    assignment = torch.zeros(num_models * size, size, dtype=similarity.dtype)
    assignment[:size] = torch.eye(size, dtype=similarity.dtype)
    rows = torch.arange(size)
    matched = []
    for i in range(1, num_models):
        block = _cross_block(similarity, size, i)
        col = _assign(block)
        assignment[i * size + col, rows] = 1
        matched.append(block[rows, col])
    return UnitMatching.from_assignment(assignment, num_models, _mean(matched))


def match_groups(similarities: Sequence[Tensor], num_models: int, groups: int) -> Tensor:
    """The outer (group-level) assignment of group alignment, shared by tied nodes.

    For each model i > 0 and each pair (group j of model 0, group k of model i), an inner
    assignment of their ``O_g`` units scores the pair by its mean matched similarity; the
    pair scores of all ``similarities`` (one per tied node) are summed and an outer
    assignment on the ``G × G`` sums matches the groups.

    Args:
        similarities: one S ``[N·O, N·O]`` per node (nodes may differ in O, not in G).
        num_models: N.
        groups: G.

    Returns:
        ``[N, G]`` long: row i holds model i's group merged into merged group j.
    """
    if not similarities:
        raise ValueError("match_groups needs at least one similarity matrix")
    assignment = torch.empty(num_models, groups, dtype=torch.long)
    assignment[0] = torch.arange(groups)
    prepared = [_prepare(s, num_models, groups) for s in similarities]
    for i in range(1, num_models):
        total = sum(_group_pair_scores(_cross_block(s, size, i), groups)[0] for s, size in prepared)
        assignment[i] = _assign(total)
    return assignment


def solve_group_align(
    similarity: Tensor, num_models: int, groups: int, *, group_assignment: Tensor | None = None
) -> UnitMatching:
    """Align every model onto model 0 with groups (heads) kept together.

    Args:
        similarity: S, shape ``[N·O, N·O]``, O = G · O_g.
        num_models: N.
        groups: G.
        group_assignment: a precomputed ``[N, G]`` outer assignment (tied nodes); None
            solves it from ``similarity`` (:func:`match_groups`).

    Returns:
        Merged group j holds group j of model 0 and group ``group_assignment[i, j]`` of
        model i, each permuted inside by its inner assignment. score = mean matched similarity.
    """
    similarity, size = _prepare(similarity, num_models, groups)
    if group_assignment is None:
        group_assignment = match_groups([similarity], num_models, groups)
    _check_group_assignment(group_assignment, num_models, groups)
    gsize = size // groups
    assignment = torch.zeros(num_models * size, size, dtype=similarity.dtype)
    assignment[:size] = torch.eye(size, dtype=similarity.dtype)
    matched = []
    for i in range(1, num_models):
        block = _cross_block(similarity, size, i)
        _, inner = _group_pair_scores(block, groups)
        for j in range(groups):
            k = int(group_assignment[i, j])
            merged = torch.arange(j * gsize, (j + 1) * gsize)
            source = k * gsize + inner[j, k]
            assignment[i * size + source, merged] = 1
            matched.append(block[merged, source])
    return UnitMatching.from_assignment(assignment, num_models, _mean(matched), group_assignment.clone())


def solve_zip(
    similarity: Tensor, num_models: int, *, r: float | None = None, a: float = 0.5, b: float = 1.0
) -> UnitMatching:
    """ZipIt's greedy matching: repeatedly merge the most similar pair of (merged) units.

    S's diagonal is set to −inf. Each step takes the global argmax pair (u, v), u < v,
    merges v's column into u's, and sets the merged unit's similarity to every other unit
    to ``a · min(S[u, ·], S[v, ·])``. Pairs of units whose representatives (lowest index)
    come from one model are allowed ``int((to_remove // N) · b)`` times per model; then that
    model's intra-model entries become −inf (a budget that starts at 0 forbids them at once).

    Args:
        similarity: S, shape ``[N·O, N·O]``.
        num_models: N.
        r: fraction of the N·O units removed; None keeps the width, r = 1 − 1/N.
        a: the merged unit's similarity factor (0.5 in MuDSC).
        b: intra-model merge budget factor (1 in MuDSC).

    Returns:
        The assignment to ``O' = int(N·O·(1 − r))`` merged units, in order of their lowest
        unit; score = mean similarity of the merged pairs when they were taken.
    """
    similarity, size = _prepare(similarity, num_models)
    total = num_models * size
    r = _default_r(r, num_models)
    keep = int(total * (1 - r) + 1e-4)
    to_remove = total - keep
    budget = torch.full((num_models,), int((to_remove // num_models) * b + 1e-4), dtype=torch.long)
    origin = torch.arange(total) // size
    assignment, values, _ = _zip_greedy(similarity, origin, keep, a, budget)
    return UnitMatching.from_assignment(assignment, num_models, _mean(values))


def solve_group_zip(
    similarity: Tensor,
    num_models: int,
    groups: int,
    *,
    r: float | None = None,
    a: float = 0.5,
    b: float = 1.0,
    b_group: float = 1.0,
    group_assignment: Tensor | None = None,
) -> UnitMatching:
    """Group zip: match groups to model 0, then zip inside each set of matched groups.

    Set j holds group j of model 0 and group ``group_assignment[i, j]`` of every model i;
    zipping it keeps ``int(O_g·N·(1 − r))`` units. Intra-model merges are limited per model
    by the global budget ``int((to_remove // N) · b)`` and, inside each set, by
    ``int(to_remove · b_group // (N·G))``. Merged group j occupies columns
    ``[j·O_g', (j+1)·O_g')``, so merged heads stay contiguous.

    Args:
        similarity: S, shape ``[N·O, N·O]``, O = G · O_g.
        num_models: N.
        groups: G.
        r: fraction of units removed; None keeps the width (r = 1 − 1/N).
        a: the merged unit's similarity factor.
        b: global intra-model budget factor.
        b_group: per-set intra-model budget factor.
        group_assignment: a precomputed ``[N, G]`` outer assignment (tied nodes).
    """
    similarity, size = _prepare(similarity, num_models, groups)
    gsize = size // groups
    total = num_models * size
    r = _default_r(r, num_models)
    keep_set = int(gsize * num_models * (1 - r) + 1e-4)
    to_remove = total - int(total * (1 - r) + 1e-4)
    model_budget = torch.full((num_models,), int((to_remove // num_models) * b + 1e-4), dtype=torch.long)
    set_budget = int(to_remove * b_group // (num_models * groups))
    if group_assignment is None:
        group_assignment = match_groups([similarity], num_models, groups)
    _check_group_assignment(group_assignment, num_models, groups)
    origin = torch.arange(num_models).repeat_interleave(gsize)
    assignment = torch.zeros(total, groups * keep_set, dtype=similarity.dtype)
    values: list[float] = []
    for j in range(groups):
        index = torch.cat(
            [i * size + int(group_assignment[i, j]) * gsize + torch.arange(gsize) for i in range(num_models)]
        )
        budget = model_budget.clamp(max=set_budget)
        sub, vals, used = _zip_greedy(similarity[index][:, index], origin, keep_set, a, budget)
        model_budget -= used
        assignment[index, j * keep_set : (j + 1) * keep_set] = sub
        values.extend(vals)
    return UnitMatching.from_assignment(assignment, num_models, _mean(values), group_assignment.clone())


def solve_node(
    similarity: Tensor,
    num_models: int,
    mode: Mode,
    groups: int = 1,
    *,
    a: float = 0.5,
    b: float = 1.0,
    b_group: float = 1.0,
    group_assignment: Tensor | None = None,
) -> UnitMatching:
    """Dispatch to the solver of ``mode`` (align/zip) and grouping, keeping the node's width.

    Raises:
        ValueError: unknown mode.
    """
    if mode == "align":
        if groups == 1:
            return solve_align(similarity, num_models)
        return solve_group_align(similarity, num_models, groups, group_assignment=group_assignment)
    if mode == "zip":
        if groups == 1:
            return solve_zip(similarity, num_models, a=a, b=b)
        return solve_group_zip(
            similarity, num_models, groups, a=a, b=b, b_group=b_group, group_assignment=group_assignment
        )
    raise ValueError(f"mode must be 'align' or 'zip', got {mode!r}")


def _zip_greedy(
    similarity: Tensor, origin: Tensor, keep: int, a: float, budget: Tensor
) -> tuple[Tensor, list[float], Tensor]:
    """ZipIt's loop on a fixed-size matrix: removed units get −inf rows and columns.

    Args:
        similarity: ``[n, n]``.
        origin: ``[n]`` long, the model of each unit.
        keep: merged units to keep.
        a: factor applied to a merged unit's similarities.
        budget: ``[N]`` long, intra-model merges each model may still make.

    Returns:
        The assignment ``[n, keep]`` (columns in order of their lowest unit), the similarity
        of each merged pair, and ``[N]`` the intra-model merges made per model.
    """
    n = similarity.shape[0]
    sims = similarity.clone()
    sims.fill_diagonal_(-torch.inf)
    origin = origin.clone()
    budget = budget.clone()
    used = torch.zeros_like(budget)
    alive = torch.ones(n, dtype=torch.bool)
    members = torch.eye(n, dtype=similarity.dtype)
    for model in torch.nonzero(budget <= 0).flatten().tolist():
        _forbid_intra(sims, (origin == model) & alive)
    values: list[float] = []
    for _ in range(n - keep):
        flat = int(torch.argmax(sims))
        u, v = sorted(divmod(flat, n))
        best = float(sims[u, v])
        if not math.isfinite(best):
            raise RuntimeError("zip ran out of admissible pairs: every remaining pair is forbidden by the budgets")
        values.append(best)
        members[:, u] += members[:, v]
        members[:, v] = 0
        sims[:, u] = torch.minimum(sims[:, u], sims[:, v]) * a
        sims[u, :] = torch.minimum(sims[u, :], sims[v, :]) * a
        sims[u, u] = -torch.inf
        sims[v, :] = -torch.inf
        sims[:, v] = -torch.inf
        alive[v] = False
        if origin[u] == origin[v]:
            model = int(origin[u])
            budget[model] -= 1
            used[model] += 1
            if budget[model] <= 0:
                _forbid_intra(sims, (origin == model) & alive)
    return members[:, alive], values, used


def _forbid_intra(sims: Tensor, mask: Tensor) -> None:
    sims[mask[:, None] & mask[None, :]] = -torch.inf


def _group_pair_scores(block: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Inner assignments of every (group j of model 0, group k of model i) pair.

    Returns:
        scores ``[G, G]`` (mean matched similarity) and cols ``[G, G, O_g]`` (model i's
        unit of group k matched to unit r of group j).
    """
    gsize = block.shape[0] // groups
    view = block.reshape(groups, gsize, groups, gsize)
    scores = torch.empty(groups, groups, dtype=torch.float64)
    cols = torch.empty(groups, groups, gsize, dtype=torch.long)
    rows = torch.arange(gsize)
    for j in range(groups):
        for k in range(groups):
            col = _assign(view[j, :, k, :])
            cols[j, k] = col
            scores[j, k] = view[j, rows, k, col].double().mean()
    return scores, cols


def _assign(block: Tensor) -> Tensor:
    """Column matched to each row by a maximum-similarity linear assignment (square block)."""
    # Imported here: scipy.optimize takes ~0.3 s to import, which every `import merging.methods`
    # (a process's first merge of any method) would otherwise pay.
    from scipy.optimize import linear_sum_assignment

    _, col = linear_sum_assignment(block.detach().cpu().double().numpy(), maximize=True)
    return torch.as_tensor(col, dtype=torch.long)


def _cross_block(similarity: Tensor, size: int, model: int) -> Tensor:
    return similarity[:size, model * size : (model + 1) * size]


def _mean(values: Sequence[Tensor] | Sequence[float]) -> float:
    if not values:
        return 0.0
    return float(torch.cat([torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in values]).mean())


def _default_r(r: float | None, num_models: int) -> float:
    if r is None:
        return 1.0 - 1.0 / num_models
    if not 0.0 <= r < 1.0:
        raise ValueError(f"r (fraction of units removed) must be in [0, 1), got {r}")
    return r


def _prepare(similarity: Tensor, num_models: int, groups: int = 1) -> tuple[Tensor, int]:
    """Check S and bring it to the CPU in float64 (the assignment solvers run there); O."""
    if num_models < 1:
        raise ValueError(f"num_models must be >= 1, got {num_models}")
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {tuple(similarity.shape)}")
    if similarity.shape[0] % num_models:
        raise ValueError(f"similarity of size {similarity.shape[0]} does not split into {num_models} models")
    size = similarity.shape[0] // num_models
    if groups < 1 or size % groups:
        raise ValueError(f"{size} units per model do not split into {groups} equal groups")
    similarity = similarity.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(similarity).all()):
        raise ValueError("similarity has non-finite values (NaN or inf)")
    return similarity, size


def _check_group_assignment(group_assignment: Tensor, num_models: int, groups: int) -> None:
    if tuple(group_assignment.shape) != (num_models, groups):
        raise ValueError(
            f"group_assignment must have shape ({num_models}, {groups}), got {tuple(group_assignment.shape)}"
        )
    for i, row in enumerate(group_assignment):
        if not torch.equal(torch.sort(row.cpu()).values, torch.arange(groups)):
            raise ValueError(f"group_assignment row {i} is not a permutation of range({groups}): {row.tolist()}")
