"""Reports, tables and plots, from plain measurements.

- The merge-friendliness report of a fine-tuning run (:class:`StabilityReportData`:
  trajectories and task-vector statistics of :mod:`merging.stability`), as Markdown and a
  matplotlib figure.
- The node M-Loss map (:attr:`merging.mloss.MLossReport.node`) as a PNG.
- Result tables over seeds (mean ± sd, paired gaps), as rich tables, Markdown and PNG.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.table import Table
from torch import Tensor

from merging.io import write_atomic
from merging.mloss import node_group_map
from merging.stability import TaskVectorStats, TrajectoryStats
from merging.stability_stats import deviation_shares, drift_ratios, layer_square_norms

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# ------------------------------------------------------- merge-friendliness report


@dataclass(frozen=True, kw_only=True)
class StabilityReportData:
    """What the merge-friendliness report shows: plain measurements of one fit (notation of
    :mod:`merging.stability`).

    Attributes:
        dense: the final task-vector statistics of the tracked models.
        sparse: the same after each sparsifier, by name (``"ties"``, ``"dare"``).
        trajectories: one :class:`~merging.stability.TrajectoryStats` per tracked model.
        history: per task-vector measurement, ``{"step", "tau_norm", "lr_integral",
            "path_length", "dispersion"}`` (lists hold one value per model).
        train_loss: the last epoch's mean training loss (None: not measured).
        multi_expert: the models are experts against a shared base (else one model against
            its weights at the start of fit).
        track_updates: the path lengths were measured.
        drift_factor: an expert whose ‖τ‖ exceeds this multiple of its peers' median is flagged.
        density: the TIES trim density of the ``"ties"`` version.
        drop_rate: the DARE drop probability p of the ``"dare"`` version.
        top_layers: how many layers the report lists.
    """

    dense: TaskVectorStats
    sparse: Mapping[str, TaskVectorStats]
    trajectories: Sequence[TrajectoryStats]
    history: Sequence[Mapping[str, Any]]
    train_loss: float | None
    multi_expert: bool
    track_updates: bool
    drift_factor: float
    density: float
    drop_rate: float
    top_layers: int


def _top_layers(values: Mapping[str, float], n: int) -> list[tuple[str, float]]:
    return sorted(values.items(), key=lambda kv: kv[1], reverse=True)[:n]


def stability_report_markdown(data: StabilityReportData) -> str:
    """The merge-friendliness report as markdown: measurements, then what they show.

    Args:
        data: the trajectories, history, final task-vector statistics and report settings.

    Returns:
        The report, one line per row, ending in a newline.
    """
    dense, sparse = data.dense, data.sparse
    k = dense.num_experts
    trajectories = data.trajectories
    multi = data.multi_expert and k > 1
    names = [f"expert {j}" for j in range(k)] if data.multi_expert else ["model"]
    lines = [
        "# Merge-friendliness report (StabilityMonitor)",
        "",
        "Measurements of the fine-tuning trajectory and of the task vectors τ = θ − θ₀"
        + (
            " of each expert against the shared base."
            if data.multi_expert
            else " (θ₀: the weights at the start of fit)."
        ),
        "The L2-stability paper's bound, constants and scaling laws are not available: what follows are",
        "measurements, read against the standard SGD-stability template (Lei & Ying, ICML 2020), where the",
        "stability term grows with the integrated step size Σ_t η_t/b_t.",
        "",
        "## Per model",
        "",
        "| model | steps T | Λ = Σ η_t | Σ η_t/b_t | path length | ‖τ‖ | ‖τ‖ / path | mean ‖g‖ | E‖g‖² |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for j, (name, s) in enumerate(zip(names, trajectories, strict=True)):
        tau = float(dense.norms[j])
        straight = f"{tau / s.path_length:.3f}" if data.track_updates and s.path_length > 0 else "n/a"
        path = f"{s.path_length:.4g}" if data.track_updates else "n/a"
        lines.append(
            f"| {name} | {s.steps} | {s.lr_integral:.4g} | {s.lr_integral_per_sample:.4g} | {path} | {tau:.4g} | "
            f"{straight} | {s.mean_grad_norm:.4g} | {s.mean_sq_grad_norm:.4g} |"
        )
    if data.train_loss is not None:
        together = "all ranks, all experts together" if data.multi_expert else "all ranks"
        lines += ["", f"Last epoch's mean training loss ({together}): {data.train_loss:.4g}."]
    findings: list[str] = []
    if multi:
        ratios = drift_ratios(dense.norms)
        shares = deviation_shares(dense)
        order = torch.argsort(dense.norms, descending=True).tolist()
        lines += [
            "",
            "## Across experts",
            "",
            f"- dispersion D = Σ_j w_j‖τ_j − τ̄‖² = {dense.dispersion:.4g}",
            f"- mean pairwise cosine of task vectors: {dense.mean_pairwise_cosine():.3f}",
            f"- sign conflict (entries with ≥ 2 non-zero values whose signs differ): {dense.sign_conflict:.3f}",
            "",
            "| expert | ‖τ_j‖ | drift ratio (vs peers' median) | share of D | Λ_j |",
            "|---|---|---|---|---|",
        ]
        for j in order:
            lines.append(
                f"| {j} | {float(dense.norms[j]):.4g} | {float(ratios[j]):.3f} | {float(shares[j]):.1%} | "
                f"{trajectories[j].lr_integral:.4g} |"
            )
        drifting = [j for j in order if float(ratios[j]) > data.drift_factor]
        if drifting:
            for j in drifting:
                findings.append(
                    f"Expert {j} moved {float(ratios[j]):.2f}× its peers' median distance from θ₀ "
                    f"(above the {data.drift_factor}× flag) and holds {float(shares[j]):.0%} of D: "
                    "it contributes the most to the task heterogeneity D."
                )
        else:
            findings.append(
                f"No expert drifts more than {data.drift_factor}× its peers' median (largest ratio "
                f"{float(ratios.max()):.2f}, expert {int(ratios.argmax())})."
            )
        lr_int = torch.tensor([s.lr_integral for s in trajectories], dtype=torch.float64)
        if k >= 3 and float(lr_int.std()) > 0 and float(dense.norms.std()) > 0:
            corr = float(torch.corrcoef(torch.stack([lr_int, dense.norms]))[0, 1])
            findings.append(f"Across experts, ‖τ_j‖ and Λ_j have a Pearson correlation of {corr:.2f}.")
        elif k == 2 and lr_int.min() > 0 and float(dense.norms.min()) > 0:
            findings.append(
                f"Λ_1/Λ_0 = {float(lr_int[1] / lr_int[0]):.2f} while ‖τ_1‖/‖τ_0‖ = "
                f"{float(dense.norms[1] / dense.norms[0]):.2f}."
            )
        layer_disp = _top_layers(dense.layer_dispersion, data.top_layers)
        lines += [
            "",
            "## Layers carrying the dispersion",
            "",
            "| layer | share of D | share of entries | sign conflict |",
            "|---|---|---|---|",
        ]
        for layer, value in layer_disp:
            share = value / dense.dispersion if dense.dispersion > 0 else 0.0
            entries = dense.layer_entries[layer] / max(dense.num_entries, 1)
            lines.append(f"| {layer} | {share:.1%} | {entries:.1%} | {dense.layer_sign_conflict[layer]:.3f} |")
        if layer_disp and dense.dispersion > 0:
            layer, value = layer_disp[0]
            findings.append(
                f"Layer `{layer}` holds {value / dense.dispersion:.0%} of D with "
                f"{dense.layer_entries[layer] / max(dense.num_entries, 1):.0%} of the entries."
            )
        conflict = _top_layers(dense.layer_sign_conflict, 1)
        if conflict and conflict[0][1] > 0:
            findings.append(f"The highest sign-conflict rate is in `{conflict[0][0]}` ({conflict[0][1]:.2f}).")
    else:
        layer_sq = layer_square_norms(dense)
        total = sum(layer_sq.values())
        lines += [
            "",
            "## Layers carrying the task vector",
            "",
            "| layer | share of ‖τ‖² | share of entries |",
            "|---|---|---|",
        ]
        for layer, value in _top_layers(layer_sq, data.top_layers):
            entries = dense.layer_entries[layer] / max(dense.num_entries, 1)
            lines.append(f"| {layer} | {value / total if total > 0 else 0.0:.1%} | {entries:.1%} |")
    if sparse:
        lines += [
            "",
            "## After sparsification",
            "",
            "| version | mean ‖τ‖ | D | sign conflict | mean density |",
            "|---|---|---|---|---|",
        ]
        rows = [("dense", dense)] + [(sparsifier_label(n, data.density, data.drop_rate), s) for n, s in sparse.items()]
        for label, s in rows:
            disp = f"{s.dispersion:.4g}" if multi else "n/a"
            conf = f"{s.sign_conflict:.3f}" if multi else "n/a"
            lines.append(f"| {label} | {float(s.norms.mean()):.4g} | {disp} | {conf} | {float(s.density.mean()):.3f} |")
        for name, s in sparse.items():
            label = sparsifier_label(name, data.density, data.drop_rate)
            if multi and dense.dispersion > 0:
                findings.append(f"{label} changes D by a factor {s.dispersion / dense.dispersion:.2f}.")
            elif not multi and float(dense.norms.mean()) > 0:
                factor = float(s.norms.pow(2).mean() / dense.norms.pow(2).mean())
                note = (
                    f" (its 1/(1 − p) rescaling makes this {1 / (1 - data.drop_rate):.3g} in expectation)"
                    if name == "dare"
                    else ""
                )
                findings.append(f"{label} multiplies ‖τ‖² by {factor:.3g}{note}.")
    if data.track_updates:
        for j, (name, s) in enumerate(zip(names, trajectories, strict=True)):
            if s.path_length > 0:
                findings.append(
                    f"{name.capitalize()}: ‖τ‖ is {float(dense.norms[j]) / s.path_length:.0%} of the path length "
                    "(100% = a straight path from θ₀)."
                )
    per_sample = [s.lr_integral_per_sample for s in trajectories]
    if multi and max(per_sample) > 0:
        j = max(range(k), key=per_sample.__getitem__)
        findings.append(
            f"Expert {j} has the largest Σ_t η_t/b_t ({per_sample[j]:.4g}), the quantity the stability "
            "template grows with."
        )
    lines += ["", "## What the measurements show", ""] + [f"- {f}" for f in findings] + [""]
    return "\n".join(lines)


def sparsifier_label(name: str, density: float, drop_rate: float) -> str:
    """How the report names a sparsified version: ``"ties"`` or ``"dare"`` with its setting.

    Args:
        name: ``"ties"`` (magnitude trim) or ``"dare"`` (drop and rescale).
        density: the TIES trim density.
        drop_rate: the DARE drop probability p.
    """
    return f"TIES trim (density {density})" if name == "ties" else f"DARE drop (p = {drop_rate})"


def stability_report_figure(data: StabilityReportData) -> Figure:
    """A matplotlib ``Figure`` with the report's plots: ‖τ‖ and Λ over steps, ‖τ‖ against Λ,
    the layers carrying the dispersion (or ‖τ‖²), and the task-vector cosines.

    Args:
        data: the trajectories, history, final task-vector statistics and report settings.
    """
    from matplotlib.figure import Figure

    dense = data.dense
    multi = data.multi_expert and dense.num_experts > 1
    fig = Figure(figsize=(11, 8) if multi else (13, 4), layout="constrained")
    axes = fig.subplots(2, 2).ravel() if multi else fig.subplots(1, 3)
    steps = [h["step"] for h in data.history]
    names = [f"expert {j}" for j in range(dense.num_experts)] if data.multi_expert else ["model"]
    ax = axes[0]
    for j, name in enumerate(names):
        ax.plot(steps, [h["tau_norm"][j] for h in data.history], marker=".", color=f"C{j}", label=f"‖τ‖ {name}")
        if data.track_updates:
            path = [h["path_length"][j] for h in data.history]
            ax.plot(steps, path, ls="--", color=f"C{j}", label=f"path length {name}")
    ax.set(xlabel="optimizer step", ylabel="distance", title="drift from θ₀")
    ax.legend(fontsize=7)
    ax = axes[1]
    for j, name in enumerate(names):
        lr_integral = [h["lr_integral"][j] for h in data.history]
        ax.plot(lr_integral, [h["tau_norm"][j] for h in data.history], marker=".", color=f"C{j}", label=name)
    ax.set(xlabel="Λ = Σ η_t", ylabel="‖τ‖", title="‖τ‖ against the lr integral")
    ax.legend(fontsize=7)
    ax = axes[2]
    if multi:
        values = dense.layer_dispersion
        title, xlabel = "layers carrying the dispersion D", "share of D"
        total = dense.dispersion
    else:
        values = layer_square_norms(dense)
        title, xlabel = "layers carrying ‖τ‖²", "share of ‖τ‖²"
        total = sum(values.values())
    top = _top_layers(values, data.top_layers)[::-1]
    ax.barh([n for n, _ in top], [v / total if total > 0 else 0.0 for _, v in top])
    ax.set(xlabel=xlabel, title=title)
    ax.tick_params(axis="y", labelsize=7)
    if multi:
        ax = axes[3]
        image = ax.imshow(dense.cosine.numpy(), vmin=-1, vmax=1, cmap="coolwarm")
        ticks = list(range(dense.num_experts))
        ax.set(title="cos(τ_i, τ_j)", xlabel="expert", ylabel="expert", xticks=ticks, yticks=ticks)
        fig.colorbar(image, ax=ax)
    return fig


# ------------------------------------------------------------------ M-Loss node map


def save_node_map(
    node: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    groups: int = 32,
    title: str | None = None,
) -> Path:
    """Write the node M-Loss map (layers × node groups, log₁₀ colour scale) as a PNG, atomically.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).

    Args:
        node: ``{layer: node M-Loss (d,)}`` (:attr:`merging.mloss.MLossReport.node`).
        path: the PNG file.
        groups: contiguous node groups per layer (:func:`merging.mloss.node_group_map`).
        title: figure title.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, grid = node_group_map(node, groups)
    if not names:
        raise ValueError("save_node_map: no layer to draw")
    values = grid.numpy()
    positive = values[values > 0]
    # Six decades below the largest value are shown; dead nodes (exact zeros) sit at the floor.
    floor = max(float(positive.min()), float(positive.max()) * 1e-6) if positive.size else 1e-12
    shown = np.log10(np.maximum(values, floor))
    fig = Figure(figsize=(max(4.0, 0.2 * groups + 2.5), max(2.0, 0.35 * len(names) + 1.2)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel(f"node group ({groups} contiguous groups per layer)")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label="log10 node M-Loss")
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    return path


# ------------------------------------------------------------ results over seeds


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean of ``values`` (None for fewer than two values)."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(values) / n**0.5
    return mean - half, mean + half


#: Marks a paired gap whose 95% t interval contains 0 (:func:`accuracy_table`).
UNRESOLVED = "~"


def summarise(
    rows: Sequence[Mapping[str, Any]],
    reference: str,
    gap_key: str,
    *,
    paired: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Mean and sd over seeds of every ``test/...`` metric, per model (first-seen order).

    Gaps are paired: each seed's ``test/acc_mean`` minus the reference's on the same seed
    (same data split, same experts), so their sd is the spread of the comparison itself,
    not of the two accuracies; each gap also gets its 95% t interval (``<gap>_ci95``).

    Args:
        rows: one dict per (model, seed) with ``"model"``, ``"seed"`` and ``test/...`` values.
        reference: the model whose ``test/acc_mean`` each model is compared with, seed by seed.
        gap_key: the name of that gap in the summary (e.g. ``"gap_to_ensemble"``).
        paired: more such gaps, ``{gap name: reference model}`` (e.g.
            ``{"gain_over_average": "average"}``).
    """
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    references = {gap_key: reference, **(paired or {})}
    refs = {
        key: {r["seed"]: r["test/acc_mean"] for r in by_model.get(model, [])} for key, model in references.items()
    }
    summary = []
    for model, group in by_model.items():
        entry: dict[str, Any] = {"model": model, "seeds": len(group)}
        keys = [k for k in group[0] if k.startswith("test/")]
        metrics = {k: [r[k] for r in group if k in r] for k in keys}
        for key, ref in refs.items():
            if ref and references[key] != model:
                metrics[key] = [r["test/acc_mean"] - ref[r["seed"]] for r in group]
                entry[key + "_ci95"] = t_interval(metrics[key])
        for key, values in metrics.items():
            entry[key] = statistics.fmean(values)
            entry[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def plus_minus(entry: Mapping[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± sd"`` of ``key`` (scaled, e.g. to %), or ``"-"`` when absent; a paired gap
    whose 95% interval contains 0 is marked :data:`UNRESOLVED`."""
    if key not in entry:
        return "-"
    text = f"{entry[key] * scale:.{digits}f} ± {entry[key + '_sd'] * scale:.{digits}f}"
    interval = entry.get(key + "_ci95")
    if interval is not None and interval[0] <= 0 <= interval[1]:
        text += f" {UNRESOLVED}"
    return text


def accuracy_table(
    summary: Sequence[Mapping[str, Any]],
    task_names: Sequence[str],
    *,
    title: str,
    gap_key: str,
    gap_label: str,
    more_gaps: Sequence[tuple[str, str]] = (),
) -> tuple[Table, str]:
    """Per-task and mean accuracy, gaps and merge time per model, as a rich table and Markdown.

    ``more_gaps`` adds ``(summary key, column label)`` columns (paired gaps of
    :func:`summarise`); a model without that gap (the reference itself) shows ``-``.
    """
    gaps = [(gap_key, gap_label), *more_gaps]
    headers = ["model", *task_names, "mean acc (%)", *(f"{label} (pts)" for _, label in gaps), "merge time (s)"]
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h == "model" else "right")
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for e in summary:
        cells = [
            e["model"],
            *[plus_minus(e, f"test/acc/{t}") for t in task_names],
            plus_minus(e, "test/acc_mean"),
            *(plus_minus(e, key) for key, _ in gaps),
            plus_minus(e, "test/merge_seconds", scale=1.0, digits=3),
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    if any(UNRESOLVED in cell for line in md[2:] for cell in line.split(" | ")):
        note = f"{UNRESOLVED}: the paired 95% t interval contains 0: not resolved at this many seeds."
        table.caption = note
        md += ["", note]
    return table, "\n".join(md) + "\n"


def accuracy_bars(summary: Sequence[Mapping[str, Any]], path: str | Path, reference: str) -> None:
    """Bar chart of mean accuracy ± sd per model, with ``reference``'s as a dashed line (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [e["model"] for e in summary]
    means = [100 * e["test/acc_mean"] for e in summary]
    sds = [100 * e["test/acc_mean_sd"] for e in summary]
    ref = next(100 * e["test/acc_mean"] for e in summary if e["model"] == reference)
    colors = [
        "tab:gray" if label.startswith("expert") else "tab:green" if label == reference else "tab:blue"
        for label in labels
    ]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels)), 4))
    ax.bar(range(len(labels)), means, yerr=sds, color=colors, capsize=3)
    ax.axhline(ref, color="tab:green", linestyle="--", linewidth=1, label=reference)
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_ylabel("mean accuracy over tasks (%)")
    ax.set_ylim(max(0, min(means) - 15), 100)
    ax.legend(loc="lower right")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
