"""The ``merging`` CLI's messages: every bad ``merge``/``convert`` input names its key or file
and the expected form; ``test`` prints each metric once with its full name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from merging.cli import main as cli_main
from merging.cli import results_table
from merging.io import load_state_dict
from merging.methods import get_method
from merging.streaming import streamable_methods


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    paths = {}
    for name in ("a", "b", "base"):
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}, paths[name])
    paths["pickle"] = tmp_path / "expert.pt"
    torch.save({"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}, paths["pickle"])
    paths["out"] = tmp_path / "merged.safetensors"
    return paths


def _merge(files, *extra: str, experts=("a", "b"), method="ties") -> list[str]:
    return [
        "merge",
        "--experts",
        *(str(files[e]) for e in experts),
        "--base",
        str(files["base"]),
        "--method",
        method,
        "--no-progress",
        *extra,
    ]


def _fails(argv, capsys, code: int) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == code
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("hparams", "needles"),
    [
        (["density=abc"], ["density='abc'", "density must be a float in [0, 1], got 'abc'", "density=0.2"]),
        (["scope=layer"], ["scope='layer'", "'global'", "'tensor'"]),
        (["density=3"], ["density=3", "density must be a float in [0, 1]"]),
        (["dencity=0.5"], ["'dencity'", "it takes density=0.2, scaling=1.0, scope='global'"]),
        (["density"], ["'density' is not of the form name=value"]),
    ],
    ids=["not-a-number", "not-a-choice", "out-of-range", "unknown-name", "no-equals"],
)
def test_bad_hparams_name_the_key_and_the_expected_form(files, capsys, hparams, needles):
    err = _fails(_merge(files, "--hparams", *hparams, "--out", str(files["out"])), capsys, 2)
    assert all(n in err for n in needles), err
    assert not files["out"].exists()


def test_a_torch_pickle_is_named_with_the_command_that_converts_it(files, capsys):
    argv = ["merge", "--experts", str(files["pickle"]), str(files["b"]), "--base", str(files["base"])]
    err = _fails([*argv, "--method", "average", "--out", str(files["out"]), "--no-progress"], capsys, 1)
    assert str(files["pickle"]) in err and "not a safetensors file" in err
    assert f"merging convert {files['pickle']} {files['pickle'].with_suffix('.safetensors')}" in err
    assert "header too large" not in err and not files["out"].exists()

    converted = files["pickle"].with_suffix(".safetensors")
    cli_main(["convert", str(files["pickle"]), str(converted)])
    want = torch.load(files["pickle"], weights_only=True)
    assert all(torch.equal(load_state_dict(converted)[k], want[k]) for k in want)
    cli_main(["merge", "--experts", str(converted), str(files["b"]), "--method", "average", "--out", str(files["out"])])
    assert files["out"].exists()


def test_convert_names_the_missing_file(tmp_path, capsys):
    err = _fails(["convert", str(tmp_path / "gone.ckpt"), str(tmp_path / "x.safetensors")], capsys, 1)
    assert "gone.ckpt" in err and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("method", ["mties", "mudsc", "neulig"])
def test_methods_needing_data_say_which_command_runs_them(files, capsys, method):
    err = _fails(_merge(files, "--out", str(files["out"]), method=method), capsys, 2)
    assert f"--method {method} needs the experts' model and unlabeled input batches" in err
    assert "merging test --config configs/merge/" in err or "merging fit --config configs/neulig/" in err
    assert method not in streamable_methods()


def test_every_offered_method_streams_from_files(files):
    for name in streamable_methods():
        out = files["out"].with_name(f"{name}.safetensors")
        cli_main(_merge(files, "--out", str(out), method=name))
        assert out.exists()


def test_one_expert_warns_and_out_equal_to_an_input_is_refused(files, capsys):
    cli_main(_merge(files, "--out", str(files["out"]), experts=("a",)))
    assert "warning: one expert given" in capsys.readouterr().err and files["out"].exists()
    before = files["a"].read_bytes()
    err = _fails(_merge(files, "--out", str(files["a"])), capsys, 2)
    assert f"--out {files['a']} is also an input" in err and files["a"].read_bytes() == before
    err = _fails(_merge(files, "--out", str(files["base"])), capsys, 2)
    assert "is also an input" in err


def test_results_table_lists_each_metric_once_with_its_full_name():
    summary = {"test/acc_mean": 0.8, "test/ensemble_acc/a_rather_long_task_name_that_lightning_cuts": 0.9}
    per_loader = [{**summary, f"test/loss/dataloader_idx_{i}": float(i)} for i in range(3)]
    table = results_table(per_loader)
    names = list(table.columns[0].cells)
    assert sorted(names) == sorted([*summary, *(f"test/loss/dataloader_idx_{i}" for i in range(3))])
    assert len(table.columns) == 2


def test_method_objects_are_unchanged_by_the_cli_parser(files):
    cli_main(_merge(files, "--hparams", "density=0.5", "scaling=0.8", "--out", str(files["out"])))
    experts = [load_state_dict(files[e]) for e in ("a", "b")]
    want = get_method("ties", density=0.5, scaling=0.8).merge(experts, load_state_dict(files["base"]))
    got = load_state_dict(files["out"])
    assert all(torch.equal(got[k], want[k]) for k in want)
