"""Overhead of MLossMonitor during training, and the cost of one m_loss call.

1. Training-step time of small models with ``MLossMonitor`` at its default schedule
   (every ``DEFAULT_EVERY_N_TRAIN_STEPS`` steps, 2 cached batches), from a step timer
   between consecutive ``on_train_batch_end`` calls. The overhead is the extra time of the
   measuring steps over the median step, spread over the schedule's period:
   (t_measuring − median) / (N · median). This is robust on a shared, noisy machine; the
   plain mean step time of a fit without the monitor is printed as a cross-check.
2. Wall time of ``m_loss`` (reference ``"pretrained"``, model output included) relative to
   K + 1 plain forward passes over the same inputs, for K = 2 and 4 experts.

Times are the **CPU time of this process** (``time.process_time``) with one torch thread,
which other jobs on a shared machine distort far less than wall-clock time. Random data,
``pretrained=False`` models, no network. Usage::

    .venv/bin/python benchmarks/mloss_overhead.py [--steps 320]

Prints a table and writes ``benchmarks/results/mloss_overhead.md`` (atomically).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import MLossMonitor
from callbacks.mloss_monitor import DEFAULT_EVERY_N_TRAIN_STEPS
from merging.io import write_text_atomic
from merging.mloss import m_loss
from merging.models import MLP, SmallCNN

RESULTS = Path(__file__).resolve().parent / "results" / "mloss_overhead.md"
WARMUP_STEPS = 10


class StepTimer(Callback):
    """Seconds between consecutive training-batch ends (after a warm-up), by global step."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.process_time()
        if self._last is not None and trainer.global_step > WARMUP_STEPS:
            self.times[trainer.global_step] = now - self._last
        self._last = now


class CNNClassifier(LightningModule):
    """SmallCNN backbone + linear head on 1x16x16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = SmallCNN(in_chans=1, width=16, depth=3, num_features=64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _cnn_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(1024, 1, 16, 16, generator=g), torch.randint(0, 10, (1024,), generator=g))
    return DataLoader(data, batch_size=32, shuffle=True)


def _boring_loader() -> DataLoader:
    return DataLoader(RandomDataset(32, 1024), batch_size=32)


def timed_fit(make_model: Callable[[], LightningModule], make_loader, monitor: bool, steps: int) -> dict[int, float]:
    seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks = ([MLossMonitor(heatmap_filename=None)] if monitor else []) + [timer]
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(make_model(), make_loader())
    return timer.times


def step_overhead(steps: int) -> list[tuple[str, float, float, float, float]]:
    """(model, mean step without, median step with, extra per measurement, overhead)."""
    period = DEFAULT_EVERY_N_TRAIN_STEPS
    rows = []
    for name, make_model, make_loader in (
        ("BoringModel (Linear 32->2)", BoringModel, _boring_loader),
        ("SmallCNN 3 blocks + head, batch 32", CNNClassifier, _cnn_loader),
    ):
        plain = statistics.fmean(timed_fit(make_model, make_loader, False, steps).values())
        times = timed_fit(make_model, make_loader, True, steps)
        measuring = [t for step, t in times.items() if step % period == 0]
        median = statistics.median(t for step, t in times.items() if step % period != 0)
        extra = statistics.fmean(measuring) - median
        rows.append((name, plain, median, extra, extra / (period * median)))
    return rows


def _median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def mloss_cost() -> list[tuple[str, int, int, float, float]]:
    from timm.models.vision_transformer import VisionTransformer

    cases = [
        ("SmallCNN", lambda: SmallCNN(in_chans=1, width=16, depth=3, num_features=64), (1, 16, 16)),
        ("MLP 64-128-128 GELU", lambda: MLP(in_features=64, hidden=128, depth=2, act="gelu"), (64,)),
        (
            "ViT (timm, d=64, depth=4, 32x32)",
            lambda: VisionTransformer(
                img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=4, num_heads=4, num_classes=10
            ),
            (3, 32, 32),
        ),
    ]
    rows = []
    for name, build, shape in cases:
        torch.manual_seed(0)
        model = build().eval()
        base = {k: v.clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(32, *shape, generator=g) for _ in range(2)]
        for k in (2, 4):
            experts = [
                {n: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for n, v in base.items()}
                for _ in range(k)
            ]

            def forwards() -> None:
                with torch.no_grad():
                    for state in [base, *experts]:
                        for b in batches:
                            torch.func.functional_call(model, state, (b,))

            t_forward = _median_time(forwards)
            t_mloss = _median_time(lambda: m_loss(model, experts, batches, base=base, check_values=False))
            layers = len(m_loss(model, experts, batches[:1], base=base).layer) - 1
            rows.append((name, k, layers, t_mloss, t_forward))
    return rows


def render(steps: int, overhead_rows, cost) -> str:
    lines = [
        "# MLossMonitor overhead and m_loss cost",
        "",
        f"Command: `.venv/bin/python benchmarks/mloss_overhead.py --steps {steps}`  ",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} thread; "
        "times are this process's CPU time (the machine is shared).",
        "",
        f"## Training step, default schedule (every {DEFAULT_EVERY_N_TRAIN_STEPS} steps, 2 cached batches)",
        "",
        "| model | mean step, no monitor (ms) | median step, monitor (ms) | extra per measurement (ms) "
        "| overhead = extra / (N · median) |",
        "|---|---|---|---|---|",
    ]
    for name, plain, median, extra, overhead in overhead_rows:
        lines.append(f"| {name} | {plain * 1e3:.2f} | {median * 1e3:.2f} | {extra * 1e3:.1f} | {100 * overhead:.1f}% |")
    lines += [
        "",
        "## One m_loss call (2 batches of 32, reference 'pretrained', output measured)",
        "",
        "| model | K | measured layers | m_loss (ms) | K+1 forwards (ms) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, k, layers, t_mloss, t_forward in cost:
        ratio = t_mloss / t_forward
        lines.append(f"| {name} | {k} | {layers} | {t_mloss * 1e3:.1f} | {t_forward * 1e3:.1f} | {ratio:.2f} |")
    lines += [
        "",
        "Per batch, m_loss runs the reference (θ₀) forward with the layer hooks, the K expert",
        "forwards and the averaged model's forward (K + 2 forwards: the output is measured), plus",
        "one traced forward per call; each measured layer adds one batched GEMM/conv of the K",
        "experts and the element-wise gap. The floor is therefore about (K + 2)/(K + 1); the rest",
        "is the gap's element-wise work (large for convs with many output pixels) and, for tiny",
        "models, Python overhead.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=320, help="training steps per fit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = render(args.steps, step_overhead(args.steps), mloss_cost())
    print(table)
    write_text_atomic(RESULTS, table)


if __name__ == "__main__":
    main()
