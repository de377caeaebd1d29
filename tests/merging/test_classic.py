"""Classic merges: spec worked examples, properties, and agreement with naive definitions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from merging import _multitensor
from merging.methods import _kernels, available_methods, get_method
from merging.methods.classic import (
    Dare,
    TiesMerging,
    disjoint_mean,
    elect_sign,
    global_magnitude_thresholds,
    ties_disjoint_merge,
    trim_to_density,
)


def random_states(k: int, seed: int = 0, dtype=torch.float32, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (16, 8), "a.bias": (16,), "b.weight": (4, 16), "conv": (3, 2, 3, 3)}
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    base["bn.num_batches_tracked"] = torch.tensor(7)
    experts = []
    for j in range(k):
        e = {
            n: (v + scale * torch.randn(v.shape, generator=g).to(dtype)) if v.is_floating_point() else v + j + 1
            for n, v in base.items()
        }
        experts.append(e)
    return experts, base


@pytest.fixture
def fused(monkeypatch):
    """The fused CPU kernels (numba) whatever the model's size."""
    monkeypatch.setattr(_kernels, "MIN_ENTRIES", 0)
    assert _kernels.available([torch.zeros(1)]), "numba kernels unavailable"


@pytest.fixture(params=["fused", "torch", "multi"])
def path(request, monkeypatch):
    """Run a test on the fused CPU kernels (numba), on the torch path, and on the GPU's
    multi-tensor path (forced on the CPU, in groups small enough that a test's tensors span
    several groups and an entry several slices)."""
    if request.param == "torch":
        with _kernels.disabled():
            yield request.param
    elif request.param == "multi":
        import merging.methods.topk as topk

        monkeypatch.setattr(_multitensor, "GROUP_ENTRIES", 50)
        monkeypatch.setattr(topk, "_SEARCH_ENTRIES", 3000)
        with _multitensor.forced():
            yield request.param
    else:
        request.getfixturevalue("fused")
        yield request.param


# ---------------------------------------------------------------- naive references


def naive_ties(experts, base, density, scaling):
    """The papers' definitions, element by element on one flattened task vector per expert."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    taus = [torch.cat([(e[k] - base[k]).flatten() for k in keys]).tolist() for e in experts]
    n_total = len(taus[0])
    n_keep = int(density * n_total + 1e-9)
    trimmed = []
    for tau in taus:
        if n_keep == 0:
            trimmed.append([0.0] * n_total)
            continue
        thr = sorted((abs(x) for x in tau), reverse=True)[n_keep - 1]
        trimmed.append([x if abs(x) >= thr else 0.0 for x in tau])
    merged = []
    for i in range(n_total):
        col = [t[i] for t in trimmed]
        sign = 1.0 if sum(col) >= 0 else -1.0
        agree = [x for x in col if x * sign > 0]
        merged.append(sum(agree) / len(agree) if agree else 0.0)
    out, offset = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = base[k] + scaling * torch.tensor(merged[offset : offset + n]).reshape(base[k].shape)
        offset += n
    return out


# ---------------------------------------------------------------- worked examples


def test_spec_worked_example_elect_and_disjoint_mean():
    trimmed = torch.tensor([[0.5, -0.25, 0, 0.25], [-0.25, -0.25, 0, -0.25], [0.25, 0.5, 0, 0]])
    sign = elect_sign(trimmed)
    assert sign.tolist() == [1, 1, 1, 1]
    assert disjoint_mean(trimmed, sign).tolist() == [0.375, 0.5, 0.0, 0.25]


def test_spec_worked_example_trim_keeps_ties():
    x = torch.tensor([[0.1, -0.5, 0.3, -0.3, 0.05]])
    assert torch.equal(trim_to_density(x, 0.4), torch.tensor([[0.0, -0.5, 0.3, -0.3, 0.0]]))


def test_registry_lists_classic_methods_and_rejects_unknown():
    assert {"average", "task_arithmetic", "ties", "dare"} <= set(available_methods())
    with pytest.raises(ValueError, match="unknown merge method 'nope'.*average"):
        get_method("nope")


# ---------------------------------------------------------------- agreement with naive


@pytest.mark.parametrize("density", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_global_ties_matches_naive_definition(density, path):
    experts, base = random_states(3, seed=1)
    merged = get_method("ties", density=density, scaling=0.7).merge(experts, base)
    ref = naive_ties(experts, base, density, 0.7)
    for k, v in ref.items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-6)


def test_global_threshold_exact_with_sampling_path(path):
    # Large enough that the strided-sample bracket is used (sample_target small).
    g = torch.Generator().manual_seed(3)
    base = {f"w{i}": torch.zeros(300, 70) for i in range(5)}
    experts = [{k: torch.randn(v.shape, generator=g) ** 3 for k, v in base.items()} for _ in range(3)]
    keys = list(base)
    thr = global_magnitude_thresholds(experts, base, keys, 0.13, sample_target=2000)
    for j, e in enumerate(experts):
        flat = torch.cat([e[k].flatten() for k in keys]).abs()
        n = int(0.13 * flat.numel())
        assert thr[j] == torch.sort(flat, descending=True).values[n - 1]


def test_global_threshold_exact_when_bracket_misses(path):
    # Constant blocks defeat a strided sample; the widening pass must still be exact.
    base = {"w": torch.zeros(100, 100), "v": torch.zeros(50, 100)}
    e = {"w": torch.ones(100, 100), "v": torch.arange(5000.0).reshape(50, 100) + 2}
    thr = global_magnitude_thresholds([e], base, ["w", "v"], 0.5, sample_target=100)
    flat = torch.cat([e["w"].flatten(), e["v"].flatten()])
    assert thr[0] == torch.sort(flat, descending=True).values[int(0.5 * flat.numel()) - 1]


def test_task_arithmetic_matches_definition():
    experts, base = random_states(4, seed=2)
    merged = get_method("task_arithmetic", scaling=0.3).merge(experts, base)
    for k, v in base.items():
        if v.is_floating_point():
            expected = v + 0.3 * sum(e[k] - v for e in experts)
            torch.testing.assert_close(merged[k], expected)
        else:
            assert torch.equal(merged[k], v)  # non-float buffers copied from the base


def test_weighted_average_normalises_weights():
    experts, _ = random_states(2, seed=4)
    merged = get_method("average", weights=[1.0, 3.0]).merge(experts)
    torch.testing.assert_close(merged["a.weight"], 0.25 * experts[0]["a.weight"] + 0.75 * experts[1]["a.weight"])
    # Without a base, non-float entries come from the first expert.
    assert torch.equal(merged["bn.num_batches_tracked"], experts[0]["bn.num_batches_tracked"])


def test_dare_task_arithmetic_matches_manual_drop():
    experts, base = random_states(2, seed=5)
    method = Dare(drop_rate=0.5, seed=11, scaling=1.0)
    merged = method.merge(experts, base)
    from merging.methods.classic import dare_drop, entry_generator

    for k, v in base.items():
        if not v.is_floating_point():
            continue
        tau = torch.stack([e[k] for e in experts]) - v
        dropped = dare_drop(tau, 0.5, entry_generator(11, k))
        torch.testing.assert_close(merged[k], v + dropped.sum(0))
        kept = (dropped != 0).float().mean().item()
        assert 0.2 < kept < 0.8


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize(
    "name,hparams",
    [
        ("average", {}),
        ("task_arithmetic", {"scaling": 1 / 3}),
        ("ties", {"density": 1.0}),
        ("ties", {"density": 1.0, "scope": "tensor"}),
        ("dare", {"drop_rate": 0.0, "scaling": 1 / 3}),
        ("dare", {"drop_rate": 0.0, "combine": "ties"}),
    ],
)
def test_identical_experts_merge_to_themselves(name, hparams):
    # Settings under which K identical experts must give back that expert exactly.
    experts, base = random_states(1, seed=6)
    expert = experts[0]
    merged = get_method(name, **hparams).merge([expert, expert, expert], base)
    for k, v in expert.items():
        torch.testing.assert_close(merged[k], v if v.is_floating_point() else base[k])


@pytest.mark.parametrize("name", ["average", "ties"])
def test_single_expert(name):
    experts, base = random_states(1, seed=7)
    method = get_method(name, density=1.0) if name == "ties" else get_method(name)
    merged = method.merge(experts, base)
    torch.testing.assert_close(merged["a.weight"], experts[0]["a.weight"])


@pytest.mark.parametrize(
    "name,hparams",
    [("average", {}), ("task_arithmetic", {}), ("ties", {"density": 0.3}), ("ties", {"scope": "tensor"})],
)
def test_expert_order_does_not_matter(name, hparams):
    experts, base = random_states(3, seed=8)
    method = get_method(name, **hparams)
    ref = method.merge(experts, base)
    for perm in itertools.permutations(range(3)):
        out = method.merge([experts[i] for i in perm], base)
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["average", "task_arithmetic", "ties", "dare"])
def test_dtype_kept(name, dtype):
    experts, base = random_states(2, seed=9, dtype=dtype)
    merged = get_method(name).merge(experts, base)
    for k, v in base.items():
        assert merged[k].dtype == v.dtype, k


def test_dare_seeded_repeatable_and_seed_sensitive():
    experts, base = random_states(3, seed=10)
    a = Dare(drop_rate=0.7, seed=1).merge(experts, base)
    b = Dare(drop_rate=0.7, seed=1).merge(experts, base)
    c = Dare(drop_rate=0.7, seed=2).merge(experts, base)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["a.weight"], c["a.weight"])


def test_dare_global_ties_threshold_sees_the_same_drop():
    experts, base = random_states(3, seed=12)
    method = Dare(drop_rate=0.5, seed=3, combine="ties", density=0.4)
    merged = method.merge(experts, base)
    from merging.methods.classic import dare_drop, entry_generator

    dropped = [
        {
            k: (dare_drop(torch.stack([e[k] for e in experts]) - v, 0.5, entry_generator(3, k))[j] + v)
            if v.is_floating_point()
            else v
            for k, v in base.items()
        }
        for j in range(3)
    ]
    ref = naive_ties(dropped, base, 0.4, 1.0)
    for k, v in ref.items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-6)


def test_global_and_tensor_scope_agree_with_one_tensor():
    g = torch.Generator().manual_seed(13)
    base = {"w": torch.randn(20, 10, generator=g)}
    experts = [{"w": base["w"] + torch.randn(20, 10, generator=g)} for _ in range(3)]
    a = TiesMerging(density=0.3, scope="global").merge(experts, base)
    b = TiesMerging(density=0.3, scope="tensor").merge(experts, base)
    torch.testing.assert_close(a["w"], b["w"])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare"])
def test_missing_base_is_named(name):
    experts, _ = random_states(2)
    with pytest.raises(ValueError, match="needs base"):
        get_method(name).merge(experts)


def test_empty_expert_list():
    with pytest.raises(ValueError, match="no experts"):
        get_method("average").merge([])


def test_mismatched_keys_shape_dtype_and_nonfinite_are_named():
    experts, base = random_states(2)
    bad = dict(experts[1])
    del bad["a.bias"]
    with pytest.raises(ValueError, match=r"expert 1 .*missing keys \['a.bias'\]"):
        get_method("average").merge([experts[0], bad])
    bad = dict(experts[1], **{"a.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"expert 1: key 'a.bias' has shape \(3,\)"):
        get_method("average").merge([experts[0], bad])
    bad = dict(experts[1], **{"a.bias": experts[1]["a.bias"].double()})
    with pytest.raises(ValueError, match=r"key 'a.bias' has dtype torch.float64"):
        get_method("average").merge([experts[0], bad])
    bad = dict(experts[1])
    bad["b.weight"] = bad["b.weight"].clone()
    bad["b.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"expert 1: key 'b.weight' has 1 non-finite"):
        get_method("ties").merge([experts[0], bad], base)


@pytest.mark.parametrize("kwargs", [{"density": 1.5}, {"density": -0.1}, {"scope": "layer"}])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        TiesMerging(**kwargs)


def test_weight_count_must_match_experts():
    experts, _ = random_states(3)
    with pytest.raises(ValueError, match="2 weights given for 3 experts"):
        get_method("average", weights=[1.0, 1.0]).merge(experts)


# ---------------------------------------------------------------- fast paths


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_fused_ties_merge_matches_step_by_step(k):
    g = torch.Generator().manual_seed(k)
    tau = torch.randint(-3, 4, (k, 400), generator=g).float() * 0.25  # many ties, zeros, cancellations
    tau[:, :7] = 0.0  # all-zero columns
    tau[:, 7] = torch.tensor([0.5, -0.5] * (k // 2) + [0.0] * (k % 2))  # zero sign sum elects +
    thresholds = torch.rand(k, generator=g) * 0.6
    thresholds[0] = 0.5  # entries at the threshold are kept
    if k > 1:
        thresholds[1] = math.inf  # this expert keeps nothing
    ref_trimmed = trim_to_density(tau, 0.0, thresholds)
    expected = disjoint_mean(ref_trimmed, elect_sign(ref_trimmed))
    got = ties_disjoint_merge(tau.clone(), thresholds)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    if k > 1:
        assert got[7] == 0.5  # the elected + side, mean of the +0.5 values


def test_fused_ties_merge_zero_threshold_never_counts_zeros():
    tau = torch.tensor([[0.0, 2.0, -1.0], [4.0, 0.0, 0.0], [0.0, 0.0, -3.0]])
    got = ties_disjoint_merge(tau.clone(), torch.zeros(3))
    assert got.tolist() == [4.0, 2.0, -2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.9])
def test_global_threshold_exact_across_slices_blocks_and_tails(monkeypatch, dtype, density, path):
    import merging.methods.topk as topk

    # Small slices so that one entry spans several slices with ragged tails (not a multiple
    # of the bracket block), and a small sample so that the block-filtered path is used.
    monkeypatch.setattr(topk, "_THRESHOLD_CHUNK", 1000)
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(97, 53, generator=g).to(dtype), "b": torch.randn(61, generator=g).to(dtype)}
    base["z"] = torch.zeros(40, 41, dtype=dtype)
    experts = []
    for j in range(3):
        e = {k: v + (torch.randn(v.shape, generator=g) * (j + 1) * 0.1).to(dtype) for k, v in base.items()}
        e["z"] = torch.full((40, 41), 0.5 * (j + 1), dtype=dtype)  # a block of repeated values
        experts.append(e)
    keys = list(base)
    thr = global_magnitude_thresholds(experts, base, keys, density, sample_target=500)
    for j, e in enumerate(experts):
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # |τ| as float32 after
        flat = torch.cat([(e[k].to(acc) - base[k].to(acc)).flatten() for k in keys]).abs().float()
        n = int(density * flat.numel())
        assert thr[j] == torch.sort(flat, descending=True).values[n - 1], (j, dtype, density)


@pytest.mark.parametrize(
    "hparams",
    [
        {"density": 0.2},
        {"density": 0.05, "scaling": 0.7},
        {"density": 1.0},
        {"density": 0.0},
        {"density": 0.3, "scope": "tensor"},
    ],
)
def test_fused_kernels_agree_with_torch_path(hparams, fused):
    # Entries larger than one kernel block (4096) with ragged tails, a tiny one, repeated
    # magnitudes (ties at the threshold) and exact zeros in the task vectors.
    g = torch.Generator().manual_seed(11)
    shapes = {"w": (130, 70), "v": (5000,), "b": (3,), "q": (64, 64)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = []
    for _ in range(5):
        e = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        e["q"] = base["q"] + 0.25 * torch.randint(-2, 3, (64, 64), generator=g).float()
        experts.append(e)
    method = get_method("ties", **hparams)
    fused = method.merge(experts, base)
    with _kernels.disabled():
        reference = method.merge(experts, base)
    for key, value in reference.items():
        torch.testing.assert_close(fused[key], value, atol=1e-6, rtol=1e-6, msg=key)


def test_threshold_scan_rescans_a_crowded_bracket(monkeypatch, fused):
    # More bracket members in one block than the kernel stores: the key is scanned again
    # with room for all of them, and the threshold stays exact.
    monkeypatch.setattr(_kernels, "_CAPACITY", 3)
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.zeros(50, 40)}
    experts = [{"w": torch.randint(1, 5, (50, 40), generator=g).float()} for _ in range(2)]
    lo, hi = torch.full((2,), 2.0), torch.full((2,), 3.0)
    above, members = _kernels.scan_bracket([e["w"] for e in experts], base["w"], lo, hi)
    for j, e in enumerate(experts):
        a = e["w"].flatten()
        assert int(above[j]) == int((a > 3).sum())
        assert torch.equal(members[j].sort().values, a[(a >= 2) & (a <= 3)].sort().values)
    thr = global_magnitude_thresholds(experts, base, ["w"], 0.4)
    for j, e in enumerate(experts):
        flat = e["w"].flatten()
        assert thr[j] == flat.sort(descending=True).values[int(0.4 * flat.numel()) - 1]


def test_fused_kernels_follow_torch_thread_count(fused):
    import numba

    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with _kernels._threads():
                assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
            experts, base = random_states(2)
            get_method("ties").merge(experts, base)
            assert torch.get_num_threads() == n  # numba's OpenMP setting does not leak into torch
    finally:
        torch.set_num_threads(threads)


def test_small_merges_stay_on_the_torch_path(monkeypatch):
    marker = torch.tensor(-1.0)
    monkeypatch.setattr(_kernels, "ties_merge", lambda *args: marker)
    experts, base = random_states(2)  # far below MIN_ENTRIES
    assert get_method("ties").merge(experts, base)["a.weight"] is not marker
    monkeypatch.setattr(_kernels, "MIN_ENTRIES", 0)
    assert get_method("ties").merge(experts, base)["a.weight"] is marker


def test_task_arithmetic_rounds_at_the_scale_of_the_result():
    # Large weights, small task vectors: summing the task vectors keeps the error within
    # one rounding of the result (Σθ_j − K·θ₀ would round at K·|θ| instead).
    g = torch.Generator().manual_seed(4)
    base = {"w": 1000.0 + torch.randn(64, 64, generator=g)}
    experts = [{"w": base["w"] + 1e-3 * torch.randn(64, 64, generator=g)} for _ in range(8)]
    merged = get_method("task_arithmetic", scaling=0.3).merge(experts, base)["w"]
    exact = base["w"].double() + 0.3 * sum(e["w"].double() - base["w"].double() for e in experts)
    ulp = torch.finfo(torch.float32).eps * exact.abs()
    assert bool(((merged.double() - exact).abs() <= ulp).all())


# ---------------------------------------------------------------- DARE's hash draws (CPU kernels)


def large_dare_states(k: int = 3, seed: int = 21):
    """Entries above one kernel block (4096) with ragged tails, and a tiny one."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (130, 70), "v": (5000,), "b": (3,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    experts = [{n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(k)]
    return experts, base


def test_dare_hash_path_equals_its_masks_with_exact_rescale(fused):
    from merging.methods.dare import entry_seed

    experts, base = large_dare_states()
    merged = Dare(drop_rate=0.6, seed=4, scaling=0.5).merge(experts, base)
    for key, b in base.items():
        tau = torch.stack([e[key] for e in experts]) - b
        keep = _kernels.dare_masks(b.numel(), 3, entry_seed(4, key), 0.6).reshape(tau.shape)
        expected = b + 0.5 * (tau * keep).sum(0) * torch.tensor(1 / 0.4, dtype=torch.float32)
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-6, msg=key)
    # p = 0 keeps everything and rescales by 1: plain task arithmetic.
    ta = get_method("task_arithmetic", scaling=0.5).merge(experts, base)
    zero = Dare(drop_rate=0.0, seed=4, scaling=0.5).merge(experts, base)
    for key in base:
        torch.testing.assert_close(zero[key], ta[key], atol=1e-6, rtol=1e-6)


def test_dare_hash_masks_keep_rate_determinism_and_independence():
    from merging.methods.dare import entry_seed

    n, p = 1 << 20, 0.9
    masks = _kernels.dare_masks(n, 4, entry_seed(0, "layer.weight"), p)
    assert torch.equal(masks, _kernels.dare_masks(n, 4, entry_seed(0, "layer.weight"), p))
    rate = masks.float().mean(dim=1)
    sd = math.sqrt(p * (1 - p) / n)
    assert ((rate - (1 - p)).abs() < 6 * sd).all(), rate
    # Pairs of experts, of keys and of seeds draw independent masks: both kept ~ (1 − p)².
    other_key = _kernels.dare_masks(n, 1, entry_seed(0, "layer.bias"), p)[0]
    other_seed = _kernels.dare_masks(n, 1, entry_seed(1, "layer.weight"), p)[0]
    for a, b in [(masks[0], masks[1]), (masks[2], masks[3]), (masks[0], other_key), (masks[0], other_seed)]:
        both = (a & b).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 6 * math.sqrt((1 - p) ** 2 / n), both
    # Neighbouring entries are independent too (a counter-based draw must not repeat patterns).
    both = (masks[0, 1:] & masks[0, :-1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 6 * math.sqrt((1 - p) ** 2 / n), both


def test_dare_hash_and_torch_paths_agree_in_expectation(fused):
    # One entry, 2^18 values, identical task vectors τ = 1: both paths' merged mean is
    # λ · K · E[keep / (1 − p)] = λ · K, within sampling error; the masks themselves differ.
    n, k, p = 1 << 18, 2, 0.75
    base = {"w": torch.zeros(n)}
    experts = [{"w": torch.ones(n)} for _ in range(k)]
    hashed = Dare(drop_rate=p, seed=5, scaling=1.0).merge(experts, base)["w"]
    torch_rng = Dare(drop_rate=p, seed=5, scaling=1.0, rng="torch").merge(experts, base)["w"]
    sd = math.sqrt(k * p / (1 - p) / n)  # per-entry variance of Σ_j keep_j / (1 − p) is K·p/(1 − p)
    for out in (hashed, torch_rng):
        assert abs(out.double().mean().item() - k) < 6 * sd
    assert not torch.equal(hashed, torch_rng)


def test_dare_torch_rng_keeps_torch_masks_on_the_kernel_path(fused):
    # rng="torch" draws torch.rand per (seed, key) whatever the size: FusionBench's masks.
    from merging.methods.classic import dare_drop, entry_generator

    experts, base = large_dare_states()
    merged = Dare(drop_rate=0.5, seed=11, scaling=1.0, rng="torch").merge(experts, base)
    for key, b in base.items():
        tau = torch.stack([e[key] for e in experts]) - b
        torch.testing.assert_close(merged[key], b + dare_drop(tau, 0.5, entry_generator(11, key)).sum(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dare_hash_path_only_for_float32(fused, dtype, monkeypatch):
    monkeypatch.setattr(_kernels, "dare_merge", lambda *args: pytest.fail("hash path taken"))
    experts, base = random_states(2, dtype=dtype)
    merged = Dare(drop_rate=0.5).merge(experts, base)
    assert merged["a.weight"].dtype == dtype


def test_dare_ties_threshold_search_takes_an_empty_entry():
    # DARE's global TIES trim reads whole entries; an empty one was a zero-sized slice step.
    experts, base = random_states(3, seed=4)
    base["empty"] = torch.zeros(0, 5)
    for e in experts:
        e["empty"] = torch.zeros(0, 5)
    merged = get_method("dare", drop_rate=0.5, combine="ties", density=0.4).merge(experts, base)
    assert merged["empty"].shape == (0, 5)


def test_small_dare_merges_stay_on_the_torch_path(monkeypatch):
    marker = torch.tensor(-1.0)
    monkeypatch.setattr(_kernels, "dare_merge", lambda *args: marker)
    experts, base = random_states(2)  # far below MIN_ENTRIES
    assert Dare().merge(experts, base)["a.weight"] is not marker
    assert Dare(combine="ties").merge(experts, base)["a.weight"] is not marker
    monkeypatch.setattr(_kernels, "MIN_ENTRIES", 0)
    assert Dare().merge(experts, base)["a.weight"] is marker
    assert Dare(rng="torch").merge(experts, base)["a.weight"] is not marker
    assert Dare(combine="ties").merge(experts, base)["a.weight"] is not marker
