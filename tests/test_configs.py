"""Every YAML under configs/ parses and instantiates with LightningCLI(run=False)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from merging.cli import MergingCLI
from merging.io import save_state_dict
from merging.models import build_backbone

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
DATA_ONLY = {p for p in CONFIGS if p.parent.name == "data"}


@pytest.mark.parametrize("config", sorted(set(CONFIGS) - DATA_ONLY), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    init = yaml.safe_load(config.read_text())["model"].get("init_args", {})
    if init.get("base_checkpoint"):
        # The base a config points at is written by an earlier step: stand one in.
        backbone = build_backbone(init.get("backbone", "small_cnn"), in_chans=init.get("in_chans", 1), **init.get("backbone_kwargs", {}))
        save_state_dict(backbone.state_dict(), init["base_checkpoint"])
    cli = MergingCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(config)])
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("config", sorted(DATA_ONLY), ids=lambda p: p.name)
def test_data_config_composes_with_a_model_config(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    merge = Path(config).parents[1] / "merge" / "average.yaml"
    cli = MergingCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(merge), "--config", str(config)])
    assert type(cli.datamodule).__name__ in {"DigitsTasks", "FashionMNISTTasks"}
