"""StabilityMonitor: each logged quantity against its definition, observe-only, resume, report, DDP."""

from __future__ import annotations

import copy
import csv
import math
import re

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.transformer import Transformer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from merging.callbacks import ExpertDriftStopper, StabilityMonitor
from merging.modules.protocols import HasExperts
from merging.stability import task_vector_stats
from merging.stability_stats import drift_ratios


def make_trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return Trainer(callbacks=callbacks, **defaults)


def fixed_loader(n=8, batch_size=2, seed=0, dim=32, out=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randn(n, out or 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class ScheduledModel(BoringModel):
    """BoringModel on fixed data, SGD with a per-step exponential lr schedule."""

    def __init__(self, lr=0.1, gamma=0.9, momentum=0.0, n=8, batch_size=2):
        super().__init__()
        self.lr, self.gamma, self.momentum, self.n, self.batch_size = lr, gamma, momentum, n, batch_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return fixed_loader(self.n, self.batch_size)


def params_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def distance(a, b):
    return math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a))


# ----------------------------------------------------------------- single model


def test_lr_integral_is_the_sum_of_the_scheduled_learning_rates(tmp_path):
    seed_everything(0)
    model = ScheduledModel(lr=0.1, gamma=0.9)
    start = params_of(model)
    monitor = StabilityMonitor(every_n_steps=2, sparsifiers=("ties",), report=False)
    make_trainer(tmp_path, [monitor], max_epochs=2).fit(model)
    stats = monitor.trajectories[0]
    steps = 8  # 8 samples, batch 2, two epochs
    lrs = [0.1 * 0.9**t for t in range(steps)]
    assert stats.steps == steps
    assert stats.lr_integral == pytest.approx(sum(lrs))
    assert stats.lr_integral_per_sample == pytest.approx(sum(lr / 2 for lr in lrs))
    assert stats.last_lr == pytest.approx(lrs[-1])
    metrics = model.trainer.callback_metrics
    assert float(metrics["stability/lr_integral"]) == pytest.approx(sum(lrs), rel=1e-6)
    # τ relative to the weights at fit start; the path bounds it
    tau = distance(params_of(model), start)
    assert float(metrics["stability/tau_norm"]) == pytest.approx(tau, rel=1e-5)
    assert stats.path_length >= tau - 1e-6
    assert float(metrics["stability/tau_norm/layer/layer"]) == pytest.approx(tau, rel=1e-5)
    assert 0 < float(metrics["stability/ties/tau_norm"]) < tau


def test_plain_sgd_update_norm_is_lr_times_grad_norm(tmp_path):
    model = ScheduledModel(lr=0.05, gamma=0.8)
    monitor = StabilityMonitor(sparsifiers=(), report=False)
    make_trainer(tmp_path, [monitor], max_steps=3).fit(model)
    s = monitor.trajectories[0]
    # θ_{t+1} − θ_t = −η_t g_t for SGD without momentum or weight decay
    assert s.last_update_norm == pytest.approx(s.last_lr * s.last_grad_norm, rel=1e-5)
    assert s.last_lr == pytest.approx(0.05 * 0.8**2)
    assert s.grad_steps == 3 and s.mean_sq_grad_norm >= s.mean_grad_norm**2 - 1e-9


def test_gradient_accumulation_counts_optimizer_steps_and_samples(tmp_path):
    model = ScheduledModel(lr=0.1, gamma=1.0, n=8, batch_size=2)
    monitor = StabilityMonitor(sparsifiers=(), report=False)
    make_trainer(tmp_path, [monitor], accumulate_grad_batches=2).fit(model)
    s = monitor.trajectories[0]
    assert s.steps == 2 and s.samples == 8
    assert s.lr_integral_per_sample == pytest.approx(2 * 0.1 / 4)
    # with lr 0 the per-batch losses are those of the initial weights: the logged loss is
    # their un-normalised mean, not the mean divided by accumulate_grad_batches
    frozen = ScheduledModel(lr=0.0, gamma=1.0, n=8, batch_size=2)
    batches = list(frozen.train_dataloader())
    with torch.no_grad():
        expected = sum(float(F.mse_loss(frozen(x), y)) for x, y in batches) / len(batches)
    monitor = StabilityMonitor(sparsifiers=(), report=False)
    make_trainer(tmp_path, [monitor], accumulate_grad_batches=2).fit(frozen)
    assert monitor.train_loss == pytest.approx(expected, rel=1e-6)


def test_train_loss_is_the_sample_weighted_epoch_mean(tmp_path):
    class Recorder(ScheduledModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.seen.append((float(loss.detach()), len(batch[0])))
            return loss

    model = Recorder(lr=0.0, n=5, batch_size=2)  # lr 0: the loss is that of fixed weights
    model.seen = []
    monitor = StabilityMonitor(sparsifiers=(), report=False)
    make_trainer(tmp_path, [monitor]).fit(model)
    expected = sum(loss * b for loss, b in model.seen) / sum(b for _, b in model.seen)
    assert monitor.train_loss == pytest.approx(expected, rel=1e-6)
    assert float(model.trainer.callback_metrics["stability/train_loss"]) == pytest.approx(expected, rel=1e-6)


def test_frozen_parameters_are_left_out(tmp_path):
    class Frozen(ScheduledModel):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(3, 3)
            self.frozen.requires_grad_(False)

    model = Frozen()
    monitor = StabilityMonitor(sparsifiers=(), report=False)
    make_trainer(tmp_path, [monitor], max_steps=2).fit(model)
    assert set(monitor.base(model)) == {"layer.weight", "layer.bias"}


def test_monitor_observes_only_boring_model(tmp_path):
    def run(callbacks):
        seed_everything(7)
        model = ScheduledModel(momentum=0.9)
        make_trainer(tmp_path, callbacks, max_epochs=2).fit(model)
        return params_of(model)

    without = run([])
    with_monitor = run([StabilityMonitor(every_n_steps=1, sparsifiers=("ties", "dare"), report=False)])
    assert all(torch.equal(without[k], with_monitor[k]) for k in without)


class TinyLM(LightningModule):
    """Lightning's demo Transformer on random tokens (no WikiText2 download)."""

    def __init__(self, vocab=50):
        super().__init__()
        self.vocab = vocab
        self.model = Transformer(vocab_size=vocab, ninp=16, nhead=2, nhid=16, nlayers=1, dropout=0.2)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.nll_loss(self.model(inputs, target), target.view(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.vocab, (8, 9), generator=g)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)


def test_monitor_observes_only_transformer_with_dropout(tmp_path):
    def run(callbacks):
        seed_everything(3)
        model = TinyLM()
        make_trainer(tmp_path, callbacks, max_steps=4, max_epochs=2).fit(model)
        return params_of(model)

    without = run([])
    monitor = StabilityMonitor(every_n_steps=1, layer_depth=3, report=False)
    with_monitor = run([monitor])
    assert all(torch.equal(without[k], with_monitor[k]) for k in without)
    assert monitor.trajectories[0].steps == 4
    assert monitor.trajectories[0].lr_integral == pytest.approx(4e-3)


def test_resume_from_checkpoint_continues_the_statistics(tmp_path):
    seed_everything(1)
    model = ScheduledModel(lr=0.1, gamma=0.9)
    initial = copy.deepcopy(model)
    full = StabilityMonitor(sparsifiers=(), report=False)
    make_trainer(tmp_path, [full], max_epochs=2).fit(model)

    first = copy.deepcopy(initial)
    part = StabilityMonitor(sparsifiers=(), report=False)
    trainer = make_trainer(tmp_path, [part], max_epochs=1)
    trainer.fit(first)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    seed_everything(99)
    resumed_model = ScheduledModel(lr=0.1, gamma=0.9)  # different init: the checkpoint restores it
    resumed = StabilityMonitor(sparsifiers=(), report=False)
    make_trainer(tmp_path, [resumed], max_epochs=2).fit(resumed_model, ckpt_path=ckpt)

    a, b = full.trajectories[0], resumed.trajectories[0]
    assert b.steps == a.steps == 8
    assert b.lr_integral == pytest.approx(a.lr_integral)
    assert b.path_length == pytest.approx(a.path_length, rel=1e-5)
    # τ is still measured from the original fit-start weights
    assert distance(resumed.base(resumed_model), params_of(initial)) == 0.0
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]


def test_report_files_for_a_single_model(tmp_path):
    model = ScheduledModel()
    monitor = StabilityMonitor(every_n_steps=1)
    make_trainer(tmp_path, [monitor], max_epochs=2).fit(model)
    text = (tmp_path / "stability_report.md").read_text()
    assert "## Per model" in text and "## What the measurements show" in text
    assert "TIES trim (density 0.2) multiplies ‖τ‖² by" in text
    assert "DARE drop (p = 0.9) multiplies ‖τ‖² by" in text and "makes this 10 in expectation" in text
    assert "experts" not in text  # one model is never worded as experts
    assert not re.search(r"(\d{4,}|[2-9]\d\d|1[1-9]\d|10[1-9])%", text)  # no "share" above 100 %
    assert (tmp_path / "stability_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="every_n_steps"):
        StabilityMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="sparsifiers"):
        StabilityMonitor(sparsifiers=("magnitude",))
    with pytest.raises(ValueError, match="drop_rate"):
        StabilityMonitor(drop_rate=1.0)
    with pytest.raises(ValueError, match="drift_factor"):
        StabilityMonitor(drift_factor=1.0)


# ----------------------------------------------------------------- several experts


class Experts(LightningModule, HasExperts):
    """K linear experts in a ModuleList, each in its own param group (own lr)."""

    def __init__(self, lrs=(0.1, 0.1, 0.1), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.skeleton = nn.Linear(4, 2)
        self.skeleton.requires_grad_(False)
        self.experts = nn.ModuleList(copy.deepcopy(self.skeleton).requires_grad_(True) for _ in lrs)
        self.lrs = lrs

    def expert_state_dicts(self):
        return [e.state_dict() for e in self.experts]

    def base_state_dict(self):
        return self.skeleton.state_dict()

    def batch_inputs(self, batch):
        return batch[0]

    def expert_output(self, j, x):
        return self.experts[j](x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return sum(F.mse_loss(self.expert_output(j, x), y * (j + 1)) for j in range(len(self.lrs)))

    def configure_optimizers(self):
        return torch.optim.SGD(
            [{"params": e.parameters(), "lr": lr} for e, lr in zip(self.experts, self.lrs, strict=True)]
        )

    def train_dataloader(self):
        return fixed_loader(8, 2, dim=4)


class StackedExperts(Experts):
    """The same experts stored as one stacked parameter per entry; experts are views of it."""

    def __init__(self, lrs=(0.1, 0.1, 0.1), seed=0):
        super().__init__(lrs, seed)
        k = len(lrs)
        self.weight = nn.Parameter(self.skeleton.weight.detach().repeat(k, 1, 1).clone())
        self.bias = nn.Parameter(self.skeleton.bias.detach().repeat(k, 1).clone())
        del self.experts

    def expert_state_dicts(self):
        return [{"weight": self.weight[j], "bias": self.bias[j]} for j in range(len(self.lrs))]

    def expert_output(self, j, x):
        return F.linear(x, self.weight[j], self.bias[j])

    def configure_optimizers(self):
        return torch.optim.SGD([self.weight, self.bias], lr=self.lrs[0])


def test_experts_protocol_per_expert_lr_and_cross_expert_stats(tmp_path):
    model = Experts(lrs=(0.01, 0.02, 0.2))
    assert isinstance(model, HasExperts)
    monitor = StabilityMonitor(every_n_steps=2)
    make_trainer(tmp_path, [monitor]).fit(model)
    assert [s.lr_integral for s in monitor.trajectories] == pytest.approx([0.04, 0.08, 0.8])
    metrics = model.trainer.callback_metrics
    stats = task_vector_stats(model.expert_state_dicts(), model.base_state_dict())
    assert float(metrics["stability/dispersion"]) == pytest.approx(stats.dispersion, rel=1e-5)
    for j in range(3):
        assert float(metrics[f"stability/expert_{j}/tau_norm"]) == pytest.approx(float(stats.norms[j]), rel=1e-5)
    assert -1 <= float(metrics["stability/cosine/0_1"]) <= 1
    assert float(metrics["stability/max_drift_ratio"]) == pytest.approx(
        float(drift_ratios(stats.norms).max()), rel=1e-5
    )
    assert "stability/ties/dispersion" in metrics and "stability/dare/sign_conflict" in metrics
    assert "stability/dispersion/layer/weight" in metrics
    text = (tmp_path / "stability_report.md").read_text()
    assert "Expert 2 moved" in text  # 10× the lr of its peers: flagged as drifting
    assert "## Layers carrying the dispersion" in text
    assert (tmp_path / "stability_report.png").stat().st_size > 0


def test_identical_experts_have_zero_dispersion(tmp_path):
    class Same(Experts):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return sum(F.mse_loss(e(x), y) for e in self.experts)

    model = Same(lrs=(0.1, 0.1))
    monitor = StabilityMonitor(every_n_steps=1, sparsifiers=("ties",), report=False)
    make_trainer(tmp_path, [monitor], max_steps=3).fit(model)
    metrics = model.trainer.callback_metrics
    assert float(metrics["stability/dispersion"]) == 0.0
    assert float(metrics["stability/sign_conflict"]) == 0.0
    assert float(metrics["stability/ties/dispersion"]) == 0.0


def test_stacked_expert_views_give_the_same_measurements(tmp_path):
    lrs = (0.05, 0.05, 0.05)
    results = []
    for cls in (Experts, StackedExperts):
        model = cls(lrs=lrs, seed=4)
        monitor = StabilityMonitor(every_n_steps=1, sparsifiers=(), report=False)
        make_trainer(tmp_path, [monitor], max_steps=3).fit(model)
        results.append(monitor.trajectories)
    for a, b in zip(*results, strict=True):
        assert b.grad_steps == a.grad_steps == 3
        assert b.grad_norm_sum == pytest.approx(a.grad_norm_sum, rel=1e-5)
        assert b.path_length == pytest.approx(a.path_length, rel=1e-5)
        assert b.lr_integral == pytest.approx(a.lr_integral)


def test_weights_length_must_match_experts(tmp_path):
    with pytest.raises(ValueError, match="2 weights given for 3 experts"):
        make_trainer(tmp_path, [StabilityMonitor(weights=[1.0, 1.0])], max_steps=1).fit(Experts())


# ---------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_values_are_global(tmp_path):
    """Two gloo ranks: logged values are the global ones (τ from the final weights, b = 2 × per-rank)."""
    seed_everything(0)
    model = ScheduledModel(lr=0.1, gamma=0.9, n=8, batch_size=2)
    start = params_of(model)
    logger = CSVLogger(tmp_path, name="ddp", version=0)
    trainer = make_trainer(
        tmp_path,
        [StabilityMonitor(every_n_steps=1, sparsifiers=())],
        devices=2,
        strategy="ddp_spawn",
        logger=logger,
        log_every_n_steps=1,
    )
    trainer.fit(model)
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "version_0" / "metrics.csv")))
    last = [r for r in rows if r.get("stability/tau_norm")][-1]
    steps = 2  # 8 samples over 2 ranks, batch 2
    assert float(last["stability/lr_integral"]) == pytest.approx(sum(0.1 * 0.9**t for t in range(steps)), rel=1e-6)
    assert float(last["stability/lr_integral_per_sample"]) == pytest.approx(
        sum(0.1 * 0.9**t / 4 for t in range(steps)), rel=1e-6
    )
    assert float(last["stability/tau_norm"]) == pytest.approx(distance(params_of(model), start), rel=1e-5)
    loss_rows = [r for r in rows if r.get("stability/train_loss")]
    assert len(loss_rows) == 1 and float(loss_rows[0]["stability/train_loss"]) > 0
    assert (tmp_path / "ddp" / "version_0" / "stability_report.md").is_file()


# ------------------------------------------------------- action: ExpertDriftStopper


def test_drift_stopper_freezes_only_the_drifting_expert(tmp_path):
    def run(callbacks):
        model = Experts(lrs=(0.01, 0.01, 0.5), seed=2)
        make_trainer(tmp_path, callbacks, max_epochs=2).fit(model)
        return model

    monitor = StabilityMonitor(every_n_steps=1, sparsifiers=(), report=False)
    stopper = ExpertDriftStopper(factor=3.0)
    stopped_run = run([stopper, monitor])
    free_run = run([])
    assert list(stopper.stopped) == [2]
    step = stopper.stopped[2]
    assert 0 < step < 8
    # once stopped, expert 2 does not move; the others train exactly as without the stopper
    assert monitor.trajectories[2].last_update_norm == 0.0
    assert monitor.trajectories[0].last_update_norm > 0.0
    for j in (0, 1):
        a, b = stopped_run.experts[j].state_dict(), free_run.experts[j].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(stopped_run.experts[2].weight, free_run.experts[2].weight)
    assert float(stopped_run.trainer.callback_metrics["stability/num_stopped"]) == 1.0
    restored = ExpertDriftStopper(factor=3.0)
    restored.load_state_dict(stopper.state_dict())
    assert restored.stopped == stopper.stopped


def test_drift_stopper_limits_and_bad_uses(tmp_path):
    stopper = ExpertDriftStopper(factor=1.01, max_stopped=1, min_steps=2)
    make_trainer(tmp_path, [stopper], max_steps=4).fit(Experts(lrs=(0.01, 0.1, 0.5)))
    assert len(stopper.stopped) == 1 and min(stopper.stopped.values()) >= 2
    with pytest.raises(TypeError, match="HasExperts"):
        make_trainer(tmp_path, [ExpertDriftStopper()], max_steps=1).fit(ScheduledModel())
    with pytest.raises(ValueError, match="view of a parameter"):
        make_trainer(tmp_path, [ExpertDriftStopper(factor=1.01)], max_steps=3).fit(
            StackedExperts(lrs=(0.5, 0.5, 0.5), seed=1)
        )
    with pytest.raises(ValueError, match="factor"):
        ExpertDriftStopper(factor=0.5)
