"""The claims benchmark: protocol checks, the paired reading, and a tiny end-to-end run."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from merging.experiments.claims import readout, run
from merging.experiments.claims.analyses import layer_gaps
from merging.experiments.claims.protocol import ProtocolError, load_protocol, parse_protocol

TINY = {
    "data": {"groups": [[0, 1], [2, 3]], "max_per_class": 12, "batch_size": 8, "root": None},
    "model": {"backbone": "small_cnn", "backbone_kwargs": {"width": 2, "depth": 2, "num_features": 8}},
    "pretrain": {"epochs": 1, "lr": 3e-3},
    "experts": {"epochs": 1, "lr": 1e-3},
    "methods": {
        "ties": {"method": "ties", "density": 0.2, "scaling": 1.0},
        "mties_equal_density": {"method": "mties", "density": 0.2, "spread": 0.1},
        "mties_paper": {"method": "mties", "density": 0.8, "spread": 0.1},
    },
    "scaling_grid": [0.5, 1.0],
    "unlabeled_samples": 8,
    "neulig_epochs": 1,
    "different_init": {"epochs": 1, "lr": 3e-3},
    "soup": {"members": 2, "epochs": 1, "lr": 0.01, "magnitude": 100.0},
    "stability": [{"epochs": 1, "lr": 1e-3}, {"epochs": 1, "lr": 3e-3}],
    "seeds": {"selection": [0, 1], "confirmation": [100, 101]},
}


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_protocol(tmp_path) -> Path:
    """A tiny Fashion-MNIST (IDX files of random 28x28 images, labels cycling 0..9) and a
    protocol of tiny settings reading it."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fashion"
    root.mkdir()
    for split, n in (("train", 240), ("t10k", 120)):
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    raw = json.loads(json.dumps(TINY))
    raw["data"]["root"] = str(root)
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------- protocol


def test_protocol_file_of_the_repository_parses_with_disjoint_seeds():
    protocol = load_protocol(Path(__file__).resolve().parents[3] / "benchmarks" / "claims.yaml")
    assert len(protocol.confirmation_seeds) >= 10
    assert not set(protocol.selection_seeds) & set(protocol.confirmation_seeds)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["data"].update(colour=True), "unknown keys ['colour']"),
        (lambda r: r.update(extra=1), "unknown sections ['extra']"),
        (lambda r: r["seeds"].update(confirmation=[1, 2]), "overlap: [1]"),
        (lambda r: r["methods"].pop("mties_paper"), "'mties_paper' is missing"),
        (lambda r: r["methods"]["ties"].pop("method"), "methods.ties must be a mapping with a 'method'"),
        (lambda r: r.update(stability=[{"epochs": 1, "lr": 1e-3}]), "at least two settings"),
        (lambda r: r["experts"].update(lr=-1.0), "experts: lr must be"),
    ],
)
def test_protocol_errors_name_the_file_and_key(change, message):
    raw = json.loads(json.dumps(TINY))
    change(raw)
    with pytest.raises((ProtocolError, ValueError, TypeError), match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_protocol(raw, "claims.yaml")


def test_protocol_outside_git_is_uncommitted(tiny_protocol):
    protocol = load_protocol(tiny_protocol)
    assert protocol.commit is None and protocol.dirty


# ---------------------------------------------------------------- reading


def test_summary_is_the_t_interval_of_the_paired_values():
    entry = readout.summary([1.0, 2.0, 3.0, None])
    assert entry["n"] == 3 and entry["mean"] == 2.0 and entry["sd"] == 1.0
    half = 4.302652729911275 / math.sqrt(3)
    assert entry["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert (entry["wins"], entry["losses"]) == (3, 0)


@pytest.mark.parametrize(
    ("ci", "expected", "verdict"),
    [
        ([0.5, 2.0], "> 0", "holds"),
        ([-2.0, -0.5], "> 0", "contradicted"),
        ([-0.5, 2.0], "> 0", "not resolved"),
        ([-2.0, -0.5], "< 0", "holds"),
        ([-0.5, 0.8], "≈ 0", "holds"),
        ([-4.0, -2.0], "≈ 0", "contradicted"),
        ([-2.0, 0.5], "≈ 0", "not resolved"),
        ([0.2, 0.4], "—", "measured: > 0"),
    ],
)
def test_verdict_rule(ci, expected, verdict):
    assert readout.verdict({"ci95": ci}, expected) == verdict


def test_spearman_is_undefined_on_constant_or_short_input():
    assert readout.spearman([1, 2, 3], [2, 4, 9]) == pytest.approx(1.0)
    assert readout.spearman([1, 2, 3], [5, 5, 5]) is None
    assert readout.spearman([1, 2], [1, 2]) is None


def test_layer_gaps_of_identical_experts_are_zero():
    class _Evaluator:
        def ensemble_accuracy(self, experts):  # the score depends on how the experts differ
            return 1.0 - float(sum((e["a.weight"] - experts[0]["a.weight"]).abs().sum() for e in experts))

    expert = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)}
    gaps = layer_gaps(_Evaluator(), [expert, dict(expert)], ["a"], {"a": torch.arange(4.0)})
    assert gaps == {"a": {"gap": 0.0, "gap_high_rows": 0.0, "gap_low_rows": 0.0}}


def test_layer_gaps_average_only_the_named_rows():
    seen = []

    class _Evaluator:
        def ensemble_accuracy(self, experts):
            seen.append([e["a.weight"].clone() for e in experts])
            return 0.0

    a = {"a.weight": torch.zeros(4, 2), "a.bias": torch.zeros(4)}
    b = {"a.weight": torch.ones(4, 2), "a.bias": torch.ones(4)}
    layer_gaps(_Evaluator(), [a, b], ["a"], {"a": torch.tensor([3.0, 0.0, 2.0, 1.0])})
    reference, whole, high, low = seen
    assert torch.equal(whole[0], torch.full((4, 2), 0.5))
    assert torch.equal(high[0][[0, 2]], torch.full((2, 2), 0.5)) and torch.equal(high[0][[1, 3]], torch.zeros(2, 2))
    assert torch.equal(low[1][[1, 3]], torch.full((2, 2), 0.5)) and torch.equal(low[1][[0, 2]], torch.ones(2, 2))


# ---------------------------------------------------------------- end to end


def test_confirmation_run_refuses_an_uncommitted_protocol(tiny_protocol, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.main(["--config", str(tiny_protocol), "--out", str(tmp_path / "out")])
    assert "commit the protocol before the confirmation run" in capsys.readouterr().err


def test_missing_dataset_names_the_debian_package(tiny_protocol, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("merging.datamodules.idx.DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    raw = yaml.safe_load(tiny_protocol.read_text())
    raw["data"]["root"] = str(tmp_path / "nowhere")
    tiny_protocol.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit):
        run.main(["--config", str(tiny_protocol), "--seeds", "100", "--out", str(tmp_path / "o")])
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_short_run_writes_every_claim_and_reuses_records(tiny_protocol, tmp_path, monkeypatch):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--config", str(tiny_protocol), "--seeds", "100", "101", "--out", str(out), "--work", str(work)]
    result = run.main([*args, "--jobs", "1"])
    written = json.loads((out / "claims.json").read_text())
    assert [c["name"] for c in written["claims"]] == list(readout.CLAIMS)
    assert written["seeds"] == [100, 101] and written["protocol_uncommitted"] and not written["confirmation"]
    for claim in written["claims"]:
        assert claim["rows"], claim["name"]
        for row in claim["rows"]:
            assert row["seeds"] == [100, 101] and len(row["values"]) == 2
    assert any(r["row"].endswith("− average") for r in written["claims"][3]["rows"])
    assert (out / "claims.png").stat().st_size > 0
    markdown = (out / "claims.md").read_text()
    assert "`mties_vs_ties`" in markdown and "not the confirmation set" in markdown
    assert result["claims"] == written["claims"]

    def no_training(*a, **k):
        raise AssertionError("a cached seed was run again")

    monkeypatch.setattr(run, "run_one", no_training)
    again = run.main([*args, "--jobs", "1", "--out", str(tmp_path / "again")])
    assert again["claims"] == written["claims"]


@pytest.mark.cuda
@pytest.mark.slow
def test_short_run_on_a_gpu(tiny_protocol, tmp_path):
    """The fits run on the GPU (the evaluations stay on the CPU, where the bundles are)."""
    out = tmp_path / "out"
    args = ["--config", str(tiny_protocol), "--seeds", "100", "--out", str(out), "--work", str(tmp_path / "w")]
    run.main([*args, "--jobs", "1", "--accelerator", "gpu"])
    written = json.loads((out / "claims.json").read_text())
    assert written["hardware"]["accelerator"] == "gpu" and len(written["claims"]) == len(readout.CLAIMS)
