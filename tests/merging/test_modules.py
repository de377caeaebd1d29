"""LightningModules: pretraining, joint experts, the bundle hand-off, ensembles and merges."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.func import functional_call

from merging.bundle import ExpertBundle
from merging.datamodules import DigitsTasks
from merging.io import load_state_dict
from merging.methods import get_method
from merging.modules import EnsembleModule, HasExperts, MergedModule, MultiExpertModule, PretrainModule


def trainer(**kwargs) -> pl.Trainer:
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**(base | kwargs))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    pl.seed_everything(0)
    data = DigitsTasks(batch_size=32, seed=0)
    kwargs = {"backbone_kwargs": {"width": 8, "num_features": 32}}
    trainer(max_epochs=3, limit_val_batches=0).fit(
        PretrainModule(**kwargs, export_path=str(root / "base.safetensors")), data
    )
    experts = MultiExpertModule(
        **kwargs, lr=3e-3, base_checkpoint=str(root / "base.safetensors"), export_dir=str(root / "experts")
    )
    trainer(max_epochs=4).fit(experts, data)
    return root / "experts"


def test_experts_start_from_the_base_and_move(bundle_dir):
    bundle = ExpertBundle.load(bundle_dir)
    base = load_state_dict(bundle_dir.parent / "base.safetensors")
    assert all(torch.equal(bundle.base[k], base[k]) for k in base)
    assert bundle.task_names == ["digits_012", "digits_345", "digits_67", "digits_89"]
    assert bundle.num_classes == [3, 3, 2, 2]
    for expert in bundle.experts:
        assert any(not torch.equal(expert[k], base[k]) for k in base)


def test_multi_expert_module_satisfies_has_experts():
    module = MultiExpertModule(backbone="mlp", backbone_kwargs={"in_features": 64, "hidden": 16}, num_classes=[3, 2])
    assert isinstance(module, HasExperts)
    states = module.expert_state_dicts()
    assert len(states) == 2 and set(states[0]) == set(module.base_state_dict())
    # Live views, not copies: a change to an expert shows in its state dict.
    with torch.no_grad():
        module.experts[0].layers[0].weight.add_(1.0)
    assert torch.equal(states[0]["layers.0.weight"], module.experts[0].layers[0].weight)
    batch = {"a": (torch.zeros(3, 64), torch.zeros(3)), "b": (torch.ones(2, 64), torch.zeros(2))}
    assert module.batch_inputs(batch).shape == (5, 64)


def test_has_experts_is_an_explicit_contract():
    """Detection by class, not by attribute lookup: a runtime Protocol cannot see an
    ``nn.Module`` submodule such as ``skeleton`` on Python >= 3.12."""

    class Lookalike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.skeleton = nn.Linear(2, 2)

        def expert_state_dicts(self):
            return [self.skeleton.state_dict()]

        def base_state_dict(self):
            return self.skeleton.state_dict()

        def batch_inputs(self, batch):
            return batch

    assert not isinstance(Lookalike(), HasExperts)  # the methods alone do not make it one
    HasExperts.register(Lookalike)  # a class that cannot subclass declares it
    assert isinstance(Lookalike(), HasExperts)

    class Incomplete(nn.Module, HasExperts):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_single_member_ensemble_is_the_expert(bundle_dir):
    data = DigitsTasks(batch_size=64, seed=0)
    module = EnsembleModule(str(bundle_dir), members=[1])
    trainer().test(module, data, verbose=False)
    bundle = ExpertBundle.load(bundle_dir)
    skeleton, heads = bundle.build_backbone(), bundle.build_heads()
    x, y = next(iter(data.task_dataloader(1, "test")))
    expected = heads[1](functional_call(skeleton, bundle.experts[1], (x,)))
    torch.testing.assert_close(heads[1](module.features(x)), expected)
    assert module.results["test/acc/digits_345"] > 0.8  # expert 1 on its own task, far above chance (1/3)


def test_merged_module_reports_gap_and_saves(bundle_dir, tmp_path):
    data = DigitsTasks(batch_size=64, seed=0)
    save = tmp_path / "merged.safetensors"
    module = MergedModule(str(bundle_dir), method=get_method("task_arithmetic", scaling=0.3), save_path=str(save))
    trainer().test(module, data, verbose=False)
    r = module.results
    assert r["test/gap_to_ensemble"] == pytest.approx(r["test/acc_mean"] - r["test/ensemble_acc_mean"])
    assert set(r) >= {f"test/acc/{t}" for t in data.task_names} | {"test/merge_seconds"}
    bundle = ExpertBundle.load(bundle_dir)
    expected = get_method("task_arithmetic", scaling=0.3).merge(bundle.experts, bundle.base)
    saved = load_state_dict(save)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def _validation_accuracy(bundle: ExpertBundle, state, data: DigitsTasks) -> float:
    """Mean over tasks of macro accuracy on the validation split, computed independently."""
    from torchmetrics.functional.classification import multiclass_accuracy

    skeleton, heads = bundle.build_backbone(), bundle.build_heads()
    accs = []
    for t, n in enumerate(bundle.num_classes):
        xs, ys = zip(*data.task_dataloader(t, "val", batch_size=1024))
        logits = heads[t](functional_call(skeleton, state, (torch.cat(xs),)))
        accs.append(float(multiclass_accuracy(logits, torch.cat(ys), num_classes=n, average="macro")))
    return sum(accs) / len(accs)


def test_merged_module_chooses_scaling_on_validation(bundle_dir, tmp_path):
    data = DigitsTasks(batch_size=64, seed=0)
    grid = [1.0, 0.1, 0.5, 0.25]
    save = tmp_path / "merged.safetensors"
    module = MergedModule(
        str(bundle_dir),
        method=get_method("task_arithmetic"),
        scaling_grid=grid,
        report_ensemble=False,
        save_path=str(save),
    )
    trainer().test(module, data, verbose=False)
    bundle = ExpertBundle.load(bundle_dir)
    expected = {
        s: _validation_accuracy(
            bundle, get_method("task_arithmetic", scaling=s).merge(bundle.experts, bundle.base), data
        )
        for s in sorted(grid)
    }
    assert list(module.scaling_search) == sorted(grid)
    for s, acc in expected.items():
        assert module.scaling_search[s] == pytest.approx(acc, abs=1e-6)
    best = max(expected.values())
    chosen = min(s for s, acc in expected.items() if acc >= best - 1e-9)  # ties: the smaller λ
    assert module.selected_scaling == chosen == module.results["test/selected_scaling"]
    assert module.method.scaling == 0.3  # the configured method itself is left as it was
    # Evaluated and saved at the chosen λ: the same test results as a fixed-λ merge.
    fixed = MergedModule(str(bundle_dir), method=get_method("task_arithmetic", scaling=chosen), report_ensemble=False)
    trainer().test(fixed, data, verbose=False)
    assert module.results["test/acc_mean"] == pytest.approx(fixed.results["test/acc_mean"])
    merged = get_method("task_arithmetic", scaling=chosen).merge(bundle.experts, bundle.base)
    assert all(torch.equal(load_state_dict(save)[k], merged[k]) for k in merged)


def test_scaling_grid_is_checked_before_any_merge(bundle_dir):
    with pytest.raises(ValueError, match="WeightAveraging .*no scaling"):
        MergedModule(str(bundle_dir), method=get_method("average"), scaling_grid=[0.5])
    with pytest.raises(ValueError, match="scaling_grid is empty"):
        MergedModule(str(bundle_dir), method=get_method("ties"), scaling_grid=[])


def test_bundle_without_manifest_is_refused(tmp_path):
    (tmp_path / "base.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="bundle.json is missing"):
        ExpertBundle.load(tmp_path)


def test_bundle_with_other_tasks_than_the_data_is_refused(bundle_dir):
    data = DigitsTasks(groups=[[0, 1], [2, 3]], batch_size=64)
    with pytest.raises(ValueError, match="datamodule has"):
        trainer().test(MergedModule(str(bundle_dir), method=get_method("average")), data, verbose=False)


@pytest.mark.slow
def test_ddp_two_process_fit_on_cpu(tmp_path):
    """A short fit of the experts under DDP (gloo, 2 CPU processes) writes a loadable bundle."""
    pl.seed_everything(0)
    data = DigitsTasks(batch_size=32, seed=0)
    module = MultiExpertModule(
        backbone="mlp", backbone_kwargs={"in_features": 64, "hidden": 16}, export_dir=str(tmp_path / "experts")
    )
    trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, devices=2, strategy="ddp_spawn").fit(module, data)
    bundle = ExpertBundle.load(tmp_path / "experts")
    assert len(bundle.experts) == 4
    assert any(not torch.equal(bundle.experts[0][k], bundle.base[k]) for k in bundle.base)


@pytest.mark.slow
def test_ddp_scaling_search_picks_what_one_process_picks(bundle_dir, tmp_path):
    """Under DDP (gloo, 2 CPU processes) every rank scores the whole validation split, so
    rank zero saves the merge at the λ a single process chooses."""
    data = DigitsTasks(batch_size=64, seed=0)
    grid = [0.1, 0.3, 0.6, 1.0]
    single = MergedModule(
        str(bundle_dir), method=get_method("task_arithmetic"), scaling_grid=grid, report_ensemble=False
    )
    trainer().test(single, data, verbose=False)
    save = tmp_path / "merged.safetensors"
    ddp = MergedModule(
        str(bundle_dir),
        method=get_method("task_arithmetic"),
        scaling_grid=grid,
        report_ensemble=False,
        save_path=str(save),
    )
    trainer(devices=2, strategy="ddp_spawn").test(ddp, data, verbose=False)
    bundle = ExpertBundle.load(bundle_dir)
    expected = get_method("task_arithmetic", scaling=single.selected_scaling).merge(bundle.experts, bundle.base)
    saved = load_state_dict(save)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_evaluation_modules_declare_attributes_and_abstract_overrides():
    from merging.modules.evaluate import _BundleEvalModule

    class Incomplete(_BundleEvalModule):
        def features(self, x):
            return x

    with pytest.raises(TypeError, match="abstract"):
        Incomplete("bundle", report_ensemble=False)
    module = MergedModule("bundle")
    assert isinstance(module.metrics, nn.ModuleDict) and len(module.metrics) == 0
