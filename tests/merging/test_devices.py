"""Devices: every tensor the library makes takes its device from its inputs.

Three checks, from the cheapest to the real thing:

- **Default device = meta** (CPU only, real data): with ``torch.set_default_device("meta")``
  a tensor made without a device lands on ``meta`` and fails at its first use beside a CPU
  input (or at ``.item()``). Every merge method and statistic then gives exactly the result
  of a normal run (the same arithmetic on the same device, in one process).
- **FakeTensorMode** ``cuda`` tensors on a CPU-only machine, with a dispatch mode stricter than
  torch (a 0-dim CPU tensor beside a CUDA one is refused too, as ``clamp(min=...)`` does on a
  real GPU): the per-entry maths that needs no data-dependent control flow.
- **CUDA** (marked ``cuda``, skipped without a GPU; ``make test-gpu``): every method on the GPU
  against the CPU within float tolerance, output on the input device, and ``MergedModule``
  and the CLI's merge on the GPU.

MuDSC is left out of the first check: its matching (Hungarian assignment, ZipIt's greedy
merges) runs on the CPU by design (scipy); its similarities and the transformed weights are
on the experts' device, which the CUDA check covers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from merging import _multitensor
from merging._opcount import OpCounter
from merging.datamodules import DigitsTasks
from merging.io import load_state_dict, save_state_dict
from merging.methods import available_methods, get_method
from merging.methods.classic import (
    TaskArithmetic,
    TiesContext,
    TiesMerging,
    WeightAveraging,
    disjoint_mean,
    elect_sign,
    magnitude_threshold,
    ties_disjoint_merge,
    trim_to_density,
)
from merging.methods.neulig import NeuLigMerging
from merging.mloss import m_loss
from merging.modules import MergedModule, MultiExpertModule
from merging.neulig import Portland, mean_coopvec, modified_offsets
from merging.stability import _Accumulator, global_norm, sparsified_task_vector_stats, state_distance, task_vector_stats

K = 3
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@contextlib.contextmanager
def default_device_meta() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)
    )


def _states(model: nn.Module, device: str = "cpu") -> tuple[list[dict], dict]:
    g = torch.Generator().manual_seed(1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [
        {
            k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in base.items()
        }
        for _ in range(K)
    ]
    move = lambda s: {k: v.to(device) for k, v in s.items()}  # noqa: E731
    return [move(e) for e in experts], move(base)


def _data(device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(6, 8, generator=g).to(device) for _ in range(3)]


def _portland_file(tmp_path, num_features: int = 4) -> str:
    path = tmp_path / "portland.safetensors"
    save_state_dict(Portland(num_features, K, generator=torch.Generator().manual_seed(0)).state_dict(), path)
    return str(path)


# Every registered method with settings that exercise its device-sensitive paths.
CASES = [
    ("average", {}),
    ("average", {"weights": [1.0, 2.0, 3.0]}),
    ("task_arithmetic", {}),
    ("ties", {}),
    ("ties", {"scope": "tensor"}),
    ("ties", {"density": 1.0}),
    ("dare", {}),
    ("dare", {"combine": "ties", "density": 0.5}),
    ("mties", {}),
    ("mties", {"backend": "dare", "reference": "incremental"}),
    ("mudsc", {}),
    ("mudsc", {"mode": "zip"}),
    ("neulig", {}),
]


def _case_id(case) -> str:
    name, hparams = case
    return name + "".join(f"-{k}={v}" for k, v in hparams.items())


def test_the_cases_cover_every_registered_method():
    assert {name for name, _ in CASES} == set(available_methods())


def _merger(name: str, hparams: dict, tmp_path, device: str = "cpu"):
    """The merge of ``name`` on ``device``, as a call (its inputs are made now)."""
    model = _model().to(device).eval()
    experts, base = _states(_model(), device)
    data = _data(device)
    if name == "neulig":
        hparams = {"portland": _portland_file(tmp_path), **hparams}
    method = get_method(name, **hparams)
    return lambda: method.merge(experts, base, model=model, data=data)


def _merge(name: str, hparams: dict, tmp_path, device: str = "cpu") -> dict:
    return _merger(name, hparams, tmp_path, device)()


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "mudsc"], ids=_case_id)
def test_merge_makes_no_tensor_without_a_device(case, tmp_path):
    name, hparams = case
    want = _merge(name, hparams, tmp_path)
    merge = _merger(name, hparams, tmp_path)
    with default_device_meta():
        got = merge()
    for key, value in want.items():
        assert got[key].device.type == "cpu", key
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize(
    "case", [c for c in CASES if c[0] in ("average", "task_arithmetic", "ties", "dare")], ids=_case_id
)
def test_gpu_path_makes_no_tensor_without_a_device(case, tmp_path):
    # The multi-tensor path a GPU takes, forced on the CPU tensors.
    name, hparams = case
    with _multitensor.forced():
        want = _merge(name, hparams, tmp_path)
        merge = _merger(name, hparams, tmp_path)
        with default_device_meta():
            got = merge()
    for key, value in want.items():
        assert got[key].device.type == "cpu", key
        assert torch.equal(got[key], value), key


def test_statistics_make_no_tensor_without_a_device():
    model = _model().eval()
    experts, base = _states(model)
    data = _data()
    portland = Portland(4, K, generator=torch.Generator().manual_seed(0))
    float_base = {k: v for k, v in base.items() if v.is_floating_point()}
    floats = [{k: e[k] for k in float_base} for e in experts]
    runs = {
        "task_vector_stats": lambda: task_vector_stats(experts, base, [1.0, 2.0, 3.0]),
        "ties": lambda: sparsified_task_vector_stats(experts, base, method="ties"),
        "ties-tensor": lambda: sparsified_task_vector_stats(experts, base, method="ties", scope="tensor"),
        "dare": lambda: sparsified_task_vector_stats(experts, base, method="dare"),
        "m_loss": lambda: m_loss(model, experts, data, base=base),
        "offsets": lambda: modified_offsets(floats),
        "coopvec": lambda: mean_coopvec(portland, model, experts, data),
        "norms": lambda: (global_norm(list(float_base.values())), state_distance(float_base, floats[0])),
    }
    for name, run in runs.items():
        want = run()
        with default_device_meta():
            got = run()
        if name in ("task_vector_stats", "ties", "ties-tensor", "dare"):
            assert torch.equal(got.gram, want.gram) and got.dispersion == want.dispersion, name
            assert got.sign_conflict == want.sign_conflict and got.layer_dispersion == want.layer_dispersion, name
        elif name == "m_loss":
            assert got.layer == want.layer, name
        elif name == "norms":
            assert got == want, name
        else:
            assert torch.equal(got, want), name


# ----------------------------------------------------------------- FakeTensorMode


class _OneDevicePerOp(TorchDispatchMode):
    """Refuses any op whose tensor arguments sit on more than one device (0-dim CPU tensors
    included, which FakeTensorMode lets through as scalars but some CUDA kernels refuse)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {t.device for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            raise RuntimeError(f"{func}: tensors on {sorted(map(str, devices))}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_cuda() -> Iterator[None]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False), _OneDevicePerOp():
        yield


def test_the_fake_mode_catches_a_device_mix():
    with fake_cuda():
        x = torch.randn(3, 5, device="cuda")
        with pytest.raises(RuntimeError, match="cpu"):
            x.clamp(min=torch.zeros(()))  # what TIES did with its smallest threshold


def test_per_entry_maths_stays_on_the_fake_gpu():
    with fake_cuda():
        tau = torch.randn(K, 6, 5, device="cuda")
        base = torch.randn(6, 5, device="cuda")
        values = [base + torch.randn(6, 5, device="cuda") for _ in range(K)]
        thresholds = magnitude_threshold(tau.reshape(K, -1).abs(), 0.3)
        trimmed = trim_to_density(tau, 0.3, thresholds)
        outputs = [
            thresholds,
            trimmed,
            disjoint_mean(trimmed, elect_sign(trimmed)),
            ties_disjoint_merge(tau.clone(), thresholds),
            trim_to_density(tau, 0.3),
        ]
        weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, device="cuda")
        for method, context in (
            (WeightAveraging(), None),
            (WeightAveraging(weights=[1.0, 2.0, 3.0]), weights),
            (TaskArithmetic(), None),
            (TiesMerging(), TiesContext(thresholds=thresholds, entries=base.numel())),
            (TiesMerging(scope="tensor"), TiesContext(thresholds=None, entries=base.numel())),
            (TiesMerging(density=1.0), TiesContext(thresholds=None, entries=base.numel())),
            (NeuLigMerging(portland="unused"), weights),
        ):
            outputs.append(method.merge_entry("w", values, base, context))
        bf16 = [v.to(torch.bfloat16) for v in values]
        outputs.append(TaskArithmetic().merge_entry("w", bf16, base.to(torch.bfloat16), None))
        acc = _Accumulator(torch.full((K,), 1.0 / K, dtype=torch.float64), None)
        acc.add("layer.w", tau, tau - tau[:1])
        outputs += [v for v in acc.sums.values()] + [
            v for v in acc.layers["layer"].values() if isinstance(v, torch.Tensor)
        ]
        for out in outputs:
            assert out.device.type == "cuda"


def test_gpu_path_stays_on_the_fake_gpu():
    # The multi-tensor merges themselves (the finite check and the threshold search read
    # values on the host, which fake tensors have none of).
    with fake_cuda():
        base = {"w": torch.randn(6, 5, device="cuda"), "b": torch.randn(6, device="cuda")}
        experts = [{k: v + torch.randn(v.shape, device="cuda") for k, v in base.items()} for _ in range(K)]
        half = [{k: v.to(torch.bfloat16) for k, v in e.items()} for e in experts]
        half_base = {k: v.to(torch.bfloat16) for k, v in base.items()}
        thresholds = torch.rand(K, device="cuda")
        keys = list(base)
        merged = []
        for e, b in ((experts, base), (half, half_base)):
            merged.append(WeightAveraging().merge_multi(e, b, keys, None))
            merged.append(WeightAveraging(weights=[1.0, 2.0, 3.0]).merge_multi(e, b, keys, None))
            merged.append(TaskArithmetic().merge_multi(e, b, keys, None))
            context = TiesContext(thresholds=thresholds, entries=base["w"].numel())
            merged.append(TiesMerging().merge_multi(e, b, keys, context))
            merged.append(TiesMerging(density=1.0).merge_multi(e, b, keys, context))
        for out in merged:
            for key, value in out.items():
                assert value.device.type == "cuda" and value.shape == base[key].shape, key


# ------------------------------------------------------------------ MergedModule


def _bundle(root) -> str:
    """A small digits bundle without training: experts are the base plus noise."""
    pl.seed_everything(0)
    data = DigitsTasks()
    module = MultiExpertModule(
        backbone_kwargs={"width": 4, "num_features": 16}, task_names=data.task_names, num_classes=data.num_classes
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for expert in module.experts:
            for p in expert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    module.to_bundle().save(root)
    return str(root)


class _MergedWhen(pl.Callback):
    """Records whether the module had merged at each hook (callbacks run before the module's
    hook), and at the first batch the devices of the module and of its merge (after the run,
    Lightning's teardown moves the module back to the CPU)."""

    def __init__(self) -> None:
        self.seen: dict[str, bool] = {}
        self.devices: set[str] = set()

    def on_test_start(self, trainer, pl_module):
        self.seen["on_test_start"] = pl_module.merge_seconds is not None

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if "first_batch" not in self.seen:
            self.seen["first_batch"] = pl_module.merge_seconds is not None
            self.devices = {pl_module.device.type} | {v.device.type for v in pl_module._states["merged"].values()}


def test_merged_module_merges_after_device_placement(tmp_path):
    module = MergedModule(_bundle(tmp_path / "experts"), method=get_method("ties"), report_ensemble=True)
    spy = _MergedWhen()
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[spy]
    )
    trainer.test(module, DigitsTasks(batch_size=64), verbose=False)
    # Not in setup (before Lightning moves the module) but in the module's on_test_start.
    assert spy.seen == {"on_test_start": False, "first_batch": True} and spy.devices == {"cpu"}


# --------------------------------------------------------------------------- CUDA


def _assert_close_on(got: dict, want: dict, device: str) -> None:
    for key, value in want.items():
        assert got[key].device.type == device, key
        assert got[key].dtype == value.dtype, key
        torch.testing.assert_close(got[key].cpu(), value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_method_on_cuda_matches_the_cpu(case, tmp_path):
    name, hparams = case
    if name == "dare" or hparams.get("backend") == "dare":
        # CUDA draws other masks than the CPU from one seed: compare with the masks off,
        # and check that a seed repeats on the GPU.
        repeat = _merge(name, hparams, tmp_path, "cuda")
        for key, value in _merge(name, hparams, tmp_path, "cuda").items():
            assert value.device.type == "cuda" and torch.equal(value, repeat[key]), key
        hparams = {**hparams, "drop_rate": 0.0} if name == "dare" else {**hparams, "density": 1.0, "spread": 0.0}
    _assert_close_on(_merge(name, hparams, tmp_path, "cuda"), _merge(name, hparams, tmp_path), "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_large_ties_on_cuda_matches_the_cpu_kernels(scope):
    # Over MIN_ENTRIES: the CPU runs the numba kernels and the sampled threshold bracket.
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(1024, 1024, generator=g), "b": torch.randn(512, 512, generator=g)}
    experts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(K)]
    method = get_method("ties", density=0.2, scope=scope)
    want = method.merge(experts, base)
    got = method.merge([{k: v.cuda() for k, v in e.items()} for e in experts], {k: v.cuda() for k, v in base.items()})
    _assert_close_on(got, want, "cuda")


@pytest.mark.cuda
def test_half_precision_experts_on_cuda():
    model = _model()
    experts, base = _states(model, "cuda")
    for dtype in (torch.bfloat16, torch.float16):
        cast = lambda s: {k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()}  # noqa: E731
        for name in ("average", "task_arithmetic", "ties"):
            got = get_method(name).merge([cast(e) for e in experts], cast(base))
            want = get_method(name).merge(
                [{k: v.cpu() for k, v in cast(e).items()} for e in experts], {k: v.cpu() for k, v in cast(base).items()}
            )
            for key, value in want.items():
                assert got[key].device.type == "cuda" and got[key].dtype == value.dtype
                torch.testing.assert_close(got[key].cpu().float(), value.float(), rtol=1e-2, atol=1e-2)


@contextlib.contextmanager
def sync_debug(mode: str) -> Iterator[None]:
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _many_entries(device: str, entries: int = 60) -> tuple[list[dict], dict]:
    g = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": torch.randn(32, 16, generator=g) for i in range(entries)}
    experts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(K)]
    move = lambda s: {k: v.to(device) for k, v in s.items()}  # noqa: E731
    return [move(e) for e in experts], move(base)


@pytest.mark.cuda
def test_gpu_merges_read_the_host_only_in_the_checks():
    experts, base = _many_entries("cuda")
    keys = list(base)
    for name, hparams in (
        ("average", {}),
        ("task_arithmetic", {}),
        ("ties", {}),
        ("dare", {}),
        ("dare", {"combine": "ties"}),
    ):
        method = get_method(name, **hparams)
        context = method.prepare(experts, base)  # TIES's threshold search reads the host per group and round
        torch.cuda.synchronize()
        with sync_debug("error"):  # any synchronising operation raises
            merged = method.merge_multi(experts, base, keys, context)
        assert merged is not None and all(v.device.type == "cuda" for v in merged.values()), name
    # A whole average merge: one host read (the finite check), as counted on the CPU.
    with sync_debug("warn"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_method("average").merge(experts, base)
    assert sum("synchronizing" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["average", "task_arithmetic", "ties", "dare"])
def test_gpu_counts_match_the_forced_cpu_counts(name):
    # The GPU takes the multi-tensor path by itself: the same operators as forced on the CPU.
    counts = []
    for device in ("cuda", "cpu"):
        experts, base = _many_entries(device)
        with _multitensor.forced() if device == "cpu" else contextlib.nullcontext(), OpCounter() as count:
            get_method(name).merge(experts, base)
        counts.append(count)
    assert counts[0].kernels == counts[1].kernels and counts[0].syncs == counts[1].syncs, (
        counts[0].summary(),
        counts[1].summary(),
    )


@pytest.mark.cuda
def test_statistics_on_cuda_match_the_cpu():
    model = _model()
    experts, base = _states(model)
    gpu_experts, gpu_base = _states(model, "cuda")
    for method in ("ties", "dare"):
        want = sparsified_task_vector_stats(experts, base, method=method, drop_rate=0.0)
        got = sparsified_task_vector_stats(gpu_experts, gpu_base, method=method, drop_rate=0.0)
        torch.testing.assert_close(got.gram, want.gram)
        assert got.dispersion == pytest.approx(want.dispersion, rel=1e-5)
    torch.testing.assert_close(modified_offsets(gpu_experts).cpu(), modified_offsets(experts))


@pytest.mark.cuda
def test_merged_module_merges_and_searches_on_the_gpu(tmp_path):
    experts = _bundle(tmp_path / "experts")
    results, searches = {}, {}
    for accelerator in ("cpu", "gpu"):
        module = MergedModule(
            experts,
            method=get_method("ties"),
            scaling_grid=[0.5, 1.0],
            save_path=str(tmp_path / f"merged_{accelerator}.safetensors"),
        )
        spy = _MergedWhen()
        trainer = pl.Trainer(
            accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False, callbacks=[spy]
        )
        trainer.test(module, DigitsTasks(batch_size=64), verbose=False)
        assert spy.devices == {"cuda" if accelerator == "gpu" else "cpu"}
        results[accelerator], searches[accelerator] = module.results, module.scaling_search
    # Float rounding may flip a borderline prediction: accuracies agree to a sample or two.
    for scaling, acc in searches["cpu"].items():
        assert searches["gpu"][scaling] == pytest.approx(acc, abs=0.02)
    assert results["gpu"]["test/acc_mean"] == pytest.approx(results["cpu"]["test/acc_mean"], abs=0.02)
    if results["gpu"]["test/selected_scaling"] == results["cpu"]["test/selected_scaling"]:
        saved = load_state_dict(tmp_path / "merged_gpu.safetensors")
        want = load_state_dict(tmp_path / "merged_cpu.safetensors")
        _assert_close_on({k: v.cuda() for k, v in saved.items()}, want, "cuda")


@pytest.mark.cuda
def test_the_clis_merge_config_runs_on_the_gpu(tmp_path):
    from merging.cli import MergingCLI

    experts = _bundle(tmp_path / "experts")
    cli = MergingCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=[
            "test",
            f"--config={CONFIGS / 'merge' / 'ties.yaml'}",
            f"--model.init_args.experts={experts}",
            f"--model.init_args.save_path={tmp_path / 'merged.safetensors'}",
            "--trainer.accelerator=gpu",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    # Where the merge was made (the module itself is back on the CPU after Lightning's teardown).
    assert cli.trainer.strategy.root_device.type == "cuda"
    assert all(v.device.type == "cuda" for v in cli.model._states["merged"].values())
    assert (tmp_path / "merged.safetensors").is_file()
