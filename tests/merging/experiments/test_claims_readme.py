"""The README shows the committed claims table exactly as the run wrote it."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_readme_claims_table_equals_results_claims_md():
    table = (ROOT / "results" / "claims.md").read_text().split("\n\n", 1)[1]
    assert table.startswith("| claim |")
    assert table in (ROOT / "README.md").read_text()


def test_committed_results_are_confirmation_seeds_of_a_committed_protocol():
    import json

    from merging.experiments.claims.protocol import load_protocol

    result = json.loads((ROOT / "results" / "claims.json").read_text())
    protocol = load_protocol(ROOT / "benchmarks" / "claims.yaml")
    assert result["confirmation"] and not result["protocol_uncommitted"]
    assert result["seeds"] == protocol.confirmation_seeds and len(result["seeds"]) >= 10
    assert not set(result["seeds"]) & set(protocol.selection_seeds)
    assert result["protocol_commit_date"] < result["created"]
    assert [c["name"] for c in result["claims"]] == [
        "mties_vs_ties", "mloss_predicts_gap", "neulig_merged_vs_ensembled",
        "mudsc_vs_average", "soup_vs_ensemble", "stability_predicts_merge",
    ]  # fmt: skip
