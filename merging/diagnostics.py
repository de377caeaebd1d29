"""Diagnostics of weight-averaged merging: weight vs feature averaging, parameter scaling, templates.

Implements the three analyses of *Rethinking Weight-Averaged Model-merging* (Wang, Ma,
Almakky, Reid, Carneiro, Yaqub; arXiv 2411.09263, code ``billhhh/Rethink-Merge``), as
pure functions on a model skeleton, state dicts and data loaders:

1. :func:`weight_template_report`: the rows of a linear classifier ``(C, D)`` reshaped to
   images ("templates"), their agreement with the class-mean images, and mix-ups
   ``0.5·w_i + 0.5·w_j``.
2. :func:`weight_vs_feature_averaging`: individual models, uniform soup, greedy soup, logit
   ensemble, greedy ensemble and feature ensembles (mean penultimate features through the
   first model's or the averaged classifier).
3. :func:`magnitude_stability`: every floating state-dict tensor (BatchNorm buffers
   included) multiplied by c (default 100) in four scenarios, evaluated with each combiner.

:mod:`merging.experiments.diagnostics` runs all three on scikit-learn's bundled digits (no
download) in seconds and writes a markdown/CSV table and PNG plots (``merging diagnose --out
runs/diagnostics``).

Every evaluation runs one module skeleton with substituted weights
(``torch.func.functional_call``); the classifier's input (the penultimate features) is
captured with a forward pre-hook on the head module named by ``head``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from merging.models import channels_last
from merging.state import StateDict, average_states, check_compatible, is_mergeable

Scenario = Literal["single", "all", "first_only", "all_but_first"]
Combiner = Literal["soup", "logit", "feature", "greedy_soup"]
GreedyRule = Literal["halving", "mean"]
HeadChoice = Literal["first", "avg"]

# ------------------------------------------------------------------ evaluation core


@dataclass
class Outputs:
    """What one set of weights produces on a loader.

    Attributes:
        features: penultimate features, the head's input ``(N, d)``.
        logits: ``(N, C)``.
        labels: ``(N,)``.
    """

    features: Tensor
    logits: Tensor
    labels: Tensor

    @property
    def predictions(self) -> Tensor:
        """argmax of the logits ``(N,)``."""
        return self.logits.argmax(dim=1)

    def accuracy(self) -> float:
        """Top-1 accuracy."""
        return accuracy(self.logits, self.labels)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``logits`` ``(N, C)`` against ``labels`` ``(N,)``."""
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty set of predictions")
    return float((logits.argmax(dim=1) == labels).double().mean())


@torch.no_grad()
def collect_outputs(model: nn.Module, state: Mapping[str, Tensor], loader: Iterable, *, head: str = "head") -> Outputs:
    """Run ``model`` with ``state`` substituted on every ``(inputs, labels)`` batch of ``loader``.

    The model is evaluated in eval mode (its previous mode is restored) and is not modified.

    Args:
        model: the skeleton (any module whose ``state_dict()`` keys match ``state``).
        state: the weights to evaluate.
        loader: batches of ``(inputs (B, ...), labels (B,))``.
        head: the name of the classifier submodule; its input is recorded as the features.

    Returns:
        :class:`Outputs` concatenated over the loader.

    Raises:
        ValueError: ``head`` is not a submodule, or the loader yields nothing.
    """
    head_module = _submodule(model, head)
    state = channels_last(state)  # same values; thin CPU convolutions run 2-4x faster
    captured: list[Tensor] = []
    handle = head_module.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    was_training = model.training
    features, logits, labels = [], [], []
    try:
        model.eval()
        for inputs, targets in loader:
            captured.clear()
            logits.append(functional_call(model, state, (inputs,), strict=True))
            features.append(captured[-1].flatten(1))
            labels.append(targets)
    finally:
        handle.remove()
        model.train(was_training)
    if not logits:
        raise ValueError("collect_outputs: the loader yielded no batch")
    return Outputs(torch.cat(features), torch.cat(logits), torch.cat(labels))


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no submodule {name!r} to use as the classifier head") from None


def head_state(state: Mapping[str, Tensor], head: str) -> StateDict:
    """The entries of the classifier ``head`` in ``state``, with the ``head.`` prefix removed.

    Raises:
        KeyError: no entry belongs to ``head``.
    """
    prefix = head + "."
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no state-dict entry starts with {prefix!r}")
    return out


def ensemble_logits(outputs: Sequence[Outputs]) -> Tensor:
    """Logit ensemble: the mean of the members' logits ``(N, C)``."""
    return torch.stack([o.logits for o in outputs]).mean(dim=0)


def feature_ensemble_logits(
    model: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    outputs: Sequence[Outputs],
    *,
    head: str = "head",
    head_choice: HeadChoice = "first",
) -> Tensor:
    """Feature ensemble: the mean penultimate features through one classifier ``(N, C)``.

    Args:
        model: the skeleton.
        states: the members' weights (for their classifiers).
        outputs: the members' :class:`Outputs` on the same data.
        head: the classifier submodule's name.
        head_choice: ``"first"``: the first member's classifier; ``"avg"``: the classifier
            whose weights are the members' average (both as in the paper's code).
    """
    if head_choice not in ("first", "avg"):
        raise ValueError(f"head_choice must be 'first' or 'avg', got {head_choice!r}")
    features = torch.stack([o.features for o in outputs]).mean(dim=0)
    heads = [head_state(s, head) for s in states]
    weights = heads[0] if head_choice == "first" else average_states(heads)
    with torch.no_grad():
        return functional_call(_submodule(model, head), weights, (features,), strict=True)


def greedy_selection(candidates: Sequence[int], val_scores: Sequence[float], evaluate) -> tuple[list[int], float]:
    """Greedy selection (model soups, Wortsman et al. 2022): start from the best candidate on
    validation, visit the rest in decreasing validation score, keep one if ``evaluate`` of the
    grown set strictly improves the validation accuracy (the paper's code: "kept if val
    accuracy rises").

    Args:
        candidates: member indices.
        val_scores: each candidate's own validation accuracy (same order as ``candidates``).
        evaluate: ``(members, new) -> validation accuracy`` of the grown combination.

    Returns:
        ``(members, validation accuracy)``.
    """
    order = sorted(range(len(candidates)), key=lambda i: val_scores[i], reverse=True)
    members = [candidates[order[0]]]
    best = val_scores[order[0]]
    for i in order[1:]:
        score = evaluate(members, candidates[i])
        if score > best:
            members.append(candidates[i])
            best = score
    return members, best


def greedy_soup(
    model: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    val_loader: Iterable,
    *,
    head: str = "head",
    rule: GreedyRule = "halving",
    val_outputs: Sequence[Outputs] | None = None,
) -> tuple[StateDict, list[int]]:
    """Greedy soup over ``states``, selected on ``val_loader``.

    Args:
        model: the skeleton.
        states: θ_1..θ_M.
        val_loader: held-out batches ``(inputs, labels)``.
        head: the classifier submodule's name.
        rule: how a candidate joins the soup: ``"halving"``: (soup + θ_new)/2, the paper's
            code (later members weigh more); ``"mean"``: the uniform mean of the members
            (Wortsman et al.'s recipe, the code's "divide-by-length" variant).
        val_outputs: the members' validation :class:`Outputs`, if already computed.

    Returns:
        ``(soup weights, member indices in order of joining)``.
    """
    if rule not in ("halving", "mean"):
        raise ValueError(f"greedy rule must be 'halving' or 'mean', got {rule!r}")
    val_outputs = val_outputs or [collect_outputs(model, s, val_loader, head=head) for s in states]
    soups: dict[tuple[int, ...], StateDict] = {}

    def soup_of(members: Sequence[int]) -> StateDict:
        key = tuple(members)
        if key not in soups:
            if len(members) == 1:
                soups[key] = dict(states[members[0]])
            elif rule == "halving":
                soups[key] = average_states([soup_of(members[:-1]), states[members[-1]]])
            else:
                soups[key] = average_states([states[m] for m in members])
        return soups[key]

    members, _ = greedy_selection(
        list(range(len(states))),
        [o.accuracy() for o in val_outputs],
        lambda ms, new: collect_outputs(model, soup_of([*ms, new]), val_loader, head=head).accuracy(),
    )
    return soup_of(members), members


def greedy_ensemble(val_outputs: Sequence[Outputs]) -> list[int]:
    """Greedy logit ensemble: the members :func:`greedy_selection` keeps when the combination is
    the mean of logits (on validation outputs)."""
    members, _ = greedy_selection(
        list(range(len(val_outputs))),
        [o.accuracy() for o in val_outputs],
        lambda ms, new: accuracy(ensemble_logits([val_outputs[m] for m in [*ms, new]]), val_outputs[0].labels),
    )
    return members


# ------------------------------------------------- (2) weight vs feature averaging


@dataclass
class AveragingReport:
    """Accuracies of weight-space and feature-space combinations of M models.

    Attributes:
        individual: each model's accuracy (M,).
        uniform_soup: the uniform weight average.
        logit_ensemble: the mean of logits.
        feature_ensemble_first_head / feature_ensemble_avg_head: mean features through the
            first model's / the averaged classifier.
        greedy_soup / greedy_ensemble: on the test data, with members chosen on validation
            (None without a validation loader); ``*_members``: who joined.
        soup_ensemble_agreement: fraction of test inputs where the uniform soup and the logit
            ensemble predict the same class ([I]).
        soup_feature_distance: mean ‖f_soup(x) − (1/M) Σ_m f_m(x)‖ over test inputs, the
            soup's features against the averaged features ([I]).
    """

    individual: list[float]
    uniform_soup: float
    logit_ensemble: float
    feature_ensemble_first_head: float
    feature_ensemble_avg_head: float
    soup_ensemble_agreement: float
    soup_feature_distance: float
    greedy_soup: float | None = None
    greedy_soup_members: list[int] = field(default_factory=list)
    greedy_ensemble: float | None = None
    greedy_ensemble_members: list[int] = field(default_factory=list)

    def rows(self) -> list[tuple[str, float]]:
        """``(combination, accuracy)`` rows for a table (individuals as their mean and best)."""
        rows = [
            ("individual (mean)", sum(self.individual) / len(self.individual)),
            ("individual (best)", max(self.individual)),
            ("uniform soup", self.uniform_soup),
        ]
        if self.greedy_soup is not None:
            rows.append((f"greedy soup (members {self.greedy_soup_members})", self.greedy_soup))
        rows += [
            ("logit ensemble", self.logit_ensemble),
            ("feature ensemble, first head", self.feature_ensemble_first_head),
            ("feature ensemble, averaged head", self.feature_ensemble_avg_head),
        ]
        if self.greedy_ensemble is not None:
            rows.append((f"greedy ensemble (members {self.greedy_ensemble_members})", self.greedy_ensemble))
        return rows


def weight_vs_feature_averaging(
    model: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    head: str = "head",
    greedy_rule: GreedyRule = "halving",
) -> AveragingReport:
    """Compare averaging in weight space (soups) with averaging in feature/logit space (ensembles).

    Args:
        model: the skeleton of the M same-architecture models.
        states: θ_1..θ_M (same keys, shapes, dtypes).
        loader: the test batches ``(inputs, labels)``.
        val_loader: held-out batches for the greedy soup and greedy ensemble (skipped if None).
        head: the classifier submodule's name (its input is the feature).
        greedy_rule: see :func:`greedy_soup`.

    Returns:
        :class:`AveragingReport`.

    Raises:
        StateDictError: incompatible state dicts.
    """
    states = list(states)
    check_compatible(states)
    outputs = [collect_outputs(model, s, loader, head=head) for s in states]
    soup = collect_outputs(model, average_states(states), loader, head=head)
    logits = ensemble_logits(outputs)
    mean_features = torch.stack([o.features for o in outputs]).mean(dim=0)
    report = AveragingReport(
        individual=[o.accuracy() for o in outputs],
        uniform_soup=soup.accuracy(),
        logit_ensemble=accuracy(logits, soup.labels),
        feature_ensemble_first_head=accuracy(
            feature_ensemble_logits(model, states, outputs, head=head, head_choice="first"), soup.labels
        ),
        feature_ensemble_avg_head=accuracy(
            feature_ensemble_logits(model, states, outputs, head=head, head_choice="avg"), soup.labels
        ),
        soup_ensemble_agreement=float((soup.predictions == logits.argmax(dim=1)).double().mean()),
        soup_feature_distance=float((soup.features - mean_features).norm(dim=1).mean()),
    )
    if val_loader is not None:
        val_outputs = [collect_outputs(model, s, val_loader, head=head) for s in states]
        greedy, report.greedy_soup_members = greedy_soup(
            model, states, val_loader, head=head, rule=greedy_rule, val_outputs=val_outputs
        )
        report.greedy_soup = collect_outputs(model, greedy, loader, head=head).accuracy()
        report.greedy_ensemble_members = greedy_ensemble(val_outputs)
        report.greedy_ensemble = accuracy(
            ensemble_logits([outputs[m] for m in report.greedy_ensemble_members]), soup.labels
        )
    return report


# ------------------------------------------------------ (3) parameter scaling


def scale_state(state: Mapping[str, Tensor], magnitude: float) -> StateDict:
    """c·θ: every floating entry multiplied by ``magnitude`` (BatchNorm running statistics
    included, as in the paper's code); integer buffers (``num_batches_tracked``) are copied.

    A bias-free ReLU network of L linear layers is positively homogeneous: its logits scale
    by c^L and its predictions do not change. Biases, BatchNorm buffers and LayerNorm break
    this, which is what :func:`magnitude_stability` measures.
    """
    return {k: v * magnitude if is_mergeable(v) else v.clone() for k, v in state.items()}


@dataclass
class ScalingRow:
    """One (scenario, combiner) measurement.

    Attributes:
        scenario: which members were scaled (``"none"`` for the unscaled reference).
        combiner: ``"individual"`` (scenario ``"single"``), ``"soup"``, ``"logit"``,
            ``"feature"`` or ``"greedy_soup"``.
        accuracy: top-1 test accuracy (the mean over models for ``"individual"``).
        flip_rate: fraction of test predictions that differ from the same combiner unscaled ([I]).
    """

    scenario: str
    combiner: str
    accuracy: float
    flip_rate: float


@dataclass
class ScalingReport:
    """The parameter-scaling analysis.

    Attributes:
        magnitude: c.
        rows: one :class:`ScalingRow` per (scenario, combiner), unscaled references first.
        member_norm_share: per scenario, each member's share ‖θ_m‖ / Σ_k ‖θ_k‖ of the scaled
            members' parameter norms ([I]): how much of the soup each member holds.
    """

    magnitude: float
    rows: list[ScalingRow]
    member_norm_share: dict[str, list[float]]


def _scaled_members(states: Sequence[Mapping[str, Tensor]], scenario: str, c: float) -> list[StateDict]:
    scale = {
        "all": lambda m: True,
        "first_only": lambda m: m == 0,
        "all_but_first": lambda m: m != 0,
    }[scenario]
    return [scale_state(s, c) if scale(m) else dict(s) for m, s in enumerate(states)]


def _state_norm(state: Mapping[str, Tensor]) -> float:
    return float(sum(v.double().pow(2).sum() for v in state.values() if is_mergeable(v)) ** 0.5)


def magnitude_stability(
    model: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    magnitude: float = 100.0,
    scenarios: Sequence[Scenario] = ("single", "all", "first_only", "all_but_first"),
    combiners: Sequence[Combiner] = ("soup", "logit", "feature", "greedy_soup"),
    head: str = "head",
    feature_head: HeadChoice = "first",
    greedy_rule: GreedyRule = "halving",
) -> ScalingReport:
    """Prediction stability under parameter scaling θ → c·θ, for models and their combinations.

    Scenarios (the paper's code): ``"single"``: each model scaled and evaluated alone;
    ``"all"``: every member scaled; ``"first_only"``: only the first member; ``"all_but_first"``:
    every member but the first. Combiners: uniform ``"soup"``, ``"logit"`` ensemble,
    ``"feature"`` ensemble (through ``feature_head``), ``"greedy_soup"`` (needs ``val_loader``;
    skipped without one).

    Args:
        model: the skeleton.
        states: θ_1..θ_M.
        loader: test batches ``(inputs, labels)``.
        val_loader: validation batches for the greedy soup.
        magnitude: c (the paper's ``MAGNITUDE``, default 100).
        scenarios: which scenarios to run.
        combiners: which combiners to run in the multi-member scenarios.
        head: the classifier submodule's name.
        feature_head: the feature ensemble's classifier (see :func:`feature_ensemble_logits`).
        greedy_rule: see :func:`greedy_soup`.

    Returns:
        :class:`ScalingReport`.

    Raises:
        ValueError: an unknown scenario or combiner.
        StateDictError: incompatible state dicts.
    """
    bad = [s for s in scenarios if s not in ("single", "all", "first_only", "all_but_first")]
    bad += [c for c in combiners if c not in ("soup", "logit", "feature", "greedy_soup")]
    if bad:
        raise ValueError(f"unknown scenarios/combiners {bad}")
    states = list(states)
    check_compatible(states)
    if val_loader is None:
        combiners = [c for c in combiners if c != "greedy_soup"]

    def combine(members: list[StateDict], combiner: str) -> Tensor:
        if combiner == "soup":
            return collect_outputs(model, average_states(members), loader, head=head).logits
        if combiner == "greedy_soup":
            soup, _ = greedy_soup(model, members, val_loader, head=head, rule=greedy_rule)
            return collect_outputs(model, soup, loader, head=head).logits
        outputs = [collect_outputs(model, s, loader, head=head) for s in members]
        if combiner == "logit":
            return ensemble_logits(outputs)
        return feature_ensemble_logits(model, members, outputs, head=head, head_choice=feature_head)

    labels = collect_outputs(model, states[0], loader, head=head).labels
    rows: list[ScalingRow] = []
    shares: dict[str, list[float]] = {}
    if "single" in scenarios:
        accs, flips = [], []
        for s in states:
            before = collect_outputs(model, s, loader, head=head).logits.argmax(1)
            after = collect_outputs(model, scale_state(s, magnitude), loader, head=head).logits
            accs.append(accuracy(after, labels))
            flips.append(float((after.argmax(1) != before).double().mean()))
        rows.append(ScalingRow("single", "individual", sum(accs) / len(accs), sum(flips) / len(flips)))
    multi = [s for s in scenarios if s != "single"]
    reference = {c: combine([dict(s) for s in states], c) for c in combiners} if multi else {}
    for c, logits in reference.items():
        rows.append(ScalingRow("none", c, accuracy(logits, labels), 0.0))
    for scenario in multi:
        members = _scaled_members(states, scenario, magnitude)
        norms = [_state_norm(m) for m in members]
        shares[scenario] = [n / sum(norms) for n in norms]
        for c in combiners:
            logits = combine(members, c)
            flip = float((logits.argmax(1) != reference[c].argmax(1)).double().mean())
            rows.append(ScalingRow(scenario, c, accuracy(logits, labels), flip))
    return ScalingReport(magnitude=magnitude, rows=rows, member_norm_share=shares)


# ------------------------------------------------------------ (1) weight templates


@dataclass
class TemplateReport:
    """Weight templates of a linear classifier.

    Attributes:
        templates: each class row reshaped to ``img_shape`` and min-max stretched to [0, 1]
            (the paper stretches to [0, 255] for display) ``(C, *img_shape)``.
        class_cosine: cos(w_c, m_c − m̄) per class ``(C,)``, the raw row against its class-mean
            image minus the global mean image ([I]); None without class means.
        mixups: per pair (i, j), the stretched template of 0.5·w_i + 0.5·w_j ``img_shape``.
    """

    templates: Tensor
    class_cosine: Tensor | None
    mixups: dict[tuple[int, int], Tensor]


def minmax(images: Tensor) -> Tensor:
    """Stretch each image of ``(N, ...)`` to [0, 1] on its own; a constant image becomes 0."""
    flat = images.reshape(images.shape[0], -1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.reshape(images.shape)


def class_mean_images(inputs: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class mean of the flattened inputs ``(C, D)``.

    Raises:
        ValueError: a class has no sample.
    """
    flat = inputs.reshape(inputs.shape[0], -1).double()
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        raise ValueError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no sample")
    sums = torch.zeros(num_classes, flat.shape[1], dtype=torch.float64).index_add_(0, labels, flat)
    return (sums / counts.unsqueeze(1)).float()


def weight_template_report(
    linear: nn.Linear | Tensor,
    img_shape: Sequence[int],
    class_means: Tensor | None = None,
    pairs: Sequence[tuple[int, int]] = (),
) -> TemplateReport:
    """Read a linear classifier's rows as images.

    Args:
        linear: the (last or only) ``nn.Linear`` or its weight ``(C, D)``, D = prod(img_shape).
        img_shape: e.g. ``(3, 32, 32)`` or ``(1, 8, 8)``.
        class_means: per-class mean images ``(C, D)`` (see :func:`class_mean_images`).
        pairs: class pairs (i, j) whose mix-up 0.5·w_i + 0.5·w_j is returned.

    Returns:
        :class:`TemplateReport`.

    Raises:
        ValueError: shapes that do not fit, or a pair index out of range.
    """
    weight = (linear.weight if isinstance(linear, nn.Linear) else linear).detach().float()
    if weight.dim() != 2:
        raise ValueError(f"a linear classifier's weight is (C, D); got shape {tuple(weight.shape)}")
    c, d = weight.shape
    shape = tuple(int(s) for s in img_shape)
    if torch.Size(shape).numel() != d:
        raise ValueError(f"img_shape {shape} has {torch.Size(shape).numel()} entries, the weight rows have {d}")
    cosine = None
    if class_means is not None:
        if tuple(class_means.shape) != (c, d):
            raise ValueError(f"class_means has shape {tuple(class_means.shape)}, expected {(c, d)}")
        centred = class_means.float() - class_means.float().mean(dim=0, keepdim=True)
        cosine = nn.functional.cosine_similarity(weight, centred, dim=1)
    for i, j in pairs:
        if not (0 <= i < c and 0 <= j < c):
            raise ValueError(f"pair {(i, j)} is outside the {c} classes")
    mixups = {(i, j): minmax((0.5 * weight[i] + 0.5 * weight[j]).reshape(1, *shape))[0] for i, j in pairs}
    return TemplateReport(templates=minmax(weight.reshape(c, *shape)), class_cosine=cosine, mixups=mixups)


def template_mosaic(rows: Sequence[Sequence[Tensor]], pad: int = 1) -> Tensor:
    """Tile images ``(ch, H, W)`` (values in [0, 1]) into one ``(ch, R·(H+pad), K·(W+pad))`` image,
    one list of images per row; gaps and missing tiles are 1 (white)."""
    first = rows[0][0]
    ch, h, w = first.shape
    cols = max(len(r) for r in rows)
    mosaic = torch.ones(ch, len(rows) * (h + pad), cols * (w + pad))
    for r, images in enumerate(rows):
        for k, img in enumerate(images):
            top, left = r * (h + pad), k * (w + pad)
            mosaic[:, top : top + h, left : left + w] = img
    return mosaic
