"""Overhead of MLossMonitor during training, and the cost of one m_loss call.

1. **Training-step overhead at the default schedule** (one measurement every
   ``DEFAULT_EVERY_N_TRAIN_STEPS`` = N steps, 2 cached batches), as **paired blocks inside
   one fit**: the fit is cut into blocks of N optimizer steps; the monitor (default
   settings, its ``should_measure`` policy overridden) measures at the end of every "B"
   block and not in the "A" blocks, in the order A B B A A B ... (each pair adjacent, so
   the machine's load drifts over both arms, and the ABBA order cancels a linear drift).
   Block 0 is a warm-up (its measurement builds the meter and fills the forward cache) and
   is left out. Overhead = Σ time(B) / Σ time(A) − 1, plus the monitor's own hooks on steps
   that do not measure (timed directly: they only cache the first batches and check the
   schedule). Whole fits with and without the monitor differ by ±15 % from one run to the
   next on a shared machine, far more than the effect measured here; adjacent blocks of
   one fit differ less. The *direct* overhead beside it is the time spent inside the
   monitor's hooks in a measuring block over the block's time: exact accounting, blind only
   to indirect effects such as the caches a measurement evicts. After the timed blocks one
   more block of N steps counts, without timing, what the monitor's hooks dispatch
   (:class:`merging._opcount.OpCounter`, operators on the fit's device only): the kernels and
   host-device syncs of one measurement (its logging included) and of an average step that
   does not measure; on a GPU also the syncs CUDA itself reports
   (``torch.cuda.set_sync_debug_mode("warn")``), which include host-to-device copies. These
   counts, not the CPU's timing, are what a GPU pays per launch (a few µs each) and per sync
   (the host waits for the queue to drain). Cases:

   - **the digits default**: ``MultiExpertModule`` (SmallCNN width 16, K = 4 experts, one
     per task) on ``DigitsTasks(batch_size=32)``, as ``merging/experiments/demo.py`` fine-tunes it;
   - a single SmallCNN (measured against its start-of-fit snapshot), batch 32 of 1x16x16;
   - Lightning's ``BoringModel`` (one Linear; only the output is measured).

2. **One m_loss call** against its floor: per batch, the reference forward (θ₀, hooks) and
   the K experts' measured layers on the hooked inputs (``output=False``): floor =
   t(forward) + K · t(measured layers); with the model output (``output=True``) the K expert
   forwards and the averaged model's forward add (K + 1) · t(forward). t(measured layers) is
   the time of the measured ``nn.Linear``/``nn.Conv`` modules alone on their hooked inputs.
   A call also traces the layers with one forward of its first batch.

On the CPU, times are the **CPU time of this process** (``time.process_time``) with one torch
thread, which other jobs on a shared machine distort far less than wall-clock time. With
``--device cuda`` the Trainers run on that GPU (``accelerator="gpu"``) and m_loss on its
tensors; times are wall-clock after ``torch.cuda.synchronize`` (at every step end, in both
arms), and each case's peak CUDA memory is reported. ``--precision bf16-mixed`` fits under
autocast (the goal: under 5% of step time in fp32 and bf16 on a GPU, at the default
schedule, on the digits default). The header gives the device, the torch version and the
copy bandwidth. Random or bundled data (scikit-learn digits), ``pretrained=False`` models, no
network. Usage::

    .venv/bin/python benchmarks/mloss_overhead.py [--scale 1] [--skip-cost] [--device cuda] [--precision bf16-mixed]

Prints a table and writes ``benchmarks/results/mloss_overhead[_cuda][_bf16-mixed].md``
(atomically) and the figures as JSON beside it (``--json``). ``--toy``: blocks of 2 steps, one
pair per case, the small m_loss cases: a code-path check, written under ``results/toy/``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (  # benchmarks/ is on sys.path when run as a script; puts the root first
    add_device_arguments,
    bandwidth_bytes,
    clock,
    copy_bandwidth,
    device_type,
    environment,
    header_line,
    peak_memory_mb,
    reset_peak_memory,
    result_path,
    trainer_hardware,
    write_figures,
)
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from merging._opcount import OpCounter
from merging.callbacks import MLossMonitor
from merging.callbacks.mloss_monitor import DEFAULT_EVERY_N_TRAIN_STEPS
from merging.io import write_text_atomic
from merging.mloss import find_activation_layers, m_loss
from merging.models import MLP, SmallCNN

PERIOD = DEFAULT_EVERY_N_TRAIN_STEPS
OVERHEAD_GOAL = {"cuda": 0.05}
"""MLossMonitor's overhead on the digits default at its default schedule, the goal per device
type (issue 20), in fp32 and bf16-mixed."""
GOAL_CASE = "digits default: MultiExpertModule, SmallCNN w16, K=4, DigitsTasks batch 32"

_now = time.process_time
"""The clock: :func:`_common.clock` of the device (set in :func:`main`)."""


class StepClock(Callback):
    """Process CPU time at the end of every optimizer step (registered after the monitor, so
    a measurement is charged to the step it follows)."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.at[trainer.global_step] = _now()


class DeviceOpCounter(OpCounter):
    """:class:`OpCounter` of the operators that touch a tensor on ``device_type`` (all of them
    on the CPU): on a GPU run the host-side work (CPU tensors the monitor logs) is left out."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.device_type != "cpu" and not _on_device((args, kwargs or {}), self.device_type):
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _on_device(value: Any, device_type: str) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type == device_type
    if isinstance(value, torch.device):
        return value.type == device_type
    if isinstance(value, (list, tuple)):
        return any(_on_device(v, device_type) for v in value)
    if isinstance(value, dict):
        return any(_on_device(v, device_type) for v in value.values())
    return False


@contextmanager
def cuda_sync_warnings(device_type: str) -> Iterator[list]:
    """The syncs CUDA reports inside the block (``torch.cuda.set_sync_debug_mode("warn")``:
    ``.item()``, host reads, host-to-device copies from pageable memory, ...): the list of
    warnings, empty on other devices."""
    if device_type != "cuda":
        yield []
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    caught[:] = [w for w in caught if "synchroniz" in str(w.message)]


@dataclass
class HookCounts:
    """Kernels and syncs the monitor's hooks dispatched in the counting block."""

    measure_kernels: int = 0
    measure_syncs: int = 0
    measure_ops: str = ""  # OpCounter.summary of the measurement
    other_kernels: int = 0  # summed over the steps that do not measure
    other_syncs: int = 0
    other_steps: int = 0
    measure_cuda_syncs: int | None = None  # what CUDA reports (None off CUDA)
    other_cuda_syncs: int | None = None
    logged: int = 0  # values one measurement logs


class BlockMonitor(MLossMonitor):
    """MLossMonitor (default settings) that measures at the end of the given blocks of
    ``period`` steps only, times its own hooks, and counts them in block ``count_block``."""

    def __init__(self, measured: set[int], period: int = PERIOD, count_block: int = -1, device_type: str = "cpu"):
        super().__init__(heatmap_filename=None)
        self.measured = measured | {count_block}
        self.period = period
        self.hook_time: dict[int, float] = {}
        self.count_block = count_block
        self.device_type = device_type
        self.counts = HookCounts(
            measure_cuda_syncs=0 if device_type == "cuda" else None,
            other_cuda_syncs=0 if device_type == "cuda" else None,
        )

    def should_measure(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None:
            return False
        step = step_idx + 1
        return step % self.period == 0 and step // self.period - 1 in self.measured

    def _counting(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is in the counting block."""
        return (step - 1) // self.period == self.count_block

    def _count(self, step: int, hook: Callable[[], None]) -> None:
        """Run one hook of step ``step`` under the counters, charged to the measurement if
        the step measures, else to the other steps."""
        with DeviceOpCounter(self.device_type) as ops, cuda_sync_warnings(self.device_type) as cuda:
            hook()
        c = self.counts
        if self.should_measure(step_idx=step - 1):
            c.measure_kernels += ops.kernel_total
            c.measure_syncs += ops.sync_total
            c.measure_ops = ops.summary(6) if ops.kernel_total else c.measure_ops
            if c.measure_cuda_syncs is not None:
                c.measure_cuda_syncs += len(cuda)
        else:
            c.other_kernels += ops.kernel_total
            c.other_syncs += ops.sync_total
            if c.other_cuda_syncs is not None:
                c.other_cuda_syncs += len(cuda)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step + 1
        if self._counting(step):
            parent = super().on_train_batch_start
            self._count(step, lambda: parent(trainer, pl_module, batch, batch_idx))
            return
        start = _now()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.hook_time[step] = _now() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._counting(step):
            self.counts.other_steps += 0 if self.should_measure(step_idx=step - 1) else 1
            parent = super().on_train_batch_end
            self._count(step, lambda: parent(trainer, pl_module, outputs, batch, batch_idx))
            return
        start = _now()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.hook_time[step] = self.hook_time.get(step, 0.0) + _now() - start

    def _log(self, pl_module, report, *, on_epoch: bool) -> None:
        self.counts.logged = len(report.scalars(self.log_prefix))
        super()._log(pl_module, report, on_epoch=on_epoch)


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


def _cnn_case() -> tuple[LightningModule, Any]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(1024, 1, 16, 16, generator=g), torch.randint(0, 10, (1024,), generator=g))
    return CNNClassifier(), DataLoader(data, batch_size=32, shuffle=True)


def _boring_case() -> tuple[LightningModule, Any]:
    return BoringModel(), DataLoader(RandomDataset(32, 1024), batch_size=32)


def _digits_case() -> tuple[LightningModule, Any]:
    from merging.datamodules import DigitsTasks
    from merging.modules import MultiExpertModule

    return MultiExpertModule(backbone_kwargs={"width": 16}), DigitsTasks(seed=0, batch_size=32)


CASES: dict[str, tuple[Callable[[], tuple[LightningModule, Any]], int]] = {
    # case: (builder, block pairs at --scale 1: faster steps get more pairs)
    "digits default: MultiExpertModule, SmallCNN w16, K=4, DigitsTasks batch 32": (_digits_case, 16),
    "SmallCNN + head vs its snapshot (K=2), batch 32 of 1x16x16": (_cnn_case, 32),
    "BoringModel (Linear 32->2, output only, K=2)": (_boring_case, 120),
}


@dataclass
class Overhead:
    case: str
    step: float  # mean step of the A blocks (s)
    extra_per_measurement: float  # mean of time(B) − time(A) over the pairs (s)
    hooks_per_step: float  # the monitor's hooks on steps that do not measure (s)
    monitor_per_period: float  # the monitor's hooks over a B block, its measurement included (s)
    blocks: float  # Σ B / Σ A − 1
    pairs: list[float]  # per pair: time(B) / time(A) − 1
    period: int = PERIOD  # steps per block
    peak_mb: float | None = None  # peak CUDA memory of the fit (None on the CPU)
    counts: HookCounts = field(default_factory=HookCounts)  # the counting block's

    @property
    def overhead(self) -> float:
        return self.blocks + self.hooks_per_step / self.step

    @property
    def direct(self) -> float:
        """The monitor's own time per period over the period's training time."""
        return self.monitor_per_period / (self.period * self.step)


def paired_blocks(
    case: str,
    make: Callable[[], tuple[LightningModule, Any]],
    pairs: int,
    hardware: dict | None = None,
    period: int = PERIOD,
    precision: str = "32-true",
) -> Overhead:
    """One fit of (2 + 2·pairs)·period steps, measuring in block 0, in the B blocks and in the
    last block, whose hooks are counted (:class:`HookCounts`) instead of timed."""
    order = []  # (A block, B block) per pair, in the order A B, B A, A B, ...
    for r in range(pairs):
        first, second = 1 + 2 * r, 2 + 2 * r
        order.append((first, second) if r % 2 == 0 else (second, first))
    seed_everything(0, verbose=False)
    model, data = make()
    hardware = hardware or {"accelerator": "cpu"}
    device = f"cuda:{hardware['devices'][0]}" if hardware["accelerator"] == "gpu" else "cpu"
    monitor = BlockMonitor({0} | {b for _, b in order}, period, 1 + 2 * pairs, device_type(device))
    clock = StepClock()
    reset_peak_memory(device)
    trainer = Trainer(
        **hardware,
        precision=precision,
        max_steps=(2 + 2 * pairs) * period,
        limit_val_batches=0,
        callbacks=[monitor, clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if isinstance(data, DataLoader):
        trainer.fit(model, data)
    else:
        trainer.fit(model, datamodule=data)
    at = clock.at
    block = {b: at[(b + 1) * period] - at[b * period] for b in range(1, 1 + 2 * pairs)}
    a_time = sum(block[a] for a, _ in order)
    b_time = sum(block[b] for _, b in order)
    a_steps = [s for a, _ in order for s in range(a * period + 1, (a + 1) * period + 1)]
    hooks = statistics.fmean(monitor.hook_time.get(s, 0.0) for s in a_steps)
    b_steps = [s for _, b in order for s in range(b * period + 1, (b + 1) * period + 1)]
    monitor_time = sum(monitor.hook_time.get(s, 0.0) for s in b_steps) / pairs
    logging.info("%s: %s", case, ", ".join(f"{100 * (block[b] / block[a] - 1):+.1f}%" for a, b in order))
    return Overhead(
        case=case,
        step=a_time / (pairs * period),
        extra_per_measurement=(b_time - a_time) / pairs,
        hooks_per_step=hooks,
        monitor_per_period=monitor_time,
        blocks=b_time / a_time - 1,
        pairs=[block[b] / block[a] - 1 for a, b in order],
        period=period,
        peak_mb=peak_memory_mb(device),
        counts=monitor.counts,
    )


def _median_time(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = _now()
        fn()
        times.append(_now() - start)
    return statistics.median(times)


@dataclass
class Cost:
    model: str
    experts: int
    layers: int
    forward: float  # one forward over the batches (s)
    measured_layers: float  # the measured modules alone on their hooked inputs (s)
    layers_only: float  # m_loss(output=False)
    with_output: float  # m_loss(output=True)


def _layer_time(model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, int]:
    """Time of the measured modules alone on their hooked inputs, over the batches."""
    names = list(find_activation_layers(model, batches[0]))
    modules = dict(model.named_modules())
    captured: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [
        modules[n].register_forward_pre_hook(lambda m, args: captured.append((m, args[0].clone()))) for n in names
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()

    def run() -> None:
        with torch.no_grad():
            for module, x in captured:
                module(x)

    return _median_time(run), len(names)


def mloss_cost(device: str = "cpu", toy: bool = False) -> list[Cost]:
    from timm.models.vision_transformer import VisionTransformer

    cases = [
        ("SmallCNN w16 (digits), 2 x 128 of 1x8x8", lambda: SmallCNN(in_chans=1, width=16), (1, 8, 8), 128),
        ("MLP 64-128-128 GELU, 2 x 32", lambda: MLP(in_features=64, hidden=128, depth=2, act="gelu"), (64,), 32),
        (
            "ViT (timm, d=192, depth 4, 32x32 / 4), 2 x 32",
            lambda: VisionTransformer(
                img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=4, num_heads=3, num_classes=10
            ),
            (3, 32, 32),
            32,
        ),
    ]
    if toy:
        cases = [(f"{name} (toy: batches of 4)", build, shape, 4) for name, build, shape, _ in cases[:2]]
    rows = []
    for name, build, shape, batch in cases:
        torch.manual_seed(0)
        model = build().eval().to(device)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(batch, *shape, generator=g).to(device) for _ in range(2)]
        t_layers, num_layers = _layer_time(model, batches)

        def forward() -> None:
            with torch.no_grad():
                for b in batches:
                    torch.func.functional_call(model, base, (b,))

        t_forward = _median_time(forward)
        for k in (2, 4):
            experts = [
                {
                    n: v + 0.01 * torch.randn(v.shape, generator=g).to(device) if v.is_floating_point() else v
                    for n, v in base.items()
                }
                for _ in range(k)
            ]

            def run(output: bool) -> Callable[[], object]:
                return lambda: m_loss(model, experts, batches, base=base, output=output, check_values=False)

            rows.append(
                Cost(name, k, num_layers, t_forward, t_layers, _median_time(run(False)), _median_time(run(True)))
            )
    return rows


def render(
    overhead: list[Overhead],
    cost: list[Cost],
    command: str,
    device: str = "cpu",
    bandwidth: float | None = None,
    precision: str = "32-true",
    toy: bool = False,
) -> str:
    kind = device_type(device)
    period = overhead[0].period if overhead else PERIOD
    times = (
        "times are wall-clock after torch.cuda.synchronize at every step end (both arms)"
        if kind == "cuda"
        else f"times are this process's CPU time, {torch.get_num_threads()} thread (the machine is shared with "
        "other jobs)"
    )
    lines = [
        "# MLossMonitor overhead and m_loss cost" + (" (toy size: a code-path check, not a figure)" if toy else ""),
        "",
        (header_line(device, bandwidth) if bandwidth else f"Device: {device}") + "  ",
        f"Command: `{command}`  ",
        f"Trainer: accelerator {trainer_hardware(device)['accelerator']}, precision {precision}; {times}.",
        "",
        f"## Training-step overhead, {'default schedule' if period == PERIOD else 'toy schedule'} "
        f"(one measurement every {period} steps, 2 cached batches)",
        "",
        f"Paired blocks of {period} steps in one fit, with (B) and without (A) a measurement at the block's end, "
        "in A B / B A order after a warm-up block (its measurement traces the layers and fills the forward "
        "cache); overhead = Σ B / Σ A − 1 + hooks / step.",
        "",
        "| case | pairs | step (ms) | B − A per pair (ms) | hooks per step (µs) | **overhead** "
        "| per pair B / A − 1: median [quartiles] | monitor's own time per period (ms) | direct overhead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in overhead:
        q1, q2, q3 = statistics.quantiles(o.pairs, n=4) if len(o.pairs) > 1 else (o.pairs[0],) * 3
        lines.append(
            f"| {o.case} | {len(o.pairs)} | {o.step * 1e3:.2f} | {o.extra_per_measurement * 1e3:.1f} | "
            f"{o.hooks_per_step * 1e6:.1f} | **{100 * o.overhead:.1f}%** | "
            f"{100 * q2:+.1f}% [{100 * q1:+.1f}%, {100 * q3:+.1f}%] | {o.monitor_per_period * 1e3:.1f} | "
            f"{100 * o.direct:.1f}% |"
        )
    lines += [
        "",
        "Direct overhead: the time spent inside the monitor's hooks during a measuring block (the "
        "measurement, its logging, the per-step checks) over the block's training time; it leaves out "
        "indirect effects (caches the measurement evicts) that the block comparison includes, and is "
        "not blurred by the machine's load.",
    ]
    cuda = kind == "cuda"
    lines += [
        "",
        f"### What the monitor's hooks dispatch (one more block of {period} steps, counted, not timed)",
        "",
        "Kernels: operators on the fit's device that run a kernel (on a GPU each is at least one launch); "
        "syncs: operators that make the host wait for the device (`merging._opcount.OpCounter`)"
        + (
            "; CUDA syncs: what `torch.cuda.set_sync_debug_mode` reports, host-to-device copies included."
            if cuda
            else "; a CPU run cannot see host-to-device copies, which a GPU run adds to the CUDA column."
        ),
        "",
        "| case | logged values | kernels per measurement | syncs per measurement "
        + ("| CUDA syncs per measurement " if cuda else "")
        + "| kernels per other step | syncs per other step "
        + ("| CUDA syncs per other step " if cuda else "")
        + "| the measurement's kernels by operator |",
        "|---|---|---|---|---|---|" + ("---|---|" if cuda else "") + "---|",
    ]
    for o in overhead:
        c = o.counts
        steps = max(c.other_steps, 1)
        cells = [o.case, str(c.logged), str(c.measure_kernels), str(c.measure_syncs)]
        if cuda:
            cells.append(str(c.measure_cuda_syncs))
        cells += [f"{c.other_kernels / steps:.2f}", f"{c.other_syncs / steps:.2f}"]
        if cuda:
            cells.append(f"{(c.other_cuda_syncs or 0) / steps:.2f}")
        cells.append(c.measure_ops or "–")
        lines.append("| " + " | ".join(cells) + " |")
    goal_case = next((o for o in overhead if o.case == GOAL_CASE), None)
    if goal_case is not None:
        goal = OVERHEAD_GOAL.get(kind)
        goal_text = f"goal under {100 * goal:.0f}% on {kind}" if goal else f"goal under 5% on a GPU; none on {kind}"
        figure = f"{100 * goal_case.overhead:.1f}%"
        lines += ["", f"MLossMonitor overhead, digits default, {precision}: {figure} ({goal_text})."]
    peaks = [(o.case, o.peak_mb) for o in overhead if o.peak_mb is not None]
    if peaks:
        lines += ["", "Peak CUDA memory per fit (MB): " + "; ".join(f"{c} {p:.0f}" for c, p in peaks) + "."]
    if cost:
        lines += [
            "",
            "## One m_loss call (2 batches, reference 'pretrained')",
            "",
            "Floor without the output: one forward of θ₀ with the hooks + the K experts' measured layers "
            "(t_fwd + K·t_layers); with the output add the K expert forwards and the averaged model's "
            "((K+2)·t_fwd + K·t_layers).",
            "",
            "| model | K | layers | t_fwd (ms) | t_layers (ms) | m_loss, layers (ms) | ratio to floor "
            "| m_loss + output (ms) | ratio to floor | (m_loss + output) / (K+1) forwards |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in cost:
            floor_layers = c.forward + c.experts * c.measured_layers
            floor_output = floor_layers + (c.experts + 1) * c.forward
            lines.append(
                f"| {c.model} | {c.experts} | {c.layers} | {c.forward * 1e3:.1f} | {c.measured_layers * 1e3:.1f} | "
                f"{c.layers_only * 1e3:.1f} | {c.layers_only / floor_layers:.2f} | {c.with_output * 1e3:.1f} | "
                f"{c.with_output / floor_output:.2f} | {c.with_output / ((c.experts + 1) * c.forward):.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every case's number of block pairs")
    parser.add_argument("--skip-cost", action="store_true", help="only the training-step overhead")
    parser.add_argument("--precision", default="32-true", help="the Trainers' precision: 32-true, bf16-mixed, ...")
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="results table (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    global _now
    device = args.device
    hardware = trainer_hardware(device)
    _now = clock(device, cpu_time=True)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    command = ".venv/bin/python benchmarks/mloss_overhead.py" + (f" --scale {args.scale:g}" if args.scale != 1 else "")
    command += " --skip-cost" if args.skip_cost else ""
    command += f" --device {device}" if device != "cpu" else ""
    command += f" --precision {args.precision}" if args.precision != "32-true" else ""
    command += " --toy" if args.toy else ""
    bandwidth = copy_bandwidth(device, bandwidth_bytes(args.toy))
    period = 2 if args.toy else PERIOD
    overhead = [
        paired_blocks(
            case, make, 1 if args.toy else max(1, round(pairs * args.scale)), hardware, period, args.precision
        )
        for case, (make, pairs) in CASES.items()
    ]
    cost = [] if args.skip_cost else mloss_cost(device, args.toy)
    table = render(overhead, cost, command, device, bandwidth, args.precision, args.toy)
    print(table)
    suffix = "" if args.precision == "32-true" else f"_{args.precision}"
    out = args.out or result_path("mloss_overhead", device, args.toy, "md", suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, table)
    goal_case = next(o for o in overhead if o.case == GOAL_CASE)
    result = environment(device, bandwidth, args.toy) | {
        "benchmark": "mloss_overhead",
        "precision": args.precision,
        "period": period,
        "cases": {
            o.case: {
                "overhead": o.overhead,
                "direct": o.direct,
                "step": o.step,
                "pairs": len(o.pairs),
                "peak_mb": o.peak_mb,
                "kernels_per_measurement": o.counts.measure_kernels,
                "syncs_per_measurement": o.counts.measure_syncs,
                "cuda_syncs_per_measurement": o.counts.measure_cuda_syncs,
                "kernels_per_other_step": o.counts.other_kernels / max(o.counts.other_steps, 1),
                "syncs_per_other_step": o.counts.other_syncs / max(o.counts.other_steps, 1),
                "cuda_syncs_per_other_step": None
                if o.counts.other_cuda_syncs is None
                else o.counts.other_cuda_syncs / max(o.counts.other_steps, 1),
                "logged_values": o.counts.logged,
                "measurement_ops": o.counts.measure_ops,
            }
            for o in overhead
        },
        "overhead": goal_case.overhead,
        "overhead_goal": OVERHEAD_GOAL.get(device_type(device)),
    }
    write_figures(args.json or result_path("mloss_overhead", device, args.toy, "json", suffix), result)
    return result


if __name__ == "__main__":
    main()
