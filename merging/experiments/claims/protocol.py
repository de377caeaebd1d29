"""The claims benchmark's pre-registered protocol: one YAML file that fixes everything a
result depends on before the confirmation seeds run.

The file (``benchmarks/claims.yaml``) holds the data, the model, every training and merge
hyperparameter, the λ grid, the **selection seeds** (the only seeds on which any of these may
be chosen) and the **confirmation seeds** (disjoint from them; the reported table uses these
alone). The results record the git commit that last changed the file, so a reader can check
that the protocol was committed before the confirmation run.

Every section and key is checked when the file is read: an unknown key, a missing section
or a value of the wrong type is an error naming the file and the key.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from merging._validation import check_float, check_float_list, check_int, check_int_list, check_str


class ProtocolError(ValueError):
    """A protocol file that cannot be used: names the file and the key."""


@dataclass(frozen=True)
class DataSpec:
    """Fashion-MNIST class-group tasks (:class:`~merging.datamodules.FashionMNISTTasks`)."""

    groups: list[list[int]] = field(default_factory=lambda: [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]])
    max_per_class: int | None = 500
    batch_size: int = 64
    root: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """The backbone (:func:`merging.models.build_backbone`)."""

    backbone: str = "small_cnn"
    backbone_kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 16})


@dataclass(frozen=True)
class TrainSpec:
    """One training stage: AdamW learning rate and epochs."""

    epochs: int = 5
    lr: float = 1e-3


@dataclass(frozen=True)
class SoupSpec:
    """The soup-vs-ensemble claim: ``members`` models fine-tuned from θ₀ on all ten classes,
    each with its own seed (head initialisation and data order); SGD with momentum 0.9 and a
    step decay; parameters scaled by ``magnitude`` in the scaling scenarios."""

    members: int = 4
    epochs: int = 5
    lr: float = 0.05
    magnitude: float = 100.0


@dataclass(frozen=True)
class Protocol:
    """The whole protocol (see the module docstring); ``path`` and ``commit`` are filled by
    :func:`load_protocol`."""

    data: DataSpec
    model: ModelSpec
    pretrain: TrainSpec
    experts: TrainSpec
    methods: dict[str, dict[str, Any]]
    scaling_grid: list[float]
    unlabeled_samples: int
    neulig_epochs: int
    different_init: TrainSpec
    soup: SoupSpec
    stability: list[TrainSpec]
    selection_seeds: list[int]
    confirmation_seeds: list[int]
    path: str | None = None
    commit: str | None = None
    commit_date: str | None = None
    dirty: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The protocol as plain data (what the results record)."""

        def plain(value: Any) -> Any:
            if hasattr(value, "__dataclass_fields__"):
                return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
            if isinstance(value, list):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return plain(self)


#: The method rows each claim reads; every protocol must define them.
REQUIRED_METHODS = ("ties", "mties_equal_density", "mties_paper")


def _section(raw: dict, name: str, where: str) -> dict:
    value = raw.get(name)
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: section {name!r} must be a mapping, got {value!r}")
    return value


def _build(cls: type, raw: dict, where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ProtocolError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**raw)


def _train(raw: Any, where: str) -> TrainSpec:
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where} must be a mapping with 'epochs' and 'lr', got {raw!r}")
    spec = _build(TrainSpec, raw, where)
    check_int("epochs", spec.epochs, minimum=1, owner=where)
    check_float("lr", spec.lr, low=0.0, low_open=True, owner=where)
    return spec


def parse_protocol(raw: Any, where: str = "protocol") -> Protocol:
    """Build and check a :class:`Protocol` from the YAML's mapping (``where`` names the file
    in errors).

    Raises:
        ProtocolError: a missing or unknown section or key, overlapping seed lists, or a
            method row without its ``method``.
        TypeError, ValueError: a value of the wrong type or range (naming the key).
    """
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {
        "data", "model", "pretrain", "experts", "methods", "scaling_grid", "unlabeled_samples",
        "neulig_epochs", "different_init", "soup", "stability", "seeds",
    }  # fmt: skip
    unknown = sorted(set(raw) - sections)
    missing = sorted(sections - set(raw))
    if unknown or missing:
        raise ProtocolError(f"{where}: unknown sections {unknown}, missing sections {missing}")
    data = _build(DataSpec, _section(raw, "data", where), f"{where}: data")
    check_int("max_per_class", data.max_per_class, minimum=1, optional=True, owner=f"{where}: data")
    check_int("batch_size", data.batch_size, minimum=1, owner=f"{where}: data")
    model = _build(ModelSpec, _section(raw, "model", where), f"{where}: model")
    check_str("backbone", model.backbone, owner=f"{where}: model")
    methods = _section(raw, "methods", where)
    for label in REQUIRED_METHODS:
        if label not in methods:
            raise ProtocolError(f"{where}: methods must define {list(REQUIRED_METHODS)}; {label!r} is missing")
    for label, spec in methods.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
            raise ProtocolError(f"{where}: methods.{label} must be a mapping with a 'method' name, got {spec!r}")
    seeds = _section(raw, "seeds", where)
    if set(seeds) != {"selection", "confirmation"}:
        raise ProtocolError(f"{where}: seeds must have exactly 'selection' and 'confirmation', got {sorted(seeds)}")
    selection = check_int_list("seeds.selection", seeds["selection"], minimum=0, owner=where)
    confirmation = check_int_list("seeds.confirmation", seeds["confirmation"], minimum=0, owner=where)
    if set(selection) & set(confirmation):
        raise ProtocolError(
            f"{where}: selection and confirmation seeds overlap: {sorted(set(selection) & set(confirmation))}"
        )
    stability = raw["stability"]
    if not isinstance(stability, list) or len(stability) < 2:
        raise ProtocolError(f"{where}: stability must list at least two settings of epochs and lr, got {stability!r}")
    soup = _build(SoupSpec, _section(raw, "soup", where), f"{where}: soup")
    check_int("members", soup.members, minimum=2, owner=f"{where}: soup")
    return Protocol(
        data=data,
        model=model,
        pretrain=_train(raw["pretrain"], f"{where}: pretrain"),
        experts=_train(raw["experts"], f"{where}: experts"),
        methods={k: dict(v) for k, v in methods.items()},
        scaling_grid=check_float_list("scaling_grid", raw["scaling_grid"], owner=where),
        unlabeled_samples=check_int("unlabeled_samples", raw["unlabeled_samples"], minimum=1, owner=where),
        neulig_epochs=check_int("neulig_epochs", raw["neulig_epochs"], minimum=0, owner=where),
        different_init=_train(raw["different_init"], f"{where}: different_init"),
        soup=soup,
        stability=[_train(s, f"{where}: stability[{i}]") for i, s in enumerate(stability)],
        selection_seeds=selection,
        confirmation_seeds=confirmation,
    )


def git_commit_of(path: Path) -> tuple[str | None, str | None, bool]:
    """``(commit, ISO date, dirty)`` of the last commit that changed ``path``; ``dirty`` is
    True when the file differs from it or is not committed. ``(None, None, True)`` outside git."""
    try:
        cwd = path.resolve().parent
        out = subprocess.run(
            ["git", "log", "-1", "--format=%H %cI", "--", path.name], cwd=cwd, capture_output=True, text=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", path.name], cwd=cwd, capture_output=True, text=True
        )
    except OSError:
        return None, None, True
    if out.returncode != 0 or not out.stdout.strip():
        return None, None, True
    commit, date = out.stdout.split()
    return commit, date, bool(status.stdout.strip())


def load_protocol(path: str | Path) -> Protocol:
    """Read, check and date a protocol file.

    Raises:
        FileNotFoundError: no such file.
        ProtocolError: not YAML, or a section/key problem (see :func:`parse_protocol`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"protocol file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ProtocolError(f"{path}: not valid YAML: {err}") from err
    protocol = parse_protocol(raw, str(path))
    commit, date, dirty = git_commit_of(path)
    return replace(protocol, path=str(path), commit=commit, commit_date=date, dirty=dirty)
