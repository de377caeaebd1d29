"""DigitsTasks: class groups of scikit-learn's bundled digits."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from merging.datamodules import DigitsTasks


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return torch.as_tensor(d.images, dtype=torch.float32) / 16.0, torch.as_tensor(d.target)


def test_metadata_known_without_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("load_digits called in __init__ or a metadata property")

    monkeypatch.setattr("sklearn.datasets.load_digits", fail)
    dm = DigitsTasks(groups=[[1, 7], [0, 8, 9]])
    assert dm.task_names == ["digits_17", "digits_089"]
    assert dm.num_classes == [2, 3]
    assert dm.input_shape == (1, 8, 8)


def test_default_tasks_cover_dataset(digits):
    images, targets = digits
    dm = DigitsTasks(seed=1)
    dm.setup("fit")
    assert dm.task_names == ["digits_012", "digits_345", "digits_67", "digits_89"]
    sizes = [len(dm.dataset(t, s)) for t in range(4) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 == images.shape[0]


def test_labels_remapped(digits):
    images, targets = digits
    dm = DigitsTasks(groups=[[6, 7], [9, 2, 4]])
    for t, group in enumerate(dm.groups):
        data = dm.tasks[t].data
        xs = torch.stack([data[i][0] for i in range(len(data))])
        ys = torch.tensor([data[i][1] for i in range(len(data))])
        assert set(ys.tolist()) == set(range(len(group)))
        for k, digit in enumerate(group):
            # new label k <-> original digit group[k], sample for sample (order is kept)
            assert torch.equal(xs[ys == k].squeeze(1), images[targets == digit])
        assert xs.dtype == torch.float32 and xs.min() >= 0 and xs.max() <= 1 and xs.shape[1:] == (1, 8, 8)


def test_splits_deterministic_and_seed_dependent():
    def val_inputs(seed):
        dm = DigitsTasks(seed=seed)
        return torch.cat([x for x, _ in dm.task_dataloader(0, "val")])

    assert torch.equal(val_inputs(0), val_inputs(0))
    assert not torch.equal(val_inputs(0), val_inputs(1))


def test_fractions_configurable():
    dm = DigitsTasks(groups=[[0, 1]], val_fraction=0.25, test_fraction=0.25)
    n = 178 + 182  # digits 0 and 1 in load_digits
    sizes = [len(dm.dataset(0, s)) for s in ("train", "val", "test")]
    assert sizes == [n - 2 * 90, 90, 90]


@pytest.mark.parametrize(
    ("groups", "match"),
    [([[0, 10]], "out of range"), ([[1], []], "empty"), ([[3, 3]], "repeats"), ([], "at least one")],
)
def test_bad_groups(groups, match):
    with pytest.raises(ValueError, match=match):
        DigitsTasks(groups=groups)


class _Recorder(pl.LightningModule):
    """A per-task linear classifier that records what the trainer hands it."""

    def __init__(self, num_classes: list[int], names: list[str]) -> None:
        super().__init__()
        self.names = names
        self.heads = nn.ModuleList(nn.Linear(64, c) for c in num_classes)
        self.train_keys: list[list[str]] = []
        self.val_indices: set[int] = set()

    def training_step(self, batch, batch_idx):
        self.train_keys.append(list(batch))
        return sum(
            nn.functional.cross_entropy(head(batch[name][0].flatten(1)), batch[name][1])
            for name, head in zip(self.names, self.heads)
        )

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.val_indices.add(dataloader_idx)
        assert int(y.max()) < self.heads[dataloader_idx].out_features

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_trainer_fit_batch_structure(tmp_path):
    dm = DigitsTasks(batch_size=32)
    model = _Recorder(dm.num_classes, dm.task_names)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, limit_val_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert model.train_keys == [dm.task_names] * 3
    assert model.val_indices == {0, 1, 2, 3}
