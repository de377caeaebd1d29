"""FashionMNISTTasks: class groups of Fashion-MNIST from local IDX files (torchvision layout,
a flat folder, or Debian's dataset-fashion-mnist package)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import merging.datamodules.idx as idx_module
from merging.datamodules import FashionMNISTTasks
from merging.datamodules.fashion_mnist import fashion_mnist_dirs, locate_fashion_mnist


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Point the Debian folder somewhere empty, so tests do not depend on the package."""
    monkeypatch.setattr(idx_module, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-here")


@pytest.fixture
def flat_root(tmp_path, mnist_like, write_mnist_files):
    data = mnist_like(60, 20, size=28)
    write_mnist_files(tmp_path / "flat", data, gz=True)
    return tmp_path / "flat", data


def test_reads_flat_folder_and_remaps(no_debian, flat_root):
    root, data = flat_root
    dm = FashionMNISTTasks(groups=[[9, 0], [5]], root=str(root), val_fraction=0.25)
    assert dm.task_names == ["fashion_90", "fashion_5"] and dm.num_classes == [2, 1]
    dm.setup()
    train_images, train_labels = data["train"]
    pool = dm.tasks[0].data
    # 60 labels cycle 0..9: six images each of class 9 and 0; label 0 <-> class 9, 1 <-> class 0
    assert len(pool) == 12
    for i in range(len(pool)):
        x, y = pool[i]
        sample_id = round(float(x[0, 0, 0]) * 255)  # the first pixel holds the sample's index
        assert train_labels[sample_id] == [9, 0][y]
        assert torch.allclose(x, torch.from_numpy(train_images[sample_id]).float().div(255).unsqueeze(0))
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    # official test split: two images of each class, used as the test split
    assert len(dm.dataset(0, "test")) == 4 and dm.dataset(0, "test") is dm.tasks[0].test_data
    assert (len(dm.dataset(0, "train")), len(dm.dataset(0, "val"))) == (9, 3)


def test_max_per_class(no_debian, flat_root):
    root, _ = flat_root
    dm = FashionMNISTTasks(groups=[[0, 1, 2]], root=str(root), max_per_class=4, seed=3)
    pool, test = dm.tasks[0].data, dm.tasks[0].test_data
    assert len(pool) == 12 and len(test) == 6  # test has only 2 per class
    assert torch.bincount(pool.labels).tolist() == [4, 4, 4]
    same = FashionMNISTTasks(groups=[[0, 1, 2]], root=str(root), max_per_class=4, seed=3).tasks[0].data
    assert torch.equal(pool.inputs, same.inputs)
    other = FashionMNISTTasks(groups=[[0, 1, 2]], root=str(root), max_per_class=4, seed=4).tasks[0].data
    assert not torch.equal(pool.inputs, other.inputs)
    with pytest.raises(ValueError, match="max_per_class"):
        FashionMNISTTasks(max_per_class=0)


def test_torchvision_layout_first(no_debian, tmp_path, mnist_like, write_mnist_files):
    write_mnist_files(tmp_path / "FashionMNIST" / "raw", mnist_like(10, 10), gz=False)
    write_mnist_files(tmp_path, mnist_like(30, 10), gz=True)  # a flat copy in root: not preferred
    files = locate_fashion_mnist(tmp_path)
    assert files.train_images == tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    assert len(FashionMNISTTasks(groups=[[0]], root=str(tmp_path)).tasks[0].data) == 1


def test_debian_folder_used_when_root_lacks_files(monkeypatch, tmp_path, mnist_like, write_mnist_files):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    write_mnist_files(debian, mnist_like(20, 10), gz=True)
    monkeypatch.setattr(idx_module, "DEBIAN_FASHION_MNIST_DIR", debian)
    (tmp_path / "empty").mkdir()
    assert fashion_mnist_dirs(tmp_path / "empty")[-1] == debian
    for root in (str(tmp_path / "empty"), None, str(debian)):
        dm = FashionMNISTTasks(groups=[[0, 1]], root=root)
        dm.prepare_data()
        assert len(dm.tasks[0].data) == 4


def test_missing_everywhere(no_debian, tmp_path):
    dm = FashionMNISTTasks(root=str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "dataset-fashion-mnist" in message


def test_debian_package_files():
    """Debian's real files when the package is installed; otherwise the error that names it."""
    if Path(idx_module.DEBIAN_FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file():
        dm = FashionMNISTTasks(max_per_class=5)
        dm.setup()
        assert [len(t.data) for t in dm.tasks] == [15, 15, 10, 10]
        assert [len(t.test_data) for t in dm.tasks] == [15, 15, 10, 10]
        x, y = dm.dataset(0, "test")[0]
        assert x.shape == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0
    else:
        with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
            FashionMNISTTasks().prepare_data()
