"""Does stopping a drifting expert (``ExpertDriftStopper``) give a better merge than not stopping it?

Set-up: the embedded :class:`~merging.datamodules.DigitsTasks` (4 class-group tasks of scikit-learn's
digits, no download). An MLP backbone is pre-trained briefly on a pretext task (digit parity
× digit ≥ 5, :func:`merging.experiments.diagnostics.pretrain_backbone`) on the tasks' training images;
then 4 experts (backbone copy + own head) are fine-tuned jointly, each on its own task, with
SGD (momentum 0.9). Experts 0-2 use lr 0.05; expert 3 uses 10× that, the heterogeneous,
"over-trained" expert of the L2-stability paper's set-up. Two arms, same seeds:

- ``monitor``: :class:`~merging.callbacks.StabilityMonitor` only (observes);
- ``monitor + stopper``: plus ``ExpertDriftStopper(factor)``, which freezes an expert once
  ‖τ_j‖ exceeds ``factor`` × its peers' median.

Reported per arm (mean over seeds, and per seed): the experts' own test accuracy, the
backbones merged by weight averaging and by task arithmetic (λ = 0.3) evaluated with each
task's own head (mean over tasks, and on the drifting task), the final dispersion D and the
largest drift ratio. Usage::

    .venv/bin/python benchmarks/stability_action.py [--seeds 3] [--epochs 10] [--factor 3]

Writes ``benchmarks/results/stability_action.md`` (atomically; other settings get a suffixed name).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.callbacks import ExpertDriftStopper, StabilityMonitor  # noqa: E402
from merging.datamodules import DigitsTasks  # noqa: E402
from merging.experiments.diagnostics import pretrain_backbone  # noqa: E402
from merging.experiments.trainers import add_hardware_arguments  # noqa: E402
from merging.io import write_text_atomic  # noqa: E402
from merging.methods import get_method  # noqa: E402
from merging.models import build_backbone  # noqa: E402
from merging.modules.protocols import HasExperts  # noqa: E402
from merging.stability import task_vector_stats  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class JointExperts(LightningModule, HasExperts):
    """K experts (a backbone copy and a head each) fine-tuned together, expert t on task t.

    A ``merging.modules.protocols.HasExperts``; heads are not part of the experts'
    state dicts (they are never merged).
    """

    def __init__(self, backbone: dict[str, Tensor], num_classes: list[int], lrs: list[float]) -> None:
        super().__init__()
        self.skeleton = build_backbone("mlp", in_features=64, hidden=64, depth=2)
        self.skeleton.load_state_dict(backbone, strict=True)
        self.skeleton.requires_grad_(False)
        self.experts = nn.ModuleList(copy.deepcopy(self.skeleton).requires_grad_(True) for _ in num_classes)
        self.heads = nn.ModuleList(nn.Linear(64, c) for c in num_classes)
        self.lrs = lrs
        self.task_names: list[str] = []

    def expert_state_dicts(self) -> list[dict[str, Tensor]]:
        return [e.state_dict() for e in self.experts]

    def base_state_dict(self) -> dict[str, Tensor]:
        return self.skeleton.state_dict()

    def batch_inputs(self, batch: dict) -> Tensor:
        return torch.cat([x for x, _ in batch.values()])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = [
            F.cross_entropy(self.heads[t](self.experts[t](batch[name][0])), batch[name][1])
            for t, name in enumerate(self.task_names)
        ]
        return torch.stack(losses).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [
            {"params": [*e.parameters(), *h.parameters()], "lr": lr}
            for e, h, lr in zip(self.experts, self.heads, self.lrs, strict=True)
        ]
        return torch.optim.SGD(groups, momentum=0.9)


@torch.no_grad()
def task_accuracy(backbone: nn.Module, state: dict[str, Tensor], head: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    logits = head(torch.func.functional_call(backbone, state, (x,)))
    return float((logits.argmax(1) == y).double().mean())


def stacked(dataset) -> TensorDataset:
    xs, ys = zip(*[dataset[i] for i in range(len(dataset))], strict=True)
    return TensorDataset(torch.stack(xs), torch.as_tensor(ys))


def run_arm(stopper: bool, seed: int, args, dm: DigitsTasks, backbone: dict[str, Tensor]) -> dict:
    seed_everything(seed, verbose=False)
    k = dm.num_tasks
    lrs = [args.lr] * (k - 1) + [args.lr * args.drift_lr_factor]
    model = JointExperts(backbone, dm.num_classes, lrs)
    model.task_names = dm.task_names
    names = dm.task_names
    per_expert_batch = lambda batch: [len(batch[name][1]) for name in names]  # noqa: E731
    callbacks = [StabilityMonitor(every_n_steps=10, sparsifiers=(), report=False, batch_size_fn=per_expert_batch)]
    if stopper:
        callbacks.append(ExpertDriftStopper(factor=args.factor, min_steps=args.min_steps))
    with tempfile.TemporaryDirectory() as root:
        Trainer(
            accelerator=args.accelerator,
            devices=args.devices,
            max_epochs=args.epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=callbacks,
        ).fit(model, datamodule=dm)
    experts = [{k_: v.clone() for k_, v in e.items()} for e in model.expert_state_dicts()]
    base = model.base_state_dict()
    tests = [stacked(dm.dataset(t, "test")) for t in range(k)]
    skeleton = model.skeleton
    own = [task_accuracy(skeleton, experts[t], model.heads[t], tests[t]) for t in range(k)]
    merges = {
        "average": get_method("average").merge(experts),
        "task_arithmetic": get_method("task_arithmetic", scaling=0.3).merge(experts, base),
    }
    merged = {
        name: [task_accuracy(skeleton, state, model.heads[t], tests[t]) for t in range(k)]
        for name, state in merges.items()
    }
    stats = task_vector_stats(experts, base)
    stopped = callbacks[1].stopped if stopper else {}
    return {
        "own": own,
        "merged": merged,
        "dispersion": stats.dispersion,
        "max_ratio": float(torch.as_tensor(model.trainer.callback_metrics["stability/max_drift_ratio"])),
        "stopped": stopped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--drift-lr-factor", type=float, default=10.0, help="lr multiple of the last expert")
    parser.add_argument("--factor", type=float, default=3.0, help="ExpertDriftStopper factor")
    parser.add_argument("--min-steps", type=int, default=0)
    add_hardware_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU

    dm = DigitsTasks(batch_size=32, seed=0)
    dm.setup("fit")
    images = torch.cat([stacked(dm.dataset(t, "train")).tensors[0] for t in range(dm.num_tasks)])
    digits = torch.cat(
        [torch.tensor(dm.groups[t])[stacked(dm.dataset(t, "train")).tensors[1]] for t in range(dm.num_tasks)]
    )
    backbone = pretrain_backbone("mlp", TensorDataset(images, digits), epochs=3, lr=0.1, batch_size=64, seed=0)

    arms = {"monitor": False, "monitor + stopper": True}
    results = {
        arm: [run_arm(flag, seed, args, dm, backbone) for seed in range(args.seeds)] for arm, flag in arms.items()
    }
    drifting = dm.num_tasks - 1

    def mean(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    lines = [
        "# ExpertDriftStopper against no stopper",
        "",
        f"DigitsTasks ({dm.num_tasks} tasks), MLP experts from a pretext-pre-trained backbone, {args.epochs} epochs, "
        f"SGD lr {args.lr} (expert {drifting}: ×{args.drift_lr_factor:g}), stopper factor {args.factor}, "
        f"{args.seeds} seeds (mean ± std). Test accuracy with each task's own head.",
        "",
        "| arm | experts' own acc (mean) | drifting expert's own acc | average: mean acc | average: drifting task "
        "| TA λ=0.3: mean acc | TA: drifting task | D | max drift ratio | stopped (expert@step) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, runs in results.items():
        stopped = "; ".join(", ".join(f"{j}@{s}" for j, s in sorted(r["stopped"].items())) or "none" for r in runs)
        lines.append(
            f"| {arm} | {mean([statistics.mean(r['own']) for r in runs])} | {mean([r['own'][drifting] for r in runs])} "
            f"| {mean([statistics.mean(r['merged']['average']) for r in runs])} "
            f"| {mean([r['merged']['average'][drifting] for r in runs])} "
            f"| {mean([statistics.mean(r['merged']['task_arithmetic']) for r in runs])} "
            f"| {mean([r['merged']['task_arithmetic'][drifting] for r in runs])} "
            f"| {mean([r['dispersion'] for r in runs])} | {mean([r['max_ratio'] for r in runs])} | {stopped} |"
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    defaults = args.drift_lr_factor == 10.0 and args.min_steps == 0 and args.factor == 3.0
    name = (
        "stability_action"
        if defaults
        else f"stability_action_x{args.drift_lr_factor:g}_f{args.factor:g}_min{args.min_steps}"
    )
    write_text_atomic(RESULTS / f"{name}.md", text)


if __name__ == "__main__":
    main()
