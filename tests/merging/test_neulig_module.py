"""NeuLigModule (Lightning shell) and the registered `neulig` merge method on digits experts."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from merging.bundle import ExpertBundle
from merging.datamodules import DigitsTasks
from merging.io import save_state_dict
from merging.methods import get_method
from merging.models import build_backbone
from merging.modules.neulig import NeuLigModule
from merging.neulig import coopvec_merge

GROUPS = [[0, 1, 2], [3, 4], [6, 7]]  # even val splits (see the DDP test)
BACKBONE = {"in_features": 64, "hidden": 16, "depth": 2}


def datamodule(**kwargs) -> DigitsTasks:
    return DigitsTasks(groups=kwargs.pop("groups", GROUPS), batch_size=64, seed=0, **kwargs)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """Three digits experts fine-tuned for a few epochs from one random MLP base."""
    torch.manual_seed(0)
    dm = datamodule()
    dm.setup("fit")
    base_model = build_backbone("mlp", **BACKBONE)
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    experts, heads = [], []
    for t in range(dm.num_tasks):
        model = build_backbone("mlp", **BACKBONE)
        model.load_state_dict(base)
        head = nn.Linear(16, dm.num_classes[t])
        opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
        for _ in range(3):
            for x, y in dm.task_dataloader(t, "train"):
                opt.zero_grad()
                F.cross_entropy(head(model(x)), y).backward()
                opt.step()
        experts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        heads.append({k: v.detach().clone() for k, v in head.state_dict().items()})
    directory = tmp_path_factory.mktemp("neulig") / "bundle"
    ExpertBundle("mlp", BACKBONE, 1, dm.task_names, dm.num_classes, base, experts, heads).save(directory)
    return directory


def trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    return L.Trainer(**{**defaults, **kwargs})


def set_constant(portland: nn.Module, coopvec: torch.Tensor) -> None:
    with torch.no_grad():
        portland.fc.weight.zero_()
        portland.fc.bias.copy_(coopvec.log())


class Recorder(Callback):
    """Records the epoch-level training loss, and validation figures with Portland's weights."""

    def __init__(self) -> None:
        self.train_loss: list[float] = []
        self.val: list[tuple[int, float, dict]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train_loss.append(float(trainer.callback_metrics["train/loss_epoch"]))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            state = {k: v.clone() for k, v in pl_module.portland.state_dict().items()}
            self.val.append((trainer.current_epoch, float(trainer.callback_metrics["val/merged_acc"]), state))


def test_fit_lowers_joint_loss_logs_figures_and_keeps_best_on_validation(bundle_dir, tmp_path):
    model = NeuLigModule(str(bundle_dir), alignment="sup", lr=1e-2)
    recorder = Recorder()
    fit = trainer(tmp_path, max_epochs=6, check_val_every_n_epoch=2, callbacks=[recorder])
    fit.fit(model, datamodule())
    assert recorder.train_loss[-1] < 0.9 * recorder.train_loss[0]
    metrics = fit.callback_metrics
    for key in ("train/task_loss_epoch", "train/alignment_epoch", "val/gap", "val/best/epoch"):
        assert key in metrics
    for name in ("digits_012", "digits_34", "digits_67"):
        merged, ensembled = float(metrics[f"val/merged_acc/{name}"]), float(metrics[f"val/ensembled_acc/{name}"])
        assert 0.0 <= merged <= 1.0 and 0.0 <= ensembled <= 1.0
        assert float(metrics[f"val/gap/{name}"]) == pytest.approx(abs(merged - ensembled), abs=1e-6)
        assert 0.0 <= float(metrics[f"val/coopvec/argmax_rate/{name}"]) <= 1.0
        assert 0.0 <= float(metrics[f"val/coopvec/entropy/{name}"]) <= math.log(3) + 1e-6
    # the best epoch is the validation argmax of the mean merged accuracy (first one on ties)
    epochs, scores = [e for e, _, _ in recorder.val], [s for _, s, _ in recorder.val]
    best = scores.index(max(scores))
    assert [int(model.best_epoch)] == [epochs[best]]
    assert float(metrics["val/best/merged_acc"]) == pytest.approx(max(scores))
    for key, value in recorder.val[best][2].items():
        torch.testing.assert_close(model.best_portland.state_dict()[key], value)
    assert (tmp_path / "coopvec_map.png").stat().st_size > 1000

    fit.test(model, datamodule(), verbose=False)
    for which in ("last", "best"):
        for key in ("merged_acc", "ensembled_acc", "gap", "merged_acc/digits_67"):
            assert f"test/{which}/{key}" in fit.callback_metrics


def test_test_without_validation_reports_last_only(bundle_dir, tmp_path):
    model = NeuLigModule(str(bundle_dir), coopvec_plot=False)
    fit = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    fit.fit(model, datamodule())
    with pytest.warns(UserWarning, match="only the last Portland"):
        fit.test(model, datamodule(), verbose=False)
    assert "test/last/merged_acc" in fit.callback_metrics
    assert not any(k.startswith("test/best") for k in fit.callback_metrics)


def test_modes_agree_when_coopvec_is_constant_and_static_uniform_is_simple_average(bundle_dir, tmp_path):
    coopvec = torch.tensor([0.5, 0.3, 0.2])
    results = {}
    for mode in ("per_batch_first", "per_sample", "static"):
        model = NeuLigModule(str(bundle_dir), mode=mode, calibration_samples=64)
        model.configure_model()
        set_constant(model.portland, coopvec)
        results[mode] = trainer(tmp_path).validate(model, datamodule(), verbose=False)[0]
    keys = [k for k in results["static"] if "merged_acc" in k or "ensembled_acc" in k]
    assert len(keys) == 2 * (3 + 1)  # per task and the task mean; validate() selects no best
    for key in keys:
        assert results["per_batch_first"][key] == results["per_sample"][key] == results["static"][key]

    # constant uniform CoopVec: the merging branch is simple weight averaging
    model = NeuLigModule(str(bundle_dir), mode="static", calibration_samples=64)
    model.configure_model()
    set_constant(model.portland, torch.full((3,), 1 / 3))
    logged = trainer(tmp_path).validate(model, datamodule(), verbose=False)[0]
    bundle = ExpertBundle.load(bundle_dir)
    average = get_method("average").merge(bundle.experts)
    skeleton, heads, dm = bundle.build_backbone(), bundle.build_heads(), datamodule()
    skeleton.load_state_dict(average)
    for t, name in enumerate(dm.task_names):
        with torch.no_grad():
            hits = [(heads[t](skeleton(x)).argmax(1) == y).float() for x, y in dm.task_dataloader(t, "val")]
        assert logged[f"val/merged_acc/{name}"] == pytest.approx(float(torch.cat(hits).mean()), abs=1e-6)


def test_rejects_mismatched_tasks_and_mixed_batches(bundle_dir, tmp_path):
    model = NeuLigModule(str(bundle_dir))
    with pytest.raises(ValueError, match="do not match the expert bundle"):
        trainer(tmp_path, max_epochs=1).fit(model, datamodule(groups=[[0, 1], [2, 3], [4, 5]]))
    with pytest.raises(ValueError, match="task-homogeneous"):
        model.training_step((torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), 0)
    bundle = ExpertBundle.load(bundle_dir)
    one = ExpertBundle(
        "mlp",
        BACKBONE,
        1,
        bundle.task_names[:1],
        bundle.num_classes[:1],
        bundle.base,
        bundle.experts[:1],
        bundle.heads[:1],
    )
    with pytest.raises(ValueError, match="needs at least 2 experts"):
        NeuLigModule(str(one.save(tmp_path / "one"))).configure_model()
    with pytest.raises(FileNotFoundError, match="not an expert bundle"):
        NeuLigModule(str(tmp_path)).configure_model()
    with pytest.raises(ValueError, match="mode must be"):
        NeuLigModule(str(bundle_dir), mode="global")  # type: ignore[arg-type]


def test_checkpoint_holds_portland_not_the_experts(bundle_dir, tmp_path):
    model = NeuLigModule(str(bundle_dir))
    assert set(model.state_dict()) == set()  # nothing is loaded before configure_model
    model.configure_model()
    keys = set(model.state_dict())
    assert {"portland.fc.weight", "best_portland.fc.weight", "eps_star", "best_epoch"} <= keys
    skeleton_size = sum(v.numel() for k, v in model.state_dict().items() if k.startswith("skeleton."))
    assert skeleton_size == sum(v.numel() for v in ExpertBundle.load(bundle_dir).base.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("portland."))


def test_neulig_method_loads_portland_from_module_checkpoint(bundle_dir, tmp_path):
    model = NeuLigModule(str(bundle_dir), coopvec_plot=False)
    model.configure_model()
    set_constant(model.portland, torch.tensor([0.6, 0.3, 0.1]))
    set_constant(model.best_portland, torch.tensor([0.1, 0.1, 0.8]))
    fit = trainer(tmp_path, max_epochs=0)
    fit.fit(model, datamodule())
    fit.save_checkpoint(tmp_path / "neulig.ckpt")
    restored = NeuLigModule.load_from_checkpoint(tmp_path / "neulig.ckpt")
    torch.testing.assert_close(restored.best_portland.fc.bias, model.best_portland.fc.bias)
    bundle = ExpertBundle.load(bundle_dir)
    data = datamodule().unlabeled_dataloader(num_samples=32, seed=0)
    for which, coopvec in (("last", [0.6, 0.3, 0.1]), ("best", [0.1, 0.1, 0.8])):
        method = get_method("neulig", portland=str(tmp_path / "neulig.ckpt"), which=which)
        merged = method.merge(bundle.experts, bundle.base, model=bundle.build_backbone(), data=data)
        expected = coopvec_merge(bundle.experts, torch.tensor(coopvec))
        for key in expected:
            torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)


def test_neulig_method_trains_portland_in_semi_mode(bundle_dir, tmp_path):
    bundle = ExpertBundle.load(bundle_dir)
    dm = datamodule()
    data = {t: [x for x, _ in dm.task_dataloader(t, "val")] for t in range(dm.num_tasks)}
    method = get_method("neulig", heads=str(bundle_dir), epochs=5, lr=1e-2)
    skeleton = bundle.build_backbone()
    beta_bar = method.calibrate(bundle.experts, skeleton, data)
    assert beta_bar.shape == (3,) and bool((beta_bar > 0).all())
    assert float(beta_bar.sum()) == pytest.approx(1.0)
    merged = method.merge(bundle.experts, model=skeleton, data=data)
    expected = coopvec_merge(bundle.experts, beta_bar.float())
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="give `portland`"):
        get_method("neulig", heads=str(bundle_dir)).merge(bundle.experts, model=skeleton, data=[x for x in data[0]])
    with pytest.raises(ValueError, match="outside"):
        get_method("neulig", heads=str(bundle_dir), epochs=1).merge(bundle.experts, model=skeleton, data={5: data[0]})


def test_neulig_method_checks_portland_file(bundle_dir, tmp_path):
    bundle = ExpertBundle.load(bundle_dir)
    path = save_state_dict({"fc.weight": torch.zeros(3, 40), "fc.bias": torch.zeros(3)}, tmp_path / "p.safetensors")
    method = get_method("neulig", portland=str(path))
    with pytest.raises(ValueError, match=r"fc.weight.*\(3, 40\).*\(3, 48\)"):
        method.merge(bundle.experts, model=bundle.build_backbone(), data=[torch.zeros(2, 1, 8, 8)])
    with pytest.raises(ValueError, match="data"):
        method.merge(bundle.experts, model=bundle.build_backbone())


@pytest.mark.slow
def test_ddp_spawn_fit_figures_equal_single_process_validation(bundle_dir, tmp_path):
    dm = datamodule()
    dm.setup("validate")
    # even validation splits: DistributedSampler pads odd shards with repeated samples
    assert all(len(dm.dataset(t, "val")) % 2 == 0 for t in range(dm.num_tasks))
    # per_sample: "per_batch_first" depends on which sample opens a batch, i.e. on the sharding
    model = NeuLigModule(str(bundle_dir), mode="per_sample", lr=1e-2, coopvec_plot=False)
    fit = trainer(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=2)
    fit.fit(model, datamodule())  # one Adam step per task per batch: several backward passes per step
    spawned = dict(fit.callback_metrics)
    assert int(model.best_epoch) == 0 and "val/best/merged_acc" in spawned
    fresh = NeuLigModule(str(bundle_dir))
    fresh.configure_model()
    assert not torch.equal(model.portland.fc.weight, fresh.portland.fc.weight)
    single = trainer(tmp_path).validate(model, datamodule(), verbose=False)[0]
    assert len(single) == 5 * 3 + 3
    for key, value in single.items():
        assert float(spawned[key]) == pytest.approx(value, abs=1e-6), key
