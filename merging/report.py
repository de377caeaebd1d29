"""Result tables and plots: mean ± sd over seeds, as rich tables, Markdown and PNG."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from merging.io import write_atomic


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
    not of the two accuracies.

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
        for key, values in metrics.items():
            entry[key] = statistics.fmean(values)
            entry[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def plus_minus(entry: Mapping[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± sd"`` of ``key`` (scaled, e.g. to %), or ``"-"`` when absent."""
    if key not in entry:
        return "-"
    return f"{entry[key] * scale:.{digits}f} ± {entry[key + '_sd'] * scale:.{digits}f}"


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
    colors = ["tab:gray" if l.startswith("expert") else "tab:green" if l == reference else "tab:blue" for l in labels]
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
