"""VisionTasks: torchvision datasets from a local root (tiny fake datasets written by the test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import merging.datamodules.idx as idx_module
from merging.datamodules import VISION_DATASETS, VisionTasks
from merging.datamodules.idx import IDXImageDataset
from merging.datamodules.vision import check_vision_dataset, image_transform, load_vision_dataset, vision_spec


@pytest.fixture(autouse=True)
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(idx_module, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-here")


def write_eurosat(root: Path, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for name in VISION_DATASETS["eurosat"].required:
        folder = root / "eurosat" / "2750" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i}.png")


@pytest.mark.parametrize("name", sorted(VISION_DATASETS))
def test_missing_dataset_names_folder_and_files(tmp_path, name):
    spec = VISION_DATASETS[name]
    dm = VisionTasks([name], root=str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(tmp_path / "data" / spec.folder) in message
    assert all(entry in message for entry in spec.required)
    with pytest.raises(FileNotFoundError, match=spec.required[0]):
        dm.setup()


def test_partly_missing_lists_what_is_missing(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for entry in ("data_batch_1", "data_batch_2", "batches.meta"):
        (folder / entry).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="missing: data_batch_3, data_batch_4, data_batch_5, test_batch\\."):
        check_vision_dataset("CIFAR10", tmp_path)


def test_names_and_metadata(tmp_path):
    dm = VisionTasks(["MNIST", "Fashion-MNIST", "cifar100", "gtsrb"], root=str(tmp_path), image_size=16, channels=1)
    assert dm.task_names == ["mnist", "fashionmnist", "cifar100", "gtsrb"]
    assert dm.num_classes == [10, 10, 100, 43]
    assert dm.input_shape == (1, 16, 16)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        vision_spec("imagenet")
    with pytest.raises(ValueError, match="repeat"):
        VisionTasks(["mnist", "MNIST"])
    with pytest.raises(ValueError, match="channels"):
        VisionTasks(["mnist"], channels=2)
    with pytest.raises(ValueError, match="mean needs 3 values"):
        VisionTasks(["mnist"], mean=[0.5], std=[0.5])


def test_image_transform_converts_channels_and_size():
    gray = Image.fromarray(np.full((5, 7), 255, dtype=np.uint8))
    rgb = Image.fromarray(np.stack([np.full((5, 7), v, dtype=np.uint8) for v in (255, 0, 0)], axis=-1))
    to_rgb, to_gray = image_transform(4, 3), image_transform(4, 1)
    assert torch.equal(to_rgb(gray), torch.ones(3, 4, 4))
    assert to_gray(rgb).shape == (1, 4, 4) and torch.allclose(to_gray(rgb), torch.full((1, 4, 4), 0.2989), atol=0.01)
    assert torch.equal(to_rgb(rgb)[1], torch.zeros(4, 4)) and type(to_rgb(rgb)) is torch.Tensor
    normalised = image_transform(4, 3, mean=[0.5] * 3, std=[0.5] * 3)(gray)
    assert torch.equal(normalised, torch.ones(3, 4, 4))


def test_mnist_torchvision_layout(tmp_path, mnist_like, write_mnist_files):
    data = mnist_like(20, 10, size=8)
    write_mnist_files(tmp_path / "MNIST" / "raw", data, gz=False)
    train = load_vision_dataset("mnist", tmp_path, True, image_transform(8, 1))
    assert isinstance(train, torchvision.datasets.MNIST) and len(train) == 20
    x, y = train[3]
    assert y == 3 and torch.allclose(x[0], torch.from_numpy(data["train"][0][3]).float() / 255)


def test_mnist_from_gz_idx_files(tmp_path, mnist_like, write_mnist_files):
    write_mnist_files(tmp_path / "KMNIST", mnist_like(20, 10, size=8), gz=True)
    test = load_vision_dataset("kmnist", tmp_path, False, image_transform(8, 3))
    assert isinstance(test, IDXImageDataset) and len(test) == 10 and test[0][0].shape == (3, 8, 8)


def test_fashion_mnist_debian_fallback(monkeypatch, tmp_path, mnist_like, write_mnist_files):
    debian = tmp_path / "debian"
    write_mnist_files(debian, mnist_like(20, 10, size=8))
    monkeypatch.setattr(idx_module, "DEBIAN_FASHION_MNIST_DIR", debian)
    dm = VisionTasks(["fashionmnist"], root=str(tmp_path / "data"), image_size=8, channels=1)
    dm.prepare_data()
    assert isinstance(dm.tasks[0].data, IDXImageDataset) and len(dm.dataset(0, "test")) == 10
    # root set to the Debian folder itself
    assert len(VisionTasks(["fashionmnist"], root=str(debian)).tasks[0].data) == 20


def test_mixed_gray_and_rgb_tasks(tmp_path, mnist_like, write_mnist_files):
    write_mnist_files(tmp_path / "MNIST" / "raw", mnist_like(20, 10, size=8), gz=False)
    write_eurosat(tmp_path)
    dm = VisionTasks(["mnist", "eurosat"], root=str(tmp_path), image_size=12, channels=3, batch_size=4, seed=1)
    dm.prepare_data()
    dm.setup("fit")
    eurosat = dm.tasks[1].data
    assert isinstance(eurosat, torchvision.datasets.EuroSAT) and dm.tasks[1].test_data is None
    # EuroSAT (30 images, no official test): val round(3)=3, test round(6)=6; MNIST: 2 val of 20, official test
    assert [len(dm.dataset(1, s)) for s in ("train", "val", "test")] == [21, 3, 6]
    assert [len(dm.dataset(0, s)) for s in ("train", "val", "test")] == [18, 2, 10]
    batch = next(iter(dm.train_dataloader()))[0]
    assert list(batch) == ["mnist", "eurosat"]
    for name, classes in zip(dm.task_names, dm.num_classes):
        x, y = batch[name]
        assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32 and int(y.max()) < classes
    unlabeled = next(iter(dm.unlabeled_dataloader(num_samples=6, batch_size=6)))
    assert unlabeled.shape == (6, 3, 12, 12)
