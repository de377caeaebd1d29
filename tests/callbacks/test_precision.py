"""The callbacks under mixed precision (bf16-mixed, and 16-mixed with a gradient scaler),
and on the GPU: they run, their statistics are fp32/fp64, and the weights stay bit-identical
to a fit without them (the same torch, the same process: equal bits are the claim).

16-mixed is tested on the CPU through Lightning's ``MixedPrecision`` plugin with a CPU
``GradScaler`` (``Trainer(precision="16-mixed")`` on a CPU falls back to bf16)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from merging.callbacks import ExpertDriftStopper, MLossMonitor, StabilityMonitor
from merging.modules.protocols import HasExperts


def _loader(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 8, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False)


class _Single(LightningModule):
    """A plain model: Linear-ReLU-Linear with BatchNorm (a floating buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


class _Experts(LightningModule, HasExperts):
    """Three experts from one frozen base, each in its own param group (the third drifts)."""

    def __init__(self) -> None:
        super().__init__()
        self.skeleton = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).requires_grad_(False)
        self.experts = nn.ModuleList(copy.deepcopy(self.skeleton).requires_grad_(True) for _ in range(3))

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
        return torch.optim.SGD(
            [{"params": e.parameters(), "lr": lr} for e, lr in zip(self.experts, (0.05, 0.05, 1.0), strict=True)]
        )


class _ResNet(LightningModule):
    """A plain timm ResNet-18 on small random images (the issue's GPU case)."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model("resnet18", pretrained=False, num_classes=3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def loader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 3, 32, 32, generator=g)
        return DataLoader(TensorDataset(x, torch.randint(0, 3, (16,), generator=g)), batch_size=4)


def _precision(name: str) -> dict:
    if name == "16-mixed":
        return {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": name}


def _fit(tmp_path, make, callbacks, precision: str, accelerator: str = "cpu", **kwargs) -> LightningModule:
    seed_everything(0)
    module = make()
    kwargs.setdefault("max_epochs", 2)
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **(_precision(precision) if accelerator == "cpu" else {"precision": precision}),
        **kwargs,
    )
    trainer.fit(module, module.loader() if hasattr(module, "loader") else _loader())
    return module


def _assert_same_weights(a: LightningModule, b: LightningModule) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _observers() -> list:
    return [
        MLossMonitor(every_n_train_steps=2, num_batches=2, heatmap_filename=None),
        StabilityMonitor(every_n_steps=2, report=False),
    ]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("make", [_Single, _Experts], ids=["single-model", "multi-expert"])
def test_observers_leave_mixed_precision_weights_bit_identical(tmp_path, precision, make):
    plain = _fit(tmp_path / "plain", make, [], precision)
    mloss, stability = _observers()
    watched = _fit(tmp_path / "watched", make, [mloss, stability], precision)
    _assert_same_weights(plain, watched)
    assert stability.multi_expert == (make is _Experts)
    # Statistics are fp32/fp64 and finite, whatever the autocast dtype.
    report = mloss.last_report
    assert report is not None and all(math.isfinite(v) for v in report.layer.values())
    assert all(v.dtype in (torch.float32, torch.float64) for v in report.node.values())
    for trajectory in stability.trajectories:
        assert trajectory.steps > 0 and math.isfinite(trajectory.path_length) and trajectory.path_length > 0
        assert math.isfinite(trajectory.mean_grad_norm) and trajectory.mean_grad_norm > 0
    assert stability.train_loss is not None and math.isfinite(stability.train_loss)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_drift_stopper_under_mixed_precision(tmp_path, precision):
    # Never triggered: the fit is the plain one, bit for bit.
    _assert_same_weights(
        _fit(tmp_path / "plain", _Experts, [], precision),
        _fit(tmp_path / "idle", _Experts, [ExpertDriftStopper(factor=1e6)], precision),
    )
    # Triggered: the drifting expert keeps the weights it had when it was stopped.
    stopper = ExpertDriftStopper(factor=1.5, min_steps=1)
    module = _fit(tmp_path / "stopped", _Experts, [stopper], precision)
    assert list(stopper.stopped) == [2]
    until = _fit(tmp_path / "until", _Experts, [], precision, max_steps=stopper.stopped[2])
    for key, value in module.expert_state_dicts()[2].items():
        assert torch.equal(value, until.expert_state_dicts()[2][key]), key


def test_steps_a_gradient_scaler_skips_are_not_recorded(tmp_path):
    # A huge initial loss scale overflows the fp16 gradients: the scaler skips those steps
    # (and halves the scale each time) until the scale fits.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=10**6)
    plugin = MixedPrecision("16-mixed", device="cpu", scaler=scaler)
    monitor = StabilityMonitor(every_n_steps=1, report=False)
    seed_everything(0)
    module = _Single()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[plugin],
        callbacks=[monitor],
    )
    trainer.fit(module, _loader())
    skipped = round(math.log2(2.0**22 / scaler.get_scale()))
    stats = monitor.trajectories[0]
    assert 0 < skipped < trainer.global_step
    assert stats.steps == stats.grad_steps == trainer.global_step - skipped
    assert math.isfinite(stats.grad_norm_sum) and stats.lr_integral == pytest.approx(0.5 * stats.steps)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("make", [_Single, _Experts, _ResNet], ids=["single-model", "multi-expert", "timm-resnet18"])
def test_callbacks_on_the_gpu(tmp_path, precision, make):
    # Deterministic kernels where CUDA has them (warn where it has not, e.g. adaptive pooling).
    gpu = {"accelerator": "gpu", "deterministic": "warn"}
    plain = _fit(tmp_path / "plain", make, [], precision, **gpu)
    mloss = MLossMonitor(every_n_train_steps=2, num_batches=2, heatmap_filename=None)
    stability = StabilityMonitor(every_n_steps=2)  # TIES and DARE sparsifiers, report written
    callbacks = [mloss, stability] + ([ExpertDriftStopper(factor=1e6)] if make is _Experts else [])
    watched = _fit(tmp_path / "watched", make, callbacks, precision, **gpu)
    assert watched.trainer.strategy.root_device.type == "cuda"  # the module is back on the CPU after fit
    again = _fit(tmp_path / "again", make, [], precision, **gpu)
    if all(torch.equal(v, again.state_dict()[k]) for k, v in plain.state_dict().items()):
        _assert_same_weights(plain, watched)  # the plain fit repeats bit for bit: so must the watched one
    else:  # this GPU's kernels do not repeat a fit bit for bit; the callbacks still must not steer it
        for key, value in plain.state_dict().items():
            torch.testing.assert_close(watched.state_dict()[key], value, rtol=1e-3, atol=1e-4, msg=key)
    assert stability.multi_expert == (make is _Experts)
    # State kept on the module's device: the previous weights, a single model's θ₀, the inputs.
    assert all(v.device.type == "cuda" for m in stability._previous for v in m.values())
    if make is not _Experts:
        assert all(v.device.type == "cuda" for v in stability._reference.values())
    assert all(a.device.type == "cuda" for args in mloss._inputs for a in args if isinstance(a, torch.Tensor))
    assert all(math.isfinite(v) for v in mloss.last_report.layer.values())
    assert stability.history and all(math.isfinite(t) for t in stability.history[-1]["tau_norm"])
    assert (tmp_path / "watched" / "stability_report.md").is_file()
