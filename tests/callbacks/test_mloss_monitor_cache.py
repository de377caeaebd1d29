"""MLossMonitor's forward cache: the logged values do not depend on it, and it saves the
forwards of the models that stay fixed during the fit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import MLossMonitor
from merging.io import save_state_dict


class _Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.act(self.fc(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _Experts(LightningModule):
    """Three experts fine-tuned jointly from a frozen base (satisfies HasExperts)."""

    def __init__(self) -> None:
        super().__init__()
        self.skeleton = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.skeleton.requires_grad_(False)
        self.experts = nn.ModuleList(copy.deepcopy(self.skeleton).requires_grad_(True) for _ in range(3))
        self.skeleton_forwards = 0
        self.skeleton.register_forward_pre_hook(lambda *args: setattr(self, "skeleton_forwards", self.skeleton_forwards + 1))

    def expert_state_dicts(self):
        return [e.state_dict() for e in self.experts]

    def base_state_dict(self):
        return self.skeleton.state_dict()

    def batch_inputs(self, batch):
        return batch[0]

    def training_step(self, batch, batch_idx):
        x, y = batch
        return sum(F.cross_entropy(e(x), (y + j) % 3) for j, e in enumerate(self.experts))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)), batch_size=4)


def _fit(tmp_path, make, cache: bool, **kwargs) -> tuple[MLossMonitor, LightningModule]:
    seed_everything(0)
    module = make()
    monitor = MLossMonitor(every_n_train_steps=2, num_batches=2, cache_forwards=cache, heatmap_filename=None, **kwargs)
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=6,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _loader())
    return monitor, module


@pytest.mark.parametrize("make", [_Net, _Experts], ids=["single-model", "multi-expert"])
def test_logged_values_are_the_same_with_and_without_the_cache(tmp_path, make):
    cached, _ = _fit(tmp_path, make, True)
    plain, _ = _fit(tmp_path, make, False)
    assert len(cached.history) == 3
    assert cached.history == plain.history


def test_peers_with_the_cache(tmp_path):
    g = torch.Generator().manual_seed(3)
    peer = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in _Net().state_dict().items()}
    path = str(save_state_dict(peer, tmp_path / "peer.safetensors"))
    cached, _ = _fit(tmp_path, _Net, True, peers=[path])
    plain, _ = _fit(tmp_path, _Net, False, peers=[path])
    assert cached.history == plain.history


def test_the_frozen_base_is_evaluated_once_per_cached_batch(tmp_path):
    # Every forward of the measurement runs on the skeleton (functional_call), so its
    # pre-hook counts them all: measurements at steps 2, 4 and 6, on 2 cached batches.
    _, cached = _fit(tmp_path, _Experts, True)
    _, plain = _fit(tmp_path, _Experts, False)
    per_measurement = 3 + 1  # the K experts' outputs and the average's
    assert plain.skeleton_forwards == 3 * 2 * (per_measurement + 1) + 1  # + trace
    assert cached.skeleton_forwards == 3 * 2 * per_measurement + 2 + 1
