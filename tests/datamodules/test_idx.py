"""IDX reading (the MNIST family's format), on tiny files written by the test."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from merging.datamodules.idx import (
    IDXImageDataset,
    find_idx_files,
    locate_idx_files,
    read_idx,
    read_idx_images,
    read_idx_labels,
)


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_read_uint8_images_roundtrip(tmp_path, write_idx, name):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / name, images)
    np.testing.assert_array_equal(read_idx(path), images)
    out = read_idx_images(path)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 4)


def test_header_bytes_by_hand(tmp_path):
    # magic 2049 = 0x00000801 (unsigned bytes, 1 dimension), N = 3, labels 7 0 9
    path = tmp_path / "labels.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    labels = read_idx_labels(path)
    assert labels.dtype == torch.int64 and labels.tolist() == [7, 0, 9]


@pytest.mark.parametrize("dtype", [">i2", ">i4", ">f4", ">f8", "i1"])
def test_other_types_big_endian(tmp_path, write_idx, dtype):
    values = np.array([[-2, 1], [3, 300 if dtype != "i1" else 100]], dtype=dtype)
    out = read_idx(write_idx(tmp_path / "x.idx", values))
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, values.astype(out.dtype))


def test_bad_files_name_the_file(tmp_path, write_idx):
    truncated = tmp_path / "truncated.idx"
    truncated.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="truncated.idx.*declares shape \\(5,\\)"):
        read_idx(truncated)
    not_idx = tmp_path / "photo.png"
    not_idx.write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="photo.png: not an IDX file"):
        read_idx(not_idx)
    labels = write_idx(tmp_path / "labels.idx", np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels.idx: expected IDX magic number 2051, found 2049"):
        read_idx_images(labels)
    with pytest.raises(FileNotFoundError, match="absent.idx"):
        read_idx(tmp_path / "absent.idx")


def test_find_idx_files_mixes_plain_and_gz(tmp_path, mnist_like, write_mnist_files):
    write_mnist_files(tmp_path, mnist_like(5, 3), gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").rename(tmp_path / "t10k-labels-idx1-ubyte.tmp")
    assert find_idx_files(tmp_path) is None
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.tmp") as src:
        (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(src.read())
    files = find_idx_files(tmp_path)
    assert files is not None
    assert files.test_labels.name == "t10k-labels-idx1-ubyte" and files.train_images.name.endswith(".gz")


def test_locate_idx_files_error_lists_folders_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        locate_idx_files([tmp_path / "a", tmp_path / "b"], "Toy")
    message = str(err.value)
    assert str(tmp_path / "a") in message and str(tmp_path / "b") in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message


def test_idx_image_dataset(tmp_path, mnist_like, write_mnist_files):
    data = mnist_like(6, 2)
    write_mnist_files(tmp_path, data)
    files = find_idx_files(tmp_path)
    plain = IDXImageDataset(*files.split(True))
    image, label = plain[4]
    assert isinstance(image, Image.Image) and image.mode == "L" and label == 4
    np.testing.assert_array_equal(np.asarray(image), data["train"][0][4])
    scaled = IDXImageDataset(*files.split(False), transform=lambda im: torch.from_numpy(np.array(im)).float())
    assert len(scaled) == 2 and torch.equal(scaled[1][0], torch.from_numpy(data["t10k"][0][1]).float())
    with pytest.raises(ValueError, match="holds 6 images but .* holds 2 labels"):
        IDXImageDataset(files.train_images, files.test_labels)
