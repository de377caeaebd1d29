"""Permutation specs: which tensor axes each group of units touches.

A network's hidden units can be permuted (and, with ZipIt-style merging, merged) without
changing its function, provided every tensor axis that indexes those units is transformed
together. A :class:`PermSpec` lists, for every **node** (a group of units sharing one
permutation), each such axis as a :class:`PermEntry`. This is MuDSC's ``PermSpec``
(``node_id -> [[axis, param_name, cfg], ...]``, ``homogeneous_tasks/mudsc.py`` of
https://github.com/zju-vipa/training_free_model_merging) written as data:

- ``role="out"``: the units are this tensor's outputs (rows of a Linear/Conv weight, its
  bias, a norm's scale and shift, BatchNorm running statistics, the embedding axis of a
  ViT ``cls_token``/``pos_embed``); transformed with the merge matrix M.
- ``role="in"``: the units are this tensor's inputs (columns of a consumer layer, the code's
  ``cfg {"in": ...}``); transformed with the unmerge matrix U.
- ``offset``: a segment of an axis, for fused tensors (the rows ``[D, 2D)`` of a fused qkv
  weight are the keys); the code's ``split_dim``.
- ``inner``: the segment is viewed as ``[size, inner]`` (unit-major), e.g. a Linear after a
  flatten of ``[C, H, W]`` sees ``inner = H·W`` inputs per channel.
- ``ignore``: transformed but excluded from the weight-similarity vectors (BN running stats).

A residual stream is **one** node: everything that writes to or reads from it shares its
permutation. Grouped nodes (attention heads, GroupNorm groups) have ``groups = G``: units
are laid out ``[G, size / G]`` and only move with their group (groups move as blocks).
Nodes with the same ``tie`` label share their group permutation (the query/key node and
the value node of one attention layer: a head is one unit of computation).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

Role = Literal["out", "in"]


class PermSpecError(ValueError):
    """A permutation spec is malformed or does not fit a state dict."""


@dataclass(frozen=True)
class PermEntry:
    """One tensor axis (or a segment of it) indexed by a node's units.

    Attributes:
        key: state-dict key of the tensor.
        axis: the tensor axis (non-negative).
        role: ``"out"`` (producer: transformed with the merge matrix M) or ``"in"``
            (consumer: transformed with the unmerge matrix U).
        offset: first index of the segment on ``axis`` (0 unless the tensor is fused).
        inner: the segment has ``size · inner`` indices, unit-major (flatten boundaries).
        ignore: transformed but left out of the weight-similarity vectors.
    """

    key: str
    axis: int
    role: Role = "out"
    offset: int = 0
    inner: int = 1
    ignore: bool = False


@dataclass(frozen=True)
class ActPoint:
    """Where a node's activations are captured, and how a captured tensor maps to units.

    Attributes:
        module: name of the submodule in the model (``model.get_submodule(module)``).
        hook: ``"pre"`` captures the module's first input, ``"post"`` its output.
        dims: axes of the captured tensor that index units; several axes are flattened
            in order (``(1, 3)`` turns keys ``[B, H, N, D_h]`` into ``H·D_h`` units). Every
            other axis counts as samples.
        inner: the unit axis is viewed as ``[size, inner]`` and ``inner`` joins the samples.
    """

    module: str
    hook: Literal["pre", "post"] = "pre"
    dims: tuple[int, ...] = (1,)
    inner: int = 1


@dataclass(frozen=True)
class PermNode:
    """A group of ``size`` units that share one permutation (or merge) per model.

    Attributes:
        name: unique, human-readable id (``"layer2.residual"``, ``"blocks.0.attn.qk"``).
        size: O, units per model.
        entries: every tensor axis the units index.
        groups: G; the units are ``[G, size / G]`` and move with their group.
        act: where activation similarity is measured, or None (weight similarity only).
        tie: nodes with the same label share their group permutation (None: untied).
    """

    name: str
    size: int
    entries: tuple[PermEntry, ...]
    groups: int = 1
    act: ActPoint | None = None
    tie: str | None = None

    @property
    def group_size(self) -> int:
        """O_g = O / G, units per group."""
        return self.size // self.groups


class PermSpec(Mapping[str, PermNode]):
    """The nodes of a network, by name, in solving order; immutable.

    Args:
        nodes: the nodes. Names must be unique; no two entries may overlap on one axis.

    Raises:
        PermSpecError: duplicate names, overlapping segments, a size not divisible by its
            groups, tied nodes with different group counts, or a node with no entries.
    """

    def __init__(self, nodes: Iterable[PermNode]) -> None:
        self._nodes: dict[str, PermNode] = {}
        for node in nodes:
            if node.name in self._nodes:
                raise PermSpecError(f"duplicate node name {node.name!r}")
            _check_node(node)
            self._nodes[node.name] = node
        self._members: dict[str, list[tuple[PermNode, PermEntry]]] = {}
        for node in self._nodes.values():
            for entry in node.entries:
                self._members.setdefault(entry.key, []).append((node, entry))
        self._check_overlaps()
        self._check_ties()

    def __getitem__(self, name: str) -> PermNode:
        return self._nodes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"PermSpec({len(self)} nodes: {', '.join(self._nodes)})"

    def memberships(self, key: str) -> list[tuple[PermNode, PermEntry]]:
        """Every (node, entry) that transforms the tensor ``key`` (empty: plainly averaged)."""
        return list(self._members.get(key, ()))

    def touched_keys(self) -> list[str]:
        """State-dict keys transformed by at least one node."""
        return list(self._members)

    def tie_groups(self, use_ties: bool = True) -> list[tuple[str, ...]]:
        """Nodes solved together: tied nodes in one tuple, every other node alone.

        Args:
            use_ties: False treats every node alone (the official code's behaviour).
        """
        units: list[tuple[str, ...]] = []
        seen: dict[str, int] = {}
        for name, node in self._nodes.items():
            if use_ties and node.tie is not None:
                if node.tie in seen:
                    units[seen[node.tie]] += (name,)
                    continue
                seen[node.tie] = len(units)
            units.append((name,))
        return units

    def validate(self, state: Mapping[str, Tensor], owner: str = "state dict") -> None:
        """Check that every entry fits ``state`` (key present, axis and segment in range).

        Raises:
            PermSpecError: naming the node, the key and the shapes.
        """
        for node in self._nodes.values():
            for entry in node.entries:
                if entry.key not in state:
                    raise PermSpecError(f"node {node.name!r}: key {entry.key!r} is not in {owner}")
                tensor = state[entry.key]
                if not tensor.is_floating_point():
                    raise PermSpecError(
                        f"node {node.name!r}: {owner} key {entry.key!r} is {tensor.dtype}, not floating"
                    )
                if entry.axis >= tensor.ndim:
                    raise PermSpecError(
                        f"node {node.name!r}: key {entry.key!r} has shape {tuple(tensor.shape)}, no axis {entry.axis}"
                    )
                stop = entry.offset + node.size * entry.inner
                if stop > tensor.shape[entry.axis]:
                    raise PermSpecError(
                        f"node {node.name!r}: key {entry.key!r} axis {entry.axis} has length "
                        f"{tensor.shape[entry.axis]}, but the node needs indices [{entry.offset}, {stop}) "
                        f"({node.size} units x inner {entry.inner})"
                    )

    def _check_overlaps(self) -> None:
        for key, members in self._members.items():
            spans: dict[int, list[tuple[int, int, str]]] = {}
            for node, entry in members:
                stop = entry.offset + node.size * entry.inner
                spans.setdefault(entry.axis, []).append((entry.offset, stop, node.name))
            for axis, segs in spans.items():
                segs.sort()
                for (_, stop, name_a), (start, _, name_b) in zip(segs, segs[1:]):
                    if start < stop:
                        raise PermSpecError(f"key {key!r} axis {axis}: nodes {name_a!r} and {name_b!r} overlap")

    def _check_ties(self) -> None:
        groups: dict[str, int] = {}
        for node in self._nodes.values():
            if node.tie is None:
                continue
            if groups.setdefault(node.tie, node.groups) != node.groups:
                raise PermSpecError(
                    f"tied nodes of {node.tie!r} have different group counts ({groups[node.tie]} and {node.groups})"
                )


def _check_node(node: PermNode) -> None:
    if node.size <= 0:
        raise PermSpecError(f"node {node.name!r}: size must be positive, got {node.size}")
    if node.groups <= 0 or node.size % node.groups:
        raise PermSpecError(f"node {node.name!r}: {node.size} units do not split into {node.groups} equal groups")
    if not node.entries:
        raise PermSpecError(f"node {node.name!r} has no entries")
    if all(e.ignore for e in node.entries):
        raise PermSpecError(f"node {node.name!r}: every entry is ignored, nothing defines its weight similarity")
    for entry in node.entries:
        if entry.role not in ("out", "in"):
            raise PermSpecError(f"node {node.name!r}: key {entry.key!r} has role {entry.role!r}, not 'out' or 'in'")
        if entry.axis < 0 or entry.offset < 0 or entry.inner < 1:
            raise PermSpecError(
                f"node {node.name!r}: key {entry.key!r} needs axis >= 0, offset >= 0 and inner >= 1, "
                f"got axis={entry.axis}, offset={entry.offset}, inner={entry.inner}"
            )
    if node.act is not None and node.act.inner < 1:
        raise PermSpecError(f"node {node.name!r}: activation inner must be >= 1, got {node.act.inner}")
