"""SeededRandomSampler: each epoch's order is a function of (seed, epoch) only, so a resumed fit
continues the orders of an uninterrupted one; the datamodules' train loaders use it."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import RandomSampler

from merging.datamodules import DigitsTasks, SeededRandomSampler


def _orders(sampler: SeededRandomSampler, epochs) -> list[list[int]]:
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_order_is_a_function_of_seed_and_epoch():
    data = range(50)
    run = _orders(SeededRandomSampler(data, seed=3), range(4))
    assert all(sorted(order) == list(data) for order in run)
    assert len({tuple(order) for order in run}) == 4  # a new order every epoch
    resumed = _orders(SeededRandomSampler(data, seed=3), [2, 3])  # a fresh sampler, as after a resume
    assert resumed == run[2:]
    assert list(SeededRandomSampler(data, seed=3)) == run[0]  # a pass without set_epoch is epoch 0
    sampler = SeededRandomSampler(data, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) == list(sampler) == run[1]  # every pass of one epoch (a cycled loader)
    assert _orders(SeededRandomSampler(data, seed=4), range(4)) != run
    assert len(SeededRandomSampler(data)) == 50


def test_seed_and_epoch_are_checked():
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        SeededRandomSampler(range(3), seed=-1)
    with pytest.raises(TypeError, match="epoch must be an int >= 0, got 1.0"):
        SeededRandomSampler(range(3)).set_epoch(1.0)


def test_it_is_a_random_sampler_for_lightning():
    # Under DDP Lightning replaces any RandomSampler by a shuffling DistributedSampler.
    assert isinstance(SeededRandomSampler(range(3)), RandomSampler)


def test_datamodule_train_loaders_shuffle_with_it():
    dm = DigitsTasks(batch_size=16, seed=5)
    dm.setup("fit")
    loaders = dm.train_dataloader().iterables
    samplers = [loader.sampler for loader in loaders.values()]
    assert all(isinstance(s, SeededRandomSampler) for s in samplers)
    assert [s.seed for s in samplers] == [6, 7, 8, 9]  # seed + 1 + task index
    assert dm.task_dataloader(0, "val").sampler.__class__.__name__ == "SequentialSampler"
    assert isinstance(dm.task_dataloader(0, "val", shuffle=True).sampler, SeededRandomSampler)


class _Recorder(LightningModule):
    """Records each training batch by epoch and a fingerprint (every task's input sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, tuple[float, ...]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, tuple(float(x.sum()) for x, _ in batch.values())))
        return self.layer(torch.ones(1, 1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_sets_the_epoch_inside_the_combined_loader(tmp_path):
    def fit(root, epochs, ckpt=None):
        module = _Recorder()
        trainer = Trainer(
            default_root_dir=tmp_path / root, accelerator="cpu", max_epochs=epochs, logger=False, limit_val_batches=0,
            enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(module, DigitsTasks(batch_size=64, seed=0), ckpt_path=ckpt)
        return module.seen

    full = fit("full", 3)
    by_epoch = [[b for e, b in full if e == epoch] for epoch in range(3)]
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]
    fit("first", 1)
    (ckpt,) = (tmp_path / "first" / "checkpoints").glob("*.ckpt")
    resumed = fit("resumed", 3, ckpt=ckpt)
    assert resumed == [(e, b) for e, b in full if e >= 1]
    assert isinstance(DigitsTasks().train_dataloader(), CombinedLoader)
