"""Bad hyperparameters of merge methods, LightningModules and datamodules raise in ``__init__``,
naming the argument (so ``merging merge --hparams``, LightningCLI and library use all see it)."""

from __future__ import annotations

import pytest

from merging import streaming
from merging._validation import check_float, check_int, check_str_list, check_weights
from merging.datamodules import DigitsTasks, FashionMNISTTasks, MultiTaskDataModule
from merging.methods import get_method
from merging.methods.classic import Dare, TaskArithmetic, TiesMerging, WeightAveraging
from merging.methods.mties import MTiesMerging
from merging.methods.mudsc import MuDSC
from merging.methods.neulig import NeuLigMerging
from merging.modules.evaluate import EnsembleModule, MergedModule
from merging.modules.experts import MultiExpertModule, PretrainModule
from merging.modules.neulig import NeuLigModule

# (factory, the argument its error names)
BAD = {
    # merge methods
    "ties density a string": (lambda: TiesMerging(density="abc"), "density"),
    "ties density above one": (lambda: TiesMerging(density=1.5), "density"),
    "ties scaling nan": (lambda: TiesMerging(scaling=float("nan")), "scaling"),
    "ties scope unknown": (lambda: TiesMerging(scope="layer"), "scope"),
    "task arithmetic scaling a string": (lambda: TaskArithmetic(scaling="0.3"), "scaling"),
    "average weights all zero": (lambda: WeightAveraging(weights=[0, 0]), "weights"),
    "average weights a string": (lambda: WeightAveraging(weights="12"), "weights"),
    "dare drop_rate one": (lambda: Dare(drop_rate=1.0), "drop_rate"),
    "dare seed a float": (lambda: Dare(seed=1.5), "seed"),
    "dare combine unknown": (lambda: Dare(combine="mean"), "combine"),
    "mties layers a string": (lambda: MTiesMerging(layers="fc"), "layers"),
    "mties sampling_size a bool": (lambda: MTiesMerging(sampling_size=True), "sampling_size"),
    "mties spread above density": (lambda: MTiesMerging(density=0.3, spread=0.4), "spread"),
    "mudsc max_iter a float": (lambda: MuDSC(max_iter=2.0), "max_iter"),
    "mudsc alpha a string": (lambda: MuDSC(alpha="0.5"), "alpha"),
    "mudsc max_batches zero": (lambda: MuDSC(max_batches=0), "max_batches"),
    "neulig epochs zero": (lambda: NeuLigMerging(epochs=0), "epochs"),
    "neulig which unknown": (lambda: NeuLigMerging(which="first"), "which"),
    # LightningModules
    "experts lr a string": (lambda: MultiExpertModule(lr="1e-3"), "lr"),
    "experts lr zero": (lambda: MultiExpertModule(lr=0), "lr"),
    "experts num_classes a string": (lambda: MultiExpertModule(num_classes="3"), "num_classes"),
    "experts task_names a string": (lambda: MultiExpertModule(task_names="abc", num_classes=[2]), "task_names"),
    "experts in_chans a float": (lambda: MultiExpertModule(in_chans=1.0), "in_chans"),
    "experts weight_decay negative": (lambda: MultiExpertModule(weight_decay=-0.1), "weight_decay"),
    "pretrain pretrain_tasks out of range": (
        lambda: PretrainModule(pretrain_tasks=[5], num_classes=[2, 2]),
        "pretrain_tasks",
    ),
    "merged unlabeled_samples zero": (lambda: MergedModule("bundle", unlabeled_samples=0), "unlabeled_samples"),
    "merged method a string": (lambda: MergedModule("bundle", method="ties"), "method"),
    "merged scaling_grid a string": (lambda: MergedModule("bundle", scaling_grid="0.3"), "scaling_grid"),
    "merged report_ensemble not a bool": (lambda: MergedModule("bundle", report_ensemble=1), "report_ensemble"),
    "ensemble members a string": (lambda: EnsembleModule("bundle", members="01"), "members"),
    "neulig module calibration_samples a float": (
        lambda: NeuLigModule("bundle", calibration_samples=2.5),
        "calibration_samples",
    ),
    "neulig module mode unknown": (lambda: NeuLigModule("bundle", mode="dynamic"), "mode"),
    # datamodules
    "digits batch_size a float": (lambda: DigitsTasks(batch_size=32.0), "batch_size"),
    "digits seed negative": (lambda: DigitsTasks(seed=-1), "seed"),
    "digits num_workers a bool": (lambda: DigitsTasks(num_workers=True), "num_workers"),
    "digits groups a string": (lambda: DigitsTasks(groups="0123"), "groups"),
    "digits groups of strings": (lambda: DigitsTasks(groups=["01", "23"]), "groups"),
    "fashion max_per_class a float": (lambda: FashionMNISTTasks(max_per_class=10.0), "max_per_class"),
    "multitask val_fraction a string": (lambda: MultiTaskDataModule(val_fraction="0.1"), "val_fraction"),
}


@pytest.mark.parametrize(("make", "argument"), list(BAD.values()), ids=list(BAD))
def test_bad_hyperparameter_raises_naming_it(make, argument):
    with pytest.raises((TypeError, ValueError), match=rf"\b{argument}\b"):
        make()


def test_messages_show_the_rule_and_the_value():
    with pytest.raises(TypeError, match=r"ties: density must be a float in \[0, 1\], got 'abc'"):
        TiesMerging(density="abc")
    with pytest.raises(ValueError, match=r"mudsc: max_batches must be an int >= 1 or None, got 0"):
        MuDSC(max_batches=0)
    with pytest.raises(TypeError, match=r"average: weights must be .* got the item '1'"):
        WeightAveraging(weights=["1", "2"])


def test_merge_cli_names_the_bad_hyperparameter(tmp_path, capsys):
    argv = ["--experts", "a.safetensors", "--method", "ties", "--hparams", "density=abc", "--out", str(tmp_path / "m")]
    with pytest.raises(SystemExit) as exit_info:
        streaming.main(argv)
    assert exit_info.value.code == 2
    assert "density must be a float in [0, 1], got 'abc'" in capsys.readouterr().err


def test_good_hyperparameters_are_normalised():
    assert get_method("ties", density=1, scaling=2).density == 1.0
    assert WeightAveraging(weights=(1, 3)).weights == [1.0, 3.0]
    assert MTiesMerging(layers=("fc",)).layers == ["fc"]
    assert DigitsTasks(groups=[(0, 1), [2]]).groups == [[0, 1], [2]]


def test_checks():
    assert check_int("n", None, optional=True) is None
    with pytest.raises(TypeError, match="n must be an int, got True"):
        check_int("n", True)
    assert check_float("x", 3) == 3.0 and isinstance(check_float("x", 3), float)
    with pytest.raises(ValueError, match=r"x must be a float in \(0, 1\), got inf"):
        check_float("x", float("inf"), low=0, high=1, low_open=True, high_open=True)
    with pytest.raises(ValueError, match="x must be a float >= 0, got -1.0"):
        check_float("x", -1, low=0)
    with pytest.raises(TypeError, match="the item 3"):
        check_str_list("names", ["a", 3])
    assert check_str_list("names", [], nonempty=False) == []
    with pytest.raises(ValueError, match="positive sum"):
        check_weights("w", [0.0])
