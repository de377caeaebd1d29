"""Streamed merges from safetensors files: lazy reading, streaming writes, merge_files, CLI."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.cli import main as cli_main
from merging.io import CheckpointError, load_state_dict
from merging.methods import _kernels, get_method
from merging.methods.classic import WeightAveraging
from merging.state import StateDictError, check_compatible
from merging.streaming import SAFETENSORS_DTYPES, LazySafetensors, merge_files, parse_hparams, stream_safetensors


def make_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {
        "embed.weight": torch.randn(11, 6, generator=g),
        "block.0.weight": torch.randn(6, 6, generator=g),
        "block.0.bias": torch.randn(6, generator=g),
        "block.1.weight": torch.randn(5, 6, generator=g),
        "norm.scale": torch.randn((), generator=g),
    }
    state = {k: v.to(dtype) for k, v in state.items()}
    state["bn.num_batches_tracked"] = torch.tensor(seed + 3)
    return state


def write_experts(tmp_path, num_experts: int = 3, dtype: torch.dtype = torch.float32):
    base = make_state(100, dtype)
    experts = [
        {k: (v + 0.1 * make_state(j, dtype)[k] if v.is_floating_point() else make_state(j)[k]) for k, v in base.items()}
        for j in range(num_experts)
    ]
    paths = []
    for j, state in enumerate(experts):
        paths.append(tmp_path / f"expert{j}.safetensors")
        save_file(state, paths[-1])
    save_file(base, tmp_path / "base.safetensors")
    return experts, base, paths, tmp_path / "base.safetensors"


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


class CountingLazy(LazySafetensors):
    """Counts the tensors handed out that are still alive (the peak is what a merge holds)."""

    live = 0
    peak = 0
    reads = 0

    def __getitem__(self, key):
        tensor = super().__getitem__(key)
        cls = type(self)
        cls.live += 1
        cls.reads += 1
        cls.peak = max(cls.peak, cls.live)
        weakref.finalize(tensor, cls._release)
        return tensor

    @classmethod
    def _release(cls):
        cls.live -= 1

    @classmethod
    def reset(cls):
        cls.live = cls.peak = cls.reads = 0


# ------------------------------------------------------------------- LazySafetensors


def test_lazy_mapping_reads_header_and_values(tmp_path):
    state = {code.lower(): torch.arange(6).reshape(2, 3).to(dtype) for code, dtype in SAFETENSORS_DTYPES.items()}
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.zeros(0, 4)
    path = tmp_path / "all.safetensors"
    save_file(state, path, metadata={"note": "x"})
    lazy = LazySafetensors(path)
    assert lazy.source == str(path)
    assert lazy.metadata == {"note": "x"}
    assert set(lazy) == set(state) and len(lazy) == len(state)
    for key, value in state.items():
        assert lazy.shape(key) == value.shape and lazy.dtype(key) == value.dtype
        assert lazy.header()[key].device.type == "meta"
        got = lazy[key]
        assert got.dtype == value.dtype and torch.equal(got, value), key
    with pytest.raises(KeyError):
        lazy["absent"]


def test_lazy_values_are_not_cached_and_follow_file_order(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"b": torch.ones(3), "a": torch.zeros(2, 2)}, path)
    lazy = LazySafetensors(path)
    first = lazy["b"]
    first.add_(5)  # the caller owns the buffer: nothing shared with later reads or the file
    assert torch.equal(lazy["b"], torch.ones(3))
    again, once_more = lazy["b"], lazy["b"]
    assert again.data_ptr() != once_more.data_ptr()  # each read is its own buffer
    order = list(lazy)
    offsets = [lazy._entries[k].begin for k in order]
    assert offsets == sorted(offsets)


def test_large_tensors_are_read_into_their_own_buffers(tmp_path):
    """Tensors of 1 MiB and more are read into an anonymous mapping freed with the tensor."""
    path = tmp_path / "big.safetensors"
    big = torch.randn(300_000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).reshape(600, 500)
    save_file({"big": big, "huge": torch.arange(400_000, dtype=torch.float64)}, path)
    lazy = LazySafetensors(path)
    first, second = lazy["huge"], lazy["huge"]
    assert torch.equal(first, torch.arange(400_000, dtype=torch.float64))
    first.mul_(2)  # writable, and not shared with the next read
    assert torch.equal(second, torch.arange(400_000, dtype=torch.float64))
    assert lazy["big"].dtype == torch.bfloat16 and torch.equal(lazy["big"], big)
    assert torch.equal(
        load_file(stream_safetensors(tmp_path / "copy.safetensors", lazy.header(), lazy.items()))["big"], big
    )


def test_lazy_missing_and_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        LazySafetensors(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        LazySafetensors(bad)
    good = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(100)}, good)
    good.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        LazySafetensors(good)


def test_check_compatible_on_lazy_files_holds_few_tensors(tmp_path):
    """check_compatible(check_values=True) walks key by key: a few tensors alive, not all."""
    states = [
        {f"layer{i}": torch.randn(8, generator=torch.Generator().manual_seed(10 * j + i)) for i in range(20)}
        for j in range(4)
    ]
    paths = []
    for j, state in enumerate(states):
        paths.append(tmp_path / f"e{j}.safetensors")
        save_file(state, paths[-1])
    CountingLazy.reset()
    check_compatible([CountingLazy(p) for p in paths], check_values=True)
    assert CountingLazy.reads >= 4 * 20
    assert CountingLazy.peak <= 3  # the reference entry, one compared entry, one scanned entry
    assert CountingLazy.live == 0


# ------------------------------------------------------------------ streaming writer


def test_stream_writer_round_trips_every_dtype(tmp_path):
    state = {code: (torch.arange(12).reshape(3, 4) % 3).to(dtype) for code, dtype in SAFETENSORS_DTYPES.items()}
    state["scalar"] = torch.tensor(-1.5, dtype=torch.bfloat16)
    state["empty"] = torch.zeros(0, 3)
    layout = {k: v.to("meta") for k, v in state.items()}
    out = stream_safetensors(tmp_path / "out.safetensors", layout, iter(state.items()), metadata={"a": "b"})
    loaded = load_file(out)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert LazySafetensors(out).metadata == {"a": "b"}
    assert len(out.read_bytes()[8 : 8 + int.from_bytes(out.read_bytes()[:8], "little")]) % 8 == 0
    assert files_in(tmp_path) == ["out.safetensors"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("b", torch.ones(2)), ("a", torch.ones(3))], "got key 'b' where the header has 'a'"),
        ([("a", torch.ones(4))], r"key 'a' is \(4,\)"),
        ([("a", torch.ones(3, dtype=torch.float64))], "torch.float64"),
        ([("a", torch.ones(3))], "entries ended before 1 key"),
        ([("a", torch.tensor([1.0, float("nan"), 0.0]))], "non-finite"),
    ],
)
def test_stream_writer_rejects_wrong_entries_and_leaves_nothing(tmp_path, entries, message):
    layout = {"a": torch.empty(3, device="meta"), "b": torch.empty(2, device="meta")}
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(StateDictError, match=message):
        stream_safetensors(target, layout, iter(entries))
    assert files_in(tmp_path) == ["out.safetensors"] and target.read_bytes() == b"previous"


# ----------------------------------------------------------------------- merge_files


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("average", {}),
        ("average", {"weights": [1.0, 2.0, 3.0]}),
        ("task_arithmetic", {"scaling": 0.4}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.3, "scope": "tensor"}),
        ("ties fused", {"density": 0.3}),
        ("ties fused", {"density": 0.3, "scope": "tensor"}),
        ("dare", {"drop_rate": 0.5, "seed": 7}),
        ("dare", {"drop_rate": 0.5, "seed": 7, "combine": "ties", "density": 0.5}),
        ("dare fused", {"drop_rate": 0.5, "seed": 7}),
        ("dare fused", {"drop_rate": 0.5, "seed": 7, "rng": "torch"}),
    ],
)
def test_streamed_merge_equals_in_memory_merge(tmp_path, monkeypatch, name, hparams):
    if name.endswith(" fused"):  # the numba kernels, whatever the model's size
        monkeypatch.setattr(_kernels, "MIN_ENTRIES", 0)
        name = name.removesuffix(" fused")
    experts, base, paths, base_path = write_experts(tmp_path)
    method = get_method(name, **hparams)
    expected = method.merge(experts, base)
    out = merge_files(method, paths, tmp_path / "out" / "merged.safetensors", base_path, progress=False)
    merged = load_file(out)
    assert set(merged) == set(expected)
    for key, value in expected.items():
        assert merged[key].dtype == value.dtype and torch.equal(merged[key], value), key
    assert files_in(out.parent) == ["merged.safetensors"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_experts_keep_their_dtype(tmp_path, dtype):
    experts, base, paths, base_path = write_experts(tmp_path, dtype=dtype)
    for name in ("average", "ties"):
        method = get_method(name)
        out = merge_files(method, paths, tmp_path / f"{name}.safetensors", base_path, progress=False)
        merged = load_file(out)
        expected = method.merge(experts, base)
        assert merged["block.0.weight"].dtype == dtype
        assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_per_tensor_merge_holds_about_k_tensors(tmp_path):
    num_experts = 4
    experts, base, paths, base_path = write_experts(tmp_path, num_experts=num_experts)
    CountingLazy.reset()
    import merging.streaming as streaming

    original = streaming.LazySafetensors
    streaming.LazySafetensors = CountingLazy
    try:
        for name in ("average", "ties"):
            for hparams in ({}, {"scope": "tensor"}) if name == "ties" else ({},):
                CountingLazy.reset()
                merge_files(get_method(name, **hparams), paths, tmp_path / "m.safetensors", base_path, progress=False)
                # K experts + θ₀ of one entry, never the whole model (6 keys x 5 files here).
                assert CountingLazy.peak <= num_experts + 1, (name, hparams, CountingLazy.peak)
    finally:
        streaming.LazySafetensors = original


def test_mismatched_file_error_names_file_and_key(tmp_path):
    experts, base, paths, base_path = write_experts(tmp_path)
    bad = dict(experts[1])
    bad["block.0.weight"] = torch.randn(6, 7)
    save_file(bad, paths[1])
    with pytest.raises(StateDictError, match=r"expert1\.safetensors.*'block\.0\.weight'.*\(6, 7\)"):
        merge_files(get_method("ties"), paths, tmp_path / "m.safetensors", base_path, progress=False)
    missing = {k: v for k, v in experts[2].items() if k != "norm.scale"}
    save_file(missing, paths[2])
    save_file(experts[1], paths[1])
    with pytest.raises(StateDictError, match=r"expert2\.safetensors.*missing keys \['norm\.scale'\]"):
        merge_files(get_method("average"), paths, tmp_path / "m.safetensors", progress=False)
    assert not (tmp_path / "m.safetensors").exists()


def test_nan_in_an_expert_names_file_and_key(tmp_path):
    experts, base, paths, base_path = write_experts(tmp_path)
    poisoned = dict(experts[0])
    poisoned["block.1.weight"] = poisoned["block.1.weight"].clone()
    poisoned["block.1.weight"][0, 0] = float("nan")
    save_file(poisoned, paths[0])
    with pytest.raises(StateDictError, match=r"expert0\.safetensors.*'block\.1\.weight'.*non-finite"):
        merge_files(get_method("average"), paths, tmp_path / "m.safetensors", progress=False)


class FailingAverage(WeightAveraging):
    """Raises on the third floating entry it merges (an interrupted merge)."""

    name = "failing_average"

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def merge_tensor(self, key, experts, base, context):
        self.seen.add(key)
        if len(self.seen) == 3:
            raise RuntimeError(f"interrupted at {key}")
        return super().merge_tensor(key, experts, base, context)


def test_exception_while_streaming_leaves_no_output_and_no_temp(tmp_path):
    _, _, paths, _ = write_experts(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(RuntimeError, match="interrupted"):
        merge_files(FailingAverage(), paths, out_dir / "m.safetensors", progress=False)
    assert files_in(out_dir) == []
    (out_dir / "m.safetensors").write_bytes(b"old merge")
    with pytest.raises(RuntimeError, match="interrupted"):
        merge_files(FailingAverage(), paths, out_dir / "m.safetensors", progress=False)
    assert files_in(out_dir) == ["m.safetensors"] and (out_dir / "m.safetensors").read_bytes() == b"old merge"


def test_whole_model_methods_and_missing_inputs_are_refused(tmp_path):
    _, _, paths, _ = write_experts(tmp_path)

    class WholeModel(WeightAveraging):
        name = "whole_model"

        def merge(self, experts, base=None, *, model=None, data=None):
            return dict(experts[0])

    with pytest.raises(ValueError, match="overrides merge"):
        merge_files(WholeModel(), paths, tmp_path / "m.safetensors", progress=False)
    with pytest.raises(ValueError, match=r"ties needs base"):
        merge_files(get_method("ties"), paths, tmp_path / "m.safetensors", progress=False)
    with pytest.raises(FileNotFoundError, match="ghost.safetensors"):
        merge_files(get_method("average"), [*paths, tmp_path / "ghost.safetensors"], tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="safetensors' suffix"):
        merge_files(get_method("average"), paths, tmp_path / "m.pt", progress=False)


# ------------------------------------------------------------------------------- CLI


def test_parse_hparams():
    assert parse_hparams(["density=0.2", "scope=tensor", "weights=[1, 2]", "seed=3", "flag=true"]) == {
        "density": 0.2,
        "scope": "tensor",
        "weights": [1, 2],
        "seed": 3,
        "flag": True,
    }
    with pytest.raises(ValueError, match="'density' is not of the form"):
        parse_hparams(["density"])


def test_cli_merge_end_to_end(tmp_path, capsys):
    experts, base, paths, base_path = write_experts(tmp_path)
    out = tmp_path / "merged.safetensors"
    argv = ["merge", "--experts", *map(str, paths), "--base", str(base_path), "--method", "ties"]
    cli_main([*argv, "--hparams", "density=0.5", "scaling=0.8", "--out", str(out)])
    expected = get_method("ties", density=0.5, scaling=0.8).merge(experts, base)
    merged = load_state_dict(out)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert "ties: merge" in capsys.readouterr().err  # the progress bar, on stderr

    gone = ["merge", "--experts", str(paths[0]), str(tmp_path / "gone.safetensors"), "--method", "average"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*gone, "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 1 and "gone.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--hparams", "dencity=0.5", "--out", str(tmp_path / "x.safetensors")])
    assert exit_info.value.code == 2 and "dencity" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
