"""NeuLig's maths against the spec: the loss terms on hand-computed cases, the weighted-offset
constraint Σ_k β_k ε*_k = 0 after every optimizer step of a fit, and the ablation script."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from merging.bundle import ExpertBundle
from merging.datamodules import DigitsTasks
from merging.models import build_backbone
from merging.modules.neulig import NeuLigModule
from merging.neulig import (
    alignment_residual,
    concat_features,
    constrained_coopvec,
    expert_features,
    merged_features,
    modified_offsets,
    neulig_loss,
    offset_scalars,
    project_coopvec,
)

GROUPS = [[0, 1], [2, 3], [4, 5]]
BACKBONE = {"in_features": 64, "hidden": 8, "depth": 2}
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "neulig_ablation.py"


# --------------------------------------------------------------------------- loss terms by hand


def test_offsets_match_hand_computation():
    # K = 2: θ = [1,2,3], [3,4,5]; θ̄ = [2,3,4]; o = (-3, 3); unbiased std √18; ε* = (-1, 1)/√2
    eps2 = offset_scalars(torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]))
    torch.testing.assert_close(eps2, torch.tensor([-1.0, 1.0], dtype=torch.float64) / math.sqrt(2))
    # K = 3 scalars 0, 1, 5: θ̄ = 2, o = (-2, -1, 3), std √((4 + 1 + 9) / 2) = √7
    eps3 = offset_scalars(torch.tensor([[0.0], [1.0], [5.0]]))
    torch.testing.assert_close(eps3, torch.tensor([-2.0, -1.0, 3.0], dtype=torch.float64) / math.sqrt(7))
    # streamed over state-dict entries = flattened (the sum over parameters is order-free)
    experts = [
        {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])},
        {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([5.0])},
    ]
    torch.testing.assert_close(modified_offsets(experts), eps2)


def test_joint_loss_terms_match_hand_computation():
    eps_star = torch.tensor([-1.0, 1.0]) / math.sqrt(2)
    beta = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    reg = alignment_residual(beta, eps_star)
    # r_b = (β_b2 − β_b1)/√2 -> r² = (0.18, 0.08); L_a = mean = 0.13 (= mean (β1 − β2)²/2, spec 1b.3)
    torch.testing.assert_close(reg, torch.tensor([-0.6, 0.4]) / math.sqrt(2))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 1])
    ce = ((math.log(math.exp(2) + 2) - 2) + (math.log(math.e + 2) - 1)) / 2
    sup = neulig_loss(logits, reg, target, "sup", scaling=100.0)
    assert float(sup.alignment) == pytest.approx(0.13, abs=1e-6)
    assert float(sup.task) == pytest.approx(ce, abs=1e-6)
    assert float(sup.total) == pytest.approx(ce + 0.13 / 100, abs=1e-6)  # L = β L_b + α L_a, β = 1, α = 0.01

    def entropy(row: list[float]) -> float:
        z = sum(math.exp(v) for v in row)
        return -sum(math.exp(v) / z * math.log(math.exp(v) / z + 1e-6) for v in row)

    semi = neulig_loss(logits, reg, None, "semi", scaling=10.0)
    expected = (entropy([2.0, 0.0, 0.0]) + entropy([0.0, 1.0, 0.0])) / 2
    assert float(semi.task) == pytest.approx(expected, abs=1e-6)
    assert float(semi.total) == pytest.approx(expected + 0.13 / 10, abs=1e-6)
    assert float(neulig_loss(logits, reg, target, "sup", scaling=math.inf).total) == pytest.approx(ce, abs=1e-6)


def test_projection_satisfies_constraint_keeps_the_sum_and_is_idempotent():
    gen = torch.Generator().manual_seed(0)
    eps_star = offset_scalars(torch.randn(4, 10, generator=gen)).float()
    beta = torch.softmax(torch.randn(16, 4, generator=gen), dim=1).requires_grad_(True)
    projected = project_coopvec(beta, eps_star)
    torch.testing.assert_close(projected @ eps_star, torch.zeros(16), atol=1e-6, rtol=0)
    torch.testing.assert_close(projected.sum(1), torch.ones(16))
    torch.testing.assert_close(project_coopvec(projected, eps_star), projected)
    projected.sum().backward()  # differentiable: Portland trains through it
    assert beta.grad is not None
    torch.testing.assert_close(project_coopvec(beta, torch.zeros(4)), beta)  # identical experts
    assert constrained_coopvec(beta, eps_star, "soft") is beta
    with pytest.raises(ValueError, match="constraint must be one of"):
        constrained_coopvec(beta, eps_star, "exact")  # type: ignore[arg-type]


def test_per_batch_mean_merges_once_from_the_mean_coopvec():
    skeleton = build_backbone("mlp", in_features=8, hidden=6, depth=2).eval()
    gen = torch.Generator().manual_seed(1)
    experts = [
        {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in skeleton.state_dict().items()} for _ in range(3)
    ]
    x = torch.randn(5, 8, generator=gen)
    beta = torch.softmax(torch.randn(5, 3, generator=gen), dim=1)
    torch.testing.assert_close(
        merged_features(skeleton, experts, x, beta, "per_batch_mean"),
        merged_features(skeleton, experts, x, beta.mean(0), "static"),
    )


# --------------------------------------------------------------------------- the constraint during a fit


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """Three experts = one random MLP base plus seeded perturbations, with random heads."""
    gen = torch.Generator().manual_seed(0)
    dm = DigitsTasks(groups=GROUPS, batch_size=64, seed=0)
    base_model = build_backbone("mlp", **BACKBONE)
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    experts = [{k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in GROUPS]
    heads = [{k: v.detach().clone() for k, v in nn.Linear(8, len(g)).state_dict().items()} for g in GROUPS]
    directory = tmp_path_factory.mktemp("neulig_constraint") / "bundle"
    ExpertBundle("mlp", BACKBONE, 1, dm.task_names, dm.num_classes, base, experts, heads).save(directory)
    return directory


class ConstraintChecker(Callback):
    """Checks, after **every** optimizer step, the CoopVecs of a fixed probe batch: on the
    simplex before the constraint, Σβ = 1 after it, |Σ_k β_k ε*_k| ≤ tol under ``"hard"``; ε*
    and the experts unchanged. Observes only (no_grad, nothing written to the module)."""

    def __init__(self, probe: torch.Tensor, tol: float = 1e-6) -> None:
        self.probe = probe
        self.tol = tol
        self.steps = 0
        self.residuals: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.eps_star = modified_offsets(pl_module.expert_states).float()
        self.experts = [{k: v.clone() for k, v in e.items()} for e in pl_module.expert_states]
        trainer.optimizers[0].register_step_post_hook(lambda optimizer, args, kwargs: self.check(pl_module))

    @torch.no_grad()
    def check(self, pl_module) -> None:
        self.steps += 1
        features = expert_features(pl_module.skeleton, pl_module.expert_states, self.probe)
        raw = pl_module.portland(concat_features(features))
        assert bool((raw >= 0).all())
        torch.testing.assert_close(raw.sum(1), torch.ones(raw.shape[0]))
        beta = constrained_coopvec(raw, pl_module.eps_star, pl_module.hparams.constraint)
        torch.testing.assert_close(beta.sum(1), torch.ones(beta.shape[0]))
        residual = float(alignment_residual(beta, pl_module.eps_star).abs().max())
        self.residuals.append(residual)
        if pl_module.hparams.constraint == "hard":
            assert residual <= self.tol, f"step {self.steps}: |Σβε*| = {residual}"
        torch.testing.assert_close(pl_module.eps_star, self.eps_star)
        for live, kept in zip(pl_module.expert_states, self.experts, strict=True):
            for key in kept:
                assert torch.equal(live[key], kept[key]), key


def fit(bundle_dir: Path, root: Path, constraint: str, callbacks: list) -> NeuLigModule:
    model = NeuLigModule(str(bundle_dir), constraint=constraint, lr=5e-2, coopvec_plot=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(model, DigitsTasks(groups=GROUPS, batch_size=64, seed=0))
    return model


def probe_inputs() -> torch.Tensor:
    dm = DigitsTasks(groups=GROUPS, batch_size=64, seed=0)
    dm.setup("fit")
    return torch.cat([next(iter(dm.task_dataloader(t, "train", shuffle=False)))[0][:8] for t in range(3)])


def test_hard_constraint_holds_after_every_optimizer_step(bundle_dir, tmp_path):
    checker = ConstraintChecker(probe_inputs())
    model = fit(bundle_dir, tmp_path, "hard", [checker])
    assert checker.steps == 2 * 3 * len(GROUPS)  # one Adam step per task per batch
    assert max(checker.residuals) <= 1e-6
    # the soft constraint leaves r free: the check is not vacuous
    soft = ConstraintChecker(probe_inputs())
    fit(bundle_dir, tmp_path, "soft", [soft])
    assert soft.steps == checker.steps and max(soft.residuals) > 1e-3
    assert model.hparams.constraint == "hard"


def test_checking_callback_only_observes(bundle_dir, tmp_path):
    watched = fit(bundle_dir, tmp_path, "hard", [ConstraintChecker(probe_inputs())])
    plain = fit(bundle_dir, tmp_path, "hard", [])
    for key, value in plain.portland.state_dict().items():
        torch.testing.assert_close(watched.portland.state_dict()[key], value, rtol=0, atol=0)


def test_module_validates_constraint_and_mode(bundle_dir):
    with pytest.raises(ValueError, match="constraint must be one of"):
        NeuLigModule(str(bundle_dir), constraint="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be one of.*per_batch_mean"):
        NeuLigModule(str(bundle_dir), mode="per_task")  # type: ignore[arg-type]
    assert NeuLigModule(str(bundle_dir), mode="per_batch_mean").hparams.mode == "per_batch_mean"


def test_static_mode_calibrates_a_constrained_mean_coopvec(bundle_dir, tmp_path):
    model = NeuLigModule(str(bundle_dir), mode="static", constraint="hard", calibration_samples=32, coopvec_plot=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    logged = trainer.validate(model, DigitsTasks(groups=GROUPS, batch_size=64, seed=0), verbose=False)[0]
    coopvec = model._static_coopvec["val"]
    assert abs(float(coopvec @ model.eps_star)) <= 1e-6 and float(coopvec.sum()) == pytest.approx(1.0)
    assert 0.0 <= logged["val/merged_acc"] <= 1.0


def test_demo_neulig_rows_keeps_its_format_in_every_mode(bundle_dir):
    from merging.experiments.demo import neulig_rows

    data = DigitsTasks(groups=GROUPS, batch_size=64, seed=0)
    for kwargs in ({}, {"mode": "per_sample"}, {"mode": "per_batch_mean", "constraint": "hard"}):
        rows = neulig_rows(0, str(bundle_dir), data, 1, {"accelerator": "cpu", "devices": 1}, **kwargs)
        assert [r["model"] for r in rows] == ["neulig (merged)", "neulig (ensembled)"]
        for row in rows:
            assert set(row) == {"model", "seed", "test/acc_mean", *(f"test/acc/{n}" for n in data.task_names)}
            assert 0.0 <= row["test/acc_mean"] <= 1.0


# --------------------------------------------------------------------------- the ablation script


def test_ablation_toy_run_writes_markdown_and_json(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("neulig_ablation_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # the script's dataclasses look themselves up
    spec.loader.exec_module(module)
    out = tmp_path / "ablation"
    argv = ["--seeds", "0", "1", "--epochs", "1", "--long-epochs", "2", "--pretrain-epochs", "1"]
    argv += ["--expert-epochs", "1", "--out", str(out), "--work", str(tmp_path / "runs"), "--accelerator", "cpu"]
    summary = module.main(argv)
    text = (tmp_path / "ablation.md").read_text()
    payload = json.loads((tmp_path / "ablation.json").read_text())
    names = [v.name for v in module.variants(1, 2)]
    assert [e["variant"] for e in summary] == names == [e["variant"] for e in payload["summary"]]
    for entry in summary:
        assert f"| {entry['variant']} |" in text
        assert entry["seeds"] == [0, 1]
        assert entry["gap"] == pytest.approx(entry["merged"] - entry["ensembled"])
    oracle = summary[-1]
    assert oracle["gap"] == 0.0 and oracle["gap_sd"] == 0.0  # β = e_t: both branches are expert t
    assert len(payload["runs"]) == 2 * len(names)
