"""A resumed fit equals an uninterrupted one, with both monitors and shuffled multi-task data.

Fit N epochs in one go, and N/2 epochs then a resume from ``last.ckpt`` to N: the weights,
every value logged under ``mloss/`` and ``stability/``, both monitors' histories and their
files are bit-identical on the CPU, for :class:`DigitsTasks` and :class:`FashionMNISTTasks`
(a small fake IDX set), in one process and on two gloo ranks. The only difference allowed is
the N/2 fit's own end-of-fit M-Loss measurement, which that fit logs and the uninterrupted one
does not take (the checkpoint leaves it out, so the histories still agree).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from merging.callbacks import MLossMonitor, StabilityMonitor
from merging.datamodules import DigitsTasks, FashionMNISTTasks
from merging.modules.experts import MultiExpertModule

FILES = ("mloss_node_map.png", "stability_report.md", "stability_report.png")


class _Recorder(Logger):
    """Keeps every logged ``mloss/`` and ``stability/`` value, keyed by (step, name)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[tuple[int, str], float] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            if key.startswith(("mloss/", "stability/")):
                self.values[(step, key)] = float(value)

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


class _Dump(Callback):
    """At the end of the fit every rank saves what the test compares (the fit may run in
    forked processes): weights, the monitors' histories and statistics, the logged values."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        mloss = next(c for c in trainer.callbacks if isinstance(c, MLossMonitor))
        stability = next(c for c in trainer.callbacks if isinstance(c, StabilityMonitor))
        logger = trainer.logger
        torch.save(
            {
                "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "mloss_history": mloss.history,
                "stability_history": stability.history,
                "trajectories": [s.state_dict() for s in stability.trajectories],
                "train_loss": stability.train_loss,
                "logged": dict(logger.values) if isinstance(logger, _Recorder) else None,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_root(tmp_path) -> Path:
    """A tiny Fashion-MNIST in IDX files: 200 train and 40 test 28x28 images, labels cycling 0..9."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fashion"
    root.mkdir()
    for split, n in (("train", 200), ("t10k", 40)):
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def _fit(root: Path, data, max_epochs: int, ckpt: Path | None = None, **trainer_kwargs) -> list[dict]:
    """One fit of ``MultiExpertModule`` with both monitors; returns every rank's dump."""
    root.mkdir(parents=True, exist_ok=True)
    seed_everything(0, verbose=False)
    module = MultiExpertModule(backbone_kwargs={"width": 4, "num_features": 16})
    callbacks = [
        MLossMonitor(every_n_train_steps=5, num_batches=2),
        StabilityMonitor(every_n_steps=5),
        ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0),
        _Dump(root),
    ]
    trainer = Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=_Recorder(),
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, data(), ckpt_path=ckpt)
    return [torch.load(path, weights_only=False) for path in sorted(root.glob("rank*.pt"))]


def _as_logged(value: float) -> float:
    """A float as ``pl_module.log`` stores it (a float32 tensor)."""
    return float(torch.tensor(value, dtype=torch.float32))


def _check_resume_equals_uninterrupted(tmp_path: Path, data, epochs: int, **trainer_kwargs) -> None:
    full = _fit(tmp_path / "full", data, epochs, **trainer_kwargs)
    half = _fit(tmp_path / "half", data, epochs // 2, **trainer_kwargs)
    resumed = _fit(tmp_path / "resumed", data, epochs, ckpt=tmp_path / "half" / "ckpt" / "last.ckpt", **trainer_kwargs)

    assert len(full) == len(resumed) == trainer_kwargs.get("devices", 1)
    for rank, (a, b) in enumerate(zip(full, resumed)):
        different = [k for k in a["weights"] if not torch.equal(a["weights"][k], b["weights"][k])]
        assert not different, f"rank {rank}: weights {different} differ"
        assert a["mloss_history"] == b["mloss_history"], f"rank {rank}"
        assert a["stability_history"] == b["stability_history"], f"rank {rank}"
        assert a["trajectories"] == b["trajectories"] and a["train_loss"] == b["train_loss"], f"rank {rank}"
    # Every rank holds the same weights and histories (bit for bit).
    for other in full[1:]:
        assert all(torch.equal(v, other["weights"][k]) for k, v in full[0]["weights"].items())
        assert other["mloss_history"] == full[0]["mloss_history"]
        assert other["stability_history"] == full[0]["stability_history"]

    # The N/2 fit ended off the M-Loss schedule, so it measured and logged its last step; the
    # uninterrupted fit does not measure there. Every other logged value is the same.
    logged_half, logged_full = half[0]["logged"], full[0]["logged"]
    half_end = max(step for step, _ in logged_half)
    end_of_fit = {k: v for k, v in logged_half.items() if k[0] == half_end and k[1].startswith("mloss/")}
    last = half[0]["mloss_history"][-1]
    assert end_of_fit and all(v == _as_logged(last[key]) for (_, key), v in end_of_fit.items())
    compared = {k: v for k, v in logged_full.items() if k not in end_of_fit}
    logged_resumed = {**{k: v for k, v in logged_half.items() if k not in end_of_fit}, **resumed[0]["logged"]}
    assert {key.split("/")[0] for _, key in compared} == {"mloss", "stability"}
    assert set(logged_resumed) == set(compared)
    different = sorted(k for k, v in compared.items() if logged_resumed[k] != v)
    assert not different, f"{len(different)} of {len(compared)} logged values differ: {different[:5]}"

    for name in FILES:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_digits_resume_equals_uninterrupted_fit(tmp_path):
    _check_resume_equals_uninterrupted(tmp_path, lambda: DigitsTasks(batch_size=32, seed=0), epochs=4)


def test_fashion_mnist_resume_equals_uninterrupted_fit(tmp_path, fashion_root):
    data = lambda: FashionMNISTTasks(root=str(fashion_root), batch_size=8, seed=0)  # noqa: E731
    _check_resume_equals_uninterrupted(tmp_path, data, epochs=4, limit_val_batches=0)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["digits", "fashion_mnist"])
def test_ddp_resume_equals_uninterrupted_fit(tmp_path, fashion_root, dataset):
    """Two gloo ranks: Lightning's DistributedSampler shuffles each task; every rank restores its
    own cached M-Loss inputs from rank zero's checkpoint."""
    if dataset == "digits":
        data = lambda: DigitsTasks(batch_size=32, seed=0)  # noqa: E731
    else:
        data = lambda: FashionMNISTTasks(root=str(fashion_root), batch_size=8, seed=0)  # noqa: E731
    _check_resume_equals_uninterrupted(
        tmp_path, data, epochs=2, devices=2, strategy="ddp_fork", limit_val_batches=0, num_sanity_val_steps=0
    )


# ------------------------------------------------------------ the pieces, on a tiny model
class _Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)), 4)


def _trainer(root, callbacks, **kwargs) -> Trainer:
    return Trainer(
        default_root_dir=root, accelerator="cpu", logger=False, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )


def test_the_last_step_is_logged_and_left_out_of_the_checkpoint(tmp_path):
    monitor = MLossMonitor(every_n_train_steps=2, num_batches=2, heatmap_filename=None)
    trainer = _trainer(tmp_path, [monitor], max_steps=5, enable_checkpointing=False)
    trainer.fit(_Net(), _loader())
    assert [h["step"] for h in monitor.history] == [2.0, 4.0, 5.0]
    for key in ("mloss/mean", "mloss/layer/net.0", "mloss/layer/output"):
        assert float(trainer.callback_metrics[key]) == _as_logged(monitor.history[-1][key]), key
    state = monitor.state_dict()
    assert [h["step"] for h in state["history"]] == [2.0, 4.0] and state["last_measured_step"] == 4
    # the cached inputs travel with the checkpoint: one list per rank, on the CPU
    (inputs,) = state["inputs"]
    assert len(inputs) == 2 and all(args[0].device.type == "cpu" and args[0].shape == (4, 8) for args in inputs)


def test_a_resume_on_another_world_size_refills_the_cache_with_a_warning(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    _trainer(tmp_path, [MLossMonitor(every_n_train_steps=2, heatmap_filename=None), ckpt], max_epochs=1).fit(
        _Net(), _loader()
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("MLossMonitor")]
    checkpoint["callbacks"][key]["inputs"] *= 2  # as if two ranks had cached
    torch.save(checkpoint, path)
    monitor = MLossMonitor(every_n_train_steps=2, heatmap_filename=None)
    with pytest.warns(UserWarning, match="taken by 2 processes and this fit runs 1"):
        _trainer(tmp_path, [monitor], max_epochs=2).fit(_Net(), _loader(), ckpt_path=path)
    assert monitor.history[-1]["step"] == 16.0
