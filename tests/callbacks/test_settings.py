"""Every bad callback setting raises before the first training step, naming its argument.

Types and ranges raise at construction; what needs the model (layer names, weights against K)
raises when the fit starts; ``batch_size_fn``'s result raises on the first batch, before its
training step. In each case the module has not trained a single step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from merging.callbacks import ExpertDriftStopper, MLossMonitor, StabilityMonitor
from merging.modules.protocols import HasExperts


class _Experts(LightningModule, HasExperts):
    """Two experts of Linear -> ReLU -> Linear fine-tuned from one frozen base; counts its
    training steps."""

    def __init__(self) -> None:
        super().__init__()
        self.skeleton = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).requires_grad_(False)
        self.experts = nn.ModuleList(copy.deepcopy(self.skeleton).requires_grad_(True) for _ in range(2))
        self.training_steps = 0

    def expert_state_dicts(self):
        return [e.state_dict() for e in self.experts]

    def base_state_dict(self):
        return self.skeleton.state_dict()

    def batch_inputs(self, batch):
        return batch[0]

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        return sum(F.cross_entropy(e(x), y) for e in self.experts)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


# (callback factory, the argument its error names)
BAD_SETTINGS = {
    # MLossMonitor
    "layers names no module": (lambda: MLossMonitor(layers=["0", "features.0"]), "layers"),
    "layers as a string": (lambda: MLossMonitor(layers="features.0"), "layers"),
    "layers empty": (lambda: MLossMonitor(layers=[]), "layers"),
    "every_n_train_steps a string": (lambda: MLossMonitor(every_n_train_steps="5"), "every_n_train_steps"),
    "every_n_train_steps a float": (lambda: MLossMonitor(every_n_train_steps=2.5), "every_n_train_steps"),
    "every_n_train_steps a bool": (lambda: MLossMonitor(every_n_train_steps=True), "every_n_train_steps"),
    "every_n_train_steps zero": (lambda: MLossMonitor(every_n_train_steps=0), "every_n_train_steps"),
    "every_n_epochs a float": (lambda: MLossMonitor(every_n_epochs=1.0), "every_n_epochs"),
    "num_batches zero": (lambda: MLossMonitor(num_batches=0), "num_batches"),
    "reference unknown": (lambda: MLossMonitor(reference="ensemble"), "reference"),
    "input_fn not callable": (lambda: MLossMonitor(input_fn="batch[0]"), "input_fn"),
    "node_groups a bool": (lambda: MLossMonitor(node_groups=False), "node_groups"),
    "output not a bool": (lambda: MLossMonitor(output="yes"), "output"),
    # StabilityMonitor
    "sparsifiers as a string": (lambda: StabilityMonitor(sparsifiers="ties"), "sparsifiers"),
    "sparsifiers unknown": (lambda: StabilityMonitor(sparsifiers=["magnitude"]), "sparsifiers"),
    "top_layers negative": (lambda: StabilityMonitor(top_layers=-1), "top_layers"),
    "weights all zero": (lambda: StabilityMonitor(weights=[0.0, 0.0]), "weights"),
    "weights negative": (lambda: StabilityMonitor(weights=[2.0, -1.0]), "weights"),
    "weights not one per expert": (lambda: StabilityMonitor(weights=[1.0, 1.0, 1.0]), "weights"),
    "layer_depth zero": (lambda: StabilityMonitor(layer_depth=0), "layer_depth"),
    "every_n_steps a float": (lambda: StabilityMonitor(every_n_steps=2.5), "every_n_steps"),
    "density above one": (lambda: StabilityMonitor(density=1.5), "density"),
    "drop_rate one": (lambda: StabilityMonitor(drop_rate=1.0), "drop_rate"),
    "drift_factor one": (lambda: StabilityMonitor(drift_factor=1.0), "drift_factor"),
    "seed a float": (lambda: StabilityMonitor(seed=0.5), "seed"),
    "batch_size_fn not callable": (lambda: StabilityMonitor(batch_size_fn=4), "batch_size_fn"),
    "batch_size_fn wrong count": (lambda: StabilityMonitor(batch_size_fn=lambda batch: [4, 4, 4]), "batch_size_fn"),
    "batch_size_fn not a count": (lambda: StabilityMonitor(batch_size_fn=lambda batch: "4"), "batch_size_fn"),
    # ExpertDriftStopper
    "factor a string": (lambda: ExpertDriftStopper(factor="3"), "factor"),
    "check_every_n_steps a float": (lambda: ExpertDriftStopper(check_every_n_steps=1.5), "check_every_n_steps"),
    "min_steps negative": (lambda: ExpertDriftStopper(min_steps=-1), "min_steps"),
    "max_stopped zero": (lambda: ExpertDriftStopper(max_stopped=0), "max_stopped"),
}


@pytest.mark.parametrize(("make", "argument"), list(BAD_SETTINGS.values()), ids=list(BAD_SETTINGS))
def test_bad_setting_raises_before_the_first_training_step(tmp_path, make, argument):
    module = _Experts()
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)), 4)
    with pytest.raises((TypeError, ValueError), match=rf"\b{argument}\b"):
        trainer = Trainer(
            callbacks=[make()],
            default_root_dir=tmp_path,
            accelerator="cpu",
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, loader)
    assert module.training_steps == 0


def test_layer_errors_list_the_measurable_layers(tmp_path):
    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False, callbacks=[
        MLossMonitor(layers=["0", "1"])
    ], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.randint(0, 3, (8,))), 4)
    with pytest.raises(ValueError, match=r"layers \['1'\] name no nn\.Linear.*measurable layers are '0', '2'"):
        trainer.fit(_Experts(), loader)


def test_string_settings_are_not_split_into_characters():
    with pytest.raises(TypeError, match="layers must be a list of names or None, got the string 'features.0'"):
        MLossMonitor(layers="features.0")
    with pytest.raises(TypeError, match="sparsifiers must be a list of names, got the string 'ties'"):
        StabilityMonitor(sparsifiers="ties")
    with pytest.raises(TypeError, match="every_n_train_steps must be an int >= 1 or None, got '5'"):
        MLossMonitor(every_n_train_steps="5")


def test_good_settings_are_kept():
    monitor = MLossMonitor(every_n_epochs=2, layers=("0", "2"), peers="peer.safetensors")
    assert monitor.layers == ["0", "2"] and monitor.peers == ["peer.safetensors"] and monitor.every_n_epochs == 2
    stability = StabilityMonitor(weights=(1, 3), sparsifiers=[], density=0, top_layers=1)
    assert stability.weights == [1.0, 3.0] and stability.sparsifiers == () and stability.density == 0.0
