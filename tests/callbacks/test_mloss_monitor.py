"""MLossMonitor in real (tiny) fits: what it logs, that it observes only, resume, DDP, and
its forward cache (the logged values do not depend on it; it saves the forwards of the
models that stay fixed during the fit)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos import Transformer
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from merging._opcount import OpCounter
from merging.callbacks import MLossMonitor
from merging.callbacks.mloss_monitor import DEFAULT_EVERY_N_TRAIN_STEPS
from merging.io import save_state_dict
from merging.mloss import OUTPUT, m_loss
from merging.modules.protocols import HasExperts
from merging.state import StateDictError


class _Net(LightningModule):
    """Linear -> ReLU -> Dropout -> Linear on (x, y) batches."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.drop(self.act(self.fc(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _GeluNet(LightningModule):
    """Linear -> GELU -> Linear on (x, y) batches (no dropout: forwards are deterministic)."""

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


class _JointExperts(LightningModule, HasExperts):
    """``num_experts`` experts fine-tuned jointly from one frozen base (a
    HasExperts); ``skeleton_forwards`` counts the forwards run on the base skeleton."""

    def __init__(self, num_experts: int = 2) -> None:
        super().__init__()
        self.skeleton = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.skeleton.requires_grad_(False)
        self.experts = nn.ModuleList(copy.deepcopy(self.skeleton).requires_grad_(True) for _ in range(num_experts))
        self.skeleton_forwards = 0
        self.skeleton.register_forward_pre_hook(
            lambda *args: setattr(self, "skeleton_forwards", self.skeleton_forwards + 1)
        )

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


class _TinyTransformer(LightningModule):
    """lightning.pytorch.demos.Transformer (forward(inputs, target)) at toy size, no download."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Transformer(vocab_size=16, ninp=8, nhead=2, nhid=16, nlayers=1)

    def forward(self, inputs, target):
        return self.model(inputs, target)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.nll_loss(self(inputs, target), target.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loader(n: int = 32, batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def _trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return Trainer(callbacks=callbacks, **defaults)


def _first_inputs(loader: DataLoader, batches: int) -> list[torch.Tensor]:
    return [b[0] for _, b in zip(range(batches), loader)]


def test_plain_module_logs_mloss_of_current_weights_against_the_start(tmp_path):
    seed_everything(0)
    model = _Net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loader = _loader()
    monitor = MLossMonitor(every_n_train_steps=3, num_batches=2)
    _trainer(tmp_path, [monitor], max_steps=6).fit(model, loader)

    want = m_loss(model, [start, model.state_dict()], _first_inputs(loader, 2), base=start)
    logged = monitor.history[-1]
    assert [h["step"] for h in monitor.history] == [3.0, 6.0]
    assert logged["mloss/layer/fc"] == pytest.approx(want.layer["fc"], rel=1e-5)
    assert logged["mloss/normalized/fc"] == pytest.approx(want.layer_normalized["fc"], rel=1e-5)
    assert logged["mloss/layer/output"] == pytest.approx(want.layer[OUTPUT], rel=1e-5)
    assert logged["mloss/mean"] == pytest.approx(want.mean, rel=1e-5)
    assert want.layer["fc"] > 0
    torch.testing.assert_close(monitor.last_report.node["fc"], want.node["fc"], rtol=1e-5, atol=1e-12)
    assert (tmp_path / "mloss_node_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_logged_values_reach_callback_metrics(tmp_path):
    seed_everything(0)
    monitor = MLossMonitor(every_n_train_steps=2)
    trainer = _trainer(tmp_path, [monitor], max_steps=4)
    trainer.fit(_Net(), _loader())
    assert {"mloss/layer/fc", "mloss/normalized/fc", "mloss/layer/output", "mloss/mean"} <= set(
        trainer.callback_metrics
    )
    assert float(trainer.callback_metrics["mloss/mean"]) == pytest.approx(monitor.history[-1]["mloss/mean"])


def test_training_is_identical_with_and_without_the_monitor(tmp_path):
    def fit(callbacks):
        seed_everything(7)
        model = _Net()
        _trainer(tmp_path, callbacks, max_steps=10).fit(model, _loader(shuffle=True))
        return model.state_dict()

    with_monitor = fit([MLossMonitor(every_n_train_steps=2, num_batches=3)])
    without = fit([])
    for key, value in without.items():
        assert torch.equal(with_monitor[key], value), key


def test_boring_model_gets_an_output_value(tmp_path):
    seed_everything(0)
    monitor = MLossMonitor(every_n_train_steps=2)
    _trainer(tmp_path, [monitor], max_steps=4).fit(BoringModel(), DataLoader(RandomDataset(32, 16), batch_size=4))
    last = monitor.history[-1]
    assert set(last) == {"step", "epoch", "mloss/layer/output", "mloss/normalized/output", "mloss/mean"}
    # BoringModel is one Linear layer: the output is linear in θ, so merging = ensembling
    assert 0 <= last["mloss/layer/output"] < 1e-5


def test_multi_expert_module_measures_its_experts(tmp_path):
    seed_everything(0)
    module = _JointExperts()
    assert isinstance(module, HasExperts)
    loader = _loader()
    monitor = MLossMonitor(every_n_train_steps=4, num_batches=2)
    _trainer(tmp_path, [monitor], max_steps=4).fit(module, loader)
    want = m_loss(module.skeleton, module.expert_state_dicts(), _first_inputs(loader, 2), base=module.base_state_dict())
    logged = monitor.history[-1]
    assert logged["mloss/layer/0"] == pytest.approx(want.layer["0"], rel=1e-5)
    assert logged["mloss/layer/output"] == pytest.approx(want.layer[OUTPUT], rel=1e-5)
    assert want.layer["0"] > 0


def test_lightning_demo_transformer_with_a_one_line_input_fn(tmp_path):
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (8, 7), generator=g)
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)
    monitor = MLossMonitor(every_n_train_steps=2, num_batches=1, input_fn=lambda batch: (batch[0], batch[1]))
    _trainer(tmp_path, [monitor], max_steps=2).fit(_TinyTransformer(), loader)
    last = monitor.history[-1]
    assert last["mloss/layer/output"] > 0
    assert last["mloss/mean"] == last["mloss/layer/output"]  # functional activations: output only


def test_every_n_epochs_schedule(tmp_path):
    seed_everything(0)
    monitor = MLossMonitor(every_n_epochs=2, num_batches=20)
    _trainer(tmp_path, [monitor], max_epochs=4).fit(_Net(), _loader(n=12))
    assert [(h["step"], h["epoch"]) for h in monitor.history] == [(6.0, 1.0), (12.0, 3.0)]


def test_final_measurement_and_no_heatmap(tmp_path):
    seed_everything(0)
    monitor = MLossMonitor(every_n_train_steps=100, heatmap_filename=None)
    _trainer(tmp_path, [monitor], max_steps=3).fit(_Net(), _loader())
    assert [h["step"] for h in monitor.history] == [3.0]  # measured once, at the end
    assert not list(tmp_path.glob("*.png"))


def test_peers_are_measured_with_the_current_weights(tmp_path):
    seed_everything(0)
    model = _Net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    peer = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    path = save_state_dict(peer, tmp_path / "peer.safetensors")
    loader = _loader()
    monitor = MLossMonitor(every_n_train_steps=4, num_batches=2, peers=[str(path)])
    _trainer(tmp_path, [monitor], max_steps=4).fit(model, loader)
    want = m_loss(model, [model.state_dict(), peer], _first_inputs(loader, 2), base=start)
    assert monitor.history[-1]["mloss/layer/fc"] == pytest.approx(want.layer["fc"], rel=1e-5)

    bad = save_state_dict({"other.weight": torch.zeros(2)}, tmp_path / "bad.safetensors")
    with pytest.raises(StateDictError, match="bad.safetensors"):
        _trainer(tmp_path, [MLossMonitor(peers=[str(bad)])], max_steps=1).fit(_Net(), _loader())


def test_resume_keeps_the_start_snapshot_and_history(tmp_path):
    seed_everything(0)
    model = _Net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first = MLossMonitor(every_n_train_steps=2)
    _trainer(tmp_path, [first, ckpt], max_steps=4, enable_checkpointing=True).fit(model, _loader())
    path = next((tmp_path / "ckpt").glob("*step=4*.ckpt"))

    resumed = MLossMonitor(every_n_train_steps=2)
    model2 = _Net()  # different random init: the snapshot must come from the checkpoint
    _trainer(tmp_path, [resumed], max_steps=8).fit(model2, _loader(), ckpt_path=path)
    assert [h["step"] for h in resumed.history] == [2.0, 4.0, 6.0, 8.0]
    assert resumed.history[:2] == first.history
    state = resumed.state_dict()
    for key, value in start.items():
        assert torch.equal(state["snapshot"][key], value), key


def test_state_dict_round_trip():
    monitor = MLossMonitor()
    state = {
        "snapshot": {"w": torch.ones(2)},
        "history": [{"step": 2.0}],
        "last_measured_step": 2,
        "last_measured_epoch": 0,
    }
    monitor.load_state_dict(state)
    out = monitor.state_dict()
    assert torch.equal(out["snapshot"]["w"], torch.ones(2))
    assert out["history"] == [{"step": 2.0}] and out["last_measured_step"] == 2
    assert MLossMonitor(every_n_epochs=1).state_key != MLossMonitor(every_n_train_steps=1).state_key


def test_settings_are_checked():
    assert MLossMonitor().every_n_train_steps == DEFAULT_EVERY_N_TRAIN_STEPS
    with pytest.raises(ValueError, match="not both"):
        MLossMonitor(every_n_train_steps=2, every_n_epochs=1)
    with pytest.raises(ValueError, match="num_batches"):
        MLossMonitor(num_batches=0)
    with pytest.raises(ValueError, match="reference"):
        MLossMonitor(reference="ensemble")


def test_dict_batches_need_an_input_fn(tmp_path):
    class DictNet(_Net):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["x"]), batch["y"])

    class DictData(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"x": torch.full((8,), float(i)), "y": torch.tensor(i % 3)}

    with pytest.raises(TypeError, match="input_fn"):
        _trainer(tmp_path, [MLossMonitor()], max_steps=1).fit(DictNet(), DataLoader(DictData(), batch_size=4))
    monitor = MLossMonitor(every_n_train_steps=1, input_fn=lambda batch: batch["x"])
    _trainer(tmp_path, [monitor], max_steps=1).fit(DictNet(), DataLoader(DictData(), batch_size=4))
    assert "mloss/layer/fc" in monitor.history[-1]


@pytest.mark.slow
def test_ddp_two_processes_log_the_mloss_of_both_shards(tmp_path):
    seed_everything(0)
    model = _Net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loader = _loader(n=32, batch_size=4)
    monitor = MLossMonitor(every_n_train_steps=3, num_batches=2)
    trainer = _trainer(tmp_path, [monitor], max_steps=3, devices=2, strategy="ddp_fork")
    trainer.fit(model, loader)
    # Lightning gives each rank a shuffling DistributedSampler (seed 0); each rank caches its
    # first two batches of 4, and the logged value pools both ranks' 8 samples.
    shards = [list(DistributedSampler(loader.dataset, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    inputs = [loader.dataset.tensors[0][shards[0][:8] + shards[1][:8]]]
    want = m_loss(model, [start, model.state_dict()], inputs, base=start)
    assert float(trainer.callback_metrics["mloss/layer/fc"]) == pytest.approx(want.layer["fc"], rel=1e-5)
    assert float(trainer.callback_metrics["mloss/layer/output"]) == pytest.approx(want.layer[OUTPUT], rel=1e-5)
    assert (tmp_path / "mloss_node_map.png").exists()


@pytest.mark.slow
def test_with_the_projects_multi_expert_module_and_digits(tmp_path):
    from merging.datamodules import DigitsTasks
    from merging.modules.experts import MultiExpertModule

    seed_everything(0)
    module = MultiExpertModule(backbone="small_cnn", backbone_kwargs={"width": 4, "depth": 2, "num_features": 16})
    monitor = MLossMonitor(every_n_train_steps=3, num_batches=1)
    _trainer(tmp_path, [monitor], max_steps=3, limit_val_batches=0).fit(module, DigitsTasks(batch_size=8))
    last = monitor.history[-1]
    for layer in ("features.0", "features.3", "fc", "output"):
        assert last[f"mloss/layer/{layer}"] > 0, layer
    assert (tmp_path / "mloss_node_map.png").exists()


# ---------------------------------------------------------------- the forward cache
def _fit(tmp_path, make, cache: bool, **kwargs) -> tuple[MLossMonitor, LightningModule]:
    seed_everything(0)
    module = make()
    monitor = MLossMonitor(every_n_train_steps=2, num_batches=2, cache_forwards=cache, heatmap_filename=None, **kwargs)
    _trainer(tmp_path, [monitor], max_steps=6).fit(module, _loader())
    return monitor, module


@pytest.mark.parametrize("make", [_GeluNet, partial(_JointExperts, 3)], ids=["single-model", "multi-expert"])
def test_logged_values_are_the_same_with_and_without_the_cache(tmp_path, make):
    cached, _ = _fit(tmp_path, make, True)
    plain, _ = _fit(tmp_path, make, False)
    assert len(cached.history) == 3
    assert cached.history == plain.history


def test_peers_with_the_cache(tmp_path):
    g = torch.Generator().manual_seed(3)
    peer = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in _GeluNet().state_dict().items()}
    path = str(save_state_dict(peer, tmp_path / "peer.safetensors"))
    cached, _ = _fit(tmp_path, _GeluNet, True, peers=[path])
    plain, _ = _fit(tmp_path, _GeluNet, False, peers=[path])
    assert cached.history == plain.history


def test_the_frozen_base_is_evaluated_once_per_cached_batch(tmp_path):
    # Every forward of the measurement runs on the skeleton (functional_call), so its
    # pre-hook counts them all: measurements at steps 2, 4 and 6, on 2 cached batches.
    _, cached = _fit(tmp_path, partial(_JointExperts, 3), True)
    _, plain = _fit(tmp_path, partial(_JointExperts, 3), False)
    per_measurement = 3 + 1  # the K experts' outputs and the average's
    assert plain.skeleton_forwards == 3 * 2 * (per_measurement + 1) + 1  # + trace
    assert cached.skeleton_forwards == 3 * 2 * per_measurement + 2 + 1


# ------------------------------------------------------------- host syncs and kernels
class _Deep(LightningModule):
    """``depth`` × (Linear -> σ), then a Linear head, on (x, y) batches of 8 features."""

    def __init__(self, depth: int, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(8, 8), act()]
        self.net = nn.Sequential(*layers, nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _CountingMonitor(MLossMonitor):
    """Counts what its batch hooks dispatch: ``counts[(step, measured)]`` per hook call."""

    def __init__(self, **kwargs) -> None:
        super().__init__(heatmap_filename=None, **kwargs)
        self.counts: list[tuple[int, bool, OpCounter]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with OpCounter() as count:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.counts.append((trainer.global_step + 1, False, count))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        measured = len(self._history)
        with OpCounter() as count:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.counts.append((trainer.global_step, len(self._history) > measured, count))


def test_a_measurement_reads_the_device_once_whatever_the_number_of_layers(tmp_path):
    for depth in (2, 8):
        seed_everything(0)
        monitor = _CountingMonitor(every_n_train_steps=3, num_batches=2)
        _trainer(tmp_path, [monitor], max_steps=9).fit(_Deep(depth), _loader())
        measurements = [count for _, measured, count in monitor.counts if measured]
        assert len(measurements) == 3
        for count in measurements:  # the metric's one read (was 4 per layer, plus per-key reads of α)
            assert count.sync_total == 1 and count.syncs["Tensor.tolist"] == 1, count.summary()
        assert len(monitor.history[-1]) == 2 + 2 * (depth + 1) + 1


def test_steps_that_do_not_measure_dispatch_nothing(tmp_path):
    seed_everything(0)
    monitor = _CountingMonitor(every_n_train_steps=4, num_batches=2)
    _trainer(tmp_path, [monitor], max_steps=12).fit(_Deep(3, nn.GELU), _loader())
    quiet = [count for step, measured, count in monitor.counts if not measured and step > 2]
    assert len(quiet) == 2 * (12 - 2) - 3  # both hooks of steps 3..12 but the 3 measuring ends
    assert all(count.total == 0 for count in quiet)  # not an operator, so neither a kernel nor a sync


class _LogSpy(_Net):
    """Records the values the monitor logs: (name, value, on_epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[str, object, bool]] = []

    def log(self, name, value, *args, **kwargs):
        if name.startswith("mloss/"):
            self.logged.append((name, value, kwargs["on_epoch"]))
        super().log(name, value, *args, **kwargs)


def test_values_are_logged_as_host_tensors_after_a_step_and_on_the_device_at_an_epoch_end(tmp_path):
    # A Python float would be copied to the module's device by Lightning (a sync on a GPU)
    # and read back by the loggers at every logging step: after a step the monitor logs CPU
    # tensors; at an epoch end (reduced across ranks) tensors on the module's device.
    seed_everything(0)
    module = _LogSpy()
    monitor = MLossMonitor(every_n_train_steps=3, heatmap_filename=None)
    trainer = _trainer(tmp_path, [monitor], max_epochs=1)  # 8 steps: measured at 3, 6 and the epoch end
    trainer.fit(module, _loader())
    after_steps = [(n, v) for n, v, on_epoch in module.logged if not on_epoch]
    at_epoch_end = [(n, v) for n, v, on_epoch in module.logged if on_epoch]
    assert len(after_steps) == 2 * 5 and len(at_epoch_end) == 5
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for _, v in after_steps)
    assert all(isinstance(v, torch.Tensor) and v.device == module.device for _, v in at_epoch_end)
    last = monitor.history[-1]
    assert {n: float(v) for n, v in at_epoch_end} == pytest.approx({n: last[n] for n, _ in at_epoch_end}, rel=1e-6)
    assert float(trainer.callback_metrics["mloss/mean"]) == pytest.approx(last["mloss/mean"], rel=1e-6)


class _SyncCheckingMonitor(MLossMonitor):
    """On a GPU: raises on any host-device sync in the hooks of a step that does not measure
    (``torch.cuda.set_sync_debug_mode("error")``) and counts those of each measurement."""

    def __init__(self, **kwargs) -> None:
        super().__init__(heatmap_filename=None, **kwargs)
        self.measurement_syncs: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with _sync_debug("error" if self._cache_closed else "default"):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not (self._cache_closed and self.should_measure(step_idx=step - 1)):
            with _sync_debug("error" if self._cache_closed else "default"):
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        with warnings.catch_warnings(record=True) as caught, _sync_debug("warn"):
            warnings.simplefilter("always")
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.measurement_syncs.append(sum("synchroniz" in str(w.message) for w in caught))


@contextlib.contextmanager
def _sync_debug(mode: str):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.cuda
@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU])
def test_gpu_fit_syncs_only_to_read_each_measurement(tmp_path, act):
    seed_everything(0)
    monitor = _SyncCheckingMonitor(every_n_train_steps=3, num_batches=2)
    trainer = _trainer(tmp_path, [monitor], max_steps=9, accelerator="gpu", devices=1)
    trainer.fit(_Deep(4, act), _loader())
    assert len(monitor.measurement_syncs) == 3
    # The first measurement also moves the metric and α to the GPU; later ones read it once.
    assert monitor.measurement_syncs[1:] == [1, 1], monitor.measurement_syncs
