"""The GPU's multi-tensor merge path (:mod:`merging._multitensor`), run on CPU tensors inside
``forced()``: the CPU path's results, and a launch and sync budget that grows with K and the
number of groups, not with the number of entries (counted with ``OpCounter``)."""

from __future__ import annotations

import pytest
import torch

from merging import _multitensor
from merging._opcount import OpCounter
from merging.io import save_state_dict
from merging.methods import _kernels, get_method
from merging.methods.topk import global_magnitude_thresholds
from merging.state import SourcedStateDict, StateDictError, check_compatible
from merging.streaming import merge_files

CASES = [
    ("average", {}),
    ("average", {"weights": [1.0, 2.0, 3.0]}),
    ("task_arithmetic", {"scaling": 0.4}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.2, "scaling": 0.7}),
    ("ties", {"density": 1.0}),
    ("ties", {"density": 0.0}),
    ("ties", {"density": 0.3, "scope": "tensor"}),
    ("dare", {"drop_rate": 0.7, "seed": 3}),
    ("dare", {"drop_rate": 0.7, "seed": 3, "rng": "torch"}),
    ("dare", {"drop_rate": 0.0}),
    ("dare", {"drop_rate": 0.5, "seed": 1, "combine": "ties", "density": 0.4}),
    ("dare", {"drop_rate": 0.5, "seed": 1, "combine": "ties"}),
]


def _case_id(case) -> str:
    name, hparams = case
    return name + "".join(f"-{k}={v}" for k, v in hparams.items())


def model_states(k: int = 3, dtype=torch.float32, blocks: int = 3, seed: int = 0, other=None):
    """θ₀ and K experts: blocks of a weight and a bias, a 0-dim entry, an empty one, a larger
    one, repeated magnitudes (ties at the threshold), an integer and a bool buffer, and, with
    ``other``, some entries in a second dtype."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for b in range(blocks):
        shapes[f"block.{b}.weight"] = (24, 16)
        shapes[f"block.{b}.bias"] = (24,)
    shapes |= {"scale": (), "empty": (0, 4), "big": (40, 30), "steps": (12, 5)}
    base = {key: torch.randn(shape, generator=g).to(dtype) for key, shape in shapes.items()}
    if other is not None:
        base["norm.weight"] = torch.randn(24, generator=g).to(other)
    base["bn.num_batches_tracked"] = torch.tensor(7)
    base["mask"] = torch.rand(6, generator=g) > 0.5
    experts = []
    for j in range(k):
        e = {
            key: v + (0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone()
            for key, v in base.items()
        }
        e["steps"] = base["steps"] + 0.25 * torch.randint(-2, 3, (12, 5), generator=g).to(dtype)
        e["bn.num_batches_tracked"] = base["bn.num_batches_tracked"] + j + 1
        experts.append(e)
    return experts, base


@pytest.fixture
def small_groups(monkeypatch):
    """Groups small enough that the test models span several, and an entry several slices."""
    import merging.methods.topk as topk

    monkeypatch.setattr(_multitensor, "GROUP_ENTRIES", 200)
    monkeypatch.setattr(topk, "_SEARCH_ENTRIES", 900)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gpu_path_equals_the_cpu_path(case, dtype, small_groups):
    name, hparams = case
    experts, base = model_states(dtype=dtype, other=torch.float32 if dtype != torch.float32 else torch.bfloat16)
    method = get_method(name, **hparams)
    with _kernels.disabled():  # the CPU's torch path (the GPU draws DARE's masks with torch.rand too)
        want = method.merge(experts, base)
    with _multitensor.forced():
        got = method.merge(experts, base)
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        if "weights" in hparams and value.is_floating_point():  # w_j θ_j fused into one add: rounding
            half = value.element_size() < 4  # one float32 rounding may move a half-precision one
            torch.testing.assert_close(got[key], value, **({} if half else {"rtol": 1e-6, "atol": 1e-7}), msg=key)
        else:  # the same arithmetic in the same order
            assert torch.equal(got[key], value), (key, (got[key].double() - value.double()).abs().max())
    for key in ("bn.num_batches_tracked", "mask"):  # copied from θ₀, not aliased
        assert torch.equal(got[key], base[key]) and got[key].data_ptr() != base[key].data_ptr()


def test_gpu_path_without_a_base_and_with_one_expert():
    experts, _ = model_states(k=1)
    want = get_method("average").merge(experts)
    with _multitensor.forced():
        got = get_method("average").merge(experts)
    for key, value in want.items():
        assert torch.equal(got[key], value) and (got[key].data_ptr() != value.data_ptr() or not value.numel()), key


def test_plan_groups_by_dtype_and_budget_and_slices_large_entries():
    ref = {"a": torch.zeros(5), "b": torch.zeros(12, dtype=torch.bfloat16), "c": torch.zeros(0), "d": torch.zeros(8)}
    groups = _multitensor.plan(list(ref), ref, budget=10)
    assert [[(p.key, p.start, p.stop, p.whole) for p in g] for g in groups] == [
        [("a", 0, 5, True)],
        [("b", 0, 10, False)],
        [("b", 10, 12, False)],
        [("d", 0, 8, True)],
    ]
    whole = _multitensor.plan(list(ref), ref, budget=10, split=False)
    assert [[p.key for p in g] for g in whole] == [["a"], ["b"], ["d"]]


# ---------------------------------------------------------------- launches and syncs


def many_entries(num_entries: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {
        f"layer.{i}.{kind}": torch.randn(shape, generator=g)
        for i in range(num_entries // 2)
        for kind, shape in (("weight", (8, 6)), ("bias", (8,)))
    }
    experts = [{key: v + 0.1 * torch.randn(v.shape, generator=g) for key, v in base.items()} for _ in range(k)]
    return experts, base


def gpu_count(name: str, hparams: dict, num_entries: int, k: int) -> OpCounter:
    experts, base = many_entries(num_entries, k)
    method = get_method(name, **hparams)
    with _multitensor.forced(), OpCounter() as count:
        method.merge(experts, base)
    return count


BUDGETS = [
    # (name, hparams, most kernels for K experts and E entries, most syncs)
    ("average", {}, lambda k, e: k + 6, 1),
    ("task_arithmetic", {}, lambda k, e: 2 * k + 8, 1),
    ("ties", {"density": 0.2}, lambda k, e: 11 * k + 60, 3),
    ("dare", {"drop_rate": 0.9}, lambda k, e: e + 2 * k + 12, 1),  # one torch.rand per entry
]


@pytest.mark.parametrize(("name", "hparams", "kernels", "syncs"), BUDGETS, ids=[b[0] for b in BUDGETS])
def test_gpu_path_launches_grow_with_k_not_with_entries(name, hparams, kernels, syncs):
    few, many = gpu_count(name, hparams, 20, 3), gpu_count(name, hparams, 200, 3)
    per_entry = 1 if name == "dare" else 0
    assert many.kernel_total - few.kernel_total == per_entry * 180, (few.summary(), many.summary())
    assert many.sync_total == few.sync_total <= syncs, many.summary()
    for k in (2, 3, 5):
        count = gpu_count(name, hparams, 200, k)
        assert count.kernel_total <= kernels(k, 200), (k, count.summary())
        assert count.sync_total <= syncs, (k, count.summary())
    assert gpu_count(name, hparams, 200, 5).kernel_total > gpu_count(name, hparams, 200, 2).kernel_total


def test_cpu_path_count_for_reference():
    # What the GPU path replaces: ops per entry and expert, one host read per tensor.
    experts, base = many_entries(200, 3)
    with _kernels.disabled(), OpCounter() as count:
        get_method("average").merge(experts, base)
    assert count.kernel_total > 3 * 200 and count.sync_total == 200 * 4  # 3 experts and θ₀


def test_gpu_threshold_search_reads_the_host_once_per_group_and_round(monkeypatch):
    import merging.methods.topk as topk

    experts, base = many_entries(200, 3)
    keys = list(base)
    monkeypatch.setattr(topk, "_SEARCH_ENTRIES", 3 * 3000)  # 5600 entries per expert: 2 groups
    with _kernels.disabled():
        want = global_magnitude_thresholds(experts, base, keys, 0.2, sample_target=500)
    with _multitensor.forced(), OpCounter() as count:
        got = global_magnitude_thresholds(experts, base, keys, 0.2, sample_target=500)
    assert torch.equal(got, want)
    groups = len(_multitensor.plan(keys, base, 3000))
    assert groups == 2
    # The sample and the selection read nothing on the host: one nonzero per group, one read per round.
    assert count.syncs == {"aten.nonzero": groups, "aten._local_scalar_dense": 1}, count.summary()


# ---------------------------------------------------------------- the finiteness check


def test_finite_check_reads_the_host_once_and_names_key_and_file():
    experts, base = many_entries(100, 3)
    with _multitensor.forced(), OpCounter() as count:
        check_compatible(experts, base)
    assert count.sync_total == 1, count.summary()
    assert count.kernel_total <= 6, count.summary()

    experts = [SourcedStateDict(e, source=f"expert_{j}.safetensors") for j, e in enumerate(experts)]
    experts[1]["layer.7.bias"] = experts[1]["layer.7.bias"].clone()
    experts[1]["layer.7.bias"][3] = float("nan")
    experts[2]["layer.9.weight"] = experts[2]["layer.9.weight"].clone()
    experts[2]["layer.9.weight"][0, 0] = float("inf")
    with pytest.raises(StateDictError) as cpu:
        check_compatible(experts, base)
    with _multitensor.forced(), pytest.raises(StateDictError) as gpu:
        check_compatible(experts, base)
    assert str(gpu.value) == str(cpu.value)
    assert "expert 1 (expert_1.safetensors): key 'layer.7.bias' has 1 non-finite" in str(gpu.value)
    with _multitensor.forced(), pytest.raises(StateDictError, match=r"base: key 'layer.0.weight'"):
        check_compatible(experts[:1], {**base, "layer.0.weight": torch.full((8, 6), float("-inf"))})


def test_finite_check_passes_half_precision_and_large_finite_values():
    experts = [{"a": torch.full((4,), 6e4, dtype=torch.float16), "b": torch.full((3,), 3e38)} for _ in range(2)]
    with _multitensor.forced():
        check_compatible(experts)  # sums would overflow; the largest magnitude does not
        experts[1]["a"][2] = float("nan")
        with pytest.raises(StateDictError, match=r"expert 1: key 'a' has 1 non-finite"):
            check_compatible(experts)


# ---------------------------------------------------------------- streamed merges


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "average" or not c[1]], ids=_case_id)
def test_streamed_merges_inside_forced_equal_in_memory_ones(case, tmp_path, small_groups):
    # A streamed merge runs merge_entry per entry (whole entries on the GPU path) and the
    # method's prepare on lazy files: the same values as the multi-tensor merge in memory.
    name, hparams = case
    experts, base = model_states(other=torch.bfloat16)
    base = {k: v for k, v in base.items() if v.dtype != torch.bool}  # safetensors writes bools; keep it simple
    experts = [{k: e[k] for k in base} for e in experts]
    paths = []
    for j, e in enumerate(experts):
        paths.append(tmp_path / f"expert_{j}.safetensors")
        save_state_dict(e, paths[-1])
    save_state_dict(base, tmp_path / "base.safetensors")
    method = get_method(name, **hparams)
    with _multitensor.forced():
        want = method.merge(experts, base)
        out = merge_files(method, paths, tmp_path / "merged.safetensors", tmp_path / "base.safetensors", progress=False)
    from safetensors.torch import load_file

    got = load_file(out)
    for key, value in want.items():
        if "weights" in hparams:
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=key)
        else:
            assert torch.equal(got[key], value), key
