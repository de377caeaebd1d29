"""The callbacks in someone else's project: one import name, the README's three ways to add
them run as written, Lightning's own demo modules fitted with both callbacks (one process
and 2 gloo ranks) with weights unchanged, and no warning caused by the callbacks."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from merging.callbacks import MLossMonitor, StabilityMonitor

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# A user's own modules with the generic names a project of theirs may have.
COLLIDING = {
    "callbacks.py": "raise ImportError('the project’s own callbacks.py was imported by lightning-merging')\n",
    "datamodules.py": "raise ImportError('the project’s own datamodules.py was imported by lightning-merging')\n",
}


def _project(tmp_path: Path) -> Path:
    for name, text in COLLIDING.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default", "PYTHONPATH": ""}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def readme_snippets() -> tuple[dict[str, str], list[str]]:
    """The section "Add the callbacks to your own project": files to write and commands to run."""
    text = README.read_text()
    start = text.index("## Add the callbacks to your own project")
    section = text[start : text.index("\n## ", start + 1)]
    files = dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", section, flags=re.S))
    commands = [c.strip() for c in re.findall(r"<!-- run -->\n```bash\n(.*?)```", section, flags=re.S)]
    return files, commands


def test_one_namespace_from_a_project_with_colliding_modules(tmp_path):
    project = _project(tmp_path)
    code = (
        "from merging.callbacks import ExpertDriftStopper, MLossMonitor, StabilityMonitor\n"
        "from merging.datamodules import DigitsTasks, FashionMNISTTasks, MultiTaskDataModule\n"
        "from merging.modules import EnsembleModule, MergedModule, MultiExpertModule, NeuLigModule\n"
        "import sys; assert 'callbacks' not in sys.modules and 'datamodules' not in sys.modules\n"
    )
    _run([sys.executable, "-c", code], cwd=project)


def test_no_project_code_names_a_top_level_callbacks_or_datamodules():
    pattern = re.compile(
        r"^\s*(from|import) (callbacks|datamodules)\b|class_path: (callbacks|datamodules)\.", flags=re.M
    )
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("merging", "configs", "benchmarks", "tests")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in {".py", ".yaml", ".md"} and pattern.search(path.read_text())
    ]
    offenders += ["README.md"] if pattern.search(README.read_text()) else []
    assert not offenders


@pytest.mark.slow
def test_the_wheel_installs_only_the_merging_name(tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    _run(cmd, cwd=tmp_path)
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"merging"}
    # Installed from the wheel (not the source tree), imported from a colliding project.
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], cwd=tmp_path)
    (tmp_path / "project").mkdir()
    project = _project(tmp_path / "project")
    code = (
        "import merging, merging.callbacks, merging.datamodules\n"
        f"assert merging.__file__.startswith({str(site)!r}), merging.__file__\n"
        "from merging.callbacks import MLossMonitor, StabilityMonitor\nfrom merging.datamodules import DigitsTasks\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_readme_plugin_snippets_run_as_written(tmp_path):
    files, commands = readme_snippets()
    assert set(files) == {"model.py", "train.py", "config.yaml"} and len(commands) == 3
    project = _project(tmp_path)
    for name, text in files.items():
        (project / name).write_text(text)
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "python"
        done = _run([sys.executable, *args[1:]], cwd=project)
        log = done.stdout + done.stderr
        assert "MLossMonitor: M-Loss of Classifier's current weights" in log, command
        assert "StabilityMonitor: tracking Classifier as one model" in log, command
        assert "only the model output is measured" not in log
        reports = sorted(project.rglob("stability_report.md"))
        maps = sorted(project.rglob("mloss_node_map.png"))
        assert reports and maps, command
        for path in (*reports, *maps):
            path.unlink()


# --------------------------------------------------------------------- a plain module


class _Plain(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, batch_size=x.shape[0])
        return loss

    def train_dataloader(self):
        x = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=16, shuffle=True, num_workers=0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_plain(tmp_path: Path, callbacks: list) -> tuple[dict[str, torch.Tensor], list[str]]:
    seed_everything(0)
    model = _Plain()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    return model.state_dict(), sorted({str(w.message) for w in caught})


def test_a_plain_module_gets_no_warning_from_the_callbacks(tmp_path):
    bare_state, bare_warnings = _fit_plain(tmp_path / "bare", [])
    state, caught = _fit_plain(
        tmp_path / "watched", [MLossMonitor(every_n_train_steps=3), StabilityMonitor(every_n_steps=2)]
    )
    assert set(caught) <= set(bare_warnings), sorted(set(caught) - set(bare_warnings))
    assert all(torch.equal(state[k], bare_state[k]) for k in bare_state)


def test_output_only_measurement_is_said_not_hidden(tmp_path, caplog):
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = Trainer(
        accelerator="cpu", max_steps=4, default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
        callbacks=[MLossMonitor(every_n_train_steps=2, heatmap_filename=None)],
    )
    with pytest.warns(UserWarning, match=r"only the model output is measured.*layers="):
        trainer.fit(BoringModel())


# ------------------------------------------------------------- Lightning's own demos

_DEMO_SCRIPT = r'''
import sys

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.transformer import LightningTransformer
from torch.utils.data import DataLoader, TensorDataset

from merging.callbacks import MLossMonitor, StabilityMonitor


class OfflineTransformer(LightningTransformer):
    def prepare_data(self):  # the demo downloads WikiText2; this test feeds its own tokens
        pass


def inputs(batch):  # module level: ddp_spawn pickles the callbacks
    return batch[0], batch[1]


def tokens():
    data = torch.randint(0, 50, (64, 12), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=8, shuffle=True)


def fit(which, devices, watched, root):
    seed_everything(0)
    if which == "boring":
        model, data = BoringModel(), None
        monitor = MLossMonitor(every_n_train_steps=2, heatmap_filename=None)
    else:
        model, data = OfflineTransformer(vocab_size=50), tokens()
        monitor = MLossMonitor(every_n_train_steps=2, input_fn=inputs, heatmap_filename=None)
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=6,
        limit_val_batches=0, callbacks=[monitor, StabilityMonitor(every_n_steps=2)] if watched else [],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, train_dataloaders=data)
    measured = "mloss/mean" in trainer.callback_metrics and "stability/tau_norm" in trainer.callback_metrics
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, measured


if __name__ == "__main__":
    root = sys.argv[1]
    for which in ("boring", "transformer"):
        for devices in (1, 2):
            bare, _ = fit(which, devices, False, root)
            watched, measured = fit(which, devices, True, root)
            same = bare.keys() == watched.keys() and all(torch.equal(bare[k], watched[k]) for k in bare)
            print(f"RESULT {which} devices={devices} measured={measured} unchanged={same}", flush=True)
'''


@pytest.mark.slow
def test_lightning_demo_modules_fit_unchanged_with_both_callbacks(tmp_path):
    # One script for every case (Lightning's BoringModel and demo Transformer, 1 process and
    # 2 gloo ranks): fits with and without the callbacks from a folder whose own callbacks.py
    # and datamodules.py would break any import of those names.
    project = _project(tmp_path)
    (project / "fit_demo.py").write_text(_DEMO_SCRIPT)
    done = _run([sys.executable, "fit_demo.py", str(tmp_path / "root")], cwd=project, timeout=600)
    results = sorted(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    assert results == sorted(
        f"RESULT {which} devices={devices} measured=True unchanged=True"
        for which in ("boring", "transformer")
        for devices in (1, 2)
    ), done.stdout[-3000:]
