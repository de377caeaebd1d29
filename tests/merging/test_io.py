"""Safe loading and atomic saving of state dicts."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from merging.io import CheckpointError, load_state_dict, save_state_dict
from merging.methods import get_method
from merging.state import StateDictError


def small_state():
    return {"w": torch.randn(4, 3), "b": torch.zeros(4), "n": torch.tensor(3)}


def test_safetensors_round_trip(tmp_path):
    state = small_state()
    path = save_state_dict(state, tmp_path / "m.safetensors")
    loaded = load_state_dict(path)
    assert loaded.source == str(path)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left


def test_torch_file_and_lightning_ckpt_with_prefix(tmp_path):
    state = small_state()
    torch.save(state, tmp_path / "plain.pt")
    assert set(load_state_dict(tmp_path / "plain.pt")) == set(state)
    ckpt = {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in state.items()} | {"other.x": torch.ones(1)}}
    torch.save(ckpt, tmp_path / "run.ckpt")
    loaded = load_state_dict(tmp_path / "run.ckpt", prefix="model.")
    assert set(loaded) == set(state)
    with pytest.raises(CheckpointError, match="no key starts with prefix 'backbone.'"):
        load_state_dict(tmp_path / "run.ckpt", prefix="backbone.")


def test_real_lightning_checkpoint(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = pl.Trainer(
        max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(BoringModel())
    ckpt = next(tmp_path.rglob("*.ckpt"))
    loaded = load_state_dict(ckpt, prefix="layer.")
    assert set(loaded) == {"weight", "bias"}


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lightning_merging_pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Exploit()}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_state_dict(path)
    assert not os.path.exists("/tmp/lightning_merging_pwned")


def test_truncated_and_non_state_dict_files(tmp_path):
    save_state_dict(small_state(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_state_dict(tmp_path / "cut.safetensors")
    torch.save(small_state(), tmp_path / "p.pt")
    raw = (tmp_path / "p.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_state_dict(tmp_path / "cut.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: holds a list"):
        load_state_dict(tmp_path / "list.pt")
    torch.save({"w": torch.ones(2), "lr": 0.1}, tmp_path / "mixed.pt")
    with pytest.raises(StateDictError, match="key 'lr' holds a float"):
        load_state_dict(tmp_path / "mixed.pt")
    (tmp_path / "notes.pt").write_text("# not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pt: not a torch checkpoint"):
        load_state_dict(tmp_path / "notes.pt")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_state_dict(tmp_path / "missing.safetensors")


def test_error_names_the_file_of_a_mismatched_expert(tmp_path):
    a = small_state()
    b = dict(small_state(), w=torch.zeros(5, 3))
    save_state_dict(a, tmp_path / "a.safetensors")
    save_state_dict(b, tmp_path / "b.safetensors")
    experts = [load_state_dict(tmp_path / "a.safetensors"), load_state_dict(tmp_path / "b.safetensors")]
    with pytest.raises(ValueError, match=r"b\.safetensors.*key 'w' has shape \(5, 3\)"):
        get_method("average").merge(experts)


def test_bad_save_writes_nothing_and_keeps_previous_file(tmp_path):
    target = tmp_path / "m.safetensors"
    save_state_dict(small_state(), target)
    before = target.read_bytes()
    bad = dict(small_state(), w=torch.tensor([float("inf")]))
    with pytest.raises(StateDictError, match="key 'w'"):
        save_state_dict(bad, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import merging.io as io

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_state_dict(small_state(), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    import os

    from merging.io import write_text_atomic

    umask = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "table.md", "| a |\n")
    finally:
        os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o644
