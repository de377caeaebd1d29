"""Reading the claims from per-seed records: paired differences and rank correlations,
each with mean ± sd over seeds, n, a 95% interval, wins/losses and a verdict.

Pre-registered reading (the same for every row; written before the confirmation run):

- A **difference** row is read per seed (same seed, same experts: paired) in accuracy points.
  A **correlation** row is a per-seed Spearman ρ; its pooled ρ (all seeds' points together)
  is shown beside it.
- The 95% interval is Student's t interval of the per-seed values' mean.
- Verdict, for a row with a claimed sign: **holds** when the interval lies on the claimed side
  of 0, **contradicted** when it lies on the other side, **not resolved** otherwise. For a
  row with an equivalence claim (NeuLig's merged ≈ ensembled), **holds** when the interval
  lies within ± the stated margin, **contradicted** when it lies outside it. A row without a
  claimed direction is **measured** and reports the sign its interval resolves.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats as scipy_stats

from merging.report import t_interval

#: The claim names, in table order (the JSON's ``name``; seeds 000-004 of the papers).
CLAIMS = (
    "mties_vs_ties",
    "mloss_predicts_gap",
    "neulig_merged_vs_ensembled",
    "mudsc_vs_average",
    "soup_vs_ensemble",
    "stability_predicts_merge",
)

#: Equivalence margin (accuracy points) of NeuLig's merged-vs-ensembled claim.
NEULIG_MARGIN = 1.0


@dataclass(frozen=True)
class Row:
    """How to read one row: ``value(record)`` per seed (None: missing for that seed)."""

    label: str
    value: Callable[[dict], float | None]
    expected: str  # "> 0", "< 0", "≈ 0" or "—"
    kind: str = "difference"  # or "correlation"
    pooled: Callable[[Sequence[dict]], float | None] | None = None


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sd, n, the 95% t interval, wins (> 0), losses (< 0)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": [None, None], "wins": 0, "losses": 0}
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    ci = list(t_interval(values) or (None, None))
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "ci95": ci,
        "wins": sum(v > 0 for v in values),
        "losses": sum(v < 0 for v in values),
    }


def verdict(entry: dict[str, Any], expected: str, margin: float = NEULIG_MARGIN) -> str:
    """The pre-registered verdict of a summarised row (module docstring)."""
    low, high = entry["ci95"]
    if low is None:
        return "not resolved"
    if expected == "> 0":
        return "holds" if low > 0 else "contradicted" if high < 0 else "not resolved"
    if expected == "< 0":
        return "holds" if high < 0 else "contradicted" if low > 0 else "not resolved"
    if expected == "≈ 0":
        if -margin <= low and high <= margin:
            return "holds"
        return "contradicted" if high < -margin or low > margin else "not resolved"
    return "measured: > 0" if low > 0 else "measured: < 0" if high < 0 else "measured: not resolved"


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ; None when undefined (fewer than 3 points, or a constant side)."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None
    return float(scipy_stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)


def _points(scale: float, f: Callable[[dict], float | None]) -> Callable[[dict], float | None]:
    def value(record: dict) -> float | None:
        v = f(record)
        return None if v is None else scale * v

    return value


def _diff(a: Callable[[dict], float | None], b: Callable[[dict], float | None]) -> Callable[[dict], float | None]:
    def value(record: dict) -> float | None:
        x, y = a(record), b(record)
        return None if x is None or y is None else 100.0 * (x - y)

    return value


def _get(*path: str) -> Callable[[dict], float | None]:
    def value(record: dict) -> Any:
        for key in path:
            if not isinstance(record, dict) or key not in record or record[key] is None:
                return None
            record = record[key]
        return record

    return value


def _layer_rho(x_key: str) -> Callable[[dict], float | None]:
    def value(record: dict) -> float | None:
        layers = list(record["layer_gaps"])
        return spearman([record["mloss"][x_key][k] for k in layers], [record["layer_gaps"][k]["gap"] for k in layers])

    return value


def _pooled_layers(records: Sequence[dict]) -> float | None:
    xs, ys = [], []
    for r in records:
        for k, g in r["layer_gaps"].items():
            xs.append(r["mloss"]["layer_normalized"][k])
            ys.append(g["gap"])
    return spearman(xs, ys)


def _half_split(record: dict) -> float | None:
    diffs = [g["gap_high_rows"] - g["gap_low_rows"] for g in record["layer_gaps"].values() if "gap_high_rows" in g]
    return 100.0 * statistics.fmean(diffs) if diffs else None


def _keep_rate_rho(record: dict) -> float | None:
    rates = record["mloss"].get("mties_mean_keep_rate", {})
    layers = [k for k in rates if k in record["layer_gaps"]]
    return spearman([rates[k] for k in layers], [record["layer_gaps"][k]["gap"] for k in layers])


def _stability_rho(x_key: str, y: Callable[[dict], float]) -> Callable[[dict], float | None]:
    def value(record: dict) -> float | None:
        settings = record["stability"]
        return spearman([s[x_key] for s in settings], [y(s) for s in settings])

    return value


def _stability_pooled(x_key: str, y: Callable[[dict], float]) -> Callable[[Sequence[dict]], float | None]:
    def value(records: Sequence[dict]) -> float | None:
        settings = [s for r in records for s in r["stability"]]
        return spearman([s[x_key] for s in settings], [y(s) for s in settings])

    return value


def _merged(s: dict) -> float:
    return s["average"]


def _merge_gap(s: dict) -> float:
    return s["average"] - s["ensemble"]


def claim_rows(records: Sequence[dict]) -> dict[str, list[Row]]:
    """The rows of every claim (labels name the settings of the records' protocol)."""
    methods = records[0]["methods"] if records else {}
    rows: dict[str, list[Row]] = {
        "mties_vs_ties": [
            Row("M-TIES − TIES, equal density, λ fixed", _diff(_get("methods", "mties_equal_density", "fixed"),
                _get("methods", "ties", "fixed")), "> 0"),
            Row("M-TIES − TIES, equal density, λ on val", _diff(_get("methods", "mties_equal_density", "searched"),
                _get("methods", "ties", "searched")), "> 0"),
            Row("M-TIES paper recipe − TIES, λ fixed", _diff(_get("methods", "mties_paper", "fixed"),
                _get("methods", "ties", "fixed")), "> 0"),
            Row("M-TIES paper recipe − TIES, λ on val", _diff(_get("methods", "mties_paper", "searched"),
                _get("methods", "ties", "searched")), "> 0"),
        ],
        "mloss_predicts_gap": [
            Row("ensemble − average (the gap M-Loss measures)", _diff(_get("ensemble"), _get("average")), "> 0"),
            Row("ρ(normalized M-Loss, layer gap) across layers", _layer_rho("layer_normalized"), "> 0",
                "correlation", _pooled_layers),
            Row("ρ(M-Loss, layer gap) across layers", _layer_rho("layer"), "> 0", "correlation"),
            Row("high- minus low-M-Loss rows' gap (mean over layers)", _half_split, "> 0"),
            Row("ρ(M-TIES layer keep rate, layer gap)", _keep_rate_rho, "—", "correlation"),
        ],
        "neulig_merged_vs_ensembled": [
            Row("NeuLig merged − NeuLig ensembled", _diff(_get("neulig", "neulig (merged)"),
                _get("neulig", "neulig (ensembled)")), "≈ 0"),
            Row("NeuLig merged, per-sample CoopVecs − NeuLig ensembled", _diff(
                _get("neulig", "neulig (merged, per_sample)"), _get("neulig", "neulig (ensembled)")), "≈ 0"),
            Row("NeuLig merged − average", _diff(_get("neulig", "neulig (merged)"), _get("average")), "> 0"),
        ],
        "mudsc_vs_average": [],
        "soup_vs_ensemble": [
            Row("uniform soup − logit ensemble", _diff(_get("soup", "uniform_soup"), _get("soup", "logit_ensemble")),
                "—"),
            Row("greedy soup − logit ensemble", _diff(_get("soup", "greedy_soup"), _get("soup", "logit_ensemble")),
                "—"),
            Row("feature ensemble (first head) − logit ensemble", _diff(
                _get("soup", "feature_ensemble_first_head"), _get("soup", "logit_ensemble")), "—"),
            Row("uniform soup − mean member", _diff(_get("soup", "uniform_soup"), _get("soup", "individual_mean")),
                "—"),
            Row("one member ×c: soup flip rate − member's own flip rate", _diff(
                _get("soup", "scaling", "first_only/soup", "flip_rate"),
                _get("soup", "scaling", "single/individual", "flip_rate")), "< 0"),
            Row("one member ×c: soup − unscaled soup", _diff(_get("soup", "scaling", "first_only/soup", "accuracy"),
                _get("soup", "scaling", "none/soup", "accuracy")), "—"),
            Row("all members ×c: soup − unscaled soup", _diff(_get("soup", "scaling", "all/soup", "accuracy"),
                _get("soup", "scaling", "none/soup", "accuracy")), "—"),
            Row("one member ×c: logit ensemble − unscaled", _diff(
                _get("soup", "scaling", "first_only/logit", "accuracy"),
                _get("soup", "scaling", "none/logit", "accuracy")), "—"),
        ],
        "stability_predicts_merge": [
            Row("ρ(Λ, averaged accuracy)", _stability_rho("lr_integral", _merged), "< 0", "correlation",
                _stability_pooled("lr_integral", _merged)),
            Row("ρ(Λ, average − ensemble)", _stability_rho("lr_integral", _merge_gap), "< 0", "correlation",
                _stability_pooled("lr_integral", _merge_gap)),
            Row("ρ(‖τ‖, averaged accuracy)", _stability_rho("tau_norm", _merged), "< 0", "correlation",
                _stability_pooled("tau_norm", _merged)),
            Row("ρ(path length, averaged accuracy)", _stability_rho("path_length", _merged), "< 0", "correlation",
                _stability_pooled("path_length", _merged)),
            Row("ρ(dispersion D, averaged accuracy)", _stability_rho("dispersion", _merged), "< 0", "correlation",
                _stability_pooled("dispersion", _merged)),
        ],
    }  # fmt: skip
    merges = list(records[0]["different_init"]) if records else []
    for label in merges:
        if label in ("average", "experts (own task)"):
            continue
        rows["mudsc_vs_average"].append(
            Row(f"{label} − average", _diff(_get("different_init", label), _get("different_init", "average")), "> 0")
        )
    del methods
    return rows


def read_claims(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Every claim with its rows summarised (JSON-ready)."""
    records = sorted(records, key=lambda r: r["seed"])
    seeds = [r["seed"] for r in records]
    out = []
    for name, rows in claim_rows(records).items():
        entries = []
        for row in rows:
            values = [row.value(r) for r in records]
            entry = {"row": row.label, "kind": row.kind, "expected": row.expected, "seeds": seeds, "values": values}
            entry.update(summary(values))
            entry["verdict"] = verdict(entry, row.expected)
            if row.pooled is not None:
                entry["pooled"] = row.pooled(records)
            entries.append(entry)
        out.append({"name": name, "rows": entries})
    return out


def _fmt(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:+.{digits}f}"


def claims_markdown(claims: Sequence[dict[str, Any]]) -> str:
    """One table: claim, row, expected sign, mean ± sd, 95% interval, wins/losses (n), verdict."""
    lines = [
        "| claim | row | expected | mean ± sd | 95% interval | wins/losses (n) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for claim in claims:
        for e in claim["rows"]:
            digits = 2 if e["kind"] == "correlation" else 1
            mean = "—" if e["mean"] is None else f"{e['mean']:+.{digits}f} ± {e['sd']:.{digits}f}"
            if e.get("pooled") is not None:
                mean += f" (pooled {e['pooled']:+.2f})"
            low, high = e["ci95"]
            ci = "—" if low is None else f"[{_fmt(low, digits)}, {_fmt(high, digits)}]"
            lines.append(
                f"| `{claim['name']}` | {e['row']} | {e['expected']} | {mean} | {ci} | "
                f"{e['wins']}/{e['losses']} ({e['n']}) | {e['verdict']} |"
            )
    return "\n".join(lines) + "\n"
