"""MultiTaskDataModule: seeded splits, loader structure, the unlabeled set."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from merging.datamodules import LabelledTensorDataset, MultiTaskDataModule, Task
from merging.datamodules.multitask import balanced_quotas, split_indices


def id_task(name: str, n: int, num_classes: int, offset: int, test_n: int = 0) -> Task:
    """A task whose input (1, 2, 2) holds a globally unique sample id in every entry."""
    ids = torch.arange(offset, offset + n, dtype=torch.float32)
    data = LabelledTensorDataset(ids.view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(), torch.arange(n) % num_classes)
    test = None
    if test_n:
        test_ids = torch.arange(-test_n, 0, dtype=torch.float32) - offset
        test_inputs = test_ids.view(test_n, 1, 1, 1).expand(test_n, 1, 2, 2).clone()
        test = LabelledTensorDataset(test_inputs, torch.arange(test_n) % num_classes)
    return Task(name, num_classes, data, test)


def make_module(seed: int = 0, **kwargs) -> MultiTaskDataModule:
    tasks = [id_task("a", 40, 3, 0), id_task("b", 25, 2, 1000), id_task("c", 30, 4, 2000, test_n=7)]
    return MultiTaskDataModule(tasks, val_fraction=0.1, test_fraction=0.2, batch_size=8, seed=seed, **kwargs)


def ids_of(dataset) -> list[int]:
    return [int(dataset[i][0][0, 0, 0]) for i in range(len(dataset))]


# ------------------------------------------------------------------ pure helpers
def test_split_indices_sizes_disjoint_cover():
    train, val, test = split_indices(10, 0.1, 0.2, torch.Generator().manual_seed(0))
    assert (len(train), len(val), len(test)) == (7, 1, 2)
    union = torch.cat([train, val, test])
    assert sorted(union.tolist()) == list(range(10))
    for part in (train, val, test):
        assert torch.equal(part, part.sort().values)


def test_split_indices_seeded():
    a = split_indices(50, 0.2, 0.2, torch.Generator().manual_seed(3))
    b = split_indices(50, 0.2, 0.2, torch.Generator().manual_seed(3))
    c = split_indices(50, 0.2, 0.2, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_split_indices_small_and_invalid():
    train, val, test = split_indices(3, 0.01, 0.01, torch.Generator().manual_seed(0))
    assert (len(train), len(val), len(test)) == (1, 1, 1)  # a positive fraction gives at least one sample
    with pytest.raises(ValueError, match="non-empty train"):
        split_indices(2, 0.01, 0.01, torch.Generator())
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0, 0.0, torch.Generator())


def test_balanced_quotas():
    assert balanced_quotas([10, 10, 10], 7) == [3, 2, 2]
    assert balanced_quotas([1, 10, 10], 9) == [1, 4, 4]
    assert balanced_quotas([2, 3], 5) == [2, 3]
    with pytest.raises(ValueError, match="empty unlabeled"):
        balanced_quotas([5], 0)
    with pytest.raises(ValueError, match="exceeds"):
        balanced_quotas([2, 3], 6)


def test_labelled_tensor_dataset_scales_uint8():
    data = LabelledTensorDataset(torch.tensor([[0, 255], [51, 102]], dtype=torch.uint8), torch.tensor([1, 0]))
    x, y = data[0]
    assert x.dtype == torch.float32 and torch.equal(x, torch.tensor([0.0, 1.0])) and y == 1 and isinstance(y, int)
    with pytest.raises(ValueError, match="same N"):
        LabelledTensorDataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------ splits in the module
def test_splits_disjoint_cover_and_official_test():
    dm = make_module()
    dm.setup("fit")
    for t, task in enumerate(dm.tasks):
        train, val = ids_of(dm.dataset(t, "train")), ids_of(dm.dataset(t, "val"))
        test = dm.dataset(t, "test")
        assert not set(train) & set(val)
        if task.test_data is None:
            assert not (set(train) | set(val)) & set(ids_of(test))
            assert sorted(train + val + ids_of(test)) == ids_of(task.data)
        else:
            assert test is task.test_data  # the official split, untouched
            assert sorted(train + val) == ids_of(task.data)
    # 40 samples: val round(4)=4, test round(8)=8; the official-test task gets no carved test split
    assert (len(dm.dataset("a", "train")), len(dm.dataset("a", "val")), len(dm.dataset("a", "test"))) == (28, 4, 8)
    assert (len(dm.dataset("c", "train")), len(dm.dataset("c", "val")), len(dm.dataset("c", "test"))) == (27, 3, 7)


def test_splits_deterministic_per_seed():
    def splits(seed):
        dm = make_module(seed=seed)
        dm.setup()
        return [ids_of(dm.dataset(t, s)) for t in range(3) for s in ("train", "val")]

    assert splits(5) == splits(5)
    assert splits(5) != splits(6)


def test_setup_is_idempotent():
    dm = make_module()
    dm.setup("fit")
    first = dm.dataset(0, "train")
    dm.setup("test")
    assert dm.dataset(0, "train") is first


def test_metadata():
    dm = make_module()
    assert dm.task_names == ["a", "b", "c"]
    assert dm.num_classes == [3, 2, 4]
    assert dm.input_shape == (1, 2, 2)
    assert dm.num_tasks == 3


# ------------------------------------------------------------------ loaders
def test_train_dataloader_structure():
    dm = make_module()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    assert all(isinstance(dl, DataLoader) for dl in loader.flattened)
    batches = [batch for batch, _, _ in loader]
    # max_size_cycle: as long as the longest task (28 train samples / batch 8 = 4 batches), the
    # shorter tasks cycle ("b" has 18 train samples: 3 batches)
    assert len(batches) == 4
    for batch in batches:
        assert list(batch) == ["a", "b", "c"]
        for name, classes in zip(dm.task_names, dm.num_classes):
            x, y = batch[name]
            assert x.dtype == torch.float32 and x.shape[1:] == (1, 2, 2)
            assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
            assert 0 <= int(y.min()) and int(y.max()) < classes
    seen_a = sorted(int(v) for batch in batches for v in batch["a"][0][:, 0, 0, 0])
    assert seen_a == ids_of(dm.dataset("a", "train"))


def test_train_shuffle_seeded():
    def first_batch(seed):
        dm = make_module(seed=seed)
        return next(iter(dm.train_dataloader()))[0]["a"][0][:, 0, 0, 0].tolist()

    assert first_batch(1) == first_batch(1)
    assert first_batch(1) != sorted(first_batch(1))  # shuffled


def test_val_test_one_loader_per_task():
    dm = make_module()
    for loaders, split in ((dm.val_dataloader(), "val"), (dm.test_dataloader(), "test")):
        assert isinstance(loaders, list) and len(loaders) == 3
        for t, loader in enumerate(loaders):
            assert loader.dataset is dm.dataset(t, split)
            assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)


def test_task_dataloader_by_name_and_errors():
    dm = make_module()
    loader = dm.task_dataloader("b", "val", batch_size=2)
    assert loader.dataset is dm.dataset(1, "val") and loader.batch_size == 2
    assert dm.task_dataloader(-1, "test").dataset is dm.dataset(2, "test")
    with pytest.raises(KeyError, match="no task named 'z'"):
        dm.task_dataloader("z", "train")
    with pytest.raises(IndexError):
        dm.task_dataloader(3, "train")
    with pytest.raises(ValueError, match="split must be"):
        dm.task_dataloader(0, "dev")


# ------------------------------------------------------------------ unlabeled set
def test_unlabeled_inputs_only_count_and_mix():
    dm = make_module()
    loader = dm.unlabeled_dataloader(num_samples=30, seed=0, batch_size=7)
    batches = list(loader)
    assert all(isinstance(b, torch.Tensor) and b.shape[1:] == (1, 2, 2) for b in batches)
    assert sum(b.shape[0] for b in batches) == 30
    ids = [int(v) for b in batches for v in b[:, 0, 0, 0]]
    assert len(set(ids)) == 30  # drawn without replacement
    train_ids = {t: set(ids_of(dm.dataset(t, "train"))) for t in range(3)}
    counts = [sum(i in train_ids[t] for i in ids) for t in range(3)]
    assert counts == [10, 10, 10]  # only train samples, shared equally
    assert loader.dataset.task_ids.bincount().tolist() == [10, 10, 10]
    first_ten_tasks = {int(t) for t in loader.dataset.task_ids[:10]}
    assert len(first_ten_tasks) > 1  # tasks are mixed, not concatenated


def test_unlabeled_seed_repeatable():
    def draw(seed):
        return torch.cat(list(make_module().unlabeled_dataloader(num_samples=20, seed=seed)))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_unlabeled_subset_of_tasks_and_errors():
    dm = make_module()
    loader = dm.unlabeled_dataloader(num_samples=5, tasks=["b"])
    assert loader.dataset.task_ids.tolist() == [1] * 5
    with pytest.raises(ValueError, match="empty unlabeled"):
        dm.unlabeled_dataloader(num_samples=0)
    with pytest.raises(ValueError, match="exceeds"):
        dm.unlabeled_dataloader(num_samples=10_000)


# ------------------------------------------------------------------ bad input
def test_bad_arguments():
    tasks = [id_task("a", 10, 2, 0)]
    with pytest.raises(ValueError, match="val_fraction"):
        MultiTaskDataModule(tasks, val_fraction=0.0)
    with pytest.raises(ValueError, match="test_fraction"):
        MultiTaskDataModule(tasks, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="unique"):
        MultiTaskDataModule([id_task("a", 10, 2, 0), id_task("a", 10, 2, 0)])
    with pytest.raises(TypeError, match="build_tasks"):
        MultiTaskDataModule().setup()
    with pytest.raises(ValueError, match="num_classes"):
        Task("x", 0, tasks[0].data)


def test_mismatched_input_shapes_name_the_task():
    odd = Task("odd", 2, LabelledTensorDataset(torch.zeros(10, 3), torch.zeros(10, dtype=torch.long)))
    dm = MultiTaskDataModule([id_task("a", 10, 2, 0), odd])
    with pytest.raises(ValueError, match="'odd'.*\\(3,\\)"):
        dm.setup()


def test_no_official_test_needs_test_fraction():
    dm = MultiTaskDataModule([id_task("a", 10, 2, 0)], test_fraction=0.0)
    with pytest.raises(ValueError, match="'a' has no official test split"):
        dm.setup()


def test_subclass_declaration_must_match_built_tasks():
    class Declared(MultiTaskDataModule):
        @property
        def task_names(self) -> list[str]:
            return ["a", "b"]

        @property
        def num_classes(self) -> list[int]:
            return [3, 3]

        @property
        def input_shape(self) -> tuple[int, ...]:
            return (1, 2, 2)

        def build_tasks(self) -> list[Task]:
            return [id_task("a", 10, 3, 0), id_task("b", 10, 2, 100)]

    with pytest.raises(ValueError, match="classes \\[3, 2\\], but it declares \\['a', 'b'\\] with classes \\[3, 3\\]"):
        Declared().setup()
