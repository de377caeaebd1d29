"""Every YAML under configs/ parses and instantiates with LightningCLI(run=False)."""

from __future__ import annotations

from pathlib import Path

import pytest

from merging.cli import MergingCLI

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
DATA_ONLY = {p for p in CONFIGS if p.parent.name == "data"}


@pytest.mark.parametrize("config", sorted(set(CONFIGS) - DATA_ONLY), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_instantiates(config, tmp_path, monkeypatch):
    # Files a config names (bases, bundles) are read in setup, not at instantiation.
    monkeypatch.chdir(tmp_path)
    cli = MergingCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(config)])
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("config", sorted(DATA_ONLY), ids=lambda p: p.name)
def test_data_config_composes_with_a_model_config(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    merge = Path(config).parents[1] / "merge" / "average.yaml"
    cli = MergingCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(merge), "--config", str(config)],
    )
    assert type(cli.datamodule).__name__ in {"DigitsTasks", "FashionMNISTTasks"}
